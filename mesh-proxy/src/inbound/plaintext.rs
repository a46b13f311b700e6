//! [`InboundPlaintext`]: plaintext connections from outside the mesh, redirected to port 15006.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::net::TcpStream;

use super::{Core, forward, outcome, resolve};
use crate::access_log::log_early_failure;
use crate::conntrack::TrackedConnection;
use crate::error::ProxyError;
use crate::telemetry::{ConnectionOutcome, ConnectionRecord, Reporter, SecurityPolicy};

/// One captured plaintext connection, as the listener hands it over.
#[derive(Debug)]
pub struct PlaintextConnection {
    /// The accepted client connection.
    pub stream: TcpStream,
    /// The client's address.
    pub peer_addr: SocketAddr,
    /// Where the client was connecting to before it was redirected (the listener reads it from the
    /// socket: `SO_ORIGINAL_DST`, or the local address of a transparent socket).
    pub original_dst: SocketAddr,
}

/// The 15006 port's handler: the original destination read as [`PlaintextConnection::accepted`] does,
/// then [`InboundPlaintext::serve_connection`]; failures are logged at debug (a refused plaintext
/// connection is simply closed, and the access log already has it).
impl crate::listener::ConnectionHandler for InboundPlaintext {
    async fn handle(&self, stream: TcpStream, peer: SocketAddr) {
        let connection = match PlaintextConnection::accepted(stream, peer) {
            Ok(connection) => connection,
            Err(error) => {
                tracing::debug!(%peer, %error, "inbound plaintext: no original destination");
                return;
            }
        };
        if let Err(error) = self.serve_connection(connection).await {
            tracing::debug!(%peer, %error, "inbound plaintext connection ended");
        }
    }
}

impl PlaintextConnection {
    /// A connection the listener accepted from `peer_addr`, with its original destination as Istio's
    /// ztunnel reads it: `SO_ORIGINAL_DST` (a `REDIRECT`ed connection, or a tracked `TPROXY` one, which
    /// answers with the local address), else the local address itself (a `TPROXY` connection the kernel
    /// does not track). A destination on the proxy's own ports is refused when it is served, so a client
    /// that connects to 15006 directly cannot make the proxy connect to itself.
    pub fn accepted(stream: TcpStream, peer_addr: SocketAddr) -> std::io::Result<Self> {
        let original_dst = match mesh_core::sys::original_destination(&stream) {
            Ok(original) => original,
            Err(_) => mesh_core::sys::tproxy_original_destination(&stream)?,
        };
        Ok(PlaintextConnection {
            stream,
            peer_addr,
            original_dst,
        })
    }
}

/// Serves plaintext connections to the workloads this proxy serves, as ztunnel's inbound passthrough
/// does: the destination workload at the original destination, L4 policy evaluated with no peer
/// identity (a STRICT PeerAuthentication reaches us from istiod as a DENY policy, so policy covers it),
/// then the workload connected to and bytes forwarded, reported with `connection_security_policy`
/// `unknown`.
///
/// A `tower::Service<PlaintextConnection>` whose future runs the whole connection and fails with the
/// reason it was refused or ended badly; a refused connection is simply closed (plaintext has no way to
/// say why). Get one from [`Inbound::plaintext`](super::Inbound::plaintext). Cheap to clone.
#[derive(Debug, Clone)]
pub struct InboundPlaintext {
    core: Arc<Core>,
}

impl InboundPlaintext {
    pub(super) fn from_core(core: Arc<Core>) -> Self {
        InboundPlaintext { core }
    }

    /// Serves one connection to completion.
    pub async fn serve_connection(&self, connection: PlaintextConnection) -> Result<(), ProxyError> {
        let core = &*self.core;
        let PlaintextConnection {
            stream: mut client,
            peer_addr,
            original_dst,
        } = connection;
        let snapshot = core.state.snapshot();
        let destination = match resolve::plaintext(&core.config, &snapshot, original_dst) {
            Ok(destination) => destination,
            Err(error) => {
                log_early_failure(peer_addr, original_dst, Reporter::Destination, &error);
                return Err(error);
            }
        };
        let workload = destination.workload.clone();
        let mut record = ConnectionRecord::new(Reporter::Destination, peer_addr, original_dst);
        record.source_workload = snapshot
            .workload_by_ip(&core.config.network, peer_addr.ip())
            .cloned();
        record.upstream_addr = Some(destination.upstream);
        record.destination_workload = Some(workload.clone());
        record.destination_service = resolve::reported_service(&destination, None);
        record.destination_identity = workload.identity().ok();
        record.security = SecurityPolicy::Unknown;
        let record = Arc::new(record);

        let tracked = TrackedConnection {
            destination_uid: workload.uid.clone(),
            source_identity: None,
            source_ip: peer_addr.ip(),
            destination: destination.upstream,
        };
        let mut admitted = match Box::pin(core.admit(&destination, tracked, peer_addr)).await {
            Ok(admitted) => admitted,
            Err(error) => {
                core.report_refused(&record, &error);
                return Err(error);
            }
        };
        core.observers.opened(&record);
        let result = forward(
            super::Downstream::Plain(&mut client),
            &mut admitted.upstream,
            &record,
            &mut admitted.guard,
            None,
        )
        .await;
        drop(client);
        let evaluation = admitted.evaluation;
        drop(admitted.upstream);
        drop(admitted.guard);
        let reported = match &result {
            Ok(()) => ConnectionOutcome::ok().with_decision(&evaluation),
            Err(error) => outcome(error, Some(&evaluation)),
        };
        core.observers.closed(&record, &reported);
        result
    }
}

impl tower::Service<PlaintextConnection> for InboundPlaintext {
    type Response = ();
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<(), ProxyError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, connection: PlaintextConnection) -> Self::Future {
        let inbound = self.clone();
        Box::pin(async move { inbound.serve_connection(connection).await })
    }
}
