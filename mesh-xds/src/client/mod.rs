//! The delta ADS client: subscribes to Istio's workload xDS types, keeps what it learned through
//! reconnects, and hands typed state to its consumers through [`Watch`]es.
//!
//! ## Behaviour (Istio ztunnel's `src/xds/client.rs` and Envoy's incremental xDS protocol)
//! - One `DeltaAggregatedResources` stream carries every type. Each type's first request on a stream carries
//!   the [`Node`](crate::proto::envoy::service::discovery::v3::Node) and either no names (a wildcard: all
//!   resources of the type) or, for an on-demand type, `*` subscribed and unsubscribed at once (nothing yet)
//!   plus the names demanded so far.
//! - After a reconnect, that first request lists every resource held with its version in
//!   `initial_resource_versions`, so the control plane only sends what changed. While disconnected, the last
//!   state stays in the watches: proxies keep working on it.
//! - Each response is answered: an ACK (`type_url` + nonce), or a NACK whose `error_detail` names the
//!   resources that were refused and why (at most [`MAX_NACK_DETAIL_BYTES`] of them; the rest are counted,
//!   so that a NACK of a large push stays under the control plane's request size limit). The resources
//!   that were valid apply either way.
//! - Reconnects back off exponentially with jitter ([`Backoff`]), starting over once a stream has delivered a
//!   response.
//! - [`AdsHandle::is_ready`] turns true once every subscribed type has had its first response; it stays true
//!   through reconnects (the state it describes is still there).
//! - [`AdsHandle::demand`] subscribes to one name (a resource name or an alias such as `network/ip`) and
//!   returns once the control plane has answered: with the resource, or by listing the name as removed.

mod mesh;
mod store;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost_types::{Struct, Value, value::Kind};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::service::Interceptor;
use tonic::transport::Channel;

pub use mesh::{publish_policies, publish_snapshots, publish_snapshots_reporting, snapshot_from_addresses};
pub use store::{Resource, Resources, Watch};
use store::{TypeStore, TypedStore};

use crate::XdsError;
use crate::proto::envoy::service::discovery::v3 as ads;
use crate::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::proto::google::rpc::Status as RpcStatus;

/// The most bytes of refusal reasons a NACK's `error_detail` carries; past it, the remaining refused
/// resources are only counted. istiod accepts requests of up to 4 MiB: a NACK listing every resource of a
/// large push that a newer istiod sent (one enum value this version does not know, say) would be refused
/// as a whole, the stream reset, and the same push refused again on every reconnect.
pub const MAX_NACK_DETAIL_BYTES: usize = 16 * 1024;

/// The identity a node proxy presents to istiod, from which istiod decides what to send it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ZtunnelNode {
    /// The proxy pod's IP (`INSTANCE_IP`); Istio's ztunnel uses `1.1.1.1` when it is unknown.
    pub instance_ip: String,
    /// The proxy pod's name (`POD_NAME`).
    pub pod_name: String,
    /// The proxy pod's namespace (`POD_NAMESPACE`).
    pub pod_namespace: String,
    /// The Kubernetes node it serves (`NODE_NAME`): istiod sends workload certificates and, in on-demand
    /// mode, workloads for this node.
    pub node_name: String,
    /// The cluster (`CLUSTER_ID`), sent as metadata when set.
    pub cluster_id: Option<String>,
    /// More metadata (`ISTIO_META_*`, proxy metadata), as strings.
    pub metadata: Vec<(String, String)>,
}

impl ZtunnelNode {
    /// The `Node` message as Istio's ztunnel sends it: id
    /// `ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`, metadata `NAME`, `NAMESPACE`,
    /// `INSTANCE_IPS`, `NODE_NAME` (and `CLUSTER_ID` and extra entries when set).
    pub fn to_proto(&self) -> ads::Node {
        let ip = if self.instance_ip.is_empty() {
            "1.1.1.1"
        } else {
            &self.instance_ip
        };
        let ns = &self.pod_namespace;
        let mut fields = std::collections::BTreeMap::new();
        let mut put = |key: &str, value: &str| {
            fields.insert(
                key.to_owned(),
                Value {
                    kind: Some(Kind::StringValue(value.to_owned())),
                },
            );
        };
        put("NAME", &self.pod_name);
        put("NAMESPACE", ns);
        put("INSTANCE_IPS", ip);
        put("NODE_NAME", &self.node_name);
        if let Some(cluster) = &self.cluster_id {
            put("CLUSTER_ID", cluster);
        }
        for (key, value) in &self.metadata {
            put(key, value);
        }
        ads::Node {
            id: format!("ztunnel~{ip}~{}.{ns}~{ns}.svc.cluster.local", self.pod_name),
            cluster: String::new(),
            metadata: Some(Struct { fields }),
            build_version: concat!("meshkit/", env!("CARGO_PKG_VERSION")).to_owned(),
        }
    }
}

