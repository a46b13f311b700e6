//! `/config_dump`: what the proxy currently believes, as JSON (`workloads`, `services`, `policies`,
//! `certificates`, `version`), with ztunnel's camelCase field names where it has the same fields.
//!
//! The JSON is built by hand from the model's public fields rather than by deriving `Serialize` across
//! `mesh-core` and `mesh-policy`: the dump is an operations view, its shape is ours to choose here, and
//! a derive would make every model field (and any future secret) serialisable by default. Certificates are
//! described by identity, validity and chain length only: never key material, not even public PEMs.

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use mesh_core::model::{
    ApplicationTunnelProtocol, GatewayAddress, GatewayDestination, HealthStatus, MeshSnapshot, NetworkMode,
    PortMap, Service, TunnelProtocol, Workload,
};
use mesh_core::{CertWatch, WorkloadCert};
use mesh_policy::l4::{L4Match, L4Scope, ServiceAccountMatch, StringMatch};
use mesh_policy::{L4Policy, L4PolicySet};
use serde_json::{Map, Value, json};

use crate::state::ProxyState;

/// Where `/config_dump` gets its document. The binary may implement it to add its own sections; most use
/// [`StateDump`].
pub trait ConfigDumpSource: Send + Sync + fmt::Debug {
    /// The current configuration as a JSON object. It must not contain private keys or tokens.
    fn config_dump(&self) -> Value;
}

type CertList = dyn Fn() -> Vec<Arc<WorkloadCert>> + Send + Sync;

/// A [`ConfigDumpSource`] over the proxy's [`ProxyState`] and the certificates it holds.
#[derive(Clone)]
pub struct StateDump {
    state: ProxyState,
    certificates: Arc<CertList>,
    version: String,
}

