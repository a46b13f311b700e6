//! Rows pinning each routing rule beyond ztunnel's own tests: port mapping, health, picking,
//! locality, identities, waypoints and their loop rule, network gateways, and refusals.

use test_case::test_case;

use super::*;

/// `example.com` at 127.0.0.3, port 80 -> 8080, in front of `endpoints`.
fn example_with(endpoints: &[Workload]) -> Case {
    let mut case = Case::new("127.0.0.1", "127.0.0.3:80", passthrough("0.0.0.0:0")).service(example());
    case.workloads.extend_from_slice(endpoints);
    case
}

fn example() -> Service {
    svc("example.com", &["127.0.0.3"], &[(80, 8080)])
}

/// An HBONE endpoint of `service` at `addr` with this port map.
fn endpoint(service: &Service, name: &str, addr: &str, ports: &[(u16, u16)]) -> Workload {
    Workload {
        protocol: TunnelProtocol::Hbone,
        services: backs(service, ports),
        ..pod("default", name, &[addr])
    }
}

fn direct_to(endpoint: &Workload, port: u16, service: &Service) -> Result<Route, RouteError> {
    let ip = endpoint.addresses[0];
    let (gateway, authority) = (format!("{ip}:15008"), format!("{ip}:{port}"));
    hbone(
        HboneKind::Direct,
        (&gateway, &authority),
        endpoint,
        &[],
        Some(service),
    )
}

fn endpoint_port_map_wins() -> Case {
    let e = endpoint(&example(), "e", "127.0.0.21", &[(80, 9090)]);
    Case {
        expect: direct_to(&e, 9090, &example()),
        ..example_with(&[e])
    }
    .candidates(&[1])
}

fn service_target_port_fallback() -> Case {
    let e = endpoint(&example(), "e", "127.0.0.21", &[]);
    Case {
        expect: direct_to(&e, 8080, &example()),
        ..example_with(&[e])
    }
    .candidates(&[1])
}

fn undeclared_service_port() -> Case {
    let e = endpoint(&example(), "e", "127.0.0.21", &[]);
    let expect = Err(RouteError::UnknownServicePort {
        service: example().key(),
        port: 81,
    });
    Case {
        to: sock("127.0.0.3:81"),
        expect,
        ..example_with(&[e])
    }
}

fn unhealthy(w: Workload) -> Workload {
    Workload {
        status: HealthStatus::Unhealthy,
        ..w
    }
}

fn only_healthy_endpoints() -> Case {
    let sick = unhealthy(endpoint(&example(), "sick", "127.0.0.21", &[]));
    let well = endpoint(&example(), "well", "127.0.0.22", &[]);
    Case {
        expect: direct_to(&well, 8080, &example()),
        ..example_with(&[sick, well])
    }
    .candidates(&[1])
}

fn health_policy_allow_all() -> Case {
    let service = Service {
        load_balancing: Some(LoadBalancing {
            health_policy: HealthPolicy::AllowAll,
            ..LoadBalancing::default()
        }),
        ..example()
    };
    let sick = unhealthy(endpoint(&service, "sick", "127.0.0.21", &[]));
    let well = endpoint(&service, "well", "127.0.0.22", &[]);
    let expect = direct_to(&sick, 8080, &service);
    let case = Case::new("127.0.0.1", "127.0.0.3:80", expect).service(service);
    case.workload(sick).workload(well).candidates(&[2]).picks(&[0])
}

fn all_endpoints_unhealthy() -> Case {
    let sick = unhealthy(endpoint(&example(), "sick", "127.0.0.21", &[]));
    let expect = Err(RouteError::NoHealthyEndpoint {
        service: example().key(),
        port: 80,
    });
    Case {
        expect,
        ..example_with(&[sick])
    }
}

fn three_endpoints() -> [Workload; 3] {
    ["127.0.0.21", "127.0.0.22", "127.0.0.23"]
        .map(|addr| endpoint(&example(), &format!("e{}", &addr[8..]), addr, &[]))
}