/// Exponential backoff with jitter between reconnects.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The first delay.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(15),
        }
    }
}

impl Backoff {
    /// The delay before reconnect attempt `attempt` (0-based): `initial * 2^attempt` capped at `max`, of which
    /// a random half is kept ("equal jitter"), so that proxies restarted together do not reconnect together.
    pub fn delay(&self, attempt: u32) -> Duration {
        let full = self
            .initial
            .saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
            .min(self.max);
        let half = full / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

/// Settings of an [`AdsClient`].
#[derive(Debug, Clone)]
pub struct AdsConfig {
    /// Reconnect delays.
    pub backoff: Backoff,
    /// How long opening a stream may take before it counts as a failed attempt.
    pub connect_timeout: Duration,
    /// The largest response accepted. Istio's ztunnel allows 200 MiB: a large mesh's first push is big.
    pub max_response_bytes: usize,
    /// The most names [`AdsHandle::demand`] may subscribe to (per type).
    pub max_demanded: usize,
}

impl Default for AdsConfig {
    fn default() -> Self {
        AdsConfig {
            backoff: Backoff::default(),
            connect_timeout: Duration::from_secs(10),
            max_response_bytes: 200 << 20,
            max_demanded: 100_000,
        }
    }
}

/// What the client has been doing, for health metrics and an admin page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdsStatus {
    /// Whether a stream is open now.
    pub connected: bool,
    /// Streams opened so far.
    pub connects: u64,
    /// Responses received so far.
    pub responses: u64,
    /// Responses (partly) rejected so far.
    pub nacks: u64,
    /// Why the last stream ended or failed to open.
    pub last_error: Option<String>,
    /// The error detail of the last NACK sent.
    pub last_nack: Option<String>,
}

/// Builds an [`AdsClient`]: say which types to watch, then [`build`](AdsClientBuilder::build).
#[derive(Debug)]
pub struct AdsClientBuilder {
    node: ads::Node,
    config: AdsConfig,
    stores: Vec<Box<dyn TypeStore>>,
    on_demand: HashSet<&'static str>,
}

impl AdsClientBuilder {
    /// A client presenting `node` (see [`ZtunnelNode::to_proto`]).
    pub fn new(node: ads::Node) -> Self {
        AdsClientBuilder {
            node,
            config: AdsConfig::default(),
            stores: Vec::new(),
            on_demand: HashSet::new(),
        }
    }

    /// Replaces the default settings.
    pub fn config(mut self, config: AdsConfig) -> Self {
        self.config = config;
        self
    }

    /// Subscribes to every resource of `T` (a wildcard subscription).
    pub fn watch<T: Resource>(&mut self) -> Watch<T> {
        let (store, watch) = TypedStore::<T>::new();
        self.stores.push(Box::new(store));
        watch
    }

    /// Subscribes to resources of `T` only as [`AdsHandle::demand`] asks for them.
    pub fn watch_on_demand<T: Resource>(&mut self) -> Watch<T> {
        self.on_demand.insert(T::TYPE_URL);
        self.watch()
    }

    /// The client, talking over `channel` with `interceptor` adding credentials to each stream it opens
    /// (so a token re-read per call is fresh on every reconnect), and the handle to observe and steer it.
    pub fn build(
        self,
        channel: Channel,
        interceptor: impl Interceptor + Send + 'static,
    ) -> (AdsClient, AdsHandle) {
        let (commands_tx, commands) = mpsc::channel(64);
        let (ready_tx, ready) = watch::channel(false);
        let (status_tx, status) = watch::channel(AdsStatus::default());
        let client = AdsClient {
            node: self.node,
            config: self.config,
            channel,
            interceptor: SharedInterceptor(Arc::new(Mutex::new(interceptor))),
            stores: self.stores,
            on_demand: self.on_demand,
            demanded: HashMap::new(),
            pending: HashMap::new(),
            answered_once: HashSet::new(),
            commands,
            ready: ready_tx,
            status: status_tx,
        };
        let handle = AdsHandle {
            commands: commands_tx,
            ready,
            status,
        };
        (client, handle)
    }
}

/// Lets one interceptor value be shared by the stream clients the ADS client creates on each reconnect.
#[derive(Clone)]
struct SharedInterceptor(Arc<Mutex<dyn Interceptor + Send>>);

impl Interceptor for SharedInterceptor {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let mut inner = self
            .0
            .lock()
            .map_err(|_| tonic::Status::internal("credentials interceptor poisoned"))?;
        inner.call(request)
    }
}

