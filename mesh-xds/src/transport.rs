//! How `mesh-xds` speaks gRPC: a client channel to istiod (or any control plane) over rustls, the call
//! credentials Istio's control plane expects, and the TLS side of a gRPC server.
//!
//! ## Client
//! Istio's ztunnel reaches istiod's xDS and CA services (port 15012) over TLS. It checks istiod's
//! certificate the ordinary web way, by DNS name against a configured root (`XDS_ROOT_CA` / `CA_ROOT_CA`),
//! optionally under another name (`ALT_XDS_HOSTNAME`), since istiod's serving certificate has DNS SANs and
//! no SPIFFE ID. Every call carries `authorization: Bearer <token>` (a Kubernetes service-account token,
//! read from its file at every call because the kubelet rotates it), `clusterid: <CLUSTER_ID>`, and any
//! configured extra headers (`XDS_HEADER_*`, `CA_HEADER_*`).
//!
//! - [`GrpcClientConfig`] + [`connect_lazy`]: a [`tonic::transport::Channel`] that dials on first use, over
//!   TCP and tokio-rustls (ALPN `h2`, TLS 1.3, aws-lc-rs), or over plain TCP for an `http://` address.
//! - [`TokenSource`] and [`CallCredentials`]: the per-call headers, as a [`tonic::service::Interceptor`].
//!
//! **Reconnects.** The channel reconnects by itself: when the connection drops, the next call dials again,
//! repeating the TCP connect and the full TLS handshake (there is no session resumption) against the roots
//! fixed when the channel was built; a new root bundle needs a new channel. Calls made while disconnected
//! fail fast with `Unavailable` rather than queueing, and a streaming caller (the ADS client) is expected to
//! back off and retry. Nothing about the credentials is cached: the token is re-read for every call, so a
//! rotated token is used by the first call after the rotation, on the old connection or a new one. HTTP/2
//! keepalive pings (every 30 s, 10 s to answer, as ztunnel does) notice a dead peer on an idle connection.
//!
//! ## Server
//! - [`TlsIncoming`]: turns a [`TcpListener`] and a rustls [`ServerConfig`] into the stream of connections
//!   [`tonic::transport::Server::serve_with_incoming`] takes. Handshakes run concurrently (bounded, with a
//!   timeout), so a slow or silent client never holds up the accept loop; failed handshakes are logged at
//!   debug and dropped.
//! - [`TlsConnection`] and its [`ConnectionInfo`], which tonic puts into every request's extensions: the
//!   peer's address and, if it presented one, its certificate chain and SPIFFE ID.
//! - [`local_server_tls`]: the serving identity of a local control plane, a certificate for DNS names and
//!   IPs issued by a [`DevCa`], with optional client certificates checked against the same CA.

use std::convert::Infallible;
use std::fmt;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use hyper_util::rt::TokioIo;
use mesh_core::{CertWatch, DevCa, SpiffeId};
use rustls::client::ResolvesClientCert;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::service::Interceptor;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Status};

use crate::error::{TokenProblem, XdsError, truncate_for_log};

/// How long dialling (TCP connect plus TLS handshake) may take by default: ztunnel's value.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Service-account tokens are a few kilobytes; a token file larger than this is not one.
const MAX_TOKEN_BYTES: u64 = 64 * 1024;

/// ztunnel's HTTP/2 keepalive towards istiod: a ping every 30 s, answered within 10 s.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// At most this many root certificates are read from one PEM bundle.
const MAX_ROOTS: usize = 64;

const ALPN_H2: &[u8] = b"h2";

/// Where the bearer token comes from.
///
/// A file is re-read at every use, because Kubernetes rotates projected service-account tokens in place.
/// Surrounding whitespace (a trailing newline) is trimmed; an empty token is an error, never an empty
/// header.
#[derive(Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// A file holding the token (ztunnel's `./var/run/secrets/tokens/istio-token`).
    File(PathBuf),
    /// The token itself.
    Literal(String),
}

