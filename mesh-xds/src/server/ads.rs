//! The delta ADS service: `envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources`
//! served from a [`ResourcePublisher`].
//!
//! ## Protocol, as Envoy's "xDS REST and gRPC protocol" page defines the incremental variant
//! - The first request of a type with no names (or with `*`) is a wildcard subscription: the client gets
//!   every resource of the type. `*` in `resource_names_unsubscribe` ends it (Istio's ztunnel subscribes and
//!   unsubscribes `*` in one message to start with nothing, in on-demand mode).
//! - Other names subscribe to single resources, by name or by alias (`network/ip` for an address); the
//!   resource comes back under its own name with the requested alias in `aliases`. A name that resolves to
//!   nothing is answered in `removed_resources`, so an on-demand caller learns it does not exist.
//! - `initial_resource_versions` on a stream's first request of a type lists what the client holds: resources
//!   whose version matches are not sent again, and names the server no longer has are removed.
//! - Every response carries a fresh nonce; a request echoing it with `error_detail` is a NACK, without it an
//!   ACK. NACKs are logged and reported as [`AdsEvent::Nack`]; the server keeps serving (the client keeps
//!   whatever it accepted).
//! - The first request of each type is always answered, even with nothing, so the client can tell "no
//!   resources" from "not answered yet" and report ready.
//!
//! ## Bounds
//! Streams ([`AdsLimits::max_streams`]), names one stream may subscribe to ([`AdsLimits::max_names`]) and
//! request size are bounded; a client over a bound gets `RESOURCE_EXHAUSTED` and its stream ends.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use tokio::sync::{Semaphore, broadcast, mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

use super::access::{AdsAccess, StreamInfo};
use super::resources::{ResourcePublisher, ResourceSnapshot};
use crate::proto::envoy::service::discovery::v3 as ads;
use crate::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use crate::transport::ConnectionInfo;

/// What one ADS server may be made to hold.
#[derive(Debug, Clone, Copy)]
pub struct AdsLimits {
    /// Concurrent streams; more are refused with `RESOURCE_EXHAUSTED`.
    pub max_streams: usize,
    /// Names (explicit subscriptions plus names the client says it holds) one stream may track per type.
    pub max_names: usize,
    /// The largest request message accepted, in bytes.
    pub max_request_bytes: usize,
}

impl Default for AdsLimits {
    fn default() -> Self {
        AdsLimits {
            max_streams: 1024,
            max_names: 100_000,
            max_request_bytes: 4 << 20,
        }
    }
}

/// Something that happened on an ADS stream, for logs, tests and an admin page.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AdsEvent {
    /// A client sent its first request.
    Connected {
        /// The client's node id.
        node: String,
    },
    /// A client accepted a response.
    Ack {
        /// The client's node id.
        node: String,
        /// The response's type.
        type_url: String,
        /// The response's nonce.
        nonce: String,
    },
    /// A client rejected (part of) a response.
    Nack {
        /// The client's node id.
        node: String,
        /// The response's type.
        type_url: String,
        /// The response's nonce.
        nonce: String,
        /// The client's error detail.
        message: String,
    },
    /// A stream ended.
    Disconnected {
        /// The client's node id (empty if it never sent one).
        node: String,
    },
}

/// The delta ADS service over a [`ResourcePublisher`]. Wrap it with [`AdsService::into_server`] to add it
/// to a `tonic` server.
#[derive(Clone)]
pub struct AdsService {
    resources: ResourcePublisher,
    limits: AdsLimits,
    streams: Arc<Semaphore>,
    events: broadcast::Sender<AdsEvent>,
    closing: Arc<watch::Sender<bool>>,
    access: Option<Arc<dyn AdsAccess>>,
}

impl fmt::Debug for AdsService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdsService")
            .field("limits", &self.limits)
            .field("access", &self.access)
            .field(
                "open_streams",
                &(self.limits.max_streams - self.streams.available_permits()),
            )
            .finish_non_exhaustive()
    }
}

impl AdsService {
    /// A service serving what `resources` publishes, within `limits`.
    pub fn new(resources: ResourcePublisher, limits: AdsLimits) -> Self {
        let (events, _) = broadcast::channel(1024);
        let (closing, _) = watch::channel(false);
        AdsService {
            resources,
            streams: Arc::new(Semaphore::new(limits.max_streams)),
            limits,
            events,
            closing: Arc::new(closing),
            access: None,
        }
    }

    /// Checks every stream with `access` before serving it (without one, anyone who can connect may
    /// subscribe: only for tests and trusted transports).
    pub fn with_access(mut self, access: Arc<dyn AdsAccess>) -> Self {
        self.access = Some(access);
        self
    }

