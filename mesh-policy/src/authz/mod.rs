//! Authorization: AuthorizationPolicies compiled into a [`PolicySet`], and the pure decision
//! [`PolicySet::evaluate`], which says what decided and why.
//!
//! ## Order (istio.io, "Authorization Policy" reference, and the security concepts page, "Implicit
//! enablement")
//! 1. CUSTOM: if a CUSTOM policy matches, its external authorizer must allow the request.
//! 2. DENY: if any DENY policy matches, deny.
//! 3. ALLOW: if no ALLOW policy applies to the target, allow; if one matches, allow; otherwise deny.
//!
//! AUDIT policies never change the decision. Dry-run policies (`istio.io/dry-run: "true"`) are evaluated
//! and reported in [`Evaluation::dry_run`], never enforced.
//!
//! ## Which policies apply
//! - At ztunnel ([`Enforcement::Ztunnel`]): policies without `targetRefs` in the root namespace (mesh-wide)
//!   and in the workload's namespace, whose `selector` (if any) matches the workload's labels; evaluated in
//!   their L4 form (see [`compile`](self) for the conversion rule).
//! - At a waypoint ([`Enforcement::Waypoint`]): policies whose `targetRefs` name the waypoint's `Gateway`, the
//!   called `Service`, or (in the root namespace) the `istio-waypoint` `GatewayClass`; evaluated in full.

mod compile;
mod layer;
mod matcher;
mod request;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

pub use compile::ConditionKey;
pub use layer::{Authorize, AuthorizeLayer, ConnectionInfo, WaypointTarget};
pub use matcher::{PathNormalization, normalize_path};

/// Checks a `paths` entry: a plain pattern, or a valid path template (`{*}`, `{**}`).
pub(crate) fn validate_path_pattern(pattern: &str) -> Result<(), String> {
    matcher::PathMatch::parse(pattern).map(|_| ())
}
pub use request::{AuthInfo, ConnectionAttrs, HttpAttrs, Request};

use crate::error::PolicyError;
use crate::resource::{Action, AuthorizationPolicy};
use compile::CompiledPolicy;

/// Istio's default root namespace: policies there apply mesh-wide.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// Where a decision is enforced, and what it is about.
#[derive(Debug, Clone, Copy)]
pub enum Enforcement<'a> {
    /// At ztunnel, for a destination workload: L4 attributes only.
    Ztunnel,
    /// At a waypoint: full L7 evaluation.
    Waypoint {
        /// The waypoint `Gateway`'s name.
        gateway: &'a str,
        /// The waypoint's namespace.
        gateway_namespace: &'a str,
        /// The called Service (`namespace`, `name`), if the request targets one.
        service: Option<(&'a str, &'a str)>,
    },
}

/// What a decision is about: the destination workload (its namespace and labels) and the enforcement point.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The destination workload's namespace.
    pub namespace: &'a str,
    /// The destination workload's labels, for `selector`.
    pub labels: &'a BTreeMap<String, String>,
    /// Where the decision is made.
    pub enforcement: Enforcement<'a>,
}

/// The index maps are looked up several times per decision with short string keys: foldhash is several
/// times faster than SipHash there, and keys come from configuration, not from the peer.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Compiled AuthorizationPolicies, indexed so that a decision only looks at the policies that can apply.
/// Immutable: build a new set on every change and publish it (see [`crate::PolicyEngine`]).
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    root_namespace: Arc<str>,
    policies: Vec<Arc<CompiledPolicy>>,
    by_namespace: FastMap<Arc<str>, NamespaceIndex>,
}

/// The policies of one namespace, by how they attach.
#[derive(Debug, Clone, Default)]
struct NamespaceIndex {
    /// No selector, no targetRefs: every workload of the namespace (or of the mesh, in the root namespace).
    whole_namespace: Vec<usize>,
    /// With a selector, under its first label (`key` -> `value`): a workload finds them through its own
    /// labels, and each policy sits in exactly one bucket.
    by_first_label: FastMap<Box<str>, FastMap<Box<str>, Vec<usize>>>,
    /// With targetRefs, under (`kind`, `name`) of each target.
    by_target: FastMap<Box<str>, FastMap<Box<str>, Vec<usize>>>,
}

