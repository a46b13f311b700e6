//! The pure inbound decisions (destination, waypoint sandwich, ports, reported service), table-driven.

use std::collections::BTreeMap;
use std::sync::Arc;

use mesh_core::SpiffeId;
use mesh_core::model::{
    ApplicationTunnel, ApplicationTunnelProtocol, GatewayAddress, MeshSnapshot, Service, ServicePort,
    TunnelProtocol, Workload,
};
use mesh_hbone::TunnelTarget;
use test_case::test_case;

use super::resolve::{self, Destination};
use super::{InboundConfig, ServedWorkloads};
use crate::error::ProxyError;

const CLIENT_IP: &str = "10.0.0.1";
const SERVER_IP: &str = "10.0.0.2";
const WAYPOINT_IP: &str = "10.0.0.3";
const SERVER_VIP: &str = "10.10.0.1";
const WAYPOINT_VIP: &str = "10.10.0.2";
const OTHER_NODE_IP: &str = "10.0.0.9";

/// How the server is attached to the waypoint in a scenario.
#[derive(Clone, Copy, Debug)]
enum Attach {
    None,
    /// The server workload names the waypoint by its pod IP.
    WorkloadByPod,
    /// The server workload names the waypoint by its service VIP.
    WorkloadByVip,
    /// The server's service names the waypoint by its pod IP.
    Service,
}

fn workload(name: &str, ip: &str, node: &str) -> Workload {
    Workload {
        addresses: vec![ip.parse().unwrap()],
        protocol: TunnelProtocol::Hbone,
        node: node.into(),
        service_account: name.into(),
        canonical_name: name.into(),
        workload_type: "deployment".into(),
        workload_name: name.into(),
        ..Workload::new(format!("cluster1//v1/Pod/default/{name}"), name, "default")
    }
}

fn snapshot(attach: Attach, waypoint_tunnel: Option<ApplicationTunnel>) -> MeshSnapshot {
    let gateway = |ip: &str| GatewayAddress::address(format!("/{ip}").parse().unwrap());
    let mut server_svc = Service {
        vips: vec![format!("/{SERVER_VIP}").parse().unwrap()],
        ports: vec![ServicePort::new(80, 8080)],
        ..Service::new("server", "default", "server.default.svc.cluster.local")
    };
    let waypoint_svc = Service {
        vips: vec![format!("/{WAYPOINT_VIP}").parse().unwrap()],
        ports: vec![ServicePort::new(15008, 15008)],
        ..Service::new("waypoint", "default", "waypoint.default.svc.cluster.local")
    };
    let mut server = Workload {
        services: BTreeMap::from([(server_svc.key(), BTreeMap::new())]),
        ..workload("server", SERVER_IP, "node1")
    };
    match attach {
        Attach::None => {}
        Attach::WorkloadByPod => server.waypoint = Some(gateway(WAYPOINT_IP)),
        Attach::WorkloadByVip => server.waypoint = Some(gateway(WAYPOINT_VIP)),
        Attach::Service => server_svc.waypoint = Some(gateway(WAYPOINT_IP)),
    }
    let waypoint = Workload {
        services: BTreeMap::from([(waypoint_svc.key(), BTreeMap::new())]),
        application_tunnel: waypoint_tunnel,
        ..workload("waypoint", WAYPOINT_IP, "node1")
    };
    let legacy = Workload {
        protocol: TunnelProtocol::None,
        ..workload("legacy", "10.0.0.4", "node1")
    };
    MeshSnapshot::builder()
        .add_service(server_svc)
        .add_service(waypoint_svc)
        .add_workload(server)
        .add_workload(waypoint)
        .add_workload(workload("client", CLIENT_IP, "node1"))
        .add_workload(legacy)
        .add_workload(workload("remote", OTHER_NODE_IP, "node2"))
        .build()
        .unwrap()
}

fn config() -> InboundConfig {
    InboundConfig::new(ServedWorkloads::Node("node1".into()))
}

fn resolve_tunnel(
    snapshot: &MeshSnapshot,
    arrived_on: &str,
    target: TunnelTarget,
) -> Result<Destination, ProxyError> {
    resolve::tunnel(
        &config(),
        snapshot,
        format!("{arrived_on}:15008").parse().unwrap(),
        &target,
    )
}

fn addr(ip: &str, port: u16) -> TunnelTarget {
    TunnelTarget::Addr(format!("{ip}:{port}").parse().unwrap())
}

#[test_case(Attach::None, SERVER_IP, SERVER_IP, Some((SERVER_IP, 8080)) ; "to the workload")]
#[test_case(Attach::WorkloadByPod, WAYPOINT_IP, SERVER_IP, Some((WAYPOINT_IP, 8080)) ; "sandwich, workload names waypoint pod")]
#[test_case(Attach::WorkloadByVip, WAYPOINT_IP, SERVER_IP, Some((WAYPOINT_IP, 8080)) ; "sandwich, workload names waypoint vip")]
#[test_case(Attach::Service, WAYPOINT_IP, SERVER_VIP, Some((WAYPOINT_IP, 8080)) ; "sandwich, service names waypoint")]
#[test_case(Attach::None, SERVER_IP, CLIENT_IP, None ; "ip mismatch")]
#[test_case(Attach::None, WAYPOINT_IP, SERVER_IP, None ; "to a waypoint the target does not use")]
#[test_case(Attach::Service, WAYPOINT_IP, SERVER_IP, None ; "service waypoint does not cover the pod address")]
#[test_case(Attach::WorkloadByPod, WAYPOINT_IP, SERVER_VIP, None ; "workload waypoint does not cover the service")]
fn destination_and_waypoint_sandwich(
    attach: Attach,
    arrived_on: &str,
    target: &str,
    want: Option<(&str, u16)>,
) {
    let snapshot = snapshot(attach, None);
    let got = resolve_tunnel(&snapshot, arrived_on, addr(target, 8080));
    match want {
        Some((ip, port)) => {
            let destination = got.unwrap();
            assert_eq!(destination.upstream, format!("{ip}:{port}").parse().unwrap());
            assert_eq!(
                *destination.workload.addresses,
                [arrived_on.parse::<std::net::IpAddr>().unwrap()]
            );
        }
        None => assert!(
            matches!(got, Err(ProxyError::IpMismatch { .. })),
            "expected an ip mismatch, got {got:?}"
        ),
    }
}

