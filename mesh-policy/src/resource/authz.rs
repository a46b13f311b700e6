//! `AuthorizationPolicy` (security.istio.io/v1), field for field.

use serde::Deserialize;

use super::{Attachment, NumberOrString, ObjectMeta, TargetRef, invalid, parse_port};
use crate::error::PolicyError;

const KIND: &str = "AuthorizationPolicy";

/// An Istio AuthorizationPolicy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    /// Name, namespace, annotations.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The policy.
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
}

/// `spec` of an AuthorizationPolicy.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// `selector` or `targetRefs`.
    #[serde(flatten)]
    pub attachment: Attachment,
    /// `ALLOW` (the default), `DENY`, `AUDIT` or `CUSTOM`, as written.
    #[serde(default)]
    pub action: Option<String>,
    /// The external authorizer of a CUSTOM policy.
    #[serde(default)]
    pub provider: Option<ExtensionProvider>,
    /// The rules; a request matches the policy if it matches any rule.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// `spec.provider` of a CUSTOM policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ExtensionProvider {
    /// The extension provider's name in the mesh config.
    #[serde(default)]
    pub name: String,
}

/// The policy action, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Allow matching requests; once any ALLOW policy applies, everything else is denied.
    Allow,
    /// Deny matching requests.
    Deny,
    /// Mark matching requests for auditing; does not change the decision.
    Audit,
    /// Ask an external authorizer about matching requests.
    Custom,
}

impl Action {
    /// The name as Istio writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
            Action::Custom => "CUSTOM",
        }
    }
}

/// One rule: it matches when every present section matches (`from` any source, `to` any operation, and every
/// `when` condition). A rule with no sections (`{}`) matches everything.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// Sources; any one may match.
    #[serde(default)]
    pub from: Vec<RuleFrom>,
    /// Operations; any one may match.
    #[serde(default)]
    pub to: Vec<RuleTo>,
    /// Conditions; all must match.
    #[serde(default)]
    pub when: Vec<Condition>,
}

/// One entry of `from`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct RuleFrom {
    /// The source.
    #[serde(default)]
    pub source: Source,
}

/// One entry of `to`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct RuleTo {
    /// The operation.
    #[serde(default)]
    pub operation: Operation,
}

/// Who sends the request. Fields are ANDed; the values of one field are ORed; `not*` fields must match none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// Peer identities as `<trust domain>/ns/<ns>/sa/<sa>` (L4).
    #[serde(default)]
    pub principals: Vec<String>,
    /// Peer identities that must not match (L4).
    #[serde(default)]
    pub not_principals: Vec<String>,
    /// JWT principals `<iss>/<sub>` (L7).
    #[serde(default)]
    pub request_principals: Vec<String>,
    /// JWT principals that must not match (L7).
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    /// The peer's namespace (L4).
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Namespaces that must not match (L4).
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// The peer's service account as `<ns>/<sa>` (L4).
    #[serde(default)]
    pub service_accounts: Vec<String>,
    /// Service accounts that must not match (L4).
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    /// The peer's IP, as addresses or CIDRs (L4).
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    /// IPs that must not match (L4).
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    /// The original client IP from `X-Forwarded-For` (L7).
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    /// Original client IPs that must not match (L7).
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

/// What the request does. Fields are ANDed; values ORed; `not*` must match none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// The `Host`/`:authority` (L7).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Hosts that must not match (L7).
    #[serde(default)]
    pub not_hosts: Vec<String>,
    /// Destination ports (L4), numbers or strings.
    #[serde(default)]
    pub(crate) ports: Vec<NumberOrString>,
    /// Destination ports that must not match (L4).
    #[serde(default)]
    pub(crate) not_ports: Vec<NumberOrString>,
    /// HTTP methods, matched exactly and case-sensitively (L7).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Methods that must not match (L7).
    #[serde(default)]
    pub not_methods: Vec<String>,
    /// Normalized request paths (L7).
    #[serde(default)]
    pub paths: Vec<String>,
    /// Paths that must not match (L7).
    #[serde(default)]
    pub not_paths: Vec<String>,
}

impl Operation {
    /// `ports` as written.
    pub fn port_texts(&self) -> impl Iterator<Item = String> + '_ {
        self.ports.iter().map(NumberOrString::as_text)
    }

    /// `notPorts` as written.
    pub fn not_port_texts(&self) -> impl Iterator<Item = String> + '_ {
        self.not_ports.iter().map(NumberOrString::as_text)
    }
}

/// A `when` condition: `key` must match one of `values` (if any) and none of `notValues`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The attribute, e.g. `request.headers[x-token]` or `source.ip`.
    pub key: String,
    /// Accepted values.
    #[serde(default)]
    pub values: Vec<String>,
    /// Refused values.
    #[serde(default)]
    pub not_values: Vec<String>,
}

impl AuthorizationPolicy {
    /// The validated action (ALLOW when unset).
    pub fn action(&self) -> Result<Action, PolicyError> {
        match self.spec.action.as_deref() {
            None | Some("ALLOW") => Ok(Action::Allow),
            Some("DENY") => Ok(Action::Deny),
            Some("AUDIT") => Ok(Action::Audit),
            Some("CUSTOM") => Ok(Action::Custom),
            Some(other) => Err(invalid(
                KIND,
                &self.metadata,
                "spec.action",
                format!("unknown action {other:?} (ALLOW, DENY, AUDIT or CUSTOM)"),
            )),
        }
    }

