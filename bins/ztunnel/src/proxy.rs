//! Wiring: configuration in, a running node proxy out. Every piece is a library type from `mesh-xds`,
//! `mesh-hbone`, `mesh-policy` and `mesh-proxy`; this module only connects them and owns the ports.

use std::error::Error;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::cert::{CachingCertConfig, CertFiles, DEFAULT_FILE_POLL_INTERVAL, FileCertProvider};
use mesh_core::drain::{self, DrainWatch};
use mesh_core::model::{MeshSnapshot, SnapshotPublisher, Workload};
use mesh_core::{CachingCertProvider, CertProvider, DevCa, SpiffeId, sys, tls};
use mesh_hbone::{
    HboneAcceptor, HboneConfig, HboneConnector, MarkedSockets, ServerConfigSelector, WorkloadConfigSelector,
};
use mesh_policy::L4PolicySet;
use mesh_proxy::access_log::AccessLog;
use mesh_proxy::admin::{
    AdminEndpoint, HttpServer, HttpServerConfig, LogControl, MetricsEndpoint, Readiness, ReadinessEndpoint,
    ReadyToken, StateDump, bind_admin,
};
use mesh_proxy::conntrack::ConnectionTracker;
use mesh_proxy::inbound::{Inbound, InboundConfig, ServedWorkloads};
use mesh_proxy::listener::{ConnectionHandler, ListenerConfig, serve_tcp};
use mesh_proxy::metrics::{Metrics, TrackedCertProvider};
use mesh_proxy::outbound::{CaptureMode, Outbound, OutboundConfig, SourceLookup};
use mesh_proxy::socks5::{Socks5, Socks5Config};
use mesh_proxy::state::ProxyState;
use mesh_proxy::telemetry::{ConnectionObserver, Observers};
use mesh_xds::client::{
    AdsClientBuilder, AdsHandle, ZtunnelNode, publish_policies, publish_snapshots_reporting,
};
use mesh_xds::transport::{CallCredentials, GrpcClientConfig, TokenSource, connect_lazy};
use mesh_xds::{
    IstioCaConfig, IstioCaSigner, LocalConfig, LocalOptions, LocalWatcher, WorkloadApiCertProvider,
    WorkloadApiConfig, XdsAddress, XdsAuthorization,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::config::{CertSource, Config, ConfigSource, ProxyMode};

type BoxError = Box<dyn Error + Send + Sync>;

/// Istio's fixed ports.
const OUTBOUND_PORT: u16 = 15001;
const INBOUND_PLAINTEXT_PORT: u16 = 15006;
const INBOUND_HBONE_PORT: u16 = 15008;
const SOCKS5_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15080);

