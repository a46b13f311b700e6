//! Abuse of a real `HboneAcceptor` on loopback TLS (issue 7): HTTP/2 rapid reset, CONTINUATION floods,
//! header bombs, slowloris on the TLS handshake, too many streams, plaintext and HTTP/1 on the HBONE port,
//! CONNECTs without an authority or to an address that is not the one the connection arrived on, and client
//! certificates with confusing SANs.
//!
//! Each attack must be refused (a status, a reset, a GOAWAY or a closed connection) within a generous bound,
//! must not make the server hold more than a bounded amount of work or memory (the test service counts the
//! tunnels it sees and how many are alive at once; the process RSS is a coarse backstop), and a legitimate
//! client must still get a byte-exact echo through a tunnel during or right after it.
//!
//! The attacking clients write HTTP/2 frames by hand over a rustls client stream, since the `h2` crate
//! refuses to misbehave; HPACK blocks are hand-encoded too (literals without Huffman coding), and the
//! server's responses are decoded with `fluke-hpack`.

#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, Method, Request, StatusCode};
use mesh_core::cert::StaticCertProvider;
use mesh_core::drain::{self, DrainTrigger};
use mesh_core::{Error as CoreError, IdentityErrorKind, SpiffeId, SvidErrorKind, tls};
use mesh_hbone::{ConnectRequest, HboneAcceptor, HboneConfig, HboneConnector, HboneError, InboundTunnel};
use mesh_test::{TEST_CERT_LIFETIME, TestPki};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::CertificateError;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tower::service_fn;

/// Bounds every wait: an attack that is not refused within this fails the test instead of hanging it.
const LIMIT: Duration = Duration::from_secs(10);
/// The test service echoes tunnels to this port.
const ECHO_PORT: u16 = 8080;
/// The test service treats this port as an upstream that never answers: it holds the tunnel unanswered
/// for a minute (ztunnel waits up to 10 s for an upstream connect), which is what makes abandoned streams
/// expensive if the server keeps working on them.
const HANG_PORT: u16 = 9090;
/// The server's `max_concurrent_streams` (ztunnel's value, our default).
const MAX_STREAMS: usize = 200;

// HTTP/2 frame types, flags and error codes (RFC 9113 sections 6, 7).
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PROTOCOL_ERROR: u32 = 0x1;
const REFUSED_STREAM: u32 = 0x7;
const CANCEL: u32 = 0x8;
const COMPRESSION_ERROR: u32 = 0x9;
const ENHANCE_YOUR_CALM: u32 = 0xb;
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// ---------------------------------------------------------------------------------------------------------
// The server under attack.

/// What the test service saw: every tunnel it was handed, how many of its futures are alive right now and
/// at most, and the identity of the last peer.
#[derive(Debug, Default)]
struct Stats {
    calls: AtomicUsize,
    live: AtomicUsize,
    peak: AtomicUsize,
    last_peer: Mutex<Option<SpiffeId>>,
}

impl Stats {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
}

/// Counts one live service future; dropping it (the future finished or was cancelled) counts it out.
struct Live(Arc<Stats>);

impl Live {
    fn enter(stats: &Arc<Stats>) -> Live {
        stats.calls.fetch_add(1, Ordering::SeqCst);
        let now = stats.live.fetch_add(1, Ordering::SeqCst) + 1;
        stats.peak.fetch_max(now, Ordering::SeqCst);
        Live(stats.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn tunnel_service(stats: Arc<Stats>, tunnel: InboundTunnel) -> Result<(), Infallible> {
    let _live = Live::enter(&stats);
    *stats.last_peer.lock().unwrap() = Some(tunnel.peer_identity().clone());
    if tunnel.target().port() == HANG_PORT {
        tokio::time::sleep(Duration::from_secs(60)).await;
        tunnel.reject(StatusCode::SERVICE_UNAVAILABLE);
        return Ok(());
    }
    let Ok(stream) = tunnel.accept(HeaderMap::new()) else {
        return Ok(());
    };
    let (mut read, mut write) = tokio::io::split(stream);
    let _ = tokio::io::copy(&mut read, &mut write).await;
    let _ = write.shutdown().await;
    Ok(())
}

/// An acceptor on 127.0.0.1 with the counting service behind it.
struct Harness {
    pki: TestPki,
    addr: SocketAddr,
    stats: Arc<Stats>,
    /// How each connection ended (only when served connection by connection, see [`Harness::start`]).
    outcomes: mpsc::UnboundedReceiver<Result<(), HboneError>>,
    _trigger: DrainTrigger,
}

impl Harness {
    /// Serves each accepted connection with `HboneAcceptor::serve_connection` and reports how it ended.
    async fn start(config: HboneConfig) -> Harness {
        Self::launch(config, false).await
    }

    /// Serves with `HboneAcceptor::serve`, so its connection limit applies (no per-connection outcomes).
    async fn start_serving(config: HboneConfig) -> Harness {
        Self::launch(config, true).await
    }

    async fn launch(config: HboneConfig, whole: bool) -> Harness {
        let pki = TestPki::new();
        let server_tls =
            tls::server_config(pki.cert("default", "server"), vec![pki.trust_domain().clone()]).unwrap();
        let stats = Arc::new(Stats::default());
        let service_stats = stats.clone();
        let service = service_fn(move |tunnel: InboundTunnel| tunnel_service(service_stats.clone(), tunnel));
        let acceptor = HboneAcceptor::new(config, server_tls, service);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (trigger, drain) = drain::channel();
        let (report, outcomes) = mpsc::unbounded_channel();
        if whole {
            tokio::spawn(acceptor.serve(listener, drain));
        } else {
            let acceptor = Arc::new(acceptor);
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let (acceptor, drain, report) = (acceptor.clone(), drain.clone(), report.clone());
                    tokio::spawn(async move {
                        let _ = report.send(acceptor.serve_connection(tcp, drain).await);
                    });
                }
            });
        }
        Harness {
            pki,
            addr,
            stats,
            outcomes,
            _trigger: trigger,
        }
    }

    fn server_id(&self) -> SpiffeId {
        self.pki.id("default", "server")
    }

    /// How the next connection ended.
    async fn outcome(&mut self) -> Result<(), HboneError> {
        timeout(LIMIT, self.outcomes.recv())
            .await
            .expect("the server did not finish the connection in time")
            .unwrap()
    }

    /// A pooling client of our own, presenting `default/legit`.
    fn connector(&self) -> HboneConnector {
        let mut certs = StaticCertProvider::new();
        let id = self.pki.id("default", "legit");
        certs.insert(self.pki.ca().issue(&id, TEST_CERT_LIFETIME).unwrap());
        HboneConnector::new(HboneConfig::default(), Arc::new(certs))
    }

