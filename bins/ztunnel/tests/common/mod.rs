//! The harness of ztunnel's end-to-end tests: network namespaces as nodes, the local control plane serving
//! xDS and certificates from YAML files, our `ztunnel` binary started in a namespace, applications (echo
//! servers), iptables capture, and bounded waits. Every wait has a deadline and every failure message
//! carries the proxies' logs.
//!
//! Every test runs its body in `mesh_test::netns::isolated`, a sandbox of its own (new user, network,
//! mount and PID namespaces), where it is root over what it creates without being root on the host, and
//! which takes everything it made along when it ends; [`sandboxed`] checks that before a namespace is
//! made. Needs util-linux, iproute2 and iptables (CI installs them); without them a test fails and says
//! why, it never passes by skipping.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code, clippy::unwrap_used, missing_docs, unreachable_pub)]

pub mod inpod;
pub mod wire;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_core::{DevCa, SpiffeId, TrustDomain};
use mesh_test::netns::{self, Netns};
use mesh_xds::ca::{Caller, StaticTokens};
use mesh_xds::server::{ClientAuth, Server, ServerConfig};

pub const CLIENT_IP: &str = "10.10.0.1";
pub const SERVER_IP: &str = "10.10.0.2";
/// The server application's port. Capture covers [`CAPTURED_PORTS`], so tests can add apps beside it.
pub const APP_PORT: u16 = 8080;
/// The destination ports the client node's capture redirects (iptables `--dport` range syntax).
pub const CAPTURED_PORTS: &str = "8000:8999";

/// Fails the test unless it runs in a sandbox of its own: the harness builds networks, which belong in one,
/// never on the host.
pub fn sandboxed() {
    assert!(
        mesh_test::sandbox::current().is_some(),
        "this test builds network namespaces outside a sandbox: wrap its body in mesh_test::netns::isolated(|| ..)"
    );
}

/// `spiffe://cluster.local/ns/default/sa/<sa>`.
pub fn id(sa: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://cluster.local/ns/default/sa/{sa}")).unwrap()
}

