//! # mesh-xds
//!
//! The control-plane side of meshkit: a delta-ADS client for Istio's `Address` and `Authorization`
//! resources, the Istio CA client (a [`mesh_core::CertSigner`]), and a local control-plane server.
//!
//! ## Layout
//! This crate is being built (issue "mesh-xds"). Certificates it obtains feed
//! [`mesh_core::CachingCertProvider`]; workloads and services it learns become a
//! [`mesh_core::model::MeshSnapshot`].
//!
//! ## Example
//! ```
//! let td = mesh_core::TrustDomain::default();
//! assert_eq!(td.as_str(), "cluster.local");
//! ```
#![forbid(unsafe_code)]
