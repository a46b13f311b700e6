//! ztunnel's data path end to end, in network namespaces (see `common`): passthrough to a destination
//! outside the mesh, SOCKS5, data integrity under load, traffic between two workloads of one node, and
//! draining on SIGTERM.
//!
//! Each test runs in a sandbox of its own (`mesh_test::netns::isolated`: new user, network, mount and PID
//! namespaces), so it needs no root; it needs util-linux, iproute2 and iptables (CI installs them), and
//! fails saying why when it cannot have them.

#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use common::{
    APP_PORT, App, CLIENT_IP, ControlPlane, OpenConnection, Options, SERVER_IP, TempDir, TwoNodes, Ztunnel,
    echo_app, eventually, has_metric, line_exchange, metrics, pod, round_trip, round_trip_to, serve,
    wait_ready,
};
use mesh_core::SpiffeId;
use mesh_test::netns::{Netns, isolated};
use mesh_xds::ca::{Caller, StaticTokens};
use rustls::SupportedCipherSuite;
use rustls::crypto::hash::Context;

const CLIENT_PRINCIPAL: &str = "spiffe://cluster.local/ns/default/sa/client";

#[test]
fn a_destination_outside_the_mesh_is_reached_through_ztunnel_as_plain_tcp() {
    isolated(|| {
        const EXTERNAL_IP: &str = "10.10.2.2";
        let nodes = TwoNodes::start(Options {
            capture: Some("10.10.0.0/16"),
            ..Options::default()
        });
        // A host that is no workload, on another link of the client node.
        let external = Netns::create("external").unwrap();
        common::link(
            &nodes.client,
            "10.10.2.1/24",
            &external,
            &format!("{EXTERNAL_IP}/24"),
        );
        let _external_app = echo_app(&external, EXTERNAL_IP, APP_PORT);

        // The external server reads our line as it was written (plain TCP, no HBONE), from the client node.
        let reply = round_trip_to(&nodes.client, &format!("{EXTERNAL_IP}:{APP_PORT}"), "out")
            .unwrap_or_else(|e| panic!("{e}\n{}", nodes.logs()));
        assert_eq!(reply, "echo out from 10.10.2.1");
        // ... through the client's ztunnel, which reports it as passthrough (no destination workload, no mTLS)
        // and logs where the bytes went.
        eventually(
            Duration::from_secs(10),
            "the passthrough connection in the source's metrics and access log",
            || {
                has_metric(
                    &nodes.client_metrics(),
                    "istio_tcp_connections_closed_total",
                    &[
                        ("reporter", "source"),
                        ("source_workload", "client"),
                        ("destination_workload", "unknown"),
                        ("connection_security_policy", "unknown"),
                        ("response_flags", "-"),
                    ],
                ) && nodes.client_proxy.log().lines().any(|l| {
                    l.contains("connection complete")
                        && l.contains(&format!("dst.addr={EXTERNAL_IP}:{APP_PORT}"))
                })
            },
            || format!("{}\n{}", nodes.client_metrics(), nodes.logs()),
        );
        // The same capture still carries mesh traffic over HBONE.
        assert_eq!(
            round_trip(&nodes.client, "mesh").unwrap(),
            format!("echo mesh from {SERVER_IP}")
        );
        nodes.shut_down();
    });
}

/// A SOCKS5 CONNECT to `target` through `proxy`, then one line exchanged. Written out by hand: a 3-byte
/// greeting and 2-byte answer, then a 10-byte request and 10-byte reply.
fn socks5_round_trip(
    node: &Netns,
    proxy: &str,
    target: SocketAddrV4,
    message: &str,
) -> Result<String, String> {
    let proxy: SocketAddr = proxy.parse().unwrap();
    let message = message.to_owned();
    node.run(move || -> Result<String, String> {
        let mut stream = TcpStream::connect_timeout(&proxy, Duration::from_secs(5))
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        stream.write_all(&[5, 1, 0]).map_err(|e| e.to_string())?;
        let mut method = [0u8; 2];
        stream
            .read_exact(&mut method)
            .map_err(|e| format!("greeting: {e}"))?;
        if method != [5, 0] {
            return Err(format!("method selection {method:?}"));
        }
        let mut request = vec![5, 1, 0, 1];
        request.extend_from_slice(&target.ip().octets());
        request.extend_from_slice(&target.port().to_be_bytes());
        stream.write_all(&request).map_err(|e| e.to_string())?;
        let mut reply = [0u8; 10];
        stream.read_exact(&mut reply).map_err(|e| format!("reply: {e}"))?;
        if reply[..4] != [5, 0, 0, 1] {
            return Err(format!("SOCKS reply {reply:?}"));
        }
        line_exchange(stream, &message)
    })
    .unwrap()
}

