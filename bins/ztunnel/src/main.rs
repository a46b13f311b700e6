//! `ztunnel`: meshkit's node proxy. It reads Istio ztunnel's environment variables and flags (see
//! `config`) and runs the proxy composed from `mesh-proxy` (see `proxy`).
#![forbid(unsafe_code)]

mod config;
mod inpod;
mod logging;
mod proxy;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

fn main() -> ExitCode {
    let args = config::Args::parse();
    let config = match config::Config::from_args(args) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("ztunnel: invalid configuration: {error}");
            return ExitCode::from(2);
        }
    };
    let logging = logging::init(config.args.log_format);
    // Before the runtime's threads exist: keep freed HTTP/2 frame buffers warm instead of returning them to
    // the kernel after every frame (see mesh_core::sys::allocator). Elsewhere than glibc there is nothing
    // to tune, and the proxy works the same.
    if let Err(error) = mesh_core::sys::allocator::tune(mesh_core::sys::allocator::Tuning::PROXY) {
        tracing::debug!(%error, "allocator left at its defaults");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.workers)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("ztunnel: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(proxy::run(config, Arc::new(logging))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "ztunnel stopped");
            eprintln!("ztunnel: {error}");
            ExitCode::FAILURE
        }
    }
}
