//! `Outbound` over real loopback sockets: a client connects to a `serve_tcp` listener running the
//! outbound proxy (with the original destination injected, since there is no iptables here), which
//! routes it by the mesh snapshot to a plain echo server (passthrough), or over HBONE through real
//! mutual TLS to a real `HboneAcceptor` whose test service records what it received and echoes.
//!
//! Addresses: the client binds 127.0.0.2 (the `client` workload; 127.0.0.5 is a second one, `client-b`,
//! for the original-source tests), the passthrough echo server is on
//! 127.0.0.3 (not in the mesh), the HBONE `server` workload is 127.0.0.4 (service VIP 127.0.0.10),
//! 127.0.0.6 is an HBONE workload nobody listens for, 127.0.0.7 presents the wrong identity. These are on
//! network `local`; the service at 127.0.0.11 has its endpoint on network `remote`, reached by double
//! HBONE through the east-west gateway at 127.0.0.8.
#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use mesh_core::cert::StaticCertProvider;
use mesh_core::drain::{DrainTrigger, DrainWatch};
use mesh_core::model::{
    GatewayAddress, Locality, MeshSnapshot, NetworkAddr, Service, ServicePort, TunnelProtocol, Workload,
};
use mesh_core::{SpiffeId, tls};
use mesh_hbone::headers::{Baggage, Forwarded, X_FORWARDED_NETWORK};
use mesh_hbone::{HboneAcceptor, HboneConfig, HboneConnector, InboundTunnel, TunnelTarget};
use mesh_policy::L4PolicySet;
use mesh_proxy::ProxyError;
use mesh_proxy::listener::{ListenerConfig, serve_tcp};
use mesh_proxy::outbound::{Outbound, OutboundConfig, SourceLookup};
use mesh_proxy::state::ProxyState;
use mesh_proxy::telemetry::{
    ConnectionObserver, ConnectionOutcome, ConnectionRecord, Observers, ResponseFlag, SecurityPolicy,
};
use mesh_test::{TEST_CERT_LIFETIME, TestPki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;

const BOUND: Duration = Duration::from_secs(10);
const CLIENT_IP: &str = "127.0.0.2";
/// A second client workload (same service account), so two clients have different IPs.
const SECOND_CLIENT_IP: &str = "127.0.0.5";
const ECHO_IP: &str = "127.0.0.3";
const SERVER_IP: &str = "127.0.0.4";
const UNREACHABLE_IP: &str = "127.0.0.6";
const IMPOSTOR_IP: &str = "127.0.0.7";
const GATEWAY_IP: &str = "127.0.0.8";
const VIP: &str = "127.0.0.10";
const REMOTE_VIP: &str = "127.0.0.11";
const HOSTNAME: &str = "echo.default.svc.cluster.local";
const REMOTE_HOSTNAME: &str = "remote.default.svc.cluster.local";
const NETWORK: &str = "local";
/// The acceptor answers CONNECTs to this port with 401, as a policy denial.
const DENIED_PORT: u16 = 9999;

// ---- Observer ----------------------------------------------------------------------------------------

#[derive(Debug)]
struct Recorder {
    opened: Mutex<usize>,
    closed: mpsc::UnboundedSender<(Arc<ConnectionRecord>, ConnectionOutcome)>,
}

impl ConnectionObserver for Recorder {
    fn opened(&self, _connection: &Arc<ConnectionRecord>) {
        *self.opened.lock().unwrap() += 1;
    }

    fn closed(&self, connection: &Arc<ConnectionRecord>, outcome: &ConnectionOutcome) {
        let _ = self.closed.send((connection.clone(), outcome.clone()));
    }
}

// ---- What the HBONE peer saw -------------------------------------------------------------------------

#[derive(Debug)]
struct Seen {
    peer: SpiffeId,
    /// The TCP peer of the HBONE connection: where the destination thinks the client is.
    peer_addr: SocketAddr,
    target: TunnelTarget,
    baggage: Baggage,
    forwarded: Option<Forwarded>,
    network: Option<String>,
}

impl Seen {
    fn of(tunnel: &InboundTunnel) -> Seen {
        Seen {
            peer: tunnel.peer_identity().clone(),
            peer_addr: tunnel.peer_addr(),
            target: tunnel.target().clone(),
            baggage: tunnel.baggage(),
            forwarded: Forwarded::from_headers(tunnel.headers()),
            network: tunnel
                .headers()
                .get(X_FORWARDED_NETWORK)
                .map(|v| v.to_str().unwrap().to_owned()),
        }
    }
}

/// Accepts a tunnel and echoes its bytes.
async fn echo_tunnel(tunnel: InboundTunnel) {
    if let Ok(stream) = tunnel.accept(Default::default()) {
        let (mut read, mut write) = tokio::io::split(stream);
        let _ = tokio::io::copy(&mut read, &mut write).await;
        let _ = write.shutdown().await;
    }
}

fn server_tls(pki: &TestPki, namespace: &str, service_account: &str) -> Arc<rustls::ServerConfig> {
    tls::server_config(
        pki.cert(namespace, service_account),
        vec![pki.trust_domain().clone()],
    )
    .unwrap()
}

/// An HBONE acceptor on `ip` (port 0 = any) presenting `namespace/service_account`, whose service records
/// each CONNECT, rejects those to [`DENIED_PORT`] with 401 and echoes the rest.
async fn acceptor(
    pki: &TestPki,
    ip: &str,
    port: u16,
    service_account: &str,
    drain: DrainWatch,
) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let service = tower::service_fn(move |tunnel: InboundTunnel| {
        let seen_tx = seen_tx.clone();
        async move {
            let _ = seen_tx.send(Seen::of(&tunnel));
            if tunnel.target().port() == DENIED_PORT {
                tunnel.reject(StatusCode::UNAUTHORIZED);
            } else {
                echo_tunnel(tunnel).await;
            }
            Ok::<(), Infallible>(())
        }
    });
    let listener = TcpListener::bind(format!("{ip}:{port}")).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = server_tls(pki, "default", service_account);
    tokio::spawn(HboneAcceptor::new(HboneConfig::default(), tls, service).serve(listener, drain));
    (addr, seen)
}

