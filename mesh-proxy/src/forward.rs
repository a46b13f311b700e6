//! Moving bytes between the two sides of a proxied connection, counting them as they go.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::telemetry::ConnectionRecord;

/// Per-direction buffer of [`copy_bidirectional`]. Small on purpose: an idle proxied connection should
/// cost little memory (the target is 10 KB per idle tunnelled connection, issue "benchmarks"), and the
/// HBONE side already batches into large HTTP/2 frames.
pub const COPY_BUFFER_BYTES: usize = 8 * 1024;

/// Copies both ways between `client` (the side the connection came from) and `upstream` until both
/// directions end, adding to `record`'s counters as bytes move: client -> upstream is "sent",
/// upstream -> client is "received". An orderly end of one direction (EOF) is passed on as a half-close
/// (`shutdown`, which HBONE carries as END_STREAM); an error on either side ends the copy with that error,
/// and the caller drops both sides (an `HboneStream` dropped before its end resets the stream).
pub async fn copy_bidirectional<C, U>(
    client: &mut C,
    upstream: &mut U,
    record: &Arc<ConnectionRecord>,
) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut client = Counted {
        inner: client,
        record,
        direction: Direction::Sent,
    };
    let mut upstream = Counted {
        inner: upstream,
        record,
        direction: Direction::Received,
    };
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, COPY_BUFFER_BYTES, COPY_BUFFER_BYTES)
        .await
        .map(|_| ())
}

#[derive(Clone, Copy)]
enum Direction {
    Sent,
    Received,
}

/// Counts what is read from the wrapped side into the record.
struct Counted<'a, S: ?Sized> {
    inner: &'a mut S,
    record: &'a ConnectionRecord,
    direction: Direction,
}

impl<S: AsyncRead + Unpin + ?Sized> AsyncRead for Counted<'_, S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut *this.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        if read > 0 {
            match this.direction {
                Direction::Sent => this.record.add_sent(read),
                Direction::Received => this.record.add_received(read),
            }
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> AsyncWrite for Counted<'_, S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
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
}
