//! Istio ztunnel's static configuration (`LOCAL_XDS_PATH`): the serde shapes of its `LocalConfig`
//! (`workloads`, `services`, `policies`; camelCase, unknown fields refused) and their conversion to the
//! model. Values with a syntax of their own (IPs, `network/ip`, `namespace/hostname`, CIDRs, ports) are
//! parsed while deserializing, so their errors point at the value.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use mesh_core::model::{
    self, ApplicationTunnel, ApplicationTunnelProtocol, GatewayAddress, GatewayDestination, HealthPolicy,
    HealthStatus, LoadBalancing, LoadBalancingMode, Locality, LocalityScope, NamespacedHostname, NetworkAddr,
    NetworkMode, ServicePort, TunnelProtocol,
};
use mesh_core::{SpiffeId, TrustDomain};
use serde::de::{self, IgnoredAny};
use serde::{Deserialize, Deserializer};

use super::{LocalOptions, Located, Origin};
use crate::XdsError;
use crate::authz::{
    AuthzAction, AuthzClause, AuthzMatch, AuthzRule, AuthzScope, ServiceAccountMatch, StringMatch,
    XdsAuthorization,
};

/// One ztunnel-format document.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Document {
    #[serde(default)]
    workloads: Vec<LocalWorkload>,
    #[serde(default)]
    policies: Vec<Policy>,
    #[serde(default)]
    services: Vec<LocalService>,
}

/// ztunnel's `LocalWorkload`: its `Workload` fields plus the `services` port map.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalWorkload {
    #[serde(default)]
    workload_ips: Vec<IpAddr>,
    #[serde(default)]
    waypoint: Option<Gateway>,
    #[serde(default)]
    network_gateway: Option<Gateway>,
    #[serde(default)]
    protocol: Protocol,
    #[serde(default)]
    network_mode: Mode,
    #[serde(default)]
    uid: String,
    #[serde(default)]
    name: String,
    namespace: String,
    #[serde(default)]
    trust_domain: String,
    #[serde(default)]
    service_account: String,
    #[serde(default)]
    network: String,
    #[serde(default)]
    workload_name: String,
    #[serde(default)]
    workload_type: String,
    #[serde(default)]
    canonical_name: String,
    #[serde(default)]
    canonical_revision: String,
    #[serde(default)]
    hostname: String,
    #[serde(default)]
    node: String,
    /// Accepted for compatibility; the model has no native-tunnel flag (ztunnel ignores it for local
    /// workloads too).
    #[serde(default)]
    #[allow(dead_code, reason = "accepted so that ztunnel files load; nothing reads it")]
    native_tunnel: bool,
    #[serde(default)]
    application_tunnel: Option<AppTunnel>,
    #[serde(default)]
    authorization_policies: Vec<String>,
    #[serde(default)]
    status: Health,
    #[serde(default)]
    cluster_id: String,
    #[serde(default)]
    locality: Option<ZLocality>,
    #[serde(default)]
    services: BTreeMap<ServiceKey, BTreeMap<u16, u16>>,
    /// Accepted for compatibility; the model does not weigh endpoints.
    #[serde(default)]
    #[allow(dead_code, reason = "accepted so that ztunnel files load; nothing reads it")]
    capacity: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "HBONE")]
    Hbone,
}

#[derive(Debug, Default, Deserialize)]
enum Mode {
    #[default]
    Standard,
    HostNetwork,
}

