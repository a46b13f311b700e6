use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use mesh_core::model::{
    AppProtocol, ApplicationTunnel, ApplicationTunnelProtocol, GatewayAddress, HealthPolicy, HealthStatus,
    LoadBalancing, LoadBalancingMode, Locality, LocalityScope, MeshSnapshot, NamespacedHostname, NetworkAddr,
    ServicePort, TunnelProtocol,
};
use mesh_core::{SpiffeId, TrustDomain};
use prost::Message;
use test_case::test_case;

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ip_bytes(s: &str) -> Bytes {
    ip_to_bytes(ip(s))
}

fn ports(pairs: &[(u32, u32)]) -> pb::PortList {
    pb::PortList {
        ports: pairs
            .iter()
            .map(|&(service_port, target_port)| pb::Port {
                service_port,
                target_port,
                ..Default::default()
            })
            .collect(),
    }
}

/// The two workloads and the service of PROTOCOLS.md 2.2 ("a two-workload example"), as istiod would send
/// them.
fn example_client() -> pb::Workload {
    pb::Workload {
        uid: "cluster1//v1/Pod/default/client".into(),
        name: "client".into(),
        namespace: "default".into(),
        service_account: "client".into(),
        trust_domain: "cluster.local".into(),
        addresses: vec![ip_bytes("198.18.0.1")],
        tunnel_protocol: pb::TunnelProtocol::Hbone.into(),
        node: "node-a".into(),
        ..Default::default()
    }
}

fn example_server() -> pb::Workload {
    pb::Workload {
        uid: "cluster1//v1/Pod/default/server".into(),
        name: "server".into(),
        namespace: "default".into(),
        service_account: "server".into(),
        trust_domain: "cluster.local".into(),
        addresses: vec![ip_bytes("198.18.0.2")],
        tunnel_protocol: pb::TunnelProtocol::Hbone.into(),
        node: "node-b".into(),
        services: HashMap::from([(
            "default/echo.default.svc.cluster.local".into(),
            ports(&[(80, 8080)]),
        )]),
        ..Default::default()
    }
}

fn example_echo() -> pb::Service {
    pb::Service {
        name: "echo".into(),
        namespace: "default".into(),
        hostname: "echo.default.svc.cluster.local".into(),
        addresses: vec![pb::NetworkAddress {
            network: String::new(),
            address: ip_bytes("198.19.0.10"),
        }],
        ports: ports(&[(80, 8080), (5201, 5201)]).ports,
        ..Default::default()
    }
}

#[test]
fn protocols_example_converts_and_indexes() {
    let client = workload_from_proto(&example_client()).unwrap();
    let server = workload_from_proto(&example_server()).unwrap();
    let echo = service_from_proto(&example_echo()).unwrap();

    assert_eq!(&*client.uid, "cluster1//v1/Pod/default/client");
    assert_eq!(client.addresses, [ip("198.18.0.1")]);
    assert_eq!(client.protocol, TunnelProtocol::Hbone);
    assert_eq!(&*client.node, "node-a");
    assert_eq!(&*client.network, "");
    assert!(client.services.is_empty());
    assert_eq!(
        client.identity().unwrap().as_str(),
        "spiffe://cluster.local/ns/default/sa/client"
    );
    assert_eq!(
        server.identity().unwrap().as_str(),
        "spiffe://cluster.local/ns/default/sa/server"
    );

    assert_eq!(echo.key().to_string(), "default/echo.default.svc.cluster.local");
    assert_eq!(echo.vips, ["/198.19.0.10".parse::<NetworkAddr>().unwrap()]);
    assert_eq!(
        echo.ports,
        [ServicePort::new(80, 8080), ServicePort::new(5201, 5201)]
    );

    let snapshot = MeshSnapshot::builder()
        .add_service(echo)
        .add_workload(client)
        .add_workload(server)
        .build()
        .unwrap();
    let service = snapshot.service_by_vip(&"/198.19.0.10".parse().unwrap()).unwrap();
    let endpoints = snapshot.endpoints_of(service);
    assert_eq!(endpoints.len(), 1);
    assert_eq!(&*endpoints[0].workload_uid, "cluster1//v1/Pod/default/server");
    assert_eq!(endpoints[0].target_port(service, 80), Some(8080));
    assert_eq!(endpoints[0].target_port(service, 5201), Some(5201));
    let by_ip = snapshot.workload_by_ip("", ip("198.18.0.1")).unwrap();
    assert_eq!(&*by_ip.name, "client");
}