impl TokenSource {
    /// The token now: the file's current content, or the literal.
    pub fn load(&self) -> Result<String, XdsError> {
        let raw = match self {
            TokenSource::Literal(token) => token.clone(),
            // A blocking read, from a synchronous interceptor: the file is a few kilobytes on a local
            // (usually in-memory) volume, which is what ztunnel does too.
            TokenSource::File(path) => {
                let file = std::fs::File::open(path)
                    .map_err(|e| self.problem(TokenProblem::Unreadable(e.to_string())))?;
                let mut raw = String::new();
                // One byte past the limit tells a too-large file from one exactly at the limit.
                file.take(MAX_TOKEN_BYTES + 1)
                    .read_to_string(&mut raw)
                    .map_err(|e| self.problem(TokenProblem::Unreadable(e.to_string())))?;
                if raw.len() as u64 > MAX_TOKEN_BYTES {
                    return Err(self.problem(TokenProblem::TooLarge {
                        limit: MAX_TOKEN_BYTES,
                    }));
                }
                raw
            }
        };
        let token = raw.trim();
        if token.is_empty() {
            return Err(self.problem(TokenProblem::Empty));
        }
        Ok(token.to_owned())
    }

    /// The `authorization` header value for the current token, marked sensitive so that HTTP/2 never
    /// indexes it in its header compression table.
    fn bearer_header(&self) -> Result<AsciiMetadataValue, XdsError> {
        let token = self.load()?;
        let mut value = AsciiMetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| self.problem(TokenProblem::NotHeaderValue))?;
        value.set_sensitive(true);
        Ok(value)
    }

    fn problem(&self, problem: TokenProblem) -> XdsError {
        XdsError::Token {
            origin: self.origin(),
            problem,
        }
    }

    fn origin(&self) -> String {
        match self {
            TokenSource::File(path) => path.display().to_string(),
            TokenSource::Literal(_) => "a literal token".to_owned(),
        }
    }
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::File(path) => f.debug_tuple("File").field(path).finish(),
            // Never print a credential.
            TokenSource::Literal(_) => f.write_str("Literal(<redacted>)"),
        }
    }
}

/// The headers every control-plane call carries: the bearer token, `clusterid`, and extra headers.
///
/// Use it as the interceptor of a generated client (`FooClient::with_interceptor(channel, credentials)`).
/// Header names and values are checked when the credentials are built; only the token, which may change
/// between calls, is read (and checked) per call. A call whose token cannot be loaded fails locally with
/// `Unauthenticated`, naming the token's source, and is never sent.
#[derive(Clone)]
pub struct CallCredentials {
    token: Option<Arc<TokenSource>>,
    headers: Arc<Vec<(AsciiMetadataKey, AsciiMetadataValue)>>,
}

/// Headers the credentials set themselves, or that gRPC and HTTP/2 reserve.
const RESERVED_HEADERS: &[&str] = &["authorization", "clusterid", "te", "content-type", "user-agent"];

impl CallCredentials {
    /// Credentials that send `authorization: Bearer <token>`. A literal token is checked now (it must be
    /// non-empty and fit in a header); a file is read at each call.
    pub fn bearer(token: TokenSource) -> Result<Self, XdsError> {
        if matches!(token, TokenSource::Literal(_)) {
            token.bearer_header()?;
        }
        Ok(CallCredentials {
            token: Some(Arc::new(token)),
            headers: Arc::default(),
        })
    }

    /// Credentials without a token: for servers that authenticate callers by client certificate, or local
    /// development.
    pub fn anonymous() -> Self {
        CallCredentials {
            token: None,
            headers: Arc::default(),
        }
    }

    /// Adds `clusterid: <cluster_id>` (Istio's `CLUSTER_ID`), which istiod uses to pick the cluster that
    /// validates the token. An empty id sends nothing, as ztunnel does.
    pub fn with_cluster_id(self, cluster_id: &str) -> Result<Self, XdsError> {
        if cluster_id.is_empty() {
            return Ok(self);
        }
        self.push("clusterid", cluster_id)
    }