    /// A tunnel through `connector` to the echo port returns 64 KiB byte for byte.
    async fn legit_echo(&self, connector: &HboneConnector) {
        let payload: Vec<u8> = (0..64 * 1024_usize)
            .map(|i| u8::try_from((i * 31 + i / 251) % 251).unwrap())
            .collect();
        let request = ConnectRequest::new(
            self.pki.id("default", "legit"),
            self.addr,
            vec![self.server_id()],
            format!("127.0.0.1:{ECHO_PORT}"),
        );
        let echoed = timeout(LIMIT, async {
            let stream = connector.connect(request).await.unwrap();
            let (mut read, mut write) = tokio::io::split(stream);
            let send = payload.clone();
            let writer = tokio::spawn(async move {
                write.write_all(&send).await.unwrap();
                write.shutdown().await.unwrap();
            });
            let mut echoed = Vec::new();
            read.read_to_end(&mut echoed).await.unwrap();
            writer.await.unwrap();
            echoed
        })
        .await
        .expect("a legitimate tunnel must complete while the server is under attack");
        assert!(echoed == payload, "the echo differs from what was sent");
    }

    /// The mutual-TLS configuration of an attacker with a valid identity (`default/attacker`).
    fn attacker_tls(&self) -> Arc<rustls::ClientConfig> {
        tls::client_config(self.pki.cert("default", "attacker"), vec![self.server_id()]).unwrap()
    }
}

/// Waits until `done` holds, polling; fails the test after [`LIMIT`].
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Resident set size of this test process: a coarse backstop against unbounded buffering (tests in this
/// file run concurrently, so bounds on it are generous).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------------------------------------
// A raw HTTP/2 client.

/// One frame, serialised.
fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    assert!(len < 1 << 24, "frame payload too large");
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn rst_stream(stream_id: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream_id, &code.to_be_bytes())
}

/// HPACK integer with an `n`-bit prefix, the high bits of the first byte set to `flags` (RFC 7541 5.1).
fn hpack_int(out: &mut Vec<u8>, prefix_bits: u32, flags: u8, value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(flags | u8::try_from(value).unwrap());
        return;
    }
    out.push(flags | u8::try_from(max).unwrap());
    let mut rest = value - max;
    while rest >= 0x80 {
        out.push(u8::try_from(rest & 0x7f).unwrap() | 0x80);
        rest >>= 7;
    }
    out.push(u8::try_from(rest).unwrap());
}

/// An HPACK string literal without Huffman coding.
fn hpack_str(out: &mut Vec<u8>, value: &[u8]) {
    hpack_int(out, 7, 0, value.len());
    out.extend_from_slice(value);
}

/// A literal header field without indexing, with a literal name (RFC 7541 6.2.2).
fn literal(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0x00);
    hpack_str(out, name.as_bytes());
    hpack_str(out, value);
}

/// A literal header field with incremental indexing: the server's decoder adds it to its dynamic table.
fn literal_indexed(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0x40);
    hpack_str(out, name.as_bytes());
    hpack_str(out, value);
}

/// A request's header list, pseudo-headers included, exactly as it goes on the wire.
type Headers = Vec<(&'static str, &'static str)>;

/// A header block of `headers`, as literals.
fn block(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        literal(&mut out, name, value.as_bytes());
    }
    out
}

/// A CONNECT header block to `authority`.
fn connect_block(authority: &str) -> Vec<u8> {
    block(&[(":method", "CONNECT"), (":authority", authority)])
}

/// What the server answered on one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Status(u16),
    Reset(u32),
    GoAway(u32),
    Closed,
}

#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream_id: u32,
    payload: Bytes,
}

impl Frame {
    fn code(&self) -> Option<u32> {
        let bytes = match self.kind {
            RST_STREAM => self.payload.get(0..4)?,
            GOAWAY => self.payload.get(4..8)?,
            _ => return None,
        };
        Some(u32::from_be_bytes(bytes.try_into().ok()?))
    }
}