fn picker_chooses_among_equals() -> Case {
    let endpoints = three_endpoints();
    Case {
        expect: direct_to(&endpoints[2], 8080, &example()),
        ..example_with(&endpoints)
    }
    .candidates(&[3])
    .picks(&[2])
}

fn picker_index_wraps() -> Case {
    let endpoints = three_endpoints();
    Case {
        expect: direct_to(&endpoints[1], 8080, &example()),
        ..example_with(&endpoints)
    }
    .candidates(&[3])
    .picks(&[4])
}

/// `example.com` with this load-balancing mode and preferences, in front of endpoints in r1/z1, r1/z2
/// and r2/z3; the client sits in `region`/`zone` and must end up at endpoint `want`, or nowhere. The
/// picker answers `want` too: candidates keep snapshot order and, in these rows, start at the first.
fn by_locality(
    mode: LoadBalancingMode,
    (region, zone): (&str, &str),
    want: Option<usize>,
    candidates: &[usize],
) -> Case {
    let service = Service {
        load_balancing: lb(mode, &[LocalityScope::Region, LocalityScope::Zone]),
        ..example()
    };
    let endpoints = [
        ("r1", "z1", "127.0.0.21"),
        ("r1", "z2", "127.0.0.22"),
        ("r2", "z3", "127.0.0.23"),
    ]
    .map(|(r, z, addr)| Workload {
        locality: locality(r, z),
        ..endpoint(&service, &format!("{r}-{z}"), addr, &[])
    });
    let expect = match want {
        Some(i) => direct_to(&endpoints[i], 8080, &service),
        None => Err(RouteError::NoHealthyEndpoint {
            service: service.key(),
            port: 80,
        }),
    };
    let mut case = Case::new("127.0.0.1", "127.0.0.3:80", expect)
        .service(service)
        .source_locality(region, zone)
        .candidates(candidates)
        .picks(&[want.unwrap_or(0)]);
    case.workloads.extend(endpoints);
    case
}

fn failover_by_node() -> Case {
    let service = Service {
        load_balancing: lb(LoadBalancingMode::Failover, &[LocalityScope::Node]),
        ..example()
    };
    let far = Workload {
        node: "remote-node".into(),
        ..endpoint(&service, "far", "127.0.0.21", &[])
    };
    let near = Workload {
        node: "local-node".into(),
        ..endpoint(&service, "near", "127.0.0.22", &[])
    };
    let expect = direct_to(&near, 8080, &service);
    Case::new("127.0.0.1", "127.0.0.3:80", expect)
        .service(service)
        .workload(far)
        .workload(near)
        .candidates(&[1])
}

fn service_subject_alt_names() -> Case {
    let extra = id("other", "extra");
    let service = Service {
        subject_alt_names: vec![extra.clone()],
        ..example()
    };
    let e = endpoint(&service, "e", "127.0.0.21", &[]);
    let expect = hbone(
        HboneKind::Direct,
        ("127.0.0.21:15008", "127.0.0.21:8080"),
        &e,
        &[extra],
        Some(&service),
    );
    Case::new("127.0.0.1", "127.0.0.3:80", expect)
        .service(service)
        .workload(e)
        .candidates(&[1])
}

/// A waypoint service `waypoint.default` at 127.0.0.40 with one waypoint pod at 127.0.0.41.
fn waypoint_service(ports: &[(u16, u16)], tunnel: Option<ApplicationTunnel>) -> (Service, Workload) {
    let service = Service {
        subject_alt_names: vec![id("default", "waypoint-extra")],
        ..svc("waypoint.default", &["127.0.0.40"], ports)
    };
    let pod = Workload {
        service_account: "wp-sa".into(),
        application_tunnel: tunnel,
        services: backs(&service, &[]),
        ..pod("default", "wp", &["127.0.0.41"])
    };
    (service, pod)
}

