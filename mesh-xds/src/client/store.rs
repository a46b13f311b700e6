//! Typed resource state on the client side: the [`Resource`] trait, the [`Resources`] a type currently has,
//! and the [`Watch`] that hands each new state to its consumer.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use tokio::sync::watch;

use crate::proto::envoy::service::discovery::v3 as ads;
use crate::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, XdsAddress, XdsAuthorization, XdsError};

/// A resource type the ADS client can subscribe to: its type URL and how its bytes become a Rust value.
///
/// An error from [`decode`](Resource::decode) rejects that one resource: it is named in the NACK sent back to
/// the control plane, and the rest of the response still applies.
pub trait Resource: fmt::Debug + Send + Sync + Sized + 'static {
    /// The xDS type URL, e.g. `type.googleapis.com/istio.workload.Address`.
    const TYPE_URL: &'static str;

    /// Decodes and validates one resource's value.
    fn decode(bytes: &[u8]) -> Result<Self, XdsError>;
}

impl Resource for XdsAddress {
    const TYPE_URL: &'static str = ADDRESS_TYPE_URL;

    fn decode(bytes: &[u8]) -> Result<Self, XdsError> {
        crate::decode_address(bytes)
    }
}

impl Resource for XdsAuthorization {
    const TYPE_URL: &'static str = AUTHORIZATION_TYPE_URL;

    fn decode(bytes: &[u8]) -> Result<Self, XdsError> {
        crate::decode_authorization(bytes)
    }
}

/// The resources of one type the client holds, by resource name. Immutable: every response that changes
/// something publishes a new one.
#[derive(Debug)]
pub struct Resources<T> {
    by_name: HashMap<Arc<str>, Arc<T>>,
    revision: u64,
}

impl<T> Default for Resources<T> {
    fn default() -> Self {
        Resources {
            by_name: HashMap::new(),
            revision: 0,
        }
    }
}

impl<T> Resources<T> {
    /// The resource called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<T>> {
        self.by_name.get(name)
    }

    /// Every resource with its name, in no particular order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&Arc<str>, &Arc<T>)> + '_ {
        self.by_name.iter()
    }

    /// How many resources there are.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// How many changes produced this state (0 before the first response).
    pub fn revision(&self) -> u64 {
        self.revision
    }
}

/// The consumer's side of one resource type: the current [`Resources`] and a way to wait for the next.
/// Cheap to clone; each clone tracks what it has seen on its own.
#[derive(Debug)]
pub struct Watch<T> {
    rx: watch::Receiver<Arc<Resources<T>>>,
}

impl<T> Clone for Watch<T> {
    fn clone(&self) -> Self {
        Watch { rx: self.rx.clone() }
    }
}

impl<T> Watch<T> {
    /// The latest state, marking it seen.
    pub fn current(&mut self) -> Arc<Resources<T>> {
        self.rx.borrow_and_update().clone()
    }

    /// The latest state, without marking it seen.
    pub fn peek(&self) -> Arc<Resources<T>> {
        self.rx.borrow().clone()
    }

    /// Waits for a state newer than the last one seen and returns it; `None` once the client is gone and
    /// the last state has been seen.
    pub async fn changed(&mut self) -> Option<Arc<Resources<T>>> {
        self.rx.changed().await.ok()?;
        Some(self.rx.borrow_and_update().clone())
    }
}

/// The type-erased store the client drives for each subscribed type.
pub(crate) trait TypeStore: Send + fmt::Debug {
    fn type_url(&self) -> &'static str;

    /// Applies a response: adds or replaces `resources`, drops `removed`. Returns one message per resource
    /// that was refused (its previous value, if any, stays).
    fn apply(&mut self, resources: &[ads::Resource], removed: &[String]) -> Vec<String>;

    /// What the client holds, name -> version, for `initial_resource_versions` after a reconnect.
    fn versions(&self) -> HashMap<String, String>;
}

/// The store of one concrete [`Resource`] type.
pub(crate) struct TypedStore<T> {
    held: HashMap<Arc<str>, (String, Arc<T>)>,
    revision: u64,
    tx: watch::Sender<Arc<Resources<T>>>,
}

impl<T> fmt::Debug for TypedStore<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedStore")
            .field("held", &self.held.len())
            .field("revision", &self.revision)
            .finish()
    }
}

impl<T: Resource> TypedStore<T> {
    pub(crate) fn new() -> (Self, Watch<T>) {
        let (tx, rx) = watch::channel(Arc::new(Resources::default()));
        (
            TypedStore {
                held: HashMap::new(),
                revision: 0,
                tx,
            },
            Watch { rx },
        )
    }
}

impl<T: Resource> TypeStore for TypedStore<T> {
    fn type_url(&self) -> &'static str {
        T::TYPE_URL
    }

    fn apply(&mut self, resources: &[ads::Resource], removed: &[String]) -> Vec<String> {
        let mut rejected = Vec::new();
        for resource in resources {
            let name = crate::error::truncate_for_log(&resource.name);
            let Some(any) = &resource.resource else {
                rejected.push(format!("{name}: the resource has no value"));
                continue;
            };
            if any.type_url != T::TYPE_URL {
                rejected.push(format!(
                    "{name}: type {} in a response of type {}",
                    crate::error::truncate_for_log(&any.type_url),
                    T::TYPE_URL
                ));
                continue;
            }
            match T::decode(&any.value) {
                Ok(value) => {
                    self.held.insert(
                        resource.name.as_str().into(),
                        (resource.version.clone(), Arc::new(value)),
                    );
                }
                Err(error) => rejected.push(format!("{name}: {error}")),
            }
        }
        for name in removed {
            self.held.remove(name.as_str());
        }
        // Published even when nothing changed: the first response (possibly empty) is what a consumer
        // waits for to know the state is complete.
        self.revision += 1;
        let by_name = self
            .held
            .iter()
            .map(|(name, (_, value))| (name.clone(), value.clone()))
            .collect();
        self.tx.send_replace(Arc::new(Resources {
            by_name,
            revision: self.revision,
        }));
        rejected
    }

    fn versions(&self) -> HashMap<String, String> {
        self.held
            .iter()
            .map(|(name, (version, _))| (name.to_string(), version.clone()))
            .collect()
    }
}
