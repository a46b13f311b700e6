//! # mesh-core
//!
//! The vocabulary every other meshkit crate speaks, with no networking of its own: who a workload is
//! (SPIFFE identities), how it proves it (workload certificates, a caching and rotating certificate
//! provider, mutual-TLS configurations for rustls), and what the mesh looks like (workloads, services and an
//! immutable, indexed snapshot published through a `watch` channel).
//!
//! ## Layout
//! - [`identity`]: [`TrustDomain`], [`SpiffeId`] (strict parsing, Istio helpers), [`PeerIdentity`].
//! - [`cert`]: [`WorkloadCert`], the object-safe [`CertProvider`] and [`CertSigner`] traits, and
//!   [`CachingCertProvider`], which fetches on demand, coalesces, and rotates at half life, and
//!   [`FileCertProvider`], which serves certificates another system writes to disk.
//! - [`tls`]: rustls server and client configurations for SPIFFE mutual TLS (TLS 1.3, ALPN `h2`), their
//!   verifiers, and peer-identity extraction.
//! - `ca` (feature `dev-ca`): `DevCa`, a development certificate authority that signs SPIFFE CSRs.
//! - [`model`]: [`Workload`](model::Workload), [`Service`](model::Service), [`MeshSnapshot`](model::MeshSnapshot)
//!   and its publisher.
//! - [`drain`]: graceful shutdown, a trigger that waits for every watcher to finish.
//! - [`sys`]: Linux socket options of a transparent proxy (original destination, marks, transparent
//!   sockets) and the allocator tuning of a proxy process; the one place `unsafe` may live.
//! - [`Error`]: the crate's one error type.
//!
//! ## Example
//! Parse an identity, and read its Istio parts:
//! ```
//! use mesh_core::{SpiffeId, TrustDomain};
//!
//! let td = TrustDomain::new("cluster.local")?;
//! let id = SpiffeId::istio(&td, "default", "client")?;
//! assert_eq!(id.as_str(), "spiffe://cluster.local/ns/default/sa/client");
//! assert_eq!(id.namespace(), Some("default"));
//! assert!(SpiffeId::parse("spiffe://cluster.local/ns/../sa/x").is_err());
//! # Ok::<(), mesh_core::Error>(())
//! ```
// `deny`, not `forbid`: `sys::allocator` is allowed its one `mallopt` call, and nothing else is.
#![deny(unsafe_code)]

#[cfg(feature = "dev-ca")]
pub mod ca;
pub mod cert;
pub mod drain;
mod error;
pub mod identity;
pub mod model;
pub mod sys;
pub mod tls;

#[cfg(feature = "dev-ca")]
pub use ca::DevCa;
pub use cert::{
    CachingCertProvider, CertFiles, CertProvider, CertSigner, CertWatch, FileCertProvider, WorkloadCert,
};
pub use error::{Error, IdentityErrorKind, SvidErrorKind};
pub use identity::{PeerIdentity, SpiffeId, TrustDomain};