fn workload_waypoint_by_hostname() -> Case {
    let (wp_service, wp) = waypoint_service(&[(15008, 15008)], None);
    let dest = Workload {
        waypoint: Some(gateway_named(&wp_service, 15008)),
        ..pod("default", "my-pod", &["127.0.0.2"])
    };
    let extra = wp_service.subject_alt_names.clone();
    let expect = hbone(
        HboneKind::ToWaypoint,
        ("127.0.0.41:15008", "127.0.0.2:80"),
        &wp,
        &extra,
        None,
    );
    Case::new("127.0.0.1", "127.0.0.2:80", expect)
        .service(wp_service)
        .workload(wp)
        .workload(dest)
        .candidates(&[1])
}

/// A waypoint whose service does not declare its HBONE port, which an application tunnel makes fine.
fn waypoint_application_tunnel(tunnel: bool) -> Case {
    let tunnel = tunnel.then_some(ApplicationTunnel {
        protocol: ApplicationTunnelProtocol::Proxy,
        port: Some(15088),
    });
    let (wp_service, wp) = waypoint_service(&[], tunnel);
    let gateway = gateway_named(&wp_service, 15008);
    let dest = Workload {
        waypoint: Some(gateway.clone()),
        ..pod("default", "my-pod", &["127.0.0.2"])
    };
    let expect = if tunnel.is_some() {
        let extra = wp_service.subject_alt_names.clone();
        hbone(
            HboneKind::ToWaypoint,
            ("127.0.0.41:15008", "127.0.0.2:80"),
            &wp,
            &extra,
            None,
        )
    } else {
        Err(RouteError::UnknownWaypoint { waypoint: gateway })
    };
    let candidates: &[usize] = if tunnel.is_some() { &[1] } else { &[] };
    Case::new("127.0.0.1", "127.0.0.2:80", expect)
        .service(wp_service)
        .workload(wp)
        .workload(dest)
        .candidates(candidates)
}

fn unknown_waypoint() -> Case {
    let dest = my_pod_with_waypoint(&["127.0.0.2"], "127.0.0.99");
    let expect = Err(RouteError::UnknownWaypoint {
        waypoint: gateway_at("", "127.0.0.99", 15008),
    });
    Case::new("127.0.0.1", "127.0.0.2:80", expect).workload(dest)
}

fn waypoint_service_without_endpoints() -> Case {
    let wp_service = svc("waypoint.default", &["127.0.0.40"], &[(15008, 15008)]);
    let gateway = gateway_named(&wp_service, 15008);
    let example = Service {
        waypoint: Some(gateway.clone()),
        ..example()
    };
    let expect = Err(RouteError::UnknownWaypoint { waypoint: gateway });
    Case::new("127.0.0.1", "127.0.0.3:80", expect)
        .service(example)
        .service(wp_service)
}

/// The service's own waypoint calling the service reaches an endpoint, not itself again.
fn service_waypoint_calling_its_service() -> Case {
    let service = Service {
        waypoint: Some(gateway_at("", "127.0.0.10", 15008)),
        ..example()
    };
    let e = endpoint(&service, "e", "127.0.0.21", &[]);
    let expect = direct_to(&e, 8080, &service);
    Case::new("127.0.0.10", "127.0.0.3:80", expect)
        .service(service)
        .workload(e)
        .source(WAYPOINT)
        .candidates(&[1])
}

/// ztunnel's sandwich rule: a workload's waypoint calling the workload reaches it directly, but only when
/// both its identity and its source address are the waypoint's.
fn workload_waypoint_calling_its_workload(from: &str) -> Case {
    let dest = Workload {
        protocol: TunnelProtocol::Hbone,
        ..my_pod_with_waypoint(&["127.0.0.2"], "127.0.0.10")
    };
    let expect = if from == "127.0.0.10" {
        hbone(
            HboneKind::Direct,
            ("127.0.0.2:15008", "127.0.0.2:80"),
            &dest,
            &[],
            None,
        )
    } else {
        hbone(
            HboneKind::ToWaypoint,
            ("127.0.0.10:15008", "127.0.0.2:80"),
            &waypoint(),
            &[],
            None,
        )
    };
    Case::new(from, "127.0.0.2:80", expect)
        .workload(dest)
        .source(WAYPOINT)
}

