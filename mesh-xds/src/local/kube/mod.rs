//! Kubernetes objects as `kubectl get -o yaml` prints them: the fields the conversion reads (everything
//! else, `status` details and `managedFields` included, is ignored), which kinds are read, and the
//! conversion of the whole set.

mod policy;
mod workloads;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use mesh_policy::resource::{AuthorizationPolicy, PeerAuthentication};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_yaml::Value;

use super::{LocalOptions, Located, Origin, SourceLocation};
use crate::XdsError;

/// Kinds that are accepted and ignored, as `(API group, kind)` (the core group is `""`): they commonly sit
/// next to Pods and Services in a manifest, and nothing in them is sent to ztunnel. Any other kind the
/// loader does not convert is an error.
pub const IGNORED_KINDS: &[(&str, &str)] = &[
    ("", "ConfigMap"),
    ("", "Secret"),
    ("", "ServiceAccount"),
    ("", "Endpoints"),
    ("", "Event"),
    ("discovery.k8s.io", "EndpointSlice"),
    ("events.k8s.io", "Event"),
    ("apps", "Deployment"),
    ("apps", "ReplicaSet"),
    ("apps", "StatefulSet"),
    ("apps", "DaemonSet"),
    ("batch", "Job"),
    ("batch", "CronJob"),
    // Enforced by waypoints, which get it from istiod's own xDS, never from ztunnel's resources.
    ("security.istio.io", "RequestAuthentication"),
    ("gateway.networking.k8s.io", "GatewayClass"),
];

/// The kinds the loader reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Pod,
    Service,
    Namespace,
    Node,
    ServiceEntry,
    Gateway,
    AuthorizationPolicy,
    PeerAuthentication,
    Ignored,
}

/// A document's kinds: one object, or a `List`'s items in order.
#[derive(Debug)]
pub(crate) enum Plan {
    Single(Kind),
    List(Vec<Kind>),
}

/// Decides how to read a document from its untyped form: its `kind` (and each `List` item's), checked
/// against its `apiVersion`.
pub(crate) fn plan(value: &Value, location: &SourceLocation) -> Result<Plan, XdsError> {
    let text = |value: &Value, key: &str| {
        value
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let kind = text(value, "kind");
    if kind == "List" {
        let items = match value.get("items") {
            None | Some(Value::Null) => return Ok(Plan::List(Vec::new())),
            Some(Value::Sequence(items)) => items,
            Some(_) => return Err(error(location, "items", "must be a sequence")),
        };
        let kinds = items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let kind = text(item, "kind");
                if kind.is_empty() || kind == "List" {
                    return Err(error(
                        location,
                        &format!("items[{i}].kind"),
                        "must name the object's kind (and not be List)",
                    ));
                }
                classify(
                    &kind,
                    &text(item, "apiVersion"),
                    location,
                    &format!("items[{i}]."),
                )
            })
            .collect::<Result<_, _>>()?;
        return Ok(Plan::List(kinds));
    }
    if kind.is_empty() {
        return Err(error(
            location,
            "kind",
            "must be a string naming the object's kind",
        ));
    }
    classify(&kind, &text(value, "apiVersion"), location, "").map(Plan::Single)
}

fn error(location: &SourceLocation, field: &str, reason: &str) -> XdsError {
    XdsError::LocalConfig {
        location: location.clone(),
        field: field.to_owned(),
        reason: reason.to_owned(),
    }
}

