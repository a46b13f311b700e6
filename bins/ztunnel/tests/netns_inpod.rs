//! ztunnel in in-pod mode end to end, as Istio ambient runs it on Kubernetes nodes: each node a network
//! namespace running our `ztunnel` binary (`PROXY_MODE=shared`, `INPOD_ENABLED=true`), each pod a
//! namespace of its own behind its node (`10.0.<node>.<pod>`, see `common::inpod`) with Istio's in-pod
//! capture rules inside, a fake istio-cni handing ztunnel the pods' namespaces over ZDS (with the
//! Kubernetes pod UIDs real istio-cni sends), and the local control plane on the nodes' network serving
//! xDS and certificates. The application's bytes must cross HBONE with mutual TLS between the pods'
//! own listeners, on one node and between two; a pod istio-cni deletes must lose its listeners; a DENY
//! policy must refuse; the proxy must not report ready before istio-cni's snapshot is complete. The
//! application must see its real client's address (original source, through 15008 and 15006) unless
//! `ENABLE_ORIG_SRC=false`, and a pod's connection to a server outside the mesh must leave from the pod.
//! A pod handed over before its workload is pushed has its connections closed after a bounded wait,
//! never held, and is served once the workload arrives. A DENY closes a denied client's live
//! connection; STRICT refuses plaintext into a pod; SIGTERM drains; readiness follows istio-cni.
//!
//! Each test runs in a sandbox of its own (`mesh_test::netns::isolated`: new user, network, mount and PID
//! namespaces), so it needs no root; it needs util-linux, iproute2 and iptables (CI installs them), and
//! fails saying why when it cannot have them.

#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

mod common;

use std::hash::BuildHasher;
use std::time::Duration;

use common::inpod::{
    CONTROL_PLANE_ADDR, NETWORK_IP, Network, Node, Pod, listening, readiness, start_ztunnel,
};
use common::wire::{self, LinkCapture};
use common::{
    APP_PORT, App, ControlPlane, OpenConnection, TempDir, Ztunnel, echo_app, eventually, has_metric,
    metric_sum, metrics, round_trip_to,
};
use mesh_core::SpiffeId;
use mesh_test::cni::{CniConnection, FakeCni};
use mesh_test::netns::isolated;
use mesh_xds::ca::{Caller, StaticTokens};

/// The fake istio-cni waits this long for a step (a ztunnel starting on a loaded machine included).
const CNI_STEP: Duration = Duration::from_secs(30);

/// The port of the server outside the mesh.
const OUTSIDE_PORT: u16 = 9090;

/// One node's ztunnel and its connection from istio-cni.
struct NodeProxy {
    proxy: Ztunnel,
    cni: CniConnection,
    _listener: FakeCni,
}

/// A cluster: the network, nodes with their pods (each running an echo app on [`APP_PORT`]), the control
/// plane, and a ztunnel per node connected to its own fake istio-cni. Fields drop in order: proxies,
/// apps, pods, nodes, control plane, network, files.
struct Cluster {
    proxies: Vec<NodeProxy>,
    apps: Vec<App>,
    /// Each pod with the index of its node.
    pods: Vec<(usize, Pod)>,
    nodes: Vec<Node>,
    control_plane: ControlPlane,
    network: Network,
    dir: TempDir,
}

impl Cluster {
    /// Nodes with the pods on each (`(node, [pod, ...])`), every ztunnel connected to its istio-cni but
    /// told of no pod yet.
    fn start(layout: &[(&str, &[&str])]) -> Cluster {
        Self::start_with(layout, &[])
    }

    /// [`Cluster::start`] with extra environment variables for every ztunnel.
    fn start_with(layout: &[(&str, &[&str])], env: &[(&str, String)]) -> Cluster {
        Self::start_configured(layout, env, &[])
    }

