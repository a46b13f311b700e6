//! Istio's certificate service (`istio.v1.auth.IstioCertificateService/CreateCertificate`), both ends.
//!
//! ## Layout
//! - [`IstioCaSigner`]: a [`mesh_core::CertSigner`] that asks istiod (or the local control plane) to sign,
//!   as ztunnel's CA client does: the CSR in PEM, the validity in seconds, and in node-proxy mode
//!   `metadata = {"ImpersonatedIdentity": "<spiffe id>"}`. Wrap it in [`mesh_core::CachingCertProvider`].
//! - [`CaService`]: the server side for a local control plane, signing with a [`mesh_core::DevCa`]. It
//!   decides which identity a caller may have certified the way istiod does: authenticate the caller
//!   ([`CallerAuthenticator`]: [`StaticTokens`], [`ClientCertAuthenticator`], [`DevAnyToken`]), then allow
//!   its own identity, or, for a trusted node proxy, the identity of a workload running on its node
//!   ([`NodeAuthorizer`]).
//!
//! ## Example
//! A CA service behind TLS on a loopback port, and a signer using it:
//! ```
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use mesh_core::{DevCa, SpiffeId, TrustDomain};
//! use mesh_xds::ca::{CaService, Caller, IstioCaConfig, IstioCaSigner, StaticTokens};
//! use mesh_xds::transport::{self, CallCredentials, GrpcClientConfig, TlsIncoming, TokenSource};
//!
//! let ca = Arc::new(DevCa::new(TrustDomain::new("cluster.local")?, Duration::from_secs(3600))?);
//! let workload = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b")?;
//! let service = CaService::new(ca.clone())
//!     .with_authenticator(StaticTokens::new().with("token-b", Caller::new(workload)));
//!
//! let tls = transport::local_server_tls(&ca, &["localhost"], &[], Duration::from_secs(3600))?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let port = listener.local_addr()?.port();
//! let incoming = TlsIncoming::new(listener, tls, Default::default())?;
//! tokio::spawn(
//!     tonic::transport::Server::builder().serve_with_incoming(service.into_server(), incoming),
//! );
//!
//! let channel = transport::connect_lazy(
//!     &GrpcClientConfig::new(format!("https://localhost:{port}")).with_roots_pem(ca.root_pem()),
//! )?;
//! let credentials = CallCredentials::bearer(TokenSource::Literal("token-b".into()))?;
//! let signer = IstioCaSigner::new(channel, credentials, IstioCaConfig::default());
//! # let _ = signer;
//! # Ok(())
//! # }
//! ```

mod authn;
mod client;
mod csr;
mod server;
#[cfg(test)]
mod tests;

pub use authn::{
    CallInfo, Caller, CallerAuthenticator, ClientCertAuthenticator, DevAnyToken, NodeAuthorizer, StaticTokens,
};
pub use client::{IstioCaConfig, IstioCaSigner};
pub use server::CaService;

/// The metadata key a node proxy sets to ask for a workload's certificate on its behalf.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// At most this many certificates are accepted in a CA response's chain (and in its roots).
pub const MAX_CHAIN_CERTS: usize = 16;
