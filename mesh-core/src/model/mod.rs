//! The mesh model the proxies route on: [`Workload`]s, [`Service`]s and their [`Endpoint`]s, gathered in an
//! immutable, indexed [`MeshSnapshot`] and handed to the data path through a [`SnapshotPublisher`].
//!
//! The types follow Istio's `istio.workload.Workload` and `istio.workload.Service` protos (what istiod serves
//! over xDS as `istio.workload.Address`), with the wire details (bytes for addresses, `"ns/host"` map keys)
//! turned into typed values. Converting from the protos or from a local config file is the job of
//! `mesh-xds`; this module has no serialization of its own.
//!
//! Strings are `Arc<str>` so that a workload or service can be cloned into a new snapshot, a log line or a
//! metric label without copying text.
//!
//! ## Example
//! ```
//! use std::collections::BTreeMap;
//! use mesh_core::model::{MeshSnapshot, NetworkAddr, Service, ServicePort, TunnelProtocol, Workload};
//!
//! let echo = Service {
//!     vips: vec!["/198.19.0.10".parse()?],
//!     ports: vec![ServicePort::new(80, 8080)],
//!     ..Service::new("echo", "default", "echo.default.svc.cluster.local")
//! };
//! let server = Workload {
//!     addresses: vec!["198.18.0.2".parse().expect("an IP")],
//!     protocol: TunnelProtocol::Hbone,
//!     services: BTreeMap::from([(echo.key(), BTreeMap::from([(80, 8080)]))]),
//!     ..Workload::new("cluster1//v1/Pod/default/server", "server", "default")
//! };
//! let snapshot = MeshSnapshot::builder().add_service(echo).add_workload(server).build()?;
//!
//! let service = snapshot.service_by_vip(&"/198.19.0.10".parse()?).expect("the VIP is indexed");
//! let endpoint = &snapshot.endpoints_of(service)[0];
//! assert_eq!(endpoint.target_port(service, 80), Some(8080));
//! let workload = snapshot.workload_by_uid(&endpoint.workload_uid).expect("the endpoint's workload");
//! assert_eq!(workload.identity()?.as_str(), "spiffe://cluster.local/ns/default/sa/default");
//! # Ok::<(), mesh_core::Error>(())
//! ```

mod snapshot;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use crate::identity::{SpiffeId, TrustDomain};

pub use snapshot::{MeshSnapshot, MeshSnapshotBuilder, SnapshotPublisher, SnapshotReceiver};

/// The port a waypoint or network gateway accepts HBONE on, unless its [`GatewayAddress`] says otherwise.
pub const DEFAULT_HBONE_MTLS_PORT: u16 = 15008;

/// A workload's port mapping for one service: service port to target (container) port.
///
/// A target port of `0` means "not set here": the service's own target port applies (see
/// [`Endpoint::target_port`]).
pub type PortMap = BTreeMap<u16, u16>;

/// An IP address qualified by the network it is reachable on.
///
/// The same IP may name different workloads on two networks (multi-network meshes reuse pod CIDRs); the
/// empty network `""` is the default one. Istio writes these as `network/ip`, e.g. `/198.19.0.10`.
///
/// Equality and hashing compare the IP as stored; the snapshot's indexes normalize IPv4-mapped IPv6
/// addresses (`::ffff:a.b.c.d`) to IPv4 on both insert and lookup, so either form finds the same entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetworkAddr {
    /// The network name; `""` is the default network.
    pub network: Arc<str>,
    /// The address on that network.
    pub ip: IpAddr,
}

impl NetworkAddr {
    /// An address on `network`.
    pub fn new(network: impl Into<Arc<str>>, ip: IpAddr) -> Self {
        NetworkAddr {
            network: network.into(),
            ip,
        }
    }

    /// An address on the default network `""`.
    pub fn on_default_network(ip: IpAddr) -> Self {
        NetworkAddr::new("", ip)
    }
}

impl fmt::Display for NetworkAddr {
    /// `network/ip`, Istio's spelling (also the xDS on-demand resource name).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.ip)
    }
}

impl FromStr for NetworkAddr {
    type Err = ModelError;

