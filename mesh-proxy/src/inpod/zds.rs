//! The ZDS client: the node proxy's side of the protocol istio-cni uses to hand it pods.
//!
//! [`ZdsClient::run`] connects to istio-cni's `SOCK_SEQPACKET` socket, says [`proto::ZdsHello`], and then
//! answers every request with an [`proto::Ack`] (empty, or saying what failed) after handling it through
//! a [`PodManager`]: `add` comes with the pod's network namespace as a file descriptor, `keep`, `del` and
//! `snapshot_sent` without. When the socket goes away (istio-cni restarts), it reconnects with backoff,
//! keeping the pods it serves, and reconciles them against the snapshot of the new connection (see
//! `state.rs`).
//!
//! A malformed packet (too large, undecodable, with the wrong number of descriptors) or a request that
//! breaks the protocol is answered with an error ack, and the connection is then dropped and reopened, as
//! Istio's ztunnel does: the new snapshot resynchronizes both sides. (ztunnel exits on protocol
//! violations; we keep serving our pods and retry with backoff instead, since exiting would take every
//! pod's listeners down with it.) Unexpected descriptors are closed.

use std::fmt;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::drain::DrainWatch;
use prost::Message;
use rustix::net::SocketAddrUnix;
use tokio::sync::watch;
use tokio::time::Instant;

use super::netns::InPodNetns;
use super::packet::{Packet, SeqPacket};
use super::proto::{self, workload_request::Payload};
use super::state::{Handled, PodTable};
use crate::error::ProxyError;

/// istio-cni's default socket path (`INPOD_UDS`).
pub const DEFAULT_SOCKET_PATH: &str = "/var/run/ztunnel/ztunnel.sock";

/// The largest request accepted, as Istio's ztunnel reads them; a larger packet is truncated and refused.
/// A request holds a UID, a pod name and namespace, and a service account: well under this.
pub const MAX_REQUEST_BYTES: usize = 1024;

/// The longest error text sent in an ack: istio-cni reads acks into a 1024-byte buffer too.
const MAX_ACK_ERROR_BYTES: usize = 900;

/// An error from a [`PodManager`] (an embedder's own type), reported to istio-cni as text.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The boxed future [`PodManager`] methods return, so the trait stays object-safe.
pub type PodFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What istio-cni says about a pod besides its UID.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadInfo {
    /// The pod name.
    pub name: String,
    /// The pod namespace.
    pub namespace: String,
    /// The pod's service account.
    pub service_account: String,
}

/// Starts and stops the serving of pods: the part of in-pod mode the node proxy binary provides.
/// [`ListenerPodManager`](super::netns::ListenerPodManager) binds each pod's listeners and hands them
/// over.
pub trait PodManager: Send + Sync {
    /// Starts serving the pod `uid` inside `netns`. Return only once it is served (its listeners bound):
    /// the ack that follows tells istio-cni the pod's containers may start sending traffic. An error is
    /// reported to istio-cni, and the add is retried later. A second `add` for a served UID means its
    /// namespace changed; the caller has already called [`PodManager::del`] for the old one.
    fn add(
        &self,
        uid: Arc<str>,
        info: WorkloadInfo,
        netns: InPodNetns,
    ) -> PodFuture<'_, Result<(), BoxError>>;

    /// Stops serving the pod `uid` (called only for pods whose `add` succeeded).
    fn del(&self, uid: Arc<str>) -> PodFuture<'_, ()>;
}