impl PolicySet {
    /// Compiles `policies` with `root_namespace` as the mesh-wide namespace. Fails on the first invalid
    /// policy, naming it and the field.
    pub fn compile<'a>(
        policies: impl IntoIterator<Item = &'a AuthorizationPolicy>,
        root_namespace: &str,
    ) -> Result<PolicySet, PolicyError> {
        let mut compiled = policies
            .into_iter()
            .map(compile::compile)
            .collect::<Result<Vec<_>, _>>()?;
        // Indices follow name order, and the lowest matching index is the one explanations name, so the
        // explanation does not depend on the order policies arrived in.
        compiled.sort_by(|a, b| a.name.cmp(&b.name));
        let mut by_namespace: FastMap<Arc<str>, NamespaceIndex> = FastMap::default();
        for (i, policy) in compiled.iter().enumerate() {
            let index = by_namespace.entry(policy.namespace.clone()).or_default();
            if !policy.target_refs.is_empty() {
                for target in &policy.target_refs {
                    let names = index.by_target.entry(target.kind.as_str().into()).or_default();
                    let list = names.entry(target.name.as_str().into()).or_default();
                    if list.last() != Some(&i) {
                        list.push(i);
                    }
                }
            } else if let Some((key, value)) = policy
                .selector
                .as_ref()
                .and_then(|s| s.match_labels.iter().next())
            {
                index
                    .by_first_label
                    .entry(key.as_str().into())
                    .or_default()
                    .entry(value.as_str().into())
                    .or_default()
                    .push(i);
            } else {
                index.whole_namespace.push(i);
            }
        }
        Ok(PolicySet {
            root_namespace: root_namespace.into(),
            policies: compiled.into_iter().map(Arc::new).collect(),
            by_namespace,
        })
    }

    /// A set with no policies (everything is allowed).
    pub fn empty() -> PolicySet {
        PolicySet {
            root_namespace: DEFAULT_ROOT_NAMESPACE.into(),
            ..PolicySet::default()
        }
    }

    /// Number of policies.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// Whether there are no policies.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Decides `request` for `target`. Pure: no I/O, and no allocation unless a dry-run policy applies.
    /// A CUSTOM match is returned as [`Evaluation::custom`] for the caller to ask its external authorizer
    /// (see [`Evaluation::with_external`]).
    pub fn evaluate(&self, target: &Target<'_>, request: &Request<'_>) -> Evaluation {
        let mut state = State::default();
        // The namespaces whose policies can apply: the root (mesh-wide) and the workload's, and at a waypoint
        // also the waypoint's own and the called Service's, which may differ from the workload's (a waypoint
        // shared across namespaces). Each is searched once.
        let root = &*self.root_namespace;
        let mut namespaces: [Option<&str>; 4] = [Some(root), Some(target.namespace), None, None];
        if let Enforcement::Waypoint {
            gateway_namespace,
            service,
            ..
        } = target.enforcement
        {
            namespaces[2] = Some(gateway_namespace);
            namespaces[3] = service.map(|(ns, _)| ns);
        }
        for position in 0..namespaces.len() {
            let Some(namespace) = namespaces[position] else {
                continue;
            };
            if namespaces[..position].contains(&Some(namespace)) {
                continue;
            }
            let Some(index) = self.by_namespace.get(namespace) else {
                continue;
            };
            for &i in index.candidates(target) {
                self.consider(i, target, request, &mut state);
            }
            // Label buckets: each policy is in one bucket only, so none is seen twice.
            if matches!(target.enforcement, Enforcement::Ztunnel) {
                for (key, value) in target.labels {
                    let bucket = index
                        .by_first_label
                        .get(key.as_str())
                        .and_then(|values| values.get(value.as_str()));
                    for &i in bucket.map(Vec::as_slice).unwrap_or_default() {
                        self.consider(i, target, request, &mut state);
                    }
                }
            }
        }
        state.finish()
    }

    /// Evaluates policy `i` if it applies at `target`, recording what it decides.
    fn consider(&self, i: usize, target: &Target<'_>, request: &Request<'_>, state: &mut State) {
        let policy = &self.policies[i];
        let Some(rules) = self.applicable_rules(policy, target) else {
            return;
        };
        let matched = rules.iter().position(|rule| rule.matches(request));
        if policy.dry_run {
            state.dry_run.push(DryRunResult {
                policy: policy.name.clone(),
                action: policy.action,
                matched_rule: matched.map(|pos| rules[pos].index),
            });
            return;
        }
        let decided = matched.map(|pos| Decided {
            policy: policy.clone(),
            order: i,
            l4: matches!(target.enforcement, Enforcement::Ztunnel),
            position: pos,
        });
        let keep_first = |slot: &mut Option<Decided>, new: Option<Decided>| {
            if let Some(new) = new
                && slot.as_ref().is_none_or(|old| new.order < old.order)
            {
                *slot = Some(new);
            }
        };
        match policy.action {
            Action::Custom => keep_first(&mut state.custom, decided),
            Action::Deny => keep_first(&mut state.deny, decided),
            Action::Allow => {
                state.allow_policies += 1;
                keep_first(&mut state.allow, decided);
            }
            Action::Audit => keep_first(&mut state.audit, decided),
        }
    }
}