    /// Parses `network/ip`; the network may be empty (`/198.19.0.10`) but the `/` is required, as in Istio.
    fn from_str(s: &str) -> Result<Self, ModelError> {
        let invalid = || ModelError::InvalidNetworkAddr {
            input: truncate_for_log(s),
        };
        // IPv6 addresses contain no '/', so the first one separates the network.
        let (network, ip) = s.split_once('/').ok_or_else(invalid)?;
        let ip = ip.parse().map_err(|_| invalid())?;
        Ok(NetworkAddr::new(network, ip))
    }
}

/// A service key: the namespace and hostname that together name a [`Service`].
///
/// Istio writes these as `namespace/hostname`, e.g. `default/echo.default.svc.cluster.local`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespacedHostname {
    /// The service's namespace.
    pub namespace: Arc<str>,
    /// The service's hostname, e.g. `echo.default.svc.cluster.local`.
    pub hostname: Arc<str>,
}

impl NamespacedHostname {
    /// The key of the service `hostname` in `namespace`.
    pub fn new(namespace: impl Into<Arc<str>>, hostname: impl Into<Arc<str>>) -> Self {
        NamespacedHostname {
            namespace: namespace.into(),
            hostname: hostname.into(),
        }
    }
}

impl fmt::Display for NamespacedHostname {
    /// `namespace/hostname`, the key format of a workload's `services` map in Istio.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.hostname)
    }
}

impl FromStr for NamespacedHostname {
    type Err = ModelError;

    /// Parses `namespace/hostname`; both parts must be non-empty.
    fn from_str(s: &str) -> Result<Self, ModelError> {
        match s.split_once('/') {
            Some((namespace, hostname))
                if !namespace.is_empty() && !hostname.is_empty() && !hostname.contains('/') =>
            {
                Ok(NamespacedHostname::new(namespace, hostname))
            }
            _ => Err(ModelError::InvalidNamespacedHostname {
                input: truncate_for_log(s),
            }),
        }
    }
}

/// Where a waypoint or an east-west network gateway is reached.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GatewayAddress {
    /// The gateway's address or service.
    pub destination: GatewayDestination,
    /// The port it accepts HBONE on (normally [`DEFAULT_HBONE_MTLS_PORT`]).
    pub hbone_mtls_port: u16,
}

impl GatewayAddress {
    /// A gateway at a fixed address, on the default HBONE port.
    pub fn address(address: NetworkAddr) -> Self {
        GatewayAddress {
            destination: GatewayDestination::Address(address),
            hbone_mtls_port: DEFAULT_HBONE_MTLS_PORT,
        }
    }

    /// A gateway reached through a service, on the default HBONE port.
    pub fn hostname(service: NamespacedHostname) -> Self {
        GatewayAddress {
            destination: GatewayDestination::Hostname(service),
            hbone_mtls_port: DEFAULT_HBONE_MTLS_PORT,
        }
    }
}

/// The two ways Istio names a gateway: by address, or by the service in front of it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum GatewayDestination {
    /// A fixed address, e.g. a waypoint's pod IP.
    Address(NetworkAddr),
    /// A service whose endpoints are the gateway instances.
    Hostname(NamespacedHostname),
}

/// How traffic to a workload is carried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TunnelProtocol {
    /// Plain TCP: the workload is not in the ambient mesh (or is reached through its waypoint only).
    #[default]
    None,
    /// HTTP/2 CONNECT over mutual TLS to port 15008.
    Hbone,
}

/// How a workload's pod is networked (Istio's `NetworkMode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum NetworkMode {
    /// The pod has addresses of its own.
    #[default]
    Standard,
    /// The pod uses its node's network namespace, so its address is the node's and other host-network
    /// pods on that node share it.
    HostNetwork,
}

/// Whether a workload should receive traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum HealthStatus {
    /// Ready: eligible for load balancing.
    #[default]
    Healthy,
    /// Not ready: skipped unless the service's health policy allows all endpoints.
    Unhealthy,
}

/// How the proxy in front of a workload hands it tunneled traffic (Istio's `ApplicationTunnel`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ApplicationTunnel {
    /// The protocol the workload expects.
    pub protocol: ApplicationTunnelProtocol,
    /// The port to deliver to instead of the original destination port, if any (e.g. 15088 on a waypoint).
    pub port: Option<u16>,
}

