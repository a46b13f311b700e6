//! [`L4PolicySet`]: L4 policies indexed by how they attach, and the decision for one connection.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use mesh_core::model::Workload;

use super::{L4Action, L4Policy, L4Scope, Peer};
use crate::authz::{ConnectionAttrs, Decision};

/// Looked up once per decision (namespace) and once per listed policy, with short keys from configuration:
/// foldhash is several times faster than SipHash there, and no key comes from the peer.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The destination of a connection as ztunnel sees it when it authorizes: the workload's namespace and
/// the policies its control plane says select it.
#[derive(Debug, Clone, Copy)]
pub struct L4Target<'a> {
    /// The destination workload's namespace (for [`L4Scope::Namespace`] policies).
    pub namespace: &'a str,
    /// The keys (`namespace/name`) of the policies listed in the workload's `authorization_policies` (for
    /// [`L4Scope::WorkloadSelector`] policies).
    pub authorization_policies: &'a [Arc<str>],
}

impl<'a> From<&'a Workload> for L4Target<'a> {
    fn from(workload: &'a Workload) -> Self {
        L4Target {
            namespace: &workload.namespace,
            authorization_policies: &workload.authorization_policies,
        }
    }
}

/// An immutable set of [`L4Policy`]s, indexed so that a decision looks only at the policies that can
/// apply to its target: the global ones, its namespace's, and the ones it lists. Build a new set on every
/// change and publish it.
#[derive(Debug, Clone, Default)]
pub struct L4PolicySet {
    /// Ordered by key: a policy's index is its rank, and the lowest-ranked match is the one an explanation
    /// names, so explanations do not depend on the order policies arrived in or were looked up.
    policies: Vec<Arc<L4Policy>>,
    by_key: FastMap<Box<str>, usize>,
    global: Vec<usize>,
    by_namespace: FastMap<Arc<str>, Vec<usize>>,
}

impl L4PolicySet {
    /// Indexes `policies` (owned or shared, e.g. the `Arc`s an xDS watch holds). Two policies with the
    /// same key cannot both be current: the later one replaces the earlier, as a control-plane update does.
    pub fn new<P: Into<Arc<L4Policy>>>(policies: impl IntoIterator<Item = P>) -> L4PolicySet {
        let by_key: BTreeMap<String, Arc<L4Policy>> = policies
            .into_iter()
            .map(|policy| {
                let policy = policy.into();
                (policy.key(), policy)
            })
            .collect();
        let mut set = L4PolicySet::default();
        for (i, (key, policy)) in by_key.into_iter().enumerate() {
            match policy.scope {
                L4Scope::Global => set.global.push(i),
                L4Scope::Namespace => set
                    .by_namespace
                    .entry(policy.namespace.clone())
                    .or_default()
                    .push(i),
                L4Scope::WorkloadSelector => {}
            }
            set.by_key.insert(key.into_boxed_str(), i);
            set.policies.push(policy);
        }
        set
    }

    /// Number of policies.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// Whether there are no policies (every connection is allowed).
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The policy with key `namespace/name`.
    pub fn get(&self, key: &str) -> Option<&Arc<L4Policy>> {
        self.by_key.get(key).map(|&i| &self.policies[i])
    }

    /// Every policy, ordered by key.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &Arc<L4Policy>> + '_ {
        self.policies.iter()
    }

    /// Decides whether `conn` may reach `target`, as ztunnel does (see [the module docs](super)). Pure:
    /// no I/O, no locks, no allocation.
    pub fn evaluate(&self, target: &L4Target<'_>, conn: &ConnectionAttrs<'_>) -> L4Evaluation {
        let peer = Peer::new(conn);
        let mut state = State::default();
        for &i in &self.global {
            self.consider(i, &peer, &mut state);
        }
        for &i in self
            .by_namespace
            .get(target.namespace)
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            self.consider(i, &peer, &mut state);
        }
        for key in target.authorization_policies {
            // An unknown key is a policy not received yet or just removed: ztunnel skips it too.
            let Some(&i) = self.by_key.get(&**key) else {
                continue;
            };
            let policy = &self.policies[i];
            let seen = match policy.scope {
                L4Scope::Global => true,
                L4Scope::Namespace => *policy.namespace == *target.namespace,
                L4Scope::WorkloadSelector => false,
            };
            // A key listed twice is counted twice in the explanation's numbers (as ztunnel counts it);
            // finding duplicates would cost a scan per key, and the decision is the same either way.
            if !seen {
                self.consider(i, &peer, &mut state);
            }
        }
        state.finish(self)
    }

    /// Counts policy `i` as applying and records its first matching rule, unless a lower-ranked policy of
    /// the same kind already matched (it could not change the decision or the explanation).
    fn consider(&self, i: usize, peer: &Peer<'_>, state: &mut State) {
        let policy = &self.policies[i];
        let tally = match (policy.dry_run, policy.action) {
            (false, L4Action::Deny) => &mut state.deny,
            (false, L4Action::Allow) => &mut state.allow,
            (true, L4Action::Deny) => &mut state.dry_deny,
            (true, L4Action::Allow) => &mut state.dry_allow,
        };
        tally.applied += 1;
        if tally.first.is_some_and(|(rank, _)| rank <= i) {
            return;
        }
        if let Some(rule) = policy.rules.iter().position(|rule| rule.matches_peer(peer)) {
            tally.first = Some((i, rule));
        }
    }
}

/// Policies of one kind (enforced or dry-run, ALLOW or DENY) that applied, and the lowest-ranked match.
#[derive(Default)]
struct Tally {
    applied: usize,
    /// (rank, rule index).
    first: Option<(usize, usize)>,
}

#[derive(Default)]
struct State {
    deny: Tally,
    allow: Tally,
    dry_deny: Tally,
    dry_allow: Tally,
}

