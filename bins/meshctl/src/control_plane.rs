//! `meshctl control-plane`: the local control plane (delta ADS and the Istio CA, as istiod serves them on
//! port 15012) fed from a YAML file or directory, until interrupted.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::{DevCa, SpiffeId, TrustDomain};
use mesh_xds::ca::{Caller, ClientCertAuthenticator, StaticTokens};
use mesh_xds::server::{ClientAuth, Server, ServerConfig};

use crate::demo::{DemoResult, parse_duration};

/// Options of `meshctl control-plane`.
#[derive(Debug, clap::Args)]
pub(crate) struct ControlPlaneArgs {
    /// The YAML file or directory to serve: Istio ztunnel's LOCAL_XDS format, or Kubernetes objects as
    /// `kubectl get -o yaml` prints them (Pods, Services, Namespaces, ServiceEntries, AuthorizationPolicies,
    /// PeerAuthentications). Changes are picked up while running; a broken edit is reported and not served.
    #[arg(long)]
    config: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:15012")]
    listen: SocketAddr,
    /// Serve plaintext HTTP/2 instead of TLS (clients' tokens then travel in clear).
    #[arg(long)]
    plaintext: bool,
    /// Write the CA's root certificate (PEM) here, for clients' XDS_ROOT_CA / CA_ROOT_CA.
    #[arg(long)]
    root_cert_out: Option<PathBuf>,
    /// Trust domain of the CA and of the served identities.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Cluster id in workload uids (Istio's CLUSTER_ID).
    #[arg(long, default_value = "Kubernetes")]
    cluster_id: String,
    /// Node of the ztunnel that may have certificates issued for the workloads on it (dev mode:
    /// impersonation requests from loopback are attributed to ztunnel on this node).
    #[arg(long)]
    ztunnel_node: Option<String>,
    /// Longest workload certificate the CA issues.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    max_cert_lifetime: Duration,
    /// Accept this bearer token for a caller, as `TOKEN=SPIFFE_ID` or `TOKEN=SPIFFE_ID@NODE` (a node proxy
    /// on NODE); repeatable. With any `--token`, only these tokens (and client certificates from this CA)
    /// are accepted, from any address: the way to serve proxies in other network namespaces or machines.
    #[arg(long = "token", value_name = "TOKEN=SPIFFE_ID[@NODE]", value_parser = parse_token)]
    tokens: Vec<(String, Caller)>,
    /// How often the configuration is checked for changes (an edit reaches the proxies within about this
    /// plus the push).
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    poll_interval: Duration,
}

pub(crate) async fn run(args: ControlPlaneArgs) -> DemoResult<()> {
    let trust_domain = TrustDomain::new(&args.trust_domain)?;
    let ca = Arc::new(DevCa::new(trust_domain.clone(), args.max_cert_lifetime)?);
    let mut config = ServerConfig::new(&args.config);
    config.listen = args.listen;
    config.tls = !args.plaintext;
    config.poll_interval = args.poll_interval;
    config.local.cluster_id = args.cluster_id.clone();
    config.local.trust_domain = trust_domain.clone();
    let ztunnel = SpiffeId::istio(&trust_domain, "istio-system", "ztunnel")?;
    config.impersonators = vec![ztunnel.clone()];
    let dev_mode = args.tokens.is_empty();
    config.auth = if dev_mode {
        ClientAuth::DevLoopback {
            node_proxy: args
                .ztunnel_node
                .as_ref()
                .map(|node| Caller::new(ztunnel.clone()).on_node(node.clone())),
        }
    } else {
        let mut tokens = StaticTokens::new();
        for (token, caller) in &args.tokens {
            tokens.insert(token.clone(), caller.clone());
        }
        ClientAuth::Authenticators(vec![
            Arc::new(tokens),
            Arc::new(ClientCertAuthenticator::for_ca(&ca)?),
        ])
    };
    let server = Server::start(config, ca.clone()).await?;
    if let Some(path) = &args.root_cert_out {
        std::fs::write(path, server.root_pem())
            .map_err(|e| format!("cannot write the root certificate to {}: {e}", path.display()))?;
    }
    let served = server.config();
    println!(
        "serving {} (ADS and CA, dev mode: any token from loopback)",
        server.url()
    );
    println!(
        "config  {}: {} workloads, {} services, {} policies",
        args.config.display(),
        served.workloads.len(),
        served.services.len(),
        served.policies.len()
    );
    if let Some(path) = &args.root_cert_out {
        println!("root    {}", path.display());
    }
    wait_for_signal().await?;
    println!("stopping");
    server.shutdown().await;
    Ok(())
}

/// Waits for Ctrl-C or SIGTERM.
async fn wait_for_signal() -> DemoResult<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

/// Parses `TOKEN=SPIFFE_ID` or `TOKEN=SPIFFE_ID@NODE`.
fn parse_token(text: &str) -> Result<(String, Caller), String> {
    let (token, caller) = text
        .split_once('=')
        .ok_or_else(|| "expected TOKEN=SPIFFE_ID[@NODE]".to_owned())?;
    if token.trim().is_empty() {
        return Err("the token is empty".to_owned());
    }
    let (identity, node) = match caller.rsplit_once('@') {
        Some((identity, node)) if !node.is_empty() => (identity, Some(node)),
        _ => (caller, None),
    };
    let identity = SpiffeId::parse(identity).map_err(|e| e.to_string())?;
    let caller = Caller::new(identity);
    Ok((
        token.to_owned(),
        match node {
            Some(node) => caller.on_node(node),
            None => caller,
        },
    ))
}
