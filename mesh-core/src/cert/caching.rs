//! [`CachingCertProvider`]: certificates on demand, one CA call per identity at a time, rotation at half
//! life.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{CertProvider, CertSigner, CertWatch, SignRequest, WorkloadCert};
use crate::error::Error;
use crate::identity::SpiffeId;

/// Settings for [`CachingCertProvider`].
#[derive(Debug, Clone)]
pub struct CachingCertConfig {
    /// Lifetime asked of the CA (Istio's `SECRET_TTL`, 24 h by default).
    pub validity: Duration,
    /// How far into a certificate's remaining life it is renewed: 0.5 renews at half life, as Istio does.
    pub refresh_fraction: f64,
    /// Renewal is moved earlier by up to this fraction of the wait, at random, so that certificates issued
    /// together do not all hit the CA at the same instant.
    pub jitter_fraction: f64,
    /// First wait after a failed renewal; it doubles on each further failure ...
    pub retry_initial: Duration,
    /// ... up to this.
    pub retry_max: Duration,
    /// How long one CA call may take before it counts as failed.
    pub sign_timeout: Duration,
}

impl Default for CachingCertConfig {
    fn default() -> Self {
        CachingCertConfig {
            validity: Duration::from_secs(24 * 60 * 60),
            refresh_fraction: 0.5,
            jitter_fraction: 0.05,
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
            sign_timeout: Duration::from_secs(10),
        }
    }
}

type PendingFetch = Shared<BoxFuture<'static, Result<CertWatch, Error>>>;

enum Entry {
    /// The first certificate is being fetched; every caller awaits this one shared fetch.
    Pending(PendingFetch),
    /// A certificate is in hand and a task keeps it fresh.
    Ready {
        watch: CertWatch,
        _refresher: AbortOnDrop,
    },
}

/// Aborts the refresh task when its entry is forgotten or the provider is dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Inner {
    signer: Arc<dyn CertSigner>,
    config: CachingCertConfig,
    entries: Mutex<HashMap<SpiffeId, Entry>>,
}

/// A [`CertProvider`] over a [`CertSigner`]: fetches a certificate the first time an identity is asked
/// for, coalesces concurrent requests for the same identity into one CA call, and renews each certificate
/// in the background before it expires (at half its remaining life, with jitter, retrying with exponential
/// backoff), serving the old certificate until the new one is in hand.
///
/// Must be used inside a tokio runtime: fetches and renewals run as tasks. Clones share the cache.
#[derive(Clone)]
pub struct CachingCertProvider {
    inner: Arc<Inner>,
}

impl CachingCertProvider {
    /// A provider that gets its certificates from `signer`.
    pub fn new(signer: Arc<dyn CertSigner>, config: CachingCertConfig) -> Self {
        CachingCertProvider {
            inner: Arc::new(Inner {
                signer,
                config,
                entries: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Stops renewing the certificate for `identity` and drops it from the cache (its workload left this
    /// node). Existing watches keep their last certificate.
    pub fn forget(&self, identity: &SpiffeId) {
        self.inner.lock_entries().remove(identity);
    }

    /// The identities that have a certificate in hand.
    pub fn identities(&self) -> Vec<SpiffeId> {
        let entries = self.inner.lock_entries();
        let mut ids: Vec<_> = entries
            .iter()
            .filter(|(_, e)| matches!(e, Entry::Ready { .. }))
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// The certificate watch for `identity`: see [`CertProvider::certificate`].
    pub async fn fetch(&self, identity: &SpiffeId) -> Result<CertWatch, Error> {
        let pending = {
            let mut entries = self.inner.lock_entries();
            match entries.get(identity) {
                Some(Entry::Ready { watch, .. }) => return Ok(watch.clone()),
                Some(Entry::Pending(fetch)) => fetch.clone(),
                None => {
                    let fetch = spawn_first_fetch(&self.inner, identity.clone());
                    entries.insert(identity.clone(), Entry::Pending(fetch.clone()));
                    fetch
                }
            }
        };
        pending.await
    }
}

impl CertProvider for CachingCertProvider {
    fn certificate<'a>(&'a self, identity: &'a SpiffeId) -> BoxFuture<'a, Result<CertWatch, Error>> {
        Box::pin(self.fetch(identity))
    }

    fn forget(&self, identity: &SpiffeId) {
        CachingCertProvider::forget(self, identity);
    }
}

impl fmt::Debug for CachingCertProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachingCertProvider")
            .field("signer", &self.inner.signer)
            .field("config", &self.inner.config)
            .field("identities", &self.identities())
            .finish()
    }
}

impl Inner {
    fn lock_entries(&self) -> std::sync::MutexGuard<'_, HashMap<SpiffeId, Entry>> {
        // A panic while holding this lock cannot leave the map half-updated (every update is one insert or
        // remove), so a poisoned lock is still consistent.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Generates a fresh key and CSR for `identity`, has the signer sign it, and checks the result.
    async fn issue(&self, identity: &SpiffeId) -> Result<WorkloadCert, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let csr = csr_for(identity, &key)?;
        let request = SignRequest {
            identity: identity.clone(),
            csr_der: csr.der().to_vec(),
            csr_pem: csr.pem()?,
            validity: self.config.validity,
        };
        let signed = tokio::time::timeout(self.config.sign_timeout, self.signer.sign(&request))
            .await
            .map_err(|_| Error::Signing {
                identity: identity.clone(),
                reason: format!("no answer within {:?}", self.config.sign_timeout),
            })??;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        WorkloadCert::new(identity, signed.chain, key, signed.roots)
    }

    /// How long to keep `cert` before renewing it.
    fn refresh_delay(&self, cert: &WorkloadCert) -> Duration {
        let remaining = cert.remaining(SystemTime::now());
        let wait = remaining.mul_f64(self.config.refresh_fraction.clamp(0.0, 1.0));
        let jitter = self.config.jitter_fraction.clamp(0.0, 1.0) * fastrand::f64();
        wait.mul_f64(1.0 - jitter)
    }
}

/// The CSR Istio's CA expects: an empty subject and the SPIFFE ID as the only SAN.
pub(crate) fn csr_for(identity: &SpiffeId, key: &KeyPair) -> Result<rcgen::CertificateSigningRequest, Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.as_str().try_into()?)];
    Ok(params.serialize_request(key)?)
}

