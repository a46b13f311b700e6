//! Certificates from a SPIFFE Workload API (a SPIRE agent's socket), as the alternative to the Istio CA.
//!
//! [`WorkloadApiCertProvider`] is a [`CertProvider`]: it keeps one `FetchX509SVID` stream open to the
//! Workload API on a Unix domain socket and hands out a [`CertWatch`] per identity the agent issues. The
//! agent, not this side, generates keys and rotates SVIDs; every response it sends is the complete set of
//! SVIDs for this workload, and each one updates the watches of the identities it carries.
//!
//! ## Behaviour
//! - Every request carries the metadata `workload.spiffe.io: true` ([`SECURITY_HEADER`]), which the
//!   SPIFFE Workload Endpoint specification makes mandatory against request forgery.
//! - [`CertProvider::certificate`] waits for the agent's first response (at most
//!   [`WorkloadApiConfig::first_response_timeout`]), then answers from the latest one: the watch for the
//!   identity, or [`mesh_core::Error::Signing`] saying that the agent does not issue it, that its SVID was
//!   unusable, or that the agent never answered (with the last connection error).
//! - Each SVID is checked on its own: its chain, key and bundle decode, [`WorkloadCert::new`] accepts them
//!   for the entry's `spiffe_id`, and the chain is valid now up to a root of the entry's own bundle. A bad
//!   entry is logged and skipped (its identity keeps its previous certificate); the others still apply.
//!   The bundle becomes the certificate's trust roots.
//! - An identity absent from a response has been withdrawn, as is every identity when the agent answers
//!   `PermissionDenied`: its sender is dropped, so [`CertWatch::changed`] returns `None` and later
//!   requests for it fail. (A `CertWatch` cannot be emptied, so a TLS configuration already holding it
//!   keeps its last certificate until it is rebuilt.) A response with no SVIDs at all breaks the
//!   specification's mandatory-field rule and is discarded.
//! - When the stream breaks or the agent is away, the provider reconnects with exponential backoff and
//!   jitter ([`WorkloadApiConfig::backoff`], starting over after a stream that delivered a response), and
//!   keeps serving the last certificates meanwhile. `InvalidArgument` and `Unimplemented` are not
//!   retried, as the specification says: they mean this client is wrong for that server.
//! - What the agent can make us hold is bounded: one response's size
//!   ([`WorkloadApiConfig::max_response_bytes`]), the SVIDs taken from it
//!   ([`WorkloadApiConfig::max_svids`]), and the certificates in one chain
//!   ([`MAX_CHAIN_CERTS`](crate::ca::MAX_CHAIN_CERTS)) and one bundle.
//! - Ignored on purpose: `federated_bundles` (meshkit's TLS configurations trust only the certificate's
//!   own trust domain's roots, as Istio's ztunnel does, so foreign roots would not be used), `crl` (no
//!   revocation checking anywhere in meshkit), and `hint` (SVIDs are chosen by identity).
//!
//! The socket path is configuration ([`WorkloadApiConfig::new`], or [`WorkloadApiConfig::from_endpoint`]
//! for a `unix:///path` address as `SPIFFE_ENDPOINT_SOCKET` holds it); reading the environment is the
//! binary's job. Only Unix domain sockets are supported, as SPIRE serves the Workload API.
//!
//! ## Why not the `spiffe` crate
//! The `spiffe` crate (0.19, `workload-api-x509` only) fits the dependency graph: no ring, and the same
//! tonic, prost, hyper and h2 majors. It does not fit the behaviour: its response parsing fails the whole
//! response when one SVID is bad (here a bad SVID must cost only itself), its generated protobuf types
//! are private (so neither a raw stream nor a test agent can use them), it parses certificates and keys
//! with a second X.509/PKCS#8 stack (`der`, `pkcs8`, `spki`) beside ours, and it brings `url` with the
//! ICU crates for address parsing. The client side of the X.509 profile is one streaming call, so it is
//! implemented here over our own `proto/workload_api.proto` (no package, as in the specification), whose
//! generated client and server are [`crate::proto::spiffe_workload_api_client`] and
//! [`crate::proto::spiffe_workload_api_server`].
//!
//! ## Example
//! ```no_run
//! use mesh_core::{CertProvider, SpiffeId};
//! use mesh_xds::spiffe::{WorkloadApiCertProvider, WorkloadApiConfig};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = WorkloadApiConfig::from_endpoint("unix:///run/spire/sockets/agent.sock")?;
//! let provider = WorkloadApiCertProvider::new(config)?;
//! let identity = SpiffeId::parse("spiffe://example.org/ns/default/sa/web")?;
//! let cert = provider.certificate(&identity).await?;
//! let tls = mesh_core::tls::client_config(cert, vec![identity])?;
//! # drop(tls);
//! # Ok(())
//! # }
//! ```

