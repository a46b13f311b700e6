//! [`MeshSnapshot`], its builder, and the `watch`-based publisher that hands snapshots to the proxies.
//!
//! A snapshot is built and validated once, then only read: the data path looks things up in it with no
//! locks and no allocation, and a configuration change publishes a whole new snapshot rather than mutating
//! the one in use. Workloads and services are held as `Arc`s, so a control-plane client can build the next
//! snapshot from mostly the same objects without copying them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::watch;

use super::{Endpoint, ModelError, NamespacedHostname, NetworkAddr, NetworkMode, Service, Workload};

/// An immutable, indexed view of the mesh: every workload and service, and the endpoints derived from
/// them. Share it as `Arc<MeshSnapshot>`; get one from [`MeshSnapshot::builder`], and from a
/// [`SnapshotReceiver`] on the data path.
///
/// Lookups by address accept IPv4-mapped IPv6 addresses (`::ffff:198.18.0.1`) for IPv4 entries, since that
/// is how an IPv4 destination appears on a dual-stack socket.
#[derive(Debug, Default)]
pub struct MeshSnapshot {
    version: u64,
    workloads: Vec<Arc<Workload>>,
    services: Vec<Arc<Service>>,
    /// Parallel to `services`: the endpoints of `services[i]` are `endpoints[i]`.
    endpoints: Vec<Box<[Endpoint]>>,
    workload_by_uid: HashMap<Arc<str>, usize>,
    workload_by_ip: AddrIndex,
    service_by_vip: AddrIndex,
    /// Hostname to the services carrying it, one per namespace. Keyed by hostname alone so that both a
    /// `namespace/hostname` lookup and a bare-hostname lookup work from borrowed `&str`s.
    services_by_hostname: HashMap<Arc<str>, Vec<usize>>,
}

impl MeshSnapshot {
    /// A builder for a new snapshot.
    pub fn builder() -> MeshSnapshotBuilder {
        MeshSnapshotBuilder::default()
    }

    /// A snapshot with no workloads or services, at version 0: what a [`SnapshotPublisher`] starts with.
    pub fn empty() -> Self {
        MeshSnapshot::default()
    }

    /// The version a [`SnapshotPublisher`] gave this snapshot: 0 for the initial empty one and for
    /// snapshots never published, then one more for each publication.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The workload with this UID.
    pub fn workload_by_uid(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workload_by_uid.get(uid).map(|&i| &self.workloads[i])
    }

    /// The workload that has this address on its network.
    pub fn workload_by_addr(&self, addr: &NetworkAddr) -> Option<&Arc<Workload>> {
        self.workload_by_ip(&addr.network, addr.ip)
    }

    /// The workload that has `ip` on `network`; like [`workload_by_addr`](Self::workload_by_addr) without
    /// building a [`NetworkAddr`].
    pub fn workload_by_ip(&self, network: &str, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workload_by_ip.get(network, ip).map(|i| &self.workloads[i])
    }

    /// The service with this VIP.
    pub fn service_by_vip(&self, vip: &NetworkAddr) -> Option<&Arc<Service>> {
        self.service_by_ip(&vip.network, vip.ip)
    }

    /// The service with the VIP `ip` on `network`; like [`service_by_vip`](Self::service_by_vip) without
    /// building a [`NetworkAddr`].
    pub fn service_by_ip(&self, network: &str, ip: IpAddr) -> Option<&Arc<Service>> {
        self.service_by_vip.get(network, ip).map(|i| &self.services[i])
    }

    /// The service with this `namespace/hostname` key.
    pub fn service_by_hostname(&self, key: &NamespacedHostname) -> Option<&Arc<Service>> {
        self.service(&key.namespace, &key.hostname)
    }

    /// The service `hostname` in `namespace`.
    pub fn service(&self, namespace: &str, hostname: &str) -> Option<&Arc<Service>> {
        self.service_index(namespace, hostname).map(|i| &self.services[i])
    }

