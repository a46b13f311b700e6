//! Istio's compiled L4 authorization policy (`istio.security.Authorization`) as a validated Rust value,
//! [`XdsAuthorization`], and back.
//!
//! istiod compiles each AuthorizationPolicy that a ztunnel can enforce into one of these. The shape is
//! kept as sent: a policy matches if any [`AuthzRule`] matches, a rule if all its [`AuthzClause`]s do, a
//! clause if any of its [`AuthzMatch`]es does, and a match if every kind of condition it sets holds (any
//! positive value matches and no `not_` value does). Evaluating it is `mesh-policy`'s job; this module only
//! guarantees that every value is well-formed: IPs are 4 or 16 bytes with a prefix that fits, ports fit 16
//! bits, and every string match has a kind. Istio's ztunnel drops such malformed entries one by one, which
//! can silently widen an ALLOW policy (an `ALLOW from source_ips: [<bad>]` becomes an allow-all); here
//! the whole policy is refused instead, and the control plane is told why.

#[cfg(test)]
mod tests;

use std::sync::Arc;

use ipnet::IpNet;

use crate::XdsError;
use crate::convert::{ip_from_bytes, ip_to_bytes, known_enum, port};
use crate::error::{FieldProblem, Invalid};
use crate::proto::istio::security as pb;

/// A validated `istio.security.Authorization`: one AuthorizationPolicy as ztunnel enforces it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdsAuthorization {
    /// The policy's name.
    pub name: Arc<str>,
    /// The policy's namespace.
    pub namespace: Arc<str>,
    /// Which workloads it applies to.
    pub scope: AuthzScope,
    /// What it does when it matches.
    pub action: AuthzAction,
    /// If set, the decision is logged but not enforced.
    pub dry_run: bool,
    /// Its rules; the policy matches if any of them does. (With none, it matches nothing.)
    pub rules: Vec<AuthzRule>,
}

impl XdsAuthorization {
    /// The policy's xDS resource name, `namespace/name`, which is also how workloads list it in their
    /// `authorization_policies`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Which workloads an [`XdsAuthorization`] applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuthzScope {
    /// Every workload in the mesh (a policy in the root namespace).
    Global,
    /// Every workload in the policy's namespace.
    Namespace,
    /// The workloads that list the policy in their `authorization_policies` (a policy with a selector).
    WorkloadSelector,
}

/// What a matching [`XdsAuthorization`] does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuthzAction {
    /// Allow the connection.
    Allow,
    /// Deny the connection.
    Deny,
}

/// One rule of a policy: it matches if every clause matches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthzRule {
    /// The clauses (the compiled `from`, `to` and `when` parts).
    pub clauses: Vec<AuthzClause>,
}

/// One clause of a rule: it matches if any of its matches does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthzClause {
    /// The alternatives.
    pub matches: Vec<AuthzMatch>,
}

/// A set of conditions on a connection. Each kind holds if any positive value matches and no `not_` value
/// does; the match holds if every kind it sets holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthzMatch {
    /// The source identity's namespace.
    pub namespaces: Vec<StringMatch>,
    /// Namespaces that must not match.
    pub not_namespaces: Vec<StringMatch>,
    /// The source identity's namespace and service account.
    pub service_accounts: Vec<ServiceAccountMatch>,
    /// Service accounts that must not match.
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    /// The source identity, without `spiffe://` (e.g. `cluster.local/ns/default/sa/client`).
    pub principals: Vec<StringMatch>,
    /// Identities that must not match.
    pub not_principals: Vec<StringMatch>,
    /// The source IP's ranges.
    pub source_ips: Vec<IpNet>,
    /// Source ranges that must not match.
    pub not_source_ips: Vec<IpNet>,
    /// The destination IP's ranges.
    pub destination_ips: Vec<IpNet>,
    /// Destination ranges that must not match.
    pub not_destination_ips: Vec<IpNet>,
    /// The destination ports.
    pub destination_ports: Vec<u16>,
    /// Destination ports that must not match.
    pub not_destination_ports: Vec<u16>,
}

/// A string condition.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StringMatch {
    /// Equal to this.
    Exact(Arc<str>),
    /// Starts with this.
    Prefix(Arc<str>),
    /// Ends with this.
    Suffix(Arc<str>),
    /// Present: any non-empty value.
    Presence,
}

