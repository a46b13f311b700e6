//! Arbitrary bytes as a client's side of an HBONE connection: after a real mutual-TLS handshake over an
//! in-memory pipe, the bytes go to a real `HboneAcceptor` as the client's HTTP/2 stream, and a service
//! behind it accepts, refuses, drops or holds each tunnel by its target port. Time is tokio's paused
//! clock, so the acceptor's timeouts and keepalive fire within the run.
//!
//! Checked for every input: no panic; only CONNECTs that pass the protocol checks reach the service
//! (no proxy port, and the connection's own IP unless the acceptor lets any destination through); the
//! acceptor's output stays within a fixed multiple of the input (no amplification); and once the client
//! has closed, the acceptor ends and every task and tunnel it started is gone within two minutes of
//! (virtual) time: no hang, no leak.
//!
//! Input: a flags byte, then the client's bytes after the HTTP/2 preface (the harness writes the
//! preface: every input would otherwise spend its first 24 bytes on it).
//! - flags bit 0: the rest is written as it is (`raw`), else it is a script of frames (below).
//! - flags bit 1: the acceptor lets CONNECTs name any destination (a waypoint's acceptor).
//! - flags bit 2: the acceptor is drained as soon as the handshake is done.
//!
//! The script is structure-aware without `arbitrary`: the harness fills in frame lengths and HPACK, so
//! mutations change frames rather than break their framing, and seeds stay writable by hand
//! (`fuzz/seeds.py` writes the corpus). Records, by their first byte `op`:
//! - `0x00..=0x0f`: one frame of type `op`: `flags`, `stream` (a byte), `len`, then `len` payload bytes.
//! - `0x10` / `0x11`: a HEADERS / CONTINUATION frame (`flags`, `stream`, `len` as above) whose payload is
//!   `len` bytes of `name value` lines, HPACK-encoded by the harness as literals.
//! - `0x20 n`: the client pauses `n` x 100 ms (the acceptor's timers run meanwhile).
//! - `0x21`: the acceptor is drained (it sends GOAWAY and lets open streams finish).
//! - `0x22`: the client closes its side at once (the rest of the script is not sent). A script that
//!   does not close waits a second for the acceptor's answers before closing.
//! - any other byte: written as it is (to break the framing in between frames).
#![no_main]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderMap, StatusCode};
use libfuzzer_sys::fuzz_target;
use mesh_core::{CertWatch, DevCa, SpiffeId, TrustDomain, tls};
use mesh_hbone::{HboneAcceptor, HboneConfig, InboundTunnel, PROXY_PORTS, TunnelTarget};
use tokio::io::{AsyncReadExt, AsyncWriteExt, WriteHalf};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How long, in paused time, everything may take to finish once the client has closed: beyond the
/// acceptor's own limits (10 s handshake, 10 s + 20 s keepalive), with room to spare.
const SETTLE: Duration = Duration::from_secs(120);
/// The most the acceptor may write per byte the client wrote (plus [`AMPLIFICATION_ALLOWANCE`]): its
/// SETTINGS, WINDOW_UPDATEs and responses are small next to the frames that cause them.
const AMPLIFICATION: usize = 16;
const AMPLIFICATION_ALLOWANCE: usize = 16 * 1024;

/// Tunnels handed to the service and not yet dropped.
static LIVE_TUNNELS: AtomicUsize = AtomicUsize::new(0);

struct Fixture {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        // Certificates for a year, so that a long run never sees them expire (rustls reads the real clock).
        const VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
        let domain = TrustDomain::new("cluster.local").expect("a trust domain");
        let ca = DevCa::new(domain.clone(), VALIDITY).expect("a development CA");
        let cert = |account: &str| {
            let id = SpiffeId::istio(&domain, "default", account).expect("an identity");
            (
                CertWatch::fixed(ca.issue(&id, VALIDITY).expect("a certificate")),
                id,
            )
        };
        let ((server_cert, server_id), (client_cert, _)) = (cert("server"), cert("client"));
        let server = tls::server_config(server_cert, vec![domain.clone()]).expect("server TLS configuration");
        let client = tls::client_config(client_cert, vec![server_id]).expect("client TLS configuration");
        Fixture { server, client }
    })
}

fn local() -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 2], 15008))
}

fn peer() -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], 40000))
}

