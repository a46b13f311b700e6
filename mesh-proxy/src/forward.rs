//! Moving bytes between the two sides of a proxied connection, counting them as they go.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use mesh_hbone::HboneStream;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::telemetry::ConnectionRecord;

/// Where each direction's read buffer starts: enough for a typical request or response in one read.
pub const INITIAL_COPY_BUFFER_BYTES: usize = 16 * 1024;

/// The most a direction's read buffer grows to under bulk transfer. Large reads mean few system calls,
/// large HTTP/2 DATA frames and full TLS records, which is where bulk throughput comes from.
pub const MAX_COPY_BUFFER_BYTES: usize = 256 * 1024;

/// Copies both ways between `client` (the side the connection came from) and `upstream` until both
/// directions end, adding to `record`'s counters as bytes move: client -> upstream is "sent",
/// upstream -> client is "received". An orderly end of one direction (EOF) is passed on as a half-close
/// (`shutdown`, which HBONE carries as END_STREAM); an error on either side ends the copy with that error,
/// and the caller drops both sides (an `HboneStream` dropped before its end resets the stream).
///
/// Buffers adapt to the traffic: each direction reads into a buffer of
/// [`INITIAL_COPY_BUFFER_BYTES`] that grows fourfold whenever a read fills it, up to
/// [`MAX_COPY_BUFFER_BYTES`], and shrinks back when reads turn small. A direction that is not in the
/// middle of a bulk transfer releases its buffer whenever its side has nothing to read, so a new or
/// interactive proxied connection that goes idle holds no copy buffer at all.
pub async fn copy_bidirectional<C, U>(
    client: &mut C,
    upstream: &mut U,
    record: &Arc<ConnectionRecord>,
) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut sent = OneWay::new(Direction::Sent);
    let mut received = OneWay::new(Direction::Received);
    std::future::poll_fn(|cx| {
        let to_upstream = sent.poll_copy(cx, &mut *client, &mut *upstream, record)?;
        let to_client = received.poll_copy(cx, &mut *upstream, &mut *client, record)?;
        both_done(to_upstream, to_client)
    })
    .await
}

/// Passes an abort on: when a copy ended because a side was reset (a TCP RST, or an HBONE RST_STREAM,
/// which reads as `ConnectionReset`), `tcp` is set to close with an RST instead of a FIN when it is
/// dropped, so its peer does not take a cut-off stream for a complete one. Call it just before dropping
/// the plain TCP side of a finished copy.
pub fn pass_reset_on(tcp: &tokio::net::TcpStream, copy: &io::Result<()>) {
    if let Err(error) = copy
        && error.kind() == io::ErrorKind::ConnectionReset
    {
        // Best effort: if the option cannot be set, the close is a FIN, as it was.
        let _ = tcp.set_zero_linger();
    }
}

/// Which end of a proxied connection the HBONE tunnel is, for [`copy_with_tunnel`]'s byte counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelSide {
    /// The tunnel is where the connection came from (inbound: the peer proxy's CONNECT).
    Client,
    /// The tunnel leads to the destination (outbound: our CONNECT to the peer).
    Upstream,
}

/// [`copy_bidirectional`] between a plain byte stream and an HBONE tunnel, without copying the tunnel's
/// bytes through an intermediate buffer: what is read from `plain` goes into DATA frames as it was read,
/// and DATA frames are written to `plain` from the memory they arrived in. Same half-close, error and
/// counting rules as [`copy_bidirectional`] (with `side` saying which end is the client); the plain side's
/// reads use the same adaptive, released-when-idle buffers.
pub async fn copy_with_tunnel<P>(
    plain: &mut P,
    tunnel: &mut HboneStream,
    side: TunnelSide,
    record: &Arc<ConnectionRecord>,
) -> io::Result<()>
where
    P: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (plain_reads, tunnel_reads) = match side {
        TunnelSide::Upstream => (Direction::Sent, Direction::Received),
        TunnelSide::Client => (Direction::Received, Direction::Sent),
    };
    let mut into_tunnel = PlainToTunnel::new(plain_reads);
    let mut out_of_tunnel = TunnelToPlain::new(tunnel_reads);
    std::future::poll_fn(|cx| {
        let inward = into_tunnel.poll_copy(cx, &mut *plain, &mut *tunnel, record)?;
        let outward = out_of_tunnel.poll_copy(cx, &mut *tunnel, &mut *plain, record)?;
        both_done(inward, outward)
    })
    .await
}

/// A copy is done when both of its directions are.
fn both_done(first: Poll<()>, second: Poll<()>) -> Poll<io::Result<()>> {
    if first.is_ready() && second.is_ready() {
        Poll::Ready(Ok(()))
    } else {
        Poll::Pending
    }
}

