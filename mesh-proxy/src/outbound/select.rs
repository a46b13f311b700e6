//! Resolving what the snapshot names into an [`Upstream`]: endpoint selection for a service (health,
//! port, locality), the address to dial on the chosen workload, waypoint and network-gateway lookups, and
//! the "is the source this gateway?" rule that keeps a waypoint's own traffic from looping back to it.
//!
//! Follows Istio ztunnel's `state.rs` (`find_upstream`, `load_balance`, `fetch_waypoint`,
//! `fetch_network_gateway`, `pick_workload_destination_or_resolve`) and `check_from_waypoint`.

use std::cmp::Ordering;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mesh_core::SpiffeId;
use mesh_core::model::{
    GatewayAddress, GatewayDestination, HealthPolicy, HealthStatus, LoadBalancingMode, Locality,
    LocalityScope, MeshSnapshot, NamespacedHostname, Service, Workload,
};

use super::error::RouteError;
use super::route::{EndpointPicker, RouteInput};

/// A chosen next hop: the workload, the address and port to reach it on, and the service it was picked
/// from (if any).
#[derive(Debug)]
pub(super) struct Upstream<'s> {
    pub(super) workload: &'s Arc<Workload>,
    /// `None` only for a workload on another network that is reached through its network gateway.
    pub(super) ip: Option<IpAddr>,
    pub(super) port: u16,
    pub(super) service: Option<&'s Arc<Service>>,
}

impl Upstream<'_> {
    /// `ip:port`, if the workload has an address to dial.
    pub(super) fn socket_addr(&self) -> Result<SocketAddr, RouteError> {
        self.ip
            .map(|ip| SocketAddr::new(ip, self.port))
            .ok_or_else(|| RouteError::NoUsableAddress {
                workload: self.workload.uid.clone(),
            })
    }

    /// The identities the upstream may present: its workload's own, then any extra subject alternative
    /// names its service declares. A workload without a valid identity fails the route (closed).
    pub(super) fn identities(&self) -> Result<Vec<SpiffeId>, RouteError> {
        let own = self
            .workload
            .identity()
            .map_err(|source| RouteError::InvalidIdentity {
                workload: self.workload.uid.clone(),
                source,
            })?;
        let sans = self.service.map_or(&[][..], |s| &s.subject_alt_names[..]);
        let mut identities = Vec::with_capacity(1 + sans.len());
        identities.push(own);
        for san in sans {
            if !identities.contains(san) {
                identities.push(san.clone());
            }
        }
        Ok(identities)
    }
}

/// How strictly a service's port must be declared: a client names real service ports, while a
/// waypoint is looked up on its HBONE port, which its service need not declare if the waypoint
/// receives tunnels through an application tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Resolution {
    Standard,
    Waypoint,
}

/// A workload or service found by address or hostname.
#[derive(Clone, Copy, Debug)]
pub(super) enum Found<'s> {
    Workload(&'s Arc<Workload>),
    Service(&'s Arc<Service>),
}

/// What a gateway address names. By address a workload wins over a service VIP, by hostname a service
/// wins over a workload, as in ztunnel's `find_destination`.
pub(super) fn find_destination<'s>(
    snapshot: &'s MeshSnapshot,
    dest: &GatewayDestination,
) -> Option<Found<'s>> {
    match dest {
        GatewayDestination::Address(addr) => snapshot
            .workload_by_addr(addr)
            .map(Found::Workload)
            .or_else(|| snapshot.service_by_vip(addr).map(Found::Service)),
        GatewayDestination::Hostname(host) => snapshot
            .service_by_hostname(host)
            .map(Found::Service)
            .or_else(|| workload_by_hostname(snapshot, host).map(Found::Workload)),
    }
}

/// Workloads are not indexed by hostname: few have one, and this is only reached for a gateway named by
/// a hostname no service carries.
fn workload_by_hostname<'s>(
    snapshot: &'s MeshSnapshot,
    host: &NamespacedHostname,
) -> Option<&'s Arc<Workload>> {
    snapshot
        .workloads()
        .find(|w| !w.hostname.is_empty() && w.hostname == host.hostname && w.namespace == host.namespace)
}

