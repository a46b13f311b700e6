//! Unit tests of the local configuration loader: each format, each conversion rule, and errors with their
//! file, line and column.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use mesh_core::model::{
    GatewayAddress, HealthStatus, LoadBalancing, LoadBalancingMode, Locality, LocalityScope,
    NamespacedHostname, NetworkAddr, ServicePort, TunnelProtocol,
};
use test_case::test_case;

use super::*;
use crate::authz::{
    AuthzAction, AuthzClause, AuthzMatch, AuthzRule, AuthzScope, ServiceAccountMatch, StringMatch,
};

const TWO_WORKLOADS: &str = include_str!("../../tests/data/local/two-workloads.yaml");
const TWO_WORKLOADS_POLICY: &str = include_str!("../../tests/data/local/two-workloads-policy.yaml");
const LOCALHOST: &str = include_str!("../../tests/data/local/localhost.yaml");
const KUBE_AMBIENT: &str = include_str!("../../tests/data/local/kube-ambient.yaml");

fn load(yaml: &str) -> Result<LocalConfig, XdsError> {
    load_str(yaml, "test.yaml", &LocalOptions::default())
}

fn error(yaml: &str) -> String {
    match load(yaml) {
        Ok(config) => panic!("expected an error, loaded {config:#?}"),
        Err(e) => e.to_string(),
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn key(text: &str) -> NamespacedHostname {
    text.parse().unwrap()
}

fn workload<'a>(config: &'a LocalConfig, uid: &str) -> &'a Workload {
    config
        .workloads
        .iter()
        .find(|w| &*w.uid == uid)
        .unwrap_or_else(|| {
            panic!(
                "no workload {uid}: {:?}",
                config.workloads.iter().map(|w| &w.uid).collect::<Vec<_>>()
            )
        })
}

fn service<'a>(config: &'a LocalConfig, key: &str) -> &'a Service {
    config
        .services
        .iter()
        .find(|s| s.key().to_string() == key)
        .unwrap_or_else(|| panic!("no service {key}"))
}

fn policy<'a>(config: &'a LocalConfig, key: &str) -> &'a XdsAuthorization {
    config
        .policies
        .iter()
        .find(|p| p.key() == key)
        .unwrap_or_else(|| {
            panic!(
                "no policy {key}: {:?}",
                config.policies.iter().map(|p| p.key()).collect::<Vec<_>>()
            )
        })
}

fn exact(text: &str) -> StringMatch {
    StringMatch::Exact(text.into())
}

fn one_match(m: AuthzMatch) -> AuthzClause {
    AuthzClause { matches: vec![m] }
}

// ---- Istio ztunnel's format -------------------------------------------------------------------------

#[test]
fn protocols_two_workload_example_loads_exactly() {
    let config = load(TWO_WORKLOADS).unwrap();
    assert_eq!(config.workloads.len(), 2);
    assert!(config.policies.is_empty());

    let client = workload(&config, "cluster1//v1/Pod/default/client");
    let expected_client = Workload {
        service_account: "client".into(),
        addresses: vec![ip("198.18.0.1")],
        protocol: TunnelProtocol::Hbone,
        node: "node-a".into(),
        cluster_id: "Kubernetes".into(),
        ..Workload::new("cluster1//v1/Pod/default/client", "client", "default")
    };
    assert_eq!(*client, expected_client);
    assert_eq!(
        client.identity().unwrap().as_str(),
        "spiffe://cluster.local/ns/default/sa/client"
    );

    let server = workload(&config, "cluster1//v1/Pod/default/server");
    assert_eq!(
        server.identity().unwrap().as_str(),
        "spiffe://cluster.local/ns/default/sa/server"
    );
    assert_eq!(server.addresses, [ip("198.18.0.2")]);
    assert_eq!(&*server.node, "node-b");
    assert_eq!(
        server.services,
        BTreeMap::from([(
            key("default/echo.default.svc.cluster.local"),
            BTreeMap::from([(80, 8080)])
        )])
    );

    let expected_echo = Service {
        vips: vec!["/198.19.0.10".parse().unwrap()],
        ports: vec![ServicePort::new(80, 8080), ServicePort::new(5201, 5201)],
        ..Service::new("echo", "default", "echo.default.svc.cluster.local")
    };
    assert_eq!(config.services, [expected_echo]);
}

#[test]
fn protocols_policy_example_loads_exactly() {
    let config = load(TWO_WORKLOADS_POLICY).unwrap();
    assert_eq!(config.workloads, load(TWO_WORKLOADS).unwrap().workloads);
    let expected = XdsAuthorization {
        name: "deny-iperf-from-client".into(),
        namespace: "default".into(),
        scope: AuthzScope::Namespace,
        action: AuthzAction::Deny,
        dry_run: false,
        rules: vec![AuthzRule {
            clauses: vec![one_match(AuthzMatch {
                destination_ports: vec![5201],
                principals: vec![exact("cluster.local/ns/default/sa/client")],
                ..AuthzMatch::default()
            })],
        }],
    };
    assert_eq!(config.policies, [expected]);
}

#[test]
fn ztunnel_localhost_example_loads() {
    let config = load(LOCALHOST).unwrap();
    let local = workload(&config, "cluster1//v1/Pod/default/local");
    assert_eq!(local.protocol, TunnelProtocol::Hbone);
    assert_eq!(
        local.identity().unwrap().as_str(),
        "spiffe://cluster.local/ns/default/sa/default"
    );
    let tcp = workload(&config, "cluster1//v1/Pod/default/local-tcp");
    assert_eq!(tcp.protocol, TunnelProtocol::None);
    assert_eq!(tcp.addresses, [ip("127.0.0.2")]);
    assert_eq!(tcp.services.len(), 2);

    let remote = service(&config, "default/example2.com");
    assert_eq!(remote.vips, [NetworkAddr::new("remote", ip("127.10.0.2"))]);
    let local_service = service(&config, "default/example.com");
    assert_eq!(
        local_service.subject_alt_names[0].as_str(),
        "spiffe://cluster.local/ns/default/sa/local"
    );

    let allow = policy(&config, "default/deny-9999");
    assert_eq!(allow.action, AuthzAction::Allow);
    assert!(!allow.dry_run, "dryRun may be left out");
    assert_eq!(
        allow.rules,
        [AuthzRule {
            clauses: vec![one_match(AuthzMatch {
                not_destination_ports: vec![9999],
                ..AuthzMatch::default()
            })]
        }]
    );
}