#[test]
fn istio_defaults_apply_to_empty_fields() {
    let proto = pb::Workload {
        uid: "u".into(),
        namespace: "ns".into(),
        ..Default::default()
    };
    let workload = workload_from_proto(&proto).unwrap();
    assert_eq!(workload.trust_domain, TrustDomain::default());
    assert_eq!(&*workload.service_account, "default");
    assert_eq!(&*workload.cluster_id, "Kubernetes");
    assert_eq!(&*workload.workload_type, "deployment");
    assert_eq!(workload.protocol, TunnelProtocol::None);
    assert_eq!(workload.status, HealthStatus::Healthy);
    assert_eq!(workload.locality, None);
    assert_eq!(workload.application_tunnel, None);
    assert_eq!(
        workload.identity().unwrap().as_str(),
        "spiffe://cluster.local/ns/ns/sa/default"
    );
}

#[test]
fn lenient_where_istio_is() {
    // A sidecar workload is sent plain TCP; a workload type or app protocol this version does not know is
    // telemetry or a hint, so it reads as the default rather than refusing the resource.
    let workload = workload_from_proto(&pb::Workload {
        tunnel_protocol: pb::TunnelProtocol::LegacyIstioMtls.into(),
        workload_type: 42,
        network_mode: pb::NetworkMode::HostNetwork.into(),
        native_tunnel: true,
        capacity: Some(3),
        ..example_client()
    })
    .unwrap();
    assert_eq!(workload.protocol, TunnelProtocol::None);
    assert_eq!(&*workload.workload_type, "deployment");
    assert_eq!(workload.network_mode, mesh_core::model::NetworkMode::HostNetwork);
    assert_eq!(
        workload_to_proto(&workload).network_mode(),
        pb::NetworkMode::HostNetwork,
        "the network mode survives the round trip"
    );

    let service = service_from_proto(&pb::Service {
        ports: vec![pb::Port {
            service_port: 80,
            target_port: 8080,
            app_protocol: 42,
        }],
        // DNS SANs (a ServiceEntry may carry them) can never match a SPIFFE peer: skipped.
        subject_alt_names: vec!["example.com".into(), "spiffe://td/ns/a/sa/b".into()],
        ip_families: pb::IpFamilies::Dual.into(),
        ..example_echo()
    })
    .unwrap();
    assert_eq!(service.ports, [ServicePort::new(80, 8080)]);
    assert_eq!(
        service.subject_alt_names,
        [SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap()]
    );
}

#[test_case("DEPLOYMENT", "deployment")]
#[test_case("CRONJOB", "cronjob")]
#[test_case("POD", "pod")]
#[test_case("JOB", "job")]
fn workload_types_read_lower_case(proto_name: &str, model_name: &str) {
    let value = pb::WorkloadType::from_str_name(proto_name).unwrap();
    let workload = workload_from_proto(&pb::Workload {
        workload_type: value.into(),
        ..example_client()
    })
    .unwrap();
    assert_eq!(&*workload.workload_type, model_name);
    assert_eq!(workload_to_proto(&workload).workload_type, i32::from(value));
}

