//! A fake istio-cni for in-pod tests: the server side of ZDS, the protocol istio-cni uses to hand the node
//! proxy each pod's network namespace.
//!
//! [`FakeCni::bind`] listens on a `SOCK_SEQPACKET` unix socket where the proxy under test is told to
//! connect (ztunnel's `INPOD_UDS`); [`FakeCni::accept`] takes its connection and checks its `ZdsHello`;
//! the [`CniConnection`] then sends requests one packet each, an `add` carrying the pod's namespace as an
//! `SCM_RIGHTS` file descriptor, and reads the proxy's ack to each, as istio-cni does (requests and acks
//! are paired by order only). The messages are the ones mesh-xds generates from `zds.proto`, so a node
//! proxy with its own copy of the messages is checked against them on the wire.
//!
//! Every blocking step gives up after the fake's timeout ([`DEFAULT_STEP_TIMEOUT`] unless
//! [`FakeCni::bind_with_timeout`] says otherwise), so a test can never hang on a proxy that does not
//! answer. Binding and talking need no privileges; the namespaces sent are the caller's business
//! ([`Netns::file`](crate::netns::Netns::file) opens one a test created).
//!
//! ```no_run
//! use mesh_test::cni::{FakeCni, workload_info};
//! use mesh_test::netns::Netns;
//!
//! # fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let cni = FakeCni::bind("/tmp/example/ztunnel.sock")?;
//! // ... start the node proxy with INPOD_UDS=/tmp/example/ztunnel.sock ...
//! let conn = cni.accept()?;
//! let pod = Netns::create("pod")?;
//! let info = workload_info("default", "web-0", "web");
//! assert_eq!(conn.add("0c2b5a9e-uid", &info, &pod.file()?)?, "", "an empty ack error: served");
//! assert_eq!(conn.snapshot_sent()?, "");
//! # Ok(())
//! # }
//! ```

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_xds::proto::istio::workload::zds::{
    self, AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, WorkloadRequest, WorkloadResponse, ZdsHello,
    workload_request::Payload, workload_response,
};
use prost::Message;
use rustix::io::Errno;
use rustix::net::sockopt::{self, Timeout};
use rustix::net::{
    AddressFamily, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix,
    SocketFlags, SocketType,
};

pub use mesh_xds::proto::istio::workload::zds::WorkloadInfo;

/// How long each blocking step (accepting the proxy, sending a request, reading its answer) may take by
/// default: long enough for a proxy starting on a loaded CI machine.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest packet read: istio-cni and ztunnel both read ZDS messages into 1024 bytes.
pub const MAX_PACKET_BYTES: usize = 1024;

/// The most file descriptors [`CniConnection::send_raw`] attaches to one packet (tests of a proxy that
/// must refuse more than one).
pub const MAX_FDS: usize = 4;

/// Why the fake istio-cni could not do what a test asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CniError {
    /// The socket path is unusable (too long for a unix socket address, say).
    #[error("{path:?} is not a usable unix socket path: {source}")]
    Path {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },

    /// A socket call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },

    /// The node proxy did not connect, take a packet, or answer within the step timeout.
    #[error("{what}: nothing within {timeout:?}")]
    Timeout {
        /// What was being waited for.
        what: &'static str,
        /// The step timeout.
        timeout: Duration,
    },

    /// The node proxy closed the connection where an answer was expected.
    #[error("{what}: the node proxy closed the connection")]
    Closed {
        /// What was being waited for.
        what: &'static str,
    },

    /// A packet from the node proxy is not the message expected.
    #[error("{what}: {source}")]
    Decode {
        /// What was being read.
        what: &'static str,
        /// The protobuf error.
        #[source]
        source: prost::DecodeError,
    },

    /// The node proxy's hello announced another protocol version.
    #[error("the node proxy's hello announces version {0}, expected V1")]
    Version(i32),

    /// The node proxy answered with something other than an ack.
    #[error("the node proxy's response carries no ack")]
    NoAck,

    /// The node proxy sent a packet where the test expected it to close the connection.
    #[error("expected the node proxy to close the connection, it sent {0} bytes")]
    NotClosed(usize),

    /// Only part of a packet was sent.
    #[error("sent {sent} of {len} bytes of a packet")]
    ShortSend {
        /// Bytes sent.
        sent: usize,
        /// Bytes of the packet.
        len: usize,
    },

    /// More descriptors than [`MAX_FDS`] for one packet.
    #[error("{0} file descriptors for one packet; at most {MAX_FDS}")]
    TooManyFds(usize),
}