#[test]
fn ztunnel_every_field() {
    let yaml = r#"
workloads:
- uid: c1//Pod/ns1/w
  name: w
  namespace: ns1
  trustDomain: example.org
  serviceAccount: sa1
  workloadIps: ["10.0.0.1", "fd00::1"]
  protocol: HBONE
  networkMode: HostNetwork
  network: net1
  workloadName: w-deploy
  workloadType: Deployment
  canonicalName: w-app
  canonicalRevision: v1
  hostname: ""
  node: n1
  nativeTunnel: true
  applicationTunnel: {protocol: PROXY, port: 15088}
  authorizationPolicies: [ns1/p1]
  status: Unhealthy
  clusterId: c1
  locality: {region: r, zone: z, subzone: s}
  capacity: 3
  waypoint: {destination: "ns1/wp.ns1.svc.cluster.local", hboneMtlsPort: 15008}
  networkGateway: {destination: "net1/192.0.2.1", hboneMtlsPort: 15009}
  services: {}
services:
- name: s
  namespace: ns1
  hostname: s.example
  vips: ["net1/10.1.0.1"]
  ports: {443: 8443}
  endpoints: {}
  loadBalancer: {routingPreferences: [Network, Zone], mode: Failover, healthPolicy: AllowAll}
  ipFamilies: Dual
  canonical: true
  subjectAltNames: ["spiffe://example.org/ns/ns1/sa/sa1", "dns.example"]
policies:
- name: p1
  namespace: ns1
  scope: WorkloadSelector
  action: Allow
  dryRun: true
  rules:
  - - - namespaces: [!Prefix "team-"]
        notNamespaces: [!Suffix "-test"]
        principals: [!Presence []]
        notPrincipals:
        - !Presence
        serviceAccounts: [{namespace: ns1, serviceAccount: sa1}]
        sourceIps: ["10.0.0.0/8", "192.0.2.7"]
        notDestinationIps: ["fd00::/64"]
      - destinationPorts: [443]
    - - {}
"#;
    let config = load(yaml).unwrap();
    let w = &config.workloads[0];
    assert_eq!(
        w.identity().unwrap().as_str(),
        "spiffe://example.org/ns/ns1/sa/sa1"
    );
    assert_eq!(w.addresses, [ip("10.0.0.1"), ip("fd00::1")]);
    assert_eq!(w.network_mode, mesh_core::model::NetworkMode::HostNetwork);
    assert_eq!(&*w.workload_type, "deployment");
    assert_eq!(&*w.cluster_id, "c1");
    assert_eq!(w.status, HealthStatus::Unhealthy);
    assert_eq!(w.application_tunnel.unwrap().port, Some(15088));
    assert_eq!(
        w.waypoint,
        Some(GatewayAddress::hostname(key("ns1/wp.ns1.svc.cluster.local")))
    );
    assert_eq!(
        w.network_gateway,
        Some(GatewayAddress {
            hbone_mtls_port: 15009,
            ..GatewayAddress::address(NetworkAddr::new("net1", ip("192.0.2.1")))
        })
    );
    assert_eq!(
        w.locality,
        Some(Locality {
            region: "r".into(),
            zone: "z".into(),
            subzone: "s".into()
        })
    );

    let s = &config.services[0];
    assert_eq!(s.subject_alt_names.len(), 1, "the DNS name is skipped");
    assert_eq!(
        s.load_balancing,
        Some(LoadBalancing {
            routing_preference: vec![LocalityScope::Network, LocalityScope::Zone],
            mode: LoadBalancingMode::Failover,
            health_policy: mesh_core::model::HealthPolicy::AllowAll,
        })
    );

    let p = &config.policies[0];
    assert!(p.dry_run);
    assert_eq!(p.scope, AuthzScope::WorkloadSelector);
    let first = &p.rules[0].clauses[0].matches;
    assert_eq!(first.len(), 2);
    assert_eq!(first[0].namespaces, [StringMatch::Prefix("team-".into())]);
    assert_eq!(first[0].not_namespaces, [StringMatch::Suffix("-test".into())]);
    assert_eq!(first[0].principals, [StringMatch::Presence]);
    assert_eq!(first[0].not_principals, [StringMatch::Presence]);
    assert_eq!(
        first[0].service_accounts,
        [ServiceAccountMatch {
            namespace: "ns1".into(),
            service_account: "sa1".into()
        }]
    );
    assert_eq!(
        first[0].source_ips,
        [
            "10.0.0.0/8".parse::<IpNet>().unwrap(),
            "192.0.2.7/32".parse().unwrap()
        ]
    );
    assert_eq!(first[1].destination_ports, [443]);
    // Kept verbatim: ztunnel's own meaning of an empty match (it never matches) applies where it is served.
    assert_eq!(p.rules[0].clauses[1].matches, [AuthzMatch::default()]);
}

#[test]
fn ztunnel_defaults_fill_what_ztunnel_would_leave_empty() {
    let yaml = "workloads:\n- name: bare\n  namespace: default\n";
    let options = LocalOptions {
        cluster_id: "east".into(),
        trust_domain: TrustDomain::new("corp.example").unwrap(),
        ..LocalOptions::default()
    };
    let config = load_str(yaml, "inline", &options).unwrap();
    let w = &config.workloads[0];
    assert_eq!(&*w.uid, "east//Pod/default/bare");
    assert_eq!(&*w.cluster_id, "east");
    assert_eq!(
        w.identity().unwrap().as_str(),
        "spiffe://corp.example/ns/default/sa/default"
    );
    assert!(w.addresses.is_empty());
    assert_eq!(w.protocol, TunnelProtocol::None);
}

#[test]
fn several_documents_and_files_merge_in_order() {
    let yaml = "# leading comment\n---\nworkloads:\n- {uid: a, name: a, namespace: default}\n---\n---\n# only a comment\n---\nworkloads:\n- {uid: b, name: b, namespace: default}\n...\n";
    let config = load(yaml).unwrap();
    let uids: Vec<&str> = config.workloads.iter().map(|w| &*w.uid).collect();
    assert_eq!(uids, ["a", "b"]);
}