/// Why a ZDS message or connection failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ZdsError {
    /// The configured socket path cannot be a unix socket address (too long, say).
    #[error("{path:?} is not a usable unix socket path: {source}")]
    SocketPath {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },

    /// Connecting to istio-cni failed (nobody listens yet, say).
    #[error("connecting to istio-cni at {path:?}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },

    /// Reading or writing the connection failed.
    #[error("ZDS connection: {0}")]
    Io(#[source] std::io::Error),

    /// istio-cni did not take a message within the I/O timeout.
    #[error("writing to istio-cni timed out after {0:?}")]
    WriteTimeout(Duration),

    /// A packet was larger than [`MAX_REQUEST_BYTES`].
    #[error("received a truncated message (larger than {MAX_REQUEST_BYTES} bytes)")]
    Truncated,

    /// A packet carried more file descriptors than we make room for.
    #[error("received truncated control data (too many file descriptors)")]
    ControlTruncated,

    /// A packet was not a `WorkloadRequest`.
    #[error("malformed message: {0}")]
    Decode(#[from] prost::DecodeError),

    /// A request had no payload we know (an unknown or removed request type).
    #[error("message without a known payload")]
    NoPayload,

    /// A request named no pod.
    #[error("{kind} with an empty pod uid")]
    EmptyUid {
        /// The request type.
        kind: &'static str,
    },

    /// An `add` came without a network namespace descriptor.
    #[error("add for pod {uid:?} carries no network namespace file descriptor")]
    MissingNetns {
        /// The pod's UID.
        uid: Arc<str>,
    },

    /// An `add` came with more than one descriptor.
    #[error("add carries {count} file descriptors, expected exactly one")]
    TooManyFds {
        /// How many.
        count: usize,
    },

    /// A request other than `add` carried descriptors.
    #[error("{kind} carries {count} file descriptor(s); only add may carry one")]
    UnexpectedFds {
        /// The request type.
        kind: &'static str,
        /// How many.
        count: usize,
    },

    /// An `add` did not say which pod it is (name, namespace, service account).
    #[error("add for pod {uid:?} has no workload_info")]
    MissingWorkloadInfo {
        /// The pod's UID.
        uid: Arc<str>,
    },

    /// A `keep` came after the snapshot was complete (it only makes sense while replaying).
    #[error("keep for pod {uid:?} after the snapshot was complete")]
    KeepAfterSnapshot {
        /// The pod's UID.
        uid: Arc<str>,
    },

    /// A second `snapshot_sent` on one connection.
    #[error("snapshot_sent received twice on one connection")]
    DuplicateSnapshot,
}

/// A decoded request from istio-cni.
#[derive(Debug)]
pub(crate) enum ZdsRequest {
    /// Start serving a pod.
    Add {
        uid: Arc<str>,
        info: WorkloadInfo,
        netns: OwnedFd,
    },
    /// Keep a pod from before (only before `snapshot_sent`).
    Keep { uid: Arc<str> },
    /// Stop serving a pod.
    Del { uid: Arc<str> },
    /// The snapshot is complete.
    SnapshotSent,
}

/// Decodes one received packet. Every descriptor in `fds` is either returned inside the request (one,
/// with an `add`) or closed.
pub(crate) fn decode_request(
    bytes: &[u8],
    mut fds: Vec<OwnedFd>,
    truncated: bool,
    control_truncated: bool,
) -> Result<ZdsRequest, ZdsError> {
    if truncated {
        return Err(ZdsError::Truncated);
    }
    if control_truncated {
        return Err(ZdsError::ControlTruncated);
    }
    let payload = proto::WorkloadRequest::decode(bytes)?
        .payload
        .ok_or(ZdsError::NoPayload)?;
    let (kind, uid) = match &payload {
        Payload::Add(add) => ("add", add.uid.as_str()),
        Payload::Keep(keep) => ("keep", keep.uid.as_str()),
        Payload::Del(del) => ("del", del.uid.as_str()),
        Payload::SnapshotSent(_) => ("snapshot_sent", "-"),
    };
    if uid.is_empty() {
        return Err(ZdsError::EmptyUid { kind });
    }
    let uid: Arc<str> = uid.into();
    match payload {
        Payload::Add(add) => {
            if fds.len() > 1 {
                return Err(ZdsError::TooManyFds { count: fds.len() });
            }
            let netns = fds
                .pop()
                .ok_or_else(|| ZdsError::MissingNetns { uid: uid.clone() })?;
            let info = add
                .workload_info
                .ok_or(ZdsError::MissingWorkloadInfo { uid: uid.clone() })?;
            Ok(ZdsRequest::Add {
                uid,
                info: WorkloadInfo {
                    name: info.name,
                    namespace: info.namespace,
                    service_account: info.service_account,
                },
                netns,
            })
        }
        _ if !fds.is_empty() => Err(ZdsError::UnexpectedFds {
            kind,
            count: fds.len(),
        }),
        Payload::Keep(_) => Ok(ZdsRequest::Keep { uid }),
        Payload::Del(_) => Ok(ZdsRequest::Del { uid }),
        Payload::SnapshotSent(_) => Ok(ZdsRequest::SnapshotSent),
    }
}

/// Encodes the ack for a request: `error` empty on success.
fn encode_ack(error: &str) -> Vec<u8> {
    let mut end = error.len().min(MAX_ACK_ERROR_BYTES);
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    proto::WorkloadResponse {
        payload: Some(proto::workload_response::Payload::Ack(proto::Ack {
            error: error[..end].to_owned(),
        })),
    }
    .encode_to_vec()
}

/// Settings of the ZDS client.
#[derive(Debug, Clone)]
pub struct ZdsConfig {
    /// istio-cni's socket (`INPOD_UDS`, [`DEFAULT_SOCKET_PATH`]).
    pub socket_path: PathBuf,
    /// The most pods served (and named in one snapshot); more are refused with an error ack.
    pub max_pods: usize,
    /// How long a [`PodManager::add`] may take before it counts as failed. istio-cni waits 5 s for each
    /// ack, and pairs acks with requests by order only, so an ack must never come after that.
    pub add_timeout: Duration,
    /// How often pods whose start failed are retried.
    pub retry_interval: Duration,
    /// The first pause before reconnecting; it doubles (with jitter) while connections keep failing.
    pub reconnect_backoff_min: Duration,
    /// The longest pause before reconnecting.
    pub reconnect_backoff_max: Duration,
    /// How long writing one message may wait for istio-cni to read.
    pub write_timeout: Duration,
}

impl Default for ZdsConfig {
    fn default() -> Self {
        // Istio's ztunnel: reconnect from 10 ms up to 15 s, retry failed pods every 5 s.
        ZdsConfig {
            socket_path: PathBuf::from(DEFAULT_SOCKET_PATH),
            max_pods: 4096,
            add_timeout: Duration::from_secs(4),
            retry_interval: Duration::from_secs(5),
            reconnect_backoff_min: Duration::from_millis(10),
            reconnect_backoff_max: Duration::from_secs(15),
            write_timeout: Duration::from_secs(5),
        }
    }
}

/// Where the client stands, for readiness and the admin endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZdsStatus {
    /// Connected to istio-cni.
    pub connected: bool,
    /// This connection's snapshot is complete (so the pods served are the ones istio-cni knows).
    pub snapshot_received: bool,
    /// Pods served.
    pub pods: usize,
    /// Pods whose start failed, waiting for a retry.
    pub pending: usize,
    /// Connections established so far (each one replays the snapshot).
    pub connections: u64,
}