impl fmt::Debug for StateDump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateDump")
            .field("state", &self.state)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl StateDump {
    /// Dumps `state`, with no certificates and this crate's version.
    pub fn new(state: ProxyState) -> Self {
        StateDump {
            state,
            certificates: Arc::new(Vec::new),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }

    /// Reports `version` (e.g. the binary's build information).
    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Lists the certificates `certificates` returns at each dump (e.g. from the binary's certificate
    /// cache, which changes as identities come and go).
    pub fn with_certificates(
        mut self,
        certificates: impl Fn() -> Vec<Arc<WorkloadCert>> + Send + Sync + 'static,
    ) -> Self {
        self.certificates = Arc::new(certificates);
        self
    }

    /// Lists the current certificate of each of these watches (they rotate; the dump shows the latest).
    pub fn with_cert_watches(self, watches: Vec<CertWatch>) -> Self {
        self.with_certificates(move || watches.iter().map(CertWatch::current).collect())
    }
}

impl ConfigDumpSource for StateDump {
    fn config_dump(&self) -> Value {
        let snapshot = self.state.snapshot();
        let policies = self.state.policy_set();
        let mut certificates: Vec<_> = (self.certificates)();
        certificates.sort_by(|a, b| a.identity().as_str().cmp(b.identity().as_str()));
        json!({
            "workloads": workloads_json(&snapshot),
            "services": services_json(&snapshot),
            "policies": policies_json(&policies),
            "certificates": certificates.iter().map(|c| certificate_json(c)).collect::<Vec<_>>(),
            "snapshotVersion": snapshot.version(),
            "version": self.version,
        })
    }
}

fn opt_str(value: &str) -> Value {
    if value.is_empty() {
        Value::Null
    } else {
        json!(value)
    }
}

fn port_map_json(ports: &PortMap) -> Value {
    Value::Object(
        ports
            .iter()
            .map(|(from, to)| (from.to_string(), json!(to)))
            .collect(),
    )
}

fn gateway_json(gateway: Option<&GatewayAddress>) -> Value {
    let Some(gateway) = gateway else {
        return Value::Null;
    };
    let destination = match &gateway.destination {
        GatewayDestination::Address(address) => json!({ "address": address.to_string() }),
        GatewayDestination::Hostname(service) => json!({ "hostname": service.to_string() }),
    };
    json!({ "destination": destination, "hboneMtlsPort": gateway.hbone_mtls_port })
}

fn status_json(status: HealthStatus) -> &'static str {
    match status {
        HealthStatus::Healthy => "Healthy",
        HealthStatus::Unhealthy => "Unhealthy",
    }
}

/// Every workload, sorted by UID.
pub fn workloads_json(snapshot: &MeshSnapshot) -> Value {
    let mut workloads: Vec<_> = snapshot.workloads().collect();
    workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
    Value::Array(workloads.into_iter().map(|w| workload_json(w)).collect())
}

/// One workload.
pub fn workload_json(w: &Workload) -> Value {
    let services: Map<String, Value> = w
        .services
        .iter()
        .map(|(service, ports)| (service.to_string(), port_map_json(ports)))
        .collect();
    json!({
        "uid": &*w.uid,
        "name": &*w.name,
        "namespace": &*w.namespace,
        "serviceAccount": &*w.service_account,
        "trustDomain": w.trust_domain.to_string(),
        "workloadIps": w.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "network": &*w.network,
        "node": opt_str(&w.node),
        "hostname": opt_str(&w.hostname),
        "protocol": match w.protocol {
            TunnelProtocol::Hbone => "HBONE",
            TunnelProtocol::None => "TCP",
        },
        "waypoint": gateway_json(w.waypoint.as_ref()),
        "networkGateway": gateway_json(w.network_gateway.as_ref()),
        "canonicalName": opt_str(&w.canonical_name),
        "canonicalRevision": opt_str(&w.canonical_revision),
        "workloadType": opt_str(&w.workload_type),
        "workloadName": opt_str(&w.workload_name),
        "clusterId": opt_str(&w.cluster_id),
        "locality": w.locality.as_ref().map(|l| json!({
            "region": &*l.region,
            "zone": &*l.zone,
            "subzone": &*l.subzone,
        })),
        "status": status_json(w.status),
        "services": services,
        "authorizationPolicies": w.authorization_policies.iter().map(|p| &**p).collect::<Vec<_>>(),
        "applicationTunnel": w.application_tunnel.map(|t| json!({
            "protocol": match t.protocol {
                ApplicationTunnelProtocol::None => "NONE",
                ApplicationTunnelProtocol::Proxy => "PROXY",
            },
            "port": t.port,
        })),
        "networkMode": match w.network_mode {
            NetworkMode::Standard => "Standard",
            NetworkMode::HostNetwork => "HostNetwork",
        },
    })
}

/// Every service with its endpoints, sorted by `namespace/hostname`.
pub fn services_json(snapshot: &MeshSnapshot) -> Value {
    let mut services: Vec<_> = snapshot.services().collect();
    services.sort_by_key(|s| s.key());
    Value::Array(services.into_iter().map(|s| service_json(snapshot, s)).collect())
}

/// One service, with the endpoints `snapshot` has for it.
pub fn service_json(snapshot: &MeshSnapshot, s: &Service) -> Value {
    let endpoints: Vec<_> = snapshot
        .endpoints_of(s)
        .iter()
        .map(|e| {
            json!({
                "workloadUid": &*e.workload_uid,
                "port": port_map_json(&e.port_map),
                "status": status_json(e.status),
            })
        })
        .collect();
    json!({
        "name": &*s.name,
        "namespace": &*s.namespace,
        "hostname": &*s.hostname,
        "vips": s.vips.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "ports": Value::Object(s.ports.iter().map(|p| (p.port.to_string(), json!(p.target_port))).collect()),
        "subjectAltNames": s.subject_alt_names.iter().map(|id| id.as_str()).collect::<Vec<_>>(),
        "waypoint": gateway_json(s.waypoint.as_ref()),
        "endpoints": endpoints,
    })
}

/// Every L4 authorization policy, sorted by `namespace/name`.
pub fn policies_json(policies: &L4PolicySet) -> Value {
    let mut all: Vec<_> = policies.iter().collect();
    all.sort_by_key(|p| p.key());
    Value::Array(all.into_iter().map(|p| policy_json(p)).collect())
}

fn string_matches(matches: &[StringMatch]) -> Value {
    Value::Array(
        matches
            .iter()
            .map(|m| match m {
                StringMatch::Exact(v) => json!({ "exact": &**v }),
                StringMatch::Prefix(v) => json!({ "prefix": &**v }),
                StringMatch::Suffix(v) => json!({ "suffix": &**v }),
                StringMatch::Presence => json!({ "presence": {} }),
            })
            .collect(),
    )
}

fn service_accounts(matches: &[ServiceAccountMatch]) -> Value {
    Value::Array(
        matches
            .iter()
            .map(|m| json!({ "namespace": &*m.namespace, "serviceAccount": &*m.service_account }))
            .collect(),
    )
}

/// Only the conditions a match sets, so a dump reads like the policy that produced it.
fn match_json(m: &L4Match) -> Value {
    let mut out = Map::new();
    let ips = |nets: &[_]| -> Value { json!(nets.iter().map(ToString::to_string).collect::<Vec<String>>()) };
    let ports = |ports: &[u16]| json!(ports);
    put_set(&mut out, "namespaces", &m.namespaces, string_matches);
    put_set(&mut out, "notNamespaces", &m.not_namespaces, string_matches);
    put_set(&mut out, "serviceAccounts", &m.service_accounts, service_accounts);
    put_set(
        &mut out,
        "notServiceAccounts",
        &m.not_service_accounts,
        service_accounts,
    );
    put_set(&mut out, "principals", &m.principals, string_matches);
    put_set(&mut out, "notPrincipals", &m.not_principals, string_matches);
    put_set(&mut out, "sourceIps", &m.source_ips, ips);
    put_set(&mut out, "notSourceIps", &m.not_source_ips, ips);
    put_set(&mut out, "destinationIps", &m.destination_ips, ips);
    put_set(&mut out, "notDestinationIps", &m.not_destination_ips, ips);
    put_set(&mut out, "destinationPorts", &m.destination_ports, ports);
    put_set(&mut out, "notDestinationPorts", &m.not_destination_ports, ports);
    Value::Object(out)
}

/// Adds `key` with `items` encoded, unless there are none.
fn put_set<T>(out: &mut Map<String, Value>, key: &str, items: &[T], encode: impl FnOnce(&[T]) -> Value) {
    if !items.is_empty() {
        out.insert(key.to_owned(), encode(items));
    }
}

/// One policy.
pub fn policy_json(p: &L4Policy) -> Value {
    let rules: Vec<_> = p
        .rules
        .iter()
        .map(|rule| {
            let clauses: Vec<_> = rule
                .clauses
                .iter()
                .map(|clause| json!({ "matches": clause.matches.iter().map(match_json).collect::<Vec<_>>() }))
                .collect();
            json!({ "clauses": clauses })
        })
        .collect();
    json!({
        "name": &*p.name,
        "namespace": &*p.namespace,
        "scope": match p.scope {
            L4Scope::Global => "Global",
            L4Scope::Namespace => "Namespace",
            L4Scope::WorkloadSelector => "WorkloadSelector",
        },
        "action": p.action.as_str(),
        "dryRun": p.dry_run,
        "rules": rules,
    })
}

/// RFC 3339 in UTC (as ztunnel prints certificate times), or seconds since the epoch if out of range.
fn timestamp(t: SystemTime) -> Value {
    // Through a checked conversion: `OffsetDateTime::from(SystemTime)` panics outside its range.
    let seconds = match t.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_secs()).map_or(i64::MIN, |s| -s),
    };
    time::OffsetDateTime::from_unix_timestamp(seconds)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .map_or_else(|| json!(seconds), Value::String)
}

/// What is safe to show of a certificate: identity, validity and chain length (the key never appears).
pub fn certificate_json(cert: &WorkloadCert) -> Value {
    json!({
        "identity": cert.identity().as_str(),
        "state": "Available",
        "notBefore": timestamp(cert.not_before()),
        "notAfter": timestamp(cert.not_after()),
        "chainLength": cert.chain().len(),
        "rootCount": cert.roots().len(),
    })
}
