//! `waypoint`: meshkit's L7 proxy for Istio ambient mode. It terminates HBONE, applies routing,
//! authorization and traffic policy, and opens HBONE to the destination.
//!
//! The proxy itself lands with the waypoint issue; until then this binary checks its identity settings and
//! refuses to start, saying so, rather than pretending to proxy.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use mesh_core::{SpiffeId, TrustDomain};

/// meshkit waypoint: the ambient-mode L7 proxy.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Trust domain of the mesh.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Namespace the waypoint serves.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pod_namespace: String,
    /// Service account of the waypoint.
    #[arg(long, env = "SERVICE_ACCOUNT", default_value = "waypoint")]
    service_account: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let identity = TrustDomain::new(&args.trust_domain)
        .and_then(|td| SpiffeId::istio(&td, &args.pod_namespace, &args.service_account));
    match identity {
        Ok(id) => {
            eprintln!(
                "waypoint: identity {id} is valid, but the L7 proxy is not built yet (see the waypoint issue); \
                 refusing to start instead of running without a data path"
            );
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("waypoint: {e}");
            ExitCode::from(2)
        }
    }
}