    /// [`Cluster::start_with`], the pods named in `unconfigured` left out of the control plane's
    /// configuration (istio-cni may hand a pod over before istiod has pushed its workload).
    fn start_configured(
        layout: &[(&str, &[&str])],
        env: &[(&str, String)],
        unconfigured: &[&str],
    ) -> Cluster {
        let network = Network::new();
        let mut nodes = Vec::new();
        let mut pods = Vec::new();
        for (index, (node_name, pod_names)) in layout.iter().enumerate() {
            let node = network.node(node_name);
            for name in *pod_names {
                pods.push((index, node.pod(name)));
            }
            nodes.push(node);
        }
        let dir = TempDir::new();
        let yaml: String = pods
            .iter()
            .filter(|(_, pod)| !unconfigured.contains(&pod.name.as_str()))
            .map(|(n, pod)| pod.yaml(&nodes[*n]))
            .collect();
        dir.write_config("pods.yaml", &yaml);
        let ztunnel = SpiffeId::parse("spiffe://cluster.local/ns/istio-system/sa/ztunnel").unwrap();
        let tokens = nodes.iter().fold(StaticTokens::new(), |tokens, node| {
            tokens.with(
                format!("{}-token", node.name),
                Caller::new(ztunnel.clone()).on_node(node.name.clone()),
            )
        });
        let control_plane = ControlPlane::start_at(&network.netns, CONTROL_PLANE_ADDR, dir.path(), tokens);
        let apps = pods
            .iter()
            .map(|(_, pod)| echo_app(&pod.netns, &pod.ip, APP_PORT))
            .collect();
        // Every ztunnel starts before the first is waited for: they come up in parallel.
        let started: Vec<(FakeCni, Ztunnel)> = nodes
            .iter()
            .map(|node| {
                let socket = dir.path().join(format!("{}.sock", node.name));
                let cni = FakeCni::bind_with_timeout(&socket, CNI_STEP).unwrap();
                let token = format!("{}-token", node.name);
                (cni, start_ztunnel(node, dir.path(), &socket, &token, env))
            })
            .collect();
        let proxies = started
            .into_iter()
            .map(|(listener, proxy)| {
                let cni = listener
                    .accept()
                    .unwrap_or_else(|e| panic!("ztunnel did not connect to istio-cni: {e}\n{}", proxy.log()));
                NodeProxy {
                    proxy,
                    cni,
                    _listener: listener,
                }
            })
            .collect();
        Cluster {
            proxies,
            apps,
            pods,
            nodes,
            control_plane,
            network,
            dir,
        }
    }

    fn pod(&self, name: &str) -> &Pod {
        self.pod_and_node(name).1
    }