#[derive(Debug, Default, Deserialize)]
enum Health {
    #[default]
    Healthy,
    Unhealthy,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Gateway {
    destination: Destination,
    hbone_mtls_port: u16,
}

/// `network/ip`, or else `namespace/hostname` (ztunnel's untagged `Destination`).
#[derive(Debug)]
struct Destination(GatewayDestination);

impl<'de> Deserialize<'de> for Destination {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if let Ok(address) = text.parse::<NetworkAddr>() {
            return Ok(Destination(GatewayDestination::Address(address)));
        }
        text.parse::<NamespacedHostname>()
            .map(|host| Destination(GatewayDestination::Hostname(host)))
            .map_err(|_| de::Error::custom(format!("{text:?} is neither network/ip nor namespace/hostname")))
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AppTunnel {
    protocol: AppTunnelProtocol,
    #[serde(default)]
    port: Option<u16>,
}

#[derive(Debug, Deserialize)]
enum AppTunnelProtocol {
    #[serde(rename = "NONE")]
    None,
    #[serde(rename = "PROXY")]
    Proxy,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ZLocality {
    #[serde(default)]
    region: String,
    #[serde(default)]
    zone: String,
    #[serde(default)]
    subzone: String,
}

/// A `namespace/hostname` map key.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ServiceKey(NamespacedHostname);

impl<'de> Deserialize<'de> for ServiceKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        parsed(deserializer).map(ServiceKey)
    }
}

/// A `network/ip` address.
#[derive(Debug)]
struct Vip(NetworkAddr);

impl<'de> Deserialize<'de> for Vip {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        parsed(deserializer).map(Vip)
    }
}

/// A CIDR, or a single address (ztunnel itself wants the CIDR form).
#[derive(Debug)]
struct Cidr(IpNet);

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let net = text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| de::Error::custom(format!("{text:?} is not an IP address or CIDR")))?;
        Ok(Cidr(net))
    }
}

/// A string parsed with `FromStr`, the parse error becoming the deserializer's (so it has a position).
fn parsed<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(de::Error::custom)
}

/// ztunnel's `Service` (its `endpoints` are accepted and ignored: endpoints come from workloads).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalService {
    name: String,
    namespace: String,
    hostname: String,
    #[serde(default)]
    vips: Vec<Vip>,
    #[serde(default)]
    ports: BTreeMap<u16, u16>,
    #[serde(default)]
    #[allow(
        dead_code,
        reason = "accepted so that ztunnel dumps load; endpoints come from workloads"
    )]
    endpoints: IgnoredAny,
    #[serde(default)]
    subject_alt_names: Vec<String>,
    #[serde(default)]
    waypoint: Option<Gateway>,
    #[serde(default)]
    load_balancer: Option<LoadBalancer>,
    #[serde(default)]
    #[allow(
        dead_code,
        reason = "accepted so that ztunnel files load; the model has no IP families"
    )]
    ip_families: Option<IpFamily>,
    #[serde(default)]
    #[allow(
        dead_code,
        reason = "accepted so that ztunnel files load; the model has no canonical flag"
    )]
    canonical: bool,
}

#[derive(Debug, Deserialize)]
enum IpFamily {
    Dual,
    IPv4,
    IPv6,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LoadBalancer {
    #[serde(default)]
    routing_preferences: Vec<Scope>,
    #[serde(default)]
    mode: LbMode,
    #[serde(default)]
    health_policy: LbHealth,
}

#[derive(Debug, Deserialize)]
enum Scope {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    Network,
}

#[derive(Debug, Default, Deserialize)]
enum LbMode {
    #[default]
    Standard,
    Strict,
    Failover,
    Passthrough,
}

#[derive(Debug, Default, Deserialize)]
enum LbHealth {
    #[default]
    OnlyHealthy,
    AllowAll,
}

/// ztunnel's `Authorization`: `rules` is rules, of clauses, of matches.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Policy {
    name: String,
    namespace: String,
    scope: PolicyScope,
    action: Action,
    #[serde(default)]
    rules: Vec<Vec<Vec<Match>>>,
    #[serde(default)]
    dry_run: bool,
}

#[derive(Debug, Deserialize)]
enum PolicyScope {
    Global,
    Namespace,
    WorkloadSelector,
}

#[derive(Debug, Deserialize)]
enum Action {
    Allow,
    Deny,
}