/// The protocol of an [`ApplicationTunnel`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ApplicationTunnelProtocol {
    /// The raw stream, as the client sent it.
    #[default]
    None,
    /// The stream prefixed with a PROXY protocol v2 header carrying the original addresses and identity.
    Proxy,
}

/// Where a workload runs, for locality-aware load balancing and the `cloud.region`/zone baggage.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Locality {
    /// The region, e.g. `us-east1`.
    pub region: Arc<str>,
    /// The zone within the region.
    pub zone: Arc<str>,
    /// The subzone within the zone (often empty).
    pub subzone: Arc<str>,
}

/// One workload (a pod, VM or other instance) as the mesh sees it: Istio's `istio.workload.Workload`.
///
/// Build one with [`Workload::new`] and struct-update syntax; the fields are public so that tests and
/// converters can fill them directly. Validation happens when it is added to a [`MeshSnapshot`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    /// The unique ID, e.g. `cluster1//v1/Pod/default/server`. Must be non-empty.
    pub uid: Arc<str>,
    /// The workload's name (the pod name).
    pub name: Arc<str>,
    /// The workload's namespace.
    pub namespace: Arc<str>,
    /// The service account it runs as; part of its identity.
    pub service_account: Arc<str>,
    /// The trust domain of its identity.
    pub trust_domain: TrustDomain,
    /// Its IP addresses on [`network`](Self::network); may be empty for workloads reached by hostname.
    pub addresses: Vec<IpAddr>,
    /// The network its addresses are on; `""` is the default network.
    pub network: Arc<str>,
    /// The node it runs on.
    pub node: Arc<str>,
    /// A hostname to reach it by, for workloads without addresses (empty if unused).
    pub hostname: Arc<str>,
    /// How traffic to it is carried.
    pub protocol: TunnelProtocol,
    /// The waypoint that traffic to it goes through, if any.
    pub waypoint: Option<GatewayAddress>,
    /// The east-west gateway in front of its network, for callers on other networks.
    pub network_gateway: Option<GatewayAddress>,
    /// The canonical service name (`service.istio.io/canonical-name`), for telemetry.
    pub canonical_name: Arc<str>,
    /// The canonical revision (`service.istio.io/canonical-revision`), for telemetry.
    pub canonical_revision: Arc<str>,
    /// The kind of the owning controller, e.g. `deployment`, for telemetry and baggage.
    pub workload_type: Arc<str>,
    /// The name of the owning controller, e.g. the deployment name.
    pub workload_name: Arc<str>,
    /// The cluster it runs in.
    pub cluster_id: Arc<str>,
    /// Where it runs, if known.
    pub locality: Option<Locality>,
    /// Whether it should receive traffic.
    pub status: HealthStatus,
    /// The services it backs, each with its port mapping. Every entry makes it an [`Endpoint`] of that
    /// service.
    pub services: BTreeMap<NamespacedHostname, PortMap>,
    /// Names (`namespace/name`) of the authorization policies selecting it.
    pub authorization_policies: Vec<Arc<str>>,
    /// How tunneled traffic is delivered to it, if not as a raw stream.
    pub application_tunnel: Option<ApplicationTunnel>,
    /// Whether it has its own addresses or shares its node's ([`NetworkMode::HostNetwork`] workloads are
    /// not indexed by address, since several of them share one).
    pub network_mode: NetworkMode,
}

impl Workload {
    /// A healthy, plain-TCP workload with no addresses or services, running as the Kubernetes `default`
    /// service account in the `cluster.local` trust domain.
    pub fn new(uid: impl Into<Arc<str>>, name: impl Into<Arc<str>>, namespace: impl Into<Arc<str>>) -> Self {
        Workload {
            uid: uid.into(),
            name: name.into(),
            namespace: namespace.into(),
            service_account: Arc::from("default"),
            ..Workload::default()
        }
    }

    /// Its Istio identity, `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    ///
    /// Fails if the namespace or service account is not a valid SPIFFE path segment (e.g. empty).
    pub fn identity(&self) -> Result<SpiffeId, crate::Error> {
        SpiffeId::istio(&self.trust_domain, &self.namespace, &self.service_account)
    }

    /// Its addresses qualified by its network.
    pub fn network_addrs(&self) -> impl Iterator<Item = NetworkAddr> + '_ {
        self.addresses
            .iter()
            .map(|&ip| NetworkAddr::new(self.network.clone(), ip))
    }
}

