//! [`HboneConnector`]: opens HBONE tunnels, pooling HTTP/2 connections per (source identity, expected
//! destination identities, destination address, source address).
//!
//! Pool rules (Istio ztunnel's, including its fix for racing handshakes):
//! - A connection bound to one client's address ([`ConnectRequest::source_addr`]) never carries another
//!   client's stream: the address is part of the key, since the peer attributes every stream on the
//!   connection to the connection's source IP.
//! - A connection carries at most `min(pool_max_streams_per_connection, peer's MAX_CONCURRENT_STREAMS)`
//!   streams; a full connection is passed over and the next caller opens another.
//! - Only one handshake per key is in flight: concurrent callers wait for it and then share the new
//!   connection, instead of each opening their own.
//! - A connection with no streams for `pool_idle_timeout` closes; one whose PING goes unanswered for
//!   `keepalive_timeout` closes; one that received GOAWAY takes no new streams.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use h2::client::SendRequest;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use mesh_core::{CertProvider, SpiffeId, tls};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::config::HboneConfig;
use crate::error::HboneError;
use crate::headers::{BAGGAGE, Baggage, FORWARDED, Forwarded, TRACEPARENT, TraceParent};
use crate::socket::{PlainSockets, SocketFactory};
use crate::stream::HboneStream;

/// A request to open one HBONE tunnel.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// The identity to present (the source workload's).
    pub source: SpiffeId,
    /// Where to connect: the destination's HBONE address, normally `<workload ip>:15008`.
    pub destination: SocketAddr,
    /// The identities the server may prove: the destination workload's, plus a service's
    /// `subjectAltNames`. Connections are pooled per this set.
    pub expected_identities: Vec<SpiffeId>,
    /// The CONNECT authority: the destination workload's `ip:port`, a service `VIP:port` when going through
    /// a waypoint, or `hostname:port` for double HBONE.
    pub authority: String,
    /// Extra request headers (`baggage`, `forwarded`, `x-forwarded-network`, ...). A `traceparent` is
    /// added if absent.
    pub headers: HeaderMap,
    /// Bind the connection to this local address: the client's own IP where a node proxy preserves the
    /// original source, so the destination's IP-based policy and telemetry see the real client. Part of
    /// the pool key. `None` lets the system pick. The [`SocketFactory`] must honour it or fail the
    /// connect (the default factory, [`PlainSockets`], binds it). Ignored by
    /// [`HboneConnector::connect_over`], which opens no socket.
    pub source_addr: Option<IpAddr>,
}

impl ConnectRequest {
    /// A request with no extra headers.
    pub fn new(
        source: SpiffeId,
        destination: SocketAddr,
        expected_identities: Vec<SpiffeId>,
        authority: impl Into<String>,
    ) -> Self {
        ConnectRequest {
            source,
            destination,
            expected_identities,
            authority: authority.into(),
            headers: HeaderMap::new(),
            source_addr: None,
        }
    }

    /// Binds the connection to `ip` (see [`ConnectRequest::source_addr`]). An IPv4-mapped IPv6 address
    /// is stored as IPv4.
    pub fn with_source_addr(mut self, ip: IpAddr) -> Self {
        self.source_addr = Some(ip.to_canonical());
        self
    }

    /// Adds the `baggage` header describing the source workload.
    pub fn with_baggage(mut self, baggage: &Baggage) -> Self {
        self.headers.insert(BAGGAGE, baggage.to_header_value());
        self
    }

    /// Adds the `forwarded` header with the original client address (and service hostname).
    pub fn with_forwarded(mut self, forwarded: &Forwarded) -> Self {
        self.headers.insert(FORWARDED, forwarded.to_header_value());
        self
    }