/// A directory removed at the end; `config/` inside it is what the control plane serves.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!("meshkit-e2e-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(path.join("config")).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Replaces `config/<name>` atomically (written beside it as a hidden file, which the control plane
    /// skips, then renamed), so the control plane never reads half a file.
    pub fn write_config(&self, name: &str, text: &str) {
        let staged = self.0.join("config").join(format!(".{name}.staged"));
        std::fs::write(&staged, text).unwrap();
        std::fs::rename(&staged, self.0.join("config").join(name)).unwrap();
    }

    pub fn remove_config(&self, name: &str) {
        std::fs::remove_file(self.0.join("config").join(name)).unwrap();
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A Kubernetes Pod as `kubectl get -o yaml` would show it, enrolled in ambient mode by label, labelled
/// `app: <name>`, with service account `<name>`, running on `node` at `ip`.
pub fn pod(name: &str, namespace: &str, ip: &str, node: &str) -> String {
    format!(
        r#"
---
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {namespace}
  labels: {{app: {name}, istio.io/dataplane-mode: ambient}}
spec:
  serviceAccountName: {name}
  nodeName: {node}
  containers:
  - name: app
    ports:
    - {{name: tcp, containerPort: {APP_PORT}}}
status:
  phase: Running
  podIP: {ip}
  podIPs: [{{ip: {ip}}}]
  conditions: [{{type: Ready, status: "True"}}]
"#
    )
}

/// A running ztunnel, killed if the test ends early; its log is kept for failure messages.
pub struct Ztunnel {
    child: Option<Child>,
    log: PathBuf,
}

impl Ztunnel {
    /// A dedicated-mode ztunnel for `workload` (namespace `default`, service account = name), on node
    /// `<workload>-node`.
    pub fn dedicated(node: &Netns, dir: &Path, workload: &str, token: &str) -> Ztunnel {
        Self::dedicated_with(node, dir, workload, token, &[])
    }

    /// [`Ztunnel::dedicated`] with extra (or overriding) environment variables.
    pub fn dedicated_with(
        node: &Netns,
        dir: &Path,
        workload: &str,
        token: &str,
        extra: &[(&str, String)],
    ) -> Ztunnel {
        let mut env = vec![
            ("PROXY_MODE", "dedicated".to_owned()),
            ("PROXY_WORKLOAD_INFO", format!("default/{workload}/{workload}")),
            ("NODE_NAME", format!("{workload}-node")),
        ];
        env.extend(extra.iter().cloned());
        Self::start(node, dir, workload, token, &env)
    }

    /// Starts the binary in `node`, talking to the control plane at `SERVER_IP:15012`; `env` comes last,
    /// so it overrides the defaults set here.
    pub fn start(node: &Netns, dir: &Path, name: &str, token: &str, env: &[(&str, String)]) -> Ztunnel {
        let token_file = dir.join(format!("{name}.token"));
        std::fs::write(&token_file, token).unwrap();
        let log = dir.join(format!("ztunnel-{name}.log"));
        let child = node
            .command(env!("CARGO_BIN_EXE_ztunnel"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("XDS_ADDRESS", format!("https://{SERVER_IP}:15012"))
            .env("XDS_ROOT_CA", dir.join("root.pem"))
            .env("AUTH_TOKEN", &token_file)
            .env("CLUSTER_ID", "Kubernetes")
            .env("POD_NAME", format!("ztunnel-{name}"))
            .env("IPV6_ENABLED", "false")
            .env("CONNECTION_TERMINATION_DEADLINE", "2s")
            .env("RUST_LOG", "info")
            // Plain log lines (tracing-subscriber colours them otherwise, even into a file).
            .env("NO_COLOR", "1")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Ztunnel {
            child: Some(child),
            log,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM (the process keeps running: see [`Ztunnel::wait_exit`]).
    pub fn signal_term(&self) {
        let child = self.child.as_ref().unwrap();
        netns::run(Command::new("kill").args(["-TERM", &child.id().to_string()])).unwrap();
    }

    /// Waits at most `within` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`Ztunnel::terminate`], and the log as it was when the process exited.
    pub fn terminate_keeping_log(self) -> (ExitStatus, String) {
        let log = self.log.clone();
        let status = self.terminate();
        (status, std::fs::read_to_string(log).unwrap_or_default())
    }

    /// Sends SIGTERM and waits (bounded) for the exit.
    pub fn terminate(mut self) -> ExitStatus {
        self.signal_term();
        match self.wait_exit(Duration::from_secs(15)) {
            Some(status) => status,
            None => panic!("ztunnel did not stop after SIGTERM:\n{}", self.log()),
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
pub fn http_get(node: &Netns, addr: &str, path: &str) -> Option<(u16, String)> {
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

/// The Prometheus text of the proxy whose metrics port is `ip:15020` in `node` (empty if unreachable).
pub fn metrics(node: &Netns, ip: &str) -> String {
    http_get(node, &format!("{ip}:15020"), "/metrics")
        .map(|(_, body)| body)
        .unwrap_or_default()
}

/// The sum of the samples of `name` whose labels include every `key="value"` of `labels`.
pub fn metric_sum(body: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    body.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .filter(|line| {
            labels
                .iter()
                .all(|(key, value)| line.contains(&format!(r#"{key}="{value}""#)))
        })
        .filter_map(|line| line.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// Whether some sample of `name` has every label of `labels`.
pub fn has_metric(body: &str, name: &str, labels: &[(&str, &str)]) -> bool {
    body.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .any(|line| {
            labels
                .iter()
                .all(|(key, value)| line.contains(&format!(r#"{key}="{value}""#)))
        })
}

/// Waits until `check` holds, at most `within`; returns how long it took.
pub fn eventually(
    within: Duration,
    what: &str,
    mut check: impl FnMut() -> bool,
    context: impl Fn() -> String,
) -> Duration {
    let start = Instant::now();
    let deadline = start + within;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// One line sent to `addr` from inside `node` and one line read back; `Ok(reply)` or why not.
pub fn round_trip_to(node: &Netns, addr: &str, message: &str) -> Result<String, String> {
    let addr: SocketAddr = addr.parse().unwrap();
    let message = message.to_owned();
    node.run(move || -> Result<String, String> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
        line_exchange(stream, &message)
    })
    .unwrap()
}

/// One application round trip from the client namespace to the server app.
pub fn round_trip(client: &Netns, message: &str) -> Result<String, String> {
    round_trip_to(client, &format!("{SERVER_IP}:{APP_PORT}"), message)
}

/// Writes `message` and a newline on `stream`, reads one line back (bounded by a read timeout).
pub fn line_exchange(stream: TcpStream, message: &str) -> Result<String, String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    writer
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
}

/// A long-lived connection to an echo app, for line round trips over the same TCP connection.
pub struct OpenConnection {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl OpenConnection {
    /// Connects from inside `node`.
    pub fn connect(node: &Netns, addr: &str) -> std::io::Result<OpenConnection> {
        let addr: SocketAddr = addr.parse().unwrap();
        let stream = node
            .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
            .unwrap()?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        Ok(OpenConnection {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    /// Sends a line and reads the reply line; an error when the connection is closed or fails.
    pub fn exchange(&mut self, message: &str) -> Result<String, String> {
        self.writer
            .write_all(format!("{message}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut reply = String::new();
        match self.reader.read_line(&mut reply) {
            Ok(0) => Err("closed".into()),
            Ok(_) => Ok(reply.trim_end().to_owned()),
            Err(error) => Err(error.to_string()),
        }
    }

    /// Whether the peer closed (or reset) the connection: a read returns end of file or a reset within
    /// the read timeout. Data, or nothing at all until the timeout, means it is still open.
    pub fn is_closed(&mut self) -> bool {
        let mut line = String::new();
        closed_by_peer(&self.reader.read_line(&mut line))
    }
}

/// Whether a blocking read's result says the peer ended the connection (end of file, or a reset and the
/// like), as opposed to data or a read timeout, which a connection that is still open gives.
pub fn closed_by_peer(read: &std::io::Result<usize>) -> bool {
    match read {
        Ok(n) => *n == 0,
        Err(error) => !matches!(
            error.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// The local control plane, running in a namespace on its own thread and runtime.
pub struct ControlPlane {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), netns::NetnsError>>>,
    last_error: Arc<Mutex<Option<String>>>,
}

impl ControlPlane {
    /// Serves `dir/config` on `SERVER_IP:15012` inside `node`, accepting `tokens`; writes its root to
    /// `dir/root.pem`.
    pub fn start(node: &Netns, dir: &Path, tokens: StaticTokens) -> ControlPlane {
        Self::start_at(node, &format!("{SERVER_IP}:15012"), dir, tokens)
    }

    /// [`ControlPlane::start`] listening on `listen` (`ip:port`, an address of `node`).
    pub fn start_at(node: &Netns, listen: &str, dir: &Path, tokens: StaticTokens) -> ControlPlane {
        let listen: SocketAddr = listen.parse().unwrap();
        let (root_tx, root_rx) = std::sync::mpsc::channel();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let config_dir = dir.join("config");
        let last_error = Arc::new(Mutex::new(None));
        let reported_error = last_error.clone();
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
                    config.listen = listen;
                    config.poll_interval = Duration::from_millis(100);
                    config.auth = ClientAuth::Authenticators(vec![Arc::new(tokens)]);
                    let server = Server::start(config, ca).await.unwrap();
                    root_tx.send(server.root_pem().to_owned()).unwrap();
                    // A rejected edit keeps the last good configuration: tests read the reason from here.
                    loop {
                        *reported_error.lock().unwrap() = server.last_error().map(|e| e.to_string());
                        tokio::select! {
                            _ = &mut stopped => break,
                            () = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                    }
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
            last_error,
        }
    }

    /// Why the control plane refused the current files, if it did.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap().clone()
    }

    pub fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap().unwrap();
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // On a failed test: stop serving, without waiting for it.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A server application in a namespace; it stops accepting when dropped.
pub struct App {
    stop: Arc<AtomicBool>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Serves `handler` (one thread per connection) on `addr` inside `node`.
pub fn serve(node: &Netns, addr: &str, handler: impl Fn(TcpStream) + Send + Sync + 'static) -> App {
    let addr = addr.to_owned();
    let listener = node.run(move || TcpListener::bind(addr)).unwrap().unwrap();
    // Polled, so that the thread notices `stop` and the listener does not outlive the test.
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let handler = Arc::new(handler);
    std::thread::spawn(move || {
        while !stopping.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(false).is_err() {
                        continue;
                    }
                    let handler = handler.clone();
                    std::thread::spawn(move || handler(stream));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    App { stop }
}

/// An echo server on `ip:port` inside `node` that prefixes each line with who it saw:
/// `echo <line> from <peer ip>`.
pub fn echo_app(node: &Netns, ip: &str, port: u16) -> App {
    serve(node, &format!("{ip}:{port}"), |stream| {
        let peer = stream.peer_addr().map(|p| p.ip().to_string()).unwrap_or_default();
        // Idle connections end eventually, so the thread does too.
        let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
        let Ok(reader) = stream.try_clone() else { return };
        let mut reader = BufReader::new(reader);
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
    })
}

/// Leaves ztunnel's own connections (marked 0x539) out of every nat OUTPUT rule that follows, as Istio's
/// capture rules do.
pub fn exempt_proxy_traffic(node: &Netns) {
    node.iptables(&[
        "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-m", "mark", "--mark", "0x539", "-j", "RETURN",
    ])
    .unwrap();
}

/// Redirects the application traffic of `node` to `destinations` (a CIDR) on [`CAPTURED_PORTS`] into
/// ztunnel's 15001, leaving ztunnel's own (marked) sockets alone, as Istio's dedicated-mode redirect does.
pub fn capture(node: &Netns, destinations: &str) {
    exempt_proxy_traffic(node);
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
        CAPTURED_PORTS,
        "-j",
        "REDIRECT",
        "--to-ports",
        "15001",
    ])
    .unwrap();
}

/// Waits for each proxy's readiness endpoint (`ip:15021` in its namespace) to answer 200.
pub fn wait_ready(nodes: &[(&Netns, &str)], logs: impl Fn() -> String) {
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

/// Names veth interfaces; unique within this process, which is enough because each end is created inside
/// a namespace this process owns.
static NEXT_LINK: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Joins `a` and `b` with a veth pair, addressing each end (`a_cidr`, `b_cidr`) and bringing both up.
///
/// Unlike `netns::connect`, which names the pair in the host's namespace with a per-process counter (so
/// two test processes running at once can both try to create `mka0`), the pair is created inside `a`
/// with its peer moved straight into `b`: no name is ever visible outside the test's namespaces.
pub fn link(a: &Netns, a_cidr: &str, b: &Netns, b_cidr: &str) {
    let n = NEXT_LINK.fetch_add(1, Ordering::Relaxed);
    let (a_if, b_if) = (format!("veth{n}a"), format!("veth{n}b"));
    a.ip(&[
        "link",
        "add",
        &a_if,
        "type",
        "veth",
        "peer",
        "name",
        &b_if,
        "netns",
        b.name(),
    ])
    .unwrap();
    a.ip(&["addr", "add", a_cidr, "dev", &a_if]).unwrap();
    b.ip(&["addr", "add", b_cidr, "dev", &b_if]).unwrap();
    a.ip(&["link", "set", &a_if, "up"]).unwrap();
    b.ip(&["link", "set", &b_if, "up"]).unwrap();
}

/// The first veth interface of `node`: its index and name.
pub fn veth(node: &Netns) -> (u32, String) {
    let output = node.ip(&["-o", "link", "show", "type", "veth"]).unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().next().expect("the namespace has no veth interface");
    let mut parts = line.split(':');
    let index = parts.next().unwrap().trim().parse().unwrap();
    let name = parts.next().unwrap().trim().split('@').next().unwrap().to_owned();
    (index, name)
}

/// How [`TwoNodes::start`] sets up the mesh.
pub struct Options {
    /// Environment for the client proxy, added to (or overriding) the defaults.
    pub client_env: Vec<(&'static str, String)>,
    /// Environment for the server proxy.
    pub server_env: Vec<(&'static str, String)>,
    /// Which destinations the client node captures (a CIDR), or none.
    pub capture: Option<&'static str>,
    /// Extra files for the control plane, present from the start.
    pub config: Vec<(&'static str, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            client_env: Vec::new(),
            server_env: Vec::new(),
            capture: Some("10.10.0.2/32"),
            config: Vec::new(),
        }
    }
}

/// Two nodes joined by a veth: `client` (10.10.0.1, Pod `default/client` and its dedicated ztunnel) and
/// `server` (10.10.0.2, Pod `default/server`, its dedicated ztunnel, the echo app on `APP_PORT`, and the
/// control plane). Fields drop in order: proxies, apps, control plane, namespaces, files.
pub struct TwoNodes {
    pub client_proxy: Ztunnel,
    pub server_proxy: Ztunnel,
    pub apps: Vec<App>,
    pub control_plane: ControlPlane,
    pub client: Netns,
    pub server: Netns,
    pub dir: TempDir,
}

impl TwoNodes {
    /// Both nodes, ready (both proxies answer readiness).
    pub fn start(options: Options) -> TwoNodes {
        sandboxed();
        let client = Netns::create("client").expect("network namespaces are required for this test");
        let server = Netns::create("server").unwrap();
        link(
            &client,
            &format!("{CLIENT_IP}/24"),
            &server,
            &format!("{SERVER_IP}/24"),
        );
        let dir = TempDir::new();
        dir.write_config(
            "pods.yaml",
            &format!(
                "{}{}",
                pod("client", "default", CLIENT_IP, "client-node"),
                pod("server", "default", SERVER_IP, "server-node")
            ),
        );
        for (name, text) in &options.config {
            dir.write_config(name, text);
        }
        let control_plane = ControlPlane::start(
            &server,
            dir.path(),
            StaticTokens::new()
                .with("client-token", Caller::new(id("client")))
                .with("server-token", Caller::new(id("server"))),
        );
        let apps = vec![echo_app(&server, SERVER_IP, APP_PORT)];
        if let Some(destinations) = options.capture {
            capture(&client, destinations);
        }
        let server_proxy =
            Ztunnel::dedicated_with(&server, dir.path(), "server", "server-token", &options.server_env);
        let client_proxy =
            Ztunnel::dedicated_with(&client, dir.path(), "client", "client-token", &options.client_env);
        let nodes = TwoNodes {
            client_proxy,
            server_proxy,
            apps,
            control_plane,
            client,
            server,
            dir,
        };
        wait_ready(&[(&nodes.client, CLIENT_IP), (&nodes.server, SERVER_IP)], || {
            nodes.logs()
        });
        nodes
    }

    /// Both proxies' logs and the control plane's last configuration error, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- client ztunnel ---\n{}\n--- server ztunnel ---\n{}\n--- control plane: {}",
            self.client_proxy.log(),
            self.server_proxy.log(),
            self.control_plane
                .last_error()
                .unwrap_or_else(|| "configuration accepted".into())
        )
    }

    pub fn client_metrics(&self) -> String {
        metrics(&self.client, CLIENT_IP)
    }

    pub fn server_metrics(&self) -> String {
        metrics(&self.server, SERVER_IP)
    }

    /// SIGTERM to both proxies, which must exit cleanly, then the control plane stops.
    pub fn shut_down(self) {
        let logs = self.logs();
        let TwoNodes {
            client_proxy,
            server_proxy,
            control_plane,
            ..
        } = self;
        assert!(client_proxy.terminate().success(), "{logs}");
        assert!(server_proxy.terminate().success(), "{logs}");
        control_plane.stop();
    }
}
