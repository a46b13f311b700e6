//! Soak (issue 7): a node-proxy pipeline under continuous, checksummed traffic while certificates rotate
//! every few seconds, the control plane restarts and peers reset connections. No byte of a connection that
//! was not deliberately cut may be lost or corrupted, and nothing may leak: file descriptors and tasks
//! return to their baseline once the proxies are gone.
//!
//! Everything is assembled in-process from the library, on loopback, as `bins/ztunnel` composes it:
//! - the local control plane (`mesh_xds::server::Server`: delta ADS and the Istio CA over TLS) serving a
//!   directory of ztunnel-style YAML, and restarted on the same address a few times;
//! - a client "node" (`node-a`): its own ADS client -> `ProxyState`, a `CachingCertProvider` over the
//!   control plane's CA issuing 5-second certificates (renewed at half life), an `HboneConnector`, and
//!   `Outbound` behind two `serve_tcp` listeners whose original destination is injected (the server
//!   workload's address, and the service VIP);
//! - a server "node" (`node-b`): its own ADS client and certificates, an `HboneAcceptor` with `Inbound`
//!   inside, on the server workload's IP (the test's stand-in for port 15008; the outbound side is told the
//!   port); its TLS configuration wraps the real SPIFFE verifier and certificate resolver to record which
//!   leaf certificates each handshake presented;
//! - an upstream app that checks every byte against the connection's seeded pseudo-random stream, echoes
//!   it, and ends with a trailer (byte count and checksum) after the client's half-close.
//!
//! Workloads: `client` 127.0.0.11 (node-a), `server` 127.0.0.21 (node-b), service `echo` VIP 127.0.0.30.
//!
//! Traffic: 16 long-lived connections paced at a steady rate for the whole soak; bursts of short
//! connections to the VIP; and designated victims, reset either by the client (`SO_LINGER` 0) or by the
//! upstream app (which aborts mid-stream). The client pool takes at most 6 streams per HTTP/2 connection
//! and closes idle ones after 250 ms, so one pooled connection carries long-lived streams beside the
//! victims, while short connections keep opening new ones: those handshakes present the current
//! certificates.
//!
//! Duration: `MESHKIT_SOAK_SECS` (default 90). The long run is
//! `MESHKIT_SOAK_SECS=3600 cargo test -p mesh-proxy --release --test soak -- --nocapture`, which also
//! prints the summary.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::cert::CachingCertConfig;
use mesh_core::drain::{self, DrainTrigger, DrainWatch};
use mesh_core::model::SnapshotPublisher;
use mesh_core::{CachingCertProvider, CertWatch, DevCa, SpiffeId, TrustDomain, tls};
use mesh_hbone::{HboneAcceptor, HboneConfig, HboneConnector};
use mesh_policy::L4PolicySet;
use mesh_proxy::conntrack::ConnectionTracker;
use mesh_proxy::inbound::{Inbound, InboundConfig, ServedWorkloads};
use mesh_proxy::listener::{ListenerConfig, serve_tcp};
use mesh_proxy::outbound::{Outbound, OutboundConfig, SourceLookup};
use mesh_proxy::state::ProxyState;
use mesh_proxy::telemetry::{ConnectionObserver, ConnectionOutcome, ConnectionRecord, Observers};
use mesh_xds::client::{AdsClientBuilder, AdsHandle, ZtunnelNode, publish_snapshots};
use mesh_xds::server::{ClientAuth, Server, ServerConfig};
use mesh_xds::transport::{CallCredentials, GrpcClientConfig, TokenSource, connect_lazy};
use mesh_xds::{IstioCaConfig, IstioCaSigner, XdsAddress, XdsAuthorization};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

// ---- Settings --------------------------------------------------------------------------------------

const CLIENT_IP: &str = "127.0.0.11";
const SERVER_IP: &str = "127.0.0.21";
const VIP: &str = "127.0.0.30";
const NODE_A: &str = "node-a";
const NODE_B: &str = "node-b";

/// The soak's length when `MESHKIT_SOAK_SECS` is not set: long enough for ~35 rotations and 3 restarts,
/// short enough for the CI test budget.
const DEFAULT_SECS: u64 = 90;
/// Below this there is no room for the fault schedule.
const MIN_SECS: u64 = 20;
/// Workload certificate lifetime: renewed at half life, so each side rotates every 2 to 2.5 s.
const CERT_LIFETIME: Duration = Duration::from_secs(5);
const LONG_CONNECTIONS: usize = 16;
/// Bytes per second each long connection sends (and gets echoed): steady load that leaves CPU for the
/// faults on a 2-core machine in a debug build.
const LONG_RATE: f64 = 128.0 * 1024.0;
const MAX_CHUNK: usize = 32 * 1024;
const SHORT_BURST: u64 = 4;
const SHORT_MAX_BYTES: u64 = 8 * 1024;
/// Client pool limits: 16 long streams fill two connections and leave 2 free slots on the third (shared
/// with victims and short connections); the rest churn.
const POOL_STREAMS: usize = 6;
const POOL_IDLE: Duration = Duration::from_millis(250);
const CONTROL_PLANE_DOWNTIME: Duration = Duration::from_millis(300);
/// Any single read or write, and anything that waits on the proxies, gives up after this: a stall is a
/// failure, never a hang.
const IO_LIMIT: Duration = Duration::from_secs(30);
/// Setup steps (first xDS push, first certificate) and teardown waits.
const STEP_LIMIT: Duration = Duration::from_secs(30);

/// Pseudo-random connection seeds: distinct ranges per kind, so a failure message says which it was.
const LONG_SEEDS: u64 = 0x1000_0000;
const SHORT_SEEDS: u64 = 0x2000_0000;
const VICTIM_SEEDS: u64 = 0x3000_0000;
const PROBE_SEEDS: u64 = 0x4000_0000;

fn soak_duration() -> Duration {
    let secs = match std::env::var("MESHKIT_SOAK_SECS") {
        Err(_) => DEFAULT_SECS,
        Ok(value) => value
            .trim()
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("MESHKIT_SOAK_SECS must be a whole number of seconds, got {value:?}")),
    };
    assert!(
        secs >= MIN_SECS,
        "MESHKIT_SOAK_SECS must be at least {MIN_SECS} (the fault schedule needs room), got {secs}"
    );
    Duration::from_secs(secs)
}

// ---- The byte stream every connection carries -------------------------------------------------------

/// A connection's payload: splitmix64 output from the connection's seed, so both ends can regenerate
/// and check every byte without sharing state.
struct Pattern {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    fn new(seed: u64) -> Pattern {
        Pattern {
            state: seed,
            word: [0; 8],
            used: 8,
        }
    }

    fn next_byte(&mut self) -> u8 {
        if self.used == 8 {
            self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            self.word = (z ^ (z >> 31)).to_le_bytes();
            self.used = 0;
        }
        let byte = self.word[self.used];
        self.used += 1;
        byte
    }

    fn fill(&mut self, out: &mut [u8]) {
        for byte in out {
            *byte = self.next_byte();
        }
    }

    /// Where `data` first differs from the stream, if it does.
    fn mismatch(&mut self, data: &[u8]) -> Option<usize> {
        data.iter().position(|&byte| byte != self.next_byte())
    }
}

