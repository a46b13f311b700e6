//! # mesh-proxy
//!
//! Reusable proxy stacks composed from `mesh-hbone` and `mesh-policy`: outbound, inbound, in-pod and the
//! waypoint's HTTP pipeline. It consumes a [`mesh_core::model::SnapshotReceiver`], never xDS directly, so
//! an embedder can feed it configuration from anywhere.
//!
//! ## Layout
//! - [`outbound`]: the pure routing decision for a captured outbound connection, [`route`] ->
//!   [`Route`] (passthrough, plain TCP, HBONE direct or via a waypoint, double HBONE across networks),
//!   with injectable endpoint picking ([`EndpointPicker`]).
//!
//! - [`telemetry`]: the [`telemetry::ConnectionRecord`] each proxied connection carries (labels, live byte
//!   counters) and the [`telemetry::ConnectionObserver`]s told when it opens and closes (metrics, logs).
//! - [`forward`]: [`forward::copy_bidirectional`], moving bytes both ways with half-close and counting.
//! - [`state`]: [`state::ProxyState`], the snapshot and policies the proxies decide with.
//! - [`listener`]: [`listener::serve_tcp`], the accept loop of every TCP port (connection limit, accept
//!   errors, drain with a deadline).
//! - [`outbound::Outbound`]: the capture port (15001): source workload, route, upstream (TCP, HBONE,
//!   double HBONE), forwarding, telemetry.
//! - [`socks5`]: [`socks5::Socks5`], the SOCKS5 port (15080) onto the same outbound path.
//! - [`inbound`]: ztunnel's inbound side, [`inbound::Inbound`] (HBONE on 15008, the service inside an
//!   `HboneAcceptor`) and [`inbound::InboundPlaintext`] (15006): destination, L4 policy, upstream, forward.
//! - [`conntrack`]: [`conntrack::ConnectionTracker`], closing open connections a policy change now denies
//!   or whose destination workload was removed.
//! - [`error`]: [`ProxyError`], the crate's error type.
//! - [`metrics`]: [`metrics::Metrics`], Istio's `istio_tcp_*` families (a connection observer), build and
//!   process metrics, and component metrics the binary registers (xDS health, and certificate health from
//!   a [`metrics::TrackedCertProvider`]); Prometheus text format.
//! - [`access_log`]: [`access_log::AccessLog`], ztunnel's one structured event per connection.
//! - [`admin`]: the bounded HTTP/1.1 servers for admin (`127.0.0.1:15000`: config dump, logging,
//!   quitquitquit), metrics (`:15020`) and readiness (`:15021`, [`admin::Readiness`]).
//! - `inpod` (Linux): Istio's in-pod mode, the ZDS client that takes pods (and their network
//!   namespaces) from istio-cni, and each pod's listeners bound inside its namespace.
//!
//! `bins/ztunnel` composes these into Istio's node proxy; the waypoint's L7 pipeline is still to come.
//!
//! ## Example
//! Decide where a client's connection to a service VIP goes:
//! ```
//! use std::collections::BTreeMap;
//! use mesh_core::model::{MeshSnapshot, Service, ServicePort, TunnelProtocol, Workload};
//! use mesh_proxy::{HboneKind, Route, RouteInput, route};
//!
//! let echo = Service {
//!     vips: vec!["/198.19.0.10".parse()?],
//!     ports: vec![ServicePort::new(80, 8080)],
//!     ..Service::new("echo", "default", "echo.default.svc.cluster.local")
//! };
//! let server = Workload {
//!     addresses: vec!["198.18.0.2".parse()?],
//!     protocol: TunnelProtocol::Hbone,
//!     services: BTreeMap::from([(echo.key(), BTreeMap::new())]),
//!     ..Workload::new("cluster1//v1/Pod/default/server", "server", "default")
//! };
//! let client = Workload {
//!     addresses: vec!["198.18.0.1".parse()?],
//!     ..Workload::new("cluster1//v1/Pod/default/client", "client", "default")
//! };
//! let snapshot = MeshSnapshot::builder().add_service(echo).add_workload(server).build()?;
//!
//! let input = RouteInput::new(&snapshot, &client, "198.18.0.1".parse()?, "198.19.0.10:80".parse()?);
//! let Route::Hbone(hbone) = route(&input, &mut |_candidates| 0)? else { panic!("an HBONE route") };
//! assert_eq!(hbone.kind, HboneKind::Direct);
//! assert_eq!(hbone.gateway.to_string(), "198.18.0.2:15008");
//! assert_eq!(hbone.authority.to_string(), "198.18.0.2:8080");
//! assert_eq!(hbone.expected_identities[0].as_str(), "spiffe://cluster.local/ns/default/sa/default");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod conntrack;
pub mod error;
pub mod forward;
pub mod inbound;
#[cfg(target_os = "linux")]
pub mod inpod;
pub mod listener;
pub mod metrics;
pub mod outbound;
pub mod socks5;
pub mod state;
pub mod telemetry;

pub use error::ProxyError;

/// Entry points for the fuzz targets in `fuzz/`; not part of the API.
#[doc(hidden)]
pub mod __fuzz {
    /// Parses `bytes` as a SOCKS5 greeting followed by a request, checking the parsers' invariants
    /// (never a panic, never a message longer than its input, prefixes of a message are incomplete).
    pub fn socks5_handshake(bytes: &[u8]) {
        crate::socks5::fuzz_handshake(bytes);
    }
}
pub use outbound::{EndpointPicker, HboneKind, Route, RouteError, RouteInput, route};
