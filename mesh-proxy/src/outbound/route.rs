//! The routing decision itself: [`route`], its input and its result.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mesh_core::SpiffeId;
use mesh_core::model::{
    DEFAULT_HBONE_MTLS_PORT, LoadBalancingMode, MeshSnapshot, Service, TunnelProtocol, Workload,
};

use super::error::RouteError;
use super::select::{self, Resolution, Upstream};

/// Everything [`route`] looks at for one captured connection.
#[derive(Debug, Clone, Copy)]
pub struct RouteInput<'a> {
    /// The mesh as of this connection; keep the same snapshot for the connection's whole life.
    pub snapshot: &'a MeshSnapshot,
    /// The client workload that opened the connection (the caller finds it, by source IP or by the pod
    /// whose network namespace captured it). Its network scopes every lookup, and its locality drives
    /// locality-aware load balancing.
    pub source: &'a Workload,
    /// The connection's source IP, which with the source's identity tells whether the client is the
    /// destination's own waypoint.
    pub source_ip: IpAddr,
    /// The original destination the client connected to.
    pub destination: SocketAddr,
    /// The node this proxy runs on, if known; destinations on it get [`HboneKind::DirectLocal`] when
    /// [`in_pod`](Self::in_pod) is off.
    pub local_node: Option<&'a str>,
    /// The port HBONE is accepted on by node proxies (Istio: 15008).
    pub hbone_port: u16,
    /// Whether the proxy runs inside each pod's network namespace (Istio's in-pod mode). There, traffic to
    /// a workload on the same node must still go through that workload's inbound HBONE listener, so the
    /// same-node shortcut is off.
    pub in_pod: bool,
}

impl<'a> RouteInput<'a> {
    /// The input for a connection from `source` (at `source_ip`) to `destination`, with in-pod mode on,
    /// no local node and the standard HBONE port.
    pub fn new(
        snapshot: &'a MeshSnapshot,
        source: &'a Workload,
        source_ip: IpAddr,
        destination: SocketAddr,
    ) -> Self {
        RouteInput {
            snapshot,
            source,
            source_ip,
            destination,
            local_node: None,
            hbone_port: DEFAULT_HBONE_MTLS_PORT,
            in_pod: true,
        }
    }
}

/// Chooses among equally good endpoints of a service. Injected so that tests are deterministic; in
/// production, [`RandomPicker`].
///
/// Any `FnMut(usize) -> usize` is a picker.
pub trait EndpointPicker {
    /// Returns an index in `0..candidates`; `candidates` is at least 1. An index out of range wraps
    /// around (modulo `candidates`) rather than failing.
    fn pick(&mut self, candidates: usize) -> usize;
}

impl<F: FnMut(usize) -> usize> EndpointPicker for F {
    fn pick(&mut self, candidates: usize) -> usize {
        self(candidates)
    }
}

/// Picks uniformly at random (Istio's ztunnel weighs by workload capacity, which the model does not
/// carry yet).
#[derive(Debug, Clone, Copy, Default)]
pub struct RandomPicker;

impl EndpointPicker for RandomPicker {
    fn pick(&mut self, candidates: usize) -> usize {
        fastrand::usize(..candidates.max(1))
    }
}

/// Where and how to carry one outbound connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Not a mesh destination (or a `PASSTHROUGH` service): plain TCP to the original destination.
    Passthrough {
        /// The original destination.
        destination: SocketAddr,
    },
    /// A mesh workload that does not accept HBONE: plain TCP to it.
    Tcp {
        /// The workload's `ip:port` (for a service, the endpoint's target port).
        destination: SocketAddr,
        /// The destination workload.
        workload: Arc<Workload>,
        /// The service the client addressed, if it addressed one.
        service: Option<Arc<Service>>,
    },
    /// One HBONE tunnel: mutual TLS to `gateway`, then `CONNECT authority`.
    Hbone(HboneRoute),
    /// A tunnel in a tunnel, to a workload on another network through that network's east-west gateway.
    DoubleHbone(DoubleHboneRoute),
}

/// Which kind of HBONE hop an [`HboneRoute`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HboneKind {
    /// Straight to the destination workload's node proxy.
    Direct,
    /// Straight to a destination on this node, outside in-pod mode: the same tunnel as
    /// [`Direct`](Self::Direct), which the caller may hand to its own inbound side without a network hop.
    DirectLocal,
    /// To the waypoint in front of the destination, which will police and forward it.
    ToWaypoint,
}

