//! The measured topology, as people set it up to measure Istio's ztunnel: a "client" and a "server" node
//! (network namespaces) joined by a veth pair, our ztunnel in each, the local control plane and the
//! upstream servers on the server node, and iptables in the client node sending the application's traffic
//! to its proxy's 15001. Beside the proxies, a plain relay pair (`relay`) on 15101 and 15108: the same
//! capture can send the traffic to it instead ([`DataPath`]).
//!
//! Everything it creates is owned by a guard: [`Topology`]'s fields drop in order (proxies, relays,
//! upstream servers, control plane, namespaces with their interfaces and rules, files), and a failed
//! start drops what it had created so far the same way.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_core::{DevCa, SpiffeId, TrustDomain};
use mesh_test::netns::{self, Netns, NetnsError};
use mesh_xds::ca::{Caller, StaticTokens};
use mesh_xds::server::{ClientAuth, Server, ServerConfig};

use crate::fixedrate::EchoServer;
use crate::http::{BODY_BYTES, HttpServer};
use crate::procfs::{self, Sample};
use crate::relay::{CLIENT_RELAY_PORT, RelayProcess, SERVER_RELAY_PORT};
use crate::setup::Tools;
use crate::{Error, Result};

/// The client node's address (its workload and its proxy).
pub(crate) const CLIENT_IP: &str = "10.10.0.1";
/// The server node's address (its workload, its proxy, the control plane, the upstream servers).
pub(crate) const SERVER_IP: &str = "10.10.0.2";
/// The HTTP server's port.
pub(crate) const HTTP_PORT: u16 = 8080;
/// `iperf3 -s`'s port.
pub(crate) const IPERF_PORT: u16 = 8201;
/// The fixed-rate load's echo server's port.
pub(crate) const ECHO_PORT: u16 = 8300;
/// The destination ports the client node redirects to its proxy or relay (iptables `--dport` syntax);
/// every upstream port is in it, the proxies', the relays' and the control plane's ports are not (so
/// neither the client proxy's nor the client relay's own connections are captured again).
const CAPTURED_PORTS: &str = "8000:8999";
/// The HBONE port of the server proxy, whose SYNs the server node counts.
const HBONE_PORT: u16 = 15008;

/// Which way the client node's application traffic goes: which REDIRECT rule, if any, the client node
/// has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DataPath {
    /// No capture: straight over the veth (the baseline).
    Direct,
    /// Captured to the client relay's 15101, then the plain relay pair (the floor of any proxy pair).
    Relay,
    /// Captured to the client proxy's 15001, then HBONE to the server proxy (the mesh).
    Mesh,
}

impl DataPath {
    /// Its name in progress lines, file names and errors.
    pub(crate) fn name(self) -> &'static str {
        match self {
            DataPath::Direct => "direct",
            DataPath::Relay => "relay",
            DataPath::Mesh => "mesh",
        }
    }

    /// The port its REDIRECT rule sends to, if it has one.
    fn redirect_port(self) -> Option<u16> {
        match self {
            DataPath::Direct => None,
            DataPath::Relay => Some(CLIENT_RELAY_PORT),
            DataPath::Mesh => Some(15001),
        }
    }
}
/// The mark our ztunnel puts on its own sockets, which the capture leaves alone (Istio's 0x539).
const PROXY_MARK: &str = "0x539";
/// How long the proxies, the control plane and the servers may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A child process, killed and reaped when dropped.
#[derive(Debug)]
pub(crate) struct ChildGuard {
    child: Child,
}

impl ChildGuard {
    /// Starts `command`, naming it `what` in the error.
    pub(crate) fn spawn(command: &mut Command, what: &str) -> Result<ChildGuard> {
        let child = command
            .spawn()
            .map_err(|e| Error::Topology(format!("cannot start {what}: {e}")))?;
        Ok(ChildGuard { child })
    }

