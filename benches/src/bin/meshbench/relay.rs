//! The "plain relay": the cheapest correct pair of user-space proxies on the mesh's path, measured in the
//! same run as the mesh so that `mesh / relay` isolates what our ztunnel's own code costs.
//!
//! Most of a proxy pair's time on a small machine is kernel work that any pair of user-space proxies must
//! do: two extra TCP legs, their wake-ups, their copies. The relay pair does exactly that and nothing
//! else: no TLS, no HTTP/2, no policy, no logging on the data path.
//!
//! - The **client relay** runs in the client node on `0.0.0.0:15101` (the capture REDIRECTs the
//!   application's traffic there instead of to 15001), reads where each connection was going with
//!   [`mesh_core::sys::original_destination`], connects to the server relay, writes a 6-byte header (the
//!   destination's IPv4 address and port, big endian) and copies both ways.
//! - The **server relay** runs in the server node on `10.10.0.2:15108`, reads the header (within
//!   [`HEADER_TIMEOUT`]), connects to that address and copies both ways.
//!
//! Both use a tokio multi-thread runtime with two workers (as our ztunnel does), `TCP_NODELAY` on every
//! socket and `tokio::io::copy_bidirectional_with_sizes` with [`COPY_BUFFER`] per direction (so bulk is
//! not held back by tokio's default 8 KiB), which passes each direction's end (half-close) on. Each
//! accepts at most [`MAX_CONNECTIONS`] connections at once and closes the ones beyond.
//!
//! They are processes of their own, so that their CPU time and memory are read from `/proc` the way the
//! proxies' are: meshbench runs its own binary again with a hidden subcommand
//! (`meshbench --relay-client LISTEN UPSTREAM`, `meshbench --relay-server LISTEN`), inside the node's
//! namespace, owned by a [`RelayProcess`] guard. A relay process also exits when its standard input
//! reaches its end, so it cannot outlive a meshbench that was killed without running its guards.

use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_test::netns::Netns;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::procfs::{self, Sample};
use crate::topology::ChildGuard;
use crate::{Error, Result};

/// The client relay's port in the client node (the capture's target on the relay path).
pub(crate) const CLIENT_RELAY_PORT: u16 = 15101;
/// The server relay's port in the server node.
pub(crate) const SERVER_RELAY_PORT: u16 = 15108;
/// The header's size: an IPv4 address and a port.
pub(crate) const HEADER_BYTES: usize = 6;
/// Connections a relay serves at once; later ones are closed at accept.
pub(crate) const MAX_CONNECTIONS: usize = 4096;
/// How long the server relay waits for a connection's header.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Each direction's copy buffer, allocated when a connection starts. 64 KiB stays under glibc's default
/// mmap threshold (128 KiB), so short connections reuse warm heap memory; with 256 KiB every
/// `Connection: close` request paid two fresh mappings (the relays' CPU per 1,000 such requests: 516 ms
/// in a 10 s run with 256 KiB, 377 ms in a quick run with 64 KiB).
const COPY_BUFFER: usize = 64 * 1024;
/// How long a relay's connection to its next hop may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a relay process may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a relay dropped a connection (or could not start). The data path never logs these; the tests and
/// the process's start-up read them.
#[derive(Debug)]
pub(crate) enum RelayError {
    /// The peer closed before sending the whole header; `received` bytes of it came.
    TruncatedHeader {
        /// Bytes of the header that arrived.
        received: usize,
    },
    /// The header did not arrive within [`HEADER_TIMEOUT`].
    HeaderTimeout,
    /// The destination is not an IPv4 address (the header carries only IPv4).
    NotIpv4(SocketAddr),
    /// The destination would connect the relay to itself (its own port, or an unspecified address):
    /// refused rather than looping until the connection limit.
    Loop(SocketAddr),
    /// The client relay got a connection the capture did not redirect (no original destination, or its
    /// own address as one).
    NotRedirected(String),
    /// The next hop did not accept within the connect timeout.
    ConnectTimeout(SocketAddr),
    /// A socket operation failed.
    Io(std::io::Error),
}

