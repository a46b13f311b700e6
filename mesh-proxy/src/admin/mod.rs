//! The node proxy's HTTP operations endpoints, on Istio's ports: admin (`127.0.0.1:15000`), metrics
//! (`:15020`) and readiness (`:15021`).
//!
//! ## Layout
//! - [`HttpServer`] + [`HttpServerConfig`]: a bounded HTTP/1.1 server (header and body sizes, timeouts,
//!   connection count, graceful drain) serving one [`HttpHandler`].
//! - [`MetricsEndpoint`]: `/metrics` and `/stats/prometheus` from a [`Metrics`](crate::metrics::Metrics).
//! - [`Readiness`], [`ReadyToken`], [`ReadinessEndpoint`]: `/healthz/ready`, `200` once every registered
//!   task is done, `503` naming the pending ones before.
//! - [`AdminEndpoint`]: `/`, `/config_dump` (from a [`ConfigDumpSource`], usually [`StateDump`]),
//!   `/logging` (through the binary's [`LogControl`]) and `/quitquitquit`. [`bind_admin`] refuses
//!   non-loopback addresses unless asked not to.
//!
//! ## Example
//! ```no_run
//! use std::sync::Arc;
//! use mesh_proxy::admin::{self, HttpServer, HttpServerConfig, MetricsEndpoint, Readiness, ReadinessEndpoint};
//! use mesh_proxy::metrics::Metrics;
//!
//! # async fn run() -> Result<(), mesh_proxy::ProxyError> {
//! let (_trigger, drain) = mesh_core::drain::channel();
//! let metrics = Arc::new(Metrics::new());
//! let readiness = Readiness::new();
//! let certificates = readiness.register("certificates");
//!
//! let stats = HttpServer::bind("stats", admin::METRICS_ADDR, HttpServerConfig::default()).await?;
//! tokio::spawn(stats.serve(Arc::new(MetricsEndpoint::new(metrics)), drain.clone()));
//! let ready = HttpServer::bind("readiness", admin::READINESS_ADDR, HttpServerConfig::default()).await?;
//! tokio::spawn(ready.serve(Arc::new(ReadinessEndpoint::new(readiness)), drain));
//!
//! // ... once the workload certificates are fetched:
//! certificates.done();
//! # Ok(())
//! # }
//! ```

mod dump;
mod endpoints;
mod readiness;
mod server;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::error::ProxyError;
pub use dump::{
    ConfigDumpSource, StateDump, certificate_json, policies_json, policy_json, service_json, services_json,
    workload_json, workloads_json,
};
pub use endpoints::{AdminEndpoint, LogControl, MetricsEndpoint, ShutdownFn};
pub use readiness::{Readiness, ReadinessEndpoint, ReadyToken};
pub use server::{HttpHandler, HttpServer, HttpServerConfig, text_response};

/// Istio's admin address: loopback only, port 15000.
pub const ADMIN_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);
/// Istio's metrics address: every interface, port 15020 (Prometheus scrapes it from outside the node).
pub const METRICS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 15020);
/// Istio's readiness address: every interface, port 15021 (the kubelet probes it).
pub const READINESS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 15021);

/// Binds the admin endpoint's server on `addr`, which must be a loopback address unless
/// `allow_non_loopback` is set (the admin endpoint has no authentication: anyone who reaches it can change
/// log levels, read the configuration and shut the proxy down).
pub async fn bind_admin(
    addr: SocketAddr,
    allow_non_loopback: bool,
    config: HttpServerConfig,
) -> Result<HttpServer, ProxyError> {
    if !allow_non_loopback && !addr.ip().to_canonical().is_loopback() {
        return Err(ProxyError::AdminNotLoopback { addr });
    }
    HttpServer::bind("admin", addr, config).await
}