/// The end of a direction: what was written is flushed, then the writer is shut down (a FIN, or
/// END_STREAM on a tunnel).
fn poll_finish<W: AsyncWrite + Unpin + ?Sized>(cx: &mut Context<'_>, writer: &mut W) -> Poll<io::Result<()>> {
    ready!(Pin::new(&mut *writer).poll_flush(cx))?;
    Pin::new(&mut *writer).poll_shutdown(cx)
}

fn count(record: &ConnectionRecord, direction: Direction, bytes: usize) {
    match direction {
        Direction::Sent => record.add_sent(bytes as u64),
        Direction::Received => record.add_received(bytes as u64),
    }
}

/// Adapts a read buffer's next size to the last read: fourfold after a full read, back to the start
/// after a small one.
fn next_size(size: usize, read: usize) -> usize {
    if read >= size {
        (size * 4).min(MAX_COPY_BUFFER_BYTES)
    } else if read < INITIAL_COPY_BUFFER_BYTES / 4 {
        INITIAL_COPY_BUFFER_BYTES
    } else {
        size
    }
}

/// When a side has nothing to read, perhaps for a long time: an interactive or new connection holds no
/// buffer meanwhile, but one in the middle of a bulk transfer (its buffer has grown) keeps it, because
/// freeing and reallocating a large buffer at every pause costs more than the copy it serves (glibc trims
/// the freed memory and faults it back in; an in-process bulk bench lost a fifth of its throughput that
/// way). A read smaller than a quarter of the initial size shrinks the buffer back, and the next pause
/// releases it. Istio's ztunnel keeps its grown buffers for the connection's life.
fn release_unless_bulk(buf: &mut BytesMut, size: usize) {
    if size <= INITIAL_COPY_BUFFER_BYTES {
        *buf = BytesMut::new();
    }
}

/// Plain side -> tunnel: each read's bytes become DATA frames as they are (`Bytes` shared, not copied).
struct PlainToTunnel {
    direction: Direction,
    /// Where the next read goes; no capacity while the plain side is idle.
    buf: BytesMut,
    /// Read, not yet queued on the tunnel.
    pending: Bytes,
    size: usize,
    read_eof: bool,
    done: bool,
}

impl PlainToTunnel {
    fn new(direction: Direction) -> Self {
        PlainToTunnel {
            direction,
            buf: BytesMut::new(),
            pending: Bytes::new(),
            size: INITIAL_COPY_BUFFER_BYTES,
            read_eof: false,
            done: false,
        }
    }

    fn poll_copy<P>(
        &mut self,
        cx: &mut Context<'_>,
        plain: &mut P,
        tunnel: &mut HboneStream,
        record: &ConnectionRecord,
    ) -> Poll<io::Result<()>>
    where
        P: AsyncRead + Unpin + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !self.pending.is_empty() {
                ready!(tunnel.poll_write_chunk(cx, &mut self.pending))?;
            }
            if self.read_eof {
                ready!(poll_finish(cx, tunnel))?;
                self.buf = BytesMut::new();
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            self.buf.reserve(self.size);
            match tokio_util::io::poll_read_buf(Pin::new(&mut *plain), cx, &mut self.buf) {
                Poll::Pending => {
                    release_unless_bulk(&mut self.buf, self.size);
                    return Poll::Pending;
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Ready(Ok(0)) => self.read_eof = true,
                Poll::Ready(Ok(n)) => {
                    count(record, self.direction, n);
                    self.size = next_size(self.size, n);
                    self.pending = self.buf.split().freeze();
                }
            }
        }
    }
}

/// Tunnel -> plain side: each DATA frame is written from the memory it arrived in.
struct TunnelToPlain {
    direction: Direction,
    /// Received, not yet all written.
    pending: Bytes,
    read_eof: bool,
    need_flush: bool,
    done: bool,
}

impl TunnelToPlain {
    fn new(direction: Direction) -> Self {
        TunnelToPlain {
            direction,
            pending: Bytes::new(),
            read_eof: false,
            need_flush: false,
            done: false,
        }
    }