impl ZdsStatus {
    /// Ready, as Istio's ztunnel reports it: connected, snapshot complete, and no pod failing to start.
    pub fn ready(&self) -> bool {
        self.connected && self.snapshot_received && self.pending == 0
    }
}

/// The ZDS client; [`ZdsClient::run`] drives it.
pub struct ZdsClient {
    config: ZdsConfig,
    addr: SocketAddrUnix,
    manager: Arc<dyn PodManager>,
    table: PodTable,
    status: watch::Sender<ZdsStatus>,
}

impl fmt::Debug for ZdsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZdsClient")
            .field("config", &self.config)
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

/// Why a connection ended.
enum End {
    /// Shutdown was requested.
    Drained,
    /// istio-cni closed it, or it failed; reconnect.
    Closed(Option<ZdsError>),
}

impl ZdsClient {
    /// A client for `config.socket_path`, handling pods through `manager`.
    pub fn new(config: ZdsConfig, manager: Arc<dyn PodManager>) -> Result<ZdsClient, ProxyError> {
        let addr = SocketAddrUnix::new(config.socket_path.as_path()).map_err(|e| ZdsError::SocketPath {
            path: config.socket_path.clone(),
            source: e.into(),
        })?;
        Ok(ZdsClient {
            table: PodTable::new(config.max_pods, config.add_timeout),
            config,
            addr,
            manager,
            status: watch::Sender::new(ZdsStatus::default()),
        })
    }