    fn pod_and_node(&self, name: &str) -> (usize, &Pod) {
        self.pods
            .iter()
            .find(|(_, pod)| pod.name == name)
            .map(|(node, pod)| (*node, pod))
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// istio-cni's `add` for pod `name`, with its namespace; the ack's error text.
    fn add(&self, name: &str) -> String {
        let (node, pod) = self.pod_and_node(name);
        self.proxies[node]
            .cni
            .add(&pod.uid, &pod.info(), &pod.netns.file().unwrap())
            .unwrap()
    }

    /// istio-cni's `del` for pod `name`; the ack's error text.
    fn del(&self, name: &str) -> String {
        let (node, pod) = self.pod_and_node(name);
        self.proxies[node].cni.del(&pod.uid).unwrap()
    }

    /// Every pod in the control plane's configuration (the file is watched and pushed on change).
    fn configure_all(&self) {
        let yaml: String = self
            .pods
            .iter()
            .map(|(n, pod)| pod.yaml(&self.nodes[*n]))
            .collect();
        self.dir.write_config("pods.yaml", &yaml);
    }

    fn snapshot_sent(&self, node: usize) -> String {
        self.proxies[node].cni.snapshot_sent().unwrap()
    }

    /// Every pod added to its node's ztunnel, every snapshot sent, every ztunnel ready.
    fn enroll_all(&self) {
        for (_, pod) in &self.pods {
            assert_eq!(self.add(&pod.name), "", "add {}\n{}", pod.name, self.logs());
        }
        for node in 0..self.nodes.len() {
            assert_eq!(self.snapshot_sent(node), "", "{}", self.logs());
        }
        for node in &self.nodes {
            eventually(
                Duration::from_secs(30),
                "ztunnel readiness",
                || matches!(readiness(node), Some((200, _))),
                || self.logs(),
            );
        }
    }

    /// Metrics of the ztunnel of node `node`.
    fn metrics(&self, node: usize) -> String {
        let node = &self.nodes[node];
        metrics(&node.netns, &node.ip())
    }

    /// One line from pod `from` to the echo app of pod `to`: the reply, or why not.
    fn round_trip(&self, from: &str, to: &str, message: &str) -> Result<String, String> {
        round_trip_to(&self.pod(from).netns, &self.pod(to).addr(APP_PORT), message)
    }

    fn logs(&self) -> String {
        let mut logs = String::new();
        for (node, proxy) in self.nodes.iter().zip(&self.proxies) {
            logs += &format!("--- ztunnel on {} ---\n{}\n", node.name, proxy.proxy.log());
        }
        logs + &format!(
            "--- control plane: {}",
            self.control_plane
                .last_error()
                .unwrap_or_else(|| "configuration accepted".into())
        )
    }

    /// SIGTERM to every ztunnel, each of which must exit cleanly; then the control plane stops.
    fn shut_down(self) {
        let logs = self.logs();
        for NodeProxy { proxy, .. } in self.proxies {
            assert!(proxy.terminate().success(), "{logs}");
        }
        self.control_plane.stop();
        drop((self.apps, self.pods, self.nodes, self.network, self.dir));
    }
}

/// Asserts that the ztunnel of pod `client`'s node reported a connection from it to pod `server` as the
/// source, and the ztunnel of `server`'s node as the destination, both with mutual TLS and the identity
/// the other side proved.
fn assert_mutual_tls_reported(cluster: &Cluster, client: &str, server: &str) {
    let (client_node, client_pod) = cluster.pod_and_node(client);
    let (server_node, server_pod) = cluster.pod_and_node(server);
    eventually(
        Duration::from_secs(10),
        "both reporters with mutual TLS and the proven identities",
        || {
            has_metric(
                &cluster.metrics(client_node),
                "istio_tcp_connections_opened_total",
                &[
                    ("reporter", "source"),
                    ("source_workload", client),
                    ("source_principal", &client_pod.principal()),
                    ("destination_workload", server),
                    ("destination_principal", &server_pod.principal()),
                    ("connection_security_policy", "mutual_tls"),
                ],
            ) && has_metric(
                &cluster.metrics(server_node),
                "istio_tcp_connections_opened_total",
                &[
                    ("reporter", "destination"),
                    ("source_workload", client),
                    ("source_principal", &client_pod.principal()),
                    ("destination_workload", server),
                    ("connection_security_policy", "mutual_tls"),
                ],
            )
        },
        || {
            format!(
                "{}\n{}\n{}",
                cluster.metrics(client_node),
                cluster.metrics(server_node),
                cluster.logs()
            )
        },
    );
}

#[test]
fn two_pods_of_one_node_talk_through_their_own_listeners_over_hbone() {
    isolated(|| {
        let cluster = Cluster::start(&[("node-a", &["client", "server"])]);
        cluster.enroll_all();
        // Each pod has ztunnel's three listeners inside its own namespace; the node has none of them.
        for name in ["client", "server"] {
            for port in [15001, 15006, 15008] {
                assert!(
                    listening(cluster.pod(name), port),
                    "{name} has no listener on {port}\n{}",
                    cluster.logs()
                );
            }
        }
        let node = &cluster.nodes[0];
        for port in [15001, 15006, 15008] {
            let addr = format!("{}:{port}", node.ip());
            let connected = node
                .netns
                .run(move || std::net::TcpStream::connect(addr.as_str()).is_ok())
                .unwrap();
            assert!(!connected, "the node itself listens on {port} in in-pod mode");
        }

        // The client application connects straight to the server pod; the capture inside the client pod
        // hands the connection to ztunnel, and the server's side of ztunnel, inside the server pod, connects
        // to the application from the client's address (original source: the HBONE peer's IP), so the
        // application sees who called it.
        let reply = cluster
            .round_trip("client", "server", "hello")
            .unwrap_or_else(|e| panic!("round trip failed: {e}\n{}", cluster.logs()));
        assert_eq!(reply, format!("echo hello from {}", cluster.pod("client").ip));
        assert_mutual_tls_reported(&cluster, "client", "server");
        // And back: the server pod is a client too.
        let reply = cluster.round_trip("server", "client", "back").unwrap();
        assert_eq!(reply, format!("echo back from {}", cluster.pod("server").ip));
        assert_mutual_tls_reported(&cluster, "server", "client");
        // Each pod's certificate is one the proxy holds and reports.
        let metrics = cluster.metrics(0);
        assert!(
            metrics.contains("\nmeshkit_workload_certificates 2\n"),
            "{metrics}"
        );
        cluster.shut_down();
    });
}

#[test]
fn a_pod_deleted_by_istio_cni_loses_its_listeners_and_its_traffic() {
    isolated(|| {
        let cluster = Cluster::start(&[("node-a", &["client", "server"])]);
        cluster.enroll_all();
        assert!(
            cluster.round_trip("client", "server", "before").is_ok(),
            "{}",
            cluster.logs()
        );

        assert_eq!(cluster.del("server"), "", "{}", cluster.logs());
        for port in [15001, 15006, 15008] {
            eventually(
                Duration::from_secs(15),
                "the deleted pod's listener to close",
                || !listening(cluster.pod("server"), port),
                || cluster.logs(),
            );
        }
        // Traffic to it fails: its capture rules remain, and nothing serves them any more.
        eventually(
            Duration::from_secs(15),
            "connections to the deleted pod to fail",
            || cluster.round_trip("client", "server", "after").is_err(),
            || cluster.logs(),
        );
        // The other pod is still served.
        for port in [15001, 15006, 15008] {
            assert!(listening(cluster.pod("client"), port), "{}", cluster.logs());
        }

        // Added again (say, its sandbox was recreated), it is served again.
        assert_eq!(cluster.add("server"), "", "{}", cluster.logs());
        eventually(
            Duration::from_secs(15),
            "the re-added pod to be reachable",
            || cluster.round_trip("client", "server", "again").is_ok(),
            || cluster.logs(),
        );
        cluster.shut_down();
    });
}

#[test]
fn a_deny_policy_from_the_control_plane_refuses_the_denied_client_only() {
    isolated(|| {
        let cluster = Cluster::start(&[("node-a", &["client", "other", "server"])]);
        cluster.enroll_all();
        for from in ["client", "other"] {
            assert!(
                cluster.round_trip(from, "server", "before").is_ok(),
                "{from}\n{}",
                cluster.logs()
            );
        }
        // A live connection from each, open before the policy arrives.
        let server_addr = cluster.pod("server").addr(APP_PORT);
        let mut live: Vec<OpenConnection> = ["client", "other"]
            .iter()
            .map(|from| {
                let mut open = OpenConnection::connect(&cluster.pod(from).netns, &server_addr).unwrap();
                assert!(open.exchange("live").is_ok(), "{from}\n{}", cluster.logs());
                open
            })
            .collect();

        cluster.dir.write_config(
            "policy.yaml",
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: default}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/client"]}}]
"#,
        );
        eventually(
            Duration::from_secs(20),
            "the DENY policy to refuse the client",
            || cluster.round_trip("client", "server", "denied").is_err(),
            || cluster.logs(),
        );
        let reply = cluster.round_trip("other", "server", "allowed").unwrap();
        assert_eq!(reply, format!("echo allowed from {}", cluster.pod("other").ip));
        // The denied client's live connection was closed by the proxy (not left to time out); the other's
        // still carries bytes.
        assert!(
            live[0].is_closed(),
            "the denied client's open connection survived the policy\n{}",
            cluster.logs()
        );
        assert_eq!(
            live[1].exchange("still"),
            Ok(format!("echo still from {}", cluster.pod("other").ip)),
            "{}",
            cluster.logs()
        );
        eventually(
            Duration::from_secs(10),
            "the denial in the destination's metrics",
            || {
                metric_sum(
                    &cluster.metrics(0),
                    "istio_tcp_connections_closed_total",
                    &[
                        ("reporter", "destination"),
                        ("source_principal", &cluster.pod("client").principal()),
                        ("destination_workload", "server"),
                        ("response_flags", "DENY"),
                    ],
                ) >= 1.0
            },
            || format!("{}\n{}", cluster.metrics(0), cluster.logs()),
        );
        cluster.shut_down();
    });
}