impl std::fmt::Display for RelayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RelayError::TruncatedHeader { received } => write!(
                f,
                "the connection closed after {received} of the header's {HEADER_BYTES} bytes"
            ),
            RelayError::HeaderTimeout => write!(f, "no header within {HEADER_TIMEOUT:?}"),
            RelayError::NotIpv4(addr) => write!(f, "{addr} is not an IPv4 destination"),
            RelayError::Loop(addr) => write!(f, "{addr} would connect the relay to itself"),
            RelayError::NotRedirected(why) => write!(f, "not a redirected connection: {why}"),
            RelayError::ConnectTimeout(addr) => {
                write!(f, "{addr} did not accept within {CONNECT_TIMEOUT:?}")
            }
            RelayError::Io(error) => write!(f, "{error}"),
        }
    }
}

impl std::error::Error for RelayError {}

impl From<std::io::Error> for RelayError {
    fn from(error: std::io::Error) -> Self {
        RelayError::Io(error)
    }
}

/// The header for `destination`: its address's four bytes, then its port, big endian.
pub(crate) fn encode_header(destination: SocketAddrV4) -> [u8; HEADER_BYTES] {
    let mut header = [0u8; HEADER_BYTES];
    header[..4].copy_from_slice(&destination.ip().octets());
    header[4..].copy_from_slice(&destination.port().to_be_bytes());
    header
}

/// The destination in `bytes`, which must hold at least a whole header (only its first
/// [`HEADER_BYTES`] are read).
pub(crate) fn decode_header(bytes: &[u8]) -> std::result::Result<SocketAddrV4, RelayError> {
    let header: &[u8; HEADER_BYTES] = bytes
        .get(..HEADER_BYTES)
        .and_then(|head| head.try_into().ok())
        .ok_or(RelayError::TruncatedHeader {
            received: bytes.len(),
        })?;
    let ip = Ipv4Addr::new(header[0], header[1], header[2], header[3]);
    let port = u16::from_be_bytes([header[4], header[5]]);
    Ok(SocketAddrV4::new(ip, port))
}

/// Reads exactly one header from `stream`, consuming nothing after it.
async fn read_header(stream: &mut TcpStream) -> std::result::Result<SocketAddrV4, RelayError> {
    let mut header = [0u8; HEADER_BYTES];
    let mut received = 0;
    while received < HEADER_BYTES {
        let n = stream.read(&mut header[received..]).await?;
        if n == 0 {
            return Err(RelayError::TruncatedHeader { received });
        }
        received += n;
    }
    decode_header(&header)
}

/// Where the client relay sends each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Destination {
    /// Where the connection was going before the capture redirected it (the benchmark).
    Original,
    /// Always this address (tests, which have no capture).
    Fixed(SocketAddrV4),
}

/// Accepts connections on `listener` and runs `serve` on each, at most [`MAX_CONNECTIONS`] at once.
/// Returns only if the listener fails for good (never, in practice).
async fn accept_loop<F, Fut>(listener: TcpListener, serve: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<(), RelayError>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of descriptors, or an aborted handshake: back off briefly, keep serving.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Over the limit: dropping the stream closes it.
            continue;
        };
        let connection = serve(stream);
        tokio::spawn(async move {
            // No logging on the data path: a failed connection only ends itself.
            let _ = connection.await;
            drop(permit);
        });
    }
}

/// The client relay: each accepted connection goes to `upstream` (the server relay) behind a header
/// naming `destination`.
pub(crate) async fn serve_client(listener: TcpListener, upstream: SocketAddr, destination: Destination) {
    accept_loop(listener, move |stream| {
        client_connection(stream, upstream, destination)
    })
    .await;
}

/// The server relay: each accepted connection goes where its header says.
pub(crate) async fn serve_server(listener: TcpListener) {
    accept_loop(listener, server_connection).await;
}