/// ztunnel's `RbacMatch`. Unknown fields are refused here too (ztunnel ignores them): a misspelt
/// `notDestinationPort` in a DENY rule would otherwise silently widen what the rule lets through.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Match {
    #[serde(default)]
    namespaces: Vec<TaggedMatch>,
    #[serde(default)]
    not_namespaces: Vec<TaggedMatch>,
    #[serde(default)]
    service_accounts: Vec<SaMatch>,
    #[serde(default)]
    not_service_accounts: Vec<SaMatch>,
    #[serde(default)]
    principals: Vec<TaggedMatch>,
    #[serde(default)]
    not_principals: Vec<TaggedMatch>,
    #[serde(default)]
    source_ips: Vec<Cidr>,
    #[serde(default)]
    not_source_ips: Vec<Cidr>,
    #[serde(default)]
    destination_ips: Vec<Cidr>,
    #[serde(default)]
    not_destination_ips: Vec<Cidr>,
    #[serde(default)]
    destination_ports: Vec<u16>,
    #[serde(default)]
    not_destination_ports: Vec<u16>,
}

/// ztunnel's `StringMatch`, written with YAML tags: `!Exact "x"`, `!Prefix`, `!Suffix`, `!Presence []`.
#[derive(Debug, Deserialize)]
enum TaggedMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// ztunnel's `Presence()` serializes as `!Presence []`; any value (or none) is accepted.
    Presence(#[allow(dead_code, reason = "the value carries nothing")] IgnoredAny),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SaMatch {
    namespace: String,
    service_account: String,
}

/// Converts one document's workloads, services and policies into `out`.
pub(crate) fn convert(
    document: &Document,
    origin: &Origin,
    options: &LocalOptions,
    out: &mut Located,
) -> Result<(), XdsError> {
    for (i, workload) in document.workloads.iter().enumerate() {
        let origin = origin.child(format!("workloads[{i}]"));
        out.workloads
            .push((convert_workload(workload, &origin, options)?, origin));
    }
    for (i, service) in document.services.iter().enumerate() {
        let origin = origin.child(format!("services[{i}]"));
        out.services.push((convert_service(service, &origin)?, origin));
    }
    for (i, policy) in document.policies.iter().enumerate() {
        let origin = origin.child(format!("policies[{i}]"));
        out.policies.push((convert_policy(policy, &origin)?, origin));
    }
    Ok(())
}

fn gateway(gateway: &Gateway) -> GatewayAddress {
    GatewayAddress {
        destination: gateway.destination.0.clone(),
        hbone_mtls_port: gateway.hbone_mtls_port,
    }
}

fn convert_workload(
    w: &LocalWorkload,
    origin: &Origin,
    options: &LocalOptions,
) -> Result<model::Workload, XdsError> {
    let cluster_id = if w.cluster_id.is_empty() {
        options.cluster_id.as_str()
    } else {
        w.cluster_id.as_str()
    };
    let uid = match (w.uid.is_empty(), w.name.is_empty()) {
        (false, _) => w.uid.clone(),
        // istiod's uid for a pod: the file names the workload, so it can be keyed like one.
        (true, false) => format!("{cluster_id}//Pod/{}/{}", w.namespace, w.name),
        (true, true) => return Err(origin.error("uid", "a workload needs a uid or a name")),
    };
    let trust_domain = if w.trust_domain.is_empty() {
        options.trust_domain.clone()
    } else {
        TrustDomain::new(&w.trust_domain).map_err(|e| origin.error("trustDomain", e))?
    };
    let service_account = if w.service_account.is_empty() {
        "default"
    } else {
        w.service_account.as_str()
    };
    check_identity(
        &trust_domain,
        &w.namespace,
        service_account,
        origin,
        ("namespace", "serviceAccount"),
    )?;
    Ok(model::Workload {
        uid: uid.into(),
        name: w.name.as_str().into(),
        namespace: w.namespace.as_str().into(),
        service_account: service_account.into(),
        trust_domain,
        addresses: w.workload_ips.clone(),
        network: w.network.as_str().into(),
        node: w.node.as_str().into(),
        hostname: w.hostname.as_str().into(),
        protocol: match w.protocol {
            Protocol::Tcp => TunnelProtocol::None,
            Protocol::Hbone => TunnelProtocol::Hbone,
        },
        waypoint: w.waypoint.as_ref().map(gateway),
        network_gateway: w.network_gateway.as_ref().map(gateway),
        canonical_name: w.canonical_name.as_str().into(),
        canonical_revision: w.canonical_revision.as_str().into(),
        workload_type: w.workload_type.to_ascii_lowercase().into(),
        workload_name: w.workload_name.as_str().into(),
        cluster_id: cluster_id.into(),
        locality: w.locality.as_ref().map(|l| Locality {
            region: l.region.as_str().into(),
            zone: l.zone.as_str().into(),
            subzone: l.subzone.as_str().into(),
        }),
        status: match w.status {
            Health::Healthy => HealthStatus::Healthy,
            Health::Unhealthy => HealthStatus::Unhealthy,
        },
        services: w
            .services
            .iter()
            .map(|(key, ports)| (key.0.clone(), ports.clone()))
            .collect(),
        authorization_policies: w
            .authorization_policies
            .iter()
            .map(|p| p.as_str().into())
            .collect(),
        application_tunnel: w.application_tunnel.as_ref().map(|t| ApplicationTunnel {
            protocol: match t.protocol {
                AppTunnelProtocol::None => ApplicationTunnelProtocol::None,
                AppTunnelProtocol::Proxy => ApplicationTunnelProtocol::Proxy,
            },
            port: t.port.filter(|&p| p != 0),
        }),
        network_mode: match w.network_mode {
            Mode::Standard => NetworkMode::Standard,
            Mode::HostNetwork => NetworkMode::HostNetwork,
        },
    })
}

