//! The operations surface over real loopback HTTP/1.1: metrics scrapes, readiness, the admin endpoint's
//! config dump, logging and shutdown, and the servers' limits.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use mesh_core::ca::LeafSpec;
use mesh_core::drain::{self, DrainTrigger};
use mesh_core::model::{MeshSnapshot, Service, ServicePort, Workload};
use mesh_core::{SpiffeId, WorkloadCert};
use mesh_policy::L4PolicySet;
use mesh_policy::l4::{L4Action, L4Clause, L4Match, L4Policy, L4Rule, L4Scope, StringMatch};
use mesh_proxy::ProxyError;
use mesh_proxy::admin::{
    self, AdminEndpoint, HttpHandler, HttpServer, HttpServerConfig, LogControl, MetricsEndpoint, Readiness,
    ReadinessEndpoint, StateDump,
};
use mesh_proxy::metrics::Metrics;
use mesh_proxy::state::ProxyState;
use mesh_proxy::telemetry::{
    ConnectionObserver, ConnectionOutcome, ConnectionRecord, Reporter, ResponseFlag, SecurityPolicy,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Bound on any one exchange, so that a broken server fails the test instead of hanging it.
const EXCHANGE_LIMIT: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct HttpResponse {
    status: u16,
    head: String,
    body: String,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

/// Sends `request` verbatim on a new connection and reads the response until the server closes.
async fn exchange(addr: SocketAddr, request: &[u8]) -> HttpResponse {
    let raw = timeout(EXCHANGE_LIMIT, async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut raw = Vec::new();
        // A server refusing a request it did not read in full closes with unread bytes, which resets the
        // connection after its response: keep what arrived before the reset.
        if let Err(error) = stream.read_to_end(&mut raw).await {
            assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
        }
        raw
    })
    .await
    .expect("the server answered and closed in time");
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete response head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    HttpResponse {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

async fn request(addr: SocketAddr, method: &str, path: &str) -> HttpResponse {
    let request =
        format!("{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    exchange(addr, request.as_bytes()).await
}

async fn serve(handler: Arc<dyn HttpHandler>) -> (SocketAddr, DrainTrigger) {
    serve_with(handler, HttpServerConfig::default()).await
}

async fn serve_with(handler: Arc<dyn HttpHandler>, config: HttpServerConfig) -> (SocketAddr, DrainTrigger) {
    let server = HttpServer::bind("test", "127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap();
    let addr = server.local_addr();
    let (trigger, watch) = drain::channel();
    tokio::spawn(server.serve(handler, watch));
    (addr, trigger)
}

fn sleep_workload() -> Workload {
    Workload {
        addresses: vec!["10.0.0.1".parse().unwrap()],
        workload_name: "sleep".into(),
        canonical_name: "sleep".into(),
        canonical_revision: "v1".into(),
        cluster_id: "Kubernetes".into(),
        service_account: "sleep".into(),
        ..Workload::new("Kubernetes//Pod/client-ns/sleep-7d9", "sleep-7d9", "client-ns")
    }
}

fn echo_service() -> Service {
    Service {
        vips: vec!["/10.96.0.10".parse().unwrap()],
        ports: vec![ServicePort::new(80, 8080)],
        ..Service::new("echo", "server-ns", "echo.server-ns.svc.cluster.local")
    }
}

fn echo_workload(workload_name: &str) -> Workload {
    Workload {
        addresses: vec!["10.0.0.2".parse().unwrap()],
        workload_name: workload_name.into(),
        canonical_name: "echo".into(),
        canonical_revision: "v2".into(),
        cluster_id: "Kubernetes".into(),
        service_account: "echo".into(),
        services: [(echo_service().key(), Default::default())].into(),
        ..Workload::new("Kubernetes//Pod/server-ns/echo-5f4", "echo-5f4", "server-ns")
    }
}

fn outbound_record(destination_workload: &str) -> Arc<ConnectionRecord> {
    let mut record = ConnectionRecord::new(
        Reporter::Source,
        "10.0.0.1:40000".parse().unwrap(),
        "10.96.0.10:80".parse().unwrap(),
    );
    record.upstream_addr = Some("10.0.0.2:15008".parse().unwrap());
    record.source_workload = Some(Arc::new(sleep_workload()));
    record.source_identity = Some(SpiffeId::parse("spiffe://cluster.local/ns/client-ns/sa/sleep").unwrap());
    record.destination_workload = Some(Arc::new(echo_workload(destination_workload)));
    record.destination_service = Some(Arc::new(echo_service()));
    record.destination_identity =
        Some(SpiffeId::parse("spiffe://cluster.local/ns/server-ns/sa/echo").unwrap());
    record.security = SecurityPolicy::MutualTls;
    Arc::new(record)
}

/// The full label set of `outbound_record("echo")`, in ztunnel's order.
fn outbound_labels(flags: &str) -> String {
    format!(
        "reporter=\"source\",source_workload=\"sleep\",source_canonical_service=\"sleep\",\
         source_canonical_revision=\"v1\",source_workload_namespace=\"client-ns\",\
         source_principal=\"spiffe://cluster.local/ns/client-ns/sa/sleep\",source_app=\"sleep\",\
         source_version=\"v1\",source_cluster=\"Kubernetes\",\
         destination_service=\"echo.server-ns.svc.cluster.local\",destination_service_namespace=\"server-ns\",\
         destination_service_name=\"echo\",destination_workload=\"echo\",destination_canonical_service=\"echo\",\
         destination_canonical_revision=\"v2\",destination_workload_namespace=\"server-ns\",\
         destination_principal=\"spiffe://cluster.local/ns/server-ns/sa/echo\",destination_app=\"echo\",\
         destination_version=\"v2\",destination_cluster=\"Kubernetes\",request_protocol=\"tcp\",\
         response_flags=\"{flags}\",connection_security_policy=\"mutual_tls\""
    )
}

/// The labels of an inbound plain-TCP connection nothing is known about.
fn unknown_inbound_labels(flags: &str) -> String {
    let mut labels = vec!["reporter=\"destination\"".to_owned()];
    for name in [
        "source_workload",
        "source_canonical_service",
        "source_canonical_revision",
        "source_workload_namespace",
        "source_principal",
        "source_app",
        "source_version",
        "source_cluster",
        "destination_service",
        "destination_service_namespace",
        "destination_service_name",
        "destination_workload",
        "destination_canonical_service",
        "destination_canonical_revision",
        "destination_workload_namespace",
        "destination_principal",
        "destination_app",
        "destination_version",
        "destination_cluster",
    ] {
        labels.push(format!("{name}=\"unknown\""));
    }
    labels.push("request_protocol=\"tcp\"".to_owned());
    labels.push(format!("response_flags=\"{flags}\""));
    labels.push("connection_security_policy=\"unknown\"".to_owned());
    labels.join(",")
}

/// The value of the sample `name{labels}`, which must appear exactly once.
fn sample(scrape: &str, name: &str, labels: &str) -> u64 {
    let prefix = format!("{name}{{{labels}}} ");
    let values: Vec<_> = scrape
        .lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .collect();
    assert_eq!(values.len(), 1, "expected one sample {prefix}in:\n{scrape}");
    values[0].parse().unwrap()
}

#[tokio::test]
async fn metrics_scrape_has_istio_names_labels_and_live_bytes() {
    let metrics = Arc::new(Metrics::with_build("ztunnel", "1.27.0"));
    let (addr, _trigger) = serve(Arc::new(MetricsEndpoint::new(metrics.clone()))).await;

    // One finished and one still open connection with the same labels, and one denied inbound.
    let finished = outbound_record("echo");
    metrics.opened(&finished);
    finished.add_sent(100);
    finished.add_received(1000);
    metrics.closed(&finished, &ConnectionOutcome::ok());

    let open = outbound_record("echo");
    metrics.opened(&open);
    open.add_sent(5);
    open.add_received(7);

    let denied = Arc::new(ConnectionRecord::new(
        Reporter::Destination,
        "10.0.0.9:50000".parse().unwrap(),
        "10.0.0.2:8080".parse().unwrap(),
    ));
    metrics.opened(&denied);
    denied.add_sent(3);
    metrics.closed(&denied, &ConnectionOutcome::failed(ResponseFlag::Deny, "denied"));

    let response = request(addr, "GET", "/metrics").await;
    assert_eq!(response.status, 200);
    assert_eq!(
        response.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let scrape = response.body;

    let ok = outbound_labels("-");
    assert_eq!(sample(&scrape, "istio_tcp_connections_opened_total", &ok), 2);
    assert_eq!(sample(&scrape, "istio_tcp_connections_closed_total", &ok), 1);
    // Request bytes (client to server) and response bytes, the open connection's counted live.
    assert_eq!(sample(&scrape, "istio_tcp_received_bytes_total", &ok), 105);
    assert_eq!(sample(&scrape, "istio_tcp_sent_bytes_total", &ok), 1007);

    // The denied connection: opened and bytes under "-", closed under its flag (as ztunnel labels them).
    let inbound = unknown_inbound_labels("-");
    assert_eq!(sample(&scrape, "istio_tcp_connections_opened_total", &inbound), 1);
    assert_eq!(sample(&scrape, "istio_tcp_received_bytes_total", &inbound), 3);
    assert_eq!(
        sample(
            &scrape,
            "istio_tcp_connections_closed_total",
            &unknown_inbound_labels("DENY")
        ),
        1
    );
    assert!(!scrape.contains(&format!("istio_tcp_connections_closed_total{{{inbound}}}")));

    for family in [
        "istio_tcp_connections_opened_total counter",
        "istio_tcp_connections_closed_total counter",
        "istio_tcp_received_bytes_total counter",
        "istio_tcp_sent_bytes_total counter",
        "istio_build gauge",
    ] {
        assert!(
            scrape.contains(&format!("\n# TYPE {family}\n")),
            "{family} missing:\n{scrape}"
        );
    }
    assert!(
        scrape.contains(
            "# HELP istio_tcp_connections_opened_total The total number of TCP connections opened\n"
        )
    );
    assert!(scrape.contains("\nistio_build{component=\"ztunnel\",tag=\"1.27.0\"} 1\n"));
    if cfg!(target_os = "linux") {
        assert!(scrape.contains("\nprocess_open_fds "), "{scrape}");
        assert!(scrape.contains("\nprocess_max_fds "), "{scrape}");
    }

    // More bytes on the open connection show in the next scrape; closing it moves them, once.
    open.add_sent(10);
    let scrape = request(addr, "GET", "/stats/prometheus").await.body;
    assert_eq!(sample(&scrape, "istio_tcp_received_bytes_total", &ok), 115);
    metrics.closed(&open, &ConnectionOutcome::ok());
    let scrape = request(addr, "GET", "/metrics").await.body;
    assert_eq!(sample(&scrape, "istio_tcp_received_bytes_total", &ok), 115);
    assert_eq!(sample(&scrape, "istio_tcp_sent_bytes_total", &ok), 1007);
    assert_eq!(sample(&scrape, "istio_tcp_connections_closed_total", &ok), 2);
    assert_eq!(metrics.open_connections(), 0);
}

#[tokio::test]
async fn label_values_with_quotes_and_newlines_are_escaped() {
    let metrics = Arc::new(Metrics::new());
    let (addr, _trigger) = serve(Arc::new(MetricsEndpoint::new(metrics.clone()))).await;
    let record = outbound_record("say \"hi\"\nC:\\bye");
    metrics.opened(&record);

    let scrape = request(addr, "GET", "/metrics").await.body;
    let labels = outbound_labels("-").replace(
        "destination_workload=\"echo\"",
        "destination_workload=\"say \\\"hi\\\"\\nC:\\\\bye\"",
    );
    assert_eq!(sample(&scrape, "istio_tcp_connections_opened_total", &labels), 1);
    // Every line is a comment or a sample: the raw newline did not split one.
    for line in scrape.lines() {
        assert!(
            line.starts_with('#') || line.starts_with("istio_") || line.starts_with("process_"),
            "stray line {line:?}"
        );
    }
}

#[tokio::test]
async fn registered_component_metrics_and_other_paths() {
    let metrics = Arc::new(Metrics::new());
    let fetches = Arc::new(AtomicUsize::new(0));
    let counter = fetches.clone();
    metrics
        .register_counter(
            "istio_ca_fetches_total",
            "Certificate fetches from the CA",
            move || counter.load(Ordering::Relaxed) as f64,
        )
        .unwrap();
    metrics
        .register_gauge("istio_xds_connected", "1 while the xDS stream is up", || 1.0)
        .unwrap();
    let (addr, _trigger) = serve(Arc::new(MetricsEndpoint::new(metrics))).await;

    fetches.store(3, Ordering::Relaxed);
    let scrape = request(addr, "GET", "/metrics").await.body;
    assert!(
        scrape.contains("# TYPE istio_ca_fetches_total counter\nistio_ca_fetches_total 3\n"),
        "{scrape}"
    );
    assert!(
        scrape.contains("# TYPE istio_xds_connected gauge\nistio_xds_connected 1\n"),
        "{scrape}"
    );

    assert_eq!(request(addr, "GET", "/").await.status, 404);
    assert_eq!(request(addr, "GET", "/metricsx").await.status, 404);
    assert_eq!(request(addr, "POST", "/metrics").await.status, 405);
}

#[tokio::test]
async fn readiness_flips_from_503_to_200() {
    let readiness = Readiness::new();
    let certificates = readiness.register("certificates");
    let xds = readiness.register("xds");
    let (addr, _trigger) = serve(Arc::new(ReadinessEndpoint::new(readiness.clone()))).await;

    let response = request(addr, "GET", "/healthz/ready").await;
    assert_eq!(response.status, 503);
    assert_eq!(response.body, "not ready, pending: certificates, xds\n");

    xds.done();
    let response = request(addr, "GET", "/healthz/ready").await;
    assert_eq!(response.status, 503);
    assert_eq!(response.body, "not ready, pending: certificates\n");

    certificates.done();
    let response = request(addr, "GET", "/healthz/ready").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.body, "ready\n");

    assert_eq!(request(addr, "GET", "/healthz/live").await.status, 404);
}

/// A certificate whose private key the test knows, so it can look for it in the dump.
fn cert_with_known_key(pki: &mesh_test::TestPki) -> (WorkloadCert, Vec<u8>) {
    let id = pki.id("server-ns", "echo");
    let now = SystemTime::now();
    let (chain, key) = pki
        .ca()
        .issue_raw(&LeafSpec {
            uri_sans: vec![id.as_str().to_owned()],
            not_before: now - Duration::from_secs(60),
            not_after: now + Duration::from_secs(3600),
        })
        .unwrap();
    let key_der = key.secret_der().to_vec();
    let cert = WorkloadCert::new(&id, chain, key, vec![pki.ca().root_cert().clone()]).unwrap();
    (cert, key_der)
}

fn deny_policy() -> L4Policy {
    L4Policy {
        name: "deny-sleep".into(),
        namespace: "server-ns".into(),
        scope: L4Scope::Namespace,
        action: L4Action::Deny,
        dry_run: false,
        rules: vec![L4Rule {
            clauses: vec![L4Clause {
                matches: vec![L4Match {
                    principals: vec![StringMatch::Exact("cluster.local/ns/client-ns/sa/sleep".into())],
                    destination_ports: vec![8080],
                    ..L4Match::default()
                }],
            }],
        }],
    }
}

#[tokio::test]
async fn config_dump_lists_the_state_and_no_key_material() {
    let pki = mesh_test::TestPki::new();
    let (cert, key_der) = cert_with_known_key(&pki);
    let snapshot = MeshSnapshot::builder()
        .add_service(echo_service())
        .add_workload(sleep_workload())
        .add_workload(echo_workload("echo"))
        .build()
        .unwrap();
    let state = ProxyState::fixed(snapshot, L4PolicySet::new([deny_policy()]));
    let cert = Arc::new(cert);
    let dump = StateDump::new(state)
        .with_version("test-build")
        .with_certificates(move || vec![cert.clone()]);
    let (addr, _trigger) = serve(Arc::new(AdminEndpoint::new(Arc::new(dump)))).await;

    let response = request(addr, "GET", "/config_dump").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("application/json"));
    let json: serde_json::Value = serde_json::from_str(&response.body).unwrap();

    let uids: Vec<_> = json["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["uid"].as_str().unwrap())
        .collect();
    assert_eq!(
        uids,
        [
            "Kubernetes//Pod/client-ns/sleep-7d9",
            "Kubernetes//Pod/server-ns/echo-5f4"
        ]
    );
    let echo = &json["workloads"][1];
    assert_eq!(echo["workloadIps"], serde_json::json!(["10.0.0.2"]));
    assert_eq!(echo["serviceAccount"], "echo");
    assert_eq!(echo["canonicalRevision"], "v2");
    assert_eq!(
        json["services"][0]["hostname"],
        "echo.server-ns.svc.cluster.local"
    );
    assert_eq!(json["services"][0]["ports"], serde_json::json!({ "80": 8080 }));
    assert_eq!(
        json["services"][0]["endpoints"][0]["workloadUid"],
        "Kubernetes//Pod/server-ns/echo-5f4"
    );
    let policy = &json["policies"][0];
    assert_eq!(policy["name"], "deny-sleep");
    assert_eq!(policy["action"], "DENY");
    assert_eq!(
        policy["rules"][0]["clauses"][0]["matches"][0],
        serde_json::json!({
            "principals": [{ "exact": "cluster.local/ns/client-ns/sa/sleep" }],
            "destinationPorts": [8080],
        })
    );
    let certificate = &json["certificates"][0];
    assert_eq!(
        certificate["identity"],
        "spiffe://cluster.local/ns/server-ns/sa/echo"
    );
    assert_eq!(certificate["chainLength"], 1);
    assert!(certificate["notAfter"].as_str().unwrap().ends_with('Z'));
    assert_eq!(json["version"], "test-build");

    // No key material, in any of the forms it could take.
    assert!(!response.body.contains("PRIVATE KEY"));
    let key_b64 = base64_encode(&key_der);
    assert!(!response.body.contains(&key_b64));
    assert!(!response.body.contains(&key_b64[..32]));
}

/// Standard base64 with padding (what PEM bodies use).
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn base64_helper_matches_rfc_4648() {
    assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    assert_eq!(base64_encode(b"fooba"), "Zm9vYmE=");
    assert_eq!(base64_encode(b"foob"), "Zm9vYg==");
}

/// Records the filters it is asked to set; refuses directives containing `!`.
#[derive(Debug)]
struct RecordingLog {
    current: Mutex<String>,
    calls: Mutex<Vec<String>>,
}

impl LogControl for RecordingLog {
    fn current(&self) -> String {
        self.current.lock().unwrap().clone()
    }

    fn set(&self, directive: &str) -> Result<(), String> {
        self.calls.lock().unwrap().push(directive.to_owned());
        if directive.contains('!') {
            return Err(format!("invalid directive {directive:?}"));
        }
        *self.current.lock().unwrap() = directive.to_owned();
        Ok(())
    }
}

fn empty_dump() -> Arc<StateDump> {
    Arc::new(StateDump::new(ProxyState::fixed(
        MeshSnapshot::empty(),
        L4PolicySet::default(),
    )))
}

#[tokio::test]
async fn logging_level_change_calls_the_callback() {
    let log = Arc::new(RecordingLog {
        current: Mutex::new("info".to_owned()),
        calls: Mutex::new(Vec::new()),
    });
    let endpoint = AdminEndpoint::new(empty_dump()).with_logging(log.clone());
    let (addr, _trigger) = serve(Arc::new(endpoint)).await;

    let response = request(addr, "GET", "/logging").await;
    assert_eq!(
        (response.status, response.body.as_str()),
        (200, "current log level is info\n")
    );

    let response = request(addr, "POST", "/logging?level=mesh_proxy%3Dtrace%2Cinfo").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.body, "current log level is mesh_proxy=trace,info\n");
    assert_eq!(*log.calls.lock().unwrap(), ["mesh_proxy=trace,info"]);

    // Refused by the callback: 400, and the level is unchanged.
    let response = request(addr, "POST", "/logging?level=bogus!").await;
    assert_eq!(response.status, 400);
    assert!(response.body.contains("invalid directive"), "{}", response.body);
    assert_eq!(log.current(), "mesh_proxy=trace,info");

    // Refused before the callback: empty, or not decodable.
    assert_eq!(request(addr, "POST", "/logging?level=").await.status, 400);
    assert_eq!(request(addr, "POST", "/logging?level=%zz").await.status, 400);
    // Reset is not supported by this control.
    assert_eq!(request(addr, "POST", "/logging?reset").await.status, 400);
    assert_eq!(log.calls.lock().unwrap().len(), 2);

    // A plain POST shows the level, as Envoy's and ztunnel's do.
    let response = request(addr, "POST", "/logging").await;
    assert_eq!(response.body, "current log level is mesh_proxy=trace,info\n");
}

#[tokio::test]
async fn index_quitquitquit_and_unconfigured_endpoints() {
    let shutdowns = Arc::new(AtomicUsize::new(0));
    let counter = shutdowns.clone();
    let endpoint = AdminEndpoint::new(empty_dump()).with_shutdown(move || {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    let (addr, _trigger) = serve(Arc::new(endpoint)).await;

    let index = request(addr, "GET", "/").await;
    assert_eq!(index.status, 200);
    for path in ["/config_dump", "/logging", "/quitquitquit"] {
        assert!(index.body.contains(path), "{path} not listed:\n{}", index.body);
    }

    assert_eq!(request(addr, "GET", "/quitquitquit").await.status, 405);
    assert_eq!(shutdowns.load(Ordering::SeqCst), 0);
    let response = request(addr, "POST", "/quitquitquit").await;
    assert_eq!((response.status, response.body.as_str()), (200, "shutdown now\n"));
    assert_eq!(shutdowns.load(Ordering::SeqCst), 1);

    // No log control was given.
    assert_eq!(request(addr, "GET", "/logging").await.status, 501);
    assert_eq!(request(addr, "GET", "/debug/pprof/profile").await.status, 404);
}

#[tokio::test]
async fn oversized_requests_are_refused() {
    let log = Arc::new(RecordingLog {
        current: Mutex::new("info".to_owned()),
        calls: Mutex::new(Vec::new()),
    });
    let endpoint = AdminEndpoint::new(empty_dump()).with_logging(log.clone());
    let (addr, _trigger) = serve(Arc::new(endpoint)).await;

    // A body over 64 KiB is refused on its declared length, before the handler runs.
    let head = "POST /logging?level=debug HTTP/1.1\r\nHost: test\r\nContent-Length: 70000\r\nConnection: close\r\n\r\n";
    let response = exchange(addr, head.as_bytes()).await;
    assert_eq!(response.status, 413);
    assert!(log.calls.lock().unwrap().is_empty());

    // A small body is read and the request served.
    let small = format!(
        "POST /logging?level=debug HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{}",
        "x".repeat(100)
    );
    assert_eq!(exchange(addr, small.as_bytes()).await.status, 200);
    assert_eq!(*log.calls.lock().unwrap(), ["debug"]);

    // Headers over the limit: 431.
    let huge = format!(
        "GET /config_dump HTTP/1.1\r\nHost: test\r\nX-Padding: {}\r\nConnection: close\r\n\r\n",
        "p".repeat(32 * 1024)
    );
    assert_eq!(exchange(addr, huge.as_bytes()).await.status, 431);
}

#[tokio::test]
async fn admin_refuses_a_non_loopback_bind() {
    let refused = admin::bind_admin("0.0.0.0:0".parse().unwrap(), false, HttpServerConfig::default()).await;
    assert!(
        matches!(refused, Err(ProxyError::AdminNotLoopback { addr }) if addr.ip().is_unspecified()),
        "{refused:?}"
    );
    let refused = admin::bind_admin("[::]:0".parse().unwrap(), false, HttpServerConfig::default()).await;
    assert!(
        matches!(refused, Err(ProxyError::AdminNotLoopback { .. })),
        "{refused:?}"
    );

    let loopback = admin::bind_admin("127.0.0.1:0".parse().unwrap(), false, HttpServerConfig::default())
        .await
        .unwrap();
    assert!(loopback.local_addr().ip().is_loopback());
    // Explicitly allowed: binds anywhere.
    let anywhere = admin::bind_admin("0.0.0.0:0".parse().unwrap(), true, HttpServerConfig::default())
        .await
        .unwrap();
    assert!(anywhere.local_addr().ip().is_unspecified());
}

#[tokio::test]
async fn drain_stops_accepting_and_waits_for_connections() {
    let (addr, trigger) = serve(Arc::new(ReadinessEndpoint::new(Readiness::new()))).await;
    // An idle keep-alive connection, which the drain must close rather than wait on forever.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    timeout(EXCHANGE_LIMIT, idle.read_exact(&mut first))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");

    timeout(EXCHANGE_LIMIT, trigger.drain())
        .await
        .expect("drain completes once the server and its connections are done");
    // The idle connection was closed by the server.
    let mut rest = Vec::new();
    timeout(EXCHANGE_LIMIT, idle.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(TcpStream::connect(addr).await.is_err(), "the listener is closed");
}
