//! What crosses the link between two nodes: an in-process packet capture of one interface, TCP streams
//! rebuilt from it, and the TLS record layer read from those streams.
//!
//! The capture is an `AF_PACKET` socket opened inside the node's namespace (socket2, no unsafe, no
//! external tool) with a classic BPF filter on the interface index, because an unbound packet socket
//! also sees the namespace's loopback, where the application's plaintext legitimately travels between
//! the app and its proxy. Frames queued before the filter was attached are discarded.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mesh_test::netns::Netns;
use socket2::{Domain, Protocol, SockFilter, Socket, Type};

/// Every protocol, as `AF_PACKET` spells it (`ETH_P_ALL`, in network byte order).
const ETH_P_ALL: u16 = 0x0003;
/// Classic BPF opcodes (linux/filter.h: `BPF_LD|BPF_W|BPF_ABS`, `BPF_JMP|BPF_JEQ|BPF_K`, `BPF_RET|BPF_K`)
/// and the ancillary load of the interface's index (`SKF_AD_OFF + SKF_AD_IFINDEX`).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JEQ_K: u16 = 0x15;
const BPF_RET_K: u16 = 0x06;
const SKF_AD_IFINDEX: u32 = 0xFFFF_F000 + 8;
/// At most this much is kept; the tests that capture move kilobytes.
const MAX_CAPTURE_BYTES: usize = 256 << 20;

/// A running capture of one interface of a namespace.
pub struct LinkCapture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<std::io::Result<Vec<Vec<u8>>>>>,
}