/// A service: a stable name and VIPs in front of a set of workloads. Istio's `istio.workload.Service`.
///
/// Its endpoints are not listed here: every [`Workload`] naming this service in its `services` map is one,
/// and [`MeshSnapshot::endpoints`] returns them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// The service's name, e.g. `echo`.
    pub name: Arc<str>,
    /// The service's namespace.
    pub namespace: Arc<str>,
    /// The hostname clients use, e.g. `echo.default.svc.cluster.local`. Must be non-empty.
    pub hostname: Arc<str>,
    /// Its virtual IPs, each on a network.
    pub vips: Vec<NetworkAddr>,
    /// Its ports.
    pub ports: Vec<ServicePort>,
    /// Extra identities its endpoints may present, besides each endpoint workload's own identity.
    pub subject_alt_names: Vec<SpiffeId>,
    /// The waypoint that traffic to it goes through, if any.
    pub waypoint: Option<GatewayAddress>,
    /// How endpoints are chosen, if not Istio's default (any healthy endpoint).
    pub load_balancing: Option<LoadBalancing>,
}

impl Service {
    /// A service with no VIPs, ports or waypoint.
    pub fn new(
        name: impl Into<Arc<str>>,
        namespace: impl Into<Arc<str>>,
        hostname: impl Into<Arc<str>>,
    ) -> Self {
        Service {
            name: name.into(),
            namespace: namespace.into(),
            hostname: hostname.into(),
            ..Service::default()
        }
    }

    /// Its key, `namespace/hostname`.
    pub fn key(&self) -> NamespacedHostname {
        NamespacedHostname::new(self.namespace.clone(), self.hostname.clone())
    }

    /// The port entry for `service_port`, if the service exposes it.
    pub fn port(&self, service_port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == service_port)
    }
}

/// One port of a [`Service`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServicePort {
    /// The port clients connect to on the VIP or hostname.
    pub port: u16,
    /// The port on the endpoints; `0` means each endpoint's [`PortMap`] decides.
    pub target_port: u16,
    /// The application protocol, if declared.
    pub app_protocol: Option<AppProtocol>,
}

impl ServicePort {
    /// A port forwarding `port` to `target_port`, with no declared application protocol.
    pub fn new(port: u16, target_port: u16) -> Self {
        ServicePort {
            port,
            target_port,
            app_protocol: None,
        }
    }
}

/// A declared application protocol of a service port (Istio's `AppProtocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AppProtocol {
    /// HTTP/1.1.
    Http11,
    /// HTTP/2 (cleartext or inside the tunnel).
    Http2,
    /// gRPC.
    Grpc,
}

/// A service's load-balancing settings (Istio's `LoadBalancing`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct LoadBalancing {
    /// The locality scopes to prefer, most important first: an endpoint matching the client on more of
    /// them wins.
    pub routing_preference: Vec<LocalityScope>,
    /// What to do when no endpoint matches the preference.
    pub mode: LoadBalancingMode,
    /// Which endpoints are eligible at all.
    pub health_policy: HealthPolicy,
}

/// A dimension of locality that [`LoadBalancing::routing_preference`] compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LocalityScope {
    /// Same region.
    Region,
    /// Same zone.
    Zone,
    /// Same subzone.
    Subzone,
    /// Same node.
    Node,
    /// Same cluster.
    Cluster,
    /// Same network.
    Network,
}

/// How strictly [`LoadBalancing::routing_preference`] applies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LoadBalancingMode {
    /// No preference was set: any eligible endpoint.
    #[default]
    Unspecified,
    /// Only endpoints matching every preferred scope; none at all otherwise.
    Strict,
    /// The best-matching endpoints first, falling back to worse matches.
    Failover,
    /// No load balancing: the connection goes to the original destination address as the client sent it.
    Passthrough,
}

/// Which endpoints load balancing may pick.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum HealthPolicy {
    /// Healthy endpoints only.
    #[default]
    OnlyHealthy,
    /// Every endpoint, healthy or not (for services that manage their own health).
    AllowAll,
}

