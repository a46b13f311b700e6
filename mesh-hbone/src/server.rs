//! [`HboneAcceptor`]: terminates HBONE (mutual TLS, HTTP/2) and hands each valid CONNECT to a
//! `tower::Service<InboundTunnel>`, which accepts it (200, then bytes) or rejects it with a status.
//!
//! The acceptor answers protocol errors itself, as Istio's ztunnel does: `400` for a method other than
//! CONNECT, an authority that does not parse, a target port of the proxy's own (15001, 15006, 15008,
//! 15080), or a CONNECT IP other than the address the connection arrived on (checked unless the acceptor is
//! told a waypoint decides that). Policy (`401`) and upstream failures (`503`) are the service's to answer.

use std::borrow::Cow;
use std::convert::Infallible;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use mesh_core::SpiffeId;
use mesh_core::drain::DrainWatch;
use mesh_core::tls;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tower::{Service, ServiceExt};

use crate::config::HboneConfig;
use crate::error::HboneError;
use crate::headers::Baggage;
use crate::select::ServerConfigSelector;
use crate::stream::HboneStream;

/// The ports of the proxy itself, refused as tunnel targets so a tunnel cannot loop back into the proxy.
pub const PROXY_PORTS: [u16; 4] = [15001, 15006, 15008, 15080];

/// Where a CONNECT asks to go, from its `:authority`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelTarget {
    /// `ip:port`: a workload address (or, through a waypoint, a service VIP).
    Addr(SocketAddr),
    /// `hostname:port`: a service by name (double HBONE through an east-west gateway).
    Host {
        /// The hostname.
        host: String,
        /// The port.
        port: u16,
    },
}