/// Connects to `addr` within the connect timeout, with `TCP_NODELAY`.
async fn connect(addr: SocketAddr) -> std::result::Result<TcpStream, RelayError> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| RelayError::ConnectTimeout(addr))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Where a redirected connection was going; refuses one that was not redirected, which would otherwise
/// be sent back to this relay.
fn redirected_destination(stream: &TcpStream) -> std::result::Result<SocketAddrV4, RelayError> {
    let local = stream.local_addr()?;
    let original =
        mesh_core::sys::original_destination(stream).map_err(|e| RelayError::NotRedirected(e.to_string()))?;
    // Linux answers a tracked but not rewritten connection with its own local address.
    if original == local || original.port() == local.port() {
        return Err(RelayError::NotRedirected(format!(
            "its original destination is this relay ({original})"
        )));
    }
    match original {
        SocketAddr::V4(v4) => Ok(v4),
        SocketAddr::V6(_) => Err(RelayError::NotIpv4(original)),
    }
}

async fn client_connection(
    mut inbound: TcpStream,
    upstream: SocketAddr,
    destination: Destination,
) -> std::result::Result<(), RelayError> {
    inbound.set_nodelay(true)?;
    let destination = match destination {
        Destination::Original => redirected_destination(&inbound)?,
        Destination::Fixed(addr) => addr,
    };
    let mut outbound = connect(upstream).await?;
    outbound.write_all(&encode_header(destination)).await?;
    tokio::io::copy_bidirectional_with_sizes(&mut inbound, &mut outbound, COPY_BUFFER, COPY_BUFFER).await?;
    Ok(())
}

async fn server_connection(mut inbound: TcpStream) -> std::result::Result<(), RelayError> {
    inbound.set_nodelay(true)?;
    let destination = tokio::time::timeout(HEADER_TIMEOUT, read_header(&mut inbound))
        .await
        .map_err(|_| RelayError::HeaderTimeout)??;
    let local = inbound.local_addr()?;
    let destination = SocketAddr::V4(destination);
    // Any address of this host on our port, or the unspecified address (which reaches this host), is
    // this relay again.
    if destination.port() == local.port() || destination.ip().is_unspecified() {
        return Err(RelayError::Loop(destination));
    }
    let mut outbound = connect(destination).await?;
    tokio::io::copy_bidirectional_with_sizes(&mut inbound, &mut outbound, COPY_BUFFER, COPY_BUFFER).await?;
    Ok(())
}

/// The hidden subcommands, if `args` (without the program name) starts with one: `--relay-client LISTEN
/// UPSTREAM [DESTINATION]` (without DESTINATION, each connection's original destination; with it, always
/// DESTINATION, for trying the pair by hand without a capture) or `--relay-server LISTEN`. Runs the
/// relay until it is killed or its standard input ends, and returns the process's exit code.
pub(crate) fn main_if_relay(args: &[String]) -> Option<ExitCode> {
    if !args
        .first()
        .is_some_and(|flag| flag == "--relay-client" || flag == "--relay-server")
    {
        return None;
    }
    let role = match parse_role(args) {
        Ok(role) => role,
        Err(why) => {
            eprintln!("meshbench relay: {why}");
            return Some(ExitCode::from(2));
        }
    };
    Some(match run_relay(role) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("meshbench relay: {why}");
            ExitCode::FAILURE
        }
    })
}

/// The relay a hidden subcommand asks for.
fn parse_role(args: &[String]) -> std::result::Result<Role, String> {
    let addr = |text: &String| {
        text.parse::<SocketAddr>()
            .map_err(|e| format!("{text:?} is not an address: {e}"))
    };
    match args {
        [flag, listen, upstream] if flag == "--relay-client" => Ok(Role::Client(
            addr(listen)?,
            addr(upstream)?,
            Destination::Original,
        )),
        [flag, listen, upstream, destination] if flag == "--relay-client" => {
            let SocketAddr::V4(destination) = addr(destination)? else {
                return Err(format!(
                    "{destination:?}: the header carries IPv4 destinations only"
                ));
            };
            Ok(Role::Client(
                addr(listen)?,
                addr(upstream)?,
                Destination::Fixed(destination),
            ))
        }
        [flag, listen] if flag == "--relay-server" => Ok(Role::Server(addr(listen)?)),
        _ => Err("usage: --relay-client LISTEN UPSTREAM [DESTINATION] | --relay-server LISTEN".into()),
    }
}

/// Which relay a process runs.
#[derive(Debug, Clone, Copy)]
enum Role {
    /// Listen, upstream (the server relay), where to send each connection.
    Client(SocketAddr, SocketAddr, Destination),
    /// Listen.
    Server(SocketAddr),
}

