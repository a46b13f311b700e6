//! In-pod mode, Istio ambient's default since 1.21: istio-cni hands the node proxy each pod's network
//! namespace, and the proxy opens the pod's listeners (15001, 15006, 15008) inside it, removing them
//! when the pod goes. (DNS on 15053 is not served yet.)
//!
//! ## Layout
//! - [`zds`]: the protocol client, [`ZdsClient`]: connects to istio-cni's `SOCK_SEQPACKET` socket
//!   ([`ZdsConfig::socket_path`]), acknowledges each `add` (which carries the pod's namespace as a file
//!   descriptor), `keep`, `del` and `snapshot_sent`, reconnects with backoff, and reconciles the pods it
//!   serves with each new connection's snapshot. It starts and stops pods through a [`PodManager`].
//! - [`netns`]: [`InPodNetns`] (a pod's namespace; [`InPodNetns::run_in`] creates sockets there),
//!   [`PodListeners`] (the three listeners, bound with `SO_REUSEPORT` and Istio's mark), and
//!   [`ListenerPodManager`], the [`PodManager`] that binds them and hands each pod, with a drain fired
//!   when the pod is deleted, to the binary's serve function.
//! - [`proto`]: the ZDS messages as hand-written `prost` structs (the wire contract with istio-cni).
//!
//! Linux only; joining namespaces needs `CAP_SYS_ADMIN` and marking sockets `CAP_NET_ADMIN`
//! ([`verify_capabilities`] checks both at startup).
//!
//! ## Example
//! ```no_run
//! use std::sync::Arc;
//! use mesh_proxy::inpod::{ListenerPodManager, PodListenerConfig, ZdsClient, ZdsConfig};
//!
//! # async fn example() -> Result<(), mesh_proxy::ProxyError> {
//! let manager = ListenerPodManager::new(PodListenerConfig::default(), |pod| {
//!     // Serve pod.listeners with the outbound and inbound stacks until pod.drain fires.
//!     tracing::info!(uid = %pod.uid, "serving pod");
//! });
//! let client = ZdsClient::new(ZdsConfig::default(), Arc::new(manager))?;
//! let (_shutdown, drain) = mesh_core::drain::channel();
//! client.run(drain).await;
//! # Ok(())
//! # }
//! ```

pub mod netns;
mod packet;
pub mod proto;
mod state;
pub mod zds;

pub use netns::{
    InPodNetns, ListenerPodManager, NetnsId, PodListenerConfig, PodListeners, PodStart, verify_capabilities,
};
pub use zds::{BoxError, PodFuture, PodManager, WorkloadInfo, ZdsClient, ZdsConfig, ZdsError, ZdsStatus};