/// Runs the node proxy until SIGTERM (or `/quitquitquit`), then drains for the configured deadline.
pub(crate) async fn run(config: Config, logging: Arc<dyn LogControl>) -> Result<(), BoxError> {
    let (drain_trigger, drain) = drain::channel();
    let (quit_tx, quit_rx) = watch::channel(false);
    let readiness = Readiness::new();
    let mut certs_ready = Some(readiness.register("workload certificates"));
    let config_ready = readiness.register("configuration (first xDS push or local file)");
    // In in-pod mode: every pod of istio-cni's snapshot served.
    let listeners_ready = readiness.register("listeners");

    let metrics = Arc::new(Metrics::new());
    let observers = Observers::new(vec![
        metrics.clone() as Arc<dyn ConnectionObserver>,
        Arc::new(AccessLog::new()),
    ]);
    let any = if config.args.ipv6_enabled {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };

    // Operations first, so readiness answers (503) while the rest starts.
    let http = HttpServerConfig::default();
    let metrics_server = HttpServer::bind("metrics", SocketAddr::new(any, 15020), http.clone()).await?;
    tokio::spawn(metrics_server.serve(Arc::new(MetricsEndpoint::new(metrics.clone())), drain.clone()));
    let readiness_server = HttpServer::bind("readiness", SocketAddr::new(any, 15021), http.clone()).await?;
    tokio::spawn(readiness_server.serve(Arc::new(ReadinessEndpoint::new(readiness.clone())), drain.clone()));

    // Every certificate request goes through the tracker: config_dump lists what it holds, and the
    // metrics endpoint shows their expiry and the failed requests.
    let tracked_certs = TrackedCertProvider::new(cert_provider(&config).await?);
    tracked_certs.register_metrics(&metrics)?;
    let certs: Arc<dyn CertProvider> = Arc::new(tracked_certs.clone());
    let (configured_tx, mut configured) = watch::channel(false);
    let (state, ads) = start_config_source(&config, config_ready, configured_tx, drain.clone()).await?;
    if let Some(ads) = ads {
        register_xds_metrics(&metrics, ads)?;
    }

    let dump = StateDump::new(state.clone())
        .with_version(env!("CARGO_PKG_VERSION"))
        .with_certificates({
            let tracked = tracked_certs.clone();
            move || tracked.held()
        });
    let served = Arc::new(crate::inpod::ServedIdentities::default());
    if config.mode == ProxyMode::Shared {
        tokio::spawn(forget_departed_certificates(
            tracked_certs,
            state.clone(),
            config.args.node_name.clone(),
            served.clone(),
        ));
    }
    let admin = AdminEndpoint::new(Arc::new(dump))
        .with_logging(logging)
        .with_shutdown(move || {
            quit_tx.send_replace(true);
        });
    let admin_server = bind_admin(mesh_proxy::admin::ADMIN_ADDR, false, http).await?;
    tokio::spawn(admin_server.serve(Arc::new(admin), drain.clone()));

    let hbone = HboneConfig {
        pool_max_streams_per_connection: config.args.pool_max_streams as usize,
        pool_idle_timeout: config.args.pool_idle_timeout,
        ..HboneConfig::default()
    };
    let tracker = ConnectionTracker::new();
    {
        let (tracker, state, drain) = (tracker.clone(), state.clone(), drain.clone());
        tokio::spawn(async move { tracker.run(state, drain).await });
    }

    // In-pod mode: istio-cni hands us the pods; each gets its own listeners in its own namespace.
    if config.mode == ProxyMode::Shared && config.args.inpod_enabled {
        let context = crate::inpod::PodContext {
            state: state.clone(),
            certs: certs.clone(),
            trust_domain: config.trust_domain.clone(),
            hbone: hbone.clone(),
            listener: ListenerConfig {
                drain_deadline: config.drain_deadline,
                ..ListenerConfig::default()
            },
            observers: observers.clone(),
            tracker: tracker.clone(),
            local_node: Some(config.args.node_name.as_str().into()),
            original_source: config.args.enable_original_source,
            served,
        };
        mesh_proxy::inpod::verify_capabilities(Some(sys::PROXY_MARK))?;
        if config.args.enable_socks5 {
            tracing::warn!("UNSTABLE_ENABLE_SOCKS5 is ignored in in-pod mode: no SOCKS5 listener is served");
        }
        let (zds, pods) = crate::inpod::start(config.args.inpod_uds.clone(), context)
            .map_err(|e| format!("INPOD_UDS={}: {e}", config.args.inpod_uds.display()))?;
        let mut status = zds.status();
        tokio::spawn(zds.run(drain.clone()));
        // Pods fetch their certificates as they arrive.
        if let Some(token) = certs_ready.take() {
            token.done();
        }
        // Ready while connected to istio-cni with its snapshot served and no pod failing to start, as
        // Istio's ztunnel: not ready again when istio-cni goes away (it replays its snapshot when back).
        tokio::spawn({
            let readiness = readiness.clone();
            async move {
                let mut blocked = Some(listeners_ready);
                loop {
                    let ready = status.borrow_and_update().ready();
                    blocked = match (ready, blocked) {
                        (true, Some(token)) => {
                            tracing::info!("in-pod: istio-cni's snapshot of the node's pods is served");
                            token.done();
                            None
                        }
                        (false, None) => {
                            tracing::warn!(
                                "in-pod: not ready: istio-cni is not connected, its snapshot is not complete, \
                                 or a pod failed to start"
                            );
                            Some(readiness.register("listeners"))
                        }
                        (_, unchanged) => unchanged,
                    };
                    if status.changed().await.is_err() {
                        return;
                    }
                }
            }
        });
        tracing::info!(socket = %config.args.inpod_uds.display(), "ztunnel in in-pod mode: waiting for pods from istio-cni");
        // The drain completes when every watch is gone: this function's own must go first.
        drop(drain);
        wait_for_stop(quit_rx).await?;
        // The node's own listeners and every pod's (each on its own trigger) drain at once, with the same
        // deadline, so the whole drain fits in the deadline Kubernetes was promised.
        let deadline = config.drain_deadline + Duration::from_secs(1);
        let (node, pods) = tokio::join!(
            tokio::time::timeout(deadline, drain_trigger.drain()),
            tokio::time::timeout(deadline, pods.drain_all()),
        );
        if node.is_err() || pods.is_err() {
            tracing::warn!("connections still open after the drain deadline; closing them");
        }
        return Ok(());
    }

    // Who this proxy serves, and with which certificate on 15008.
    let (served, source, server_tls) = match &config.mode {
        ProxyMode::Dedicated {
            namespace,
            name,
            service_account,
        } => {
            let workload = wait_for_workload(&state, namespace, name, service_account).await?;
            let identity = workload.identity()?;
            let cert = certs.certificate(&identity).await?;
            tracing::info!(%identity, uid = %workload.uid, "serving one workload (dedicated mode)");
            (
                ServedWorkloads::Workload(workload.uid.clone()),
                SourceLookup::Workload {
                    uid: workload.uid.clone(),
                },
                ServerTls::Fixed(tls::server_config(cert, vec![config.trust_domain.clone()])?),
            )
        }
        ProxyMode::Shared => {
            let node: Arc<str> = config.args.node_name.as_str().into();
            // Each inbound connection presents the certificate of the node's workload it arrived for.
            let mesh = state.mesh.clone();
            let local_node = node.clone();
            let network = config.args.network.clone();
            let selector = WorkloadConfigSelector::new(
                move |local: SocketAddr| {
                    let snapshot = mesh.current();
                    let workload = snapshot.workload_by_ip(&network, local.ip())?;
                    (workload.node == local_node)
                        .then(|| workload.identity().ok())
                        .flatten()
                },
                certs.clone(),
                vec![config.trust_domain.clone()],
            );
            // Ready once the node's workloads' certificates are in hand, as Istio's ztunnel prefetches
            // them. The workloads are known only once the first configuration is in; the listeners do
            // not wait for either (a connection that comes first fetches its own certificate).
            if let Some(token) = certs_ready.take() {
                let (state, node, certs) = (state.clone(), node.clone(), certs.clone());
                tokio::spawn(async move {
                    if configured.wait_for(|configured| *configured).await.is_ok() {
                        prefetch_node_certificates(&state, &node, &certs).await;
                        token.done();
                    }
                });
            }
            if config.args.enable_original_source == Some(false) {
                tracing::warn!(
                    "ENABLE_ORIG_SRC=false: this node's workloads reach their destinations from the node's \
                     address, so the destinations' ipBlocks rules cannot tell them apart"
                );
            }
            tracing::info!(%node, "serving the node's workloads (shared mode)");
            (
                ServedWorkloads::Node(node),
                SourceLookup::PeerIp {
                    network: config.args.network.as_str().into(),
                },
                ServerTls::PerWorkload(Arc::new(selector)),
            )
        }
    };
    if let Some(token) = certs_ready.take() {
        token.done();
    }

    // Marked, so that the capture rules leave the proxy's own connections alone.
    let connector =
        HboneConnector::new(hbone.clone(), certs.clone()).with_socket_factory(Arc::new(MarkedSockets {
            mark: sys::PROXY_MARK,
        }));
    // Inbound HBONE (15008) and plaintext (15006).
    let inbound = Inbound::new(
        InboundConfig {
            network: config.args.network.as_str().into(),
            ..InboundConfig::new(served)
        },
        state.clone(),
        tracker,
    )
    .with_observers(observers.clone());
    let plaintext = inbound.plaintext();
    let hbone_listener = bind(SocketAddr::new(any, INBOUND_HBONE_PORT)).await?;
    let acceptor = match server_tls {
        ServerTls::Fixed(tls) => HboneAcceptor::new(hbone, tls, inbound),
        ServerTls::PerWorkload(selector) => HboneAcceptor::with_selector(hbone, selector, inbound),
    };
    tokio::spawn({
        let drain = drain.clone();
        async move {
            if let Err(error) = acceptor.serve(hbone_listener, drain).await {
                tracing::error!(%error, "inbound HBONE listener stopped");
            }
        }
    });
    let listener_config = ListenerConfig {
        drain_deadline: config.drain_deadline,
        ..ListenerConfig::default()
    };
    let plaintext_listener = bind_capture(SocketAddr::new(any, INBOUND_PLAINTEXT_PORT))?;
    spawn_serve(plaintext_listener, plaintext, &listener_config, drain.clone());

    // Outbound (15001) and SOCKS5 (15080).
    let outbound = Outbound::new(
        OutboundConfig {
            source,
            local_node: (!config.args.node_name.is_empty()).then(|| config.args.node_name.as_str().into()),
            mark: Some(sys::PROXY_MARK),
            // REDIRECT or TPROXY, whichever the node's capture rules use.
            capture: CaptureMode::Auto,
            // A node proxy serving several workloads connects from each one's own address, or the
            // destinations' IP-based policies would see the node instead (see ENABLE_ORIG_SRC).
            original_source: config.mode == ProxyMode::Shared
                && config.args.enable_original_source != Some(false),
            ..OutboundConfig::default()
        },
        state.clone(),
        connector,
        observers,
    );
    if config.args.enable_socks5 {
        let socks = Socks5::new(outbound.clone(), Socks5Config::default());
        let socks_listener = bind(SOCKS5_ADDR).await?;
        spawn_serve(
            socks_listener,
            move |stream: TcpStream, peer: SocketAddr| {
                let socks = socks.clone();
                async move {
                    if let Err(error) = socks.serve_connection(stream, peer).await {
                        tracing::debug!(%peer, %error, "SOCKS5 connection ended");
                    }
                }
            },
            &listener_config,
            drain.clone(),
        );
    }
    let outbound_listener = bind_capture(SocketAddr::new(any, OUTBOUND_PORT))?;
    spawn_serve(outbound_listener, outbound, &listener_config, drain.clone());
    listeners_ready.done();
    tracing::info!(
        identity = %config.own_identity,
        "ztunnel serving: outbound :{OUTBOUND_PORT}, inbound HBONE :{INBOUND_HBONE_PORT}, inbound plaintext \
         :{INBOUND_PLAINTEXT_PORT}, metrics :15020, readiness :15021, admin 127.0.0.1:15000"
    );

    // The drain completes when every watch is gone: this function's own must go first.
    drop(drain);
    shut_down_on_signal(&config, quit_rx, drain_trigger).await
}

