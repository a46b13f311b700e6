//! Per-connection server certificates over real loopback TCP and TLS: one acceptor serving two workloads
//! on two local IPs (127.0.0.2 and 127.0.0.3) presents each one's identity on its own IP only; an IP with
//! no workload, or whose certificate cannot be had, is refused before TLS; a replaced or rotated
//! certificate is what new connections see; and selection counts against the handshake timeout.

#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use http::HeaderMap;
use mesh_core::cert::StaticCertProvider;
use mesh_core::drain::{self, DrainTrigger};
use mesh_core::{CertProvider, CertWatch, SpiffeId, WorkloadCert, tls};
use mesh_hbone::{
    ConnectRequest, HboneAcceptor, HboneConfig, HboneConnector, HboneError, HboneStream, InboundTunnel,
    ServerConfigSelector, WorkloadConfigSelector,
};
use mesh_test::{TEST_CERT_LIFETIME, TestPki};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tower::service_fn;

/// Bounds every network wait, so a broken build fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(10);

const WORKLOAD_A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const WORKLOAD_B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
/// A workload whose certificate the provider cannot give.
const WORKLOAD_C: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4));
/// An address of the node with no workload.
const NOBODY: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A certificate provider whose certificates the test can replace, like a caching provider that forgot
/// an identity and fetched it anew.
#[derive(Debug, Default)]
struct SwappableCerts {
    certs: Mutex<HashMap<SpiffeId, CertWatch>>,
}

impl SwappableCerts {
    fn set(&self, watch: CertWatch) {
        self.certs.lock().unwrap().insert(watch.identity(), watch);
    }
}

impl CertProvider for SwappableCerts {
    fn certificate<'a>(
        &'a self,
        identity: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<CertWatch, mesh_core::Error>> {
        let found =
            self.certs
                .lock()
                .unwrap()
                .get(identity)
                .cloned()
                .ok_or_else(|| mesh_core::Error::Signing {
                    identity: identity.clone(),
                    reason: "not issued in this test".to_owned(),
                });
        Box::pin(std::future::ready(found))
    }
}

/// One node proxy's acceptor on `0.0.0.0`, serving workloads A (127.0.0.2) and B (127.0.0.3); each
/// connection's outcome is reported with the local address it arrived on.
struct Node {
    pki: TestPki,
    port: u16,
    certs: Arc<SwappableCerts>,
    selector: Arc<WorkloadConfigSelector>,
    outcomes: mpsc::UnboundedReceiver<(SocketAddr, Result<(), HboneError>)>,
    _trigger: DrainTrigger,
}

impl Node {
    async fn start() -> Node {
        let pki = TestPki::new();
        let certs = Arc::new(SwappableCerts::default());
        certs.set(pki.cert("a", "server-a"));
        certs.set(pki.cert("b", "server-b"));
        let (a, b, c) = (
            pki.id("a", "server-a"),
            pki.id("b", "server-b"),
            pki.id("c", "server-c"),
        );
        let identity_of = move |local: SocketAddr| match local.ip() {
            WORKLOAD_A => Some(a.clone()),
            WORKLOAD_B => Some(b.clone()),
            WORKLOAD_C => Some(c.clone()),
            _ => None,
        };
        let selector = Arc::new(WorkloadConfigSelector::new(
            identity_of,
            certs.clone(),
            vec![pki.trust_domain().clone()],
        ));
        let acceptor = Arc::new(HboneAcceptor::with_selector(
            HboneConfig::default(),
            selector.clone(),
            service_fn(echo),
        ));
        let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (trigger, drain) = drain::channel();
        let (report, outcomes) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let local = tcp.local_addr().unwrap();
                let (acceptor, drain, report) = (acceptor.clone(), drain.clone(), report.clone());
                tokio::spawn(async move {
                    let _ = report.send((local, acceptor.serve_connection(tcp, drain).await));
                });
            }
        });
        Node {
            pki,
            port,
            certs,
            selector,
            outcomes,
            _trigger: trigger,
        }
    }

    fn addr(&self, ip: IpAddr) -> SocketAddr {
        SocketAddr::new(ip, self.port)
    }

    fn client_cert(&self) -> CertWatch {
        self.pki.cert("default", "client")
    }

    /// The server's outcome for the next connection that arrived on `ip`.
    async fn outcome_on(&mut self, ip: IpAddr) -> Result<(), HboneError> {
        let wait = async {
            loop {
                let (local, outcome) = self.outcomes.recv().await.unwrap();
                if local.ip() == ip {
                    return outcome;
                }
            }
        };
        tokio::time::timeout(LIMIT, wait).await.unwrap()
    }
}