/// Starts the first fetch for `identity` as a task, so it completes (and lands in the cache) even if every
/// caller gives up waiting.
fn spawn_first_fetch(inner: &Arc<Inner>, identity: SpiffeId) -> PendingFetch {
    let weak = Arc::downgrade(inner);
    let task = tokio::spawn(first_fetch(weak, identity.clone()));
    async move {
        task.await.unwrap_or_else(|join_error| {
            Err(Error::Signing {
                identity,
                reason: format!("certificate fetch task ended: {join_error}"),
            })
        })
    }
    .boxed()
    .shared()
}

async fn first_fetch(inner: Weak<Inner>, identity: SpiffeId) -> Result<CertWatch, Error> {
    let Some(strong) = inner.upgrade() else {
        return Err(provider_gone(&identity));
    };
    let result = strong.issue(&identity).await;
    let mut entries = strong.lock_entries();
    // A `forget` while we were fetching removed the pending entry: honour it and cache nothing.
    let still_wanted = matches!(entries.get(&identity), Some(Entry::Pending(_)));
    match result {
        Ok(cert) => {
            let (tx, rx) = watch::channel(Arc::new(cert));
            let watch = CertWatch::from_receiver(rx);
            if still_wanted {
                let refresher = tokio::spawn(refresh_loop(inner, identity.clone(), tx));
                entries.insert(
                    identity,
                    Entry::Ready {
                        watch: watch.clone(),
                        _refresher: AbortOnDrop(refresher),
                    },
                );
            }
            Ok(watch)
        }
        Err(error) => {
            if still_wanted {
                // The next caller tries again.
                entries.remove(&identity);
            }
            tracing::warn!(%identity, %error, "could not fetch a workload certificate");
            Err(error)
        }
    }
}

/// Keeps the certificate behind `tx` fresh until the entry is dropped (which aborts this task).
async fn refresh_loop(inner: Weak<Inner>, identity: SpiffeId, tx: watch::Sender<Arc<WorkloadCert>>) {
    loop {
        let delay = match inner.upgrade() {
            Some(inner) => inner.refresh_delay(&tx.borrow()),
            None => return,
        };
        tokio::time::sleep(delay).await;
        let mut backoff = None;
        loop {
            let Some(strong) = inner.upgrade() else { return };
            match strong.issue(&identity).await {
                Ok(cert) => {
                    tracing::debug!(%identity, not_after = ?cert.not_after(), "rotated workload certificate");
                    tx.send_replace(Arc::new(cert));
                    break;
                }
                Err(error) => {
                    let config = &strong.config;
                    let wait =
                        backoff.map_or(config.retry_initial, |b: Duration| (b * 2).min(config.retry_max));
                    backoff = Some(wait);
                    tracing::warn!(%identity, %error, retry_in = ?wait, "renewing a workload certificate failed; still serving the current one");
                    drop(strong);
                    // Up to 20% jitter so that a CA outage does not end in a synchronized stampede.
                    tokio::time::sleep(wait.mul_f64(1.0 - 0.2 * fastrand::f64())).await;
                }
            }
        }
    }
}

fn provider_gone(identity: &SpiffeId) -> Error {
    Error::Signing {
        identity: identity.clone(),
        reason: "the certificate provider was dropped".to_owned(),
    }
}
