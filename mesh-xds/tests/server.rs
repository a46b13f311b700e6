//! The local control plane end to end: files in a directory, served over TLS gRPC on loopback to our own
//! ADS client and CA client, as a ztunnel would use them.

#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::cert::CachingCertConfig;
use mesh_core::{CachingCertProvider, DevCa, SpiffeId, TrustDomain};
use mesh_xds::ca::{Caller, IstioCaConfig, IstioCaSigner, StaticTokens};
use mesh_xds::client::{AdsClientBuilder, AdsHandle, Watch, ZtunnelNode};
use mesh_xds::server::{ClientAuth, Server, ServerConfig};
use mesh_xds::transport::{CallCredentials, GrpcClientConfig, TokenSource, connect_lazy};
use mesh_xds::{XdsAddress, XdsAuthorization};
use tokio::sync::oneshot;

const WAIT: Duration = Duration::from_secs(20);

const TWO_WORKLOADS: &str = r#"
workloads:
- uid: cluster1//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  trustDomain: cluster.local
  workloadIps: ["198.18.0.1"]
  protocol: HBONE
  node: node-a
  network: ""
  services: {}
- uid: cluster1//v1/Pod/default/server
  name: server
  namespace: default
  serviceAccount: server
  trustDomain: cluster.local
  workloadIps: ["198.18.0.2"]
  protocol: HBONE
  node: node-b
  network: ""
  services:
    "default/echo.default.svc.cluster.local":
      80: 8080
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/198.19.0.10"]
  ports: {80: 8080, 5201: 5201}
"#;

const POLICY: &str = r#"
policies:
- name: deny-iperf-from-client
  namespace: default
  scope: Namespace
  action: Deny
  dryRun: false
  rules:
  - - - destinationPorts: [5201]
        principals: [!Exact "cluster.local/ns/default/sa/client"]
"#;

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "meshkit-{name}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn ca() -> Arc<DevCa> {
    Arc::new(
        DevCa::new(
            TrustDomain::new("cluster.local").unwrap(),
            Duration::from_secs(3600),
        )
        .unwrap(),
    )
}

async fn start_server(dir: &TempDir, ca: Arc<DevCa>) -> Server {
    let mut config = ServerConfig::new(&dir.0);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.poll_interval = Duration::from_millis(50);
    config.auth = ClientAuth::DevLoopback {
        node_proxy: Some(
            Caller::new(id("spiffe://cluster.local/ns/istio-system/sa/ztunnel")).on_node("node-a"),
        ),
    };
    Server::start(config, ca).await.unwrap()
}

fn client_config(server: &Server) -> GrpcClientConfig {
    GrpcClientConfig::new(server.url()).with_roots_pem(server.root_pem().as_bytes().to_vec())
}

struct Client {
    addresses: Watch<XdsAddress>,
    policies: Watch<XdsAuthorization>,
    handle: AdsHandle,
    _stop: oneshot::Sender<()>,
}

fn start_client(server: &Server, credentials: CallCredentials) -> Client {
    let node = ZtunnelNode {
        pod_name: "ztunnel-x".into(),
        pod_namespace: "istio-system".into(),
        node_name: "node-a".into(),
        ..ZtunnelNode::default()
    };
    let mut builder = AdsClientBuilder::new(node.to_proto());
    let addresses = builder.watch::<XdsAddress>();
    let policies = builder.watch::<XdsAuthorization>();
    let channel = connect_lazy(&client_config(server)).unwrap();
    let (client, handle) = builder.build(channel, credentials);
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(client.run(async {
        let _ = stopped.await;
    }));
    Client {
        addresses,
        policies,
        handle,
        _stop: stop,
    }
}

fn dev_token() -> CallCredentials {
    CallCredentials::bearer(TokenSource::Literal("any-token".into()))
        .unwrap()
        .with_cluster_id("Kubernetes")
        .unwrap()
}

async fn until<T>(watch: &mut Watch<T>, what: &str, check: impl Fn(&mesh_xds::client::Resources<T>) -> bool) {
    let reached = tokio::time::timeout(WAIT, async {
        loop {
            if check(&watch.current()) {
                return;
            }
            watch.changed().await.expect("client stopped");
        }
    })
    .await;
    assert!(reached.is_ok(), "timed out waiting for: {what}");
}

