//! A pod's network namespace, and the listeners the node proxy opens inside it.
//!
//! In-pod mode serves each pod from sockets that live in the pod's own network namespace: istio-cni's
//! iptables rules there redirect the pod's outbound traffic to 15001 and its inbound traffic to 15006 (or
//! 15008 for HBONE), all on the pod's loopback or addresses, while the proxy process stays in the node's
//! namespace. A socket belongs to the namespace of the thread that created it for its whole life, so
//! [`InPodNetns::run_in`] creates sockets on a short-lived thread that has joined the pod's namespace
//! (`setns`), and the rest of the proxy uses them from its ordinary runtime.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use mesh_core::drain::{self, DrainTrigger, DrainWatch};
use rustix::fs::FsWord;
use rustix::thread::LinkNameSpaceType;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

use super::zds::{BoxError, PodFuture, PodManager, WorkloadInfo};
use crate::error::ProxyError;

/// `NSFS_MAGIC` from `linux/magic.h`: the filesystem of namespace files (`/proc/<pid>/ns/net`, and the
/// bind mounts under `/var/run/netns`). rustix does not export it.
const NSFS_MAGIC: FsWord = 0x6e73_6673;

/// Identifies a network namespace: the device and inode of its nsfs file. Two descriptors refer to the
/// same namespace exactly when these match (as cilium, vishvananda/netns and ztunnel compare them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NetnsId {
    /// The device of the namespace file.
    pub dev: u64,
    /// The inode of the namespace file.
    pub ino: u64,
}

/// A pod's network namespace, held open by its file descriptor (cheap to clone: shared).
#[derive(Clone)]
pub struct InPodNetns {
    inner: Arc<Inner>,
}

struct Inner {
    file: File,
    id: NetnsId,
}

impl fmt::Debug for InPodNetns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InPodNetns").field("id", &self.inner.id).finish()
    }
}

impl PartialEq for InPodNetns {
    fn eq(&self, other: &Self) -> bool {
        self.inner.id == other.inner.id
    }
}

impl Eq for InPodNetns {}

impl InPodNetns {
    /// Takes ownership of `fd`, refusing it unless it is a namespace file (nsfs, or procfs on kernels
    /// older than 3.19): a descriptor istio-cni sends must not be mistaken for a namespace. Whether it is
    /// a *network* namespace is checked by the kernel at [`InPodNetns::run_in`].
    pub fn new(fd: OwnedFd) -> Result<InPodNetns, ProxyError> {
        let statfs = rustix::fs::fstatfs(&fd).map_err(|e| ProxyError::PodNetns(e.into()))?;
        if statfs.f_type != NSFS_MAGIC && statfs.f_type != rustix::fs::PROC_SUPER_MAGIC {
            return Err(ProxyError::PodNetns(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the file descriptor is not a namespace (filesystem type {:#x})",
                    statfs.f_type
                ),
            )));
        }
        let file = File::from(fd);
        let metadata = file.metadata().map_err(ProxyError::PodNetns)?;
        let id = NetnsId {
            dev: metadata.dev(),
            ino: metadata.ino(),
        };
        Ok(InPodNetns {
            inner: Arc::new(Inner { file, id }),
        })
    }

    /// Opens the namespace at `path` (`/var/run/netns/<name>`, `/proc/<pid>/ns/net`).
    pub fn open(path: impl AsRef<Path>) -> Result<InPodNetns, ProxyError> {
        let file = File::open(path.as_ref()).map_err(ProxyError::PodNetns)?;
        InPodNetns::new(file.into())
    }

    /// The namespace's identity.
    pub fn id(&self) -> NetnsId {
        self.inner.id
    }

    /// Runs `f` on a new thread that has joined this network namespace, and returns its result. Sockets
    /// `f` creates stay in the namespace wherever they are used later. The thread ends with `f`, so no
    /// thread of the process is ever left in a pod's namespace. Needs `CAP_SYS_ADMIN`; blocks the caller
    /// for a thread's lifetime (call it from `spawn_blocking` in async code).
    pub fn run_in<F, R>(&self, f: F) -> Result<R, ProxyError>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name("inpod-netns".into())
                .spawn_scoped(scope, || {
                    rustix::thread::move_into_link_name_space(
                        self.inner.file.as_fd(),
                        Some(LinkNameSpaceType::Network),
                    )
                    .map_err(|e| ProxyError::PodNetns(e.into()))?;
                    Ok(f())
                })
                .map_err(ProxyError::PodNetns)?;
            thread.join().unwrap_or_else(|_| {
                Err(ProxyError::PodNetns(io::Error::other(
                    "the closure run in the pod's network namespace panicked",
                )))
            })
        })
    }
}