/// `name`, `namespace` and `service_account` as istio-cni describes a pod in `add`.
pub fn workload_info(namespace: &str, name: &str, service_account: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
    }
}

/// istio-cni's listening socket; the socket file is removed when this is dropped (as istio-cni going
/// away does, which makes the node proxy reconnect with backoff).
#[derive(Debug)]
pub struct FakeCni {
    listener: OwnedFd,
    path: PathBuf,
    timeout: Duration,
}

impl FakeCni {
    /// Listens on `path` (replacing a stale socket file there, as istio-cni does) with
    /// [`DEFAULT_STEP_TIMEOUT`].
    pub fn bind(path: impl AsRef<Path>) -> Result<FakeCni, CniError> {
        Self::bind_with_timeout(path, DEFAULT_STEP_TIMEOUT)
    }

    /// Listens on `path`; every blocking step gives up after `timeout`.
    pub fn bind_with_timeout(path: impl AsRef<Path>, timeout: Duration) -> Result<FakeCni, CniError> {
        let path = path.as_ref().to_owned();
        let addr = SocketAddrUnix::new(path.as_path()).map_err(|e| CniError::Path {
            path: path.clone(),
            source: e.into(),
        })?;
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_error("removing a stale socket file")(e));
            }
            _ => {}
        }
        let listener = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(errno("creating the listening socket"))?;
        rustix::net::bind(&listener, &addr).map_err(errno("binding the listening socket"))?;
        rustix::net::listen(&listener, 16).map_err(errno("listening"))?;
        // accept() honours the receive timeout, which bounds the wait for the node proxy.
        sockopt::set_socket_timeout(&listener, Timeout::Recv, Some(timeout))
            .map_err(errno("setting the accept timeout"))?;
        Ok(FakeCni {
            listener,
            path,
            timeout,
        })
    }

    /// The socket path (what the node proxy is told to connect to).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The step timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Accepts the node proxy's next connection and reads its `ZdsHello`, which must say V1.
    pub fn accept(&self) -> Result<CniConnection, CniError> {
        let fd = rustix::net::accept_with(&self.listener, SocketFlags::CLOEXEC).map_err(|e| {
            if e == Errno::AGAIN {
                CniError::Timeout {
                    what: "waiting for the node proxy to connect",
                    timeout: self.timeout,
                }
            } else {
                CniError::Io {
                    what: "accepting the node proxy's connection",
                    source: e.into(),
                }
            }
        })?;
        for direction in [Timeout::Recv, Timeout::Send] {
            sockopt::set_socket_timeout(&fd, direction, Some(self.timeout))
                .map_err(errno("setting the connection's timeouts"))?;
        }
        let conn = CniConnection {
            fd,
            timeout: self.timeout,
        };
        let hello = conn.recv_expecting("reading the node proxy's hello")?;
        let hello = ZdsHello::decode(hello.as_slice()).map_err(|source| CniError::Decode {
            what: "the node proxy's hello",
            source,
        })?;
        if hello.version != i32::from(zds::Version::V1) {
            return Err(CniError::Version(hello.version));
        }
        Ok(conn)
    }
}