/// The certificate inbound HBONE connections get.
enum ServerTls {
    /// One workload's (dedicated mode).
    Fixed(Arc<rustls::ServerConfig>),
    /// The destination workload's, by the address the connection arrived on (shared mode).
    PerWorkload(Arc<dyn ServerConfigSelector>),
}

/// Fetches the certificates of the node's workloads before the proxy reports ready, as Istio's ztunnel
/// does, so the first connection does not wait for the CA. Failures are logged; connections retry.
async fn prefetch_node_certificates(state: &ProxyState, node: &str, certs: &Arc<dyn CertProvider>) {
    let snapshot = state.snapshot();
    let identities: std::collections::BTreeSet<_> = snapshot
        .workloads()
        .filter(|w| &*w.node == node)
        .filter_map(|w| w.identity().ok())
        .collect();
    // All at once, each bounded: a slow CA costs readiness one timeout, not one per identity.
    futures_util::future::join_all(identities.into_iter().map(|identity| async move {
        match tokio::time::timeout(Duration::from_secs(10), certs.certificate(&identity)).await {
            Ok(Ok(_watch)) => tracing::debug!(%identity, "certificate prefetched"),
            Ok(Err(error)) => tracing::warn!(%identity, %error, "certificate prefetch failed"),
            Err(_) => tracing::warn!(%identity, "certificate prefetch timed out"),
        }
    }))
    .await;
}

