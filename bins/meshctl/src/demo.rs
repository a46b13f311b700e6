//! `meshctl demo`: the local demo mesh, on loopback.
//!
//! A local control plane (the same delta ADS and Istio CA service istiod offers on port 15012) serves two
//! workloads, `client` and `server`, and an Istio AuthorizationPolicy from YAML files in a temporary
//! directory. A node proxy's view is built from it as ztunnel builds its own: an ADS client turns the pushed
//! resources into a mesh snapshot and a set of L4 policies, and workload certificates (short-lived, so they
//! rotate) come from the control plane's CA through the caching provider. The server side is an HBONE
//! acceptor (as ztunnel runs on port 15008) that authorizes each tunnel with the pushed policies and says
//! why; the client opens tunnels through the pooled HBONE connector. A long-lived tunnel keeps carrying bytes
//! while both certificates rotate, the tunnels the policy refuses get HBONE 401, and an edit to the policy
//! file reaches the proxy while it runs.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use mesh_core::cert::CachingCertConfig;
use mesh_core::model::SnapshotPublisher;
use mesh_core::{CachingCertProvider, DevCa, SpiffeId, TrustDomain, drain, tls};
use mesh_hbone::headers::{BAGGAGE, Baggage};
use mesh_hbone::{
    ConnectRequest, HboneAcceptor, HboneConfig, HboneConnector, HboneError, InboundTunnel, TunnelTarget,
};
use mesh_policy::authz::ConnectionAttrs;
use mesh_policy::{L4PolicySet, L4Target};
use mesh_xds::client::{AdsClientBuilder, ZtunnelNode, publish_policies, publish_snapshots};
use mesh_xds::server::{Server, ServerConfig};
use mesh_xds::transport::{CallCredentials, GrpcClientConfig, TokenSource, connect_lazy};
use mesh_xds::{IstioCaConfig, IstioCaSigner, XdsAddress, XdsAuthorization};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The demo's workloads and service, in Istio ztunnel's `LOCAL_XDS` format.
const MESH: &str = r#"
workloads:
- uid: Kubernetes//Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["198.18.0.1"]
  protocol: HBONE
  node: node-a
- uid: Kubernetes//Pod/default/server
  name: server
  namespace: default
  serviceAccount: server
  workloadIps: ["127.0.0.1"]
  protocol: HBONE
  node: node-b
  services:
    "default/echo.default.svc.cluster.local": {80: 8080}
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/198.19.0.10"]
  ports: {80: 8080}
"#;

/// The demo's policy, as `kubectl get -o yaml` would print it: only the `client` service account may reach
/// the server, and only on the ports listed.
fn policy(ports: &str) -> String {
    format!(
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-client, namespace: default}}
spec:
  action: ALLOW
  rules:
  - from: [{{source: {{principals: ["cluster.local/ns/default/sa/client"]}}}}]
    to: [{{operation: {{ports: [{ports}]}}}}]
"#
    )
}

const SERVER_UID: &str = "Kubernetes//Pod/default/server";

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

