//! The delta ADS client against the ADS service over real gRPC on loopback: subscriptions, updates,
//! NACKs, on-demand lookups, restarts and bounds.

#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::model::{NetworkAddr, Service, ServicePort, TunnelProtocol, Workload};
use mesh_xds::client::{AdsClientBuilder, AdsConfig, AdsHandle, Backoff, Watch, ZtunnelNode};
use mesh_xds::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use mesh_xds::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use mesh_xds::proto::istio::workload as pb;
use mesh_xds::server::{
    AdsEvent, AdsLimits, AdsService, ResourcePublisher, ResourceSnapshot, ServedResource, resources_from_mesh,
};
use mesh_xds::{ADDRESS_TYPE_URL, XdsAddress, XdsAuthorization};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

/// Every wait in these tests is bounded by this.
const WAIT: Duration = Duration::from_secs(10);

fn workload(name: &str, ip: &str) -> Workload {
    let mut workload = Workload::new(format!("cluster1//v1/Pod/default/{name}"), name, "default");
    workload.service_account = name.into();
    workload.addresses = vec![ip.parse().unwrap()];
    workload.protocol = TunnelProtocol::Hbone;
    workload
}

fn service(name: &str, vip: &str) -> Service {
    let mut service = Service::new(name, "default", format!("{name}.default.svc.cluster.local"));
    service.vips = vec![NetworkAddr::on_default_network(vip.parse().unwrap())];
    service.ports = vec![ServicePort::new(80, 8080)];
    service
}

fn policy(name: &str) -> XdsAuthorization {
    XdsAuthorization {
        name: name.into(),
        namespace: "default".into(),
        scope: mesh_xds::authz::AuthzScope::Namespace,
        action: mesh_xds::authz::AuthzAction::Deny,
        dry_run: false,
        rules: Vec::new(),
    }
}

