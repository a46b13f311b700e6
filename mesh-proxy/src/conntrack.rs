//! Connection tracking: closing open connections that the current configuration no longer allows.
//!
//! Authorization is decided when a connection opens, but Istio's ztunnel also holds it to later changes
//! (its `connection_manager.rs`): when the policies change, every open inbound connection is evaluated
//! again and the ones now denied are closed; when a workload goes away, connections to it are closed too.
//! [`ConnectionTracker`] does the same. The inbound paths [`register`](ConnectionTracker::register) each
//! connection with what its decision needs ([`TrackedConnection`]) and hold the returned
//! [`ConnectionGuard`] while forwarding, selecting on [`ConnectionGuard::revoked`]; [`ConnectionTracker::run`]
//! watches the [`ProxyState`] and re-evaluates on every change.
//!
//! Register before deciding: a change published between the decision and the registration would
//! otherwise be missed. [`ConnectionTracker::check`] is the one decision both use, so the first check and
//! every re-check agree.
//!
//! Work per change is one pure evaluation per open connection. The registry's lock is a plain mutex that
//! is never held across an `.await`, nor while evaluating: the entries are copied out (reference counts),
//! evaluated, and the revoked ones removed in a second, short critical section.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use mesh_core::SpiffeId;
use mesh_core::drain::DrainWatch;
use mesh_core::model::MeshSnapshot;
use mesh_policy::authz::ConnectionAttrs;
use mesh_policy::{L4Evaluation, L4PolicySet, L4Target};
use tokio::sync::oneshot;

use crate::state::ProxyState;

/// What a tracked connection's authorization depends on: the inputs of `L4PolicySet::evaluate` except the
/// destination workload's policy attachments, which are read from the current snapshot on each check
/// (they change with the workload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackedConnection {
    /// The destination workload's UID.
    pub destination_uid: Arc<str>,
    /// The peer's proven identity (`None` for plaintext).
    pub source_identity: Option<SpiffeId>,
    /// The peer's IP.
    pub source_ip: IpAddr,
    /// Where the connection is forwarded to (the workload's IP and target port).
    pub destination: SocketAddr,
}

impl TrackedConnection {
    /// The connection as the policy evaluator sees it.
    pub fn attrs(&self) -> ConnectionAttrs<'_> {
        ConnectionAttrs {
            source: self.source_identity.as_ref(),
            source_ip: self.source_ip,
            destination_ip: self.destination.ip(),
            destination_port: self.destination.port(),
            sni: None,
        }
    }
}

/// Why the tracker refused or closed a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The policies deny it (on a re-check, the policies after a change).
    Denied(Arc<L4Evaluation>),
    /// Its destination workload is no longer in the snapshot.
    WorkloadRemoved(Arc<str>),
}

impl CloseReason {
    /// The explanation for the access log's decision field.
    pub fn explanation(&self) -> String {
        match self {
            CloseReason::Denied(evaluation) => evaluation.to_string(),
            CloseReason::WorkloadRemoved(uid) => format!("destination workload {uid:?} was removed"),
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Denied(evaluation) => write!(f, "policy now denies it: {evaluation}"),
            CloseReason::WorkloadRemoved(uid) => write!(f, "destination workload {uid:?} was removed"),
        }
    }
}

/// The registry of open connections. Cheap to clone; clones share the registry.
#[derive(Debug, Clone, Default)]
pub struct ConnectionTracker {
    inner: Arc<Mutex<Registry>>,
}

#[derive(Debug, Default)]
struct Registry {
    next_id: u64,
    open: HashMap<u64, Entry>,
}

#[derive(Debug)]
struct Entry {
    connection: Arc<TrackedConnection>,
    revoke: oneshot::Sender<CloseReason>,
}

impl ConnectionTracker {
    /// An empty tracker. Nothing is re-checked until [`ConnectionTracker::run`] is running.
    pub fn new() -> Self {
        ConnectionTracker::default()
    }

    /// Registers an open connection; it stays registered until the returned guard is dropped or the
    /// tracker revokes it.
    pub fn register(&self, connection: TrackedConnection) -> ConnectionGuard {
        let (revoke, revoked) = oneshot::channel();
        let connection = Arc::new(connection);
        let mut registry = self.lock();
        let id = registry.next_id;
        registry.next_id = registry.next_id.wrapping_add(1);
        registry.open.insert(
            id,
            Entry {
                connection: connection.clone(),
                revoke,
            },
        );
        drop(registry);
        ConnectionGuard {
            tracker: self.clone(),
            id,
            connection,
            state: GuardState::Open(revoked),
        }
    }

    /// How many connections are registered.
    pub fn len(&self) -> usize {
        self.lock().open.len()
    }

    /// Whether no connection is registered.
    pub fn is_empty(&self) -> bool {
        self.lock().open.is_empty()
    }