#[test_case(
    "workloads:\n- uid: a\n  namespace: default\n  workloadIps: [\"1.2.3.300\"]\n",
    "test.yaml:4:17: workloads[0].workloadIps[0]: invalid IP address syntax";
    "bad IP names the value's line and column"
)]
#[test_case(
    "workloads:\n- uid: a\n  namespace: default\n  protocol: QUIC\n",
    "test.yaml:4:13: workloads[0].protocol: unknown variant `QUIC`, expected `TCP` or `HBONE`";
    "unknown enum value"
)]
#[test_case(
    "\n\nservices:\n- name: s\n  namespace: default\n  hostname: s\n  vips: [\"10.0.0.1\"]\n",
    "test.yaml:7:9: services[0].vips[0]: invalid network address \"10.0.0.1\": expected network/ip";
    "vip without a network"
)]
#[test_case(
    "workloads:\n- uid: a\n  namespace: default\n  services:\n    \"no-slash\": {80: 8080}\n",
    "test.yaml:5:5: workloads[0].services.no-slash: invalid service key \"no-slash\": expected namespace/hostname";
    "bad service key"
)]
#[test_case(
    "workloads:\n- uid: a\n  namespace: default\n  trustDomain: \"Bad Domain\"\n",
    "test.yaml:1:1: workloads[0].trustDomain: invalid trust domain \"Bad Domain\"";
    "bad trust domain names the workload"
)]
#[test_case(
    "workloads:\n- uid: a\n  namespace: \"a/b\"\n",
    "test.yaml:1:1: workloads[0].namespace: invalid SPIFFE ID";
    "namespace that is not a SPIFFE segment"
)]
#[test_case(
    "policies:\n- name: p\n  namespace: default\n  scope: Namespace\n  action: Deny\n  rules:\n  - - - notDestinationPort: [1]\n",
    "test.yaml:7:9: policies[0].rules[0][0][0].notDestinationPort: unknown field `notDestinationPort`";
    "misspelt match field is refused"
)]
#[test_case(
    "policies:\n- name: p\n  namespace: default\n  scope: Namespace\n  action: Deny\n  rules:\n  - - - destinationPorts: [70000]\n",
    "test.yaml:7:28: policies[0].rules[0][0][0].destinationPorts[0]: invalid value: integer `70000`, expected u16";
    "port out of range"
)]
#[test_case(
    "policies:\n- name: p\n  namespace: default\n  scope: Namespace\n  action: Deny\n  rules:\n  - - - principals: [!Regex \"x\"]\n",
    "test.yaml:7:21: policies[0].rules[0][0][0].principals[0]: unknown variant `Regex`";
    "unknown string match tag"
)]
#[test_case(
    "workloads: [\n",
    "test.yaml:2:1: ";
    "broken YAML"
)]
#[test_case("- just\n- a list\n", "test.yaml:1:1: a document must be a mapping"; "not a mapping")]
#[test_case("hello: world\n", "test.yaml:1:1: neither a Kubernetes object"; "unknown shape")]
fn ztunnel_errors_name_file_line_and_field(yaml: &str, expected: &str) {
    let message = error(yaml);
    assert!(
        message.starts_with(expected),
        "{message:?} does not start with {expected:?}"
    );
}

#[test]
fn unknown_workload_field_is_refused() {
    let message = error("workloads:\n- uid: a\n  namespace: default\n  workloadIp: \"10.0.0.1\"\n");
    assert!(
        message.starts_with("test.yaml:4:3: workloads[0].workloadIp: unknown field `workloadIp`"),
        "{message}"
    );
}

// ---- Kubernetes objects -----------------------------------------------------------------------------

#[test]
fn kubectl_objects_give_the_workloads_and_services_istiod_would() {
    let config = load(KUBE_AMBIENT).unwrap();

    let echo = workload(&config, "Kubernetes//Pod/shop/echo-7d9c6b5f4-x2x9k");
    let expected = Workload {
        service_account: "echo".into(),
        addresses: vec![ip("10.244.1.7")],
        node: "node-a".into(),
        protocol: TunnelProtocol::Hbone,
        canonical_name: "echo".into(),
        canonical_revision: "v2".into(),
        workload_type: "deployment".into(),
        workload_name: "echo".into(),
        cluster_id: "Kubernetes".into(),
        locality: Some(Locality {
            region: "us-east1".into(),
            zone: "us-east1-b".into(),
            subzone: "".into(),
        }),
        status: HealthStatus::Healthy,
        // The named target port resolves through the container port; `metrics` is not declared, so the
        // pod does not serve port 15090.
        services: BTreeMap::from([(
            key("shop/echo.shop.svc.cluster.local"),
            BTreeMap::from([(80, 8080), (9090, 9091)]),
        )]),
        ..Workload::new(
            "Kubernetes//Pod/shop/echo-7d9c6b5f4-x2x9k",
            "echo-7d9c6b5f4-x2x9k",
            "shop",
        )
    };
    assert_eq!(*echo, expected);
    assert_eq!(
        echo.identity().unwrap().as_str(),
        "spiffe://cluster.local/ns/shop/sa/echo"
    );

    let tool = workload(&config, "Kubernetes//Pod/shop/tool");
    assert_eq!(tool.protocol, TunnelProtocol::None, "opted out by label");
    assert!(tool.services.is_empty(), "no Service selects app=tool");
    assert_eq!(
        tool.waypoint, None,
        "a waypoint serves Services unless its Gateway says otherwise"
    );

    let report = workload(&config, "Kubernetes//Pod/legacy/report-28512345-abcde");
    assert_eq!(report.protocol, TunnelProtocol::None, "namespace not enrolled");
    assert_eq!(report.status, HealthStatus::Unhealthy, "Ready is False");
    assert_eq!(
        (&*report.workload_name, &*report.workload_type),
        ("report", "cronjob")
    );
    assert_eq!(
        (&*report.canonical_name, &*report.canonical_revision),
        ("report", "7")
    );

    let uids: Vec<&str> = config.workloads.iter().map(|w| &*w.uid).collect();
    assert_eq!(
        uids.len(),
        3,
        "finished, IP-less and host-network pods are not workloads: {uids:?}"
    );

    let expected_service = Service {
        vips: vec![NetworkAddr::new("", ip("10.96.10.20"))],
        ports: vec![
            ServicePort::new(80, 0),
            ServicePort::new(9090, 9091),
            ServicePort::new(15090, 0),
        ],
        waypoint: Some(GatewayAddress::hostname(key(
            "shop/waypoint.shop.svc.cluster.local",
        ))),
        ..Service::new("echo", "shop", "echo.shop.svc.cluster.local")
    };
    assert_eq!(config.services, [expected_service]);
    assert!(config.policies.is_empty());
}

