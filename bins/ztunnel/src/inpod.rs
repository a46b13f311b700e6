//! In-pod mode (Istio's default): istio-cni hands us each pod's network namespace over the ZDS socket, and
//! each pod gets its own outbound (15001), inbound plaintext (15006) and inbound HBONE (15008) listeners
//! bound inside that namespace. The connections the proxy opens for a pod leave from the pod's namespace
//! too, marked so that the pod's capture rules let them through.
//!
//! Original source (Istio's `ENABLE_ORIG_SRC`): the connection to a pod's application is bound, with
//! `IP_TRANSPARENT`, to the client's own address, so the application sees who called it. The replies are
//! addressed to that client, and Istio's in-pod rules bring them back to the proxy: packets carrying the
//! proxy's mark connmark their connection 0x111, and a policy route sends connmarked replies to the
//! local stack.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use mesh_core::drain::DrainWatch;
use mesh_core::model::{MeshSnapshot, Workload};
use mesh_core::{CertProvider, CertWatch, SpiffeId, TrustDomain, sys, tls};
use mesh_hbone::{HboneAcceptor, HboneConfig, HboneConnector, SocketFactory};
use mesh_proxy::conntrack::ConnectionTracker;
use mesh_proxy::inbound::{
    ConnectFuture, Inbound, InboundConfig, InboundPlaintext, ServedWorkloads, UpstreamConnector, UpstreamHint,
};
use mesh_proxy::inpod::{
    InPodNetns, ListenerPodManager, PodListenerConfig, PodStart, WorkloadInfo, ZdsClient, ZdsConfig,
};
use mesh_proxy::listener::{ConnectionHandler, ListenerConfig, serve_tcp};
use mesh_proxy::outbound::{CaptureMode, Outbound, OutboundConfig, SourceLookup};
use mesh_proxy::state::ProxyState;
use mesh_proxy::telemetry::Observers;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

/// The identities of the pods being served, counted: their certificates must be kept and renewed
/// whatever the configuration says about the pods' nodes (a pod's workload may be found on another node
/// when none is on this one).
#[derive(Debug, Default)]
pub(crate) struct ServedIdentities(std::sync::Mutex<std::collections::HashMap<SpiffeId, usize>>);

impl ServedIdentities {
    /// Whether a served pod has `identity`.
    pub(crate) fn contains(&self, identity: &SpiffeId) -> bool {
        self.0.lock().is_ok_and(|served| served.contains_key(identity))
    }

    /// Counts `identity` as served until the returned guard is dropped.
    fn pin(self: &Arc<Self>, identity: SpiffeId) -> ServedIdentity {
        if let Ok(mut served) = self.0.lock() {
            *served.entry(identity.clone()).or_default() += 1;
        }
        ServedIdentity {
            set: self.clone(),
            identity,
        }
    }
}

/// One served pod's hold on its identity (see [`ServedIdentities`]).
#[derive(Debug)]
struct ServedIdentity {
    set: Arc<ServedIdentities>,
    identity: SpiffeId,
}

impl Drop for ServedIdentity {
    fn drop(&mut self) {
        if let Ok(mut served) = self.set.0.lock()
            && let Some(count) = served.get_mut(&self.identity)
        {
            *count -= 1;
            if *count == 0 {
                served.remove(&self.identity);
            }
        }
    }
}

/// What every pod's pipelines share.
#[derive(Debug, Clone)]
pub(crate) struct PodContext {
    pub state: ProxyState,
    pub certs: Arc<dyn CertProvider>,
    pub trust_domain: TrustDomain,
    pub hbone: HboneConfig,
    pub listener: ListenerConfig,
    pub observers: Observers,
    pub tracker: ConnectionTracker,
    pub local_node: Option<Arc<str>>,
    /// `ENABLE_ORIG_SRC`: `Some(true)` required, `Some(false)` off, `None` wherever the pod's inbound
    /// listeners can be made transparent.
    pub original_source: Option<bool>,
    /// The identities of the pods served, whose certificates are kept.
    pub served: Arc<ServedIdentities>,
}