impl AsFd for InPodNetns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.file.as_fd()
    }
}

/// Checks at startup that this process can do what in-pod mode needs: join a network namespace
/// (`CAP_SYS_ADMIN`, tried on its own namespace) and, when `mark` is set, mark sockets (`CAP_NET_ADMIN`).
/// Failing here is clearer than failing on the first pod.
pub fn verify_capabilities(mark: Option<u32>) -> Result<(), ProxyError> {
    let own = InPodNetns::open("/proc/thread-self/ns/net")?;
    own.run_in(|| ())?;
    if let Some(mark) = mark {
        let socket =
            Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).map_err(ProxyError::PodNetns)?;
        mesh_core::sys::set_mark(&socket, mark).map_err(ProxyError::PodNetns)?;
    }
    Ok(())
}

/// How a pod's listeners are bound.
#[derive(Debug, Clone)]
pub struct PodListenerConfig {
    /// The address to bind in the pod (`0.0.0.0`: every IPv4 address of the pod, loopback included).
    pub bind_ip: IpAddr,
    /// Where captured outbound traffic is redirected (15001).
    pub outbound_port: u16,
    /// Where captured plaintext inbound traffic is redirected (15006).
    pub inbound_plaintext_port: u16,
    /// Where HBONE arrives (15008).
    pub inbound_hbone_port: u16,
    /// `SO_REUSEPORT` (Istio's `INPOD_PORT_REUSE`, on by default): a restarting node proxy binds the same
    /// ports while the old one still drains, so pods are never left without a listener.
    pub reuse_port: bool,
    /// `SO_MARK` on each listener, inherited by accepted connections: istio-cni's rules in the pod skip
    /// packets with Istio's mark (1337), so the proxy's own traffic is not captured again.
    pub mark: Option<u32>,
    /// The listen backlog.
    pub backlog: i32,
}

impl Default for PodListenerConfig {
    fn default() -> Self {
        PodListenerConfig {
            bind_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            outbound_port: 15001,
            inbound_plaintext_port: 15006,
            inbound_hbone_port: 15008,
            reuse_port: true,
            mark: Some(mesh_core::sys::PROXY_MARK),
            backlog: 128,
        }
    }
}

/// The three listeners of one pod, bound inside its network namespace.
#[derive(Debug)]
pub struct PodListeners {
    /// Captured outbound traffic (15001).
    pub outbound: TcpListener,
    /// Captured plaintext inbound traffic (15006).
    pub inbound_plaintext: TcpListener,
    /// Inbound HBONE (15008).
    pub inbound_hbone: TcpListener,
}

impl PodListeners {
    /// Binds the listeners inside `netns` as `config` says. The namespace is joined on a dedicated thread
    /// (off the async runtime); the listeners are then registered with the current runtime.
    pub async fn bind(netns: &InPodNetns, config: &PodListenerConfig) -> Result<PodListeners, ProxyError> {
        let (netns, config) = (netns.clone(), config.clone());
        let bound = tokio::task::spawn_blocking(move || {
            netns.run_in(|| -> Result<_, ProxyError> {
                Ok([
                    bind_one(&config, config.outbound_port)?,
                    bind_one(&config, config.inbound_plaintext_port)?,
                    bind_one(&config, config.inbound_hbone_port)?,
                ])
            })
        })
        .await
        .map_err(|e| ProxyError::PodNetns(io::Error::other(e)))??;
        let [outbound, inbound_plaintext, inbound_hbone] = bound?;
        let register = |(addr, listener): (SocketAddr, std::net::TcpListener)| {
            TcpListener::from_std(listener).map_err(|source| ProxyError::PodBind { addr, source })
        };
        Ok(PodListeners {
            outbound: register(outbound)?,
            inbound_plaintext: register(inbound_plaintext)?,
            inbound_hbone: register(inbound_hbone)?,
        })
    }
}