#[test]
fn ztunnel_is_ready_only_once_istio_cni_has_sent_its_snapshot() {
    isolated(|| {
        let cluster = Cluster::start(&[("node-a", &["client", "server"])]);
        let node = &cluster.nodes[0];
        // Configuration and certificates are in; only istio-cni's snapshot is missing.
        let waiting = "not ready, pending: listeners";
        eventually(
            Duration::from_secs(30),
            "ztunnel to wait for nothing but istio-cni",
            || readiness(node) == Some((503, waiting.to_owned())),
            || format!("{:?}\n{}", readiness(node), cluster.logs()),
        );
        // Pods arrive (their listeners are bound when the ack comes), yet the snapshot is not complete.
        for pod in ["client", "server"] {
            assert_eq!(cluster.add(pod), "", "{}", cluster.logs());
        }
        assert_eq!(readiness(node), Some((503, waiting.to_owned())));

        assert_eq!(cluster.snapshot_sent(0), "");
        eventually(
            Duration::from_secs(10),
            "ztunnel to report ready after the snapshot",
            || readiness(node) == Some((200, "ready".to_owned())),
            || format!("{:?}\n{}", readiness(node), cluster.logs()),
        );
        assert!(
            cluster.round_trip("client", "server", "ready").is_ok(),
            "{}",
            cluster.logs()
        );
        cluster.shut_down();
    });
}

