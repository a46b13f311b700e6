//! What the proxies read to decide: the mesh snapshot and the L4 authorization policies, each behind a
//! `watch` channel so that a change reaches every connection's next decision without locks.

use std::sync::Arc;

use mesh_core::model::{MeshSnapshot, SnapshotReceiver};
use mesh_policy::L4PolicySet;
use tokio::sync::watch;

/// The node proxy's view of the mesh. Cheap to clone; each clone tracks changes on its own.
#[derive(Debug, Clone)]
pub struct ProxyState {
    /// Workloads and services.
    pub mesh: SnapshotReceiver,
    /// The L4 authorization policies (Istio's `Authorization` resources).
    pub policies: watch::Receiver<Arc<L4PolicySet>>,
}

impl ProxyState {
    /// A state from the two channels.
    pub fn new(mesh: SnapshotReceiver, policies: watch::Receiver<Arc<L4PolicySet>>) -> Self {
        ProxyState { mesh, policies }
    }

    /// A state that never changes: for tests and embedders with a static configuration.
    pub fn fixed(snapshot: MeshSnapshot, policies: L4PolicySet) -> Self {
        let (tx, rx) = watch::channel(Arc::new(policies));
        // The sender is dropped: receivers keep the value and never see a change.
        drop(tx);
        ProxyState {
            mesh: SnapshotReceiver::fixed(snapshot),
            policies: rx,
        }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<MeshSnapshot> {
        self.mesh.current()
    }

    /// The current policies.
    pub fn policy_set(&self) -> Arc<L4PolicySet> {
        self.policies.borrow().clone()
    }
}
