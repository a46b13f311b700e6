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
//! Streams ([`AdsLimits::max_streams`]), names one stream may subscribe to or list as held
//! ([`AdsLimits::max_names`]), types one stream may subscribe to ([`MAX_TYPES_PER_STREAM`]), the length of
//! a name, type URL or nonce ([`MAX_NAME_BYTES`]), a NACK's detail kept in an [`AdsEvent`] and request
//! size are bounded; a client over a bound gets `RESOURCE_EXHAUSTED` (`INVALID_ARGUMENT` for a name too
//! long) and its stream ends. What the server sends because of a wildcard subscription does not count
//! against [`AdsLimits::max_names`]: it is bounded by what the server publishes.

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

/// The most resource types one stream may subscribe to. Istio's ztunnel uses two, Envoy about ten.
pub const MAX_TYPES_PER_STREAM: usize = 64;

/// The longest resource name (or alias, type URL or nonce) a client may send, in bytes. Istio's names (a
/// workload uid, `namespace/hostname`, `network/ip`) are a few hundred bytes at most.
pub const MAX_NAME_BYTES: usize = 4096;

/// The most bytes of a NACK's error detail kept in an [`AdsEvent::Nack`] (twice what our own client sends).
const MAX_EVENT_DETAIL_BYTES: usize = 32 * 1024;