async fn echo(tunnel: InboundTunnel) -> Result<(), Infallible> {
    if let Ok(stream) = tunnel.accept(HeaderMap::new()) {
        let (mut read, mut write) = tokio::io::split(stream);
        let _ = tokio::io::copy(&mut read, &mut write).await;
        let _ = write.shutdown().await;
    }
    Ok(())
}

fn connector(node: &Node) -> HboneConnector {
    let mut certs = StaticCertProvider::new();
    certs.insert(
        node.pki
            .ca()
            .issue(&node.pki.id("default", "client"), TEST_CERT_LIFETIME)
            .unwrap(),
    );
    HboneConnector::new(HboneConfig::default(), Arc::new(certs))
}

async fn tunnel(
    connector: &HboneConnector,
    node: &Node,
    ip: IpAddr,
    expected: &SpiffeId,
) -> Result<HboneStream, HboneError> {
    let request = ConnectRequest::new(
        node.pki.id("default", "client"),
        node.addr(ip),
        vec![expected.clone()],
        format!("{ip}:8080"),
    );
    tokio::time::timeout(LIMIT, connector.connect(request))
        .await
        .unwrap()
}

fn assert_identity_refused(result: Result<HboneStream, HboneError>) {
    match result {
        Err(HboneError::Tls { source, .. }) => {
            let rustls_error = source
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>())
                .unwrap();
            assert!(
                matches!(
                    tls::identity_error(rustls_error),
                    Some(mesh_core::Error::UnexpectedIdentity { .. })
                ),
                "{rustls_error:?}"
            );
        }
        other => panic!("expected a TLS identity failure, got {other:?}"),
    }
}

/// Connects without TLS, sends nothing, and returns what the server sent before closing.
async fn bytes_before_close(addr: SocketAddr) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut received = Vec::new();
    // A reset instead of a clean close also means the server sent nothing more.
    let _ = tokio::time::timeout(LIMIT, tcp.read_to_end(&mut received))
        .await
        .expect("the server must close the connection, not wait for a handshake");
    received
}

/// The leaf certificate the server presents on `addr` to a client expecting `expected`.
async fn presented_leaf(node: &Node, ip: IpAddr, expected: SpiffeId) -> CertificateDer<'static> {
    let config = tls::client_config(node.client_cert(), vec![expected]).unwrap();
    let tcp = TcpStream::connect(node.addr(ip)).await.unwrap();
    let stream = tokio::time::timeout(
        LIMIT,
        tokio_rustls::TlsConnector::from(config).connect(tls::server_name(), tcp),
    )
    .await
    .unwrap()
    .unwrap();
    stream.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

fn leaf(cert: &WorkloadCert) -> CertificateDer<'static> {
    cert.chain()[0].clone()
}

#[tokio::test]
async fn each_workload_address_presents_its_own_identity_and_no_other() {
    let node = Node::start().await;
    let (a, b) = (node.pki.id("a", "server-a"), node.pki.id("b", "server-b"));
    let connector = connector(&node);

    for (ip, identity) in [(WORKLOAD_A, &a), (WORKLOAD_B, &b)] {
        let mut stream = tunnel(&connector, &node, ip, identity).await.unwrap();
        assert_eq!(stream.peer_identity(), identity);
        stream.write_all(identity.as_str().as_bytes()).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut echoed = Vec::new();
        tokio::time::timeout(LIMIT, stream.read_to_end(&mut echoed))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(echoed, identity.as_str().as_bytes());
    }
    // Each workload's certificate is refused by a client that expects the other one.
    assert_identity_refused(tunnel(&connector, &node, WORKLOAD_B, &a).await);
    assert_identity_refused(tunnel(&connector, &node, WORKLOAD_A, &b).await);
    assert_eq!(
        node.selector.cached(),
        2,
        "one configuration per identity, reused"
    );
}

