//! The SOCKS5 port over real loopback sockets: a client speaks RFC 1928 to a `serve_tcp` listener running
//! `Socks5`, which resolves the target and sends the connection through `Outbound` (here in dedicated
//! mode: every connection is the `client` workload's) to an echo server that is a plain-TCP mesh
//! workload (127.0.0.5), or refuses with the reply code the failure calls for.
#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::cert::StaticCertProvider;
use mesh_core::drain::{DrainTrigger, DrainWatch};
use mesh_core::model::{MeshSnapshot, TunnelProtocol, Workload};
use mesh_hbone::{HboneConfig, HboneConnector};
use mesh_policy::L4PolicySet;
use mesh_proxy::listener::{ListenerConfig, serve_tcp};
use mesh_proxy::outbound::{Outbound, OutboundConfig, SourceLookup};
use mesh_proxy::socks5::{Socks5, Socks5Config};
use mesh_proxy::state::ProxyState;
use mesh_proxy::telemetry::{ConnectionObserver, ConnectionOutcome, ConnectionRecord, Observers};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const BOUND: Duration = Duration::from_secs(10);
const MESH_ECHO_IP: &str = "127.0.0.5";
const OUTSIDE_ECHO_IP: &str = "127.0.0.3";

const NO_AUTH: [u8; 3] = [5, 1, 0];
const CHOSE_NO_AUTH: [u8; 2] = [5, 0];

#[derive(Debug)]
struct Recorder(mpsc::UnboundedSender<(Arc<ConnectionRecord>, ConnectionOutcome)>);

impl ConnectionObserver for Recorder {
    fn opened(&self, _connection: &Arc<ConnectionRecord>) {}

    fn closed(&self, connection: &Arc<ConnectionRecord>, outcome: &ConnectionOutcome) {
        let _ = self.0.send((connection.clone(), outcome.clone()));
    }
}

async fn echo_server(addr: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.into_split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    addr
}

struct Fixture {
    socks: SocketAddr,
    mesh_echo: SocketAddr,
    closed: mpsc::UnboundedReceiver<(Arc<ConnectionRecord>, ConnectionOutcome)>,
    _trigger: DrainTrigger,
}