impl TunnelTarget {
    /// Parses a CONNECT authority; `None` unless it is `ip:port` or `host:port` with a valid port.
    pub fn parse(authority: &str) -> Option<TunnelTarget> {
        if let Ok(addr) = authority.parse::<SocketAddr>() {
            return (addr.port() != 0).then(|| TunnelTarget::Addr(canonical(addr)));
        }
        let (host, port) = authority.rsplit_once(':')?;
        let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
        let valid_host = is_dns_name(host);
        // A host that ends in a number (`127.1`, `2130706433`, `0x7f000001`) is an IPv4 address to many
        // resolvers: refuse it, or it would bypass the destination-address check as a "hostname".
        (valid_host && !ends_in_number(host)).then(|| TunnelTarget::Host {
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// The target port.
    pub fn port(&self) -> u16 {
        match self {
            TunnelTarget::Addr(addr) => addr.port(),
            TunnelTarget::Host { port, .. } => *port,
        }
    }
}

impl fmt::Display for TunnelTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TunnelTarget::Addr(addr) => write!(f, "{addr}"),
            TunnelTarget::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// One CONNECT that passed the protocol checks, waiting for the service's answer.
///
/// Call [`InboundTunnel::accept`] once the upstream is ready (ztunnel connects upstream before answering
/// 200), or [`InboundTunnel::reject`] with a status. A tunnel dropped without an answer is rejected with
/// `503`, so a failing service never leaves a client waiting. If the client resets the stream, or its
/// connection ends, before the tunnel is answered, the service's future for it is dropped: nobody is left
/// to answer, and work a client abandons must not pile up (HTTP/2 rapid reset, CVE-2023-44487).
pub struct InboundTunnel {
    peer: SpiffeId,
    peer_addr: SocketAddr,
    local_addr: SocketAddr,
    target: TunnelTarget,
    headers: HeaderMap,
    respond: Responder,
    body: Option<RecvStream>,
}

/// The answer half of a CONNECT, shared by the tunnel, which answers it, and the stream's task, which
/// watches it for a client reset until then.
#[derive(Clone)]
struct Responder(Arc<Mutex<Option<SendResponse<Bytes>>>>);

impl Responder {
    fn new(respond: SendResponse<Bytes>) -> Self {
        Responder(Arc::new(Mutex::new(Some(respond))))
    }

    fn take(&self) -> Option<SendResponse<Bytes>> {
        self.slot().take()
    }

    fn slot(&self) -> MutexGuard<'_, Option<SendResponse<Bytes>>> {
        // The slot holds no invariant a panic elsewhere could break.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Resolves once the client resets the stream, or the connection ends, while the CONNECT is still
    /// unanswered. Never resolves once it was answered: from then on the `HboneStream` reports resets.
    async fn abandoned(&self) {
        std::future::poll_fn(|cx| match self.slot().as_mut() {
            Some(respond) => respond.poll_reset(cx).map(|_reset_or_gone| ()),
            None => Poll::Pending,
        })
        .await
    }
}

impl InboundTunnel {
    /// The client's proven identity.
    pub fn peer_identity(&self) -> &SpiffeId {
        &self.peer
    }

    /// The client's address (the HBONE connection's source).
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// The local address the HBONE connection arrived on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where the client asked to go.
    pub fn target(&self) -> &TunnelTarget {
        &self.target
    }

    /// The CONNECT request's headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The client's `baggage`.
    pub fn baggage(&self) -> Baggage {
        Baggage::from_headers(&self.headers)
    }

    /// Answers `200` with `headers` (ztunnel sends the destination's `baggage`) and returns the byte stream.
    pub fn accept(mut self, headers: HeaderMap) -> Result<HboneStream, HboneError> {
        let (Some(mut respond), Some(body)) = (self.respond.take(), self.body.take()) else {
            return Err(HboneError::InvalidRequest("tunnel already answered".to_owned()));
        };
        let mut response = Response::new(());
        *response.headers_mut() = headers;
        let send = respond.send_response(response, false)?;
        let peer = self.peer.clone();
        Ok(HboneStream::new(
            send,
            body,
            peer,
            std::mem::take(&mut self.headers),
            None,
        ))
    }

    /// Answers with `status` (401 for a policy denial, 503 when the upstream is unreachable, ...) and ends
    /// the stream.
    pub fn reject(mut self, status: StatusCode) {
        self.respond_with(status);
    }

    fn respond_with(&mut self, status: StatusCode) {
        if let Some(mut respond) = self.respond.take() {
            let mut response = Response::new(());
            *response.status_mut() = status;
            // The client may already be gone; then there is nobody to tell.
            let _ = respond.send_response(response, true);
        }
    }
}

impl Drop for InboundTunnel {
    fn drop(&mut self) {
        self.respond_with(StatusCode::SERVICE_UNAVAILABLE);
    }
}

impl fmt::Debug for InboundTunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboundTunnel")
            .field("peer", &self.peer)
            .field("peer_addr", &self.peer_addr)
            .field("local_addr", &self.local_addr)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// Serves HBONE on a listener: TLS, HTTP/2, protocol checks, then `service` per CONNECT.
pub struct HboneAcceptor<S> {
    config: Arc<HboneConfig>,
    tls: ServerTls,
    service: S,
    check_destination: bool,
}

/// Where the acceptor's TLS configuration comes from.
enum ServerTls {
    /// One configuration for every connection (a dedicated proxy, a waypoint).
    Fixed(TlsAcceptor),
    /// Chosen per connection from its local address (a node proxy serving several workloads).
    Selected(Arc<dyn ServerConfigSelector>),
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerTls::Fixed(_) => f.write_str("Fixed"),
            ServerTls::Selected(selector) => f.debug_tuple("Selected").field(selector).finish(),
        }
    }
}

impl<S> HboneAcceptor<S>
where
    S: Service<InboundTunnel, Response = (), Error = Infallible> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
{
    /// An acceptor presenting `tls` (see `mesh_core::tls::server_config`) on every connection and handing
    /// tunnels to `service`.
    pub fn new(config: HboneConfig, tls: Arc<rustls::ServerConfig>, service: S) -> Self {
        Self::with_tls(config, ServerTls::Fixed(TlsAcceptor::from(tls)), service)
    }

    /// An acceptor presenting, on each connection, the configuration `selector` picks for the local
    /// address the connection arrived on (a node proxy presents the certificate of the workload at that
    /// address: [`WorkloadConfigSelector`](crate::WorkloadConfigSelector)). Selection happens before the
    /// TLS handshake and within `handshake_timeout`; a connection it fails for is closed without one, and
    /// [`HboneAcceptor::serve`] logs why at debug level.
    pub fn with_selector(config: HboneConfig, selector: Arc<dyn ServerConfigSelector>, service: S) -> Self {
        Self::with_tls(config, ServerTls::Selected(selector), service)
    }

    fn with_tls(config: HboneConfig, tls: ServerTls, service: S) -> Self {
        HboneAcceptor {
            config: Arc::new(config),
            tls,
            service,
            check_destination: true,
        }
    }

    /// Lets CONNECTs name an IP other than the one the connection arrived on: for waypoints, which receive
    /// service VIPs, and which then check the target themselves.
    pub fn allow_any_destination(mut self) -> Self {
        self.check_destination = false;
        self
    }

    /// Accepts connections until `drain` is signalled; each connection then finishes its streams after a
    /// GOAWAY. Connections are served on their own tasks, holding a clone of `drain` until they end.
    pub async fn serve(self, listener: TcpListener, drain: DrainWatch) -> Result<(), HboneError> {
        let this = Arc::new(self);
        let slots = Arc::new(tokio::sync::Semaphore::new(this.config.server_max_connections));
        loop {
            let permit = tokio::select! {
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_closed) => return Ok(()),
                },
                () = drain.signaled() => return Ok(()),
            };
            let (tcp, peer_addr) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Running out of file descriptors and the like pass; back off briefly.
                        tracing::warn!(%error, "accepting an HBONE connection failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = drain.signaled() => return Ok(()),
            };
            let this = this.clone();
            let drain = drain.clone();
            tokio::spawn(async move {
                if let Err(error) = this.serve_connection(tcp, drain).await {
                    tracing::debug!(%error, %peer_addr, "HBONE connection ended with an error");
                }
                drop(permit);
            });
        }
    }

    /// Serves one accepted TCP connection to completion.
    pub async fn serve_connection(&self, tcp: TcpStream, drain: DrainWatch) -> Result<(), HboneError> {
        let _ = tcp.set_nodelay(true);
        let peer_addr = canonical(tcp.peer_addr()?);
        let local_addr = canonical(tcp.local_addr()?);
        self.serve_io(tcp, peer_addr, local_addr, drain).await
    }

    /// Serves one connection over any byte stream (an in-memory pipe in tests, an outer tunnel for
    /// double HBONE), given the addresses it stands for.
    pub async fn serve_io<IO>(
        &self,
        io: IO,
        peer_addr: SocketAddr,
        local_addr: SocketAddr,
        drain: DrainWatch,
    ) -> Result<(), HboneError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let limit = self.config.handshake_timeout;
        let timed_out = |step| HboneError::Timeout { step, after: limit };
        // Choosing the certificate counts against the handshake's time, so a slow CA cannot make a silent
        // client's connection outlive the limit.
        let deadline = tokio::time::Instant::now() + limit;
        let acceptor = match &self.tls {
            ServerTls::Fixed(acceptor) => Cow::Borrowed(acceptor),
            ServerTls::Selected(selector) => {
                let config = tokio::time::timeout_at(deadline, selector.select(local_addr))
                    .await
                    .map_err(|_| timed_out("server certificate selection"))??;
                Cow::Owned(TlsAcceptor::from(config))
            }
        };
        let tls_stream = tokio::time::timeout_at(deadline, acceptor.accept(io))
            .await
            .map_err(|_| timed_out("TLS handshake"))?
            .map_err(|source| HboneError::Tls {
                addr: peer_addr,
                source,
            })?;
        if tls_stream.get_ref().1.alpn_protocol() != Some(tls::ALPN_H2) {
            return Err(HboneError::NoH2Alpn { addr: peer_addr });
        }
        let peer = tls::peer_identity(tls_stream.get_ref().1)?;
        let mut connection = tokio::time::timeout(limit, self.config.server_builder().handshake(tls_stream))
            .await
            .map_err(|_| timed_out("HTTP/2 handshake"))??;
        let keepalive = crate::keepalive::run(
            connection.ping_pong(),
            self.config.keepalive_interval,
            self.config.keepalive_timeout,
        );
        tokio::pin!(keepalive);
        let mut draining = false;
        loop {
            tokio::select! {
                next = connection.accept() => match next {
                    Some(Ok((request, respond))) => {
                        let context = StreamContext {
                            peer: peer.clone(),
                            peer_addr,
                            local_addr,
                            check_destination: self.check_destination,
                        };
                        tokio::spawn(handle_stream(self.service.clone(), context, request, respond));
                    }
                    Some(Err(error)) => return Err(error.into()),
                    None => break,
                },
                () = drain.signaled(), if !draining => {
                    draining = true;
                    connection.graceful_shutdown();
                }
                () = &mut keepalive => {
                    return Err(HboneError::Timeout { step: "PING answer", after: self.config.keepalive_timeout });
                }
            }
        }
        // No more streams will come; let the open ones finish.
        std::future::poll_fn(|cx| connection.poll_closed(cx)).await?;
        Ok(())
    }
}