/// istio-cni restarting: while its connection is gone ztunnel reports not ready (its pods keep being
/// served), and once istio-cni is back and has replayed its snapshot, ready again, as Istio's ztunnel.
#[test]
fn ztunnel_is_not_ready_while_istio_cni_is_away() {
    isolated(|| {
        let mut cluster = Cluster::start(&[("node-a", &["client", "server"])]);
        cluster.enroll_all();
        let NodeProxy {
            proxy,
            cni,
            _listener: listener,
        } = cluster.proxies.remove(0);
        drop(cni);
        let node = &cluster.nodes[0];
        eventually(
            Duration::from_secs(10),
            "ztunnel to report not ready without istio-cni",
            || readiness(node) == Some((503, "not ready, pending: listeners".to_owned())),
            || format!("{:?}\n{}", readiness(node), proxy.log()),
        );
        // The pods already handed over keep their listeners meanwhile.
        assert!(
            cluster.round_trip("client", "server", "meanwhile").is_ok(),
            "{}",
            proxy.log()
        );

        // istio-cni is back: ztunnel reconnects, istio-cni replays its pods and the snapshot.
        let cni = listener
            .accept()
            .unwrap_or_else(|e| panic!("ztunnel did not reconnect to istio-cni: {e}\n{}", proxy.log()));
        cluster.proxies.push(NodeProxy {
            proxy,
            cni,
            _listener: listener,
        });
        assert_eq!(
            readiness(node),
            Some((503, "not ready, pending: listeners".to_owned()))
        );
        cluster.enroll_all();
        assert!(
            cluster.round_trip("client", "server", "again").is_ok(),
            "{}",
            cluster.logs()
        );
        cluster.shut_down();
    });
}

/// The index of interface `name` in `ns`.
fn ifindex(ns: &mesh_test::netns::Netns, name: &str) -> u32 {
    let output = ns.ip(&["-o", "link", "show", name]).unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    text.split(':').next().unwrap().trim().parse().unwrap()
}