#[test]
fn socks5_reaches_the_server_through_hbone() {
    isolated(|| {
        // No capture: the application asks for the proxy itself.
        let nodes = TwoNodes::start(Options {
            capture: None,
            client_env: vec![("UNSTABLE_ENABLE_SOCKS5", "true".into())],
            ..Options::default()
        });
        let target = SocketAddrV4::new(SERVER_IP.parse().unwrap(), APP_PORT);
        let reply = socks5_round_trip(&nodes.client, "127.0.0.1:15080", target, "socks")
            .unwrap_or_else(|e| panic!("{e}\n{}", nodes.logs()));
        // The app sees the server's ztunnel (a direct connection would come from the client's address) ...
        assert_eq!(reply, format!("echo socks from {SERVER_IP}"));
        // ... which saw the client's identity over mutual TLS.
        eventually(
            Duration::from_secs(10),
            "the SOCKS5 connection in both proxies' metrics",
            || {
                has_metric(
                    &nodes.server_metrics(),
                    "istio_tcp_connections_opened_total",
                    &[
                        ("reporter", "destination"),
                        ("source_principal", CLIENT_PRINCIPAL),
                        ("connection_security_policy", "mutual_tls"),
                    ],
                ) && has_metric(
                    &nodes.client_metrics(),
                    "istio_tcp_connections_opened_total",
                    &[
                        ("reporter", "source"),
                        ("destination_workload", "server"),
                        ("connection_security_policy", "mutual_tls"),
                    ],
                )
            },
            || nodes.logs(),
        );
        nodes.shut_down();
    });
}

