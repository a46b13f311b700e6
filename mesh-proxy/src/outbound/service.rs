//! [`Outbound`]: what the node proxy does with each connection a workload opens (Istio ztunnel's port
//! 15001): find the source workload, [`route`] the connection, connect upstream the way the route says
//! (plain TCP, HBONE, double HBONE), then copy bytes both ways, telling the [`Observers`] about it.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, StatusCode};
use mesh_core::SpiffeId;
use mesh_core::model::{MeshSnapshot, Workload};
use mesh_core::sys;
use mesh_hbone::headers::{Baggage, Forwarded, X_FORWARDED_NETWORK};
use mesh_hbone::{ConnectRequest, HboneConnector, HboneError, HboneStream, SocketFactory};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};

use super::{DoubleHboneRoute, HboneKind, HboneRoute, RandomPicker, Route, RouteInput, route};
use crate::error::ProxyError;
use crate::forward::{TunnelSide, copy_bidirectional, copy_with_tunnel, pass_reset_on};
use crate::listener::ConnectionHandler;
use crate::state::ProxyState;
use crate::telemetry::{
    ConnectionOutcome, ConnectionRecord, Observers, Reporter, ResponseFlag, SecurityPolicy,
};

/// How [`Outbound`] finds the workload a connection comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceLookup {
    /// By the client's IP on `network` (a node proxy capturing every pod on its node). A connection
    /// from an address no workload has is refused, as ztunnel does.
    PeerIp {
        /// The network the node's pods are on (`""` is the default network).
        network: Arc<str>,
    },
    /// Always this workload, by UID: the pod whose network namespace the listener lives in (in-pod
    /// mode), or the one workload of a dedicated proxy (ztunnel's `PROXY_WORKLOAD_INFO`). Looked up in
    /// each connection's snapshot, so the workload's current state is used; refused while it is absent.
    Workload {
        /// The workload's UID.
        uid: Arc<str>,
    },
}

/// How captured connections reach the listener, which decides where their original destination is
/// read from (see [`mesh_core::sys`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureMode {
    /// `iptables REDIRECT`: `SO_ORIGINAL_DST`. A connection whose original destination is the listener
    /// itself (a client connecting to the port directly) is refused, since proxying it would loop.
    Redirect,
    /// `iptables TPROXY`: the accepted socket's local address. Since a client connecting to the port
    /// directly looks the same, destinations on the proxy's own ports (15001, 15006, 15008, 15080) are
    /// refused, so such a connection cannot loop; a listener on another port has no such guard.
    Tproxy,
    /// Either, as Istio's ztunnel reads it: `SO_ORIGINAL_DST` (a `REDIRECT`ed connection, or a tracked
    /// `TPROXY` one, which answers with the local address), else the local address. Destinations on the
    /// proxy's own ports are refused as with [`CaptureMode::Tproxy`]; a listener on another port has no
    /// guard against a client connecting to it directly.
    Auto,
}

/// Whether a connection to a destination outside the mesh may be passed through as plain TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passthrough {
    /// Yes: captured traffic to the outside world keeps working (port 15001).
    Allow,
    /// No: only mesh destinations (the SOCKS5 port, by default).
    Refuse,
}