/// Forgets (stops renewing, stops reporting) the certificate of every identity no workload on `node` has
/// any more and no pod served in in-pod mode has (`served`), as the configuration changes, as Istio's
/// ztunnel drops the certificates of workloads gone from its node. Runs until the configuration source
/// stops.
async fn forget_departed_certificates(
    certs: TrackedCertProvider,
    state: ProxyState,
    node: String,
    served: Arc<crate::inpod::ServedIdentities>,
) {
    let mut mesh = state.mesh.clone();
    let mut snapshot = mesh.current();
    loop {
        let wanted: std::collections::HashSet<SpiffeId> = snapshot
            .workloads()
            .filter(|workload| *workload.node == *node)
            .filter_map(|workload| workload.identity().ok())
            .collect();
        for identity in certs.retain(|identity| wanted.contains(identity) || served.contains(identity)) {
            tracing::info!(%identity, "workload certificate dropped: no workload on this node has it any more");
        }
        match mesh.changed().await {
            Some(next) => snapshot = next,
            None => return,
        }
    }
}

/// Waits for SIGTERM, Ctrl-C or `/quitquitquit`, then drains: listeners stop accepting at once, open
/// connections get the drain deadline.
async fn shut_down_on_signal(
    config: &Config,
    quit_rx: watch::Receiver<bool>,
    drain_trigger: drain::DrainTrigger,
) -> Result<(), BoxError> {
    wait_for_stop(quit_rx).await?;
    // Listeners stop accepting at once; open connections get the drain deadline.
    if tokio::time::timeout(
        config.drain_deadline + Duration::from_secs(1),
        drain_trigger.drain(),
    )
    .await
    .is_err()
    {
        tracing::warn!("connections still open after the drain deadline; closing them");
    }
    Ok(())
}

