//! Workload certificates: what a workload proves its identity with, where they come from, and how they
//! rotate.
//!
//! - [`WorkloadCert`]: a validated X.509-SVID chain, its private key ready for rustls, and the trust bundle.
//! - [`CertProvider`]: hands out a [`CertWatch`] per identity; a watch always holds the current certificate
//!   and changes when it rotates, which is how TLS configurations pick up new certificates without a
//!   restart (see [`crate::tls`]).
//! - [`CertSigner`]: a certificate authority that signs a CSR (the Istio CA, a SPIFFE Workload API, or
//!   `DevCa`).
//! - [`CachingCertProvider`]: a `CertProvider` over a `CertSigner` that fetches on demand, coalesces
//!   concurrent requests, and refreshes at half life.
//! - [`FileCertProvider`]: a `CertProvider` over PEM files that another system issues (cert-manager,
//!   Vault, a mounted Secret), reloaded when they change.

pub(crate) mod caching;
pub(crate) mod file;
pub(crate) mod svid;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor};
use tokio::sync::watch;

pub use caching::{CachingCertConfig, CachingCertProvider};
pub use file::{
    CERT_CHAIN_FILE, CertFiles, DEFAULT_FILE_POLL_INTERVAL, FileCertError, FileCertProvider, KEY_FILE,
    MAX_PEM_FILE_BYTES, MIN_FILE_POLL_INTERVAL, ROOT_CERT_FILE,
};
pub use svid::{svid_identity, verify_chain};

use crate::error::Error;
use crate::identity::SpiffeId;