/// The ZDS client and the pod manager that serves each pod, ready to run.
pub(crate) fn start(
    socket_path: std::path::PathBuf,
    context: PodContext,
) -> Result<(ZdsClient, Arc<ListenerPodManager>), Box<dyn std::error::Error + Send + Sync>> {
    let listeners = PodListenerConfig {
        mark: Some(sys::PROXY_MARK),
        ..PodListenerConfig::default()
    };
    let manager = Arc::new(ListenerPodManager::new(listeners, move |pod: PodStart| {
        let context = context.clone();
        tokio::spawn(async move {
            let uid = pod.uid.clone();
            if let Err(error) = serve_pod(pod, context).await {
                tracing::error!(%uid, %error, "cannot serve pod");
            }
        });
    }));
    let client = ZdsClient::new(
        ZdsConfig {
            socket_path,
            ..ZdsConfig::default()
        },
        manager.clone(),
    )?;
    Ok((client, manager))
}

/// How long a connection to or from a pod waits for the pod's workload and certificate before it is
/// closed. Istio's ztunnel gives a connection as long to find its workload.
const POD_READY_WAIT: Duration = Duration::from_secs(5);

/// The pipelines that serve one pod, built once its workload and certificate are at hand.
struct PodPipelines {
    outbound: Outbound,
    hbone: HboneAcceptor<Inbound>,
    plaintext: InboundPlaintext,
    /// Keeps the pod's certificate while anything serves the pod.
    _identity: ServedIdentity,
}

/// Where a pod's connections find its pipelines: `None` until they are built. The sender goes away as
/// soon as that is settled, so a closed channel still holding `None` means the pod went first.
type PodReady = watch::Receiver<Option<Arc<PodPipelines>>>;

/// The pod's pipelines, waiting up to [`POD_READY_WAIT`] for them; `None` if they did not come in time.
async fn pipelines(mut ready: PodReady) -> Option<Arc<PodPipelines>> {
    match tokio::time::timeout(POD_READY_WAIT, ready.wait_for(Option::is_some)).await {
        Ok(Ok(pipelines)) => pipelines.clone(),
        // The channel closed (the pod is no longer served) or the wait ran out.
        Ok(Err(_)) | Err(_) => None,
    }
}

/// A connection the pod could not serve in time is closed (the client sees it end) instead of waiting
/// in a backlog with no bound.
fn not_ready(listener: &'static str, peer: SocketAddr) {
    tracing::debug!(%peer, listener, wait = ?POD_READY_WAIT,
        "in-pod: connection closed: the pod's workload or certificate is not there yet");
}