/// FNV-1a over a connection's payload, reported by the upstream in its trailer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Checksum(u64);

impl Checksum {
    fn new() -> Checksum {
        Checksum(0xCBF2_9CE4_8422_2325)
    }

    fn update(&mut self, data: &[u8]) {
        for &byte in data {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01B3);
        }
    }
}

const MAGIC: [u8; 8] = *b"MKSOAK01";
const HEADER_LEN: usize = 32;
/// Byte count and checksum, sent by the upstream after the client's half-close.
const TRAILER_LEN: usize = 16;

/// What the upstream app is asked to do with a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Check, echo, and answer the half-close with the trailer.
    Echo,
    /// Echo, then abort (RST) once this many bytes have arrived.
    UpstreamAborts { after: u64 },
    /// The client will reset the connection: its end is expected, and how it arrived is counted.
    ClientResets,
}

fn encode_header(mode: Mode, seed: u64) -> [u8; HEADER_LEN] {
    let (code, after) = match mode {
        Mode::Echo => (0u64, 0),
        Mode::UpstreamAborts { after } => (1, after),
        Mode::ClientResets => (2, 0),
    };
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(&MAGIC);
    header[8..16].copy_from_slice(&code.to_be_bytes());
    header[16..24].copy_from_slice(&seed.to_be_bytes());
    header[24..].copy_from_slice(&after.to_be_bytes());
    header
}

fn decode_header(header: &[u8; HEADER_LEN]) -> Option<(Mode, u64)> {
    let word = |at: usize| u64::from_be_bytes(header[at..at + 8].try_into().unwrap());
    if header[..8] != MAGIC {
        return None;
    }
    let mode = match word(8) {
        0 => Mode::Echo,
        1 => Mode::UpstreamAborts { after: word(24) },
        2 => Mode::ClientResets,
        _ => return None,
    };
    Some((mode, word(16)))
}

// ---- What the soak saw ------------------------------------------------------------------------------

/// Counters and failures from every part of the soak.
#[derive(Debug, Default)]
struct Report {
    long_clean: AtomicU64,
    long_bytes: AtomicU64,
    short_clean: AtomicU64,
    short_bytes: AtomicU64,
    probes_clean: AtomicU64,
    client_resets: AtomicU64,
    upstream_aborts_seen: AtomicU64,
    /// ... of which the client saw as a plain EOF (FIN) rather than a reset.
    upstream_aborts_seen_as_fin: AtomicU64,
    victims_ended_by_stop: AtomicU64,
    app_clean: AtomicU64,
    app_bytes: AtomicU64,
    app_aborted: AtomicU64,
    app_reset_as_rst: AtomicU64,
    app_reset_as_fin: AtomicU64,
    /// Client addresses of the designated victims: the only connections the proxies may report failed.
    victims: Mutex<HashSet<SocketAddr>>,
    /// How many victims were started (a client port can come round again, so not the set's size).
    victims_started: AtomicU64,
    failures: Mutex<Vec<String>>,
    failure_count: AtomicU64,
    corruptions: AtomicU64,
}

impl Report {
    fn fail(&self, message: impl Into<String>) {
        self.failure_count.fetch_add(1, Ordering::Relaxed);
        let mut failures = self.failures.lock().unwrap();
        // The first ones say what went wrong; a flood only needs counting.
        if failures.len() < 50 {
            failures.push(message.into());
        }
    }

    fn corrupt(&self, message: impl Into<String>) {
        self.corruptions.fetch_add(1, Ordering::Relaxed);
        self.fail(message);
    }
}

fn count(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// The proxies' own view: every connection they report, and the failed ones with the client address.
#[derive(Debug, Default)]
struct ProxyLog {
    opened: AtomicU64,
    closed: AtomicU64,
    errors: Mutex<Vec<(SocketAddr, String)>>,
}

impl ConnectionObserver for ProxyLog {
    fn opened(&self, _connection: &Arc<ConnectionRecord>) {
        bump(&self.opened, 1);
    }

    fn closed(&self, connection: &Arc<ConnectionRecord>, outcome: &ConnectionOutcome) {
        bump(&self.closed, 1);
        if let Some(error) = &outcome.error {
            self.errors
                .lock()
                .unwrap()
                .push((connection.source_addr, error.clone()));
        }
    }
}

/// The leaf certificates the server side's TLS handshakes involved.
#[derive(Debug, Default)]
struct Handshakes {
    count: AtomicU64,
    client_leaves: Mutex<HashSet<Vec<u8>>>,
    server_leaves: Mutex<HashSet<Vec<u8>>>,
}

/// The real SPIFFE client verifier, noting each client leaf it accepts.
#[derive(Debug)]
struct RecordingVerifier {
    inner: tls::ClientCertVerifier,
    seen: Arc<Handshakes>,
}

impl ClientCertVerifier for RecordingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verdict = self.inner.verify_client_cert(end_entity, intermediates, now);
        if verdict.is_ok() {
            bump(&self.seen.count, 1);
            self.seen
                .client_leaves
                .lock()
                .unwrap()
                .insert(end_entity.to_vec());
        }
        verdict
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

/// The real certificate resolver (the rotating `CertWatch`), noting each leaf it presents.
#[derive(Debug)]
struct RecordingResolver {
    inner: Arc<dyn ResolvesServerCert>,
    seen: Arc<Handshakes>,
}

impl ResolvesServerCert for RecordingResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let key = self.inner.resolve(hello)?;
        if let Some(leaf) = key.cert.first() {
            self.seen.server_leaves.lock().unwrap().insert(leaf.to_vec());
        }
        Some(key)
    }
}

