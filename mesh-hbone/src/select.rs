//! [`ServerConfigSelector`]: which certificate an [`HboneAcceptor`](crate::HboneAcceptor) presents on each
//! connection.
//!
//! In shared (node) mode one proxy serves HBONE for every workload on its node, all on port 15008, and
//! must prove, on each inbound connection, the identity of the workload the connection is for: the one
//! whose IP the connection arrived on (its local address). Istio's ztunnel looks that workload up before
//! the TLS handshake and presents its certificate; [`WorkloadConfigSelector`] does the same from a lookup
//! the embedder supplies (normally the mesh snapshot's workload by IP) and a [`CertProvider`].

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use mesh_core::{CertProvider, CertWatch, SpiffeId, TrustDomain, WorkloadCert, tls};
use rustls::ServerConfig;

use crate::error::HboneError;

/// Chooses the TLS configuration (and so the certificate) for a connection from the local address it
/// arrived on, before the handshake.
///
/// Object-safe: an acceptor holds an `Arc<dyn ServerConfigSelector>` (see
/// [`HboneAcceptor::with_selector`](crate::HboneAcceptor::with_selector)). Async because the certificate
/// may have to be fetched from the CA the first time. The acceptor bounds the call by its handshake timeout
/// (selection and TLS handshake share that budget), and closes the connection without a handshake when it
/// fails. Return [`HboneError::NoLocalIdentity`] for an address no workload has.
pub trait ServerConfigSelector: Send + Sync + fmt::Debug {
    /// The configuration to present on a connection that arrived on `local` (IPv4-mapped addresses
    /// already turned into IPv4).
    fn select(&self, local: SocketAddr) -> BoxFuture<'_, Result<Arc<ServerConfig>, HboneError>>;
}

/// The lookup from a local address to the workload identity it serves.
type IdentityOf = dyn Fn(SocketAddr) -> Option<SpiffeId> + Send + Sync;

/// A [`ServerConfigSelector`] for a node proxy: maps the local address to a workload identity with a
/// closure, gets that identity's certificate from a [`CertProvider`], and builds its configuration with
/// [`tls::server_config`], accepting clients of the given trust domains.
///
/// Configurations are cached per identity. Rotation needs no rebuild (a configuration reads its
/// [`CertWatch`] at every handshake); a cached one is rebuilt only when the provider hands out a different
/// watch for the identity (it forgot the identity and fetched it anew, say), so a connection never gets a
/// certificate the provider has stopped renewing. The cache holds at most [`Self::MAX_CACHED`] identities.
pub struct WorkloadConfigSelector {
    identity_of: Box<IdentityOf>,
    certs: Arc<dyn CertProvider>,
    trust_domains: Vec<TrustDomain>,
    cache: Mutex<HashMap<SpiffeId, Cached>>,
}

/// A built configuration, and the watch it reads its certificate from.
struct Cached {
    watch: CertWatch,
    config: Arc<ServerConfig>,
}

impl WorkloadConfigSelector {
    /// Identities whose configuration is kept; beyond this, one is evicted per new identity (and simply
    /// rebuilt when it is next needed). Far above the workloads one node runs.
    pub const MAX_CACHED: usize = 4096;

    /// A selector presenting, on each connection, the certificate from `certs` of the identity
    /// `identity_of` returns for the connection's local address (`None`: no workload there, and the
    /// connection is refused before TLS), and accepting clients from `trust_domains` (usually just the
    /// local one, as Istio's ztunnel does).
    pub fn new<F>(identity_of: F, certs: Arc<dyn CertProvider>, trust_domains: Vec<TrustDomain>) -> Self
    where
        F: Fn(SocketAddr) -> Option<SpiffeId> + Send + Sync + 'static,
    {
        WorkloadConfigSelector {
            identity_of: Box::new(identity_of),
            certs,
            trust_domains,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// How many identities have a cached configuration.
    pub fn cached(&self) -> usize {
        lock(&self.cache).len()
    }

    /// The cached configuration for `identity`, if it was built from the watch that holds `current`.
    fn cached_config(&self, identity: &SpiffeId, current: &Arc<WorkloadCert>) -> Option<Arc<ServerConfig>> {
        let cache = lock(&self.cache);
        let cached = cache.get(identity)?;
        // Clones of one watch share their value, so the same `Arc` means the same watch; a rotation between
        // the two reads only costs a needless rebuild.
        Arc::ptr_eq(&cached.watch.current(), current).then(|| cached.config.clone())
    }

    fn store(&self, identity: SpiffeId, watch: CertWatch, config: Arc<ServerConfig>) {
        let mut cache = lock(&self.cache);
        if cache.len() >= Self::MAX_CACHED
            && !cache.contains_key(&identity)
            && let Some(evict) = cache.keys().next().cloned()
        {
            cache.remove(&evict);
        }
        cache.insert(identity, Cached { watch, config });
    }

    async fn select_for(&self, local: SocketAddr) -> Result<Arc<ServerConfig>, HboneError> {
        let identity = (self.identity_of)(local).ok_or(HboneError::NoLocalIdentity { local })?;
        let failed = |identity: &SpiffeId, source| HboneError::ServerCertificate {
            local,
            identity: identity.clone(),
            source: Box::new(source),
        };
        let watch = self
            .certs
            .certificate(&identity)
            .await
            .map_err(|e| failed(&identity, e))?;
        if let Some(config) = self.cached_config(&identity, &watch.current()) {
            return Ok(config);
        }
        let config = tls::server_config(watch.clone(), self.trust_domains.clone())
            .map_err(|e| failed(&identity, e))?;
        self.store(identity, watch, config.clone());
        Ok(config)
    }
}

impl ServerConfigSelector for WorkloadConfigSelector {
    fn select(&self, local: SocketAddr) -> BoxFuture<'_, Result<Arc<ServerConfig>, HboneError>> {
        Box::pin(self.select_for(local))
    }
}

impl fmt::Debug for WorkloadConfigSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadConfigSelector")
            .field("certs", &self.certs)
            .field("trust_domains", &self.trust_domains)
            .field("cached", &self.cached())
            .finish_non_exhaustive()
    }
}

/// A poisoned lock means a panic mid-update of a plain map, which leaves it consistent.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