/// A workload's certificate: a validated X.509-SVID chain (leaf first), its private key, and the trust
/// bundle (root certificates) that peers' certificates are checked against.
///
/// Construction checks that the leaf carries exactly one SPIFFE ID, that it is the expected one, that the
/// private key matches the leaf, and that the roots parse; a `WorkloadCert` is therefore always usable.
pub struct WorkloadCert {
    identity: SpiffeId,
    certified_key: Arc<CertifiedKey>,
    roots: Vec<CertificateDer<'static>>,
    trust_anchors: Arc<[TrustAnchor<'static>]>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl WorkloadCert {
    /// Builds a certificate for `identity` from a chain (leaf first, then intermediates), the leaf's
    /// private key, and the trust bundle's root certificates.
    pub fn new(
        identity: &SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, Error> {
        let leaf = chain.first().ok_or(Error::NotSvid {
            reason: crate::error::SvidErrorKind::EmptyChain,
        })?;
        let info = svid::parse_svid(leaf)?;
        if &info.identity != identity {
            return Err(Error::SignedCertMismatch {
                identity: identity.clone(),
                reason: format!("the certificate is for {}", info.identity),
            });
        }
        if roots.is_empty() {
            return Err(Error::malformed("trust bundle", "no root certificates"));
        }
        let trust_anchors = roots
            .iter()
            .map(|root| {
                webpki::anchor_from_trusted_cert(root)
                    .map(|anchor| anchor.to_owned())
                    .map_err(|e| Error::malformed("root certificate", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let certified_key =
            CertifiedKey::from_der(chain, key, &crate::tls::crypto_provider()).map_err(|e| {
                Error::SignedCertMismatch {
                    identity: identity.clone(),
                    reason: format!("private key does not fit the certificate: {e}"),
                }
            })?;
        Ok(WorkloadCert {
            identity: info.identity,
            certified_key: Arc::new(certified_key),
            roots,
            trust_anchors: trust_anchors.into(),
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }

    /// The SPIFFE ID this certificate proves.
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// The chain, leaf first, as sent in a TLS handshake.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified_key.cert
    }

    /// The leaf and its signing key, as rustls certificate resolvers hand them out.
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.certified_key
    }

    /// The root certificates peers are verified against.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The roots, parsed once for path validation.
    pub fn trust_anchors(&self) -> &[TrustAnchor<'static>] {
        &self.trust_anchors
    }

    /// Start of the leaf's validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of the leaf's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Time left until the leaf expires, zero if it already has.
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or(Duration::ZERO)
    }
}

impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity)
            .field("chain_len", &self.certified_key.cert.len())
            .field("roots", &self.roots.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The current certificate for one identity, updated in place when it rotates.
///
/// Clones share the same source. TLS configurations hold a `CertWatch` and read [`CertWatch::current`]
/// at each handshake, so a rotation applies to new connections at once while established ones keep going.
#[derive(Clone, Debug)]
pub struct CertWatch {
    rx: watch::Receiver<Arc<WorkloadCert>>,
}

impl CertWatch {
    /// A watch that always holds `cert` (certificates loaded from files, tests).
    pub fn fixed(cert: WorkloadCert) -> Self {
        let (_tx, rx) = watch::channel(Arc::new(cert));
        CertWatch { rx }
    }

    /// A watch fed by a provider's own channel: the provider rotates the certificate by sending on the
    /// matching `watch::Sender`, and dropping that sender ends [`CertWatch::changed`] (it returns `None`).
    /// For [`CertProvider`] implementations outside this crate.
    pub fn from_receiver(rx: watch::Receiver<Arc<WorkloadCert>>) -> Self {
        CertWatch { rx }
    }

    /// The certificate to use now.
    pub fn current(&self) -> Arc<WorkloadCert> {
        self.rx.borrow().clone()
    }

    /// The identity this watch serves.
    pub fn identity(&self) -> SpiffeId {
        self.rx.borrow().identity.clone()
    }

    /// Waits until the certificate rotates, and returns the new one; `None` when it will never change again
    /// (a fixed certificate, or the provider forgot this identity).
    pub async fn changed(&mut self) -> Option<Arc<WorkloadCert>> {
        self.rx.changed().await.ok()?;
        Some(self.rx.borrow_and_update().clone())
    }
}

/// Something that can give out a certificate for an identity: the source of every certificate a proxy
/// presents.
///
/// Object-safe, so proxies hold an `Arc<dyn CertProvider>` and embedders can plug in their own.
pub trait CertProvider: Send + Sync + fmt::Debug {
    /// The certificate watch for `identity`, fetching the first certificate if there is none yet.
    fn certificate<'a>(&'a self, identity: &'a SpiffeId) -> BoxFuture<'a, Result<CertWatch, Error>>;

    /// Stops keeping (and renewing) a certificate for `identity`: no workload the proxy serves has it any
    /// more. Watches already handed out keep their last certificate; a later [`certificate`] call fetches
    /// anew. The default keeps nothing per identity, so it has nothing to forget.
    ///
    /// [`certificate`]: CertProvider::certificate
    fn forget(&self, identity: &SpiffeId) {
        let _ = identity;
    }
}

/// A request to a certificate authority: sign this CSR for this identity.
#[derive(Debug, Clone)]
pub struct SignRequest {
    /// The identity the certificate must carry as its only URI SAN.
    pub identity: SpiffeId,
    /// The PKCS#10 CSR, DER-encoded.
    pub csr_der: Vec<u8>,
    /// The same CSR, PEM-encoded (the Istio CA protocol sends PEM).
    pub csr_pem: String,
    /// The lifetime asked for; the signer may grant less.
    pub validity: Duration,
}

/// What a certificate authority returns: the chain and the roots to trust.
#[derive(Debug, Clone)]
pub struct SignedCert {
    /// The issued chain, leaf first, then any intermediates (without the root).
    pub chain: Vec<CertificateDer<'static>>,
    /// The root certificates of the trust bundle.
    pub roots: Vec<CertificateDer<'static>>,
}

/// A certificate authority that signs CSRs: the Istio CA over gRPC, a SPIFFE Workload API, or `DevCa`.
///
/// Object-safe, so [`CachingCertProvider`] can hold any of them as `Arc<dyn CertSigner>`.
pub trait CertSigner: Send + Sync + fmt::Debug {
    /// Signs `request`, or says why not.
    fn sign<'a>(&'a self, request: &'a SignRequest) -> BoxFuture<'a, Result<SignedCert, Error>>;
}

/// A [`CertProvider`] with a fixed set of certificates (loaded from files, or issued up front in tests).
#[derive(Debug, Default)]
pub struct StaticCertProvider {
    certs: std::collections::HashMap<SpiffeId, CertWatch>,
}

impl StaticCertProvider {
    /// An empty provider.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the certificate for its identity.
    pub fn insert(&mut self, cert: WorkloadCert) {
        self.certs.insert(cert.identity().clone(), CertWatch::fixed(cert));
    }
}

impl CertProvider for StaticCertProvider {
    fn certificate<'a>(&'a self, identity: &'a SpiffeId) -> BoxFuture<'a, Result<CertWatch, Error>> {
        let found = self.certs.get(identity).cloned().ok_or_else(|| Error::Signing {
            identity: identity.clone(),
            reason: "no certificate configured for this identity".to_owned(),
        });
        Box::pin(std::future::ready(found))
    }
}