/// `tls::server_config`, with its verifier and resolver wrapped to record leaves (rustls does not let a
/// built configuration's verifier be replaced, so it is rebuilt with the same settings).
fn recording_server_tls(
    cert: CertWatch,
    trust_domain: TrustDomain,
    seen: Arc<Handshakes>,
) -> Arc<rustls::ServerConfig> {
    let base = tls::server_config(cert.clone(), vec![trust_domain.clone()]).unwrap();
    let verifier = Arc::new(RecordingVerifier {
        inner: tls::ClientCertVerifier::new(cert, vec![trust_domain]),
        seen: seen.clone(),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(RecordingResolver {
            inner: base.cert_resolver.clone(),
            seen,
        }));
    config.alpn_protocols = base.alpn_protocols.clone();
    config.session_storage = base.session_storage.clone();
    config.send_tls13_tickets = base.send_tls13_tickets;
    Arc::new(config)
}

// ---- The upstream app -------------------------------------------------------------------------------

/// Accepts until `drain`; each connection is checked and echoed by [`app_connection`].
async fn serve_app(listener: TcpListener, report: Arc<Report>, drain: DrainWatch) {
    loop {
        tokio::select! {
            () = drain.signaled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(app_connection(stream, report.clone()));
                }
                Err(error) => {
                    report.fail(format!("upstream app: accept failed: {error}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

async fn app_connection(mut stream: TcpStream, report: Arc<Report>) {
    let mut header = [0u8; HEADER_LEN];
    let (mode, seed) = match within(IO_LIMIT, stream.read_exact(&mut header)).await {
        Ok(_) => match decode_header(&header) {
            Some(decoded) => decoded,
            None => return report.corrupt("upstream app: a connection began with a corrupted header"),
        },
        Err(error) => return report.fail(format!("upstream app: no header: {error}")),
    };
    let mut pattern = Pattern::new(seed);
    let mut checksum = Checksum::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; MAX_CHUNK];
    let ended: io::Result<()> = loop {
        let n = match within(IO_LIMIT, stream.read(&mut buf)).await {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(error) => break Err(error),
        };
        if let Some(at) = pattern.mismatch(&buf[..n]) {
            let _ = stream.set_zero_linger();
            return report.corrupt(format!(
                "upstream app: connection {seed:#x} ({mode:?}): byte {} differs from what the client sent",
                total + at as u64
            ));
        }
        checksum.update(&buf[..n]);
        total += n as u64;
        if let Mode::UpstreamAborts { after } = mode
            && total >= after
        {
            bump(&report.app_bytes, total);
            bump(&report.app_aborted, 1);
            // SO_LINGER 0: closing sends RST, the app crashing as far as the proxy can tell.
            let _ = stream.set_zero_linger();
            return;
        }
        if let Err(error) = within(IO_LIMIT, stream.write_all(&buf[..n])).await {
            break Err(error);
        }
    };
    bump(&report.app_bytes, total);
    match (mode, ended) {
        (Mode::ClientResets, Ok(())) => bump(&report.app_reset_as_fin, 1),
        (Mode::ClientResets, Err(_)) => bump(&report.app_reset_as_rst, 1),
        // (An abort victim the client stopped before its abort point ends like any other connection.)
        (Mode::Echo | Mode::UpstreamAborts { .. }, Ok(())) => {
            let mut trailer = [0u8; TRAILER_LEN];
            trailer[..8].copy_from_slice(&total.to_be_bytes());
            trailer[8..].copy_from_slice(&checksum.0.to_be_bytes());
            let answered = async {
                stream.write_all(&trailer).await?;
                stream.shutdown().await
            };
            match within(IO_LIMIT, answered).await {
                Ok(()) => bump(&report.app_clean, 1),
                Err(error) => report.fail(format!(
                    "upstream app: connection {seed:#x}: the trailer could not be sent: {error}"
                )),
            }
        }
        (Mode::Echo | Mode::UpstreamAborts { .. }, Err(error)) => report.fail(format!(
            "upstream app: connection {seed:#x} ({mode:?}) ended with an error after {total} bytes: {error}"
        )),
    }
}

/// `future` within `limit`, a timeout becoming an `io::ErrorKind::TimedOut` error.
async fn within<T>(limit: Duration, future: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(limit, future).await.unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no progress within {limit:?}"),
        ))
    })
}

// ---- Client connections -----------------------------------------------------------------------------

/// How much a connection sends.
#[derive(Clone, Copy, Debug)]
enum Budget {
    /// At [`LONG_RATE`] until the soak stops.
    Paced,
    /// This many bytes, as fast as they go.
    Fixed(u64),
}

/// How a client connection ended.
#[derive(Debug)]
enum Ending {
    /// Every byte echoed intact, and the upstream's count and checksum match what was sent.
    Clean { sent: u64 },
    /// An I/O error or an early EOF.
    Cut {
        sent: u64,
        echoed: u64,
        kind: io::ErrorKind,
        reason: String,
    },
    /// Nothing moved within [`IO_LIMIT`].
    Stuck { sent: u64, echoed: u64, reason: String },
    /// Wrong bytes, or a count or checksum that does not match.
    Corrupt(String),
}

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ending::Clean { sent } => write!(f, "clean after {sent} bytes"),
            Ending::Cut {
                sent, echoed, reason, ..
            } => {
                write!(f, "cut after {sent} bytes sent, {echoed} echoed: {reason}")
            }
            Ending::Stuck { sent, echoed, reason } => {
                write!(f, "stuck after {sent} bytes sent, {echoed} echoed: {reason}")
            }
            Ending::Corrupt(what) => write!(f, "CORRUPT: {what}"),
        }
    }
}

/// A connection from the client workload's address to `proxy`.
async fn connect_client(proxy: SocketAddr) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(CLIENT_IP.parse().unwrap(), 0))?;
    let stream = within(IO_LIMIT, socket.connect(proxy)).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sends the header and `budget` of the seeded stream, half-closes, and checks the echo and the trailer
/// concurrently. `progress` counts echoed bytes as they are verified.
async fn exchange(
    stream: &mut TcpStream,
    mode: Mode,
    seed: u64,
    budget: Budget,
    stop: watch::Receiver<bool>,
    progress: watch::Sender<u64>,
) -> Ending {
    let (mut reader, mut writer) = stream.split();
    let send = async {
        let mut pattern = Pattern::new(seed);
        let mut checksum = Checksum::new();
        let mut sizes = fastrand::Rng::with_seed(seed.rotate_left(29));
        let mut stop = stop.clone();
        let mut sent = 0u64;
        let mut buf = vec![0u8; MAX_CHUNK];
        let failed = |sent: u64| move |error: io::Error| (sent, error);
        within(IO_LIMIT, writer.write_all(&encode_header(mode, seed)))
            .await
            .map_err(failed(sent))?;
        let started = Instant::now();
        loop {
            let size = match budget {
                Budget::Paced if *stop.borrow() => break,
                Budget::Paced => sizes.usize(1..=MAX_CHUNK),
                Budget::Fixed(total) if sent >= total => break,
                Budget::Fixed(total) => sizes
                    .usize(1..=MAX_CHUNK)
                    .min(usize::try_from(total - sent).unwrap()),
            };
            pattern.fill(&mut buf[..size]);
            checksum.update(&buf[..size]);
            within(IO_LIMIT, writer.write_all(&buf[..size]))
                .await
                .map_err(failed(sent))?;
            sent += size as u64;
            if let Budget::Paced = budget {
                let due = started + Duration::from_secs_f64(sent as f64 / LONG_RATE);
                let stopped = tokio::select! {
                    () = tokio::time::sleep_until(due) => false,
                    stopped = stop.wait_for(|stop| *stop) => { let _ = stopped; true }
                };
                if stopped {
                    break;
                }
            }
        }
        within(IO_LIMIT, writer.shutdown()).await.map_err(failed(sent))?;
        Ok::<_, (u64, io::Error)>((sent, checksum))
    };
    let receive = async {
        let mut pattern = Pattern::new(seed);
        let mut echoed = 0u64;
        let mut held = Vec::with_capacity(2 * MAX_CHUNK);
        let mut buf = vec![0u8; MAX_CHUNK];
        loop {
            let n = match within(IO_LIMIT, reader.read(&mut buf)).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(error) => return Err(Ok((echoed, error))),
            };
            held.extend_from_slice(&buf[..n]);
            // The last TRAILER_LEN bytes may be the trailer: they are checked once the stream ends.
            if held.len() > TRAILER_LEN {
                let ready = held.len() - TRAILER_LEN;
                if let Some(at) = pattern.mismatch(&held[..ready]) {
                    return Err(Err(format!(
                        "echoed byte {} differs from what was sent",
                        echoed + at as u64
                    )));
                }
                echoed += ready as u64;
                held.drain(..ready);
                progress.send_replace(echoed);
            }
        }
        if held.len() != TRAILER_LEN {
            let error = io::Error::new(io::ErrorKind::UnexpectedEof, "EOF before the trailer");
            return Err(Ok((echoed, error)));
        }
        let counted = u64::from_be_bytes(held[..8].try_into().unwrap());
        let checksum = u64::from_be_bytes(held[8..].try_into().unwrap());
        Ok((echoed, counted, checksum))
    };
    let (sent, received) = tokio::join!(send, receive);
    let classify = |sent: u64, echoed: u64, error: io::Error| {
        let reason = error.to_string();
        if error.kind() == io::ErrorKind::TimedOut {
            Ending::Stuck { sent, echoed, reason }
        } else {
            let kind = error.kind();
            Ending::Cut {
                sent,
                echoed,
                kind,
                reason,
            }
        }
    };
    match (sent, received) {
        (_, Err(Err(corruption))) => Ending::Corrupt(format!("connection {seed:#x}: {corruption}")),
        (Ok((sent, checksum)), Ok((echoed, counted, upstream_checksum))) => {
            if echoed == sent && counted == sent && upstream_checksum == checksum.0 {
                Ending::Clean { sent }
            } else {
                Ending::Corrupt(format!(
                    "connection {seed:#x}: sent {sent} bytes (checksum {:#x}), {echoed} echoed, upstream \
                     counted {counted} (checksum {upstream_checksum:#x})",
                    checksum.0
                ))
            }
        }
        (Err((sent, error)), Ok((echoed, ..))) => classify(sent, echoed, error),
        (Ok((sent, _)), Err(Ok((echoed, error)))) => classify(sent, echoed, error),
        (Err((sent, _)), Err(Ok((echoed, error)))) => classify(sent, echoed, error),
    }
}

