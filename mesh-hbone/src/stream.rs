//! [`HboneStream`]: the bytes of one tunnelled TCP connection, as `AsyncRead + AsyncWrite` over an HTTP/2
//! CONNECT stream.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
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
                    self.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_to_io)?;
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
