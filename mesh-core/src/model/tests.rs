use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use test_case::test_case;

use super::*;
use crate::identity::TrustDomain;

const ECHO_HOST: &str = "echo.default.svc.cluster.local";
const CLIENT_UID: &str = "cluster1//v1/Pod/default/client";
const SERVER_UID: &str = "cluster1//v1/Pod/default/server";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn addr(s: &str) -> NetworkAddr {
    s.parse().unwrap()
}

fn echo_key() -> NamespacedHostname {
    NamespacedHostname::new("default", ECHO_HOST)
}

/// The two-workload example of PROTOCOLS.md 2.2.
fn client() -> Workload {
    Workload {
        service_account: "client".into(),
        addresses: vec![ip("198.18.0.1")],
        protocol: TunnelProtocol::Hbone,
        node: "node-a".into(),
        ..Workload::new(CLIENT_UID, "client", "default")
    }
}

fn server() -> Workload {
    Workload {
        service_account: "server".into(),
        addresses: vec![ip("198.18.0.2")],
        protocol: TunnelProtocol::Hbone,
        node: "node-b".into(),
        services: BTreeMap::from([(echo_key(), PortMap::from([(80, 8080)]))]),
        ..Workload::new(SERVER_UID, "server", "default")
    }
}

fn echo() -> Service {
    Service {
        vips: vec![addr("/198.19.0.10")],
        ports: vec![ServicePort::new(80, 8080), ServicePort::new(5201, 5201)],
        ..Service::new("echo", "default", ECHO_HOST)
    }
}

fn example() -> MeshSnapshot {
    MeshSnapshot::builder()
        .add_workload(client())
        .add_workload(server())
        .add_service(echo())
        .build()
        .unwrap()
}

#[test]
fn workload_lookups() {
    let snapshot = example();
    assert_eq!(snapshot.workload_count(), 2);
    assert_eq!(
        snapshot.workload_by_uid(CLIENT_UID).unwrap().name.as_ref(),
        "client"
    );
    assert!(
        snapshot
            .workload_by_uid("cluster1//v1/Pod/default/nobody")
            .is_none()
    );

    let by_addr = snapshot.workload_by_addr(&addr("/198.18.0.2")).unwrap();
    assert_eq!(by_addr.uid.as_ref(), SERVER_UID);
    assert_eq!(
        snapshot
            .workload_by_ip("", ip("198.18.0.1"))
            .unwrap()
            .uid
            .as_ref(),
        CLIENT_UID
    );
    assert!(snapshot.workload_by_ip("", ip("198.18.0.3")).is_none());
    assert!(
        snapshot.workload_by_ip("other", ip("198.18.0.1")).is_none(),
        "scoped by network"
    );
    // A dual-stack socket reports an IPv4 destination as IPv4-mapped IPv6.
    let mapped = IpAddr::V6(Ipv4Addr::new(198, 18, 0, 1).to_ipv6_mapped());
    assert_eq!(
        snapshot.workload_by_ip("", mapped).unwrap().uid.as_ref(),
        CLIENT_UID
    );

    let uids: Vec<_> = snapshot.workloads().map(|w| w.uid.clone()).collect();
    assert_eq!(uids, [Arc::from(CLIENT_UID), Arc::from(SERVER_UID)]);
}

#[test]
fn service_lookups() {
    let snapshot = example();
    assert_eq!(snapshot.service_count(), 1);
    let by_vip = snapshot.service_by_vip(&addr("/198.19.0.10")).unwrap();
    assert_eq!(by_vip.hostname.as_ref(), ECHO_HOST);
    assert!(snapshot.service_by_vip(&addr("/198.19.0.11")).is_none());
    assert!(snapshot.service_by_ip("other", ip("198.19.0.10")).is_none());
    assert!(
        snapshot.service_by_vip(&addr("/198.18.0.2")).is_none(),
        "a workload IP is not a VIP"
    );

    assert_eq!(
        snapshot.service_by_hostname(&echo_key()).unwrap().name.as_ref(),
        "echo"
    );
    assert!(snapshot.service("other", ECHO_HOST).is_none());
    assert!(snapshot.service_by_bare_hostname(ECHO_HOST).is_some());
    assert!(snapshot.service_by_bare_hostname("echo").is_none());
    assert_eq!(snapshot.services().count(), 1);
    assert_eq!(by_vip.port(80).unwrap().target_port, 8080);
    assert!(by_vip.port(81).is_none());
}