#[test]
fn pods_on_two_nodes_talk_across_the_network_in_mutual_tls_only() {
    isolated(|| {
        let cluster = Cluster::start(&[("node-a", &["client"]), ("node-b", &["server"])]);
        cluster.enroll_all();
        let node_a = &cluster.nodes[0];
        let capture = LinkCapture::start(&node_a.netns, ifindex(&node_a.netns, "eth0"));

        let state = std::collections::hash_map::RandomState::new();
        let marker: String = (0..4).map(|i| format!("{:016x}", state.hash_one(i))).collect();
        let reply = cluster
            .round_trip("client", "server", &marker)
            .unwrap_or_else(|e| panic!("round trip failed: {e}\n{}", cluster.logs()));
        assert_eq!(
            reply,
            format!("echo {marker} from {}", cluster.pod("client").ip),
            "the application on the other node sees the client pod's address"
        );
        let frames = capture.stop();

        // Between the nodes: a connection from the client pod to the server pod's 15008 carrying TLS, and
        // the application's bytes nowhere in clear.
        for frame in &frames {
            assert!(
                !wire::contains(frame, marker.as_bytes()),
                "the application's bytes crossed the network in clear"
            );
        }
        let streams = wire::tcp_streams(&frames);
        let client_ip = cluster.pod("client").ip.clone();
        let server_ip = cluster.pod("server").ip.clone();
        let hbone: Vec<_> = streams
            .iter()
            .filter(|(flow, _)| {
                flow.src.ip().to_string() == client_ip
                    && flow.dst.ip().to_string() == server_ip
                    && flow.dst.port() == 15008
            })
            .collect();
        assert!(
            !hbone.is_empty(),
            "no connection from {client_ip} to {server_ip}:15008 crossed node-a's link: {:?}",
            streams.keys().collect::<Vec<_>>()
        );
        assert!(
            hbone.iter().any(|(_, stream)| stream.syn),
            "the HBONE connection's start was not captured"
        );
        for (flow, stream) in hbone {
            assert!(
                !wire::contains(&stream.bytes, marker.as_bytes()),
                "the application's bytes in clear in {flow:?}"
            );
            if stream.syn {
                let records = wire::tls_records(&stream.bytes)
                    .unwrap_or_else(|e| panic!("{flow:?} does not carry TLS: {e}"));
                assert_eq!(
                    records.first().map(|(t, _)| *t),
                    Some(wire::HANDSHAKE),
                    "{flow:?}"
                );
            }
        }
        assert!(
            streams
                .keys()
                .all(|flow| flow.dst.port() != APP_PORT && flow.src.port() != APP_PORT),
            "a connection to the application port crossed the network"
        );
        assert_mutual_tls_reported(&cluster, "client", "server");
        cluster.shut_down();
    });
}

#[test]
fn the_app_sees_the_outside_clients_address_through_15006() {
    isolated(|| {
        let cluster = Cluster::start(&[("node-a", &["server"])]);
        cluster.enroll_all();
        // The network's namespace is no workload: its connection to the pod is plaintext, captured by the
        // pod's rules into 15006 (allowed: no STRICT policy), and reaches the application from its own
        // address.
        let outside = &cluster.network.netns;
        let reply = round_trip_to(outside, &cluster.pod("server").addr(APP_PORT), "plain")
            .unwrap_or_else(|e| panic!("round trip failed: {e}\n{}", cluster.logs()));
        assert_eq!(reply, format!("echo plain from {NETWORK_IP}"));
        eventually(
            Duration::from_secs(10),
            "the plaintext connection in the destination's metrics",
            || {
                has_metric(
                    &cluster.metrics(0),
                    "istio_tcp_connections_opened_total",
                    &[
                        ("reporter", "destination"),
                        ("destination_workload", "server"),
                        ("connection_security_policy", "unknown"),
                    ],
                )
            },
            || format!("{}\n{}", cluster.metrics(0), cluster.logs()),
        );
        cluster.shut_down();
    });
}

