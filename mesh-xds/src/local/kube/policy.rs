//! AuthorizationPolicy and PeerAuthentication to the L4 policies ztunnel enforces, as istiod's ambient
//! controller converts them (`authorization.go`, `policies.go`), and the policy names each workload lists.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use mesh_policy::PolicyError;
use mesh_policy::resource::{
    Action, AuthorizationPolicy, Condition, MtlsMode, Operation, PeerAuthentication, Rule, Source,
    WorkloadSelector,
};

use super::Objects;
use crate::XdsError;
use crate::authz::{
    AuthzAction, AuthzClause, AuthzMatch, AuthzRule, AuthzScope, ServiceAccountMatch, StringMatch,
    XdsAuthorization,
};
use crate::local::{LocalOptions, Origin};

/// The name of istiod's static policy for PeerAuthentication STRICT: DENY every connection without a
/// peer identity. (`_` cannot appear in a Kubernetes name, so it cannot clash with a real policy.)
pub(crate) const STATIC_STRICT_POLICY: &str = "istio_converted_static_strict";
/// The name prefix of a workload PeerAuthentication with port-level modes, converted.
pub(crate) const CONVERTED_PEER_AUTHENTICATION_PREFIX: &str = "converted_peer_authentication_";

/// The `when` keys ztunnel can check (everything else needs HTTP).
const L4_CONDITION_KEYS: [&str; 5] = [
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

/// The converted policies, and what a workload needs to list the ones that select it.
#[derive(Debug, Default)]
pub(crate) struct Policies {
    sent: Vec<(XdsAuthorization, Origin)>,
    /// Sent AuthorizationPolicies with a selector: namespace, selector, `namespace/name`.
    selectors: Vec<(String, WorkloadSelector, Arc<str>)>,
    peers: Vec<Peer>,
    root_namespace: String,
}

/// A PeerAuthentication, as the mode resolution reads it.
#[derive(Debug, Clone)]
struct Peer {
    namespace: String,
    name: String,
    /// `matchLabels`, if it has a selector.
    selector: Option<BTreeMap<String, String>>,
    /// The creation timestamp (RFC 3339); empty, like Go's zero time, sorts oldest.
    created: String,
    mode: MtlsMode,
    /// Port-level modes, by port.
    ports: BTreeMap<u16, MtlsMode>,
}

impl Peer {
    fn namespace_wide(&self) -> bool {
        self.selector.as_ref().is_none_or(BTreeMap::is_empty)
    }

    fn converted_key(&self) -> String {
        format!(
            "{}/{CONVERTED_PEER_AUTHENTICATION_PREFIX}{}",
            self.namespace, self.name
        )
    }
}

/// Keeps the older of two policies; the first one seen wins a tie, as in istiod.
fn older<'a>(current: Option<&'a Peer>, candidate: &'a Peer) -> Option<&'a Peer> {
    match current {
        Some(current) if current.created <= candidate.created => Some(current),
        _ => Some(candidate),
    }
}

fn is_strict(peer: Option<&Peer>) -> bool {
    peer.is_some_and(|p| p.mode == MtlsMode::Strict)
}

fn is_unset(peer: Option<&Peer>) -> bool {
    peer.is_none_or(|p| p.mode == MtlsMode::Unset)
}

fn subset(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl Policies {
    /// The policies ztunnel is sent, with where each was written.
    pub(crate) fn into_located(self) -> Vec<(XdsAuthorization, Origin)> {
        self.sent
    }

    /// The names (`namespace/name`) a workload in `namespace` lists: the AuthorizationPolicies whose
    /// selector matches `labels` (its own namespace's, and the root namespace's), sorted, then the
    /// PeerAuthentication-derived ones for `peer_labels`. (istiod matches a ServiceEntry endpoint's
    /// AuthorizationPolicies on the entry's labels and its PeerAuthentications on the endpoint's.)
    pub(crate) fn for_workload(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        peer_labels: &BTreeMap<String, String>,
    ) -> Vec<Arc<str>> {
        let mut names: Vec<Arc<str>> = self
            .selectors
            .iter()
            .filter(|(ns, selector, _)| {
                (ns == namespace || *ns == self.root_namespace) && selector.matches(labels)
            })
            .map(|(_, _, key)| key.clone())
            .collect();
        names.sort();
        names.dedup();
        names.extend(self.peer_keys(namespace, peer_labels).into_iter().map(Arc::from));
        names
    }

    /// istiod's `convertedSelectorPeerAuthentications`: the static STRICT policy if the effective mode is
    /// STRICT, and the workload policy's converted form if its port-level modes need it.
    fn peer_keys(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Vec<String> {
        let root = self.root_namespace.as_str();
        let (mut mesh, mut ns, mut workload) = (None, None, None);
        for peer in &self.peers {
            let applies = (peer.namespace == root && peer.selector.is_none())
                || (peer.namespace == namespace && peer.selector.as_ref().is_none_or(|s| subset(s, labels)));
            if !applies {
                continue;
            }
            if peer.namespace_wide() {
                if peer.namespace == root {
                    mesh = older(mesh, peer);
                } else {
                    ns = older(ns, peer);
                }
            } else if peer.namespace != root {
                workload = older(workload, peer);
            }
        }
        let mut strict = is_strict(mesh);
        if let Some(ns) = ns
            && ns.mode != MtlsMode::Unset
        {
            strict = ns.mode == MtlsMode::Strict;
        }
        let mut port_policy = None;
        if let Some(workload) = workload {
            let any_port = |wanted: &[MtlsMode]| workload.ports.values().any(|m| wanted.contains(m));
            match workload.mode {
                MtlsMode::Strict => strict = true,
                MtlsMode::Permissive | MtlsMode::Disable => strict = false,
                MtlsMode::Unset => {}
            }
            if !workload.ports.is_empty() {
                match workload.mode {
                    MtlsMode::Strict => {
                        if any_port(&[MtlsMode::Permissive, MtlsMode::Disable]) {
                            port_policy = Some(workload.converted_key());
                            strict = false;
                        }
                    }
                    MtlsMode::Permissive | MtlsMode::Disable => {
                        if any_port(&[MtlsMode::Strict]) {
                            port_policy = Some(workload.converted_key());
                        }
                    }
                    MtlsMode::Unset if strict => {
                        if any_port(&[MtlsMode::Permissive]) {
                            port_policy = Some(workload.converted_key());
                            strict = false;
                        }
                    }
                    MtlsMode::Unset => {
                        strict = false;
                        if any_port(&[MtlsMode::Strict]) {
                            port_policy = Some(workload.converted_key());
                        }
                    }
                }
            }
        }
        let mut keys: Vec<String> = strict
            .then(|| format!("{root}/{STATIC_STRICT_POLICY}"))
            .into_iter()
            .chain(port_policy)
            .collect();
        keys.sort();
        keys
    }
}

/// Validates and converts every AuthorizationPolicy and PeerAuthentication.
pub(crate) fn convert(objects: &Objects, options: &LocalOptions) -> Result<Policies, XdsError> {
    let root = options.root_namespace.as_str();
    let mut policies = Policies {
        root_namespace: root.to_owned(),
        ..Policies::default()
    };
    for (origin, policy) in &objects.authorization_policies {
        policy.validate().map_err(|e| policy_error(origin, e))?;
        if let Some(converted) = convert_authorization(policy, origin, root)? {
            if let Some(selector) = &policy.spec.attachment.selector {
                policies.selectors.push((
                    policy.metadata.namespace.clone(),
                    selector.clone(),
                    converted.key().into(),
                ));
            }
            policies.sent.push((converted, origin.clone()));
        }
    }

    let mut peers = Vec::with_capacity(objects.peer_authentications.len());
    for (origin, policy) in &objects.peer_authentications {
        peers.push((peer(policy, origin)?, origin));
    }
    policies.peers = peers.iter().map(|(p, _)| p.clone()).collect();
    for (peer, origin) in &peers {
        // The namespace-wide policies the port-level conversion merges with (no selector at all, as
        // istiod's index has it), oldest first.
        let namespace_wide = |namespace: &str| {
            policies
                .peers
                .iter()
                .filter(|p| p.namespace == namespace && p.selector.is_none())
                .fold(None, older)
        };
        if let Some(converted) =
            convert_peer_authentication(peer, namespace_wide(&peer.namespace), namespace_wide(root), root)
        {
            policies.sent.push((converted, (*origin).clone()));
        }
    }
    if let Some((_, origin)) = peers.first() {
        policies
            .sent
            .push((static_strict_policy(root), (*origin).clone()));
    }
    Ok(policies)
}

fn policy_error(origin: &Origin, error: PolicyError) -> XdsError {
    match error {
        PolicyError::Invalid { field, reason, .. } => origin.error(field, reason),
        other => origin.error("", other),
    }
}

fn peer(policy: &PeerAuthentication, origin: &Origin) -> Result<Peer, XdsError> {
    policy.validate().map_err(|e| policy_error(origin, e))?;
    let mode = match &policy.spec.mtls {
        Some(mtls) => mtls.mode().map_err(|e| origin.error("spec.mtls.mode", e))?,
        None => MtlsMode::Unset,
    };
    let mut ports = BTreeMap::new();
    for (port, mtls) in &policy.spec.port_level_mtls {
        let field = format!("spec.portLevelMtls[{port}]");
        let number = port
            .parse::<u16>()
            .map_err(|_| origin.error(&field, format!("{port:?} is not a port")))?;
        let mode = mtls
            .mode()
            .map_err(|e| origin.error(format!("{field}.mode"), e))?;
        ports.insert(number, mode);
    }
    Ok(Peer {
        namespace: policy.metadata.namespace.clone(),
        name: policy.metadata.name.clone(),
        selector: policy.spec.selector.as_ref().map(|s| s.match_labels.clone()),
        created: policy.metadata.creation_timestamp.clone().unwrap_or_default(),
        mode,
        ports,
    })
}

/// istiod's static STRICT policy: DENY connections that carry no peer identity, for the workloads that
/// list it.
pub(crate) fn static_strict_policy(root_namespace: &str) -> XdsAuthorization {
    XdsAuthorization {
        name: STATIC_STRICT_POLICY.into(),
        namespace: root_namespace.into(),
        scope: AuthzScope::WorkloadSelector,
        action: AuthzAction::Deny,
        dry_run: false,
        rules: vec![AuthzRule {
            clauses: vec![clause(no_identity())],
        }],
    }
}

fn no_identity() -> AuthzMatch {
    AuthzMatch {
        not_principals: vec![StringMatch::Presence],
        ..AuthzMatch::default()
    }
}

fn clause(m: AuthzMatch) -> AuthzClause {
    AuthzClause { matches: vec![m] }
}

/// istiod's `convertPeerAuthentication`: a workload policy with port-level modes becomes a DENY policy
/// for the ports whose mode differs from the effective one, merged with the namespace or mesh STRICT
/// mode so that the static STRICT policy can be left off the workload.
fn convert_peer_authentication(
    peer: &Peer,
    namespace: Option<&Peer>,
    mesh: Option<&Peer>,
    root: &str,
) -> Option<XdsAuthorization> {
    if peer.namespace == root || peer.selector.is_none() || peer.ports.is_empty() {
        return None;
    }
    let mode = peer.mode;
    let mut rules = Vec::new();
    let mut clauses = Vec::new();
    if mode == MtlsMode::Strict {
        clauses.push(clause(no_identity()));
    }
    let mut non_strict_port = false;
    for (&port, &port_mode) in &peer.ports {
        match port_mode {
            MtlsMode::Strict => {
                // Written as istiod's condition is evaluated (its `&&` binds tighter than `||`): the
                // mesh-wide branch is not gated on this policy's own mode being unset.
                let inherited = mode == MtlsMode::Strict
                    || (mode == MtlsMode::Unset && is_strict(namespace))
                    || (is_unset(namespace) && is_strict(mesh));
                if inherited {
                    continue;
                }
                rules.push(AuthzRule {
                    clauses: vec![clause(AuthzMatch {
                        destination_ports: vec![port],
                        ..no_identity()
                    })],
                });
            }
            MtlsMode::Permissive | MtlsMode::Disable => {
                if matches!(mode, MtlsMode::Permissive | MtlsMode::Disable) {
                    continue;
                }
                let effective_not_strict = (namespace.is_some() && !is_strict(namespace))
                    || (namespace.is_none() && mesh.is_some() && !is_strict(mesh))
                    || (namespace.is_none() && mesh.is_none());
                if mode == MtlsMode::Unset && effective_not_strict {
                    continue;
                }
                non_strict_port = true;
                clauses.push(clause(AuthzMatch {
                    not_destination_ports: vec![port],
                    ..AuthzMatch::default()
                }));
            }
            MtlsMode::Unset => {}
        }
    }
    if mode == MtlsMode::Strict && !non_strict_port {
        return None;
    }
    if clauses.is_empty() && rules.is_empty() {
        return None;
    }
    let merge_strict =
        (is_strict(mesh) && (is_unset(namespace) || is_strict(namespace))) || is_strict(namespace);
    if merge_strict && non_strict_port {
        clauses.push(clause(no_identity()));
    }
    if !clauses.is_empty() {
        rules.push(AuthzRule { clauses });
    }
    Some(XdsAuthorization {
        name: format!("{CONVERTED_PEER_AUTHENTICATION_PREFIX}{}", peer.name).into(),
        namespace: peer.namespace.as_str().into(),
        scope: AuthzScope::WorkloadSelector,
        action: AuthzAction::Deny,
        dry_run: false,
        rules,
    })
}

/// istiod's `convertAuthorizationPolicy`; `None` for a policy ztunnel is not sent.
fn convert_authorization(
    policy: &AuthorizationPolicy,
    origin: &Origin,
    root: &str,
) -> Result<Option<XdsAuthorization>, XdsError> {
    // Policies attached with targetRefs are for waypoints; dry-run ones are not enforced, and istiod does
    // not send them to ztunnel at all.
    if policy.target_refs().next().is_some() || policy.dry_run() {
        return Ok(None);
    }
    let action = match policy.action().map_err(|e| policy_error(origin, e))? {
        Action::Allow => AuthzAction::Allow,
        Action::Deny => AuthzAction::Deny,
        // Neither has an L4 meaning: they need a waypoint.
        Action::Audit | Action::Custom => return Ok(None),
    };
    let namespace = policy.metadata.namespace.as_str();
    let scope = if policy.spec.attachment.selector.is_some() {
        AuthzScope::WorkloadSelector
    } else if namespace == root {
        AuthzScope::Global
    } else {
        AuthzScope::Namespace
    };
    let mut rules = Vec::with_capacity(policy.spec.rules.len());
    for (r, rule) in policy.spec.rules.iter().enumerate() {
        let field = format!("spec.rules[{r}]");
        if let Some(rule) = convert_rule(action, rule, namespace, origin, &field)? {
            rules.push(rule);
        }
    }
    Ok(Some(XdsAuthorization {
        name: policy.metadata.name.as_str().into(),
        namespace: namespace.into(),
        scope,
        action,
        dry_run: false,
        rules,
    }))
}

fn operation_has_l7(o: &Operation) -> bool {
    [
        &o.hosts,
        &o.not_hosts,
        &o.methods,
        &o.not_methods,
        &o.paths,
        &o.not_paths,
    ]
    .iter()
    .any(|v| !v.is_empty())
}

fn source_has_l7(s: &Source) -> bool {
    [
        &s.remote_ip_blocks,
        &s.not_remote_ip_blocks,
        &s.request_principals,
        &s.not_request_principals,
    ]
    .iter()
    .any(|v| !v.is_empty())
}

/// istiod's `handleRule`: the rule's `to`, `from` and each `when` become clauses (AND), their entries
/// matches (OR). `None` when the rule is dropped: an ALLOW rule with an L7 attribute (it fails safe by
/// never matching), or one with an entry that can match nothing.
fn convert_rule(
    action: AuthzAction,
    rule: &Rule,
    namespace: &str,
    origin: &Origin,
    field: &str,
) -> Result<Option<AuthzRule>, XdsError> {
    let has_l7 = rule.to.iter().any(|t| operation_has_l7(&t.operation))
        || rule.from.iter().any(|f| source_has_l7(&f.source))
        || rule
            .when
            .iter()
            .any(|c| !L4_CONDITION_KEYS.contains(&c.key.as_str()));
    if action == AuthzAction::Allow && has_l7 {
        return Ok(None);
    }
    let mut groups: Vec<Vec<AuthzMatch>> = Vec::new();
    if !rule.to.is_empty() {
        let mut matches = Vec::with_capacity(rule.to.len());
        for (t, to) in rule.to.iter().enumerate() {
            let at = format!("{field}.to[{t}].operation");
            matches.push(AuthzMatch {
                destination_ports: ports(to.operation.port_texts(), origin, &format!("{at}.ports"))?,
                not_destination_ports: ports(
                    to.operation.not_port_texts(),
                    origin,
                    &format!("{at}.notPorts"),
                )?,
                ..AuthzMatch::default()
            });
        }
        groups.push(matches);
    }
    if !rule.from.is_empty() {
        let mut matches = Vec::with_capacity(rule.from.len());
        for (f, from) in rule.from.iter().enumerate() {
            let at = format!("{field}.from[{f}].source");
            matches.push(source_match(&from.source, namespace, origin, &at)?);
        }
        groups.push(matches);
    }
    for (w, condition) in rule.when.iter().enumerate() {
        let at = format!("{field}.when[{w}]");
        groups.push(vec![condition_match(condition, origin, &at)?]);
    }

    let mut clauses = Vec::with_capacity(groups.len());
    for matches in groups {
        if !matches.iter().any(|m| *m == AuthzMatch::default()) {
            clauses.push(AuthzClause { matches });
            continue;
        }
        match action {
            // An entry left with no L4 attribute matches any connection, so the whole clause does:
            // leaving it out keeps the rest of the rule (and denies at least what was meant). istiod
            // sends the empty match instead, which ztunnel skips, so its DENY matches nothing.
            AuthzAction::Deny => {}
            // An empty entry (`source: {}`, which Istio's validation refuses) never matches.
            AuthzAction::Allow => {
                let kept: Vec<AuthzMatch> = matches
                    .into_iter()
                    .filter(|m| *m != AuthzMatch::default())
                    .collect();
                if kept.is_empty() {
                    return Ok(None);
                }
                clauses.push(AuthzClause { matches: kept });
            }
        }
    }
    Ok(Some(AuthzRule { clauses }))
}

fn source_match(s: &Source, namespace: &str, origin: &Origin, at: &str) -> Result<AuthzMatch, XdsError> {
    Ok(AuthzMatch {
        source_ips: nets(&s.ip_blocks, origin, &format!("{at}.ipBlocks"))?,
        not_source_ips: nets(&s.not_ip_blocks, origin, &format!("{at}.notIpBlocks"))?,
        namespaces: strings(&s.namespaces),
        not_namespaces: strings(&s.not_namespaces),
        service_accounts: service_accounts(&s.service_accounts, namespace),
        not_service_accounts: service_accounts(&s.not_service_accounts, namespace),
        principals: strings(&s.principals),
        not_principals: strings(&s.not_principals),
        ..AuthzMatch::default()
    })
}

/// A `when` condition on an L4 key, as one match (`values` positive, `notValues` negated); any other key
/// gives an empty match (its rule is a DENY: ALLOW rules with L7 keys were dropped).
fn condition_match(c: &Condition, origin: &Origin, at: &str) -> Result<AuthzMatch, XdsError> {
    let values = format!("{at}.values");
    let not_values = format!("{at}.notValues");
    Ok(match c.key.as_str() {
        "source.namespace" => AuthzMatch {
            namespaces: strings(&c.values),
            not_namespaces: strings(&c.not_values),
            ..AuthzMatch::default()
        },
        "source.principal" => AuthzMatch {
            principals: strings(&c.values),
            not_principals: strings(&c.not_values),
            ..AuthzMatch::default()
        },
        "source.ip" => AuthzMatch {
            source_ips: nets(&c.values, origin, &values)?,
            not_source_ips: nets(&c.not_values, origin, &not_values)?,
            ..AuthzMatch::default()
        },
        "destination.ip" => AuthzMatch {
            destination_ips: nets(&c.values, origin, &values)?,
            not_destination_ips: nets(&c.not_values, origin, &not_values)?,
            ..AuthzMatch::default()
        },
        "destination.port" => AuthzMatch {
            destination_ports: ports(c.values.iter().cloned(), origin, &values)?,
            not_destination_ports: ports(c.not_values.iter().cloned(), origin, &not_values)?,
            ..AuthzMatch::default()
        },
        _ => AuthzMatch::default(),
    })
}

/// istiod's `stringToMatch`: `*` is presence, `*x` a suffix, `x*` a prefix, anything else exact.
fn strings(values: &[String]) -> Vec<StringMatch> {
    values
        .iter()
        .map(|v| {
            if v == "*" {
                StringMatch::Presence
            } else if let Some(suffix) = v.strip_prefix('*') {
                StringMatch::Suffix(suffix.into())
            } else if let Some(prefix) = v.strip_suffix('*') {
                StringMatch::Prefix(prefix.into())
            } else {
                StringMatch::Exact(v.as_str().into())
            }
        })
        .collect()
}

/// `namespace/name`, or a bare name in the policy's namespace (as istiod reads it).
fn service_accounts(values: &[String], namespace: &str) -> Vec<ServiceAccountMatch> {
    values
        .iter()
        .map(|v| {
            let (ns, sa) = v.split_once('/').unwrap_or((namespace, v));
            ServiceAccountMatch {
                namespace: ns.into(),
                service_account: sa.into(),
            }
        })
        .collect()
}

// The policy was validated, so these parse; an error here still refuses it rather than dropping a value
// (a dropped value can widen a policy).
fn nets(values: &[String], origin: &Origin, field: &str) -> Result<Vec<IpNet>, XdsError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let v = v.trim();
            v.parse::<IpNet>()
                .or_else(|_| v.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    origin.error(
                        format!("{field}[{i}]"),
                        format!("{v:?} is not an IP address or CIDR"),
                    )
                })
        })
        .collect()
}

fn ports(values: impl Iterator<Item = String>, origin: &Origin, field: &str) -> Result<Vec<u16>, XdsError> {
    values
        .enumerate()
        .map(|(i, v)| {
            v.trim()
                .parse::<u16>()
                .map_err(|_| origin.error(format!("{field}[{i}]"), format!("{v:?} is not a port")))
        })
        .collect()
}