const NAMESPACE_AMBIENT: &str =
    "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns\n  labels: {istio.io/dataplane-mode: ambient}\n";

fn pod(name: &str, labels: &str, ip: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: ns\n  labels: {labels}\nspec:\n  serviceAccountName: {name}\n  containers:\n  - name: c\n    ports:\n    - {{name: web, containerPort: 8080}}\nstatus:\n  phase: Running\n  podIP: {ip}\n  conditions: [{{type: Ready, status: \"True\"}}]\n"
    )
}

fn kube_service(name: &str, labels: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: ns\n  labels: {labels}\nspec: {spec}\n"
    )
}

#[test_case("{}", TunnelProtocol::Hbone; "namespace enrollment")]
#[test_case("{istio.io/dataplane-mode: none}", TunnelProtocol::None; "pod opts out")]
#[test_case("{networking.istio.io/tunnel: http}", TunnelProtocol::Hbone; "native tunnel")]
fn pod_protocol(labels: &str, expected: TunnelProtocol) {
    let config = load(&format!("{NAMESPACE_AMBIENT}{}", pod("p", labels, "10.0.0.1"))).unwrap();
    assert_eq!(config.workloads[0].protocol, expected);
}

#[test]
fn pod_enrolled_by_its_own_label_without_a_namespace_object() {
    let yaml = pod("p", "{istio.io/dataplane-mode: ambient}", "10.0.0.1");
    assert_eq!(load(&yaml).unwrap().workloads[0].protocol, TunnelProtocol::Hbone);
    let yaml = pod("p", "{}", "10.0.0.1");
    assert_eq!(load(&yaml).unwrap().workloads[0].protocol, TunnelProtocol::None);
}

#[test]
fn services_cluster_ips_and_load_balancing() {
    let yaml = [
        kube_service(
            "dual",
            "{}",
            "{clusterIP: 10.96.0.1, clusterIPs: [10.96.0.1, \"fd00::1\"], ports: [{port: 80}], trafficDistribution: PreferClose}",
        ),
        kube_service("headless", "{}", "{clusterIP: None, ports: [{port: 80, targetPort: 8080}]}"),
        kube_service("local", "{}", "{clusterIP: 10.96.0.2, internalTrafficPolicy: Local}"),
    ]
    .concat();
    let config = load(&yaml).unwrap();
    let dual = service(&config, "ns/dual.ns.svc.cluster.local");
    assert_eq!(
        dual.vips,
        [
            NetworkAddr::new("", ip("10.96.0.1")),
            NetworkAddr::new("", ip("fd00::1"))
        ]
    );
    assert_eq!(
        dual.ports,
        [ServicePort::new(80, 80)],
        "targetPort defaults to the port"
    );
    assert_eq!(
        dual.load_balancing.as_ref().unwrap().mode,
        LoadBalancingMode::Failover
    );
    let headless = service(&config, "ns/headless.ns.svc.cluster.local");
    assert!(headless.vips.is_empty());
    assert_eq!(headless.ports, [ServicePort::new(80, 8080)]);
    let local = service(&config, "ns/local.ns.svc.cluster.local");
    assert_eq!(
        local.load_balancing,
        Some(LoadBalancing {
            routing_preference: vec![LocalityScope::Node],
            mode: LoadBalancingMode::Strict,
            ..LoadBalancing::default()
        })
    );
}

#[test]
fn options_shape_the_conversion() {
    let options = LocalOptions {
        cluster_id: "east".into(),
        trust_domain: TrustDomain::new("corp.example").unwrap(),
        cluster_domain: "corp.internal".into(),
        root_namespace: "mesh-root".into(),
        default_network: "net-east".into(),
    };
    let yaml = [
        pod("p", "{app: a}", "10.0.0.1"),
        kube_service(
            "svc",
            "{istio.io/use-waypoint: wp}",
            "{clusterIP: 10.96.0.1, selector: {app: a}, ports: [{port: 80, targetPort: web}]}",
        ),
    ]
    .concat();
    let config = load_str(&yaml, "x", &options).unwrap();
    let w = &config.workloads[0];
    assert_eq!(&*w.uid, "east//Pod/ns/p");
    assert_eq!(&*w.network, "net-east");
    assert_eq!(w.identity().unwrap().as_str(), "spiffe://corp.example/ns/ns/sa/p");
    assert_eq!(
        w.services[&key("ns/svc.ns.svc.corp.internal")],
        BTreeMap::from([(80, 8080)])
    );
    let s = &config.services[0];
    assert_eq!(s.vips, [NetworkAddr::new("net-east", ip("10.96.0.1"))]);
    assert_eq!(
        s.waypoint,
        Some(GatewayAddress::hostname(key("ns/wp.ns.svc.corp.internal")))
    );
}

#[test]
fn waypoints_follow_istiods_rules() {
    let gateway = |name: &str, waypoint_for: &str| {
        format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: {name}\n  namespace: ns\n  labels: {{istio.io/waypoint-for: {waypoint_for}}}\nspec:\n  gatewayClassName: istio-waypoint\n"
        )
    };
    let yaml = [
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns\n  labels: {istio.io/use-waypoint: ns-wp}\n"
            .to_owned(),
        gateway("for-workloads", "workload"),
        gateway("for-all", "all"),
        pod("inherits", "{}", "10.0.0.1"),
        pod(
            "to-workloads",
            "{istio.io/use-waypoint: for-workloads}",
            "10.0.0.2",
        ),
        pod(
            "to-all",
            "{istio.io/use-waypoint: for-all, istio.io/use-waypoint-namespace: ns}",
            "10.0.0.3",
        ),
        pod(
            "instance",
            "{gateway.networking.k8s.io/gateway-name: for-all, istio.io/use-waypoint: for-all}",
            "10.0.0.4",
        ),
        kube_service("inherits", "{}", "{}"),
        kube_service("opts-out", "{istio.io/use-waypoint: none}", "{}"),
        kube_service("to-workloads", "{istio.io/use-waypoint: for-workloads}", "{}"),
        kube_service(
            "the-waypoint",
            "{gateway.istio.io/managed: istio.io-mesh-controller}",
            "{}",
        ),
    ]
    .concat();
    let config = load(&yaml).unwrap();
    let wp = |name: &str| {
        Some(GatewayAddress::hostname(key(&format!(
            "ns/{name}.ns.svc.cluster.local"
        ))))
    };
    assert_eq!(workload(&config, "Kubernetes//Pod/ns/inherits").waypoint, None);
    assert_eq!(
        workload(&config, "Kubernetes//Pod/ns/to-workloads").waypoint,
        wp("for-workloads")
    );
    assert_eq!(
        workload(&config, "Kubernetes//Pod/ns/to-all").waypoint,
        wp("for-all")
    );
    assert_eq!(workload(&config, "Kubernetes//Pod/ns/instance").waypoint, None);
    assert_eq!(
        service(&config, "ns/inherits.ns.svc.cluster.local").waypoint,
        wp("ns-wp")
    );
    assert_eq!(
        service(&config, "ns/opts-out.ns.svc.cluster.local").waypoint,
        None
    );
    assert_eq!(
        service(&config, "ns/to-workloads.ns.svc.cluster.local").waypoint,
        None
    );
    let waypoint_service = service(&config, "ns/the-waypoint.ns.svc.cluster.local");
    assert_eq!(waypoint_service.waypoint, None);
    assert_eq!(
        waypoint_service.load_balancing.as_ref().unwrap().mode,
        LoadBalancingMode::Failover
    );
}

