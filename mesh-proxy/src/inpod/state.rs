//! The pods the node proxy serves, reconciled against what istio-cni says, as Istio's ztunnel does it
//! (`inpod/statemanager.rs`):
//!
//! - On each new connection, istio-cni first replays every pod it knows (`add`, or `keep` for a pod whose
//!   namespace it could not reopen), then `snapshot_sent`; pods served from an earlier connection that
//!   were not named are removed then, so a pod deleted while we were disconnected does not linger.
//! - `add` for a pod already served in the same namespace is a no-op; in a different namespace (the pod
//!   sandbox was recreated) the old one is stopped first.
//! - `del` before the snapshot only forgets the name, leaving removal to the reconciliation.
//! - An `add` the [`PodManager`] fails is kept and retried until it succeeds, is deleted, or the
//!   connection ends (istio-cni replays it on the next one).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::netns::{InPodNetns, NetnsId};
use super::zds::{PodManager, WorkloadInfo, ZdsError, ZdsRequest};

/// How a request went, which decides the acknowledgement and whether the connection continues.
#[derive(Debug)]
pub(crate) enum Handled {
    /// Done: an empty ack.
    Ok,
    /// This pod could not be served: an ack with the reason; the connection continues.
    PodFailed(String),
    /// The request broke the protocol: an ack with the reason, then a new connection.
    Violation(ZdsError),
}

/// A pod whose start failed, kept to retry.
#[derive(Debug)]
struct Pending {
    info: WorkloadInfo,
    netns: InPodNetns,
}

/// The reconciliation state across connections.
#[derive(Debug)]
pub(crate) struct PodTable {
    running: HashMap<Arc<str>, NetnsId>,
    pending: HashMap<Arc<str>, Pending>,
    /// Whether this connection's `snapshot_sent` has arrived.
    snapshot_received: bool,
    /// Pods named on this connection before its `snapshot_sent`.
    snapshot_uids: HashSet<Arc<str>>,
    max_pods: usize,
    add_timeout: Duration,
}

impl PodTable {
    pub(crate) fn new(max_pods: usize, add_timeout: Duration) -> PodTable {
        PodTable {
            running: HashMap::new(),
            pending: HashMap::new(),
            snapshot_received: false,
            snapshot_uids: HashSet::new(),
            max_pods,
            add_timeout,
        }
    }

    /// A new connection: its snapshot starts from nothing. Pending pods are dropped too, since istio-cni
    /// replays every pod it still has.
    pub(crate) fn new_connection(&mut self) {
        self.snapshot_received = false;
        self.snapshot_uids.clear();
        self.pending.clear();
    }

    pub(crate) fn running(&self) -> usize {
        self.running.len()
    }

    pub(crate) fn pending(&self) -> usize {
        self.pending.len()
    }

    pub(crate) fn snapshot_received(&self) -> bool {
        self.snapshot_received
    }

    pub(crate) async fn handle(&mut self, request: ZdsRequest, manager: &dyn PodManager) -> Handled {
        match request {
            ZdsRequest::Add { uid, info, netns } => {
                let known = self.running.contains_key(&uid) || self.pending.contains_key(&uid);
                if !known && self.running.len() + self.pending.len() >= self.max_pods {
                    return Handled::PodFailed(format!(
                        "pod {uid:?} refused: this node proxy already serves its limit of {} pods",
                        self.max_pods
                    ));
                }
                if !self.snapshot_received && !self.remember(&uid) {
                    return Handled::PodFailed(format!(
                        "pod {uid:?} refused: more than {} pods in one snapshot",
                        self.max_pods
                    ));
                }
                let netns = match InPodNetns::new(netns) {
                    Ok(netns) => netns,
                    Err(e) => return Handled::PodFailed(format!("pod {uid:?}: {e}")),
                };
                match self.start(uid.clone(), info, netns, manager).await {
                    Ok(()) => Handled::Ok,
                    Err(reason) => Handled::PodFailed(format!("starting pod {uid:?}: {reason}")),
                }
            }
            ZdsRequest::Keep { uid } => {
                if self.snapshot_received {
                    return Handled::Violation(ZdsError::KeepAfterSnapshot { uid });
                }
                if !self.remember(&uid) {
                    return Handled::PodFailed(format!(
                        "pod {uid:?} refused: more than {} pods in one snapshot",
                        self.max_pods
                    ));
                }
                Handled::Ok
            }
            ZdsRequest::Del { uid } => {
                self.pending.remove(&uid);
                if self.snapshot_received {
                    if self.running.remove(&uid).is_some() {
                        manager.del(uid).await;
                    }
                } else {
                    self.snapshot_uids.remove(&uid);
                }
                Handled::Ok
            }
            ZdsRequest::SnapshotSent => {
                if self.snapshot_received {
                    return Handled::Violation(ZdsError::DuplicateSnapshot);
                }
                let gone: Vec<Arc<str>> = self
                    .running
                    .keys()
                    .filter(|uid| !self.snapshot_uids.contains(*uid))
                    .cloned()
                    .collect();
                for uid in gone {
                    self.running.remove(&uid);
                    manager.del(uid).await;
                }
                self.snapshot_uids.clear();
                self.snapshot_received = true;
                Handled::Ok
            }
        }
    }

