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
//!
//! The rest of the node proxy (issue "ztunnel") is being built.
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

pub mod forward;
pub mod outbound;
pub mod state;
pub mod telemetry;

pub use outbound::{EndpointPicker, HboneKind, Route, RouteError, RouteInput, route};