/// A single HBONE hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HboneRoute {
    /// Direct to the destination, or via its waypoint.
    pub kind: HboneKind,
    /// Where to open the mutual-TLS connection: the destination's IP on the HBONE port, or the
    /// waypoint's address and HBONE port.
    pub gateway: SocketAddr,
    /// The CONNECT `:authority`: the destination workload's `ip:port`, or for a waypoint the original
    /// destination (the service `VIP:port` or workload `ip:port`) as the client sent it.
    pub authority: SocketAddr,
    /// The identities the peer at `gateway` may present; anything else fails the handshake. The
    /// workload's own identity first, then its service's subject alternative names.
    pub expected_identities: Vec<SpiffeId>,
    /// The workload terminating the tunnel: the destination, or the waypoint.
    pub workload: Arc<Workload>,
    /// The service the client addressed (for a waypoint hop, the original service, not the waypoint's).
    pub service: Option<Arc<Service>>,
}

/// A double-HBONE route: an outer tunnel to an east-west gateway, carrying an inner tunnel to the
/// workload (or waypoint) on the remote network. Both CONNECTs use [`authority`](Self::authority), so the
/// gateway can forward the inner tunnel without opening it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoubleHboneRoute {
    /// Where to open the outer mutual-TLS connection: the gateway's address and HBONE port.
    pub network_gateway: SocketAddr,
    /// The identities the gateway may present.
    pub gateway_identities: Vec<SpiffeId>,
    /// The gateway workload.
    pub gateway_workload: Arc<Workload>,
    /// The CONNECT `:authority` of both tunnels: the service hostname and the port the client used.
    pub authority: ServiceAuthority,
    /// The identities the inner tunnel's peer may present: the remote workload's own identity, then its
    /// service's subject alternative names.
    pub expected_identities: Vec<SpiffeId>,
    /// The remote workload terminating the inner tunnel: a service endpoint, or the service's waypoint.
    pub workload: Arc<Workload>,
    /// The service the client addressed (cross-network routing is only for service traffic).
    pub service: Arc<Service>,
    /// Whether [`workload`](Self::workload) is the service's waypoint rather than an endpoint.
    pub via_waypoint: bool,
}

/// A `hostname:port` CONNECT authority, used where the next hop resolves the service itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceAuthority {
    /// The service hostname, e.g. `echo.default.svc.cluster.local`.
    pub hostname: Arc<str>,
    /// The service port.
    pub port: u16,
}

impl fmt::Display for ServiceAuthority {
    /// `hostname:port`, the form it takes in the `:authority` header.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.hostname, self.port)
    }
}

/// Decides where the connection described by `input` goes; see the [module docs](super) for the rules.
///
/// `picker` chooses among equally eligible service endpoints (and waypoint or gateway instances behind
/// a service). IPv4-mapped IPv6 destinations are treated as the IPv4 address they carry, so a
/// [`Route::Passthrough`] names the IPv4 form.
pub fn route(input: &RouteInput<'_>, picker: &mut impl EndpointPicker) -> Result<Route, RouteError> {
    let destination = SocketAddr::new(input.destination.ip().to_canonical(), input.destination.port());
    let input = &RouteInput {
        destination,
        ..*input
    };
    let network = &input.source.network;
    // By address a workload wins over a service VIP, as in ztunnel's `find_address`.
    if let Some(workload) = input.snapshot.workload_by_ip(network, destination.ip()) {
        return to_workload(input, workload, picker);
    }
    if let Some(service) = input.snapshot.service_by_ip(network, destination.ip()) {
        return to_service(input, service, picker);
    }
    Ok(Route::Passthrough { destination })
}

/// The client addressed a workload on its own network (the address index is per network).
fn to_workload<'s>(
    input: &RouteInput<'s>,
    workload: &'s Arc<Workload>,
    picker: &mut impl EndpointPicker,
) -> Result<Route, RouteError> {
    if let Some(waypoint) = &workload.waypoint
        && !select::is_from_gateway(input, waypoint)
    {
        let upstream =
            select::resolve_gateway(input, waypoint, Resolution::Waypoint, picker)?.ok_or_else(|| {
                RouteError::UnknownWaypoint {
                    waypoint: waypoint.clone(),
                }
            })?;
        return to_waypoint(&upstream, input.destination, None);
    }
    let upstream = Upstream {
        workload,
        ip: Some(input.destination.ip()),
        port: input.destination.port(),
        service: None,
    };
    direct(input, &upstream)
}

