//! The connector's socket hook over real loopback TCP and TLS: every new pooled connection comes from the
//! factory (and only those), factory failures keep the connector's error mapping and timeout, and
//! `MarkedSockets` puts `SO_MARK` on the connections the pool uses (needs root, as CI runs).

#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
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

/// An echoing acceptor on `127.0.0.1:0`; dropping it drains the acceptor.
struct Echo {
    addr: SocketAddr,
    _trigger: DrainTrigger,
}

async fn echo_server(pki: &TestPki) -> Echo {
    let tls_config =
        tls::server_config(pki.cert("default", "server"), vec![pki.trust_domain().clone()]).unwrap();
    let service = service_fn(|tunnel: InboundTunnel| async move {
        if let Ok(stream) = tunnel.accept(HeaderMap::new()) {
            let (mut read, mut write) = tokio::io::split(stream);
            let _ = tokio::io::copy(&mut read, &mut write).await;
            let _ = write.shutdown().await;
        }
        Ok::<(), Infallible>(())
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (trigger, watch) = drain::channel();
    tokio::spawn(HboneAcceptor::new(HboneConfig::default(), tls_config, service).serve(listener, watch));
    Echo {
        addr,
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

/// Wraps a factory, recording each call's address (at call time, so failed connects count too) and,
/// when asked, the `SO_MARK` of each connection it returns.
#[derive(Debug)]
struct Recording {
    inner: Arc<dyn SocketFactory>,
    read_marks: bool,
    calls: Arc<Mutex<Vec<SocketAddr>>>,
    marks: Arc<Mutex<Vec<u32>>>,
}

impl Recording {
    fn new(inner: Arc<dyn SocketFactory>, read_marks: bool) -> Arc<Recording> {
        Arc::new(Recording {
            inner,
            read_marks,
            calls: Arc::default(),
            marks: Arc::default(),
        })
    }

    fn calls(&self) -> Vec<SocketAddr> {
        self.calls.lock().unwrap().clone()
    }
}

impl SocketFactory for Recording {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>> {
        self.calls.lock().unwrap().push(addr);
        let connecting = self.inner.connect(addr);
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
}
