//! The outbound side of the node proxy: what to do with a connection a captured workload opens.
//!
//! [`route`] is the decision Istio's ztunnel makes for each captured outbound connection (its
//! `build_request`), as a pure function over an immutable [`MeshSnapshot`](mesh_core::model::MeshSnapshot):
//! no IO, no locks, and the only non-determinism (which of several equally good endpoints to use) comes
//! from an injectable [`EndpointPicker`]. Acting on the [`Route`] (dialing, TLS, CONNECT, copying bytes) is
//! the caller's job.
//!
//! The rules, in the order they apply (the destination is looked up on the source's network):
//! 1. A workload's IP: to its waypoint if it has one (unless the source *is* that waypoint, so a
//!    waypoint's own traffic does not loop back to it), else straight to the workload: plain TCP to the
//!    original `ip:port` if it does not speak HBONE, else HBONE to `ip:15008` with `ip:port` as the
//!    CONNECT authority.
//! 2. A service VIP: to the service's waypoint if it has one (same loop rule), with the original
//!    `VIP:port` as the authority; else a `PASSTHROUGH` service goes to the original destination; else one
//!    eligible endpoint is picked (healthy unless the health policy allows all, serving the port, the best
//!    locality match under `STRICT`/`FAILOVER`) and reached as in 1, on the endpoint's target port.
//! 3. An endpoint or waypoint on another network: double HBONE through that network's east-west
//!    gateway, with `hostname:port` as the authority of both tunnels.
//! 4. Anything else: passthrough, plain TCP to the original destination.
//!
//! [`Outbound`] acts on the decision: it finds the source workload, connects upstream as the route says
//! and forwards the bytes, reporting each connection to the telemetry observers.

mod error;
mod route;
mod select;
mod service;
#[cfg(test)]
mod tests;

pub use error::RouteError;
pub use route::{
    DoubleHboneRoute, EndpointPicker, HboneKind, HboneRoute, RandomPicker, Route, RouteInput,
    ServiceAuthority, route,
};
pub use service::{CaptureMode, Outbound, OutboundConfig, OutboundConnection, Passthrough, SourceLookup};