/// The service behind the acceptor. By target port: 8080 accepts and echoes, 9090 is refused with 401,
/// 7070 is held for 30 s and then dropped (a slow upstream), anything else is dropped (503).
#[derive(Clone)]
struct Upstream {
    check_destination: bool,
}

/// Counts a tunnel (and whatever the service made of it) as alive until dropped.
struct Live;

impl Live {
    fn new() -> Self {
        LIVE_TUNNELS.fetch_add(1, Ordering::SeqCst);
        Live
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        LIVE_TUNNELS.fetch_sub(1, Ordering::SeqCst);
    }
}

impl tower::Service<InboundTunnel> for Upstream {
    type Response = ();
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<(), Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, tunnel: InboundTunnel) -> Self::Future {
        let port = tunnel.target().port();
        assert!(
            !PROXY_PORTS.contains(&port),
            "a tunnel to the proxy's own port: {tunnel:?}"
        );
        assert_eq!(tunnel.peer_addr(), peer());
        assert_eq!(tunnel.local_addr(), local());
        if let TunnelTarget::Addr(addr) = tunnel.target()
            && self.check_destination
        {
            assert_eq!(
                addr.ip(),
                local().ip(),
                "a tunnel to another IP than the connection's: {tunnel:?}"
            );
        }
        let live = Live::new();
        Box::pin(async move {
            match port {
                8080 => {
                    if let Ok(stream) = tunnel.accept(HeaderMap::new()) {
                        let (mut read, mut write) = tokio::io::split(stream);
                        let _ = tokio::io::copy(&mut read, &mut write).await;
                        let _ = write.shutdown().await;
                    }
                }
                9090 => tunnel.reject(StatusCode::UNAUTHORIZED),
                7070 => {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    drop(tunnel);
                }
                _ => drop(tunnel),
            }
            drop(live);
            Ok(())
        })
    }
}

/// HPACK for a header list written as `name value` lines: each header a literal without indexing and
/// without Huffman coding (RFC 7541 section 6.2.2), so that any bytes can be sent.
fn hpack(lines: &[u8]) -> Vec<u8> {
    fn integer(out: &mut Vec<u8>, first: u8, prefix_bits: u32, mut value: usize) {
        let max = (1usize << prefix_bits) - 1;
        if value < max {
            out.push(first | value as u8);
            return;
        }
        out.push(first | max as u8);
        value -= max;
        while value >= 128 {
            out.push((value % 128) as u8 | 0x80);
            value /= 128;
        }
        out.push(value as u8);
    }
    let mut out = Vec::with_capacity(lines.len() + 8);
    for line in lines.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        // The first space after the first byte, so that `:method CONNECT` keeps its colon.
        let split = line.iter().skip(1).position(|b| *b == b' ').map(|i| i + 1);
        let (name, value) = match split {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &[][..]),
        };
        out.push(0x00);
        integer(&mut out, 0, 7, name.len());
        out.extend_from_slice(name);
        integer(&mut out, 0, 7, value.len());
        out.extend_from_slice(value);
    }
    out
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len())
        .unwrap_or(u32::MAX)
        .min((1 << 24) - 1);
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// What the client does: bytes to write, or an action.
enum Step {
    Write(Vec<u8>),
    Pause(Duration),
    Drain,
    Close,
}

/// Turns a script (see the module docs) into steps; a record cut short by the end of the input is
/// sent with what there is.
fn script(mut input: &[u8]) -> Vec<Step> {
    let mut steps = Vec::new();
    while let [op, rest @ ..] = input {
        input = rest;
        match *op {
            op @ 0x00..=0x11 => {
                let (flags, stream, len, rest) = match input {
                    [flags, stream, len, rest @ ..] => (*flags, *stream, usize::from(*len), rest),
                    _ => (0, 0, 0, &[][..]),
                };
                let (payload, rest) = rest.split_at(len.min(rest.len()));
                input = rest;
                let bytes = match op {
                    0x10 => frame(0x1, flags, u32::from(stream), &hpack(payload)),
                    0x11 => frame(0x9, flags, u32::from(stream), &hpack(payload)),
                    kind => frame(kind, flags, u32::from(stream), payload),
                };
                steps.push(Step::Write(bytes));
            }
            0x20 => {
                let tenths = input.first().copied().unwrap_or(0);
                input = input.get(1..).unwrap_or_default();
                steps.push(Step::Pause(Duration::from_millis(100 * u64::from(tenths))));
            }
            0x21 => steps.push(Step::Drain),
            0x22 => {
                steps.push(Step::Close);
                break;
            }
            other => match steps.last_mut() {
                Some(Step::Write(bytes)) => bytes.push(other),
                _ => steps.push(Step::Write(vec![other])),
            },
        }
    }
    steps
}