/// Service traffic is governed by the service's waypoint (none here), never by the endpoint's own.
fn service_traffic_ignores_endpoint_waypoint() -> Case {
    let e = Workload {
        waypoint: Some(gateway_at("", "127.0.0.10", 15008)),
        ..endpoint(&example(), "e", "127.0.0.21", &[])
    };
    Case {
        expect: direct_to(&e, 8080, &example()),
        ..example_with(&[e])
    }
    .candidates(&[1])
}

fn invalid_identity_fails_closed() -> Case {
    let dest = Workload {
        protocol: TunnelProtocol::Hbone,
        ..pod("", "nameless", &["127.0.0.2"])
    };
    let expect = Err(RouteError::InvalidIdentity {
        workload: dest.uid.clone(),
        source: dest.identity().unwrap_err(),
    });
    Case::new("127.0.0.1", "127.0.0.2:80", expect).workload(dest)
}

fn unknown_network_gateway() -> Case {
    let gateway = gateway_at("remote", "10.99.0.1", 15008);
    let remote = Workload {
        network: "remote".into(),
        network_gateway: Some(gateway.clone()),
        services: backs(&example(), &[]),
        ..pod("default", "remote-pod", &[])
    };
    let expect = Err(RouteError::UnknownNetworkGateway { gateway });
    Case {
        expect,
        ..example_with(&[remote])
    }
    .candidates(&[1])
}

fn ipv4_mapped_destination() -> Case {
    let dest = test_tcp(TunnelProtocol::None, "remote-node");
    Case::new(
        "127.0.0.1",
        "[::ffff:127.0.0.2]:80",
        tcp("127.0.0.2:80", &dest, None),
    )
    .workload(dest)
}

fn ipv4_mapped_passthrough() -> Case {
    Case::new("127.0.0.1", "[::ffff:1.2.3.4]:80", passthrough("1.2.3.4:80"))
}

fn endpoint_by_hostname_needs_dns() -> Case {
    let vm = Workload {
        hostname: "vm.example.internal".into(),
        ..endpoint(&example(), "vm", "127.0.0.21", &[])
    };
    let vm = Workload {
        addresses: Vec::new(),
        ..vm
    };
    let expect = Err(RouteError::NeedsDnsResolution {
        workload: vm.uid.clone(),
        hostname: vm.hostname.clone(),
    });
    Case {
        expect,
        ..example_with(&[vm])
    }
    .candidates(&[1])
}

/// A local endpoint without an address is never reached through a network gateway it names.
fn local_endpoint_without_address_is_skipped() -> Case {
    let e = Workload {
        network_gateway: Some(gateway_at("", "127.0.0.50", 15008)),
        addresses: Vec::new(),
        ..endpoint(&example(), "e", "127.0.0.21", &[])
    };
    let expect = Err(RouteError::NoHealthyEndpoint {
        service: example().key(),
        port: 80,
    });
    Case {
        expect,
        ..example_with(&[e])
    }
}

fn shared_mode_other_node_is_direct() -> Case {
    let dest = test_tcp(TunnelProtocol::Hbone, "remote-node");
    let expect = hbone(
        HboneKind::Direct,
        ("127.0.0.2:15008", "127.0.0.2:80"),
        &dest,
        &[],
        None,
    );
    Case::new("127.0.0.1", "127.0.0.2:80", expect)
        .workload(dest)
        .shared_mode()
}

/// Workload addresses are per network: another network's pod IP is not a mesh destination from here.
fn other_network_address_is_passthrough() -> Case {
    let remote = Workload {
        network: "remote".into(),
        ..pod("default", "remote-pod", &["10.0.0.2"])
    };
    Case::new("127.0.0.1", "10.0.0.2:80", passthrough("10.0.0.2:80")).workload(remote)
}

