//! [`HboneStream`]: the bytes of one tunnelled TCP connection, as `AsyncRead + AsyncWrite` over an HTTP/2
//! CONNECT stream.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use http::HeaderMap;
use mesh_core::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One tunnelled connection. Reads return the peer's DATA frames; writes become DATA frames, within
/// HTTP/2 flow control. `shutdown` sends END_STREAM, a TCP half-close the other side sees as EOF; a peer's
/// RST_STREAM surfaces as `ConnectionReset`, and dropping the stream before both directions have ended
/// sends RST_STREAM (an abort), so FIN and RST keep their meaning end to end.
pub struct HboneStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes not yet read: at most one DATA frame.
    unread: Bytes,
    read_done: bool,
    write_done: bool,
    peer: SpiffeId,
    headers: HeaderMap,
    /// Reusable memory for the DATA frames of large writes.
    write_regions: WriteRegions,
    /// Released when the stream is dropped (the client pool's accounting of streams per connection).
    _guard: Option<Box<dyn Send + Sync>>,
}

impl HboneStream {
    pub(crate) fn new(
        send: SendStream<Bytes>,
        recv: RecvStream,
        peer: SpiffeId,
        headers: HeaderMap,
        guard: Option<Box<dyn Send + Sync>>,
    ) -> Self {
        HboneStream {
            send,
            recv,
            unread: Bytes::new(),
            read_done: false,
            write_done: false,
            peer,
            headers,
            write_regions: WriteRegions::default(),
            _guard: guard,
        }
    }

    /// The SPIFFE identity the other side proved in its TLS handshake.
    pub fn peer_identity(&self) -> &SpiffeId {
        &self.peer
    }

    /// The headers of the other side's CONNECT message: on the client, the server's `200` response
    /// (ztunnel puts the destination's `baggage` there); on the server, the client's request.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// Zero-copy read: the bytes of the peer's next DATA frame as they arrived (no copy into a caller's
    /// buffer), `None` once the peer has half-closed (END_STREAM). Like `poll_read`, a frame's flow-control
    /// window reopens as soon as it is taken, so what the caller holds is what it chose to hold. Reads through
    /// `AsyncRead` and through this method may be mixed.
    pub fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.unread.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.unread))));
        }
        loop {
            if self.read_done {
                return Poll::Ready(Ok(None));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    if !data.is_empty() {
                        return Poll::Ready(Ok(Some(data)));
                    }
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => self.read_done = true,
            }
        }
    }

    /// Zero-copy write: queues `data` as DATA frames without copying it, taking from its front as
    /// HTTP/2 flow control allows. Ready once all of `data` is queued (it is then empty); pending, with the
    /// rest still in `data`, while the peer's window or the send buffer is full.
    pub fn poll_write_chunk(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        if data.is_empty() {
            return Poll::Ready(Ok(()));
        }
        if self.write_done {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "HBONE stream already shut down",
            )));
        }
        self.send.reserve_capacity(data.len());
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let chunk = data.split_to(n.min(data.len()));
                    self.send.send_data(chunk, false).map_err(h2_to_io)?;
                    if data.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                    self.send.reserve_capacity(data.len());
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "HBONE stream closed",
                    )));
                }
            }
        }
    }

    /// Aborts the tunnel with RST_STREAM (CANCEL): what a TCP RST on one side becomes on the other.
    pub fn reset(&mut self) {
        self.send.send_reset(h2::Reason::CANCEL);
        self.write_done = true;
        self.read_done = true;
    }
}