/// A workload serving a service: derived by the snapshot from the workload's `services` map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The [`Workload::uid`] of the serving workload.
    pub workload_uid: Arc<str>,
    /// The service served.
    pub service: NamespacedHostname,
    /// The workload's port mapping for this service.
    pub port_map: PortMap,
    /// The workload's health.
    pub status: HealthStatus,
}

impl Endpoint {
    /// The port on this endpoint that `service_port` of `service` forwards to: the endpoint's own mapping
    /// if it sets one, else the service's target port. `None` if neither does (the port is not served).
    pub fn target_port(&self, service: &Service, service_port: u16) -> Option<u16> {
        target_port(Some(&self.port_map), service, service_port)
    }
}

/// The port a workload serves `service_port` of `service` on: the workload's own mapping for the service
/// (`port_map`, from its `services` entry) if it sets one, else the service's target port. `None` if
/// neither does (the port is not served). Zero means "not set" in both places, as in Istio's protos.
pub fn target_port(port_map: Option<&PortMap>, service: &Service, service_port: u16) -> Option<u16> {
    port_map
        .and_then(|ports| ports.get(&service_port))
        .copied()
        .filter(|&port| port != 0)
        .or_else(|| {
            service
                .port(service_port)
                .map(|p| p.target_port)
                .filter(|&port| port != 0)
        })
}

/// Why a model object or a snapshot was rejected. Each variant names the objects involved, so the caller
/// can report (or NACK) exactly the offending resource.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A workload has an empty UID.
    #[error("workload {namespace}/{name} has an empty uid")]
    EmptyUid {
        /// The workload's namespace.
        namespace: Arc<str>,
        /// The workload's name.
        name: Arc<str>,
    },

    /// Two workloads have the same UID.
    #[error("duplicate workload uid {uid:?}")]
    DuplicateUid {
        /// The repeated UID.
        uid: Arc<str>,
    },

    /// Two workloads claim the same IP on the same network.
    #[error("address {address} is claimed by workloads {first_uid:?} and {second_uid:?}")]
    DuplicateAddress {
        /// The contested address.
        address: NetworkAddr,
        /// The workload added first.
        first_uid: Arc<str>,
        /// The workload added second.
        second_uid: Arc<str>,
    },

    /// A service has an empty hostname.
    #[error("service {namespace}/{name} has an empty hostname")]
    EmptyHostname {
        /// The service's namespace.
        namespace: Arc<str>,
        /// The service's name.
        name: Arc<str>,
    },

    /// Two services have the same `namespace/hostname` key.
    #[error("duplicate service {service}")]
    DuplicateHostname {
        /// The repeated key.
        service: NamespacedHostname,
    },

    /// Two services claim the same VIP on the same network.
    #[error("VIP {vip} is claimed by services {first} and {second}")]
    DuplicateVip {
        /// The contested VIP.
        vip: NetworkAddr,
        /// The service added first.
        first: NamespacedHostname,
        /// The service added second.
        second: NamespacedHostname,
    },

    /// A service lists the same port twice.
    #[error("service {service} lists port {port} more than once")]
    DuplicateServicePort {
        /// The service.
        service: NamespacedHostname,
        /// The repeated service port.
        port: u16,
    },

    /// A workload backs a service the snapshot does not contain (see
    /// [`MeshSnapshotBuilder::allow_unknown_services`]).
    #[error("workload {workload_uid:?} references unknown service {service}")]
    UnknownService {
        /// The referencing workload.
        workload_uid: Arc<str>,
        /// The missing service.
        service: NamespacedHostname,
    },

    /// A string is not a `network/ip` address.
    #[error("invalid network address {input:?}: expected network/ip")]
    InvalidNetworkAddr {
        /// The rejected input, cut to 128 characters for logging.
        input: String,
    },

    /// A string is not a `namespace/hostname` service key.
    #[error("invalid service key {input:?}: expected namespace/hostname")]
    InvalidNamespacedHostname {
        /// The rejected input, cut to 128 characters for logging.
        input: String,
    },
}

/// Parsed strings may come from a config file or the network; cap what one of them can make us print.
fn truncate_for_log(input: &str) -> String {
    const LIMIT: usize = 128;
    match input.char_indices().nth(LIMIT) {
        Some((cut, _)) => format!("{}...", &input[..cut]),
        None => input.to_owned(),
    }
}