/// Settings of [`Outbound`].
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    /// How the source workload is found.
    pub source: SourceLookup,
    /// Where captured connections' original destinations are read from (used by the
    /// [`ConnectionHandler`] implementation; [`Outbound::proxy`] takes the destination as given).
    pub capture: CaptureMode,
    /// The node this proxy runs on, for [`HboneKind::DirectLocal`] routing.
    pub local_node: Option<Arc<str>>,
    /// Whether the proxy runs in each pod's network namespace (see [`RouteInput::in_pod`]).
    pub in_pod: bool,
    /// The port peers accept HBONE on (Istio: 15008).
    pub hbone_port: u16,
    /// Limit for a plain-TCP upstream connection (HBONE has its own, in the connector's configuration).
    pub connect_timeout: Duration,
    /// `SO_MARK` for plain-TCP upstream sockets, so capture rules skip them (Istio: `Some(0x539)`,
    /// [`sys::PROXY_MARK`], whenever traffic is captured). Setting it needs `CAP_NET_ADMIN`; if it fails,
    /// the connection fails rather than risk being captured again.
    pub mark: Option<u32>,
    /// Connect upstreams from the client's own IP (ztunnel's `ENABLE_ORIG_SRC`), so the destination's
    /// IP-based policy (`ipBlocks`, `notIpBlocks`) and telemetry see the real client rather than this
    /// proxy's address. Needs `CAP_NET_ADMIN` and TPROXY-style routing of the replies back to this host.
    ///
    /// - Plain-TCP upstreams (passthrough, [`Route::Tcp`]) are bound to the client's IP when its family
    ///   matches the destination's.
    /// - HBONE connections are bound to it only with [`SourceLookup::PeerIp`], i.e. a node proxy serving
    ///   several workloads from its own network namespace: the request's
    ///   [`source_addr`](ConnectRequest::source_addr) is set, which also keeps each client's connections
    ///   in a pool of their own. This covers direct tunnels, tunnels to a waypoint, and the outer tunnel of
    ///   double HBONE (Istio keys all three by the client's IP; the inner tunnel opens no socket). Two
    ///   exceptions, as in ztunnel: a client reaching its own IP (the HBONE address is the client's) is
    ///   connected from the proxy's address, since a packet from an address to itself would not make
    ///   the round trip; and with [`SourceLookup::Workload`] nothing is bound, because the proxy already
    ///   runs in (or for) that one workload, whose address its sockets carry.
    ///
    /// For HBONE the [`HboneConnector`]'s [`SocketFactory`] does the binding: [`mesh_hbone::PlainSockets`]
    /// and [`mesh_hbone::MarkedSockets`] can; a factory that cannot fails the connection instead of
    /// connecting from another address, as does a client whose IP family differs from the HBONE
    /// address's.
    pub original_source: bool,
}

impl Default for OutboundConfig {
    /// A node proxy on the default network: source by peer IP, `REDIRECT` capture, not in-pod, HBONE on
    /// 15008, a 10 s connect timeout, no mark and no original source (both need privileges; turn them on
    /// where traffic is captured).
    fn default() -> Self {
        OutboundConfig {
            source: SourceLookup::PeerIp {
                network: Arc::from(""),
            },
            capture: CaptureMode::Redirect,
            local_node: None,
            in_pod: false,
            hbone_port: mesh_core::model::DEFAULT_HBONE_MTLS_PORT,
            connect_timeout: Duration::from_secs(10),
            mark: None,
            original_source: false,
        }
    }
}

/// The outbound proxy: a [`ConnectionHandler`] for the capture port, and [`Outbound::connect`] for
/// callers with a destination of their own (SOCKS5). Cheap to clone; clones share the HBONE pool.
///
/// Every connection that gets as far as an upstream attempt gets a [`ConnectionRecord`] (reporter
/// `source`), told to the observers when it opens and when it closes, with a [`ResponseFlag`] saying how
/// a failure happened: `CONNECT` (upstream unreachable), `TLS_FAILURE`, `IDENTITY_ERROR` (the peer is not
/// who the mesh says, or we have no certificate), `H2_HANDSHAKE_FAILURE`, or `DENY` (the peer answered
/// the CONNECT with 401). Connections refused before that (unknown source, no route) are only logged, as
/// ztunnel does.
///
/// A [`HboneKind::DirectLocal`] route (a destination on this node, shared mode) is carried like
/// [`HboneKind::Direct`]: HBONE in mutual TLS to the node's own 15008, which the kernel delivers without
/// the bytes leaving the machine, and the inbound side applies its policy as for any peer. Istio's older
/// ztunnel skipped the TLS there (an in-process hand-over); we keep one path. HBONE connections are
/// opened by the [`HboneConnector`], so their marks and namespaces come from its
/// [`SocketFactory`](mesh_hbone::SocketFactory).
#[derive(Debug, Clone)]
pub struct Outbound {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: OutboundConfig,
    state: ProxyState,
    connector: HboneConnector,
    observers: Observers,
    /// Opens plain-TCP upstreams instead of [`Outbound::connect_tcp`]'s own sockets when set.
    tcp_sockets: Option<Arc<dyn SocketFactory>>,
}

impl Outbound {
    /// An outbound proxy deciding with `state`, tunnelling through `connector` (whose certificate
    /// provider must hold the source workloads' identities), and reporting to `observers`.
    pub fn new(
        config: OutboundConfig,
        state: ProxyState,
        connector: HboneConnector,
        observers: Observers,
    ) -> Self {
        Outbound {
            inner: Arc::new(Inner {
                config,
                state,
                connector,
                observers,
                tcp_sockets: None,
            }),
        }
    }