    /// Adds any other header.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.insert(name, value);
        self
    }

    fn pool_key(&self) -> PoolKey {
        let mut expected = self.expected_identities.clone();
        expected.sort();
        expected.dedup();
        PoolKey {
            source: self.source.clone(),
            expected,
            destination: self.destination,
            source_addr: self.source_addr.map(|ip| ip.to_canonical()),
        }
    }

    fn to_http(&self) -> Result<Request<()>, HboneError> {
        let uri: Uri = self
            .authority
            .parse()
            .map_err(|e| HboneError::InvalidRequest(format!("authority {:?}: {e}", self.authority)))?;
        if uri.scheme().is_some()
            || uri.authority().is_none()
            || uri.path_and_query().is_some_and(|p| p != "/")
        {
            return Err(HboneError::InvalidRequest(format!(
                "authority {:?} must be host:port",
                self.authority
            )));
        }
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(uri)
            .version(http::Version::HTTP_2)
            .body(())
            .map_err(|e| HboneError::InvalidRequest(e.to_string()))?;
        *request.headers_mut() = self.headers.clone();
        if !request.headers().contains_key(TRACEPARENT) {
            request
                .headers_mut()
                .insert(TRACEPARENT, TraceParent::random().to_header_value());
        }
        Ok(request)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    source: SpiffeId,
    expected: Vec<SpiffeId>,
    destination: SocketAddr,
    /// A connection bound to one client's address must never carry another client's streams.
    source_addr: Option<IpAddr>,
}

/// Opens HBONE tunnels: a `tower::Service<ConnectRequest, Response = HboneStream>`. Cheap to clone; clones
/// share the pool. Needs a tokio runtime (each connection is driven by a task).
#[derive(Clone)]
pub struct HboneConnector {
    inner: Arc<Inner>,
}

struct Inner {
    config: HboneConfig,
    certs: Arc<dyn CertProvider>,
    sockets: Arc<dyn SocketFactory>,
    pool: Mutex<Pool>,
    handshakes: AtomicU64,
}

/// The pool's slots, one per key.
#[derive(Default)]
struct Pool {
    slots: HashMap<PoolKey, Arc<KeySlot>>,
    /// Size at which unused slots are swept next; sweeping on every connect would cost O(keys) each time.
    sweep_at: usize,
}

impl Pool {
    /// Drops slots with no connection that nobody is using, once the map has doubled since the last sweep:
    /// amortized O(1) per connect, and the map stays within twice its live size.
    fn sweep_if_grown(&mut self) {
        if self.slots.len() < self.sweep_at {
            return;
        }
        self.slots
            .retain(|_, slot| !slot.is_empty() || Arc::strong_count(slot) > 1);
        self.sweep_at = (self.slots.len() * 2).max(64);
    }
}

/// Connection counts, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Connections (TCP + TLS + HTTP/2 handshakes) opened since the connector was created.
    pub handshakes: u64,
    /// Connections currently open and pooled.
    pub open_connections: usize,
    /// Streams currently open across all pooled connections.
    pub open_streams: usize,
}

impl HboneConnector {
    /// A connector that presents certificates from `certs` and opens plain TCP connections
    /// ([`PlainSockets`]).
    pub fn new(config: HboneConfig, certs: Arc<dyn CertProvider>) -> Self {
        Self::with_parts(config, certs, Arc::new(PlainSockets))
    }

    fn with_parts(
        config: HboneConfig,
        certs: Arc<dyn CertProvider>,
        sockets: Arc<dyn SocketFactory>,
    ) -> Self {
        HboneConnector {
            inner: Arc::new(Inner {
                config,
                certs,
                sockets,
                pool: Mutex::new(Pool::default()),
                handshakes: AtomicU64::new(0),
            }),
        }
    }

    /// The same connector, opening its TCP connections through `sockets` (e.g.
    /// [`MarkedSockets`](crate::MarkedSockets), so a node proxy's own traffic escapes capture). Pooling,
    /// the connect timeout and error mapping are unchanged; tunnels opened with
    /// [`HboneConnector::connect_over`] do not open sockets and so do not use it.
    ///
    /// Call it while building, before cloning or connecting: the result starts with an empty pool of its
    /// own, and clones made earlier keep the old factory and pool.
    pub fn with_socket_factory(self, sockets: Arc<dyn SocketFactory>) -> Self {
        Self::with_parts(self.inner.config.clone(), self.inner.certs.clone(), sockets)
    }

    /// Opens a tunnel: reuses a pooled connection with room for a stream, or opens one.
    pub async fn connect(&self, request: ConnectRequest) -> Result<HboneStream, HboneError> {
        self.inner.clone().connect(request).await
    }