#[test]
fn service_entry_hosts_and_endpoints() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: db
  namespace: ns
  labels: {app: db}
spec:
  hosts: [db.example, db-ro.example]
  addresses: [240.0.0.1, 240.0.0.2/32]
  ports:
  - {number: 5432, name: pg, protocol: TCP}
  - {number: 9000, name: admin, targetPort: 9001}
  subjectAltNames: ["spiffe://cluster.local/ns/ns/sa/db"]
  resolution: STATIC
  endpoints:
  - address: 10.1.0.1
    ports: {pg: 15432}
    serviceAccount: db
    locality: us-east1/us-east1-b
  - address: db-2.example
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata:
  name: external
  namespace: ns
spec:
  hosts: [api.example]
  ports: [{number: 443, name: https}]
  resolution: DNS
"#;
    let config = load(yaml).unwrap();
    let db = service(&config, "ns/db.example");
    assert_eq!(
        db.vips,
        [
            NetworkAddr::new("", ip("240.0.0.1")),
            NetworkAddr::new("", ip("240.0.0.2"))
        ]
    );
    assert_eq!(
        db.ports,
        [ServicePort::new(5432, 5432), ServicePort::new(9000, 9001)]
    );
    assert_eq!(
        db.subject_alt_names[0].as_str(),
        "spiffe://cluster.local/ns/ns/sa/db"
    );
    let db_ro = service(&config, "ns/db-ro.example");
    assert_eq!(&*db_ro.name, "db");
    assert!(
        db_ro.vips.is_empty(),
        "a VIP names one service: the entry's first host"
    );

    let first = workload(
        &config,
        "Kubernetes/networking.istio.io/ServiceEntry/ns/db/10.1.0.1",
    );
    assert_eq!(first.addresses, [ip("10.1.0.1")]);
    assert_eq!(
        first.identity().unwrap().as_str(),
        "spiffe://cluster.local/ns/ns/sa/db"
    );
    assert_eq!(
        first.services[&key("ns/db.example")],
        BTreeMap::from([(5432, 15432), (9000, 9001)])
    );
    assert_eq!(first.services.len(), 2, "every host of the entry");
    assert_eq!(first.locality.as_ref().unwrap().zone.as_ref(), "us-east1-b");
    let second = workload(
        &config,
        "Kubernetes/networking.istio.io/ServiceEntry/ns/db/db-2.example",
    );
    assert!(second.addresses.is_empty());
    assert_eq!(&*second.hostname, "db-2.example");

    let implicit = workload(
        &config,
        "Kubernetes/networking.istio.io/ServiceEntry/ns/external/api.example",
    );
    assert_eq!(&*implicit.hostname, "api.example");
    assert_eq!(
        implicit.services[&key("ns/api.example")],
        BTreeMap::from([(443, 443)])
    );
}

#[test]
fn service_entry_cidr_is_refused_not_dropped() {
    let yaml = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: e, namespace: ns}\nspec:\n  hosts: [a.example]\n  addresses: [10.0.0.0/24]\n";
    let message = error(yaml);
    assert_eq!(
        message,
        "test.yaml:1:1: spec.addresses[0]: \"10.0.0.0/24\" is not an IP address or a single-address CIDR"
    );
}

// ---- AuthorizationPolicy ----------------------------------------------------------------------------

fn authorization(namespace: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  namespace: {namespace}\nspec:\n{spec}"
    )
}

fn converted(namespace: &str, spec: &str) -> Option<XdsAuthorization> {
    load(&authorization(namespace, spec))
        .unwrap()
        .policies
        .into_iter()
        .next()
}

fn rule(clauses: Vec<AuthzClause>) -> AuthzRule {
    AuthzRule { clauses }
}