#[test]
fn a_service_vip_through_its_waypoint_is_the_reported_service() {
    let snapshot = snapshot(Attach::Service, None);
    let destination = resolve_tunnel(&snapshot, WAYPOINT_IP, addr(SERVER_VIP, 80)).unwrap();
    let service = resolve::reported_service(&destination, None).unwrap();
    assert_eq!(&*service.hostname, "server.default.svc.cluster.local");
}

#[test]
fn refusals_name_their_reason() {
    let snapshot = snapshot(Attach::None, None);
    assert!(matches!(
        resolve_tunnel(&snapshot, "10.0.0.77", addr("10.0.0.77", 80)),
        Err(ProxyError::UnknownDestination { .. })
    ));
    assert!(matches!(
        resolve_tunnel(&snapshot, OTHER_NODE_IP, addr(OTHER_NODE_IP, 80)),
        Err(ProxyError::NotServed { .. })
    ));
    assert!(matches!(
        resolve_tunnel(&snapshot, "10.0.0.4", addr("10.0.0.4", 80)),
        Err(ProxyError::NotHboneCapable { .. })
    ));
    let no_such_port = TunnelTarget::Host {
        host: "server.default.svc.cluster.local".into(),
        port: 9999,
    };
    assert!(matches!(
        resolve_tunnel(&snapshot, SERVER_IP, no_such_port),
        Err(ProxyError::NoTargetPort { .. })
    ));
    let unknown = TunnelTarget::Host {
        host: "nope.default.svc.cluster.local".into(),
        port: 80,
    };
    assert!(matches!(
        resolve_tunnel(&snapshot, SERVER_IP, unknown),
        Err(ProxyError::UnknownService { .. })
    ));
}

#[test]
fn hostname_resolves_the_target_port_and_marks_the_gateway() {
    let snapshot = snapshot(Attach::None, None);
    let target = TunnelTarget::Host {
        host: "server.default.svc.cluster.local".into(),
        port: 80,
    };
    let destination = resolve_tunnel(&snapshot, SERVER_IP, target).unwrap();
    assert_eq!(destination.upstream, format!("{SERVER_IP}:8080").parse().unwrap());
    assert!(destination.from_gateway);
    assert_eq!(
        destination.addressed_service.as_ref().map(|s| s.name.clone()),
        Some(Arc::from("server"))
    );
}

#[test]
fn application_tunnel_overrides_the_port_and_asks_for_a_proxy_header() {
    let tunnel = ApplicationTunnel {
        protocol: ApplicationTunnelProtocol::Proxy,
        port: Some(15088),
    };
    let snapshot = snapshot(Attach::WorkloadByPod, Some(tunnel));
    let destination = resolve_tunnel(&snapshot, WAYPOINT_IP, addr(SERVER_IP, 8080)).unwrap();
    assert_eq!(
        destination.upstream,
        format!("{WAYPOINT_IP}:15088").parse().unwrap()
    );
    let header = destination.proxy_header.unwrap();
    assert_eq!(header.target, format!("{SERVER_IP}:8080").parse().unwrap());
    assert_eq!(header.hostname, None);
}

#[test]
fn plaintext_refuses_the_proxy_itself() {
    let snapshot = snapshot(Attach::None, None);
    let mut config = config();
    config.local_ips = vec!["10.0.0.100".parse().unwrap()];
    for original in [format!("{SERVER_IP}:15006"), "10.0.0.100:80".to_owned()] {
        let got = resolve::plaintext(&config, &snapshot, original.parse().unwrap());
        assert!(
            matches!(got, Err(ProxyError::SelfCall { .. })),
            "{original}: {got:?}"
        );
    }
    let ok = resolve::plaintext(&config, &snapshot, format!("{SERVER_IP}:8080").parse().unwrap()).unwrap();
    assert_eq!(&*ok.workload.name, "server");
}

#[test]
fn from_waypoint_needs_the_waypoints_identity_and_address() {
    let snapshot = snapshot(Attach::WorkloadByVip, None);
    let server = snapshot.workload_by_ip("", SERVER_IP.parse().unwrap()).unwrap();
    let waypoint_id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/waypoint").unwrap();
    let client_id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/client").unwrap();
    assert!(resolve::has_waypoint(server));
    assert!(resolve::from_waypoint(
        &snapshot,
        server,
        &waypoint_id,
        WAYPOINT_IP.parse().unwrap()
    ));
    assert!(!resolve::from_waypoint(
        &snapshot,
        server,
        &client_id,
        WAYPOINT_IP.parse().unwrap()
    ));
    assert!(!resolve::from_waypoint(
        &snapshot,
        server,
        &waypoint_id,
        CLIENT_IP.parse().unwrap()
    ));
}

#[test]
fn baggage_describes_the_destination() {
    let snapshot = snapshot(Attach::None, None);
    let server = snapshot.workload_by_ip("", SERVER_IP.parse().unwrap()).unwrap();
    assert_eq!(
        resolve::baggage(server).encode(),
        "k8s.namespace.name=default,k8s.deployment.name=server,service.name=server"
    );
}
