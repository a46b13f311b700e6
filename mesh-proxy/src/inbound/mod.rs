//! The inbound side of the node proxy: connections arriving for the workloads it serves, as Istio's
//! ztunnel handles them (`src/proxy/inbound.rs` and `inbound_passthrough.rs`).
//!
//! - [`Inbound`] serves HBONE (port 15008): a `tower::Service<InboundTunnel>` to put inside a
//!   [`mesh_hbone::HboneAcceptor`], which has already checked TLS, the method and the authority.
//! - [`InboundPlaintext`] serves plaintext redirected to port 15006 from outside the mesh: a
//!   `tower::Service<PlaintextConnection>`, fed by a listener that knows each connection's original
//!   destination.
//!
//! Per connection, in order (the HBONE status after the arrow; plaintext connections are just closed):
//! 1. The destination is the workload at the address the connection arrived on (HBONE) or was headed for
//!    (plaintext), on the proxy's network; unknown, not served by this proxy ([`ServedWorkloads`]), or not
//!    HBONE-capable (tunnel protocol NONE: nothing in the mesh should tunnel to it) is refused (→ 400). A
//!    CONNECT naming another IP is accepted only in the waypoint sandwich: the named workload or service
//!    has the destination as its waypoint (else → 400, `ip mismatch`). A hostname CONNECT (double HBONE)
//!    resolves to the service's target port (→ 503 if none). The proxy's own ports are refused (→ 503).
//! 2. Waypoints: Istio's ztunnel no longer refuses traffic that bypassed a waypoint itself; istiod
//!    expresses that as authorization policy (it adds an ALLOW for the waypoint's identity, and operators
//!    add the rest), so the default, [`WaypointEnforcement::Policy`], leaves it to step 3.
//!    [`WaypointEnforcement::RequireWaypoint`] restores ztunnel's former check (→ 401).
//! 3. L4 authorization with [`mesh_policy::L4PolicySet::evaluate`], with the peer's identity (none for
//!    plaintext) (→ 401, response flag `DENY`, the evaluation in the access log's decision). The
//!    connection is registered with the [`ConnectionTracker`] first, so a later policy change or the
//!    workload's removal closes it.
//! 4. The upstream connection, through an [`UpstreamConnector`], within
//!    [`InboundConfig::connect_timeout`] (→ 503, flag `CONNECT`).
//! 5. `200` with the destination's `baggage`, a PROXY protocol header first if the workload asked for one,
//!    then bytes both ways with [`crate::forward::copy_bidirectional`], the connection's
//!    [`ConnectionRecord`] told to the [`Observers`].
//!
//! Refusals at step 1 are logged ([`crate::access_log::log_early_failure`]) but not told to the
//! observers, as ztunnel does: they have too little context to label a metric.

mod hbone;
mod plaintext;
mod proxy_protocol;
mod resolve;
#[cfg(test)]
mod tests;
mod upstream;

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::model::Workload;
use mesh_hbone::HboneStream;
use mesh_policy::L4Evaluation;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::conntrack::{CloseReason, ConnectionGuard, ConnectionTracker, TrackedConnection};
use crate::error::ProxyError;
use crate::state::ProxyState;
use crate::telemetry::{ConnectionOutcome, ConnectionRecord, Observers, ResponseFlag};

pub use hbone::Inbound;
pub use plaintext::{InboundPlaintext, PlaintextConnection};
pub use upstream::{ConnectFuture, TcpConnector, UpstreamConnector, UpstreamHint};

/// How long the upstream connection may take to open (ztunnel's 10 s).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Which destination workloads this proxy delivers to. Anything else is refused: a node proxy must not
/// become a way into workloads it does not front.
#[derive(Clone)]
#[non_exhaustive]
pub enum ServedWorkloads {
    /// Every workload running on this node (a shared node proxy).
    Node(Arc<str>),
    /// Exactly this workload, by UID (a dedicated proxy, or one pod's network namespace).
    Workload(Arc<str>),
    /// These workloads, by UID.
    Uids(Arc<HashSet<Arc<str>>>),
    /// Whatever the predicate accepts (for sets that change, such as the pods enrolled by CNI).
    Predicate(Arc<dyn Fn(&Workload) -> bool + Send + Sync>),
    /// Every workload in the snapshot: for tests and single-host demos only.
    Any,
}