    /// Follows the client's status.
    pub fn status(&self) -> watch::Receiver<ZdsStatus> {
        self.status.subscribe()
    }

    /// Connects, serves requests, and reconnects whenever the connection ends, until `drain` is
    /// signalled. Pods keep being served across reconnections; stopping them at shutdown is the
    /// [`PodManager`]'s business.
    pub async fn run(mut self, drain: DrainWatch) {
        let mut backoff = self.config.reconnect_backoff_min;
        loop {
            let connected = tokio::time::timeout(self.config.write_timeout, SeqPacket::connect(&self.addr))
                .await
                .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
            let end = match connected {
                Ok(socket) => {
                    let end = self.serve_connection(&socket, &drain).await;
                    self.publish(false);
                    if self.table.snapshot_received() {
                        // A healthy connection ended (istio-cni restarting): reconnect promptly.
                        backoff = self.config.reconnect_backoff_min;
                    }
                    end
                }
                Err(source) => End::Closed(Some(ZdsError::Connect {
                    path: self.config.socket_path.clone(),
                    source,
                })),
            };
            let wait = match end {
                End::Drained => return,
                End::Closed(reason) => {
                    let wait = jitter(backoff);
                    match reason {
                        Some(e) => {
                            tracing::warn!(error = %e, retry_in = ?wait, "ZDS connection to istio-cni failed")
                        }
                        None => tracing::info!(retry_in = ?wait, "istio-cni closed the ZDS connection"),
                    }
                    backoff = (backoff * 2).min(self.config.reconnect_backoff_max);
                    wait
                }
            };
            tokio::select! {
                biased;
                _ = drain.signaled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn serve_connection(&mut self, socket: &SeqPacket, drain: &DrainWatch) -> End {
        self.table.new_connection();
        let hello = proto::ZdsHello {
            version: proto::Version::V1.into(),
        };
        if let Err(e) = self.send(socket, &hello.encode_to_vec()).await {
            return End::Closed(Some(e));
        }
        self.status.send_modify(|s| s.connections += 1);
        self.publish(true);
        tracing::info!(path = ?self.config.socket_path, "connected to istio-cni");

        let mut buf = vec![0u8; MAX_REQUEST_BYTES];
        let mut retry_at: Option<Instant> = None;
        loop {
            let packet = tokio::select! {
                biased;
                _ = drain.signaled() => return End::Drained,
                _ = sleep_until(retry_at) => {
                    retry_at = self.table.retry_pending(self.manager.as_ref()).await
                        .then(|| Instant::now() + self.config.retry_interval);
                    self.publish(true);
                    continue;
                }
                packet = socket.recv(&mut buf) => packet,
            };
            let Packet {
                len,
                fds,
                truncated,
                control_truncated,
            } = match packet {
                Ok(packet) => packet,
                Err(e) => return End::Closed(Some(ZdsError::Io(e))),
            };
            if len == 0 && !truncated {
                return End::Closed(None);
            }
            let handled = match decode_request(&buf[..len], fds, truncated, control_truncated) {
                Ok(request) => {
                    tracing::debug!(?request, "ZDS request");
                    self.table.handle(request, self.manager.as_ref()).await
                }
                Err(e) => Handled::Violation(e),
            };
            let (error, end) = match handled {
                Handled::Ok => (String::new(), None),
                Handled::PodFailed(reason) => {
                    tracing::warn!(%reason, "an in-pod pod could not be served");
                    if retry_at.is_none() && self.table.pending() > 0 {
                        retry_at = Some(Instant::now() + self.config.retry_interval);
                    }
                    (reason, None)
                }
                Handled::Violation(e) => (e.to_string(), Some(e)),
            };
            self.publish(true);
            if let Err(e) = self.send(socket, &encode_ack(&error)).await {
                return End::Closed(Some(e));
            }
            if let Some(e) = end {
                return End::Closed(Some(e));
            }
        }
    }

    async fn send(&self, socket: &SeqPacket, bytes: &[u8]) -> Result<(), ZdsError> {
        match tokio::time::timeout(self.config.write_timeout, socket.send(bytes)).await {
            Ok(sent) => sent.map_err(ZdsError::Io),
            Err(_) => Err(ZdsError::WriteTimeout(self.config.write_timeout)),
        }
    }

    fn publish(&self, connected: bool) {
        let status = ZdsStatus {
            connected,
            snapshot_received: connected && self.table.snapshot_received(),
            pods: self.table.running(),
            pending: self.table.pending(),
            connections: self.status.borrow().connections,
        };
        self.status.send_if_modified(|current| {
            let changed = *current != status;
            *current = status;
            changed
        });
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `base` scaled by a random factor in [0.8, 1.2), so many node proxies do not reconnect in lockstep.
fn jitter(base: Duration) -> Duration {
    base.mul_f64(0.8 + fastrand::f64() * 0.4)
}

#[doc(hidden)]
/// Entry point for the `zds` fuzz target in `fuzz/`: not part of the API.
pub mod __fuzz {
    use std::collections::HashSet;
    use std::fs::File;
    use std::os::fd::OwnedFd;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::{
        BoxError, MAX_REQUEST_BYTES, PodFuture, PodManager, WorkloadInfo, ZdsRequest, decode_request,
        encode_ack,
    };
    use crate::inpod::netns::InPodNetns;
    use crate::inpod::state::{Handled, PodTable};

    /// Pods one session may serve: small, so that the limits are reached.
    const MAX_PODS: usize = 4;

    /// The pods the manager serves, checked against the calls the table makes.
    #[derive(Debug, Default)]
    struct Served(Mutex<HashSet<Arc<str>>>);

    impl Served {
        fn with<R>(&self, f: impl FnOnce(&mut HashSet<Arc<str>>) -> R) -> R {
            let mut guard = match self.0.lock() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            f(&mut guard)
        }
    }

    impl PodManager for Served {
        fn add(
            &self,
            uid: Arc<str>,
            _info: WorkloadInfo,
            _netns: InPodNetns,
        ) -> PodFuture<'_, Result<(), BoxError>> {
            Box::pin(async move {
                // The table must stop a pod before starting it again (a new namespace).
                assert!(
                    !self.with(|s| s.contains(&uid)),
                    "add for pod {uid:?}, already served"
                );
                if uid.contains("fail") {
                    return Err("address in use".into());
                }
                self.with(|s| s.insert(uid));
                Ok(())
            })
        }

        fn del(&self, uid: Arc<str>) -> PodFuture<'_, ()> {
            Box::pin(async move {
                assert!(self.with(|s| s.remove(&uid)), "del for pod {uid:?}, not served");
            })
        }
    }

    /// A file to pass as a packet's descriptor: our own network namespace, another kind of namespace
    /// (a different id, as when a pod's sandbox is recreated), or a file that is no namespace.
    fn fd(kind: u8) -> Option<OwnedFd> {
        let path = match kind % 3 {
            0 => "/proc/self/ns/net",
            1 => "/proc/self/ns/uts",
            _ => "/dev/null",
        };
        File::open(path).ok().map(OwnedFd::from)
    }

    /// Plays `bytes` as a series of ZDS packets from istio-cni through the request decoder and the pod
    /// table, the way the client does (a protocol violation ends the connection; the next packet is on a
    /// new one), checking on every step: the ack fits istio-cni's read buffer, the table never holds
    /// more than its limit of pods, it starts and stops pods in a consistent order (never starting a
    /// served pod or stopping one it did not start) and its count matches the pods started, and after a
    /// snapshot it serves only pods that snapshot named.
    ///
    /// Each packet is a control byte, a big-endian `u16` length and that many bytes of message. Control
    /// bits: 0-1 how many descriptors come with it (0-3), 2-3 which file they are, 4 a new connection
    /// before it, 5 retry pending pods before it, 6 the kernel truncated its control data. Returns how many
    /// pods are served at the end.
    pub async fn session(mut bytes: &[u8]) -> usize {
        let manager = Served::default();
        let mut table = PodTable::new(MAX_PODS, Duration::from_secs(4));
        table.new_connection();
        // What the current connection's snapshot named (add or keep, not deleted since): a superset of
        // what the table must keep when `snapshot_sent` arrives.
        let mut named: HashSet<Arc<str>> = HashSet::new();
        let mut snapshot_done = false;
        while let [control, high, low, rest @ ..] = bytes {
            let len = usize::from(u16::from_be_bytes([*high, *low])).min(rest.len());
            let (message, next) = rest.split_at(len);
            bytes = next;
            if control & 0x10 != 0 {
                table.new_connection();
                named.clear();
                snapshot_done = false;
            }
            if control & 0x20 != 0 {
                table.retry_pending(&manager).await;
            }
            let fds: Vec<OwnedFd> = (0..control & 0x3)
                .filter_map(|_| fd((control >> 2) & 0x3))
                .collect();
            // As the socket delivers it: at most MAX_REQUEST_BYTES, flagged when there was more.
            let truncated = message.len() > MAX_REQUEST_BYTES;
            let message = &message[..message.len().min(MAX_REQUEST_BYTES)];
            let handled = match decode_request(message, fds, truncated, control & 0x40 != 0) {
                Ok(request) => {
                    let snapshot = matches!(request, ZdsRequest::SnapshotSent);
                    if !snapshot_done {
                        match &request {
                            ZdsRequest::Add { uid, .. } | ZdsRequest::Keep { uid } => {
                                named.insert(uid.clone());
                            }
                            ZdsRequest::Del { uid } => {
                                named.remove(uid);
                            }
                            ZdsRequest::SnapshotSent => {}
                        }
                    }
                    let handled = table.handle(request, &manager).await;
                    if snapshot && matches!(handled, Handled::Ok) {
                        snapshot_done = true;
                        manager.with(|served| {
                            let extra: Vec<_> = served.difference(&named).collect();
                            assert!(
                                extra.is_empty(),
                                "pods {extra:?} outlived a snapshot that did not name them"
                            );
                        });
                    }
                    handled
                }
                Err(e) => Handled::Violation(e),
            };
            let error = match &handled {
                Handled::Ok => String::new(),
                Handled::PodFailed(reason) => reason.clone(),
                Handled::Violation(e) => e.to_string(),
            };
            let ack = encode_ack(&error);
            assert!(ack.len() <= MAX_REQUEST_BYTES, "a {}-byte ack", ack.len());
            assert!(
                table.running() + table.pending() <= MAX_PODS,
                "{} running and {} pending pods, limit {MAX_PODS}",
                table.running(),
                table.pending()
            );
            assert_eq!(
                manager.with(|s| s.len()),
                table.running(),
                "pods served vs pods the table counts"
            );
            if matches!(handled, Handled::Violation(_)) {
                table.new_connection();
                named.clear();
                snapshot_done = false;
            }
        }
        table.running()
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::*;

    fn fd() -> OwnedFd {
        File::open("/dev/null").unwrap().into()
    }

    fn request(payload: Payload) -> Vec<u8> {
        proto::WorkloadRequest {
            payload: Some(payload),
        }
        .encode_to_vec()
    }

    fn add(uid: &str, info: bool) -> Vec<u8> {
        request(Payload::Add(proto::AddWorkload {
            uid: uid.into(),
            workload_info: info.then(|| proto::WorkloadInfo {
                name: "web-0".into(),
                namespace: "shop".into(),
                service_account: "web".into(),
            }),
        }))
    }

    #[test]
    fn add_carries_its_namespace_and_workload_info() {
        let request = decode_request(&add("u1", true), vec![fd()], false, false).unwrap();
        let ZdsRequest::Add { uid, info, .. } = request else {
            panic!("an add: {request:?}");
        };
        assert_eq!(&*uid, "u1");
        assert_eq!((info.name.as_str(), info.namespace.as_str()), ("web-0", "shop"));
        assert_eq!(info.service_account, "web");
    }

    #[test]
    fn descriptors_must_match_the_request_type() {
        let e = decode_request(&add("u1", true), vec![], false, false).unwrap_err();
        assert!(matches!(e, ZdsError::MissingNetns { .. }), "{e}");
        let e = decode_request(&add("u1", true), vec![fd(), fd()], false, false).unwrap_err();
        assert!(matches!(e, ZdsError::TooManyFds { count: 2 }), "{e}");
        let del = request(Payload::Del(proto::DelWorkload { uid: "u1".into() }));
        let e = decode_request(&del, vec![fd()], false, false).unwrap_err();
        assert!(
            matches!(
                e,
                ZdsError::UnexpectedFds {
                    kind: "del",
                    count: 1
                }
            ),
            "{e}"
        );
        let snapshot = request(Payload::SnapshotSent(proto::SnapshotSent {}));
        assert!(matches!(
            decode_request(&snapshot, vec![], false, false),
            Ok(ZdsRequest::SnapshotSent)
        ));
    }

    #[test]
    fn malformed_packets_are_refused() {
        let e = decode_request(&add("u1", true), vec![fd()], true, false).unwrap_err();
        assert!(matches!(e, ZdsError::Truncated), "{e}");
        let e = decode_request(&add("u1", true), vec![fd()], false, true).unwrap_err();
        assert!(matches!(e, ZdsError::ControlTruncated), "{e}");
        let e = decode_request(&[0xff, 0xff, 0xff], vec![], false, false).unwrap_err();
        assert!(matches!(e, ZdsError::Decode(_)), "{e}");
        // Field 4 (the removed no_snapshot_present) is skipped as unknown, leaving no payload.
        let e = decode_request(&[0x22, 0x00], vec![], false, false).unwrap_err();
        assert!(matches!(e, ZdsError::NoPayload), "{e}");
        let e = decode_request(&add("", true), vec![fd()], false, false).unwrap_err();
        assert!(matches!(e, ZdsError::EmptyUid { kind: "add" }), "{e}");
        let e = decode_request(&add("u1", false), vec![fd()], false, false).unwrap_err();
        assert!(matches!(e, ZdsError::MissingWorkloadInfo { .. }), "{e}");
    }

    #[test]
    fn ack_errors_are_capped_on_a_character_boundary() {
        let long = "é".repeat(1000);
        let ack = proto::WorkloadResponse::decode(encode_ack(&long).as_slice()).unwrap();
        let Some(proto::workload_response::Payload::Ack(ack)) = ack.payload else {
            panic!("an ack");
        };
        assert!(ack.error.len() <= MAX_ACK_ERROR_BYTES && ack.error.len() >= MAX_ACK_ERROR_BYTES - 1);
        assert!(encode_ack(&long).len() < MAX_REQUEST_BYTES);
    }

    /// The fuzz target's session (which asserts the table's invariants on every step) over a typical
    /// conversation: a snapshot, a failing pod retried, a reconnection that reconciles, a violation.
    #[tokio::test(start_paused = true)]
    async fn the_fuzz_session_holds_its_invariants_over_a_conversation() {
        fn packet(control: u8, message: &[u8]) -> Vec<u8> {
            let mut out = vec![control];
            out.extend_from_slice(&u16::try_from(message.len()).unwrap().to_be_bytes());
            out.extend_from_slice(message);
            out
        }
        let snapshot = request(Payload::SnapshotSent(proto::SnapshotSent {}));
        let keep = request(Payload::Keep(proto::KeepWorkload { uid: "b".into() }));
        let conversation = [
            packet(1, &add("a", true)),
            packet(1, &add("b", true)),
            packet(1, &add("fail-c", true)),
            packet(0, &snapshot),
            packet(
                0x20,
                &request(Payload::Del(proto::DelWorkload { uid: "fail-c".into() })),
            ),
            packet(0x10 | 1, &add("a", true)),
            packet(0, &keep),
            packet(0, &snapshot),
            packet(0, &keep),
            packet(0, &[0xff, 0xff]),
        ]
        .concat();
        // "fail-c" never started and was deleted; "a" and "b" outlived the reconnection.
        assert_eq!(super::__fuzz::session(&conversation).await, 2);
    }
}