fn classify(
    kind: &str,
    api_version: &str,
    location: &SourceLocation,
    prefix: &str,
) -> Result<Kind, XdsError> {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let (known, versions): (Kind, &[&str]) = match (group, kind) {
        ("", "Pod") => (Kind::Pod, &["v1"]),
        ("", "Service") => (Kind::Service, &["v1"]),
        ("", "Namespace") => (Kind::Namespace, &["v1"]),
        ("", "Node") => (Kind::Node, &["v1"]),
        ("networking.istio.io", "ServiceEntry") => (Kind::ServiceEntry, &["v1", "v1beta1", "v1alpha3"]),
        ("gateway.networking.k8s.io", "Gateway") => (Kind::Gateway, &["v1", "v1beta1"]),
        ("security.istio.io", "AuthorizationPolicy") => (Kind::AuthorizationPolicy, &["v1", "v1beta1"]),
        ("security.istio.io", "PeerAuthentication") => (Kind::PeerAuthentication, &["v1", "v1beta1"]),
        _ if IGNORED_KINDS.contains(&(group, kind)) => return Ok(Kind::Ignored),
        _ => {
            return Err(XdsError::LocalUnsupportedKind {
                location: location.clone(),
                kind: crate::error::truncate_for_log(kind),
                api_version: crate::error::truncate_for_log(api_version),
            });
        }
    };
    if !versions.contains(&version) {
        return Err(error(
            location,
            &format!("{prefix}apiVersion"),
            &format!(
                "{kind} is read in versions {} of {:?}, not {:?}",
                versions.join(", "),
                group,
                crate::error::truncate_for_log(api_version)
            ),
        ));
    }
    Ok(known)
}

/// One object, typed.
#[derive(Debug)]
pub(crate) enum Object {
    Pod(Pod),
    Service(KubeService),
    Namespace(Named),
    Node(Named),
    ServiceEntry(ServiceEntry),
    Gateway(Gateway),
    AuthorizationPolicy(Box<AuthorizationPolicy>),
    PeerAuthentication(Box<PeerAuthentication>),
    Ignored,
}

/// Every object read so far, by kind, each with where it was written.
#[derive(Debug, Default)]
pub(crate) struct Objects {
    pods: Vec<(Origin, Pod)>,
    services: Vec<(Origin, KubeService)>,
    namespaces: Vec<(Origin, Named)>,
    nodes: Vec<(Origin, Named)>,
    service_entries: Vec<(Origin, ServiceEntry)>,
    gateways: Vec<(Origin, Gateway)>,
    authorization_policies: Vec<(Origin, AuthorizationPolicy)>,
    peer_authentications: Vec<(Origin, PeerAuthentication)>,
}

impl Objects {
    /// Adds the objects of one document (`path` is `items[i]` for a List's items, else empty).
    pub(crate) fn extend(&mut self, origin: &Origin, objects: Vec<(String, Object)>) {
        for (path, object) in objects {
            let origin = if path.is_empty() {
                origin.clone()
            } else {
                origin.child(path)
            };
            match object {
                Object::Pod(o) => self.pods.push((origin, o)),
                Object::Service(o) => self.services.push((origin, o)),
                Object::Namespace(o) => self.namespaces.push((origin, o)),
                Object::Node(o) => self.nodes.push((origin, o)),
                Object::ServiceEntry(o) => self.service_entries.push((origin, o)),
                Object::Gateway(o) => self.gateways.push((origin, o)),
                Object::AuthorizationPolicy(o) => self.authorization_policies.push((origin, *o)),
                Object::PeerAuthentication(o) => self.peer_authentications.push((origin, *o)),
                Object::Ignored => {}
            }
        }
    }
}

/// Converts every object: services first (workloads need them), then policies (workloads list the ones
/// selecting them), then workloads.
pub(crate) fn convert(objects: &Objects, options: &LocalOptions, out: &mut Located) -> Result<(), XdsError> {
    let policies = policy::convert(objects, options)?;
    let context = workloads::Context::new(objects, options, &policies)?;
    context.convert(out)?;
    out.policies.extend(policies.into_located());
    Ok(())
}

/// Reads one document with its plan: the object, or a `List`'s items, each with its path.
pub(crate) struct DocumentSeed<'a>(pub(crate) &'a Plan);

impl<'de> DeserializeSeed<'de> for DocumentSeed<'_> {
    type Value = Vec<(String, Object)>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        match self.0 {
            Plan::Single(kind) => Ok(vec![(
                String::new(),
                ObjectSeed(*kind).deserialize(deserializer)?,
            )]),
            Plan::List(kinds) => deserializer.deserialize_map(ListVisitor(kinds)),
        }
    }
}

struct ListVisitor<'a>(&'a [Kind]);