impl ServedWorkloads {
    /// Whether `workload` is served.
    pub fn serves(&self, workload: &Workload) -> bool {
        match self {
            ServedWorkloads::Node(node) => *workload.node == **node,
            ServedWorkloads::Workload(uid) => workload.uid == *uid,
            ServedWorkloads::Uids(uids) => uids.contains(&workload.uid),
            ServedWorkloads::Predicate(serves) => serves(workload),
            ServedWorkloads::Any => true,
        }
    }
}

impl fmt::Debug for ServedWorkloads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServedWorkloads::Node(node) => f.debug_tuple("Node").field(node).finish(),
            ServedWorkloads::Workload(uid) => f.debug_tuple("Workload").field(uid).finish(),
            ServedWorkloads::Uids(uids) => f.debug_tuple("Uids").field(&uids.len()).finish(),
            ServedWorkloads::Predicate(_) => f.write_str("Predicate(..)"),
            ServedWorkloads::Any => f.write_str("Any"),
        }
    }
}

/// Whether the proxy itself refuses connections that skipped the destination's waypoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum WaypointEnforcement {
    /// As Istio's ztunnel does today: authorization policy decides (istiod generates the policies).
    #[default]
    Policy,
    /// Refuse (401, `DENY`) a connection to a workload with a waypoint unless the peer is that waypoint
    /// (its identity and its IP), as ztunnel did before istiod generated those policies. Plaintext
    /// connections can never come from a waypoint, so they are refused too.
    RequireWaypoint,
}

/// Configuration of [`Inbound`] and [`InboundPlaintext`].
///
/// There is no `Default`: which workloads the proxy serves must be said explicitly
/// ([`InboundConfig::new`]), so that a forgotten setting cannot open every workload.
#[derive(Debug, Clone)]
pub struct InboundConfig {
    /// The network the proxy is on; destinations are looked up on it. `""` is the default network.
    pub network: Arc<str>,
    /// Which destination workloads are served.
    pub served: ServedWorkloads,
    /// How long the upstream connection may take to open.
    pub connect_timeout: Duration,
    /// Waypoint enforcement.
    pub waypoint: WaypointEnforcement,
    /// The proxy's own addresses, refused as plaintext destinations (in a shared node proxy, a client
    /// sending to the proxy's address would otherwise be forwarded back to it).
    pub local_ips: Vec<IpAddr>,
}

impl InboundConfig {
    /// A configuration serving `served`, on the default network, with the default timeout.
    pub fn new(served: ServedWorkloads) -> Self {
        InboundConfig {
            network: Arc::from(""),
            served,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            waypoint: WaypointEnforcement::default(),
            local_ips: Vec::new(),
        }
    }
}

/// What both inbound paths share.
#[derive(Debug, Clone)]
struct Core {
    config: InboundConfig,
    state: ProxyState,
    tracker: ConnectionTracker,
    observers: Observers,
    connector: Arc<dyn UpstreamConnector>,
}

/// A connection that passed authorization and has its upstream.
struct Admitted {
    guard: ConnectionGuard,
    upstream: TcpStream,
    evaluation: L4Evaluation,
}