    /// Opens a tunnel inside `transport` rather than over a new TCP connection: a mutual-TLS and HTTP/2
    /// session of its own within the given byte stream, and one CONNECT on it. This is double HBONE when
    /// `transport` is itself an [`HboneStream`] to an east-west gateway (see
    /// [`HboneConnector::connect_double`]). Not pooled: the session ends with the returned stream.
    /// `request.destination` only labels errors here.
    pub async fn connect_over<IO>(
        &self,
        transport: IO,
        request: ConnectRequest,
    ) -> Result<HboneStream, HboneError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let http_request = request.to_http()?;
        let timeout = self.inner.config.connect_timeout;
        let conn = tokio::time::timeout(timeout, self.inner.handshake(transport, &request))
            .await
            .map_err(|_| HboneError::Timeout {
                step: "inner HBONE handshake",
                after: timeout,
            })??;
        let guard = conn.try_acquire().ok_or_else(|| {
            HboneError::InvalidRequest("a new connection has no stream capacity".to_owned())
        })?;
        // `conn` (holding the only SendRequest) is dropped on return, so the HTTP/2 session closes once the
        // stream is done.
        open_stream(&conn, http_request, guard)
            .await
            .map_err(StreamError::into_inner)
    }

    /// Double HBONE, as ztunnel does it across networks: an outer tunnel to the east-west gateway
    /// (`outer`, whose authority is normally the service `hostname:port`), and inside it an end-to-end
    /// tunnel to the destination (`inner`, with its own mutual TLS; add `x-forwarded-network` to its
    /// headers). The gateway sees only the inner TLS bytes.
    pub async fn connect_double(
        &self,
        outer: ConnectRequest,
        inner: ConnectRequest,
    ) -> Result<HboneStream, HboneError> {
        let outer_stream = self.connect(outer).await?;
        self.connect_over(outer_stream, inner).await
    }

    /// Current pool counts.
    pub fn stats(&self) -> PoolStats {
        let pool = lock(&self.inner.pool);
        let mut stats = PoolStats {
            handshakes: self.inner.handshakes.load(Ordering::Relaxed),
            open_connections: 0,
            open_streams: 0,
        };
        for slot in pool.slots.values() {
            for conn in lock(&slot.conns).iter().filter(|c| !c.shared.is_closed()) {
                stats.open_connections += 1;
                stats.open_streams += conn.shared.active.load(Ordering::Relaxed);
            }
        }
        stats
    }
}

impl fmt::Debug for HboneConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HboneConnector")
            .field("config", &self.inner.config)
            .field("sockets", &self.inner.sockets)
            .field("stats", &self.stats())
            .finish()
    }
}

impl tower::Service<ConnectRequest> for HboneConnector {
    type Response = HboneStream;
    type Error = HboneError;
    type Future = BoxFuture<'static, Result<HboneStream, HboneError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), HboneError>> {
        // Backpressure is per connection (stream limits), applied inside `call`.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: ConnectRequest) -> Self::Future {
        Box::pin(self.inner.clone().connect(request))
    }
}

impl Inner {
    async fn connect(self: Arc<Self>, request: ConnectRequest) -> Result<HboneStream, HboneError> {
        let http_request = request.to_http()?;
        let slot = {
            let mut pool = lock(&self.pool);
            pool.sweep_if_grown();
            pool.slots.entry(request.pool_key()).or_default().clone()
        };
        // A reused connection can close or receive GOAWAY between checkout and our CONNECT; nothing has been
        // sent on the tunnel yet then, so one retry is safe. A connection opened for this very request gets
        // no retry: its failure is the answer.
        loop {
            let checkout = slot.checkout_or_connect(|| self.establish(&request)).await?;
            let conn = checkout.conn.clone();
            match open_stream(&conn, http_request.clone(), checkout.guard).await {
                Ok(stream) => return Ok(stream),
                Err(StreamError::ConnectionUnusable(e)) if checkout.reused => {
                    tracing::debug!(error = %e, destination = %request.destination, "pooled connection unusable, retrying");
                    conn.shared.mark_closed();
                }
                Err(error) => {
                    let e = error.into_inner();
                    if matches!(e, HboneError::H2(_)) {
                        conn.shared.mark_closed();
                    }
                    return Err(e);
                }
            }
        }
    }

    /// TCP connect, then [`Inner::handshake`], all within the connect timeout.
    async fn establish(&self, request: &ConnectRequest) -> Result<PooledConn, HboneError> {
        let addr = request.destination;
        let timeout = self.config.connect_timeout;
        let connect = async {
            let tcp = self
                .sockets
                .connect_from(request.source_addr.map(|ip| ip.to_canonical()), addr)
                .await
                .map_err(|source| HboneError::Connect { addr, source })?;
            let _ = tcp.set_nodelay(true);
            self.handshake(tcp, request).await
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| HboneError::Timeout {
                step: "HBONE connection setup",
                after: timeout,
            })?
    }

