//! The inbound side over real loopback sockets: an `HboneAcceptor` with `Inbound` inside, driven by a real
//! `HboneConnector` (mutual TLS from a test CA), in front of workloads that are real TCP servers on
//! 127.0.0.x; and the plaintext path fed by a real listener. Covers the statuses, the telemetry record,
//! the baggage, half-close, and the connection tracker closing connections after policy or workload changes.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::cert::StaticCertProvider;
use mesh_core::drain::{self, DrainTrigger, DrainWatch};
use mesh_core::model::{
    GatewayAddress, MeshSnapshot, Service, ServicePort, SnapshotPublisher, TunnelProtocol, Workload,
};
use mesh_core::{SpiffeId, tls};
use mesh_hbone::headers::Baggage;
use mesh_hbone::{ConnectRequest, HboneAcceptor, HboneConfig, HboneConnector, HboneError, HboneStream};
use mesh_policy::L4PolicySet;
use mesh_policy::l4::{L4Action, L4Clause, L4Match, L4Policy, L4Rule, L4Scope, StringMatch};
use mesh_proxy::ProxyError;
use mesh_proxy::conntrack::ConnectionTracker;
use mesh_proxy::inbound::{
    Inbound, InboundConfig, PlaintextConnection, ServedWorkloads, WaypointEnforcement,
};
use mesh_proxy::state::ProxyState;
use mesh_proxy::telemetry::{
    ConnectionObserver, ConnectionOutcome, ConnectionRecord, Observers, Reporter, ResponseFlag,
    SecurityPolicy,
};
use mesh_test::{TEST_CERT_LIFETIME, TestPki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

/// Every wait in these tests is bounded by this, so a regression fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(10);

const SERVER_IP: &str = "127.0.0.2";
const LEGACY_IP: &str = "127.0.0.3";
const NOBODY_IP: &str = "127.0.0.4";
const CLIENT_IP: &str = "127.0.0.1";

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {LIMIT:?}"))
}

/// What the test observer saw.
#[derive(Debug)]
enum Event {
    Opened(Arc<ConnectionRecord>),
    Closed(Arc<ConnectionRecord>, ConnectionOutcome),
}

/// Collects opened and closed events into a channel the test reads.
#[derive(Debug)]
struct Collector(mpsc::UnboundedSender<Event>);

impl ConnectionObserver for Collector {
    fn opened(&self, connection: &Arc<ConnectionRecord>) {
        let _ = self.0.send(Event::Opened(connection.clone()));
    }

    fn closed(&self, connection: &Arc<ConnectionRecord>, outcome: &ConnectionOutcome) {
        let _ = self.0.send(Event::Closed(connection.clone(), outcome.clone()));
    }
}

/// What the workload's server does with each connection.
#[derive(Clone, Copy)]
enum Upstream {
    /// Echo every byte until EOF, then half-close.
    Echo,
    /// Nothing listens on the port.
    Refusing,
}

fn workload(name: &str, ip: &str, protocol: TunnelProtocol) -> Workload {
    Workload {
        addresses: vec![ip.parse().unwrap()],
        protocol,
        node: "node1".into(),
        service_account: name.into(),
        canonical_name: name.into(),
        workload_type: "deployment".into(),
        workload_name: name.into(),
        ..Workload::new(format!("cluster1//v1/Pod/default/{name}"), name, "default")
    }
}

/// A node proxy's inbound side with one HBONE workload (`server`), a plaintext-only one (`legacy`) and
/// the client's own workload, each reachable at its own loopback IP.
struct Node {
    pki: TestPki,
    snapshots: SnapshotPublisher,
    policies: watch::Sender<Arc<L4PolicySet>>,
    inbound: Inbound,
    tracker: ConnectionTracker,
    events: mpsc::UnboundedReceiver<Event>,
    connector: HboneConnector,
    /// The server workload's application port.
    app_port: u16,
    drain: DrainWatch,
    _trigger: DrainTrigger,
}

impl Node {
    async fn start(upstream: Upstream) -> Node {
        let app_port = match upstream {
            Upstream::Echo => spawn_echo(SERVER_IP).await,
            Upstream::Refusing => {
                let listener = TcpListener::bind((SERVER_IP, 0)).await.unwrap();
                listener.local_addr().unwrap().port()
            }
        };
        Node::with_port(app_port, WaypointEnforcement::Policy).await
    }