    /// Its process id. `ip netns exec` replaces itself with the program, so this is the program's.
    pub(crate) fn id(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status, if it has exited.
    pub(crate) fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory under the system's temporary directory, removed when dropped: the control plane's
/// `config/`, its root certificate, the proxies' tokens and logs, the load generators' outputs.
#[derive(Debug)]
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = std::env::temp_dir().join(format!("meshbench-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(path.join("config"))
            .map_err(|e| Error::Io(format!("creating {}", path.display()), e))?;
        Ok(TempDir(path))
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    fn write(&self, name: &str, text: &str) -> Result<()> {
        let path = self.0.join(name);
        std::fs::write(&path, text).map_err(|e| Error::Io(format!("writing {}", path.display()), e))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One of our ztunnel processes.
#[derive(Debug)]
pub(crate) struct Proxy {
    /// `client` or `server`.
    pub(crate) name: &'static str,
    child: ChildGuard,
    log: PathBuf,
}

impl Proxy {
    /// Starts our ztunnel in `node` in dedicated mode for the workload `default/<name>`, with Istio's
    /// defaults otherwise (two workers, access logs at `info`).
    fn start(node: &Netns, dir: &Path, tools: &Tools, name: &'static str) -> Result<Proxy> {
        let ztunnel = &tools.ztunnel;
        let token_file = dir.join(format!("{name}.token"));
        std::fs::write(&token_file, format!("{name}-token"))
            .map_err(|e| Error::Io(format!("writing {}", token_file.display()), e))?;
        let log = dir.join(format!("ztunnel-{name}.log"));
        let log_file =
            std::fs::File::create(&log).map_err(|e| Error::Io(format!("creating {}", log.display()), e))?;
        let mut command = match &tools.callgrind {
            Some(dir) => {
                let mut under_valgrind = node.command("valgrind");
                under_valgrind.args(crate::layout::valgrind_args(dir, name, ztunnel));
                under_valgrind
            }
            None => node.command(&ztunnel.to_string_lossy()),
        };
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("XDS_ADDRESS", format!("https://{SERVER_IP}:15012"))
            .env("XDS_ROOT_CA", dir.join("root.pem"))
            .env("AUTH_TOKEN", &token_file)
            .env("CLUSTER_ID", "Kubernetes")
            .env("POD_NAME", format!("ztunnel-{name}"))
            .env("NODE_NAME", format!("{name}-node"))
            .env("PROXY_MODE", "dedicated")
            .env("PROXY_WORKLOAD_INFO", format!("default/{name}/{name}"))
            .env("IPV6_ENABLED", "false")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(tools.proxy_env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let child = ChildGuard::spawn(&mut command, &format!("the {name} ztunnel"))?;
        Ok(Proxy { name, child, log })
    }

    /// The process id whose `/proc` entries are read.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its CPU time and memory now.
    pub(crate) fn sample(&self) -> Result<Sample> {
        procfs::sample(self.pid())
    }

    /// The last lines of its log, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        format!("--- last lines of the {} ztunnel's log ---\n{tail}", self.name)
    }

    /// Fails if the process has exited.
    fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(Error::Topology(format!(
                "the {} ztunnel exited ({status})\n{}",
                self.name,
                self.log_tail()
            ))),
            _ => Ok(()),
        }
    }

    /// Fails if the pid is not the ztunnel binary, whose `/proc` figures are the ones we report. Checked
    /// once the proxy answers, when `ip netns exec` has certainly replaced itself with it.
    fn check_is(&self, ztunnel: &Path) -> Result<()> {
        let exe = std::fs::read_link(format!("/proc/{}/exe", self.pid())).ok();
        let expected = std::fs::canonicalize(ztunnel).ok();
        if exe.is_none() || exe != expected {
            return Err(Error::Topology(format!(
                "process {} is {exe:?}, not {}: its /proc figures would not be the proxy's",
                self.pid(),
                ztunnel.display()
            )));
        }
        Ok(())
    }
}

/// The local control plane (xDS and CA) on a thread joined to the server namespace.
#[derive(Debug)]
struct ControlPlane {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::result::Result<(), NetnsError>>>,
}

impl ControlPlane {
    /// Serves `dir/config` on `SERVER_IP:15012`, accepting each proxy's static token for its own
    /// workload's identity; writes the CA's root to `dir/root.pem` for the proxies.
    fn start(node: &Netns, dir: &Path) -> Result<ControlPlane> {
        let identity = |sa: &str| {
            SpiffeId::parse(&format!("spiffe://cluster.local/ns/default/sa/{sa}"))
                .map_err(|e| Error::Topology(format!("identity {sa}: {e}")))
        };
        let tokens = StaticTokens::new()
            .with("client-token", Caller::new(identity("client")?))
            .with("server-token", Caller::new(identity("server")?));
        let listen = SocketAddr::from(([10, 10, 0, 2], 15012));
        let config_dir = dir.join("config");
        let (root_tx, root_rx) = std::sync::mpsc::channel::<std::result::Result<String, String>>();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = node.spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = root_tx.send(Err(format!("runtime: {e}")));
                    return;
                }
            };
            runtime.block_on(async move {
                let ca = TrustDomain::new("cluster.local")
                    .and_then(|td| DevCa::new(td, Duration::from_secs(3600)));
                let ca = match ca {
                    Ok(ca) => Arc::new(ca),
                    Err(e) => {
                        let _ = root_tx.send(Err(format!("CA: {e}")));
                        return;
                    }
                };
                let mut config = ServerConfig::new(config_dir);
                config.listen = listen;
                config.auth = ClientAuth::Authenticators(vec![Arc::new(tokens)]);
                let server = match Server::start(config, ca).await {
                    Ok(server) => server,
                    Err(e) => {
                        let _ = root_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = root_tx.send(Ok(server.root_pem().to_owned()));
                // Until the guard is dropped (or the process ends).
                let _ = stopped.await;
                server.shutdown().await;
            });
        })?;
        let mut control_plane = ControlPlane {
            stop: Some(stop),
            thread: Some(thread),
        };
        let root = match root_rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(root)) => root,
            Ok(Err(why)) => {
                return Err(Error::Topology(format!("the control plane did not start: {why}")));
            }
            Err(_) => {
                control_plane.stop_now();
                return Err(Error::Topology(format!(
                    "the control plane did not start within {START_TIMEOUT:?}"
                )));
            }
        };
        std::fs::write(dir.join("root.pem"), root).map_err(|e| Error::Io("writing root.pem".into(), e))?;
        Ok(control_plane)
    }

    /// Asks the control plane to stop and waits at most 5 s for its thread.
    fn stop_now(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// A Pod as `kubectl get -o yaml` shows it, enrolled in ambient mode, with service account `name`.
fn pod(name: &str, ip: &str) -> String {
    format!(
        r#"
---
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
  labels: {{app: {name}, istio.io/dataplane-mode: ambient}}
spec:
  serviceAccountName: {name}
  nodeName: {name}-node
  containers:
  - name: app
    ports:
    - {{name: http, containerPort: {HTTP_PORT}}}
status:
  phase: Running
  podIP: {ip}
  podIPs: [{{ip: {ip}}}]
  conditions: [{{type: Ready, status: "True"}}]
"#
    )
}

/// The two nodes, running. Fields drop in declaration order.
#[derive(Debug)]
pub(crate) struct Topology {
    /// The client node's proxy.
    pub(crate) client_proxy: Proxy,
    /// The server node's proxy.
    pub(crate) server_proxy: Proxy,
    /// The client node's plain relay.
    pub(crate) client_relay: RelayProcess,
    /// The server node's plain relay.
    pub(crate) server_relay: RelayProcess,
    iperf_server: ChildGuard,
    http: HttpServer,
    echo: EchoServer,
    // Held for its `Drop`: it serves until the topology goes.
    _control_plane: ControlPlane,
    capture: DataPath,
    /// The client node, where the load generators run.
    pub(crate) client: Netns,
    /// The server node.
    pub(crate) server: Netns,
    /// Tokens, logs, outputs.
    pub(crate) dir: TempDir,
}

impl Topology {
    /// Creates both nodes and waits until both proxies and both relays are ready and one request has
    /// gone through the mesh and one through the relays.
    pub(crate) async fn start(tools: &Tools) -> Result<Topology> {
        let client = Netns::create("client")?;
        let server = Netns::create("server")?;
        netns::connect(
            &client,
            &format!("{CLIENT_IP}/24"),
            &server,
            &format!("{SERVER_IP}/24"),
        )?;
        let dir = TempDir::new()?;
        dir.write(
            "config/pods.yaml",
            &format!("{}{}", pod("client", CLIENT_IP), pod("server", SERVER_IP)),
        )?;
        // Count new HBONE connections (SYNs to 15008) and new relay connections (SYNs to 15108) without
        // changing what is accepted: the chain's policy accepts them anyway.
        for port in [HBONE_PORT, SERVER_RELAY_PORT] {
            server.iptables(&[
                "-A",
                "INPUT",
                "-p",
                "tcp",
                "--dport",
                &port.to_string(),
                "--syn",
                "-j",
                "ACCEPT",
            ])?;
        }
        let control_plane = ControlPlane::start(&server, dir.path())?;

        let listener = server
            .run(|| std::net::TcpListener::bind((SERVER_IP, HTTP_PORT)))?
            .map_err(|e| Error::Io(format!("binding {SERVER_IP}:{HTTP_PORT}"), e))?;
        let http = HttpServer::start(listener).map_err(|e| Error::Io("serving HTTP".into(), e))?;
        let listener = server
            .run(|| std::net::TcpListener::bind((SERVER_IP, ECHO_PORT)))?
            .map_err(|e| Error::Io(format!("binding {SERVER_IP}:{ECHO_PORT}"), e))?;
        let echo = EchoServer::start(listener).map_err(|e| Error::Io("serving echo".into(), e))?;
        let iperf_log = std::fs::File::create(dir.path().join("iperf3-server.log"))
            .map_err(|e| Error::Io("creating the iperf3 server's log".into(), e))?;
        let port = IPERF_PORT.to_string();
        let iperf_server = ChildGuard::spawn(
            server
                .command("iperf3")
                .args(["-s", "-B", SERVER_IP, "-p", &port])
                .stdin(Stdio::null())
                .stdout(iperf_log)
                .stderr(Stdio::null()),
            "iperf3 -s",
        )?;

        // The capture, as Istio's dedicated-mode redirect: the proxy's own sockets pass, the application's
        // traffic to the upstream ports goes to 15001.
        client.iptables(&[
            "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-m", "mark", "--mark", PROXY_MARK, "-j", "RETURN",
        ])?;
        let server_proxy = Proxy::start(&server, dir.path(), tools, "server")?;
        let client_proxy = Proxy::start(&client, dir.path(), tools, "client")?;
        let server_relay = RelayProcess::start_server(&server, dir.path(), SERVER_IP)?;
        let upstream = SocketAddr::new(
            SERVER_IP
                .parse()
                .map_err(|e| Error::Topology(format!("{SERVER_IP}: {e}")))?,
            SERVER_RELAY_PORT,
        );
        let client_relay = RelayProcess::start_client(&client, dir.path(), CLIENT_IP, upstream)?;
        let mut topology = Topology {
            client_proxy,
            server_proxy,
            client_relay,
            server_relay,
            iperf_server,
            http,
            echo,
            _control_plane: control_plane,
            capture: DataPath::Direct,
            client,
            server,
            dir,
        };
        topology.set_capture(DataPath::Mesh)?;
        topology.wait_until_ready(tools).await?;
        topology.wait_until_relay_ready().await?;
        Ok(topology)
    }

    /// Waits until both relays accept, then checks that a request captured to the client relay reaches
    /// the upstream through the server relay.
    async fn wait_until_relay_ready(&mut self) -> Result<()> {
        self.server_relay.wait_until_accepting(&self.server).await?;
        self.client_relay.wait_until_accepting(&self.client).await?;
        let capture = self.capture;
        self.set_capture(DataPath::Relay)?;
        let before = self.relay_connections()?;
        let upstream = format!("{SERVER_IP}:{HTTP_PORT}");
        let outcome = http_get(&self.client, &upstream, "/");
        let through = self.relay_connections()?.saturating_sub(before);
        self.set_capture(capture)?;
        match outcome {
            Ok((200, body)) if body.len() == BODY_BYTES && through > 0 => Ok(()),
            Ok((200, _)) if through == 0 => Err(Error::Topology(format!(
                "GET http://{upstream}/ answered with the capture set to the relay, but not through the \
                 server relay\n{}\n{}",
                self.client_relay.log_tail(),
                self.server_relay.log_tail()
            ))),
            other => Err(Error::Topology(format!(
                "GET http://{upstream}/ through the relays failed ({other:?})\n{}\n{}",
                self.client_relay.log_tail(),
                self.server_relay.log_tail()
            ))),
        }
    }

    async fn wait_until_ready(&mut self, tools: &Tools) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let iperf_listening = |node: &Netns| {
            node.command("ss")
                .args(["-Hltn", &format!("sport = :{IPERF_PORT}")])
                .output()
                .is_ok_and(|out| !out.stdout.is_empty())
        };
        loop {
            self.client_proxy.check_running()?;
            self.server_proxy.check_running()?;
            if let Ok(Some(status)) = self.iperf_server.try_wait() {
                return Err(Error::Topology(format!("iperf3 -s exited ({status})")));
            }
            let ready = |node: &Netns, ip: &str| {
                matches!(
                    http_get(node, &format!("{ip}:15021"), "/healthz/ready"),
                    Ok((200, _))
                )
            };
            if ready(&self.client, CLIENT_IP)
                && ready(&self.server, SERVER_IP)
                && iperf_listening(&self.server)
            {
                break;
            }
            if Instant::now() >= deadline {
                return Err(Error::Topology(format!(
                    "the proxies (or iperf3 -s) were not ready within {START_TIMEOUT:?}\n{}\n{}",
                    self.client_proxy.log_tail(),
                    self.server_proxy.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Under callgrind the process is valgrind's (and so are its /proc figures, which the report says).
        if tools.callgrind.is_none() {
            self.client_proxy.check_is(&tools.ztunnel)?;
            self.server_proxy.check_is(&tools.ztunnel)?;
        }
        // The first request through the mesh also fetches the certificates and opens the HBONE
        // connection; a few retries cover a proxy that is ready but still applying its first push.
        let before = self.mesh_connections()?;
        let upstream = format!("{SERVER_IP}:{HTTP_PORT}");
        let mut last = String::new();
        while Instant::now() < deadline {
            match http_get(&self.client, &upstream, "/") {
                Ok((200, body)) if body.len() == BODY_BYTES => {
                    if self.mesh_connections()? > before {
                        return Ok(());
                    }
                    last = "answered, but not through the server's proxy".into();
                }
                Ok((status, _)) => last = format!("status {status}"),
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(Error::Topology(format!(
            "GET http://{upstream}/ from the client node did not go through the mesh ({last})\n{}\n{}",
            self.client_proxy.log_tail(),
            self.server_proxy.log_tail()
        )))
    }

    /// Sends the client node's application traffic the way `path` says: replaces the REDIRECT rule
    /// (to 15001 for the mesh, to 15101 for the relay) or removes it (direct).
    pub(crate) fn set_capture(&mut self, path: DataPath) -> Result<()> {
        if path == self.capture {
            return Ok(());
        }
        if let Some(port) = self.capture.redirect_port() {
            self.redirect("-D", port)?;
            // The rule is gone: should adding the next one fail, the state is "direct", not the old path.
            self.capture = DataPath::Direct;
        }
        if let Some(port) = path.redirect_port() {
            self.redirect("-A", port)?;
        }
        self.capture = path;
        Ok(())
    }

    /// Adds (`-A`) or deletes (`-D`) the REDIRECT of the captured ports to `port`.
    fn redirect(&self, action: &str, port: u16) -> Result<()> {
        self.client.iptables(&[
            "-t",
            "nat",
            action,
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            &format!("{SERVER_IP}/32"),
            "--dport",
            CAPTURED_PORTS,
            "-j",
            "REDIRECT",
            "--to-ports",
            &port.to_string(),
        ])?;
        Ok(())
    }

    /// How many connections the server's proxy has accepted from the mesh so far: the sum of its
    /// `istio_tcp_connections_opened_total` samples reported as destination. Only HBONE reaches it (the
    /// server node captures nothing), so this rises exactly when traffic went through both proxies.
    pub(crate) fn mesh_connections(&self) -> Result<f64> {
        let (status, body) =
            http_get(&self.server, &format!("{SERVER_IP}:15020"), "/metrics").map_err(|e| {
                // Most often the proxy has died: its log says why.
                Error::Load(format!(
                    "reading the server proxy's metrics: {e}\n{}",
                    self.server_proxy.log_tail()
                ))
            })?;
        if status != 200 {
            return Err(Error::Load(format!(
                "the server proxy's /metrics answered {status}"
            )));
        }
        Ok(destination_connections(&String::from_utf8_lossy(&body)))
    }

    /// How many TCP connections to the server proxy's 15008 (HBONE) have been opened so far: the packet
    /// counter of the server node's counting rule for their SYNs. With a working pool this grows far more
    /// slowly than the application's connections.
    pub(crate) fn hbone_connections(&self) -> Result<u64> {
        self.syn_count(HBONE_PORT)
    }

    /// How many TCP connections to the server relay's 15108 have been opened so far (the packet counter
    /// of the server node's counting rule for their SYNs): one per application connection on the relay
    /// path, none on the others.
    pub(crate) fn relay_connections(&self) -> Result<u64> {
        self.syn_count(SERVER_RELAY_PORT)
    }

    /// The packet counter of the server node's counting rule for SYNs to `port`.
    fn syn_count(&self, port: u16) -> Result<u64> {
        let output = self
            .server
            .iptables(&["-t", "filter", "-n", "-v", "-x", "-L", "INPUT"])?;
        syn_count(&String::from_utf8_lossy(&output.stdout), port).ok_or_else(|| {
            Error::Load(format!(
                "no counting rule for {port} in the server node's INPUT chain"
            ))
        })
    }

    /// Opens `count` connections from the client node to the HTTP server, each used for one request, and
    /// returns them open (on the path the capture currently sets).
    pub(crate) fn open_idle_connections(&self, count: usize) -> Result<Vec<TcpStream>> {
        let addr = SocketAddr::from(([10, 10, 0, 2], HTTP_PORT));
        self.client
            .run(move || -> std::result::Result<Vec<TcpStream>, String> {
                (0..count)
                    .map(|i| {
                        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                            .map_err(|e| format!("connection {i}: {e}"))?;
                        let (status, _) = request(&mut stream, addr, "/", false)
                            .map_err(|e| format!("connection {i}: {e}"))?;
                        if status != 200 {
                            return Err(format!("connection {i}: status {status}"));
                        }
                        Ok(stream)
                    })
                    .collect()
            })?
            .map_err(Error::Load)
    }

    /// Where the upstream HTTP server listens.
    pub(crate) fn http_addr(&self) -> SocketAddr {
        self.http.addr()
    }

    /// Where the fixed-rate load's echo server listens.
    pub(crate) fn echo_addr(&self) -> SocketAddr {
        self.echo.addr()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // The fields' own guards do the work (in declaration order); this only says so, because a
        // Ctrl-C'd run is otherwise silent about what it removed.
        eprintln!(
            "meshbench: cleaning up (proxies, relays, servers, control plane, namespaces {} and {}, {})",
            self.client.name(),
            self.server.name(),
            self.dir.path().display()
        );
    }
}

/// The sum of `istio_tcp_connections_opened_total{..reporter="destination"..}` samples in Prometheus text.
fn destination_connections(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with("istio_tcp_connections_opened_total{"))
        .filter(|line| line.contains(r#"reporter="destination""#))
        .filter_map(|line| line.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// The packet count of the `tcp dpt:<port>` rule in `iptables -n -v -x -L` output.
fn syn_count(listing: &str, port: u16) -> Option<u64> {
    let rule = format!("dpt:{port}");
    listing
        .lines()
        .find(|line| line.split_whitespace().any(|word| word == rule))
        .and_then(|line| line.split_whitespace().next())
        .and_then(|packets| packets.parse().ok())
}

/// `GET path` with `Connection: close` to `addr` from inside `node`: the status and body.
fn http_get(node: &Netns, addr: &str, path: &str) -> std::result::Result<(u16, Vec<u8>), String> {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let path = path.to_owned();
    node.run(move || {
        let mut stream =
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
        request(&mut stream, addr, &path, true).map_err(|e| e.to_string())
    })
    .map_err(|e| e.0)?
}

/// One HTTP/1.1 request on `stream`; reads the response's `Content-Length` body, or up to the close when
/// there is none. Bounded: 5 s per read, 16 MiB of body.
fn request(
    stream: &mut TcpStream,
    addr: SocketAddr,
    path: &str,
    close: bool,
) -> std::io::Result<(u16, Vec<u8>)> {
    const MAX_BODY: usize = 16 << 20;
    let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let connection = if close { "close" } else { "keep-alive" };
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: {connection}\r\n\r\n"
    )?;
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if received.len() > 64 * 1024 {
            return Err(invalid("response head too long"));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(invalid("closed before the response head"));
        }
        received.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&received[..head_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid("no status code"))?;
    let length: Option<usize> = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    });
    let mut body = received.split_off(head_end);
    match length {
        Some(length) if length > MAX_BODY => return Err(invalid("response body too long")),
        Some(length) => {
            while body.len() < length {
                let n = stream.read(&mut chunk)?;
                if n == 0 {
                    return Err(invalid("closed inside the body"));
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(length);
        }
        None => {
            stream
                .take((MAX_BODY - body.len().min(MAX_BODY)) as u64)
                .read_to_end(&mut body)?;
        }
    }
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_connections_count_only_the_destination_reports() {
        let metrics = "\
# TYPE istio_tcp_connections_opened_total counter
istio_tcp_connections_opened_total{reporter=\"destination\",source_workload=\"client\"} 64
istio_tcp_connections_opened_total{reporter=\"destination\",source_workload=\"other\"} 2
istio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"server\"} 7
istio_tcp_connections_closed_total{reporter=\"destination\",source_workload=\"client\"} 60
";
        assert_eq!(destination_connections(metrics), 66.0);
        assert_eq!(destination_connections(""), 0.0);
    }

    #[test]
    fn hbone_connections_are_read_from_the_counting_rule() {
        let listing = "\
Chain INPUT (policy ACCEPT 9120 packets, 2373540 bytes)
    pkts      bytes target     prot opt in     out     source               destination
      17     1020 ACCEPT     6    --  *      *       0.0.0.0/0            0.0.0.0/0            tcp dpt:15008 flags:0x17/0x02
    4096   245760 ACCEPT     6    --  *      *       0.0.0.0/0            0.0.0.0/0            tcp dpt:15108 flags:0x17/0x02
";
        assert_eq!(syn_count(listing, 15008), Some(17));
        assert_eq!(syn_count(listing, 15108), Some(4096));
        // A port that is a prefix of a counted one has no rule of its own.
        assert_eq!(syn_count(listing, 1510), None);
        assert_eq!(syn_count("Chain INPUT (policy ACCEPT)\n", 15008), None);
    }

    #[test]
    fn the_capture_leaves_the_proxies_and_relays_own_ports_alone() {
        // Were one of these in the captured range, a proxy's or relay's own connection (to the next hop)
        // would be redirected back to a proxy: a loop.
        let (low, high) = CAPTURED_PORTS.split_once(':').unwrap();
        let captured = low.parse::<u16>().unwrap()..=high.parse::<u16>().unwrap();
        for port in [
            15001,
            15008,
            15012,
            15020,
            15021,
            CLIENT_RELAY_PORT,
            SERVER_RELAY_PORT,
        ] {
            assert!(!captured.contains(&port), "{port} is captured");
        }
        for port in [HTTP_PORT, IPERF_PORT, ECHO_PORT] {
            assert!(captured.contains(&port), "{port} is not captured");
        }
        assert_eq!(DataPath::Relay.redirect_port(), Some(CLIENT_RELAY_PORT));
        assert_eq!(DataPath::Direct.redirect_port(), None);
    }

    #[test]
    fn a_request_reads_exactly_the_content_length_body_on_a_kept_alive_connection() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = runtime.block_on(async { HttpServer::start(listener) }).unwrap();
        let addr = server.addr();
        let mut stream = TcpStream::connect(addr).unwrap();
        for _ in 0..3 {
            let (status, body) = request(&mut stream, addr, "/", false).unwrap();
            assert_eq!((status, body.len()), (200, BODY_BYTES));
        }
        let (status, body) = request(&mut stream, addr, "/missing", false).unwrap();
        assert_eq!((status, body.len()), (404, 0));
    }
}