    /// Adds an extra header to every call (ztunnel's `XDS_HEADER_*` / `CA_HEADER_*`). Refused: names that
    /// are not valid ASCII metadata keys (binary `-bin` keys included), the names the credentials or gRPC
    /// set themselves (`authorization`, `clusterid`, `te`, `content-type`, `user-agent`, `grpc-*`), and
    /// values that a header cannot carry.
    pub fn with_header(self, name: &str, value: &str) -> Result<Self, XdsError> {
        let lower = name.to_ascii_lowercase();
        if RESERVED_HEADERS.contains(&lower.as_str()) || lower.starts_with("grpc-") {
            return Err(header_error(
                name,
                "reserved: set by the credentials or by gRPC itself",
            ));
        }
        self.push(name, value)
    }

    fn push(mut self, name: &str, value: &str) -> Result<Self, XdsError> {
        let key = AsciiMetadataKey::from_bytes(name.as_bytes())
            .map_err(|_| header_error(name, "not a valid ASCII metadata name"))?;
        let value = AsciiMetadataValue::try_from(value)
            .map_err(|_| header_error(name, "the value holds characters a header cannot carry"))?;
        Arc::make_mut(&mut self.headers).push((key, value));
        Ok(self)
    }
}

fn header_error(name: &str, reason: &str) -> XdsError {
    XdsError::Header {
        name: truncate_for_log(name),
        reason: reason.to_owned(),
    }
}

impl Interceptor for CallCredentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let metadata = request.metadata_mut();
        for (key, value) in self.headers.iter() {
            metadata.insert(key.clone(), value.clone());
        }
        if let Some(token) = &self.token {
            let value = token
                .bearer_header()
                .map_err(|error| Status::unauthenticated(error.to_string()))?;
            metadata.insert("authorization", value);
        }
        Ok(request)
    }
}

impl fmt::Debug for CallCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(key, _)| key.as_str()).collect();
        f.debug_struct("CallCredentials")
            .field("token", &self.token)
            .field("headers", &names)
            .finish()
    }
}

/// Where and how to reach a gRPC server (istiod's xDS or CA service, or a local control plane).
#[derive(Clone)]
#[non_exhaustive]
pub struct GrpcClientConfig {
    /// `https://host:port` (TLS) or `http://host:port` (plain TCP). Plain `http://` is for local
    /// development only: it sends the bearer token in clear.
    pub address: String,
    /// PEM root certificates the server's certificate must chain to; required for `https://`. (There is
    /// no fallback to the system's roots: a control plane has its own CA.)
    pub roots_pem: Option<Vec<u8>>,
    /// The DNS name (or IP) to verify the server's certificate against, instead of the address's host:
    /// ztunnel's `ALT_XDS_HOSTNAME` / `ALT_CA_HOSTNAME`. Also sent as SNI.
    pub server_name: Option<String>,
    /// How long dialling (TCP connect plus TLS handshake) may take.
    pub connect_timeout: Duration,
    /// A client certificate to present (mutual TLS), read at each handshake so that rotation applies to
    /// the next connection. Istio's control plane authenticates by token; this is for servers that accept
    /// certificates too.
    pub client_cert: Option<CertWatch>,
}

impl GrpcClientConfig {
    /// A configuration for `address`, with no roots yet and the default connect timeout.
    pub fn new(address: impl Into<String>) -> Self {
        GrpcClientConfig {
            address: address.into(),
            roots_pem: None,
            server_name: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            client_cert: None,
        }
    }

    /// Sets the PEM root certificates.
    pub fn with_roots_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.roots_pem = Some(pem.into());
        self
    }

    /// Verifies the server's certificate against `name` instead of the address's host.
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Sets the connect timeout.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Presents `cert` to the server.
    pub fn with_client_cert(mut self, cert: CertWatch) -> Self {
        self.client_cert = Some(cert);
        self
    }
}

impl fmt::Debug for GrpcClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcClientConfig")
            .field("address", &self.address)
            .field("roots_pem_bytes", &self.roots_pem.as_ref().map(Vec::len))
            .field("server_name", &self.server_name)
            .field("connect_timeout", &self.connect_timeout)
            .field("client_cert", &self.client_cert.as_ref().map(CertWatch::identity))
            .finish()
    }
}

