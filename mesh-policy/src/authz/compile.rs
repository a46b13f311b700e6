//! Compiled rules: every pattern parsed once, so evaluation only compares.
//!
//! ## Enforcing a policy at L4 (ztunnel)
//! ztunnel sees connections, not requests, so a rule that names an L7 attribute cannot be checked there.
//! We convert such rules exactly as istiod does when it turns an AuthorizationPolicy into ztunnel's
//! `Authorization` resource, which istio.io's "Use Layer 4 security policy" page describes as failing safe:
//! - **ALLOW**: a rule with any L7 attribute is dropped, so it never matches (a policy left without rules
//!   allows nothing, and the workload becomes deny-by-default: "it fails safe by becoming a DENY").
//! - **DENY**: the L7 attributes are removed from the rule and the rest still applies, so it denies at least
//!   what was meant (a rule left empty denies everything).
//! - **AUDIT** and **CUSTOM** are not enforced at L4 (ztunnel has neither); they need a waypoint.
//!
//! L4 attributes are: `principals`, `namespaces`, `serviceAccounts`, `ipBlocks` (and their `not*`), `ports`
//! / `notPorts`, and the `when` keys `source.ip`, `source.namespace`, `source.principal`, `destination.ip`
//! and `destination.port`. Everything else is L7.

use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderName;
use ipnet::IpNet;

use super::matcher::{HostMatch, PathMatch, StrMatch};
use super::request::Request;
use crate::resource::{self, Action, AuthorizationPolicy, parse_port};

/// A `when` key, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConditionKey {
    /// `request.headers[<name>]`.
    RequestHeader(HeaderName),
    /// `source.ip`.
    SourceIp,
    /// `remote.ip`.
    RemoteIp,
    /// `source.namespace`.
    SourceNamespace,
    /// `source.principal`.
    SourcePrincipal,
    /// `request.auth.principal`.
    AuthPrincipal,
    /// `request.auth.audiences`.
    AuthAudiences,
    /// `request.auth.presenter`.
    AuthPresenter,
    /// `request.auth.claims[a]` or nested `request.auth.claims[a][b]`.
    AuthClaim(Vec<String>),
    /// `destination.ip`.
    DestinationIp,
    /// `destination.port`.
    DestinationPort,
    /// `connection.sni`.
    ConnectionSni,
}

impl ConditionKey {
    /// Parses a documented key; anything else is refused with the reason.
    pub fn parse(key: &str) -> Result<ConditionKey, String> {
        // No trimming: a key is matched exactly, as Istio does, so a stray space is an error rather than a key
        // whose values escape validation.
        Ok(match key {
            "source.ip" => ConditionKey::SourceIp,
            "remote.ip" => ConditionKey::RemoteIp,
            "source.namespace" => ConditionKey::SourceNamespace,
            "source.principal" => ConditionKey::SourcePrincipal,
            "request.auth.principal" => ConditionKey::AuthPrincipal,
            "request.auth.audiences" => ConditionKey::AuthAudiences,
            "request.auth.presenter" => ConditionKey::AuthPresenter,
            "destination.ip" => ConditionKey::DestinationIp,
            "destination.port" => ConditionKey::DestinationPort,
            "connection.sni" => ConditionKey::ConnectionSni,
            _ => {
                if let Some(name) = key
                    .strip_prefix("request.headers[")
                    .and_then(|k| k.strip_suffix(']'))
                {
                    let header = HeaderName::from_bytes(name.as_bytes())
                        .map_err(|_| format!("{name:?} is not a valid header name"))?;
                    ConditionKey::RequestHeader(header)
                } else if let Some(path) = key
                    .strip_prefix("request.auth.claims[")
                    .and_then(|k| k.strip_suffix(']'))
                {
                    let parts: Vec<String> = path.split("][").map(str::to_owned).collect();
                    if parts.iter().any(|p| p.is_empty() || p.contains(['[', ']'])) {
                        return Err(format!("bad claim path in {key:?}"));
                    }
                    ConditionKey::AuthClaim(parts)
                } else {
                    return Err(format!("unknown condition key {key:?}"));
                }
            }
        })
    }