/// Serves one pod until its drain fires (the pod was deleted, or the proxy is stopping).
///
/// The listeners are bound before this runs (istio-cni's ack promised it), and accept at once; each
/// connection waits up to [`POD_READY_WAIT`] for the pod's workload to be in the configuration and its
/// certificate to be at hand, and is closed if they are not.
async fn serve_pod(
    pod: PodStart,
    context: PodContext,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // Decided before anything else: a pod that requires original source and cannot have it is refused
    // at once, not after its workload and certificate arrive.
    let original_source = original_source_enabled(
        context.original_source,
        &[&pod.listeners.inbound_hbone, &pod.listeners.inbound_plaintext],
    )
    .map_err(|error| {
        format!("ENABLE_ORIG_SRC=true, but the pod's inbound listeners cannot be made transparent: {error}")
    })?;

    let (ready_sender, ready) = watch::channel(None::<Arc<PodPipelines>>);
    let listeners = pod.listeners;
    let drain = pod.drain.clone();
    let mut accept_loops = tokio::task::JoinSet::new();
    accept_loops.spawn(serve_owned(
        listeners.outbound,
        {
            let ready = ready.clone();
            move |stream: TcpStream, peer: SocketAddr| {
                let ready = ready.clone();
                async move {
                    match pipelines(ready).await {
                        Some(pipelines) => pipelines.outbound.handle(stream, peer).await,
                        None => not_ready("outbound", peer),
                    }
                }
            }
        },
        context.listener.clone(),
        drain.clone(),
    ));
    accept_loops.spawn(serve_owned(
        listeners.inbound_hbone,
        {
            let ready = ready.clone();
            let drain = drain.clone();
            move |stream: TcpStream, peer: SocketAddr| {
                let ready = ready.clone();
                let drain = drain.clone();
                async move {
                    let Some(pipelines) = pipelines(ready).await else {
                        return not_ready("inbound HBONE", peer);
                    };
                    if let Err(error) = pipelines.hbone.serve_connection(stream, drain).await {
                        tracing::debug!(%error, %peer, "HBONE connection ended with an error");
                    }
                }
            }
        },
        ListenerConfig {
            max_connections: std::num::NonZeroUsize::new(context.hbone.server_max_connections)
                .unwrap_or(std::num::NonZeroUsize::MIN),
            ..context.listener.clone()
        },
        drain.clone(),
    ));
    accept_loops.spawn(serve_owned(
        listeners.inbound_plaintext,
        {
            let ready = ready.clone();
            move |stream: TcpStream, peer: SocketAddr| {
                let ready = ready.clone();
                async move {
                    match pipelines(ready).await {
                        Some(pipelines) => pipelines.plaintext.handle(stream, peer).await,
                        None => not_ready("inbound plaintext", peer),
                    }
                }
            }
        },
        context.listener.clone(),
        drain,
    ));

    match build_pipelines(
        &pod.uid,
        &pod.info,
        &pod.netns,
        &pod.drain,
        &context,
        original_source,
    )
    .await
    {
        Ok(Some(pipelines)) => {
            ready_sender.send_replace(Some(Arc::new(pipelines)));
        }
        // The pod went (or the proxy is stopping) first; the loops end with the same drain.
        Ok(None) => {}
        Err(error) => {
            // Not served at all: the listeners close, so the pod's connections fail at once.
            accept_loops.shutdown().await;
            return Err(error);
        }
    }
    // Connections waiting for the pipelines learn the outcome now: they get them, or (the pod went first)
    // are closed at once instead of sitting out their wait. Later ones still see the pipelines sent.
    drop(ready_sender);
    while accept_loops.join_next().await.is_some() {}
    Ok(())
}

/// The pod's pipelines, once its workload is in the configuration and its certificate is at hand;
/// `None` if the pod is drained first.
async fn build_pipelines(
    uid: &str,
    info: &WorkloadInfo,
    netns: &InPodNetns,
    drain: &DrainWatch,
    context: &PodContext,
    original_source: bool,
) -> Result<Option<PodPipelines>, Box<dyn std::error::Error + Send + Sync>> {
    let Some(workload) = wait_for_workload(context, info, drain).await else {
        return Ok(None);
    };
    let identity = workload.identity()?;
    // Held before the certificate is fetched, so that it cannot be forgotten in between.
    let served = context.served.pin(identity.clone());
    let Some(cert) = fetch_certificate(context, &identity, drain).await else {
        return Ok(None);
    };
    tracing::info!(%uid, workload = %workload.uid, %identity, original_source, "serving pod (in-pod mode)");
    let sockets = Arc::new(PodSockets {
        netns: netns.clone(),
        original_source,
        warned: Arc::new(AtomicBool::new(false)),
    });

    let connector = HboneConnector::new(context.hbone.clone(), context.certs.clone())
        .with_socket_factory(sockets.clone());
    let outbound = Outbound::new(
        OutboundConfig {
            source: SourceLookup::Workload {
                uid: workload.uid.clone(),
            },
            local_node: context.local_node.clone(),
            in_pod: true,
            mark: Some(sys::PROXY_MARK),
            capture: CaptureMode::Auto,
            ..OutboundConfig::default()
        },
        context.state.clone(),
        connector,
        context.observers.clone(),
    )
    // Passthrough leaves from the pod too, with its routes and address.
    .with_passthrough_sockets(sockets.clone());
    let inbound = Inbound::new(
        InboundConfig::new(ServedWorkloads::Workload(workload.uid.clone())),
        context.state.clone(),
        context.tracker.clone(),
    )
    .with_observers(context.observers.clone())
    .with_connector(sockets);
    let plaintext = inbound.plaintext();
    let hbone = HboneAcceptor::new(
        context.hbone.clone(),
        tls::server_config(cert, vec![context.trust_domain.clone()])?,
        inbound,
    );
    Ok(Some(PodPipelines {
        outbound,
        hbone,
        plaintext,
        _identity: served,
    }))
}