/// Parses a PEM bundle into certificates (other PEM sections, such as keys, are skipped). Fails when the
/// PEM is malformed or holds no certificate.
pub fn certificates_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, XdsError> {
    let mut certs = Vec::new();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| transport_error(format!("malformed PEM certificate: {e}")))?;
        if certs.len() == MAX_ROOTS {
            return Err(transport_error(format!(
                "more than {MAX_ROOTS} certificates in one PEM bundle"
            )));
        }
        certs.push(cert);
    }
    if certs.is_empty() {
        return Err(transport_error("no PEM certificate found"));
    }
    Ok(certs)
}

fn transport_error(reason: impl Into<String>) -> XdsError {
    XdsError::Transport {
        reason: reason.into(),
    }
}

/// A channel to `config.address` that connects on first use and reconnects by itself (see the module
/// docs for what a reconnect does). Fails at once, without dialling, when the address or the roots are
/// unusable, or when called outside a tokio runtime (the channel runs a background task).
pub fn connect_lazy(config: &GrpcClientConfig) -> Result<Channel, XdsError> {
    tokio::runtime::Handle::try_current()
        .map_err(|_| transport_error("a gRPC channel must be created inside a tokio runtime"))?;
    let uri: Uri = config
        .address
        .parse()
        .map_err(|e| transport_error(format!("address {:?}: {e}", config.address)))?;
    let secure = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            return Err(transport_error(format!(
                "address {:?} must start with https:// or http://",
                config.address
            )));
        }
    };
    let host = uri
        .host()
        .filter(|host| !host.is_empty())
        .ok_or_else(|| transport_error(format!("address {:?} has no host", config.address)))?;
    // `Uri` keeps the brackets of an IPv6 literal; the resolver and rustls want the bare address.
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let tls = if secure {
        Some(client_tls(config, &host)?)
    } else {
        None
    };
    let endpoint = Endpoint::from(uri)
        .connect_timeout(config.connect_timeout)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    let connector = Connector {
        host: host.into(),
        port,
        tls,
    };
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// The rustls side of a client: standard WebPKI verification of the server's name against the roots.
fn client_tls(
    config: &GrpcClientConfig,
    host: &str,
) -> Result<(tokio_rustls::TlsConnector, ServerName<'static>), XdsError> {
    let pem = config
        .roots_pem
        .as_deref()
        .ok_or_else(|| transport_error("an https:// address needs root certificates (roots_pem)"))?;
    let mut roots = RootCertStore::empty();
    for cert in certificates_from_pem(pem)? {
        roots
            .add(cert)
            .map_err(|e| transport_error(format!("unusable root certificate: {e}")))?;
    }
    let name = config.server_name.as_deref().unwrap_or(host);
    let server_name = ServerName::try_from(name.to_owned())
        .map_err(|e| transport_error(format!("{name:?} is not a DNS name or IP address: {e}")))?;
    let builder = ClientConfig::builder_with_provider(mesh_core::tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| transport_error(format!("TLS configuration: {e}")))?
        .with_root_certificates(roots);
    let mut tls = match &config.client_cert {
        Some(cert) => builder.with_client_cert_resolver(Arc::new(WatchResolver(cert.clone()))),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok((tokio_rustls::TlsConnector::from(Arc::new(tls)), server_name))
}

/// Hands rustls the client certificate the watch holds at handshake time.
#[derive(Debug)]
struct WatchResolver(CertWatch);

impl ResolvesClientCert for WatchResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified_key().clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Dials the configured host and port: TCP, then TLS if the address is `https://`.
#[derive(Clone)]
struct Connector {
    host: Arc<str>,
    port: u16,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<ClientStream>;
    type Error = XdsError;
    type Future = BoxFuture<'static, Result<Self::Response, XdsError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), XdsError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        // The channel only ever dials its own endpoint, whose host and port were checked when it was built.
        let connector = self.clone();
        Box::pin(async move { connector.dial().await.map(TokioIo::new) })
    }
}