    fn is_l4(&self) -> bool {
        matches!(
            self,
            ConditionKey::SourceIp
                | ConditionKey::SourceNamespace
                | ConditionKey::SourcePrincipal
                | ConditionKey::DestinationIp
                | ConditionKey::DestinationPort
        )
    }

    /// The key as a policy writes it, for explanations.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            ConditionKey::RequestHeader(_) => "request.headers",
            ConditionKey::SourceIp => "source.ip",
            ConditionKey::RemoteIp => "remote.ip",
            ConditionKey::SourceNamespace => "source.namespace",
            ConditionKey::SourcePrincipal => "source.principal",
            ConditionKey::AuthPrincipal => "request.auth.principal",
            ConditionKey::AuthAudiences => "request.auth.audiences",
            ConditionKey::AuthPresenter => "request.auth.presenter",
            ConditionKey::AuthClaim(_) => "request.auth.claims",
            ConditionKey::DestinationIp => "destination.ip",
            ConditionKey::DestinationPort => "destination.port",
            ConditionKey::ConnectionSni => "connection.sni",
        }
    }
}

/// Condition values, typed by key.
#[derive(Debug, Clone)]
enum Values {
    Strings(Vec<StrMatch>),
    Ips(Vec<IpNet>),
    Ports(Vec<u16>),
}

