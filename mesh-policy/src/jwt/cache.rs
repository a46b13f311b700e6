//! [`JwksCache`]: remote key sets, fetched once per URI and shared by every authenticator that uses them.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::JwtError;
use super::fetch::{HttpsFetcher, JwksFetcher};
use super::keys::KeySet;

/// How remote key sets are kept fresh. The defaults follow istiod's (20-minute refresh, 5-second fetch
/// timeout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksCacheConfig {
    /// How long fetched keys are fresh. After that the next request that needs them starts a refresh in
    /// the background and is served the keys it has (stale-while-revalidate).
    pub refresh_interval: Duration,
    /// The least time between two fetches of one URI, whatever asks for them: a flood of tokens with
    /// unknown `kid`s, or requests while the endpoint is down, cause at most one fetch per interval.
    pub min_refetch_interval: Duration,
    /// Timeout of one fetch (connect, TLS, request and body), unless the rule's `timeout` says otherwise.
    pub fetch_timeout: Duration,
}

impl Default for JwksCacheConfig {
    fn default() -> Self {
        JwksCacheConfig {
            refresh_interval: Duration::from_secs(20 * 60),
            min_refetch_interval: Duration::from_secs(30),
            fetch_timeout: Duration::from_secs(5),
        }
    }
}

/// Where a rule's keys come from when they are not inline.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum RemoteSource {
    /// `jwksUri`.
    Jwks(String),
    /// Neither `jwks` nor `jwksUri`: OpenID Connect discovery from the issuer.
    Discovery(String),
}

impl RemoteSource {
    fn uri(&self) -> &str {
        match self {
            RemoteSource::Jwks(uri) | RemoteSource::Discovery(uri) => uri,
        }
    }
}

/// Remote JWKS documents by URI, shared by every [`super::JwtAuthenticator`] compiled with this cache
/// (clone it freely: clones share the entries). An entry lives as long as an authenticator uses it, so
/// recompiling on a configuration change keeps the keys already fetched.
///
/// Freshness rules:
/// - a URI is fetched on first use, within the request that needs it;
/// - keys older than [`JwksCacheConfig::refresh_interval`] are refreshed in the background while the
///   old keys keep serving;
/// - when a fetch fails, the last good keys keep serving (stale-if-error), and the next attempt waits
///   [`JwksCacheConfig::min_refetch_interval`];
/// - a token whose `kid` is not in the set causes one refetch, at most once per
///   [`JwksCacheConfig::min_refetch_interval`] for that URI.
#[derive(Clone)]
pub struct JwksCache {
    shared: Arc<Shared>,
}

struct Shared {
    fetcher: Arc<dyn JwksFetcher>,
    config: JwksCacheConfig,
    entries: Mutex<HashMap<RemoteSource, Weak<Entry>>>,
}

impl fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries = self
            .shared
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        f.debug_struct("JwksCache")
            .field("fetcher", &self.shared.fetcher)
            .field("config", &self.shared.config)
            .field("entries", &entries)
            .finish()
    }
}

/// What the cache knows about one URI (see [`JwksCache::status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksStatus {
    /// Usable keys in the set being served (0 before the first successful fetch).
    pub keys: usize,
    /// When the keys being served were fetched.
    pub fetched_at: Option<Instant>,
    /// The error of the last attempt, if it failed (the previous keys are still being served).
    pub last_error: Option<String>,
    /// Fetch attempts so far, successful or not.
    pub attempts: u64,
}