mod svid;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use hyper_util::rt::TokioIo;
use mesh_core::{CertProvider, CertWatch, Error, SpiffeId, WorkloadCert};
use rustls_pki_types::UnixTime;
use tokio::net::UnixStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use crate::client::Backoff;
use crate::error::{XdsError, truncate_for_log};
use crate::proto::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use crate::proto::{X509svidRequest, X509svidResponse};

/// The gRPC metadata key every Workload API request must carry, with the value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Where SPIRE's agent serves the Workload API in its usual Kubernetes deployment.
pub const DEFAULT_SOCKET_PATH: &str = "/run/spire/sockets/agent.sock";

/// How long dialling the socket may take: a local socket answers at once or not at all.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings on the long-lived stream, so that a hung agent is noticed and the stream reopened.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Identities named in a "does not issue" error, at most.
const LISTED_IDENTITIES: usize = 8;

/// Settings of [`WorkloadApiCertProvider`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WorkloadApiConfig {
    /// The Workload API's Unix domain socket.
    pub socket_path: PathBuf,
    /// How long [`CertProvider::certificate`] waits for the agent's first response.
    pub first_response_timeout: Duration,
    /// Delays between reconnects.
    pub backoff: Backoff,
    /// The largest response accepted, in bytes (a response larger than this breaks the stream, which is
    /// then retried).
    pub max_response_bytes: usize,
    /// The most SVIDs taken from one response; later entries are ignored, as if absent.
    pub max_svids: usize,
}

impl Default for WorkloadApiConfig {
    fn default() -> Self {
        WorkloadApiConfig {
            socket_path: PathBuf::from(DEFAULT_SOCKET_PATH),
            first_response_timeout: Duration::from_secs(10),
            backoff: Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(30),
            },
            // gRPC's own default: room for dozens of SVIDs with chains and bundles, and federated bundles.
            max_response_bytes: 4 << 20,
            max_svids: 64,
        }
    }
}

impl WorkloadApiConfig {
    /// The default settings, with the Workload API at `socket_path`.
    pub fn new(socket_path: impl Into<PathBuf>) -> Self {
        WorkloadApiConfig {
            socket_path: socket_path.into(),
            ..Self::default()
        }
    }

    /// The default settings, with the Workload API at `endpoint`, an address in the form the SPIFFE
    /// Workload Endpoint specification gives `SPIFFE_ENDPOINT_SOCKET`: `unix:///path/to/socket` (or
    /// `unix:/path/to/socket`). `tcp://` addresses are refused: only Unix domain sockets are supported.
    pub fn from_endpoint(endpoint: &str) -> Result<Self, XdsError> {
        let refuse = |reason: &str| XdsError::Transport {
            reason: format!(
                "SPIFFE Workload API endpoint {:?}: {reason}",
                truncate_for_log(endpoint)
            ),
        };
        let path = if let Some(path) = endpoint.strip_prefix("unix://") {
            path
        } else if let Some(path) = endpoint.strip_prefix("unix:") {
            path
        } else if endpoint.starts_with("tcp:") {
            return Err(refuse("only unix: endpoints are supported"));
        } else {
            return Err(refuse("must start with unix:"));
        };
        if !path.starts_with('/') {
            return Err(refuse(
                "needs an absolute path and no authority (unix:///path/to/socket)",
            ));
        }
        if path.contains(['?', '#']) {
            return Err(refuse("a query or fragment is not allowed"));
        }
        if path.contains('%') {
            return Err(refuse("percent-encoded paths are not supported"));
        }
        Ok(Self::new(path))
    }