    async fn with_port(app_port: u16, waypoint: WaypointEnforcement) -> Node {
        let pki = TestPki::new();
        let snapshots = SnapshotPublisher::new();
        snapshots.publish(Node::snapshot(true, app_port));
        let (policies, policies_rx) = watch::channel(Arc::new(L4PolicySet::default()));
        let state = ProxyState::new(snapshots.subscribe(), policies_rx);
        let (events_tx, events) = mpsc::unbounded_channel();
        let tracker = ConnectionTracker::new();
        let mut config = InboundConfig::new(ServedWorkloads::Node("node1".into()));
        config.waypoint = waypoint;
        let inbound = Inbound::new(config, state.clone(), tracker.clone())
            .with_observers(Observers::new(vec![Arc::new(Collector(events_tx))]));
        let (trigger, drain) = drain::channel();
        tokio::spawn({
            let tracker = tracker.clone();
            let drain = drain.clone();
            async move { tracker.run(state, drain).await }
        });
        let mut certs = StaticCertProvider::new();
        certs.insert(
            pki.ca()
                .issue(&pki.id("default", "client"), TEST_CERT_LIFETIME)
                .unwrap(),
        );
        let connector = HboneConnector::new(HboneConfig::default(), Arc::new(certs));
        Node {
            pki,
            snapshots,
            policies,
            inbound,
            tracker,
            events,
            connector,
            app_port,
            drain,
            _trigger: trigger,
        }
    }

    /// The mesh, with or without the server workload.
    fn snapshot(with_server: bool, app_port: u16) -> MeshSnapshot {
        let echo = Service {
            vips: vec!["/10.96.0.10".parse().unwrap()],
            ports: vec![ServicePort::new(80, app_port)],
            ..Service::new("echo", "default", "echo.default.svc.cluster.local")
        };
        let mut builder = MeshSnapshot::builder();
        if with_server {
            builder.add_workload(Workload {
                services: BTreeMap::from([(echo.key(), BTreeMap::new())]),
                ..workload("server", SERVER_IP, TunnelProtocol::Hbone)
            });
        }
        builder
            .add_service(echo)
            .add_workload(workload("legacy", LEGACY_IP, TunnelProtocol::None))
            .add_workload(workload("client", CLIENT_IP, TunnelProtocol::Hbone))
            .build()
            .unwrap()
    }

    /// Starts an HBONE acceptor with the inbound service inside, listening on `ip` (the address tunnels
    /// to workloads at `ip` arrive on, as on a node whose proxy receives traffic for its pods' IPs).
    async fn acceptor_on(&self, ip: &str) -> SocketAddr {
        let server_tls = tls::server_config(
            self.pki.cert("default", "server"),
            vec![self.pki.trust_domain().clone()],
        )
        .unwrap();
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = HboneAcceptor::new(HboneConfig::default(), server_tls, self.inbound.clone());
        tokio::spawn(acceptor.serve(listener, self.drain.clone()));
        addr
    }

    fn client_id(&self) -> SpiffeId {
        self.pki.id("default", "client")
    }

    fn server_id(&self) -> SpiffeId {
        self.pki.id("default", "server")
    }

    /// Opens a tunnel to `target` through an acceptor on the target's IP.
    async fn connect(&self, target: SocketAddr) -> Result<HboneStream, HboneError> {
        self.connect_as(&self.connector, self.client_id(), target).await
    }

    /// Opens a tunnel as `source`, whose certificate `connector` holds.
    async fn connect_as(
        &self,
        connector: &HboneConnector,
        source: SpiffeId,
        target: SocketAddr,
    ) -> Result<HboneStream, HboneError> {
        let gateway = self.acceptor_on(&target.ip().to_string()).await;
        let request = ConnectRequest::new(source, gateway, vec![self.server_id()], target.to_string());
        within("the CONNECT", connector.connect(request)).await
    }

    fn server_app(&self) -> SocketAddr {
        SocketAddr::new(SERVER_IP.parse().unwrap(), self.app_port)
    }

    fn set_policies(&self, policies: Vec<L4Policy>) {
        self.policies.send_replace(Arc::new(L4PolicySet::new(policies)));
    }