/// Plays `steps` on the client's half, counting the bytes handed to TLS in `written`, then waits a second
/// unless the script closed the connection itself. Stops at the first write error (the acceptor closed
/// the connection).
async fn play(
    steps: Vec<Step>,
    write: &mut WriteHalf<TlsStream<tokio::io::DuplexStream>>,
    drain: &mut Option<mesh_core::drain::DrainTrigger>,
    written: &mut usize,
) {
    if write.write_all(PREFACE).await.is_err() {
        return;
    }
    *written += PREFACE.len();
    for step in steps {
        match step {
            Step::Write(bytes) => {
                if write.write_all(&bytes).await.is_err() || write.flush().await.is_err() {
                    break;
                }
                *written += bytes.len();
            }
            Step::Pause(pause) => tokio::time::sleep(pause).await,
            Step::Drain => {
                if let Some(trigger) = drain.take() {
                    tokio::spawn(trigger.drain());
                }
            }
            Step::Close => return,
        }
    }
    // Like a client waiting for its answers: the acceptor handles what it was sent before the
    // connection closes (the paused clock moves only once every task is idle).
    tokio::time::sleep(Duration::from_secs(1)).await;
}

async fn run(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let raw = flags & 0x1 != 0;
    let any_destination = flags & 0x2 != 0;
    let steps = if raw {
        vec![Step::Write(rest.to_vec())]
    } else {
        script(rest)
    };

    let fixture = fixture();
    let upstream = Upstream {
        check_destination: !any_destination,
    };
    let mut acceptor = HboneAcceptor::new(HboneConfig::default(), fixture.server.clone(), upstream);
    if any_destination {
        acceptor = acceptor.allow_any_destination();
    }
    let (trigger, watch) = mesh_core::drain::channel();
    let mut trigger = Some(trigger);
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(async move { acceptor.serve_io(server_io, peer(), local(), watch).await });

    let tls = TlsConnector::from(fixture.client.clone())
        .connect(tls::server_name(), client_io)
        .await
        .expect("the TLS handshake between the fixture's own certificates");
    let (mut read, mut write) = tokio::io::split(tls);
    // Always reading, so that the acceptor is never stuck writing to a client that does not listen.
    let reader = tokio::spawn(async move {
        let mut total = 0usize;
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = read.read(&mut buf).await {
            total += n;
        }
        total
    });
    if flags & 0x4 != 0
        && let Some(trigger) = trigger.take()
    {
        tokio::spawn(trigger.drain());
    }

    // A client that cannot write because the acceptor stopped reading is left to the acceptor's limits.
    let mut written = 0;
    let _ = tokio::time::timeout(SETTLE, play(steps, &mut write, &mut trigger, &mut written)).await;
    let _ = write.shutdown().await;
    drop(write);

    let ended = tokio::time::timeout(SETTLE, server).await;
    assert!(
        ended.is_ok(),
        "the acceptor still serves {SETTLE:?} after the client closed"
    );
    let read_total = tokio::time::timeout(SETTLE, reader)
        .await
        .expect("the client's reader ends once the acceptor has")
        .expect("the reader task");
    assert!(
        read_total <= AMPLIFICATION * written + AMPLIFICATION_ALLOWANCE,
        "the acceptor wrote {read_total} bytes for {written}"
    );
    drop(trigger);
    let metrics = tokio::runtime::Handle::current().metrics();
    let deadline = tokio::time::Instant::now() + SETTLE;
    while metrics.num_alive_tasks() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        metrics.num_alive_tasks(),
        0,
        "tasks outlived the connection by {SETTLE:?}"
    );
    assert_eq!(
        LIVE_TUNNELS.load(Ordering::SeqCst),
        0,
        "tunnels outlived the connection"
    );
}

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a tokio runtime");
    runtime.block_on(run(data));
});