impl PolicySet {
    /// The rules of `policy` that apply at `target`'s enforcement point, or `None` if it does not apply.
    /// The index already narrowed the candidates; this is the exact check.
    fn applicable_rules<'p>(
        &self,
        policy: &'p CompiledPolicy,
        target: &Target<'_>,
    ) -> Option<&'p [compile::CompiledRule]> {
        let in_root = *policy.namespace == *self.root_namespace;
        match target.enforcement {
            Enforcement::Ztunnel => {
                if !policy.target_refs.is_empty() {
                    return None;
                }
                let selected = policy.selector.as_ref().is_none_or(|s| s.matches(target.labels));
                let scoped = in_root || *policy.namespace == *target.namespace;
                (selected && scoped).then_some(policy.l4_rules.as_deref()?)
            }
            Enforcement::Waypoint {
                gateway,
                gateway_namespace,
                service,
            } => {
                let attached = policy.target_refs.iter().any(|t| match t.kind.as_str() {
                    "Gateway" => t.name == gateway && *policy.namespace == *gateway_namespace,
                    "GatewayClass" => in_root && t.name == "istio-waypoint",
                    "Service" | "ServiceEntry" => {
                        service.is_some_and(|(ns, name)| t.name == name && *policy.namespace == *ns)
                    }
                    _ => false,
                });
                attached.then_some(policy.rules.as_slice())
            }
        }
    }
}

impl NamespaceIndex {
    /// The policies of this namespace that apply regardless of labels: whole-namespace policies at ztunnel,
    /// targetRef'd policies at a waypoint (narrowed to the waypoint, the Service and the GatewayClass).
    fn candidates<'s>(&'s self, target: &Target<'_>) -> impl Iterator<Item = &'s usize> + 's {
        let (whole, gateway, class, service, entry) = match target.enforcement {
            Enforcement::Ztunnel => (self.whole_namespace.as_slice(), None, None, None, None),
            Enforcement::Waypoint { gateway, service, .. } => {
                let lookup = |kind: &str, name: &str| -> Option<&'s [usize]> {
                    self.by_target.get(kind)?.get(name).map(Vec::as_slice)
                };
                (
                    &[][..],
                    lookup("Gateway", gateway),
                    lookup("GatewayClass", "istio-waypoint"),
                    service.and_then(|(_, name)| lookup("Service", name)),
                    service.and_then(|(_, name)| lookup("ServiceEntry", name)),
                )
            }
        };
        let [gateway, class, service, entry] =
            [gateway, class, service, entry].map(Option::unwrap_or_default);
        whole
            .iter()
            .chain(gateway)
            .chain(class)
            .chain(service)
            .chain(entry)
    }
}

#[derive(Default)]
struct State {
    custom: Option<Decided>,
    deny: Option<Decided>,
    allow: Option<Decided>,
    audit: Option<Decided>,
    allow_policies: usize,
    dry_run: Vec<DryRunResult>,
}

impl State {
    fn finish(self) -> Evaluation {
        let (decision, reason) = if let Some(deny) = self.deny {
            (Decision::Deny, Reason::DeniedBy(deny))
        } else if self.allow_policies == 0 {
            (Decision::Allow, Reason::NoAllowPolicy)
        } else if let Some(allow) = self.allow {
            (Decision::Allow, Reason::AllowedBy(allow))
        } else {
            (
                Decision::Deny,
                Reason::NoAllowMatched {
                    policies: self.allow_policies,
                },
            )
        };
        Evaluation {
            decision,
            reason,
            custom: self.custom.map(|d| CustomCheck {
                policy: d.policy.name.clone(),
                rule: d.rule(),
                provider: d.policy.provider.clone().unwrap_or_else(|| "".into()),
            }),
            audit: self.audit,
            dry_run: self.dry_run,
        }
    }
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Let the request through.
    Allow,
    /// Refuse it (HBONE 401, HTTP 403, a closed connection).
    Deny,
}

/// The policy and rule that decided. The explanation is worked out only when asked for, so deciding
/// allocates nothing.
#[derive(Debug, Clone)]
pub struct Decided {
    policy: Arc<CompiledPolicy>,
    /// The policy's place in the set (lowest wins, for a stable explanation).
    order: usize,
    /// Whether the L4 form of the rules was evaluated.
    l4: bool,
    /// Position in the evaluated rule list.
    position: usize,
}

impl Decided {
    fn compiled_rule(&self) -> &compile::CompiledRule {
        let rules = if self.l4 {
            self.policy.l4_rules.as_deref().unwrap_or_default()
        } else {
            &self.policy.rules
        };
        &rules[self.position]
    }

    /// `namespace/name` of the policy.
    pub fn policy(&self) -> &str {
        &self.policy.name
    }

