//! Who is calling the CA service ([`CallerAuthenticator`] and its implementations), and which workloads
//! run on a node ([`NodeAuthorizer`]).

use std::fmt;
use std::net::SocketAddr;

use futures_util::future::BoxFuture;
use mesh_core::{DevCa, SpiffeId};
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use tonic::metadata::MetadataMap;

use crate::error::XdsError;
use crate::transport::ConnectionInfo;

/// An authenticated caller of the CA service: the identity it proved, and the node it runs on if the
/// authenticator knows it (a Kubernetes token names the caller's pod, and so its node).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Caller {
    /// The SPIFFE identity the caller proved.
    pub identity: SpiffeId,
    /// The node it runs on; a node proxy needs one to impersonate the workloads on that node.
    pub node: Option<String>,
}

impl Caller {
    /// A caller with `identity`, on no known node.
    pub fn new(identity: SpiffeId) -> Self {
        Caller { identity, node: None }
    }

    /// The same caller, running on `node`.
    pub fn on_node(mut self, node: impl Into<String>) -> Self {
        self.node = Some(node.into());
        self
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.node {
            Some(node) => write!(f, "{} (node {node})", self.identity),
            None => write!(f, "{}", self.identity),
        }
    }
}

/// What an authenticator sees of one CA call.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct CallInfo<'a> {
    /// The request's gRPC metadata (the `authorization` header, `clusterid`, ...).
    pub metadata: &'a MetadataMap,
    /// The TLS connection, when the server runs over [`crate::transport::TlsIncoming`].
    pub connection: Option<&'a ConnectionInfo>,
    /// The caller's address, if known.
    pub remote_addr: Option<SocketAddr>,
    /// The identity the CSR asks for, if the CSR is valid (it is checked, and refused, after
    /// authentication).
    pub requested_identity: Option<&'a SpiffeId>,
    /// Whether the request asks to impersonate (`ImpersonatedIdentity` is set).
    pub impersonation: bool,
}

/// Decides who is calling the CA service. The service tries its authenticators in order and the first
/// that succeeds names the caller; when all fail, the call is `Unauthenticated` with their reasons.
///
/// Object-safe, and asynchronous so that an implementation can ask another service (a Kubernetes
/// TokenReview, for instance).
pub trait CallerAuthenticator: Send + Sync + fmt::Debug {
    /// The caller of `call`, or why it could not be authenticated ([`XdsError::Unauthenticated`], with a
    /// reason that is sent back to the caller, so it must never contain the credential).
    fn authenticate<'a>(&'a self, call: &'a CallInfo<'a>) -> BoxFuture<'a, Result<Caller, XdsError>>;
}

/// Confirms that a workload with an identity runs on a node: what lets a node proxy (ztunnel) have the
/// certificates of the workloads on its node issued, and no others. Istio checks this against the pods
/// it watches; the local control plane checks its mesh snapshot.
///
/// Any `Fn(&str, &SpiffeId) -> bool + Send + Sync` is one.
pub trait NodeAuthorizer: Send + Sync {
    /// Whether a workload with `identity` runs on `node`.
    fn runs_on_node(&self, node: &str, identity: &SpiffeId) -> bool;
}

impl<F> NodeAuthorizer for F
where
    F: Fn(&str, &SpiffeId) -> bool + Send + Sync,
{
    fn runs_on_node(&self, node: &str, identity: &SpiffeId) -> bool {
        self(node, identity)
    }
}

fn refused(reason: impl Into<String>) -> XdsError {
    XdsError::Unauthenticated {
        reason: reason.into(),
    }
}

/// The bearer token of a call: `authorization: Bearer <token>` (the scheme is case-insensitive).
fn bearer_token(metadata: &MetadataMap) -> Result<&str, XdsError> {
    let value = metadata
        .get("authorization")
        .ok_or_else(|| refused("no bearer token"))?;
    let value = value
        .to_str()
        .map_err(|_| refused("the authorization header is not text"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| refused("the authorization header is not a bearer token"))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(refused("the authorization header is not a bearer token"));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(refused("empty bearer token"));
    }
    Ok(token)
}

/// Compares in time that depends only on the lengths, so that the time a refusal takes does not tell how
/// much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fixed map from bearer tokens to callers: for tests, and a local control plane that hands out its own
/// tokens.
#[derive(Default, Clone)]
pub struct StaticTokens {
    tokens: Vec<(String, Caller)>,
}

impl StaticTokens {
    /// No tokens yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `token` as a credential of `caller` (replacing an earlier entry for the same token).
    pub fn with(mut self, token: impl Into<String>, caller: Caller) -> Self {
        self.insert(token, caller);
        self
    }

    /// Adds `token` as a credential of `caller` (replacing an earlier entry for the same token).
    pub fn insert(&mut self, token: impl Into<String>, caller: Caller) {
        let token = token.into();
        self.tokens.retain(|(known, _)| *known != token);
        self.tokens.push((token, caller));
    }
}

impl fmt::Debug for StaticTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Callers only: the tokens are credentials.
        let callers: Vec<_> = self.tokens.iter().map(|(_, caller)| caller).collect();
        f.debug_struct("StaticTokens").field("callers", &callers).finish()
    }
}

