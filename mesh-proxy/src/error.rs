//! [`ProxyError`]: the one error type of the proxy stacks.
//!
//! Each variant is a reason a connection was refused or ended that a caller (or an access log) can act
//! on. How a reason is answered on the wire (an HBONE status, a closed socket) is decided by the stack
//! that met it, not here.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::model::NamespacedHostname;
use mesh_policy::L4Evaluation;

use crate::conntrack::CloseReason;

/// Why the proxy refused or ended a connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// No workload has the destination address on the proxy's network.
    #[error("unknown destination: no workload has address {ip} on network {network:?}")]
    UnknownDestination {
        /// The proxy's network.
        network: Arc<str>,
        /// The address the connection was for.
        ip: IpAddr,
    },

    /// The destination workload exists but this proxy does not serve it (another node's, or another
    /// pod's in dedicated mode).
    #[error("workload {workload:?} is not served by this proxy")]
    NotServed {
        /// The workload's UID.
        workload: Arc<str>,
    },

    /// HBONE arrived for a workload whose tunnel protocol is NONE: it is not enrolled in the mesh, so
    /// nothing should be tunnelling to it.
    #[error("workload {workload:?} does not accept HBONE (its tunnel protocol is NONE)")]
    NotHboneCapable {
        /// The workload's UID.
        workload: Arc<str>,
    },

    /// A CONNECT named an IP other than the one the connection arrived on, and the arrival address is
    /// not the named destination's waypoint.
    #[error("ip mismatch: CONNECT to {target} arrived on {arrived}")]
    IpMismatch {
        /// The CONNECT's IP.
        target: IpAddr,
        /// The local address the connection arrived on.
        arrived: IpAddr,
    },

    /// A CONNECT named a service hostname that no service carries.
    #[error("no service has hostname {hostname:?}")]
    UnknownService {
        /// The hostname.
        hostname: String,
    },

    /// A CONNECT named a service port that maps to no target port on the destination.
    #[error("service {service} has no target port for port {port}")]
    NoTargetPort {
        /// The service.
        service: NamespacedHostname,
        /// The service port asked for.
        port: u16,
    },

    /// The destination expects a PROXY protocol header naming the service the client addressed, but the
    /// service has no address on the proxy's network to put in it.
    #[error("service {service} has no address on network {network:?}")]
    NoServiceAddress {
        /// The service.
        service: NamespacedHostname,
        /// The proxy's network.
        network: Arc<str>,
    },

    /// The destination is the proxy itself (one of its own ports or addresses), which would loop.
    #[error("destination {addr} is the proxy itself")]
    SelfCall {
        /// The destination.
        addr: SocketAddr,
    },

    /// The destination has a waypoint and the connection did not come from it (only enforced when the
    /// proxy is configured to; see `inbound::WaypointEnforcement`).
    #[error("workload {workload:?} must be reached through its waypoint")]
    WaypointBypassed {
        /// The destination workload's UID.
        workload: Arc<str>,
    },

    /// Authorization policy denied the connection.
    #[error("denied by authorization policy: {evaluation}")]
    Denied {
        /// The decision and the policy and rule that made it.
        evaluation: Arc<L4Evaluation>,
    },

    /// The connection tracker closed the connection: a policy change now denies it, or its destination
    /// workload was removed.
    #[error("connection closed: {reason}")]
    Revoked {
        /// Why.
        reason: CloseReason,
    },

    /// The upstream connection could not be opened.
    #[error("connecting to {addr} failed: {source}")]
    UpstreamConnect {
        /// The upstream address.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: io::Error,
    },

    /// The upstream connection did not open within the connect timeout.
    #[error("connecting to {addr} timed out after {after:?}")]
    UpstreamTimeout {
        /// The upstream address.
        addr: SocketAddr,
        /// The limit.
        after: Duration,
    },

    /// The HBONE tunnel could not be answered (the client went away first).
    #[error("answering the HBONE tunnel failed: {0}")]
    Hbone(#[from] mesh_hbone::HboneError),

    /// Writing the PROXY protocol header to the upstream failed.
    #[error("writing the PROXY protocol header failed: {0}")]
    ProxyProtocol(#[source] io::Error),

    /// Moving bytes failed after the connection was established.
    #[error("forwarding failed: {0}")]
    Forward(#[source] io::Error),

    /// Outbound: no workload has the client's address, so there is no identity to send it as (node mode
    /// refuses such connections, as ztunnel does).
    #[error("unknown source: no workload has address {ip} on network {network:?}")]
    UnknownSource {
        /// The client's address.
        ip: IpAddr,
        /// The network it was looked up on.
        network: Arc<str>,
    },

    /// Outbound: the workload this proxy sends as (in-pod or dedicated mode) is not in the snapshot.
    #[error("the proxy's source workload {uid:?} is not in the mesh snapshot")]
    UnknownSourceWorkload {
        /// The workload's UID.
        uid: Arc<str>,
    },

    /// Outbound: the source workload has no valid SPIFFE identity to present over HBONE.
    #[error("source workload {uid:?} has no valid identity: {source}")]
    SourceIdentity {
        /// The workload's UID.
        uid: Arc<str>,
        /// Why its identity is invalid.
        #[source]
        source: mesh_core::Error,
    },

    /// Outbound: the original destination of a captured connection could not be read.
    #[error("reading the original destination failed: {0}")]
    OriginalDestination(#[source] io::Error),

    /// Outbound: the routing decision found no way to carry the connection.
    #[error(transparent)]
    Route(#[from] crate::outbound::RouteError),

    /// Outbound: the destination is outside the mesh, and this entry point does not pass traffic
    /// through (SOCKS5 by default).
    #[error("{destination} is not a mesh destination, and passthrough is not allowed here")]
    PassthroughRefused {
        /// The destination.
        destination: SocketAddr,
    },

    /// Outbound: the HBONE tunnel could not be opened (connection, TLS, identity, HTTP/2, or a non-200
    /// answer such as 401 for a policy denial).
    #[error("HBONE via {gateway} failed: {source}")]
    HboneConnect {
        /// The HBONE peer (the destination's node proxy, a waypoint or an east-west gateway).
        gateway: SocketAddr,
        /// What failed (boxed: it is large, and this enum is returned on every path).
        #[source]
        source: Box<mesh_hbone::HboneError>,
    },

    /// SOCKS5: the client's handshake failed.
    #[error("SOCKS5 handshake failed: {0}")]
    Socks5(#[from] crate::socks5::Socks5Error),

    /// SOCKS5: the requested domain name did not resolve.
    #[error("resolving {host:?} failed: {source}")]
    Resolve {
        /// The name.
        host: String,
        /// Why (`TimedOut` when the resolver did not answer in time).
        #[source]
        source: io::Error,
    },

    // Operations endpoints (`admin`, `metrics`): setup errors, not connection outcomes.
    /// The admin endpoint was asked to listen on an address other hosts can reach.
    #[error(
        "refusing to serve the admin endpoint on {addr}: it can change log levels and shut the proxy down, \
         so it listens on loopback only unless explicitly allowed"
    )]
    AdminNotLoopback {
        /// The address asked for.
        addr: SocketAddr,
    },

    /// An operations HTTP server could not bind its address (in use, not local, no permission).
    #[error("binding {addr}: {source}")]
    HttpBind {
        /// The address.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: io::Error,
    },

    /// A metric could not be registered: its name is invalid (or a counter's does not end in `_total`).
    #[error("invalid metric name {name:?}: {reason}")]
    MetricName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A metric with this name is already registered (or is one of the built-in families).
    #[error("metric {name:?} is already registered")]
    DuplicateMetric {
        /// The name given.
        name: String,
    },

    // In-pod mode (`inpod`).
    /// The ZDS conversation with istio-cni failed: connecting, a malformed message, a protocol violation.
    #[cfg(target_os = "linux")]
    #[error(transparent)]
    Zds(#[from] crate::inpod::ZdsError),

    /// A pod's network namespace could not be used (not a namespace file, or joining it failed).
    #[error("pod network namespace: {0}")]
    PodNetns(#[source] io::Error),

    /// A listener could not be bound inside a pod's network namespace (port taken, no permission for the
    /// mark).
    #[error("binding {addr} in the pod's network namespace: {source}")]
    PodBind {
        /// The address.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: io::Error,
    },
}