#[test]
fn bare_hostname_in_two_namespaces_is_ambiguous() {
    let snapshot = MeshSnapshot::builder()
        .add_service(Service::new("api", "team-a", "api.example.com"))
        .add_service(Service::new("api", "team-b", "api.example.com"))
        .build()
        .unwrap();
    assert!(snapshot.service_by_bare_hostname("api.example.com").is_none());
    let namespaces: Vec<_> = snapshot
        .services_by_bare_hostname("api.example.com")
        .map(|s| s.namespace.clone())
        .collect();
    assert_eq!(namespaces, [Arc::from("team-a"), Arc::from("team-b")]);
    assert_eq!(
        snapshot
            .service("team-b", "api.example.com")
            .unwrap()
            .namespace
            .as_ref(),
        "team-b"
    );
}

#[test]
fn endpoints_are_derived_from_workload_services() {
    let snapshot = example();
    let endpoints = snapshot.endpoints(&echo_key());
    assert_eq!(
        endpoints,
        [Endpoint {
            workload_uid: SERVER_UID.into(),
            service: echo_key(),
            port_map: PortMap::from([(80, 8080)]),
            status: HealthStatus::Healthy,
        }]
    );
    let service = snapshot.service_by_hostname(&echo_key()).unwrap();
    assert_eq!(snapshot.endpoints_of(service), endpoints);
    assert!(
        snapshot
            .endpoints(&NamespacedHostname::new("default", "nope"))
            .is_empty()
    );
}

#[test]
fn endpoint_status_follows_the_workload() {
    let snapshot = MeshSnapshot::builder()
        .add_service(echo())
        .add_workload(Workload {
            status: HealthStatus::Unhealthy,
            ..server()
        })
        .build()
        .unwrap();
    assert_eq!(snapshot.endpoints(&echo_key())[0].status, HealthStatus::Unhealthy);
}

#[test_case(&[(80, 9090)], 80 => Some(9090) ; "endpoint mapping wins")]
#[test_case(&[], 80 => Some(8080) ; "service target port")]
#[test_case(&[(80, 0)], 80 => Some(8080) ; "zero endpoint port falls back")]
#[test_case(&[(7000, 7001)], 7000 => Some(7001) ; "endpoint only port")]
#[test_case(&[], 443 => None ; "unknown port")]
#[test_case(&[], 9000 => None ; "service target port zero")]
fn endpoint_target_port(port_map: &[(u16, u16)], service_port: u16) -> Option<u16> {
    let service = Service {
        ports: vec![ServicePort::new(80, 8080), ServicePort::new(9000, 0)],
        ..echo()
    };
    let endpoint = Endpoint {
        workload_uid: SERVER_UID.into(),
        service: echo_key(),
        port_map: port_map.iter().copied().collect(),
        status: HealthStatus::Healthy,
    };
    endpoint.target_port(&service, service_port)
}

#[test]
fn workload_identity_and_addresses() {
    let server = server();
    assert_eq!(
        server.identity().unwrap().as_str(),
        "spiffe://cluster.local/ns/default/sa/server"
    );
    let other_td = Workload {
        trust_domain: TrustDomain::new("example.org").unwrap(),
        ..server.clone()
    };
    assert_eq!(
        other_td.identity().unwrap().as_str(),
        "spiffe://example.org/ns/default/sa/server"
    );
    let no_sa = Workload {
        service_account: "".into(),
        ..server.clone()
    };
    assert!(no_sa.identity().is_err());
    let addrs: Vec<_> = server.network_addrs().collect();
    assert_eq!(addrs, [addr("/198.18.0.2")]);
    assert_eq!(Workload::new("u", "n", "ns").service_account.as_ref(), "default");
}

#[test]
fn same_ip_on_two_networks_is_fine() {
    let on_b = |w: Workload| Workload {
        uid: format!("{}-b", w.uid).into(),
        network: "network-b".into(),
        services: BTreeMap::new(),
        ..w
    };
    let echo_b = Service {
        vips: vec![addr("network-b/198.19.0.10")],
        ..Service::new("echo", "other", ECHO_HOST)
    };
    let snapshot = MeshSnapshot::builder()
        .add_workload(client())
        .add_workload(on_b(client()))
        .add_service(echo())
        .add_service(echo_b)
        .build()
        .unwrap();
    let a = snapshot.workload_by_addr(&addr("/198.18.0.1")).unwrap();
    let b = snapshot.workload_by_addr(&addr("network-b/198.18.0.1")).unwrap();
    assert_eq!(a.uid.as_ref(), CLIENT_UID);
    assert_eq!(b.uid.as_ref(), "cluster1//v1/Pod/default/client-b");
    let vip_b = snapshot.service_by_vip(&addr("network-b/198.19.0.10")).unwrap();
    assert_eq!(vip_b.namespace.as_ref(), "other");
}

