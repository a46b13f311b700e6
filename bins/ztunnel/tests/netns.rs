//! ztunnel end to end, as it runs on real nodes: two network namespaces ("client" and "server" nodes)
//! joined by a veth pair, our `ztunnel` binary in each (dedicated mode), the local control plane serving
//! xDS and certificates to both over the veth, and iptables in the client namespace redirecting the
//! application's traffic to ztunnel's port 15001. The application's bytes must arrive through HBONE with
//! mutual TLS, policy pushed over xDS must apply to new and open connections, and SIGTERM must stop the
//! proxies cleanly.
//!
//! The harness (namespaces as nodes, the control plane, the binary, apps, capture) is `common`, shared with
//! `netns_security.rs` (the link carries only TLS 1.3, AuthorizationPolicy and STRICT PeerAuthentication
//! pushed as files) and `netns_traffic.rs` (passthrough, SOCKS5, 1 GiB integrity, same-node traffic,
//! SIGTERM drain).
//!
//! Each test runs in a sandbox of its own (`mesh_test::netns::isolated`: new user, network, mount and PID
//! namespaces), so it needs no root; it needs util-linux, iproute2 and iptables (CI installs them), and
//! fails saying why when it cannot have them.

#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{
    APP_PORT, CLIENT_IP, ControlPlane, SERVER_IP, TempDir, Ztunnel, capture, echo_app, eventually, http_get,
    link, round_trip, wait_ready,
};
use mesh_core::SpiffeId;
use mesh_test::netns::{Netns, isolated};
use mesh_xds::ca::{Caller, StaticTokens};

fn mesh_yaml() -> String {
    format!(
        r#"
workloads:
- uid: Kubernetes//Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["{CLIENT_IP}"]
  protocol: HBONE
  node: client-node
- uid: Kubernetes//Pod/default/server
  name: server
  namespace: default
  serviceAccount: server
  workloadIps: ["{SERVER_IP}"]
  protocol: HBONE
  node: server-node
"#
    )
}

const DENY_CLIENT: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: default}
spec:
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/client"]}}]
"#;

