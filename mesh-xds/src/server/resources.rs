//! What the local control plane serves: an immutable [`ResourceSnapshot`] of encoded resources per type,
//! published through a [`ResourcePublisher`] to every ADS stream.
//!
//! Resources are stored encoded (the bytes that go into each `Any`), with a version that is a hash of those
//! bytes. A content hash rather than a counter means that a server restarted with the same configuration
//! gives every resource the same version again, so a reconnecting client that sends its
//! `initial_resource_versions` is not sent anything it already holds.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use tokio::sync::watch;

use crate::proto::envoy::service::discovery::v3 as ads;

/// One resource as served: name, version, the names it can also be asked for by, and its encoded value.
#[derive(Clone, PartialEq, Eq)]
pub struct ServedResource {
    /// The resource's name (a workload's uid, `namespace/hostname` for a service, `namespace/name` for a
    /// policy).
    pub name: Arc<str>,
    /// Its version: a hash of `value`.
    pub version: Arc<str>,
    /// Other names an on-demand client may subscribe to it by (`network/ip` for addresses).
    pub aliases: Vec<Arc<str>>,
    /// The encoded message, of the type its type URL names.
    pub value: Bytes,
}

impl fmt::Debug for ServedResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServedResource")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("aliases", &self.aliases)
            .field("bytes", &self.value.len())
            .finish()
    }
}

impl ServedResource {
    /// A resource from its name, aliases and encoded value; the version is computed from the value.
    pub fn new(name: impl Into<Arc<str>>, aliases: Vec<Arc<str>>, value: Bytes) -> Self {
        ServedResource {
            name: name.into(),
            version: content_version(&value).into(),
            aliases,
            value,
        }
    }

    /// The resource as it goes into a `DeltaDiscoveryResponse` of `type_url`, with `aliases` (the names
    /// the client asked for it by, if any).
    pub(crate) fn to_proto(&self, type_url: &str, aliases: Vec<String>) -> ads::Resource {
        ads::Resource {
            version: self.version.to_string(),
            resource: Some(prost_types::Any {
                type_url: type_url.to_owned(),
                value: self.value.to_vec(),
            }),
            name: self.name.to_string(),
            aliases,
            ttl: None,
            cache_control: None,
        }
    }
}

/// A stable 64-bit FNV-1a hash of the bytes, in hex: the same on every run and every machine.
fn content_version(value: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in value {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// The resources of one type, by name, with an alias index.
#[derive(Debug, Clone, Default)]
pub struct TypeResources {
    by_name: BTreeMap<Arc<str>, Arc<ServedResource>>,
    by_alias: HashMap<Arc<str>, Arc<str>>,
}

impl TypeResources {
    /// The resource called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<ServedResource>> {
        self.by_name.get(name)
    }

    /// The resource `name` refers to: by its own name, or by one of its aliases.
    pub fn resolve(&self, name: &str) -> Option<&Arc<ServedResource>> {
        self.by_name.get(name).or_else(|| {
            let real = self.by_alias.get(name)?;
            self.by_name.get(real)
        })
    }

    /// Every resource, in name order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &Arc<ServedResource>> + '_ {
        self.by_name.values()
    }

    /// How many resources there are.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// Every resource the server serves, by type URL. Immutable: build a new one for every change and
/// [`publish`](ResourcePublisher::publish) it.
#[derive(Debug, Clone, Default)]
pub struct ResourceSnapshot {
    types: HashMap<Arc<str>, TypeResources>,
}

impl ResourceSnapshot {
    /// An empty snapshot.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a resource of `type_url`.
    pub fn insert(&mut self, type_url: &str, resource: ServedResource) {
        let resources = self.types.entry(type_url.into()).or_default();
        for alias in &resource.aliases {
            resources.by_alias.insert(alias.clone(), resource.name.clone());
        }
        resources
            .by_name
            .insert(resource.name.clone(), Arc::new(resource));
    }

    /// Encodes `message` and adds it as a resource of `type_url`.
    pub fn insert_message(
        &mut self,
        type_url: &str,
        name: impl Into<Arc<str>>,
        aliases: Vec<Arc<str>>,
        message: &impl Message,
    ) {
        let value = Bytes::from(message.encode_to_vec());
        self.insert(type_url, ServedResource::new(name, aliases, value));
    }

    /// The resources of `type_url` (empty if there are none).
    pub fn resources(&self, type_url: &str) -> Option<&TypeResources> {
        self.types.get(type_url)
    }

    /// How many resources of all types there are.
    pub fn len(&self) -> usize {
        self.types.values().map(TypeResources::len).sum()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Hands each new [`ResourceSnapshot`] to the ADS streams, which push the differences to their clients.
#[derive(Debug, Clone)]
pub struct ResourcePublisher {
    tx: Arc<watch::Sender<Arc<ResourceSnapshot>>>,
}

impl ResourcePublisher {
    /// A publisher holding `initial`.
    pub fn new(initial: ResourceSnapshot) -> Self {
        let (tx, _) = watch::channel(Arc::new(initial));
        ResourcePublisher { tx: Arc::new(tx) }
    }

    /// Replaces the served resources; every stream sends its client what changed.
    pub fn publish(&self, snapshot: ResourceSnapshot) {
        self.tx.send_replace(Arc::new(snapshot));
    }

    /// The resources currently served.
    pub fn current(&self) -> Arc<ResourceSnapshot> {
        self.tx.borrow().clone()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<ResourceSnapshot>> {
        self.tx.subscribe()
    }
}
