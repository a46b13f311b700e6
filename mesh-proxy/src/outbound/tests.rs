//! The routing table. Rows named `build_request_*`, `multiple_address_workload` and `service_ip_families`
//! reproduce the tests of the same name in Istio ztunnel's `src/proxy/outbound.rs`, on the same fixture
//! (a source at 127.0.0.1 and ::1 on `local-node`, a waypoint at 127.0.0.10 and a dual-stack waypoint at
//! 127.0.0.11 and ff06::c5), with namespaces filled in where ztunnel leaves them empty (our identities
//! require one). The other rows pin each routing rule. Every row asserts the whole result, and the
//! candidate counts the picker was offered.
//!
//! Not reproduced: ztunnel's `build_request_unknown_source` (here the caller finds the source workload
//! before routing), and the `IPV4_ONLY`/`IPV6_ONLY` parts of `service_ip_families` (the model has no
//! `ip_families` on services yet; the rows below cover the automatic and dual-stack behaviour).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mesh_core::SpiffeId;
use mesh_core::TrustDomain;
use mesh_core::model::{
    ApplicationTunnel, ApplicationTunnelProtocol, GatewayAddress, HealthPolicy, HealthStatus, LoadBalancing,
    LoadBalancingMode, Locality, LocalityScope, MeshSnapshot, NamespacedHostname, NetworkAddr, NetworkMode,
    PortMap, Service, ServicePort, TunnelProtocol, Workload,
};
use test_case::test_case;

use super::*;

mod rules;

// ---- Fixtures ----------------------------------------------------------------------------------------