/// How long a pod waits for its workload in the configuration before that is worth a warning.
const WORKLOAD_WAIT_WARNING: Duration = Duration::from_secs(5);

/// The longest pause between two attempts at a pod's certificate.
const MAX_CERT_RETRY: Duration = Duration::from_secs(30);

/// The workload istio-cni described, once the configuration has it; `None` if the pod is drained first.
///
/// istio-cni names a pod by its Kubernetes UID, while xDS keys the same pod `<cluster>//Pod/<ns>/<name>`:
/// as Istio's ztunnel does, the workload is found by what istio-cni says of it (namespace, name and
/// service account), preferring one on this node should several clusters have such a pod.
async fn wait_for_workload(
    context: &PodContext,
    info: &WorkloadInfo,
    drain: &DrainWatch,
) -> Option<Arc<Workload>> {
    let mut mesh = context.state.mesh.clone();
    let warn_at = tokio::time::Instant::now() + WORKLOAD_WAIT_WARNING;
    let mut warned = false;
    let mut snapshot = mesh.current();
    loop {
        if let Some(workload) = find_workload(&snapshot, info, context.local_node.as_deref()) {
            return Some(workload);
        }
        tokio::select! {
            () = drain.signaled() => return None,
            changed = mesh.changed() => snapshot = changed?,
            () = tokio::time::sleep_until(warn_at), if !warned => {
                warned = true;
                tracing::warn!(
                    namespace = %info.namespace, name = %info.name, service_account = %info.service_account,
                    "in-pod: no workload in the configuration matches the pod istio-cni sent; its connections wait"
                );
            }
        }
    }
}

/// The workload matching `info` in `snapshot`, one on `local_node` first.
fn find_workload(
    snapshot: &MeshSnapshot,
    info: &WorkloadInfo,
    local_node: Option<&str>,
) -> Option<Arc<Workload>> {
    let mut matching = snapshot.workloads().filter(|w| {
        *w.namespace == *info.namespace
            && *w.name == *info.name
            && *w.service_account == *info.service_account
    });
    let first = matching.next()?;
    let on_node = |w: &&Arc<Workload>| local_node.is_some_and(|node| *w.node == *node);
    if on_node(&first) {
        return Some(first.clone());
    }
    Some(matching.find(on_node).unwrap_or(first).clone())
}

