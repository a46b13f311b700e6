//! Istio's security resources as `kubectl get -o yaml` prints them: one document, many documents, or a
//! `kind: List`.
//!
//! Parsing is two steps. Deserialization keeps the shape (unknown fields are ignored, as Kubernetes would
//! keep them) and names the field when a value has the wrong type; validation then refuses values Istio's
//! webhook would refuse (a bad CIDR or port, an unknown action, `selector` together with `targetRefs`),
//! again naming the resource and the field.

mod authz;
mod peer;
mod request_authn;

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::DeserializeOwned;

pub(crate) use authz::parse_ip_block as authz_parse_ip_block;
pub use authz::{
    Action, AuthorizationPolicy, AuthorizationPolicySpec, Condition, ExtensionProvider, Operation, Rule,
    RuleFrom, RuleTo, Source,
};
pub use peer::{MtlsMode, PeerAuthentication, PeerAuthenticationSpec, PeerMtls};
pub use request_authn::{
    ClaimToHeader, JwtHeader, JwtRule, RequestAuthentication, RequestAuthenticationSpec,
};

use crate::error::PolicyError;

/// The API group of every resource here.
pub const SECURITY_GROUP: &str = "security.istio.io";
/// The annotation that makes an AuthorizationPolicy evaluate and report without enforcing.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// The metadata we use from a Kubernetes object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// The object's name.
    #[serde(default)]
    pub name: String,
    /// The object's namespace; `default` when the document leaves it out, as `kubectl apply` would.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Annotations (`istio.io/dry-run` among them).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// When the API server created the object (RFC 3339, e.g. `2024-05-01T12:00:00Z`), as `kubectl get -o
    /// yaml` prints it. Istio breaks ties between PeerAuthentications by age, oldest first.
    #[serde(default)]
    pub creation_timestamp: Option<String>,
}

fn default_namespace() -> String {
    "default".to_owned()
}

impl ObjectMeta {
    /// `namespace/name`, how errors and explanations name a resource.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Selects workloads by labels (`spec.selector`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Every label here must be on the workload with the same value.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    /// Whether a workload with `labels` is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// A reference from a policy to what it attaches to (`spec.targetRefs`): a Service, a waypoint `Gateway`,
/// or the `istio-waypoint` `GatewayClass` (root namespace only).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// API group: `""` (core) for Service, `gateway.networking.k8s.io` for Gateway and GatewayClass.
    #[serde(default)]
    pub group: String,
    /// `Service`, `ServiceEntry`, `Gateway` or `GatewayClass`.
    pub kind: String,
    /// The target's name.
    pub name: String,
    /// Must be the policy's own namespace if set (cross-namespace targets are not allowed).
    #[serde(default)]
    pub namespace: Option<String>,
}

/// One Istio security resource.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Resource {
    /// `AuthorizationPolicy`.
    AuthorizationPolicy(AuthorizationPolicy),
    /// `RequestAuthentication`.
    RequestAuthentication(RequestAuthentication),
    /// `PeerAuthentication`.
    PeerAuthentication(PeerAuthentication),
}

/// What a YAML stream held: the security resources, and how many documents of other kinds were skipped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParsedResources {
    /// The security resources, in document order.
    pub resources: Vec<Resource>,
    /// Documents of other kinds (Services, Pods, ...), which other parsers read.
    pub skipped: usize,
}

impl ParsedResources {
    /// The AuthorizationPolicies.
    pub fn authorization_policies(&self) -> impl Iterator<Item = &AuthorizationPolicy> {
        self.resources.iter().filter_map(|r| match r {
            Resource::AuthorizationPolicy(p) => Some(p),
            _ => None,
        })
    }

    /// The RequestAuthentications.
    pub fn request_authentications(&self) -> impl Iterator<Item = &RequestAuthentication> {
        self.resources.iter().filter_map(|r| match r {
            Resource::RequestAuthentication(p) => Some(p),
            _ => None,
        })
    }

    /// The PeerAuthentications.
    pub fn peer_authentications(&self) -> impl Iterator<Item = &PeerAuthentication> {
        self.resources.iter().filter_map(|r| match r {
            Resource::PeerAuthentication(p) => Some(p),
            _ => None,
        })
    }
}

/// Parses every document of a YAML stream (and the items of any `kind: List`), keeping the Istio security
/// resources and validating each. The first invalid resource fails the whole stream: a policy set is
/// never published half-read.
pub fn parse_resources(yaml: &str) -> Result<ParsedResources, PolicyError> {
    let mut parsed = ParsedResources::default();
    for (document, de) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let value = serde_yaml::Value::deserialize(de).map_err(|e| PolicyError::Yaml {
            document,
            reason: e.to_string(),
        })?;
        collect(value, document, &mut parsed)?;
    }
    Ok(parsed)
}