/// An ADS server on a loopback port, stoppable.
struct TestServer {
    addr: SocketAddr,
    service: AdsService,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl TestServer {
    async fn start(publisher: ResourcePublisher, limits: AdsLimits) -> TestServer {
        Self::start_on("127.0.0.1:0".parse().unwrap(), publisher, limits).await
    }

    async fn start_on(addr: SocketAddr, publisher: ResourcePublisher, limits: AdsLimits) -> TestServer {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = AdsService::new(publisher, limits);
        let (stop, stopped) = oneshot::channel::<()>();
        let grpc = service.clone().into_server();
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .serve_with_incoming_shutdown(grpc, TcpIncoming::from(listener), async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        TestServer {
            addr,
            service,
            stop: Some(stop),
            task,
        }
    }

    /// Stops accepting and closes every stream.
    async fn stop(mut self) {
        self.service.close();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("the server did not stop")
            .unwrap();
    }
}

struct TestClient {
    addresses: Watch<XdsAddress>,
    policies: Watch<XdsAuthorization>,
    handle: AdsHandle,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for TestClient {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn node() -> ZtunnelNode {
    ZtunnelNode {
        instance_ip: "10.0.0.5".into(),
        pod_name: "ztunnel-abcde".into(),
        pod_namespace: "istio-system".into(),
        node_name: "node-a".into(),
        cluster_id: Some("Kubernetes".into()),
        metadata: Vec::new(),
    }
}

fn start_client(addr: SocketAddr, on_demand: bool) -> TestClient {
    let mut builder = AdsClientBuilder::new(node().to_proto()).config(AdsConfig {
        backoff: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
        },
        connect_timeout: Duration::from_secs(2),
        ..AdsConfig::default()
    });
    let addresses = if on_demand {
        builder.watch_on_demand::<XdsAddress>()
    } else {
        builder.watch::<XdsAddress>()
    };
    let policies = builder.watch::<XdsAuthorization>();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
    let (client, handle) = builder.build(channel, |request: tonic::Request<()>| Ok(request));
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(client.run(async {
        let _ = stopped.await;
    }));
    TestClient {
        addresses,
        policies,
        handle,
        stop: Some(stop),
    }
}

/// Waits until `check` holds for the watch's state.
async fn until<T>(watch: &mut Watch<T>, what: &str, check: impl Fn(&mesh_xds::client::Resources<T>) -> bool) {
    let outcome = tokio::time::timeout(WAIT, async {
        loop {
            if check(&watch.current()) {
                return;
            }
            watch.changed().await.expect("client stopped");
        }
    })
    .await;
    assert!(outcome.is_ok(), "timed out waiting for: {what}");
}

fn workload_ip(resources: &mesh_xds::client::Resources<XdsAddress>, uid: &str) -> Option<IpAddr> {
    match &**resources.get(uid)? {
        XdsAddress::Workload(workload) => workload.addresses.first().copied(),
        XdsAddress::Service(_) => None,
    }
}

#[tokio::test]
async fn add_update_and_remove_workloads_services_and_policies() {
    let publisher = ResourcePublisher::new(resources_from_mesh(
        &[workload("a", "198.18.0.1"), workload("b", "198.18.0.2")],
        &[service("echo", "198.19.0.10")],
        &[policy("deny-all")],
    ));
    let server = TestServer::start(publisher.clone(), AdsLimits::default()).await;
    let mut client = start_client(server.addr, false);

    tokio::time::timeout(WAIT, client.handle.wait_ready())
        .await
        .unwrap()
        .unwrap();
    until(&mut client.addresses, "two workloads and a service", |r| {
        r.len() == 3
    })
    .await;
    until(&mut client.policies, "the policy", |r| {
        r.get("default/deny-all").is_some()
    })
    .await;
    let held = client.addresses.current();
    assert_eq!(
        workload_ip(&held, "cluster1//v1/Pod/default/a"),
        Some("198.18.0.1".parse().unwrap())
    );
    match &**held.get("default/echo.default.svc.cluster.local").unwrap() {
        XdsAddress::Service(echo) => assert_eq!(echo.ports[0].target_port, 8080),
        other => panic!("expected the service, got {other:?}"),
    }

    // Update a, remove b and the policy, add c and a second policy.
    publisher.publish(resources_from_mesh(
        &[workload("a", "198.18.0.11"), workload("c", "198.18.0.3")],
        &[service("echo", "198.19.0.10")],
        &[policy("deny-other")],
    ));
    until(&mut client.addresses, "a moved, b gone, c added", |r| {
        workload_ip(r, "cluster1//v1/Pod/default/a") == Some("198.18.0.11".parse().unwrap())
            && r.get("cluster1//v1/Pod/default/b").is_none()
            && r.get("cluster1//v1/Pod/default/c").is_some()
            && r.len() == 3
    })
    .await;
    until(&mut client.policies, "policies swapped", |r| {
        r.len() == 1 && r.get("default/deny-other").is_some()
    })
    .await;
    let status = client.handle.status();
    assert!(status.connected);
    assert_eq!(status.nacks, 0, "{status:?}");
    server.stop().await;
}

#[tokio::test]
async fn an_invalid_resource_is_nacked_by_name_while_the_valid_ones_apply() {
    let mut resources = resources_from_mesh(&[workload("good", "198.18.0.1")], &[], &[]);
    // Five address bytes: no IP version has that.
    let bad = pb::Address {
        r#type: Some(pb::address::Type::Workload(pb::Workload {
            uid: "cluster1//v1/Pod/default/bad".into(),
            name: "bad".into(),
            namespace: "default".into(),
            addresses: vec![vec![1, 2, 3, 4, 5].into()],
            ..Default::default()
        })),
    };
    resources.insert_message(ADDRESS_TYPE_URL, "cluster1//v1/Pod/default/bad", Vec::new(), &bad);
    let publisher = ResourcePublisher::new(resources);
    let server = TestServer::start(publisher, AdsLimits::default()).await;
    let mut events = server.service.events();
    let mut client = start_client(server.addr, false);