/// Whether the connection comes from one of the workloads behind `gateway`: same identity and the
/// connection's source IP among its addresses (ztunnel's `check_from_waypoint`). A waypoint sending to
/// a destination it serves must reach the destination, not itself again.
pub(super) fn is_from_gateway(input: &RouteInput<'_>, gateway: &GatewayAddress) -> bool {
    let source = input.source;
    let source_ip = input.source_ip.to_canonical();
    let is_source = |w: &Workload| {
        w.trust_domain == source.trust_domain
            && w.namespace == source.namespace
            && w.service_account == source.service_account
            && w.addresses.iter().any(|ip| ip.to_canonical() == source_ip)
    };
    match find_destination(input.snapshot, &gateway.destination) {
        Some(Found::Workload(w)) => is_source(w),
        Some(Found::Service(s)) => input
            .snapshot
            .endpoints_of(s)
            .iter()
            .filter_map(|ep| input.snapshot.workload_by_uid(&ep.workload_uid))
            .any(|w| is_source(w)),
        None => false,
    }
}

/// Resolves a waypoint (`Resolution::Waypoint`) or a network gateway (`Resolution::Standard`) to the
/// workload to tunnel to. `Ok(None)` if the snapshot names nothing usable there.
///
/// A gateway named by address is dialed on that address (so an IPv6 client may be sent to an IPv4
/// gateway); one named by hostname adapts to the family of the original destination.
pub(super) fn resolve_gateway<'s>(
    input: &RouteInput<'s>,
    gateway: &GatewayAddress,
    mode: Resolution,
    picker: &mut impl EndpointPicker,
) -> Result<Option<Upstream<'s>>, RouteError> {
    let port = gateway.hbone_mtls_port;
    match &gateway.destination {
        GatewayDestination::Address(addr) => {
            let target = SocketAddr::new(addr.ip, port);
            let snapshot = input.snapshot;
            if let Some(service) = snapshot.service_by_vip(addr) {
                let passthrough = service
                    .load_balancing
                    .as_ref()
                    .is_some_and(|lb| lb.mode == LoadBalancingMode::Passthrough);
                if passthrough {
                    return Ok(None);
                }
                return match pick_endpoint(input, service, port, mode, picker) {
                    Some((workload, target_port)) => {
                        finalize(input, workload, target_port, Some(service), target).map(Some)
                    }
                    None => Ok(None),
                };
            }
            match snapshot.workload_by_addr(addr) {
                Some(workload) => finalize(input, workload, port, None, target).map(Some),
                None => Ok(None),
            }
        }
        GatewayDestination::Hostname(_) => {
            let target = input.destination;
            match find_destination(input.snapshot, &gateway.destination) {
                Some(Found::Service(service)) => match pick_endpoint(input, service, port, mode, picker) {
                    Some((workload, target_port)) => {
                        finalize(input, workload, target_port, Some(service), target).map(Some)
                    }
                    None => Ok(None),
                },
                Some(Found::Workload(workload)) => finalize(input, workload, port, None, target).map(Some),
                None => Ok(None),
            }
        }
    }
}

/// Picks one eligible endpoint of `service` for `port` and returns its workload and target port.
///
/// Eligible: healthy (or any health under [`HealthPolicy::AllowAll`]); reachable (has an address or
/// hostname, or sits on another network behind a network gateway); serving the port (see
/// [`Resolution`]); and under `STRICT` matching every routing preference. Under `STRICT` and
/// `FAILOVER` only the endpoints matching the most leading preferences are candidates. The picker
/// chooses among the candidates, in snapshot order. Two passes over the endpoints instead of a
/// collected list: no allocation per connection.
pub(super) fn pick_endpoint<'s>(
    input: &RouteInput<'s>,
    service: &'s Service,
    port: u16,
    mode: Resolution,
    picker: &mut impl EndpointPicker,
) -> Option<(&'s Arc<Workload>, u16)> {
    let snapshot = input.snapshot;
    let source = input.source;
    let declared = service.port(port).is_some();
    if mode == Resolution::Standard && !declared {
        return None;
    }
    let lb = service.load_balancing.as_ref();
    let allow_unhealthy = lb.is_some_and(|lb| lb.health_policy == HealthPolicy::AllowAll);
    let ranking = lb.filter(|lb| matches!(lb.mode, LoadBalancingMode::Strict | LoadBalancingMode::Failover));

    let eligible = || {
        snapshot.endpoints_of(service).iter().filter_map(move |ep| {
            if ep.status == HealthStatus::Unhealthy && !allow_unhealthy {
                return None;
            }
            let workload = snapshot.workload_by_uid(&ep.workload_uid)?;
            let has_address = !workload.addresses.is_empty() || !workload.hostname.is_empty();
            // WDS is client-agnostic: a local workload may also name a network gateway, which must
            // never be used from its own network.
            let via_gateway = workload.network != source.network && workload.network_gateway.is_some();
            if !has_address && !via_gateway {
                return None;
            }
            let serves = match mode {
                Resolution::Standard => ep.target_port(service, port).is_some(),
                Resolution::Waypoint => declared || workload.application_tunnel.is_some(),
            };
            if !serves {
                return None;
            }
            let rank = match ranking {
                None => 0,
                Some(lb) => {
                    let rank = locality_rank(source, workload, &lb.routing_preference);
                    if lb.mode == LoadBalancingMode::Strict && rank < lb.routing_preference.len() {
                        return None;
                    }
                    rank
                }
            };
            Some((ep, workload, rank))
        })
    };

    let (best, count) = eligible().fold((0, 0), |(best, count), (_, _, rank)| match rank.cmp(&best) {
        Ordering::Greater => (rank, 1),
        Ordering::Equal => (best, count + 1),
        Ordering::Less => (best, count),
    });
    if count == 0 {
        return None;
    }
    let chosen = picker.pick(count) % count;
    let (ep, workload, _) = eligible().filter(|&(_, _, rank)| rank == best).nth(chosen)?;
    // An endpoint behind an application tunnel (a waypoint receiving PROXY-protocol tunnels) takes the
    // port as addressed; the tunnel decides where it lands.
    let target_port = ep.target_port(service, port).or_else(|| {
        workload
            .application_tunnel
            .and_then(|tunnel| tunnel.port)
            .map(|_| port)
    })?;
    Some((workload, target_port))
}

