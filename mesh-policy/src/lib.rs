//! # mesh-policy
//!
//! Istio's security resources and the decisions they make, as pure functions over immutable, compiled
//! sets: the same answer Istio gives, plus the reason.
//!
//! ## Layout
//! - [`resource`]: AuthorizationPolicy, RequestAuthentication and PeerAuthentication as `kubectl get -o
//!   yaml` prints them ([`resource::parse_resources`]), validated with errors that name the field.
//! - [`authz`]: [`PolicySet`] (compiled, indexed by namespace) and [`PolicySet::evaluate`], for ztunnel (L4)
//!   and waypoints (L7), returning an [`Evaluation`] that prints as one readable line.
//! - [`PolicyEngine`]: the current set behind a `watch`, and the [`ExternalAuthorizer`] hook for CUSTOM.
//! - [`PolicyError`]: the crate's one error type.
//!
//! ## Example
//! ```
//! use std::collections::BTreeMap;
//! use mesh_core::SpiffeId;
//! use mesh_policy::authz::{ConnectionAttrs, Enforcement, Request, Target};
//! use mesh_policy::{PolicySet, resource::parse_resources};
//!
//! let yaml = r#"
//! apiVersion: security.istio.io/v1
//! kind: AuthorizationPolicy
//! metadata: {name: deny-ext, namespace: default}
//! spec:
//!   action: DENY
//!   rules:
//!   - from:
//!     - source: {namespaces: [ext]}
//! "#;
//! let parsed = parse_resources(yaml)?;
//! let set = PolicySet::compile(parsed.authorization_policies(), "istio-system")?;
//! let peer = SpiffeId::parse("spiffe://cluster.local/ns/ext/sa/client")?;
//! let request = Request::l4(ConnectionAttrs {
//!     source: Some(&peer),
//!     source_ip: "10.0.0.1".parse()?,
//!     destination_ip: "10.0.0.2".parse()?,
//!     destination_port: 8080,
//!     sni: None,
//! });
//! let labels = BTreeMap::new();
//! let target = Target { namespace: "default", labels: &labels, enforcement: Enforcement::Ztunnel };
//! let evaluation = set.evaluate(&target, &request);
//! assert!(!evaluation.is_allowed());
//! assert_eq!(evaluation.to_string(), "denied by default/deny-ext rule 0: source.namespace ext matched");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

pub mod authz;
mod engine;
mod error;
pub mod resource;

pub use authz::{Decision, Evaluation, PolicySet};
pub use engine::{ExternalAuthorizer, PolicyEngine, PolicyPublisher, channel};
pub use error::PolicyError;