/// A SHA-256 context from rustls's aws-lc-rs provider (optimized C even in a debug build).
fn sha256() -> Box<dyn Context> {
    // Irrefutable unless rustls's `tls12` feature is on somewhere in the build.
    #[allow(irrefutable_let_patterns)]
    let SupportedCipherSuite::Tls13(suite) =
        rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256
    else {
        unreachable!("a TLS 1.3 suite")
    };
    suite.common.hash_provider.start()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hands `f` the `len` bytes connection `connection` sends, in pieces: chunks of a fixed pseudo-random
/// block, each rotated by an offset that depends on the connection and the chunk, so that no two chunks
/// are alike (a swapped, repeated or dropped chunk changes the digest) without generating 1 GiB of
/// random bytes in a debug build.
fn for_each_piece(block: &[u8], connection: u64, len: u64, mut f: impl FnMut(&[u8])) {
    let size = block.len() as u64;
    let mut sent = 0;
    let mut chunk = 0u64;
    while sent < len {
        let offset = usize::try_from((connection * 7919 + chunk * 104_729) % size).unwrap();
        for piece in [&block[offset..], &block[..offset]] {
            let take = usize::try_from((len - sent).min(piece.len() as u64)).unwrap();
            if take > 0 {
                f(&piece[..take]);
                sent += take as u64;
            }
        }
        chunk += 1;
    }
}

#[test]
fn a_gibibyte_over_64_connections_arrives_intact() {
    isolated(|| {
        const SINK_PORT: u16 = 8090;
        const CONNECTIONS: u64 = 64;
        let total: u64 = std::env::var("MESHKIT_E2E_INTEGRITY_BYTES")
            .ok()
            .map(|v| {
                v.parse()
                    .expect("MESHKIT_E2E_INTEGRITY_BYTES must be a byte count")
            })
            .unwrap_or(1 << 30);
        let mut nodes = TwoNodes::start(Options::default());
        // The sink digests everything it receives and answers `<sha256> <bytes>` when the client is done.
        nodes.apps.push(serve(
            &nodes.server,
            &format!("{SERVER_IP}:{SINK_PORT}"),
            |stream| {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
                let mut reader = &stream;
                let mut digest = sha256();
                let mut count = 0u64;
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            digest.update(&buf[..n]);
                            count += n as u64;
                        }
                        Err(_) => return,
                    }
                }
                let _ =
                    (&stream).write_all(format!("{} {count}\n", hex(digest.finish().as_ref())).as_bytes());
            },
        ));

        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let block: Vec<u8> = (0..(1 << 20) / 8)
            .flat_map(|_| {
                // xorshift64
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state.to_le_bytes()
            })
            .collect();
        let block = std::sync::Arc::new(block);
        let addr: SocketAddr = format!("{SERVER_IP}:{SINK_PORT}").parse().unwrap();
        let streams: Vec<TcpStream> = nodes
            .client
            .run(move || {
                (0..CONNECTIONS)
                    .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(10)))
                    .collect::<std::io::Result<Vec<_>>>()
            })
            .unwrap()
            .unwrap_or_else(|e| panic!("connecting: {e}\n{}", nodes.logs()));

        let started = Instant::now();
        let workers: Vec<_> = streams
            .into_iter()
            .zip(0u64..)
            .map(|(stream, connection)| {
                let block = block.clone();
                let len = total / CONNECTIONS + u64::from(connection < total % CONNECTIONS);
                std::thread::spawn(move || -> Result<(), String> {
                    stream
                        .set_write_timeout(Some(Duration::from_secs(60)))
                        .map_err(|e| e.to_string())?;
                    stream
                        .set_read_timeout(Some(Duration::from_secs(60)))
                        .map_err(|e| e.to_string())?;
                    let mut digest = sha256();
                    let mut failed = None;
                    for_each_piece(&block, connection, len, |piece| {
                        if failed.is_none() {
                            digest.update(piece);
                            failed = (&stream).write_all(piece).err();
                        }
                    });
                    if let Some(error) = failed {
                        return Err(format!("connection {connection}: sending: {error}"));
                    }
                    stream.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
                    let mut answer = String::new();
                    BufReader::new(&stream)
                        .read_line(&mut answer)
                        .map_err(|e| format!("connection {connection}: reading the digest: {e}"))?;
                    let expected = format!("{} {len}", hex(digest.finish().as_ref()));
                    if answer.trim_end() != expected {
                        return Err(format!(
                            "connection {connection}: sent {expected}, the server received {:?}",
                            answer.trim_end()
                        ));
                    }
                    Ok(())
                })
            })
            .collect();
        let failures: Vec<String> = workers
            .into_iter()
            .filter_map(|worker| worker.join().unwrap().err())
            .collect();
        let elapsed = started.elapsed();
        assert!(failures.is_empty(), "{failures:#?}\n{}", nodes.logs());
        println!(
            "{total} bytes over {CONNECTIONS} connections through HBONE in {elapsed:?}: {:.1} MiB/s",
            total as f64 / (1 << 20) as f64 / elapsed.as_secs_f64()
        );
        // Both proxies counted the bytes: Istio's `received` is the request direction, client to server.
        for (reporter, body) in [
            ("source", nodes.client_metrics()),
            ("destination", nodes.server_metrics()),
        ] {
            let received = common::metric_sum(
                &body,
                "istio_tcp_received_bytes_total",
                &[("reporter", reporter), ("destination_workload", "server")],
            );
            assert!(
                received >= total as f64,
                "the {reporter} reported {received} bytes received, of {total} sent"
            );
        }
        nodes.shut_down();
    });
}

