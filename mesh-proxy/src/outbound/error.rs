//! [`RouteError`]: why an outbound connection has nowhere to go.

use std::fmt;
use std::sync::Arc;

use mesh_core::model::{GatewayAddress, GatewayDestination, NamespacedHostname};

/// Why [`route`](super::route) found no way to carry a connection. Every variant means the connection
/// must be refused: none of them falls back to sending the bytes somewhere unchecked.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// The client addressed a service VIP, but no endpoint of the service is eligible: none is healthy
    /// (under the service's health policy), serves the port, is reachable, or matches a `STRICT` locality
    /// preference.
    #[error("service {service} has no healthy endpoint for port {port}")]
    NoHealthyEndpoint {
        /// The addressed service.
        service: NamespacedHostname,
        /// The service port the client connected to.
        port: u16,
    },

    /// The client addressed a service VIP on a port the service does not declare.
    #[error("service {service} does not declare port {port}")]
    UnknownServicePort {
        /// The addressed service.
        service: NamespacedHostname,
        /// The undeclared port.
        port: u16,
    },

    /// The destination has a waypoint, but the snapshot names no workload (or eligible endpoint of a
    /// waypoint service) behind it. Traffic that must be policed by a waypoint is not sent around it.
    #[error("waypoint {} cannot be resolved", DisplayGateway(.waypoint))]
    UnknownWaypoint {
        /// The waypoint as the destination names it.
        waypoint: GatewayAddress,
    },

    /// The chosen endpoint (or waypoint) is on another network, and names no east-west gateway to
    /// reach it through.
    #[error("workload {workload:?} is on network {network:?} and has no network gateway")]
    NoNetworkGateway {
        /// The unreachable workload's UID.
        workload: Arc<str>,
        /// Its network.
        network: Arc<str>,
    },

    /// The east-west gateway in front of a remote network cannot be resolved to a workload.
    #[error("network gateway {} cannot be resolved", DisplayGateway(.gateway))]
    UnknownNetworkGateway {
        /// The gateway as the remote workload names it.
        gateway: GatewayAddress,
    },

    /// The chosen workload has no address to connect to.
    #[error("workload {workload:?} has no usable address")]
    NoUsableAddress {
        /// The workload's UID.
        workload: Arc<str>,
    },

    /// The chosen workload is reached by hostname, which needs a DNS lookup; the pure routing decision
    /// does no IO, so this is left to the caller (or refused).
    #[error("workload {workload:?} is reached by hostname {hostname:?}, which needs DNS resolution")]
    NeedsDnsResolution {
        /// The workload's UID.
        workload: Arc<str>,
        /// The hostname to resolve.
        hostname: Arc<str>,
    },

    /// A workload that HBONE would authenticate has no valid SPIFFE identity (an empty namespace or
    /// service account, say), so its certificate could not be verified.
    #[error("workload {workload:?} has no valid identity")]
    InvalidIdentity {
        /// The workload's UID.
        workload: Arc<str>,
        /// Why its identity is invalid.
        #[source]
        source: mesh_core::Error,
    },
}

/// Formats a gateway the way Istio writes its parts: `network/ip:port` or `namespace/hostname:port`.
struct DisplayGateway<'a>(&'a GatewayAddress);

impl fmt::Display for DisplayGateway<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0.destination {
            GatewayDestination::Address(addr) if addr.ip.is_ipv6() => {
                write!(f, "{}/[{}]:{}", addr.network, addr.ip, self.0.hbone_mtls_port)
            }
            GatewayDestination::Address(addr) => write!(f, "{addr}:{}", self.0.hbone_mtls_port),
            GatewayDestination::Hostname(host) => write!(f, "{host}:{}", self.0.hbone_mtls_port),
        }
    }
}
