//! `meshctl demo`: the local demo mesh, on loopback.
//!
//! Two workloads, `client` and `server`, get short-lived certificates from a development CA through the
//! caching provider. The server side is an HBONE acceptor (as ztunnel runs on port 15008) that authorizes
//! each tunnel with an Istio AuthorizationPolicy at L4, then echoes; the client opens tunnels through the
//! pooled HBONE connector. A long-lived tunnel keeps carrying bytes while both certificates rotate, and the
//! tunnels the policy refuses are shown with the policy's explanation.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use mesh_core::cert::CachingCertConfig;
use mesh_core::{CachingCertProvider, DevCa, SpiffeId, TrustDomain, drain, tls};
use mesh_hbone::headers::{BAGGAGE, Baggage};
use mesh_hbone::{
    ConnectRequest, HboneAcceptor, HboneConfig, HboneConnector, HboneError, InboundTunnel, TunnelTarget,
};
use mesh_policy::authz::{ConnectionAttrs, Enforcement, Request, Target};
use mesh_policy::{PolicyEngine, PolicySet, resource::parse_resources};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// The demo's policy: only the `client` service account may reach the server, and only on port 8080.
const POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: default}
spec:
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/client"]}}]
    to: [{operation: {ports: ["8080"]}}]
"#;

/// Options of `meshctl demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Lifetime of the workload certificates; a short one shows rotation (renewal at half life).
    #[arg(long, default_value = "4s", value_parser = parse_duration)]
    cert_lifetime: Duration,
    /// How long the long-lived tunnel runs while certificates rotate under it.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    run_for: Duration,
}

pub(crate) type DemoResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

pub(crate) async fn run(args: DemoArgs) -> DemoResult<()> {
    let td = TrustDomain::new("cluster.local")?;
    let ca = DevCa::new(td.clone(), args.cert_lifetime)?;
    println!("CA       development root for trust domain {td}");
    let provider = CachingCertProvider::new(
        Arc::new(ca),
        CachingCertConfig {
            validity: args.cert_lifetime,
            ..CachingCertConfig::default()
        },
    );
    let client_id = SpiffeId::istio(&td, "default", "client")?;
    let server_id = SpiffeId::istio(&td, "default", "server")?;
    let intruder_id = SpiffeId::istio(&td, "default", "intruder")?;
    let server_cert = provider.fetch(&server_id).await?;
    let mut client_cert = provider.fetch(&client_id).await?;
    for cert in [&client_cert, &server_cert] {
        println!(
            "cert     {} valid for {}",
            cert.identity(),
            describe_life(&cert.current())
        );
    }

    let parsed = parse_resources(POLICY)?;
    let engine = PolicyEngine::fixed(PolicySet::compile(
        parsed.authorization_policies(),
        "istio-system",
    )?);
    println!("policy   default/allow-client: ALLOW {client_id} to port 8080");

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server_tls = tls::server_config(server_cert, vec![td.clone()])?;
    let service = tower::service_fn(move |tunnel: InboundTunnel| serve(tunnel, engine.clone()));
    let (_drain, watch) = drain::channel();
    tokio::spawn(HboneAcceptor::new(HboneConfig::default(), server_tls, service).serve(listener, watch));
    println!("server   {server_id}: HBONE acceptor on {addr} (mutual TLS 1.3, HTTP/2 CONNECT)");

    let connector = HboneConnector::new(HboneConfig::default(), Arc::new(provider.clone()));
    let request = |source: &SpiffeId, port: u16| {
        ConnectRequest::new(
            source.clone(),
            addr,
            vec![server_id.clone()],
            format!("127.0.0.1:{port}"),
        )
        .with_baggage(&Baggage {
            namespace: source.namespace().map(str::to_owned),
            workload_kind: Some("deployment".to_owned()),
            workload_name: source.service_account().map(str::to_owned),
            ..Baggage::default()
        })
    };

    // A long-lived tunnel that must survive certificate rotation on both sides.
    let stream = connector.connect(request(&client_id, 8080)).await?;
    let destination = Baggage::from_headers(stream.headers());
    println!(
        "client   {client_id} -> tunnel to 127.0.0.1:8080 open; the server answered 200 with baggage for {}",
        destination.workload_name.as_deref().unwrap_or("?")
    );
    let mut tunnel = BufReader::new(stream);
    let started = Instant::now();
    let (mut pings, mut rotations) = (0u32, 0u32);
    while started.elapsed() < args.run_for {
        tokio::select! {
            rotated = client_cert.changed() => {
                let Some(cert) = rotated else { break };
                rotations += 1;
                println!("rotate   {} renewed, new certificate valid for {}", cert.identity(), describe_life(&cert));
            }
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                pings += 1;
                tunnel.get_mut().write_all(format!("ping {pings}\n").as_bytes()).await?;
                let mut reply = String::new();
                tunnel.read_line(&mut reply).await?;
                println!("data     long-lived tunnel: sent \"ping {pings}\", got \"{}\"", reply.trim_end());
            }
        }
    }

    // What the policy refuses, and why.
    for (who, port) in [(&intruder_id, 8080), (&client_id, 9090)] {
        match connector.connect(request(who, port)).await {
            Ok(_) => return Err(format!("{who} reached port {port}: the policy was not enforced").into()),
            Err(HboneError::Status(status)) => {
                println!("refused  {who} -> 127.0.0.1:{port}: HBONE {status} (the server logged why above)");
            }
            Err(other) => return Err(other.into()),
        }
    }
    println!(
        "done     {pings} round trips on one tunnel across {rotations} certificate rotation(s); {} HBONE \
         connection(s) opened (pooled per source identity); xDS and the ztunnel binary join this demo as they land",
        connector.stats().handshakes
    );
    Ok(())
}