    /// Retries every pending pod once; returns whether some are still pending.
    pub(crate) async fn retry_pending(&mut self, manager: &dyn PodManager) -> bool {
        let pending = std::mem::take(&mut self.pending);
        for (uid, Pending { info, netns }) in pending {
            if let Err(reason) = self.start(uid.clone(), info, netns, manager).await {
                tracing::warn!(%uid, %reason, "retrying an in-pod pod failed");
            }
        }
        !self.pending.is_empty()
    }

    /// Adds `uid` to this connection's snapshot, unless that would pass the limit.
    fn remember(&mut self, uid: &Arc<str>) -> bool {
        if self.snapshot_uids.len() >= self.max_pods && !self.snapshot_uids.contains(uid) {
            return false;
        }
        self.snapshot_uids.insert(uid.clone());
        true
    }

    /// Starts (or keeps) a pod; a failure leaves it pending.
    async fn start(
        &mut self,
        uid: Arc<str>,
        info: WorkloadInfo,
        netns: InPodNetns,
        manager: &dyn PodManager,
    ) -> Result<(), String> {
        if let Some(running) = self.running.get(&uid) {
            if *running == netns.id() {
                self.pending.remove(&uid);
                return Ok(());
            }
            // The pod's sandbox was recreated with a new namespace: the old listeners are useless.
            self.running.remove(&uid);
            manager.del(uid.clone()).await;
        }
        let id = netns.id();
        let started = tokio::time::timeout(
            self.add_timeout,
            manager.add(uid.clone(), info.clone(), netns.clone()),
        )
        .await;
        let reason = match started {
            Ok(Ok(())) => {
                self.pending.remove(&uid);
                self.running.insert(uid, id);
                return Ok(());
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("not started within {:?}", self.add_timeout),
        };
        self.pending.insert(uid, Pending { info, netns });
        Err(reason)
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::sync::Mutex;

    use super::*;
    use crate::inpod::zds::{BoxError, PodFuture};

    /// Records calls; fails the adds of UIDs listed in `fail`.
    #[derive(Debug, Default)]
    struct Recorder {
        calls: Mutex<Vec<String>>,
        fail: Mutex<HashSet<String>>,
    }

    impl PodManager for Recorder {
        fn add(
            &self,
            uid: Arc<str>,
            _info: WorkloadInfo,
            _netns: InPodNetns,
        ) -> PodFuture<'_, Result<(), BoxError>> {
            Box::pin(async move {
                self.calls.lock().unwrap().push(format!("add {uid}"));
                if self.fail.lock().unwrap().contains(&*uid) {
                    return Err("address in use".into());
                }
                Ok(())
            })
        }

        fn del(&self, uid: Arc<str>) -> PodFuture<'_, ()> {
            Box::pin(async move { self.calls.lock().unwrap().push(format!("del {uid}")) })
        }
    }