async fn fixture(config: Socks5Config) -> Fixture {
    let mesh_echo = echo_server(format!("{MESH_ECHO_IP}:0").parse().unwrap()).await;
    let client = Workload {
        addresses: vec!["10.0.0.1".parse().unwrap()],
        service_account: "client".into(),
        ..Workload::new("cluster1//v1/Pod/default/client", "client", "default")
    };
    let echo = Workload {
        addresses: vec![MESH_ECHO_IP.parse().unwrap()],
        protocol: TunnelProtocol::None,
        ..Workload::new("cluster1//v1/Pod/default/echo", "echo", "default")
    };
    let snapshot = MeshSnapshot::builder()
        .add_workload(client)
        .add_workload(echo)
        .build()
        .unwrap();
    let outbound_config = OutboundConfig {
        source: SourceLookup::Workload {
            uid: "cluster1//v1/Pod/default/client".into(),
        },
        ..OutboundConfig::default()
    };
    let (closed_tx, closed) = mpsc::unbounded_channel();
    let outbound = Outbound::new(
        outbound_config,
        ProxyState::fixed(snapshot, L4PolicySet::default()),
        HboneConnector::new(HboneConfig::default(), Arc::new(StaticCertProvider::new())),
        Observers::new(vec![Arc::new(Recorder(closed_tx))]),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let socks = listener.local_addr().unwrap();
    let (trigger, drain): (DrainTrigger, DrainWatch) = mesh_core::drain::channel();
    let server = Socks5::new(outbound, config);
    tokio::spawn(async move { serve_tcp(listener, server, &ListenerConfig::default(), drain).await });
    Fixture {
        socks,
        mesh_echo,
        closed,
        _trigger: trigger,
    }
}

fn connect_ipv4(addr: SocketAddr) -> Vec<u8> {
    let SocketAddr::V4(addr) = addr else {
        panic!("IPv4 expected")
    };
    let mut request = vec![5, 1, 0, 1];
    request.extend_from_slice(&addr.ip().octets());
    request.extend_from_slice(&addr.port().to_be_bytes());
    request
}

fn connect_domain(host: &str, port: u16) -> Vec<u8> {
    let mut request = vec![5, 1, 0, 3, u8::try_from(host.len()).unwrap()];
    request.extend_from_slice(host.as_bytes());
    request.extend_from_slice(&port.to_be_bytes());
    request
}

async fn read_exact<const N: usize>(stream: &mut TcpStream) -> [u8; N] {
    let mut buf = [0u8; N];
    tokio::time::timeout(BOUND, stream.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    buf
}

/// Reads until the server closes; returns what it sent.
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    let read = tokio::time::timeout(BOUND, stream.read_to_end(&mut rest))
        .await
        .expect("the server must close the connection");
    // A reset after the reply is a close too; what matters is that nothing more arrives.
    if let Err(error) = read {
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
    }
    rest
}

/// Greets, sends `request`, and returns the 10-byte reply.
async fn request(socks: SocketAddr, request: &[u8]) -> (TcpStream, [u8; 10]) {
    let mut stream = TcpStream::connect(socks).await.unwrap();
    stream.write_all(&NO_AUTH).await.unwrap();
    assert_eq!(read_exact::<2>(&mut stream).await, CHOSE_NO_AUTH);
    stream.write_all(request).await.unwrap();
    let reply = read_exact::<10>(&mut stream).await;
    (stream, reply)
}

#[tokio::test]
async fn connect_by_ipv4_reaches_the_mesh_workload() {
    let mut f = fixture(Socks5Config::default()).await;
    let (mut stream, reply) = request(f.socks, &connect_ipv4(f.mesh_echo)).await;
    assert_eq!(reply, [5, 0, 0, 1, 0, 0, 0, 0, 0, 0], "succeeded");
    stream.write_all(b"through socks").await.unwrap();
    stream.shutdown().await.unwrap();
    assert_eq!(read_to_close(&mut stream).await, b"through socks");

    let (record, outcome) = tokio::time::timeout(BOUND, f.closed.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome, ConnectionOutcome::ok());
    assert_eq!(record.destination_addr, f.mesh_echo);
    assert_eq!(
        record.destination_workload.as_ref().unwrap().name.as_ref(),
        "echo"
    );
    assert_eq!(record.source_workload.as_ref().unwrap().name.as_ref(), "client");
    assert_eq!((record.sent(), record.received()), (13, 13));
}

#[tokio::test]
async fn a_pipelined_handshake_with_early_data_loses_no_bytes() {
    let f = fixture(Socks5Config::default()).await;
    let mut stream = TcpStream::connect(f.socks).await.unwrap();
    // Greeting, request and the first application bytes in one write, before any reply.
    let mut all = NO_AUTH.to_vec();
    all.extend(connect_ipv4(f.mesh_echo));
    all.extend_from_slice(b"early ");
    stream.write_all(&all).await.unwrap();
    assert_eq!(read_exact::<2>(&mut stream).await, CHOSE_NO_AUTH);
    assert_eq!(read_exact::<10>(&mut stream).await[1], 0);
    stream.write_all(b"and late").await.unwrap();
    stream.shutdown().await.unwrap();
    assert_eq!(read_to_close(&mut stream).await, b"early and late");
}

#[tokio::test]
async fn connect_by_domain_name_resolves_it() {
    // Whatever this host resolves `localhost` to first is where the echo server goes; it is outside
    // the mesh, so this needs passthrough.
    let first = tokio::net::lookup_host(("localhost", 0))
        .await
        .unwrap()
        .next()
        .unwrap();
    let echo = echo_server(first).await;
    let f = fixture(Socks5Config {
        allow_passthrough: true,
        ..Socks5Config::default()
    })
    .await;
    let (mut stream, reply) = request(f.socks, &connect_domain("LocalHost", echo.port())).await;
    assert_eq!(reply[1], 0, "succeeded");
    stream.write_all(b"by name").await.unwrap();
    stream.shutdown().await.unwrap();
    assert_eq!(read_to_close(&mut stream).await, b"by name");
}

#[tokio::test]
async fn a_name_that_does_not_resolve_is_host_unreachable() {
    let f = fixture(Socks5Config {
        resolve_timeout: Duration::from_secs(5),
        ..Socks5Config::default()
    })
    .await;
    // `.invalid` never resolves (RFC 6761).
    let (mut stream, reply) = request(f.socks, &connect_domain("no-such-host.invalid", 80)).await;
    assert_eq!(reply[1], 4, "host unreachable");
    assert!(read_to_close(&mut stream).await.is_empty());
}

#[tokio::test]
async fn a_destination_outside_the_mesh_is_not_allowed_by_default() {
    let f = fixture(Socks5Config::default()).await;
    let outside = echo_server(format!("{OUTSIDE_ECHO_IP}:0").parse().unwrap()).await;
    let (mut stream, reply) = request(f.socks, &connect_ipv4(outside)).await;
    assert_eq!(reply[1], 2, "connection not allowed by ruleset");
    assert!(read_to_close(&mut stream).await.is_empty());
}

#[tokio::test]
async fn a_refused_upstream_is_connection_refused() {
    let f = fixture(Socks5Config {
        allow_passthrough: true,
        ..Socks5Config::default()
    })
    .await;
    let closed = TcpListener::bind(format!("{OUTSIDE_ECHO_IP}:0"))
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let (mut stream, reply) = request(f.socks, &connect_ipv4(closed)).await;
    assert_eq!(reply[1], 5, "connection refused");
    assert!(read_to_close(&mut stream).await.is_empty());
}

#[tokio::test]
async fn only_no_authentication_is_accepted() {
    let f = fixture(Socks5Config::default()).await;
    let mut stream = TcpStream::connect(f.socks).await.unwrap();
    // GSSAPI and username/password only.
    stream.write_all(&[5, 2, 1, 2]).await.unwrap();
    assert_eq!(
        read_exact::<2>(&mut stream).await,
        [5, 0xFF],
        "no acceptable methods"
    );
    assert!(read_to_close(&mut stream).await.is_empty());
}

#[tokio::test]
async fn bind_and_udp_associate_are_not_supported() {
    let f = fixture(Socks5Config::default()).await;
    for command in [2u8, 3] {
        let mut bind = connect_ipv4(f.mesh_echo);
        bind[1] = command;
        let (mut stream, reply) = request(f.socks, &bind).await;
        assert_eq!(reply[1], 7, "command {command} not supported");
        assert!(read_to_close(&mut stream).await.is_empty());
    }
}

#[tokio::test]
async fn an_unknown_address_type_is_not_supported() {
    let f = fixture(Socks5Config::default()).await;
    let (mut stream, reply) = request(f.socks, &[5, 1, 0, 9, 1, 2, 3, 4, 0, 80]).await;
    assert_eq!(reply[1], 8, "address type not supported");
    assert!(read_to_close(&mut stream).await.is_empty());
}

#[tokio::test]
async fn another_protocol_version_is_closed_without_a_reply() {
    let f = fixture(Socks5Config::default()).await;
    let mut stream = TcpStream::connect(f.socks).await.unwrap();
    // A SOCKS4 CONNECT.
    stream.write_all(&[4, 1, 0, 80, 127, 0, 0, 1, 0]).await.unwrap();
    assert!(read_to_close(&mut stream).await.is_empty());
}

#[tokio::test]
async fn a_truncated_handshake_is_closed_at_the_timeout() {
    let f = fixture(Socks5Config {
        handshake_timeout: Duration::from_millis(200),
        ..Socks5Config::default()
    })
    .await;
    // Greeting, then half a request, then silence (the connection stays open on our side).
    let mut stream = TcpStream::connect(f.socks).await.unwrap();
    stream.write_all(&NO_AUTH).await.unwrap();
    assert_eq!(read_exact::<2>(&mut stream).await, CHOSE_NO_AUTH);
    stream.write_all(&[5, 1, 0, 1, 127]).await.unwrap();
    assert!(read_to_close(&mut stream).await.is_empty());

    // And a client that never finishes its greeting.
    let mut silent = TcpStream::connect(f.socks).await.unwrap();
    silent.write_all(&[5]).await.unwrap();
    assert!(read_to_close(&mut silent).await.is_empty());
}
