//! The pure part of the inbound side: which workload a connection is for, where to send it, and what to
//! report about it. No IO, no locks: everything is read from one snapshot.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mesh_core::SpiffeId;
use mesh_core::model::{
    ApplicationTunnelProtocol, GatewayAddress, GatewayDestination, MeshSnapshot, Service, TunnelProtocol,
    Workload,
};
use mesh_hbone::headers::Baggage;
use mesh_hbone::{PROXY_PORTS, TunnelTarget};

use super::InboundConfig;
use crate::error::ProxyError;

/// Where an inbound connection goes, and what is known about it.
#[derive(Debug, Clone)]
pub(super) struct Destination {
    /// The workload the connection is delivered to.
    pub(super) workload: Arc<Workload>,
    /// The address it is delivered to: the workload's IP and target port.
    pub(super) upstream: SocketAddr,
    /// The services the workload backs, candidates for the `destination_service` label.
    pub(super) services: Vec<Arc<Service>>,
    /// The service the client addressed, when the CONNECT named one (a VIP through a waypoint, or a
    /// hostname through an east-west gateway).
    pub(super) addressed_service: Option<Arc<Service>>,
    /// Set when the workload wants a PROXY protocol header before the stream.
    pub(super) proxy_header: Option<ProxyHeader>,
    /// The CONNECT named a hostname: it came through an east-west gateway, so the peer's address says
    /// nothing about the original client (whose network we do not know).
    pub(super) from_gateway: bool,
}

/// What the PROXY protocol header names as the target.
#[derive(Debug, Clone)]
pub(super) struct ProxyHeader {
    /// The address the client targeted (a service VIP for a hostname CONNECT).
    pub(super) target: SocketAddr,
    /// The hostname the client targeted, for a hostname CONNECT.
    pub(super) hostname: Option<Arc<str>>,
}

/// Resolves an HBONE tunnel that arrived on `local` and asked for `target`, as ztunnel's
/// `validate_destination` and `resolve_inbound_target` do: the destination is the workload at the
/// address the connection arrived on; a CONNECT naming another IP is accepted only when that IP's
/// workload or service has this workload as its waypoint (the "waypoint sandwich"), or when this workload
/// takes an application tunnel (it then learns the target from the PROXY header).
pub(super) fn tunnel(
    config: &InboundConfig,
    snapshot: &MeshSnapshot,
    local: SocketAddr,
    target: &TunnelTarget,
) -> Result<Destination, ProxyError> {
    let workload = served_workload(config, snapshot, local.ip())?;
    if workload.protocol == TunnelProtocol::None {
        return Err(ProxyError::NotHboneCapable {
            workload: workload.uid.clone(),
        });
    }
    let services = services_of(snapshot, &workload);
    let (port, addressed_service, from_gateway) = match target {
        TunnelTarget::Addr(addr) => {
            let addressed = if addr.ip() == local.ip() {
                None
            } else {
                sandwiched(config, snapshot, &workload, local.ip(), addr.ip())?
            };
            (addr.port(), addressed, false)
        }
        TunnelTarget::Host { host, port } => {
            let service = service_by_hostname(snapshot, &workload, host)?;
            (target_port(&workload, &service, *port)?, Some(service), true)
        }
    };
    let addr = SocketAddr::new(local.ip(), port);
    if PROXY_PORTS.contains(&port) {
        return Err(ProxyError::SelfCall { addr });
    }
    let (upstream, proxy_header) = match workload.application_tunnel {
        Some(tunnel) => {
            let upstream = SocketAddr::new(addr.ip(), tunnel.port.unwrap_or(port));
            let header = match tunnel.protocol {
                ApplicationTunnelProtocol::None => None,
                ApplicationTunnelProtocol::Proxy => {
                    Some(proxy_header(config, target, addressed_service.as_ref())?)
                }
            };
            (upstream, header)
        }
        None => (addr, None),
    };
    Ok(Destination {
        workload,
        upstream,
        services,
        addressed_service,
        proxy_header,
        from_gateway,
    })
}