    /// Whether the `istio.io/dry-run` annotation asks for evaluation without enforcement.
    pub fn dry_run(&self) -> bool {
        self.metadata
            .annotations
            .get(super::DRY_RUN_ANNOTATION)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }

    /// `targetRefs` plus the deprecated `targetRef`.
    pub fn target_refs(&self) -> impl Iterator<Item = &TargetRef> {
        self.spec.attachment.target_refs()
    }

    /// Refuses what Istio's validation refuses, naming the field.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let meta = &self.metadata;
        if meta.name.is_empty() {
            return Err(invalid(KIND, meta, "metadata.name", "must not be empty"));
        }
        self.spec.attachment.validate(KIND, meta)?;
        let action = self.action()?;
        if action == Action::Custom && self.spec.provider.as_ref().is_none_or(|p| p.name.is_empty()) {
            return Err(invalid(
                KIND,
                meta,
                "spec.provider.name",
                "a CUSTOM policy needs a provider",
            ));
        }
        if action != Action::Custom && self.spec.provider.is_some() {
            return Err(invalid(
                KIND,
                meta,
                "spec.provider",
                "only a CUSTOM policy may name a provider",
            ));
        }
        for (r, rule) in self.spec.rules.iter().enumerate() {
            for (f, from) in rule.from.iter().enumerate() {
                let s = &from.source;
                let field = |name: &str, i: usize| format!("spec.rules[{r}].from[{f}].source.{name}[{i}]");
                for (name, list) in [
                    ("ipBlocks", &s.ip_blocks),
                    ("notIpBlocks", &s.not_ip_blocks),
                    ("remoteIpBlocks", &s.remote_ip_blocks),
                    ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
                ] {
                    for (i, block) in list.iter().enumerate() {
                        parse_ip_block(block)
                            .map_err(|reason| invalid(KIND, meta, field(name, i), reason))?;
                    }
                }
                for (name, list) in [
                    ("serviceAccounts", &s.service_accounts),
                    ("notServiceAccounts", &s.not_service_accounts),
                ] {
                    for (i, sa) in list.iter().enumerate() {
                        if sa.split('/').count() != 2 || sa.split('/').any(str::is_empty) {
                            return Err(invalid(
                                KIND,
                                meta,
                                field(name, i),
                                format!("{sa:?} is not <namespace>/<service account>"),
                            ));
                        }
                    }
                }
            }
            for (t, to) in rule.to.iter().enumerate() {
                let op = &to.operation;
                for (name, list) in [("paths", &op.paths), ("notPaths", &op.not_paths)] {
                    for (i, path) in list.iter().enumerate() {
                        crate::authz::validate_path_pattern(path).map_err(|reason| {
                            invalid(
                                KIND,
                                meta,
                                format!("spec.rules[{r}].to[{t}].operation.{name}[{i}]"),
                                reason,
                            )
                        })?;
                    }
                }
                for (name, list) in [("ports", &op.ports), ("notPorts", &op.not_ports)] {
                    for (i, port) in list.iter().enumerate() {
                        parse_port(&port.as_text()).map_err(|reason| {
                            invalid(
                                KIND,
                                meta,
                                format!("spec.rules[{r}].to[{t}].operation.{name}[{i}]"),
                                reason,
                            )
                        })?;
                    }
                }
            }
            for (w, condition) in rule.when.iter().enumerate() {
                let field = format!("spec.rules[{r}].when[{w}]");
                if condition.values.is_empty() && condition.not_values.is_empty() {
                    return Err(invalid(KIND, meta, field, "needs values or notValues"));
                }
                let key = crate::authz::ConditionKey::parse(&condition.key)
                    .map_err(|reason| invalid(KIND, meta, format!("{field}.key"), reason))?;
                // Values are checked by the parsed key: compiled conditions only keep values that parse.
                let values = condition.values.iter().chain(&condition.not_values).enumerate();
                match key {
                    crate::authz::ConditionKey::SourceIp
                    | crate::authz::ConditionKey::RemoteIp
                    | crate::authz::ConditionKey::DestinationIp => {
                        for (i, value) in values {
                            parse_ip_block(value).map_err(|reason| {
                                invalid(KIND, meta, format!("{field}.values[{i}]"), reason)
                            })?;
                        }
                    }
                    crate::authz::ConditionKey::DestinationPort => {
                        for (i, value) in values {
                            parse_port(value).map_err(|reason| {
                                invalid(KIND, meta, format!("{field}.values[{i}]"), reason)
                            })?;
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// An address (`10.1.2.3`, `2001:db8::1`) or a CIDR (`10.0.0.0/16`), as an `IpNet`.
pub(crate) fn parse_ip_block(text: &str) -> Result<ipnet::IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<ipnet::IpNet>() {
        return Ok(net);
    }
    text.parse::<std::net::IpAddr>()
        .map(ipnet::IpNet::from)
        .map_err(|_| format!("{text:?} is not an IP address or CIDR"))
}