#[test_case(
    "  action: ALLOW\n  rules:\n  - to: [{operation: {methods: [GET]}}]\n  - from: [{source: {namespaces: [a]}}]\n",
    vec![rule(vec![one_match(AuthzMatch { namespaces: vec![exact("a")], ..AuthzMatch::default() })])];
    "ALLOW rule with an L7 attribute is dropped, the L4 rule is kept"
)]
#[test_case(
    "  action: ALLOW\n  rules:\n  - from: [{source: {requestPrincipals: [\"*\"]}}]\n",
    vec![];
    "ALLOW with only L7 rules allows nothing"
)]
#[test_case(
    "  action: ALLOW\n  rules:\n  - when: [{key: \"request.headers[x-user]\", values: [a]}]\n",
    vec![];
    "ALLOW with an L7 condition is dropped"
)]
#[test_case(
    "  action: DENY\n  rules:\n  - to: [{operation: {methods: [POST], ports: [\"8080\"]}}]\n",
    vec![rule(vec![one_match(AuthzMatch { destination_ports: vec![8080], ..AuthzMatch::default() })])];
    "DENY loses its L7 attributes and keeps the rest"
)]
#[test_case(
    "  action: DENY\n  rules:\n  - to: [{operation: {paths: [/admin]}}]\n    from: [{source: {notNamespaces: [trusted]}}]\n",
    vec![rule(vec![one_match(AuthzMatch { not_namespaces: vec![exact("trusted")], ..AuthzMatch::default() })])];
    "DENY with an L7-only entry: that part matches everything"
)]
#[test_case(
    "  action: DENY\n  rules:\n  - to: [{operation: {methods: [DELETE]}}]\n",
    vec![rule(vec![])];
    "DENY with only L7 attributes denies everything (fails closed)"
)]
#[test_case(
    "  action: DENY\n  rules:\n  - when:\n    - {key: source.ip, values: [10.0.0.0/8], notValues: [10.1.0.0/16]}\n    - {key: \"request.auth.claims[group]\", values: [admin]}\n",
    vec![rule(vec![one_match(AuthzMatch {
        source_ips: vec!["10.0.0.0/8".parse().unwrap()],
        not_source_ips: vec!["10.1.0.0/16".parse().unwrap()],
        ..AuthzMatch::default()
    })])];
    "DENY conditions: L4 kept, L7 dropped"
)]
#[test_case(
    "  rules:\n  - from:\n    - source:\n        principals: [\"*\", \"*/sa/admin\", \"cluster.local/ns/a/*\", cluster.local/ns/a/sa/b]\n        serviceAccounts: [other/sa]\n        ipBlocks: [192.0.2.1]\n    to:\n    - operation: {notPorts: [\"22\"]}\n    when:\n    - {key: destination.port, values: [\"443\"]}\n",
    vec![rule(vec![
        one_match(AuthzMatch { not_destination_ports: vec![22], ..AuthzMatch::default() }),
        one_match(AuthzMatch {
            principals: vec![
                StringMatch::Presence,
                StringMatch::Suffix("/sa/admin".into()),
                StringMatch::Prefix("cluster.local/ns/a/".into()),
                exact("cluster.local/ns/a/sa/b"),
            ],
            service_accounts: vec![ServiceAccountMatch { namespace: "other".into(), service_account: "sa".into() }],
            source_ips: vec!["192.0.2.1/32".parse().unwrap()],
            ..AuthzMatch::default()
        }),
        one_match(AuthzMatch { destination_ports: vec![443], ..AuthzMatch::default() }),
    ])];
    "ALLOW (the default) in istiod's clause order: to, from, when"
)]
#[test_case(
    "  action: ALLOW\n  rules:\n  - from: [{source: {}}, {source: {namespaces: [a]}}]\n  - to: [{operation: {}}]\n",
    vec![rule(vec![one_match(AuthzMatch { namespaces: vec![exact("a")], ..AuthzMatch::default() })])];
    "ALLOW: an empty entry never matches"
)]
#[test_case("  rules:\n  - {}\n", vec![rule(vec![])]; "an empty rule matches everything")]
fn authorization_policy_rules(spec: &str, expected: Vec<AuthzRule>) {
    let policy = converted("ns", spec).expect("sent to ztunnel");
    assert_eq!(policy.rules, expected);
}

#[test_case("ns", "  action: DENY\n", Some(AuthzScope::Namespace); "namespace")]
#[test_case("istio-system", "  action: DENY\n", Some(AuthzScope::Global); "root namespace")]
#[test_case("ns", "  selector: {matchLabels: {app: a}}\n", Some(AuthzScope::WorkloadSelector); "selector")]
#[test_case("ns", "  action: AUDIT\n", None; "audit is not sent")]
#[test_case("ns", "  action: CUSTOM\n  provider: {name: ext}\n", None; "custom is not sent")]
#[test_case("ns", "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}]\n", None; "waypoint policy is not sent")]
fn authorization_policy_scope(namespace: &str, spec: &str, expected: Option<AuthzScope>) {
    assert_eq!(converted(namespace, spec).map(|p| p.scope), expected);
}