impl LinkCapture {
    /// Starts capturing every frame sent or received on interface `ifindex` of `node`.
    pub fn start(node: &Netns, ifindex: u32) -> LinkCapture {
        let socket = node.run(move || open(ifindex)).unwrap().unwrap_or_else(|e| {
            panic!(
                "cannot open an AF_PACKET socket (CAP_NET_RAW over the namespace is required: run the \
                 test in mesh_test::netns::isolated): {e}"
            )
        });
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut frames = Vec::new();
            let mut kept = 0;
            // Large enough for a GSO frame (an IPv4 packet is at most 64 KiB).
            let mut buf = vec![0u8; 128 * 1024];
            let mut stopped_at = None;
            loop {
                // Whatever keeps arriving after `stop` (keepalives) is not waited for long.
                if stopping.load(Ordering::Relaxed)
                    && stopped_at.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(2)
                {
                    return Ok(frames);
                }
                match (&socket).read(&mut buf) {
                    Ok(n) => {
                        if kept + n <= MAX_CAPTURE_BYTES {
                            kept += n;
                            frames.push(buf[..n].to_vec());
                        }
                    }
                    // After `stop`, what is still queued is read first: the loop ends on the first
                    // timeout.
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        if stopping.load(Ordering::Relaxed) {
                            return Ok(frames);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        });
        LinkCapture {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops and returns the frames, in capture order.
    pub fn stop(mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap().unwrap()
    }
}

impl Drop for LinkCapture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn open(ifindex: u32) -> std::io::Result<Socket> {
    let protocol = Protocol::from(i32::from(ETH_P_ALL.to_be()));
    let socket = Socket::new(Domain::PACKET, Type::RAW, Some(protocol))?;
    socket.attach_filter(&[
        SockFilter::new(BPF_LD_W_ABS, 0, 0, SKF_AD_IFINDEX),
        SockFilter::new(BPF_JMP_JEQ_K, 0, 1, ifindex),
        SockFilter::new(BPF_RET_K, 0, 0, u32::MAX),
        SockFilter::new(BPF_RET_K, 0, 0, 0),
    ])?;
    socket.set_nonblocking(true)?;
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        match (&socket).read(&mut buf) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    socket.set_nonblocking(false)?;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    Ok(socket)
}

/// One direction of a TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Flow {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
}

impl Flow {
    pub fn reverse(&self) -> Flow {
        Flow {
            src: self.dst,
            dst: self.src,
        }
    }
}

/// The bytes of one direction, in sequence order.
#[derive(Debug, Default)]
pub struct Stream {
    /// Whether the connection's SYN was captured (so the stream starts at its first byte).
    pub syn: bool,
    pub bytes: Vec<u8>,
    /// Whether some bytes were missing from the capture (filled with zeros).
    pub gaps: bool,
}

/// A parsed IPv4/TCP frame: its flow, sequence number, SYN flag and payload.
fn tcp_segment(frame: &[u8]) -> Option<(Flow, u32, bool, &[u8])> {
    if frame.len() < 14 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[14..];
    if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 6 {
        return None;
    }
    let header = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let ip = if total >= header && total <= ip.len() {
        &ip[..total]
    } else {
        ip
    };
    let tcp = ip.get(header..)?;
    if tcp.len() < 20 {
        return None;
    }
    let offset = usize::from(tcp[12] >> 4) * 4;
    let src = SocketAddrV4::new(
        Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        u16::from_be_bytes([tcp[0], tcp[1]]),
    );
    let dst = SocketAddrV4::new(
        Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        u16::from_be_bytes([tcp[2], tcp[3]]),
    );
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let syn = tcp[13] & 0x02 != 0;
    Some((Flow { src, dst }, seq, syn, tcp.get(offset..)?))
}

/// The TCP streams in `frames`, each direction rebuilt by sequence number (retransmissions and
/// reordering are harmless; a frame seen twice, as sent and as received, too).
pub fn tcp_streams(frames: &[Vec<u8>]) -> BTreeMap<Flow, Stream> {
    struct Partial {
        base: Option<u32>,
        syn: bool,
        segments: Vec<(u32, Vec<u8>)>,
    }
    let mut partial: BTreeMap<Flow, Partial> = BTreeMap::new();
    for frame in frames {
        let Some((flow, seq, syn, payload)) = tcp_segment(frame) else {
            continue;
        };
        let entry = partial.entry(flow).or_insert(Partial {
            base: None,
            syn: false,
            segments: Vec::new(),
        });
        if syn {
            entry.syn = true;
            entry.base = Some(seq.wrapping_add(1));
            continue;
        }
        let base = *entry.base.get_or_insert(seq);
        let offset = seq.wrapping_sub(base);
        // Before the first byte we know of (a retransmission of older data): not part of the stream.
        if !payload.is_empty() && offset < (1 << 30) {
            entry.segments.push((offset, payload.to_vec()));
        }
    }
    partial
        .into_iter()
        .map(|(flow, mut p)| {
            p.segments.sort_by_key(|(offset, _)| *offset);
            let mut stream = Stream {
                syn: p.syn,
                ..Stream::default()
            };
            for (offset, bytes) in p.segments {
                let offset = usize::try_from(offset).unwrap();
                let end = offset + bytes.len();
                if offset > stream.bytes.len() {
                    stream.gaps = true;
                    stream.bytes.resize(offset, 0);
                }
                if end > stream.bytes.len() {
                    let new = stream.bytes.len() - offset;
                    stream.bytes.extend_from_slice(&bytes[new..]);
                }
            }
            (flow, stream)
        })
        .collect()
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// TLS record content types.
pub const CHANGE_CIPHER_SPEC: u8 = 0x14;
pub const ALERT: u8 = 0x15;
pub const HANDSHAKE: u8 = 0x16;
pub const APPLICATION_DATA: u8 = 0x17;

/// The TLS records of a stream that starts at a record boundary: (content type, body). The stream may
/// end inside a record (the capture stopped while the connection was open); anything that is not a
/// well-formed record header is an error.
pub fn tls_records(stream: &[u8]) -> Result<Vec<(u8, &[u8])>, String> {
    let mut records = Vec::new();
    let mut rest = stream;
    while rest.len() >= 5 {
        let (content_type, version, length) = (
            rest[0],
            u16::from_be_bytes([rest[1], rest[2]]),
            usize::from(u16::from_be_bytes([rest[3], rest[4]])),
        );
        let offset = stream.len() - rest.len();
        if ![CHANGE_CIPHER_SPEC, ALERT, HANDSHAKE, APPLICATION_DATA].contains(&content_type) {
            return Err(format!("content type {content_type:#04x} at byte {offset}"));
        }
        if !(0x0301..=0x0303).contains(&version) {
            return Err(format!("record version {version:#06x} at byte {offset}"));
        }
        // TLS 1.3 allows 2^14 bytes of plaintext plus 256 of expansion.
        if length > (1 << 14) + 256 {
            return Err(format!("record length {length} at byte {offset}"));
        }
        if rest.len() < 5 + length {
            break;
        }
        records.push((content_type, &rest[5..5 + length]));
        rest = &rest[5 + length..];
    }
    Ok(records)
}

/// The version a ServerHello handshake message selects: its `supported_versions` extension (TLS 1.3's
/// way of saying so), else its legacy version field.
pub fn server_hello_version(handshake: &[u8]) -> Option<u16> {
    if *handshake.first()? != 2 {
        return None;
    }
    let legacy = u16::from_be_bytes([*handshake.get(4)?, *handshake.get(5)?]);
    // type, length(3), legacy_version(2), random(32), then the session id.
    let mut at = 4 + 2 + 32;
    let session_id = usize::from(*handshake.get(at)?);
    at += 1 + session_id + 2 + 1;
    let extensions_end =
        at + 2 + usize::from(u16::from_be_bytes([*handshake.get(at)?, *handshake.get(at + 1)?]));
    at += 2;
    while at + 4 <= extensions_end.min(handshake.len()) {
        let kind = u16::from_be_bytes([handshake[at], handshake[at + 1]]);
        let length = usize::from(u16::from_be_bytes([handshake[at + 2], handshake[at + 3]]));
        if kind == 0x002b && length == 2 {
            return Some(u16::from_be_bytes([
                *handshake.get(at + 4)?,
                *handshake.get(at + 5)?,
            ]));
        }
        at += 4 + length;
    }
    Some(legacy)
}