    /// Sets how long a request waits for the agent's first response.
    pub fn with_first_response_timeout(mut self, timeout: Duration) -> Self {
        self.first_response_timeout = timeout;
        self
    }

    /// Sets the reconnect delays.
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sets the largest response accepted, in bytes.
    pub fn with_max_response_bytes(mut self, max: usize) -> Self {
        self.max_response_bytes = max;
        self
    }

    /// Sets the most SVIDs taken from one response.
    pub fn with_max_svids(mut self, max: usize) -> Self {
        self.max_svids = max;
        self
    }
}

/// What the stream has delivered so far; shared by the stream task (the only writer) and the provider.
#[derive(Default)]
struct State {
    /// A response has been applied since the provider started.
    answered: bool,
    /// Why the stream stopped for good, if it did.
    fatal: Option<String>,
    /// The last connection or stream failure, to explain a wait that timed out.
    last_error: Option<String>,
    /// The current certificate of each identity the agent issues.
    certs: HashMap<SpiffeId, watch::Sender<Arc<WorkloadCert>>>,
    /// Identities of the latest response whose SVID was refused, and why.
    rejected: BTreeMap<SpiffeId, String>,
}

/// A [`CertProvider`] over the SPIFFE Workload API: one long-lived `FetchX509SVID` stream to an agent
/// (SPIRE) on a Unix domain socket, its SVIDs checked and published per identity. See the
/// [module documentation](self) for the rules.
///
/// Must be created inside a tokio runtime: the stream runs as a task, stopped when the last clone of the
/// provider is dropped (the watches it handed out then keep their last certificate).
#[derive(Clone)]
pub struct WorkloadApiCertProvider {
    inner: Arc<Inner>,
}

struct Inner {
    state: Arc<watch::Sender<State>>,
    config: WorkloadApiConfig,
    task: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WorkloadApiCertProvider {
    /// Starts following the Workload API at `config.socket_path`. Connecting happens in the background, so
    /// this succeeds even while the agent is not up yet; it fails only outside a tokio runtime.
    pub fn new(config: WorkloadApiConfig) -> Result<Self, XdsError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| XdsError::Transport {
            reason: "the SPIFFE Workload API client must be started inside a tokio runtime".to_owned(),
        })?;
        let state = Arc::new(watch::Sender::new(State::default()));
        let follower = Follower {
            state: state.clone(),
            config: config.clone(),
        };
        let task = runtime.spawn(follower.run());
        Ok(WorkloadApiCertProvider {
            inner: Arc::new(Inner { state, config, task }),
        })
    }

    /// The certificate watch for `identity`: see [`CertProvider::certificate`] and the
    /// [module documentation](self).
    pub async fn fetch(&self, identity: &SpiffeId) -> Result<CertWatch, Error> {
        let timeout = self.inner.config.first_response_timeout;
        let mut rx = self.inner.state.subscribe();
        let settled = rx.wait_for(|state| state.answered || state.fatal.is_some());
        match tokio::time::timeout(timeout, settled).await {
            Ok(Ok(state)) => lookup(identity, &state),
            Ok(Err(_)) => Err(signing(
                identity,
                "the Workload API client has stopped".to_owned(),
            )),
            Err(_) => {
                let state = self.inner.state.borrow();
                let cause = state
                    .last_error
                    .as_deref()
                    .map(|error| format!(" (last error: {error})"))
                    .unwrap_or_default();
                Err(signing(
                    identity,
                    format!(
                        "no response from the SPIFFE Workload API at {} within {timeout:?}{cause}",
                        self.socket_path().display()
                    ),
                ))
            }
        }
    }

    /// The identities the agent currently issues (with a usable SVID), sorted.
    pub fn identities(&self) -> Vec<SpiffeId> {
        let mut ids: Vec<_> = self.inner.state.borrow().certs.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Whether the agent has answered at least once: the provider's readiness.
    pub fn is_ready(&self) -> bool {
        self.inner.state.borrow().answered
    }

    /// The socket this provider follows.
    pub fn socket_path(&self) -> &Path {
        &self.inner.config.socket_path
    }
}