/// What one ADS server may be made to hold.
#[derive(Debug, Clone, Copy)]
pub struct AdsLimits {
    /// Concurrent streams; more are refused with `RESOURCE_EXHAUSTED`.
    pub max_streams: usize,
    /// Names one stream may subscribe to explicitly per type, and names it may list in
    /// `initial_resource_versions` (resources sent because of a wildcard subscription do not count).
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
            // Kept for the stream's life and copied into every event: capped.
            self.node = cut(&node.id, MAX_NAME_BYTES);
            tracing::info!(node = %self.node, "ADS client connected");
            let _ = self.events.send(AdsEvent::Connected {
                node: self.node.clone(),
            });
        }
        check_name("type URL", &request.type_url)?;
        check_name("nonce", &request.response_nonce)?;
        if !request.response_nonce.is_empty() {
            let event = match &request.error_detail {
                Some(detail) => {
                    // A subscriber of the events may hold many of them: a client's detail is capped.
                    let message = cut(&detail.message, MAX_EVENT_DETAIL_BYTES);
                    tracing::warn!(node = %self.node, type_url = %request.type_url,
                        nonce = %request.response_nonce, error = %message, "ADS client rejected a response");
                    AdsEvent::Nack {
                        node: self.node.clone(),
                        type_url: request.type_url.clone(),
                        nonce: request.response_nonce.clone(),
                        message,
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
        let too_many_names =
            || Status::resource_exhausted(format!("more than {max_names} resource names on one stream"));
        if first {
            if self.types.len() >= MAX_TYPES_PER_STREAM {
                return Err(Status::resource_exhausted(format!(
                    "more than {MAX_TYPES_PER_STREAM} resource types on one stream"
                )));
            }
            if request.initial_resource_versions.len() > max_names {
                return Err(too_many_names());
            }
        }
        for name in &request.resource_names_subscribe {
            check_name("resource name", name)?;
        }
        let state = self.types.entry(request.type_url.clone()).or_default();
        if first {
            state.wildcard =
                request.resource_names_subscribe.is_empty() && request.resource_names_unsubscribe.is_empty();
            // Names the server does not have are answered as removed by the first push, which also drops
            // them from `sent`: from then on `sent` only holds what this server published.
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
        if state.names.len() > max_names {
            return Err(too_many_names());
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
        // Not `borrow_and_update`: a push for one type must not mark a new snapshot as seen, or the
        // stream's `changed()` would never fire for it and the other types would miss the update.
        let snapshot = self.snapshots.borrow().clone();
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
            // A name just subscribed to is answered even if the client holds the resource already (by
            // another name, or from before): it waits for that answer.
            let newly_asked = state.unanswered.contains(*name)
                || aliases.iter().any(|alias| state.unanswered.contains(alias));
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

/// `text`, cut to at most `limit` bytes (on a character boundary) with `...` appended when cut.
fn cut(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_owned();
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// Refuses a name (or type URL, or nonce) longer than [`MAX_NAME_BYTES`]: the stream keeps the names it
/// subscribes to, and events carry the type URL and nonce.
fn check_name(what: &str, name: &str) -> Result<(), Status> {
    if name.len() > MAX_NAME_BYTES {
        return Err(Status::invalid_argument(format!(
            "a {what} of {} bytes is longer than {MAX_NAME_BYTES}",
            name.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]
mod tests {
    use super::*;
    use crate::server::ServedResource;

    const A: &str = "type.test/A";
    const B: &str = "type.test/B";

    /// One resource `r` of types A and B whose content (and so version) is `content`.
    fn snapshot(content: &str) -> ResourceSnapshot {
        let mut snapshot = ResourceSnapshot::new();
        for type_url in [A, B] {
            let value = bytes::Bytes::from(content.as_bytes().to_vec());
            snapshot.insert(type_url, ServedResource::new("r", Vec::new(), value));
        }
        snapshot
    }

    fn request(type_url: &str, subscribe: &[&str]) -> ads::DeltaDiscoveryRequest {
        ads::DeltaDiscoveryRequest {
            node: Some(ads::Node {
                id: "test-node".into(),
                ..Default::default()
            }),
            type_url: type_url.to_owned(),
            resource_names_subscribe: subscribe.iter().map(|name| (*name).to_owned()).collect(),
            ..Default::default()
        }
    }

    type Responses = mpsc::Receiver<Result<ads::DeltaDiscoveryResponse, Status>>;

    fn stream(publisher: &ResourcePublisher, limits: AdsLimits) -> (StreamTask, Responses) {
        let (tx, rx) = mpsc::channel(64);
        let task = StreamTask {
            snapshots: publisher.subscribe(),
            limits,
            events: broadcast::channel(16).0,
            node: String::new(),
            nonce: 0,
            types: HashMap::new(),
            tx,
        };
        (task, rx)
    }

    #[tokio::test]
    async fn a_push_for_one_type_does_not_hide_a_new_snapshot_from_the_others() {
        let publisher = ResourcePublisher::new(snapshot("v1"));
        let (mut task, mut responses) = stream(&publisher, AdsLimits::default());
        task.on_request(request(A, &[])).await.unwrap();
        task.on_request(request(B, &[])).await.unwrap();
        for _ in 0..2 {
            responses.try_recv().unwrap().unwrap();
        }

        // A new snapshot changes both types; before the stream task notices, a request makes it push A.
        publisher.publish(snapshot("v2"));
        task.on_request(request(A, &["missing"])).await.unwrap();
        let pushed = responses.try_recv().unwrap().unwrap();
        assert_eq!(pushed.type_url, A);

        // The change must still be pending for the stream's loop, which then brings B up to date.
        assert!(
            task.snapshots.has_changed().unwrap(),
            "the push for A marked the new snapshot as seen: B would never get it"
        );
        task.snapshots.changed().await.unwrap();
        task.push_all().await.unwrap();
        let mut b_version = None;
        while let Ok(response) = responses.try_recv() {
            let response = response.unwrap();
            if response.type_url == B {
                b_version = response.resources.first().map(|r| r.version.clone());
            }
        }
        let current = publisher.current();
        let expected = &current.resources(B).unwrap().get("r").unwrap().version;
        assert_eq!(b_version.as_deref(), Some(&**expected));
    }

    #[tokio::test]
    async fn resources_sent_by_wildcard_do_not_count_against_the_name_limit() {
        let publisher = ResourcePublisher::new(snapshot("v1"));
        let limits = AdsLimits {
            max_names: 0,
            ..AdsLimits::default()
        };
        let (mut task, mut responses) = stream(&publisher, limits);
        task.on_request(request(A, &[])).await.unwrap();
        assert_eq!(responses.try_recv().unwrap().unwrap().resources.len(), 1);
        // The ACK of that response: the resource the server sent is not a name the client asked for.
        let mut ack = request(A, &[]);
        ack.response_nonce = "1".into();
        task.on_request(ack).await.unwrap();

        // What the client itself sends does count.
        let error = task.on_request(request(A, &["x"])).await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::ResourceExhausted);
        let mut held = request(B, &[]);
        held.initial_resource_versions = [("r".to_owned(), "old".to_owned())].into();
        let error = task.on_request(held).await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::ResourceExhausted);
    }

    #[tokio::test]
    async fn types_per_stream_and_name_lengths_are_bounded() {
        let publisher = ResourcePublisher::new(ResourceSnapshot::new());
        let (mut task, mut responses) = stream(&publisher, AdsLimits::default());
        for index in 0..MAX_TYPES_PER_STREAM {
            task.on_request(request(&format!("type.test/{index}"), &[]))
                .await
                .unwrap();
            responses.try_recv().unwrap().unwrap();
        }
        let error = task
            .on_request(request("type.test/one-more", &[]))
            .await
            .unwrap_err();
        assert_eq!(error.code(), tonic::Code::ResourceExhausted, "{error:?}");
        assert_eq!(task.types.len(), MAX_TYPES_PER_STREAM);

        let (mut task, _responses) = stream(&publisher, AdsLimits::default());
        let long = "n".repeat(MAX_NAME_BYTES + 1);
        let error = task.on_request(request(A, &[&long])).await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
        let error = task.on_request(request(&long, &[])).await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
        assert!(task.types.is_empty());
        let mut ack = request(A, &[]);
        ack.response_nonce = long.clone();
        let error = task.on_request(ack).await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
    }

    #[tokio::test]
    async fn events_keep_a_bounded_part_of_what_the_client_sends() {
        let publisher = ResourcePublisher::new(ResourceSnapshot::new());
        let (mut task, _responses) = stream(&publisher, AdsLimits::default());
        let mut events = task.events.subscribe();
        let mut first = request(A, &[]);
        first.node = Some(ads::Node {
            id: "n".repeat(1 << 20),
            ..Default::default()
        });
        task.on_request(first).await.unwrap();
        let mut nack = request(A, &[]);
        nack.response_nonce = "1".into();
        nack.error_detail = Some(crate::proto::google::rpc::Status {
            code: 3,
            message: "é".repeat(1 << 20),
            details: Vec::new(),
        });
        task.on_request(nack).await.unwrap();
        let connected = events.try_recv().unwrap();
        let AdsEvent::Connected { node } = connected else {
            panic!("{connected:?}");
        };
        assert!(node.len() <= MAX_NAME_BYTES + 3, "{}", node.len());
        let nacked = events.try_recv().unwrap();
        let AdsEvent::Nack { message, node, .. } = nacked else {
            panic!("{nacked:?}");
        };
        assert!(message.len() <= MAX_EVENT_DETAIL_BYTES + 3, "{}", message.len());
        assert!(message.starts_with("éé") && message.ends_with("..."));
        assert!(node.len() <= MAX_NAME_BYTES + 3, "{}", node.len());
    }
}
