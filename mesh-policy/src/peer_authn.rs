//! PeerAuthentication resolved to one question ztunnel asks of every inbound connection: may this workload
//! and port be reached in plaintext (outside the mesh's mutual TLS)?
//!
//! ## Rules (istio.io, "PeerAuthentication" reference; istiod's `ComposePeerAuthentication` and its
//! ambient conversion)
//! - Mesh scope: a policy in the root namespace without a selector (an empty `matchLabels` counts as none).
//! - Namespace scope: a policy in the workload's namespace without a selector.
//! - Workload scope: a policy in the workload's namespace whose selector matches its labels. A policy with a
//!   selector in the root namespace applies to no workload (istiod ignores it).
//! - Within one scope, Istio takes the oldest policy; the resources here carry no creation time, so the
//!   first by name is taken instead (deterministic, and the same answer whenever names follow age).
//! - The mode is resolved mesh, then namespace, then workload, then `portLevelMtls[port]` (keyed by the
//!   workload's target port, only from the workload-scope policy): each scope that is not `UNSET`
//!   overrides the one before; nothing set at all means `PERMISSIVE`.
//! - `STRICT` refuses plaintext; `PERMISSIVE` and `DISABLE` allow it.
//!
//! ## Example
//! ```
//! use std::collections::BTreeMap;
//! use mesh_policy::peer_authn::PeerAuthnSet;
//! use mesh_policy::resource::parse_resources;
//!
//! let yaml = r#"
//! apiVersion: security.istio.io/v1
//! kind: PeerAuthentication
//! metadata: {name: default, namespace: foo}
//! spec:
//!   selector: {matchLabels: {app: finance}}
//!   mtls: {mode: STRICT}
//!   portLevelMtls:
//!     '8080': {mode: DISABLE}
//! "#;
//! let set = PeerAuthnSet::compile(parse_resources(yaml)?.peer_authentications(), "istio-system")?;
//! let finance = BTreeMap::from([("app".to_owned(), "finance".to_owned())]);
//! assert!(!set.plaintext_allowed("foo", &finance, 9090));
//! assert!(set.plaintext_allowed("foo", &finance, 8080));
//! assert_eq!(set.resolve("foo", &finance, 9090).to_string(), "STRICT (workload foo/default)");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::error::PolicyError;
use crate::resource::{MtlsMode, PeerAuthentication, PeerMtls, WorkloadSelector, invalid, parse_port};

/// PeerAuthentications compiled for lookups by namespace, labels and port. Immutable: compile a new set
/// on every change.
#[derive(Debug, Clone)]
pub struct PeerAuthnSet {
    mesh: Option<Scoped>,
    namespaces: HashMap<String, Namespace>,
}

#[derive(Debug, Clone, Default)]
struct Namespace {
    namespace_level: Option<Scoped>,
    /// Workload-scope policies, in precedence order (first match wins).
    workloads: Vec<WorkloadPolicy>,
}

#[derive(Debug, Clone)]
struct Scoped {
    name: String,
    mode: MtlsMode,
}

#[derive(Debug, Clone)]
struct WorkloadPolicy {
    policy: Scoped,
    selector: WorkloadSelector,
    /// Sorted by port.
    ports: Vec<(u16, MtlsMode)>,
}

/// Which scope decided a [`ResolvedMtls`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtlsScope {
    /// No policy set a mode: Istio's default, PERMISSIVE.
    Default,
    /// The mesh-wide policy.
    Mesh,
    /// The namespace's policy.
    Namespace,
    /// The workload's policy.
    Workload,
    /// A `portLevelMtls` entry of the workload's policy.
    Port,
}

/// The effective mode for one workload and port, and what decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedMtls {
    /// STRICT, PERMISSIVE or DISABLE (never UNSET).
    pub mode: MtlsMode,
    /// The scope that decided.
    pub scope: MtlsScope,
    /// `namespace/name` of the deciding policy (`None` for [`MtlsScope::Default`]).
    pub policy: Option<String>,
}

impl ResolvedMtls {
    /// Whether plaintext (non-mTLS) inbound connections are accepted.
    pub fn plaintext_allowed(&self) -> bool {
        self.mode != MtlsMode::Strict
    }
}

impl fmt::Display for ResolvedMtls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.mode {
            MtlsMode::Strict => "STRICT",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Disable => "DISABLE",
            MtlsMode::Unset => "UNSET",
        };
        let scope = match self.scope {
            MtlsScope::Default => return write!(f, "{mode} (default)"),
            MtlsScope::Mesh => "mesh",
            MtlsScope::Namespace => "namespace",
            MtlsScope::Workload => "workload",
            MtlsScope::Port => "port",
        };
        write!(f, "{mode} ({scope} {})", self.policy.as_deref().unwrap_or(""))
    }
}

impl Default for PeerAuthnSet {
    fn default() -> Self {
        Self::empty()
    }
}

impl PeerAuthnSet {
    /// No policies: every workload is PERMISSIVE.
    pub fn empty() -> Self {
        PeerAuthnSet {
            mesh: None,
            namespaces: HashMap::new(),
        }
    }