impl CertProvider for WorkloadApiCertProvider {
    fn certificate<'a>(&'a self, identity: &'a SpiffeId) -> BoxFuture<'a, Result<CertWatch, Error>> {
        Box::pin(self.fetch(identity))
    }
}

impl fmt::Debug for WorkloadApiCertProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadApiCertProvider")
            .field("config", &self.inner.config)
            .field("ready", &self.is_ready())
            .field("identities", &self.identities())
            .finish()
    }
}

/// The answer for `identity` once the agent has answered (or stopped for good).
fn lookup(identity: &SpiffeId, state: &State) -> Result<CertWatch, Error> {
    if let Some(sender) = state.certs.get(identity) {
        return Ok(CertWatch::from_receiver(sender.subscribe()));
    }
    if let Some(reason) = state.rejected.get(identity) {
        return Err(signing(
            identity,
            format!("the SPIFFE Workload API's SVID for it is unusable: {reason}"),
        ));
    }
    if let Some(reason) = &state.fatal {
        return Err(signing(
            identity,
            format!("the SPIFFE Workload API client stopped: {reason}"),
        ));
    }
    let mut issued: Vec<_> = state.certs.keys().map(SpiffeId::as_str).collect();
    issued.sort_unstable();
    let more = issued.len().saturating_sub(LISTED_IDENTITIES);
    issued.truncate(LISTED_IDENTITIES);
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    Err(signing(
        identity,
        format!(
            "the SPIFFE Workload API does not issue this identity to this workload (it issues {issued:?}{more})"
        ),
    ))
}

fn signing(identity: &SpiffeId, reason: String) -> Error {
    Error::Signing {
        identity: identity.clone(),
        reason,
    }
}

/// How one stream ended.
enum StreamEnd {
    /// The server refused this client for good (`InvalidArgument`, `Unimplemented`): do not retry.
    Fatal(String),
    /// The connection or the stream failed, or the server closed it; `delivered` says whether any
    /// response came first.
    Lost { reason: String, delivered: bool },
}

/// The stream task: connects, follows `FetchX509SVID`, reconnects.
struct Follower {
    state: Arc<watch::Sender<State>>,
    config: WorkloadApiConfig,
}