fn run_relay(role: Role) -> std::result::Result<(), String> {
    // Ends the process when meshbench goes: its end of our standard input closes with it, even when it
    // is killed with no chance to kill us.
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async move {
        let listen = match role {
            Role::Client(listen, ..) | Role::Server(listen) => listen,
        };
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        match role {
            Role::Client(_, upstream, destination) => serve_client(listener, upstream, destination).await,
            Role::Server(_) => serve_server(listener).await,
        }
        Err("the listener failed".to_owned())
    })
}

/// A relay process in a node, killed when dropped.
#[derive(Debug)]
pub(crate) struct RelayProcess {
    /// `client relay` or `server relay`.
    pub(crate) name: &'static str,
    child: ChildGuard,
    log: PathBuf,
    probe: SocketAddr,
}

impl RelayProcess {
    /// Starts the client relay in `node`, listening on every address's [`CLIENT_RELAY_PORT`] (the
    /// REDIRECT target of locally sent packets is 127.0.0.1) and relaying to `upstream`.
    pub(crate) fn start_client(
        node: &Netns,
        dir: &Path,
        node_ip: &str,
        upstream: SocketAddr,
    ) -> Result<RelayProcess> {
        let listen = SocketAddr::from(([0, 0, 0, 0], CLIENT_RELAY_PORT));
        let probe = parse_ip_port(node_ip, CLIENT_RELAY_PORT)?;
        Self::start(
            node,
            dir,
            "client relay",
            &["--relay-client".into(), listen.to_string(), upstream.to_string()],
            probe,
        )
    }

    /// Starts the server relay in `node` on `node_ip`:[`SERVER_RELAY_PORT`].
    pub(crate) fn start_server(node: &Netns, dir: &Path, node_ip: &str) -> Result<RelayProcess> {
        let listen = parse_ip_port(node_ip, SERVER_RELAY_PORT)?;
        Self::start(
            node,
            dir,
            "server relay",
            &["--relay-server".into(), listen.to_string()],
            listen,
        )
    }

    fn start(
        node: &Netns,
        dir: &Path,
        name: &'static str,
        args: &[String],
        probe: SocketAddr,
    ) -> Result<RelayProcess> {
        let exe = std::env::current_exe().map_err(|e| {
            Error::Topology(format!("cannot find meshbench's own binary for the {name}: {e}"))
        })?;
        let log = dir.join(format!("{}.log", name.replace(' ', "-")));
        let log_file =
            std::fs::File::create(&log).map_err(|e| Error::Io(format!("creating {}", log.display()), e))?;
        let mut command = node.command(&exe.to_string_lossy());
        command
            .args(args)
            // Held open by the guard's `Child` until it is dropped; see the module doc.
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log_file);
        let child = ChildGuard::spawn(&mut command, &format!("the {name}"))?;
        Ok(RelayProcess {
            name,
            child,
            log,
            probe,
        })
    }

    /// Waits until it accepts connections (probed from inside `node`, the relay's own node), and checks
    /// that its pid is meshbench's binary, whose `/proc` figures are the ones reported.
    pub(crate) async fn wait_until_accepting(&mut self, node: &Netns) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let probe = self.probe;
        loop {
            self.check_running()?;
            // The probe sends nothing: the client relay refuses it (it was not redirected), the server
            // relay drops it (no header). Either way the connection was accepted.
            let accepted = node
                .run(move || StdTcpStream::connect_timeout(&probe, Duration::from_secs(1)).is_ok())
                .map_err(Error::from)?;
            if accepted {
                break;
            }
            if Instant::now() >= deadline {
                return Err(Error::Topology(format!(
                    "the {} did not accept on {probe} within {START_TIMEOUT:?}\n{}",
                    self.name,
                    self.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let exe = std::fs::read_link(format!("/proc/{}/exe", self.pid())).ok();
        let expected = std::env::current_exe()
            .ok()
            .and_then(|p| std::fs::canonicalize(p).ok());
        if exe.is_none() || exe != expected {
            return Err(Error::Topology(format!(
                "process {} is {exe:?}, not meshbench ({expected:?}): its /proc figures would not be the {}'s",
                self.pid(),
                self.name
            )));
        }
        Ok(())
    }

    /// The process id whose `/proc` entries are read.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its CPU time and memory now.
    pub(crate) fn sample(&self) -> Result<Sample> {
        procfs::sample(self.pid())
    }

    /// Fails if the process has exited.
    pub(crate) fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(Error::Topology(format!(
                "the {} exited ({status})\n{}",
                self.name,
                self.log_tail()
            ))),
            _ => Ok(()),
        }
    }

    /// Its standard error (empty unless it failed to start), for error messages.
    pub(crate) fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        format!("--- last lines of the {}'s standard error ---\n{tail}", self.name)
    }
}