/// How many of `preferences`, in order, the two workloads share before the first they do not.
fn locality_rank(source: &Workload, dest: &Workload, preferences: &[LocalityScope]) -> usize {
    preferences
        .iter()
        .take_while(|&&scope| same_scope(source, dest, scope))
        .count()
}

fn same_scope(a: &Workload, b: &Workload, scope: LocalityScope) -> bool {
    // An unknown locality compares as empty strings, as in ztunnel, where locality defaults to empty.
    fn part(w: &Workload, field: fn(&Locality) -> &Arc<str>) -> &str {
        w.locality.as_ref().map_or("", |l| field(l))
    }
    match scope {
        LocalityScope::Region => part(a, |l| &l.region) == part(b, |l| &l.region),
        LocalityScope::Zone => part(a, |l| &l.zone) == part(b, |l| &l.zone),
        LocalityScope::Subzone => part(a, |l| &l.subzone) == part(b, |l| &l.subzone),
        LocalityScope::Node => a.node == b.node,
        LocalityScope::Cluster => a.cluster_id == b.cluster_id,
        LocalityScope::Network => a.network == b.network,
    }
}

/// Completes an upstream by choosing which of the workload's addresses to dial for `target` (the
/// address the client or gateway named).
pub(super) fn finalize<'s>(
    input: &RouteInput<'s>,
    workload: &'s Arc<Workload>,
    port: u16,
    service: Option<&'s Arc<Service>>,
    target: SocketAddr,
) -> Result<Upstream<'s>, RouteError> {
    let ip = pick_address(input, workload, target.ip())?;
    Ok(Upstream {
        workload,
        ip,
        port,
        service,
    })
}

/// The address the client named if it is the workload's; else one of the same IP family as the
/// target; else its first. A workload without addresses is reached through its network gateway if it
/// is on another network, needs DNS if it has a hostname, and is unreachable otherwise.
fn pick_address(
    input: &RouteInput<'_>,
    workload: &Workload,
    target: IpAddr,
) -> Result<Option<IpAddr>, RouteError> {
    let target = target.to_canonical();
    let mut addresses = workload.addresses.iter().map(|ip| ip.to_canonical());
    if let Some(exact) = addresses.clone().find(|&ip| ip == target) {
        return Ok(Some(exact));
    }
    let same_family = addresses.clone().find(|ip| ip.is_ipv6() == target.is_ipv6());
    if let Some(ip) = same_family.or_else(|| addresses.next()) {
        return Ok(Some(ip));
    }
    if workload.network != input.source.network && workload.network_gateway.is_some() {
        return Ok(None);
    }
    if !workload.hostname.is_empty() {
        return Err(RouteError::NeedsDnsResolution {
            workload: workload.uid.clone(),
            hostname: workload.hostname.clone(),
        });
    }
    Err(RouteError::NoUsableAddress {
        workload: workload.uid.clone(),
    })
}