    until(&mut client.addresses, "the good workload", |r| {
        r.get("cluster1//v1/Pod/default/good").is_some()
    })
    .await;
    assert!(
        client
            .addresses
            .current()
            .get("cluster1//v1/Pod/default/bad")
            .is_none()
    );

    let nack = tokio::time::timeout(WAIT, async {
        loop {
            if let AdsEvent::Nack {
                message, type_url, ..
            } = events.recv().await.unwrap()
            {
                return (type_url, message);
            }
        }
    })
    .await
    .expect("the server saw no NACK");
    assert_eq!(nack.0, ADDRESS_TYPE_URL);
    assert_eq!(
        nack.1,
        "cluster1//v1/Pod/default/bad: workload cluster1//v1/Pod/default/bad: addresses[0]: \
         5 bytes is not an IPv4 or IPv6 address"
    );
    let status = client.handle.status();
    assert_eq!(status.nacks, 1, "{status:?}");
    assert_eq!(status.last_nack.as_deref(), Some(nack.1.as_str()));
    server.stop().await;
}

#[tokio::test]
async fn the_client_keeps_its_state_across_a_server_restart_and_reconverges() {
    let publisher = ResourcePublisher::new(resources_from_mesh(
        &[workload("a", "198.18.0.1"), workload("b", "198.18.0.2")],
        &[],
        &[policy("p1")],
    ));
    let server = TestServer::start(publisher, AdsLimits::default()).await;
    let addr = server.addr;
    let mut client = start_client(addr, false);
    until(&mut client.addresses, "both workloads", |r| r.len() == 2).await;
    until(&mut client.policies, "the policy", |r| r.len() == 1).await;

    server.stop().await;
    let mut status = client.handle.status_watch();
    tokio::time::timeout(WAIT, status.wait_for(|s| !s.connected))
        .await
        .expect("the client did not notice the server stopped")
        .unwrap();
    // Disconnected: the last state stays, and readiness with it.
    assert_eq!(client.addresses.current().len(), 2);
    assert!(client.handle.is_ready());

    // The server comes back on the same address with a changed configuration: b is gone, c is new, a is
    // unchanged (same version, so it need not be sent again).
    let publisher = ResourcePublisher::new(resources_from_mesh(
        &[workload("a", "198.18.0.1"), workload("c", "198.18.0.3")],
        &[],
        &[policy("p1")],
    ));
    let server = TestServer::start_on(addr, publisher, AdsLimits::default()).await;
    until(
        &mut client.addresses,
        "reconverged on the new configuration",
        |r| {
            r.len() == 2
                && r.get("cluster1//v1/Pod/default/a").is_some()
                && r.get("cluster1//v1/Pod/default/c").is_some()
        },
    )
    .await;
    assert_eq!(client.policies.current().len(), 1);
    assert!(client.handle.status().connects >= 2);
    server.stop().await;
}

#[tokio::test]
async fn initial_resource_versions_spare_resending_what_the_client_holds() {
    let publisher = ResourcePublisher::new(resources_from_mesh(&[workload("a", "198.18.0.1")], &[], &[]));
    let server = TestServer::start(publisher.clone(), AdsLimits::default()).await;
    let addr = server.addr;
    let mut client = start_client(addr, false);
    until(&mut client.addresses, "a", |r| r.len() == 1).await;
    let revision = client.addresses.current().revision();
    server.stop().await;

    // Same resources after the restart: the first response for addresses is empty, and the state the
    // client holds is the same objects.
    let before = client
        .addresses
        .current()
        .get("cluster1//v1/Pod/default/a")
        .unwrap()
        .clone();
    let server = TestServer::start_on(addr, publisher, AdsLimits::default()).await;
    let mut status = client.handle.status_watch();
    tokio::time::timeout(
        WAIT,
        status.wait_for(|s| s.connected && s.connects >= 2 && s.responses >= 4),
    )
    .await
    .expect("no reconnect")
    .unwrap();
    let after = client.addresses.current();
    assert!(
        after.revision() > revision,
        "the reconnect's first response was applied"
    );
    assert!(
        Arc::ptr_eq(&before, after.get("cluster1//v1/Pod/default/a").unwrap()),
        "the unchanged workload was sent again"
    );
    server.stop().await;
}