/// `ip:port` from an address constant.
fn parse_ip_port(ip: &str, port: u16) -> Result<SocketAddr> {
    let ip: IpAddr = ip
        .parse()
        .map_err(|e| Error::Topology(format!("{ip} is not an IP address: {e}")))?;
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_in_network_order() {
        let addr = SocketAddrV4::new(Ipv4Addr::new(10, 10, 0, 2), 8080);
        let header = encode_header(addr);
        assert_eq!(header, [10, 10, 0, 2, 0x1f, 0x90]);
        assert_eq!(decode_header(&header).unwrap(), addr);
        // Bytes after the header are the application's, not the header's.
        let mut longer = header.to_vec();
        longer.extend_from_slice(b"GET /");
        assert_eq!(decode_header(&longer).unwrap(), addr);
        let edge = SocketAddrV4::new(Ipv4Addr::new(255, 0, 0, 1), 65535);
        assert_eq!(decode_header(&encode_header(edge)).unwrap(), edge);
    }

    #[test]
    fn a_truncated_header_is_a_typed_error() {
        for received in 0..HEADER_BYTES {
            match decode_header(&[7u8; HEADER_BYTES][..received]) {
                Err(RelayError::TruncatedHeader { received: r }) => assert_eq!(r, received),
                other => panic!("{received} bytes: {other:?}"),
            }
        }
        let message = RelayError::TruncatedHeader { received: 3 }.to_string();
        assert!(message.contains("3 of the header's 6 bytes"), "{message}");
    }

    #[test]
    fn hidden_subcommands_are_recognised_only_with_their_flag() {
        assert!(main_if_relay(&["--quick".into()]).is_none());
        assert!(main_if_relay(&[]).is_none());
        let args = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(matches!(
            parse_role(&args(&["--relay-client", "0.0.0.0:15101", "10.10.0.2:15108"])),
            Ok(Role::Client(listen, upstream, Destination::Original))
                if listen.port() == 15101 && upstream == "10.10.0.2:15108".parse().unwrap()
        ));
        assert!(matches!(
            parse_role(&args(&["--relay-client", "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"])),
            Ok(Role::Client(_, _, Destination::Fixed(destination))) if destination.port() == 3
        ));
        assert!(
            parse_role(&args(&[
                "--relay-client",
                "127.0.0.1:1",
                "127.0.0.1:2",
                "[::1]:3"
            ]))
            .unwrap_err()
            .contains("IPv4")
        );
        assert!(matches!(
            parse_role(&args(&["--relay-server", "10.10.0.2:15108"])),
            Ok(Role::Server(listen)) if listen.port() == 15108
        ));
        // Wrong arity or a bad address is a usage error (exit 2), not a relay started with defaults.
        assert!(
            parse_role(&args(&["--relay-server"]))
                .unwrap_err()
                .contains("usage")
        );
        assert!(
            parse_role(&args(&["--relay-server", "nowhere"]))
                .unwrap_err()
                .contains("nowhere")
        );
        assert_eq!(
            main_if_relay(&args(&["--relay-client", "x"])),
            Some(ExitCode::from(2))
        );
    }

    /// A server that reads everything until the client's end, then answers with how many bytes it got
    /// followed by the bytes reversed, and closes.
    async fn counting_server(listener: TcpListener) {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut received = Vec::new();
        stream.read_to_end(&mut received).await.unwrap();
        let mut answer = format!("{}:", received.len()).into_bytes();
        answer.extend(received.iter().rev());
        stream.write_all(&answer).await.unwrap();
        stream.shutdown().await.unwrap();
    }

    async fn listen() -> (TcpListener, SocketAddrV4) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
            unreachable!("bound to an IPv4 address");
        };
        (listener, addr)
    }

    /// Reads until the end, bounded in time so a broken relay fails the test instead of hanging it.
    async fn read_all(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
            .await
            .expect("the relay neither answered nor closed within 10 s")?;
        Ok(out)
    }

    /// Whether the relay closed `stream` (cleanly or with a reset) without sending a byte.
    async fn closed_without_data(stream: &mut TcpStream) -> bool {
        match read_all(stream).await {
            Ok(data) => data.is_empty(),
            Err(error) => error.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_pair_carries_bytes_both_ways_and_each_direction_s_end() {
        let (upstream, upstream_addr) = listen().await;
        let (server_listener, server_addr) = listen().await;
        let (client_listener, client_addr) = listen().await;
        let origin = tokio::spawn(counting_server(upstream));
        let server = tokio::spawn(serve_server(server_listener));
        let client = tokio::spawn(serve_client(
            client_listener,
            SocketAddr::V4(server_addr),
            Destination::Fixed(upstream_addr),
        ));

        let mut stream = TcpStream::connect(client_addr).await.unwrap();
        // 1 MiB, more than any socket buffer, so the relays really copy in pieces.
        let sent: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        stream.write_all(&sent).await.unwrap();
        // Half-close: the server only answers once it has seen our end through both relays.
        stream.shutdown().await.unwrap();
        let answer = read_all(&mut stream).await.unwrap();
        let (count, reversed) = answer.split_at(answer.iter().position(|b| *b == b':').unwrap() + 1);
        assert_eq!(count, format!("{}:", sent.len()).as_bytes());
        assert!(reversed.iter().eq(sent.iter().rev()), "the answer's bytes differ");
        tokio::time::timeout(Duration::from_secs(10), origin)
            .await
            .unwrap()
            .unwrap();
        client.abort();
        server.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_server_relay_drops_truncated_headers_and_loops() {
        let (server_listener, server_addr) = listen().await;
        let server = tokio::spawn(serve_server(server_listener));

        // Half a header, then our end: the relay closes without connecting anywhere.
        let mut truncated = TcpStream::connect(server_addr).await.unwrap();
        truncated.write_all(&[127, 0, 0]).await.unwrap();
        truncated.shutdown().await.unwrap();
        assert!(closed_without_data(&mut truncated).await);

        // A header naming the relay itself: refused, not relayed to itself.
        let mut looping = TcpStream::connect(server_addr).await.unwrap();
        looping.write_all(&encode_header(server_addr)).await.unwrap();
        looping.write_all(b"hello").await.unwrap();
        assert!(closed_without_data(&mut looping).await);

        // The relay still serves after refusing both.
        let (upstream, upstream_addr) = listen().await;
        let origin = tokio::spawn(counting_server(upstream));
        let mut good = TcpStream::connect(server_addr).await.unwrap();
        good.write_all(&encode_header(upstream_addr)).await.unwrap();
        good.write_all(b"abc").await.unwrap();
        good.shutdown().await.unwrap();
        assert_eq!(read_all(&mut good).await.unwrap(), b"3:cba");
        tokio::time::timeout(Duration::from_secs(10), origin)
            .await
            .unwrap()
            .unwrap();
        server.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_client_relay_refuses_a_connection_that_was_not_redirected() {
        let (server_listener, server_addr) = listen().await;
        let (client_listener, client_addr) = listen().await;
        let server = tokio::spawn(serve_server(server_listener));
        let client = tokio::spawn(serve_client(
            client_listener,
            SocketAddr::V4(server_addr),
            Destination::Original,
        ));
        // No capture here: the kernel has no original destination other than the relay itself, so the
        // relay closes the connection rather than sending it back to itself.
        let mut stream = TcpStream::connect(client_addr).await.unwrap();
        let _ = stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
        assert!(closed_without_data(&mut stream).await);
        client.abort();
        server.abort();
    }
}