impl<'de> Visitor<'de> for ListVisitor<'_> {
    type Value = Vec<(String, Object)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a List")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut objects = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if key == "items" {
                objects = map.next_value_seed(ItemsSeed(self.0))?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(objects)
    }
}

struct ItemsSeed<'a>(&'a [Kind]);

impl<'de> DeserializeSeed<'de> for ItemsSeed<'_> {
    type Value = Vec<(String, Object)>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ItemsSeed<'_> {
    type Value = Vec<(String, Object)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sequence of Kubernetes objects")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut objects = Vec::with_capacity(self.0.len());
        for (i, kind) in self.0.iter().enumerate() {
            match seq.next_element_seed(ObjectSeed(*kind))? {
                Some(object) => objects.push((format!("items[{i}]"), object)),
                None => return Err(de::Error::invalid_length(i, &self)),
            }
        }
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(objects)
    }
}

struct ObjectSeed(Kind);

impl<'de> DeserializeSeed<'de> for ObjectSeed {
    type Value = Object;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        Ok(match self.0 {
            Kind::Pod => Object::Pod(Pod::deserialize(d)?),
            Kind::Service => Object::Service(KubeService::deserialize(d)?),
            Kind::Namespace => Object::Namespace(Named::deserialize(d)?),
            Kind::Node => Object::Node(Named::deserialize(d)?),
            Kind::ServiceEntry => Object::ServiceEntry(ServiceEntry::deserialize(d)?),
            Kind::Gateway => Object::Gateway(Gateway::deserialize(d)?),
            Kind::AuthorizationPolicy => {
                Object::AuthorizationPolicy(Box::new(AuthorizationPolicy::deserialize(d)?))
            }
            Kind::PeerAuthentication => {
                Object::PeerAuthentication(Box::new(PeerAuthentication::deserialize(d)?))
            }
            Kind::Ignored => {
                IgnoredAny::deserialize(d)?;
                Object::Ignored
            }
        })
    }
}

/// `metadata`: what the conversion reads of it.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Meta {
    #[serde(default)]
    pub(crate) name: String,
    /// `default` when left out, as `kubectl apply` would.
    #[serde(default = "default_namespace")]
    pub(crate) namespace: String,
    #[serde(default)]
    pub(crate) labels: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) generate_name: String,
    #[serde(default)]
    pub(crate) owner_references: Vec<OwnerReference>,
}

fn default_namespace() -> String {
    "default".to_owned()
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct OwnerReference {
    #[serde(default)]
    pub(crate) kind: String,
    #[serde(default)]
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) controller: bool,
}

/// An object read for its metadata only (Namespace, Node).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Named {
    #[serde(default)]
    pub(crate) metadata: Meta,
}

