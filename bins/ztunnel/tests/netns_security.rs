//! ztunnel's security promises, end to end between two network namespaces (see `common`): what crosses
//! the link is TLS 1.3 and never the application's bytes; AuthorizationPolicies written to the control
//! plane's files apply while everything runs (each case prints how long it took); a STRICT
//! PeerAuthentication refuses plaintext from outside the mesh while mesh traffic keeps flowing.
//!
//! Each test runs in a sandbox of its own (`mesh_test::netns::isolated`: new user, network, mount and PID
//! namespaces), so it needs no root; it needs util-linux, iproute2 and iptables (CI installs them), and
//! fails saying why when it cannot have them.

#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

mod common;

use std::hash::BuildHasher;
use std::time::{Duration, Instant};

use common::wire::{self, APPLICATION_DATA, HANDSHAKE, LinkCapture};
use common::{
    APP_PORT, CLIENT_IP, Options, SERVER_IP, TwoNodes, echo_app, eventually, has_metric, metric_sum,
    round_trip, round_trip_to,
};
use mesh_test::netns::{Netns, isolated};

/// `len` random hex digits (a multiple of 16).
fn random_hex(len: usize) -> String {
    let state = std::collections::hash_map::RandomState::new();
    (0..len / 16)
        .map(|i| format!("{:016x}", state.hash_one(i)))
        .collect()
}

#[test]
fn the_link_between_nodes_carries_tls_and_never_the_applications_bytes() {
    isolated(|| {
        let mut nodes = TwoNodes::start(Options::default());
        // A plaintext server outside the capture rules: its bytes cross the link in clear, which shows that
        // the capture would see the marker if it were there.
        const CONTROL_PORT: u16 = 9000;
        nodes.apps.push(echo_app(&nodes.server, SERVER_IP, CONTROL_PORT));
        let (ifindex, ifname) = common::veth(&nodes.client);
        let capture = LinkCapture::start(&nodes.client, ifindex);

        let marker = random_hex(64);
        let reply = round_trip(&nodes.client, &marker).unwrap_or_else(|e| panic!("{e}\n{}", nodes.logs()));
        assert_eq!(reply, format!("echo {marker} from {SERVER_IP}"));
        let control = random_hex(64);
        let reply = round_trip_to(&nodes.client, &format!("{SERVER_IP}:{CONTROL_PORT}"), &control).unwrap();
        assert_eq!(reply, format!("echo {control} from {CLIENT_IP}"));

        let frames = capture.stop();
        let streams = wire::tcp_streams(&frames);
        let summary = || {
            streams
                .iter()
                .map(|(flow, s)| format!("{} -> {}: {} bytes", flow.src, flow.dst, s.bytes.len()))
                .collect::<Vec<_>>()
                .join("\n")
        };
        println!("captured {} frames on {ifname}:\n{}", frames.len(), summary());
        assert!(
            streams
                .values()
                .any(|s| wire::contains(&s.bytes, control.as_bytes())),
            "the capture did not see the plaintext control message, so it proves nothing:\n{}",
            summary()
        );

        // The marker went out and came back (in the echo), yet is nowhere on the link: not in a frame, not
        // in a stream rebuilt from frames (where it could straddle two segments).
        for frame in &frames {
            assert!(
                !wire::contains(frame, marker.as_bytes()),
                "the application's bytes crossed the link in clear"
            );
        }
        for (flow, stream) in &streams {
            assert!(
                !wire::contains(&stream.bytes, marker.as_bytes()),
                "the application's bytes crossed the link in clear in {flow:?}"
            );
            assert!(
                flow.src.port() != APP_PORT && flow.dst.port() != APP_PORT,
                "a connection to the application port crossed the link: {flow:?}\n{}",
                summary()
            );
        }

        // The mesh connection: a TLS 1.3 handshake towards 15008, then only encrypted records.
        let hbone: Vec<_> = streams
            .iter()
            .filter(|(flow, stream)| flow.dst.port() == 15008 && stream.syn)
            .collect();
        assert!(
            !hbone.is_empty(),
            "no connection to port 15008 started during the capture:\n{}",
            summary()
        );
        let mut application_data = 0;
        for (flow, outbound) in hbone {
            assert!(!outbound.gaps, "frames of {flow:?} were missed");
            let inbound = &streams
                .get(&flow.reverse())
                .unwrap_or_else(|| panic!("no reply direction for {flow:?}"))
                .bytes;
            for (direction, bytes, hello_type) in [("client", &outbound.bytes, 1u8), ("server", inbound, 2u8)]
            {
                let records = wire::tls_records(bytes)
                    .unwrap_or_else(|e| panic!("the {direction} side of {flow:?} is not TLS: {e}"));
                let (first_type, hello) = records
                    .first()
                    .unwrap_or_else(|| panic!("no TLS record from the {direction} in {flow:?}"));
                assert_eq!(*first_type, HANDSHAKE, "{direction} in {flow:?}");
                assert_eq!(hello.first(), Some(&hello_type), "{direction} hello in {flow:?}");
                // In TLS 1.3 everything after the hellos is encrypted: no further plaintext handshake record.
                assert!(
                    records[1..].iter().all(|(t, _)| *t != HANDSHAKE),
                    "a plaintext handshake record after the {direction} hello (not TLS 1.3) in {flow:?}"
                );
                let data: usize = records
                    .iter()
                    .filter(|(t, _)| *t == APPLICATION_DATA)
                    .map(|(_, body)| body.len())
                    .sum();
                assert!(
                    data > 0,
                    "no application data records from the {direction} in {flow:?}"
                );
                application_data += data;
                if hello_type == 2 {
                    assert_eq!(
                        wire::server_hello_version(hello),
                        Some(0x0304),
                        "the server did not select TLS 1.3 in {flow:?}"
                    );
                }
            }
        }
        assert!(
            application_data >= 2 * marker.len(),
            "the encrypted records are too small to have carried the marker both ways ({application_data} bytes)"
        );
        nodes.shut_down();
    });
}