fn collect(
    value: serde_yaml::Value,
    document: usize,
    parsed: &mut ParsedResources,
) -> Result<(), PolicyError> {
    if value.is_null() {
        return Ok(());
    }
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_default()
        .to_owned();
    match kind.as_str() {
        "List" => {
            let items = match value.get("items") {
                Some(serde_yaml::Value::Sequence(items)) => items.clone(),
                Some(serde_yaml::Value::Null) | None => Vec::new(),
                Some(_) => {
                    return Err(PolicyError::Yaml {
                        document,
                        reason: "`items` of a List must be a sequence".to_owned(),
                    });
                }
            };
            for item in items {
                collect(item, document, parsed)?;
            }
        }
        "AuthorizationPolicy" => {
            let policy: AuthorizationPolicy = typed(value, "AuthorizationPolicy")?;
            policy.validate()?;
            parsed.resources.push(Resource::AuthorizationPolicy(policy));
        }
        "RequestAuthentication" => {
            let policy: RequestAuthentication = typed(value, "RequestAuthentication")?;
            policy.validate()?;
            parsed.resources.push(Resource::RequestAuthentication(policy));
        }
        "PeerAuthentication" => {
            let policy: PeerAuthentication = typed(value, "PeerAuthentication")?;
            policy.validate()?;
            parsed.resources.push(Resource::PeerAuthentication(policy));
        }
        _ => parsed.skipped += 1,
    }
    Ok(())
}

/// Checks the apiVersion, then deserializes, naming the field on a type error.
fn typed<T: DeserializeOwned>(value: serde_yaml::Value, kind: &'static str) -> Result<T, PolicyError> {
    let metadata: ObjectMeta = value
        .get("metadata")
        .cloned()
        .and_then(|m| serde_yaml::from_value(m).ok())
        .unwrap_or_default();
    let api_version = value
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    if !matches!(api_version, "security.istio.io/v1" | "security.istio.io/v1beta1") {
        return Err(PolicyError::ApiVersion {
            kind: kind.to_owned(),
            resource: metadata.key(),
            api_version: api_version.to_owned(),
        });
    }
    serde_path_to_error::deserialize(value).map_err(|e| PolicyError::Invalid {
        kind,
        resource: metadata.key(),
        field: e.path().to_string(),
        reason: e.inner().to_string(),
    })
}

/// Builds [`PolicyError::Invalid`] for a resource.
pub(crate) fn invalid(
    kind: &'static str,
    metadata: &ObjectMeta,
    field: impl Into<String>,
    reason: impl Into<String>,
) -> PolicyError {
    PolicyError::Invalid {
        kind,
        resource: metadata.key(),
        field: field.into(),
        reason: reason.into(),
    }
}

/// Where a policy attaches: a `selector` (workloads by label) or `targetRefs` (and the deprecated single
/// `targetRef`). AuthorizationPolicy and RequestAuthentication share it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    /// Workloads (by label) the policy applies to; enforced where those workloads receive traffic.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// The deprecated single form of `targetRefs`.
    #[serde(default)]
    pub target_ref: Option<TargetRef>,
    /// What the policy attaches to (a Service, a waypoint Gateway, the istio-waypoint GatewayClass).
    #[serde(default)]
    pub target_refs: Vec<TargetRef>,
}

impl Attachment {
    /// `targetRefs` plus the deprecated `targetRef`.
    pub fn target_refs(&self) -> impl Iterator<Item = &TargetRef> {
        self.target_ref.iter().chain(self.target_refs.iter())
    }

    /// Istio refuses `selector` together with `targetRef`/`targetRefs`, unknown target kinds and
    /// cross-namespace targets.
    pub(crate) fn validate(&self, kind: &'static str, metadata: &ObjectMeta) -> Result<(), PolicyError> {
        if self.selector.is_some() && self.target_refs().next().is_some() {
            return Err(invalid(
                kind,
                metadata,
                "spec.selector",
                "only one of selector or targetRefs may be set",
            ));
        }
        for (i, target) in self.target_refs().enumerate() {
            let field = format!("spec.targetRefs[{i}]");
            let known = matches!(
                (target.group.as_str(), target.kind.as_str()),
                ("" | "core", "Service")
                    | ("networking.istio.io", "ServiceEntry")
                    | ("gateway.networking.k8s.io", "Gateway" | "GatewayClass")
            );
            if !known {
                return Err(invalid(
                    kind,
                    metadata,
                    field,
                    format!("unsupported target {}/{}", target.group, target.kind),
                ));
            }
            if target.name.is_empty() {
                return Err(invalid(
                    kind,
                    metadata,
                    format!("{field}.name"),
                    "must not be empty",
                ));
            }
            if target
                .namespace
                .as_deref()
                .is_some_and(|ns| ns != metadata.namespace)
            {
                return Err(invalid(
                    kind,
                    metadata,
                    format!("{field}.namespace"),
                    "cross-namespace targets are not allowed",
                ));
            }
        }
        Ok(())
    }
}

/// Parses a port as Istio writes it (a number, or a string holding one) in 1..=65535.
pub(crate) fn parse_port(text: &str) -> Result<u16, String> {
    text.trim()
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{text:?} is not a port (1-65535)"))
}

/// Values Istio accepts as either a YAML number or string (ports).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(untagged)]
pub(crate) enum NumberOrString {
    Number(i64),
    String(String),
}

impl NumberOrString {
    pub(crate) fn as_text(&self) -> String {
        match self {
            NumberOrString::Number(n) => n.to_string(),
            NumberOrString::String(s) => s.clone(),
        }
    }
}
