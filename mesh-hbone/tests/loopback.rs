//! HBONE client and acceptor over real loopback TCP and TLS: data integrity, half-close and reset, status
//! mapping, protocol refusals, pooling, keepalive and drain.

#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use http::{HeaderMap, Method, Request, StatusCode};
use mesh_core::cert::StaticCertProvider;
use mesh_core::drain::{self, DrainTrigger};
use mesh_core::{SpiffeId, tls};
use mesh_hbone::headers::{BAGGAGE, Baggage, Forwarded};
use mesh_hbone::{ConnectRequest, HboneAcceptor, HboneConfig, HboneConnector, HboneError, InboundTunnel};
use mesh_test::{TEST_CERT_LIFETIME, TestPki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::service_fn;

/// What the test server does with each tunnel.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Accept with a baggage header, and echo bytes until EOF, then half-close.
    Echo,
    /// Reject with this status.
    Reject(StatusCode),
    /// Drop the tunnel without answering.
    Forget,
    /// Accept, then reset the stream at once.
    AcceptAndReset,
    /// Accept and send `n` bytes, then half-close while still reading (and counting) what comes in.
    SendThenRead(usize),
}

struct Server {
    pki: TestPki,
    addr: SocketAddr,
    trigger: Option<DrainTrigger>,
}

impl Server {
    async fn start(behaviour: Behaviour) -> Server {
        Self::start_with(TestPki::new(), HboneConfig::default(), behaviour).await
    }

    async fn start_with(pki: TestPki, config: HboneConfig, behaviour: Behaviour) -> Server {
        let tls_config =
            tls::server_config(pki.cert("default", "server"), vec![pki.trust_domain().clone()]).unwrap();
        let service = service_fn(move |tunnel: InboundTunnel| serve(tunnel, behaviour));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (trigger, watch) = drain::channel();
        tokio::spawn(HboneAcceptor::new(config, tls_config, service).serve(listener, watch));
        Server {
            pki,
            addr,
            trigger: Some(trigger),
        }
    }

    fn connector(&self, config: HboneConfig) -> HboneConnector {
        let mut certs = StaticCertProvider::new();
        certs.insert(
            self.pki
                .ca()
                .issue(&self.client_id(), TEST_CERT_LIFETIME)
                .unwrap(),
        );
        HboneConnector::new(config, Arc::new(certs))
    }

    fn client_id(&self) -> SpiffeId {
        self.pki.id("default", "client")
    }

    /// A CONNECT to `127.0.0.1:8080`, the address the acceptor sees the connection arrive on.
    fn request(&self) -> ConnectRequest {
        ConnectRequest::new(
            self.client_id(),
            self.addr,
            vec![self.pki.id("default", "server")],
            "127.0.0.1:8080",
        )
    }
}

async fn serve(tunnel: InboundTunnel, behaviour: Behaviour) -> Result<(), Infallible> {
    match behaviour {
        Behaviour::Echo => {
            let mut response_headers = HeaderMap::new();
            let baggage = Baggage {
                namespace: Some("default".into()),
                ..Baggage::default()
            };
            response_headers.insert(BAGGAGE, baggage.to_header_value());
            let stream = tunnel.accept(response_headers).unwrap();
            let (mut read, mut write) = tokio::io::split(stream);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match read.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => {
                        if write.write_all(&buf[..n]).await.is_err() {
                            return Ok(());
                        }
                    }
                    Err(_) => return Ok(()),
                }
            }
            let _ = write.shutdown().await;
        }
        Behaviour::Reject(status) => tunnel.reject(status),
        Behaviour::Forget => drop(tunnel),
        Behaviour::AcceptAndReset => {
            let mut stream = tunnel.accept(HeaderMap::new()).unwrap();
            // Reset once the client has the 200 (it writes first); a reset racing the 200 would fail the
            // CONNECT itself, which is a different case.
            let mut first = [0u8; 1];
            let _ = stream.read_exact(&mut first).await;
            stream.reset();
        }
        Behaviour::SendThenRead(n) => {
            let mut stream = tunnel.accept(HeaderMap::new()).unwrap();
            stream.write_all(&vec![7u8; n]).await.unwrap();
            stream.shutdown().await.unwrap();
            let mut received = Vec::new();
            stream.read_to_end(&mut received).await.unwrap();
            // Report what arrived after our half-close by writing nothing further: the test checks the
            // client side's view; here we only assert the direction stayed open.
            assert_eq!(received, b"after server FIN");
        }
    }
    Ok(())
}

