//! In-pod mode (Istio's default): istio-cni hands us each pod's network namespace over the ZDS socket, and
//! each pod gets its own outbound (15001), inbound plaintext (15006) and inbound HBONE (15008) listeners
//! bound inside that namespace. The connections the proxy opens for a pod leave from the pod's namespace
//! too, marked so that the pod's capture rules let them through.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use mesh_core::{CertProvider, SpiffeId, TrustDomain, sys, tls};
use mesh_hbone::{HboneAcceptor, HboneConfig, HboneConnector, SocketFactory};
use mesh_proxy::conntrack::ConnectionTracker;
use mesh_proxy::inbound::{
    ConnectFuture, Inbound, InboundConfig, PlaintextConnection, ServedWorkloads, UpstreamConnector,
    UpstreamHint,
};
use mesh_proxy::inpod::{InPodNetns, ListenerPodManager, PodListenerConfig, PodStart, ZdsClient, ZdsConfig};
use mesh_proxy::listener::{ConnectionHandler, ListenerConfig, serve_tcp};
use mesh_proxy::outbound::{Outbound, OutboundConfig, SourceLookup};
use mesh_proxy::state::ProxyState;
use mesh_proxy::telemetry::Observers;
use tokio::net::{TcpSocket, TcpStream};

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

/// Serves one pod until its drain fires (the pod was deleted, or the proxy is stopping).
async fn serve_pod(
    pod: PodStart,
    context: PodContext,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let identity = SpiffeId::istio(
        &context.trust_domain,
        &pod.info.namespace,
        &pod.info.service_account,
    )?;
    let cert = context.certs.certificate(&identity).await?;
    tracing::info!(uid = %pod.uid, %identity, "serving pod (in-pod mode)");
    let sockets = Arc::new(PodSockets {
        netns: pod.netns.clone(),
    });

    let connector = HboneConnector::new(context.hbone.clone(), context.certs.clone())
        .with_socket_factory(sockets.clone());
    let outbound = Outbound::new(
        OutboundConfig {
            source: SourceLookup::Workload { uid: pod.uid.clone() },
            local_node: context.local_node.clone(),
            in_pod: true,
            mark: Some(sys::PROXY_MARK),
            ..OutboundConfig::default()
        },
        context.state.clone(),
        connector,
        context.observers.clone(),
    );
    let inbound = Inbound::new(
        InboundConfig::new(ServedWorkloads::Workload(pod.uid.clone())),
        context.state.clone(),
        context.tracker.clone(),
    )
    .with_observers(context.observers.clone())
    .with_connector(sockets);
    let plaintext = inbound.plaintext();
    let acceptor = HboneAcceptor::new(
        context.hbone.clone(),
        tls::server_config(cert, vec![context.trust_domain.clone()])?,
        inbound,
    );

    let listeners = pod.listeners;
    let drain = pod.drain;
    let hbone = tokio::spawn({
        let drain = drain.clone();
        async move { acceptor.serve(listeners.inbound_hbone, drain).await }
    });
    let outbound_task = tokio::spawn(serve_owned(
        listeners.outbound,
        outbound,
        context.listener.clone(),
        drain.clone(),
    ));
    let plaintext_task = tokio::spawn(serve_owned(
        listeners.inbound_plaintext,
        move |stream: TcpStream, peer: SocketAddr| {
            let plaintext = plaintext.clone();
            async move {
                let Ok(original_dst) = sys::original_destination(&stream) else {
                    return;
                };
                let connection = PlaintextConnection {
                    stream,
                    peer_addr: peer,
                    original_dst,
                };
                if let Err(error) = plaintext.serve_connection(connection).await {
                    tracing::debug!(%peer, %error, "inbound plaintext connection ended");
                }
            }
        },
        context.listener.clone(),
        drain,
    ));
    let _ = tokio::join!(hbone, outbound_task, plaintext_task);
    Ok(())
}

/// Runs the accept loop on a listener it owns (until the pod's drain).
async fn serve_owned<H: ConnectionHandler>(
    listener: tokio::net::TcpListener,
    handler: H,
    config: ListenerConfig,
    drain: mesh_core::drain::DrainWatch,
) {
    serve_tcp(listener, handler, &config, drain).await;
}

/// Opens the proxy's connections for a pod from inside the pod's network namespace, marked.
#[derive(Debug)]
struct PodSockets {
    netns: InPodNetns,
}

impl PodSockets {
    async fn connect(netns: InPodNetns, addr: SocketAddr) -> io::Result<TcpStream> {
        // The socket is created inside the namespace (a short-lived thread joins it), then connected from
        // the runtime: a socket belongs to the namespace it was created in.
        let socket = tokio::task::spawn_blocking(move || {
            netns
                .run_in(move || -> io::Result<std::net::TcpStream> {
                    let domain = socket2::Domain::for_address(addr);
                    let socket =
                        socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
                    sys::set_mark(&socket, sys::PROXY_MARK)?;
                    socket.set_nonblocking(true)?;
                    Ok(socket.into())
                })
                .map_err(io::Error::other)?
        })
        .await
        .map_err(io::Error::other)??;
        let stream = TcpSocket::from_std_stream(socket).connect(addr).await?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

impl SocketFactory for PodSockets {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>> {
        Box::pin(Self::connect(self.netns.clone(), addr))
    }
}

impl UpstreamConnector for PodSockets {
    fn connect(&self, destination: SocketAddr, _hint: &UpstreamHint) -> ConnectFuture {
        Box::pin(Self::connect(self.netns.clone(), destination))
    }
}