#[test]
fn dry_run_policy_is_not_sent() {
    let yaml = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  namespace: ns\n  annotations: {istio.io/dry-run: \"true\"}\nspec:\n  action: DENY\n";
    assert!(load(yaml).unwrap().policies.is_empty());
}

#[test]
fn selected_workloads_list_their_policies() {
    let yaml = [
        pod("a", "{app: a}", "10.0.0.1"),
        pod("b", "{app: b}", "10.0.0.2"),
        authorization("ns", "  selector: {matchLabels: {app: a}}\n  action: DENY\n"),
        authorization("istio-system", "  selector: {matchLabels: {app: a}}\n")
            .replace("name: p", "name: mesh"),
        authorization("other", "  selector: {matchLabels: {app: a}}\n").replace("name: p", "name: elsewhere"),
        authorization("ns", "  action: DENY\n").replace("name: p", "name: whole-ns"),
    ]
    .concat();
    let config = load(&yaml).unwrap();
    let listed = |uid: &str| {
        workload(&config, uid)
            .authorization_policies
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(listed("Kubernetes//Pod/ns/a"), ["istio-system/mesh", "ns/p"]);
    assert!(
        listed("Kubernetes//Pod/ns/b").is_empty(),
        "namespace-scoped policies are not listed"
    );
    assert_eq!(config.policies.len(), 4);
}

#[test]
fn invalid_policy_names_the_field() {
    let yaml = authorization("ns", "  rules:\n  - from: [{source: {ipBlocks: [not-an-ip]}}]\n");
    assert_eq!(
        error(&yaml),
        "test.yaml:2:1: spec.rules[0].from[0].source.ipBlocks[0]: \"not-an-ip\" is not an IP address or CIDR"
    );
}

// ---- PeerAuthentication -----------------------------------------------------------------------------

fn peer_authentication(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  creationTimestamp: \"2024-01-01T00:00:00Z\"\nspec:\n{spec}"
    )
}

#[test]
fn strict_peer_authentication_gives_the_static_policy() {
    let yaml = [
        pod("a", "{app: a}", "10.0.0.1"),
        pod("b", "{app: b}", "10.0.0.2"),
        peer_authentication("ns", "default", "  mtls: {mode: STRICT}\n"),
        peer_authentication(
            "ns",
            "b-permissive",
            "  selector: {matchLabels: {app: b}}\n  mtls: {mode: PERMISSIVE}\n",
        ),
    ]
    .concat();
    let config = load(&yaml).unwrap();
    let strict = policy(&config, "istio-system/istio_converted_static_strict");
    assert_eq!(
        *strict,
        XdsAuthorization {
            name: "istio_converted_static_strict".into(),
            namespace: "istio-system".into(),
            scope: AuthzScope::WorkloadSelector,
            action: AuthzAction::Deny,
            dry_run: false,
            rules: vec![rule(vec![one_match(AuthzMatch {
                not_principals: vec![StringMatch::Presence],
                ..AuthzMatch::default()
            })])],
        }
    );
    let a = workload(&config, "Kubernetes//Pod/ns/a");
    assert_eq!(
        a.authorization_policies,
        [Arc::from("istio-system/istio_converted_static_strict")]
    );
    let b = workload(&config, "Kubernetes//Pod/ns/b");
    assert!(
        b.authorization_policies.is_empty(),
        "the workload policy makes it PERMISSIVE"
    );
}

#[test]
fn mesh_wide_strict_applies_everywhere_unless_a_namespace_says_otherwise() {
    let yaml = [
        pod("a", "{}", "10.0.0.1"),
        pod("b", "{}", "10.0.0.2").replace("namespace: ns", "namespace: relaxed"),
        peer_authentication("istio-system", "mesh", "  mtls: {mode: STRICT}\n"),
        peer_authentication("relaxed", "default", "  mtls: {mode: PERMISSIVE}\n"),
    ]
    .concat();
    let config = load(&yaml).unwrap();
    assert_eq!(
        workload(&config, "Kubernetes//Pod/ns/a")
            .authorization_policies
            .len(),
        1
    );
    assert!(
        workload(&config, "Kubernetes//Pod/relaxed/b")
            .authorization_policies
            .is_empty()
    );
}

#[test]
fn port_level_peer_authentication_is_converted_and_merged() {
    let yaml = [
        pod("a", "{app: a}", "10.0.0.1"),
        peer_authentication("ns", "default", "  mtls: {mode: STRICT}\n"),
        peer_authentication(
            "ns",
            "a-ports",
            "  selector: {matchLabels: {app: a}}\n  portLevelMtls:\n    8080: {mode: PERMISSIVE}\n",
        ),
    ]
    .concat();
    let config = load(&yaml).unwrap();
    let converted = policy(&config, "ns/converted_peer_authentication_a-ports");
    assert_eq!(converted.action, AuthzAction::Deny);
    assert_eq!(converted.scope, AuthzScope::WorkloadSelector);
    // Deny when the port is not 8080 and there is no peer identity.
    assert_eq!(
        converted.rules,
        [rule(vec![
            one_match(AuthzMatch {
                not_destination_ports: vec![8080],
                ..AuthzMatch::default()
            }),
            one_match(AuthzMatch {
                not_principals: vec![StringMatch::Presence],
                ..AuthzMatch::default()
            }),
        ])]
    );
    let a = workload(&config, "Kubernetes//Pod/ns/a");
    assert_eq!(
        a.authorization_policies,
        [Arc::from("ns/converted_peer_authentication_a-ports")]
    );
}

#[test]
fn port_level_strict_on_a_permissive_workload() {
    let yaml = [
        pod("a", "{app: a}", "10.0.0.1"),
        peer_authentication(
            "ns",
            "a-ports",
            "  selector: {matchLabels: {app: a}}\n  mtls: {mode: PERMISSIVE}\n  portLevelMtls:\n    \"9090\": {mode: STRICT}\n",
        ),
    ]
    .concat();
    let config = load(&yaml).unwrap();
    let converted = policy(&config, "ns/converted_peer_authentication_a-ports");
    assert_eq!(
        converted.rules,
        [rule(vec![one_match(AuthzMatch {
            not_principals: vec![StringMatch::Presence],
            destination_ports: vec![9090],
            ..AuthzMatch::default()
        })])]
    );
    assert_eq!(
        workload(&config, "Kubernetes//Pod/ns/a").authorization_policies,
        [Arc::from("ns/converted_peer_authentication_a-ports")]
    );
}

// ---- Kinds, documents, errors -----------------------------------------------------------------------

#[test]
fn unsupported_kind_is_an_error_naming_kind_file_and_line() {
    let yaml = "workloads: []\n---\n# a route\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\n";
    let e = load(yaml).unwrap_err();
    assert!(matches!(e, XdsError::LocalUnsupportedKind { ref kind, .. } if kind == "VirtualService"));
    assert_eq!(
        e.to_string(),
        "test.yaml:4:1: unsupported kind \"VirtualService\" (apiVersion \"networking.istio.io/v1\")"
    );
}

#[test]
fn ignored_kinds_are_accepted() {
    let yaml = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: b}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {replicas: 3}\n";
    assert_eq!(load(yaml).unwrap(), LocalConfig::default());
}

#[test]
fn wrong_api_version_is_refused() {
    let message = error("apiVersion: v2\nkind: Pod\nmetadata: {name: p}\n");
    assert!(
        message.starts_with("test.yaml:1:1: apiVersion: Pod is read in versions v1"),
        "{message}"
    );
}

#[test]
fn list_item_errors_point_at_the_item() {
    let yaml = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: a}\n  spec:\n    ports:\n    - port: 99999\n";
    assert_eq!(
        error(yaml),
        "test.yaml:9:13: items[0].spec.ports[0].port: invalid value: integer `99999`, expected u16"
    );
    let yaml = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: a}\n  status: {phase: Running, podIP: 10.0.0.300}\n";
    assert_eq!(
        error(yaml),
        "test.yaml:7:35: items[0].status.podIP: invalid IP address syntax"
    );
}