/// A workload using every field the model keeps.
fn full_workload() -> model::Workload {
    model::Workload {
        service_account: "sa-1".into(),
        trust_domain: TrustDomain::new("example.org").unwrap(),
        addresses: vec![ip("10.0.0.1"), ip("fd00::1"), ip("::ffff:10.0.0.9")],
        network: "net-1".into(),
        node: "node-1".into(),
        hostname: "pod.example.org".into(),
        protocol: TunnelProtocol::Hbone,
        waypoint: Some(GatewayAddress::hostname(NamespacedHostname::new(
            "istio-system",
            "waypoint.istio-system.svc.cluster.local",
        ))),
        network_gateway: Some(GatewayAddress {
            hbone_mtls_port: 15009,
            ..GatewayAddress::address(NetworkAddr::new("net-2", ip("192.0.2.7")))
        }),
        canonical_name: "server".into(),
        canonical_revision: "v2".into(),
        workload_type: "pod".into(),
        workload_name: "server-abc".into(),
        cluster_id: "cluster1".into(),
        locality: Some(Locality {
            region: "r".into(),
            zone: "z".into(),
            subzone: "s".into(),
        }),
        status: HealthStatus::Unhealthy,
        services: BTreeMap::from([
            (
                NamespacedHostname::new("default", "echo.default.svc.cluster.local"),
                BTreeMap::from([(80, 8080), (443, 0)]),
            ),
            (
                NamespacedHostname::new("other", "db.other.svc.cluster.local"),
                BTreeMap::new(),
            ),
        ]),
        authorization_policies: vec![Arc::from("default/allow-client"), Arc::from("default/deny-all")],
        application_tunnel: Some(ApplicationTunnel {
            protocol: ApplicationTunnelProtocol::Proxy,
            port: Some(15088),
        }),
        ..model::Workload::new("cluster1//v1/Pod/default/server-abc", "server-abc", "default")
    }
}

fn full_service() -> model::Service {
    model::Service {
        vips: vec!["/198.19.0.10".parse().unwrap(), "net-1/fd00::10".parse().unwrap()],
        ports: vec![
            ServicePort::new(80, 8080),
            ServicePort {
                app_protocol: Some(AppProtocol::Http2),
                ..ServicePort::new(81, 0)
            },
            ServicePort {
                app_protocol: Some(AppProtocol::Grpc),
                ..ServicePort::new(9090, 9090)
            },
            ServicePort {
                app_protocol: Some(AppProtocol::Http11),
                ..ServicePort::new(8000, 8001)
            },
        ],
        subject_alt_names: vec![SpiffeId::parse("spiffe://cluster.local/ns/default/sa/echo").unwrap()],
        waypoint: Some(GatewayAddress::address(NetworkAddr::on_default_network(ip(
            "198.18.0.100",
        )))),
        load_balancing: Some(LoadBalancing {
            routing_preference: vec![
                LocalityScope::Network,
                LocalityScope::Region,
                LocalityScope::Zone,
                LocalityScope::Subzone,
                LocalityScope::Node,
                LocalityScope::Cluster,
            ],
            mode: LoadBalancingMode::Failover,
            health_policy: HealthPolicy::AllowAll,
        }),
        ..model::Service::new("echo", "default", "echo.default.svc.cluster.local")
    }
}

#[test]
fn workload_round_trips() {
    for workload in [
        full_workload(),
        model::Workload {
            cluster_id: "Kubernetes".into(),
            workload_type: "deployment".into(),
            ..model::Workload::new("u", "n", "ns")
        },
    ] {
        let proto = workload_to_proto(&workload);
        assert_eq!(workload_from_proto(&proto).unwrap(), workload);
        // Through the wire too.
        let decoded = pb::Workload::decode(&*proto.encode_to_vec()).unwrap();
        assert_eq!(workload_from_proto(&decoded).unwrap(), workload);
    }
}

#[test]
fn service_round_trips() {
    for service in [
        full_service(),
        model::Service::new("s", "ns", "s.ns.svc.cluster.local"),
    ] {
        let proto = service_to_proto(&service);
        assert_eq!(service_from_proto(&proto).unwrap(), service);
        let decoded = pb::Service::decode(&*proto.encode_to_vec()).unwrap();
        assert_eq!(service_from_proto(&decoded).unwrap(), service);
    }
}

#[test]
fn address_round_trips_through_bytes() {
    for address in [
        XdsAddress::Workload(Arc::new(full_workload())),
        XdsAddress::Service(Arc::new(full_service())),
    ] {
        let bytes = address_to_proto(&address).encode_to_vec();
        assert_eq!(crate::decode_address(&bytes).unwrap(), address);
        crate::__fuzz::convert_address(&bytes);
    }
    assert_eq!(
        XdsAddress::Workload(Arc::new(full_workload())).resource_name(),
        "cluster1//v1/Pod/default/server-abc"
    );
    assert_eq!(
        XdsAddress::Service(Arc::new(full_service())).resource_name(),
        "default/echo.default.svc.cluster.local"
    );
}