impl Connector {
    async fn dial(self) -> Result<ClientStream, XdsError> {
        let address = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let failed = |reason: String| XdsError::Connect {
            address: address.clone(),
            reason,
        };
        let tcp = TcpStream::connect((&*self.host, self.port))
            .await
            .map_err(|e| failed(format!("TCP: {e}")))?;
        // Small gRPC frames (ACKs, unary requests) should not wait for Nagle.
        tcp.set_nodelay(true).map_err(|e| failed(format!("TCP: {e}")))?;
        let Some((tls, name)) = self.tls else {
            return Ok(ClientStream::Plain(tcp));
        };
        let stream = tls
            .connect(name.clone(), tcp)
            .await
            .map_err(|e| failed(format!("TLS handshake as {}: {e}", name.to_str())))?;
        Ok(ClientStream::Tls(Box::new(stream)))
    }
}

/// A client connection, with or without TLS.
enum ClientStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientStream::Plain(s) => s.is_write_vectored(),
            ClientStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Bounds of [`TlsIncoming`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TlsIncomingConfig {
    /// At most this many TLS handshakes run at once; further connections wait in the kernel's accept
    /// queue until one finishes.
    pub max_concurrent_handshakes: usize,
    /// A handshake not done within this is dropped (a silent or slow client).
    pub handshake_timeout: Duration,
}

impl Default for TlsIncomingConfig {
    fn default() -> Self {
        TlsIncomingConfig {
            max_concurrent_handshakes: 64,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Established TLS connections accepted from a [`TcpListener`], for
/// [`tonic::transport::Server::serve_with_incoming`] (or `_shutdown`).
///
/// Accepting and handshaking run in a background task; dropping the stream stops it and closes the
/// listener. The stream never yields an error: accept errors (such as running out of file descriptors)
/// are logged and retried after a short pause, and failed handshakes are logged at debug and dropped.
pub struct TlsIncoming {
    connections: mpsc::Receiver<TlsConnection>,
    local_addr: Option<SocketAddr>,
    acceptor: JoinHandle<()>,
}

impl TlsIncoming {
    /// Starts accepting on `listener`, handshaking with `tls`. Must be called inside a tokio runtime.
    pub fn new(
        listener: TcpListener,
        tls: Arc<ServerConfig>,
        config: TlsIncomingConfig,
    ) -> Result<Self, XdsError> {
        tokio::runtime::Handle::try_current()
            .map_err(|_| transport_error("a TLS listener must be started inside a tokio runtime"))?;
        if config.max_concurrent_handshakes == 0 {
            return Err(transport_error("max_concurrent_handshakes must be at least 1"));
        }
        let local_addr = listener.local_addr().ok();
        let (tx, connections) = mpsc::channel(config.max_concurrent_handshakes);
        let acceptor = tokio::spawn(accept_loop(
            listener,
            tokio_rustls::TlsAcceptor::from(tls),
            config,
            tx,
        ));
        Ok(TlsIncoming {
            connections,
            local_addr,
            acceptor,
        })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl fmt::Debug for TlsIncoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIncoming")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl futures_util::Stream for TlsIncoming {
    type Item = Result<TlsConnection, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().connections.poll_recv(cx).map(|next| next.map(Ok))
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    config: TlsIncomingConfig,
    tx: mpsc::Sender<TlsConnection>,
) {
    let permits = Arc::new(Semaphore::new(config.max_concurrent_handshakes));
    loop {
        // The permit is held from accept until the connection is handed over, which bounds both the
        // handshakes in flight and the connections waiting for the server to take them.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (tcp, remote_addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accepting a connection failed");
                    // Typically out of file descriptors: pausing lets connections close.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = tx.closed() => return,
        };
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        let timeout = config.handshake_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let local_addr = tcp.local_addr().ok();
            let _ = tcp.set_nodelay(true);
            match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let info = ConnectionInfo::new(remote_addr, local_addr, &stream);
                    // Fails only when the server stopped listening, and then the connection is not wanted.
                    let _ = tx.send(TlsConnection { stream, info }).await;
                }
                Ok(Err(error)) => tracing::debug!(%remote_addr, %error, "TLS handshake failed"),
                Err(_) => tracing::debug!(%remote_addr, ?timeout, "TLS handshake timed out"),
            }
        });
    }
}