    /// Ends every stream with `UNAVAILABLE` and refuses new ones, so that clients reconnect (to another
    /// server, or to this one restarted). Call it before stopping the gRPC server: a graceful stop waits
    /// for open streams, and ADS streams never end by themselves.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// A receiver of [`AdsEvent`]s from now on (a slow receiver misses the oldest ones).
    pub fn events(&self) -> broadcast::Receiver<AdsEvent> {
        self.events.subscribe()
    }

    /// The `tonic` service, with the request size bound applied.
    pub fn into_server(self) -> AggregatedDiscoveryServiceServer<AdsService> {
        let max = self.limits.max_request_bytes;
        AggregatedDiscoveryServiceServer::new(self).max_decoding_message_size(max)
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ads::DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<ads::DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        if *self.closing.borrow() {
            return Err(Status::unavailable("the ADS server is shutting down"));
        }
        if let Some(access) = &self.access {
            let connection = request.extensions().get::<ConnectionInfo>();
            let stream = StreamInfo {
                metadata: request.metadata(),
                connection,
                remote_addr: connection
                    .map(ConnectionInfo::remote_addr)
                    .or_else(|| request.remote_addr()),
            };
            match access.check(&stream).await {
                Ok(client) => tracing::debug!(%client, "ADS stream allowed"),
                Err(status) => {
                    tracing::info!(peer = ?stream.remote_addr, reason = %status.message(), "ADS stream refused");
                    return Err(status);
                }
            }
        }
        let permit = self
            .streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| Status::resource_exhausted("too many ADS streams"))?;
        let requests = request.into_inner();
        // A small buffer: a slow client slows its own stream task down, nothing else.
        let (tx, rx) = mpsc::channel(4);
        let stream = StreamTask {
            snapshots: self.resources.subscribe(),
            limits: self.limits,
            events: self.events.clone(),
            node: String::new(),
            nonce: 0,
            types: HashMap::new(),
            tx,
        };
        let closing = self.closing.subscribe();
        tokio::spawn(async move {
            let _permit = permit;
            stream.run(requests, closing).await;
        });
        let responses = futures_util::stream::unfold(rx, |mut rx| async move {
            let item = rx.recv().await?;
            Some((item, rx))
        });
        Ok(Response::new(Box::pin(responses)))
    }
}

/// What one stream knows about one type.
#[derive(Debug, Default)]
struct TypeState {
    wildcard: bool,
    /// Names subscribed explicitly (resource names or aliases).
    names: HashSet<String>,
    /// What the client holds, by resource name: the version last sent (or reported in
    /// `initial_resource_versions`).
    sent: HashMap<String, String>,
    /// Explicitly subscribed names not answered yet (answered with the resource, or as removed).
    unanswered: HashSet<String>,
}

/// One client's stream: reads its requests, watches the resources, sends what the client lacks.
struct StreamTask {
    snapshots: watch::Receiver<Arc<ResourceSnapshot>>,
    limits: AdsLimits,
    events: broadcast::Sender<AdsEvent>,
    node: String,
    nonce: u64,
    types: HashMap<String, TypeState>,
    tx: mpsc::Sender<Result<ads::DeltaDiscoveryResponse, Status>>,
}

impl StreamTask {
    async fn run(
        mut self,
        mut requests: Streaming<ads::DeltaDiscoveryRequest>,
        mut closing: watch::Receiver<bool>,
    ) {
        let outcome = loop {
            if *closing.borrow_and_update() {
                break Err(Status::unavailable("the ADS server is shutting down"));
            }
            tokio::select! {
                request = requests.message() => match request {
                    Ok(Some(request)) => {
                        if let Err(status) = self.on_request(request).await {
                            break Err(status);
                        }
                    }
                    Ok(None) => break Ok(()),
                    Err(status) => {
                        tracing::debug!(node = %self.node, %status, "ADS stream ended by the client");
                        break Ok(());
                    }
                },
                changed = self.snapshots.changed() => {
                    if changed.is_err() {
                        break Ok(());
                    }
                    if let Err(status) = self.push_all().await {
                        break Err(status);
                    }
                }
                () = self.tx.closed() => break Ok(()),
                // The flag only ever turns true (and a dropped service means the same).
                _ = closing.changed() => {
                    break Err(Status::unavailable("the ADS server is shutting down"));
                }
            }
        };
        if let Err(status) = outcome {
            // The response stream is how the client learns why; it may already be gone.
            let _ = self.tx.send(Err(status)).await;
        }
        let _ = self.events.send(AdsEvent::Disconnected { node: self.node });
    }