    async fn next_event(&mut self) -> Event {
        within("an observer event", self.events.recv())
            .await
            .expect("observers alive")
    }

    /// Waits for the next connection to open and close, and returns its record and outcome.
    async fn opened_then_closed(&mut self) -> (Arc<ConnectionRecord>, ConnectionOutcome) {
        let Event::Opened(opened) = self.next_event().await else {
            panic!("expected an opened event first")
        };
        let Event::Closed(closed, outcome) = self.next_event().await else {
            panic!("expected a closed event")
        };
        assert!(
            Arc::ptr_eq(&opened, &closed),
            "opened and closed describe the same connection"
        );
        (closed, outcome)
    }
}

/// An echo server on `ip`; returns its port.
async fn spawn_echo(ip: &str) -> u16 {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    port
}

/// DENY, in `default`, for the client's identity.
fn deny_client() -> L4Policy {
    L4Policy {
        name: "deny-client".into(),
        namespace: "default".into(),
        scope: L4Scope::Namespace,
        action: L4Action::Deny,
        dry_run: false,
        rules: vec![L4Rule {
            clauses: vec![L4Clause {
                matches: vec![L4Match {
                    principals: vec![StringMatch::Exact("cluster.local/ns/default/sa/client".into())],
                    ..L4Match::default()
                }],
            }],
        }],
    }
}

/// What istiod sends for a STRICT PeerAuthentication: DENY anything without a peer identity.
fn strict_mtls() -> L4Policy {
    L4Policy {
        name: "istio_converted_static_strict".into(),
        namespace: "default".into(),
        scope: L4Scope::Namespace,
        action: L4Action::Deny,
        dry_run: false,
        rules: vec![L4Rule {
            clauses: vec![L4Clause {
                matches: vec![L4Match {
                    not_principals: vec![StringMatch::Presence],
                    ..L4Match::default()
                }],
            }],
        }],
    }
}

/// Reads until EOF or an error (a reset tunnel), returning what arrived and whether it ended cleanly.
async fn read_until_closed(stream: &mut HboneStream) -> (Vec<u8>, bool) {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match within("the client's read", stream.read(&mut buf)).await {
            Ok(0) => return (received, true),
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(_) => return (received, false),
        }
    }
}

#[tokio::test]
async fn allowed_tunnel_echoes_and_reports_the_connection() {
    let mut node = Node::start(Upstream::Echo).await;
    let stream = node.connect(node.server_app()).await.unwrap();

    let baggage = Baggage::from_headers(stream.headers());
    assert_eq!(baggage.namespace.as_deref(), Some("default"));
    assert_eq!(baggage.workload_kind.as_deref(), Some("deployment"));
    assert_eq!(baggage.workload_name.as_deref(), Some("server"));
    assert_eq!(baggage.service_name.as_deref(), Some("server"));

    let request: Vec<u8> = (0..65_536u32).map(|i| (i % 251) as u8).collect();
    let (mut read, mut write) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        write.write_all(&request).await.unwrap();
        write.shutdown().await.unwrap();
        request
    });
    let mut echoed = Vec::new();
    within("the echo", read.read_to_end(&mut echoed)).await.unwrap();
    let request = within("the writer", writer).await.unwrap();
    assert_eq!(echoed, request, "every byte comes back in order");

    let (record, outcome) = node.opened_then_closed().await;
    assert_eq!(outcome.flag, ResponseFlag::None);
    assert_eq!(outcome.error, None);
    assert_eq!(outcome.decision.as_deref(), Some("allowed: no policy applies"));
    assert_eq!(record.sent(), 65_536);
    assert_eq!(record.received(), 65_536);
    assert_eq!(record.reporter, Reporter::Destination);
    assert_eq!(record.security, SecurityPolicy::MutualTls);
    assert_eq!(record.source_identity.as_ref(), Some(&node.client_id()));
    assert_eq!(record.destination_identity.as_ref(), Some(&node.server_id()));
    assert_eq!(record.destination_addr, node.server_app());
    assert_eq!(record.upstream_addr, Some(node.server_app()));
    assert_eq!(
        record.destination_workload.as_ref().map(|w| &*w.uid),
        Some("cluster1//v1/Pod/default/server")
    );
    assert_eq!(
        record.destination_service.as_ref().map(|s| &*s.hostname),
        Some("echo.default.svc.cluster.local"),
        "the service whose target port was connected to"
    );
    assert_eq!(record.source_addr.ip(), CLIENT_IP.parse::<IpAddr>().unwrap());
    assert_eq!(
        record.source_workload.as_ref().map(|w| &*w.name),
        Some("client"),
        "the source workload is found by the peer's address"
    );
    assert!(node.tracker.is_empty(), "a closed connection is deregistered");
}