impl<S> fmt::Debug for HboneAcceptor<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HboneAcceptor")
            .field("config", &self.config)
            .field("tls", &self.tls)
            .field("check_destination", &self.check_destination)
            .finish_non_exhaustive()
    }
}

struct StreamContext {
    peer: SpiffeId,
    peer_addr: SocketAddr,
    local_addr: SocketAddr,
    check_destination: bool,
}

async fn handle_stream<S>(
    service: S,
    context: StreamContext,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) where
    S: Service<InboundTunnel, Response = (), Error = Infallible>,
{
    let (parts, body) = request.into_parts();
    let target = match validate(&parts.method, &parts.uri, &context) {
        Ok(target) => target,
        Err(reason) => {
            tracing::debug!(peer = %context.peer, %reason, "refusing HBONE request");
            let mut response = Response::new(());
            *response.status_mut() = StatusCode::BAD_REQUEST;
            let _ = respond.send_response(response, true);
            return;
        }
    };
    let responder = Responder::new(respond);
    let tunnel = InboundTunnel {
        peer: context.peer,
        peer_addr: context.peer_addr,
        local_addr: context.local_addr,
        target,
        headers: parts.headers,
        respond: responder.clone(),
        body: Some(body),
    };
    // h2 frees a stream's concurrency slot as soon as the client resets it, so without this a client could
    // open and reset CONNECTs faster than the service finishes them (a policy check, a 10 s upstream
    // connect) and the abandoned work would pile up with no limit at all.
    tokio::select! {
        answered = service.oneshot(tunnel) => {
            let Ok(()) = answered;
        }
        () = responder.abandoned() => {
            tracing::debug!(peer_addr = %context.peer_addr, "CONNECT abandoned before its answer, dropping its work");
        }
    }
}