    /// Mutual TLS and the HTTP/2 handshake over `transport`; spawns the task that drives the connection
    /// (PING keepalive, idle close).
    async fn handshake<IO>(&self, transport: IO, request: &ConnectRequest) -> Result<PooledConn, HboneError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let addr = request.destination;
        let cert = self.certs.certificate(&request.source).await?;
        let tls_config = tls::client_config(cert, request.expected_identities.clone())?;
        let tls_stream = TlsConnector::from(tls_config)
            .connect(tls::server_name(), transport)
            .await
            .map_err(|source| HboneError::Tls { addr, source })?;
        if tls_stream.get_ref().1.alpn_protocol() != Some(tls::ALPN_H2) {
            return Err(HboneError::NoH2Alpn { addr });
        }
        let peer = tls::peer_identity(tls_stream.get_ref().1)?;
        let (send, mut connection) = self.config.client_builder().handshake(tls_stream).await?;
        self.handshakes.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(ConnShared::new());
        let ping = connection.ping_pong();
        let config = self.config.clone();
        let task_shared = shared.clone();
        tokio::spawn(async move {
            tokio::select! {
                result = &mut connection => {
                    if let Err(error) = result {
                        tracing::debug!(%error, %addr, "HBONE connection ended with an error");
                    }
                }
                () = crate::keepalive::run(ping, config.keepalive_interval, config.keepalive_timeout) => {
                    tracing::warn!(%addr, timeout = ?config.keepalive_timeout, "HBONE peer stopped answering PINGs; closing the connection");
                }
                () = task_shared.idle_close(config.pool_idle_timeout) => {
                    tracing::debug!(%addr, "closing idle HBONE connection");
                }
            }
            task_shared.mark_closed();
        });
        Ok(PooledConn {
            send,
            shared,
            peer,
            max_streams: self.config.pool_max_streams_per_connection,
        })
    }
}

enum StreamError {
    /// The connection could not take this stream (closed, GOAWAY, refused): retry elsewhere.
    ConnectionUnusable(HboneError),
    Other(HboneError),
}

impl StreamError {
    fn into_inner(self) -> HboneError {
        match self {
            StreamError::ConnectionUnusable(e) | StreamError::Other(e) => e,
        }
    }
}

async fn open_stream(
    conn: &PooledConn,
    request: Request<()>,
    guard: StreamGuard,
) -> Result<HboneStream, StreamError> {
    let unusable = |e: h2::Error| {
        if e.is_go_away() || e.is_io() || e.reason() == Some(h2::Reason::REFUSED_STREAM) {
            StreamError::ConnectionUnusable(e.into())
        } else {
            StreamError::Other(e.into())
        }
    };
    let mut send = conn
        .send
        .clone()
        .ready()
        .await
        .map_err(|e| StreamError::ConnectionUnusable(e.into()))?;
    let (response, send_stream) = send.send_request(request, false).map_err(unusable)?;
    let response = response.await.map_err(unusable)?;
    let status = response.status();
    if status != StatusCode::OK {
        return Err(StreamError::Other(HboneError::Status(status)));
    }
    let (parts, recv) = response.into_parts();
    Ok(HboneStream::new(
        send_stream,
        recv,
        conn.peer.clone(),
        parts.headers,
        Some(Box::new(guard)),
    ))
}

/// One pooled HTTP/2 connection.
#[derive(Clone)]
struct PooledConn {
    send: SendRequest<Bytes>,
    shared: Arc<ConnShared>,
    peer: SpiffeId,
    max_streams: usize,
}

impl PooledConn {
    /// Claims a stream slot if the connection is open and below both limits.
    fn try_acquire(&self) -> Option<StreamGuard> {
        let limit = self.max_streams.min(self.send.current_max_send_streams());
        let active = &self.shared.active;
        let mut current = active.load(Ordering::Acquire);
        loop {
            if current == CLOSED || current >= limit {
                return None;
            }
            match active.compare_exchange_weak(current, current + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(StreamGuard(self.shared.clone())),
                Err(actual) => current = actual,
            }
        }
    }
}

