//! L4 authorization as Istio's ztunnel enforces it: the policies istiod compiles for node proxies
//! (`istio.security.Authorization`, delivered over xDS) as [`L4Policy`] values, and the pure decision
//! [`L4PolicySet::evaluate`] over an indexed, immutable set of them.
//!
//! `mesh-xds` converts the protobuf to these types (and re-exports them under its historical names,
//! `XdsAuthorization`, `AuthzScope`, ...); the decision lives here, beside the Kubernetes-resource evaluator
//! in [`crate::authz`], so that a proxy can enforce policies from any source without depending on xDS.
//!
//! ## Matching (ztunnel's `rbac.rs`)
//! A policy matches if any [`L4Rule`] matches (a policy without rules matches nothing); a rule if all of
//! its [`L4Clause`]s do (a rule without clauses matches everything); a clause if any of its [`L4Match`]es
//! does (a clause without matches matches everything); and a match if every kind of condition it sets
//! holds: some positive value matches (or none is set) and no `not_` value does. A match that sets no
//! condition at all never matches. Without a peer identity (plaintext), `principals` and
//! `service_accounts` match nothing (so their `not_` lists always hold), while `namespaces` are tested
//! against the empty string, exactly as ztunnel does. Source and destination IPs are compared in their
//! canonical form (an IPv4-mapped IPv6 address is its IPv4 address), as ztunnel sees them.
//!
//! ## Which policies apply (ztunnel's `assert_rbac`)
//! - [`L4Scope::Global`]: every workload in the mesh, whatever its namespace (ztunnel files them under
//!   the empty namespace, not the root namespace).
//! - [`L4Scope::Namespace`]: every workload in the policy's namespace.
//! - [`L4Scope::WorkloadSelector`]: only the workloads that list the policy's key (`namespace/name`) in
//!   their `authorization_policies`. (A listed key applies whatever its scope, as in ztunnel; a key that
//!   names no known policy is skipped.)
//!
//! ## Decision
//! If an enforced DENY policy matches, deny. Otherwise, if no enforced ALLOW policy applies, allow; if one
//! matches, allow; else deny. Dry-run policies never change the decision: they are evaluated and
//! reported in [`L4Evaluation::dry_run`], with the decision they would make if enforced (ztunnel logs the
//! same facts).
//!
//! ## Example
//! ```
//! use std::sync::Arc;
//! use mesh_core::SpiffeId;
//! use mesh_policy::authz::ConnectionAttrs;
//! use mesh_policy::l4::{L4Action, L4Clause, L4Match, L4Policy, L4PolicySet, L4Rule, L4Scope, L4Target};
//!
//! // DENY port 5201 to the workloads of `default`, from any peer without mutual TLS.
//! let policy = L4Policy {
//!     name: "deny-plaintext-iperf".into(),
//!     namespace: "default".into(),
//!     scope: L4Scope::Namespace,
//!     action: L4Action::Deny,
//!     dry_run: false,
//!     rules: vec![L4Rule {
//!         clauses: vec![L4Clause {
//!             matches: vec![L4Match { destination_ports: vec![5201], ..L4Match::default() }],
//!         }, L4Clause {
//!             matches: vec![L4Match {
//!                 not_principals: vec![mesh_policy::l4::StringMatch::Presence],
//!                 ..L4Match::default()
//!             }],
//!         }],
//!     }],
//! };
//! let set = L4PolicySet::new([policy]);
//! let listed: Vec<Arc<str>> = Vec::new();
//! let target = L4Target { namespace: "default", authorization_policies: &listed };
//! let mut conn = ConnectionAttrs {
//!     source: None,
//!     source_ip: "10.0.0.1".parse()?,
//!     destination_ip: "10.0.0.2".parse()?,
//!     destination_port: 5201,
//!     sni: None,
//! };
//! assert_eq!(set.evaluate(&target, &conn).to_string(), "denied by default/deny-plaintext-iperf rule 0");
//! let client = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/client")?;
//! conn.source = Some(&client);
//! assert!(set.evaluate(&target, &conn).is_allowed());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod eval;
#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use mesh_core::SpiffeId;

use crate::authz::ConnectionAttrs;

pub use eval::{L4Decided, L4DryRun, L4Evaluation, L4PolicySet, L4Reason, L4Target};

/// One AuthorizationPolicy as ztunnel enforces it (`istio.security.Authorization`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L4Policy {
    /// The policy's name.
    pub name: Arc<str>,
    /// The policy's namespace.
    pub namespace: Arc<str>,
    /// Which workloads it applies to.
    pub scope: L4Scope,
    /// What it does when it matches.
    pub action: L4Action,
    /// If set, the decision is logged but not enforced.
    pub dry_run: bool,
    /// Its rules; the policy matches if any of them does. (With none, it matches nothing.)
    pub rules: Vec<L4Rule>,
}

impl L4Policy {
    /// The policy's xDS resource name, `namespace/name`, which is also how workloads list it in their
    /// `authorization_policies`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The index of the first rule that `conn` matches, or `None` if the policy does not match.
    pub fn matching_rule(&self, conn: &ConnectionAttrs<'_>) -> Option<usize> {
        let peer = Peer::new(conn);
        self.rules.iter().position(|rule| rule.matches_peer(&peer))
    }
}