#[test]
fn repeating_own_address_is_not_a_conflict() {
    let snapshot = MeshSnapshot::builder()
        .add_workload(Workload {
            addresses: vec![ip("198.18.0.1"), ip("198.18.0.1")],
            ..client()
        })
        .add_service(Service {
            vips: vec![addr("/198.19.0.10"), addr("/198.19.0.10")],
            ..echo()
        })
        .build()
        .unwrap();
    assert_eq!(snapshot.workload_count(), 1);
}

fn build_with(workloads: Vec<Workload>, services: Vec<Service>) -> Result<MeshSnapshot, ModelError> {
    let mut builder = MeshSnapshot::builder();
    for workload in workloads {
        builder.add_workload(workload);
    }
    for service in services {
        builder.add_service(service);
    }
    builder.build()
}

#[test_case(vec![Workload { uid: "".into(), ..client() }], vec![]
    => matches Err(ModelError::EmptyUid { .. }) ; "empty uid")]
#[test_case(vec![client(), Workload { addresses: vec![], ..client() }], vec![]
    => matches Err(ModelError::DuplicateUid { .. }) ; "duplicate uid")]
#[test_case(vec![client(), Workload { uid: "other".into(), ..client() }], vec![]
    => matches Err(ModelError::DuplicateAddress { .. }) ; "duplicate address")]
#[test_case(vec![], vec![Service::new("echo", "default", "")]
    => matches Err(ModelError::EmptyHostname { .. }) ; "empty hostname")]
#[test_case(vec![], vec![echo(), Service { vips: vec![], ..echo() }]
    => matches Err(ModelError::DuplicateHostname { .. }) ; "duplicate hostname")]
#[test_case(vec![], vec![echo(), Service { namespace: "other".into(), ..echo() }]
    => matches Err(ModelError::DuplicateVip { .. }) ; "duplicate vip")]
#[test_case(vec![], vec![Service { ports: vec![ServicePort::new(80, 1), ServicePort::new(80, 2)], ..echo() }]
    => matches Err(ModelError::DuplicateServicePort { port: 80, .. }) ; "duplicate service port")]
#[test_case(vec![server()], vec![]
    => matches Err(ModelError::UnknownService { .. }) ; "unknown service")]
fn rejects(workloads: Vec<Workload>, services: Vec<Service>) -> Result<MeshSnapshot, ModelError> {
    build_with(workloads, services)
}

#[test]
fn conflict_errors_name_both_sides() {
    let err = build_with(
        vec![
            client(),
            Workload {
                uid: "intruder".into(),
                ..client()
            },
        ],
        vec![],
    )
    .unwrap_err();
    let ModelError::DuplicateAddress {
        address,
        first_uid,
        second_uid,
    } = &err
    else {
        panic!("{err:?}");
    };
    assert_eq!(
        (address, first_uid.as_ref(), second_uid.as_ref()),
        (&addr("/198.18.0.1"), CLIENT_UID, "intruder")
    );
    assert_eq!(
        err.to_string(),
        format!("address /198.18.0.1 is claimed by workloads {CLIENT_UID:?} and \"intruder\"")
    );

    let other = Service::new("other", "default", "other.default.svc.cluster.local");
    let err = build_with(
        vec![],
        vec![
            echo(),
            Service {
                vips: echo().vips,
                ..other
            },
        ],
    )
    .unwrap_err();
    let ModelError::DuplicateVip { vip, first, second } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(vip, &addr("/198.19.0.10"));
    assert_eq!(
        (first.to_string().as_str(), second.hostname.as_ref()),
        (
            "default/echo.default.svc.cluster.local",
            "other.default.svc.cluster.local"
        )
    );

    let err = build_with(vec![server()], vec![]).unwrap_err();
    assert!(
        matches!(&err, ModelError::UnknownService { workload_uid, service }
        if workload_uid.as_ref() == SERVER_UID && *service == echo_key())
    );
    // It converts into the crate's error, as `?` in a function returning `crate::Error` needs.
    assert!(matches!(
        crate::Error::from(err),
        crate::Error::Model(ModelError::UnknownService { .. })
    ));
}

#[test]
fn unknown_services_can_be_allowed() {
    let snapshot = MeshSnapshot::builder()
        .add_workload(server())
        .allow_unknown_services(true)
        .build()
        .unwrap();
    assert!(snapshot.endpoints(&echo_key()).is_empty());
    assert_eq!(
        snapshot.workload_by_uid(SERVER_UID).unwrap().services.len(),
        1,
        "the reference is kept"
    );
}