impl Drop for FakeCni {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One accepted connection from the node proxy. Each request method sends one packet and returns the
/// ack's error text: empty when the proxy handled the request, else its reason. Dropping the connection
/// closes it (the node proxy then reconnects and expects a new snapshot).
#[derive(Debug)]
pub struct CniConnection {
    fd: OwnedFd,
    timeout: Duration,
}

impl CniConnection {
    /// Sends `payload`, with `fds` attached, and returns the ack's error text. For requests a real
    /// istio-cni never sends (descriptors on a `del`, an `add` without one), to test refusals.
    pub fn request(&self, payload: Payload, fds: &[BorrowedFd<'_>]) -> Result<String, CniError> {
        let request = WorkloadRequest {
            payload: Some(payload),
        };
        self.send_raw(&request.encode_to_vec(), fds)?;
        self.read_ack()
    }

    /// Starts serving pod `uid` (istio-cni sends the Kubernetes pod UID), described by `info`, in the
    /// network namespace `netns` (a `/var/run/netns/<name>` or `/proc/<pid>/ns/net` file).
    pub fn add(&self, uid: &str, info: &WorkloadInfo, netns: &impl AsFd) -> Result<String, CniError> {
        let add = AddWorkload {
            uid: uid.to_owned(),
            workload_info: Some(info.clone()),
        };
        self.request(Payload::Add(add), &[netns.as_fd()])
    }

    /// Keeps pod `uid` from an earlier connection (only valid before `snapshot_sent`).
    pub fn keep(&self, uid: &str) -> Result<String, CniError> {
        let keep = KeepWorkload { uid: uid.to_owned() };
        self.request(Payload::Keep(keep), &[])
    }

    /// Stops serving pod `uid`.
    pub fn del(&self, uid: &str) -> Result<String, CniError> {
        let del = DelWorkload { uid: uid.to_owned() };
        self.request(Payload::Del(del), &[])
    }

    /// Says every existing pod has been sent on this connection.
    pub fn snapshot_sent(&self) -> Result<String, CniError> {
        self.request(Payload::SnapshotSent(SnapshotSent {}), &[])
    }

    /// Sends `bytes` as one packet with `fds` attached (at most [`MAX_FDS`]), without reading an answer.
    pub fn send_raw(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), CniError> {
        if fds.len() > MAX_FDS {
            return Err(CniError::TooManyFds(fds.len()));
        }
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(CniError::TooManyFds(fds.len()));
        }
        let sent = rustix::net::sendmsg(
            &self.fd,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        )
        .map_err(|e| self.timeout_or_io(e, "sending a request"))?;
        if sent != bytes.len() {
            return Err(CniError::ShortSend {
                sent,
                len: bytes.len(),
            });
        }
        Ok(())
    }

    /// Receives one packet (at most [`MAX_PACKET_BYTES`]); empty when the node proxy closed the
    /// connection.
    pub fn recv_raw(&self) -> Result<Vec<u8>, CniError> {
        let mut buf = vec![0u8; MAX_PACKET_BYTES];
        let (len, _) = rustix::net::recv(&self.fd, &mut buf[..], RecvFlags::empty())
            .map_err(|e| self.timeout_or_io(e, "waiting for the node proxy's answer"))?;
        buf.truncate(len);
        Ok(buf)
    }

    /// Reads the answer to the request just sent, and returns its ack's error text.
    pub fn read_ack(&self) -> Result<String, CniError> {
        let bytes = self.recv_expecting("waiting for an ack")?;
        let response = WorkloadResponse::decode(bytes.as_slice()).map_err(|source| CniError::Decode {
            what: "the node proxy's ack",
            source,
        })?;
        match response.payload {
            Some(workload_response::Payload::Ack(ack)) => Ok(ack.error),
            None => Err(CniError::NoAck),
        }
    }

    /// Waits (up to the step timeout) for the node proxy to close the connection.
    pub fn expect_closed(&self) -> Result<(), CniError> {
        match self.recv_raw()? {
            bytes if bytes.is_empty() => Ok(()),
            bytes => Err(CniError::NotClosed(bytes.len())),
        }
    }

    /// A packet that must be there: an empty read (the proxy closed) is an error.
    fn recv_expecting(&self, what: &'static str) -> Result<Vec<u8>, CniError> {
        let bytes = self.recv_raw()?;
        if bytes.is_empty() {
            return Err(CniError::Closed { what });
        }
        Ok(bytes)
    }