    fn poll_copy<P>(
        &mut self,
        cx: &mut Context<'_>,
        tunnel: &mut HboneStream,
        plain: &mut P,
        record: &ConnectionRecord,
    ) -> Poll<io::Result<()>>
    where
        P: AsyncWrite + Unpin + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            while !self.pending.is_empty() {
                let n = ready!(Pin::new(&mut *plain).poll_write(cx, &self.pending))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pending.advance(n);
                self.need_flush = true;
            }
            if self.read_eof {
                ready!(poll_finish(cx, plain))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            match tunnel.poll_read_chunk(cx) {
                Poll::Pending => {
                    if self.need_flush {
                        ready!(Pin::new(&mut *plain).poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Ready(Ok(None)) => self.read_eof = true,
                Poll::Ready(Ok(Some(chunk))) => {
                    count(record, self.direction, chunk.len());
                    self.pending = chunk;
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Sent,
    Received,
}

/// One direction of the copy.
struct OneWay {
    direction: Direction,
    /// Bytes read and not all written yet; no capacity while the reader is idle.
    buf: BytesMut,
    /// How much of `buf` the writer has taken.
    written: usize,
    /// The capacity the next read asks for.
    size: usize,
    read_eof: bool,
    /// Bytes were written since the last flush.
    need_flush: bool,
    done: bool,
}

impl OneWay {
    fn new(direction: Direction) -> Self {
        OneWay {
            direction,
            buf: BytesMut::new(),
            written: 0,
            size: INITIAL_COPY_BUFFER_BYTES,
            read_eof: false,
            need_flush: false,
            done: false,
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        record: &ConnectionRecord,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            while self.written < self.buf.len() {
                let n = ready!(Pin::new(&mut *writer).poll_write(cx, &self.buf[self.written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.written += n;
                self.need_flush = true;
            }
            if self.read_eof {
                ready!(poll_finish(cx, writer))?;
                self.buf = BytesMut::new();
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            self.buf.clear();
            self.written = 0;
            self.buf.reserve(self.size);
            match tokio_util::io::poll_read_buf(Pin::new(&mut *reader), cx, &mut self.buf) {
                Poll::Pending => {
                    if self.need_flush {
                        ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    release_unless_bulk(&mut self.buf, self.size);
                    return Poll::Pending;
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Ready(Ok(0)) => self.read_eof = true,
                Poll::Ready(Ok(n)) => {
                    count(record, self.direction, n);
                    self.size = next_size(self.size, n);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Reporter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_counts_and_passes_half_close_on() {
        let record = Arc::new(ConnectionRecord::new(
            Reporter::Source,
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        ));
        let (mut client_app, mut client_side) = tokio::io::duplex(64);
        let (mut upstream_side, mut server_app) = tokio::io::duplex(64);
        let forwarding = {
            let record = record.clone();
            tokio::spawn(
                async move { copy_bidirectional(&mut client_side, &mut upstream_side, &record).await },
            )
        };
        let request = vec![7u8; 100_000];
        let client = tokio::spawn(async move {
            client_app.write_all(&request).await.unwrap();
            client_app.shutdown().await.unwrap();
            let mut reply = Vec::new();
            client_app.read_to_end(&mut reply).await.unwrap();
            reply
        });
        let mut received = Vec::new();
        server_app.read_to_end(&mut received).await.unwrap();
        assert_eq!(
            received.len(),
            100_000,
            "the client's FIN arrives after all its bytes"
        );
        server_app.write_all(b"done").await.unwrap();
        server_app.shutdown().await.unwrap();
        assert_eq!(client.await.unwrap(), b"done");
        forwarding.await.unwrap().unwrap();
        assert_eq!(record.sent(), 100_000);
        assert_eq!(record.received(), 4);
    }

    #[tokio::test]
    async fn buffers_grow_under_bulk_stay_through_its_pauses_and_go_when_reads_turn_small() {
        let record = ConnectionRecord::new(
            Reporter::Source,
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        let (mut app, mut reader) = tokio::io::duplex(4 * MAX_COPY_BUFFER_BYTES);
        let (mut writer, mut peer) = tokio::io::duplex(4 * MAX_COPY_BUFFER_BYTES);
        let mut one_way = OneWay::new(Direction::Sent);
        let mut poll_once = |one_way: &mut OneWay, reader: &mut tokio::io::DuplexStream| {
            let waker = std::task::Waker::noop();
            let mut cx = Context::from_waker(waker);
            one_way.poll_copy(&mut cx, reader, &mut writer, &record)
        };
        // Bulk: several reads that fill the buffer take it to the maximum.
        app.write_all(&vec![1u8; 2 * MAX_COPY_BUFFER_BYTES])
            .await
            .unwrap();
        assert!(poll_once(&mut one_way, &mut reader).is_pending());
        assert_eq!(one_way.size, MAX_COPY_BUFFER_BYTES);
        assert!(
            one_way.buf.capacity() > 0,
            "a pause in a bulk transfer keeps the grown buffer"
        );
        let mut copied = vec![0u8; 2 * MAX_COPY_BUFFER_BYTES];
        peer.read_exact(&mut copied).await.unwrap();
        assert!(copied.iter().all(|&b| b == 1));
        // A small read brings the next buffer back to the initial size.
        app.write_all(b"ping").await.unwrap();
        assert!(poll_once(&mut one_way, &mut reader).is_pending());
        assert_eq!(one_way.size, INITIAL_COPY_BUFFER_BYTES);
        assert_eq!(
            one_way.buf.capacity(),
            0,
            "once reads are small again, an idle reader leaves no buffer behind"
        );
        let mut ping = [0u8; 4];
        peer.read_exact(&mut ping).await.unwrap();
        assert_eq!(&ping, b"ping");
        assert_eq!(record.sent(), 2 * MAX_COPY_BUFFER_BYTES as u64 + 4);
    }
}