#[test]
fn builder_can_be_built_again() {
    let mut builder = MeshSnapshot::builder();
    builder.add_workload(client());
    assert_eq!(builder.build().unwrap().workload_count(), 1);
    let shared = Arc::new(server());
    builder.add_service(echo()).add_workload(shared.clone());
    let snapshot = builder.build().unwrap();
    assert!(
        Arc::ptr_eq(snapshot.workload_by_uid(SERVER_UID).unwrap(), &shared),
        "no deep copy"
    );
    assert!(MeshSnapshot::empty().is_empty() && !snapshot.is_empty());
}

#[test_case("/198.19.0.10", "", "198.19.0.10" ; "default network")]
#[test_case("network-b/10.0.0.1", "network-b", "10.0.0.1" ; "named network")]
#[test_case("net/2001:db8::1", "net", "2001:db8::1" ; "ipv6")]
fn parses_network_addr(input: &str, network: &str, ip_str: &str) {
    let parsed: NetworkAddr = input.parse().unwrap();
    assert_eq!(parsed, NetworkAddr::new(network, ip(ip_str)));
    assert_eq!(parsed.to_string(), input);
}

#[test_case("198.19.0.10" ; "no slash")]
#[test_case("/not-an-ip" ; "bad ip")]
#[test_case("a/b/10.0.0.1" ; "two slashes")]
#[test_case("/" ; "empty ip")]
fn rejects_network_addr(input: &str) {
    assert!(matches!(
        input.parse::<NetworkAddr>(),
        Err(ModelError::InvalidNetworkAddr { .. })
    ));
}

#[test]
fn parses_namespaced_hostname() {
    let key: NamespacedHostname = "default/echo.default.svc.cluster.local".parse().unwrap();
    assert_eq!(key, echo_key());
    assert_eq!(key.to_string(), "default/echo.default.svc.cluster.local");
    for bad in ["echo", "/echo", "default/", "a/b/c", ""] {
        assert!(
            matches!(
                bad.parse::<NamespacedHostname>(),
                Err(ModelError::InvalidNamespacedHostname { .. })
            ),
            "{bad:?}"
        );
    }
    let long = "x".repeat(1000);
    let Err(ModelError::InvalidNamespacedHostname { input }) = long.parse::<NamespacedHostname>() else {
        panic!("accepted");
    };
    assert!(input.len() < 140, "input is cut for logging");
}

#[test]
fn gateway_address_defaults_to_hbone_port() {
    let gw = GatewayAddress::address(addr("/198.18.0.9"));
    assert_eq!(gw.hbone_mtls_port, 15008);
    let gw = GatewayAddress::hostname(echo_key());
    assert_eq!(gw.destination, GatewayDestination::Hostname(echo_key()));
}

#[tokio::test]
async fn publisher_bumps_versions_and_wakes_receivers() {
    let publisher = SnapshotPublisher::new();
    let mut rx = publisher.subscribe();
    assert_eq!(rx.current().version(), 0);
    assert!(rx.current().is_empty());

    let waiter = tokio::spawn(async move {
        let snapshot = rx.changed().await.unwrap();
        (snapshot.version(), snapshot.workload_count(), rx)
    });
    tokio::task::yield_now().await;
    assert_eq!(publisher.publish(example()), 1);
    let (version, workloads, mut rx) = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((version, workloads), (1, 2));

    // Two publications while nobody waits are seen as one: the latest.
    assert_eq!(publisher.publish(MeshSnapshot::empty()), 2);
    assert_eq!(publisher.publish(example()), 3);
    assert_eq!(rx.changed().await.unwrap().version(), 3);
    assert_eq!(publisher.current().version(), 3);
    assert!(
        tokio::time::timeout(Duration::from_millis(20), rx.changed())
            .await
            .is_err(),
        "nothing new to see"
    );

    // A late subscriber starts from the current snapshot.
    let late = publisher.subscribe();
    assert_eq!(late.current().version(), 3);
}

#[tokio::test]
async fn dropping_the_publisher_closes_after_the_last_snapshot() {
    let publisher = SnapshotPublisher::default();
    let mut rx = publisher.subscribe();
    let mut clone = rx.clone();
    publisher.publish(example());
    drop(publisher);
    assert_eq!(
        rx.changed().await.unwrap().version(),
        1,
        "the last publication is still delivered"
    );
    assert!(rx.changed().await.is_none());
    assert_eq!(
        clone.changed().await.unwrap().version(),
        1,
        "each clone tracks what it has seen"
    );
    assert_eq!(
        rx.current().workload_count(),
        2,
        "the last snapshot stays readable"
    );
}