/// What a server knows about a TLS client: tonic puts it into every request's extensions
/// (`request.extensions().get::<ConnectionInfo>()`).
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    remote_addr: SocketAddr,
    local_addr: Option<SocketAddr>,
    peer_certificates: Arc<[CertificateDer<'static>]>,
    peer_identity: Option<SpiffeId>,
}

impl ConnectionInfo {
    fn new(
        remote_addr: SocketAddr,
        local_addr: Option<SocketAddr>,
        stream: &tokio_rustls::server::TlsStream<TcpStream>,
    ) -> Self {
        let peer_certificates: Arc<[CertificateDer<'static>]> = stream
            .get_ref()
            .1
            .peer_certificates()
            .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        let peer_identity = peer_certificates
            .first()
            .and_then(|leaf| mesh_core::cert::svid_identity(leaf).ok());
        ConnectionInfo {
            remote_addr,
            local_addr,
            peer_certificates,
            peer_identity,
        }
    }

    /// The client's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote_addr
    }

    /// The address the client connected to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// The certificate chain the client presented (leaf first), empty if it presented none. It is as
    /// trustworthy as the server configuration's client verifier: with [`local_server_tls`] it chains to
    /// the CA's root.
    pub fn peer_certificates(&self) -> &[CertificateDer<'static>] {
        &self.peer_certificates
    }

    /// The SPIFFE ID in the client's leaf certificate, if it presented an X.509-SVID. Same caveat as
    /// [`ConnectionInfo::peer_certificates`]: security decisions should verify the chain themselves, as
    /// the CA service does.
    pub fn peer_identity(&self) -> Option<&SpiffeId> {
        self.peer_identity.as_ref()
    }
}

/// An accepted, handshaken TLS connection, with what is known about its client.
pub struct TlsConnection {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    info: ConnectionInfo,
}

impl TlsConnection {
    /// What is known about the client.
    pub fn info(&self) -> &ConnectionInfo {
        &self.info
    }

    /// The TLS stream itself.
    pub fn into_inner(self) -> tokio_rustls::server::TlsStream<TcpStream> {
        self.stream
    }
}

impl fmt::Debug for TlsConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConnection")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Connected for TlsConnection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The DNS names a local control plane answers to by default: `localhost`, and istiod's in-cluster
/// service name (so that clients configured for istiod need only a different root).
pub const LOCAL_SERVER_DNS_NAMES: &[&str] = &["localhost", "istiod.istio-system.svc"];

/// The serving identity of a local control plane: a server certificate for `dns_names` and `ips` issued by
/// `ca` (living `validity`, capped at the root's expiry), in a rustls configuration with ALPN `h2` and
/// TLS 1.3. Clients verify it as ztunnel verifies istiod: by name, against `ca`'s root.
///
/// A client certificate is optional: without one the caller authenticates by token; with one, it must
/// chain to `ca`'s root (for client authentication), or the handshake fails.
pub fn local_server_tls(
    ca: &DevCa,
    dns_names: &[&str],
    ips: &[IpAddr],
    validity: Duration,
) -> Result<Arc<ServerConfig>, XdsError> {
    let core = |e: mesh_core::Error| XdsError::Core(Box::new(e));
    let (chain, key) = ca.issue_server(dns_names, ips, validity).map_err(core)?;
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.root_cert().clone())
        .map_err(|e| transport_error(format!("unusable CA root: {e}")))?;
    let provider = mesh_core::tls::crypto_provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| transport_error(format!("client certificate verifier: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| transport_error(format!("TLS configuration: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| transport_error(format!("server certificate: {e}")))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}