#[test]
fn two_workloads_on_one_node_still_talk_through_hbone_with_mutual_tls() {
    isolated(|| {
        const CLIENT_B_IP: &str = "10.10.0.3";
        let SharedNode {
            node,
            dir: _dir,
            control_plane,
            _app,
            proxy,
        } = SharedNode::start(&[("client", CLIENT_B_IP)], &[]);
        let logs = || proxy.log();

        // The client application binds its workload's address, as a pod's socket would have it.
        let reply = exchange_from(&node, CLIENT_B_IP, "local").unwrap_or_else(|e| panic!("{e}\n{}", logs()));
        // Not straight from the client's address: the proxy's inbound side connected to the app.
        assert_eq!(reply, format!("echo local from {SERVER_IP}"));
        // The node proxy reported the connection twice, as the source and as the destination, both with
        // mutual TLS and the identities proven in the handshake.
        eventually(
            Duration::from_secs(10),
            "both reporters with mutual TLS on the node proxy",
            || {
                let body = metrics(&node, SERVER_IP);
                has_metric(
                    &body,
                    "istio_tcp_connections_opened_total",
                    &[
                        ("reporter", "source"),
                        ("source_workload", "client"),
                        ("destination_workload", "server"),
                        (
                            "destination_principal",
                            "spiffe://cluster.local/ns/default/sa/server",
                        ),
                        ("connection_security_policy", "mutual_tls"),
                    ],
                ) && has_metric(
                    &body,
                    "istio_tcp_connections_opened_total",
                    &[
                        ("reporter", "destination"),
                        ("source_principal", CLIENT_PRINCIPAL),
                        ("destination_workload", "server"),
                        ("connection_security_policy", "mutual_tls"),
                    ],
                )
            },
            logs,
        );
        let logs_before = logs();
        assert!(proxy.terminate().success(), "{logs_before}");
        control_plane.stop();
    });
}

/// One namespace as a node: the server workload and client workloads, each an address of the node's
/// loopback, served by a shared node proxy without istio-cni (INPOD_ENABLED=false), the control plane and
/// the echo app on [`SERVER_IP`]. Each client's traffic to the app (by its source address) is captured
/// into 15001; the proxy's own connections (marked) are not. Fields drop in order.
struct SharedNode {
    node: Netns,
    dir: TempDir,
    control_plane: ControlPlane,
    _app: App,
    proxy: Ztunnel,
}

impl SharedNode {
    /// `clients` are `(workload name, address)`; `config` extra files for the control plane.
    fn start(clients: &[(&str, &str)], config: &[(&str, String)]) -> SharedNode {
        let node = Netns::create("node").expect("network namespaces are required for this test");
        for ip in std::iter::once(SERVER_IP).chain(clients.iter().map(|(_, ip)| *ip)) {
            node.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"])
                .unwrap();
        }
        let dir = TempDir::new();
        let pods: String = clients
            .iter()
            .map(|(name, ip)| pod(name, "default", ip, "node-a"))
            .chain(std::iter::once(pod("server", "default", SERVER_IP, "node-a")))
            .collect();
        dir.write_config("pods.yaml", &pods);
        for (name, text) in config {
            dir.write_config(name, text);
        }
        let ztunnel_id = SpiffeId::parse("spiffe://cluster.local/ns/istio-system/sa/ztunnel").unwrap();
        let control_plane = ControlPlane::start(
            &node,
            dir.path(),
            StaticTokens::new().with("node-token", Caller::new(ztunnel_id).on_node("node-a")),
        );
        let app = echo_app(&node, SERVER_IP, APP_PORT);
        common::exempt_proxy_traffic(&node);
        let port = APP_PORT.to_string();
        for (_, client) in clients {
            node.iptables(&[
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "-s",
                client,
                "-d",
                SERVER_IP,
                "--dport",
                &port,
                "-j",
                "REDIRECT",
                "--to-ports",
                "15001",
            ])
            .unwrap();
        }
        let proxy = Ztunnel::start(
            &node,
            dir.path(),
            "node",
            "node-token",
            &[
                ("PROXY_MODE", "shared".to_owned()),
                ("NODE_NAME", "node-a".to_owned()),
                // No istio-cni here: the proxy serves the node's workloads from the node's own namespace.
                ("INPOD_ENABLED", "false".to_owned()),
            ],
        );
        wait_ready(&[(&node, SERVER_IP)], || proxy.log());
        SharedNode {
            node,
            dir,
            control_plane,
            _app: app,
            proxy,
        }
    }
}

