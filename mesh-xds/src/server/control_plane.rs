//! [`Server`]: the local control plane, serving delta ADS and the Istio CA from a directory of YAML.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use mesh_core::{DevCa, SpiffeId};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, oneshot, watch};
use tokio::task::JoinHandle;

use super::access::{AdsAccess, AuthenticatedCallers, LoopbackAnyToken};
use super::{
    AdsEvent, AdsLimits, AdsService, GrpcRouter, ResourcePublisher, ResourceSnapshot, resources_from_mesh,
};
use crate::XdsError;
use crate::ca::{CaService, CallInfo, Caller, CallerAuthenticator, ClientCertAuthenticator, DevAnyToken};
use crate::local::{LocalConfig, LocalOptions, LocalWatcher};
use crate::transport::{LOCAL_SERVER_DNS_NAMES, TlsIncoming, TlsIncomingConfig, local_server_tls};

/// How the [`Server`] authenticates its clients (both ADS streams and CA calls).
#[derive(Debug, Clone)]
pub enum ClientAuth {
    /// **Development only**: any non-empty bearer token from a loopback address (what Istio's ztunnel
    /// sends when pointed at us with `XDS_ADDRESS`/`CA_ADDRESS`); CA calls may instead present a client
    /// certificate from the server's CA. A CA call without impersonation gets the identity its CSR asks
    /// for; with impersonation, it is attributed to `node_proxy` (a ztunnel on a node), if set, and
    /// otherwise refused.
    DevLoopback {
        /// The node proxy that impersonation requests come from.
        node_proxy: Option<Caller>,
    },
    /// Only these authenticators (e.g. [`crate::ca::StaticTokens`], [`ClientCertAuthenticator`]), tried
    /// in order, for ADS streams and CA calls alike.
    Authenticators(Vec<Arc<dyn CallerAuthenticator>>),
}

/// Settings of a [`Server`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where to listen (default `127.0.0.1:15012`, istiod's secure xDS and CA port).
    pub listen: SocketAddr,
    /// The YAML file or directory to serve (see [`crate::local`]).
    pub config_path: PathBuf,
    /// How YAML becomes workloads (cluster id, trust domain, ...).
    pub local: LocalOptions,
    /// How often the files are checked for changes.
    pub poll_interval: Duration,
    /// Serve TLS with a certificate from the CA for `localhost`, `istiod.istio-system.svc` and the
    /// listen IP (default). Without it, plaintext HTTP/2: tokens travel in clear.
    pub tls: bool,
    /// Who may connect.
    pub auth: ClientAuth,
    /// Identities allowed to have certificates issued for the workloads on their node (default: the
    /// trust domain's `ns/istio-system/sa/ztunnel`).
    pub impersonators: Vec<SpiffeId>,
    /// Bounds of the ADS service.
    pub ads_limits: AdsLimits,
}

impl ServerConfig {
    /// Defaults for serving `config_path`: TLS on `127.0.0.1:15012`, dev authentication, ztunnel as the
    /// impersonator.
    pub fn new(config_path: impl Into<PathBuf>) -> Self {
        let local = LocalOptions::default();
        let impersonators = ztunnel_identity(&local).into_iter().collect();
        ServerConfig {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15012),
            config_path: config_path.into(),
            local,
            poll_interval: crate::local::DEFAULT_POLL_INTERVAL,
            tls: true,
            auth: ClientAuth::DevLoopback { node_proxy: None },
            impersonators,
            ads_limits: AdsLimits::default(),
        }
    }
}

fn ztunnel_identity(local: &LocalOptions) -> Option<SpiffeId> {
    SpiffeId::parse(&format!(
        "spiffe://{}/ns/istio-system/sa/ztunnel",
        local.trust_domain
    ))
    .ok()
}

