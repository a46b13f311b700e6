//! The ZDS transport: a non-blocking `SOCK_SEQPACKET` unix socket driven by tokio, one message per packet,
//! with file descriptors passed as `SCM_RIGHTS` (rustix's safe wrappers).
//!
//! tokio has no seqpacket type, so the socket is registered with the reactor as a `UnixStream` (as Istio's
//! ztunnel does): only its readiness is used; every read and write goes through `recvmsg`/`send` here,
//! which keep the packet boundaries.

use std::io::{self, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;

use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendFlags,
    SocketAddrUnix, SocketFlags, SocketType,
};
use tokio::io::Interest;
use tokio::net::UnixStream;

/// File descriptors one receive makes room for. istio-cni sends at most one, but a packet carrying a few
/// more must still be seen whole, so that every one of them is closed and the message refused; beyond
/// this the kernel reports `MSG_CTRUNC` (and closes the ones that did not fit).
const MAX_FDS: usize = 4;

/// One received packet.
#[derive(Debug)]
pub(crate) struct Packet {
    /// Bytes of the message placed in the buffer (0 means the peer closed the connection).
    pub(crate) len: usize,
    /// The file descriptors that came with it, now owned by us (closed when dropped).
    pub(crate) fds: Vec<OwnedFd>,
    /// The packet was larger than the buffer; the rest was discarded (`MSG_TRUNC`).
    pub(crate) truncated: bool,
    /// Ancillary data did not fit (`MSG_CTRUNC`): more descriptors than we make room for.
    pub(crate) control_truncated: bool,
}

/// A connected `SOCK_SEQPACKET` socket registered with the tokio reactor.
#[derive(Debug)]
pub(crate) struct SeqPacket {
    socket: UnixStream,
}

impl SeqPacket {
    /// Connects to the listener at `addr` (`ECONNREFUSED` or `ENOENT` when nobody listens: the caller
    /// retries). Bound the wait with a timeout: a full backlog makes the connect wait.
    pub(crate) async fn connect(addr: &SocketAddrUnix) -> io::Result<SeqPacket> {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )?;
        let connected = rustix::net::connect(&fd, addr);
        let socket = UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))?;
        match connected {
            Ok(()) => {}
            // A non-blocking unix connect whose listener's backlog is full: done once writable.
            Err(Errno::AGAIN | Errno::INPROGRESS) => {
                socket.writable().await?;
                if let Some(e) = socket.take_error()? {
                    return Err(e);
                }
            }
            Err(e) => return Err(e.into()),
        }
        Ok(SeqPacket { socket })
    }

    /// Sends `bytes` as one packet (with no file descriptors).
    pub(crate) async fn send(&self, bytes: &[u8]) -> io::Result<()> {
        let sent = self
            .socket
            .async_io(Interest::WRITABLE, || {
                // MSG_NOSIGNAL: a closed peer is an EPIPE error here, never a process-wide SIGPIPE.
                Ok(rustix::net::send(&self.socket, bytes, SendFlags::NOSIGNAL)?)
            })
            .await?;
        if sent != bytes.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {sent} of {} bytes of a packet", bytes.len()),
            ));
        }
        Ok(())
    }

    /// Receives one packet into `buf`, with any file descriptors it carries. Cancel-safe: a packet is
    /// only taken off the socket inside a single poll, so dropping the future never loses one.
    pub(crate) async fn recv(&self, buf: &mut [u8]) -> io::Result<Packet> {
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        self.socket
            .async_io(Interest::READABLE, || {
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let mut iov = [IoSliceMut::new(&mut *buf)];
                // CMSG_CLOEXEC: a pod's namespace must not leak into programs this process runs.
                let msg =
                    rustix::net::recvmsg(&self.socket, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
                let mut fds = Vec::new();
                for message in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(received) = message {
                        fds.extend(received);
                    }
                }
                Ok(Packet {
                    len: msg.bytes.min(iov[0].len()),
                    fds,
                    truncated: msg.flags.contains(ReturnFlags::TRUNC),
                    control_truncated: msg.flags.contains(ReturnFlags::CTRUNC),
                })
            })
            .await
    }
}
