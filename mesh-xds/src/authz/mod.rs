//! Istio's compiled L4 authorization policy (`istio.security.Authorization`) as a validated Rust value,
//! [`XdsAuthorization`], and back.
//!
//! istiod compiles each AuthorizationPolicy that a ztunnel can enforce into one of these. The shape is
//! kept as sent: a policy matches if any [`AuthzRule`] matches, a rule if all its [`AuthzClause`]s do, a
//! clause if any of its [`AuthzMatch`]es does, and a match if every kind of condition it sets holds (any
//! positive value matches and no `not_` value does). The types are `mesh-policy`'s ([`mesh_policy::l4`],
//! re-exported here under this crate's names), and so is the decision ([`mesh_policy::L4PolicySet`]);
//! this module converts the protobuf and guarantees that every value is well-formed: IPs are 4 or 16
//! bytes with a prefix that fits, ports fit 16 bits, and every string match has a kind. Istio's ztunnel
//! drops such malformed entries one by one, which can silently widen an ALLOW policy (an `ALLOW from
//! source_ips: [<bad>]` becomes an allow-all); here the whole policy is refused instead, and the control
//! plane is told why.

#[cfg(test)]
mod tests;

use ipnet::IpNet;

use crate::XdsError;
use crate::convert::{ip_from_bytes, ip_to_bytes, known_enum, port};
use crate::error::{FieldProblem, Invalid};
use crate::proto::istio::security as pb;

// The types are mesh-policy's, which enforces them; re-exported under the names this crate has always used.
pub use mesh_policy::l4::{
    L4Action as AuthzAction, L4Clause as AuthzClause, L4Match as AuthzMatch, L4Policy as XdsAuthorization,
    L4Rule as AuthzRule, L4Scope as AuthzScope, ServiceAccountMatch, StringMatch,
};

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