impl Core {
    /// Steps 2 to 4: waypoint rule, registration and authorization, upstream connection. Errors are
    /// reported by the caller (with [`outcome`]), which has the record.
    async fn admit(
        &self,
        destination: &resolve::Destination,
        tracked: TrackedConnection,
        client_addr: SocketAddr,
    ) -> Result<Admitted, ProxyError> {
        let workload = &destination.workload;
        if self.config.waypoint == WaypointEnforcement::RequireWaypoint && resolve::has_waypoint(workload) {
            let snapshot = self.state.snapshot();
            let from_waypoint = tracked
                .source_identity
                .as_ref()
                .is_some_and(|peer| resolve::from_waypoint(&snapshot, workload, peer, tracked.source_ip));
            if !from_waypoint {
                return Err(ProxyError::WaypointBypassed {
                    workload: workload.uid.clone(),
                });
            }
        }
        let mut guard = self.tracker.register(tracked);
        // Decided after registering, on the state as it is now: a change published from here on is seen
        // by the tracker, one published before is seen here.
        let evaluation = ConnectionTracker::check(
            guard.connection(),
            &self.state.snapshot(),
            &self.state.policy_set(),
        )
        .map_err(refusal)?;
        let hint = UpstreamHint {
            client_addr,
            workload: workload.clone(),
        };
        let addr = destination.upstream;
        let limit = self.config.connect_timeout;
        let connect = tokio::time::timeout(limit, self.connector.connect(addr, &hint));
        let upstream = tokio::select! {
            connected = connect => match connected {
                Ok(Ok(stream)) => stream,
                Ok(Err(source)) => return Err(ProxyError::UpstreamConnect { addr, source }),
                Err(_elapsed) => return Err(ProxyError::UpstreamTimeout { addr, after: limit }),
            },
            reason = guard.revoked() => return Err(ProxyError::Revoked { reason }),
        };
        Ok(Admitted {
            guard,
            upstream,
            evaluation,
        })
    }

    /// Tells the observers about a connection refused after its record was built.
    fn report_refused(&self, record: &Arc<ConnectionRecord>, error: &ProxyError) {
        self.observers.opened(record);
        self.observers.closed(record, &outcome(error, None));
    }
}

/// Where an inbound connection came from: an HBONE tunnel (15008) or a plain TCP connection (15006).
pub(crate) enum Downstream<'a> {
    Tunnel(&'a mut HboneStream),
    Plain(&'a mut TcpStream),
}

/// Step 5's copy, until both directions end or the tracker revokes the connection (the caller then drops
/// both sides: the client sees the tunnel reset or the socket closed).
async fn forward(
    client: Downstream<'_>,
    upstream: &mut TcpStream,
    record: &Arc<ConnectionRecord>,
    guard: &mut ConnectionGuard,
    proxy_header: Option<Vec<u8>>,
) -> Result<(), ProxyError> {
    let work = async {
        if let Some(header) = proxy_header {
            upstream
                .write_all(&header)
                .await
                .map_err(ProxyError::ProxyProtocol)?;
        }
        let copied = match client {
            Downstream::Tunnel(tunnel) => {
                crate::forward::copy_with_tunnel(upstream, tunnel, crate::forward::TunnelSide::Client, record)
                    .await
            }
            Downstream::Plain(plain) => {
                let copied = crate::forward::copy_bidirectional(plain, upstream, record).await;
                crate::forward::pass_reset_on(plain, &copied);
                copied
            }
        };
        crate::forward::pass_reset_on(upstream, &copied);
        copied.map_err(ProxyError::Forward)
    };
    tokio::select! {
        done = work => done,
        reason = guard.revoked() => Err(ProxyError::Revoked { reason }),
    }
}

/// The initial refusal for a tracker decision.
fn refusal(reason: CloseReason) -> ProxyError {
    match reason {
        CloseReason::Denied(evaluation) => ProxyError::Denied { evaluation },
        reason @ CloseReason::WorkloadRemoved(_) => ProxyError::Revoked { reason },
    }
}

/// How a connection that met `error` is reported; `evaluation` is the decision that admitted it, if any.
fn outcome(error: &ProxyError, evaluation: Option<&L4Evaluation>) -> ConnectionOutcome {
    let flag = match error {
        ProxyError::Denied { .. } | ProxyError::WaypointBypassed { .. } | ProxyError::Revoked { .. } => {
            ResponseFlag::Deny
        }
        ProxyError::UpstreamConnect { .. } | ProxyError::UpstreamTimeout { .. } => ResponseFlag::Connect,
        _ => ResponseFlag::None,
    };
    let outcome = ConnectionOutcome::failed(flag, error);
    match error {
        ProxyError::Denied { evaluation } => outcome.with_decision(evaluation),
        ProxyError::Revoked { reason } => outcome.with_decision(reason.explanation()),
        _ => match evaluation {
            Some(evaluation) => outcome.with_decision(evaluation),
            None => outcome,
        },
    }
}