/// Returns at SIGTERM, Ctrl-C or `/quitquitquit`.
async fn wait_for_stop(mut quit_rx: watch::Receiver<bool>) -> Result<(), BoxError> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: draining"),
        result = tokio::signal::ctrl_c() => { result?; tracing::info!("interrupted: draining"); }
        _ = quit_rx.wait_for(|quit| *quit) => tracing::info!("/quitquitquit: draining"),
    }
    Ok(())
}

/// Serves `listener` with `handler` in its own task until the drain.
fn spawn_serve<H: ConnectionHandler>(
    listener: TcpListener,
    handler: H,
    config: &ListenerConfig,
    drain: DrainWatch,
) {
    let config = config.clone();
    tokio::spawn(async move {
        let local = listener.local_addr().ok();
        let summary = serve_tcp(listener, handler, &config, drain).await;
        tracing::debug!(?local, ?summary, "listener stopped");
    });
}

/// xDS health on the metrics endpoint, read from the ADS client's status at each scrape.
fn register_xds_metrics(metrics: &Metrics, ads: AdsHandle) -> Result<(), BoxError> {
    let status = ads.status_watch();
    let connected = status.clone();
    metrics.register_gauge(
        "meshkit_xds_connected",
        "1 while a delta-ADS stream to the control plane is open, else 0.",
        move || if connected.borrow().connected { 1.0 } else { 0.0 },
    )?;
    let ready = ads.clone();
    metrics.register_gauge(
        "meshkit_xds_ready",
        "1 once every subscribed xDS type has had its first response.",
        move || if ready.is_ready() { 1.0 } else { 0.0 },
    )?;
    let connects = status.clone();
    metrics.register_counter(
        "meshkit_xds_connections_total",
        "Delta-ADS streams opened to the control plane.",
        move || connects.borrow().connects as f64,
    )?;
    let responses = status.clone();
    metrics.register_counter("istio_xds_message_total", "xDS responses received.", move || {
        responses.borrow().responses as f64
    })?;
    metrics.register_counter(
        "meshkit_xds_nacks_total",
        "xDS responses rejected in whole or in part (NACKed).",
        move || status.borrow().nacks as f64,
    )?;
    Ok(())
}

/// Binds a port for captured traffic, transparent where the process may make it so (TPROXY capture
/// needs that; REDIRECT does not), saying which port could not be had.
fn bind_capture(addr: SocketAddr) -> Result<TcpListener, BoxError> {
    let (listener, transparent) = mesh_proxy::listener::bind_capture_listener(addr)
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    tracing::debug!(%addr, transparent, "capture listener bound");
    Ok(listener)
}

/// Binds a listener, saying which port could not be had.
async fn bind(addr: SocketAddr) -> Result<TcpListener, BoxError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}").into())
}