/// A STRICT PeerAuthentication, pushed while everything runs: plaintext from outside the mesh into a
/// pod (captured into its 15006) is refused, while mesh traffic between pods keeps flowing.
#[test]
fn strict_mtls_refuses_plaintext_into_a_pod_while_mesh_traffic_flows() {
    isolated(|| {
        let cluster = Cluster::start(&[("node-a", &["client", "server"])]);
        cluster.enroll_all();
        let outside = &cluster.network.netns;
        let server = cluster.pod("server").addr(APP_PORT);
        assert!(
            round_trip_to(outside, &server, "before").is_ok(),
            "{}",
            cluster.logs()
        );
        cluster.dir.write_config(
            "strict.yaml",
            r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
"#,
        );
        eventually(
            Duration::from_secs(20),
            "STRICT to refuse plaintext from outside the mesh",
            || round_trip_to(outside, &server, "plain").is_err(),
            || cluster.logs(),
        );
        let reply = cluster.round_trip("client", "server", "mesh");
        assert_eq!(
            reply,
            Ok(format!("echo mesh from {}", cluster.pod("client").ip)),
            "{}",
            cluster.logs()
        );
        cluster.shut_down();
    });
}

#[test]
fn a_pods_connection_outside_the_mesh_leaves_from_the_pod() {
    isolated(|| {
        let cluster = Cluster::start(&[("node-a", &["client"])]);
        cluster.enroll_all();
        // A server outside the mesh, in the network's namespace (no workload has its address).
        let _outside = echo_app(&cluster.network.netns, NETWORK_IP, OUTSIDE_PORT);
        let reply = round_trip_to(
            &cluster.pod("client").netns,
            &format!("{NETWORK_IP}:{OUTSIDE_PORT}"),
            "out",
        )
        .unwrap_or_else(|e| panic!("round trip failed: {e}\n{}", cluster.logs()));
        // From the pod's address, not the node's: the passthrough connection was made inside the pod.
        assert_eq!(reply, format!("echo out from {}", cluster.pod("client").ip));
        assert_ne!(reply, format!("echo out from {}", cluster.nodes[0].ip()));
        // And it did go through ztunnel (captured, then passed through), not around it.
        eventually(
            Duration::from_secs(10),
            "the passthrough connection in the source's metrics",
            || {
                has_metric(
                    &cluster.metrics(0),
                    "istio_tcp_connections_opened_total",
                    &[("reporter", "source"), ("source_workload", "client")],
                )
            },
            || format!("{}\n{}", cluster.metrics(0), cluster.logs()),
        );
        cluster.shut_down();
    });
}

#[test]
fn with_original_source_off_the_app_sees_the_pods_own_address() {
    isolated(|| {
        let cluster = Cluster::start_with(
            &[("node-a", &["client", "server"])],
            &[("ENABLE_ORIG_SRC", "false".to_owned())],
        );
        cluster.enroll_all();
        let reply = cluster
            .round_trip("client", "server", "hidden")
            .unwrap_or_else(|e| panic!("round trip failed: {e}\n{}", cluster.logs()));
        assert_eq!(reply, format!("echo hidden from {}", cluster.pod("server").ip));
        cluster.shut_down();
    });
}

/// How one request ended when its connection was left waiting for a long time.
#[derive(Debug, PartialEq)]
enum Exchange {
    /// The peer answered.
    Replied(String),
    /// The connection was closed (EOF or reset) without an answer.
    Closed,
    /// Nothing happened within the wait: the connection hung.
    Hung,
    /// It could not even connect.
    NotConnected(String),
}

/// Sends one line from `netns` to `addr` and waits up to `wait` for whatever happens.
fn exchange_waiting(netns: &mesh_test::netns::Netns, addr: &str, wait: Duration) -> Exchange {
    use std::io::{ErrorKind, Read, Write};
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    netns
        .run(move || {
            let mut stream = match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(stream) => stream,
                Err(error) => return Exchange::NotConnected(error.to_string()),
            };
            stream.set_read_timeout(Some(wait)).unwrap();
            if stream.write_all(b"anyone?\n").is_err() {
                return Exchange::Closed;
            }
            let mut reply = [0u8; 256];
            match stream.read(&mut reply) {
                Ok(0) => Exchange::Closed,
                Ok(n) => Exchange::Replied(String::from_utf8_lossy(&reply[..n]).into_owned()),
                Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    Exchange::Hung
                }
                Err(_reset) => Exchange::Closed,
            }
        })
        .unwrap()
}