    /// Opens every plain-TCP upstream (passthrough to a destination outside the mesh, and
    /// [`Route::Tcp`] to a workload that does not speak HBONE) with `sockets` instead of a socket of the
    /// proxy's own. In-pod mode needs this: such connections must leave from the pod's network namespace,
    /// with the pod's routes and address, marked so the pod's capture skips them (ztunnel's per-pod socket
    /// factory). HBONE connections are unaffected: they use the [`HboneConnector`]'s own factory.
    ///
    /// `sockets` is then responsible for the socket's options: [`OutboundConfig::mark`] and
    /// [`OutboundConfig::original_source`] are not applied to these connections (a factory that should
    /// mark, like in-pod mode's, marks its sockets itself). [`OutboundConfig::connect_timeout`] still
    /// bounds each connect. Without this hook (the default), plain-TCP upstreams are opened from the
    /// proxy's own namespace as [`OutboundConfig`] says.
    #[must_use]
    pub fn with_passthrough_sockets(mut self, sockets: Arc<dyn SocketFactory>) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.tcp_sockets = Some(sockets),
            None => {
                // Shared with a clone already: give this handle its own copy of the settings.
                let inner = &self.inner;
                self.inner = Arc::new(Inner {
                    config: inner.config.clone(),
                    state: inner.state.clone(),
                    connector: inner.connector.clone(),
                    observers: inner.observers.clone(),
                    tcp_sockets: Some(sockets),
                });
            }
        }
        self
    }

    /// Proxies a captured connection from `peer` whose original destination was `destination`, until it
    /// ends. Passthrough is allowed.
    pub async fn proxy(
        &self,
        mut client: TcpStream,
        peer: SocketAddr,
        destination: SocketAddr,
    ) -> Result<(), ProxyError> {
        // Boxed: connecting (TLS and HTTP/2 handshakes included) takes several kilobytes of future
        // state, which would otherwise stay part of this future for the connection's whole life.
        let connection = Box::pin(self.connect(peer, destination, Passthrough::Allow)).await?;
        let result = connection.forward(&mut client).await;
        if let Err(ProxyError::Forward(error)) = &result
            && error.kind() == std::io::ErrorKind::ConnectionReset
        {
            // The upstream (or the tunnel) was reset: the application sees a reset too.
            let _ = client.set_zero_linger();
        }
        result
    }

    /// Finds the source workload for `peer`, routes `destination`, and connects upstream. On success, the
    /// observers have been told the connection opened; [`OutboundConnection::forward`] carries the bytes
    /// and reports the close. On failure after an upstream attempt, they have been told it opened and
    /// closed with the failure's flag.
    pub async fn connect(
        &self,
        peer: SocketAddr,
        destination: SocketAddr,
        passthrough: Passthrough,
    ) -> Result<OutboundConnection, ProxyError> {
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let snapshot = self.inner.state.snapshot();
        let source = self.source_workload(&snapshot, peer.ip())?;
        let config = &self.inner.config;
        let input = RouteInput {
            local_node: config.local_node.as_deref(),
            hbone_port: config.hbone_port,
            in_pod: config.in_pod,
            ..RouteInput::new(&snapshot, &source, peer.ip(), destination)
        };
        let route = route(&input, &mut RandomPicker)?;
        tracing::debug!(%peer, %destination, source = %source.uid, ?route, "outbound route");
        if passthrough == Passthrough::Refuse
            && let Route::Passthrough { destination } = route
        {
            return Err(ProxyError::PassthroughRefused { destination });
        }
        let mut record = ConnectionRecord::new(Reporter::Source, peer, destination);
        record.source_identity = source.identity().ok();
        record.source_workload = Some(source.clone());
        let attempt = self.open(&snapshot, &source, peer, &route, &mut record).await;
        let record = Arc::new(record);
        let observers = self.inner.observers.clone();
        observers.opened(&record);
        let mut guard = CloseGuard {
            observers,
            record,
            outcome: None,
        };
        match attempt {
            Ok(upstream) => Ok(OutboundConnection { upstream, guard }),
            Err(error) => {
                guard.outcome = Some(ConnectionOutcome::failed(error.response_flag(), &error));
                Err(error)
            }
        }
    }

    fn source_workload(&self, snapshot: &MeshSnapshot, peer: IpAddr) -> Result<Arc<Workload>, ProxyError> {
        match &self.inner.config.source {
            SourceLookup::PeerIp { network } => {
                snapshot
                    .workload_by_ip(network, peer)
                    .cloned()
                    .ok_or_else(|| ProxyError::UnknownSource {
                        ip: peer,
                        network: network.clone(),
                    })
            }
            SourceLookup::Workload { uid } => snapshot
                .workload_by_uid(uid)
                .cloned()
                .ok_or_else(|| ProxyError::UnknownSourceWorkload { uid: uid.clone() }),
        }
    }

    /// Connects upstream as `route` says, filling in what the attempt learns about the destination.
    async fn open(
        &self,
        snapshot: &MeshSnapshot,
        source: &Arc<Workload>,
        peer: SocketAddr,
        route: &Route,
        record: &mut ConnectionRecord,
    ) -> Result<Upstream, ProxyError> {
        match route {
            Route::Passthrough { destination } => {
                record.upstream_addr = Some(*destination);
                Ok(Upstream::Tcp(self.connect_tcp(peer, *destination).await?))
            }
            Route::Tcp {
                destination,
                workload,
                service,
            } => {
                record.upstream_addr = Some(*destination);
                record.destination_workload = Some(workload.clone());
                record.destination_service = service.clone();
                Ok(Upstream::Tcp(self.connect_tcp(peer, *destination).await?))
            }
            Route::Hbone(hbone) => {
                record.upstream_addr = Some(hbone.gateway);
                record.destination_service = hbone.service.clone();
                record.destination_workload = match hbone.kind {
                    HboneKind::Direct | HboneKind::DirectLocal => Some(hbone.workload.clone()),
                    // The tunnel ends at the waypoint; the destination is what the client addressed, a
                    // workload if it addressed one (a service VIP names no single workload).
                    HboneKind::ToWaypoint => snapshot
                        .workload_by_ip(&source.network, record.destination_addr.ip().to_canonical())
                        .cloned(),
                };
                record.security = SecurityPolicy::MutualTls;
                let stream = self.connect_hbone(source, peer, hbone).await?;
                record.destination_identity = Some(stream.peer_identity().clone());
                Ok(Upstream::Hbone(Box::new(stream)))
            }
            Route::DoubleHbone(double) => {
                record.upstream_addr = Some(double.network_gateway);
                record.destination_service = Some(double.service.clone());
                record.destination_workload = Some(double.workload.clone());
                record.security = SecurityPolicy::MutualTls;
                let stream = self.connect_double_hbone(source, peer, double).await?;
                record.destination_identity = Some(stream.peer_identity().clone());
                Ok(Upstream::Hbone(Box::new(stream)))
            }
        }
    }

    /// A plain TCP connection, marked and from the client's address if configured, within the timeout.
    async fn connect_tcp(&self, peer: SocketAddr, destination: SocketAddr) -> Result<TcpStream, ProxyError> {
        let config = &self.inner.config;
        let connect_error = |source: io::Error| ProxyError::UpstreamConnect {
            addr: destination,
            source,
        };
        let timeout = config.connect_timeout;
        let timed_out = |_| ProxyError::UpstreamTimeout {
            addr: destination,
            after: timeout,
        };
        if let Some(sockets) = &self.inner.tcp_sockets {
            let stream = tokio::time::timeout(timeout, sockets.connect(destination))
                .await
                .map_err(timed_out)?
                .map_err(connect_error)?;
            let _ = stream.set_nodelay(true);
            return Ok(stream);
        }
        let socket = if config.original_source && peer.is_ipv4() == destination.is_ipv4() {
            sys::transparent_socket(SocketAddr::new(peer.ip(), 0)).map_err(connect_error)?
        } else if destination.is_ipv4() {
            TcpSocket::new_v4().map_err(connect_error)?
        } else {
            TcpSocket::new_v6().map_err(connect_error)?
        };
        if let Some(mark) = config.mark {
            sys::set_mark(&socket, mark).map_err(connect_error)?;
        }
        let stream = tokio::time::timeout(timeout, socket.connect(destination))
            .await
            .map_err(timed_out)?
            .map_err(connect_error)?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// The address to bind HBONE connections for a client at `peer` to, when it reaches `gateway`; see
    /// [`OutboundConfig::original_source`].
    fn hbone_source_addr(&self, peer: SocketAddr, gateway: SocketAddr) -> Option<IpAddr> {
        let config = &self.inner.config;
        if !config.original_source || !matches!(config.source, SourceLookup::PeerIp { .. }) {
            return None;
        }
        let client = peer.ip().to_canonical();
        // Hairpin: a packet from the workload's address to that same address is dropped as martian by
        // the receiving stack, so ztunnel connects such a call from its own address.
        (client != gateway.ip().to_canonical()).then_some(client)
    }

    /// One HBONE tunnel, presenting the source workload's identity.
    async fn connect_hbone(
        &self,
        source: &Workload,
        peer: SocketAddr,
        hbone: &HboneRoute,
    ) -> Result<HboneStream, ProxyError> {
        let mut request = ConnectRequest::new(
            source_identity(source)?,
            hbone.gateway,
            hbone.expected_identities.clone(),
            hbone.authority.to_string(),
        )
        .with_baggage(&source_baggage(source))
        .with_forwarded(&Forwarded {
            client: peer,
            host: hbone.service.as_ref().map(|s| s.hostname.to_string()),
        });
        if let Some(ip) = self.hbone_source_addr(peer, hbone.gateway) {
            request = request.with_source_addr(ip);
        }
        self.inner
            .connector
            .connect(request)
            .await
            .map_err(|source| ProxyError::HboneConnect {
                gateway: hbone.gateway,
                source: Box::new(source),
            })
    }

    /// An outer tunnel to the remote network's east-west gateway, and inside it the end-to-end tunnel.
    /// The gateway sees only the outer request; the source's baggage, the client address and the source
    /// network (`x-forwarded-network`, as Istio's proxies send it) ride on the inner one.
    async fn connect_double_hbone(
        &self,
        source: &Workload,
        peer: SocketAddr,
        double: &DoubleHboneRoute,
    ) -> Result<HboneStream, ProxyError> {
        let identity = source_identity(source)?;
        let authority = double.authority.to_string();
        let mut outer = ConnectRequest::new(
            identity.clone(),
            double.network_gateway,
            double.gateway_identities.clone(),
            authority.clone(),
        );
        // Only the outer tunnel opens a socket; the inner one rides inside it.
        if let Some(ip) = self.hbone_source_addr(peer, double.network_gateway) {
            outer = outer.with_source_addr(ip);
        }
        let mut inner = ConnectRequest::new(
            identity,
            double.network_gateway,
            double.expected_identities.clone(),
            authority,
        )
        .with_baggage(&source_baggage(source))
        .with_forwarded(&Forwarded {
            client: peer,
            host: Some(double.service.hostname.to_string()),
        });
        if !source.network.is_empty()
            && let Ok(network) = HeaderValue::from_str(&source.network)
        {
            inner = inner.with_header(HeaderName::from_static(X_FORWARDED_NETWORK), network);
        }
        self.inner
            .connector
            .connect_double(outer, inner)
            .await
            .map_err(|source| ProxyError::HboneConnect {
                gateway: double.network_gateway,
                source: Box::new(source),
            })
    }

    /// The original destination of a captured connection, per [`OutboundConfig::capture`].
    fn original_destination(&self, stream: &TcpStream) -> Result<SocketAddr, ProxyError> {
        match self.inner.config.capture {
            CaptureMode::Tproxy => {
                let original =
                    sys::tproxy_original_destination(stream).map_err(ProxyError::OriginalDestination)?;
                if mesh_hbone::PROXY_PORTS.contains(&original.port()) {
                    return Err(ProxyError::SelfCall { addr: original });
                }
                Ok(original)
            }
            CaptureMode::Auto => {
                let original = match sys::original_destination(stream) {
                    Ok(original) => original,
                    Err(_) => {
                        sys::tproxy_original_destination(stream).map_err(ProxyError::OriginalDestination)?
                    }
                };
                if mesh_hbone::PROXY_PORTS.contains(&original.port()) {
                    return Err(ProxyError::SelfCall { addr: original });
                }
                Ok(original)
            }
            CaptureMode::Redirect => {
                let original = sys::original_destination(stream).map_err(ProxyError::OriginalDestination)?;
                let local = stream.local_addr().map_err(ProxyError::OriginalDestination)?;
                if original == SocketAddr::new(local.ip().to_canonical(), local.port()) {
                    return Err(ProxyError::SelfCall { addr: original });
                }
                Ok(original)
            }
        }
    }
}

