//! [`Inbound`]: HBONE tunnels (port 15008) to the workloads this proxy serves.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, StatusCode};
use mesh_hbone::headers::{BAGGAGE, FORWARDED, Forwarded};
use mesh_hbone::{InboundTunnel, TunnelTarget};

use super::plaintext::InboundPlaintext;
use super::{Core, InboundConfig, TcpConnector, UpstreamConnector, forward, outcome, resolve};
use crate::access_log::log_early_failure;
use crate::conntrack::{ConnectionTracker, TrackedConnection};
use crate::error::ProxyError;
use crate::state::ProxyState;
use crate::telemetry::{ConnectionOutcome, ConnectionRecord, Observers, Reporter, SecurityPolicy};

/// Serves HBONE tunnels to the workloads this proxy serves (see [the module docs](super) for the steps).
///
/// A `tower::Service<InboundTunnel>` for [`mesh_hbone::HboneAcceptor`]; its future runs the whole
/// connection, and every outcome is answered on the tunnel, logged, and told to the observers, so the
/// service never fails. [`Inbound::serve_tunnel`] is the same with the reason returned. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Inbound {
    core: Arc<Core>,
}

impl Inbound {
    /// Serves with `config`, deciding on `state`, registering connections with `tracker` (run
    /// [`ConnectionTracker::run`] on the same state, or revoked policies will not close open connections).
    /// No observers, and the plain [`TcpConnector`], until set.
    pub fn new(config: InboundConfig, state: ProxyState, tracker: ConnectionTracker) -> Self {
        Inbound {
            core: Arc::new(Core {
                config,
                state,
                tracker,
                observers: Observers::default(),
                connector: Arc::new(TcpConnector),
            }),
        }
    }

    /// Tells `observers` about every connection (metrics, access log).
    pub fn with_observers(mut self, observers: Observers) -> Self {
        Arc::make_mut(&mut self.core).observers = observers;
        self
    }

    /// Opens upstream connections with `connector`.
    pub fn with_connector(mut self, connector: Arc<dyn UpstreamConnector>) -> Self {
        Arc::make_mut(&mut self.core).connector = connector;
        self
    }

    /// The plaintext (port 15006) path, sharing this one's configuration, state, tracker, observers and
    /// connector.
    pub fn plaintext(&self) -> InboundPlaintext {
        InboundPlaintext::from_core(self.core.clone())
    }

    /// The tracker connections are registered with.
    pub fn tracker(&self) -> &ConnectionTracker {
        &self.core.tracker
    }

    /// Serves one tunnel to completion: refused with a status, or accepted and forwarded until both sides
    /// are done. Returns why it was refused or ended badly.
    pub async fn serve_tunnel(&self, tunnel: InboundTunnel) -> Result<(), ProxyError> {
        let core = &*self.core;
        let snapshot = core.state.snapshot();
        let peer_addr = tunnel.peer_addr();
        let destination = match resolve::tunnel(&core.config, &snapshot, tunnel.local_addr(), tunnel.target())
        {
            Ok(destination) => destination,
            Err(error) => {
                // As ztunnel, with the address the connection arrived on (the CONNECT target may be a name).
                log_early_failure(peer_addr, tunnel.local_addr(), Reporter::Destination, &error);
                tunnel.reject(status(&error));
                return Err(error);
            }
        };
        let peer = tunnel.peer_identity().clone();
        let forwarded_host = forwarded_host(tunnel.headers());
        let workload = destination.workload.clone();

        let mut record = ConnectionRecord::new(
            Reporter::Destination,
            peer_addr,
            match tunnel.target() {
                TunnelTarget::Addr(addr) => *addr,
                TunnelTarget::Host { .. } => destination.upstream,
            },
        );
        // Through an east-west gateway the peer is the gateway, on a network we do not know.
        record.source_workload = (!destination.from_gateway)
            .then(|| {
                snapshot
                    .workload_by_ip(&core.config.network, peer_addr.ip())
                    .cloned()
            })
            .flatten();
        record.source_identity = Some(peer.clone());
        record.upstream_addr = Some(destination.upstream);
        record.destination_workload = Some(workload.clone());
        record.destination_service = resolve::reported_service(&destination, forwarded_host.as_deref());
        record.destination_identity = workload.identity().ok();
        record.security = SecurityPolicy::MutualTls;
        let record = Arc::new(record);

        let tracked = TrackedConnection {
            destination_uid: workload.uid.clone(),
            source_identity: Some(peer.clone()),
            source_ip: peer_addr.ip(),
            destination: destination.upstream,
        };
        // Boxed so the connect's future state is freed once connected, not held for the tunnel's life.
        let admitted = match Box::pin(core.admit(&destination, tracked, peer_addr)).await {
            Ok(admitted) => admitted,
            Err(error) => {
                core.report_refused(&record, &error);
                tunnel.reject(status(&error));
                return Err(error);
            }
        };
        let super::Admitted {
            mut guard,
            mut upstream,
            evaluation,
        } = admitted;

        let proxy_header = match destination.proxy_header.as_ref().map(|header| {
            super::proxy_protocol::encode(peer_addr, header.target, Some(&peer), header.hostname.as_deref())
        }) {
            None => None,
            Some(Ok(bytes)) => Some(bytes),
            Some(Err(source)) => {
                let error = ProxyError::ProxyProtocol(source);
                core.report_refused(&record, &error);
                tunnel.reject(status(&error));
                return Err(error);
            }
        };

        let mut headers = HeaderMap::new();
        headers.insert(BAGGAGE, resolve::baggage(&workload).to_header_value());
        let mut client = match tunnel.accept(headers) {
            Ok(stream) => stream,
            Err(source) => {
                let error = ProxyError::Hbone(source);
                core.report_refused(&record, &error);
                return Err(error);
            }
        };
        core.observers.opened(&record);
        let result = forward(
            super::Downstream::Tunnel(&mut client),
            &mut upstream,
            &record,
            &mut guard,
            proxy_header,
        )
        .await;
        // Both sides go before the observers hear of it, so a revoked tunnel is already reset.
        drop(client);
        drop(upstream);
        drop(guard);
        let reported = match &result {
            Ok(()) => ConnectionOutcome::ok().with_decision(&evaluation),
            Err(error) => outcome(error, Some(&evaluation)),
        };
        core.observers.closed(&record, &reported);
        result
    }
}

impl tower::Service<InboundTunnel> for Inbound {
    type Response = ();
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<(), Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, tunnel: InboundTunnel) -> Self::Future {
        let inbound = self.clone();
        Box::pin(async move {
            if let Err(error) = inbound.serve_tunnel(tunnel).await {
                // Already answered on the tunnel and reported; this is for debugging only.
                tracing::debug!(%error, "inbound tunnel ended");
            }
            Ok(())
        })
    }
}

/// The HBONE status for a refusal, as ztunnel answers: 400 when the destination is not one this proxy
/// can deliver to, 401 when policy says no, 503 when delivering failed.
fn status(error: &ProxyError) -> StatusCode {
    match error {
        ProxyError::UnknownDestination { .. }
        | ProxyError::NotServed { .. }
        | ProxyError::NotHboneCapable { .. }
        | ProxyError::IpMismatch { .. } => StatusCode::BAD_REQUEST,
        ProxyError::Denied { .. } | ProxyError::WaypointBypassed { .. } => StatusCode::UNAUTHORIZED,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The `host=` of the client's `forwarded` header: the service hostname its proxy addressed.
fn forwarded_host(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(FORWARDED)?.to_str().ok()?;
    Forwarded::parse(value)?.host
}