/// An AuthorizationPolicy in `default`.
fn authorization_policy(spec: &str) -> String {
    format!(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: e2e, namespace: default}}
spec:
{spec}
"#
    )
}

#[test]
fn authorization_policies_written_to_the_control_plane_apply_while_running() {
    isolated(|| {
        const OTHER_PORT: u16 = 8081;
        let mut nodes = TwoNodes::start(Options::default());
        nodes.apps.push(echo_app(&nodes.server, SERVER_IP, OTHER_PORT));
        let port_allowed = |port: u16| {
            round_trip_to(&nodes.client, &format!("{SERVER_IP}:{port}"), "ping")
                .is_ok_and(|reply| reply == format!("echo ping from {SERVER_IP}"))
        };
        assert!(port_allowed(APP_PORT), "{}", nodes.logs());
        assert!(port_allowed(OTHER_PORT), "{}", nodes.logs());

        let denials = || {
            metric_sum(
                &nodes.server_metrics(),
                "istio_tcp_connections_closed_total",
                &[("reporter", "destination"), ("response_flags", "DENY")],
            )
        };
        // Each step changes what APP_PORT gets (the change is what is timed); OTHER_PORT shows the scope.
        let steps: [(&str, String, bool, bool); 7] = [
            (
                "ALLOW by principal (another one)",
                authorization_policy(
                    r#"  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/someone-else"]}}]"#,
                ),
                false,
                false,
            ),
            (
                "ALLOW by principal (the client's)",
                authorization_policy(
                    r#"  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/client"]}}]"#,
                ),
                true,
                true,
            ),
            (
                "DENY by namespace (the client's)",
                authorization_policy(
                    r#"  action: DENY
  rules:
  - from: [{source: {namespaces: ["default"]}}]"#,
                ),
                false,
                false,
            ),
            (
                "DENY by namespace (another one)",
                authorization_policy(
                    r#"  action: DENY
  rules:
  - from: [{source: {namespaces: ["elsewhere"]}}]"#,
                ),
                true,
                true,
            ),
            (
                "DENY by IP block (the client's)",
                authorization_policy(&format!(
                    r#"  action: DENY
  rules:
  - from: [{{source: {{ipBlocks: ["{CLIENT_IP}/32"]}}}}]"#
                )),
                false,
                false,
            ),
            (
                "DENY by IP block (another one)",
                authorization_policy(
                    r#"  action: DENY
  rules:
  - from: [{source: {ipBlocks: ["192.0.2.0/24"]}}]"#,
                ),
                true,
                true,
            ),
            (
                "DENY by port",
                authorization_policy(&format!(
                    r#"  action: DENY
  rules:
  - to: [{{operation: {{ports: ["{APP_PORT}"]}}}}]"#
                )),
                false,
                true,
            ),
        ];
        for (name, policy, app_port, other_port) in steps {
            let denied_before = denials();
            nodes.dir.write_config("policy.yaml", &policy);
            let took = eventually(
                Duration::from_secs(10),
                name,
                || port_allowed(APP_PORT) == app_port,
                || nodes.logs(),
            );
            println!("{name}: in effect after {took:?}");
            assert_eq!(port_allowed(APP_PORT), app_port, "{name}\n{}", nodes.logs());
            assert_eq!(port_allowed(OTHER_PORT), other_port, "{name}\n{}", nodes.logs());
            if !app_port {
                // Refused by policy (the destination says DENY), not by some other failure.
                eventually(
                    Duration::from_secs(10),
                    "the refusal in the destination's metrics",
                    || denials() > denied_before,
                    || nodes.logs(),
                );
            }
        }
        nodes.dir.remove_config("policy.yaml");
        let took = eventually(
            Duration::from_secs(10),
            "the policy's removal",
            || port_allowed(APP_PORT),
            || nodes.logs(),
        );
        println!("policy removed: in effect after {took:?}");
        nodes.shut_down();
    });
}