    /// The rule's index in the policy as written.
    pub fn rule(&self) -> usize {
        self.compiled_rule().index
    }

    /// The attribute that matched (`source.namespace`) and the policy's value for it (`ext`).
    pub fn explanation(&self) -> (&'static str, String) {
        self.compiled_rule().explain()
    }
}

impl PartialEq for Decided {
    fn eq(&self, other: &Self) -> bool {
        self.policy.name == other.policy.name && self.rule() == other.rule()
    }
}

impl Eq for Decided {}

impl fmt::Display for Decided {
    /// `default/deny-ext rule 0: source.namespace ext matched`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (attribute, value) = self.explanation();
        write!(
            f,
            "{} rule {}: {attribute} {value} matched",
            self.policy(),
            self.rule()
        )
    }
}

/// Why the DENY/ALLOW phase decided as it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// A DENY policy matched.
    DeniedBy(Decided),
    /// No ALLOW policy applies to the target, so the default is to allow.
    NoAllowPolicy,
    /// An ALLOW policy matched.
    AllowedBy(Decided),
    /// ALLOW policies apply and none matched.
    NoAllowMatched {
        /// How many ALLOW policies applied.
        policies: usize,
    },
    /// A CUSTOM policy matched and its external authorizer denied (or none is configured).
    ExternalDenied(CustomCheck),
}

/// A CUSTOM policy that matched: its provider must be asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomCheck {
    /// `namespace/name`.
    pub policy: Arc<str>,
    /// The matching rule.
    pub rule: usize,
    /// The extension provider to ask.
    pub provider: Arc<str>,
}

/// What a dry-run policy would have done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DryRunResult {
    /// `namespace/name`.
    pub policy: Arc<str>,
    /// Its action.
    pub action: Action,
    /// The rule that matched, if any.
    pub matched_rule: Option<usize>,
}

/// The outcome of [`PolicySet::evaluate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    /// The decision of the DENY/ALLOW phase.
    pub decision: Decision,
    /// Why.
    pub reason: Reason,
    /// A matching CUSTOM policy whose authorizer must allow the request first.
    pub custom: Option<CustomCheck>,
    /// The first matching AUDIT policy (for logging only).
    pub audit: Option<Decided>,
    /// What dry-run policies would have done.
    pub dry_run: Vec<DryRunResult>,
}

impl Evaluation {
    /// The final decision when there is no external authorizer: a matching CUSTOM policy then denies, as a
    /// check that cannot be made must not let the request through.
    pub fn final_decision(&self) -> Decision {
        match self.custom {
            Some(_) => Decision::Deny,
            None => self.decision,
        }
    }

    /// Applies the external authorizer's answer for [`Evaluation::custom`]: a denial overrides everything.
    pub fn with_external(mut self, external_allowed: bool) -> Evaluation {
        if let Some(check) = self.custom.take()
            && !external_allowed
        {
            self.decision = Decision::Deny;
            self.reason = Reason::ExternalDenied(check);
        }
        self
    }

    /// Whether the request may pass (see [`Evaluation::final_decision`]).
    pub fn is_allowed(&self) -> bool {
        self.final_decision() == Decision::Allow
    }
}

impl fmt::Display for Evaluation {
    /// One line for an operator: `denied by default/deny-ext rule 0: source.namespace ext matched`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let (Some(check), Decision::Allow) = (&self.custom, self.decision) {
            return write!(
                f,
                "pending: {} rule {} needs provider {:?}; without it the request is denied",
                check.policy, check.rule, check.provider
            );
        }
        match &self.reason {
            Reason::DeniedBy(d) => write!(f, "denied by {d}"),
            Reason::AllowedBy(d) => write!(f, "allowed by {d}"),
            Reason::NoAllowPolicy => f.write_str("allowed: no ALLOW policy applies"),
            Reason::NoAllowMatched { policies: 1 } => {
                f.write_str("denied: 1 ALLOW policy applies and does not match")
            }
            Reason::NoAllowMatched { policies } => {
                write!(f, "denied: {policies} ALLOW policies apply and none matches")
            }
            Reason::ExternalDenied(check) => write!(
                f,
                "denied by {} rule {}: external authorizer {:?} refused",
                check.policy, check.rule, check.provider
            ),
        }?;
        for dry in &self.dry_run {
            match dry.matched_rule {
                Some(rule) => write!(
                    f,
                    "; dry-run {} {} would match rule {rule}",
                    dry.action.as_str(),
                    dry.policy
                )?,
                None => write!(
                    f,
                    "; dry-run {} {} would not match",
                    dry.action.as_str(),
                    dry.policy
                )?,
            }
        }
        Ok(())
    }
}