/// One line from the application at `source` (an address of `node`, which the socket binds as a pod's
/// socket would have it) to the echo app at [`SERVER_IP`]:[`APP_PORT`]: the reply, or why not.
fn exchange_from(node: &Netns, source: &str, message: &str) -> Result<String, String> {
    let local = SocketAddrV4::new(source.parse().unwrap(), 0);
    let message = message.to_owned();
    node.run(move || -> Result<String, String> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .map_err(|e| e.to_string())?;
        socket.bind(&local.into()).map_err(|e| e.to_string())?;
        let server = SocketAddrV4::new(SERVER_IP.parse::<Ipv4Addr>().unwrap(), APP_PORT);
        socket
            .connect_timeout(&server.into(), Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        line_exchange(socket.into(), &message)
    })
    .unwrap()
}

/// A shared node proxy without istio-cni serves two client workloads. Their HBONE connections leave from
/// each workload's own address (original source), so the destination's DENY by one client's IP block
/// refuses that client only (from the node's address it would match neither and fail open), and the
/// destination's metrics name each source workload by its address.
#[test]
fn a_shared_node_proxy_keeps_each_clients_address_for_the_destinations_ip_policy() {
    isolated(|| {
        const CLIENT_A_IP: &str = "10.10.0.3";
        const CLIENT_B_IP: &str = "10.10.0.4";
        let deny_b = format!(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-b, namespace: default}}
spec:
  action: DENY
  rules:
  - from: [{{source: {{ipBlocks: ["{CLIENT_B_IP}/32"]}}}}]
"#
        );
        let SharedNode {
            node,
            dir: _dir,
            control_plane,
            _app,
            proxy,
        } = SharedNode::start(
            &[("client-a", CLIENT_A_IP), ("client-b", CLIENT_B_IP)],
            &[("policy.yaml", deny_b)],
        );
        let logs = || proxy.log();

        let allowed = exchange_from(&node, CLIENT_A_IP, "from a");
        assert!(allowed.is_ok(), "client-a was refused: {allowed:?}\n{}", logs());
        let denied = exchange_from(&node, CLIENT_B_IP, "from b");
        assert!(
            denied.is_err(),
            "client-b's IP is denied, yet it got through: {denied:?}\n{}",
            logs()
        );
        eventually(
            Duration::from_secs(10),
            "the destination's metrics naming each client by its address",
            || {
                let body = metrics(&node, SERVER_IP);
                has_metric(
                    &body,
                    "istio_tcp_connections_opened_total",
                    &[("reporter", "destination"), ("source_workload", "client-a")],
                ) && has_metric(
                    &body,
                    "istio_tcp_connections_closed_total",
                    &[
                        ("reporter", "destination"),
                        ("source_workload", "client-b"),
                        ("response_flags", "DENY"),
                    ],
                )
            },
            || format!("{}\n{}", metrics(&node, SERVER_IP), logs()),
        );
        let logs_before = logs();
        assert!(proxy.terminate().success(), "{logs_before}");
        control_plane.stop();
    });
}

