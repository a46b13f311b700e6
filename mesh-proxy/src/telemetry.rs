//! What the data path tells metrics and access logs about each proxied connection.
//!
//! Every connection the node proxy handles gets one [`ConnectionRecord`], created when the connection is
//! known well enough to label (after routing on the outbound side, after the CONNECT on the inbound side),
//! shared as an `Arc` between the forwarding task (which adds to its byte counters as bytes flow) and the
//! [`ConnectionObserver`]s (metrics, access log), which are told when it opens and when it closes.
//! Counting into the record, rather than into a metrics registry, keeps the copy loop free of locks and
//! label lookups; a registry reads the live counters of open connections when it is scraped.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use mesh_core::SpiffeId;
use mesh_core::model::{Service, Workload};

/// Which side of a connection reports it (Istio's `reporter` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The client's proxy (outbound).
    Source,
    /// The server's proxy (inbound).
    Destination,
}

impl Reporter {
    /// Istio's label value: `source` or `destination`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// How the connection was protected (Istio's `connection_security_policy` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SecurityPolicy {
    /// Carried in mutual TLS (HBONE).
    MutualTls,
    /// Plain TCP (passthrough, or inbound plaintext).
    Unknown,
}

impl SecurityPolicy {
    /// Istio's label value: `mutual_tls` or `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityPolicy::MutualTls => "mutual_tls",
            SecurityPolicy::Unknown => "unknown",
        }
    }
}

/// Why a connection ended badly (Istio's `response_flags` label; `-` when it did not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ResponseFlag {
    /// Nothing went wrong.
    None,
    /// Authorization policy denied it.
    Deny,
    /// The upstream could not be reached.
    Connect,
    /// The TLS handshake failed.
    TlsFailure,
    /// The HTTP/2 handshake failed.
    H2HandshakeFailure,
    /// The peer's identity was not the expected one.
    IdentityError,
}

impl ResponseFlag {
    /// Istio's label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlag::None => "-",
            ResponseFlag::Deny => "DENY",
            ResponseFlag::Connect => "CONNECT",
            ResponseFlag::TlsFailure => "TLS_FAILURE",
            ResponseFlag::H2HandshakeFailure => "H2_HANDSHAKE_FAILURE",
            ResponseFlag::IdentityError => "IDENTITY_ERROR",
        }
    }
}

/// One proxied connection: who it is between (fixed when it is created) and how many bytes it moved (live).
pub struct ConnectionRecord {
    /// Who reports it.
    pub reporter: Reporter,
    /// The client's address as this proxy saw it.
    pub source_addr: SocketAddr,
    /// The client workload, if it is a mesh workload.
    pub source_workload: Option<Arc<Workload>>,
    /// The client's proven identity (inbound HBONE), or the identity the source proxy used (outbound).
    pub source_identity: Option<SpiffeId>,
    /// Where the client meant to go (the original destination or the CONNECT authority).
    pub destination_addr: SocketAddr,
    /// Where the bytes were actually sent: the HBONE gateway (`ip:15008`) or the upstream for plain TCP.
    pub upstream_addr: Option<SocketAddr>,
    /// The destination workload, if known.
    pub destination_workload: Option<Arc<Workload>>,
    /// The service the client addressed, if any.
    pub destination_service: Option<Arc<Service>>,
    /// The identity the destination proved (outbound HBONE) or this proxy's workload identity (inbound).
    pub destination_identity: Option<SpiffeId>,
    /// How it was protected.
    pub security: SecurityPolicy,
    /// When it was opened.
    pub started: Instant,
    /// The same instant on the wall clock, for logs.
    pub started_at: SystemTime,
    sent: AtomicU64,
    received: AtomicU64,
}

impl ConnectionRecord {
    /// A record opened now, with zero bytes.
    pub fn new(reporter: Reporter, source_addr: SocketAddr, destination_addr: SocketAddr) -> Self {
        ConnectionRecord {
            reporter,
            source_addr,
            source_workload: None,
            source_identity: None,
            destination_addr,
            upstream_addr: None,
            destination_workload: None,
            destination_service: None,
            destination_identity: None,
            security: SecurityPolicy::Unknown,
            started: Instant::now(),
            started_at: SystemTime::now(),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
        }
    }

    /// Adds bytes sent towards the destination (from the client's side of this proxy to the upstream).
    pub fn add_sent(&self, bytes: u64) {
        self.sent.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Adds bytes received from the destination (and written back to the client).
    pub fn add_received(&self, bytes: u64) {
        self.received.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes sent towards the destination so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Bytes received from the destination so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// How long it has been open.
    pub fn duration(&self) -> Duration {
        self.started.elapsed()
    }
}

impl fmt::Debug for ConnectionRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionRecord")
            .field("reporter", &self.reporter)
            .field("source_addr", &self.source_addr)
            .field("source_identity", &self.source_identity)
            .field("destination_addr", &self.destination_addr)
            .field("upstream_addr", &self.upstream_addr)
            .field("destination_identity", &self.destination_identity)
            .field("security", &self.security)
            .field("sent", &self.sent())
            .field("received", &self.received())
            .finish_non_exhaustive()
    }
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionOutcome {
    /// `-` if it ended normally.
    pub flag: ResponseFlag,
    /// What went wrong, for the access log (`None` if nothing did).
    pub error: Option<String>,
    /// The authorization decision's explanation, if policy was evaluated.
    pub decision: Option<String>,
}

impl ConnectionOutcome {
    /// A connection that ended normally.
    pub fn ok() -> Self {
        ConnectionOutcome {
            flag: ResponseFlag::None,
            error: None,
            decision: None,
        }
    }

    /// A connection that failed with `flag` because of `error`.
    pub fn failed(flag: ResponseFlag, error: impl fmt::Display) -> Self {
        ConnectionOutcome {
            flag,
            error: Some(error.to_string()),
            decision: None,
        }
    }

    /// Adds the policy decision's explanation.
    pub fn with_decision(mut self, decision: impl fmt::Display) -> Self {
        self.decision = Some(decision.to_string());
        self
    }
}

/// Told about every connection: metrics, access logs, connection tracking.
pub trait ConnectionObserver: Send + Sync + fmt::Debug {
    /// The connection is established (or, for a refused one, about to be refused: `closed` follows).
    fn opened(&self, connection: &Arc<ConnectionRecord>);

    /// The connection is over; its counters are final.
    fn closed(&self, connection: &Arc<ConnectionRecord>, outcome: &ConnectionOutcome);
}

/// Several observers, told in order. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Observers(Arc<[Arc<dyn ConnectionObserver>]>);

impl Observers {
    /// These observers.
    pub fn new(observers: Vec<Arc<dyn ConnectionObserver>>) -> Self {
        Observers(observers.into())
    }

    /// Tells each observer that `connection` opened.
    pub fn opened(&self, connection: &Arc<ConnectionRecord>) {
        for observer in self.0.iter() {
            observer.opened(connection);
        }
    }

    /// Tells each observer that `connection` closed.
    pub fn closed(&self, connection: &Arc<ConnectionRecord>, outcome: &ConnectionOutcome) {
        for observer in self.0.iter() {
            observer.closed(connection, outcome);
        }
    }
}