/// Binds one listener on the calling thread (which has joined the pod's namespace).
fn bind_one(
    config: &PodListenerConfig,
    port: u16,
) -> Result<(SocketAddr, std::net::TcpListener), ProxyError> {
    let addr = SocketAddr::new(config.bind_ip, port);
    let bind = || -> io::Result<std::net::TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        // As the standard library and tokio do for listeners: a restart can rebind during TIME_WAIT.
        socket.set_reuse_address(true)?;
        if config.reuse_port {
            socket.set_reuse_port(true)?;
        }
        if let Some(mark) = config.mark {
            mesh_core::sys::set_mark(&socket, mark)?;
        }
        socket.bind(&addr.into())?;
        socket.listen(config.backlog)?;
        socket.set_nonblocking(true)?;
        Ok(socket.into())
    };
    bind()
        .map(|listener| (addr, listener))
        .map_err(|source| ProxyError::PodBind { addr, source })
}

/// A pod the [`ListenerPodManager`] has started: what the node proxy needs to serve it.
#[derive(Debug)]
pub struct PodStart {
    /// The pod's UID.
    pub uid: Arc<str>,
    /// The pod's name, namespace and service account.
    pub info: WorkloadInfo,
    /// The pod's network namespace (for outbound sockets, which must be created there too).
    pub netns: InPodNetns,
    /// The pod's listeners.
    pub listeners: PodListeners,
    /// Signalled when the pod is deleted (or [`ListenerPodManager::drain_all`] runs): stop accepting,
    /// finish or abort connections, and drop the listeners and this watch.
    pub drain: DrainWatch,
}

/// The [`PodManager`] that binds each pod's listeners and hands them to `serve`, the node proxy's own
/// business (which services run on which port); it keeps a drain per pod and fires it on delete.
pub struct ListenerPodManager {
    config: PodListenerConfig,
    serve: Box<dyn Fn(PodStart) + Send + Sync>,
    pods: Mutex<HashMap<Arc<str>, DrainTrigger>>,
}

impl fmt::Debug for ListenerPodManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenerPodManager")
            .field("config", &self.config)
            .field("pods", &self.pods().len())
            .finish_non_exhaustive()
    }
}

impl ListenerPodManager {
    /// A manager binding listeners as `config` says; `serve` is called (from a tokio task) once per
    /// started pod, and should spawn what serves it rather than block.
    pub fn new(config: PodListenerConfig, serve: impl Fn(PodStart) + Send + Sync + 'static) -> Self {
        ListenerPodManager {
            config,
            serve: Box::new(serve),
            pods: Mutex::new(HashMap::new()),
        }
    }

    /// The UIDs of the pods being served.
    pub fn pods(&self) -> Vec<Arc<str>> {
        self.lock().keys().cloned().collect()
    }

    /// Drains every pod (for shutdown) and waits until each has dropped its watches; bound the wait with
    /// `tokio::time::timeout`.
    pub async fn drain_all(&self) {
        let triggers: Vec<DrainTrigger> = self.lock().drain().map(|(_, trigger)| trigger).collect();
        let mut waits = tokio::task::JoinSet::new();
        for trigger in triggers {
            waits.spawn(trigger.drain());
        }
        while waits.join_next().await.is_some() {}
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, DrainTrigger>> {
        // The map is consistent after every statement, so a panic elsewhere does not spoil it.
        self.pods.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stop(&self, uid: &str) {
        if let Some(trigger) = self.lock().remove(uid) {
            // The pod is gone: nothing to wait for, but the watchers must see the signal.
            tokio::spawn(trigger.drain());
        }
    }
}

impl PodManager for ListenerPodManager {
    fn add(
        &self,
        uid: Arc<str>,
        info: WorkloadInfo,
        netns: InPodNetns,
    ) -> PodFuture<'_, Result<(), BoxError>> {
        Box::pin(async move {
            // A re-add replaces the pod (its namespace changed); never two sets of listeners per UID.
            self.stop(&uid);
            let listeners = PodListeners::bind(&netns, &self.config).await?;
            let (trigger, watch) = drain::channel();
            self.lock().insert(uid.clone(), trigger);
            (self.serve)(PodStart {
                uid,
                info,
                netns,
                listeners,
                drain: watch,
            });
            Ok(())
        })
    }

    fn del(&self, uid: Arc<str>) -> PodFuture<'_, ()> {
        Box::pin(async move { self.stop(&uid) })
    }
}