/// An east-west gateway on [`GATEWAY_IP`]: it accepts the outer tunnel (recording it), and serves the
/// inner HBONE session inside it as the remote workload `default/remote` would, recording the inner
/// CONNECT and echoing. Returns its address and the (outer, inner) receivers.
async fn east_west_gateway(
    pki: &TestPki,
    drain: DrainWatch,
) -> (
    SocketAddr,
    mpsc::UnboundedReceiver<Seen>,
    mpsc::UnboundedReceiver<Seen>,
) {
    let (inner_tx, inner_seen) = mpsc::unbounded_channel();
    let remote = tower::service_fn(move |tunnel: InboundTunnel| {
        let inner_tx = inner_tx.clone();
        async move {
            let _ = inner_tx.send(Seen::of(&tunnel));
            echo_tunnel(tunnel).await;
            Ok::<(), Infallible>(())
        }
    });
    let remote = Arc::new(
        HboneAcceptor::new(
            HboneConfig::default(),
            server_tls(pki, "default", "remote"),
            remote,
        )
        .allow_any_destination(),
    );
    let (outer_tx, outer_seen) = mpsc::unbounded_channel();
    let inner_drain = drain.clone();
    let gateway = tower::service_fn(move |tunnel: InboundTunnel| {
        let outer_tx = outer_tx.clone();
        let remote = remote.clone();
        let drain = inner_drain.clone();
        async move {
            let _ = outer_tx.send(Seen::of(&tunnel));
            let (peer, local) = (tunnel.peer_addr(), tunnel.local_addr());
            if let Ok(stream) = tunnel.accept(Default::default()) {
                let _ = remote.serve_io(stream, peer, local, drain).await;
            }
            Ok::<(), Infallible>(())
        }
    });
    let listener = TcpListener::bind(format!("{GATEWAY_IP}:0")).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = server_tls(pki, "istio-system", "eastwest");
    tokio::spawn(
        HboneAcceptor::new(HboneConfig::default(), tls, gateway)
            .allow_any_destination()
            .serve(listener, drain),
    );
    (addr, outer_seen, inner_seen)
}

