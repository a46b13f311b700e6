//! The SPIFFE Workload API certificate provider against a fake SPIRE agent: a tonic server implementing the
//! generated `SpiffeWorkloadAPI` service on a real Unix domain socket, issuing SVIDs from a development CA.
//!
//! Each agent runs in its own tokio runtime, so that stopping it (shutting that runtime down) closes its
//! listener and every connection at once, as an agent process exiting would.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use futures_util::Stream;
use hyper_util::rt::TokioIo;
use mesh_core::ca::LeafSpec;
use mesh_core::{CertProvider, CertWatch, Error, SpiffeId, tls};
use mesh_test::TestPki;
use mesh_xds::client::Backoff;
use mesh_xds::proto::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use mesh_xds::proto::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use mesh_xds::proto::{X509svid, X509svidRequest, X509svidResponse};
use mesh_xds::spiffe::{SECURITY_HEADER, WorkloadApiCertProvider, WorkloadApiConfig};
use rustls_pki_types::CertificateDer;
use tokio::net::{UnixListener, UnixStream};
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tonic::{Code, Request, Response, Status};

/// Every await on the network is bounded by this, so a broken test fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(20);

async fn bounded<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(LIMIT, future)
        .await
        .expect("the test's time limit passed")
}

// ---------------------------------------------------------------------------------------------------------
// The fake agent.

/// What the fake agent does with a call that carries the security header.
#[derive(Clone)]
enum Behaviour {
    /// Streams the current response, then every new one.
    Serve,
    /// Refuses the call with this code.
    Refuse(Code),
}