    /// Compiles `policies` with `root_namespace` (Istio's default is
    /// [`DEFAULT_ROOT_NAMESPACE`](crate::authz::DEFAULT_ROOT_NAMESPACE)) as the mesh-wide namespace. Fails on the first invalid
    /// policy, naming it and the field.
    pub fn compile<'a>(
        policies: impl IntoIterator<Item = &'a PeerAuthentication>,
        root_namespace: &str,
    ) -> Result<PeerAuthnSet, PolicyError> {
        let mut policies: Vec<&PeerAuthentication> = policies.into_iter().collect();
        policies.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        let mut set = PeerAuthnSet::empty();
        for policy in policies {
            policy.validate()?;
            let meta = &policy.metadata;
            let scoped = Scoped {
                name: meta.key(),
                mode: mode_of(policy, policy.spec.mtls.as_ref(), "spec.mtls.mode")?,
            };
            let selector = policy
                .spec
                .selector
                .as_ref()
                .filter(|s| !s.match_labels.is_empty());
            let in_root = meta.namespace == root_namespace;
            match (selector, in_root) {
                (None, true) => {
                    set.mesh.get_or_insert(scoped);
                }
                (None, false) => {
                    set.namespaces
                        .entry(meta.namespace.clone())
                        .or_default()
                        .namespace_level
                        .get_or_insert(scoped);
                }
                // Istio ignores selector policies in the root namespace.
                (Some(_), true) => {}
                (Some(selector), false) => {
                    let mut ports = Vec::with_capacity(policy.spec.port_level_mtls.len());
                    for (port, mtls) in &policy.spec.port_level_mtls {
                        let field = format!("spec.portLevelMtls[{port}]");
                        let number = parse_port(port)
                            .map_err(|reason| invalid("PeerAuthentication", meta, &field, reason))?;
                        ports.push((number, mode_of(policy, Some(mtls), &format!("{field}.mode"))?));
                    }
                    ports.sort_by_key(|(port, _)| *port);
                    set.namespaces
                        .entry(meta.namespace.clone())
                        .or_default()
                        .workloads
                        .push(WorkloadPolicy {
                            policy: scoped,
                            selector: selector.clone(),
                            ports,
                        });
                }
            }
        }
        Ok(set)
    }

    /// The effective mode for a workload in `namespace` with `labels`, on its (target) `port`.
    pub fn resolve(&self, namespace: &str, labels: &BTreeMap<String, String>, port: u16) -> ResolvedMtls {
        let mut resolved = ResolvedMtls {
            mode: MtlsMode::Permissive,
            scope: MtlsScope::Default,
            policy: None,
        };
        let mut apply = |policy: &Scoped, mode: MtlsMode, scope: MtlsScope| {
            if mode != MtlsMode::Unset {
                resolved = ResolvedMtls {
                    mode,
                    scope,
                    policy: Some(policy.name.clone()),
                };
            }
        };
        if let Some(mesh) = &self.mesh {
            apply(mesh, mesh.mode, MtlsScope::Mesh);
        }
        if let Some(ns) = self.namespaces.get(namespace) {
            if let Some(policy) = &ns.namespace_level {
                apply(policy, policy.mode, MtlsScope::Namespace);
            }
            if let Some(workload) = ns.workloads.iter().find(|w| w.selector.matches(labels)) {
                apply(&workload.policy, workload.policy.mode, MtlsScope::Workload);
                if let Ok(i) = workload.ports.binary_search_by_key(&port, |(p, _)| *p) {
                    apply(&workload.policy, workload.ports[i].1, MtlsScope::Port);
                }
            }
        }
        resolved
    }

    /// Whether a plaintext inbound connection to this workload and port is accepted: `false` for STRICT,
    /// `true` for PERMISSIVE and DISABLE.
    pub fn plaintext_allowed(&self, namespace: &str, labels: &BTreeMap<String, String>, port: u16) -> bool {
        let mut mode = MtlsMode::Permissive;
        let mut apply = |m: MtlsMode| {
            if m != MtlsMode::Unset {
                mode = m;
            }
        };
        // The same walk as `resolve`, without building its explanation (this runs per connection).
        if let Some(mesh) = &self.mesh {
            apply(mesh.mode);
        }
        if let Some(ns) = self.namespaces.get(namespace) {
            if let Some(policy) = &ns.namespace_level {
                apply(policy.mode);
            }
            if let Some(workload) = ns.workloads.iter().find(|w| w.selector.matches(labels)) {
                apply(workload.policy.mode);
                if let Ok(i) = workload.ports.binary_search_by_key(&port, |(p, _)| *p) {
                    apply(workload.ports[i].1);
                }
            }
        }
        mode != MtlsMode::Strict
    }
}

fn mode_of(
    policy: &PeerAuthentication,
    mtls: Option<&PeerMtls>,
    field: &str,
) -> Result<MtlsMode, PolicyError> {
    mtls.map_or(Ok(MtlsMode::Unset), PeerMtls::mode)
        .map_err(|reason| invalid("PeerAuthentication", &policy.metadata, field, reason))
}