/// Where client connections go, and how they report.
#[derive(Clone)]
struct Traffic {
    /// Outbound listener for connections to the server workload's app address.
    workload_proxy: SocketAddr,
    /// Outbound listener for connections to the service VIP.
    service_proxy: SocketAddr,
    stop: watch::Receiver<bool>,
    report: Arc<Report>,
}

impl Traffic {
    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Sleeps `duration`; false if the soak stopped meanwhile.
    async fn pause(&self, duration: Duration) -> bool {
        let mut stop = self.stop.clone();
        tokio::select! {
            () = tokio::time::sleep(duration) => !self.stopped(),
            _ = stop.wait_for(|stop| *stop) => false,
        }
    }
}

/// One long-lived connection, paced until the soak stops; says when its first echo is verified.
async fn long_connection(traffic: Traffic, index: u64, established: mpsc::UnboundedSender<()>) {
    let seed = LONG_SEEDS + index;
    let mut stream = match connect_client(traffic.workload_proxy).await {
        Ok(stream) => stream,
        Err(error) => {
            return traffic
                .report
                .fail(format!("long connection {seed:#x}: connect: {error}"));
        }
    };
    let (progress, mut echoed) = watch::channel(0u64);
    let announce = async move {
        if echoed.wait_for(|n| *n > 0).await.is_ok() {
            let _ = established.send(());
        }
    };
    let work = exchange(
        &mut stream,
        Mode::Echo,
        seed,
        Budget::Paced,
        traffic.stop.clone(),
        progress,
    );
    let (ending, ()) = tokio::join!(work, announce);
    match ending {
        Ending::Clean { sent } => {
            bump(&traffic.report.long_clean, 1);
            bump(&traffic.report.long_bytes, sent);
        }
        Ending::Corrupt(what) => traffic.report.corrupt(format!("long connection: {what}")),
        other => traffic.report.fail(format!("long connection {seed:#x}: {other}")),
    }
}

/// One short connection to the service VIP: a few KB, half-close, echo and trailer checked.
async fn short_connection(traffic: Traffic, seed: u64, bytes: u64, label: &str) -> bool {
    let mut stream = match connect_client(traffic.service_proxy).await {
        Ok(stream) => stream,
        Err(error) => {
            traffic
                .report
                .fail(format!("{label} {seed:#x}: connect: {error}"));
            return false;
        }
    };
    let (progress, _) = watch::channel(0);
    match exchange(
        &mut stream,
        Mode::Echo,
        seed,
        Budget::Fixed(bytes),
        traffic.stop.clone(),
        progress,
    )
    .await
    {
        Ending::Clean { sent } => {
            bump(&traffic.report.short_bytes, sent);
            true
        }
        Ending::Corrupt(what) => {
            traffic.report.corrupt(format!("{label}: {what}"));
            false
        }
        other => {
            traffic.report.fail(format!("{label} {seed:#x}: {other}"));
            false
        }
    }
}

/// Bursts of concurrent short connections with pauses longer than the pool's idle timeout, so that
/// each burst is likely to need a new HBONE connection (a new handshake with the current certificates).
async fn short_connections(traffic: Traffic) {
    let mut rng = fastrand::Rng::with_seed(0x5407);
    let mut next = 0u64;
    while !traffic.stopped() {
        let mut burst = JoinSet::new();
        for _ in 0..SHORT_BURST {
            next += 1;
            let bytes = rng.u64(1..=SHORT_MAX_BYTES);
            let traffic = traffic.clone();
            burst.spawn(async move {
                if short_connection(traffic.clone(), SHORT_SEEDS + next, bytes, "short connection").await {
                    bump(&traffic.report.short_clean, 1);
                }
            });
        }
        while let Some(joined) = burst.join_next().await {
            if let Err(error) = joined {
                traffic.report.fail(format!("short connection task: {error}"));
            }
        }
        if !traffic.pause(Duration::from_millis(rng.u64(300..=700))).await {
            break;
        }
    }
}

