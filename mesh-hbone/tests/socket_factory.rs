//! The connector's socket hook over real loopback TCP and TLS: every new pooled connection comes from the
//! factory (and only those), factory failures keep the connector's error mapping and timeout, and
//! `MarkedSockets` puts `SO_MARK` on the connections the pool uses (needs root, as CI runs).
//!
//! Source addresses (`ConnectRequest::source_addr`): each gets connections of its own, bound to it (all
//! of 127.0.0.0/8 is local on Linux, so no privilege is needed); a client address the host does not own
//! is bound through `IP_TRANSPARENT` (in a network-namespace sandbox); and a factory that cannot bind
//! refuses rather than connect from another address.

#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use http::HeaderMap;
use mesh_core::cert::StaticCertProvider;
use mesh_core::drain::{self, DrainTrigger};
use mesh_core::sys::{self, PROXY_MARK};
use mesh_core::tls;
use mesh_hbone::{
    ConnectRequest, HboneAcceptor, HboneConfig, HboneConnector, HboneError, HboneStream, InboundTunnel,
    MarkedSockets, PlainSockets, SocketFactory,
};
use mesh_test::{TEST_CERT_LIFETIME, TestPki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::service_fn;

/// Bounds every network wait, so a broken build fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(10);

/// An echoing acceptor on `127.0.0.1:0`, recording each tunnel's TCP peer address; dropping it drains
/// the acceptor.
struct Echo {
    addr: SocketAddr,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    _trigger: DrainTrigger,
}

impl Echo {
    fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

async fn echo_server(pki: &TestPki) -> Echo {
    echo_server_on(pki, "127.0.0.1:0").await
}

async fn echo_server_on(pki: &TestPki, bind: &str) -> Echo {
    let tls_config =
        tls::server_config(pki.cert("default", "server"), vec![pki.trust_domain().clone()]).unwrap();
    let peers: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
    let seen = peers.clone();
    let service = service_fn(move |tunnel: InboundTunnel| {
        seen.lock().unwrap().push(tunnel.peer_addr());
        async move {
            if let Ok(stream) = tunnel.accept(HeaderMap::new()) {
                let (mut read, mut write) = tokio::io::split(stream);
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            }
            Ok::<(), Infallible>(())
        }
    });
    let listener = TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (trigger, watch) = drain::channel();
    tokio::spawn(HboneAcceptor::new(HboneConfig::default(), tls_config, service).serve(listener, watch));
    Echo {
        addr,
        peers,
        _trigger: trigger,
    }
}

fn new_connector(pki: &TestPki, config: HboneConfig, sockets: Arc<dyn SocketFactory>) -> HboneConnector {
    let mut certs = StaticCertProvider::new();
    certs.insert(
        pki.ca()
            .issue(&pki.id("default", "client"), TEST_CERT_LIFETIME)
            .unwrap(),
    );
    HboneConnector::new(config, Arc::new(certs)).with_socket_factory(sockets)
}

fn request(pki: &TestPki, addr: SocketAddr) -> ConnectRequest {
    ConnectRequest::new(
        pki.id("default", "client"),
        addr,
        vec![pki.id("default", "server")],
        "127.0.0.1:8080",
    )
}

async fn open(connector: &HboneConnector, request: ConnectRequest) -> Result<HboneStream, HboneError> {
    tokio::time::timeout(LIMIT, connector.connect(request))
        .await
        .unwrap()
}

/// Sends `payload`, half-closes, and checks the echo.
async fn round_trip(mut stream: HboneStream, payload: &[u8]) {
    stream.write_all(payload).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    tokio::time::timeout(LIMIT, stream.read_to_end(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echoed, payload);
}

/// Wraps a factory, recording each call's address and source (at call time, so failed connects count
/// too) and, when asked, the `SO_MARK` of each connection it returns.
#[derive(Debug)]
struct Recording {
    inner: Arc<dyn SocketFactory>,
    read_marks: bool,
    calls: Arc<Mutex<Vec<SocketAddr>>>,
    sources: Arc<Mutex<Vec<Option<IpAddr>>>>,
    marks: Arc<Mutex<Vec<u32>>>,
}

impl Recording {
    fn new(inner: Arc<dyn SocketFactory>, read_marks: bool) -> Arc<Recording> {
        Arc::new(Recording {
            inner,
            read_marks,
            calls: Arc::default(),
            sources: Arc::default(),
            marks: Arc::default(),
        })
    }

    fn calls(&self) -> Vec<SocketAddr> {
        self.calls.lock().unwrap().clone()
    }

    fn sources(&self) -> Vec<Option<IpAddr>> {
        self.sources.lock().unwrap().clone()
    }
}

impl SocketFactory for Recording {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>> {
        self.connect_from(None, addr)
    }

    fn connect_from(
        &self,
        source: Option<IpAddr>,
        addr: SocketAddr,
    ) -> BoxFuture<'static, io::Result<TcpStream>> {
        self.calls.lock().unwrap().push(addr);
        self.sources.lock().unwrap().push(source);
        let connecting = self.inner.connect_from(source, addr);
        let marks = self.read_marks.then(|| self.marks.clone());
        Box::pin(async move {
            let stream = connecting.await?;
            if let Some(marks) = marks {
                marks.lock().unwrap().push(sys::mark(&stream)?);
            }
            Ok(stream)
        })
    }
}

/// Implements only `connect` (as factories written before source addresses do), counting its calls.
#[derive(Debug, Default)]
struct ConnectOnly {
    calls: Mutex<usize>,
}

impl SocketFactory for ConnectOnly {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>> {
        *self.calls.lock().unwrap() += 1;
        PlainSockets.connect(addr)
    }
}

/// Fails every connect with this error kind.
#[derive(Debug)]
struct Refusing(io::ErrorKind);

impl SocketFactory for Refusing {
    fn connect(&self, _addr: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>> {
        let kind = self.0;
        Box::pin(async move { Err(io::Error::new(kind, "refused by the test factory")) })
    }
}

/// Never finishes connecting.
#[derive(Debug)]
struct Stalling;

impl SocketFactory for Stalling {
    fn connect(&self, _addr: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>> {
        Box::pin(std::future::pending())
    }
}

#[tokio::test]
async fn every_new_pooled_connection_and_only_those_come_from_the_factory() {
    let pki = TestPki::new();
    let (first, second) = (echo_server(&pki).await, echo_server(&pki).await);
    let recording = Recording::new(Arc::new(PlainSockets), false);
    let config = HboneConfig {
        pool_max_streams_per_connection: 2,
        ..HboneConfig::default()
    };
    let connector = new_connector(&pki, config, recording.clone());

    // Three streams held at once to the first server: two fit on one connection, the third needs another.
    let a = open(&connector, request(&pki, first.addr)).await.unwrap();
    let b = open(&connector, request(&pki, first.addr)).await.unwrap();
    let c = open(&connector, request(&pki, first.addr)).await.unwrap();
    let d = open(&connector, request(&pki, second.addr)).await.unwrap();
    assert_eq!(recording.calls(), vec![first.addr, first.addr, second.addr]);
    assert_eq!(connector.stats().handshakes, 3);
    for (i, stream) in [a, b, c, d].into_iter().enumerate() {
        round_trip(stream, format!("tunnel {i}").as_bytes()).await;
    }

    // Streams on pooled connections with room never reach the factory.
    for _ in 0..5 {
        let stream = open(&connector, request(&pki, first.addr)).await.unwrap();
        round_trip(stream, b"reused").await;
    }
    assert_eq!(recording.calls().len(), 3);
    assert_eq!(connector.stats().handshakes, 3);
}

#[tokio::test]
async fn factory_failures_keep_the_connect_error_and_the_connect_timeout() {
    let pki = TestPki::new();
    let server = echo_server(&pki).await;

    let refusing = Recording::new(Arc::new(Refusing(io::ErrorKind::PermissionDenied)), false);
    let connector = new_connector(&pki, HboneConfig::default(), refusing.clone());
    for _ in 0..2 {
        match open(&connector, request(&pki, server.addr)).await {
            Err(HboneError::Connect { addr, source }) => {
                assert_eq!(addr, server.addr);
                assert_eq!(source.kind(), io::ErrorKind::PermissionDenied);
            }
            other => panic!("expected a connect error, got {other:?}"),
        }
    }
    // A failed connect leaves nothing pooled, so the next caller asks the factory again.
    assert_eq!(refusing.calls(), vec![server.addr, server.addr]);
    assert_eq!(connector.stats().open_connections, 0);

    let config = HboneConfig {
        connect_timeout: Duration::from_millis(200),
        ..HboneConfig::default()
    };
    let connector = new_connector(&pki, config, Arc::new(Stalling));
    match open(&connector, request(&pki, server.addr)).await {
        Err(HboneError::Timeout { step, .. }) => assert_eq!(step, "HBONE connection setup"),
        other => panic!("expected the connect timeout, got {other:?}"),
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
/// Explains a permission failure: `SO_MARK` needs `CAP_NET_ADMIN`, and CI runs as root
/// (docs/testing.md); the test must fail loudly rather than pass without checking anything.
fn needs_root(error: &io::Error) -> String {
    if error.kind() == io::ErrorKind::PermissionDenied {
        format!("SO_MARK needs CAP_NET_ADMIN: run the tests as root (see docs/testing.md): {error}")
    } else {
        format!("connecting with SO_MARK failed: {error}")
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
#[tokio::test]
async fn marked_sockets_mark_every_connection_the_pool_opens() {
    assert_eq!(MarkedSockets::default().mark, PROXY_MARK);
    let pki = TestPki::new();
    let server = echo_server(&pki).await;

    // Directly: the connected socket carries the mark.
    let stream = match MarkedSockets::default().connect(server.addr).await {
        Ok(stream) => stream,
        Err(error) => panic!("{}", needs_root(&error)),
    };
    assert_eq!(sys::mark(&stream).unwrap(), PROXY_MARK);
    drop(stream);

    // Through the connector, with a mark of our own so the value is known to come from the field: each
    // connection the pool uses carries it, and tunnels over it work.
    let mark = 0x2a;
    let recording = Recording::new(Arc::new(MarkedSockets { mark }), true);
    let config = HboneConfig {
        pool_max_streams_per_connection: 1,
        ..HboneConfig::default()
    };
    let connector = new_connector(&pki, config, recording.clone());
    let first = open(&connector, request(&pki, server.addr)).await.unwrap();
    let second = open(&connector, request(&pki, server.addr)).await.unwrap();
    round_trip(first, b"marked one").await;
    round_trip(second, b"marked two").await;
    assert_eq!(recording.calls().len(), 2);
    assert_eq!(*recording.marks.lock().unwrap(), vec![mark, mark]);
    assert_eq!(connector.stats().handshakes, 2);

    // Bound to a source address too: marked and from that address.
    let bound = request(&pki, server.addr).with_source_addr(ip("127.0.0.5"));
    round_trip(open(&connector, bound).await.unwrap(), b"marked and bound").await;
    assert_eq!(*recording.marks.lock().unwrap(), vec![mark, mark, mark]);
    assert_eq!(server.peers().last().unwrap().ip(), ip("127.0.0.5"));
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

#[tokio::test]
async fn each_source_address_gets_connections_of_its_own_bound_to_it() {
    let pki = TestPki::new();
    let server = echo_server(&pki).await;
    let recording = Recording::new(Arc::new(PlainSockets), false);
    let connector = new_connector(&pki, HboneConfig::default(), recording.clone());
    let from = |source: &str| request(&pki, server.addr).with_source_addr(ip(source));

    // Identical requests but for the source address: never the same connection.
    let a = open(&connector, from("127.0.0.2")).await.unwrap();
    let b = open(&connector, from("127.0.0.3")).await.unwrap();
    round_trip(a, b"from .2").await;
    round_trip(b, b"from .3").await;
    assert_eq!(connector.stats().handshakes, 2);

    // The same source reuses its connection, however the address is spelled.
    let c = open(&connector, from("127.0.0.2")).await.unwrap();
    let d = open(&connector, from("::ffff:127.0.0.2")).await.unwrap();
    round_trip(c, b"from .2 again").await;
    round_trip(d, b"from .2, mapped").await;
    assert_eq!(connector.stats().handshakes, 2);

    // No source: a connection of its own, from the address the system picks.
    let e = open(&connector, request(&pki, server.addr)).await.unwrap();
    round_trip(e, b"unbound").await;
    assert_eq!(connector.stats().handshakes, 3);

    let peers = server.peers();
    let ips: Vec<String> = peers.iter().map(|p| p.ip().to_string()).collect();
    assert_eq!(
        ips,
        ["127.0.0.2", "127.0.0.3", "127.0.0.2", "127.0.0.2", "127.0.0.1"],
        "the server sees each tunnel come from its request's source address"
    );
    assert_eq!(peers[0], peers[2], "same source, same connection");
    assert_eq!(peers[0], peers[3], "same source, same connection");
    assert_eq!(
        recording.sources(),
        vec![Some(ip("127.0.0.2")), Some(ip("127.0.0.3")), None],
        "the factory is asked with the canonical source address, once per connection"
    );
}

#[tokio::test]
async fn a_factory_that_cannot_bind_refuses_a_source_address() {
    let pki = TestPki::new();
    let server = echo_server(&pki).await;
    let factory = Arc::new(ConnectOnly::default());
    let connector = new_connector(&pki, HboneConfig::default(), factory.clone());

    let bound = request(&pki, server.addr).with_source_addr(ip("127.0.0.2"));
    match open(&connector, bound).await {
        Err(HboneError::Connect { addr, source }) => {
            assert_eq!(addr, server.addr);
            assert_eq!(source.kind(), io::ErrorKind::Unsupported);
            assert!(
                source
                    .to_string()
                    .contains("this socket factory cannot bind a source address"),
                "{source}"
            );
        }
        other => panic!("expected a connect error, got {other:?}"),
    }
    assert_eq!(*factory.calls.lock().unwrap(), 0, "no connection was attempted");
    assert_eq!(connector.stats().handshakes, 0);
    assert!(server.peers().is_empty());

    // Without a source address the same factory works: `connect_from(None, _)` is `connect`.
    let stream = open(&connector, request(&pki, server.addr)).await.unwrap();
    round_trip(stream, b"unbound").await;
    assert_eq!(*factory.calls.lock().unwrap(), 1);
    assert_eq!(server.peers().len(), 1);
}

#[tokio::test]
async fn a_source_address_of_the_other_family_is_refused_not_dropped() {
    let pki = TestPki::new();
    let server = echo_server(&pki).await;
    let connector = new_connector(&pki, HboneConfig::default(), Arc::new(PlainSockets));
    let bound = request(&pki, server.addr).with_source_addr(ip("::1"));
    match open(&connector, bound).await {
        Err(HboneError::Connect { source, .. }) => {
            assert_eq!(source.kind(), io::ErrorKind::InvalidInput, "{source}");
            assert!(
                source.to_string().contains("::1"),
                "the error names the source: {source}"
            );
        }
        other => panic!("expected a connect error, got {other:?}"),
    }
    assert!(server.peers().is_empty(), "no connection from another address");
    assert_eq!(connector.stats().handshakes, 0);
}

/// The node-proxy case: the client's address is not the host's, so binding it takes `IP_TRANSPARENT`.
/// In a sandbox of its own (a fresh network namespace where the test is root), the server listens on
/// 10.9.0.1, and the replies to the client range 10.9.9.0/24 are routed back to this host as the TPROXY
/// setup does (a `local` route in a table of their own, so bind still sees the addresses as foreign).
#[cfg(target_os = "linux")]
#[test]
fn a_client_address_the_host_does_not_own_is_bound_transparently() {
    use mesh_test::netns::{isolated, run};
    use std::process::Command;

    isolated(|| {
        for args in [
            &["addr", "add", "10.9.0.1/32", "dev", "lo"][..],
            &[
                "route",
                "add",
                "local",
                "10.9.9.0/24",
                "dev",
                "lo",
                "table",
                "100",
            ],
            &["rule", "add", "to", "10.9.9.0/24", "lookup", "100"],
        ] {
            run(Command::new("ip").args(args)).unwrap();
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            // Foreign indeed: a plain bind is refused, which is what sends the factory to IP_TRANSPARENT.
            let probe = tokio::net::TcpSocket::new_v4().unwrap();
            let refused = probe.bind("10.9.9.9:0".parse().unwrap()).unwrap_err();
            assert_eq!(refused.kind(), io::ErrorKind::AddrNotAvailable, "{refused}");

            let pki = TestPki::new();
            let server = echo_server_on(&pki, "10.9.0.1:0").await;
            let recording = Recording::new(Arc::new(PlainSockets), false);
            let connector = new_connector(&pki, HboneConfig::default(), recording.clone());
            for client in ["10.9.9.9", "10.9.9.10"] {
                let mut bound = request(&pki, server.addr).with_source_addr(ip(client));
                // The acceptor checks the CONNECT address is the one the connection arrived on.
                bound.authority = "10.9.0.1:8080".to_owned();
                let stream = open(&connector, bound)
                    .await
                    .unwrap_or_else(|e| panic!("connecting from {client} with IP_TRANSPARENT: {e}"));
                round_trip(stream, client.as_bytes()).await;
            }
            let ips: Vec<String> = server.peers().iter().map(|p| p.ip().to_string()).collect();
            assert_eq!(ips, ["10.9.9.9", "10.9.9.10"]);
            assert_eq!(connector.stats().handshakes, 2);
        });
    });
}