    fn timeout_or_io(&self, e: Errno, what: &'static str) -> CniError {
        if e == Errno::AGAIN {
            CniError::Timeout {
                what,
                timeout: self.timeout,
            }
        } else {
            CniError::Io {
                what,
                source: e.into(),
            }
        }
    }
}

fn errno(what: &'static str) -> impl Fn(Errno) -> CniError {
    move |e| CniError::Io {
        what,
        source: e.into(),
    }
}

fn io_error(what: &'static str) -> impl Fn(io::Error) -> CniError {
    move |source| CniError::Io { what, source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A socket path in a fresh directory, removed with it.
    struct Dir(PathBuf);

    impl Dir {
        fn new() -> Dir {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("mk-cni-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The node proxy's side, just enough of it: connect, say hello, answer each request.
    fn proxy(path: &Path) -> OwnedFd {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        rustix::net::connect(&fd, &SocketAddrUnix::new(path).unwrap()).unwrap();
        let hello = ZdsHello {
            version: zds::Version::V1.into(),
        };
        rustix::net::send(&fd, &hello.encode_to_vec(), SendFlags::NOSIGNAL).unwrap();
        fd
    }

    #[test]
    fn requests_carry_their_descriptor_and_acks_come_back_in_order() {
        let dir = Dir::new();
        let cni = FakeCni::bind_with_timeout(dir.0.join("z.sock"), Duration::from_secs(5)).unwrap();
        let node_proxy = std::thread::spawn({
            let fd = proxy(cni.path());
            move || {
                let mut seen = Vec::new();
                for error in ["", "no such pod"] {
                    let mut buf = [0u8; MAX_PACKET_BYTES];
                    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                    let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
                    let msg = rustix::net::recvmsg(
                        &fd,
                        &mut [io::IoSliceMut::new(&mut buf)],
                        &mut control,
                        RecvFlags::CMSG_CLOEXEC,
                    )
                    .unwrap();
                    let fds: usize = control
                        .drain()
                        .map(|m| match m {
                            rustix::net::RecvAncillaryMessage::ScmRights(fds) => fds.count(),
                            _ => 0,
                        })
                        .sum();
                    let request = WorkloadRequest::decode(&buf[..msg.bytes]).unwrap();
                    seen.push((request.payload.unwrap(), fds));
                    let ack = WorkloadResponse {
                        payload: Some(workload_response::Payload::Ack(zds::Ack { error: error.into() })),
                    };
                    rustix::net::send(&fd, &ack.encode_to_vec(), SendFlags::NOSIGNAL).unwrap();
                }
                seen
            }
        });
        let conn = cni.accept().unwrap();
        let netns = std::fs::File::open("/proc/self/ns/net").unwrap();
        let info = workload_info("shop", "web-0", "web");
        assert_eq!(conn.add("uid-1", &info, &netns).unwrap(), "");
        assert_eq!(conn.del("uid-2").unwrap(), "no such pod");
        let seen = node_proxy.join().unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(
            seen[0],
            (
                Payload::Add(AddWorkload {
                    uid: "uid-1".into(),
                    workload_info: Some(info)
                }),
                1
            )
        );
        assert_eq!(seen[1], (Payload::Del(DelWorkload { uid: "uid-2".into() }), 0));
        // The proxy's side is gone with the thread: the connection reads as closed.
        conn.expect_closed().unwrap();
    }

    #[test]
    fn a_silent_proxy_times_out_instead_of_hanging() {
        let dir = Dir::new();
        let cni = FakeCni::bind_with_timeout(dir.0.join("z.sock"), Duration::from_millis(200)).unwrap();
        let error = cni.accept().unwrap_err();
        assert!(matches!(error, CniError::Timeout { .. }), "{error}");

        // Connected, but it never says hello.
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        rustix::net::connect(&fd, &SocketAddrUnix::new(cni.path()).unwrap()).unwrap();
        let error = cni.accept().unwrap_err();
        assert!(matches!(error, CniError::Timeout { .. }), "{error}");
        drop(fd);

        // A proxy that says hello and then never acks.
        let _silent = proxy(cni.path());
        let conn = cni.accept().unwrap();
        let error = conn.snapshot_sent().unwrap_err();
        assert!(matches!(error, CniError::Timeout { .. }), "{error}");
    }

    #[test]
    fn the_socket_file_goes_with_the_fake_and_a_stale_one_is_replaced() {
        let dir = Dir::new();
        let path = dir.0.join("z.sock");
        std::fs::write(&path, "stale").unwrap();
        let cni = FakeCni::bind(&path).unwrap();
        assert!(path.exists());
        drop(cni);
        assert!(!path.exists());
        let long = dir.0.join("x".repeat(200));
        assert!(matches!(FakeCni::bind(long), Err(CniError::Path { .. })));
    }
}