impl ConnectionHandler for Outbound {
    async fn handle(&self, stream: TcpStream, peer: SocketAddr) {
        let result = match self.original_destination(&stream) {
            Ok(destination) => self.proxy(stream, peer, destination).await,
            Err(error) => Err(error),
        };
        if let Err(error) = result {
            tracing::info!(%peer, %error, "outbound connection failed");
        }
    }
}

/// An outbound connection whose upstream is established, waiting for [`OutboundConnection::forward`].
/// Dropping it closes the upstream and reports the connection closed.
#[derive(Debug)]
pub struct OutboundConnection {
    upstream: Upstream,
    guard: CloseGuard,
}

#[derive(Debug)]
enum Upstream {
    Tcp(TcpStream),
    Hbone(Box<HboneStream>),
}

impl OutboundConnection {
    /// The connection's record (labels and live byte counters).
    pub fn record(&self) -> &Arc<ConnectionRecord> {
        &self.guard.record
    }

    /// Copies bytes between `client` and the upstream until both directions end (half-closes passed
    /// on), then reports the connection closed: normally, or with the error that ended it.
    pub async fn forward<C>(mut self, client: &mut C) -> Result<(), ProxyError>
    where
        C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        let record = self.guard.record.clone();
        let result = match &mut self.upstream {
            Upstream::Tcp(upstream) => {
                let copied = copy_bidirectional(client, upstream, &record).await;
                pass_reset_on(upstream, &copied);
                copied
            }
            Upstream::Hbone(upstream) => {
                copy_with_tunnel(client, upstream.as_mut(), TunnelSide::Upstream, &record).await
            }
        };
        match result {
            Ok(()) => {
                self.guard.outcome = Some(ConnectionOutcome::ok());
                Ok(())
            }
            Err(error) => {
                self.guard.outcome = Some(ConnectionOutcome {
                    flag: ResponseFlag::None,
                    error: Some(error.to_string()),
                    decision: None,
                });
                Err(ProxyError::Forward(error))
            }
        }
    }
}