/// Where the answer to one demand goes.
type DemandReply = oneshot::Sender<Result<(), XdsError>>;

/// A request to the running client.
#[derive(Debug)]
enum Command {
    Demand {
        type_url: String,
        name: String,
        answered: DemandReply,
    },
}

/// Observes and steers a running [`AdsClient`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AdsHandle {
    commands: mpsc::Sender<Command>,
    ready: watch::Receiver<bool>,
    status: watch::Receiver<AdsStatus>,
}

impl AdsHandle {
    /// Whether every subscribed type has had its first response (applied to the [`Watch`]es; state derived
    /// from them by other tasks, such as [`publish_snapshots`]'s snapshots, may lag: see
    /// [`publish_snapshots_reporting`]).
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until [`is_ready`](Self::is_ready); fails if the client stopped first.
    pub async fn wait_ready(&self) -> Result<(), XdsError> {
        let mut ready = self.ready.clone();
        ready
            .wait_for(|ready| *ready)
            .await
            .map(|_| ())
            .map_err(|_| XdsError::ClientStopped)
    }

    /// What the client has been doing.
    pub fn status(&self) -> AdsStatus {
        self.status.borrow().clone()
    }

    /// A receiver of status changes.
    pub fn status_watch(&self) -> watch::Receiver<AdsStatus> {
        self.status.clone()
    }

    /// Subscribes to `name` (a resource name or an alias) of the on-demand type `T` and waits for the
    /// control plane's answer: the resource is then in `T`'s [`Watch`], or the name was reported as absent.
    /// The subscription stays (and is renewed after reconnects). Bound the wait with a timeout.
    pub async fn demand<T: Resource>(&self, name: &str) -> Result<(), XdsError> {
        let (answered, rx) = oneshot::channel();
        self.commands
            .send(Command::Demand {
                type_url: T::TYPE_URL.to_owned(),
                name: name.to_owned(),
                answered,
            })
            .await
            .map_err(|_| XdsError::ClientStopped)?;
        rx.await.map_err(|_| XdsError::ClientStopped)?
    }
}

/// The delta ADS client. [`run`](AdsClient::run) it as a task; observe it through its [`AdsHandle`] and
/// the [`Watch`]es from the builder.
pub struct AdsClient {
    node: ads::Node,
    config: AdsConfig,
    channel: Channel,
    interceptor: SharedInterceptor,
    stores: Vec<Box<dyn TypeStore>>,
    on_demand: HashSet<&'static str>,
    /// On-demand names subscribed so far, per type: resubscribed on every new stream.
    demanded: HashMap<&'static str, HashSet<String>>,
    /// Demands waiting for an answer, by (type, name).
    pending: HashMap<(&'static str, String), Vec<DemandReply>>,
    /// Types that have had a first response (on any stream).
    answered_once: HashSet<&'static str>,
    commands: mpsc::Receiver<Command>,
    ready: watch::Sender<bool>,
    status: watch::Sender<AdsStatus>,
}

impl fmt::Debug for AdsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdsClient")
            .field("node", &self.node.id)
            .field("stores", &self.stores)
            .field("on_demand", &self.on_demand)
            .finish_non_exhaustive()
    }
}

/// How a stream ended.
enum StreamEnd {
    /// The caller's shutdown fired.
    Shutdown,
    /// The stream failed or the server closed it; `delivered` says whether any response came first.
    Lost { reason: String, delivered: bool },
}

