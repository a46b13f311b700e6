//! rustls configurations for SPIFFE mutual TLS, as Istio's ztunnel speaks it on the HBONE port.
//!
//! Both sides: TLS 1.3 only, suites AES-128-GCM and AES-256-GCM (aws-lc-rs, see [`crypto_provider`]), ALPN `h2`, a certificate from
//! a [`CertWatch`] read at every handshake (so rotation needs no restart), and peers verified against the
//! trust bundle of that same certificate.
//!
//! - [`server_config`]: requires a client certificate chained to the bundle whose SPIFFE ID is in one of
//!   the accepted trust domains. After the handshake, [`peer_identity`] reads the client's [`SpiffeId`].
//! - [`client_config`]: sends no SNI and never resumes sessions (as ztunnel does); accepts the server only
//!   if its SPIFFE ID is one of the expected identities. Connect with [`server_name`] as the name, since
//!   mesh peers are named by identity, not by DNS.
//!
//! Verification failures surface as `rustls::Error::InvalidCertificate`, with chain problems mapped to
//! rustls' own certificate errors (expired, unknown issuer, ...) and identity problems carried as a
//! [`crate::Error`] inside `CertificateError::Other`: [`identity_error`] digs it out.

mod verifier;

use std::sync::{Arc, OnceLock};

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, CommonState, ServerConfig, SignatureScheme};
use rustls_pki_types::ServerName;

pub use verifier::{ClientCertVerifier, ServerCertVerifier};

use crate::cert::CertWatch;
use crate::cert::svid::parse_svid;
use crate::error::Error;
use crate::identity::{SpiffeId, TrustDomain};

/// The ALPN protocol both sides of HBONE require.
pub const ALPN_H2: &[u8] = b"h2";

/// The crypto provider meshkit uses everywhere: aws-lc-rs, restricted to the two TLS 1.3 AES-GCM suites
/// Istio's ztunnel offers.
///
/// AES-128-GCM is listed first, so it is what our clients ask for; servers honour the client's order
/// (rustls' default), so a client that prefers AES-256-GCM, as Istio's ztunnel does, still gets it. Why
/// 128 first: it is what Envoy (BoringSSL) and Go negotiate, the suite every TLS 1.3 peer must support,
/// and on AES-NI hardware it costs about three quarters of AES-256-GCM per byte (`openssl speed`:
/// 4.1 against 3.1 GB/s here), which is the largest single item in a bulk HBONE transfer's CPU
/// (docs/performance.md).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider};
            Arc::new(CryptoProvider {
                cipher_suites: vec![
                    cipher_suite::TLS13_AES_128_GCM_SHA256,
                    cipher_suite::TLS13_AES_256_GCM_SHA384,
                ],
                ..default_provider()
            })
        })
        .clone()
}

/// The server name a client passes to `connect`: ztunnel's `0.0.0.0`. With SNI disabled it never goes on
/// the wire, and the verifier ignores it in favour of the expected SPIFFE identities.
pub fn server_name() -> ServerName<'static> {
    ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into())
}

/// A mutual-TLS server configuration presenting `cert`'s current certificate and accepting clients whose
/// certificate chains to its trust bundle and names an identity in one of `accepted_trust_domains`
/// (usually just the local trust domain, as Istio's ztunnel requires).
pub fn server_config(
    cert: CertWatch,
    accepted_trust_domains: Vec<TrustDomain>,
) -> Result<Arc<ServerConfig>, Error> {
    let verifier = Arc::new(ClientCertVerifier::new(cert.clone(), accepted_trust_domains));
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(WatchResolver(cert)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Mesh clients never resume, so issuing tickets or caching sessions would only cost time and memory.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// A mutual-TLS client configuration presenting `cert`'s current certificate and accepting a server only
/// if its SPIFFE ID is one of `expected` (the destination workload's identity, plus a service's
/// `subjectAltNames`). No SNI, no session resumption, ALPN `h2`.
pub fn client_config(cert: CertWatch, expected: Vec<SpiffeId>) -> Result<Arc<ClientConfig>, Error> {
    let verifier = Arc::new(ServerCertVerifier::new(cert.clone(), expected));
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(WatchResolver(cert)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The SPIFFE ID the peer proved in a completed handshake (our verifiers already checked the chain and
/// the identity rules; this reads the identity back out of the leaf).
pub fn peer_identity(connection: &CommonState) -> Result<SpiffeId, Error> {
    let leaf = connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(Error::NotSvid {
            reason: crate::error::SvidErrorKind::EmptyChain,
        })?;
    Ok(parse_svid(leaf)?.identity)
}

/// The meshkit error inside a rustls certificate error, if a meshkit verifier raised it (wrong identity,
/// foreign trust domain, not an SVID).
pub fn identity_error(error: &rustls::Error) -> Option<&Error> {
    match error {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
            other.0.downcast_ref::<Error>()
        }
        _ => None,
    }
}

/// Hands rustls whatever certificate the watch holds at handshake time.
#[derive(Debug)]
struct WatchResolver(CertWatch);

impl ResolvesServerCert for WatchResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified_key().clone())
    }
}

impl ResolvesClientCert for WatchResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified_key().clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
