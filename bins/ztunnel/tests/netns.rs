//! ztunnel end to end, as it runs on real nodes: two network namespaces ("client" and "server" nodes)
//! joined by a veth pair, our `ztunnel` binary in each (dedicated mode), the local control plane serving
//! xDS and certificates to both over the veth, and iptables in the client namespace redirecting the
//! application's traffic to ztunnel's port 15001. The application's bytes must arrive through HBONE with
//! mutual TLS, policy pushed over xDS must apply to new and open connections, and SIGTERM must stop the
//! proxies cleanly.
//!
//! Needs root, iproute2 and iptables (CI installs them); without them the test fails and says why.

#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_core::{DevCa, SpiffeId, TrustDomain};
use mesh_test::netns::{self, Netns};
use mesh_xds::ca::{Caller, StaticTokens};
use mesh_xds::server::{ClientAuth, Server, ServerConfig};

const CLIENT_IP: &str = "10.10.0.1";
const SERVER_IP: &str = "10.10.0.2";
const APP_PORT: u16 = 8080;

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

/// A directory removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!("meshkit-e2e-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(path.join("config")).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running ztunnel, killed if the test ends early; its log is kept for failure messages.
struct Ztunnel {
    child: Option<Child>,
    log: PathBuf,
}

impl Ztunnel {
    /// A dedicated-mode ztunnel for `workload` (namespace `default`, service account = name).
    fn dedicated(node: &Netns, dir: &Path, workload: &str, token: &str) -> Ztunnel {
        Self::start(
            node,
            dir,
            workload,
            token,
            &[
                ("PROXY_MODE", "dedicated".to_owned()),
                ("PROXY_WORKLOAD_INFO", format!("default/{workload}/{workload}")),
                ("NODE_NAME", format!("{workload}-node")),
            ],
        )
    }

    fn start(node: &Netns, dir: &Path, name: &str, token: &str, env: &[(&str, String)]) -> Ztunnel {
        let token_file = dir.join(format!("{name}.token"));
        std::fs::write(&token_file, token).unwrap();
        let log = dir.join(format!("ztunnel-{name}.log"));
        let child = node
            .command(env!("CARGO_BIN_EXE_ztunnel"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("XDS_ADDRESS", format!("https://{SERVER_IP}:15012"))
            .env("XDS_ROOT_CA", dir.join("root.pem"))
            .env("AUTH_TOKEN", &token_file)
            .env("CLUSTER_ID", "Kubernetes")
            .env("POD_NAME", format!("ztunnel-{name}"))
            .env("IPV6_ENABLED", "false")
            .env("TERMINATION_GRACE_PERIOD_SECONDS", "2s")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Ztunnel {
            child: Some(child),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (bounded) for a clean exit.
    fn terminate(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        netns::run(Command::new("kill").args(["-TERM", &child.id().to_string()])).unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "ztunnel did not stop after SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `GET path` over plain HTTP/1.1 inside `node`; the status code and body.
fn http_get(node: &Netns, addr: &str, path: &str) -> Option<(u16, String)> {
    let addr: SocketAddr = addr.parse().unwrap();
    let path = path.to_owned();
    node.run(move || -> Option<(u16, String)> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let status = response.split_whitespace().nth(1)?.parse().ok()?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Some((status, body))
    })
    .unwrap()
}

/// Waits until `check` holds, at most `within`.
fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool, context: impl Fn() -> String) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One application round trip from the client namespace to the server app; `Ok(reply)` or why not.
fn round_trip(client: &Netns, message: &str) -> Result<String, String> {
    let message = message.to_owned();
    client
        .run(move || -> Result<String, String> {
            let addr: SocketAddr = format!("{SERVER_IP}:{APP_PORT}").parse().unwrap();
            let mut stream =
                TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(|e| e.to_string())?;
            stream
                .write_all(format!("{message}\n").as_bytes())
                .map_err(|e| e.to_string())?;
            let mut reply = String::new();
            BufReader::new(stream)
                .read_line(&mut reply)
                .map_err(|e| e.to_string())?;
            if reply.is_empty() {
                return Err("closed without a reply".into());
            }
            Ok(reply.trim_end().to_owned())
        })
        .unwrap()
}

/// The local control plane, running in a namespace on its own thread and runtime.
struct ControlPlane {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), netns::NetnsError>>>,
}

impl ControlPlane {
    /// Serves `dir/config` on `SERVER_IP:15012` inside `node`, accepting `tokens`; writes its root to
    /// `dir/root.pem`.
    fn start(node: &Netns, dir: &Path, tokens: StaticTokens) -> ControlPlane {
        let (root_tx, root_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let config_dir = dir.join("config");
        let thread = node
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let td = TrustDomain::new("cluster.local").unwrap();
                    let ca = Arc::new(DevCa::new(td, Duration::from_secs(3600)).unwrap());
                    let mut config = ServerConfig::new(config_dir);
                    config.listen = format!("{SERVER_IP}:15012").parse().unwrap();
                    config.poll_interval = Duration::from_millis(100);
                    config.auth = ClientAuth::Authenticators(vec![Arc::new(tokens)]);
                    let server = Server::start(config, ca).await.unwrap();
                    root_tx.send(server.root_pem().to_owned()).unwrap();
                    let _ = stopped.await;
                    server.shutdown().await;
                });
            })
            .unwrap();
        let root = root_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the control plane did not start");
        std::fs::write(dir.join("root.pem"), root).unwrap();
        ControlPlane {
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap().unwrap();
        }
    }
}