impl StringMatch {
    /// Whether `value` satisfies this condition.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(exact) => value == &**exact,
            StringMatch::Prefix(prefix) => value.starts_with(&**prefix),
            StringMatch::Suffix(suffix) => value.ends_with(&**suffix),
            StringMatch::Presence => !value.is_empty(),
        }
    }
}

/// A service account in a namespace, in any trust domain.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceAccountMatch {
    /// The namespace.
    pub namespace: Arc<str>,
    /// The service account.
    pub service_account: Arc<str>,
}

/// Converts and validates an `istio.security.Authorization`.
pub fn authorization_from_proto(policy: &pb::Authorization) -> Result<XdsAuthorization, XdsError> {
    convert(policy).map_err(|invalid| invalid.for_policy(&format!("{}/{}", policy.namespace, policy.name)))
}

fn convert(p: &pb::Authorization) -> Result<XdsAuthorization, Invalid> {
    if p.name.is_empty() {
        return Err(Invalid::new("name", FieldProblem::Empty));
    }
    let scope = match known_enum(p.scope, "istio.security.Scope", "scope")? {
        pb::Scope::Global => AuthzScope::Global,
        pb::Scope::Namespace => AuthzScope::Namespace,
        pb::Scope::WorkloadSelector => AuthzScope::WorkloadSelector,
    };
    let action = match known_enum(p.action, "istio.security.Action", "action")? {
        pb::Action::Allow => AuthzAction::Allow,
        pb::Action::Deny => AuthzAction::Deny,
    };
    let rules = each(&p.rules, "rules", |rule| {
        Ok(AuthzRule {
            clauses: each(&rule.clauses, "clauses", |clause| {
                Ok(AuthzClause {
                    matches: each(&clause.matches, "matches", convert_match)?,
                })
            })?,
        })
    })?;
    Ok(XdsAuthorization {
        name: p.name.as_str().into(),
        namespace: p.namespace.as_str().into(),
        scope,
        action,
        dry_run: p.dry_run,
        rules,
    })
}

fn convert_match(m: &pb::Match) -> Result<AuthzMatch, Invalid> {
    Ok(AuthzMatch {
        namespaces: each(&m.namespaces, "namespaces", string_match)?,
        not_namespaces: each(&m.not_namespaces, "not_namespaces", string_match)?,
        service_accounts: each(&m.service_accounts, "service_accounts", service_account_match)?,
        not_service_accounts: each(
            &m.not_service_accounts,
            "not_service_accounts",
            service_account_match,
        )?,
        principals: each(&m.principals, "principals", string_match)?,
        not_principals: each(&m.not_principals, "not_principals", string_match)?,
        source_ips: each(&m.source_ips, "source_ips", ip_net)?,
        not_source_ips: each(&m.not_source_ips, "not_source_ips", ip_net)?,
        destination_ips: each(&m.destination_ips, "destination_ips", ip_net)?,
        not_destination_ips: each(&m.not_destination_ips, "not_destination_ips", ip_net)?,
        destination_ports: ports(&m.destination_ports, "destination_ports")?,
        not_destination_ports: ports(&m.not_destination_ports, "not_destination_ports")?,
    })
}

/// Converts every element of a repeated message field, qualifying an error with `name[index]`.
fn each<P, T>(
    items: &[P],
    name: &str,
    convert: impl Fn(&P) -> Result<T, Invalid>,
) -> Result<Vec<T>, Invalid> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| convert(item).map_err(|e| e.within(format!("{name}[{i}]"))))
        .collect()
}

fn ports(values: &[u32], name: &str) -> Result<Vec<u16>, Invalid> {
    values
        .iter()
        .enumerate()
        .map(|(i, &value)| port(value, format!("{name}[{i}]")))
        .collect()
}

fn string_match(m: &pb::StringMatch) -> Result<StringMatch, Invalid> {
    use pb::string_match::MatchType;
    Ok(match &m.match_type {
        Some(MatchType::Exact(s)) => StringMatch::Exact(s.as_str().into()),
        Some(MatchType::Prefix(s)) => StringMatch::Prefix(s.as_str().into()),
        Some(MatchType::Suffix(s)) => StringMatch::Suffix(s.as_str().into()),
        Some(MatchType::Presence(())) => StringMatch::Presence,
        None => return Err(Invalid::new("match_type", FieldProblem::Missing)),
    })
}