/// Reads frames from the server and decodes every header block it sends (to keep HPACK state in step).
struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    hpack: fluke_hpack::Decoder<'static>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    fn new(io: R) -> Self {
        FrameReader {
            io,
            buf: BytesMut::new(),
            hpack: fluke_hpack::Decoder::new(),
        }
    }

    /// The next frame; `None` once the connection is closed (or broken).
    async fn frame(&mut self) -> Option<Frame> {
        loop {
            if self.buf.len() >= 9 {
                let len =
                    usize::from(self.buf[0]) << 16 | usize::from(self.buf[1]) << 8 | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let mut head = self.buf.split_to(9);
                    let payload = self.buf.split_to(len).freeze();
                    head.advance(3);
                    let kind = head.get_u8();
                    let flags = head.get_u8();
                    let stream_id = head.get_u32() & 0x7fff_ffff;
                    return Some(Frame {
                        kind,
                        flags,
                        stream_id,
                        payload,
                    });
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.io.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn status(&mut self, frame: &Frame) -> Option<u16> {
        let headers = self.hpack.decode(&frame.payload).ok()?;
        headers
            .iter()
            .find(|(name, _)| name == b":status")
            .and_then(|(_, value)| std::str::from_utf8(value).ok()?.parse().ok())
    }

    /// Reads until the server answers `stream_id` or ends the connection.
    async fn answer(&mut self, stream_id: u32) -> Answer {
        while let Some(frame) = timeout(LIMIT, self.frame())
            .await
            .expect("the server did not answer in time")
        {
            match frame.kind {
                HEADERS => {
                    let status = self.status(&frame);
                    if frame.stream_id == stream_id {
                        return status.map_or(Answer::Closed, Answer::Status);
                    }
                }
                RST_STREAM if frame.stream_id == stream_id => {
                    return Answer::Reset(frame.code().unwrap());
                }
                GOAWAY => return Answer::GoAway(frame.code().unwrap()),
                _ => {}
            }
        }
        Answer::Closed
    }

    /// Reads DATA on `stream_id` until END_STREAM.
    async fn body(&mut self, stream_id: u32) -> Vec<u8> {
        let mut body = Vec::new();
        while let Some(frame) = timeout(LIMIT, self.frame())
            .await
            .expect("the server did not send the body in time")
        {
            match frame.kind {
                DATA if frame.stream_id == stream_id => {
                    body.extend_from_slice(&frame.payload);
                    if frame.flags & END_STREAM != 0 {
                        break;
                    }
                }
                HEADERS => {
                    self.status(&frame);
                }
                _ => {}
            }
        }
        body
    }

    /// Reads until the connection closes; returns the GOAWAY error code if one came, and how many frames
    /// arrived. Fails the test if the server keeps the connection open past [`LIMIT`].
    async fn until_closed(mut self) -> (Option<u32>, usize) {
        let mut goaway = None;
        let mut frames = 0;
        timeout(LIMIT, async {
            while let Some(frame) = self.frame().await {
                frames += 1;
                if frame.kind == GOAWAY {
                    goaway = frame.code();
                }
            }
        })
        .await
        .expect("the server must close the attacker's connection");
        (goaway, frames)
    }
}

type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

/// A raw HTTP/2 connection over mutual TLS: the preface and SETTINGS exchange done, nothing else.
struct RawConn {
    reader: FrameReader<ReadHalf<ClientTls>>,
    writer: WriteHalf<ClientTls>,
}

impl RawConn {
    async fn open(harness: &Harness) -> RawConn {
        Self::open_with(harness.addr, harness.attacker_tls()).await
    }

    async fn open_with(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> RawConn {
        let tls_stream = timeout(LIMIT, async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            tokio_rustls::TlsConnector::from(config)
                .connect(tls::server_name(), tcp)
                .await
                .unwrap()
        })
        .await
        .unwrap();
        let (read, write) = tokio::io::split(tls_stream);
        let mut conn = RawConn {
            reader: FrameReader::new(read),
            writer: write,
        };
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        conn.send(&hello).await.unwrap();
        // The server's SETTINGS first: a client may only rely on its limits once it has read them.
        loop {
            let frame = timeout(LIMIT, conn.reader.frame()).await.unwrap().unwrap();
            if frame.kind == SETTINGS && frame.flags & ACK == 0 {
                break;
            }
        }
        conn.send(&frame(SETTINGS, ACK, 0, &[])).await.unwrap();
        conn
    }

    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        timeout(LIMIT, async {
            self.writer.write_all(bytes).await?;
            self.writer.flush().await
        })
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the server stopped reading"))?
    }

    async fn connect(&mut self, stream_id: u32, authority: &str) {
        let headers = frame(HEADERS, END_HEADERS, stream_id, &connect_block(authority));
        self.send(&headers).await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------------------------
// HTTP/2 rapid reset (CVE-2023-44487).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_in_bursts_gets_a_goaway_and_legit_tunnels_continue() {
    let mut h = Harness::start(HboneConfig::default()).await;
    let legit = h.connector();
    h.legit_echo(&legit).await;
    let rss_before = rss_bytes();

    let RawConn { reader, mut writer } = RawConn::open(&h).await;
    let watcher = tokio::spawn(reader.until_closed());
    // Thousands of streams, each opened and cancelled at once, 50 pairs per write: the server sees most
    // of them reset before it could accept them.
    let pairs = 5000_u32;
    let mut sent = 0;
    'attack: for batch in 0..pairs / 50 {
        let mut bytes = Vec::new();
        for i in 0..50 {
            let stream_id = 2 * (batch * 50 + i) + 1;
            bytes.extend(frame(
                HEADERS,
                END_HEADERS,
                stream_id,
                &connect_block(&format!("127.0.0.1:{HANG_PORT}")),
            ));
            bytes.extend(rst_stream(stream_id, CANCEL));
        }
        let written = timeout(LIMIT, async {
            writer.write_all(&bytes).await?;
            writer.flush().await
        })
        .await;
        if !matches!(written, Ok(Ok(()))) || watcher.is_finished() {
            break 'attack;
        }
        sent += 50;
        // A legitimate client on its own connection keeps getting tunnels during the attack.
        if batch == 10 {
            h.legit_echo(&legit).await;
        }
    }
    let (goaway, _frames) = watcher.await.unwrap();
    assert_eq!(
        goaway,
        Some(ENHANCE_YOUR_CALM),
        "the server must tell a resetting client to go away"
    );
    assert!(
        matches!(h.outcome().await, Err(HboneError::H2(_))),
        "the attacker's connection ends with an HTTP/2 error"
    );
    assert!(sent < pairs, "the connection must be cut before the attack ends");
    assert!(
        h.stats.peak() <= MAX_STREAMS,
        "at most {MAX_STREAMS} tunnels at once, saw {}",
        h.stats.peak()
    );
    // The streams the service did get are abandoned: their work is cancelled, not left to run a minute.
    wait_until("the abandoned tunnels are dropped", || h.stats.live() == 0).await;
    h.legit_echo(&legit).await;
    let grown = rss_bytes().saturating_sub(rss_before);
    assert!(grown < 256 * MIB, "RSS grew by {} MiB", grown / MIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_after_each_accept_keeps_work_bounded_and_legit_tunnels_continue() {
    // The worst case for the server: every stream is reset only after the service got it, so h2's limit
    // on streams reset before they are accepted never triggers. What the server spends on a stream must
    // then end with the stream, or an attacker could keep any number of upstream connects running.
    let h = Harness::start(HboneConfig::default()).await;
    let legit = h.connector();
    let mut conn = RawConn::open(&h).await;
    let rounds = 3 * MAX_STREAMS;
    for round in 0..rounds {
        let stream_id = u32::try_from(2 * round + 1).unwrap();
        conn.connect(stream_id, &format!("127.0.0.1:{HANG_PORT}")).await;
        wait_until("the service has the stream", || h.stats.calls() > round).await;
        conn.send(&rst_stream(stream_id, CANCEL)).await.unwrap();
        if round == MAX_STREAMS {
            h.legit_echo(&legit).await;
        }
    }
    assert_eq!(h.stats.calls(), rounds);
    assert!(
        h.stats.peak() <= MAX_STREAMS,
        "{} tunnels were alive at once after {rounds} resets: abandoned streams keep their work",
        h.stats.peak()
    );
    wait_until("the abandoned tunnels are dropped", || h.stats.live() == 0).await;
    // The attacker's connection itself still works: a reset is not a protocol error.
    let stream_id = u32::try_from(2 * rounds + 1).unwrap();
    conn.connect(stream_id, &format!("127.0.0.1:{ECHO_PORT}")).await;
    assert_eq!(conn.reader.answer(stream_id).await, Answer::Status(200));
    h.legit_echo(&legit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_the_server_must_reset_itself_are_limited_too() {
    // The other half of rapid reset: requests so malformed that h2 resets them itself (here :path on a
    // CONNECT). Each costs the server a RST_STREAM and a closed-stream record; after 1024 of them on one
    // connection (hyper's limit, which the acceptor pins) the client is told to go away.
    let mut h = Harness::start(HboneConfig::default()).await;
    let legit = h.connector();
    let RawConn { reader, mut writer } = RawConn::open(&h).await;
    let watcher = tokio::spawn(reader.until_closed());
    let malformed = block(&[
        (":method", "CONNECT"),
        (":path", "/"),
        (":authority", "127.0.0.1:8080"),
    ]);
    let mut sent = 0_u32;
    while sent < 3000 && !watcher.is_finished() {
        let mut bytes = Vec::new();
        for _ in 0..100 {
            bytes.extend(frame(HEADERS, END_HEADERS, 2 * sent + 1, &malformed));
            sent += 1;
        }
        let written = timeout(LIMIT, async {
            writer.write_all(&bytes).await?;
            writer.flush().await
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            break;
        }
    }
    let (goaway, frames) = watcher.await.unwrap();
    assert_eq!(goaway, Some(ENHANCE_YOUR_CALM));
    assert!(
        frames < 1100,
        "the server sent {frames} frames: it reset more streams than its limit"
    );
    assert!(matches!(h.outcome().await, Err(HboneError::H2(_))));
    assert_eq!(h.stats.calls(), 0);
    h.legit_echo(&legit).await;
}

// ---------------------------------------------------------------------------------------------------------
// CONTINUATION floods (CVE-2024-27316 family) and header bombs.

/// Sends `first` as a HEADERS frame without END_HEADERS on stream 1, then `continuation(i)` as
/// CONTINUATION frames (never END_HEADERS) until the server closes the connection or `max` frames went
/// out; returns the GOAWAY code and how many CONTINUATION frames were written.
async fn continuation_flood(
    h: &Harness,
    first: Vec<u8>,
    max: usize,
    per_write: usize,
    continuation: impl Fn(usize) -> Vec<u8>,
) -> (Option<u32>, usize) {
    let RawConn { reader, mut writer } = RawConn::open(h).await;
    let watcher = tokio::spawn(reader.until_closed());
    let mut sent = 0;
    let mut bytes = frame(HEADERS, 0, 1, &first);
    while sent < max && !watcher.is_finished() {
        for _ in 0..per_write.min(max - sent) {
            bytes.extend(frame(CONTINUATION, 0, 1, &continuation(sent)));
            sent += 1;
        }
        let written = timeout(LIMIT, async {
            writer.write_all(&bytes).await?;
            writer.flush().await
        })
        .await;
        bytes.clear();
        if !matches!(written, Ok(Ok(()))) {
            break;
        }
    }
    let (goaway, _) = watcher.await.unwrap();
    (goaway, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_floods_are_cut_off() {
    let mut h = Harness::start(HboneConfig::default()).await;
    let legit = h.connector();
    let rss_before = rss_bytes();

    // Empty CONTINUATION frames: no bytes to count, so only a frame limit stops them.
    let (goaway, sent) =
        continuation_flood(&h, connect_block("127.0.0.1:8080"), 100_000, 1000, |_| Vec::new()).await;
    assert_eq!(goaway, Some(ENHANCE_YOUR_CALM), "empty CONTINUATIONs");
    assert!(sent < 100_000, "empty CONTINUATIONs: all {sent} frames went in");
    assert!(matches!(h.outcome().await, Err(HboneError::H2(_))));

    // Endless small headers, 16 KiB per frame: the header list grows past 64 KiB at once.
    let chunk = {
        let mut out = Vec::new();
        while out.len() < 16 * 1024 - 16 {
            literal(&mut out, "x-flood", b"0123456789abcdef");
        }
        out
    };
    let (goaway, sent) =
        continuation_flood(&h, connect_block("127.0.0.1:8080"), 10_000, 8, |_| chunk.clone()).await;
    assert_eq!(goaway, Some(ENHANCE_YOUR_CALM), "endless headers");
    assert!(sent < 10_000, "endless headers: all {sent} frames went in");
    assert!(matches!(h.outcome().await, Err(HboneError::H2(_))));

    // One header value announced at 64 MiB and delivered 1 MiB per frame (the frame size the server
    // allows): nothing decodes until it is complete, so the raw bytes are what must be bounded.
    let mut first = connect_block("127.0.0.1:8080");
    first.push(0x00);
    hpack_str(&mut first, b"x-huge");
    hpack_int(&mut first, 7, 0, 64 * 1024 * 1024);
    first.extend(std::iter::repeat_n(b'a', 1024 * 1024 - first.len()));
    let megabyte = vec![b'a'; 1024 * 1024];
    let (goaway, sent) = continuation_flood(&h, first, 64, 1, |_| megabyte.clone()).await;
    assert_eq!(goaway, Some(ENHANCE_YOUR_CALM), "one huge value");
    assert!(sent < 64, "one huge value: all {sent} MiB went in");
    assert!(matches!(h.outcome().await, Err(HboneError::H2(_))));

    assert_eq!(h.stats.calls(), 0, "no flood reached the service");
    h.legit_echo(&legit).await;
    let grown = rss_bytes().saturating_sub(rss_before);
    assert!(grown < 256 * MIB, "RSS grew by {} MiB", grown / MIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_bombs_are_refused() {
    let mut h = Harness::start(HboneConfig::default()).await;
    let legit = h.connector();

    // Many small headers: 4,000 of them decode to about 155 KB (each counts its 32-byte overhead),
    // over the 64 KiB limit but under h2's abuse multiple of it: the stream is refused with 431.
    let mut conn = RawConn::open(&h).await;
    let mut many = connect_block("127.0.0.1:8080");
    for i in 0..4000 {
        literal(&mut many, &format!("x-{i}"), b"v");
    }
    conn.send(&frame(HEADERS, END_HEADERS, 1, &many)).await.unwrap();
    assert_eq!(
        conn.reader.answer(1).await,
        Answer::Status(431),
        "many small headers"
    );
    // The connection survives a refused stream.
    conn.connect(3, "127.0.0.1:8080").await;
    assert_eq!(conn.reader.answer(3).await, Answer::Status(200));
    conn.send(&frame(DATA, END_STREAM, 3, b"still here"))
        .await
        .unwrap();
    assert_eq!(conn.reader.body(3).await, b"still here");

    // One huge header: 100 KiB in one value.
    let mut huge = connect_block("127.0.0.1:8080");
    literal(&mut huge, "x-huge", &vec![b'h'; 100 * 1024]);
    conn.send(&frame(HEADERS, END_HEADERS, 5, &huge)).await.unwrap();
    assert_eq!(
        conn.reader.answer(5).await,
        Answer::Status(431),
        "one huge header"
    );

    // A header list far beyond the limit (over four times it): the connection is cut.
    let mut bomb = connect_block("127.0.0.1:8080");
    for i in 0..12_000 {
        literal(&mut bomb, &format!("x-{i}"), b"v");
    }
    conn.send(&frame(HEADERS, END_HEADERS, 7, &bomb)).await.unwrap();
    assert_eq!(conn.reader.answer(7).await, Answer::GoAway(ENHANCE_YOUR_CALM));
    assert!(matches!(h.outcome().await, Err(HboneError::H2(_))));

    // HPACK: a dynamic table size update beyond the 4096 bytes the server's SETTINGS allow.
    let mut conn = RawConn::open(&h).await;
    let mut resize = Vec::new();
    hpack_int(&mut resize, 5, 0x20, 1 << 30);
    resize.extend(connect_block("127.0.0.1:8080"));
    conn.send(&frame(HEADERS, END_HEADERS, 1, &resize)).await.unwrap();
    // RFC 9113 names this a COMPRESSION_ERROR; h2 (ztunnel's library too) reports every HPACK decoding
    // failure as PROTOCOL_ERROR. Either way it is a connection error.
    let answer = conn.reader.answer(1).await;
    assert!(
        matches!(answer, Answer::GoAway(PROTOCOL_ERROR | COMPRESSION_ERROR)),
        "table size update: {answer:?}"
    );
    assert!(matches!(h.outcome().await, Err(HboneError::H2(_))));

    // HPACK: one 4 KB entry in the dynamic table (a legitimate request), then a request of two bytes per
    // header that references it a hundred times: 400 KB decoded from 200 bytes. The decoded size counts.
    let mut conn = RawConn::open(&h).await;
    let mut seed = connect_block("127.0.0.1:8080");
    literal_indexed(&mut seed, "x-big", &vec![b'b'; 4000]);
    conn.send(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &seed))
        .await
        .unwrap();
    assert_eq!(
        conn.reader.answer(1).await,
        Answer::Status(200),
        "the seeding request is fine"
    );
    let calls = h.stats.calls();
    let mut amplified = connect_block("127.0.0.1:8080");
    for _ in 0..20 {
        hpack_int(&mut amplified, 7, 0x80, 62); // the newest dynamic entry
    }
    conn.send(&frame(HEADERS, END_HEADERS, 3, &amplified))
        .await
        .unwrap();
    assert_eq!(conn.reader.answer(3).await, Answer::Status(431), "20 references");
    let mut bomb = connect_block("127.0.0.1:8080");
    for _ in 0..100 {
        hpack_int(&mut bomb, 7, 0x80, 62);
    }
    conn.send(&frame(HEADERS, END_HEADERS, 5, &bomb)).await.unwrap();
    assert_eq!(
        conn.reader.answer(5).await,
        Answer::GoAway(ENHANCE_YOUR_CALM),
        "100 references"
    );
    assert!(matches!(h.outcome().await, Err(HboneError::H2(_))));
    assert_eq!(h.stats.calls(), calls, "no bomb reached the service");

    h.legit_echo(&legit).await;
}

// ---------------------------------------------------------------------------------------------------------
// Slowloris on the TLS handshake.

/// The first flight of a real mutual-TLS client: a ClientHello a slowloris can trickle out.
fn client_hello(h: &Harness) -> Vec<u8> {
    let mut client = rustls::ClientConnection::new(h.attacker_tls(), tls::server_name()).unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    assert!(hello.len() > 100, "a ClientHello is a few hundred bytes");
    hello
}

/// Connects and sends one byte of `hello` every 250 ms until the server closes the connection; returns
/// how many bytes went out. Fails the test if the server keeps it past [`LIMIT`].
async fn slowloris(addr: SocketAddr, hello: Vec<u8>) -> usize {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut sent = 0;
    timeout(LIMIT, async {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut sink = [0u8; 256];
        loop {
            tokio::select! {
                read = tcp.read(&mut sink) => match read {
                    // The server gave up on the handshake (EOF, a reset, or an alert and then EOF).
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
                _ = tick.tick() => {
                    if sent < hello.len() {
                        if tcp.write_all(&hello[sent..=sent]).await.is_err() {
                            return;
                        }
                        sent += 1;
                    }
                }
            }
        }
    })
    .await
    .expect("the handshake timeout must close a trickling client");
    sent
}

fn slowloris_config() -> HboneConfig {
    HboneConfig {
        handshake_timeout: Duration::from_secs(3),
        server_max_connections: 12,
        ..HboneConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_handshakes_are_cut_by_the_handshake_timeout_while_legit_ones_complete() {
    let h = Harness::start_serving(slowloris_config()).await;
    let hello = client_hello(&h);
    // Eight of twelve connection slots trickle a ClientHello at four bytes a second.
    let attackers: Vec<_> = (0..8)
        .map(|_| tokio::spawn(slowloris(h.addr, hello.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // While they hang, new clients still complete handshakes (a new connector each: a new handshake).
    for _ in 0..3 {
        h.legit_echo(&h.connector()).await;
    }
    for attacker in attackers {
        let sent = attacker.await.unwrap();
        // A deadline, not an idle timeout: trickling never got a ClientHello through.
        assert!(sent < hello.len(), "the ClientHello completed ({sent} bytes)");
    }
    h.legit_echo(&h.connector()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_cannot_take_more_than_the_connection_limit() {
    let h = Harness::start_serving(slowloris_config()).await;
    let hello = client_hello(&h);
    // Every slot taken by a trickling client ...
    let attackers: Vec<_> = (0..12)
        .map(|_| tokio::spawn(slowloris(h.addr, hello.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ... so the acceptor takes no more connections: a new client waits in the listen backlog ...
    let waiting = timeout(Duration::from_millis(700), h.legit_echo(&h.connector())).await;
    assert!(waiting.is_err(), "a thirteenth connection was served");
    // ... until the handshake timeout frees the slots, and then it is served.
    h.legit_echo(&h.connector()).await;
    for attacker in attackers {
        attacker.await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------------------------
// Too many streams.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_the_limit_are_refused_and_the_others_continue() {
    let mut h = Harness::start(HboneConfig::default()).await;
    let legit = h.connector();
    let mut conn = RawConn::open(&h).await;
    let hang = format!("127.0.0.1:{HANG_PORT}");
    // The limit's worth of streams, held unanswered by the service ...
    let mut bytes = Vec::new();
    for i in 0..MAX_STREAMS {
        let stream_id = u32::try_from(2 * i + 1).unwrap();
        bytes.extend(frame(HEADERS, END_HEADERS, stream_id, &connect_block(&hang)));
    }
    conn.send(&bytes).await.unwrap();
    wait_until("the service holds 200 tunnels", || h.stats.live() == MAX_STREAMS).await;
    // ... and a thousand more, each refused without reaching the service.
    let first_extra = u32::try_from(2 * MAX_STREAMS + 1).unwrap();
    let extra: Vec<u32> = (0..1000).map(|i| first_extra + 2 * i).collect();
    let mut bytes = Vec::new();
    for stream_id in &extra {
        bytes.extend(frame(HEADERS, END_HEADERS, *stream_id, &connect_block(&hang)));
    }
    conn.send(&bytes).await.unwrap();
    for stream_id in &extra {
        assert_eq!(
            conn.reader.answer(*stream_id).await,
            Answer::Reset(REFUSED_STREAM),
            "stream {stream_id}"
        );
    }
    assert_eq!(h.stats.calls(), MAX_STREAMS);
    // The others continue: a legit client elsewhere, and this connection once one of its streams ends.
    h.legit_echo(&legit).await;
    conn.send(&rst_stream(1, CANCEL)).await.unwrap();
    let next = extra.last().unwrap() + 2;
    conn.connect(next, &format!("127.0.0.1:{ECHO_PORT}")).await;
    assert_eq!(conn.reader.answer(next).await, Answer::Status(200));
    conn.send(&frame(DATA, END_STREAM, next, b"after the refusals"))
        .await
        .unwrap();
    assert_eq!(conn.reader.body(next).await, b"after the refusals");
    // Closing the connection ends the held tunnels' work.
    drop(conn);
    assert!(h.outcome().await.is_ok());
    wait_until("the held tunnels are dropped", || h.stats.live() == 0).await;
}

// ---------------------------------------------------------------------------------------------------------
// Plaintext and HTTP/1 on the HBONE port.

/// Reads what the server sends until it closes the connection (bounded in time and size).
async fn drain_response(io: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    let mut received = Vec::new();
    timeout(LIMIT, async {
        let mut chunk = [0u8; 4096];
        while received.len() < 64 * 1024 {
            match io.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("the server must close the connection");
    received
}

fn tls_refusal(outcome: &Result<(), HboneError>) -> Option<&rustls::Error> {
    match outcome {
        Err(HboneError::Tls { source, .. }) => source.get_ref()?.downcast_ref::<rustls::Error>(),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_http1_on_the_hbone_port_get_no_http_answer() {
    let mut h = Harness::start(HboneConfig::default()).await;
    let legit = h.connector();

    // Plaintext, three ways: HTTP/1.1 CONNECT and GET, and HTTP/2 with prior knowledge (h2c). The TLS layer
    // refuses each (at most with a TLS alert); nothing answers in HTTP.
    let mut h2c = PREFACE.to_vec();
    h2c.extend(frame(SETTINGS, 0, 0, &[]));
    h2c.extend(frame(HEADERS, END_HEADERS, 1, &connect_block("127.0.0.1:8080")));
    for request in [
        b"CONNECT 127.0.0.1:8080 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".to_vec(),
        h2c,
    ] {
        let mut tcp = TcpStream::connect(h.addr).await.unwrap();
        tcp.write_all(&request).await.unwrap();
        let response = drain_response(&mut tcp).await;
        assert!(
            !response.windows(5).any(|w| w == b"HTTP/") && !response.starts_with(&[0, 0]),
            "{:?} got an HTTP answer: {response:?}",
            String::from_utf8_lossy(&request[..8])
        );
        let outcome = h.outcome().await;
        assert!(
            matches!(tls_refusal(&outcome), Some(rustls::Error::InvalidMessage(_))),
            "{outcome:?}"
        );
    }

    // TLS offering only http/1.1: no common protocol, refused in the handshake.
    let mut config = (*h.attacker_tls()).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(h.addr).await.unwrap();
    let refused = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(tls::server_name(), tcp)
        .await
        .unwrap_err();
    let alert = refused.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
    assert!(
        matches!(
            alert,
            Some(rustls::Error::AlertReceived(
                rustls::AlertDescription::NoApplicationProtocol
            ))
        ),
        "{refused:?}"
    );
    let outcome = h.outcome().await;
    assert!(
        matches!(tls_refusal(&outcome), Some(rustls::Error::NoApplicationProtocol)),
        "{outcome:?}"
    );

    // TLS offering no ALPN at all: the handshake completes, then the acceptor closes without HTTP/2.
    let mut config = (*h.attacker_tls()).clone();
    config.alpn_protocols.clear();
    let tcp = TcpStream::connect(h.addr).await.unwrap();
    let mut tls_stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(tls::server_name(), tcp)
        .await
        .unwrap();
    tls_stream
        .write_all(b"CONNECT 127.0.0.1:8080 HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        drain_response(&mut tls_stream).await,
        b"",
        "no ALPN: no bytes back"
    );
    assert!(
        matches!(h.outcome().await, Err(HboneError::NoH2Alpn { .. })),
        "no ALPN"
    );

    // TLS with ALPN h2, then HTTP/1.1 inside: not the HTTP/2 preface, so the connection ends. The server's
    // own SETTINGS may already be on the way; no HTTP/1 answer ever is.
    let tcp = TcpStream::connect(h.addr).await.unwrap();
    let mut tls_stream = tokio_rustls::TlsConnector::from(h.attacker_tls())
        .connect(tls::server_name(), tcp)
        .await
        .unwrap();
    tls_stream
        .write_all(b"CONNECT 127.0.0.1:8080 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n")
        .await
        .unwrap();
    let response = drain_response(&mut tls_stream).await;
    assert!(
        !response.windows(5).any(|w| w == b"HTTP/"),
        "HTTP/1 inside h2 TLS got an HTTP answer"
    );
    assert!(matches!(h.outcome().await, Err(HboneError::H2(_))));

    assert_eq!(h.stats.calls(), 0);
    h.legit_echo(&legit).await;
}

// ---------------------------------------------------------------------------------------------------------
// CONNECT without an authority, or to an address that is not the one the connection arrived on.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_are_answered_as_ztunnel_answers_them() {
    let h = Harness::start(HboneConfig::default()).await;
    let legit = h.connector();
    let mut conn = RawConn::open(&h).await;
    let connect = |authority: &'static str| vec![(":method", "CONNECT"), (":authority", authority)];
    // ztunnel: 400 when the authority does not parse as ip:port or host:port, when the CONNECT IP is not
    // the local IP the connection arrived on (`ip mismatch`), or when the port is one of the proxy's own.
    // Requests h2 itself finds malformed (RFC 9113 8.5: no :scheme or :path on CONNECT) are reset with
    // PROTOCOL_ERROR by the h2 library, before any HBONE code runs, in ztunnel as here.
    let cases: Vec<(&str, Headers, Answer)> = vec![
        ("no authority", vec![(":method", "CONNECT")], Answer::Status(400)),
        ("another host", connect("10.1.2.3:8080"), Answer::Status(400)),
        (
            "another loopback address",
            connect("127.0.0.2:8080"),
            Answer::Status(400),
        ),
        (
            "the unspecified address",
            connect("0.0.0.0:8080"),
            Answer::Status(400),
        ),
        ("IPv6 loopback", connect("[::1]:8080"), Answer::Status(400)),
        (
            "the proxy's HBONE port",
            connect("127.0.0.1:15008"),
            Answer::Status(400),
        ),
        (
            "the proxy's outbound port",
            connect("127.0.0.1:15001"),
            Answer::Status(400),
        ),
        (
            "the proxy's inbound port",
            connect("127.0.0.1:15006"),
            Answer::Status(400),
        ),
        (
            "the proxy's SOCKS5 port",
            connect("127.0.0.1:15080"),
            Answer::Status(400),
        ),
        ("no port", connect("127.0.0.1"), Answer::Status(400)),
        ("port zero", connect("127.0.0.1:0"), Answer::Status(400)),
        ("short IPv4 form", connect("127.1:8080"), Answer::Status(400)),
        (
            "IPv4 as one number",
            connect("2130706433:8080"),
            Answer::Status(400),
        ),
        (
            "IPv4 with leading zeros",
            connect("127.000.000.001:8080"),
            Answer::Status(400),
        ),
        ("IPv4 in hex", connect("0x7f.0.0.1:8080"), Answer::Status(400)),
        ("user info", connect("admin@127.0.0.1:8080"), Answer::Status(400)),
        (
            "GET to the right address",
            vec![
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/"),
                (":authority", "127.0.0.1:8080"),
            ],
            Answer::Status(400),
        ),
        (
            ":scheme and :path on CONNECT",
            vec![
                (":method", "CONNECT"),
                (":scheme", "https"),
                (":path", "/"),
                (":authority", "127.0.0.1:8080"),
            ],
            Answer::Reset(PROTOCOL_ERROR),
        ),
        (
            "no :method",
            vec![(":authority", "127.0.0.1:8080")],
            Answer::Reset(PROTOCOL_ERROR),
        ),
    ];
    let mut stream_id = 1;
    for (name, headers, expected) in &cases {
        conn.send(&frame(HEADERS, END_HEADERS, stream_id, &block(headers)))
            .await
            .unwrap();
        assert_eq!(&conn.reader.answer(stream_id).await, expected, "{name}");
        stream_id += 2;
    }
    assert_eq!(h.stats.calls(), 0, "no refused CONNECT reached the service");

    // The arrival address, also written as an IPv4-mapped IPv6 address: tunnelled.
    for authority in ["127.0.0.1:8080", "[::ffff:127.0.0.1]:8080"] {
        conn.connect(stream_id, authority).await;
        assert_eq!(
            conn.reader.answer(stream_id).await,
            Answer::Status(200),
            "{authority}"
        );
        conn.send(&frame(DATA, END_STREAM, stream_id, authority.as_bytes()))
            .await
            .unwrap();
        assert_eq!(conn.reader.body(stream_id).await, authority.as_bytes());
        stream_id += 2;
    }
    assert_eq!(h.stats.calls(), 2);
    h.legit_echo(&legit).await;
}

// ---------------------------------------------------------------------------------------------------------
// Client certificates with confusing SANs.

/// What the server must do with a client certificate.
enum Expect {
    /// Accept it, with exactly this identity for the tunnel.
    Identity(&'static str),
    /// Refuse the handshake with an error this predicate recognises.
    Refused(fn(&rustls::Error) -> bool),
}

/// The CA's issuer, to sign leaves of any shape under the harness's trust root.
fn root_issuer(pki: &TestPki) -> Issuer<'static, KeyPair> {
    let key = KeyPair::from_pem(&pki.ca().root_key_pem()).unwrap();
    Issuer::from_ca_cert_der(pki.ca().root_cert(), key).unwrap()
}

/// Leaf parameters as our CA shapes them (empty subject, client and server auth), for `shape` to alter.
fn leaf_params(shape: impl FnOnce(&mut CertificateParams)) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(60)).into();
    params.not_after = (now + Duration::from_secs(3600)).into();
    shape(&mut params);
    params
}

fn uri(value: &str) -> SanType {
    SanType::URI(value.try_into().unwrap())
}

fn dns(value: &str) -> SanType {
    SanType::DnsName(value.try_into().unwrap())
}

/// Signs `params` with `issuer`; the chain (the leaf alone) and its key.
fn sign(
    params: CertificateParams,
    issuer: &Issuer<'_, KeyPair>,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let key = KeyPair::generate().unwrap();
    let leaf = params.signed_by(&key, issuer).unwrap();
    (
        vec![leaf.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

/// An unrelated root with the very subject names of the dev CA's root.
fn impostor_issuer(pki: &TestPki) -> Issuer<'static, KeyPair> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, pki.trust_domain().as_str());
    name.push(DnType::CommonName, "meshkit development root");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Issuer::new(params, key)
}

fn svid_error(error: &rustls::Error) -> Option<&SvidErrorKind> {
    match tls::identity_error(error) {
        Some(CoreError::NotSvid { reason }) => Some(reason),
        _ => None,
    }
}

fn invalid_uri(error: &rustls::Error) -> Option<&IdentityErrorKind> {
    match svid_error(error) {
        Some(SvidErrorKind::InvalidUri(kind)) => Some(kind),
        _ => None,
    }
}

fn chain_error(error: &rustls::Error) -> String {
    match tls::identity_error(error) {
        Some(CoreError::ChainInvalid(reason)) => format!("{reason:?}"),
        _ => String::new(),
    }
}

/// Opens an HBONE tunnel to the echo port presenting `chain`; `Ok` with the echoed bytes, or the error.
async fn tunnel_with(
    h: &Harness,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Vec<u8>, String> {
    let verifier = Arc::new(tls::ServerCertVerifier::new(
        h.pki.cert("default", "any"),
        vec![h.server_id()],
    ));
    let mut config = rustls::ClientConfig::builder_with_provider(tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
    let attempt = async {
        let tcp = TcpStream::connect(h.addr).await.map_err(|e| e.to_string())?;
        let tls_stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(tls::server_name(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, connection) = h2::client::handshake(tls_stream)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("127.0.0.1:{ECHO_PORT}"))
            .body(())
            .unwrap();
        let (response, mut body) = send.send_request(request, false).map_err(|e| e.to_string())?;
        let response = response.await.map_err(|e| e.to_string())?;
        if response.status() != StatusCode::OK {
            return Err(format!("status {}", response.status()));
        }
        body.send_data(Bytes::from_static(b"who am I"), true)
            .map_err(|e| e.to_string())?;
        let mut received = response.into_body();
        let mut echoed = Vec::new();
        while let Some(chunk) = received.data().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            let _ = received.flow_control().release_capacity(chunk.len());
            echoed.extend_from_slice(&chunk);
        }
        Ok(echoed)
    };
    timeout(LIMIT, attempt)
        .await
        .expect("the handshake must end either way")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_with_confusing_sans_are_refused_or_mean_exactly_what_they_say() {
    let mut h = Harness::start(HboneConfig::default()).await;
    let legit = h.connector();
    let issuer = root_issuer(&h.pki);
    let impostor = impostor_issuer(&h.pki);
    let client = "spiffe://cluster.local/ns/default/sa/client";
    let with_sans = |sans: Vec<SanType>| leaf_params(move |p| p.subject_alt_names = sans);

    // Decisions, from the X.509-SVID rules and ztunnel's checks (PROTOCOLS.md 4.2): the identity comes from
    // the URI SAN only, and there must be exactly one, a valid SPIFFE ID in our trust domain, chained to our
    // root. ztunnel accepts several URI SANs if one is in its trust domain; we refuse them, since which one
    // is "the" identity would be ambiguous to policy. DNS SANs and the subject's CN are never identities.
    // A SPIFFE ID is compared exactly: no case folding, no percent-decoding, no path normalisation.
    let cases: Vec<(&str, CertificateParams, &Issuer<'_, KeyPair>, Expect)> = vec![
        (
            "a DNS SAN spelled like a SPIFFE ID",
            with_sans(vec![dns("spiffe.cluster.local"), dns(client)]),
            &issuer,
            Expect::Refused(|e| matches!(svid_error(e), Some(SvidErrorKind::NoUriSan))),
        ),
        (
            "a DNS SAN beside the URI SAN",
            with_sans(vec![dns("admin.kube-system.svc.cluster.local"), uri(client)]),
            &issuer,
            Expect::Identity(client),
        ),
        (
            "two URI SANs",
            with_sans(vec![
                uri(client),
                uri("spiffe://cluster.local/ns/kube-system/sa/admin"),
            ]),
            &issuer,
            Expect::Refused(|e| matches!(svid_error(e), Some(SvidErrorKind::SeveralUriSans(2)))),
        ),
        (
            "a non-SPIFFE URI SAN before the SPIFFE one",
            with_sans(vec![
                uri("https://cluster.local/ns/default/sa/admin"),
                uri(client),
            ]),
            &issuer,
            Expect::Refused(|e| matches!(svid_error(e), Some(SvidErrorKind::SeveralUriSans(2)))),
        ),
        (
            "another trust domain, signed by our root",
            with_sans(vec![uri("spiffe://evil.example/ns/default/sa/client")]),
            &issuer,
            Expect::Refused(|e| matches!(tls::identity_error(e), Some(CoreError::UntrustedDomain { .. }))),
        ),
        (
            "a percent-encoded path",
            with_sans(vec![uri("spiffe://cluster.local/ns/default/sa/cl%69ent")]),
            &issuer,
            Expect::Refused(|e| matches!(invalid_uri(e), Some(IdentityErrorKind::PercentEncoded))),
        ),
        (
            "a percent-encoded trust domain",
            with_sans(vec![uri("spiffe://cluster%2Elocal/ns/default/sa/client")]),
            &issuer,
            Expect::Refused(|e| matches!(invalid_uri(e), Some(IdentityErrorKind::PercentEncoded))),
        ),
        (
            "a trailing slash",
            with_sans(vec![uri("spiffe://cluster.local/ns/default/sa/client/")]),
            &issuer,
            Expect::Refused(|e| matches!(invalid_uri(e), Some(IdentityErrorKind::EmptySegment))),
        ),
        (
            "an upper-case scheme",
            with_sans(vec![uri("SPIFFE://cluster.local/ns/default/sa/client")]),
            &issuer,
            Expect::Refused(|e| matches!(invalid_uri(e), Some(IdentityErrorKind::Scheme))),
        ),
        (
            "an upper-case trust domain",
            with_sans(vec![uri("spiffe://Cluster.local/ns/default/sa/client")]),
            &issuer,
            Expect::Refused(|e| matches!(invalid_uri(e), Some(IdentityErrorKind::UppercaseTrustDomain))),
        ),
        (
            "dot segments",
            with_sans(vec![uri(
                "spiffe://cluster.local/ns/default/sa/../../ns/kube-system/sa/admin",
            )]),
            &issuer,
            Expect::Refused(|e| matches!(invalid_uri(e), Some(IdentityErrorKind::DotSegment))),
        ),
        (
            "user info before the trust domain",
            with_sans(vec![uri("spiffe://admin@cluster.local/ns/default/sa/client")]),
            &issuer,
            Expect::Refused(|e| matches!(invalid_uri(e), Some(IdentityErrorKind::UserInfo))),
        ),
        (
            "a port after the trust domain",
            with_sans(vec![uri("spiffe://cluster.local:443/ns/default/sa/client")]),
            &issuer,
            Expect::Refused(|e| matches!(invalid_uri(e), Some(IdentityErrorKind::Port))),
        ),
        (
            "a query",
            with_sans(vec![uri("spiffe://cluster.local/ns/default/sa/client?admin=1")]),
            &issuer,
            Expect::Refused(|e| matches!(invalid_uri(e), Some(IdentityErrorKind::Query))),
        ),
        (
            "a NUL byte",
            with_sans(vec![uri("spiffe://cluster.local/ns/default/sa/client\0.admin")]),
            &issuer,
            Expect::Refused(|e| matches!(invalid_uri(e), Some(IdentityErrorKind::Nul))),
        ),
        (
            "an upper-case path: a different service account, exactly as spelled",
            with_sans(vec![uri("spiffe://cluster.local/ns/default/sa/Client")]),
            &issuer,
            Expect::Identity("spiffe://cluster.local/ns/default/sa/Client"),
        ),
        (
            "a SPIFFE ID in the subject CN only",
            leaf_params(|p| p.distinguished_name.push(DnType::CommonName, client)),
            &issuer,
            Expect::Refused(|e| matches!(svid_error(e), Some(SvidErrorKind::NoUriSan))),
        ),
        (
            "a CN naming someone else than the URI SAN",
            leaf_params(|p| {
                p.distinguished_name.push(
                    DnType::CommonName,
                    "spiffe://cluster.local/ns/kube-system/sa/admin",
                );
                p.subject_alt_names = vec![uri(client)];
            }),
            &issuer,
            Expect::Identity(client),
        ),
        (
            "an unrelated CA with the same subject names",
            with_sans(vec![uri(client)]),
            &impostor,
            Expect::Refused(|e| {
                matches!(
                    e,
                    rustls::Error::InvalidCertificate(
                        CertificateError::UnknownIssuer | CertificateError::BadSignature
                    )
                )
            }),
        ),
        (
            "a CA certificate as the leaf",
            leaf_params(|p| {
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
                p.subject_alt_names = vec![uri(client)];
            }),
            &issuer,
            Expect::Refused(|e| chain_error(e).contains("CaUsedAsEndEntity")),
        ),
        (
            "server authentication only",
            leaf_params(|p| {
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                p.subject_alt_names = vec![uri(client)];
            }),
            &issuer,
            Expect::Refused(|e| chain_error(e).contains("RequiredEkuNotFound")),
        ),
        (
            "expired",
            leaf_params(|p| {
                let now = SystemTime::now();
                p.not_before = (now - Duration::from_secs(7200)).into();
                p.not_after = (now - Duration::from_secs(3600)).into();
                p.subject_alt_names = vec![uri(client)];
            }),
            &issuer,
            Expect::Refused(|e| {
                matches!(
                    e,
                    rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })
                )
            }),
        ),
    ];
    for (name, params, signer, expect) in cases {
        let (chain, key) = sign(params, signer);
        *h.stats.last_peer.lock().unwrap() = None;
        let tunnel = tunnel_with(&h, chain, key).await;
        let outcome = h.outcome().await;
        match expect {
            Expect::Identity(identity) => {
                assert_eq!(tunnel.as_deref(), Ok(&b"who am I"[..]), "{name}: {outcome:?}");
                let seen = h.stats.last_peer.lock().unwrap().clone();
                assert_eq!(seen.as_ref().map(SpiffeId::as_str), Some(identity), "{name}");
            }
            Expect::Refused(recognise) => {
                assert!(tunnel.is_err(), "{name}: a tunnel was opened");
                let refusal = tls_refusal(&outcome);
                assert!(
                    refusal.is_some_and(recognise),
                    "{name}: refused for the wrong reason: {outcome:?}"
                );
                assert!(h.stats.last_peer.lock().unwrap().is_none(), "{name}");
            }
        }
    }
    h.legit_echo(&legit).await;
}