impl Follower {
    async fn run(self) {
        let mut attempt: u32 = 0;
        loop {
            match self.follow_stream().await {
                StreamEnd::Fatal(reason) => {
                    tracing::error!(
                        socket = %self.config.socket_path.display(),
                        %reason,
                        "the SPIFFE Workload API refused this client; not retrying"
                    );
                    self.state.send_modify(|state| state.fatal = Some(reason));
                    return;
                }
                StreamEnd::Lost { reason, delivered } => {
                    if delivered {
                        attempt = 0;
                    }
                    let delay = self.config.backoff.delay(attempt);
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(
                        socket = %self.config.socket_path.display(),
                        %reason,
                        ?delay,
                        "SPIFFE Workload API stream lost; reconnecting"
                    );
                    self.state.send_modify(|state| state.last_error = Some(reason));
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Opens one connection and one stream, and applies its responses until it ends.
    async fn follow_stream(&self) -> StreamEnd {
        let channel = match self.connect().await {
            Ok(channel) => channel,
            Err(reason) => {
                return StreamEnd::Lost {
                    reason,
                    delivered: false,
                };
            }
        };
        let mut client =
            SpiffeWorkloadApiClient::new(channel).max_decoding_message_size(self.config.max_response_bytes);
        let mut request = tonic::Request::new(X509svidRequest {});
        request
            .metadata_mut()
            .insert(SECURITY_HEADER, MetadataValue::from_static("true"));
        let mut stream = match client.fetch_x509svid(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => return self.stream_failed(&status, false),
        };
        let mut delivered = false;
        loop {
            match stream.message().await {
                Ok(Some(response)) => {
                    delivered = true;
                    self.apply(&response);
                }
                Ok(None) => {
                    return StreamEnd::Lost {
                        reason: "the agent ended the stream".to_owned(),
                        delivered,
                    };
                }
                Err(status) => return self.stream_failed(&status, delivered),
            }
        }
    }

    async fn connect(&self) -> Result<Channel, String> {
        let path = self.config.socket_path.clone();
        let connector = tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        });
        // The URI only fills the requests' `:authority`; the connector ignores it and dials the socket.
        Endpoint::from_static("http://localhost")
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .connect_with_connector(connector)
            .await
            .map_err(|error| {
                format!(
                    "connecting to {}: {}",
                    self.config.socket_path.display(),
                    describe(&error)
                )
            })
    }

    /// Classifies a failed call or stream, as the Workload Endpoint specification's error codes say.
    fn stream_failed(&self, status: &tonic::Status, delivered: bool) -> StreamEnd {
        let reason = describe(status);
        match status.code() {
            Code::InvalidArgument | Code::Unimplemented => StreamEnd::Fatal(reason),
            Code::PermissionDenied => {
                // The workload is entitled to nothing (for now): every SVID is withdrawn.
                self.state.send_modify(|state| {
                    for identity in state.certs.keys() {
                        tracing::warn!(%identity, "the SPIFFE Workload API withdrew this identity");
                    }
                    state.certs.clear();
                    state.rejected.clear();
                });
                StreamEnd::Lost { reason, delivered }
            }
            _ => StreamEnd::Lost { reason, delivered },
        }
    }

    /// Applies one response: new and rotated SVIDs update their watches, withdrawn identities are dropped.
    fn apply(&self, response: &X509svidResponse) {
        if response.svids.is_empty() {
            tracing::warn!("discarding a SPIFFE Workload API response without SVIDs (a mandatory field)");
            return;
        }
        let parsed = svid::parse_response(response, self.config.max_svids, UnixTime::now());
        self.state.send_modify(|state| {
            state.answered = true;
            state.last_error = None;
            state.certs.retain(|identity, _| {
                let kept = parsed.present.contains(identity);
                if !kept {
                    tracing::info!(%identity, "the SPIFFE Workload API withdrew this identity");
                }
                kept
            });
            for cert in parsed.certs {
                let identity = cert.identity().clone();
                match state.certs.get(&identity) {
                    Some(sender) => {
                        sender.send_if_modified(|current| {
                            // Agents resend unchanged SVIDs with every update; only a real change wakes
                            // the watchers.
                            let same = current.chain() == cert.chain() && current.roots() == cert.roots();
                            if !same {
                                tracing::info!(%identity, "SPIFFE Workload API rotated the certificate");
                                *current = Arc::new(cert);
                            }
                            !same
                        });
                    }
                    None => {
                        tracing::info!(%identity, "SPIFFE Workload API issued a certificate");
                        state.certs.insert(identity, watch::Sender::new(Arc::new(cert)));
                    }
                }
            }
            state.rejected = parsed.rejected;
        });
    }
}

/// An error with its chain of causes (a transport failure's own message alone says little), with the
/// peer-controlled parts cut for logging.
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = match error.downcast_ref::<tonic::Status>() {
        Some(status) => format!("{:?}: {}", status.code(), truncate_for_log(status.message())),
        None => error.to_string(),
    };
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = truncate_for_log(&cause.to_string());
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]
mod tests {
    use super::*;

    #[test]
    fn endpoints_in_the_specification_form_parse() {
        for (endpoint, path) in [
            (
                "unix:///run/spire/sockets/agent.sock",
                "/run/spire/sockets/agent.sock",
            ),
            ("unix:/tmp/agent.sock", "/tmp/agent.sock"),
        ] {
            let config = WorkloadApiConfig::from_endpoint(endpoint).unwrap();
            assert_eq!(config.socket_path, Path::new(path), "{endpoint}");
        }
    }

    #[test]
    fn other_endpoints_are_refused_with_a_reason() {
        for (endpoint, reason) in [
            ("tcp://127.0.0.1:8081", "only unix: endpoints are supported"),
            ("/run/spire/sockets/agent.sock", "must start with unix:"),
            ("unix://host/agent.sock", "no authority"),
            ("unix:relative.sock", "absolute path"),
            ("unix:///agent.sock?x=1", "query or fragment"),
            ("unix:///agent%20.sock", "percent-encoded"),
        ] {
            let error = WorkloadApiConfig::from_endpoint(endpoint).unwrap_err();
            assert!(
                matches!(&error, XdsError::Transport { reason: r } if r.contains(reason)),
                "{endpoint}: {error}"
            );
        }
    }
}