/// Designated victims, one at a time: alternately reset by the client (`SO_LINGER` 0, once echo has
/// started) and aborted by the upstream app partway through.
async fn victims(traffic: Traffic) {
    let mut rng = fastrand::Rng::with_seed(0x71C7);
    let mut next = 0u64;
    while traffic.pause(Duration::from_millis(rng.u64(1000..=2500))).await {
        next += 1;
        let seed = VICTIM_SEEDS + next;
        let mut stream = match connect_client(traffic.workload_proxy).await {
            Ok(stream) => stream,
            Err(error) => {
                traffic.report.fail(format!("victim {seed:#x}: connect: {error}"));
                continue;
            }
        };
        // Before any byte moves: the proxies may report its failure at any moment from now on.
        bump(&traffic.report.victims_started, 1);
        traffic
            .report
            .victims
            .lock()
            .unwrap()
            .insert(stream.local_addr().unwrap());
        let (progress, mut echoed) = watch::channel(0u64);
        if next.is_multiple_of(2) {
            let cut_after = Duration::from_millis(rng.u64(200..=1200));
            let ended = {
                let work = exchange(
                    &mut stream,
                    Mode::ClientResets,
                    seed,
                    Budget::Paced,
                    traffic.stop.clone(),
                    progress,
                );
                let cut = async {
                    // Only once the upstream has the header and is echoing: a reset is then mid-stream.
                    if echoed.wait_for(|n| *n > 0).await.is_ok() {
                        tokio::time::sleep(cut_after).await;
                    } else {
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    ending = work => Some(ending),
                    () = cut => None,
                }
            };
            match ended {
                None => {
                    stream.set_zero_linger().unwrap();
                    drop(stream);
                    bump(&traffic.report.client_resets, 1);
                }
                // The soak stopped first: a whole connection, checked like any other.
                Some(Ending::Clean { .. }) => bump(&traffic.report.victims_ended_by_stop, 1),
                Some(Ending::Corrupt(what)) => traffic.report.corrupt(format!("victim: {what}")),
                Some(other) => traffic.report.fail(format!(
                    "victim {seed:#x} (to be reset by the client) ended first: {other}"
                )),
            }
        } else {
            let after = rng.u64(64 * 1024..=768 * 1024);
            let mode = Mode::UpstreamAborts { after };
            match exchange(
                &mut stream,
                mode,
                seed,
                Budget::Paced,
                traffic.stop.clone(),
                progress,
            )
            .await
            {
                Ending::Cut { kind, .. } => {
                    bump(&traffic.report.upstream_aborts_seen, 1);
                    if kind == io::ErrorKind::UnexpectedEof {
                        bump(&traffic.report.upstream_aborts_seen_as_fin, 1);
                    }
                }
                Ending::Clean { sent } if sent < after => bump(&traffic.report.victims_ended_by_stop, 1),
                Ending::Corrupt(what) => traffic.report.corrupt(format!("victim: {what}")),
                other => traffic.report.fail(format!(
                    "victim {seed:#x}: the upstream aborted after {after} bytes, yet the client saw: {other}"
                )),
            }
        }
    }
}

// ---- The control plane and the two nodes ------------------------------------------------------------

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "meshkit-soak-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The mesh: two HBONE workloads on two nodes, the echo service, and an ALLOW policy for the client (so
/// every inbound connection is authorized, and re-checked on every push).
fn mesh_yaml(app_port: u16) -> String {
    format!(
        r#"
workloads:
- uid: Kubernetes//Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  trustDomain: cluster.local
  workloadIps: ["{CLIENT_IP}"]
  protocol: HBONE
  node: {NODE_A}
  network: ""
  services: {{}}
- uid: Kubernetes//Pod/default/server
  name: server
  namespace: default
  serviceAccount: server
  trustDomain: cluster.local
  workloadIps: ["{SERVER_IP}"]
  protocol: HBONE
  node: {NODE_B}
  network: ""
  services:
    "default/echo.default.svc.cluster.local":
      80: {app_port}
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/{VIP}"]
  ports: {{80: {app_port}}}
policies:
- name: allow-client
  namespace: default
  scope: Namespace
  action: Allow
  dryRun: false
  rules:
  - - - principals: [!Exact "cluster.local/ns/default/sa/client"]
"#
    )
}

/// The local control plane, restartable on the same address with the same CA (the same trust root).
struct ControlPlane {
    config: ServerConfig,
    ca: Arc<DevCa>,
    server: Option<Server>,
    url: String,
    root_pem: String,
}

impl ControlPlane {
    async fn start(dir: &TempDir) -> ControlPlane {
        let ca = Arc::new(DevCa::new(TrustDomain::new("cluster.local").unwrap(), CERT_LIFETIME).unwrap());
        let mut config = ServerConfig::new(&dir.0);
        config.listen = "127.0.0.1:0".parse().unwrap();
        // No impersonation: each node proxy asks for its own workload's certificate, as a dedicated ztunnel.
        config.auth = ClientAuth::DevLoopback { node_proxy: None };
        let server = Server::start(config.clone(), ca.clone()).await.unwrap();
        config.listen = server.local_addr();
        ControlPlane {
            url: server.url(),
            root_pem: server.root_pem().to_owned(),
            config,
            ca,
            server: Some(server),
        }
    }

    async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            tokio::time::timeout(STEP_LIMIT, server.shutdown())
                .await
                .expect("the control plane did not shut down");
        }
    }

    /// Starts it again on the same address; a port still held by the old one is retried briefly.
    async fn start_again(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Server::start(self.config.clone(), self.ca.clone()).await {
                Ok(server) => {
                    assert_eq!(server.root_pem(), self.root_pem, "same CA, same root");
                    self.server = Some(server);
                    return;
                }
                Err(error) if Instant::now() < deadline => {
                    eprintln!("control plane restart: {error}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => panic!(
                    "the control plane could not restart on {}: {error}",
                    self.config.listen
                ),
            }
        }
    }

    fn grpc(&self) -> GrpcClientConfig {
        GrpcClientConfig::new(self.url.clone()).with_roots_pem(self.root_pem.as_bytes().to_vec())
    }
}

fn dev_token() -> CallCredentials {
    CallCredentials::bearer(TokenSource::Literal("soak-token".into()))
        .unwrap()
        .with_cluster_id("Kubernetes")
        .unwrap()
}

/// A node's configuration from the control plane over delta ADS, as `bins/ztunnel` wires it: the ADS
/// client runs until `drain`, addresses become snapshots, authorizations become the policy set.
fn start_xds(control_plane: &ControlPlane, node_name: &str, drain: DrainWatch) -> (ProxyState, AdsHandle) {
    let node = ZtunnelNode {
        pod_name: format!("ztunnel-{node_name}"),
        pod_namespace: "istio-system".into(),
        node_name: node_name.into(),
        cluster_id: Some("Kubernetes".into()),
        ..ZtunnelNode::default()
    };
    let mut builder = AdsClientBuilder::new(node.to_proto());
    let addresses = builder.watch::<XdsAddress>();
    let mut policies = builder.watch::<XdsAuthorization>();
    let (client, handle) = builder.build(connect_lazy(&control_plane.grpc()).unwrap(), dev_token());
    tokio::spawn(client.run(async move { drain.signaled().await }));
    let snapshots = SnapshotPublisher::new();
    let (policies_tx, policies_rx) = watch::channel(Arc::new(L4PolicySet::default()));
    let state = ProxyState::new(snapshots.subscribe(), policies_rx);
    tokio::spawn(publish_snapshots(addresses, snapshots));
    tokio::spawn(async move {
        loop {
            let current = policies.current();
            let set = L4PolicySet::new(current.iter().map(|(_, policy)| policy.clone()));
            if policies_tx.send(Arc::new(set)).is_err() || policies.changed().await.is_none() {
                return;
            }
        }
    });
    (state, handle)
}

