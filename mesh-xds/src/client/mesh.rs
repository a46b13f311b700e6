//! From xDS resources to what the proxies read: the [`MeshSnapshot`] and the [`L4PolicySet`].

use std::sync::Arc;

use mesh_core::model::{MeshSnapshot, ModelError, SnapshotPublisher};
use mesh_policy::L4PolicySet;
use tokio::sync::watch;

use super::{Resources, Watch};
use crate::{XdsAddress, XdsAuthorization};

/// Builds a snapshot from the `Address` resources held, leniently: a conflict (two workloads claiming one
/// IP while a removal is in flight, say) sets the later claim aside instead of stopping every update. In
/// resource-name order, the first claim wins, so the outcome does not depend on arrival order. Returns the
/// conflicts set aside.
pub fn snapshot_from_addresses(addresses: &Resources<XdsAddress>) -> (MeshSnapshot, Vec<ModelError>) {
    let mut sorted: Vec<_> = addresses.iter().collect();
    sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let mut builder = MeshSnapshot::builder();
    builder.allow_unknown_services(true);
    for (_, address) in sorted {
        match &**address {
            XdsAddress::Workload(workload) => builder.add_workload(workload.clone()),
            XdsAddress::Service(service) => builder.add_service(service.clone()),
        };
    }
    builder.build_lenient()
}

/// Publishes a new [`MeshSnapshot`] each time the `Address` resources change, until the ADS client is
/// gone. Run it as a task beside [`AdsClient::run`](super::AdsClient::run). Changes that arrive while a
/// snapshot is being built are folded into the next one.
///
/// The snapshot lags the ADS client: [`AdsHandle::is_ready`](super::AdsHandle::is_ready) says that the
/// client holds the first push, not that a snapshot with it has been published. To gate a proxy's
/// readiness on the snapshot, use [`publish_snapshots_reporting`].
pub async fn publish_snapshots(addresses: Watch<XdsAddress>, publisher: SnapshotPublisher) {
    publish_snapshots_reporting(addresses, publisher, watch::Sender::new(0)).await;
}

/// [`publish_snapshots`], also sending `built_from` the [`Resources::revision`] of the `Address` state each
/// published snapshot was built from (revisions only grow).
///
/// A proxy that is ready only once its snapshot holds the first push (as ztunnel waits for its cache to
/// be warm) waits for [`AdsHandle::wait_ready`](super::AdsHandle::wait_ready), reads `revision()` from
/// its `Address` [`Watch`] (with `peek`), then waits for `built_from` to reach that revision:
/// ```no_run
/// # async fn demo(
/// #     handle: mesh_xds::client::AdsHandle,
/// #     addresses: mesh_xds::client::Watch<mesh_xds::XdsAddress>,
/// #     publisher: mesh_core::model::SnapshotPublisher,
/// # ) -> Result<(), Box<dyn std::error::Error>> {
/// let (built_from, mut published) = tokio::sync::watch::channel(0);
/// tokio::spawn(mesh_xds::client::publish_snapshots_reporting(addresses.clone(), publisher, built_from));
/// handle.wait_ready().await?;
/// let held = addresses.peek().revision();
/// published.wait_for(|revision| *revision >= held).await?;
/// // Every snapshot published from now on holds at least the first push.
/// # Ok(())
/// # }
/// ```
pub async fn publish_snapshots_reporting(
    mut addresses: Watch<XdsAddress>,
    publisher: SnapshotPublisher,
    built_from: watch::Sender<u64>,
) {
    let mut current = addresses.current();
    loop {
        let (snapshot, conflicts) = snapshot_from_addresses(&current);
        if !conflicts.is_empty() {
            tracing::warn!(
                count = conflicts.len(),
                first = %conflicts[0],
                "xDS addresses conflict; the later claims are set aside"
            );
        }
        let version = publisher.publish(snapshot);
        built_from.send_replace(current.revision());
        tracing::debug!(version, resources = current.len(), "mesh snapshot published");
        match addresses.changed().await {
            Some(next) => current = next,
            None => return,
        }
    }
}

/// Sends a new [`L4PolicySet`] built from the `Authorization` resources held each time they change, until
/// the ADS client or every receiver of `policies` is gone. Run it as a task beside
/// [`AdsClient::run`](super::AdsClient::run), next to [`publish_snapshots`]. The set held when this starts
/// is sent at once, so receivers never wait for a change to see the first push.
pub async fn publish_policies(
    mut authorizations: Watch<XdsAuthorization>,
    policies: watch::Sender<Arc<L4PolicySet>>,
) {
    let mut current = authorizations.current();
    loop {
        let set = L4PolicySet::new(current.iter().map(|(_, policy)| policy.clone()));
        if policies.send(Arc::new(set)).is_err() {
            return;
        }
        match authorizations.changed().await {
            Some(next) => current = next,
            None => return,
        }
    }
}