impl AdsClient {
    /// Runs until `shutdown` completes: opens a stream, follows it, reconnects with backoff when it ends.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut attempt: u32 = 0;
        loop {
            match self.follow_stream(shutdown.as_mut()).await {
                StreamEnd::Shutdown => break,
                StreamEnd::Lost { reason, delivered } => {
                    if delivered {
                        attempt = 0;
                    }
                    let delay = self.config.backoff.delay(attempt);
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(%reason, ?delay, "ADS stream lost; reconnecting");
                    self.status.send_modify(|status| {
                        status.connected = false;
                        status.last_error = Some(reason);
                    });
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.as_mut() => break,
                    }
                }
            }
        }
        self.status.send_modify(|status| status.connected = false);
        for (_, waiters) in self.pending.drain() {
            for waiter in waiters {
                let _ = waiter.send(Err(XdsError::ClientStopped));
            }
        }
    }

    /// The first request of each type on a new stream.
    fn initial_requests(&self) -> Vec<ads::DeltaDiscoveryRequest> {
        self.stores
            .iter()
            .map(|store| {
                let type_url = store.type_url();
                let (subscribe, unsubscribe) = if self.on_demand.contains(type_url) {
                    let mut names = vec!["*".to_owned()];
                    if let Some(demanded) = self.demanded.get(type_url) {
                        names.extend(demanded.iter().cloned());
                    }
                    (names, vec!["*".to_owned()])
                } else {
                    (Vec::new(), Vec::new())
                };
                ads::DeltaDiscoveryRequest {
                    node: Some(self.node.clone()),
                    type_url: type_url.to_owned(),
                    resource_names_subscribe: subscribe,
                    resource_names_unsubscribe: unsubscribe,
                    initial_resource_versions: store.versions(),
                    response_nonce: String::new(),
                    error_detail: None,
                }
            })
            .collect()
    }

    async fn follow_stream(
        &mut self,
        mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> StreamEnd {
        let (requests, rx) = mpsc::unbounded_channel();
        for request in self.initial_requests() {
            // The receiver is alive: it is in this function.
            let _ = requests.send(request);
        }
        let outbound = futures_util::stream::unfold(rx, |mut rx| async move {
            let item = rx.recv().await?;
            Some((item, rx))
        });
        let mut grpc = AggregatedDiscoveryServiceClient::with_interceptor(
            self.channel.clone(),
            self.interceptor.clone(),
        )
        .max_decoding_message_size(self.config.max_response_bytes);
        let opened = tokio::select! {
            opened = tokio::time::timeout(self.config.connect_timeout, grpc.delta_aggregated_resources(outbound)) => opened,
            () = shutdown.as_mut() => return StreamEnd::Shutdown,
        };
        let mut inbound = match opened {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                return StreamEnd::Lost {
                    reason: describe(&status),
                    delivered: false,
                };
            }
            Err(_) => {
                return StreamEnd::Lost {
                    reason: format!("no stream within {:?}", self.config.connect_timeout),
                    delivered: false,
                };
            }
        };
        tracing::info!(node = %self.node.id, "ADS stream open");
        self.status.send_modify(|status| {
            status.connected = true;
            status.connects += 1;
        });
        let mut delivered = false;
        loop {
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(response)) => {
                        delivered = true;
                        let answer = self.on_response(response);
                        if requests.send(answer).is_err() {
                            return StreamEnd::Lost { reason: "request stream closed".into(), delivered };
                        }
                    }
                    Ok(None) => return StreamEnd::Lost { reason: "the server closed the stream".into(), delivered },
                    Err(status) => return StreamEnd::Lost { reason: describe(&status), delivered },
                },
                Some(command) = self.commands.recv() => {
                    if let Some(request) = self.on_command(command) {
                        let _ = requests.send(request);
                    }
                }
                () = shutdown.as_mut() => return StreamEnd::Shutdown,
            }
        }
    }

    /// Applies a response and returns its ACK or NACK.
    fn on_response(&mut self, response: ads::DeltaDiscoveryResponse) -> ads::DeltaDiscoveryRequest {
        let Some(store) = self
            .stores
            .iter_mut()
            .find(|store| store.type_url() == response.type_url)
        else {
            let message = format!(
                "not subscribed to type {}",
                crate::error::truncate_for_log(&response.type_url)
            );
            return self.answer(response.type_url, response.nonce, vec![message]);
        };
        let type_url = store.type_url();
        let rejected = store.apply(&response.resources, &response.removed_resources);
        tracing::debug!(type_url, nonce = %response.nonce, resources = response.resources.len(),
            removed = response.removed_resources.len(), rejected = rejected.len(), "ADS response applied");

        // Demands are answered after the state is updated, so a woken caller finds the resource.
        let answered_names = response
            .resources
            .iter()
            .flat_map(|resource| std::iter::once(&resource.name).chain(&resource.aliases))
            .chain(&response.removed_resources);
        for name in answered_names {
            if let Some(waiters) = self.pending.remove(&(type_url, name.clone())) {
                for waiter in waiters {
                    let _ = waiter.send(Ok(()));
                }
            }
        }
        if self.answered_once.insert(type_url) && self.answered_once.len() == self.stores.len() {
            tracing::info!("ADS ready: every subscribed type has had its first response");
            self.ready.send_replace(true);
        }
        self.answer(response.type_url, response.nonce, rejected)
    }

    /// The ACK (no rejections) or NACK for a response.
    fn answer(
        &mut self,
        type_url: String,
        nonce: String,
        rejected: Vec<String>,
    ) -> ads::DeltaDiscoveryRequest {
        let error_detail = if rejected.is_empty() {
            None
        } else {
            let message = nack_detail(&rejected);
            tracing::warn!(%type_url, %nonce, error = %message, "rejecting resources (NACK)");
            Some(RpcStatus {
                // google.rpc.Code.INVALID_ARGUMENT
                code: 3,
                message,
                details: Vec::new(),
            })
        };
        self.status.send_modify(|status| {
            status.responses += 1;
            if let Some(detail) = &error_detail {
                status.nacks += 1;
                status.last_nack = Some(detail.message.clone());
            }
        });
        ads::DeltaDiscoveryRequest {
            node: None,
            type_url,
            resource_names_subscribe: Vec::new(),
            resource_names_unsubscribe: Vec::new(),
            initial_resource_versions: HashMap::new(),
            response_nonce: nonce,
            error_detail,
        }
    }

    /// Records a demand; returns the subscription request to send, if one is needed.
    fn on_command(&mut self, command: Command) -> Option<ads::DeltaDiscoveryRequest> {
        let Command::Demand {
            type_url,
            name,
            answered,
        } = command;
        let Some(store) = self.stores.iter().find(|store| store.type_url() == type_url) else {
            let _ = answered.send(Err(XdsError::NotSubscribed { type_url }));
            return None;
        };
        let type_url = store.type_url();
        if !self.on_demand.contains(type_url) {
            // A wildcard subscription already brings everything: the answer is whatever is held.
            let _ = answered.send(Ok(()));
            return None;
        }
        let demanded = self.demanded.entry(type_url).or_default();
        if demanded.contains(&name) {
            // Subscribed before. Still unanswered: wait with the first caller for the control plane's
            // answer. Answered: whatever the control plane said is in the store already.
            match self.pending.get_mut(&(type_url, name)) {
                Some(waiters) => {
                    // Callers that gave up (a timeout) need no answer: only live waiters are kept.
                    waiters.retain(|waiter| !waiter.is_closed());
                    waiters.push(answered);
                }
                None => {
                    let _ = answered.send(Ok(()));
                }
            }
            return None;
        }
        if demanded.len() >= self.config.max_demanded {
            let _ = answered.send(Err(XdsError::TooManyDemands {
                limit: self.config.max_demanded,
            }));
            return None;
        }
        demanded.insert(name.clone());
        self.pending
            .entry((type_url, name.clone()))
            .or_default()
            .push(answered);
        Some(ads::DeltaDiscoveryRequest {
            node: None,
            type_url: type_url.to_owned(),
            resource_names_subscribe: vec![name],
            resource_names_unsubscribe: Vec::new(),
            initial_resource_versions: HashMap::new(),
            response_nonce: String::new(),
            error_detail: None,
        })
    }
}

/// The refusal reasons joined with `; `, cut after [`MAX_NACK_DETAIL_BYTES`] with a count of the rest.
fn nack_detail(rejected: &[String]) -> String {
    let mut message = String::new();
    for (index, reason) in rejected.iter().enumerate() {
        if index == 0 && reason.len() > MAX_NACK_DETAIL_BYTES / 2 {
            // One reason alone must not crowd out the count of the others.
            let mut cut = MAX_NACK_DETAIL_BYTES / 2;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            message.push_str(&reason[..cut]);
            message.push_str("...");
            continue;
        }
        let separator = if index == 0 { "" } else { "; " };
        if message.len() + separator.len() + reason.len() > MAX_NACK_DETAIL_BYTES {
            let rest = rejected.len() - index;
            message.push_str(&format!("{separator}... and {rest} more refused"));
            break;
        }
        message.push_str(separator);
        message.push_str(reason);
    }
    message
}

fn describe(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}
