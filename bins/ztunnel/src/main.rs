//! `ztunnel`: meshkit's node proxy. It reads Istio ztunnel's environment variables and flags (see
//! `shared/PROTOCOLS.md` 2.1) and runs the proxy composed in `mesh-proxy`.
//!
//! The proxy itself lands with the ztunnel issue; until then this binary checks its identity settings and
//! refuses to start, saying so, rather than pretending to proxy.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use mesh_core::{SpiffeId, TrustDomain};

/// meshkit ztunnel: the ambient-mode node proxy (L4, HBONE on port 15008).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Trust domain of the workloads this proxy serves.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Namespace of ztunnel's own pod.
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    pod_namespace: String,
    /// Service account of ztunnel's own pod.
    #[arg(long, env = "SERVICE_ACCOUNT", default_value = "ztunnel")]
    service_account: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let identity = TrustDomain::new(&args.trust_domain)
        .and_then(|td| SpiffeId::istio(&td, &args.pod_namespace, &args.service_account));
    match identity {
        Ok(id) => {
            eprintln!(
                "ztunnel: identity {id} is valid, but the node proxy is not built yet (see the ztunnel issue); \
                 refusing to start instead of running without a data path"
            );
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("ztunnel: {e}");
            ExitCode::from(2)
        }
    }
}
