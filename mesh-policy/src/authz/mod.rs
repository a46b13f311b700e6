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
mod matcher;
mod request;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

pub use compile::ConditionKey;
pub use matcher::{PathNormalization, normalize_path};
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

/// Compiled AuthorizationPolicies, indexed by namespace. Immutable: build a new set on every change and
/// publish it (see [`crate::PolicyEngine`]).
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    root_namespace: Arc<str>,
    policies: Vec<CompiledPolicy>,
    by_namespace: HashMap<Arc<str>, Vec<usize>>,
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
        // A stable order makes "the first matching policy" (the one explanations name) deterministic.
        compiled.sort_by(|a, b| a.name.cmp(&b.name));
        let mut by_namespace: HashMap<Arc<str>, Vec<usize>> = HashMap::new();
        for (i, policy) in compiled.iter().enumerate() {
            by_namespace.entry(policy.namespace.clone()).or_default().push(i);
        }
        Ok(PolicySet {
            root_namespace: root_namespace.into(),
            policies: compiled,
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

    /// Decides `request` for `target`. Pure: no I/O, and no allocation unless a dry-run policy matches.
    /// A CUSTOM match is returned as [`Evaluation::custom`] for the caller to ask its external authorizer
    /// (see [`Evaluation::with_external`]).
    pub fn evaluate(&self, target: &Target<'_>, request: &Request<'_>) -> Evaluation {
        let mut state = State::default();
        let root = self
            .by_namespace
            .get(&*self.root_namespace)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let local = if target.namespace == &*self.root_namespace {
            &[][..]
        } else {
            self.by_namespace
                .get(target.namespace)
                .map(Vec::as_slice)
                .unwrap_or_default()
        };
        for &i in root.iter().chain(local) {
            let policy = &self.policies[i];
            let Some(rules) = self.applicable_rules(policy, target) else {
                continue;
            };
            let matched = rules.iter().find(|rule| rule.matches(request));
            if policy.dry_run {
                let rule = matched.map(|r| r.index);
                state.dry_run.push(DryRunResult {
                    policy: policy.name.clone(),
                    action: policy.action,
                    matched_rule: rule,
                });
                continue;
            }
            match policy.action {
                Action::Custom => {
                    if let (Some(rule), None) = (matched, &state.custom) {
                        state.custom = Some(CustomCheck {
                            policy: policy.name.clone(),
                            rule: rule.index,
                            provider: policy.provider.clone().unwrap_or_else(|| "".into()),
                        });
                    }
                }
                Action::Deny => {
                    if let (Some(rule), None) = (matched, &state.deny) {
                        state.deny = Some(Decided::new(policy, rule));
                    }
                }
                Action::Allow => {
                    state.allow_policies += 1;
                    if let (Some(rule), None) = (matched, &state.allow) {
                        state.allow = Some(Decided::new(policy, rule));
                    }
                }
                Action::Audit => {
                    if let (Some(rule), None) = (matched, &state.audit) {
                        state.audit = Some(Decided::new(policy, rule));
                    }
                }
            }
        }
        state.finish()
    }

    /// The rules of `policy` that apply at `target`'s enforcement point, or `None` if it does not apply.
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

#[derive(Default)]
struct State {
    custom: Option<CustomCheck>,
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
            custom: self.custom,
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

/// The policy and rule that decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decided {
    /// `namespace/name`.
    pub policy: Arc<str>,
    /// The rule's index in the policy as written.
    pub rule: usize,
    /// The attribute that matched (`source.namespace`), for the explanation.
    pub attribute: &'static str,
    /// The policy's value for it (`ext`).
    pub value: String,
}

impl Decided {
    fn new(policy: &CompiledPolicy, rule: &compile::CompiledRule) -> Decided {
        let (attribute, value) = rule.explain();
        Decided {
            policy: policy.name.clone(),
            rule: rule.index,
            attribute,
            value,
        }
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
            Reason::DeniedBy(d) => write!(
                f,
                "denied by {} rule {}: {} {} matched",
                d.policy, d.rule, d.attribute, d.value
            ),
            Reason::AllowedBy(d) => write!(
                f,
                "allowed by {} rule {}: {} {} matched",
                d.policy, d.rule, d.attribute, d.value
            ),
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