/// The server side of each tunnel: authorize at L4 as ztunnel does, then echo lines.
async fn serve(tunnel: InboundTunnel, engine: PolicyEngine) -> Result<(), Infallible> {
    let port = tunnel.target().port();
    let destination_ip = match tunnel.target() {
        TunnelTarget::Addr(addr) => addr.ip(),
        TunnelTarget::Host { .. } => tunnel.local_addr().ip(),
    };
    let labels = BTreeMap::new();
    let evaluation = engine.evaluate(
        &Target {
            namespace: "default",
            labels: &labels,
            enforcement: Enforcement::Ztunnel,
        },
        &Request::l4(ConnectionAttrs {
            source: Some(tunnel.peer_identity()),
            source_ip: tunnel.peer_addr().ip(),
            destination_ip,
            destination_port: port,
            sni: None,
        }),
    );
    let peer = tunnel.peer_identity().clone();
    println!("server   {peer} -> port {port}: {evaluation}");
    if !evaluation.is_allowed() {
        tunnel.reject(http::StatusCode::UNAUTHORIZED);
        return Ok(());
    }
    let mut headers = http::HeaderMap::new();
    let baggage = Baggage {
        namespace: Some("default".to_owned()),
        workload_kind: Some("deployment".to_owned()),
        workload_name: Some("server".to_owned()),
        ..Baggage::default()
    };
    headers.insert(BAGGAGE, baggage.to_header_value());
    let Ok(stream) = tunnel.accept(headers) else {
        return Ok(());
    };
    let mut lines = BufReader::new(stream);
    let mut line = String::new();
    while matches!(lines.read_line(&mut line).await, Ok(n) if n > 0) {
        let reply = format!(
            "pong to {} ({})\n",
            peer.service_account().unwrap_or("?"),
            line.trim_end()
        );
        if lines.get_mut().write_all(reply.as_bytes()).await.is_err() {
            break;
        }
        line.clear();
    }
    Ok(())
}

fn describe_life(cert: &mesh_core::WorkloadCert) -> String {
    format!("{:.1}s", cert.remaining(SystemTime::now()).as_secs_f64())
}

/// Parses `500ms`, `4s`, `2m` or a bare number of seconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let value: f64 = number.parse().map_err(|_| format!("not a duration: {text:?}"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("unknown unit in {text:?}: use ms, s, m or h")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}