#[tokio::test]
async fn publishing_from_several_threads_keeps_versions_unique() {
    let publisher = Arc::new(SnapshotPublisher::new());
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let publisher = publisher.clone();
            tokio::task::spawn_blocking(move || {
                (0..50)
                    .map(|_| publisher.publish(MeshSnapshot::empty()))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut versions = Vec::new();
    for task in tasks {
        versions.extend(task.await.unwrap());
    }
    versions.sort_unstable();
    assert_eq!(versions, (1..=400).collect::<Vec<u64>>());
}

#[tokio::test]
async fn fixed_receiver_never_changes() {
    let mut rx = SnapshotReceiver::fixed(example());
    assert_eq!(rx.current().workload_count(), 2);
    assert!(rx.changed().await.is_none());
}

#[test]
fn host_network_workloads_share_an_address_and_are_found_by_uid_only() {
    // Two host-network pods on one node have the node's IP; a normal pod with that IP would conflict.
    let node_ip: IpAddr = "172.18.0.2".parse().unwrap();
    let host_pod = |uid: &str| Workload {
        addresses: vec![node_ip],
        network_mode: NetworkMode::HostNetwork,
        ..Workload::new(uid, uid, "kube-system")
    };
    let snapshot = MeshSnapshot::builder()
        .add_workload(host_pod("node-exporter"))
        .add_workload(host_pod("kube-proxy"))
        .build()
        .unwrap();
    assert!(snapshot.workload_by_uid("node-exporter").is_some());
    assert!(snapshot.workload_by_uid("kube-proxy").is_some());
    assert!(
        snapshot.workload_by_ip("", node_ip).is_none(),
        "an address shared by host pods names none of them"
    );
}

#[test]
fn lenient_build_keeps_the_first_claim_and_reports_the_rest() {
    let thief = Workload {
        uid: "cluster1//v1/Pod/default/thief".into(),
        addresses: vec![ip("198.18.0.2"), ip("198.18.0.7")],
        ..client()
    };
    let echo_twin = Service {
        vips: vec![addr("/198.19.0.99")],
        ..echo()
    };
    let vip_thief = Service {
        vips: vec![addr("/198.19.0.10")],
        ..Service::new("other", "default", "other.default.svc.cluster.local")
    };
    let (snapshot, conflicts) = MeshSnapshot::builder()
        .add_workload(client())
        .add_workload(server())
        .add_workload(thief)
        .add_workload(Workload {
            addresses: vec![],
            ..client()
        })
        .add_workload(Workload {
            uid: "".into(),
            ..client()
        })
        .add_service(echo())
        .add_service(echo_twin)
        .add_service(vip_thief)
        .build_lenient();

    // The first claims stand, and everything consistent is indexed.
    assert_eq!(
        snapshot
            .workload_by_ip("", ip("198.18.0.2"))
            .unwrap()
            .uid
            .as_ref(),
        SERVER_UID
    );
    assert_eq!(
        snapshot
            .workload_by_ip("", ip("198.18.0.7"))
            .unwrap()
            .uid
            .as_ref(),
        "cluster1//v1/Pod/default/thief",
        "the later workload keeps its uncontested address"
    );
    assert_eq!(
        snapshot.workload_by_uid(CLIENT_UID).unwrap().addresses,
        [ip("198.18.0.1")]
    );
    assert_eq!(snapshot.workload_count(), 3);
    assert_eq!(
        snapshot
            .service_by_vip(&addr("/198.19.0.10"))
            .unwrap()
            .name
            .as_ref(),
        "echo"
    );
    assert!(
        snapshot.service_by_vip(&addr("/198.19.0.99")).is_none(),
        "the duplicate service is left out"
    );
    assert_eq!(snapshot.endpoints(&echo_key()).len(), 1);

    let mut kinds: Vec<&str> = conflicts
        .iter()
        .map(|conflict| match conflict {
            ModelError::DuplicateAddress { .. } => "address",
            ModelError::DuplicateUid { .. } => "uid",
            ModelError::EmptyUid { .. } => "empty uid",
            ModelError::DuplicateHostname { .. } => "hostname",
            ModelError::DuplicateVip { .. } => "vip",
            other => panic!("unexpected conflict {other}"),
        })
        .collect();
    kinds.sort_unstable();
    assert_eq!(kinds, ["address", "empty uid", "hostname", "uid", "vip"]);

    // Strict building refuses the same input.
    assert!(
        build_with(
            vec![
                client(),
                Workload {
                    addresses: vec![],
                    ..client()
                }
            ],
            vec![]
        )
        .is_err()
    );
}