#[tokio::test]
async fn denied_tunnel_gets_401_and_the_observer_sees_deny() {
    let mut node = Node::start(Upstream::Echo).await;
    node.set_policies(vec![deny_client()]);
    let refused = node.connect(node.server_app()).await;
    assert!(
        matches!(refused, Err(HboneError::Status(http::StatusCode::UNAUTHORIZED))),
        "{refused:?}"
    );
    let (record, outcome) = node.opened_then_closed().await;
    assert_eq!(outcome.flag, ResponseFlag::Deny);
    assert_eq!(
        outcome.decision.as_deref(),
        Some("denied by default/deny-client rule 0")
    );
    assert_eq!(record.sent() + record.received(), 0);
    assert!(node.tracker.is_empty());
}

#[tokio::test]
async fn destinations_this_proxy_cannot_deliver_to_get_400() {
    let mut node = Node::start(Upstream::Echo).await;
    // No workload has this address.
    let unknown = node.connect(format!("{NOBODY_IP}:8080").parse().unwrap()).await;
    assert!(
        matches!(unknown, Err(HboneError::Status(http::StatusCode::BAD_REQUEST))),
        "{unknown:?}"
    );
    // A workload outside the mesh (tunnel protocol NONE) is not tunnelled to.
    let legacy = node.connect(format!("{LEGACY_IP}:8080").parse().unwrap()).await;
    assert!(
        matches!(legacy, Err(HboneError::Status(http::StatusCode::BAD_REQUEST))),
        "{legacy:?}"
    );
    // Refusals without a destination are logged, not counted: the observers heard nothing.
    assert!(node.events.try_recv().is_err());
}

#[tokio::test]
async fn workloads_on_other_nodes_are_not_served() {
    let mut node = Node::start(Upstream::Echo).await;
    let mut snapshot = MeshSnapshot::builder();
    snapshot.add_workload(Workload {
        node: "node2".into(),
        ..workload("server", SERVER_IP, TunnelProtocol::Hbone)
    });
    node.snapshots.publish(snapshot.build().unwrap());
    let refused = node.connect(node.server_app()).await;
    assert!(
        matches!(refused, Err(HboneError::Status(http::StatusCode::BAD_REQUEST))),
        "{refused:?}"
    );
    assert!(node.events.try_recv().is_err());
}

#[tokio::test]
async fn refused_upstream_gets_503_with_connect_flag() {
    let mut node = Node::start(Upstream::Refusing).await;
    let refused = node.connect(node.server_app()).await;
    assert!(
        matches!(
            refused,
            Err(HboneError::Status(http::StatusCode::SERVICE_UNAVAILABLE))
        ),
        "{refused:?}"
    );
    let (_record, outcome) = node.opened_then_closed().await;
    assert_eq!(outcome.flag, ResponseFlag::Connect);
    assert!(
        outcome.error.as_deref().unwrap().starts_with("connecting to"),
        "{outcome:?}"
    );
    assert!(node.tracker.is_empty());
}

#[tokio::test]
async fn policy_change_closes_an_open_connection() {
    let mut node = Node::start(Upstream::Echo).await;
    let mut stream = node.connect(node.server_app()).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut reply = [0u8; 4];
    within("the first echo", stream.read_exact(&mut reply))
        .await
        .unwrap();
    assert_eq!(&reply, b"ping");
    let Event::Opened(_) = node.next_event().await else {
        panic!("expected the connection to be open")
    };
    assert_eq!(node.tracker.len(), 1);

    node.set_policies(vec![deny_client()]);
    let (rest, _clean) = read_until_closed(&mut stream).await;
    assert!(
        rest.is_empty(),
        "nothing more arrives once the connection is closed"
    );

    let Event::Closed(record, outcome) = node.next_event().await else {
        panic!("expected the connection to close")
    };
    assert_eq!(outcome.flag, ResponseFlag::Deny);
    assert_eq!(
        outcome.decision.as_deref(),
        Some("denied by default/deny-client rule 0")
    );
    assert_eq!(record.sent(), 4);
    assert_eq!(record.received(), 4);
    assert!(node.tracker.is_empty());
}