/// istio-cni can hand a pod over before the control plane has pushed its workload. Its listeners are
/// bound at once (the ack promised it); a connection out of the pod, or into it, waits a bounded time
/// for the workload and is then closed, never left hanging in a backlog; once the workload is pushed,
/// the pod is served.
#[test]
fn a_pod_the_configuration_does_not_know_yet_has_its_connections_closed_not_held() {
    isolated(|| {
        let cluster = Cluster::start_configured(&[("node-a", &["client", "server"])], &[], &["client"]);
        cluster.enroll_all();
        // Out of the unknown pod (its outbound listener), and into it from a known pod (which, not
        // knowing it as a workload, passes through to it: its inbound plaintext listener).
        for (from, to) in [("client", "server"), ("server", "client")] {
            let outcome = exchange_waiting(
                &cluster.pod(from).netns,
                &cluster.pod(to).addr(APP_PORT),
                Duration::from_secs(30),
            );
            assert_eq!(outcome, Exchange::Closed, "{from} -> {to}\n{}", cluster.logs());
        }

        cluster.configure_all();
        eventually(
            Duration::from_secs(30),
            "the pod to be served once its workload is pushed",
            || cluster.round_trip("client", "server", "known").is_ok(),
            || cluster.logs(),
        );
        let reply = cluster.round_trip("server", "client", "back");
        assert_eq!(
            reply,
            Ok(format!("echo back from {}", cluster.pod("server").ip)),
            "{}",
            cluster.logs()
        );
        cluster.shut_down();
    });
}

/// SIGTERM in in-pod mode: a pod's open connection keeps working through the drain while new ones are
/// refused (the pods' listeners close with the node's), and the proxy exits within the drain deadline plus
/// a margin, closing what was left.
#[test]
fn sigterm_drains_the_pods_open_connections_then_exits() {
    isolated(|| {
        const DEADLINE: Duration = Duration::from_secs(3);
        const MARGIN: Duration = Duration::from_secs(5);
        let mut cluster = Cluster::start_with(
            &[("node-a", &["client", "server"])],
            &[(
                "CONNECTION_TERMINATION_DEADLINE",
                format!("{}s", DEADLINE.as_secs()),
            )],
        );
        cluster.enroll_all();
        let server_addr = cluster.pod("server").addr(APP_PORT);
        let mut open = OpenConnection::connect(&cluster.pod("client").netns, &server_addr).unwrap();
        let client_ip = cluster.pod("client").ip.clone();
        assert_eq!(
            open.exchange("before"),
            Ok(format!("echo before from {client_ip}")),
            "{}",
            cluster.logs()
        );

        let signalled = std::time::Instant::now();
        cluster.proxies[0].proxy.signal_term();
        eventually(
            DEADLINE,
            "new connections to be refused while draining",
            || cluster.round_trip("client", "server", "new").is_err(),
            || cluster.logs(),
        );
        let mut exchanges = 0;
        while signalled.elapsed() + Duration::from_millis(700) < DEADLINE {
            let message = format!("during {exchanges}");
            assert_eq!(
                open.exchange(&message),
                Ok(format!("echo {message} from {client_ip}")),
                "the open connection failed {:?} after SIGTERM\n{}",
                signalled.elapsed(),
                cluster.logs()
            );
            exchanges += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        let status = cluster.proxies[0].proxy.wait_exit(DEADLINE + MARGIN);
        let status = status.unwrap_or_else(|| {
            panic!(
                "ztunnel still running {:?} after SIGTERM\n{}",
                signalled.elapsed(),
                cluster.logs()
            )
        });
        assert!(status.success(), "{status}\n{}", cluster.logs());
        assert!(exchanges > 0, "no exchange happened during the drain");
        assert!(open.is_closed(), "the open connection outlived the proxy");
    });
}