impl State {
    fn finish(self, set: &L4PolicySet) -> L4Evaluation {
        let decided = |tally: &Tally| {
            tally.first.map(|(rank, rule)| L4Decided {
                policy: set.policies[rank].clone(),
                rule,
            })
        };
        let (decision, reason) = if let Some(deny) = decided(&self.deny) {
            (Decision::Deny, L4Reason::DeniedBy(deny))
        } else if self.allow.applied == 0 {
            let reason = match self.deny.applied {
                0 => L4Reason::NoPolicy,
                deny_policies => L4Reason::NoAllowPolicy { deny_policies },
            };
            (Decision::Allow, reason)
        } else if let Some(allow) = decided(&self.allow) {
            (Decision::Allow, L4Reason::AllowedBy(allow))
        } else {
            (
                Decision::Deny,
                L4Reason::NoAllowMatched {
                    policies: self.allow.applied,
                },
            )
        };
        let dry_run = (self.dry_deny.applied + self.dry_allow.applied > 0).then(|| {
            // The decision with the dry-run policies enforced alongside the others.
            let denied = self.deny.first.is_some() || self.dry_deny.first.is_some();
            let allows = self.allow.applied + self.dry_allow.applied;
            let allowed = allows == 0 || self.allow.first.is_some() || self.dry_allow.first.is_some();
            L4DryRun {
                decision: if !denied && allowed {
                    Decision::Allow
                } else {
                    Decision::Deny
                },
                deny: decided(&self.dry_deny),
                allow: decided(&self.dry_allow),
                deny_policies: self.dry_deny.applied,
                allow_policies: self.dry_allow.applied,
            }
        });
        L4Evaluation {
            decision,
            reason,
            dry_run,
        }
    }
}

/// The policy and rule that matched. Holds the policy itself (one reference count, no allocation), so the
/// explanation outlives the set it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L4Decided {
    policy: Arc<L4Policy>,
    rule: usize,
}

impl L4Decided {
    /// The policy.
    pub fn policy(&self) -> &Arc<L4Policy> {
        &self.policy
    }

    /// The index of its first rule that matched.
    pub fn rule(&self) -> usize {
        self.rule
    }
}

impl fmt::Display for L4Decided {
    /// `default/deny-ext rule 0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} rule {}",
            self.policy.namespace, self.policy.name, self.rule
        )
    }
}

/// Why [`L4PolicySet::evaluate`] decided as it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L4Reason {
    /// An enforced DENY policy matched.
    DeniedBy(L4Decided),
    /// An enforced ALLOW policy matched (and no DENY did).
    AllowedBy(L4Decided),
    /// Enforced ALLOW policies apply and none matched.
    NoAllowMatched {
        /// How many applied.
        policies: usize,
    },
    /// Enforced DENY policies apply, none matched, and no enforced ALLOW policy applies.
    NoAllowPolicy {
        /// How many DENY policies applied.
        deny_policies: usize,
    },
    /// No enforced policy applies (dry-run ones may).
    NoPolicy,
}

/// What the dry-run policies that apply would do if they were enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L4DryRun {
    /// The decision with the dry-run policies enforced alongside the enforced ones.
    pub decision: Decision,
    /// The lowest-ranked dry-run DENY policy that matched.
    pub deny: Option<L4Decided>,
    /// The lowest-ranked dry-run ALLOW policy that matched.
    pub allow: Option<L4Decided>,
    /// How many dry-run DENY policies applied.
    pub deny_policies: usize,
    /// How many dry-run ALLOW policies applied.
    pub allow_policies: usize,
}

/// The outcome of [`L4PolicySet::evaluate`]: the decision and why, printable as one line for an operator
/// (the text is produced only when printed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L4Evaluation {
    /// Allow or deny.
    pub decision: Decision,
    /// Why.
    pub reason: L4Reason,
    /// What dry-run policies would do, if any applies.
    pub dry_run: Option<L4DryRun>,
}

impl L4Evaluation {
    /// Whether the connection may pass.
    pub fn is_allowed(&self) -> bool {
        self.decision == Decision::Allow
    }
}

impl fmt::Display for L4Evaluation {
    /// `denied by default/deny-ext rule 0`, `denied: no ALLOW policy matched (2 applied)`, `allowed: no
    /// policy applies; dry-run: DENY default/new rule 0 matches; if enforced: denied`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reason {
            L4Reason::DeniedBy(d) => write!(f, "denied by {d}"),
            L4Reason::AllowedBy(d) => write!(f, "allowed by {d}"),
            L4Reason::NoAllowMatched { policies } => {
                write!(f, "denied: no ALLOW policy matched ({policies} applied)")
            }
            L4Reason::NoAllowPolicy { deny_policies } => write!(
                f,
                "allowed: no ALLOW policy applies and no DENY policy matched ({deny_policies} applied)"
            ),
            L4Reason::NoPolicy => f.write_str("allowed: no policy applies"),
        }?;
        let Some(dry) = &self.dry_run else {
            return Ok(());
        };
        f.write_str("; dry-run: ")?;
        let mut separator = "";
        for (action, decided, applied) in [
            ("DENY", &dry.deny, dry.deny_policies),
            ("ALLOW", &dry.allow, dry.allow_policies),
        ] {
            match decided {
                Some(d) => write!(f, "{separator}{action} {d} matches")?,
                None if applied > 0 => {
                    write!(f, "{separator}no {action} policy matched ({applied} applied)")?
                }
                None => continue,
            }
            separator = ", ";
        }
        let outcome = match dry.decision {
            Decision::Allow => "allowed",
            Decision::Deny => "denied",
        };
        write!(f, "; if enforced: {outcome}")
    }
}