/// Sends `len` bytes of a deterministic pattern and checks the echo byte for byte, without holding it all.
async fn echo_check(server: &Server, connector: &HboneConnector, len: usize) {
    let stream = connector.connect(server.request()).await.unwrap();
    let (mut read, mut write) = tokio::io::split(stream);
    let pattern = |i: usize| (i.wrapping_mul(31) ^ (i >> 11)).to_le_bytes()[0];
    let writer = tokio::spawn(async move {
        let mut sent = 0;
        let mut chunk = vec![0u8; 256 * 1024];
        while sent < len {
            let n = chunk.len().min(len - sent);
            for (j, byte) in chunk[..n].iter_mut().enumerate() {
                *byte = pattern(sent + j);
            }
            write.write_all(&chunk[..n]).await.unwrap();
            sent += n;
        }
        write.shutdown().await.unwrap();
    });
    let mut received = 0;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = read.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        for (j, byte) in buf[..n].iter().enumerate() {
            assert_eq!(*byte, pattern(received + j), "byte {} differs", received + j);
        }
        received += n;
    }
    writer.await.unwrap();
    assert_eq!(received, len);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_arrive_intact_for_1_byte_1_mib_and_1_gib() {
    let server = Server::start(Behaviour::Echo).await;
    let connector = server.connector(HboneConfig::default());
    for len in [1, 1 << 20, 1 << 30] {
        echo_check(&server, &connector, len).await;
    }
    assert_eq!(
        connector.stats().handshakes,
        1,
        "one pooled connection serves all three tunnels"
    );
}

#[tokio::test]
async fn response_headers_and_identities_are_exposed() {
    let server = Server::start(Behaviour::Echo).await;
    let connector = server.connector(HboneConfig::default());
    let request = server
        .request()
        .with_baggage(&Baggage {
            namespace: Some("default".into()),
            workload_kind: Some("deployment".into()),
            workload_name: Some("client".into()),
            ..Baggage::default()
        })
        .with_forwarded(&Forwarded {
            client: "198.18.0.1:40000".parse().unwrap(),
            host: None,
        });
    let stream = connector.connect(request).await.unwrap();
    assert_eq!(stream.peer_identity(), &server.pki.id("default", "server"));
    assert_eq!(
        Baggage::from_headers(stream.headers()).namespace.as_deref(),
        Some("default")
    );
}

#[tokio::test]
async fn half_close_from_the_client_keeps_the_other_direction_open() {
    let server = Server::start(Behaviour::Echo).await;
    let connector = server.connector(HboneConfig::default());
    let mut stream = connector.connect(server.request()).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    stream.shutdown().await.unwrap();
    // The server saw our FIN as EOF, echoed what it had, and only then half-closed its side.
    let mut echoed = Vec::new();
    stream.read_to_end(&mut echoed).await.unwrap();
    assert_eq!(echoed, b"ping");
}