/// The certificate source: the Istio CA (through the caching, rotating provider) or a SPIFFE Workload API.
async fn cert_provider(config: &Config) -> Result<Arc<dyn CertProvider>, BoxError> {
    match &config.certs {
        CertSource::Files(dir) => {
            let provider = FileCertProvider::start([CertFiles::in_dir(dir)], DEFAULT_FILE_POLL_INTERVAL)
                .await
                .map_err(|e| format!("CERT_DIR={}: {e}", dir.display()))?;
            Ok(Arc::new(provider))
        }
        CertSource::DevCa(dir) => {
            let read = |name: &str| {
                std::fs::read_to_string(dir.join(name))
                    .map_err(|e| format!("DEV_CA_DIR: cannot read {}: {e}", dir.join(name).display()))
            };
            let ca = DevCa::from_pem(
                &read("root-cert.pem")?,
                &read("ca-key.pem")?,
                config.trust_domain.clone(),
                config.args.secret_ttl,
            )
            .map_err(|e| format!("DEV_CA_DIR={}: {e}", dir.display()))?;
            tracing::warn!(dir = %dir.display(), "signing workload certificates with a development CA");
            Ok(Arc::new(CachingCertProvider::new(
                Arc::new(ca),
                CachingCertConfig {
                    validity: config.args.secret_ttl,
                    ..CachingCertConfig::default()
                },
            )))
        }
        CertSource::Spiffe { endpoint } => {
            let named = |e: &dyn std::fmt::Display| format!("SPIFFE_ENDPOINT_SOCKET={endpoint}: {e}");
            let provider = WorkloadApiCertProvider::new(
                WorkloadApiConfig::from_endpoint(endpoint).map_err(|e| named(&e))?,
            )
            .map_err(|e| named(&e))?;
            Ok(Arc::new(provider))
        }
        CertSource::IstioCa { address } => {
            let roots = config
                .args
                .ca_root_ca
                .as_deref()
                .unwrap_or(&config.args.xds_root_ca);
            let mut grpc = GrpcClientConfig::new(address.clone());
            if address.starts_with("https://") {
                grpc = grpc.with_roots_pem(read_pem("CA_ROOT_CA", roots)?);
            }
            if let Some(name) = &config.args.alt_ca_hostname {
                grpc = grpc.with_server_name(name.clone());
            }
            let signer = IstioCaSigner::new(
                connect_lazy(&grpc)?,
                credentials(config)?,
                // A node proxy asks on behalf of its workloads; a dedicated one is its workload.
                IstioCaConfig::default().with_impersonation(config.mode == ProxyMode::Shared),
            );
            Ok(Arc::new(CachingCertProvider::new(
                Arc::new(signer),
                CachingCertConfig {
                    validity: config.args.secret_ttl,
                    ..CachingCertConfig::default()
                },
            )))
        }
    }
}

/// The bearer token (a file if one exists at the path, else the literal) and `clusterid`.
fn credentials(config: &Config) -> Result<CallCredentials, BoxError> {
    let token = &config.args.auth_token;
    let source = if Path::new(token).exists() {
        TokenSource::File(token.into())
    } else {
        TokenSource::Literal(token.clone())
    };
    Ok(CallCredentials::bearer(source)?.with_cluster_id(&config.args.cluster_id)?)
}

/// PEM text, or the contents of the file it names.
fn read_pem(variable: &str, value: &str) -> Result<Vec<u8>, BoxError> {
    if value.contains("-----BEGIN") {
        return Ok(value.as_bytes().to_vec());
    }
    std::fs::read(value).map_err(|e| format!("{variable}: cannot read {value}: {e}").into())
}