/// Refuses a workload whose identity is not valid SPIFFE, naming the part at fault: `fields` are the
/// names of the namespace and service account fields where the object was written.
pub(crate) fn check_identity(
    trust_domain: &TrustDomain,
    namespace: &str,
    service_account: &str,
    origin: &Origin,
    fields: (&str, &str),
) -> Result<(), XdsError> {
    match SpiffeId::istio(trust_domain, namespace, service_account) {
        Ok(_) => Ok(()),
        Err(e) => {
            let field = if SpiffeId::istio(trust_domain, namespace, "default").is_ok() {
                fields.1
            } else {
                fields.0
            };
            Err(origin.error(field, e))
        }
    }
}

fn convert_service(s: &LocalService, origin: &Origin) -> Result<model::Service, XdsError> {
    if s.hostname.is_empty() {
        return Err(origin.error("hostname", "must not be empty"));
    }
    Ok(model::Service {
        name: s.name.as_str().into(),
        namespace: s.namespace.as_str().into(),
        hostname: s.hostname.as_str().into(),
        vips: s.vips.iter().map(|v| v.0.clone()).collect(),
        ports: s
            .ports
            .iter()
            .map(|(&port, &target)| ServicePort::new(port, target))
            .collect(),
        subject_alt_names: subject_alt_names(&s.subject_alt_names, origin, "subjectAltNames")?,
        waypoint: s.waypoint.as_ref().map(gateway),
        load_balancing: s.load_balancer.as_ref().map(|lb| LoadBalancing {
            routing_preference: lb
                .routing_preferences
                .iter()
                .map(|scope| match scope {
                    Scope::Region => LocalityScope::Region,
                    Scope::Zone => LocalityScope::Zone,
                    Scope::Subzone => LocalityScope::Subzone,
                    Scope::Node => LocalityScope::Node,
                    Scope::Cluster => LocalityScope::Cluster,
                    Scope::Network => LocalityScope::Network,
                })
                .collect(),
            mode: match lb.mode {
                LbMode::Standard => LoadBalancingMode::Unspecified,
                LbMode::Strict => LoadBalancingMode::Strict,
                LbMode::Failover => LoadBalancingMode::Failover,
                LbMode::Passthrough => LoadBalancingMode::Passthrough,
            },
            health_policy: match lb.health_policy {
                LbHealth::OnlyHealthy => HealthPolicy::OnlyHealthy,
                LbHealth::AllowAll => HealthPolicy::AllowAll,
            },
        }),
    })
}

