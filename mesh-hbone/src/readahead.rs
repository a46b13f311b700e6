//! [`ReadAhead`]: fewer, larger socket reads under TLS.
//!
//! rustls pulls ciphertext from its transport at most 4 KiB per `read` call, whatever the record size, so
//! a 16 KiB TLS record costs four or five system calls (plus one more that returns `WouldBlock`). Bulk
//! HBONE traffic is made of such records. `ReadAhead` sits between the socket and rustls: small reads are
//! served from a buffer that one large `read` filled. The buffer is released when the socket has nothing
//! more to give after a small read (interactive traffic, or the PING every HBONE connection exchanges while
//! idle), so an idle HBONE connection holds none of it; after a large read it is kept, because releasing
//! and reallocating it between the bursts of a bulk transfer costs more than the copy saves (glibc trims
//! the freed memory and faults it back in: a bulk bench lost a fifth of its throughput that way).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Size of one read-ahead from the socket: four maximal TLS records (16 KiB of plaintext plus overhead
/// each), which lets one system call bring a whole burst of HTTP/2 DATA frames.
const READ_AHEAD: usize = 4 * (16 * 1024 + 256);

/// A read at least this large marks bulk traffic, for which the buffer is kept between reads.
const BULK_FILL: usize = 16 * 1024;

/// A transport whose small reads are served from one larger read-ahead; writes pass straight through.
#[derive(Debug)]
pub(crate) struct ReadAhead<IO> {
    io: IO,
    /// Bytes read from `io` and not yet handed out. No capacity while the socket is idle.
    buffered: BytesMut,
    /// Size of the last read from `io`: whether the traffic is bulk.
    last_fill: usize,
}

impl<IO> ReadAhead<IO> {
    pub(crate) fn new(io: IO) -> Self {
        ReadAhead {
            io,
            buffered: BytesMut::new(),
            last_fill: 0,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for ReadAhead<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buffered.is_empty() {
            if out.remaining() >= READ_AHEAD {
                // The caller's buffer is as large as ours would be: read into it directly.
                return Pin::new(&mut this.io).poll_read(cx, out);
            }
            this.buffered.reserve(READ_AHEAD);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.buffered) {
                Poll::Pending => {
                    // Nothing to read now, maybe for a long time: give the memory back, unless this is a
                    // pause in bulk traffic.
                    if this.last_fill < BULK_FILL {
                        this.buffered = BytesMut::new();
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(error)) => {
                    this.buffered = BytesMut::new();
                    return Poll::Ready(Err(error));
                }
                // EOF: `out` stays empty, which tells the caller.
                Poll::Ready(Ok(0)) => {
                    this.buffered = BytesMut::new();
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(n)) => this.last_fill = n,
            }
        }
        let n = this.buffered.len().min(out.remaining());
        out.put_slice(&this.buffered[..n]);
        this.buffered.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for ReadAhead<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.io).poll_shutdown(cx))?;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_see_every_byte_in_order_and_eof() {
        let (mut writer, reader) = tokio::io::duplex(1 << 20);
        let mut reader = ReadAhead::new(reader);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writing = tokio::spawn(async move {
            writer.write_all(&sent).await.unwrap();
            writer.shutdown().await.unwrap();
        });
        let mut received = Vec::new();
        let mut small = [0u8; 4096];
        loop {
            let n = reader.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            received.extend_from_slice(&small[..n]);
        }
        writing.await.unwrap();
        assert_eq!(received, data);
    }

    #[tokio::test]
    async fn an_idle_transport_holds_no_buffer() {
        let (mut writer, reader) = tokio::io::duplex(1 << 20);
        let mut reader = ReadAhead::new(reader);
        writer.write_all(b"hello").await.unwrap();
        let mut out = [0u8; 16];
        let n = reader.read(&mut out).await.unwrap();
        assert_eq!(&out[..n], b"hello");
        // The next read finds nothing and waits; the buffer is gone meanwhile.
        let pending = tokio::time::timeout(std::time::Duration::from_millis(20), reader.read(&mut out)).await;
        assert!(pending.is_err(), "nothing was written, so the read waits");
        assert_eq!(reader.buffered.capacity(), 0);
        writer.write_all(b"again").await.unwrap();
        let n = reader.read(&mut out).await.unwrap();
        assert_eq!(&out[..n], b"again");
    }

    #[tokio::test]
    async fn the_buffer_stays_between_bulk_reads_and_goes_after_a_small_one() {
        let (mut writer, reader) = tokio::io::duplex(1 << 20);
        let mut reader = ReadAhead::new(reader);
        writer.write_all(&vec![3u8; READ_AHEAD]).await.unwrap();
        let mut out = vec![0u8; 4096];
        let mut total = 0;
        while total < READ_AHEAD {
            total += reader.read(&mut out).await.unwrap();
        }
        let wait = std::time::Duration::from_millis(20);
        assert!(tokio::time::timeout(wait, reader.read(&mut out)).await.is_err());
        assert!(
            reader.buffered.capacity() > 0,
            "a pause in bulk traffic keeps the buffer"
        );
        writer.write_all(b"ping").await.unwrap();
        assert_eq!(reader.read(&mut out).await.unwrap(), 4);
        assert!(tokio::time::timeout(wait, reader.read(&mut out)).await.is_err());
        assert_eq!(
            reader.buffered.capacity(),
            0,
            "after a small read an idle socket holds nothing"
        );
    }

    #[tokio::test]
    async fn large_reads_bypass_the_buffer_and_writes_pass_through() {
        let (mut peer, local) = tokio::io::duplex(1 << 20);
        let mut local = ReadAhead::new(local);
        peer.write_all(&[9u8; 1000]).await.unwrap();
        let mut big = vec![0u8; READ_AHEAD];
        let n = local.read(&mut big).await.unwrap();
        assert_eq!(&big[..n], &[9u8; 1000][..]);
        assert_eq!(local.buffered.capacity(), 0);
        local.write_all(b"back").await.unwrap();
        let mut back = [0u8; 4];
        peer.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"back");
    }
}