/// Tells the observers the connection closed when it goes out of scope, however that happens (a
/// failure, the end of the copy, or the task being aborted at a drain deadline).
#[derive(Debug)]
struct CloseGuard {
    observers: Observers,
    record: Arc<ConnectionRecord>,
    outcome: Option<ConnectionOutcome>,
}

impl Drop for CloseGuard {
    fn drop(&mut self) {
        let outcome = self
            .outcome
            .take()
            .unwrap_or_else(|| ConnectionOutcome::failed(ResponseFlag::None, "connection abandoned"));
        self.observers.closed(&self.record, &outcome);
    }
}

impl ProxyError {
    /// The Istio `response_flags` value of a connection that failed with this error.
    pub(crate) fn response_flag(&self) -> ResponseFlag {
        match self {
            ProxyError::HboneConnect { source, .. } => hbone_flag(source),
            ProxyError::UpstreamConnect { .. } | ProxyError::UpstreamTimeout { .. } => ResponseFlag::Connect,
            ProxyError::SourceIdentity { .. } => ResponseFlag::IdentityError,
            _ => ResponseFlag::Connect,
        }
    }
}

/// Which step of HBONE failed, as Istio names it.
fn hbone_flag(error: &HboneError) -> ResponseFlag {
    match error {
        HboneError::Status(StatusCode::UNAUTHORIZED) => ResponseFlag::Deny,
        HboneError::Tls { source, .. } => {
            let identity = source
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .and_then(mesh_core::tls::identity_error)
                .is_some();
            if identity {
                ResponseFlag::IdentityError
            } else {
                ResponseFlag::TlsFailure
            }
        }
        // No certificate for the source identity: we cannot prove who we are.
        HboneError::Certificate(_) => ResponseFlag::IdentityError,
        HboneError::NoH2Alpn { .. } | HboneError::H2(_) => ResponseFlag::H2HandshakeFailure,
        _ => ResponseFlag::Connect,
    }
}

fn source_identity(source: &Workload) -> Result<SpiffeId, ProxyError> {
    source.identity().map_err(|error| ProxyError::SourceIdentity {
        uid: source.uid.clone(),
        source: error,
    })
}

/// The `baggage` ztunnel sends on a CONNECT: the source workload's cluster, namespace, owner, canonical
/// service and revision, and locality; empty values left out. An unset owner kind is a `deployment`, as
/// in Istio's workload API.
fn source_baggage(source: &Workload) -> Baggage {
    let text = |value: &str| (!value.is_empty()).then(|| value.to_owned());
    let workload_name = text(&source.workload_name);
    let workload_kind = workload_name
        .is_some()
        .then(|| text(&source.workload_type).unwrap_or_else(|| "deployment".to_owned()));
    let locality = source.locality.as_ref();
    Baggage {
        cluster_name: text(&source.cluster_id),
        namespace: text(&source.namespace),
        workload_kind,
        workload_name,
        service_name: text(&source.canonical_name),
        service_version: text(&source.canonical_revision),
        region: locality.and_then(|l| text(&l.region)),
        zone: locality.and_then(|l| text(&l.zone)),
    }
}