#[test_case(endpoint_port_map_wins(); "endpoint port map wins over service target port")]
#[test_case(service_target_port_fallback(); "service target port when endpoint maps none")]
#[test_case(undeclared_service_port(); "undeclared service port is refused")]
#[test_case(only_healthy_endpoints(); "only healthy endpoints are candidates")]
#[test_case(health_policy_allow_all(); "allow all health policy includes unhealthy")]
#[test_case(all_endpoints_unhealthy(); "all endpoints unhealthy")]
#[test_case(picker_chooses_among_equals(); "picker chooses among equals")]
#[test_case(picker_index_wraps(); "picker index out of range wraps")]
#[test_case(by_locality(LoadBalancingMode::Failover, ("r1", "z1"), Some(0), &[1]); "failover full match")]
#[test_case(by_locality(LoadBalancingMode::Failover, ("r1", "z9"), Some(1), &[2]); "failover partial match")]
#[test_case(by_locality(LoadBalancingMode::Failover, ("r9", "z9"), Some(2), &[3]); "failover no match takes any")]
#[test_case(by_locality(LoadBalancingMode::Strict, ("r1", "z1"), Some(0), &[1]); "strict full match")]
#[test_case(by_locality(LoadBalancingMode::Strict, ("r1", "z9"), None, &[]); "strict partial match refused")]
#[test_case(by_locality(LoadBalancingMode::Unspecified, ("r1", "z1"), Some(0), &[3]); "unspecified mode ignores preferences")]
#[test_case(failover_by_node(); "failover prefers same node")]
#[test_case(service_subject_alt_names(); "service subject alt names are expected too")]
#[test_case(workload_waypoint_by_hostname(); "workload waypoint named by service hostname")]
#[test_case(waypoint_application_tunnel(true); "waypoint port undeclared but application tunnel")]
#[test_case(waypoint_application_tunnel(false); "waypoint port undeclared without application tunnel")]
#[test_case(unknown_waypoint(); "unknown waypoint is refused")]
#[test_case(waypoint_service_without_endpoints(); "waypoint service without endpoints is refused")]
#[test_case(service_waypoint_calling_its_service(); "service waypoint calling its service does not loop")]
#[test_case(workload_waypoint_calling_its_workload("127.0.0.10"); "workload waypoint calling its workload does not loop")]
#[test_case(workload_waypoint_calling_its_workload("127.0.0.99"); "waypoint identity from another address still goes to waypoint")]
#[test_case(service_traffic_ignores_endpoint_waypoint(); "service traffic ignores endpoint waypoint")]
#[test_case(invalid_identity_fails_closed(); "invalid identity fails closed")]
#[test_case(unknown_network_gateway(); "unknown network gateway is refused")]
#[test_case(ipv4_mapped_destination(); "ipv4 mapped destination finds ipv4 workload")]
#[test_case(ipv4_mapped_passthrough(); "ipv4 mapped passthrough names ipv4")]
#[test_case(endpoint_by_hostname_needs_dns(); "endpoint by hostname needs dns")]
#[test_case(local_endpoint_without_address_is_skipped(); "local endpoint without address is skipped")]
#[test_case(shared_mode_other_node_is_direct(); "shared mode other node is direct")]
#[test_case(other_network_address_is_passthrough(); "other network address is passthrough")]
fn rules(case: Case) {
    case.run();
}

#[test]
fn random_picker_stays_in_range() {
    let mut picker = RandomPicker;
    for candidates in 1..=5 {
        for _ in 0..50 {
            assert!(picker.pick(candidates) < candidates);
        }
    }
}

#[test]
fn errors_name_the_gateway_as_istio_writes_it() {
    let by_address = RouteError::UnknownWaypoint {
        waypoint: gateway_at("net", "ff06::1", 15008),
    };
    assert_eq!(
        by_address.to_string(),
        "waypoint net/[ff06::1]:15008 cannot be resolved"
    );
    let by_name = RouteError::UnknownNetworkGateway {
        gateway: gateway_named(&example(), 15009),
    };
    assert_eq!(
        by_name.to_string(),
        "network gateway default/example.com:15009 cannot be resolved"
    );
    let authority = ServiceAuthority {
        hostname: "example.com".into(),
        port: 80,
    };
    assert_eq!(authority.to_string(), "example.com:80");
}