#[test]
fn two_nodes_talk_through_hbone_with_policy_from_the_control_plane() {
    isolated(|| {
        let client = Netns::create("client").expect("network namespaces are required for this test");
        let server = Netns::create("server").unwrap();
        link(
            &client,
            &format!("{CLIENT_IP}/24"),
            &server,
            &format!("{SERVER_IP}/24"),
        );
        let dir = TempDir::new();
        std::fs::write(dir.0.join("config/mesh.yaml"), mesh_yaml()).unwrap();

        // The control plane, in the server namespace, reachable over the veth with per-proxy tokens.
        let id = |sa: &str| SpiffeId::parse(&format!("spiffe://cluster.local/ns/default/sa/{sa}")).unwrap();
        let control_plane = ControlPlane::start(
            &server,
            &dir.0,
            StaticTokens::new()
                .with("client-token", Caller::new(id("client")))
                .with("server-token", Caller::new(id("server"))),
        );

        // The server application: an echo server that says who it saw.
        let _app = echo_app(&server, SERVER_IP, APP_PORT);

        capture(&client, &format!("{SERVER_IP}/32"));

        let server_proxy = Ztunnel::dedicated(&server, &dir.0, "server", "server-token");
        let client_proxy = Ztunnel::dedicated(&client, &dir.0, "client", "client-token");
        let logs = || {
            format!(
                "--- client ztunnel ---\n{}\n--- server ztunnel ---\n{}",
                client_proxy.log(),
                server_proxy.log()
            )
        };
        wait_ready(&[(&client, CLIENT_IP), (&server, SERVER_IP)], logs);

        // Bytes through HBONE: the app sees the server ztunnel's connection, and both proxies count it as
        // mutual TLS with the client's identity.
        let reply =
            round_trip(&client, "hello").unwrap_or_else(|e| panic!("round trip failed: {e}\n{}", logs()));
        assert_eq!(reply, format!("echo hello from {SERVER_IP}"));
        eventually(
            Duration::from_secs(10),
            "the destination's metrics",
            || {
                let (_, body) =
                    http_get(&server, &format!("{SERVER_IP}:15020"), "/metrics").unwrap_or_default();
                body.lines().any(|line| {
                    line.starts_with("istio_tcp_connections_opened_total{")
                        && line.contains(r#"reporter="destination""#)
                        && line.contains(r#"source_principal="spiffe://cluster.local/ns/default/sa/client""#)
                        && line.contains(r#"connection_security_policy="mutual_tls""#)
                })
            },
            logs,
        );
        // The destination's access log names the identity the client proved, on the connection's line.
        eventually(
            Duration::from_secs(10),
            "the destination's access log line with the client's identity",
            || {
                server_proxy.log().lines().any(|line| {
                    line.contains(" access: ")
                        && line.contains(r#"src.identity="spiffe://cluster.local/ns/default/sa/client""#)
                        && line.contains(r#"dst.workload="server""#)
                })
            },
            logs,
        );
        let (_, client_metrics) = http_get(&client, &format!("{CLIENT_IP}:15020"), "/metrics").unwrap();
        assert!(
            client_metrics
                .lines()
                .any(|l| l.starts_with("istio_tcp_sent_bytes_total{") && l.contains(r#"reporter="source""#)),
            "{client_metrics}"
        );

        // A long-lived connection, then a DENY policy pushed over xDS: new connections are refused and the open
        // one is closed.
        let open = client
            .run(|| TcpStream::connect(format!("{SERVER_IP}:{APP_PORT}")))
            .unwrap()
            .unwrap();
        open.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut open_writer = open.try_clone().unwrap();
        let mut open_reader = BufReader::new(open);
        open_writer.write_all(b"before\n").unwrap();
        let mut line = String::new();
        open_reader.read_line(&mut line).unwrap();
        assert_eq!(line.trim_end(), format!("echo before from {SERVER_IP}"));

        dir.write_config("policy.yaml", DENY_CLIENT);
        eventually(
            Duration::from_secs(20),
            "the DENY policy to apply to new connections",
            || round_trip(&client, "after").is_err(),
            logs,
        );
        // Closed by the proxy, not merely silent: a read that times out means the connection survived.
        line.clear();
        let closed = open_reader.read_line(&mut line);
        assert!(
            common::closed_by_peer(&closed),
            "the open connection survived the DENY policy: {closed:?} {line:?}\n{}",
            logs()
        );
        eventually(
            Duration::from_secs(10),
            "DENY in the destination's metrics",
            || {
                let (_, body) =
                    http_get(&server, &format!("{SERVER_IP}:15020"), "/metrics").unwrap_or_default();
                body.lines().any(|l| {
                    l.starts_with("istio_tcp_connections_closed_total{")
                        && l.contains(r#"response_flags="DENY""#)
                })
            },
            logs,
        );

        // SIGTERM: both stop cleanly.
        let logs_before = logs();
        assert!(client_proxy.terminate().success(), "{logs_before}");
        assert!(server_proxy.terminate().success(), "{logs_before}");
        control_plane.stop();
    });
}

#[test]
fn a_shared_node_proxy_presents_each_workloads_own_identity() {
    isolated(|| {
        const SERVER_B_IP: &str = "10.10.0.3";
        let client = Netns::create("client").expect("network namespaces are required for this test");
        let server = Netns::create("node").unwrap();
        link(
            &client,
            &format!("{CLIENT_IP}/24"),
            &server,
            &format!("{SERVER_IP}/24"),
        );
        // A second workload on the same node.
        let (_, device) = common::veth(&server);
        server
            .ip(&["addr", "add", &format!("{SERVER_B_IP}/24"), "dev", &device])
            .unwrap();

        let dir = TempDir::new();
        std::fs::write(
            dir.0.join("config/mesh.yaml"),
            format!(
                r#"
workloads:
- uid: Kubernetes//Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["{CLIENT_IP}"]
  protocol: HBONE
  node: client-node
- uid: Kubernetes//Pod/default/server-a
  name: server-a
  namespace: default
  serviceAccount: server-a
  workloadIps: ["{SERVER_IP}"]
  protocol: HBONE
  node: server-node
- uid: Kubernetes//Pod/default/server-b
  name: server-b
  namespace: default
  serviceAccount: server-b
  workloadIps: ["{SERVER_B_IP}"]
  protocol: HBONE
  node: server-node
"#
            ),
        )
        .unwrap();
        let client_id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/client").unwrap();
        let ztunnel_id = SpiffeId::parse("spiffe://cluster.local/ns/istio-system/sa/ztunnel").unwrap();
        let control_plane = ControlPlane::start(
            &server,
            &dir.0,
            StaticTokens::new()
                .with("client-token", Caller::new(client_id))
                .with("node-token", Caller::new(ztunnel_id).on_node("server-node")),
        );
        let _apps = [
            echo_app(&server, SERVER_IP, APP_PORT),
            echo_app(&server, SERVER_B_IP, APP_PORT),
        ];
        capture(&client, "10.10.0.0/24");

        // The node proxy asks the CA for its workloads' certificates (impersonation), and picks the one to
        // present by the address each connection arrives on.
        let node_proxy = Ztunnel::start(
            &server,
            &dir.0,
            "node",
            "node-token",
            &[
                ("PROXY_MODE", "shared".to_owned()),
                ("NODE_NAME", "server-node".to_owned()),
                // No istio-cni here: the proxy serves the node's workloads from the node's own namespace.
                ("INPOD_ENABLED", "false".to_owned()),
            ],
        );
        let client_proxy = Ztunnel::dedicated(&client, &dir.0, "client", "client-token");
        let logs = || {
            format!(
                "--- client ztunnel ---\n{}\n--- node ztunnel ---\n{}",
                client_proxy.log(),
                node_proxy.log()
            )
        };
        wait_ready(&[(&client, CLIENT_IP), (&server, SERVER_IP)], logs);
        // Ready means the node's workloads' certificates are in hand (fetched after the first xDS push,
        // before any connection asks for them), as Istio's ztunnel prefetches them.
        let (_, node_metrics) = http_get(&server, &format!("{SERVER_IP}:15020"), "/metrics").unwrap();
        assert!(
            node_metrics.contains("\nmeshkit_workload_certificates 2\n"),
            "{node_metrics}\n{}",
            logs()
        );

        for (ip, workload) in [(SERVER_IP, "server-a"), (SERVER_B_IP, "server-b")] {
            let ip = ip.to_owned();
            let reply = client
                .run(move || -> Result<String, String> {
                    let addr: SocketAddr = format!("{ip}:{APP_PORT}").parse().unwrap();
                    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                        .map_err(|e| e.to_string())?;
                    stream
                        .set_read_timeout(Some(Duration::from_secs(5)))
                        .map_err(|e| e.to_string())?;
                    stream.write_all(b"hi\n").map_err(|e| e.to_string())?;
                    let mut reply = String::new();
                    BufReader::new(stream)
                        .read_line(&mut reply)
                        .map_err(|e| e.to_string())?;
                    Ok(reply.trim_end().to_owned())
                })
                .unwrap()
                .unwrap_or_else(|e| panic!("round trip to {workload} failed: {e}\n{}", logs()));
            assert!(reply.starts_with("echo hi from "), "{reply}");
            // The client's proxy verified the destination's identity, so its metrics name it.
            let principal =
                format!(r#"destination_principal="spiffe://cluster.local/ns/default/sa/{workload}""#);
            eventually(
                Duration::from_secs(10),
                "the source's metrics naming the destination's identity",
                || {
                    let (_, body) =
                        http_get(&client, &format!("{CLIENT_IP}:15020"), "/metrics").unwrap_or_default();
                    body.lines().any(|l| {
                        l.starts_with("istio_tcp_connections_opened_total{")
                            && l.contains(r#"reporter="source""#)
                            && l.contains(&principal)
                    })
                },
                logs,
            );
        }

        // server-b leaves the configuration: the node proxy stops holding (and renewing) its certificate.
        let yaml = std::fs::read_to_string(dir.0.join("config/mesh.yaml")).unwrap();
        let without_b = yaml
            .split("- uid: ")
            .filter(|entry| !entry.starts_with("Kubernetes//Pod/default/server-b"))
            .collect::<Vec<_>>()
            .join("- uid: ");
        dir.write_config("mesh.yaml", &without_b);
        eventually(
            Duration::from_secs(10),
            "the departed workload's certificate to be dropped",
            || {
                let (_, body) =
                    http_get(&server, &format!("{SERVER_IP}:15020"), "/metrics").unwrap_or_default();
                body.contains("\nmeshkit_workload_certificates 1\n")
                    && !body.contains(
                        r#"meshkit_workload_certificate_expiry_seconds{identity="spiffe://cluster.local/ns/default/sa/server-b"}"#,
                    )
            },
            logs,
        );

        let logs_before = logs();
        assert!(client_proxy.terminate().success(), "{logs_before}");
        assert!(node_proxy.terminate().success(), "{logs_before}");
        control_plane.stop();
    });
}