/// Waits until `state` holds both workloads and the policy.
async fn wait_for_config(state: &ProxyState, node: &str) {
    let complete = async {
        loop {
            let snapshot = state.snapshot();
            let has = |ip: &str| snapshot.workload_by_ip("", ip.parse().unwrap()).is_some();
            if has(CLIENT_IP) && has(SERVER_IP) && !state.policy_set().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(STEP_LIMIT, complete)
        .await
        .unwrap_or_else(|_| panic!("{node}: no complete configuration from the control plane"));
}

/// Certificates from the control plane's CA, short-lived; failed renewals retry quickly, since a
/// 5-second certificate has only about 2.5 s left when its renewal starts.
fn cert_provider(control_plane: &ControlPlane) -> CachingCertProvider {
    let signer = IstioCaSigner::new(
        connect_lazy(&control_plane.grpc()).unwrap(),
        dev_token(),
        IstioCaConfig::default().with_timeout(Duration::from_secs(2)),
    );
    CachingCertProvider::new(
        Arc::new(signer),
        CachingCertConfig {
            validity: CERT_LIFETIME,
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_millis(500),
            sign_timeout: Duration::from_secs(2),
            ..CachingCertConfig::default()
        },
    )
}

fn identity(service_account: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://cluster.local/ns/default/sa/{service_account}")).unwrap()
}

/// The first certificate for `identity`, and a counter of its rotations (counting stops when the
/// provider is dropped).
async fn certificate_with_rotations(
    certs: &CachingCertProvider,
    identity: &SpiffeId,
) -> (CertWatch, Arc<AtomicU64>) {
    let watch = tokio::time::timeout(STEP_LIMIT, certs.fetch(identity))
        .await
        .expect("no certificate from the control plane's CA")
        .unwrap();
    let rotations = Arc::new(AtomicU64::new(0));
    let mut changes = watch.clone();
    let counter = rotations.clone();
    tokio::spawn(async move {
        while changes.changed().await.is_some() {
            bump(&counter, 1);
        }
    });
    (watch, rotations)
}

/// The server node: its config, its certificate, and `Inbound` inside an `HboneAcceptor`.
struct ServerNode {
    ads: AdsHandle,
    tracker: ConnectionTracker,
    certs: CachingCertProvider,
    rotations: Arc<AtomicU64>,
    log: Arc<ProxyLog>,
    hbone_port: u16,
    drain: DrainTrigger,
}

impl ServerNode {
    async fn start(control_plane: &ControlPlane, handshakes: Arc<Handshakes>) -> ServerNode {
        let (trigger, drain) = drain::channel();
        let (state, ads) = start_xds(control_plane, NODE_B, drain.clone());
        wait_for_config(&state, NODE_B).await;
        let certs = cert_provider(control_plane);
        let (cert, rotations) = certificate_with_rotations(&certs, &identity("server")).await;
        let tls = recording_server_tls(cert, TrustDomain::new("cluster.local").unwrap(), handshakes);
        let tracker = ConnectionTracker::new();
        tokio::spawn({
            let (tracker, state, drain) = (tracker.clone(), state.clone(), drain.clone());
            async move { tracker.run(state, drain).await }
        });
        let log = Arc::new(ProxyLog::default());
        let inbound = Inbound::new(
            InboundConfig::new(ServedWorkloads::Node(NODE_B.into())),
            state,
            tracker.clone(),
        )
        .with_observers(Observers::new(vec![log.clone()]));
        let listener = TcpListener::bind((SERVER_IP, 0)).await.unwrap();
        let hbone_port = listener.local_addr().unwrap().port();
        tokio::spawn(HboneAcceptor::new(HboneConfig::default(), tls, inbound).serve(listener, drain));
        ServerNode {
            ads,
            tracker,
            certs,
            rotations,
            log,
            hbone_port,
            drain: trigger,
        }
    }
}

/// The client node: its config, its certificate, and `Outbound` behind two listeners.
struct ClientNode {
    ads: AdsHandle,
    connector: HboneConnector,
    certs: CachingCertProvider,
    rotations: Arc<AtomicU64>,
    log: Arc<ProxyLog>,
    workload_proxy: SocketAddr,
    service_proxy: SocketAddr,
    drain: DrainTrigger,
}

impl ClientNode {
    async fn start(control_plane: &ControlPlane, hbone_port: u16, app_port: u16) -> ClientNode {
        let (trigger, drain) = drain::channel();
        let (state, ads) = start_xds(control_plane, NODE_A, drain.clone());
        wait_for_config(&state, NODE_A).await;
        let certs = cert_provider(control_plane);
        // Prefetched, as the binary does before it reports ready.
        let (_, rotations) = certificate_with_rotations(&certs, &identity("client")).await;
        let hbone = HboneConfig {
            pool_max_streams_per_connection: POOL_STREAMS,
            pool_idle_timeout: POOL_IDLE,
            ..HboneConfig::default()
        };
        let connector = HboneConnector::new(hbone, Arc::new(certs.clone()));
        let log = Arc::new(ProxyLog::default());
        let outbound = Outbound::new(
            OutboundConfig {
                source: SourceLookup::PeerIp { network: "".into() },
                local_node: Some(NODE_A.into()),
                hbone_port,
                ..OutboundConfig::default()
            },
            state,
            connector.clone(),
            Observers::new(vec![log.clone()]),
        );
        let app = SocketAddr::new(SERVER_IP.parse().unwrap(), app_port);
        let vip = SocketAddr::new(VIP.parse().unwrap(), 80);
        ClientNode {
            ads,
            connector,
            certs,
            rotations,
            log,
            workload_proxy: listen(&outbound, app, drain.clone()).await,
            service_proxy: listen(&outbound, vip, drain).await,
            drain: trigger,
        }
    }
}

/// A capture listener for `outbound` whose connections all had `destination` as original destination
/// (no iptables here, so it is injected, as in `tests/outbound.rs`).
async fn listen(outbound: &Outbound, destination: SocketAddr, drain: DrainWatch) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let outbound = outbound.clone();
    let handler = move |stream: TcpStream, peer: SocketAddr| {
        let outbound = outbound.clone();
        async move {
            // Failures reach the ProxyLog observer.
            let _ = outbound.proxy(stream, peer, destination).await;
        }
    };
    let config = ListenerConfig {
        max_connections: NonZeroUsize::new(1024).unwrap(),
        ..ListenerConfig::default()
    };
    tokio::spawn(async move { serve_tcp(listener, handler, &config, drain).await });
    addr
}

// ---- Faults -----------------------------------------------------------------------------------------

/// Stops the control plane, checks the data plane still works without it, starts it again on the same
/// address, and checks both proxies reconnect and new connections succeed.
async fn restart_control_plane(
    control_plane: &mut ControlPlane,
    ads: [(&str, &AdsHandle); 2],
    traffic: &Traffic,
    restart: u64,
) -> Duration {
    let connects_before = ads.map(|(_, handle)| handle.status().connects);
    control_plane.stop().await;
    let probe = |n: u64| PROBE_SEEDS + restart * 16 + n;
    let report = &traffic.report;
    if short_connection(
        traffic.clone(),
        probe(0),
        4096,
        "probe with the control plane down",
    )
    .await
    {
        bump(&report.probes_clean, 1);
    }
    tokio::time::sleep(CONTROL_PLANE_DOWNTIME).await;
    control_plane.start_again().await;
    let restarted = Instant::now();
    if short_connection(traffic.clone(), probe(1), 4096, "probe right after the restart").await {
        bump(&report.probes_clean, 1);
    }
    for ((node, handle), before) in ads.into_iter().zip(connects_before) {
        let mut status = handle.status_watch();
        let reconnected = tokio::time::timeout(
            STEP_LIMIT,
            status.wait_for(|status| status.connected && status.connects > before),
        )
        .await;
        if !matches!(reconnected, Ok(Ok(_))) {
            report.fail(format!(
                "restart {restart}: {node}'s ADS client did not reconnect within {STEP_LIMIT:?}: {:?}",
                handle.status()
            ));
        }
    }
    let reconnect_time = restarted.elapsed();
    if short_connection(
        traffic.clone(),
        probe(2),
        4096,
        "probe after the proxies reconnected",
    )
    .await
    {
        bump(&report.probes_clean, 1);
    }
    reconnect_time
}

// ---- Leak accounting --------------------------------------------------------------------------------

/// This process's open file descriptors, with what each refers to.
fn open_fds() -> BTreeMap<u64, String> {
    let mut fds = BTreeMap::new();
    for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd must be readable (Linux /proc)") {
        let entry = entry.unwrap();
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<u64>() else {
            continue;
        };
        let target = std::fs::read_link(entry.path())
            .map(|target| target.display().to_string())
            // The directory handle read_dir itself holds is gone by now.
            .unwrap_or_default();
        if !target.is_empty() {
            fds.insert(fd, target);
        }
    }
    fds
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current().metrics().num_alive_tasks()
}