/// The `active` value of a connection that takes no more streams.
const CLOSED: usize = usize::MAX;

/// State shared between a pooled connection's users and the task driving it.
struct ConnShared {
    /// Open streams, or [`CLOSED`].
    active: AtomicUsize,
    /// When the stream count last dropped to zero, in ms since `created`.
    idle_since_ms: AtomicU64,
    created: Instant,
}

impl ConnShared {
    fn new() -> Self {
        ConnShared {
            active: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            created: Instant::now(),
        }
    }

    fn is_closed(&self) -> bool {
        self.active.load(Ordering::Acquire) == CLOSED
    }

    fn mark_closed(&self) {
        self.active.store(CLOSED, Ordering::Release);
    }

    fn release(&self) {
        let now = u64::try_from(self.created.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.idle_since_ms.store(now, Ordering::Release);
        // Never decrement a closed marker.
        let _ = self
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n != CLOSED && n > 0).then(|| n - 1)
            });
    }

    /// Resolves when the connection has had no streams for `timeout`, having atomically marked it closed
    /// so no caller can check it out in the meantime.
    async fn idle_close(&self, timeout: Duration) {
        let check_every = (timeout / 4).max(Duration::from_millis(10));
        loop {
            tokio::time::sleep(check_every).await;
            let idle_since = self.created + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
            if idle_since.elapsed() >= timeout
                && self
                    .active
                    .compare_exchange(0, CLOSED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return;
            }
        }
    }
}

/// Holds one stream slot of a pooled connection; dropping it frees the slot.
struct StreamGuard(Arc<ConnShared>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// The connections of one pool key, and the lock that keeps their handshakes one at a time.
#[derive(Default)]
struct KeySlot {
    conns: Mutex<Vec<PooledConn>>,
    connecting: tokio::sync::Mutex<()>,
}

impl KeySlot {
    fn is_empty(&self) -> bool {
        lock(&self.conns).is_empty()
    }

    fn try_checkout(&self) -> Option<Checkout> {
        let mut conns = lock(&self.conns);
        conns.retain(|c| !c.shared.is_closed());
        conns.iter().find_map(|c| {
            c.try_acquire().map(|guard| Checkout {
                conn: c.clone(),
                guard,
                reused: true,
            })
        })
    }

    async fn checkout_or_connect<F, Fut>(&self, establish: F) -> Result<Checkout, HboneError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<PooledConn, HboneError>>,
    {
        if let Some(found) = self.try_checkout() {
            return Ok(found);
        }
        // One handshake per key at a time (ztunnel issue 864): whoever holds this lock connects; the others
        // wait and then find room on the new connection.
        let _connecting = self.connecting.lock().await;
        if let Some(found) = self.try_checkout() {
            return Ok(found);
        }
        let conn = establish().await?;
        let guard = conn.try_acquire().ok_or_else(|| {
            HboneError::InvalidRequest("a new connection has no stream capacity".to_owned())
        })?;
        lock(&self.conns).push(conn.clone());
        Ok(Checkout {
            conn,
            guard,
            reused: false,
        })
    }
}

/// A stream slot on a pooled connection.
struct Checkout {
    conn: PooledConn,
    guard: StreamGuard,
    /// Whether the connection existed before this request (and so may have gone stale).
    reused: bool,
}

/// A poisoned lock means a panic mid-update of a plain list or map, which leaves it consistent.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u16) -> PoolKey {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        PoolKey {
            source: id.clone(),
            expected: vec![id],
            destination: SocketAddr::from(([127, 0, 0, 1], i)),
            source_addr: None,
        }
    }

    #[test]
    fn unused_slots_are_swept_only_once_the_map_has_grown() {
        let mut pool = Pool::default();
        let held = Arc::new(KeySlot::default());
        pool.slots.insert(key(0), held.clone());
        for i in 1..70 {
            pool.slots.insert(key(i), Arc::default());
        }
        pool.sweep_if_grown();
        // The slot someone holds stays; the 69 unused ones go.
        assert_eq!(pool.slots.len(), 1);
        assert_eq!(pool.sweep_at, 64);
        for i in 100..120 {
            pool.slots.insert(key(i), Arc::default());
        }
        pool.sweep_if_grown();
        assert_eq!(pool.slots.len(), 21, "below the threshold nothing is swept");
        drop(held);
    }
}