fn service_account_match(m: &pb::ServiceAccountMatch) -> Result<ServiceAccountMatch, Invalid> {
    if m.namespace.is_empty() {
        return Err(Invalid::new("namespace", FieldProblem::Empty));
    }
    if m.service_account.is_empty() {
        return Err(Invalid::new("serviceAccount", FieldProblem::Empty));
    }
    Ok(ServiceAccountMatch {
        namespace: m.namespace.as_str().into(),
        service_account: m.service_account.as_str().into(),
    })
}

fn ip_net(address: &pb::Address) -> Result<IpNet, Invalid> {
    let ip = ip_from_bytes(&address.address, "address")?;
    let max: u8 = if ip.is_ipv4() { 32 } else { 128 };
    let too_long = || {
        Invalid::new(
            "length",
            FieldProblem::PrefixLength {
                length: address.length,
                max,
            },
        )
    };
    let length = u8::try_from(address.length).map_err(|_| too_long())?;
    IpNet::new(ip, length).map_err(|_| too_long())
}

/// Converts an [`XdsAuthorization`] to the `istio.security.Authorization` istiod would send for it.
pub fn authorization_to_proto(policy: &XdsAuthorization) -> pb::Authorization {
    pb::Authorization {
        name: policy.name.to_string(),
        namespace: policy.namespace.to_string(),
        scope: match policy.scope {
            AuthzScope::Global => pb::Scope::Global,
            AuthzScope::Namespace => pb::Scope::Namespace,
            AuthzScope::WorkloadSelector => pb::Scope::WorkloadSelector,
        }
        .into(),
        action: match policy.action {
            AuthzAction::Allow => pb::Action::Allow,
            AuthzAction::Deny => pb::Action::Deny,
        }
        .into(),
        rules: policy
            .rules
            .iter()
            .map(|rule| pb::Rule {
                clauses: rule
                    .clauses
                    .iter()
                    .map(|clause| pb::Clause {
                        matches: clause.matches.iter().map(match_to_proto).collect(),
                    })
                    .collect(),
            })
            .collect(),
        dry_run: policy.dry_run,
    }
}

fn match_to_proto(m: &AuthzMatch) -> pb::Match {
    let strings = |v: &[StringMatch]| v.iter().map(string_match_to_proto).collect();
    let nets = |v: &[IpNet]| {
        v.iter()
            .map(|net| pb::Address {
                address: ip_to_bytes(net.addr()),
                length: u32::from(net.prefix_len()),
            })
            .collect()
    };
    let accounts = |v: &[ServiceAccountMatch]| {
        v.iter()
            .map(|sa| pb::ServiceAccountMatch {
                namespace: sa.namespace.to_string(),
                service_account: sa.service_account.to_string(),
            })
            .collect()
    };
    let ports = |v: &[u16]| v.iter().map(|&p| u32::from(p)).collect();
    pb::Match {
        namespaces: strings(&m.namespaces),
        not_namespaces: strings(&m.not_namespaces),
        principals: strings(&m.principals),
        not_principals: strings(&m.not_principals),
        source_ips: nets(&m.source_ips),
        not_source_ips: nets(&m.not_source_ips),
        destination_ips: nets(&m.destination_ips),
        not_destination_ips: nets(&m.not_destination_ips),
        destination_ports: ports(&m.destination_ports),
        not_destination_ports: ports(&m.not_destination_ports),
        service_accounts: accounts(&m.service_accounts),
        not_service_accounts: accounts(&m.not_service_accounts),
    }
}

fn string_match_to_proto(m: &StringMatch) -> pb::StringMatch {
    use pb::string_match::MatchType;
    let match_type = match m {
        StringMatch::Exact(s) => MatchType::Exact(s.to_string()),
        StringMatch::Prefix(s) => MatchType::Prefix(s.to_string()),
        StringMatch::Suffix(s) => MatchType::Suffix(s.to_string()),
        StringMatch::Presence => MatchType::Presence(()),
    };
    pb::StringMatch {
        match_type: Some(match_type),
    }
}