const SOURCE: &str = "cluster1//v1/Pod/ns/source-workload";
const WAYPOINT: &str = "cluster1//v1/Pod/ns/waypoint-workload";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sock(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn id(namespace: &str, service_account: &str) -> SpiffeId {
    SpiffeId::istio(&TrustDomain::default(), namespace, service_account).unwrap()
}

/// A pod `name` in `namespace` with these addresses, plain TCP, healthy, on no node.
fn pod(namespace: &str, name: &str, addresses: &[&str]) -> Workload {
    Workload {
        addresses: addresses.iter().map(|a| ip(a)).collect(),
        ..Workload::new(format!("cluster1//v1/Pod/{namespace}/{name}"), name, namespace)
    }
}

fn source() -> Workload {
    Workload {
        node: "local-node".into(),
        ..pod("ns", "source-workload", &["127.0.0.1", "::1"])
    }
}

fn waypoint() -> Workload {
    Workload {
        node: "local-node".into(),
        service_account: "waypoint-sa".into(),
        ..pod("ns", "waypoint-workload", &["127.0.0.10"])
    }
}

fn waypoint_dual() -> Workload {
    Workload {
        node: "local-node".into(),
        service_account: "waypoint-sa".into(),
        ..pod("ns", "waypoint-workload-dual", &["127.0.0.11", "ff06::c5"])
    }
}

/// A service `host` in namespace `default` with these VIPs (on the default network) and port mappings.
fn svc(host: &str, vips: &[&str], ports: &[(u16, u16)]) -> Service {
    Service {
        vips: vips
            .iter()
            .map(|v| NetworkAddr::on_default_network(ip(v)))
            .collect(),
        ports: ports.iter().map(|&(p, t)| ServicePort::new(p, t)).collect(),
        ..Service::new(host, "default", host)
    }
}

/// The `services` entry making a workload an endpoint of `service` with this port map.
fn backs(service: &Service, ports: &[(u16, u16)]) -> BTreeMap<NamespacedHostname, PortMap> {
    BTreeMap::from([(service.key(), ports.iter().copied().collect())])
}

fn gateway_at(network: &str, addr: &str, port: u16) -> GatewayAddress {
    GatewayAddress {
        hbone_mtls_port: port,
        ..GatewayAddress::address(NetworkAddr::new(network, ip(addr)))
    }
}

fn gateway_named(service: &Service, port: u16) -> GatewayAddress {
    GatewayAddress {
        hbone_mtls_port: port,
        ..GatewayAddress::hostname(service.key())
    }
}

fn lb(mode: LoadBalancingMode, routing_preference: &[LocalityScope]) -> Option<LoadBalancing> {
    Some(LoadBalancing {
        routing_preference: routing_preference.to_vec(),
        mode,
        health_policy: HealthPolicy::OnlyHealthy,
    })
}

fn locality(region: &str, zone: &str) -> Option<Locality> {
    Some(Locality {
        region: region.into(),
        zone: zone.into(),
        subzone: "".into(),
    })
}

// ---- Expected routes -------------------------------------------------------------------------------

fn passthrough(destination: &str) -> Result<Route, RouteError> {
    Ok(Route::Passthrough {
        destination: sock(destination),
    })
}

fn tcp(destination: &str, workload: &Workload, service: Option<&Service>) -> Result<Route, RouteError> {
    Ok(Route::Tcp {
        destination: sock(destination),
        workload: Arc::new(workload.clone()),
        service: service.map(|s| Arc::new(s.clone())),
    })
}

/// An HBONE route whose expected identities are `workload`'s own followed by `extra`.
fn hbone(
    kind: HboneKind,
    (gateway, authority): (&str, &str),
    workload: &Workload,
    extra: &[SpiffeId],
    service: Option<&Service>,
) -> Result<Route, RouteError> {
    let mut expected_identities = vec![workload.identity().unwrap()];
    expected_identities.extend_from_slice(extra);
    Ok(Route::Hbone(HboneRoute {
        kind,
        gateway: sock(gateway),
        authority: sock(authority),
        expected_identities,
        workload: Arc::new(workload.clone()),
        service: service.map(|s| Arc::new(s.clone())),
    }))
}

/// A double-HBONE route for `service` port 80 through `gateway_workload` at `gateway`.
fn double_hbone(
    (gateway, gateway_workload): (&str, &Workload),
    workload: &Workload,
    service: &Service,
    via_waypoint: bool,
) -> Result<Route, RouteError> {
    Ok(Route::DoubleHbone(DoubleHboneRoute {
        network_gateway: sock(gateway),
        gateway_identities: vec![gateway_workload.identity().unwrap()],
        gateway_workload: Arc::new(gateway_workload.clone()),
        authority: ServiceAuthority {
            hostname: service.hostname.clone(),
            port: 80,
        },
        expected_identities: vec![workload.identity().unwrap()],
        workload: Arc::new(workload.clone()),
        service: Arc::new(service.clone()),
        via_waypoint,
    }))
}

// ---- The harness -----------------------------------------------------------------------------------

/// One row: a mesh (ztunnel's fixture plus `workloads` and `services`), a connection, and what must
/// come of it.
struct Case {
    workloads: Vec<Workload>,
    services: Vec<Service>,
    source: &'static str,
    from: IpAddr,
    to: SocketAddr,
    in_pod: bool,
    /// What the picker answers, call after call (0 once exhausted).
    picks: Vec<usize>,
    /// The candidate counts the picker must be offered, in order.
    candidates: Vec<usize>,
    expect: Result<Route, RouteError>,
}

impl Case {
    fn new(from: &str, to: &str, expect: Result<Route, RouteError>) -> Self {
        Case {
            workloads: vec![source(), waypoint(), waypoint_dual()],
            services: Vec::new(),
            source: SOURCE,
            from: ip(from),
            to: sock(to),
            in_pod: true,
            picks: Vec::new(),
            candidates: Vec::new(),
            expect,
        }
    }

    fn workload(mut self, workload: Workload) -> Self {
        self.workloads.push(workload);
        self
    }

    fn service(mut self, service: Service) -> Self {
        self.services.push(service);
        self
    }

    fn source(mut self, uid: &'static str) -> Self {
        self.source = uid;
        self
    }

    /// Places the fixture's source workload (the first one) in `region`/`zone`.
    fn source_locality(mut self, region: &str, zone: &str) -> Self {
        self.workloads[0].locality = locality(region, zone);
        self
    }

    fn shared_mode(mut self) -> Self {
        self.in_pod = false;
        self
    }

    fn candidates(mut self, candidates: &[usize]) -> Self {
        self.candidates = candidates.to_vec();
        self
    }

    fn picks(mut self, picks: &[usize]) -> Self {
        self.picks = picks.to_vec();
        self
    }

    fn run(self) {
        let mut builder = MeshSnapshot::builder();
        for w in self.workloads {
            builder.add_workload(w);
        }
        for s in self.services {
            builder.add_service(s);
        }
        let snapshot = builder.build().expect("a valid fixture");
        let source = snapshot
            .workload_by_uid(self.source)
            .expect("the source is in the fixture");
        let input = RouteInput {
            local_node: Some("local-node"),
            in_pod: self.in_pod,
            ..RouteInput::new(&snapshot, source, self.from, self.to)
        };
        let mut offered = Vec::new();
        let mut picks = self.picks.into_iter();
        let got = route(&input, &mut |candidates| {
            offered.push(candidates);
            picks.next().unwrap_or(0)
        });
        match (&got, &self.expect) {
            (Ok(got), Ok(want)) => assert_eq!(got, want),
            // RouteError carries mesh_core::Error, which has no PartialEq; its Debug form is the whole value.
            (Err(got), Err(want)) => assert_eq!(format!("{got:?}"), format!("{want:?}")),
            _ => panic!("got {got:?}\nwant {:?}", self.expect),
        }
        assert_eq!(offered, self.candidates, "candidate counts offered to the picker");
    }
}

// ---- ztunnel's build_request tests ------------------------------------------------------------------

fn build_request_unknown_dest() -> Case {
    Case::new("127.0.0.1", "1.2.3.4:80", passthrough("1.2.3.4:80")).workload(pod(
        "default",
        "my-pod",
        &["127.0.0.2"],
    ))
}

fn build_request_wrong_network() -> Case {
    let example = svc("example.com", &["127.0.0.3"], &[(80, 8080)]);
    let remote = Workload {
        network: "remote".into(),
        services: backs(&example, &[(80, 8080)]),
        ..pod("default", "remote-pod", &["10.0.0.2"])
    };
    let expect = Err(RouteError::NoNetworkGateway {
        workload: remote.uid.clone(),
        network: "remote".into(),
    });
    Case::new("127.0.0.1", "127.0.0.3:80", expect)
        .service(example)
        .workload(remote)
        .candidates(&[1])
}

/// ztunnel's `build_request_double_hbone`, first part: the E/W gateway is named by address.
fn build_request_double_hbone_gateway_address() -> Case {
    let example = svc("example.com", &["127.0.0.3"], &[(80, 8080)]);
    let remote = Workload {
        network: "remote".into(),
        network_gateway: Some(gateway_at("remote", "10.22.1.1", 15009)),
        services: backs(&example, &[(80, 8080)]),
        ..pod("default", "remote-pod", &[])
    };
    let ew = Workload {
        network: "remote".into(),
        ..pod("default", "ew-gtw", &["10.22.1.1"])
    };
    let expect = double_hbone(("10.22.1.1:15009", &ew), &remote, &example, false);
    Case::new("127.0.0.1", "127.0.0.3:80", expect)
        .service(example)
        .workload(remote)
        .workload(ew)
        .candidates(&[1])
}

/// Second part: the E/W gateway is named by a service hostname, whose endpoint maps 15009 to 15008.
fn build_request_double_hbone_gateway_hostname() -> Case {
    let example = svc("example.com", &["127.0.0.3"], &[(80, 8080)]);
    let ew_service = svc("ew-gtw", &["127.0.0.4"], &[(15009, 15009)]);
    let remote = Workload {
        network: "remote".into(),
        network_gateway: Some(gateway_named(&ew_service, 15009)),
        services: backs(&example, &[(80, 8080)]),
        ..pod("default", "remote-pod", &["127.0.0.6"])
    };
    let ew = Workload {
        network: "remote".into(),
        services: backs(&ew_service, &[(15009, 15008)]),
        ..pod("default", "ew-gtw", &["127.0.0.5"])
    };
    let expect = double_hbone(("127.0.0.5:15008", &ew), &remote, &example, false);
    Case::new("127.0.0.1", "127.0.0.3:80", expect)
        .service(example)
        .service(ew_service)
        .workload(remote)
        .workload(ew)
        .candidates(&[1, 1])
}

/// Third part: the service's waypoint is on the remote network, so the inner tunnel goes to it.
fn build_request_double_hbone_remote_waypoint() -> Case {
    let waypoint_service = svc("waypoint.com", &["127.0.0.4"], &[(15008, 15008)]);
    let example = Service {
        waypoint: Some(gateway_named(&waypoint_service, 15008)),
        ..svc("example.com", &["127.0.0.3"], &[(80, 8080)])
    };
    let remote_waypoint = Workload {
        network: "remote".into(),
        network_gateway: Some(gateway_at("remote", "10.22.1.1", 15009)),
        services: backs(&waypoint_service, &[(15008, 15008)]),
        ..pod("default", "remote-waypoint-pod", &[])
    };
    let ew = Workload {
        network: "remote".into(),
        ..pod("default", "remote-ew-gtw", &["10.22.1.1"])
    };
    let expect = double_hbone(("10.22.1.1:15009", &ew), &remote_waypoint, &example, true);
    Case::new("127.0.0.1", "127.0.0.3:80", expect)
        .service(example)
        .service(waypoint_service)
        .workload(remote_waypoint)
        .workload(ew)
        .candidates(&[1])
}

/// ztunnel's `build_request_failover_to_remote`: FAILOVER by network prefers the local endpoint while
/// it is healthy, and crosses to the remote network when it is not.
fn build_request_failover_to_remote(local_status: HealthStatus) -> Case {
    let example = Service {
        load_balancing: lb(LoadBalancingMode::Failover, &[LocalityScope::Network]),
        ..svc("example.com", &["127.0.0.3"], &[(80, 8080)])
    };
    let ew = Workload {
        network: "remote".into(),
        ..pod("default", "remote-ew-gtw", &["10.22.1.1"])
    };
    let remote = Workload {
        network: "remote".into(),
        network_gateway: Some(gateway_at("remote", "10.22.1.1", 15009)),
        services: backs(&example, &[(80, 8080)]),
        ..pod("default", "remote-example.com-pod", &[])
    };
    let local = Workload {
        protocol: TunnelProtocol::Hbone,
        status: local_status,
        services: backs(&example, &[(80, 8080)]),
        ..pod("default", "local-example.com-pod", &["127.0.0.2"])
    };
    let expect = match local_status {
        HealthStatus::Healthy => hbone(
            HboneKind::Direct,
            ("127.0.0.2:15008", "127.0.0.2:8080"),
            &local,
            &[],
            Some(&example),
        ),
        HealthStatus::Unhealthy => double_hbone(("10.22.1.1:15009", &ew), &remote, &example, false),
    };
    Case::new("127.0.0.1", "127.0.0.3:80", expect)
        .service(example)
        .workload(ew)
        .workload(remote)
        .workload(local)
        .candidates(&[1])
}

fn test_tcp(protocol: TunnelProtocol, node: &str) -> Workload {
    Workload {
        protocol,
        node: node.into(),
        ..pod("ns", "test-tcp", &["127.0.0.2"])
    }
}

fn build_request_known_dest_remote_node_tcp() -> Case {
    let dest = test_tcp(TunnelProtocol::None, "remote-node");
    Case::new("127.0.0.1", "127.0.0.2:80", tcp("127.0.0.2:80", &dest, None)).workload(dest)
}

fn build_request_known_dest_remote_node_hbone() -> Case {
    let dest = test_tcp(TunnelProtocol::Hbone, "remote-node");
    let expect = hbone(
        HboneKind::Direct,
        ("127.0.0.2:15008", "127.0.0.2:80"),
        &dest,
        &[],
        None,
    );
    Case::new("127.0.0.1", "127.0.0.2:80", expect).workload(dest)
}

fn build_request_known_dest_local_node_tcp() -> Case {
    let dest = test_tcp(TunnelProtocol::None, "local-node");
    Case::new("127.0.0.1", "127.0.0.2:80", tcp("127.0.0.2:80", &dest, None)).workload(dest)
}

/// Current ztunnel (in-pod only): a same-node destination is reached like any other.
fn build_request_known_dest_local_node_hbone() -> Case {
    let dest = test_tcp(TunnelProtocol::Hbone, "local-node");
    let expect = hbone(
        HboneKind::Direct,
        ("127.0.0.2:15008", "127.0.0.2:80"),
        &dest,
        &[],
        None,
    );
    Case::new("127.0.0.1", "127.0.0.2:80", expect).workload(dest)
}

/// ztunnel before in-pod mode (shared node proxy) expected `RequestType::DirectLocal` here.
fn build_request_known_dest_local_node_hbone_shared() -> Case {
    let dest = test_tcp(TunnelProtocol::Hbone, "local-node");
    let expect = hbone(
        HboneKind::DirectLocal,
        ("127.0.0.2:15008", "127.0.0.2:80"),
        &dest,
        &[],
        None,
    );
    Case::new("127.0.0.1", "127.0.0.2:80", expect)
        .workload(dest)
        .shared_mode()
}

fn my_pod_with_waypoint(addresses: &[&str], waypoint_ip: &str) -> Workload {
    Workload {
        waypoint: Some(gateway_at("", waypoint_ip, 15008)),
        ..pod("default", "my-pod", addresses)
    }
}

/// The source has a waypoint, which does not matter for its outbound traffic.
fn build_request_source_waypoint() -> Case {
    let expect = tcp("127.0.0.1:80", &source(), None);
    Case::new("127.0.0.2", "127.0.0.1:80", expect)
        .workload(my_pod_with_waypoint(&["127.0.0.2"], "127.0.0.10"))
        .source("cluster1//v1/Pod/default/my-pod")
}

fn build_request_destination_waypoint() -> Case {
    let expect = hbone(
        HboneKind::ToWaypoint,
        ("127.0.0.10:15008", "127.0.0.2:80"),
        &waypoint(),
        &[],
        None,
    );
    Case::new("127.0.0.1", "127.0.0.2:80", expect)
        .workload(my_pod_with_waypoint(&["127.0.0.2"], "127.0.0.10"))
}

/// An IPv6 destination whose waypoint is named by its IPv4 address: the waypoint is dialed on that.
fn build_request_destination_waypoint_mismatch_ip() -> Case {
    let dest = my_pod_with_waypoint(&["127.0.0.2", "ff06::c3"], "127.0.0.11");
    let expect = hbone(
        HboneKind::ToWaypoint,
        ("127.0.0.11:15008", "[ff06::c3]:80"),
        &waypoint_dual(),
        &[],
        None,
    );
    Case::new("127.0.0.1", "[ff06::c3]:80", expect).workload(dest)
}

fn build_request_destination_svc_waypoint() -> Case {
    let example = Service {
        waypoint: Some(gateway_at("", "127.0.0.10", 15008)),
        ..svc("example.com", &["127.0.0.3"], &[(80, 8080)])
    };
    let expect = hbone(
        HboneKind::ToWaypoint,
        ("127.0.0.10:15008", "127.0.0.3:80"),
        &waypoint(),
        &[],
        Some(&example),
    );
    Case::new("127.0.0.1", "127.0.0.3:80", expect).service(example)
}

fn build_request_empty_service() -> Case {
    let example = svc("example.com", &["127.0.0.3"], &[(80, 8080)]);
    let expect = Err(RouteError::NoHealthyEndpoint {
        service: example.key(),
        port: 80,
    });
    Case::new("127.0.0.1", "127.0.0.3:80", expect).service(example)
}

/// Named ports: the service leaves the target port to each endpoint, and an endpoint without a mapping
/// for the port is not a candidate.
fn build_request_target_port() -> Case {
    let example = svc("example.com", &["127.0.0.3"], &[(80, 0), (8080, 0)]);
    let matching = Workload {
        services: backs(&example, &[(80, 1234)]),
        ..pod("default", "matching-pod", &["127.0.0.2"])
    };
    let unmatching = Workload {
        services: backs(&example, &[(8080, 9999)]),
        ..pod("default", "unmatching-pod", &["127.0.0.4"])
    };
    let expect = tcp("127.0.0.2:1234", &matching, Some(&example));
    Case::new("127.0.0.1", "127.0.0.3:80", expect)
        .service(example)
        .workload(matching)
        .workload(unmatching)
        .candidates(&[1])
}

fn host_network() -> (Service, Workload, Workload) {
    let example = svc("example.com", &["127.0.0.3"], &[(80, 80)]);
    let pod1 = Workload {
        network_mode: NetworkMode::HostNetwork,
        services: backs(&example, &[(80, 80)]),
        ..pod("default", "pod1", &["127.0.0.2"])
    };
    let pod2 = Workload {
        network_mode: NetworkMode::HostNetwork,
        ..pod("default", "pod2", &["127.0.0.2"])
    };
    (example, pod1, pod2)
}

/// Through the service, the host-network endpoint is found by its uid, not its shared address.
fn build_request_host_network_via_service() -> Case {
    let (example, pod1, pod2) = host_network();
    let expect = tcp("127.0.0.2:80", &pod1, Some(&example));
    Case::new("127.0.0.1", "127.0.0.3:80", expect)
        .service(example)
        .workload(pod1)
        .workload(pod2)
        .candidates(&[1])
}

/// To the node's address directly: passthrough, not a random pod sharing it.
fn build_request_host_network_to_node() -> Case {
    let (example, pod1, pod2) = host_network();
    Case::new("127.0.0.1", "127.0.0.2:80", passthrough("127.0.0.2:80"))
        .service(example)
        .workload(pod1)
        .workload(pod2)
}

fn multi_address_test_tcp() -> Workload {
    Workload {
        node: "remote-node".into(),
        ..pod("ns", "test-tcp", &["127.0.0.2", "ff06::c3"])
    }
}

fn multiple_address_workload_v4() -> Case {
    let dest = multi_address_test_tcp();
    Case::new("127.0.0.1", "127.0.0.2:80", tcp("127.0.0.2:80", &dest, None)).workload(dest)
}

fn multiple_address_workload_v6() -> Case {
    let dest = multi_address_test_tcp();
    Case::new("127.0.0.1", "[ff06::c3]:80", tcp("[ff06::c3]:80", &dest, None)).workload(dest)
}

/// A dual-stack service in front of a dual-stack HBONE endpoint: the endpoint address of the
/// destination's family is used.
fn service_ip_families(from: &str, to: &str, gateway: &str, authority: &str) -> Case {
    let example = svc("example.com", &["127.0.0.3", "::3"], &[(80, 80)]);
    let dual = Workload {
        protocol: TunnelProtocol::Hbone,
        services: backs(&example, &[]),
        ..pod("default", "dual", &["127.0.0.2", "ff06::c3"])
    };
    let expect = hbone(
        HboneKind::Direct,
        (gateway, authority),
        &dual,
        &[],
        Some(&example),
    );
    Case::new(from, to, expect)
        .service(example)
        .workload(dual)
        .candidates(&[1])
}

fn passthrough_service(waypoint: bool) -> Service {
    Service {
        waypoint: waypoint.then(|| gateway_at("", "127.0.0.10", 15008)),
        load_balancing: lb(LoadBalancingMode::Passthrough, &[]),
        ..svc("example.com", &["1.2.3.4", "1.5.6.7"], &[(80, 80)])
    }
}

fn build_request_passthrough_svc() -> Case {
    Case::new("127.0.0.1", "1.2.3.4:80", passthrough("1.2.3.4:80")).service(passthrough_service(false))
}

fn build_request_passthrough_svc_with_waypoint() -> Case {
    let example = passthrough_service(true);
    let expect = hbone(
        HboneKind::ToWaypoint,
        ("127.0.0.10:15008", "1.2.3.4:80"),
        &waypoint(),
        &[],
        Some(&example),
    );
    Case::new("127.0.0.1", "1.2.3.4:80", expect).service(example)
}

#[test_case(build_request_unknown_dest(); "build_request_unknown_dest")]
#[test_case(build_request_wrong_network(); "build_request_wrong_network")]
#[test_case(build_request_double_hbone_gateway_address(); "build_request_double_hbone gateway by address")]
#[test_case(build_request_double_hbone_gateway_hostname(); "build_request_double_hbone gateway by hostname")]
#[test_case(build_request_double_hbone_remote_waypoint(); "build_request_double_hbone waypoint on remote network")]
#[test_case(build_request_failover_to_remote(HealthStatus::Healthy); "build_request_failover_to_remote healthy local")]
#[test_case(build_request_failover_to_remote(HealthStatus::Unhealthy); "build_request_failover_to_remote unhealthy local")]
#[test_case(build_request_known_dest_remote_node_tcp(); "build_request_known_dest_remote_node_tcp")]
#[test_case(build_request_known_dest_remote_node_hbone(); "build_request_known_dest_remote_node_hbone")]
#[test_case(build_request_known_dest_local_node_tcp(); "build_request_known_dest_local_node_tcp")]
#[test_case(build_request_known_dest_local_node_hbone(); "build_request_known_dest_local_node_hbone in pod")]
#[test_case(build_request_known_dest_local_node_hbone_shared(); "build_request_known_dest_local_node_hbone shared")]
#[test_case(build_request_source_waypoint(); "build_request_source_waypoint")]
#[test_case(build_request_destination_waypoint(); "build_request_destination_waypoint")]
#[test_case(build_request_destination_waypoint_mismatch_ip(); "build_request_destination_waypoint_mismatch_ip")]
#[test_case(build_request_destination_svc_waypoint(); "build_request_destination_svc_waypoint")]
#[test_case(build_request_empty_service(); "build_request_empty_service")]
#[test_case(build_request_target_port(); "build_request_target_port")]
#[test_case(build_request_host_network_via_service(); "build_request_host_network via service")]
#[test_case(build_request_host_network_to_node(); "build_request_host_network to node address")]
#[test_case(multiple_address_workload_v4(); "multiple_address_workload v4")]
#[test_case(multiple_address_workload_v6(); "multiple_address_workload v6")]
#[test_case(service_ip_families("127.0.0.1", "127.0.0.3:80", "127.0.0.2:15008", "127.0.0.2:80"); "service_ip_families dual v4")]
#[test_case(service_ip_families("::1", "[::3]:80", "[ff06::c3]:15008", "[ff06::c3]:80"); "service_ip_families dual v6")]
#[test_case(build_request_passthrough_svc(); "build_request_passthrough_svc")]
#[test_case(build_request_passthrough_svc_with_waypoint(); "build_request_passthrough_svc_with_waypoint")]
fn ztunnel_build_request(case: Case) {
    case.run();
}