/// Starts whichever configuration source is configured and returns the state the proxies read. Once the
/// first configuration is in the state, `ready` is marked done and `configured` turns true.
async fn start_config_source(
    config: &Config,
    ready: ReadyToken,
    configured: watch::Sender<bool>,
    drain: DrainWatch,
) -> Result<(ProxyState, Option<AdsHandle>), BoxError> {
    let snapshots = SnapshotPublisher::new();
    let (policies_tx, policies_rx) = watch::channel(Arc::new(L4PolicySet::default()));
    let state = ProxyState::new(snapshots.subscribe(), policies_rx);
    let mut ads = None;
    match &config.source {
        ConfigSource::Xds { address } => {
            let mut grpc = GrpcClientConfig::new(address.clone());
            if address.starts_with("https://") {
                grpc = grpc.with_roots_pem(read_pem("XDS_ROOT_CA", &config.args.xds_root_ca)?);
            }
            if let Some(name) = &config.args.alt_xds_hostname {
                grpc = grpc.with_server_name(name.clone());
            }
            let node = ZtunnelNode {
                instance_ip: config
                    .args
                    .instance_ip
                    .map(|ip| ip.to_string())
                    .unwrap_or_default(),
                pod_name: config.args.pod_name.clone(),
                pod_namespace: config.args.pod_namespace.clone(),
                node_name: config.args.node_name.clone(),
                cluster_id: Some(config.args.cluster_id.clone()),
                metadata: Vec::new(),
            };
            let mut builder = AdsClientBuilder::new(node.to_proto());
            let addresses = builder.watch::<XdsAddress>();
            let policies = builder.watch::<XdsAuthorization>();
            let (client, handle) = builder.build(connect_lazy(&grpc)?, credentials(config)?);
            ads = Some(handle.clone());
            let stopping = drain.clone();
            tokio::spawn(client.run(async move { stopping.signaled().await }));
            let (built_tx, mut built) = watch::channel(0u64);
            let first_revision = addresses.peek().revision();
            tokio::spawn(publish_snapshots_reporting(
                addresses.clone(),
                snapshots,
                built_tx,
            ));
            tokio::spawn(publish_policies(policies, policies_tx));
            tokio::spawn(async move {
                if handle.wait_ready().await.is_ok() {
                    // Ready once the snapshot built from the first push is published (the ADS client is
                    // ready before its derived state is).
                    let target = addresses.peek().revision().max(first_revision + 1);
                    let _ = built.wait_for(|revision| *revision >= target).await;
                    tracing::info!("first xDS push applied");
                    ready.done();
                    configured.send_replace(true);
                }
            });
        }
        ConfigSource::File(path) => {
            let watcher = LocalWatcher::start(
                path,
                local_options(config),
                mesh_xds::local::DEFAULT_POLL_INTERVAL,
            )
            .await?;
            let mut configs = watcher.subscribe();
            apply_local(&configs.borrow_and_update(), &snapshots, &policies_tx);
            ready.done();
            configured.send_replace(true);
            tokio::spawn(async move {
                // The watcher lives as long as this task.
                let _watcher = watcher;
                loop {
                    tokio::select! {
                        changed = configs.changed() => if changed.is_err() { return },
                        () = drain.signaled() => return,
                    }
                    apply_local(&configs.borrow_and_update(), &snapshots, &policies_tx);
                }
            });
        }
        ConfigSource::Inline(text) => {
            let local = mesh_xds::load_str(text, "LOCAL_XDS", &local_options(config))?;
            apply_local(&local, &snapshots, &policies_tx);
            ready.done();
            configured.send_replace(true);
            // Nothing changes; keep the publishers alive for the receivers' sake.
            tokio::spawn(async move {
                drain.signaled().await;
                drop((snapshots, policies_tx));
            });
        }
    }
    Ok((state, ads))
}

fn local_options(config: &Config) -> LocalOptions {
    LocalOptions {
        cluster_id: config.args.cluster_id.clone(),
        trust_domain: config.trust_domain.clone(),
        ..LocalOptions::default()
    }
}

/// Publishes a local configuration as the proxies' state.
fn apply_local(
    local: &LocalConfig,
    snapshots: &SnapshotPublisher,
    policies: &watch::Sender<Arc<L4PolicySet>>,
) {
    let mut builder = MeshSnapshot::builder();
    builder.allow_unknown_services(true);
    for workload in &local.workloads {
        builder.add_workload(workload.clone());
    }
    for service in &local.services {
        builder.add_service(service.clone());
    }
    let (snapshot, conflicts) = builder.build_lenient();
    for conflict in conflicts {
        tracing::warn!(%conflict, "local configuration conflict; the later entry is set aside");
    }
    snapshots.publish(snapshot);
    policies.send_replace(Arc::new(L4PolicySet::new(local.policies.iter().cloned())));
}

/// In dedicated mode, the workload PROXY_WORKLOAD_INFO names, once the configuration has it (as Istio's
/// ztunnel, which waits for it to appear).
async fn wait_for_workload(
    state: &ProxyState,
    namespace: &str,
    name: &str,
    service_account: &str,
) -> Result<Arc<Workload>, BoxError> {
    let mut mesh = state.mesh.clone();
    let wait = async {
        loop {
            let snapshot = mesh.current();
            if let Some(workload) = snapshot.workloads().find(|w| {
                &*w.namespace == namespace && &*w.name == name && &*w.service_account == service_account
            }) {
                return Some(workload.clone());
            }
            mesh.changed().await?;
        }
    };
    match tokio::time::timeout(Duration::from_secs(60), wait).await {
        Ok(Some(workload)) => Ok(workload),
        Ok(None) => Err("the configuration source stopped before the workload appeared".into()),
        Err(_) => Err(format!(
            "PROXY_WORKLOAD_INFO: no workload {namespace}/{name} with service account {service_account} \
             in the configuration after 60 s"
        )
        .into()),
    }
}