#[tokio::test]
async fn on_demand_lookups_by_alias_and_for_missing_names() {
    let publisher = ResourcePublisher::new(resources_from_mesh(
        &[workload("a", "198.18.0.1"), workload("b", "198.18.0.2")],
        &[service("echo", "198.19.0.10")],
        &[],
    ));
    let server = TestServer::start(publisher.clone(), AdsLimits::default()).await;
    let mut client = start_client(server.addr, true);
    tokio::time::timeout(WAIT, client.handle.wait_ready())
        .await
        .unwrap()
        .unwrap();
    assert!(
        client.addresses.current().is_empty(),
        "on-demand starts with nothing"
    );

    tokio::time::timeout(WAIT, client.handle.demand::<XdsAddress>("/198.18.0.2"))
        .await
        .unwrap()
        .unwrap();
    let held = client.addresses.current();
    assert_eq!(held.len(), 1);
    assert_eq!(
        workload_ip(&held, "cluster1//v1/Pod/default/b"),
        Some("198.18.0.2".parse().unwrap())
    );

    tokio::time::timeout(WAIT, client.handle.demand::<XdsAddress>("/198.18.9.9"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        client.addresses.current().len(),
        1,
        "an unknown name adds nothing"
    );

    // A demanded resource keeps being updated.
    publisher.publish(resources_from_mesh(
        &[workload("a", "198.18.0.1"), workload("b", "198.18.0.2")],
        &[service("echo", "198.19.0.10")],
        &[policy("later")],
    ));
    until(
        &mut client.policies,
        "the wildcard type still follows changes",
        |r| r.len() == 1,
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn a_server_refuses_streams_over_its_limit() {
    let publisher = ResourcePublisher::new(ResourceSnapshot::new());
    let limits = AdsLimits {
        max_streams: 1,
        ..AdsLimits::default()
    };
    let server = TestServer::start(publisher, limits).await;
    let first = start_client(server.addr, false);
    tokio::time::timeout(WAIT, first.handle.wait_ready())
        .await
        .unwrap()
        .unwrap();

    let second = start_client(server.addr, false);
    let mut status = second.handle.status_watch();
    let refused = tokio::time::timeout(WAIT, status.wait_for(|s| s.last_error.is_some()))
        .await
        .expect("the second client was not refused")
        .unwrap()
        .clone();
    assert!(
        refused
            .last_error
            .as_deref()
            .unwrap()
            .contains("too many ADS streams"),
        "{refused:?}"
    );
    assert!(!second.handle.is_ready());
    server.stop().await;
}

#[tokio::test]
async fn a_resource_that_does_not_decode_is_refused_by_name() {
    let mut resources = resources_from_mesh(&[workload("good", "198.18.0.1")], &[], &[]);
    // Field 1 (a workload) announced as 5 bytes long, with 1 present.
    resources.insert(
        ADDRESS_TYPE_URL,
        ServedResource::new("truncated", Vec::new(), vec![0x0a, 0x05, 0x01].into()),
    );
    let publisher = ResourcePublisher::new(resources);
    let server = TestServer::start(publisher, AdsLimits::default()).await;
    let mut client = start_client(server.addr, false);
    let mut status = client.handle.status_watch();
    let nacked = tokio::time::timeout(WAIT, status.wait_for(|s| s.nacks > 0))
        .await
        .expect("no NACK")
        .unwrap()
        .clone();
    let message = nacked.last_nack.unwrap();
    assert!(
        message.starts_with("truncated: istio.workload.Address does not decode: "),
        "{message}"
    );
    until(&mut client.addresses, "the good workload", |r| r.len() == 1).await;
    server.stop().await;
}

#[tokio::test]
async fn the_mesh_snapshot_follows_the_address_resources() {
    let mut backend = workload("b", "198.18.0.2");
    backend.services.insert(
        "default/echo.default.svc.cluster.local".parse().unwrap(),
        [(80, 8080)].into(),
    );
    // c claims b's IP: a removal still in flight. b (first by name) keeps it.
    let squatter = workload("c", "198.18.0.2");
    let publisher = ResourcePublisher::new(resources_from_mesh(
        &[workload("a", "198.18.0.1"), backend, squatter],
        &[service("echo", "198.19.0.10")],
        &[],
    ));
    let server = TestServer::start(publisher.clone(), AdsLimits::default()).await;
    let client = start_client(server.addr, false);
    let snapshots = mesh_core::model::SnapshotPublisher::new();
    let mut receiver = snapshots.subscribe();
    tokio::spawn(mesh_xds::client::publish_snapshots(
        client.addresses.clone(),
        snapshots,
    ));

    let snapshot = tokio::time::timeout(WAIT, async {
        loop {
            let snapshot = receiver.current();
            if snapshot.workload_count() == 3 {
                return snapshot;
            }
            receiver.changed().await.expect("publisher gone");
        }
    })
    .await
    .expect("no snapshot with the three workloads");
    let by_ip = snapshot
        .workload_by_ip("", "198.18.0.2".parse().unwrap())
        .unwrap();
    assert_eq!(by_ip.uid.as_ref(), "cluster1//v1/Pod/default/b");
    let echo = snapshot
        .service("default", "echo.default.svc.cluster.local")
        .unwrap();
    assert_eq!(snapshot.endpoints_of(echo).len(), 1);

    // The squatter goes away: nothing else changes.
    publisher.publish(resources_from_mesh(
        &[workload("a", "198.18.0.1"), {
            let mut b = workload("b", "198.18.0.2");
            b.services.insert(
                "default/echo.default.svc.cluster.local".parse().unwrap(),
                [(80, 8080)].into(),
            );
            b
        }],
        &[service("echo", "198.19.0.10")],
        &[],
    ));
    tokio::time::timeout(WAIT, async {
        while receiver.current().workload_count() != 2 {
            receiver.changed().await.expect("publisher gone");
        }
    })
    .await
    .expect("the snapshot did not follow the removal");
    server.stop().await;
}

#[tokio::test]
async fn a_nack_of_a_large_push_stays_small_enough_for_the_server_to_read() {
    // Many resources this client cannot decode (as a newer control plane's might be), with long names:
    // listing them all would make a NACK larger than the server's 4 MiB request limit.
    const BAD: usize = 30_000;
    let mut resources = resources_from_mesh(&[workload("good", "198.18.0.1")], &[], &[]);
    for index in 0..BAD {
        let name = format!("{index:0>120}");
        resources.insert(
            ADDRESS_TYPE_URL,
            ServedResource::new(name, Vec::new(), vec![0x0a, 0x05, 0x01].into()),
        );
    }
    let publisher = ResourcePublisher::new(resources);
    let server = TestServer::start(publisher, AdsLimits::default()).await;
    let mut events = server.service.events();
    let mut client = start_client(server.addr, false);

    let message = tokio::time::timeout(WAIT, async {
        loop {
            if let AdsEvent::Nack { message, .. } = events.recv().await.unwrap() {
                return message;
            }
        }
    })
    .await
    .expect("the server never read the NACK");
    assert!(
        message.len() <= mesh_xds::client::MAX_NACK_DETAIL_BYTES + 64,
        "{} bytes",
        message.len()
    );
    assert!(
        message.starts_with("000000"),
        "{}",
        &message[..message.len().min(200)]
    );
    assert!(
        message.ends_with(" more refused"),
        "{}",
        &message[message.len().saturating_sub(200)..]
    );
    until(&mut client.addresses, "the good workload", |r| {
        r.get("cluster1//v1/Pod/default/good").is_some()
    })
    .await;
    let status = client.handle.status();
    assert_eq!(status.connects, 1, "the stream was reset: {status:?}");
    server.stop().await;
}

/// An ADS server that answers each type's first request with nothing, reports each on-demand
/// subscription, and answers it (with workload `b` under the demanded alias) only once released.
#[derive(Clone)]
struct GatedServer {
    subscribed: tokio::sync::mpsc::Sender<Vec<String>>,
    release: tokio::sync::watch::Receiver<bool>,
}

type DeltaStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<DeltaDiscoveryResponse, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for GatedServer {
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn delta_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<DeltaStream>, tonic::Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let subscribed = self.subscribed.clone();
        let mut release = self.release.clone();
        tokio::spawn(async move {
            let mut nonce = 0u32;
            while let Ok(Some(request)) = requests.message().await {
                if !request.response_nonce.is_empty() {
                    continue;
                }
                nonce += 1;
                let mut response = DeltaDiscoveryResponse {
                    type_url: request.type_url.clone(),
                    nonce: nonce.to_string(),
                    ..Default::default()
                };
                if request.node.is_none() {
                    let names = request.resource_names_subscribe.clone();
                    let _ = subscribed.send(names.clone()).await;
                    let _ = release.wait_for(|released| *released).await;
                    let address = pb::Address {
                        r#type: Some(pb::address::Type::Workload(mesh_xds::workload_to_proto(
                            &workload("b", "198.18.0.2"),
                        ))),
                    };
                    response.resources.push(Resource {
                        name: "cluster1//v1/Pod/default/b".into(),
                        aliases: names,
                        version: "1".into(),
                        resource: Some(prost_types::Any {
                            type_url: ADDRESS_TYPE_URL.into(),
                            value: prost::Message::encode_to_vec(&address),
                        }),
                        ..Default::default()
                    });
                }
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        });
        let responses = futures_util::stream::unfold(rx, |mut rx| async move {
            let item = rx.recv().await?;
            Some((item, rx))
        });
        Ok(tonic::Response::new(Box::pin(responses)))
    }
}