#[test]
fn normalized_proto_round_trips() {
    // A proto as istiod writes it (every kept field set, defaults spelled out) survives proto -> model ->
    // proto unchanged.
    let proto = workload_to_proto(&full_workload());
    assert_eq!(workload_to_proto(&workload_from_proto(&proto).unwrap()), proto);
    let proto = service_to_proto(&full_service());
    assert_eq!(service_to_proto(&service_from_proto(&proto).unwrap()), proto);
}

#[test]
fn standalone_conversions() {
    let gateway = GatewayAddress::address(NetworkAddr::new("n", ip("2001:db8::1")));
    assert_eq!(gateway_from_proto(&gateway_to_proto(&gateway)).unwrap(), gateway);
    let address = NetworkAddr::new("n", ip("192.0.2.1"));
    let proto = network_addr_to_proto(&address);
    assert_eq!(&proto.address[..], [192, 0, 2, 1]);
    assert_eq!(network_addr_from_proto(&proto).unwrap(), address);
}

fn workload_error(workload: pb::Workload) -> String {
    workload_from_proto(&workload).unwrap_err().to_string()
}

fn gateway(destination: Option<pb::gateway_address::Destination>, port: u32) -> Option<pb::GatewayAddress> {
    Some(pb::GatewayAddress {
        destination,
        hbone_mtls_port: port,
    })
}

#[test_case(
    pb::Workload { addresses: vec![ip_bytes("10.0.0.1"), vec![1, 2, 3, 4, 5].into()], ..example_client() },
    "addresses[1]: 5 bytes is not an IPv4 or IPv6 address" ; "address bytes"
)]
#[test_case(
    pb::Workload { trust_domain: "Bad.TD".into(), ..example_client() },
    "trust_domain: invalid trust domain \"Bad.TD\": trust domain must be lower case" ; "trust domain"
)]
#[test_case(
    pb::Workload { service_account: "a/b".into(), ..example_client() },
    "service_account: invalid SPIFFE ID \"spiffe://cluster.local/ns/default/sa/a/b\": character '/' is not allowed"
    ; "service account"
)]
#[test_case(
    pb::Workload { tunnel_protocol: 7, ..example_client() },
    "tunnel_protocol: 7 is not a known istio.workload.TunnelProtocol value" ; "tunnel protocol"
)]
#[test_case(
    pb::Workload { status: -1, ..example_client() },
    "status: -1 is not a known istio.workload.WorkloadStatus value" ; "status"
)]
#[test_case(
    pb::Workload { waypoint: gateway(None, 15008), ..example_client() },
    "waypoint.destination: is not set" ; "waypoint destination"
)]
#[test_case(
    pb::Workload {
        waypoint: gateway(Some(pb::gateway_address::Destination::Hostname(pb::NamespacedHostname {
            namespace: String::new(),
            hostname: "w".into(),
        })), 15008),
        ..example_client()
    },
    "waypoint.hostname.namespace: must not be empty" ; "waypoint namespace"
)]
#[test_case(
    pb::Workload {
        waypoint: gateway(Some(pb::gateway_address::Destination::Hostname(pb::NamespacedHostname {
            namespace: "istio-system".into(),
            hostname: String::new(),
        })), 15008),
        ..example_client()
    },
    "waypoint.hostname.hostname: must not be empty" ; "waypoint hostname"
)]
#[test_case(
    pb::Workload {
        waypoint: gateway(Some(pb::gateway_address::Destination::Hostname(pb::NamespacedHostname {
            namespace: "istio-system".into(),
            hostname: "w".into(),
        })), 70000),
        ..example_client()
    },
    "waypoint.hbone_mtls_port: 70000 is not a port number (0-65535)" ; "waypoint port"
)]
#[test_case(
    pb::Workload {
        network_gateway: gateway(Some(pb::gateway_address::Destination::Address(pb::NetworkAddress {
            network: "n".into(),
            address: vec![1, 2, 3].into(),
        })), 15008),
        ..example_client()
    },
    "network_gateway.address.address: 3 bytes is not an IPv4 or IPv6 address" ; "network gateway address"
)]
#[test_case(
    pb::Workload { services: HashMap::from([("no-slash".into(), ports(&[]))]), ..example_client() },
    "services[\"no-slash\"]: invalid service key \"no-slash\": expected namespace/hostname" ; "service key"
)]
#[test_case(
    pb::Workload { services: HashMap::from([("default/echo".into(), ports(&[(80, 70000)]))]), ..example_client() },
    "services[\"default/echo\"].ports[0].target_port: 70000 is not a port number (0-65535)" ; "target port"
)]
#[test_case(
    pb::Workload { services: HashMap::from([("default/echo".into(), ports(&[(65536, 1)]))]), ..example_client() },
    "services[\"default/echo\"].ports[0].service_port: 65536 is not a port number (0-65535)" ; "service port"
)]
#[test_case(
    pb::Workload { services: HashMap::from([("default/echo".into(), ports(&[(80, 1), (80, 2)]))]), ..example_client() },
    "services[\"default/echo\"].ports[1].service_port: service port 80 is listed more than once" ; "duplicate port"
)]
#[test_case(
    pb::Workload {
        application_tunnel: Some(pb::ApplicationTunnel { protocol: 9, port: 0 }),
        ..example_client()
    },
    "application_tunnel.protocol: 9 is not a known istio.workload.ApplicationTunnel.Protocol value"
    ; "application tunnel protocol"
)]
#[test_case(
    pb::Workload {
        application_tunnel: Some(pb::ApplicationTunnel { protocol: 1, port: 65536 }),
        ..example_client()
    },
    "application_tunnel.port: 65536 is not a port number (0-65535)" ; "application tunnel port"
)]
fn workload_errors(workload: pb::Workload, expected: &str) {
    assert_eq!(
        workload_error(workload),
        format!("workload cluster1//v1/Pod/default/client: {expected}")
    );
}