/// The client addressed a service VIP.
fn to_service<'s>(
    input: &RouteInput<'s>,
    service: &'s Arc<Service>,
    picker: &mut impl EndpointPicker,
) -> Result<Route, RouteError> {
    // Istio's ztunnel sends service traffic to the waypoint even when the client is that waypoint; we
    // apply its workload-waypoint rule here too, so a waypoint calling a service it fronts does not loop.
    if let Some(waypoint) = &service.waypoint
        && !select::is_from_gateway(input, waypoint)
    {
        let upstream =
            select::resolve_gateway(input, waypoint, Resolution::Waypoint, picker)?.ok_or_else(|| {
                RouteError::UnknownWaypoint {
                    waypoint: waypoint.clone(),
                }
            })?;
        if upstream.workload.network != input.source.network {
            return through_network_gateway(input, &upstream, service, true, picker);
        }
        return to_waypoint(&upstream, input.destination, Some(service));
    }

    let passthrough = service
        .load_balancing
        .as_ref()
        .is_some_and(|lb| lb.mode == LoadBalancingMode::Passthrough);
    if passthrough {
        return Ok(Route::Passthrough {
            destination: input.destination,
        });
    }

    let port = input.destination.port();
    if service.port(port).is_none() {
        return Err(RouteError::UnknownServicePort {
            service: service.key(),
            port,
        });
    }
    let (workload, target_port) = select::pick_endpoint(input, service, port, Resolution::Standard, picker)
        .ok_or_else(|| RouteError::NoHealthyEndpoint {
        service: service.key(),
        port,
    })?;
    let upstream = select::finalize(input, workload, target_port, Some(service), input.destination)?;
    if workload.network != input.source.network {
        return through_network_gateway(input, &upstream, service, false, picker);
    }
    // Service traffic never takes the endpoint's own waypoint: the service decided (it has none).
    direct(input, &upstream)
}

/// One HBONE hop to a waypoint, carrying the original destination as the authority.
fn to_waypoint(
    waypoint: &Upstream<'_>,
    authority: SocketAddr,
    service: Option<&Arc<Service>>,
) -> Result<Route, RouteError> {
    Ok(Route::Hbone(HboneRoute {
        kind: HboneKind::ToWaypoint,
        gateway: waypoint.socket_addr()?,
        authority,
        expected_identities: waypoint.identities()?,
        workload: waypoint.workload.clone(),
        service: service.cloned(),
    }))
}

/// Straight to a workload on the source's network, in the protocol it accepts.
fn direct(input: &RouteInput<'_>, upstream: &Upstream<'_>) -> Result<Route, RouteError> {
    let destination = upstream.socket_addr()?;
    let workload = upstream.workload;
    let service = upstream.service.cloned();
    match workload.protocol {
        TunnelProtocol::None => Ok(Route::Tcp {
            destination,
            workload: workload.clone(),
            service,
        }),
        TunnelProtocol::Hbone => {
            let same_node = !workload.node.is_empty() && input.local_node == Some(&*workload.node);
            let kind = if same_node && !input.in_pod {
                HboneKind::DirectLocal
            } else {
                HboneKind::Direct
            };
            Ok(Route::Hbone(HboneRoute {
                kind,
                gateway: SocketAddr::new(destination.ip(), input.hbone_port),
                authority: destination,
                expected_identities: upstream.identities()?,
                workload: workload.clone(),
                service,
            }))
        }
    }
}

/// Double HBONE to `upstream` on another network, through the gateway it names.
fn through_network_gateway(
    input: &RouteInput<'_>,
    upstream: &Upstream<'_>,
    service: &Arc<Service>,
    via_waypoint: bool,
    picker: &mut impl EndpointPicker,
) -> Result<Route, RouteError> {
    let Some(gateway) = &upstream.workload.network_gateway else {
        return Err(RouteError::NoNetworkGateway {
            workload: upstream.workload.uid.clone(),
            network: upstream.workload.network.clone(),
        });
    };
    let gateway_upstream = select::resolve_gateway(input, gateway, Resolution::Standard, picker)?
        .ok_or_else(|| RouteError::UnknownNetworkGateway {
            gateway: gateway.clone(),
        })?;
    Ok(Route::DoubleHbone(DoubleHboneRoute {
        network_gateway: gateway_upstream.socket_addr()?,
        gateway_identities: gateway_upstream.identities()?,
        gateway_workload: gateway_upstream.workload.clone(),
        authority: ServiceAuthority {
            hostname: service.hostname.clone(),
            port: input.destination.port(),
        },
        expected_identities: upstream.identities()?,
        workload: upstream.workload.clone(),
        service: service.clone(),
        via_waypoint,
    }))
}