/// Waits (bounded) for `done`, polling.
async fn settle(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    done()
}

// ---- The soak ---------------------------------------------------------------------------------------

#[derive(Debug)]
struct Summary {
    secs: u64,
    report: Arc<Report>,
    client_rotations: u64,
    server_rotations: u64,
    client_leaves: usize,
    server_leaves: usize,
    handshakes: u64,
    pool_handshakes: u64,
    restarts: u64,
    reconnect_times: Vec<Duration>,
    client_connects: u64,
    server_connects: u64,
    outbound: (u64, u64, Vec<(SocketAddr, String)>),
    inbound: (u64, u64, Vec<(SocketAddr, String)>),
    fds_before: BTreeMap<u64, String>,
    fds_after: BTreeMap<u64, String>,
    tasks_before: usize,
    tasks_after: usize,
}

async fn soak(duration: Duration) -> Summary {
    let fds_before = open_fds();
    let tasks_before = alive_tasks();
    let report = Arc::new(Report::default());

    let (app_trigger, app_drain) = drain::channel();
    let app_listener = TcpListener::bind((SERVER_IP, 0)).await.unwrap();
    let app_port = app_listener.local_addr().unwrap().port();
    tokio::spawn(serve_app(app_listener, report.clone(), app_drain));

    let dir = TempDir::new();
    std::fs::write(dir.0.join("mesh.yaml"), mesh_yaml(app_port)).unwrap();
    let mut control_plane = ControlPlane::start(&dir).await;
    let handshakes = Arc::new(Handshakes::default());
    let server = ServerNode::start(&control_plane, handshakes.clone()).await;
    let client = ClientNode::start(&control_plane, server.hbone_port, app_port).await;

    let (stop_tx, stop) = watch::channel(false);
    let traffic = Traffic {
        workload_proxy: client.workload_proxy,
        service_proxy: client.service_proxy,
        stop,
        report: report.clone(),
    };
    let mut workers = JoinSet::new();
    let (established_tx, mut established) = mpsc::unbounded_channel();
    for index in 0..LONG_CONNECTIONS as u64 {
        workers.spawn(long_connection(traffic.clone(), index, established_tx.clone()));
    }
    drop(established_tx);
    let all_established = tokio::time::timeout(STEP_LIMIT, async {
        for _ in 0..LONG_CONNECTIONS {
            established.recv().await?;
        }
        Some(())
    })
    .await;
    assert!(
        matches!(all_established, Ok(Some(()))),
        "the long-lived connections did not all get their first echo: {:?}",
        report.failures.lock().unwrap()
    );
    // Each long stream on its own, and the pool as designed: full connections, then one with room for
    // the victims beside long-lived streams.
    let pool = client.connector.stats();
    assert_eq!(
        (pool.open_streams, pool.open_connections),
        (LONG_CONNECTIONS, LONG_CONNECTIONS.div_ceil(POOL_STREAMS)),
        "{pool:?}"
    );
    workers.spawn(short_connections(traffic.clone()));
    workers.spawn(victims(traffic.clone()));

    // Control-plane restarts, evenly spread; certificates rotate on their own timers meanwhile.
    let started = Instant::now();
    let restarts = (duration.as_secs() / 30).max(2);
    let mut reconnect_times = Vec::new();
    for restart in 1..=restarts {
        let at = started + duration.mul_f64(restart as f64 / (restarts + 1) as f64);
        tokio::time::sleep_until(at).await;
        let ads = [(NODE_A, &client.ads), (NODE_B, &server.ads)];
        reconnect_times.push(restart_control_plane(&mut control_plane, ads, &traffic, restart).await);
    }
    tokio::time::sleep_until(started + duration).await;

    // Stop: long connections half-close and check their trailers; the workers end.
    stop_tx.send_replace(true);
    let joined = tokio::time::timeout(IO_LIMIT + STEP_LIMIT, async {
        while let Some(result) = workers.join_next().await {
            if let Err(error) = result {
                report.fail(format!("traffic task failed: {error}"));
            }
        }
    })
    .await;
    if joined.is_err() {
        report.fail("traffic did not stop in time");
        workers.abort_all();
    }

    // With every client connection closed, the proxies' own accounting must be back to zero.
    if !settle(STEP_LIMIT, || client.connector.stats().open_streams == 0).await {
        report.fail(format!(
            "HBONE pool still counts open streams: {:?}",
            client.connector.stats()
        ));
    }
    if !settle(STEP_LIMIT, || server.tracker.is_empty()).await {
        report.fail(format!(
            "inbound tracker still holds {} connections",
            server.tracker.len()
        ));
    }
    let logs_settled = settle(STEP_LIMIT, || {
        count(&client.log.opened) == count(&client.log.closed)
            && count(&server.log.opened) == count(&server.log.closed)
    })
    .await;
    if !logs_settled {
        report.fail("a proxied connection was opened but never reported closed");
    }

    let client_rotations = count(&client.rotations);
    let server_rotations = count(&server.rotations);
    let pool_handshakes = client.connector.stats().handshakes;
    let client_connects = client.ads.status().connects;
    let server_connects = server.ads.status().connects;
    let take_errors = |log: &ProxyLog| {
        (
            count(&log.opened),
            count(&log.closed),
            std::mem::take(&mut *log.errors.lock().unwrap()),
        )
    };
    let outbound = take_errors(&client.log);
    let inbound = take_errors(&server.log);

    // Teardown: drain both nodes (listeners, HBONE connections, ADS clients), stop the control plane, drop
    // every handle, stop the app. Then wait for tasks and descriptors to return to their baseline.
    drop(traffic);
    let ClientNode {
        ads: client_ads,
        connector,
        certs: client_certs,
        drain: client_drain,
        ..
    } = client;
    let ServerNode {
        ads: server_ads,
        tracker,
        certs: server_certs,
        drain: server_drain,
        ..
    } = server;
    for (node, trigger) in [(NODE_A, client_drain), (NODE_B, server_drain)] {
        if tokio::time::timeout(STEP_LIMIT, trigger.drain()).await.is_err() {
            report.fail(format!("{node} did not drain within {STEP_LIMIT:?}"));
        }
    }
    control_plane.stop().await;
    drop((
        client_ads,
        server_ads,
        connector,
        client_certs,
        server_certs,
        tracker,
        control_plane,
        dir,
    ));
    if tokio::time::timeout(STEP_LIMIT, app_trigger.drain())
        .await
        .is_err()
    {
        report.fail("the upstream app did not stop");
    }
    let mut fds_after = open_fds();
    let mut tasks_after = alive_tasks();
    settle(STEP_LIMIT, || {
        fds_after = open_fds();
        tasks_after = alive_tasks();
        fds_after.len() <= fds_before.len() && tasks_after <= tasks_before
    })
    .await;

    Summary {
        secs: duration.as_secs(),
        report,
        client_rotations,
        server_rotations,
        client_leaves: handshakes.client_leaves.lock().unwrap().len(),
        server_leaves: handshakes.server_leaves.lock().unwrap().len(),
        handshakes: count(&handshakes.count),
        pool_handshakes,
        restarts,
        reconnect_times,
        client_connects,
        server_connects,
        outbound,
        inbound,
        fds_before,
        fds_after,
        tasks_before,
        tasks_after,
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.report;
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        writeln!(f, "soak summary ({} s):", self.secs)?;
        writeln!(
            f,
            "  long-lived: {} of {LONG_CONNECTIONS} clean, {:.1} MiB each way",
            count(&r.long_clean),
            mib(count(&r.long_bytes))
        )?;
        writeln!(
            f,
            "  short: {} clean ({:.1} MiB); probes around restarts: {} clean",
            count(&r.short_clean),
            mib(count(&r.short_bytes)),
            count(&r.probes_clean)
        )?;
        writeln!(
            f,
            "  victims: {} reset by the client (upstream saw {} RST, {} FIN), {} aborted by the upstream (client saw \
             {} cut, {} of them as FIN), {} ended by the stop",
            count(&r.client_resets),
            count(&r.app_reset_as_rst),
            count(&r.app_reset_as_fin),
            count(&r.app_aborted),
            count(&r.upstream_aborts_seen),
            count(&r.upstream_aborts_seen_as_fin),
            count(&r.victims_ended_by_stop)
        )?;
        writeln!(
            f,
            "  upstream app: {} clean connections, {:.1} MiB checked",
            count(&r.app_clean),
            mib(count(&r.app_bytes))
        )?;
        writeln!(
            f,
            "  certificates: client rotated {} times, server {}; server-side handshakes {} (client pool opened {}), \
             distinct leaves seen: client {}, server {}",
            self.client_rotations,
            self.server_rotations,
            self.handshakes,
            self.pool_handshakes,
            self.client_leaves,
            self.server_leaves
        )?;
        writeln!(
            f,
            "  control plane: {} restarts, ADS streams opened: {NODE_A} {}, {NODE_B} {}; reconnect times {:?}",
            self.restarts, self.client_connects, self.server_connects, self.reconnect_times
        )?;
        writeln!(
            f,
            "  proxies: outbound {} opened / {} closed / {} failed, inbound {} / {} / {}",
            self.outbound.0,
            self.outbound.1,
            self.outbound.2.len(),
            self.inbound.0,
            self.inbound.1,
            self.inbound.2.len()
        )?;
        writeln!(
            f,
            "  errors: {} ({} corruptions); fds {} -> {}; tasks {} -> {}",
            count(&r.failure_count),
            count(&r.corruptions),
            self.fds_before.len(),
            self.fds_after.len(),
            self.tasks_before,
            self.tasks_after
        )
    }
}