#[test]
fn workload_errors_without_uid_name_namespace_and_name() {
    let workload = pb::Workload {
        uid: String::new(),
        ..example_client()
    };
    assert_eq!(
        workload_error(workload),
        "workload default/client: uid: must not be empty"
    );
    let workload = pb::Workload {
        namespace: String::new(),
        ..example_client()
    };
    assert_eq!(
        workload_error(workload),
        "workload cluster1//v1/Pod/default/client: namespace: invalid SPIFFE ID \
         \"spiffe://cluster.local/ns//sa/client\": empty path segment"
    );
}

#[test]
fn first_bad_service_key_is_reported_in_key_order() {
    let services = HashMap::from_iter(
        ["b/ok", "z-bad", "a-bad", "c/ok"].map(|key| (key.to_string(), ports(&[(80, 80)]))),
    );
    for _ in 0..4 {
        let workload = pb::Workload {
            services: services.clone(),
            ..example_client()
        };
        assert!(workload_error(workload).contains("services[\"a-bad\"]"));
    }
}

#[test]
fn long_resource_names_are_cut() {
    let uid = "u".repeat(300);
    let message = workload_error(pb::Workload {
        uid: uid.clone(),
        tunnel_protocol: 9,
        ..example_client()
    });
    assert_eq!(
        message,
        format!(
            "workload {}...: tunnel_protocol: 9 is not a known istio.workload.TunnelProtocol value",
            &uid[..128]
        )
    );
}

fn service_error(service: pb::Service) -> String {
    service_from_proto(&service).unwrap_err().to_string()
}