/// A plain TCP echo server on `ip`.
async fn echo_server(ip: &str) -> SocketAddr {
    let listener = TcpListener::bind(format!("{ip}:0")).await.unwrap();
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

// ---- The mesh ----------------------------------------------------------------------------------------

fn workload(name: &str, ip: &str, service_account: &str, protocol: TunnelProtocol) -> Workload {
    Workload {
        addresses: vec![ip.parse().unwrap()],
        service_account: service_account.into(),
        network: NETWORK.into(),
        protocol,
        ..Workload::new(format!("cluster1//v1/Pod/default/{name}"), name, "default")
    }
}

fn snapshot(gateway_port: u16) -> MeshSnapshot {
    let service = Service {
        vips: vec![format!("{NETWORK}/{VIP}").parse().unwrap()],
        ports: vec![ServicePort::new(80, 8080)],
        ..Service::new("echo", "default", HOSTNAME)
    };
    let client = Workload {
        cluster_id: "Kubernetes".into(),
        workload_name: "client".into(),
        workload_type: "deployment".into(),
        canonical_name: "client-app".into(),
        canonical_revision: "v1".into(),
        locality: Some(Locality {
            region: "us-east1".into(),
            zone: "us-east1-b".into(),
            subzone: "".into(),
        }),
        ..workload("client", CLIENT_IP, "client", TunnelProtocol::Hbone)
    };
    let server = Workload {
        services: BTreeMap::from([(service.key(), BTreeMap::new())]),
        ..workload("server", SERVER_IP, "server", TunnelProtocol::Hbone)
    };
    let remote_service = Service {
        vips: vec![format!("{NETWORK}/{REMOTE_VIP}").parse().unwrap()],
        ports: vec![ServicePort::new(80, 8080)],
        ..Service::new("remote", "default", REMOTE_HOSTNAME)
    };
    // On another network, without an address this side could reach: only through its gateway.
    let remote = Workload {
        addresses: vec![],
        network: "remote".into(),
        network_gateway: Some(GatewayAddress {
            hbone_mtls_port: gateway_port,
            ..GatewayAddress::address(NetworkAddr::new("remote", GATEWAY_IP.parse().unwrap()))
        }),
        services: BTreeMap::from([(remote_service.key(), BTreeMap::new())]),
        ..workload("remote", "0.0.0.0", "remote", TunnelProtocol::Hbone)
    };
    let gateway = Workload {
        network: "remote".into(),
        ..Workload {
            namespace: "istio-system".into(),
            ..workload("eastwest", GATEWAY_IP, "eastwest", TunnelProtocol::Hbone)
        }
    };
    MeshSnapshot::builder()
        .add_service(service)
        .add_service(remote_service)
        .add_workload(remote)
        .add_workload(gateway)
        .add_workload(client)
        .add_workload(workload(
            "client-b",
            SECOND_CLIENT_IP,
            "client",
            TunnelProtocol::Hbone,
        ))
        .add_workload(server)
        .add_workload(workload("gone", UNREACHABLE_IP, "gone", TunnelProtocol::Hbone))
        .add_workload(workload(
            "impostor",
            IMPOSTOR_IP,
            "expected",
            TunnelProtocol::Hbone,
        ))
        .build()
        .unwrap()
}

struct Fixture {
    pki: TestPki,
    outbound: Outbound,
    connector: HboneConnector,
    /// The port every HBONE acceptor of the fixture listens on.
    hbone_port: u16,
    closed: mpsc::UnboundedReceiver<(Arc<ConnectionRecord>, ConnectionOutcome)>,
    recorder: Arc<Recorder>,
    seen: mpsc::UnboundedReceiver<Seen>,
    impostor_seen: mpsc::UnboundedReceiver<Seen>,
    outer_seen: mpsc::UnboundedReceiver<Seen>,
    inner_seen: mpsc::UnboundedReceiver<Seen>,
    echo: SocketAddr,
    _trigger: DrainTrigger,
    drain: DrainWatch,
}

async fn fixture() -> Fixture {
    fixture_with(peer_ip_lookup(), false).await
}

/// The fixture with the outbound proxy's source lookup and `original_source` setting given.
async fn fixture_with(source: SourceLookup, original_source: bool) -> Fixture {
    let pki = TestPki::new();
    let (trigger, drain) = mesh_core::drain::channel();
    let (server, seen) = acceptor(&pki, SERVER_IP, 0, "server", drain.clone()).await;
    // Same port on another address: the outbound proxy has one HBONE port for every peer.
    let (_, impostor_seen) = acceptor(&pki, IMPOSTOR_IP, server.port(), "impostor", drain.clone()).await;
    let echo = echo_server(ECHO_IP).await;
    let (gateway, outer_seen, inner_seen) = east_west_gateway(&pki, drain.clone()).await;

    let mut certs = StaticCertProvider::new();
    certs.insert(
        pki.ca()
            .issue(&pki.id("default", "client"), TEST_CERT_LIFETIME)
            .unwrap(),
    );
    let connector = HboneConnector::new(HboneConfig::default(), Arc::new(certs));
    let (closed_tx, closed) = mpsc::unbounded_channel();
    let recorder = Arc::new(Recorder {
        opened: Mutex::new(0),
        closed: closed_tx,
    });
    let config = OutboundConfig {
        source,
        hbone_port: server.port(),
        original_source,
        ..OutboundConfig::default()
    };
    let state = ProxyState::fixed(snapshot(gateway.port()), L4PolicySet::default());
    let observers = Observers::new(vec![recorder.clone()]);
    Fixture {
        pki,
        outbound: Outbound::new(config, state, connector.clone(), observers),
        connector,
        hbone_port: server.port(),
        closed,
        recorder,
        seen,
        impostor_seen,
        outer_seen,
        inner_seen,
        echo,
        _trigger: trigger,
        drain,
    }
}

impl Fixture {
    /// A `serve_tcp` listener running the outbound proxy with `destination` as every connection's
    /// original destination; returns its address and a receiver of each connection's result.
    async fn listen(
        &self,
        destination: SocketAddr,
    ) -> (SocketAddr, mpsc::UnboundedReceiver<Result<(), ProxyError>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (results_tx, results) = mpsc::unbounded_channel();
        let outbound = self.outbound.clone();
        let handler = move |stream: TcpStream, peer: SocketAddr| {
            let outbound = outbound.clone();
            let results_tx = results_tx.clone();
            async move {
                let _ = results_tx.send(outbound.proxy(stream, peer, destination).await);
            }
        };
        let config = ListenerConfig {
            max_connections: NonZeroUsize::new(16).unwrap(),
            ..ListenerConfig::default()
        };
        let drain = self.drain.clone();
        tokio::spawn(async move { serve_tcp(listener, handler, &config, drain).await });
        (addr, results)
    }

    async fn next_closed(&mut self) -> (Arc<ConnectionRecord>, ConnectionOutcome) {
        tokio::time::timeout(BOUND, self.closed.recv())
            .await
            .unwrap()
            .unwrap()
    }
}

/// A client connection from `ip` (so the proxy sees that peer address).
async fn connect_from(ip: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// Writes `message`, half-closes, and reads until the proxy closes.
async fn exchange(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(message).await?;
    stream.shutdown().await?;
    let mut reply = Vec::new();
    tokio::time::timeout(BOUND, stream.read_to_end(&mut reply))
        .await
        .expect("the proxy must end the connection")?;
    Ok(reply)
}

async fn result(results: &mut mpsc::UnboundedReceiver<Result<(), ProxyError>>) -> Result<(), ProxyError> {
    tokio::time::timeout(BOUND, results.recv())
        .await
        .unwrap()
        .unwrap()
}

fn sock(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

// ---- Tests -------------------------------------------------------------------------------------------

#[tokio::test]
async fn passthrough_reaches_a_destination_outside_the_mesh() {
    let mut f = fixture().await;
    let (proxy, mut results) = f.listen(f.echo).await;
    let mut client = connect_from(CLIENT_IP, proxy).await;
    let client_addr = client.local_addr().unwrap();
    assert_eq!(
        exchange(&mut client, b"hello, world").await.unwrap(),
        b"hello, world"
    );
    result(&mut results).await.unwrap();

    let (record, outcome) = f.next_closed().await;
    assert_eq!(outcome, ConnectionOutcome::ok());
    assert_eq!(record.source_addr, client_addr);
    assert_eq!(record.destination_addr, f.echo);
    assert_eq!(record.upstream_addr, Some(f.echo));
    assert_eq!(record.security, SecurityPolicy::Unknown);
    assert_eq!(record.source_workload.as_ref().unwrap().name.as_ref(), "client");
    assert_eq!(record.source_identity, Some(f.pki.id("default", "client")));
    assert!(record.destination_workload.is_none());
    assert_eq!((record.sent(), record.received()), (12, 12));
}

#[tokio::test]
async fn hbone_to_a_workload_carries_the_source_identity_and_headers() {
    let mut f = fixture().await;
    let (proxy, mut results) = f.listen(sock(&format!("{SERVER_IP}:8080"))).await;
    let mut client = connect_from(CLIENT_IP, proxy).await;
    let client_addr = client.local_addr().unwrap();
    let payload = vec![0x5Au8; 256 * 1024];
    assert_eq!(exchange(&mut client, &payload).await.unwrap(), payload);
    result(&mut results).await.unwrap();

    let seen = tokio::time::timeout(BOUND, f.seen.recv()).await.unwrap().unwrap();
    assert_eq!(
        seen.peer,
        f.pki.id("default", "client"),
        "the tunnel presents the source's identity"
    );
    assert_eq!(
        seen.target,
        TunnelTarget::Addr(sock(&format!("{SERVER_IP}:8080")))
    );
    assert_eq!(
        seen.baggage,
        Baggage {
            cluster_name: Some("Kubernetes".into()),
            namespace: Some("default".into()),
            workload_kind: Some("deployment".into()),
            workload_name: Some("client".into()),
            service_name: Some("client-app".into()),
            service_version: Some("v1".into()),
            region: Some("us-east1".into()),
            zone: Some("us-east1-b".into()),
        }
    );
    assert_eq!(
        seen.forwarded,
        Some(Forwarded {
            client: client_addr,
            host: None
        }),
        "for= names the original client; no host= for a workload address"
    );
    assert_eq!(seen.network, None, "x-forwarded-network is for double HBONE only");

    let (record, outcome) = f.next_closed().await;
    assert_eq!(outcome, ConnectionOutcome::ok());
    assert_eq!(record.security, SecurityPolicy::MutualTls);
    assert_eq!(record.upstream_addr.unwrap().ip().to_string(), SERVER_IP);
    assert_eq!(record.destination_identity, Some(f.pki.id("default", "server")));
    assert_eq!(
        record.destination_workload.as_ref().unwrap().name.as_ref(),
        "server"
    );
    assert_eq!((record.sent(), record.received()), (256 * 1024, 256 * 1024));
}

#[tokio::test]
async fn hbone_to_a_service_vip_picks_the_endpoint_and_names_the_service() {
    let mut f = fixture().await;
    let (proxy, mut results) = f.listen(sock(&format!("{VIP}:80"))).await;
    let mut client = connect_from(CLIENT_IP, proxy).await;
    let client_addr = client.local_addr().unwrap();
    assert_eq!(
        exchange(&mut client, b"via the service").await.unwrap(),
        b"via the service"
    );
    result(&mut results).await.unwrap();

    let seen = tokio::time::timeout(BOUND, f.seen.recv()).await.unwrap().unwrap();
    assert_eq!(
        seen.target,
        TunnelTarget::Addr(sock(&format!("{SERVER_IP}:8080"))),
        "the authority is the endpoint on the service's target port"
    );
    assert_eq!(
        seen.forwarded,
        Some(Forwarded {
            client: client_addr,
            host: Some(HOSTNAME.into())
        })
    );
    let (record, _) = f.next_closed().await;
    assert_eq!(record.destination_addr, sock(&format!("{VIP}:80")));
    assert_eq!(
        record.destination_service.as_ref().unwrap().hostname.as_ref(),
        HOSTNAME
    );
}

#[tokio::test]
async fn double_hbone_crosses_networks_through_the_east_west_gateway() {
    let mut f = fixture().await;
    let (proxy, mut results) = f.listen(sock(&format!("{REMOTE_VIP}:80"))).await;
    let mut client = connect_from(CLIENT_IP, proxy).await;
    let client_addr = client.local_addr().unwrap();
    assert_eq!(
        exchange(&mut client, b"across networks").await.unwrap(),
        b"across networks"
    );
    result(&mut results).await.unwrap();

    let authority = TunnelTarget::Host {
        host: REMOTE_HOSTNAME.into(),
        port: 80,
    };
    let outer = tokio::time::timeout(BOUND, f.outer_seen.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outer.target, authority, "the gateway routes by service hostname");
    assert_eq!(outer.peer, f.pki.id("default", "client"));
    assert_eq!(
        outer.baggage,
        Baggage::default(),
        "the gateway learns nothing about the source"
    );
    assert_eq!(outer.forwarded, None);
    let inner = tokio::time::timeout(BOUND, f.inner_seen.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(inner.target, authority);
    assert_eq!(
        inner.peer,
        f.pki.id("default", "client"),
        "end-to-end mutual TLS inside the tunnel"
    );
    assert_eq!(
        inner.network.as_deref(),
        Some(NETWORK),
        "x-forwarded-network names the source network"
    );
    assert_eq!(inner.baggage.workload_name.as_deref(), Some("client"));
    assert_eq!(
        inner.forwarded,
        Some(Forwarded {
            client: client_addr,
            host: Some(REMOTE_HOSTNAME.into())
        })
    );

    let (record, outcome) = f.next_closed().await;
    assert_eq!(outcome, ConnectionOutcome::ok());
    assert_eq!(record.upstream_addr.unwrap().ip().to_string(), GATEWAY_IP);
    assert_eq!(record.destination_identity, Some(f.pki.id("default", "remote")));
    assert_eq!(
        record.destination_workload.as_ref().unwrap().name.as_ref(),
        "remote"
    );
}

#[tokio::test]
async fn a_401_from_the_peer_is_a_denial_and_closes_the_client() {
    let mut f = fixture().await;
    let (proxy, mut results) = f.listen(sock(&format!("{SERVER_IP}:{DENIED_PORT}"))).await;
    let mut client = connect_from(CLIENT_IP, proxy).await;
    let mut reply = Vec::new();
    let read = tokio::time::timeout(BOUND, client.read_to_end(&mut reply))
        .await
        .unwrap();
    assert!(
        read.is_err() || reply.is_empty(),
        "the client gets no bytes, only the close"
    );
    let error = result(&mut results).await.unwrap_err();
    assert!(matches!(error, ProxyError::HboneConnect { .. }), "{error}");

    let (record, outcome) = f.next_closed().await;
    assert_eq!(outcome.flag, ResponseFlag::Deny);
    assert!(outcome.error.unwrap().contains("401"));
    assert_eq!(record.security, SecurityPolicy::MutualTls);
    assert_eq!(
        *f.recorder.opened.lock().unwrap(),
        1,
        "a refused connection is opened, then closed"
    );
}

#[tokio::test]
async fn an_unreachable_peer_is_a_connect_failure() {
    let mut f = fixture().await;
    let (proxy, mut results) = f.listen(sock(&format!("{UNREACHABLE_IP}:8080"))).await;
    let mut client = connect_from(CLIENT_IP, proxy).await;
    let mut reply = Vec::new();
    let read = tokio::time::timeout(BOUND, client.read_to_end(&mut reply))
        .await
        .unwrap();
    assert!(read.is_err() || reply.is_empty());
    result(&mut results).await.unwrap_err();

    let (record, outcome) = f.next_closed().await;
    assert_eq!(outcome.flag, ResponseFlag::Connect);
    assert_eq!(record.upstream_addr.unwrap().ip().to_string(), UNREACHABLE_IP);
}

#[tokio::test]
async fn an_unreachable_passthrough_destination_is_a_connect_failure() {
    let mut f = fixture().await;
    // A port nothing listens on: bind one, then free it.
    let closed = TcpListener::bind(format!("{ECHO_IP}:0"))
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let (proxy, mut results) = f.listen(closed).await;
    let _client = connect_from(CLIENT_IP, proxy).await;
    let error = result(&mut results).await.unwrap_err();
    assert!(matches!(error, ProxyError::UpstreamConnect { .. }), "{error}");
    let (_, outcome) = f.next_closed().await;
    assert_eq!(outcome.flag, ResponseFlag::Connect);
}

#[tokio::test]
async fn a_peer_with_the_wrong_identity_is_an_identity_error() {
    let mut f = fixture().await;
    let (proxy, mut results) = f.listen(sock(&format!("{IMPOSTOR_IP}:8080"))).await;
    let _client = connect_from(CLIENT_IP, proxy).await;
    result(&mut results).await.unwrap_err();
    let (record, outcome) = f.next_closed().await;
    assert_eq!(outcome.flag, ResponseFlag::IdentityError, "{:?}", outcome.error);
    assert!(record.destination_identity.is_none());
    assert!(
        f.impostor_seen.try_recv().is_err(),
        "no CONNECT is sent to a peer that failed verification"
    );
}

#[tokio::test]
async fn an_unknown_source_is_refused_before_any_upstream_attempt() {
    let mut f = fixture().await;
    let (proxy, mut results) = f.listen(f.echo).await;
    let mut stranger = connect_from("127.0.0.9", proxy).await;
    let mut reply = Vec::new();
    let read = tokio::time::timeout(BOUND, stranger.read_to_end(&mut reply))
        .await
        .unwrap();
    assert!(read.is_err() || reply.is_empty());
    let error = result(&mut results).await.unwrap_err();
    assert!(
        matches!(error, ProxyError::UnknownSource { ip, .. } if ip.to_string() == "127.0.0.9"),
        "{error}"
    );
    // Refused before routing: no record, as ztunnel (which only logs these).
    assert_eq!(*f.recorder.opened.lock().unwrap(), 0);
    assert!(f.closed.try_recv().is_err());
}

#[tokio::test]
async fn a_direct_connection_to_the_capture_port_is_refused_not_looped() {
    // `Outbound` as the listener's handler reads the original destination itself. Nothing redirected
    // this connection, so Linux reports either no original destination or the listener itself: both
    // are refused, rather than proxied back into the listener.
    let mut f = fixture().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let outbound = f.outbound.clone();
    let drain = f.drain.clone();
    tokio::spawn(async move { serve_tcp(listener, outbound, &ListenerConfig::default(), drain).await });
    let mut client = connect_from(CLIENT_IP, addr).await;
    let mut reply = Vec::new();
    let read = tokio::time::timeout(BOUND, client.read_to_end(&mut reply))
        .await
        .unwrap();
    assert!(read.is_err() || reply.is_empty());
    assert_eq!(*f.recorder.opened.lock().unwrap(), 0, "no upstream was attempted");
    assert!(f.closed.try_recv().is_err());
}

// ---- The passthrough socket hook (in-pod mode's sockets) ---------------------------------------------

/// A socket factory that records each address it is asked for, and connects from `source` (so the
/// destination can tell its connections from the proxy's own); with `hang`, never connects.
#[derive(Debug)]
struct RecordingSockets {
    source: &'static str,
    asked: Mutex<Vec<SocketAddr>>,
    hang: bool,
}

impl mesh_hbone::SocketFactory for RecordingSockets {
    fn connect(
        &self,
        addr: SocketAddr,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<TcpStream>> + Send>> {
        self.asked.lock().unwrap().push(addr);
        let source = self.source;
        let hang = self.hang;
        Box::pin(async move {
            if hang {
                std::future::pending::<()>().await;
            }
            let socket = TcpSocket::new_v4()?;
            socket.bind(format!("{source}:0").parse().unwrap())?;
            socket.connect(addr).await
        })
    }
}

/// A server on `ip` that writes each client's IP address and closes.
async fn peer_reporter(ip: &str) -> SocketAddr {
    let listener = TcpListener::bind(format!("{ip}:0")).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, peer)) = listener.accept().await {
            let _ = stream.write_all(peer.ip().to_string().as_bytes()).await;
            let _ = stream.shutdown().await;
        }
    });
    addr
}

#[tokio::test]
async fn passthrough_sockets_open_passthrough_connections_but_not_hbone_ones() {
    let mut f = fixture().await;
    let sockets = Arc::new(RecordingSockets {
        source: "127.0.0.9",
        asked: Mutex::new(Vec::new()),
        hang: false,
    });
    // Set on a clone that shares its settings, as an embedder holding several handles would.
    f.outbound = f.outbound.clone().with_passthrough_sockets(sockets.clone());
    let reporter = peer_reporter(ECHO_IP).await;

    let (proxy, mut results) = f.listen(reporter).await;
    let mut client = connect_from(CLIENT_IP, proxy).await;
    let seen_from = exchange(&mut client, b"").await.unwrap();
    result(&mut results).await.unwrap();
    assert_eq!(
        String::from_utf8(seen_from).unwrap(),
        "127.0.0.9",
        "the passthrough connection is the factory's"
    );
    assert_eq!(*sockets.asked.lock().unwrap(), vec![reporter]);

    // HBONE goes through the connector's own sockets: the factory is not asked.
    let (proxy, mut results) = f.listen(sock(&format!("{SERVER_IP}:8080"))).await;
    let mut client = connect_from(CLIENT_IP, proxy).await;
    assert_eq!(exchange(&mut client, b"mesh").await.unwrap(), b"mesh");
    result(&mut results).await.unwrap();
    let seen = tokio::time::timeout(BOUND, f.seen.recv()).await.unwrap().unwrap();
    assert_eq!(seen.peer, f.pki.id("default", "client"));
    assert_eq!(
        *sockets.asked.lock().unwrap(),
        vec![reporter],
        "HBONE must not use the passthrough sockets"
    );
}

#[tokio::test]
async fn passthrough_sockets_are_bounded_by_the_connect_timeout() {
    let connector = HboneConnector::new(HboneConfig::default(), Arc::new(StaticCertProvider::new()));
    let config = OutboundConfig {
        source: SourceLookup::PeerIp {
            network: NETWORK.into(),
        },
        connect_timeout: Duration::from_millis(200),
        ..OutboundConfig::default()
    };
    let state = ProxyState::fixed(snapshot(15008), L4PolicySet::default());
    let sockets = Arc::new(RecordingSockets {
        source: "127.0.0.9",
        asked: Mutex::new(Vec::new()),
        hang: true,
    });
    let outbound = Outbound::new(config, state, connector, Observers::default())
        .with_passthrough_sockets(sockets.clone());
    let destination = sock(&format!("{ECHO_IP}:9"));
    let attempt = tokio::time::timeout(
        BOUND,
        outbound.connect(
            sock(&format!("{CLIENT_IP}:40000")),
            destination,
            mesh_proxy::outbound::Passthrough::Allow,
        ),
    )
    .await
    .expect("the connect timeout must end a factory that never connects");
    match attempt {
        Err(ProxyError::UpstreamTimeout { addr, .. }) => assert_eq!(addr, destination),
        other => panic!("expected an upstream timeout, got {other:?}"),
    }
    assert_eq!(*sockets.asked.lock().unwrap(), vec![destination]);
}

// ---- Original source: HBONE from the client's own IP ------------------------------------------------

/// Sends one message from a client at `ip` through the outbound proxy to `destination`, checks the echo,
/// and returns what the HBONE peer saw.
async fn tunnel_from(
    f: &Fixture,
    ip: &str,
    destination: SocketAddr,
    seen: &mut mpsc::UnboundedReceiver<Seen>,
) -> Seen {
    let (proxy, mut results) = f.listen(destination).await;
    let mut client = connect_from(ip, proxy).await;
    let message = format!("from {ip}");
    assert_eq!(
        exchange(&mut client, message.as_bytes()).await.unwrap(),
        message.as_bytes()
    );
    result(&mut results).await.unwrap();
    tokio::time::timeout(BOUND, seen.recv()).await.unwrap().unwrap()
}

fn peer_ip_lookup() -> SourceLookup {
    SourceLookup::PeerIp {
        network: NETWORK.into(),
    }
}

#[tokio::test]
async fn original_source_binds_each_clients_hbone_connections_to_its_ip() {
    let mut f = fixture_with(peer_ip_lookup(), true).await;
    let server = sock(&format!("{SERVER_IP}:8080"));
    let mut seen = std::mem::replace(&mut f.seen, mpsc::unbounded_channel().1);

    let first = tunnel_from(&f, CLIENT_IP, server, &mut seen).await;
    let second = tunnel_from(&f, SECOND_CLIENT_IP, server, &mut seen).await;
    assert_eq!(
        first.peer_addr.ip().to_string(),
        CLIENT_IP,
        "the destination sees the client's own IP"
    );
    assert_eq!(second.peer_addr.ip().to_string(), SECOND_CLIENT_IP);
    assert_eq!(
        first.peer, second.peer,
        "same identity, yet not the same connection"
    );
    assert_eq!(f.connector.stats().handshakes, 2);

    // The first client again: its own pooled connection, not the other client's.
    let again = tunnel_from(&f, CLIENT_IP, server, &mut seen).await;
    assert_eq!(
        again.peer_addr, first.peer_addr,
        "the client's connection is reused"
    );
    assert_eq!(f.connector.stats().handshakes, 2);

    // Double HBONE: the outer connection, the one that leaves this host, comes from the client too.
    let (proxy, mut results) = f.listen(sock(&format!("{REMOTE_VIP}:80"))).await;
    let mut client = connect_from(SECOND_CLIENT_IP, proxy).await;
    assert_eq!(exchange(&mut client, b"remote").await.unwrap(), b"remote");
    result(&mut results).await.unwrap();
    let outer = tokio::time::timeout(BOUND, f.outer_seen.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outer.peer_addr.ip().to_string(), SECOND_CLIENT_IP);
    let inner = tokio::time::timeout(BOUND, f.inner_seen.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(inner.peer, f.pki.id("default", "client"));
}

#[tokio::test]
async fn without_original_source_hbone_comes_from_the_proxy_and_is_shared() {
    let mut f = fixture().await;
    let server = sock(&format!("{SERVER_IP}:8080"));
    let mut seen = std::mem::replace(&mut f.seen, mpsc::unbounded_channel().1);
    let first = tunnel_from(&f, CLIENT_IP, server, &mut seen).await;
    let second = tunnel_from(&f, SECOND_CLIENT_IP, server, &mut seen).await;
    assert_ne!(first.peer_addr.ip().to_string(), CLIENT_IP);
    assert_eq!(
        first.peer_addr, second.peer_addr,
        "both clients' tunnels ride one connection from the proxy's address"
    );
    assert_eq!(f.connector.stats().handshakes, 1);
}

#[tokio::test]
async fn a_proxy_for_one_workload_does_not_bind_hbone_to_the_client() {
    // In-pod or dedicated mode: the proxy's sockets already carry the workload's address.
    let source = SourceLookup::Workload {
        uid: "cluster1//v1/Pod/default/client".into(),
    };
    let mut f = fixture_with(source, true).await;
    let mut seen = std::mem::replace(&mut f.seen, mpsc::unbounded_channel().1);
    let tunnel = tunnel_from(&f, CLIENT_IP, sock(&format!("{SERVER_IP}:8080")), &mut seen).await;
    assert_eq!(tunnel.peer, f.pki.id("default", "client"));
    assert_ne!(
        tunnel.peer_addr.ip().to_string(),
        CLIENT_IP,
        "no source address is bound with SourceLookup::Workload"
    );
}

#[tokio::test]
async fn a_client_calling_its_own_ip_is_connected_from_the_proxy() {
    // Hairpin: a packet from an address to itself does not make the round trip through a node's
    // routing, so (as ztunnel does) this one call is made from the proxy's address.
    let f = fixture_with(peer_ip_lookup(), true).await;
    let (_, mut own_seen) = acceptor(&f.pki, CLIENT_IP, f.hbone_port, "client", f.drain.clone()).await;
    let tunnel = tunnel_from(&f, CLIENT_IP, sock(&format!("{CLIENT_IP}:8080")), &mut own_seen).await;
    assert_eq!(tunnel.peer, f.pki.id("default", "client"));
    assert_ne!(tunnel.peer_addr.ip().to_string(), CLIENT_IP);
    // Another client reaching the same workload is still bound to its own IP.
    let other = tunnel_from(
        &f,
        SECOND_CLIENT_IP,
        sock(&format!("{CLIENT_IP}:8080")),
        &mut own_seen,
    )
    .await;
    assert_eq!(other.peer_addr.ip().to_string(), SECOND_CLIENT_IP);
}