/// A `v1` Pod.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Pod {
    #[serde(default)]
    pub(crate) metadata: Meta,
    #[serde(default)]
    pub(crate) spec: PodSpec,
    #[serde(default)]
    pub(crate) status: PodStatus,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PodSpec {
    #[serde(default)]
    pub(crate) service_account_name: String,
    /// The deprecated spelling, still printed by some tools.
    #[serde(default)]
    pub(crate) service_account: String,
    #[serde(default)]
    pub(crate) node_name: String,
    #[serde(default)]
    pub(crate) host_network: bool,
    #[serde(default)]
    pub(crate) containers: Vec<Container>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Container {
    #[serde(default)]
    pub(crate) ports: Vec<ContainerPort>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ContainerPort {
    #[serde(default)]
    pub(crate) name: String,
    pub(crate) container_port: u16,
    /// `TCP` when left out, as Kubernetes defaults it.
    #[serde(default)]
    pub(crate) protocol: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct PodStatus {
    #[serde(default)]
    pub(crate) phase: String,
    #[serde(default, rename = "podIP")]
    pub(crate) pod_ip: Option<IpAddr>,
    #[serde(default, rename = "podIPs")]
    pub(crate) pod_ips: Vec<PodIp>,
    #[serde(default)]
    pub(crate) conditions: Vec<PodCondition>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct PodIp {
    pub(crate) ip: IpAddr,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct PodCondition {
    #[serde(default, rename = "type")]
    pub(crate) kind: String,
    #[serde(default)]
    pub(crate) status: String,
}

/// A `v1` Service.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct KubeService {
    #[serde(default)]
    pub(crate) metadata: Meta,
    #[serde(default)]
    pub(crate) spec: ServiceSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ServiceSpec {
    #[serde(default)]
    pub(crate) selector: BTreeMap<String, String>,
    #[serde(default, rename = "clusterIP")]
    pub(crate) cluster_ip: Option<ClusterIp>,
    #[serde(default, rename = "clusterIPs")]
    pub(crate) cluster_ips: Vec<ClusterIp>,
    #[serde(default)]
    pub(crate) ports: Vec<KubeServicePort>,
    #[serde(default)]
    pub(crate) traffic_distribution: Option<String>,
    #[serde(default)]
    pub(crate) internal_traffic_policy: Option<String>,
}

/// A `clusterIP(s)` entry: an address, or `None` (headless) / empty (not allocated).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClusterIp(pub(crate) Option<IpAddr>);

impl<'de> Deserialize<'de> for ClusterIp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.as_str() {
            "None" | "" => Ok(ClusterIp(None)),
            ip => ip
                .parse()
                .map(|ip| ClusterIp(Some(ip)))
                .map_err(|_| de::Error::custom(format!("{ip:?} is not an IP address or None"))),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct KubeServicePort {
    #[serde(default)]
    pub(crate) name: String,
    pub(crate) port: u16,
    /// The port itself when left out, as the API server defaults it.
    #[serde(default)]
    pub(crate) target_port: Option<IntOrString>,
}

/// Kubernetes' `IntOrString`, for a target port: a number, or a container port's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum IntOrString {
    Int(u16),
    String(String),
}

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PortVisitor;
        impl Visitor<'_> for PortVisitor {
            type Value = IntOrString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or a port name")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IntOrString, E> {
                u16::try_from(v)
                    .map(IntOrString::Int)
                    .map_err(|_| E::custom(format!("{v} is not a port number (0-65535)")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntOrString, E> {
                u16::try_from(v)
                    .map(IntOrString::Int)
                    .map_err(|_| E::custom(format!("{v} is not a port number (0-65535)")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IntOrString, E> {
                Ok(IntOrString::String(v.to_owned()))
            }
        }
        deserializer.deserialize_any(PortVisitor)
    }
}

/// A `networking.istio.io` ServiceEntry.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ServiceEntry {
    #[serde(default)]
    pub(crate) metadata: Meta,
    #[serde(default)]
    pub(crate) spec: ServiceEntrySpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ServiceEntrySpec {
    #[serde(default)]
    pub(crate) hosts: Vec<String>,
    #[serde(default)]
    pub(crate) addresses: Vec<String>,
    #[serde(default)]
    pub(crate) ports: Vec<ServiceEntryPort>,
    #[serde(default)]
    pub(crate) resolution: String,
    #[serde(default)]
    pub(crate) endpoints: Vec<WorkloadEntry>,
    #[serde(default)]
    pub(crate) subject_alt_names: Vec<String>,
    #[serde(default)]
    pub(crate) workload_selector: Option<ServiceEntrySelector>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ServiceEntryPort {
    pub(crate) number: u16,
    #[serde(default)]
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) target_port: Option<u16>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct ServiceEntrySelector {
    #[serde(default)]
    pub(crate) labels: BTreeMap<String, String>,
}

/// An inline endpoint of a ServiceEntry (Istio's `WorkloadEntry` spec).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WorkloadEntry {
    #[serde(default)]
    pub(crate) address: String,
    #[serde(default)]
    pub(crate) ports: BTreeMap<String, u16>,
    #[serde(default)]
    pub(crate) labels: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) network: String,
    #[serde(default)]
    pub(crate) locality: String,
    #[serde(default)]
    pub(crate) service_account: String,
}

/// A `gateway.networking.k8s.io` Gateway: read for a waypoint's `istio.io/waypoint-for` label.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Gateway {
    #[serde(default)]
    pub(crate) metadata: Meta,
}