#[test_case(
    pb::Service { addresses: vec![pb::NetworkAddress { network: "n".into(), address: vec![1, 2].into() }], ..example_echo() },
    "addresses[0].address: 2 bytes is not an IPv4 or IPv6 address" ; "vip bytes"
)]
#[test_case(
    pb::Service { ports: ports(&[(80, 8080), (65536, 1)]).ports, ..example_echo() },
    "ports[1].service_port: 65536 is not a port number (0-65535)" ; "service port"
)]
#[test_case(
    pb::Service { ports: ports(&[(80, 1 << 20)]).ports, ..example_echo() },
    "ports[0].target_port: 1048576 is not a port number (0-65535)" ; "target port"
)]
#[test_case(
    pb::Service { ports: ports(&[(80, 8080), (80, 8081)]).ports, ..example_echo() },
    "ports[1].service_port: service port 80 is listed more than once" ; "duplicate port"
)]
#[test_case(
    pb::Service {
        subject_alt_names: vec!["spiffe://td/ns/a/sa/b".into(), "spiffe://td/ns/../sa/b".into()],
        ..example_echo()
    },
    "subject_alt_names[1]: invalid SPIFFE ID \"spiffe://td/ns/../sa/b\": '.' or '..' path segment" ; "san"
)]
#[test_case(
    pb::Service { waypoint: gateway(None, 15008), ..example_echo() },
    "waypoint.destination: is not set" ; "waypoint"
)]
#[test_case(
    pb::Service {
        load_balancing: Some(pb::LoadBalancing { routing_preference: vec![1, 0], ..Default::default() }),
        ..example_echo()
    },
    "load_balancing.routing_preference[1]: UNSPECIFIED_SCOPE is not a locality scope" ; "unspecified scope"
)]
#[test_case(
    pb::Service {
        load_balancing: Some(pb::LoadBalancing { routing_preference: vec![99], ..Default::default() }),
        ..example_echo()
    },
    "load_balancing.routing_preference[0]: 99 is not a known istio.workload.LoadBalancing.Scope value"
    ; "unknown scope"
)]
#[test_case(
    pb::Service { load_balancing: Some(pb::LoadBalancing { mode: 4, ..Default::default() }), ..example_echo() },
    "load_balancing.mode: 4 is not a known istio.workload.LoadBalancing.Mode value" ; "mode"
)]
#[test_case(
    pb::Service { load_balancing: Some(pb::LoadBalancing { health_policy: 2, ..Default::default() }), ..example_echo() },
    "load_balancing.health_policy: 2 is not a known istio.workload.LoadBalancing.HealthPolicy value"
    ; "health policy"
)]
fn service_errors(service: pb::Service, expected: &str) {
    assert_eq!(
        service_error(service),
        format!("service default/echo.default.svc.cluster.local: {expected}")
    );
}

#[test]
fn service_without_hostname() {
    let service = pb::Service {
        hostname: String::new(),
        ..example_echo()
    };
    assert_eq!(
        service_error(service),
        "service default/: hostname: must not be empty"
    );
}

#[test]
fn address_errors() {
    assert_eq!(
        address_from_proto(&pb::Address::default())
            .unwrap_err()
            .to_string(),
        "address resource holds neither a workload nor a service"
    );
    let err = crate::decode_address(&[0x0a, 0x05, 0x01]).unwrap_err();
    assert!(
        matches!(
            err,
            XdsError::Decode {
                message: "istio.workload.Address",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("istio.workload.Address does not decode: "),
        "{err}"
    );
    // A workload error inside an address is the workload's.
    let address = pb::Address {
        r#type: Some(pb::address::Type::Workload(pb::Workload {
            status: 5,
            ..example_client()
        })),
    };
    assert_eq!(
        address_from_proto(&address).unwrap_err().to_string(),
        "workload cluster1//v1/Pod/default/client: status: 5 is not a known istio.workload.WorkloadStatus value"
    );
}

#[test]
fn standalone_errors_name_the_field_only() {
    let err = gateway_from_proto(&pb::GatewayAddress::default()).unwrap_err();
    assert_eq!(err.to_string(), "destination: is not set");
    let err = network_addr_from_proto(&pb::NetworkAddress::default()).unwrap_err();
    assert_eq!(err.to_string(), "address: 0 bytes is not an IPv4 or IPv6 address");
    assert!(matches!(
        err,
        XdsError::Field {
            problem: FieldProblem::IpBytes { len: 0 },
            ..
        }
    ));
}

#[test]
fn fuzz_entry_point_survives_garbage() {
    for input in [
        &b""[..],
        &[0xff; 16],
        &[0x0a, 0x00],
        &[0x12, 0x02, 0x1a, 0x00],
        &[0x0a, 0x04, 0x1a, 0x02, 0x01, 0x02],
    ] {
        crate::__fuzz::convert_address(input);
    }
}