#[tokio::test]
async fn an_address_without_a_workload_or_a_certificate_is_refused_before_tls() {
    let mut node = Node::start().await;

    let received = bytes_before_close(node.addr(NOBODY)).await;
    assert!(received.is_empty(), "no TLS record may be sent: {received:?}");
    match node.outcome_on(NOBODY).await {
        Err(HboneError::NoLocalIdentity { local }) => assert_eq!(local, node.addr(NOBODY)),
        other => panic!("expected NoLocalIdentity, got {other:?}"),
    }

    // A workload whose certificate cannot be fetched: refused the same way, naming the identity.
    let received = bytes_before_close(node.addr(WORKLOAD_C)).await;
    assert!(received.is_empty(), "no TLS record may be sent: {received:?}");
    match node.outcome_on(WORKLOAD_C).await {
        Err(HboneError::ServerCertificate {
            local,
            identity,
            source,
        }) => {
            assert_eq!(local, node.addr(WORKLOAD_C));
            assert_eq!(identity, node.pki.id("c", "server-c"));
            assert!(matches!(*source, mesh_core::Error::Signing { .. }), "{source:?}");
        }
        other => panic!("expected ServerCertificate, got {other:?}"),
    }

    // A real client gets a failed handshake, not a tunnel.
    let connector = connector(&node);
    let a = node.pki.id("a", "server-a");
    assert!(matches!(
        tunnel(&connector, &node, NOBODY, &a).await,
        Err(HboneError::Tls { .. })
    ));
    assert_eq!(node.selector.cached(), 0);
}

#[tokio::test]
async fn new_connections_present_a_replaced_or_rotated_certificate() {
    let node = Node::start().await;
    let (a, b) = (node.pki.id("a", "server-a"), node.pki.id("b", "server-b"));
    let issue = |id: &SpiffeId| node.pki.ca().issue(id, TEST_CERT_LIFETIME).unwrap();

    // Replaced: the provider hands out a new watch for A (it forgot A and fetched it again).
    let first = issue(&a);
    let first_leaf = leaf(&first);
    node.certs.set(CertWatch::fixed(first));
    assert_eq!(presented_leaf(&node, WORKLOAD_A, a.clone()).await, first_leaf);
    let second = issue(&a);
    let second_leaf = leaf(&second);
    node.certs.set(CertWatch::fixed(second));
    assert_eq!(presented_leaf(&node, WORKLOAD_A, a.clone()).await, second_leaf);

    // Rotated: the same watch for B gets a new certificate.
    let old = issue(&b);
    let old_leaf = leaf(&old);
    let (rotate, watch) = tokio::sync::watch::channel(Arc::new(old));
    node.certs.set(CertWatch::from_receiver(watch));
    assert_eq!(presented_leaf(&node, WORKLOAD_B, b.clone()).await, old_leaf);
    let new = issue(&b);
    let new_leaf = leaf(&new);
    rotate.send_replace(Arc::new(new));
    assert_eq!(presented_leaf(&node, WORKLOAD_B, b.clone()).await, new_leaf);
    assert_ne!(old_leaf, new_leaf);
    assert_eq!(node.selector.cached(), 2);
}

/// A selector whose CA never answers.
#[derive(Debug)]
struct Stalled;

impl ServerConfigSelector for Stalled {
    fn select(&self, _local: SocketAddr) -> BoxFuture<'_, Result<Arc<rustls::ServerConfig>, HboneError>> {
        Box::pin(std::future::pending())
    }
}

#[tokio::test]
async fn selection_counts_against_the_handshake_timeout() {
    let config = HboneConfig {
        handshake_timeout: Duration::from_millis(200),
        ..HboneConfig::default()
    };
    let acceptor = HboneAcceptor::with_selector(config, Arc::new(Stalled), service_fn(echo));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_trigger, drain) = drain::channel();
    let client = tokio::spawn(bytes_before_close(addr));
    let (tcp, _) = listener.accept().await.unwrap();
    let outcome = tokio::time::timeout(LIMIT, acceptor.serve_connection(tcp, drain))
        .await
        .unwrap();
    match outcome {
        Err(HboneError::Timeout { step, .. }) => assert_eq!(step, "server certificate selection"),
        other => panic!("expected the handshake timeout, got {other:?}"),
    }
    assert!(client.await.unwrap().is_empty());
}