/// The local control plane: the same delta ADS (`istio.workload.Address`, `istio.security.Authorization`)
/// and Istio CA service that istiod offers on port 15012, fed from YAML files that it watches.
///
/// A change to the files is validated first; a broken set is never published (the last good one stays
/// and [`last_error`](Server::last_error) says what is wrong, with file and line). It is what
/// `meshctl demo` and the tests run, and Istio's own ztunnel can use it (`XDS_ADDRESS` and `CA_ADDRESS` set
/// to its address, `XDS_ROOT_CA`/`CA_ROOT_CA` to [`root_pem`](Server::root_pem) written to a file, any
/// token in dev mode).
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    tls: bool,
    root_pem: String,
    resources: ResourcePublisher,
    ads: AdsService,
    watcher: LocalWatcher,
    stop: Option<oneshot::Sender<()>>,
    serving: JoinHandle<()>,
    publishing: JoinHandle<()>,
}

impl Server {
    /// Loads the configuration (failing if it is invalid), binds, and starts serving, signing
    /// certificates with `ca`.
    pub async fn start(config: ServerConfig, ca: Arc<DevCa>) -> Result<Server, XdsError> {
        let watcher =
            LocalWatcher::start(&config.config_path, config.local.clone(), config.poll_interval).await?;
        // The loaded configuration is published before the first client can connect: a client answered
        // from an empty set would report ready with no workloads. Later versions follow in the background.
        let mut configs = watcher.subscribe();
        let initial = configs.borrow_and_update().clone();
        let resources = ResourcePublisher::new(snapshot_of(&initial));
        let publishing = tokio::spawn(publish_config(configs, resources.clone()));

        let (ads_access, ca_authenticators): (Arc<dyn AdsAccess>, Vec<Arc<dyn CallerAuthenticator>>) =
            match &config.auth {
                ClientAuth::DevLoopback { node_proxy } => {
                    let mut dev = DevAnyToken::new();
                    if let Some(node_proxy) = node_proxy {
                        dev = dev.with_impersonator(node_proxy.clone());
                    }
                    let certs: Arc<dyn CallerAuthenticator> = Arc::new(ClientCertAuthenticator::for_ca(&ca)?);
                    (Arc::new(LoopbackAnyToken), vec![certs, Arc::new(dev)])
                }
                ClientAuth::Authenticators(list) => {
                    if list.is_empty() {
                        return Err(XdsError::Transport {
                            reason: "the control plane needs at least one authenticator".to_owned(),
                        });
                    }
                    let any: Arc<dyn CallerAuthenticator> = Arc::new(FirstOf(list.clone()));
                    (Arc::new(AuthenticatedCallers(any)), list.clone())
                }
            };
        let ads = AdsService::new(resources.clone(), config.ads_limits).with_access(ads_access);
        let configs = watcher.subscribe();
        let mut ca_service = CaService::new(ca.clone())
            .with_impersonators(config.impersonators.iter().cloned())
            .with_node_authorizer(move |node: &str, identity: &SpiffeId| {
                configs.borrow().workloads.iter().any(|workload| {
                    &*workload.node == node && workload.identity().is_ok_and(|id| id == *identity)
                })
            });
        for authenticator in ca_authenticators {
            ca_service = ca_service.with_shared_authenticator(authenticator);
        }
        let router = GrpcRouter::new(ads.clone(), Some(ca_service));

        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| XdsError::Transport {
                reason: format!("cannot listen on {}: {e}", config.listen),
            })?;
        let addr = listener.local_addr().map_err(|e| XdsError::Transport {
            reason: format!("listener address: {e}"),
        })?;
        let (stop, stopped) = oneshot::channel::<()>();
        let grpc = tonic::transport::Server::builder()
            // As istiod: pings find dead clients; streams per connection are bounded.
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .max_concurrent_streams(Some(100));
        let shutdown = async {
            let _ = stopped.await;
        };
        let serving = if config.tls {
            let dns = LOCAL_SERVER_DNS_NAMES;
            let tls = local_server_tls(&ca, dns, &[addr.ip()], Duration::from_secs(365 * 24 * 3600))?;
            let incoming = TlsIncoming::new(listener, tls, TlsIncomingConfig::default())?;
            tokio::spawn(async move {
                if let Err(error) = grpc
                    .serve_with_incoming_shutdown(router, incoming, shutdown)
                    .await
                {
                    tracing::error!(%error, "control plane stopped serving");
                }
            })
        } else {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            tokio::spawn(async move {
                if let Err(error) = grpc
                    .serve_with_incoming_shutdown(router, incoming, shutdown)
                    .await
                {
                    tracing::error!(%error, "control plane stopped serving");
                }
            })
        };
        tracing::info!(%addr, tls = config.tls, path = %config.config_path.display(), "local control plane serving");
        Ok(Server {
            addr,
            tls: config.tls,
            root_pem: ca.root_pem().to_owned(),
            resources,
            ads,
            watcher,
            stop: Some(stop),
            serving,
            publishing,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL clients use: `https://localhost:<port>` (the certificate's name) or `http://<ip>:<port>`.
    pub fn url(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    /// The CA's root certificate in PEM: what clients trust for the server's TLS and for workload
    /// certificates.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The configuration being served.
    pub fn config(&self) -> Arc<LocalConfig> {
        self.watcher.current()
    }

    /// Why the latest change to the files was not published, if it was not.
    pub fn last_error(&self) -> Option<XdsError> {
        self.watcher.last_error()
    }

    /// The resources being served.
    pub fn resources(&self) -> Arc<ResourceSnapshot> {
        self.resources.current()
    }

    /// ADS events (connections, ACKs, NACKs) from now on.
    pub fn ads_events(&self) -> broadcast::Receiver<AdsEvent> {
        self.ads.events()
    }

    /// Ends every ADS stream (clients reconnect elsewhere or later), stops accepting, and waits for the
    /// server to finish (at most 10 seconds).
    pub async fn shutdown(mut self) {
        self.ads.close();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(Duration::from_secs(10), &mut self.serving)
            .await
            .is_err()
        {
            tracing::warn!("control plane did not stop within 10 s; aborting it");
            self.serving.abort();
        }
        self.publishing.abort();
    }
}

impl Drop for Server {
    /// A server dropped without [`shutdown`](Server::shutdown) still ends its ADS streams: otherwise the
    /// graceful stop that dropping starts would wait for them forever, and clients would stay on a server
    /// that no longer follows its files.
    fn drop(&mut self) {
        self.ads.close();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.publishing.abort();
    }
}

/// The resources served for `config`, logged.
fn snapshot_of(config: &LocalConfig) -> ResourceSnapshot {
    tracing::info!(
        workloads = config.workloads.len(),
        services = config.services.len(),
        policies = config.policies.len(),
        "serving configuration"
    );
    resources_from_mesh(&config.workloads, &config.services, &config.policies)
}

/// Publishes the served resources whenever the configuration changes (the current one is already served).
async fn publish_config(mut configs: watch::Receiver<Arc<LocalConfig>>, resources: ResourcePublisher) {
    while configs.changed().await.is_ok() {
        let config = configs.borrow_and_update().clone();
        resources.publish(snapshot_of(&config));
    }
}

/// Several authenticators as one: the first that succeeds names the caller.
#[derive(Debug)]
struct FirstOf(Vec<Arc<dyn CallerAuthenticator>>);

impl CallerAuthenticator for FirstOf {
    fn authenticate<'a>(&'a self, call: &'a CallInfo<'a>) -> BoxFuture<'a, Result<Caller, XdsError>> {
        Box::pin(async move {
            let mut reasons = Vec::new();
            for authenticator in &self.0 {
                match authenticator.authenticate(call).await {
                    Ok(caller) => return Ok(caller),
                    Err(error) => reasons.push(error.to_string()),
                }
            }
            Err(XdsError::Unauthenticated {
                reason: reasons.join("; "),
            })
        })
    }
}