/// The pod's certificate, retried with backoff while the CA fails (a pod whose listeners are bound must
/// not be left unserved by one failed request); `None` if the pod is drained first.
async fn fetch_certificate(
    context: &PodContext,
    identity: &SpiffeId,
    drain: &DrainWatch,
) -> Option<CertWatch> {
    let mut pause = Duration::from_millis(100);
    loop {
        let error = tokio::select! {
            () = drain.signaled() => return None,
            fetched = context.certs.certificate(identity) => match fetched {
                Ok(cert) => return Some(cert),
                Err(error) => error,
            },
        };
        tracing::warn!(%identity, %error, retry_in = ?pause, "in-pod: cannot get the pod's certificate");
        tokio::select! {
            () = drain.signaled() => return None,
            () = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(MAX_CERT_RETRY);
    }
}

/// Runs the accept loop on a listener it owns (until the pod's drain).
async fn serve_owned<H: ConnectionHandler>(
    listener: tokio::net::TcpListener,
    handler: H,
    config: ListenerConfig,
    drain: DrainWatch,
) {
    serve_tcp(listener, handler, &config, drain).await;
}

/// Whether inbound connections to the pod's application come from the client's address, as Istio's
/// ztunnel decides it: `Some(false)` never; `Some(true)` always, an error if the listeners cannot be made
/// transparent; `None` (the default) when they can. Setting `IP_TRANSPARENT` on the listeners is the probe
/// for the privilege the upstream sockets need (`CAP_NET_ADMIN` over the pod's namespace).
fn original_source_enabled(setting: Option<bool>, listeners: &[&TcpListener]) -> io::Result<bool> {
    match setting {
        Some(false) => Ok(false),
        Some(true) => {
            for listener in listeners {
                sys::set_transparent(*listener)?;
            }
            Ok(true)
        }
        None => Ok(listeners
            .iter()
            .all(|listener| sys::set_transparent(*listener).is_ok())),
    }
}

/// Opens the proxy's connections for a pod from inside the pod's network namespace, marked; inbound ones
/// from the client's address when original source is on.
#[derive(Debug)]
struct PodSockets {
    netns: InPodNetns,
    /// Whether inbound connections to the application are bound to the client's address.
    original_source: bool,
    /// Whether a failure to bind the client's address was logged at warn already (once per pod: the
    /// cause, a missing privilege, is the same every time).
    warned: Arc<AtomicBool>,
}

/// A socket made in a pod, with why it is not bound to the source address asked for, if it is not.
type PodSocket = (std::net::TcpStream, Option<io::Error>);

impl PodSockets {
    /// A socket created inside `netns`, marked, and bound to `source` (port 0) if given and possible. A
    /// socket belongs to the namespace it was created in, so it is made on a short-lived thread that has
    /// joined the pod's; the connect then happens on the runtime.
    async fn socket(
        netns: InPodNetns,
        domain_of: SocketAddr,
        source: Option<IpAddr>,
    ) -> io::Result<PodSocket> {
        tokio::task::spawn_blocking(move || {
            netns
                .run_in(move || -> io::Result<PodSocket> {
                    let domain = socket2::Domain::for_address(domain_of);
                    let socket =
                        socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
                    sys::set_mark(&socket, sys::PROXY_MARK)?;
                    socket.set_nonblocking(true)?;
                    let unbound = source.and_then(|ip| {
                        sys::set_transparent(&socket)
                            .and_then(|()| socket.bind(&SocketAddr::new(ip, 0).into()))
                            .err()
                    });
                    Ok((socket.into(), unbound))
                })
                .map_err(io::Error::other)?
        })
        .await
        .map_err(io::Error::other)?
    }

    async fn connect(netns: InPodNetns, addr: SocketAddr) -> io::Result<TcpStream> {
        let (socket, _) = Self::socket(netns, addr, None).await?;
        Self::finish(socket, addr).await
    }

    async fn finish(socket: std::net::TcpStream, addr: SocketAddr) -> io::Result<TcpStream> {
        let stream = TcpSocket::from_std_stream(socket).connect(addr).await?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// The address to connect to `destination` from on behalf of `client`, if original source applies:
    /// not to the client itself (a pod calling itself through the mesh; binding its own address gains
    /// nothing), and only within one address family.
    fn source_for(&self, client: SocketAddr, destination: SocketAddr) -> Option<IpAddr> {
        let client = client.ip().to_canonical();
        let destination = destination.ip().to_canonical();
        (self.original_source && client != destination && client.is_ipv4() == destination.is_ipv4())
            .then_some(client)
    }
}

impl SocketFactory for PodSockets {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>> {
        Box::pin(Self::connect(self.netns.clone(), addr))
    }
}

impl UpstreamConnector for PodSockets {
    fn connect(&self, destination: SocketAddr, hint: &UpstreamHint) -> ConnectFuture {
        let Some(source) = self.source_for(hint.client_addr, destination) else {
            return Box::pin(Self::connect(self.netns.clone(), destination));
        };
        let netns = self.netns.clone();
        let pod_warned = self.warned.clone();
        Box::pin(async move {
            let (socket, unbound) = Self::socket(netns, destination, Some(source)).await?;
            if let Some(error) = unbound {
                // Original source shows the application who called; the connection is already
                // authorized, so without it the connection still goes ahead, from the pod's own address
                // (as Istio's ztunnel does), rather than failing for want of a privilege.
                if !pod_warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%source, %destination, %error, "in-pod: cannot connect to the application from the client's address; connecting from the pod's own (logged once per pod)");
                } else {
                    tracing::debug!(%source, %destination, %error, "in-pod: original source unavailable");
                }
            }
            Self::finish(socket, destination).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, name: &str, service_account: &str, node: &str) -> Workload {
        Workload {
            service_account: service_account.into(),
            node: node.into(),
            ..Workload::new(uid, name, "default")
        }
    }

    fn info(name: &str, service_account: &str) -> WorkloadInfo {
        WorkloadInfo {
            name: name.into(),
            namespace: "default".into(),
            service_account: service_account.into(),
        }
    }

    fn sockets(original_source: bool) -> PodSockets {
        PodSockets {
            netns: InPodNetns::open("/proc/self/ns/net").unwrap(),
            original_source,
            warned: Arc::new(AtomicBool::new(false)),
        }
    }

    #[test]
    fn original_source_binds_the_clients_address_except_to_itself_or_across_families() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let on = sockets(true);
        let app = addr("10.0.2.3:8080");
        assert_eq!(
            on.source_for(addr("10.0.2.2:40000"), app),
            Some("10.0.2.2".parse().unwrap())
        );
        // An IPv4 client on a dual-stack listener is bound as IPv4.
        assert_eq!(
            on.source_for(addr("[::ffff:172.172.0.1]:40000"), app),
            Some("172.172.0.1".parse().unwrap())
        );
        assert_eq!(
            on.source_for(addr("10.0.2.3:40000"), app),
            None,
            "the pod calling itself"
        );
        assert_eq!(
            on.source_for(addr("[fd00::2]:40000"), app),
            None,
            "another family"
        );
        assert_eq!(sockets(false).source_for(addr("10.0.2.2:40000"), app), None);
    }

    #[tokio::test]
    async fn original_source_follows_istios_three_way_setting() {
        let hbone = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let plaintext = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listeners = [&hbone, &plaintext];
        // Whether this process may set IP_TRANSPARENT at all decides the outcome: it is what the setting
        // probes.
        let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let privileged = sys::set_transparent(&probe).is_ok();
        assert!(!original_source_enabled(Some(false), &listeners).unwrap());
        assert_eq!(original_source_enabled(None, &listeners).unwrap(), privileged);
        match original_source_enabled(Some(true), &listeners) {
            Ok(enabled) => assert!(enabled && privileged),
            Err(error) => assert!(!privileged, "{error}"),
        }
    }

    #[test]
    fn the_pod_is_found_by_what_istio_cni_says_of_it_on_this_node_first() {
        let mut builder = MeshSnapshot::builder();
        builder
            .add_workload(pod("east//Pod/default/web-0", "web-0", "web", "node-b"))
            .add_workload(pod("west//Pod/default/web-0", "web-0", "web", "node-a"))
            .add_workload(pod("west//Pod/default/db-0", "db-0", "db", "node-a"));
        let snapshot = builder.build().unwrap();
        let found = |info: &WorkloadInfo, node: Option<&str>| {
            find_workload(&snapshot, info, node).map(|w| w.uid.to_string())
        };
        assert_eq!(
            found(&info("web-0", "web"), Some("node-a")).as_deref(),
            Some("west//Pod/default/web-0")
        );
        assert_eq!(
            found(&info("web-0", "web"), Some("node-b")).as_deref(),
            Some("east//Pod/default/web-0")
        );
        // Elsewhere (or with no node configured) any match serves; a mismatch in any part is none.
        assert!(found(&info("web-0", "web"), None).is_some());
        assert_eq!(
            found(&info("db-0", "db"), Some("node-z")).as_deref(),
            Some("west//Pod/default/db-0")
        );
        assert_eq!(found(&info("db-0", "web"), Some("node-a")), None);
        assert_eq!(found(&info("web-1", "web"), Some("node-a")), None);
        let other_namespace = WorkloadInfo {
            namespace: "prod".into(),
            ..info("web-0", "web")
        };
        assert_eq!(found(&other_namespace, Some("node-a")), None);
    }
}