    /// The registered connections, for debugging endpoints.
    pub fn connections(&self) -> Vec<Arc<TrackedConnection>> {
        self.lock().open.values().map(|e| e.connection.clone()).collect()
    }

    /// The decision for `connection` under `snapshot` and `policies`: the evaluation if it is allowed, or
    /// why not. Pure.
    pub fn check(
        connection: &TrackedConnection,
        snapshot: &MeshSnapshot,
        policies: &L4PolicySet,
    ) -> Result<L4Evaluation, CloseReason> {
        let Some(workload) = snapshot.workload_by_uid(&connection.destination_uid) else {
            return Err(CloseReason::WorkloadRemoved(connection.destination_uid.clone()));
        };
        let evaluation = policies.evaluate(&L4Target::from(&**workload), &connection.attrs());
        if evaluation.is_allowed() {
            Ok(evaluation)
        } else {
            Err(CloseReason::Denied(Arc::new(evaluation)))
        }
    }

    /// Checks every registered connection against `snapshot` and `policies` and revokes the ones no
    /// longer allowed. Returns how many were revoked.
    pub fn revalidate(&self, snapshot: &MeshSnapshot, policies: &L4PolicySet) -> usize {
        let open: Vec<(u64, Arc<TrackedConnection>)> = self
            .lock()
            .open
            .iter()
            .map(|(&id, entry)| (id, entry.connection.clone()))
            .collect();
        let revoked: Vec<(u64, CloseReason)> = open
            .iter()
            .filter_map(|(id, connection)| {
                Self::check(connection, snapshot, policies)
                    .err()
                    .map(|r| (*id, r))
            })
            .collect();
        if revoked.is_empty() {
            return 0;
        }
        let mut registry = self.lock();
        let mut count = 0;
        for (id, reason) in revoked {
            // A connection that closed meanwhile has nothing left to revoke.
            if let Some(entry) = registry.open.remove(&id) {
                tracing::info!(
                    destination = %entry.connection.destination,
                    source = %entry.connection.source_ip,
                    %reason,
                    "closing connection no longer allowed"
                );
                // The forwarding task may have just finished on its own; then nobody listens.
                let _ = entry.revoke.send(reason);
                count += 1;
            }
        }
        count
    }

    /// Re-checks the open connections whenever the snapshot or the policies in `state` change, until
    /// `drain` is signalled or both channels are closed (nothing can change any more).
    pub async fn run(&self, mut state: ProxyState, drain: DrainWatch) {
        let mut policies_open = true;
        let mut mesh_open = true;
        while policies_open || mesh_open {
            tokio::select! {
                () = drain.signaled() => return,
                changed = state.policies.changed(), if policies_open => {
                    if changed.is_err() {
                        policies_open = false;
                        continue;
                    }
                }
                changed = state.mesh.changed(), if mesh_open => {
                    if changed.is_none() {
                        mesh_open = false;
                        continue;
                    }
                }
            }
            // Whichever changed, check against the latest of both: several publications while we were busy
            // collapse into one pass.
            let snapshot = state.snapshot();
            let policies = state.policy_set();
            self.revalidate(&snapshot, &policies);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // The registry stays consistent whatever panicked while holding it (every update is one map
        // operation), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn deregister(&self, id: u64) {
        self.lock().open.remove(&id);
    }
}

/// A registered connection. Dropping it deregisters the connection.
#[derive(Debug)]
pub struct ConnectionGuard {
    tracker: ConnectionTracker,
    id: u64,
    connection: Arc<TrackedConnection>,
    state: GuardState,
}

#[derive(Debug)]
enum GuardState {
    Open(oneshot::Receiver<CloseReason>),
    Revoked(CloseReason),
    /// The sender is gone without a reason: it can never be revoked now.
    Never,
}

impl ConnectionGuard {
    /// The registered connection.
    pub fn connection(&self) -> &TrackedConnection {
        &self.connection
    }

    /// Resolves when the tracker revokes the connection; the caller then drops both sides. Cancel-safe,
    /// and may be called again after it resolved (it returns the same reason).
    pub async fn revoked(&mut self) -> CloseReason {
        loop {
            match &mut self.state {
                GuardState::Revoked(reason) => return reason.clone(),
                GuardState::Never => std::future::pending::<()>().await,
                GuardState::Open(receiver) => {
                    self.state = match receiver.await {
                        Ok(reason) => GuardState::Revoked(reason),
                        Err(_) => GuardState::Never,
                    };
                }
            }
        }
    }