    /// The service with this hostname, whatever its namespace, if exactly one has it. A hostname declared
    /// in several namespaces (a `ServiceEntry` for an external host, say) is ambiguous: `None`, and
    /// [`services_by_bare_hostname`](Self::services_by_bare_hostname) lists the candidates.
    pub fn service_by_bare_hostname(&self, hostname: &str) -> Option<&Arc<Service>> {
        match self.services_by_hostname.get(hostname).map(Vec::as_slice) {
            Some(&[only]) => Some(&self.services[only]),
            _ => None,
        }
    }

    /// Every service with this hostname, one per namespace, in the order they were added.
    pub fn services_by_bare_hostname(&self, hostname: &str) -> impl Iterator<Item = &Arc<Service>> + '_ {
        self.services_by_hostname
            .get(hostname)
            .into_iter()
            .flatten()
            .map(|&i| &self.services[i])
    }

    /// The endpoints of the service with this key, in the order their workloads were added; empty if
    /// there is no such service.
    pub fn endpoints(&self, key: &NamespacedHostname) -> &[Endpoint] {
        self.endpoints_by_name(&key.namespace, &key.hostname)
    }

    /// The endpoints of `service` (looked up by its key, so a service from another snapshot works too).
    pub fn endpoints_of(&self, service: &Service) -> &[Endpoint] {
        self.endpoints_by_name(&service.namespace, &service.hostname)
    }

    /// Every workload, in the order they were added.
    pub fn workloads(&self) -> impl ExactSizeIterator<Item = &Arc<Workload>> + '_ {
        self.workloads.iter()
    }

    /// Every service, in the order they were added.
    pub fn services(&self) -> impl ExactSizeIterator<Item = &Arc<Service>> + '_ {
        self.services.iter()
    }

    /// How many workloads there are.
    pub fn workload_count(&self) -> usize {
        self.workloads.len()
    }

    /// How many services there are.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Whether there are no workloads and no services.
    pub fn is_empty(&self) -> bool {
        self.workloads.is_empty() && self.services.is_empty()
    }

    fn service_index(&self, namespace: &str, hostname: &str) -> Option<usize> {
        self.services_by_hostname
            .get(hostname)?
            .iter()
            .copied()
            .find(|&i| &*self.services[i].namespace == namespace)
    }

    fn endpoints_by_name(&self, namespace: &str, hostname: &str) -> &[Endpoint] {
        match self.service_index(namespace, hostname) {
            Some(i) => &self.endpoints[i],
            None => &[],
        }
    }
}

/// An IP index scoped by network. Keyed by the IP alone, with the (usually single) network as a short list
/// beside it, so that a lookup needs only a borrowed `&str` for the network.
#[derive(Debug, Default)]
struct AddrIndex(HashMap<IpAddr, Vec<(Arc<str>, usize)>>);

impl AddrIndex {
    fn get(&self, network: &str, ip: IpAddr) -> Option<usize> {
        self.0
            .get(&ip.to_canonical())?
            .iter()
            .find(|(n, _)| &**n == network)
            .map(|&(_, i)| i)
    }

    /// Records `ip` on `network` for `owner`, or returns the owner already holding it.
    fn insert(&mut self, network: &Arc<str>, ip: IpAddr, owner: usize) -> Result<(), usize> {
        let slots = self.0.entry(ip.to_canonical()).or_default();
        if let Some(&(_, existing)) = slots.iter().find(|(n, _)| n == network) {
            return Err(existing);
        }
        slots.push((network.clone(), owner));
        Ok(())
    }
}

/// Collects workloads and services, then validates and indexes them into a [`MeshSnapshot`].
///
/// [`build`](Self::build) rejects: a workload with an empty or repeated UID; an IP claimed by two workloads
/// on the same network; a service with an empty hostname or a repeated `namespace/hostname`; a VIP claimed
/// by two services on the same network; a service port listed twice; and, unless
/// [`allow_unknown_services`](Self::allow_unknown_services) is set, a workload backing a service that is
/// not in the snapshot. An object repeating one of its own addresses is not a conflict.
#[derive(Debug, Default, Clone)]
pub struct MeshSnapshotBuilder {
    workloads: Vec<Arc<Workload>>,
    services: Vec<Arc<Service>>,
    allow_unknown_services: bool,
}