struct FakeAgent {
    updates: watch::Receiver<X509svidResponse>,
    behaviour: Behaviour,
    /// Calls accepted (they carried `workload.spiffe.io: true`).
    accepted: Arc<AtomicUsize>,
    /// Calls refused for lack of the header.
    refused: Arc<AtomicUsize>,
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<X509svidResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SpiffeWorkloadApi for FakeAgent {
    type FetchX509SVIDStream = ResponseStream;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<ResponseStream>, Status> {
        // The SPIFFE Workload Endpoint specification: the header is mandatory (exactly `true`), and a
        // request without it is refused with InvalidArgument.
        let header = request.metadata().get(SECURITY_HEADER).map(|v| v.as_bytes());
        if header != Some(b"true".as_slice()) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(Status::invalid_argument("security header missing from request"));
        }
        self.accepted.fetch_add(1, Ordering::SeqCst);
        if let Behaviour::Refuse(code) = self.behaviour {
            return Err(Status::new(code, "refused by the test agent"));
        }
        let stream =
            futures_util::stream::unfold((self.updates.clone(), true), |(mut rx, first)| async move {
                if !first {
                    rx.changed().await.ok()?;
                }
                let response = rx.borrow_and_update().clone();
                Some((Ok(response), (rx, false)))
            });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// A fake agent serving on a Unix socket from its own runtime.
struct Agent {
    runtime: Option<Runtime>,
    updates: watch::Sender<X509svidResponse>,
    accepted: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
}

impl Agent {
    fn start(path: &Path, first: X509svidResponse) -> Agent {
        Self::start_with(path, first, Behaviour::Serve)
    }

    fn start_with(path: &Path, first: X509svidResponse, behaviour: Behaviour) -> Agent {
        // A previous agent's socket file stays behind, as it does when a real agent dies.
        let _ = std::fs::remove_file(path);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (updates, rx) = watch::channel(first);
        let accepted = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let service = SpiffeWorkloadApiServer::new(FakeAgent {
            updates: rx,
            behaviour,
            accepted: accepted.clone(),
            refused: refused.clone(),
        });
        let listener = {
            let _entered = runtime.enter();
            UnixListener::bind(path).unwrap()
        };
        let incoming = futures_util::stream::unfold(listener, |listener| async move {
            let accepted = listener.accept().await.map(|(stream, _)| stream);
            Some((accepted, listener))
        });
        runtime.spawn(tonic::transport::Server::builder().serve_with_incoming(service, incoming));
        Agent {
            runtime: Some(runtime),
            updates,
            accepted,
            refused,
        }
    }

    /// Sends a new complete response on every open stream (and to later callers).
    fn push(&self, response: X509svidResponse) {
        self.updates.send_replace(response);
    }

    /// Stops the agent: its listener and connections close at once.
    fn stop(mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A private directory for one test's socket, removed afterwards.
struct SocketDir(PathBuf);

impl SocketDir {
    fn new() -> SocketDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "meshkit-spiffe-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        SocketDir(dir)
    }

    fn socket(&self) -> PathBuf {
        self.0.join("agent.sock")
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------------------
// SVIDs.

/// A leaf for `uri` (valid from a minute ago for an hour) and its PKCS#8 key, signed by `pki`'s root.
fn leaf(pki: &TestPki, uri: &str) -> (Vec<CertificateDer<'static>>, Vec<u8>) {
    let now = SystemTime::now();
    leaf_valid(
        pki,
        uri,
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    )
}

fn leaf_valid(
    pki: &TestPki,
    uri: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> (Vec<CertificateDer<'static>>, Vec<u8>) {
    let spec = LeafSpec {
        uri_sans: vec![uri.to_owned()],
        not_before,
        not_after,
    };
    let (chain, key) = pki.ca().issue_raw(&spec).unwrap();
    (chain, key.secret_der().to_vec())
}

fn concat(certs: &[CertificateDer<'_>]) -> Vec<u8> {
    certs.iter().flat_map(|c| c.as_ref().iter().copied()).collect()
}

/// A good X509SVID entry for `identity` from `pki`, with `pki`'s root as the bundle.
fn svid(pki: &TestPki, identity: &SpiffeId) -> X509svid {
    let (chain, key) = leaf(pki, identity.as_str());
    entry(identity.as_str(), &chain, key, pki)
}

fn entry(spiffe_id: &str, chain: &[CertificateDer<'_>], key: Vec<u8>, bundle_of: &TestPki) -> X509svid {
    X509svid {
        spiffe_id: spiffe_id.to_owned(),
        x509_svid: concat(chain).into(),
        x509_svid_key: key.into(),
        bundle: bundle_of.ca().root_cert().to_vec().into(),
        hint: String::new(),
    }
}

fn response(svids: Vec<X509svid>) -> X509svidResponse {
    X509svidResponse {
        svids,
        ..Default::default()
    }
}

/// Settings for tests: quick reconnects, and a first-response wait well inside the test's limit.
fn config(path: &Path) -> WorkloadApiConfig {
    WorkloadApiConfig::new(path).with_backoff(Backoff {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(200),
    })
}

fn leaf_of(watch: &CertWatch) -> CertificateDer<'static> {
    watch.current().chain()[0].clone()
}

/// The `Signing` reason of a refused request, checking it names the identity asked for.
fn signing_reason(result: Result<CertWatch, Error>, identity: &SpiffeId) -> String {
    match result {
        Err(Error::Signing {
            identity: named,
            reason,
        }) => {
            assert_eq!(&named, identity);
            reason
        }
        other => panic!("expected a Signing error for {identity}, got {other:?}"),
    }
}

/// Waits (bounded) until the provider issues `identity`: for updates after the first response, which
/// `certificate` does not wait for.
async fn until_issued(provider: &WorkloadApiCertProvider, identity: &SpiffeId) -> CertWatch {
    for _ in 0..1000 {
        if provider.identities().contains(identity) {
            return bounded(provider.certificate(identity)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the provider never issued {identity}");
}

// ---------------------------------------------------------------------------------------------------------
// Tests.

#[tokio::test]
async fn first_certificates_work_for_mutual_tls() {
    let pki = TestPki::new();
    let dir = SocketDir::new();
    let client_id = pki.id("default", "client");
    let server_id = pki.id("default", "server");
    let _agent = Agent::start(
        &dir.socket(),
        response(vec![svid(&pki, &client_id), svid(&pki, &server_id)]),
    );
    let provider = WorkloadApiCertProvider::new(config(&dir.socket())).unwrap();

    let client = bounded(provider.certificate(&client_id)).await.unwrap();
    let server = bounded(provider.certificate(&server_id)).await.unwrap();
    assert!(provider.is_ready());
    assert_eq!(provider.identities(), {
        let mut both = vec![client_id.clone(), server_id.clone()];
        both.sort();
        both
    });
    assert_eq!(client.identity(), client_id);
    assert_eq!(client.current().roots(), [pki.ca().root_cert().clone()]);

    let pair = bounded(mesh_test::tls_pair(client, vec![server_id.clone()], server))
        .await
        .unwrap();
    assert_eq!(tls::peer_identity(pair.server.get_ref().1).unwrap(), client_id);
    assert_eq!(tls::peer_identity(pair.client.get_ref().1).unwrap(), server_id);
}

#[tokio::test]
async fn a_rotated_svid_updates_the_watch() {
    let pki = TestPki::new();
    let dir = SocketDir::new();
    let me = pki.id("default", "rotating");
    let agent = Agent::start(&dir.socket(), response(vec![svid(&pki, &me)]));
    let provider = WorkloadApiCertProvider::new(config(&dir.socket())).unwrap();
    let mut watch = bounded(provider.certificate(&me)).await.unwrap();
    let first = leaf_of(&watch);

    let (chain, key) = leaf(&pki, me.as_str());
    agent.push(response(vec![entry(me.as_str(), &chain, key, &pki)]));

    let rotated = bounded(watch.changed()).await.expect("the watch stays open");
    assert_eq!(rotated.chain()[0], chain[0]);
    assert_ne!(rotated.chain()[0], first);
    // A new request gets the rotated certificate too, and it still works for TLS.
    let again = bounded(provider.certificate(&me)).await.unwrap();
    assert_eq!(leaf_of(&again), chain[0]);
    let pair = bounded(mesh_test::tls_pair(again.clone(), vec![me.clone()], again)).await;
    assert!(pair.is_ok(), "{pair:?}");
}

#[tokio::test]
async fn an_identity_the_agent_does_not_issue_is_a_typed_error() {
    let pki = TestPki::new();
    let dir = SocketDir::new();
    let issued = pki.id("default", "issued");
    let other = pki.id("default", "other");
    let _agent = Agent::start(&dir.socket(), response(vec![svid(&pki, &issued)]));
    let provider = WorkloadApiCertProvider::new(config(&dir.socket())).unwrap();

    let reason = signing_reason(bounded(provider.certificate(&other)).await, &other);
    assert!(reason.contains("does not issue this identity"), "{reason}");
    assert!(reason.contains(issued.as_str()), "{reason}");
    // The issued one is still there.
    assert!(bounded(provider.certificate(&issued)).await.is_ok());
}

#[tokio::test]
async fn the_security_header_is_required_and_always_sent() {
    let pki = TestPki::new();
    let dir = SocketDir::new();
    let me = pki.id("default", "header");
    let agent = Agent::start(&dir.socket(), response(vec![svid(&pki, &me)]));

    // A client that leaves the header out is refused as the specification says.
    let path = dir.socket();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .unwrap();
    let status = bounded(SpiffeWorkloadApiClient::new(channel).fetch_x509svid(X509svidRequest {}))
        .await
        .expect_err("a request without the header must be refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(agent.refused.load(Ordering::SeqCst), 1);
    assert_eq!(agent.accepted.load(Ordering::SeqCst), 0);

    // The provider's requests carry it.
    let provider = WorkloadApiCertProvider::new(config(&dir.socket())).unwrap();
    assert!(bounded(provider.certificate(&me)).await.is_ok());
    assert_eq!(agent.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(agent.refused.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_agent_restart_is_survived_with_the_last_certificate_then_followed() {
    let pki = TestPki::new();
    let dir = SocketDir::new();
    let me = pki.id("default", "restart");
    let agent = Agent::start(&dir.socket(), response(vec![svid(&pki, &me)]));
    let provider = WorkloadApiCertProvider::new(config(&dir.socket())).unwrap();
    let mut watch = bounded(provider.certificate(&me)).await.unwrap();
    let before = leaf_of(&watch);

    agent.stop();
    // While the agent is away, the last certificate is still served.
    let during = bounded(provider.certificate(&me)).await.unwrap();
    assert_eq!(leaf_of(&during), before);

    let (chain, key) = leaf(&pki, me.as_str());
    let restarted = Agent::start(
        &dir.socket(),
        response(vec![entry(me.as_str(), &chain, key, &pki)]),
    );
    let after = bounded(watch.changed()).await.expect("the watch stays open");
    assert_eq!(after.chain()[0], chain[0]);
    assert_ne!(after.chain()[0], before);
    assert!(restarted.accepted.load(Ordering::SeqCst) >= 1);
}

#[tokio::test]
async fn a_malformed_svid_is_skipped_while_a_good_one_applies() {
    let pki = TestPki::new();
    let foreign = TestPki::new();
    let dir = SocketDir::new();
    let good = pki.id("default", "good");
    let now = SystemTime::now();
    let ids: Vec<SpiffeId> = [
        "garbage",
        "wrong-id",
        "wrong-key",
        "foreign",
        "expired",
        "empty-bundle",
    ]
    .iter()
    .map(|sa| pki.id("default", sa))
    .collect();
    let (chain_x, key_x) = leaf(&pki, pki.id("default", "x").as_str());
    let (chain_k, _) = leaf(&pki, ids[2].as_str());
    let (chain_f, key_f) = leaf(&foreign, ids[3].as_str());
    let (chain_e, key_e) = leaf_valid(
        &pki,
        ids[4].as_str(),
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
    );
    let mut empty_bundle = svid(&pki, &ids[5]);
    empty_bundle.bundle = Default::default();
    let bad = vec![
        X509svid {
            spiffe_id: ids[0].as_str().to_owned(),
            x509_svid: b"not a certificate".to_vec().into(),
            x509_svid_key: b"not a key".to_vec().into(),
            bundle: pki.ca().root_cert().to_vec().into(),
            hint: String::new(),
        },
        // A certificate for another identity than the entry names.
        entry(ids[1].as_str(), &chain_x, key_x.clone(), &pki),
        // A key that belongs to another certificate.
        entry(ids[2].as_str(), &chain_k, key_x, &pki),
        // A certificate from another CA than the bundle's.
        entry(ids[3].as_str(), &chain_f, key_f, &pki),
        entry(ids[4].as_str(), &chain_e, key_e, &pki),
        empty_bundle,
        X509svid {
            spiffe_id: "not a spiffe id".to_owned(),
            ..svid(&pki, &good)
        },
    ];
    let mut svids = bad;
    svids.insert(3, svid(&pki, &good));
    let agent = Agent::start(&dir.socket(), response(svids));
    let provider = WorkloadApiCertProvider::new(config(&dir.socket())).unwrap();

    let watch = bounded(provider.certificate(&good)).await.unwrap();
    assert_eq!(provider.identities(), std::slice::from_ref(&good));
    for (identity, expected) in ids.iter().zip([
        "x509_svid: certificate 0",
        "the certificate is for spiffe://cluster.local/ns/default/sa/x",
        "private key does not fit the certificate",
        "does not chain to its bundle",
        "does not chain to its bundle",
        "bundle is empty",
    ]) {
        let reason = signing_reason(bounded(provider.certificate(identity)).await, identity);
        assert!(reason.contains("SVID for it is unusable"), "{identity}: {reason}");
        assert!(reason.contains(expected), "{identity}: {reason}");
    }

    // A later response whose entry for `good` is broken keeps the previous certificate for it, while a
    // new good entry in the same response applies.
    let kept = leaf_of(&watch);
    let newcomer = pki.id("default", "newcomer");
    let mut broken = svid(&pki, &good);
    broken.x509_svid_key = b"garbage".to_vec().into();
    agent.push(response(vec![broken, svid(&pki, &newcomer)]));
    until_issued(&provider, &newcomer).await;
    assert_eq!(
        leaf_of(&bounded(provider.certificate(&good)).await.unwrap()),
        kept
    );
    assert_eq!(leaf_of(&watch), kept);
}

#[tokio::test]
async fn a_withdrawn_identity_ends_its_watch() {
    let pki = TestPki::new();
    let dir = SocketDir::new();
    let stays = pki.id("default", "stays");
    let goes = pki.id("default", "goes");
    let agent = Agent::start(
        &dir.socket(),
        response(vec![svid(&pki, &stays), svid(&pki, &goes)]),
    );
    let provider = WorkloadApiCertProvider::new(config(&dir.socket())).unwrap();
    let mut watch = bounded(provider.certificate(&goes)).await.unwrap();

    agent.push(response(vec![svid(&pki, &stays)]));
    assert!(
        bounded(watch.changed()).await.is_none(),
        "a withdrawn identity's watch ends"
    );
    let reason = signing_reason(bounded(provider.certificate(&goes)).await, &goes);
    assert!(reason.contains("does not issue this identity"), "{reason}");
    assert_eq!(provider.identities(), [stays]);
}

#[tokio::test]
async fn permission_denied_withdraws_every_identity_and_is_retried() {
    let pki = TestPki::new();
    let dir = SocketDir::new();
    let me = pki.id("default", "denied");
    let agent = Agent::start(&dir.socket(), response(vec![svid(&pki, &me)]));
    let provider = WorkloadApiCertProvider::new(config(&dir.socket())).unwrap();
    let mut watch = bounded(provider.certificate(&me)).await.unwrap();

    // The agent comes back no longer entitling this workload to anything.
    agent.stop();
    let denying = Agent::start_with(
        &dir.socket(),
        response(vec![svid(&pki, &me)]),
        Behaviour::Refuse(Code::PermissionDenied),
    );
    assert!(
        bounded(watch.changed()).await.is_none(),
        "the identity is withdrawn"
    );
    let reason = signing_reason(bounded(provider.certificate(&me)).await, &me);
    assert!(reason.contains("does not issue this identity"), "{reason}");
    // PermissionDenied may be eventual consistency: the client keeps asking.
    for _ in 0..1000 {
        if denying.accepted.load(Ordering::SeqCst) >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        denying.accepted.load(Ordering::SeqCst) >= 2,
        "PermissionDenied is retried"
    );
}

#[tokio::test]
async fn invalid_argument_from_the_agent_is_reported_and_not_retried() {
    let pki = TestPki::new();
    let dir = SocketDir::new();
    let me = pki.id("default", "refused");
    let agent = Agent::start_with(
        &dir.socket(),
        response(vec![svid(&pki, &me)]),
        Behaviour::Refuse(Code::InvalidArgument),
    );
    let provider = WorkloadApiCertProvider::new(config(&dir.socket())).unwrap();

    let reason = signing_reason(bounded(provider.certificate(&me)).await, &me);
    assert!(reason.contains("client stopped: InvalidArgument"), "{reason}");
    assert!(!provider.is_ready());
    assert_eq!(
        agent.accepted.load(Ordering::SeqCst),
        1,
        "no retry after InvalidArgument"
    );
}

#[tokio::test]
async fn the_first_response_wait_is_bounded() {
    let pki = TestPki::new();
    let dir = SocketDir::new();
    let me = pki.id("default", "lonely");
    // No agent at all: the socket does not exist.
    let provider = WorkloadApiCertProvider::new(
        config(&dir.socket()).with_first_response_timeout(Duration::from_millis(300)),
    )
    .unwrap();
    let reason = signing_reason(bounded(provider.certificate(&me)).await, &me);
    assert!(
        reason.contains("no response from the SPIFFE Workload API"),
        "{reason}"
    );
    assert!(reason.contains("agent.sock"), "{reason}");
    assert!(!provider.is_ready());
}

#[tokio::test]
async fn what_the_agent_sends_is_bounded() {
    let pki = TestPki::new();
    let first = pki.id("default", "first");
    let second = pki.id("default", "second");

    // SVIDs past `max_svids` are ignored.
    let dir = SocketDir::new();
    let _agent = Agent::start(
        &dir.socket(),
        response(vec![svid(&pki, &first), svid(&pki, &second)]),
    );
    let provider = WorkloadApiCertProvider::new(config(&dir.socket()).with_max_svids(1)).unwrap();
    assert!(bounded(provider.certificate(&first)).await.is_ok());
    let reason = signing_reason(bounded(provider.certificate(&second)).await, &second);
    assert!(reason.contains("does not issue this identity"), "{reason}");

    // A response larger than `max_response_bytes` is never applied.
    let small = SocketDir::new();
    let _agent = Agent::start(&small.socket(), response(vec![svid(&pki, &first)]));
    let provider = WorkloadApiCertProvider::new(
        config(&small.socket())
            .with_max_response_bytes(256)
            .with_first_response_timeout(Duration::from_millis(500)),
    )
    .unwrap();
    let reason = signing_reason(bounded(provider.certificate(&first)).await, &first);
    assert!(
        reason.contains("no response from the SPIFFE Workload API"),
        "{reason}"
    );
    assert!(provider.identities().is_empty());
}

#[tokio::test]
async fn the_provider_is_usable_as_a_dyn_cert_provider() {
    let pki = TestPki::new();
    let dir = SocketDir::new();
    let me = pki.id("default", "dyn");
    let _agent = Agent::start(&dir.socket(), response(vec![svid(&pki, &me)]));
    let provider: Arc<dyn CertProvider> =
        Arc::new(WorkloadApiCertProvider::new(config(&dir.socket())).unwrap());
    let watch = bounded(provider.certificate(&me)).await.unwrap();
    assert_eq!(watch.identity(), me);
    assert!(format!("{provider:?}").contains("WorkloadApiCertProvider"));
}

#[test]
fn starting_outside_a_runtime_is_a_typed_error() {
    let error = WorkloadApiCertProvider::new(WorkloadApiConfig::default()).unwrap_err();
    assert!(error.to_string().contains("tokio runtime"), "{error}");
}