/// Resolves a plaintext connection captured on its way to `original`, as ztunnel's inbound passthrough
/// does: the workload at that address, which this proxy must serve, on the original port.
pub(super) fn plaintext(
    config: &InboundConfig,
    snapshot: &MeshSnapshot,
    original: SocketAddr,
) -> Result<Destination, ProxyError> {
    // Forwarding to one of the proxy's own ports or addresses would come straight back here.
    if PROXY_PORTS.contains(&original.port()) || config.local_ips.contains(&original.ip()) {
        return Err(ProxyError::SelfCall { addr: original });
    }
    let workload = served_workload(config, snapshot, original.ip())?;
    Ok(Destination {
        services: services_of(snapshot, &workload),
        workload,
        upstream: original,
        addressed_service: None,
        proxy_header: None,
        from_gateway: false,
    })
}

/// The workload at `ip` on the proxy's network, if this proxy serves it.
fn served_workload(
    config: &InboundConfig,
    snapshot: &MeshSnapshot,
    ip: IpAddr,
) -> Result<Arc<Workload>, ProxyError> {
    let workload =
        snapshot
            .workload_by_ip(&config.network, ip)
            .ok_or_else(|| ProxyError::UnknownDestination {
                network: config.network.clone(),
                ip,
            })?;
    if !config.served.serves(workload) {
        return Err(ProxyError::NotServed {
            workload: workload.uid.clone(),
        });
    }
    Ok(workload.clone())
}

/// Checks a CONNECT to `target` that arrived at `local_ip` (another IP): accepted when the target's
/// workload or service has `local` as its waypoint, or when `local` takes an application tunnel (it gets
/// the target in the PROXY header and decides for itself). Returns the service the target IP names, if
/// it names one.
fn sandwiched(
    config: &InboundConfig,
    snapshot: &MeshSnapshot,
    local: &Workload,
    local_ip: IpAddr,
    target: IpAddr,
) -> Result<Option<Arc<Service>>, ProxyError> {
    let is_local = |w: &Workload| w.uid == local.uid;
    let waypoint_is_local = |waypoint: &Option<GatewayAddress>| {
        waypoint
            .as_ref()
            .is_some_and(|w| resolves_to(snapshot, w, &is_local))
    };
    let service = snapshot.service_by_ip(&config.network, target);
    match snapshot.workload_by_ip(&config.network, target) {
        Some(workload) if waypoint_is_local(&workload.waypoint) => return Ok(None),
        Some(_) => {}
        None => {
            if let Some(service) = service
                && waypoint_is_local(&service.waypoint)
            {
                return Ok(Some(service.clone()));
            }
        }
    }
    if local.application_tunnel.is_some() {
        return Ok(service.cloned());
    }
    Err(ProxyError::IpMismatch {
        target,
        arrived: local_ip,
    })
}

/// Whether `gateway` names a workload satisfying `matches`: the workload at its address, or an endpoint
/// of the service at its address or hostname.
fn resolves_to(
    snapshot: &MeshSnapshot,
    gateway: &GatewayAddress,
    matches: &dyn Fn(&Workload) -> bool,
) -> bool {
    let service = match &gateway.destination {
        GatewayDestination::Address(addr) => {
            if let Some(workload) = snapshot.workload_by_addr(addr) {
                return matches(workload);
            }
            snapshot.service_by_vip(addr)
        }
        GatewayDestination::Hostname(name) => snapshot.service_by_hostname(name),
    };
    service.is_some_and(|service| {
        snapshot
            .endpoints_of(service)
            .iter()
            .filter_map(|endpoint| snapshot.workload_by_uid(&endpoint.workload_uid))
            .any(|workload| matches(workload))
    })
}

/// Whether the workload has a waypoint of its own (a service's waypoint only applies to traffic addressed
/// to the service, which clients may legitimately skip by addressing the pod).
pub(super) fn has_waypoint(workload: &Workload) -> bool {
    workload.waypoint.is_some()
}

/// Whether the peer is `workload`'s waypoint: a workload the waypoint resolves to, at the peer's IP and
/// with the peer's identity (both, so neither a shared service account nor a reused IP suffices).
pub(super) fn from_waypoint(
    snapshot: &MeshSnapshot,
    workload: &Workload,
    peer: &SpiffeId,
    peer_ip: IpAddr,
) -> bool {
    workload.waypoint.as_ref().is_some_and(|waypoint| {
        resolves_to(snapshot, waypoint, &|candidate: &Workload| {
            candidate.addresses.contains(&peer_ip) && candidate.identity().is_ok_and(|id| id == *peer)
        })
    })
}