#[tokio::test]
async fn half_close_from_the_server_keeps_the_other_direction_open() {
    let server = Server::start(Behaviour::SendThenRead(5)).await;
    let connector = server.connector(HboneConfig::default());
    let mut stream = connector.connect(server.request()).await.unwrap();
    let mut first = Vec::new();
    stream.read_to_end(&mut first).await.unwrap();
    assert_eq!(
        first,
        vec![7u8; 5],
        "the server's FIN arrives as EOF after its bytes"
    );
    // Our direction is still open: the server asserts these bytes arrive after its FIN.
    stream.write_all(b"after server FIN").await.unwrap();
    stream.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn a_reset_propagates_in_both_directions() {
    // Server resets: the client's read fails with ConnectionReset, not a clean EOF.
    let server = Server::start(Behaviour::AcceptAndReset).await;
    let connector = server.connector(HboneConfig::default());
    let mut stream = connector.connect(server.request()).await.unwrap();
    stream.write_all(b"x").await.unwrap();
    let mut buf = [0u8; 8];
    let err = stream.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);

    // Client resets: the server's read fails with ConnectionReset.
    let pki = TestPki::new();
    let tls_config =
        tls::server_config(pki.cert("default", "server"), vec![pki.trust_domain().clone()]).unwrap();
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
    let seen_tx = Arc::new(std::sync::Mutex::new(Some(seen_tx)));
    let service = service_fn(move |tunnel: InboundTunnel| {
        let seen_tx = seen_tx.clone();
        async move {
            let mut stream = tunnel.accept(HeaderMap::new()).unwrap();
            let mut buf = [0u8; 8];
            let result = stream.read(&mut buf).await;
            if let Some(tx) = seen_tx.lock().unwrap().take() {
                let _ = tx.send(result.map_err(|e| e.kind()));
            }
            Ok::<(), Infallible>(())
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_trigger, watch) = drain::channel();
    tokio::spawn(HboneAcceptor::new(HboneConfig::default(), tls_config, service).serve(listener, watch));
    let server = Server {
        pki,
        addr,
        trigger: None,
    };
    let connector = server.connector(HboneConfig::default());
    let mut stream = connector.connect(server.request()).await.unwrap();
    stream.reset();
    let seen = tokio::time::timeout(Duration::from_secs(5), seen_rx)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen, Err(std::io::ErrorKind::ConnectionReset));
}

#[tokio::test]
async fn service_statuses_reach_the_client() {
    for (behaviour, expected) in [
        (
            Behaviour::Reject(StatusCode::UNAUTHORIZED),
            StatusCode::UNAUTHORIZED,
        ),
        (
            Behaviour::Reject(StatusCode::SERVICE_UNAVAILABLE),
            StatusCode::SERVICE_UNAVAILABLE,
        ),
        (Behaviour::Forget, StatusCode::SERVICE_UNAVAILABLE),
    ] {
        let server = Server::start(behaviour).await;
        let connector = server.connector(HboneConfig::default());
        match connector.connect(server.request()).await {
            Err(HboneError::Status(status)) => assert_eq!(status, expected),
            other => panic!("expected status {expected}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn acceptor_answers_400_to_protocol_errors() {
    let server = Server::start(Behaviour::Echo).await;
    let connector = server.connector(HboneConfig::default());
    for authority in ["127.0.0.1:15008", "127.0.0.1:15001", "127.0.0.2:8080", "echo:0"] {
        let mut request = server.request();
        request.authority = authority.to_owned();
        match connector.connect(request).await {
            Err(HboneError::Status(StatusCode::BAD_REQUEST)) => {}
            other => panic!("{authority}: expected 400, got {other:?}"),
        }
    }
    // A hostname authority passes the protocol checks: resolving it is the service's job.
    let mut request = server.request();
    request.authority = "echo.default.svc.cluster.local:80".to_owned();
    assert!(connector.connect(request).await.is_ok());
}

/// Speaks raw HTTP/2 over our mutual TLS, for requests our connector would never send.
async fn raw_h2(server: &Server) -> h2::client::SendRequest<Bytes> {
    let config = tls::client_config(
        server.pki.cert("default", "client"),
        vec![server.pki.id("default", "server")],
    )
    .unwrap();
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let tls_stream = tokio_rustls::TlsConnector::from(config)
        .connect(tls::server_name(), tcp)
        .await
        .unwrap();
    let (send, connection) = h2::client::handshake(tls_stream).await.unwrap();
    tokio::spawn(connection);
    send
}

#[tokio::test]
async fn non_connect_methods_get_400() {
    let server = Server::start(Behaviour::Echo).await;
    let mut send = raw_h2(&server).await;
    for method in [Method::GET, Method::POST] {
        let request = Request::builder()
            .method(method.clone())
            .uri("https://127.0.0.1:8080/")
            .body(())
            .unwrap();
        let (response, _) = send.send_request(request, true).unwrap();
        assert_eq!(
            response.await.unwrap().status(),
            StatusCode::BAD_REQUEST,
            "{method}"
        );
    }
}

#[tokio::test]
async fn wrong_identities_fail_the_handshake() {
    let server = Server::start(Behaviour::Echo).await;
    let connector = server.connector(HboneConfig::default());
    // The client expects someone else.
    let mut request = server.request();
    request.expected_identities = vec![server.pki.id("default", "payments")];
    match connector.connect(request).await {
        Err(HboneError::Tls { source, .. }) => {
            let rustls_error = source
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>())
                .unwrap();
            assert!(matches!(
                tls::identity_error(rustls_error),
                Some(mesh_core::Error::UnexpectedIdentity { .. })
            ));
        }
        other => panic!("expected a TLS identity failure, got {other:?}"),
    }
    // A client from another trust domain (another root too): refused.
    let foreign = TestPki::for_trust_domain("other.example");
    let mut certs = StaticCertProvider::new();
    let foreign_id = foreign.id("default", "client");
    certs.insert(foreign.ca().issue(&foreign_id, TEST_CERT_LIFETIME).unwrap());
    let connector = HboneConnector::new(HboneConfig::default(), Arc::new(certs));
    let mut request = server.request();
    request.source = foreign_id;
    assert!(matches!(
        connector.connect(request).await,
        Err(HboneError::Tls { .. })
    ));
}

#[tokio::test]
async fn plaintext_and_http1_on_the_hbone_port_are_refused() {
    let server = Server::start(Behaviour::Echo).await;
    // Plaintext HTTP/1.1: the TLS layer refuses, and the connection closes instead of hanging.
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"CONNECT 127.0.0.1:8080 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(read, Ok(0) | Err(_)) || !buf.starts_with(b"HTTP/1.1 200"),
        "{read:?}"
    );

    // TLS with ALPN http/1.1 only: no common protocol, the handshake fails.
    let mut config = (*tls::client_config(
        server.pki.cert("default", "client"),
        vec![server.pki.id("default", "server")],
    )
    .unwrap())
    .clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let result = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(tls::server_name(), tcp)
        .await;
    let err = result.unwrap_err();
    let rustls_error = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .unwrap();
    assert!(
        matches!(
            rustls_error,
            rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol)
        ),
        "{rustls_error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_streams_use_the_connections_the_limits_predict() {
    let server = Server::start(Behaviour::Echo).await;
    let connector = server.connector(HboneConfig::default());
    let streams = join_all((0..1000).map(|_| connector.connect(server.request()))).await;
    let mut streams: Vec<_> = streams.into_iter().map(Result::unwrap).collect();
    // 100 streams per connection (below the server's 200): exactly 10 connections.
    let stats = connector.stats();
    assert_eq!(stats.handshakes, 10);
    assert_eq!(stats.open_connections, 10);
    assert_eq!(stats.open_streams, 1000);
    for (i, stream) in streams.iter_mut().enumerate().step_by(97) {
        let message = format!("stream {i}");
        stream.write_all(message.as_bytes()).await.unwrap();
        let mut echoed = vec![0u8; message.len()];
        stream.read_exact(&mut echoed).await.unwrap();
        assert_eq!(echoed, message.as_bytes());
    }
    drop(streams);
    // Freed slots are reused: another 100 streams need no new handshake.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let again = join_all((0..100).map(|_| connector.connect(server.request()))).await;
    assert!(again.iter().all(Result::is_ok));
    assert_eq!(connector.stats().handshakes, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_racing_callers_cause_exactly_one_handshake() {
    let server_config = HboneConfig {
        server_max_concurrent_streams: 1000,
        ..HboneConfig::default()
    };
    let server = Server::start_with(TestPki::new(), server_config, Behaviour::Echo).await;
    let connector = server.connector(HboneConfig {
        pool_max_streams_per_connection: 1000,
        ..HboneConfig::default()
    });
    let barrier = Arc::new(tokio::sync::Barrier::new(200));
    let tasks = (0..200).map(|_| {
        let connector = connector.clone();
        let request = server.request();
        let barrier = barrier.clone();
        tokio::spawn(async move {
            barrier.wait().await;
            connector.connect(request).await
        })
    });
    let results = join_all(tasks).await;
    assert!(results.into_iter().all(|r| r.unwrap().is_ok()));
    assert_eq!(
        connector.stats().handshakes,
        1,
        "ztunnel issue 864: racing callers must share one handshake"
    );
}

#[tokio::test]
async fn a_full_connection_makes_the_next_caller_open_another_and_the_peer_limit_counts() {
    // The server allows only 3 streams per connection: that wins over our 100.
    let server_config = HboneConfig {
        server_max_concurrent_streams: 3,
        ..HboneConfig::default()
    };
    let server = Server::start_with(TestPki::new(), server_config, Behaviour::Echo).await;
    let connector = server.connector(HboneConfig::default());
    // The first stream learns the server's SETTINGS; the limit applies from then on.
    let first = connector.connect(server.request()).await.unwrap();
    let mut held = vec![first];
    for _ in 0..5 {
        held.push(connector.connect(server.request()).await.unwrap());
    }
    assert_eq!(
        connector.stats().handshakes,
        2,
        "six streams at three per connection"
    );
}

#[tokio::test]
async fn idle_connections_close() {
    let server = Server::start(Behaviour::Echo).await;
    let connector = server.connector(HboneConfig {
        pool_idle_timeout: Duration::from_millis(200),
        ..HboneConfig::default()
    });
    drop(connector.connect(server.request()).await.unwrap());
    assert_eq!(connector.stats().open_connections, 1);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(connector.stats().open_connections, 0);
    drop(connector.connect(server.request()).await.unwrap());
    assert_eq!(connector.stats().handshakes, 2);
}

#[tokio::test]
async fn the_client_closes_a_connection_whose_peer_stops_answering_pings() {
    // A server that completes TLS and then never reads again: no SETTINGS, no PING answers, no response.
    let pki = TestPki::new();
    let tls_config =
        tls::server_config(pki.cert("default", "server"), vec![pki.trust_domain().clone()]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let silent = tokio_rustls::TlsAcceptor::from(tls_config)
            .accept(tcp)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(silent);
    });
    let server = Server {
        pki,
        addr,
        trigger: None,
    };
    let connector = server.connector(HboneConfig {
        keepalive_interval: Duration::from_millis(100),
        keepalive_timeout: Duration::from_millis(300),
        ..HboneConfig::default()
    });
    let result = tokio::time::timeout(Duration::from_secs(5), connector.connect(server.request())).await;
    assert!(
        matches!(result, Ok(Err(_))),
        "the tunnel must fail, not hang: {result:?}"
    );
    assert_eq!(connector.stats().open_connections, 0);
}

#[tokio::test]
async fn the_server_bounds_silent_clients_by_handshake_and_ping_timeouts() {
    let pki = TestPki::new();
    let tls_config =
        tls::server_config(pki.cert("default", "server"), vec![pki.trust_domain().clone()]).unwrap();
    let config = HboneConfig {
        keepalive_interval: Duration::from_millis(100),
        keepalive_timeout: Duration::from_millis(300),
        handshake_timeout: Duration::from_millis(300),
        ..HboneConfig::default()
    };
    let service = service_fn(|tunnel: InboundTunnel| serve(tunnel, Behaviour::Echo));
    let acceptor = HboneAcceptor::new(config, tls_config, service);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_trigger, watch) = drain::channel();

    // A client that opens TCP and never starts TLS: the handshake timeout ends it.
    let idle_tcp = TcpStream::connect(addr).await.unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    let served = tokio::time::timeout(
        Duration::from_secs(5),
        acceptor.serve_connection(tcp, watch.clone()),
    )
    .await;
    assert!(
        matches!(
            served,
            Ok(Err(HboneError::Timeout {
                step: "TLS handshake",
                ..
            }))
        ),
        "{served:?}"
    );
    drop(idle_tcp);

    // A client that completes TLS and HTTP/2, then stops polling its connection: PINGs go unanswered.
    let client_config =
        tls::client_config(pki.cert("default", "client"), vec![pki.id("default", "server")]).unwrap();
    let silent_client = tokio::spawn(async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls_stream = tokio_rustls::TlsConnector::from(client_config)
            .connect(tls::server_name(), tcp)
            .await
            .unwrap();
        let (_send, connection) = h2::client::handshake(tls_stream).await.unwrap();
        // Drive the connection just long enough to exchange SETTINGS, then stop polling it (but keep it
        // open: dropping it would close the socket, which is not silence).
        let mut connection = connection;
        let _ = tokio::time::timeout(Duration::from_millis(50), &mut connection).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(connection);
    });
    let (tcp, _) = listener.accept().await.unwrap();
    let served = tokio::time::timeout(Duration::from_secs(5), acceptor.serve_connection(tcp, watch)).await;
    assert!(
        matches!(
            served,
            Ok(Err(HboneError::Timeout {
                step: "PING answer",
                ..
            }))
        ),
        "{served:?}"
    );
    silent_client.abort();
}

#[tokio::test]
async fn drain_sends_goaway_and_lets_streams_in_flight_finish() {
    let mut server = Server::start(Behaviour::Echo).await;
    let connector = server.connector(HboneConfig::default());
    let mut stream = connector.connect(server.request()).await.unwrap();
    stream.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    stream.read_exact(&mut buf).await.unwrap();

    let trigger = server.trigger.take().unwrap();
    let drained = tokio::spawn(trigger.drain());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!drained.is_finished(), "drain waits for the open stream");

    // The stream in flight still works after the GOAWAY ...
    stream.write_all(b"after!").await.unwrap();
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"after!");
    // ... new tunnels are refused (the connection is going away, the listener is closed) ...
    assert!(connector.connect(server.request()).await.is_err());
    // ... and the drain completes once the stream ends.
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    drop(stream);
    tokio::time::timeout(Duration::from_secs(5), drained)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn the_acceptor_serves_at_most_its_connection_limit() {
    let config = HboneConfig {
        server_max_connections: 1,
        ..HboneConfig::default()
    };
    let server = Server::start_with(TestPki::new(), config, Behaviour::Echo).await;
    let first = server.connector(HboneConfig::default());
    let mut held = first.connect(server.request()).await.unwrap();
    // A second client's connection waits in the listen backlog while the first one is open ...
    let second = server.connector(HboneConfig::default());
    let pending = tokio::time::timeout(Duration::from_millis(300), second.connect(server.request())).await;
    assert!(
        pending.is_err(),
        "the second connection must wait for a slot: {pending:?}"
    );
    // ... and is served once the first one closes (its connector, and so its pooled connection, is gone).
    held.shutdown().await.unwrap();
    let mut rest = Vec::new();
    held.read_to_end(&mut rest).await.unwrap();
    drop(held);
    drop(first);
    let admitted = tokio::time::timeout(Duration::from_secs(5), second.connect(server.request())).await;
    assert!(matches!(admitted, Ok(Ok(_))), "{admitted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_reads_and_writes_carry_the_bytes_without_copies_and_end_with_the_half_close() {
    let server = Server::start(Behaviour::Echo).await;
    let connector = server.connector(HboneConfig::default());
    let mut stream = connector.connect(server.request()).await.unwrap();
    // 3 MiB in chunks of uneven sizes, some larger than a DATA frame may be, queued without copying.
    let data: Vec<u8> = (0..3 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(7) >> 3).to_le_bytes()[0])
        .collect();
    let mut received = Vec::with_capacity(data.len());
    let mut to_send = bytes::Bytes::from(data.clone());
    let mut closed = false;
    let mut write_done = false;
    tokio::time::timeout(Duration::from_secs(30), async {
        std::future::poll_fn(|cx| {
            // Write while the window lasts, in pieces of 100,000 bytes, then half-close.
            while !write_done {
                if to_send.is_empty() {
                    let _ = tokio::io::AsyncWrite::poll_shutdown(std::pin::Pin::new(&mut stream), cx);
                    write_done = true;
                    break;
                }
                let mut piece = to_send.split_to(to_send.len().min(100_000));
                match stream.poll_write_chunk(cx, &mut piece) {
                    std::task::Poll::Ready(result) => {
                        result.unwrap();
                        assert!(piece.is_empty(), "a ready chunk write queued all of it");
                    }
                    std::task::Poll::Pending => {
                        // Put the unqueued rest back in front.
                        let mut rest = piece.to_vec();
                        rest.extend_from_slice(&to_send);
                        to_send = bytes::Bytes::from(rest);
                        break;
                    }
                }
            }
            loop {
                match stream.poll_read_chunk(cx) {
                    std::task::Poll::Ready(Ok(Some(chunk))) => {
                        assert!(!chunk.is_empty(), "empty chunks are never handed out");
                        received.extend_from_slice(&chunk);
                    }
                    std::task::Poll::Ready(Ok(None)) => {
                        closed = true;
                        return std::task::Poll::Ready(());
                    }
                    std::task::Poll::Ready(Err(error)) => panic!("read failed: {error}"),
                    std::task::Poll::Pending => return std::task::Poll::Pending,
                }
            }
        })
        .await
    })
    .await
    .expect("the echo did not complete");
    assert!(closed, "the server's END_STREAM ends the chunk reads");
    assert_eq!(received.len(), data.len());
    assert!(received == data, "the echo differs from what was sent");
}