impl JwksCache {
    /// A cache that fetches with `fetcher`.
    pub fn new(fetcher: Arc<dyn JwksFetcher>, config: JwksCacheConfig) -> Self {
        JwksCache {
            shared: Arc::new(Shared {
                fetcher,
                config,
                entries: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A cache that fetches over HTTPS trusting what `client_config` trusts, with default settings.
    pub fn https(client_config: Arc<rustls::ClientConfig>) -> Self {
        Self::new(
            Arc::new(HttpsFetcher::new(client_config)),
            JwksCacheConfig::default(),
        )
    }

    /// A cache that never fetches: for keys that arrive inline (istiod resolves `jwksUri` itself and
    /// sends the keys in the configuration). Rules with `jwksUri` then refuse their tokens.
    pub fn without_fetching() -> Self {
        Self::new(Arc::new(NoFetch), JwksCacheConfig::default())
    }

    /// The configuration.
    pub fn config(&self) -> &JwksCacheConfig {
        &self.shared.config
    }

    /// Fetches the JWKS at `uri` (a `jwksUri`, or the issuer of a rule using OpenID discovery) now,
    /// whatever its age, if an authenticator uses it. On failure the previous keys keep serving.
    pub async fn refresh(&self, uri: &str) -> Result<(), JwtError> {
        let Some(entry) = self.find(uri) else {
            return Err(JwtError::Fetch {
                uri: uri.to_owned(),
                reason: "no authenticator uses this URI".into(),
            });
        };
        entry.fetch().await.map(|_| ())
    }

    /// What the cache knows about `uri`, if an authenticator uses it.
    pub fn status(&self, uri: &str) -> Option<JwksStatus> {
        let entry = self.find(uri)?;
        let state = entry.state();
        Some(JwksStatus {
            keys: state.keys.as_ref().map_or(0, |k| k.len()),
            fetched_at: state.fetched_at,
            last_error: state.last_error.clone(),
            attempts: state.attempts,
        })
    }

    fn find(&self, uri: &str) -> Option<Arc<Entry>> {
        let entries = self.shared.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .iter()
            .filter(|(source, _)| source.uri() == uri)
            .find_map(|(_, entry)| entry.upgrade())
    }

    /// The entry for `source`, created if no authenticator holds one.
    pub(crate) fn entry(&self, source: RemoteSource, timeout: Option<Duration>) -> Arc<Entry> {
        let mut entries = self.shared.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = entries.get(&source).and_then(Weak::upgrade) {
            return entry;
        }
        entries.retain(|_, e| e.strong_count() > 0);
        let entry = Arc::new(Entry {
            source: source.clone(),
            timeout: timeout.unwrap_or(self.shared.config.fetch_timeout),
            shared: Arc::clone(&self.shared),
            state: Mutex::new(State::default()),
            fetch_lock: tokio::sync::Mutex::new(()),
        });
        entries.insert(source, Arc::downgrade(&entry));
        entry
    }
}

#[derive(Debug)]
struct NoFetch;

impl JwksFetcher for NoFetch {
    fn fetch<'a>(&'a self, uri: &'a str) -> futures_util::future::BoxFuture<'a, Result<String, JwtError>> {
        Box::pin(std::future::ready(Err(JwtError::Fetch {
            uri: uri.to_owned(),
            reason: "this cache does not fetch (JwksCache::without_fetching)".into(),
        })))
    }
}

/// One remote key set.
pub(crate) struct Entry {
    source: RemoteSource,
    timeout: Duration,
    shared: Arc<Shared>,
    state: Mutex<State>,
    /// Held while fetching: concurrent callers wait for one fetch instead of starting their own.
    fetch_lock: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    keys: Option<Arc<KeySet>>,
    fetched_at: Option<Instant>,
    last_attempt: Option<Instant>,
    last_error: Option<String>,
    attempts: u64,
    refreshing: bool,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Entry {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn uri(&self) -> &str {
        self.source.uri()
    }

    fn may_attempt(&self, state: &State, now: Instant) -> bool {
        state
            .last_attempt
            .is_none_or(|t| now.duration_since(t) >= self.shared.config.min_refetch_interval)
    }

    /// The keys to verify with now: fetched on first use; refreshed in the background once stale.
    pub(crate) async fn keys(self: &Arc<Self>) -> Result<Arc<KeySet>, String> {
        let now = Instant::now();
        {
            let mut state = self.state();
            if let (Some(keys), Some(fetched_at)) = (&state.keys, state.fetched_at) {
                let keys = Arc::clone(keys);
                let stale = now.duration_since(fetched_at) >= self.shared.config.refresh_interval;
                if stale && !state.refreshing && self.may_attempt(&state, now) {
                    state.refreshing = true;
                    drop(state);
                    self.refresh_in_background();
                }
                return Ok(keys);
            }
            if !self.may_attempt(&state, now) {
                return Err(state
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "a fetch is in progress".into()));
            }
        }
        self.fetch().await.map_err(|e| e.to_string())
    }

    /// Refetches for a token whose `kid` the set lacks, unless a fetch happened too recently; the new
    /// keys, if a fetch was made and succeeded.
    pub(crate) async fn refetch_for_unknown_kid(self: &Arc<Self>) -> Option<Arc<KeySet>> {
        {
            let state = self.state();
            if !self.may_attempt(&state, Instant::now()) {
                return None;
            }
        }
        self.fetch().await.ok()
    }

    fn refresh_in_background(self: &Arc<Self>) {
        let entry = Arc::clone(self);
        let task = async move {
            let _ = entry.fetch().await;
            entry.state().refreshing = false;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(task);
            }
            // Outside a runtime nothing can run in the background: the stale keys serve, and the flag
            // is cleared so a later call (inside a runtime) refreshes.
            Err(_) => self.state().refreshing = false,
        }
    }

    /// One fetch, shared by concurrent callers: whoever waited for the lock while another fetched gets
    /// that fetch's result.
    async fn fetch(&self) -> Result<Arc<KeySet>, JwtError> {
        let asked = Instant::now();
        let _guard = self.fetch_lock.lock().await;
        {
            let state = self.state();
            if state.last_attempt.is_some_and(|t| t >= asked) {
                return match (&state.last_error, &state.keys) {
                    (None, Some(keys)) => Ok(Arc::clone(keys)),
                    (error, _) => Err(self.error(error.clone().unwrap_or_default())),
                };
            }
        }
        let result = match tokio::time::timeout(self.timeout, self.fetch_document()).await {
            Ok(result) => result,
            Err(_) => Err(self.error(format!("timed out after {:?}", self.timeout))),
        };
        let mut state = self.state();
        state.attempts += 1;
        state.last_attempt = Some(Instant::now());
        match result {
            Ok(keys) => {
                let keys = Arc::new(keys);
                state.keys = Some(Arc::clone(&keys));
                state.fetched_at = state.last_attempt;
                state.last_error = None;
                Ok(keys)
            }
            Err(error) => {
                tracing::warn!(uri = self.uri(), %error, stale = state.keys.is_some(), "JWKS fetch failed");
                state.last_error = Some(error.to_string());
                Err(error)
            }
        }
    }

    fn error(&self, reason: String) -> JwtError {
        JwtError::Fetch {
            uri: self.uri().to_owned(),
            reason,
        }
    }

    async fn fetch_document(&self) -> Result<KeySet, JwtError> {
        let fetcher = &self.shared.fetcher;
        let document = match &self.source {
            RemoteSource::Jwks(uri) => fetcher.fetch(uri).await?,
            RemoteSource::Discovery(issuer) => {
                let discovery = format!(
                    "{}/.well-known/openid-configuration",
                    issuer.trim_end_matches('/')
                );
                let metadata = fetcher.fetch(&discovery).await?;
                let jwks_uri = discovery_jwks_uri(&metadata).map_err(|reason| JwtError::Fetch {
                    uri: discovery.clone(),
                    reason,
                })?;
                fetcher.fetch(&jwks_uri).await?
            }
        };
        KeySet::parse(&document).map_err(|reason| self.error(reason))
    }
}

/// `jwks_uri` of an OpenID provider metadata document.
fn discovery_jwks_uri(metadata: &str) -> Result<String, String> {
    let value: serde_json::Value = serde_json::from_str(metadata)
        .map_err(|e| format!("not an OpenID provider metadata document: {e}"))?;
    value
        .get("jwks_uri")
        .and_then(|v| v.as_str())
        .filter(|uri| uri.starts_with("https://") || uri.starts_with("http://"))
        .map(str::to_owned)
        .ok_or_else(|| "the OpenID provider metadata has no http(s) jwks_uri".to_owned())
}