#[tokio::test]
async fn removing_the_workload_closes_its_connections() {
    let mut node = Node::start(Upstream::Echo).await;
    let mut stream = node.connect(node.server_app()).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut reply = [0u8; 4];
    within("the first echo", stream.read_exact(&mut reply))
        .await
        .unwrap();
    let Event::Opened(_) = node.next_event().await else {
        panic!("expected the connection to be open")
    };

    node.snapshots.publish(Node::snapshot(false, node.app_port));
    let (rest, _clean) = read_until_closed(&mut stream).await;
    assert!(rest.is_empty());
    let Event::Closed(_, outcome) = node.next_event().await else {
        panic!("expected the connection to close")
    };
    assert_eq!(outcome.flag, ResponseFlag::Deny);
    assert_eq!(
        outcome.decision.as_deref(),
        Some("destination workload \"cluster1//v1/Pod/default/server\" was removed")
    );
}

#[tokio::test]
async fn half_close_passes_through_the_tunnel_both_ways() {
    // The workload half-closes first, then keeps reading; it reports what it read after its FIN.
    let listener = TcpListener::bind((SERVER_IP, 0)).await.unwrap();
    let app_port = listener.local_addr().unwrap().port();
    let (report, reported) = oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        stream.write_all(b"hello").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut after = Vec::new();
        stream.read_to_end(&mut after).await.unwrap();
        let _ = report.send(after);
    });
    let mut node = Node::with_port(app_port, WaypointEnforcement::Policy).await;
    let mut stream = node.connect(node.server_app()).await.unwrap();

    // Server -> client FIN: the client reads to EOF while its own direction stays open.
    let mut greeting = Vec::new();
    within("the server's bytes and FIN", stream.read_to_end(&mut greeting))
        .await
        .unwrap();
    assert_eq!(greeting, b"hello");
    // Client -> server: bytes after the server's FIN still arrive, then the client's FIN ends the read.
    stream.write_all(b"after your FIN").await.unwrap();
    stream.shutdown().await.unwrap();
    assert_eq!(
        within("the server's report", reported).await.unwrap(),
        b"after your FIN"
    );

    let (record, outcome) = node.opened_then_closed().await;
    assert_eq!(outcome.flag, ResponseFlag::None);
    assert_eq!(record.received(), 5);
    assert_eq!(record.sent(), 14);
}

/// A plaintext client connected to a stand-in for the 15006 listener, and the connection as that
/// listener would hand it over.
async fn plaintext_pair(original_dst: SocketAddr) -> (TcpStream, PlaintextConnection) {
    let listener = TcpListener::bind((CLIENT_IP, 0)).await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (stream, peer_addr) = listener.accept().await.unwrap();
    (
        client,
        PlaintextConnection {
            stream,
            peer_addr,
            original_dst,
        },
    )
}

#[tokio::test]
async fn plaintext_is_forwarded_without_identity() {
    let mut node = Node::start(Upstream::Echo).await;
    let (mut client, connection) = plaintext_pair(node.server_app()).await;
    let serving = tokio::spawn(tower::ServiceExt::oneshot(node.inbound.plaintext(), connection));
    client.write_all(b"plain bytes").await.unwrap();
    client.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    within("the echo", client.read_to_end(&mut echoed)).await.unwrap();
    assert_eq!(echoed, b"plain bytes");
    within("the service", serving).await.unwrap().unwrap();

    let (record, outcome) = node.opened_then_closed().await;
    assert_eq!(outcome.flag, ResponseFlag::None);
    assert_eq!(record.security, SecurityPolicy::Unknown);
    assert_eq!(record.source_identity, None);
    assert_eq!(record.destination_addr, node.server_app());
    assert_eq!(record.sent(), 11);
    assert_eq!(record.received(), 11);
}