    async fn on_request(&mut self, request: ads::DeltaDiscoveryRequest) -> Result<(), Status> {
        if self.node.is_empty() {
            let Some(node) = request.node.as_ref() else {
                return Err(Status::invalid_argument("the first request must carry the node"));
            };
            self.node = node.id.clone();
            tracing::info!(node = %self.node, "ADS client connected");
            let _ = self.events.send(AdsEvent::Connected {
                node: self.node.clone(),
            });
        }
        if !request.response_nonce.is_empty() {
            let event = match &request.error_detail {
                Some(detail) => {
                    tracing::warn!(node = %self.node, type_url = %request.type_url,
                        nonce = %request.response_nonce, error = %detail.message, "ADS client rejected a response");
                    AdsEvent::Nack {
                        node: self.node.clone(),
                        type_url: request.type_url.clone(),
                        nonce: request.response_nonce.clone(),
                        message: detail.message.clone(),
                    }
                }
                None => AdsEvent::Ack {
                    node: self.node.clone(),
                    type_url: request.type_url.clone(),
                    nonce: request.response_nonce.clone(),
                },
            };
            let _ = self.events.send(event);
        }
        let first = !self.types.contains_key(&request.type_url);
        let max_names = self.limits.max_names;
        let state = self.types.entry(request.type_url.clone()).or_default();
        if first {
            state.wildcard =
                request.resource_names_subscribe.is_empty() && request.resource_names_unsubscribe.is_empty();
            state.sent = request.initial_resource_versions;
        }
        for name in request.resource_names_subscribe {
            if name == "*" {
                state.wildcard = true;
            } else if state.names.insert(name.clone()) {
                state.unanswered.insert(name);
            }
        }
        for name in request.resource_names_unsubscribe {
            if name == "*" {
                state.wildcard = false;
            } else {
                state.names.remove(&name);
                state.unanswered.remove(&name);
                // The client drops what it unsubscribes from by itself.
                state.sent.remove(&name);
            }
        }
        if state.names.len() + state.sent.len() > max_names {
            return Err(Status::resource_exhausted(format!(
                "more than {max_names} resource names on one stream"
            )));
        }
        if first || !state.unanswered.is_empty() {
            self.push(&request.type_url, first).await?;
        }
        Ok(())
    }

    /// Sends every type whatever changed in the resources.
    async fn push_all(&mut self) -> Result<(), Status> {
        let types: Vec<String> = self.types.keys().cloned().collect();
        for type_url in types {
            self.push(&type_url, false).await?;
        }
        Ok(())
    }

    /// Sends `type_url`'s differences between what the client holds and what it should; with `always`,
    /// sends a response even if there are none.
    async fn push(&mut self, type_url: &str, always: bool) -> Result<(), Status> {
        let snapshot = self.snapshots.borrow_and_update().clone();
        let Some(state) = self.types.get_mut(type_url) else {
            return Ok(());
        };
        let empty = Default::default();
        let available = snapshot.resources(type_url).unwrap_or(&empty);
        // What the client should hold: name -> (resource, aliases it asked for it by).
        let mut wanted: HashMap<&str, (&super::ServedResource, Vec<String>)> = HashMap::new();
        if state.wildcard {
            for resource in available.iter() {
                wanted.insert(&resource.name, (resource, Vec::new()));
            }
        }
        let mut removed: HashSet<String> = HashSet::new();
        for name in &state.names {
            match available.resolve(name) {
                Some(resource) => {
                    let entry = wanted.entry(&resource.name).or_insert((resource, Vec::new()));
                    if **name != *resource.name {
                        entry.1.push(name.clone());
                    }
                }
                None => {
                    if state.unanswered.contains(name) || state.sent.contains_key(name) {
                        removed.insert(name.clone());
                    }
                }
            }
        }
        let mut resources = Vec::new();
        for (name, (resource, aliases)) in &wanted {
            let up_to_date = state.sent.get(*name).is_some_and(|v| **v == *resource.version);
            let newly_asked = aliases.iter().any(|alias| state.unanswered.contains(alias));
            if !up_to_date || newly_asked {
                resources.push(resource.to_proto(type_url, aliases.clone()));
            }
        }
        for name in state.sent.keys() {
            if !wanted.contains_key(name.as_str()) {
                removed.insert(name.clone());
            }
        }
        state.unanswered.clear();
        if resources.is_empty() && removed.is_empty() && !always {
            return Ok(());
        }
        for resource in &resources {
            state.sent.insert(resource.name.clone(), resource.version.clone());
        }
        for name in &removed {
            state.sent.remove(name);
        }
        resources.sort_by(|a, b| a.name.cmp(&b.name));
        let mut removed: Vec<String> = removed.into_iter().collect();
        removed.sort();
        self.nonce += 1;
        let response = ads::DeltaDiscoveryResponse {
            system_version_info: String::new(),
            resources,
            type_url: type_url.to_owned(),
            nonce: self.nonce.to_string(),
            removed_resources: removed,
        };
        tracing::debug!(node = %self.node, type_url, nonce = self.nonce,
            resources = response.resources.len(), removed = response.removed_resources.len(), "ADS push");
        self.tx
            .send(Ok(response))
            .await
            .map_err(|_| Status::cancelled("the client went away"))
    }
}
