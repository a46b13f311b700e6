//! `ztunnel`: meshkit's node proxy. It reads Istio ztunnel's environment variables and flags (see
//! `config`) and runs the proxy composed in `mesh-proxy`.
//!
//! The data path is being composed (the ztunnel issue); until it is, this binary checks its whole
//! configuration and refuses to start, saying so, rather than pretending to proxy.
#![forbid(unsafe_code)]

mod config;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = config::Args::parse();
    match config::Config::from_args(args) {
        Ok(config) => {
            eprintln!(
                "ztunnel: configuration valid (identity {} in trust domain {}, cluster {}, {:?} mode, config from \
                 {:?}, certificates from {:?}), but the node proxy is not composed yet (see the ztunnel issue); \
                 refusing to start instead of running without a data path",
                config.own_identity,
                config.trust_domain,
                config.args.cluster_id,
                config.mode,
                config.source,
                config.certs
            );
            ExitCode::from(2)
        }
        Err(error) => {
            eprintln!("ztunnel: invalid configuration: {error}");
            ExitCode::from(2)
        }
    }
}