#[test]
fn pod_with_an_invalid_service_account_names_the_field() {
    let yaml = pod("p", "{}", "10.0.0.1").replace("serviceAccountName: p", "serviceAccountName: \"bad/sa\"");
    let message = error(&yaml);
    assert!(
        message.starts_with("test.yaml:2:1: spec.serviceAccountName: "),
        "{message}"
    );
}

// ---- Validation of the whole set --------------------------------------------------------------------

#[test]
fn duplicate_uid_names_both_places() {
    let yaml =
        "workloads:\n- {uid: a, namespace: default}\n---\nworkloads:\n- {uid: a, namespace: default}\n";
    assert_eq!(
        load_str(yaml, "w.yaml", &LocalOptions::default())
            .unwrap_err()
            .to_string(),
        "w.yaml:4:1: workloads[0].uid: duplicate workload uid \"a\" (first at w.yaml:1:1)"
    );
}

#[test]
fn duplicate_address_is_refused() {
    let yaml = "workloads:\n- {uid: a, namespace: default, workloadIps: [10.0.0.1]}\n- {uid: b, namespace: default, workloadIps: [10.0.0.1]}\n";
    let message = error(yaml);
    assert!(
        message.starts_with(
            "test.yaml:1:1: workloads[1]: address /10.0.0.1 is claimed by workloads \"a\" and \"b\""
        ),
        "{message}"
    );
    // On different networks the same IP is two addresses.
    let yaml = yaml.replacen("workloadIps", "network: other, workloadIps", 1);
    assert_eq!(load(&yaml).unwrap().workloads.len(), 2);
}

#[test]
fn duplicate_service_and_policy_are_refused() {
    let services =
        "services:\n- {name: s, namespace: n, hostname: h}\n- {name: s2, namespace: n, hostname: h}\n";
    assert_eq!(
        error(services),
        "test.yaml:1:1: services[1]: duplicate service n/h (first at test.yaml:1:1)"
    );
    let policies = "policies:\n- {name: p, namespace: n, scope: Global, action: Deny}\n- {name: p, namespace: n, scope: Global, action: Allow}\n";
    assert!(error(policies).contains("duplicate policy n/p"));
    let across = format!(
        "{}policies:\n- {{name: p, namespace: ns, scope: Namespace, action: Deny}}\n",
        authorization("ns", "  action: DENY\n")
    );
    let across = across.replacen("policies:", "---\npolicies:", 1);
    assert!(
        error(&across).contains("duplicate policy ns/p"),
        "{}",
        error(&across)
    );
}

#[test]
fn references_to_missing_services_and_policies_are_kept() {
    let yaml = "workloads:\n- uid: a\n  namespace: default\n  authorizationPolicies: [default/not-there]\n  services: {\"default/missing.example\": {80: 80}}\n";
    let config = load(yaml).unwrap();
    assert_eq!(
        config.workloads[0].authorization_policies,
        [Arc::from("default/not-there")]
    );
    assert_eq!(config.workloads[0].services.len(), 1);
}

#[test]
fn inline_configuration_is_bounded() {
    let big = "#".repeat(usize::try_from(MAX_FILE_BYTES).unwrap() + 1);
    assert!(matches!(
        load_str(&big, "LOCAL_XDS", &LocalOptions::default()),
        Err(XdsError::LocalTooLarge { size, limit: MAX_FILE_BYTES, .. }) if size == MAX_FILE_BYTES + 1
    ));
}

#[test]
fn empty_configuration_is_empty() {
    assert_eq!(load("").unwrap(), LocalConfig::default());
    assert_eq!(load("# nothing\n---\n").unwrap(), LocalConfig::default());
}

#[test]
fn document_lines_survive_empty_and_comment_documents() {
    let yaml = "%YAML 1.2\n# header\n---\n---\n# only a comment\n---\nworkloads: []\n...\n---\n\n  # indented comment\napiVersion: v1\nkind: Secret\n---\napiVersion: example.com/v1\nkind: Widget\n";
    assert_eq!(
        error(yaml),
        "test.yaml:15:1: unsupported kind \"Widget\" (apiVersion \"example.com/v1\")"
    );
    let yaml = "a: 1\n---\n--- {workloads: [{uid: a, namespace: \"bad/ns\"}]}\n";
    let message = error(yaml);
    assert!(
        message.starts_with("test.yaml:1:1: neither a Kubernetes object"),
        "{message}"
    );
    let yaml = "workloads: []\n---\n--- {workloads: [{uid: a, namespace: \"bad/ns\"}]}\n";
    let message = error(yaml);
    assert!(
        message.starts_with("test.yaml:3:1: workloads[0].namespace: "),
        "{message}"
    );
}

#[test]
fn service_entry_selecting_pods() {
    let yaml = [
        pod("a", "{app: a}", "10.0.0.1"),
        "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: e, namespace: ns}\nspec:\n  hosts: [a.internal]\n  ports: [{number: 80, name: http, targetPort: 8080}]\n  workloadSelector: {labels: {app: a}}\n".to_owned(),
    ]
    .concat();
    let config = load(&yaml).unwrap();
    let a = workload(&config, "Kubernetes//Pod/ns/a");
    assert_eq!(a.services[&key("ns/a.internal")], BTreeMap::from([(80, 8080)]));
    assert_eq!(
        config.workloads.len(),
        1,
        "a selecting entry has no endpoints of its own"
    );
}

/// Found by the `local_xds` fuzz target: a hostname with a '/' loaded, but the workloads of its service
/// named it by a key (`namespace/hostname`) that ztunnel cannot parse, so the whole push was refused.
#[test]
fn a_service_key_that_cannot_be_sent_is_refused() {
    let service_entry = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: external, namespace: shop}
spec:
  hosts: [api.example.com/v1]
  ports: [{number: 443, name: https}]
  resolution: DNS
"#;
    assert_eq!(
        error(service_entry),
        "test.yaml:2:1: service \"shop/api.example.com/v1\": a namespace or hostname must not contain '/'"
    );
    let ztunnel = r#"
services:
- name: echo
  namespace: default
  hostname: echo/default
"#;
    assert!(
        error(ztunnel).contains("must not contain '/'"),
        "{}",
        error(ztunnel)
    );
}