/// A shared node proxy without istio-cni, with its pod in a network namespace of its own behind the
/// node and captured the TPROXY way (no NAT: the node's mangle rule hands the pod's connection, addressed
/// to the server, straight to the transparent 15001). The proxy reads the original destination from the
/// socket, and its HBONE connection leaves from the pod's own address (original source: an address the
/// node does not own, bound with IP_TRANSPARENT), with the replies brought back to it by the node's rules
/// for the proxy's transparent sockets, as a deployment of this mode must set them up (deploy/README.md).
/// The destination sees the pod's address, so it names the pod as the source workload.
#[test]
fn a_shared_node_proxy_serves_a_pod_behind_the_node_captured_by_tproxy() {
    isolated(|| {
        const POD_IP: &str = "10.20.0.2";
        const NODE_POD_SIDE: &str = "10.20.0.1";
        let pod_ns = Netns::create("pod").expect("network namespaces are required for this test");
        let node = Netns::create("node").unwrap();
        let server = Netns::create("server").unwrap();
        common::link(
            &pod_ns,
            &format!("{POD_IP}/24"),
            &node,
            &format!("{NODE_POD_SIDE}/24"),
        );
        common::link(
            &node,
            &format!("{CLIENT_IP}/24"),
            &server,
            &format!("{SERVER_IP}/24"),
        );
        pod_ns
            .ip(&["route", "add", "default", "via", NODE_POD_SIDE])
            .unwrap();
        server
            .ip(&["route", "add", "10.20.0.0/24", "via", CLIENT_IP])
            .unwrap();
        node.run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))
            .unwrap()
            .unwrap();
        // The node's rules: packets for the proxy's transparent sockets (its TPROXY'd connections and its
        // connections bound to a pod's address) are delivered locally; the pod's new connections to the
        // app port go to 15001 untouched. Istio's mark 0x111/0xfff, clear of the proxy's own 0x539.
        for rule in [
            vec![
                "-t",
                "mangle",
                "-A",
                "PREROUTING",
                "-p",
                "tcp",
                "-m",
                "socket",
                "--transparent",
                "-j",
                "MARK",
                "--set-xmark",
                "0x111/0xfff",
            ],
            vec![
                "-t",
                "mangle",
                "-A",
                "PREROUTING",
                "-s",
                "10.20.0.0/24",
                "-p",
                "tcp",
                "--dport",
                "8000:8999",
                "-j",
                "TPROXY",
                "--on-port",
                "15001",
                "--tproxy-mark",
                "0x111/0xfff",
            ],
        ] {
            node.iptables(&rule)
                .expect("iptables with the socket match and the TPROXY target is required for this test");
        }
        node.ip(&["rule", "add", "fwmark", "0x111/0xfff", "lookup", "100"])
            .unwrap();
        node.ip(&["route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100"])
            .unwrap();

        let dir = TempDir::new();
        dir.write_config(
            "pods.yaml",
            &format!(
                "{}{}",
                pod("client", "default", POD_IP, "client-node"),
                pod("server", "default", SERVER_IP, "server-node")
            ),
        );
        let ztunnel_id = SpiffeId::parse("spiffe://cluster.local/ns/istio-system/sa/ztunnel").unwrap();
        let server_id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/server").unwrap();
        let control_plane = ControlPlane::start(
            &server,
            dir.path(),
            StaticTokens::new()
                .with("node-token", Caller::new(ztunnel_id).on_node("client-node"))
                .with("server-token", Caller::new(server_id)),
        );
        let _app = echo_app(&server, SERVER_IP, APP_PORT);
        let node_proxy = Ztunnel::start(
            &node,
            dir.path(),
            "node",
            "node-token",
            &[
                ("PROXY_MODE", "shared".to_owned()),
                ("NODE_NAME", "client-node".to_owned()),
                ("INPOD_ENABLED", "false".to_owned()),
            ],
        );
        let server_proxy = Ztunnel::dedicated(&server, dir.path(), "server", "server-token");
        let logs = || {
            format!(
                "--- node ztunnel ---\n{}\n--- server ztunnel ---\n{}",
                node_proxy.log(),
                server_proxy.log()
            )
        };
        wait_ready(&[(&node, CLIENT_IP), (&server, SERVER_IP)], logs);

        let reply = round_trip_to(&pod_ns, &format!("{SERVER_IP}:{APP_PORT}"), "tproxy")
            .unwrap_or_else(|e| panic!("round trip from the pod failed: {e}\n{}", logs()));
        // The server's proxy connected to the app (dedicated mode keeps its own address).
        assert_eq!(reply, format!("echo tproxy from {SERVER_IP}"));
        eventually(
            Duration::from_secs(10),
            "the destination naming the pod, by its address, as the source workload over mTLS",
            || {
                has_metric(
                    &metrics(&server, SERVER_IP),
                    "istio_tcp_connections_opened_total",
                    &[
                        ("reporter", "destination"),
                        ("source_workload", "client"),
                        ("source_principal", CLIENT_PRINCIPAL),
                        ("connection_security_policy", "mutual_tls"),
                    ],
                )
            },
            || format!("{}\n{}", metrics(&server, SERVER_IP), logs()),
        );
        let logs_before = logs();
        assert!(node_proxy.terminate().success(), "{logs_before}");
        assert!(server_proxy.terminate().success(), "{logs_before}");
        control_plane.stop();
    });
}

/// Which proxy gets SIGTERM in [`drains_on_sigterm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