    /// Whether the tracker has revoked the connection (without waiting).
    pub fn is_revoked(&mut self) -> Option<CloseReason> {
        if let GuardState::Open(receiver) = &mut self.state
            && let Ok(reason) = receiver.try_recv()
        {
            self.state = GuardState::Revoked(reason);
        }
        match &self.state {
            GuardState::Revoked(reason) => Some(reason.clone()),
            _ => None,
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.tracker.deregister(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::model::Workload;
    use mesh_policy::l4::{L4Action, L4Clause, L4Match, L4Policy, L4Rule, L4Scope, StringMatch};

    fn snapshot_with(uid: &str) -> MeshSnapshot {
        let workload = Workload {
            addresses: vec!["10.0.0.2".parse().unwrap()],
            ..Workload::new(uid, "server", "default")
        };
        MeshSnapshot::builder().add_workload(workload).build().unwrap()
    }

    fn connection(uid: &str, peer: &str) -> TrackedConnection {
        TrackedConnection {
            destination_uid: uid.into(),
            source_identity: Some(SpiffeId::parse(peer).unwrap()),
            source_ip: "10.0.0.1".parse().unwrap(),
            destination: "10.0.0.2:8080".parse().unwrap(),
        }
    }

    fn deny_principal(principal: &str) -> L4PolicySet {
        L4PolicySet::new([L4Policy {
            name: "deny-one".into(),
            namespace: "default".into(),
            scope: L4Scope::Namespace,
            action: L4Action::Deny,
            dry_run: false,
            rules: vec![L4Rule {
                clauses: vec![L4Clause {
                    matches: vec![L4Match {
                        principals: vec![StringMatch::Exact(principal.into())],
                        ..L4Match::default()
                    }],
                }],
            }],
        }])
    }

    #[test]
    fn revalidate_revokes_only_the_denied_and_the_orphaned() {
        let tracker = ConnectionTracker::new();
        let mut denied = tracker.register(connection("w1", "spiffe://cluster.local/ns/default/sa/bad"));
        let mut allowed = tracker.register(connection("w1", "spiffe://cluster.local/ns/default/sa/good"));
        let mut orphan = tracker.register(connection("gone", "spiffe://cluster.local/ns/default/sa/good"));
        assert_eq!(tracker.len(), 3);

        let revoked = tracker.revalidate(
            &snapshot_with("w1"),
            &deny_principal("cluster.local/ns/default/sa/bad"),
        );
        assert_eq!(revoked, 2);
        assert_eq!(tracker.len(), 1, "revoked connections leave the registry");
        match denied.is_revoked() {
            Some(CloseReason::Denied(evaluation)) => {
                assert_eq!(evaluation.to_string(), "denied by default/deny-one rule 0")
            }
            other => panic!("expected a denial, got {other:?}"),
        }
        assert_eq!(
            orphan.is_revoked(),
            Some(CloseReason::WorkloadRemoved("gone".into()))
        );
        assert_eq!(allowed.is_revoked(), None);

        drop(allowed);
        assert!(tracker.is_empty(), "dropping the guard deregisters");
    }

    #[tokio::test]
    async fn revoked_resolves_and_can_be_awaited_again() {
        let tracker = ConnectionTracker::new();
        let mut guard = tracker.register(connection("gone", "spiffe://cluster.local/ns/default/sa/a"));
        assert_eq!(
            tracker.revalidate(&MeshSnapshot::empty(), &L4PolicySet::default()),
            1
        );
        let first = guard.revoked().await;
        assert_eq!(first, CloseReason::WorkloadRemoved("gone".into()));
        assert_eq!(guard.revoked().await, first);
        assert_eq!(first.explanation(), "destination workload \"gone\" was removed");
    }

    #[tokio::test]
    async fn run_rechecks_on_policy_change_and_stops_when_channels_close() {
        let publisher = mesh_core::model::SnapshotPublisher::new();
        publisher.publish(snapshot_with("w1"));
        let (policies_tx, policies_rx) = tokio::sync::watch::channel(Arc::new(L4PolicySet::default()));
        let state = ProxyState::new(publisher.subscribe(), policies_rx);
        let tracker = ConnectionTracker::new();
        let mut guard = tracker.register(connection("w1", "spiffe://cluster.local/ns/default/sa/bad"));
        let (_trigger, drain) = mesh_core::drain::channel();
        let running = tokio::spawn({
            let tracker = tracker.clone();
            async move { tracker.run(state, drain).await }
        });

        policies_tx.send_replace(Arc::new(deny_principal("cluster.local/ns/default/sa/bad")));
        let reason = tokio::time::timeout(std::time::Duration::from_secs(10), guard.revoked())
            .await
            .expect("revoked after the policy change");
        assert!(matches!(reason, CloseReason::Denied(_)));

        drop(policies_tx);
        drop(publisher);
        tokio::time::timeout(std::time::Duration::from_secs(10), running)
            .await
            .expect("run returns once nothing can change")
            .unwrap();
    }
}