/// A directory removed when the demo ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) async fn run(args: DemoArgs) -> DemoResult<()> {
    let td = TrustDomain::new("cluster.local")?;
    let dir = TempDir(std::env::temp_dir().join(format!("meshkit-demo-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;
    std::fs::write(dir.0.join("mesh.yaml"), MESH)?;
    std::fs::write(dir.0.join("policy.yaml"), policy("\"8080\""))?;

    // The control plane, as istiod: ADS and CA on one TLS port, fed from the files.
    let ca = Arc::new(DevCa::new(td.clone(), args.cert_lifetime)?);
    let mut config = ServerConfig::new(&dir.0);
    config.listen = "127.0.0.1:0".parse()?;
    config.poll_interval = Duration::from_millis(100);
    let control_plane = Server::start(config, ca).await?;
    let served = control_plane.config();
    println!(
        "control  local control plane at {} serving {} workloads, {} service and {} policy from {}",
        control_plane.url(),
        served.workloads.len(),
        served.services.len(),
        served.policies.len(),
        dir.0.display()
    );

    // The node proxy's view, over delta ADS.
    let grpc = GrpcClientConfig::new(control_plane.url())
        .with_roots_pem(control_plane.root_pem().as_bytes().to_vec());
    let credentials =
        CallCredentials::bearer(TokenSource::Literal("demo-token".into()))?.with_cluster_id("Kubernetes")?;
    let node = ZtunnelNode {
        pod_name: "ztunnel-demo".into(),
        pod_namespace: "istio-system".into(),
        node_name: "node-b".into(),
        ..ZtunnelNode::default()
    };
    let mut builder = AdsClientBuilder::new(node.to_proto());
    let addresses = builder.watch::<XdsAddress>();
    let policies = builder.watch::<XdsAuthorization>();
    let (ads, handle) = builder.build(connect_lazy(&grpc)?, credentials.clone());
    let (stop_ads, ads_stopped) = tokio::sync::oneshot::channel::<()>();
    let ads_task = tokio::spawn(ads.run(async move {
        let _ = ads_stopped.await;
    }));
    let snapshots = SnapshotPublisher::new();
    let mesh = snapshots.subscribe();
    tokio::spawn(publish_snapshots(addresses, snapshots));
    let (policy_tx, policy_set) = watch::channel(Arc::new(L4PolicySet::default()));
    tokio::spawn(publish_policies(policies, policy_tx));
    tokio::time::timeout(Duration::from_secs(10), handle.wait_ready()).await??;
    // Ready means the ADS client holds the first push; the snapshot and the policy set are derived from it
    // by their own tasks, so wait for them to catch up with what the control plane serves.
    let (mut mesh_changes, mut policy_changes) = (mesh.clone(), policy_set.clone());
    tokio::time::timeout(Duration::from_secs(10), async {
        while mesh_changes.current().workload_count() < served.workloads.len() {
            mesh_changes.changed().await;
        }
        let _ = policy_changes
            .wait_for(|set| set.len() == served.policies.len())
            .await;
    })
    .await?;
    let received = policy_set.borrow().clone();
    let names: Vec<String> = received.iter().map(|policy| policy.key()).collect();
    println!(
        "xds      ready: {} workloads, {} services and {} L4 policy ({}) received",
        mesh.current().workload_count(),
        mesh.current().service_count(),
        received.len(),
        names.join(", ")
    );

    // Certificates from the control plane's CA.
    let signer = IstioCaSigner::new(connect_lazy(&grpc)?, credentials, IstioCaConfig::default());
    let provider = CachingCertProvider::new(
        Arc::new(signer),
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
            "cert     {} issued by the control plane's CA, valid for {}",
            cert.identity(),
            describe_life(&cert.current())
        );
    }

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server_tls = tls::server_config(server_cert, vec![td.clone()])?;
    let service = {
        let (mesh, policy_set) = (mesh.clone(), policy_set.clone());
        tower::service_fn(move |tunnel: InboundTunnel| serve(tunnel, mesh.clone(), policy_set.clone()))
    };
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
    // The policy changes while everything runs: the edit is pushed, and the next tunnel is decided by it.
    std::fs::write(dir.0.join("policy.yaml"), policy("\"8080\", \"9090\""))?;
    println!("edit     policy.yaml now allows ports 8080 and 9090");
    let mut pushed = policy_set.clone();
    tokio::time::timeout(
        Duration::from_secs(10),
        pushed.wait_for(|set| {
            set.get("default/allow-client").is_some_and(|p| {
                p.rules
                    .iter()
                    .flat_map(|r| &r.clauses)
                    .flat_map(|c| &c.matches)
                    .any(|m| m.destination_ports.contains(&9090))
            })
        }),
    )
    .await??;
    let mut stream = BufReader::new(connector.connect(request(&client_id, 9090)).await?);
    stream.get_mut().write_all(b"hello on 9090\n").await?;
    let mut reply = String::new();
    stream.read_line(&mut reply).await?;
    println!(
        "xds      the new policy arrived; {client_id} -> 127.0.0.1:9090 now opens: got \"{}\"",
        reply.trim_end()
    );
    drop(stream);
    println!(
        "done     {pings} round trips on one tunnel across {rotations} certificate rotation(s); {} HBONE \
         connection(s) opened (pooled per source identity); the ztunnel binary joins this demo as it lands",
        connector.stats().handshakes
    );
    // The node proxy goes first, so it does not see its control plane vanish.
    let _ = stop_ads.send(());
    let _ = ads_task.await;
    control_plane.shutdown().await;
    Ok(())
}

/// The server side of each tunnel: authorize at L4 with the pushed policies, as ztunnel does, then echo
/// lines.
async fn serve(
    tunnel: InboundTunnel,
    mesh: mesh_core::model::SnapshotReceiver,
    policies: watch::Receiver<Arc<L4PolicySet>>,
) -> Result<(), Infallible> {
    let port = tunnel.target().port();
    let destination_ip = match tunnel.target() {
        TunnelTarget::Addr(addr) => addr.ip(),
        TunnelTarget::Host { .. } => tunnel.local_addr().ip(),
    };
    let snapshot = mesh.current();
    let Some(workload) = snapshot.workload_by_uid(SERVER_UID) else {
        // Fail closed: without the destination's policy binding there is no decision to make.
        tunnel.reject(http::StatusCode::SERVICE_UNAVAILABLE);
        return Ok(());
    };
    let policies = policies.borrow().clone();
    let evaluation = policies.evaluate(
        &L4Target::from(&**workload),
        &ConnectionAttrs {
            source: Some(tunnel.peer_identity()),
            source_ip: tunnel.peer_addr().ip(),
            destination_ip,
            destination_port: port,
            sni: None,
        },
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