impl CallerAuthenticator for StaticTokens {
    fn authenticate<'a>(&'a self, call: &'a CallInfo<'a>) -> BoxFuture<'a, Result<Caller, XdsError>> {
        let result = bearer_token(call.metadata).and_then(|token| {
            // Every entry is compared, so the time taken does not depend on which one matched.
            let mut found = None;
            for (known, caller) in &self.tokens {
                if constant_time_eq(known.as_bytes(), token.as_bytes()) {
                    found = Some(caller.clone());
                }
            }
            found.ok_or_else(|| refused("unknown bearer token"))
        });
        Box::pin(std::future::ready(result))
    }
}

/// Authenticates a caller by its TLS client certificate: a caller presenting an X.509-SVID that chains to
/// the CA's roots is that SPIFFE identity (istiod's `ClientCertAuthenticator`). Such a caller has no known
/// node, so it cannot impersonate.
///
/// The chain is verified here, for client authentication, whatever the server's TLS configuration
/// accepted: the decision does not depend on how the listener was set up.
#[derive(Debug, Clone)]
pub struct ClientCertAuthenticator {
    anchors: Vec<TrustAnchor<'static>>,
}

impl ClientCertAuthenticator {
    /// Trusts client certificates issued under `roots`.
    pub fn new(roots: &[CertificateDer<'_>]) -> Result<Self, XdsError> {
        let anchors = roots
            .iter()
            .map(|root| {
                webpki::anchor_from_trusted_cert(root)
                    .map(|anchor| anchor.to_owned())
                    .map_err(|e| XdsError::Transport {
                        reason: format!("unusable root certificate: {e}"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if anchors.is_empty() {
            return Err(XdsError::Transport {
                reason: "a client certificate authenticator needs at least one root".to_owned(),
            });
        }
        Ok(ClientCertAuthenticator { anchors })
    }

    /// Trusts client certificates issued by `ca`.
    pub fn for_ca(ca: &DevCa) -> Result<Self, XdsError> {
        Self::new(std::slice::from_ref(ca.root_cert()))
    }

    fn verify(&self, chain: &[CertificateDer<'static>]) -> Result<Caller, XdsError> {
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| refused("no client certificate"))?;
        let end_entity = webpki::EndEntityCert::try_from(leaf)
            .map_err(|e| refused(format!("the client certificate does not parse: {e}")))?;
        let algorithms = mesh_core::tls::crypto_provider()
            .signature_verification_algorithms
            .all;
        end_entity
            .verify_for_usage(
                algorithms,
                &self.anchors,
                intermediates,
                UnixTime::now(),
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .map_err(|e| refused(format!("the client certificate is not trusted: {e}")))?;
        let identity = mesh_core::cert::svid_identity(leaf)
            .map_err(|e| refused(format!("the client certificate: {e}")))?;
        Ok(Caller::new(identity))
    }
}

impl CallerAuthenticator for ClientCertAuthenticator {
    fn authenticate<'a>(&'a self, call: &'a CallInfo<'a>) -> BoxFuture<'a, Result<Caller, XdsError>> {
        let chain = call
            .connection
            .map(ConnectionInfo::peer_certificates)
            .unwrap_or_default();
        Box::pin(std::future::ready(self.verify(chain)))
    }
}

/// **Development only.** Accepts any non-empty bearer token, but only from a loopback address, and takes
/// the caller to be whatever identity the CSR asks for: on one machine, every process is trusted anyway.
///
/// It grants no impersonation rights by itself: a request with `ImpersonatedIdentity` is attributed to the
/// workload it names, which is not a node proxy. With [`DevAnyToken::with_impersonator`], such requests
/// are attributed to the configured node proxy instead (a local ztunnel in node mode), and the CA
/// service's impersonator set and node check still apply.
#[derive(Debug, Clone, Default)]
pub struct DevAnyToken {
    impersonator: Option<Caller>,
}

impl DevAnyToken {
    /// Any token from loopback, no impersonation.
    pub fn new() -> Self {
        Self::default()
    }

    /// Attributes impersonation requests to `node_proxy`.
    pub fn with_impersonator(mut self, node_proxy: Caller) -> Self {
        self.impersonator = Some(node_proxy);
        self
    }

    fn check(&self, call: &CallInfo<'_>) -> Result<Caller, XdsError> {
        let addr = call
            .remote_addr
            .ok_or_else(|| refused("any-token development mode: the caller's address is unknown"))?;
        if !addr.ip().to_canonical().is_loopback() {
            return Err(refused(format!(
                "any-token development mode only accepts loopback callers, not {}",
                addr.ip()
            )));
        }
        bearer_token(call.metadata)?;
        if call.impersonation
            && let Some(node_proxy) = &self.impersonator
        {
            return Ok(node_proxy.clone());
        }
        let identity = call
            .requested_identity
            .ok_or_else(|| refused("any-token development mode: the CSR names no usable identity"))?;
        Ok(Caller::new(identity.clone()))
    }
}

impl CallerAuthenticator for DevAnyToken {
    fn authenticate<'a>(&'a self, call: &'a CallInfo<'a>) -> BoxFuture<'a, Result<Caller, XdsError>> {
        Box::pin(std::future::ready(self.check(call)))
    }
}