impl MeshSnapshotBuilder {
    /// An empty builder; the same as [`MeshSnapshot::builder`].
    pub fn new() -> Self {
        MeshSnapshotBuilder::default()
    }

    /// Adds a workload (a `Workload` or an `Arc<Workload>` shared with another snapshot).
    pub fn add_workload(&mut self, workload: impl Into<Arc<Workload>>) -> &mut Self {
        self.workloads.push(workload.into());
        self
    }

    /// Adds a service (a `Service` or an `Arc<Service>` shared with another snapshot).
    pub fn add_service(&mut self, service: impl Into<Arc<Service>>) -> &mut Self {
        self.services.push(service.into());
        self
    }

    /// Whether a workload may back a service this snapshot does not contain (default: no). xDS delivers
    /// workloads and services independently, so a control-plane client may see a workload before its
    /// service; with this set, such a reference is kept on the workload but yields no endpoint until a
    /// snapshot includes the service.
    pub fn allow_unknown_services(&mut self, allow: bool) -> &mut Self {
        self.allow_unknown_services = allow;
        self
    }

    /// Validates and indexes everything added so far. The builder is left as it was, so it can be
    /// extended and built again.
    pub fn build(&self) -> Result<MeshSnapshot, ModelError> {
        let mut snapshot = MeshSnapshot {
            workloads: self.workloads.clone(),
            services: self.services.clone(),
            ..MeshSnapshot::default()
        };
        index_services(&mut snapshot, &mut Strict)?;
        index_workloads(&mut snapshot, &mut Strict)?;
        snapshot.endpoints = derive_endpoints(&snapshot, self.allow_unknown_services)?;
        Ok(snapshot)
    }

    /// Builds a snapshot from whatever is consistent, and returns the conflicts it set aside, for sources
    /// that must not stop on one bad entry (a control plane may briefly give a new pod the IP of one whose
    /// removal has not arrived yet). In order of addition, the first claim wins: a later workload or
    /// service with an empty or repeated uid or `namespace/hostname` is left out; a later claim on an
    /// address or VIP, or a repeated service port, is not indexed while the object itself stays. A workload
    /// backing an unknown service yields no endpoint (as with
    /// [`allow_unknown_services`](Self::allow_unknown_services)).
    pub fn build_lenient(&self) -> (MeshSnapshot, Vec<ModelError>) {
        let mut conflicts = Lenient(Vec::new());
        let mut seen_uids = std::collections::HashSet::new();
        let workloads = self
            .workloads
            .iter()
            .filter(|workload| {
                let keep = !workload.uid.is_empty() && seen_uids.insert(workload.uid.clone());
                if !keep {
                    conflicts.0.push(if workload.uid.is_empty() {
                        ModelError::EmptyUid {
                            namespace: workload.namespace.clone(),
                            name: workload.name.clone(),
                        }
                    } else {
                        ModelError::DuplicateUid {
                            uid: workload.uid.clone(),
                        }
                    });
                }
                keep
            })
            .cloned()
            .collect();
        let mut seen_keys = std::collections::HashSet::new();
        let services = self
            .services
            .iter()
            .filter(|service| {
                let keep = !service.hostname.is_empty() && seen_keys.insert(service.key());
                if !keep {
                    conflicts.0.push(if service.hostname.is_empty() {
                        ModelError::EmptyHostname {
                            namespace: service.namespace.clone(),
                            name: service.name.clone(),
                        }
                    } else {
                        ModelError::DuplicateHostname {
                            service: service.key(),
                        }
                    });
                }
                keep
            })
            .cloned()
            .collect();
        let mut snapshot = MeshSnapshot {
            workloads,
            services,
            ..MeshSnapshot::default()
        };
        // With duplicates filtered out above, the indexers only report address, VIP and port conflicts,
        // which `Lenient` records instead of failing on.
        let indexed = index_services(&mut snapshot, &mut conflicts)
            .and_then(|()| index_workloads(&mut snapshot, &mut conflicts))
            .and_then(|()| derive_endpoints(&snapshot, true));
        match indexed {
            Ok(endpoints) => snapshot.endpoints = endpoints,
            // Unreachable by construction; fail safe to an empty snapshot rather than a half-indexed one.
            Err(error) => {
                conflicts.0.push(error);
                return (MeshSnapshot::default(), conflicts.0);
            }
        }
        (snapshot, conflicts.0)
    }
}

