//! # mesh-policy
//!
//! Istio's security resources (AuthorizationPolicy, RequestAuthentication, PeerAuthentication) and pure
//! evaluators over them: `evaluate(&PolicySet, &Request) -> Evaluation`, naming the policy and rule that
//! decided.
//!
//! ## Layout
//! This crate is being built (issue "mesh-policy"). Principals are matched against
//! [`mesh_core::SpiffeId::principal`], the ID without `spiffe://`, as Istio writes them.
//!
//! ## Example
//! ```
//! let id = mesh_core::SpiffeId::parse("spiffe://cluster.local/ns/default/sa/client")?;
//! assert_eq!(id.principal(), "cluster.local/ns/default/sa/client");
//! # Ok::<(), mesh_core::Error>(())
//! ```
#![forbid(unsafe_code)]