#[tokio::test]
async fn plaintext_is_denied_under_strict_mtls() {
    let mut node = Node::start(Upstream::Echo).await;
    node.set_policies(vec![strict_mtls()]);
    let (mut client, connection) = plaintext_pair(node.server_app()).await;
    let served = within(
        "the service",
        node.inbound.plaintext().serve_connection(connection),
    )
    .await;
    match served {
        Err(ProxyError::Denied { evaluation }) => {
            assert_eq!(
                evaluation.to_string(),
                "denied by default/istio_converted_static_strict rule 0"
            )
        }
        other => panic!("expected a denial, got {other:?}"),
    }
    // The client's connection is closed without a byte.
    let mut rest = Vec::new();
    let read = within("the client's read", client.read_to_end(&mut rest)).await;
    assert!(read.is_err() || rest.is_empty(), "{read:?} {rest:?}");

    let (_record, outcome) = node.opened_then_closed().await;
    assert_eq!(outcome.flag, ResponseFlag::Deny);
    // The same policy lets HBONE through: the peer has an identity.
    let stream = node.connect(node.server_app()).await;
    assert!(stream.is_ok(), "{stream:?}");
}

#[tokio::test]
async fn required_waypoint_admits_only_the_waypoint() {
    let app_port = spawn_echo(SERVER_IP).await;
    let mut node = Node::with_port(app_port, WaypointEnforcement::RequireWaypoint).await;
    // The workload at the client's address is now the server's waypoint, with its own identity.
    let mut snapshot = MeshSnapshot::builder();
    snapshot
        .add_workload(Workload {
            waypoint: Some(GatewayAddress::address(format!("/{CLIENT_IP}").parse().unwrap())),
            ..workload("server", SERVER_IP, TunnelProtocol::Hbone)
        })
        .add_workload(workload("waypoint", CLIENT_IP, TunnelProtocol::Hbone));
    node.snapshots.publish(snapshot.build().unwrap());

    // Right address, wrong identity: refused as a bypass.
    let bypass = node.connect(node.server_app()).await;
    assert!(
        matches!(bypass, Err(HboneError::Status(http::StatusCode::UNAUTHORIZED))),
        "{bypass:?}"
    );
    let (_record, outcome) = node.opened_then_closed().await;
    assert_eq!(outcome.flag, ResponseFlag::Deny);
    assert!(
        outcome.error.as_deref().unwrap().contains("through its waypoint"),
        "{outcome:?}"
    );

    // The waypoint itself gets through.
    let mut certs = StaticCertProvider::new();
    let waypoint_id = node.pki.id("default", "waypoint");
    certs.insert(node.pki.ca().issue(&waypoint_id, TEST_CERT_LIFETIME).unwrap());
    let waypoint = HboneConnector::new(HboneConfig::default(), Arc::new(certs));
    let mut stream = node
        .connect_as(&waypoint, waypoint_id, node.server_app())
        .await
        .unwrap();
    stream.write_all(b"via waypoint").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    within("the echo", stream.read_to_end(&mut echoed)).await.unwrap();
    assert_eq!(echoed, b"via waypoint");
}

#[tokio::test]
async fn a_tunnel_reset_reaches_the_workload_as_a_tcp_reset_not_a_fin() {
    // The workload reads until its connection ends and reports how: a clean EOF or an error.
    let listener = TcpListener::bind((SERVER_IP, 0)).await.unwrap();
    let app_port = listener.local_addr().unwrap().port();
    let (report, reported) = oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let mut total = 0;
        let ending = loop {
            match stream.read(&mut buf).await {
                Ok(0) => break Ok(total),
                Ok(n) => total += n,
                Err(error) => break Err(error.kind()),
            }
        };
        let _ = report.send(ending);
    });
    let mut node = Node::with_port(app_port, WaypointEnforcement::Policy).await;
    let mut stream = node.connect(node.server_app()).await.unwrap();
    stream.write_all(b"partial request").await.unwrap();
    // Let the bytes through before the abort, so the reset is not a refused CONNECT.
    let Event::Opened(record) = node.next_event().await else {
        panic!("expected an opened event first")
    };
    within("the bytes reaching the workload", async {
        while record.sent() < 15 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    stream.reset();
    drop(stream);
    assert_eq!(
        within("the workload's report", reported).await.unwrap(),
        Err(std::io::ErrorKind::ConnectionReset),
        "an aborted tunnel must abort the workload's connection, not end it cleanly"
    );
}