/// The services `workload` backs, as the snapshot has them.
fn services_of(snapshot: &MeshSnapshot, workload: &Workload) -> Vec<Arc<Service>> {
    workload
        .services
        .keys()
        .filter_map(|key| snapshot.service_by_hostname(key).cloned())
        .collect()
}

/// The service a hostname CONNECT names, preferring one in the destination's namespace (a hostname
/// carries no namespace, and several namespaces may define it).
fn service_by_hostname(
    snapshot: &MeshSnapshot,
    workload: &Workload,
    host: &str,
) -> Result<Arc<Service>, ProxyError> {
    let mut fallback = None;
    for service in snapshot.services_by_bare_hostname(host) {
        if service.namespace == workload.namespace {
            return Ok(service.clone());
        }
        fallback.get_or_insert(service);
    }
    fallback.cloned().ok_or_else(|| ProxyError::UnknownService {
        hostname: host.to_owned(),
    })
}

/// The target port of `service_port`: the workload's own mapping for the service if it has one (a named
/// port), else the service's.
fn target_port(workload: &Workload, service: &Service, service_port: u16) -> Result<u16, ProxyError> {
    mesh_core::model::target_port(workload.services.get(&service.key()), service, service_port).ok_or_else(
        || ProxyError::NoTargetPort {
            service: service.key(),
            port: service_port,
        },
    )
}

/// The PROXY header's target: the CONNECT address, or for a hostname the service's VIP on our network
/// (IPv4 preferred) with the requested port, since the header cannot carry a name as the address.
fn proxy_header(
    config: &InboundConfig,
    target: &TunnelTarget,
    service: Option<&Arc<Service>>,
) -> Result<ProxyHeader, ProxyError> {
    match target {
        TunnelTarget::Addr(addr) => Ok(ProxyHeader {
            target: *addr,
            hostname: None,
        }),
        TunnelTarget::Host { host, port } => {
            let service = service.ok_or_else(|| ProxyError::UnknownService {
                hostname: host.clone(),
            })?;
            let vip = service
                .vips
                .iter()
                .filter(|vip| vip.network == config.network)
                .max_by_key(|vip| vip.ip.is_ipv4())
                .ok_or_else(|| ProxyError::NoServiceAddress {
                    service: service.key(),
                    network: config.network.clone(),
                })?;
            Ok(ProxyHeader {
                target: SocketAddr::new(vip.ip, *port),
                hostname: Some(service.hostname.clone()),
            })
        }
    }
}

/// The service to report, as ztunnel guesses it: the one the client addressed, else the one its
/// `forwarded` header names (only among the workload's own services, so a client cannot label its traffic
/// with an arbitrary service), else the first whose target port is the one connected to.
pub(super) fn reported_service(
    destination: &Destination,
    forwarded_host: Option<&str>,
) -> Option<Arc<Service>> {
    if let Some(service) = &destination.addressed_service {
        return Some(service.clone());
    }
    if let Some(host) = forwarded_host
        && let Some(service) = destination.services.iter().find(|s| *s.hostname == *host)
    {
        return Some(service.clone());
    }
    let port = destination.upstream.port();
    let port_map = |service: &Service| destination.workload.services.get(&service.key());
    destination
        .services
        .iter()
        .find(|service| {
            service.ports.iter().any(|p| {
                p.target_port == port || port_map(service).and_then(|m| m.get(&p.port)) == Some(&port)
            })
        })
        .cloned()
}

/// The `baggage` describing the destination, sent on the `200` so the client's proxy can label its
/// metrics with it.
pub(super) fn baggage(workload: &Workload) -> Baggage {
    let text = |value: &Arc<str>| (!value.is_empty()).then(|| value.to_string());
    Baggage {
        cluster_name: text(&workload.cluster_id),
        namespace: text(&workload.namespace),
        workload_kind: text(&workload.workload_type),
        workload_name: text(&workload.workload_name),
        service_name: text(&workload.canonical_name),
        service_version: text(&workload.canonical_revision),
        region: workload.locality.as_ref().and_then(|l| text(&l.region)),
        zone: workload.locality.as_ref().and_then(|l| text(&l.zone)),
    }
}