#[tokio::test]
async fn a_second_demand_for_a_pending_name_waits_for_the_answer() {
    let (subscribed_tx, mut subscribed) = tokio::sync::mpsc::channel(4);
    let (release_tx, release) = tokio::sync::watch::channel(false);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let gated = GatedServer {
        subscribed: subscribed_tx,
        release,
    };
    tokio::spawn(tonic::transport::Server::builder().serve_with_incoming(
        AggregatedDiscoveryServiceServer::new(gated),
        TcpIncoming::from(listener),
    ));
    let client = start_client(addr, true);
    tokio::time::timeout(WAIT, client.handle.wait_ready())
        .await
        .unwrap()
        .unwrap();

    let handle = client.handle.clone();
    let first = tokio::spawn(async move { handle.demand::<XdsAddress>("/198.18.0.2").await });
    let names = tokio::time::timeout(WAIT, subscribed.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(names, ["/198.18.0.2"]);

    // The answer comes a little later, so the second demand reaches the client while the first one is
    // still pending. (Should it come first instead, the second demand's answer is right either way.)
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = release_tx.send(true);
    });
    tokio::time::timeout(WAIT, client.handle.demand::<XdsAddress>("/198.18.0.2"))
        .await
        .unwrap()
        .unwrap();
    assert!(
        client
            .addresses
            .peek()
            .get("cluster1//v1/Pod/default/b")
            .is_some(),
        "the second demand returned before the control plane answered"
    );
    tokio::time::timeout(WAIT, first).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn demanding_a_held_resource_by_its_own_name_is_answered() {
    let publisher = ResourcePublisher::new(resources_from_mesh(
        &[workload("a", "198.18.0.1"), workload("b", "198.18.0.2")],
        &[],
        &[],
    ));
    let server = TestServer::start(publisher, AdsLimits::default()).await;
    let client = start_client(server.addr, true);
    tokio::time::timeout(WAIT, client.handle.wait_ready())
        .await
        .unwrap()
        .unwrap();
    // Held once asked for by address...
    tokio::time::timeout(WAIT, client.handle.demand::<XdsAddress>("/198.18.0.2"))
        .await
        .unwrap()
        .unwrap();
    assert!(
        client
            .addresses
            .peek()
            .get("cluster1//v1/Pod/default/b")
            .is_some()
    );
    // ...then by its name: the control plane must still answer the new subscription.
    tokio::time::timeout(
        WAIT,
        client.handle.demand::<XdsAddress>("cluster1//v1/Pod/default/b"),
    )
    .await
    .expect("the subscription to a held resource was never answered")
    .unwrap();
    assert_eq!(client.addresses.peek().len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn readiness_can_wait_for_the_snapshot_built_from_the_first_push() {
    let publisher = ResourcePublisher::new(resources_from_mesh(
        &[workload("a", "198.18.0.1"), workload("b", "198.18.0.2")],
        &[service("echo", "198.19.0.10")],
        &[],
    ));
    let server = TestServer::start(publisher, AdsLimits::default()).await;
    let client = start_client(server.addr, false);
    let snapshots = mesh_core::model::SnapshotPublisher::new();
    let receiver = snapshots.subscribe();
    let (built_from, mut published) = tokio::sync::watch::channel(0);
    tokio::spawn(mesh_xds::client::publish_snapshots_reporting(
        client.addresses.clone(),
        snapshots,
        built_from,
    ));

    tokio::time::timeout(WAIT, client.handle.wait_ready())
        .await
        .unwrap()
        .unwrap();
    let held = client.addresses.peek().revision();
    assert!(held > 0);
    tokio::time::timeout(WAIT, published.wait_for(|revision| *revision >= held))
        .await
        .expect("no snapshot from the first push")
        .unwrap();
    let snapshot = receiver.current();
    assert_eq!(snapshot.workload_count(), 2);
    assert_eq!(snapshot.service_count(), 1);
    server.stop().await;
}

#[tokio::test]
async fn publish_policies_sends_the_held_set_and_every_change() {
    let publisher = ResourcePublisher::new(resources_from_mesh(
        &[workload("a", "198.18.0.1")],
        &[],
        &[policy("p1")],
    ));
    let server = TestServer::start(publisher.clone(), AdsLimits::default()).await;
    let client = start_client(server.addr, false);
    let (sets_tx, mut sets) = tokio::sync::watch::channel(Arc::new(mesh_policy::L4PolicySet::default()));
    tokio::spawn(mesh_xds::client::publish_policies(
        client.policies.clone(),
        sets_tx,
    ));
    async fn wait_for(sets: &tokio::sync::watch::Receiver<Arc<mesh_policy::L4PolicySet>>, want: &[&str]) {
        let mut sets = sets.clone();
        let names = |set: &mesh_policy::L4PolicySet| {
            let mut names: Vec<String> = set.iter().map(|policy| policy.name.to_string()).collect();
            names.sort();
            names
        };
        tokio::time::timeout(WAIT, sets.wait_for(|set| names(set) == want))
            .await
            .unwrap_or_else(|_| panic!("no policy set with {want:?}"))
            .unwrap();
    }
    wait_for(&sets, &["p1"]).await;
    publisher.publish(resources_from_mesh(
        &[workload("a", "198.18.0.1")],
        &[],
        &[policy("p1"), policy("p2")],
    ));
    wait_for(&sets, &["p1", "p2"]).await;
    publisher.publish(resources_from_mesh(&[workload("a", "198.18.0.1")], &[], &[]));
    wait_for(&sets, &[]).await;
    assert!(sets.borrow_and_update().is_empty());
    server.stop().await;
}