impl Values {
    fn is_empty(&self) -> bool {
        match self {
            Values::Strings(v) => v.is_empty(),
            Values::Ips(v) => v.is_empty(),
            Values::Ports(v) => v.is_empty(),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledCondition {
    key: ConditionKey,
    values: Values,
    not_values: Values,
}

/// A field whose values are ORed, with a `not*` counterpart that must match none.
#[derive(Debug, Clone)]
struct Field<T> {
    any: Vec<T>,
    none: Vec<T>,
}

impl<T> Default for Field<T> {
    fn default() -> Self {
        Field {
            any: Vec::new(),
            none: Vec::new(),
        }
    }
}

impl<T> Field<T> {
    fn is_empty(&self) -> bool {
        self.any.is_empty() && self.none.is_empty()
    }

    fn check(&self, matches: impl Fn(&T) -> bool) -> bool {
        (self.any.is_empty() || self.any.iter().any(&matches)) && !self.none.iter().any(matches)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledSource {
    principals: Field<StrMatch>,
    request_principals: Field<StrMatch>,
    namespaces: Field<StrMatch>,
    service_accounts: Field<(Box<str>, Box<str>)>,
    ip_blocks: Field<IpNet>,
    remote_ip_blocks: Field<IpNet>,
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledOperation {
    hosts: Field<HostMatch>,
    ports: Field<u16>,
    methods: Field<Box<str>>,
    paths: Field<PathMatch>,
}

/// A rule: `from` any, `to` any, `when` all.
#[derive(Debug, Clone)]
pub(crate) struct CompiledRule {
    /// The rule's index in the policy as written (explanations refer to it).
    pub(crate) index: usize,
    from: Vec<CompiledSource>,
    to: Vec<CompiledOperation>,
    when: Vec<CompiledCondition>,
}

/// A policy compiled for both enforcement points.
#[derive(Debug, Clone)]
pub(crate) struct CompiledPolicy {
    /// `namespace/name`.
    pub(crate) name: Arc<str>,
    pub(crate) namespace: Arc<str>,
    pub(crate) action: Action,
    pub(crate) dry_run: bool,
    pub(crate) provider: Option<Arc<str>>,
    pub(crate) selector: Option<resource::WorkloadSelector>,
    pub(crate) target_refs: Vec<resource::TargetRef>,
    /// The rules as written, for waypoints.
    pub(crate) rules: Vec<CompiledRule>,
    /// The rules converted for ztunnel (see the module documentation); `None` if the action is not
    /// enforced at L4.
    pub(crate) l4_rules: Option<Vec<CompiledRule>>,
}

/// Compiles a validated policy.
pub(crate) fn compile(policy: &AuthorizationPolicy) -> Result<CompiledPolicy, crate::PolicyError> {
    policy.validate()?;
    let action = policy.action()?;
    let rules = policy
        .spec
        .rules
        .iter()
        .enumerate()
        .map(|(index, rule)| compile_rule(index, rule))
        .collect::<Vec<_>>();
    let l4_rules = match action {
        Action::Allow => Some(rules.iter().filter(|r| !r.has_l7()).cloned().collect()),
        Action::Deny => Some(rules.iter().map(CompiledRule::without_l7).collect()),
        Action::Audit | Action::Custom => None,
    };
    Ok(CompiledPolicy {
        name: policy.metadata.key().into(),
        namespace: policy.metadata.namespace.as_str().into(),
        action,
        dry_run: policy.dry_run(),
        provider: policy.spec.provider.as_ref().map(|p| p.name.as_str().into()),
        selector: policy.spec.attachment.selector.clone(),
        target_refs: policy.target_refs().cloned().collect(),
        rules,
        l4_rules,
    })
}

fn strings(list: &[String]) -> Vec<StrMatch> {
    list.iter().map(|s| StrMatch::parse(s)).collect()
}

fn paths(list: &[String]) -> Vec<PathMatch> {
    // Validated before compiling: a template that does not parse cannot be here.
    list.iter().filter_map(|p| PathMatch::parse(p).ok()).collect()
}

fn ips(list: &[String]) -> Vec<IpNet> {
    // Validated before compiling: a value that does not parse cannot be here.
    list.iter()
        .filter_map(|s| resource::authz_parse_ip_block(s).ok())
        .collect()
}

fn ports(list: impl Iterator<Item = String>) -> Vec<u16> {
    list.filter_map(|p| parse_port(&p).ok()).collect()
}

fn compile_rule(index: usize, rule: &resource::Rule) -> CompiledRule {
    let from = rule
        .from
        .iter()
        .map(|f| {
            let s = &f.source;
            CompiledSource {
                principals: Field {
                    any: strings(&s.principals),
                    none: strings(&s.not_principals),
                },
                request_principals: Field {
                    any: strings(&s.request_principals),
                    none: strings(&s.not_request_principals),
                },
                namespaces: Field {
                    any: strings(&s.namespaces),
                    none: strings(&s.not_namespaces),
                },
                service_accounts: Field {
                    any: service_accounts(&s.service_accounts),
                    none: service_accounts(&s.not_service_accounts),
                },
                ip_blocks: Field {
                    any: ips(&s.ip_blocks),
                    none: ips(&s.not_ip_blocks),
                },
                remote_ip_blocks: Field {
                    any: ips(&s.remote_ip_blocks),
                    none: ips(&s.not_remote_ip_blocks),
                },
            }
        })
        .collect();
    let to = rule
        .to
        .iter()
        .map(|t| {
            let o = &t.operation;
            CompiledOperation {
                hosts: Field {
                    any: o.hosts.iter().map(|h| HostMatch::parse(h)).collect(),
                    none: o.not_hosts.iter().map(|h| HostMatch::parse(h)).collect(),
                },
                ports: Field {
                    any: ports(o.port_texts()),
                    none: ports(o.not_port_texts()),
                },
                methods: Field {
                    any: o.methods.iter().map(|m| m.as_str().into()).collect(),
                    none: o.not_methods.iter().map(|m| m.as_str().into()).collect(),
                },
                paths: Field {
                    any: paths(&o.paths),
                    none: paths(&o.not_paths),
                },
            }
        })
        .collect();
    let when = rule.when.iter().filter_map(compile_condition).collect();
    CompiledRule {
        index,
        from,
        to,
        when,
    }
}

fn service_accounts(list: &[String]) -> Vec<(Box<str>, Box<str>)> {
    list.iter()
        .filter_map(|sa| sa.split_once('/').map(|(ns, name)| (ns.into(), name.into())))
        .collect()
}

fn compile_condition(condition: &resource::Condition) -> Option<CompiledCondition> {
    let key = ConditionKey::parse(&condition.key).ok()?;
    let typed = |list: &[String]| match key {
        ConditionKey::SourceIp | ConditionKey::RemoteIp | ConditionKey::DestinationIp => {
            Values::Ips(ips(list))
        }
        ConditionKey::DestinationPort => Values::Ports(ports(list.iter().cloned())),
        _ => Values::Strings(strings(list)),
    };
    Some(CompiledCondition {
        values: typed(&condition.values),
        not_values: typed(&condition.not_values),
        key,
    })
}

impl CompiledSource {
    fn has_l7(&self) -> bool {
        !self.request_principals.is_empty() || !self.remote_ip_blocks.is_empty()
    }

    fn matches(&self, request: &Request<'_>) -> bool {
        let principal = request.principal().unwrap_or_default();
        let namespace = request.namespace().unwrap_or_default();
        let service_account = request
            .connection
            .source
            .and_then(|id| id.service_account())
            .unwrap_or_default();
        let source_ip = request.connection.source_ip;
        let remote_ip = request.remote_ip();
        let request_principal = request.auth().map(|a| a.principal.as_str()).unwrap_or_default();
        self.principals.check(|m| m.matches(principal))
            && self.namespaces.check(|m| m.matches(namespace))
            && self
                .service_accounts
                .check(|(ns, sa)| **ns == *namespace && **sa == *service_account)
            && self.ip_blocks.check(|net| net.contains(&source_ip))
            && self.remote_ip_blocks.check(|net| net.contains(&remote_ip))
            && self.request_principals.check(|m| m.matches(request_principal))
    }
}

impl CompiledOperation {
    fn has_l7(&self) -> bool {
        !self.hosts.is_empty() || !self.methods.is_empty() || !self.paths.is_empty()
    }

    fn matches(&self, request: &Request<'_>) -> bool {
        if !self.ports.check(|p| *p == request.connection.destination_port) {
            return false;
        }
        if !self.has_l7() {
            return true;
        }
        // An L7 field can only match a request that has an L7 layer.
        let Some(http) = request.http else { return false };
        self.hosts.check(|h| h.matches(http.host))
            && self.methods.check(|m| **m == *http.method)
            && self.paths.check(|p| p.matches(&http.path))
    }
}

impl CompiledCondition {
    fn matches(&self, request: &Request<'_>) -> bool {
        let check = |values: &Values| -> bool { self.value_matches(values, request) };
        (self.values.is_empty() || check(&self.values))
            && (self.not_values.is_empty() || !check(&self.not_values))
    }

    fn value_matches(&self, values: &Values, request: &Request<'_>) -> bool {
        let strings = |get: &dyn Fn(&StrMatch) -> bool| match values {
            Values::Strings(list) => list.iter().any(get),
            _ => false,
        };
        let ip = |addr: IpAddr| match values {
            Values::Ips(list) => list.iter().any(|net| net.contains(&addr)),
            _ => false,
        };
        match &self.key {
            ConditionKey::SourceIp => ip(request.connection.source_ip),
            ConditionKey::RemoteIp => ip(request.remote_ip()),
            ConditionKey::DestinationIp => ip(request.connection.destination_ip),
            ConditionKey::DestinationPort => match values {
                Values::Ports(list) => list.contains(&request.connection.destination_port),
                _ => false,
            },
            ConditionKey::SourceNamespace => strings(&|m| m.matches(request.namespace().unwrap_or_default())),
            ConditionKey::SourcePrincipal => strings(&|m| m.matches(request.principal().unwrap_or_default())),
            ConditionKey::ConnectionSni => {
                strings(&|m| m.matches(request.connection.sni.unwrap_or_default()))
            }
            ConditionKey::RequestHeader(name) => {
                let Some(http) = request.http else { return false };
                let mut copies = http.headers.get_all(name).iter();
                let Some(first) = copies.next() else { return false };
                if copies.next().is_none() {
                    return strings(&|m| m.matches(&String::from_utf8_lossy(first.as_bytes())));
                }
                // Several copies are compared joined with ",", as Envoy's header matcher does: matching copy by
                // copy would let one good copy carry a bad one past `values`, or past `notValues`.
                let joined = http
                    .headers
                    .get_all(name)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()))
                    .collect::<Vec<_>>()
                    .join(",");
                strings(&|m| m.matches(&joined))
            }
            ConditionKey::AuthPrincipal => match request.auth() {
                Some(auth) => strings(&|m| m.matches(&auth.principal)),
                None => false,
            },
            ConditionKey::AuthPresenter => match request.auth().and_then(|a| a.presenter.as_deref()) {
                Some(presenter) => strings(&|m| m.matches(presenter)),
                None => false,
            },
            ConditionKey::AuthAudiences => match request.auth() {
                Some(auth) => auth.audiences.iter().any(|aud| strings(&|m| m.matches(aud))),
                None => false,
            },
            ConditionKey::AuthClaim(path) => {
                let Some(auth) = request.auth() else { return false };
                let mut claim = &auth.claims;
                for part in path {
                    match claim.get(part) {
                        Some(next) => claim = next,
                        None => return false,
                    }
                }
                match claim {
                    serde_json::Value::String(s) => strings(&|m| m.matches(s)),
                    serde_json::Value::Array(items) => items
                        .iter()
                        .filter_map(serde_json::Value::as_str)
                        .any(|s| strings(&|m| m.matches(s))),
                    serde_json::Value::Bool(b) => strings(&|m| m.matches(if *b { "true" } else { "false" })),
                    _ => false,
                }
            }
        }
    }
}

impl CompiledRule {
    fn has_l7(&self) -> bool {
        self.from.iter().any(CompiledSource::has_l7)
            || self.to.iter().any(CompiledOperation::has_l7)
            || self.when.iter().any(|c| !c.key.is_l4())
    }

    /// The DENY conversion: drop the L7 attributes, keep the rest.
    fn without_l7(&self) -> CompiledRule {
        CompiledRule {
            index: self.index,
            from: self
                .from
                .iter()
                .map(|s| CompiledSource {
                    request_principals: Field::default(),
                    remote_ip_blocks: Field::default(),
                    ..s.clone()
                })
                .collect(),
            to: self
                .to
                .iter()
                .map(|o| CompiledOperation {
                    hosts: Field::default(),
                    methods: Field::default(),
                    paths: Field::default(),
                    ..o.clone()
                })
                .collect(),
            when: self.when.iter().filter(|c| c.key.is_l4()).cloned().collect(),
        }
    }

    pub(crate) fn matches(&self, request: &Request<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(request)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(request)))
            && self.when.iter().all(|c| c.matches(request))
    }

    /// The first positive attribute of this (matching) rule, for explanations.
    pub(crate) fn explain(&self) -> (&'static str, String) {
        if let Some(source) = self.from.first() {
            let fields: [(&'static str, Option<String>); 6] = [
                (
                    "source.principal",
                    source.principals.any.first().map(ToString::to_string),
                ),
                (
                    "source.namespace",
                    source.namespaces.any.first().map(ToString::to_string),
                ),
                (
                    "source.serviceAccount",
                    source
                        .service_accounts
                        .any
                        .first()
                        .map(|(ns, sa)| format!("{ns}/{sa}")),
                ),
                ("source.ip", source.ip_blocks.any.first().map(ToString::to_string)),
                (
                    "remote.ip",
                    source.remote_ip_blocks.any.first().map(ToString::to_string),
                ),
                (
                    "request.auth.principal",
                    source.request_principals.any.first().map(ToString::to_string),
                ),
            ];
            if let Some((name, Some(value))) = fields.into_iter().find(|(_, v)| v.is_some()) {
                return (name, value);
            }
            if !source.namespaces.none.is_empty() {
                return (
                    "source.namespace",
                    format!("not {}", list(&source.namespaces.none)),
                );
            }
            if !source.principals.none.is_empty() {
                return (
                    "source.principal",
                    format!("not {}", list(&source.principals.none)),
                );
            }
        }
        if let Some(op) = self.to.first() {
            let fields: [(&'static str, Option<String>); 4] = [
                ("request.method", op.methods.any.first().map(ToString::to_string)),
                ("request.path", op.paths.any.first().map(ToString::to_string)),
                ("request.host", op.hosts.any.first().map(ToString::to_string)),
                ("destination.port", op.ports.any.first().map(ToString::to_string)),
            ];
            if let Some((name, Some(value))) = fields.into_iter().find(|(_, v)| v.is_some()) {
                return (name, value);
            }
        }
        if let Some(condition) = self.when.first() {
            let value = match &condition.values {
                Values::Strings(v) => v.first().map(ToString::to_string),
                Values::Ips(v) => v.first().map(ToString::to_string),
                Values::Ports(v) => v.first().map(ToString::to_string),
            };
            return (
                condition.key.name(),
                value.unwrap_or_else(|| "not in notValues".to_owned()),
            );
        }
        ("rule", "{} (matches everything)".to_owned())
    }
}

fn list(items: &[StrMatch]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
