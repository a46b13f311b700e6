//! From xDS resources to the [`MeshSnapshot`] the proxies read.

use mesh_core::model::{MeshSnapshot, ModelError, SnapshotPublisher};

use super::{Resources, Watch};
use crate::XdsAddress;

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
pub async fn publish_snapshots(mut addresses: Watch<XdsAddress>, publisher: SnapshotPublisher) {
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
        tracing::debug!(version, resources = current.len(), "mesh snapshot published");
        match addresses.changed().await {
            Some(next) => current = next,
            None => return,
        }
    }
}