/// Subject alternative names as the model keeps them: SPIFFE IDs. Other names (a ServiceEntry may list
/// DNS names) are skipped, as `service_from_proto` skips them: peers are checked by SPIFFE URI only, so
/// such a name could never match. A `spiffe://` name that does not parse is refused.
pub(crate) fn subject_alt_names(
    names: &[String],
    origin: &Origin,
    field: &str,
) -> Result<Vec<SpiffeId>, XdsError> {
    let mut ids = Vec::new();
    for (i, name) in names.iter().enumerate() {
        if name.starts_with("spiffe://") {
            ids.push(SpiffeId::parse(name).map_err(|e| origin.error(format!("{field}[{i}]"), e))?);
        }
    }
    Ok(ids)
}

fn convert_policy(p: &Policy, origin: &Origin) -> Result<XdsAuthorization, XdsError> {
    if p.name.is_empty() {
        return Err(origin.error("name", "must not be empty"));
    }
    let mut rules = Vec::with_capacity(p.rules.len());
    for (r, rule) in p.rules.iter().enumerate() {
        let mut clauses = Vec::with_capacity(rule.len());
        for (c, clause) in rule.iter().enumerate() {
            let mut matches = Vec::with_capacity(clause.len());
            for (m, item) in clause.iter().enumerate() {
                let at = format!("rules[{r}][{c}][{m}]");
                matches.push(convert_match(item, origin, &at)?);
            }
            clauses.push(AuthzClause { matches });
        }
        rules.push(AuthzRule { clauses });
    }
    Ok(XdsAuthorization {
        name: p.name.as_str().into(),
        namespace: p.namespace.as_str().into(),
        scope: match p.scope {
            PolicyScope::Global => AuthzScope::Global,
            PolicyScope::Namespace => AuthzScope::Namespace,
            PolicyScope::WorkloadSelector => AuthzScope::WorkloadSelector,
        },
        action: match p.action {
            Action::Allow => AuthzAction::Allow,
            Action::Deny => AuthzAction::Deny,
        },
        dry_run: p.dry_run,
        rules,
    })
}

fn convert_match(m: &Match, origin: &Origin, at: &str) -> Result<AuthzMatch, XdsError> {
    let strings = |list: &[TaggedMatch]| list.iter().map(string_match).collect::<Vec<_>>();
    let accounts = |list: &[SaMatch], name: &str| {
        list.iter()
            .enumerate()
            .map(|(i, sa)| {
                let field = |part: &str| format!("{at}.{name}[{i}].{part}");
                if sa.namespace.is_empty() {
                    return Err(origin.error(field("namespace"), "must not be empty"));
                }
                if sa.service_account.is_empty() {
                    return Err(origin.error(field("serviceAccount"), "must not be empty"));
                }
                Ok(ServiceAccountMatch {
                    namespace: sa.namespace.as_str().into(),
                    service_account: sa.service_account.as_str().into(),
                })
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let nets = |list: &[Cidr]| list.iter().map(|c| c.0).collect::<Vec<_>>();
    Ok(AuthzMatch {
        namespaces: strings(&m.namespaces),
        not_namespaces: strings(&m.not_namespaces),
        service_accounts: accounts(&m.service_accounts, "serviceAccounts")?,
        not_service_accounts: accounts(&m.not_service_accounts, "notServiceAccounts")?,
        principals: strings(&m.principals),
        not_principals: strings(&m.not_principals),
        source_ips: nets(&m.source_ips),
        not_source_ips: nets(&m.not_source_ips),
        destination_ips: nets(&m.destination_ips),
        not_destination_ips: nets(&m.not_destination_ips),
        destination_ports: m.destination_ports.clone(),
        not_destination_ports: m.not_destination_ports.clone(),
    })
}

fn string_match(m: &TaggedMatch) -> StringMatch {
    match m {
        TaggedMatch::Exact(s) => StringMatch::Exact(s.as_str().into()),
        TaggedMatch::Prefix(s) => StringMatch::Prefix(s.as_str().into()),
        TaggedMatch::Suffix(s) => StringMatch::Suffix(s.as_str().into()),
        TaggedMatch::Presence(_) => StringMatch::Presence,
    }
}