/// The protocol checks; `Err` carries the reason for the log.
fn validate(method: &Method, uri: &http::Uri, context: &StreamContext) -> Result<TunnelTarget, String> {
    if method != Method::CONNECT {
        return Err(format!("method {method} is not CONNECT"));
    }
    let authority = uri.authority().ok_or("no :authority")?;
    let target =
        TunnelTarget::parse(authority.as_str()).ok_or_else(|| format!("bad authority {authority}"))?;
    if PROXY_PORTS.contains(&target.port()) {
        return Err(format!("target port {} is the proxy's own", target.port()));
    }
    if let TunnelTarget::Addr(addr) = &target
        && context.check_destination
        && addr.ip() != context.local_addr.ip()
    {
        return Err(format!(
            "ip mismatch: CONNECT to {} arrived on {}",
            addr.ip(),
            context.local_addr.ip()
        ));
    }
    Ok(target)
}

/// The WHATWG URL rule: the last label is all digits, or `0x` followed by hex digits.
/// Whether `host` is a DNS name by RFC 1123's rules: dot-separated labels of 1 to 63 letters, digits and
/// hyphens, no label starting or ending with a hyphen, at most 253 bytes, one trailing dot allowed. An empty
/// label (`a..b`, `.a`) is refused rather than left for a resolver to interpret.
fn is_dns_name(host: &str) -> bool {
    let name = host.strip_suffix('.').unwrap_or(host);
    !name.is_empty()
        && host.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn ends_in_number(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    let last = host.rsplit('.').next().unwrap_or(host);
    let hex = last.strip_prefix("0x").or_else(|| last.strip_prefix("0X"));
    (!last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()))
        || hex.is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// IPv4-mapped IPv6 addresses (from a dual-stack listener) compare as the IPv4 address they carry.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    #[test_case("198.18.0.2:8080", Some(TunnelTarget::Addr("198.18.0.2:8080".parse().unwrap())) ; "ipv4")]
    #[test_case("[2001:db8::2]:80", Some(TunnelTarget::Addr("[2001:db8::2]:80".parse().unwrap())) ; "ipv6")]
    #[test_case("[::ffff:10.0.0.1]:80", Some(TunnelTarget::Addr("10.0.0.1:80".parse().unwrap())) ; "mapped")]
    #[test_case("Echo.default.svc.cluster.local:80", Some(TunnelTarget::Host { host: "echo.default.svc.cluster.local".into(), port: 80 }) ; "hostname")]
    #[test_case("echo:0", None ; "port zero")]
    #[test_case("echo", None ; "no port")]
    #[test_case(":80", None ; "no host")]
    #[test_case("ec ho:80", None ; "bad host")]
    #[test_case("echo:99999", None ; "port overflow")]
    #[test_case("127.1:80", None ; "short ipv4 form")]
    #[test_case("2130706433:80", None ; "ipv4 as one number")]
    #[test_case("0x7f000001:80", None ; "ipv4 in hex")]
    #[test_case("10.0.0.2:0", None ; "address with port zero")]
    #[test_case("svc1.ns2:80", Some(TunnelTarget::Host { host: "svc1.ns2".into(), port: 80 }) ; "digits inside labels are fine")]
    #[test_case("echo.default.:80", Some(TunnelTarget::Host { host: "echo.default.".into(), port: 80 }) ; "one trailing dot")]
    #[test_case("a..b:80", None ; "empty label")]
    #[test_case(".echo:80", None ; "leading dot")]
    #[test_case("echo..:80", None ; "two trailing dots")]
    #[test_case(".:80", None ; "only a dot")]
    #[test_case("-echo.default:80", None ; "label starts with a hyphen")]
    #[test_case("echo-.default:80", None ; "label ends with a hyphen")]
    #[test_case("my-echo.default:80", Some(TunnelTarget::Host { host: "my-echo.default".into(), port: 80 }) ; "hyphen inside a label")]
    #[test_case(&format!("{}.default:80", "e".repeat(64)), None ; "label of 64 bytes")]
    #[test_case(&format!("{}.default:80", "e".repeat(63)), Some(TunnelTarget::Host { host: format!("{}.default", "e".repeat(63)), port: 80 }) ; "label of 63 bytes")]
    #[test_case(&format!("{}:80", ["abcdefghi"; 26].join(".")), None ; "name of 259 bytes")]
    fn parse_targets(input: &str, expected: Option<TunnelTarget>) {
        assert_eq!(TunnelTarget::parse(input), expected);
    }
}