impl fmt::Debug for HboneStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HboneStream")
            .field("peer", &self.peer)
            .field("stream_id", &self.send.stream_id())
            .field("read_done", &self.read_done)
            .field("write_done", &self.write_done)
            .finish_non_exhaustive()
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.unread.is_empty() {
                let n = this.unread.len().min(buf.remaining());
                buf.put_slice(&this.unread[..n]);
                this.unread.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.read_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // The window reopens as soon as a frame is taken in: what we hold unread is bounded
                    // by one frame, so the peer cannot make us buffer more than that.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    this.unread = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => this.read_done = true,
            }
        }
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.write_done {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "HBONE stream already shut down",
            )));
        }
        self.send.reserve_capacity(buf.len());
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(buf.len());
                    let this = &mut *self;
                    let chunk = this.write_regions.chunk(&buf[..n]);
                    this.send.send_data(chunk, false).map_err(h2_to_io)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "HBONE stream closed",
                    )));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Queued DATA frames are written by the connection task; there is nothing to flush here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_done {
            self.write_done = true;
            self.send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// Memory for the DATA frames a stream writes.
///
/// Each frame must own its bytes until the connection task has written them, so a write copies the
/// caller's slice into a buffer. A fresh allocation per large write is expensive: it is freed on the
/// connection task's thread, the allocator returns the pages to the kernel, and the next write faults them
/// in again (in a bulk benchmark this was 11 % of HBONE's CPU). So large writes are carved out of a few
/// reusable regions, reclaimed once h2 has sent everything carved from them. The pool grows only under bulk
/// load (up to about the h2 send buffer in flight) and is released as soon as writes turn small again, so an
/// idle or interactive tunnel holds no region at all.
#[derive(Debug, Default)]
struct WriteRegions {
    regions: Vec<BytesMut>,
}

impl WriteRegions {
    /// Writes below this are copied into their own small allocation (cheap, and what idle tunnels see).
    const LARGE_WRITE: usize = 8 * 1024;
    /// Size of one region.
    const REGION: usize = 512 * 1024;
    /// Regions kept per stream: enough to cover the client's 4 MiB h2 send buffer plus the frame being
    /// written, so steady bulk transfer reuses memory instead of allocating.
    const MAX_REGIONS: usize = 10;

    fn chunk(&mut self, data: &[u8]) -> Bytes {
        if data.len() < Self::LARGE_WRITE || data.len() > Self::REGION {
            // Bulk is over (or this write is unusually large): give the regions back.
            if data.len() < Self::LARGE_WRITE {
                self.regions.clear();
            }
            return Bytes::copy_from_slice(data);
        }
        let reusable = self
            .regions
            .iter_mut()
            .position(|region| region.capacity() >= data.len() || region.try_reclaim(data.len()));
        let index = match reusable {
            Some(index) => index,
            None if self.regions.len() < Self::MAX_REGIONS => {
                self.regions.push(BytesMut::with_capacity(Self::REGION));
                self.regions.len() - 1
            }
            None => return Bytes::copy_from_slice(data),
        };
        let region = &mut self.regions[index];
        region.extend_from_slice(data);
        region.split().freeze()
    }
}

/// A peer's RST_STREAM is a reset connection; an I/O failure keeps its kind; anything else is a broken
/// tunnel.
pub(crate) fn h2_to_io(error: h2::Error) -> io::Error {
    if error.is_reset() {
        return io::Error::new(io::ErrorKind::ConnectionReset, error);
    }
    if error.is_io() {
        return error
            .into_io()
            .unwrap_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "HTTP/2 connection failed"));
    }
    io::Error::new(io::ErrorKind::BrokenPipe, error)
}

#[cfg(test)]
mod tests {
    use super::WriteRegions;

    #[test]
    fn regions_are_reused_once_their_chunks_are_released_and_dropped_when_writes_turn_small() {
        let mut regions = WriteRegions::default();
        let large = vec![7u8; 64 * 1024];
        let first = regions.chunk(&large);
        assert_eq!(&first[..], &large[..]);
        let region_base = first.as_ptr();
        assert_eq!(regions.regions.len(), 1);
        // Eight 64 KiB chunks fill the 512 KiB region; while they are alive the next one needs a new region.
        let held: Vec<_> = (0..7).map(|_| regions.chunk(&large)).collect();
        let overflow = regions.chunk(&large);
        assert_eq!(regions.regions.len(), 2);
        // Once everything carved from the first region is released, it is reused without allocating.
        drop((first, held));
        let reused = regions.chunk(&large);
        assert_eq!(
            reused.as_ptr(),
            region_base,
            "the first region's memory is reused"
        );
        assert_eq!(regions.regions.len(), 2);
        drop((overflow, reused));
        // A small write ends the bulk phase: no region is kept.
        let small = regions.chunk(b"ping");
        assert_eq!(&small[..], b"ping");
        assert!(regions.regions.is_empty());
    }

    #[test]
    fn the_pool_is_bounded() {
        let mut regions = WriteRegions::default();
        let large = vec![1u8; 256 * 1024];
        let held: Vec<_> = (0..40).map(|_| regions.chunk(&large)).collect();
        assert_eq!(regions.regions.len(), WriteRegions::MAX_REGIONS);
        assert!(held.iter().all(|chunk| chunk.len() == large.len()));
    }
}
