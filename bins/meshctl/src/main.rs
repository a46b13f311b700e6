//! `meshctl`: meshkit's command-line tool.
//!
//! `meshctl demo` runs the local demo mesh with the parts that exist: a development CA and a caching
//! certificate provider that issues and rotates workload certificates, HBONE tunnels between two workloads
//! on loopback, and an Istio AuthorizationPolicy enforced (and explained) on each tunnel. xDS and the
//! proxies join the demo as they land.
//!
//! `meshctl control-plane` runs the local control plane (`mesh_xds::server::Server`) on its own, for our
//! proxies or Istio's ztunnel to connect to.
//!
//! `meshctl dev-ca init` writes a development root (certificate and key) for several local processes to
//! share.
#![forbid(unsafe_code)]

mod control_plane;
mod demo;
mod dev_ca;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// meshkit's command-line tool.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the local demo mesh on loopback and print what happens.
    Demo(demo::DemoArgs),
    /// Serve delta ADS and the Istio CA from YAML files, as istiod does on port 15012, until interrupted.
    ControlPlane(control_plane::ControlPlaneArgs),
    /// Manage a development CA shared by local processes (`init` writes its root and key).
    DevCa(dev_ca::DevCaArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Demo(args) => runtime.block_on(demo::run(args)),
        Command::ControlPlane(args) => runtime.block_on(control_plane::run(args)),
        Command::DevCa(args) => dev_ca::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshctl: {e}");
            ExitCode::FAILURE
        }
    }
}