const STRICT: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
"#;

#[test]
fn plaintext_to_a_strict_workload_is_refused_while_mesh_traffic_flows() {
    isolated(|| {
        let nodes = TwoNodes::start(Options::default());
        // A third node without a proxy, next to the server node.
        let outsider = Netns::create("outsider").unwrap();
        common::link(&outsider, "10.10.1.1/24", &nodes.server, "10.10.1.2/24");
        outsider
            .ip(&["route", "add", "10.10.0.0/24", "via", "10.10.1.2"])
            .unwrap();
        // Istio's inbound redirect: every TCP connection arriving at the node goes to 15006, except HBONE
        // (15008) and what must reach the node itself (here the control plane, 15012, and the proxy's
        // metrics and readiness ports, as kubelet and Prometheus reach them).
        nodes
            .server
            .iptables(&[
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-p",
                "tcp",
                "-m",
                "multiport",
                "--dports",
                "15012,15020,15021",
                "-j",
                "RETURN",
            ])
            .unwrap();
        nodes
            .server
            .iptables(&[
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-p",
                "tcp",
                "!",
                "--dport",
                "15008",
                "-j",
                "REDIRECT",
                "--to-ports",
                "15006",
            ])
            .unwrap();
        let app = format!("{SERVER_IP}:{APP_PORT}");
        let plaintext = || round_trip_to(&outsider, &app, "plain");
        let unknown_security = [
            ("reporter", "destination"),
            ("destination_workload", "server"),
            ("source_principal", "unknown"),
            ("connection_security_policy", "unknown"),
        ];

        // Without a PeerAuthentication, plaintext is allowed. It reaches the app through ztunnel's 15006
        // (the app sees the proxy's address, not the outsider's) and is reported as `unknown` security.
        assert_eq!(
            plaintext().unwrap_or_else(|e| panic!("{e}\n{}", nodes.logs())),
            format!("echo plain from {SERVER_IP}")
        );
        eventually(
            Duration::from_secs(10),
            "the plaintext connection in the destination's metrics",
            || {
                has_metric(
                    &nodes.server_metrics(),
                    "istio_tcp_connections_opened_total",
                    &unknown_security,
                )
            },
            || nodes.logs(),
        );
        assert!(round_trip(&nodes.client, "mesh").is_ok(), "{}", nodes.logs());

        // STRICT: the same plaintext connection is refused, by policy.
        let written = Instant::now();
        nodes.dir.write_config("peer-authentication.yaml", STRICT);
        eventually(
            Duration::from_secs(10),
            "STRICT to refuse plaintext",
            || plaintext().is_err(),
            || nodes.logs(),
        );
        println!("STRICT in effect after {:?}", written.elapsed());
        let refused = plaintext().unwrap_err();
        assert!(
            refused.contains("closed without a reply") || refused.contains("reset"),
            "{refused}"
        );
        let mut denied = unknown_security.to_vec();
        denied.push(("response_flags", "DENY"));
        eventually(
            Duration::from_secs(10),
            "the refusal in the destination's metrics",
            || {
                has_metric(
                    &nodes.server_metrics(),
                    "istio_tcp_connections_closed_total",
                    &denied,
                )
            },
            || nodes.logs(),
        );
        // ... while the mesh client, with its identity, is still served.
        assert_eq!(
            round_trip(&nodes.client, "mesh").unwrap_or_else(|e| panic!("{e}\n{}", nodes.logs())),
            format!("echo mesh from {SERVER_IP}")
        );
        assert!(has_metric(
            &nodes.server_metrics(),
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("source_principal", "spiffe://cluster.local/ns/default/sa/client"),
                ("connection_security_policy", "mutual_tls"),
            ],
        ));

        // Without the PeerAuthentication again, plaintext is allowed again.
        nodes.dir.remove_config("peer-authentication.yaml");
        eventually(
            Duration::from_secs(10),
            "plaintext allowed once STRICT is removed",
            || plaintext().is_ok(),
            || nodes.logs(),
        );
        nodes.shut_down();
    });
}