#[test]
fn soak_rotation_restarts_and_resets_lose_no_byte_and_leak_nothing() {
    let duration = soak_duration();
    // Its own runtime: the harness's tasks do not count, and the task count starts from nothing.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let summary = runtime.block_on(soak(duration));
    println!("{summary}");
    let r = &summary.report;

    let failures = r.failures.lock().unwrap().clone();
    assert_eq!(count(&r.corruptions), 0, "corrupted or lost bytes: {failures:#?}");
    assert_eq!(count(&r.failure_count), 0, "unexpected failures: {failures:#?}");
    assert_eq!(
        count(&r.long_clean),
        LONG_CONNECTIONS as u64,
        "every long-lived connection ends clean"
    );
    assert!(count(&r.short_clean) > 0 && count(&r.probes_clean) == 3 * summary.restarts);

    // Rotation happened, on both sides, and new handshakes used the new certificates. Nominally a
    // rotation every ~2.4 s; half that rate is asserted, so a loaded machine cannot fail this.
    let expected_rotations = summary.secs / CERT_LIFETIME.as_secs();
    assert!(
        summary.client_rotations >= expected_rotations && summary.server_rotations >= expected_rotations,
        "fewer rotations than {expected_rotations}: {summary}"
    );
    assert!(
        summary.client_leaves as u64 >= expected_rotations / 2
            && summary.server_leaves as u64 >= expected_rotations / 2,
        "handshakes did not present the rotated certificates: {summary}"
    );

    // Each restart was followed by both ADS clients reconnecting.
    assert!(
        summary.client_connects > summary.restarts && summary.server_connects > summary.restarts,
        "{summary}"
    );

    // Resets happened, and only the designated connections failed, on either proxy.
    let expected_victims = summary.secs / 15;
    assert!(
        count(&r.client_resets) >= expected_victims && count(&r.upstream_aborts_seen) >= expected_victims,
        "fewer resets than {expected_victims}: {summary}"
    );
    assert_eq!(
        count(&r.app_aborted),
        count(&r.upstream_aborts_seen),
        "every upstream abort reached its client"
    );
    assert_eq!(
        count(&r.app_reset_as_rst) + count(&r.app_reset_as_fin),
        count(&r.client_resets),
        "every client reset reached the upstream"
    );
    let victims = r.victims.lock().unwrap();
    let unexpected: Vec<_> = summary
        .outbound
        .2
        .iter()
        .filter(|(addr, _)| !victims.contains(addr))
        .collect();
    assert!(
        unexpected.is_empty(),
        "outbound failures on undesignated connections: {unexpected:#?}"
    );
    for (proxy, failed) in [("outbound", &summary.outbound.2), ("inbound", &summary.inbound.2)] {
        assert!(
            failed.len() as u64 <= count(&r.victims_started),
            "more {proxy} failures than victims: {failed:#?}"
        );
    }

    // Nothing leaked. Compared with the start of the soak (the runtime already running), so the runtime's
    // own descriptors (epoll, its waker) are in both counts.
    let leaked: Vec<_> = summary
        .fds_after
        .iter()
        .filter(|(fd, target)| summary.fds_before.get(fd) != Some(target))
        .collect();
    assert!(
        summary.fds_after.len() <= summary.fds_before.len(),
        "file descriptors leaked: {leaked:?} ({summary})"
    );
    assert!(
        summary.tasks_after <= summary.tasks_before,
        "tasks leaked: {summary}"
    );
    drop(victims);
    runtime.shutdown_timeout(Duration::from_secs(5));
}