#[tokio::test]
async fn files_are_served_over_tls_and_changes_are_pushed() {
    let dir = TempDir::new("cp-serve");
    std::fs::write(dir.0.join("mesh.yaml"), TWO_WORKLOADS).unwrap();
    let server = start_server(&dir, ca()).await;
    let mut client = start_client(&server, dev_token());

    tokio::time::timeout(WAIT, client.handle.wait_ready())
        .await
        .unwrap()
        .unwrap();
    until(&mut client.addresses, "two workloads and the service", |r| {
        r.len() == 3
    })
    .await;
    let echo = client.addresses.current();
    match &**echo.get("default/echo.default.svc.cluster.local").unwrap() {
        XdsAddress::Service(service) => assert_eq!(service.vips[0].to_string(), "/198.19.0.10"),
        other => panic!("expected the echo service, got {other:?}"),
    }
    assert!(client.policies.current().is_empty());

    // A policy file appears: it is pushed.
    std::fs::write(dir.0.join("policy.yaml"), POLICY).unwrap();
    until(&mut client.policies, "the policy", |r| {
        r.get("default/deny-iperf-from-client").is_some()
    })
    .await;

    // A broken edit is not published: the client keeps the last good set, the server says what is wrong.
    std::fs::write(dir.0.join("policy.yaml"), "policies:\n- name: [unclosed\n").unwrap();
    let error = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(error) = server.last_error() {
                return error;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the broken file was not noticed");
    assert!(error.to_string().contains("policy.yaml:"), "{error}");
    assert_eq!(client.policies.current().len(), 1);
    assert_eq!(client.addresses.current().len(), 3);

    // Fixed, and a workload removed: both arrive.
    std::fs::write(dir.0.join("policy.yaml"), "").unwrap();
    std::fs::write(
        dir.0.join("mesh.yaml"),
        TWO_WORKLOADS.replace("198.18.0.2", "198.18.0.22"),
    )
    .unwrap();
    until(&mut client.policies, "the policy removed", |r| r.is_empty()).await;
    until(&mut client.addresses, "the moved workload", |r| {
        matches!(r.get("cluster1//v1/Pod/default/server").map(|a| &**a),
            Some(XdsAddress::Workload(w)) if w.addresses[0].to_string() == "198.18.0.22")
    })
    .await;
    assert_eq!(client.handle.status().nacks, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_without_a_token_is_refused() {
    let dir = TempDir::new("cp-token");
    std::fs::write(dir.0.join("mesh.yaml"), TWO_WORKLOADS).unwrap();
    let server = start_server(&dir, ca()).await;
    let client = start_client(&server, CallCredentials::anonymous());
    let mut status = client.handle.status_watch();
    let refused = tokio::time::timeout(WAIT, status.wait_for(|s| s.last_error.is_some()))
        .await
        .expect("not refused")
        .unwrap()
        .clone();
    let reason = refused.last_error.unwrap();
    assert!(
        reason.contains("Unauthenticated") && reason.contains("no bearer token"),
        "{reason}"
    );
    assert!(!client.handle.is_ready());
    server.shutdown().await;
}

#[tokio::test]
async fn the_ca_issues_node_workload_certificates_to_the_node_proxy_only() {
    let dir = TempDir::new("cp-ca");
    std::fs::write(dir.0.join("mesh.yaml"), TWO_WORKLOADS).unwrap();
    let server = start_server(&dir, ca()).await;
    let channel = connect_lazy(&client_config(&server)).unwrap();
    let signer = IstioCaSigner::new(
        channel,
        dev_token(),
        IstioCaConfig::default().with_impersonation(true),
    );
    let provider = CachingCertProvider::new(Arc::new(signer), CachingCertConfig::default());

    // client runs on node-a, the node of the configured node proxy.
    let cert = tokio::time::timeout(
        WAIT,
        provider.fetch(&id("spiffe://cluster.local/ns/default/sa/client")),
    )
    .await
    .unwrap()
    .unwrap()
    .current();
    assert_eq!(
        cert.identity().as_str(),
        "spiffe://cluster.local/ns/default/sa/client"
    );
    let root = root_der(server.root_pem());
    assert_eq!(cert.roots(), [root]);

    // server runs on node-b: refused, and the reason says so.
    let refused = tokio::time::timeout(
        WAIT,
        provider.fetch(&id("spiffe://cluster.local/ns/default/sa/server")),
    )
    .await
    .unwrap()
    .unwrap_err()
    .to_string();
    assert!(
        refused.contains("PermissionDenied") || refused.contains("permission"),
        "{refused}"
    );
    assert!(refused.contains("node-a"), "{refused}");
    server.shutdown().await;
}

/// The DER of the single certificate in `pem`.
fn root_der(pem: &str) -> rustls_pki_types::CertificateDer<'static> {
    let mut certs = mesh_xds::transport::certificates_from_pem(pem.as_bytes()).unwrap();
    assert_eq!(certs.len(), 1);
    certs.remove(0)
}

#[tokio::test]
async fn a_node_proxy_with_an_empty_node_name_impersonates_nobody() {
    let dir = TempDir::new("cp-empty-node");
    // The server workload's node is not known.
    std::fs::write(
        dir.0.join("mesh.yaml"),
        TWO_WORKLOADS.replace("node: node-b", "node: \"\""),
    )
    .unwrap();
    let mut config = ServerConfig::new(&dir.0);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.auth = ClientAuth::DevLoopback {
        node_proxy: Some(Caller::new(id("spiffe://cluster.local/ns/istio-system/sa/ztunnel")).on_node("")),
    };
    let server = Server::start(config, ca()).await.unwrap();
    let channel = connect_lazy(&client_config(&server)).unwrap();
    let signer = IstioCaSigner::new(
        channel,
        dev_token(),
        IstioCaConfig::default().with_impersonation(true),
    );
    let provider = CachingCertProvider::new(Arc::new(signer), CachingCertConfig::default());
    let refused = tokio::time::timeout(
        WAIT,
        provider.fetch(&id("spiffe://cluster.local/ns/default/sa/server")),
    )
    .await
    .unwrap()
    .unwrap_err()
    .to_string();
    assert!(
        refused.contains("PermissionDenied") && refused.contains("runs on no known node"),
        "{refused}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn the_configuration_is_served_as_soon_as_start_returns() {
    let dir = TempDir::new("cp-initial");
    std::fs::write(dir.0.join("mesh.yaml"), TWO_WORKLOADS).unwrap();
    let server = start_server(&dir, ca()).await;
    // No await between start and this: what a client connecting now would be sent.
    assert_eq!(server.resources().len(), 3);
    server.shutdown().await;
}

#[tokio::test]
async fn dropping_the_server_ends_its_ads_streams() {
    let dir = TempDir::new("cp-drop");
    std::fs::write(dir.0.join("mesh.yaml"), TWO_WORKLOADS).unwrap();
    let server = start_server(&dir, ca()).await;
    let client = start_client(&server, dev_token());
    tokio::time::timeout(WAIT, client.handle.wait_ready())
        .await
        .unwrap()
        .unwrap();
    drop(server);
    let mut status = client.handle.status_watch();
    let lost = tokio::time::timeout(WAIT, status.wait_for(|s| !s.connected))
        .await
        .expect("the stream outlived the server")
        .unwrap()
        .clone();
    assert!(
        lost.last_error
            .as_deref()
            .unwrap_or_default()
            .contains("shutting down"),
        "{lost:?}"
    );
}

#[tokio::test]
async fn ads_streams_accept_every_configured_authenticator() {
    let dir = TempDir::new("cp-authenticators");
    std::fs::write(dir.0.join("mesh.yaml"), TWO_WORKLOADS).unwrap();
    let ztunnel = Caller::new(id("spiffe://cluster.local/ns/istio-system/sa/ztunnel")).on_node("node-a");
    let mut config = ServerConfig::new(&dir.0);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.auth = ClientAuth::Authenticators(vec![
        Arc::new(StaticTokens::new().with("first-token", ztunnel.clone())),
        Arc::new(StaticTokens::new().with("second-token", ztunnel)),
    ]);
    let server = Server::start(config, ca()).await.unwrap();
    let second = CallCredentials::bearer(TokenSource::Literal("second-token".into())).unwrap();
    let client = start_client(&server, second);
    tokio::time::timeout(WAIT, client.handle.wait_ready())
        .await
        .expect("a caller of the second authenticator was refused")
        .unwrap();

    let wrong = CallCredentials::bearer(TokenSource::Literal("third-token".into())).unwrap();
    let refused = start_client(&server, wrong);
    let mut status = refused.handle.status_watch();
    let reason = tokio::time::timeout(WAIT, status.wait_for(|s| s.last_error.is_some()))
        .await
        .expect("an unknown token was not refused")
        .unwrap()
        .last_error
        .clone()
        .unwrap();
    assert!(reason.contains("Unauthenticated"), "{reason}");
    server.shutdown().await;
}