/// Which workloads an [`L4Policy`] applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum L4Scope {
    /// Every workload in the mesh (a policy in the root namespace).
    Global,
    /// Every workload in the policy's namespace.
    Namespace,
    /// The workloads that list the policy in their `authorization_policies` (a policy with a selector).
    WorkloadSelector,
}

/// What a matching [`L4Policy`] does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum L4Action {
    /// Allow the connection.
    Allow,
    /// Deny the connection.
    Deny,
}

impl L4Action {
    /// `ALLOW` or `DENY`, as Istio spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            L4Action::Allow => "ALLOW",
            L4Action::Deny => "DENY",
        }
    }
}

/// One rule of a policy: it matches if every clause matches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct L4Rule {
    /// The clauses (the compiled `from`, `to` and `when` parts).
    pub clauses: Vec<L4Clause>,
}

impl L4Rule {
    /// Whether `conn` matches every clause (true for a rule without clauses).
    pub fn matches(&self, conn: &ConnectionAttrs<'_>) -> bool {
        self.matches_peer(&Peer::new(conn))
    }

    fn matches_peer(&self, peer: &Peer<'_>) -> bool {
        self.clauses.iter().all(|clause| clause.matches_peer(peer))
    }
}

/// One clause of a rule: it matches if any of its matches does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct L4Clause {
    /// The alternatives.
    pub matches: Vec<L4Match>,
}

impl L4Clause {
    /// Whether `conn` matches any alternative (true for a clause without alternatives).
    pub fn matches(&self, conn: &ConnectionAttrs<'_>) -> bool {
        self.matches_peer(&Peer::new(conn))
    }

    fn matches_peer(&self, peer: &Peer<'_>) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| m.matches_peer(peer))
    }
}

/// A set of conditions on a connection. Each kind holds if any positive value matches and no `not_` value
/// does; the match holds if every kind it sets holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct L4Match {
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

impl L4Match {
    /// Whether no condition is set (such a match never matches).
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
            && self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.source_ips.is_empty()
            && self.not_source_ips.is_empty()
            && self.destination_ips.is_empty()
            && self.not_destination_ips.is_empty()
            && self.destination_ports.is_empty()
            && self.not_destination_ports.is_empty()
    }

    /// Whether `conn` satisfies every condition set (false if none is set).
    pub fn matches(&self, conn: &ConnectionAttrs<'_>) -> bool {
        self.matches_peer(&Peer::new(conn))
    }

    fn matches_peer(&self, peer: &Peer<'_>) -> bool {
        // ztunnel skips a match without conditions rather than treating it as "match anything": an
        // ALLOW whose only match was emptied must not become an allow-all.
        if self.is_empty() {
            return false;
        }
        holds(&self.destination_ips, &self.not_destination_ips, |net| {
            net.contains(&peer.destination_ip)
        }) && holds(&self.source_ips, &self.not_source_ips, |net| {
            net.contains(&peer.source_ip)
        }) && holds(&self.destination_ports, &self.not_destination_ports, |port| {
            *port == peer.destination_port
        }) && holds(&self.service_accounts, &self.not_service_accounts, |sa| {
            sa.matches_identity(peer.identity)
        }) && holds(&self.principals, &self.not_principals, |m| {
            peer.principal.is_some_and(|principal| m.matches(principal))
        }) && holds(&self.namespaces, &self.not_namespaces, |m| {
            m.matches(peer.namespace)
        })
    }
}

/// One kind of condition: some positive value matches (or none is given), and no negative one does.
fn holds<T>(positive: &[T], negative: &[T], matches: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&matches)) && !negative.iter().any(&matches)
}

/// The connection as the matchers read it, worked out once per policy rather than once per condition.
struct Peer<'a> {
    identity: Option<&'a SpiffeId>,
    /// The principal (identity without `spiffe://`); `None` without an identity, which no string
    /// condition matches, not even `Presence`.
    principal: Option<&'a str>,
    /// The identity's namespace, or `""` without one (or for an identity that is not Istio-shaped), which
    /// is what ztunnel tests `namespaces` against.
    namespace: &'a str,
    source_ip: IpAddr,
    destination_ip: IpAddr,
    destination_port: u16,
}

impl<'a> Peer<'a> {
    fn new(conn: &ConnectionAttrs<'a>) -> Self {
        Peer {
            identity: conn.source,
            principal: conn.source.map(SpiffeId::principal),
            namespace: conn.source.and_then(SpiffeId::namespace).unwrap_or_default(),
            source_ip: conn.source_ip.to_canonical(),
            destination_ip: conn.destination_ip.to_canonical(),
            destination_port: conn.destination_port,
        }
    }
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

impl ServiceAccountMatch {
    /// Whether `identity` is this service account's (in any trust domain). No identity, or one that is not
    /// Istio-shaped (`/ns/<namespace>/sa/<sa>`), matches nothing.
    pub fn matches_identity(&self, identity: Option<&SpiffeId>) -> bool {
        identity.is_some_and(|id| {
            id.namespace() == Some(&*self.namespace) && id.service_account() == Some(&*self.service_account)
        })
    }
}