    impl Recorder {
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }
    }

    fn add(uid: &str) -> ZdsRequest {
        // Our own namespace: any process may open it, and it is a real namespace file.
        let netns = File::open("/proc/self/ns/net").unwrap().into();
        ZdsRequest::Add {
            uid: uid.into(),
            info: WorkloadInfo::default(),
            netns,
        }
    }

    fn keep(uid: &str) -> ZdsRequest {
        ZdsRequest::Keep { uid: uid.into() }
    }

    fn del(uid: &str) -> ZdsRequest {
        ZdsRequest::Del { uid: uid.into() }
    }

    async fn run(table: &mut PodTable, manager: &Recorder, requests: Vec<ZdsRequest>) {
        for request in requests {
            let handled = table.handle(request, manager).await;
            assert!(matches!(handled, Handled::Ok), "{handled:?}");
        }
    }

    fn table() -> PodTable {
        PodTable::new(8, Duration::from_secs(5))
    }

    #[tokio::test]
    async fn a_new_snapshot_removes_pods_it_does_not_name_and_keeps_the_rest() {
        let (mut table, manager) = (table(), Recorder::default());
        table.new_connection();
        let first = vec![add("a"), add("b"), add("c"), ZdsRequest::SnapshotSent];
        run(&mut table, &manager, first).await;
        assert_eq!(manager.take(), ["add a", "add b", "add c"]);

        table.new_connection();
        // "a" again in the same namespace (a no-op), "b" kept without a namespace, "c" not named.
        run(
            &mut table,
            &manager,
            vec![add("a"), keep("b"), ZdsRequest::SnapshotSent],
        )
        .await;
        assert_eq!(manager.take(), ["del c"]);
        assert_eq!(table.running(), 2);
    }

    #[tokio::test]
    async fn del_before_the_snapshot_leaves_removal_to_the_reconciliation() {
        let (mut table, manager) = (table(), Recorder::default());
        table.new_connection();
        run(&mut table, &manager, vec![add("a"), del("a")]).await;
        assert_eq!(manager.take(), ["add a"]);
        run(&mut table, &manager, vec![ZdsRequest::SnapshotSent]).await;
        assert_eq!(manager.take(), ["del a"]);
        // After the snapshot, del acts at once, and deleting an unknown pod is not an error.
        run(&mut table, &manager, vec![add("b"), del("b"), del("zzz")]).await;
        assert_eq!(manager.take(), ["add b", "del b"]);
    }

    #[tokio::test]
    async fn keep_or_a_second_snapshot_after_the_snapshot_break_the_protocol() {
        let (mut table, manager) = (table(), Recorder::default());
        table.new_connection();
        run(&mut table, &manager, vec![ZdsRequest::SnapshotSent]).await;
        let handled = table.handle(keep("a"), &manager).await;
        assert!(matches!(
            handled,
            Handled::Violation(ZdsError::KeepAfterSnapshot { .. })
        ));
        let handled = table.handle(ZdsRequest::SnapshotSent, &manager).await;
        assert!(matches!(handled, Handled::Violation(ZdsError::DuplicateSnapshot)));
    }

    #[tokio::test]
    async fn a_failed_start_is_reported_and_retried_until_it_succeeds() {
        let (mut table, manager) = (table(), Recorder::default());
        table.new_connection();
        manager.fail.lock().unwrap().insert("a".into());
        let Handled::PodFailed(reason) = table.handle(add("a"), &manager).await else {
            panic!("expected a failure");
        };
        assert!(reason.contains("address in use"), "{reason}");
        assert_eq!((table.running(), table.pending()), (0, 1));
        assert!(table.retry_pending(&manager).await);
        manager.fail.lock().unwrap().clear();
        assert!(!table.retry_pending(&manager).await);
        assert_eq!((table.running(), table.pending()), (1, 0));
        assert_eq!(manager.take(), ["add a", "add a", "add a"]);
    }

    #[tokio::test]
    async fn pods_past_the_limit_are_refused_without_being_held() {
        let (mut table, manager) = (PodTable::new(2, Duration::from_secs(5)), Recorder::default());
        table.new_connection();
        run(&mut table, &manager, vec![add("a"), add("b")]).await;
        let handled = table.handle(add("c"), &manager).await;
        assert!(
            matches!(handled, Handled::PodFailed(ref r) if r.contains("limit")),
            "{handled:?}"
        );
        // A known pod is still accepted at the limit.
        run(&mut table, &manager, vec![add("a")]).await;
        assert_eq!((table.running(), table.pending()), (2, 0));
    }

    #[tokio::test]
    async fn a_descriptor_that_is_not_a_namespace_is_refused() {
        let (mut table, manager) = (table(), Recorder::default());
        table.new_connection();
        let request = ZdsRequest::Add {
            uid: "a".into(),
            info: WorkloadInfo::default(),
            netns: File::open("/dev/null").unwrap().into(),
        };
        let handled = table.handle(request, &manager).await;
        assert!(
            matches!(handled, Handled::PodFailed(ref r) if r.contains("not a namespace")),
            "{handled:?}"
        );
        assert!(manager.take().is_empty());
        assert_eq!(table.pending(), 0);
    }
}