/// An echo server on `ip:APP_PORT` inside `node` that prefixes each line with who it saw.
fn echo_app(node: &Netns, ip: &str) {
    let app = node
        .run({
            let ip = ip.to_owned();
            move || TcpListener::bind(format!("{ip}:{APP_PORT}"))
        })
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for stream in app.incoming() {
            let Ok(stream) = stream else { continue };
            std::thread::spawn(move || {
                let peer = stream.peer_addr().map(|p| p.ip().to_string()).unwrap_or_default();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                let mut line = String::new();
                while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
                    if writer
                        .write_all(format!("echo {} from {peer}\n", line.trim_end()).as_bytes())
                        .is_err()
                    {
                        break;
                    }
                    line.clear();
                }
            });
        }
    });
}

/// Redirects the application traffic of `node` to `destinations:APP_PORT` into ztunnel's 15001, leaving
/// ztunnel's own (marked) sockets alone, as Istio's dedicated-mode redirect does.
fn capture(node: &Netns, destinations: &str) {
    node.iptables(&[
        "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-m", "mark", "--mark", "0x539", "-j", "RETURN",
    ])
    .unwrap();
    node.iptables(&[
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        destinations,
        "--dport",
        &APP_PORT.to_string(),
        "-j",
        "REDIRECT",
        "--to-ports",
        "15001",
    ])
    .unwrap();
}

/// Waits for each proxy's readiness endpoint to answer 200.
fn wait_ready(nodes: &[(&Netns, &str)], logs: impl Fn() -> String) {
    for (node, ip) in nodes {
        eventually(
            Duration::from_secs(30),
            "ztunnel readiness",
            || {
                matches!(
                    http_get(node, &format!("{ip}:15021"), "/healthz/ready"),
                    Some((200, _))
                )
            },
            &logs,
        );
    }
}

#[test]
fn two_nodes_talk_through_hbone_with_policy_from_the_control_plane() {
    let client = Netns::create("client").expect("network namespaces are required for this test");
    let server = Netns::create("server").unwrap();
    netns::connect(
        &client,
        &format!("{CLIENT_IP}/24"),
        &server,
        &format!("{SERVER_IP}/24"),
    )
    .unwrap();
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
    echo_app(&server, SERVER_IP);

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
    let reply = round_trip(&client, "hello").unwrap_or_else(|e| panic!("round trip failed: {e}\n{}", logs()));
    assert_eq!(reply, format!("echo hello from {SERVER_IP}"));
    eventually(
        Duration::from_secs(10),
        "the destination's metrics",
        || {
            let (_, body) = http_get(&server, &format!("{SERVER_IP}:15020"), "/metrics").unwrap_or_default();
            body.lines().any(|line| {
                line.starts_with("istio_tcp_connections_opened_total{")
                    && line.contains(r#"reporter="destination""#)
                    && line.contains(r#"source_principal="spiffe://cluster.local/ns/default/sa/client""#)
                    && line.contains(r#"connection_security_policy="mutual_tls""#)
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

    std::fs::write(dir.0.join("config/policy.yaml"), DENY_CLIENT).unwrap();
    eventually(
        Duration::from_secs(20),
        "the DENY policy to apply to new connections",
        || round_trip(&client, "after").is_err(),
        logs,
    );
    line.clear();
    let closed = open_reader.read_line(&mut line);
    assert!(
        matches!(closed, Ok(0) | Err(_)),
        "the open connection survived the DENY policy: {closed:?} {line:?}\n{}",
        logs()
    );
    eventually(
        Duration::from_secs(10),
        "DENY in the destination's metrics",
        || {
            let (_, body) = http_get(&server, &format!("{SERVER_IP}:15020"), "/metrics").unwrap_or_default();
            body.lines().any(|l| {
                l.starts_with("istio_tcp_connections_closed_total{") && l.contains(r#"response_flags="DENY""#)
            })
        },
        logs,
    );

    // SIGTERM: both stop cleanly.
    let logs_before = logs();
    assert!(client_proxy.terminate().success(), "{logs_before}");
    assert!(server_proxy.terminate().success(), "{logs_before}");
    control_plane.stop();
}

#[test]
fn a_shared_node_proxy_presents_each_workloads_own_identity() {
    const SERVER_B_IP: &str = "10.10.0.3";
    let client = Netns::create("client").expect("network namespaces are required for this test");
    let server = Netns::create("node").unwrap();
    netns::connect(
        &client,
        &format!("{CLIENT_IP}/24"),
        &server,
        &format!("{SERVER_IP}/24"),
    )
    .unwrap();
    // A second workload on the same node.
    let veth = server.ip(&["-o", "link", "show", "type", "veth"]).unwrap();
    let device = String::from_utf8_lossy(&veth.stdout)
        .split(':')
        .nth(1)
        .map(|name| name.trim().split('@').next().unwrap_or_default().to_owned())
        .unwrap();
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
    echo_app(&server, SERVER_IP);
    echo_app(&server, SERVER_B_IP);
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

    for (ip, workload) in [(SERVER_IP, "server-a"), (SERVER_B_IP, "server-b")] {
        let ip = ip.to_owned();
        let reply = client
            .run(move || -> Result<String, String> {
                let addr: SocketAddr = format!("{ip}:{APP_PORT}").parse().unwrap();
                let mut stream =
                    TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
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
        let principal = format!(r#"destination_principal="spiffe://cluster.local/ns/default/sa/{workload}""#);
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

    let logs_before = logs();
    assert!(client_proxy.terminate().success(), "{logs_before}");
    assert!(node_proxy.terminate().success(), "{logs_before}");
    control_plane.stop();
}