/// What the indexers do with a conflict: fail the build ([`Strict`]) or record it and go on ([`Lenient`]).
trait OnConflict {
    fn conflict(&mut self, error: ModelError) -> Result<(), ModelError>;
}

struct Strict;

impl OnConflict for Strict {
    fn conflict(&mut self, error: ModelError) -> Result<(), ModelError> {
        Err(error)
    }
}

struct Lenient(Vec<ModelError>);

impl OnConflict for Lenient {
    fn conflict(&mut self, error: ModelError) -> Result<(), ModelError> {
        self.0.push(error);
        Ok(())
    }
}

fn index_services(snapshot: &mut MeshSnapshot, on_conflict: &mut impl OnConflict) -> Result<(), ModelError> {
    let services = &snapshot.services;
    for (i, service) in services.iter().enumerate() {
        if service.hostname.is_empty() {
            return Err(ModelError::EmptyHostname {
                namespace: service.namespace.clone(),
                name: service.name.clone(),
            });
        }
        let same_hostname = snapshot
            .services_by_hostname
            .entry(service.hostname.clone())
            .or_default();
        if same_hostname
            .iter()
            .any(|&j| services[j].namespace == service.namespace)
        {
            on_conflict.conflict(ModelError::DuplicateHostname {
                service: service.key(),
            })?;
            continue;
        }
        same_hostname.push(i);

        for (k, port) in service.ports.iter().enumerate() {
            if service.ports[..k].iter().any(|earlier| earlier.port == port.port) {
                on_conflict.conflict(ModelError::DuplicateServicePort {
                    service: service.key(),
                    port: port.port,
                })?;
            }
        }

        for vip in &service.vips {
            match snapshot.service_by_vip.insert(&vip.network, vip.ip, i) {
                Err(first) if first != i => {
                    on_conflict.conflict(ModelError::DuplicateVip {
                        vip: vip.clone(),
                        first: services[first].key(),
                        second: service.key(),
                    })?;
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn index_workloads(snapshot: &mut MeshSnapshot, on_conflict: &mut impl OnConflict) -> Result<(), ModelError> {
    let workloads = &snapshot.workloads;
    for (i, workload) in workloads.iter().enumerate() {
        if workload.uid.is_empty() {
            return Err(ModelError::EmptyUid {
                namespace: workload.namespace.clone(),
                name: workload.name.clone(),
            });
        }
        if snapshot.workload_by_uid.insert(workload.uid.clone(), i).is_some() {
            return Err(ModelError::DuplicateUid {
                uid: workload.uid.clone(),
            });
        }
        // Host-network pods share their node's address, so an address does not identify one of them;
        // like Istio's ztunnel, we find them by uid only.
        if workload.network_mode == NetworkMode::HostNetwork {
            continue;
        }
        for &ip in &workload.addresses {
            match snapshot.workload_by_ip.insert(&workload.network, ip, i) {
                Err(first) if first != i => {
                    on_conflict.conflict(ModelError::DuplicateAddress {
                        address: NetworkAddr::new(workload.network.clone(), ip),
                        first_uid: workloads[first].uid.clone(),
                        second_uid: workload.uid.clone(),
                    })?;
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Every `(workload, service)` pair in the workloads' `services` maps becomes an endpoint of that service.
fn derive_endpoints(
    snapshot: &MeshSnapshot,
    allow_unknown: bool,
) -> Result<Vec<Box<[Endpoint]>>, ModelError> {
    let mut endpoints: Vec<Vec<Endpoint>> = vec![Vec::new(); snapshot.services.len()];
    for workload in &snapshot.workloads {
        for (service, port_map) in &workload.services {
            let Some(i) = snapshot.service_index(&service.namespace, &service.hostname) else {
                if allow_unknown {
                    tracing::debug!(workload = %workload.uid, %service, "endpoint of an unknown service ignored");
                    continue;
                }
                return Err(ModelError::UnknownService {
                    workload_uid: workload.uid.clone(),
                    service: service.clone(),
                });
            };
            endpoints[i].push(Endpoint {
                workload_uid: workload.uid.clone(),
                service: service.clone(),
                port_map: port_map.clone(),
                status: workload.status,
            });
        }
    }
    Ok(endpoints.into_iter().map(Vec::into_boxed_slice).collect())
}

/// The sending side of the snapshot channel: whoever owns the configuration (a file loader, an xDS client,
/// an embedder's own control plane) publishes each new [`MeshSnapshot`] here.
///
/// It starts with an empty snapshot at version 0. Dropping it closes the channel: receivers keep the last
/// snapshot, and their [`changed`](SnapshotReceiver::changed) returns `None` once they have seen it.
#[derive(Debug)]
pub struct SnapshotPublisher {
    tx: watch::Sender<Arc<MeshSnapshot>>,
}

impl SnapshotPublisher {
    /// A publisher holding the empty snapshot.
    pub fn new() -> Self {
        let (tx, _rx) = watch::channel(Arc::new(MeshSnapshot::empty()));
        SnapshotPublisher { tx }
    }

    /// Replaces the current snapshot, giving it the next version (one more than the current one), and
    /// wakes every receiver. Returns the version given. Works whether or not anyone is subscribed.
    pub fn publish(&self, mut snapshot: MeshSnapshot) -> u64 {
        let mut version = 0;
        // Reading the old version and storing the new snapshot under the channel's lock keeps versions
        // strictly increasing even when several threads publish.
        self.tx.send_modify(|current| {
            version = current.version + 1;
            snapshot.version = version;
            *current = Arc::new(snapshot);
        });
        version
    }

    /// A new receiver, which has seen the current snapshot: its `changed` waits for the next publication.
    pub fn subscribe(&self) -> SnapshotReceiver {
        SnapshotReceiver {
            rx: self.tx.subscribe(),
        }
    }

    /// The snapshot most recently published (or the initial empty one).
    pub fn current(&self) -> Arc<MeshSnapshot> {
        self.tx.borrow().clone()
    }
}

impl Default for SnapshotPublisher {
    fn default() -> Self {
        SnapshotPublisher::new()
    }
}

/// The receiving side of the snapshot channel, held by the proxies. Clone it freely; each clone tracks
/// which snapshot it has seen on its own.
#[derive(Debug, Clone)]
pub struct SnapshotReceiver {
    rx: watch::Receiver<Arc<MeshSnapshot>>,
}

impl SnapshotReceiver {
    /// A receiver that always returns `snapshot` and never changes, for tests and for embedders with a
    /// static configuration.
    pub fn fixed(snapshot: MeshSnapshot) -> Self {
        let (_tx, rx) = watch::channel(Arc::new(snapshot));
        SnapshotReceiver { rx }
    }

    /// The latest snapshot. Cheap (a brief read lock and a reference count): call it per connection, and
    /// keep the `Arc` for the connection's lifetime so one connection sees one consistent mesh.
    ///
    /// This does not mark the snapshot as seen, so a following [`changed`](Self::changed) may return the
    /// same version; compare [`MeshSnapshot::version`] if that matters.
    pub fn current(&self) -> Arc<MeshSnapshot> {
        self.rx.borrow().clone()
    }

    /// Waits for a snapshot this receiver has not seen yet and returns it; `None` once the publisher is
    /// gone and the last snapshot has been seen. Several publications while nobody waited are seen as one:
    /// only the latest snapshot matters.
    pub async fn changed(&mut self) -> Option<Arc<MeshSnapshot>> {
        self.rx.changed().await.ok()?;
        Some(self.rx.borrow_and_update().clone())
    }
}