/// An open connection keeps working through the drain after SIGTERM, new connections are refused, and
/// the proxy exits 0 within the grace period plus a margin, closing what is left.
fn drains_on_sigterm(side: Side) {
    const GRACE: Duration = Duration::from_secs(3);
    const MARGIN: Duration = Duration::from_secs(5);
    let grace = vec![("CONNECTION_TERMINATION_DEADLINE", format!("{}s", GRACE.as_secs()))];
    let mut nodes = TwoNodes::start(match side {
        Side::Client => Options {
            client_env: grace,
            ..Options::default()
        },
        Side::Server => Options {
            server_env: grace,
            ..Options::default()
        },
    });
    let app = format!("{SERVER_IP}:{APP_PORT}");
    let mut open = OpenConnection::connect(&nodes.client, &app).unwrap();
    assert_eq!(
        open.exchange("before")
            .unwrap_or_else(|e| panic!("{e}\n{}", nodes.logs())),
        format!("echo before from {SERVER_IP}")
    );

    let signalled = Instant::now();
    match side {
        Side::Client => nodes.client_proxy.signal_term(),
        Side::Server => nodes.server_proxy.signal_term(),
    }
    // New connections are refused once the listeners are closed ...
    eventually(
        GRACE,
        "new connections to be refused while draining",
        || round_trip(&nodes.client, "new").is_err(),
        || nodes.logs(),
    );
    // ... while the open one keeps working until shortly before the deadline.
    let mut exchanges = 0;
    while signalled.elapsed() + Duration::from_millis(700) < GRACE {
        let message = format!("during {exchanges}");
        assert_eq!(
            open.exchange(&message),
            Ok(format!("echo {message} from {SERVER_IP}")),
            "the open connection failed {:?} after SIGTERM\n{}",
            signalled.elapsed(),
            nodes.logs()
        );
        exchanges += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let proxy = match side {
        Side::Client => &mut nodes.client_proxy,
        Side::Server => &mut nodes.server_proxy,
    };
    let status = proxy.wait_exit(GRACE + MARGIN);
    let exited = signalled.elapsed();
    let status = status.unwrap_or_else(|| {
        panic!(
            "ztunnel still running {exited:?} after SIGTERM (grace {GRACE:?})\n{}",
            nodes.logs()
        )
    });
    println!(
        "{side:?} ztunnel: {exchanges} exchanges on the open connection while draining; exit {status} after {exited:?}"
    );
    assert!(status.success(), "{status}\n{}", nodes.logs());
    assert!(nodes.logs().contains("SIGTERM: draining"), "{}", nodes.logs());
    // What the drain left open was closed when the proxy stopped.
    assert!(open.is_closed(), "the open connection outlived the proxy");
    let other = match side {
        Side::Client => nodes.server_proxy,
        Side::Server => nodes.client_proxy,
    };
    assert!(other.terminate().success());
}

#[test]
fn sigterm_on_the_client_node_drains_open_connections_then_exits() {
    isolated(|| {
        drains_on_sigterm(Side::Client);
    });
}

#[test]
fn sigterm_on_the_server_node_drains_open_connections_then_exits() {
    isolated(|| {
        drains_on_sigterm(Side::Server);
    });
}

#[test]
fn sigterm_with_nothing_open_ends_the_drain_without_waiting_for_the_deadline() {
    isolated(|| {
        let nodes = TwoNodes::start(Options::default());
        // One connection, finished: nothing is open when the signal comes.
        assert!(round_trip(&nodes.client, "once").is_ok(), "{}", nodes.logs());
        let TwoNodes {
            client_proxy,
            server_proxy,
            ..
        } = nodes;
        for (name, proxy) in [("client", client_proxy), ("server", server_proxy)] {
            let (status, log) = proxy.terminate_keeping_log();
            assert!(status.success(), "{log}");
            // The drain ends as soon as every listener and connection has let go; the deadline is for
            // connections that stay open, and it passing with nothing open means the proxy waited for itself.
            assert!(
                !log.contains("connections still open after the drain deadline"),
                "the {name} ztunnel waited out the drain deadline with nothing open:\n{log}"
            );
        }
    });
}
