//! Prometheus metrics for the node proxy, with Istio's names and labels so that existing dashboards and
//! Kiali keep working: the `istio_tcp_*` traffic families, `istio_build`, process metrics, and component
//! health metrics the binary registers ([`Metrics::register_gauge`] and friends), among them the workload
//! certificates' health from a [`TrackedCertProvider`].
//!
//! [`Metrics`] is a [`ConnectionObserver`]. The data path counts bytes into each connection's
//! [`ConnectionRecord`]; `Metrics` only takes its lock to insert a record when it opens and to remove it
//! (adding its final counts to the closed totals) when it closes. A scrape adds the live counters of the
//! connections still open, so long-lived connections show their traffic before they end.
//!
//! Like ztunnel, the opened counter and both byte counters carry `response_flags="-"` (they are labelled
//! when the connection opens), and the closed counter carries the flag the connection ended with.

mod certs;
mod labels;
mod process;
mod text;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

pub use certs::TrackedCertProvider;
use labels::TrafficLabels;
pub use text::MetricKind;
use text::{Value, write_header, write_sample};

use crate::error::ProxyError;
use crate::telemetry::{ConnectionObserver, ConnectionOutcome, ConnectionRecord, ResponseFlag};

/// The `Content-Type` of [`Metrics::encode`]'s output (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = text::CONTENT_TYPE;

const OPENED: &str = "istio_tcp_connections_opened_total";
const CLOSED: &str = "istio_tcp_connections_closed_total";
const RECEIVED: &str = "istio_tcp_received_bytes_total";
const SENT: &str = "istio_tcp_sent_bytes_total";
const BUILD: &str = "istio_build";

/// Names the process collector writes; registering one of them would produce a duplicate family.
const RESERVED: &[&str] = &[
    OPENED,
    CLOSED,
    RECEIVED,
    SENT,
    BUILD,
    "process_open_fds",
    "process_max_fds",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
];

/// One sample of a registered metric family: its labels (beyond the family name) and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Label names and values; names must be valid Prometheus label names or the sample is skipped.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

impl Sample {
    /// An unlabelled sample.
    pub fn new(value: f64) -> Self {
        Sample {
            labels: Vec::new(),
            value,
        }
    }

    /// Adds a label.
    pub fn with_label(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.push((name.into(), value.into()));
        self
    }
}

type Collect = Box<dyn Fn() -> Vec<Sample> + Send + Sync>;

struct Registered {
    name: String,
    help: String,
    kind: MetricKind,
    collect: Collect,
}

/// Per-direction byte totals, in Istio's terms: `received` is what the client sent towards the server
/// (request bytes), `sent` is what came back (response bytes).
#[derive(Debug, Clone, Copy, Default)]
struct Bytes {
    received: u64,
    sent: u64,
}

impl Bytes {
    fn of(record: &ConnectionRecord) -> Self {
        // The record counts from the proxy's point of view towards the destination; Istio's metric names
        // are Envoy's, from the server's point of view (ztunnel counts them the same way).
        Bytes {
            received: record.sent(),
            sent: record.received(),
        }
    }

    fn add(&mut self, other: Bytes) {
        self.received = self.received.saturating_add(other.received);
        self.sent = self.sent.saturating_add(other.sent);
    }
}

struct Open {
    labels: Arc<TrafficLabels>,
    record: Arc<ConnectionRecord>,
}

#[derive(Default)]
struct Traffic {
    /// Open connections, by the address of their shared record (stable while we hold the `Arc`).
    open: HashMap<usize, Open>,
    opened: HashMap<Arc<TrafficLabels>, u64>,
    closed: HashMap<(Arc<TrafficLabels>, ResponseFlag), u64>,
    /// Final counts of closed connections; an entry is created when the first connection with these labels
    /// opens, so the series exists (at zero) from then on.
    bytes: HashMap<Arc<TrafficLabels>, Bytes>,
}

/// The proxy's metrics: a [`ConnectionObserver`] that keeps Istio's TCP families, plus `istio_build`,
/// process metrics and registered component metrics. Share it as an `Arc` between the observers list and
/// the metrics server.
pub struct Metrics {
    traffic: Mutex<Traffic>,
    build: (String, String),
    registered: RwLock<Vec<Registered>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let traffic = self.traffic();
        f.debug_struct("Metrics")
            .field("open_connections", &traffic.open.len())
            .field("traffic_series", &traffic.bytes.len())
            .field("build", &self.build)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// Metrics reporting `istio_build{component="ztunnel",tag=<this crate's version>}`.
    pub fn new() -> Self {
        Metrics::with_build("ztunnel", env!("CARGO_PKG_VERSION"))
    }

    /// Metrics reporting `istio_build{component=<component>,tag=<tag>}` (Istio reports its own release as
    /// the tag, not the component's).
    pub fn with_build(component: impl Into<String>, tag: impl Into<String>) -> Self {
        Metrics {
            traffic: Mutex::new(Traffic::default()),
            build: (component.into(), tag.into()),
            registered: RwLock::new(Vec::new()),
        }
    }

    /// Registers a gauge read from `value` at every scrape (e.g. `istio_xds_connected`).
    pub fn register_gauge(
        &self,
        name: &str,
        help: &str,
        value: impl Fn() -> f64 + Send + Sync + 'static,
    ) -> Result<(), ProxyError> {
        self.register_family(name, help, MetricKind::Gauge, move || vec![Sample::new(value())])
    }

    /// Registers a counter read from `value` at every scrape; its name must end in `_total`. The callback
    /// must never return less than before (a drop reads as a restart to Prometheus).
    pub fn register_counter(
        &self,
        name: &str,
        help: &str,
        value: impl Fn() -> f64 + Send + Sync + 'static,
    ) -> Result<(), ProxyError> {
        self.register_family(name, help, MetricKind::Counter, move || {
            vec![Sample::new(value())]
        })
    }

    /// Registers a family whose labelled samples `collect` returns at every scrape (e.g.
    /// `istio_xds_message_total` by type URL). `collect` runs during the scrape and must not register
    /// metrics itself.
    pub fn register_family(
        &self,
        name: &str,
        help: &str,
        kind: MetricKind,
        collect: impl Fn() -> Vec<Sample> + Send + Sync + 'static,
    ) -> Result<(), ProxyError> {
        let invalid = |reason| ProxyError::MetricName {
            name: name.to_owned(),
            reason,
        };
        if !text::is_metric_name(name) {
            return Err(invalid("must match [a-zA-Z_:][a-zA-Z0-9_:]*"));
        }
        if kind == MetricKind::Counter && !name.ends_with("_total") {
            return Err(invalid("a counter's name must end in _total"));
        }
        let mut registered = self.registered.write().unwrap_or_else(PoisonError::into_inner);
        if RESERVED.contains(&name) || registered.iter().any(|r| r.name == name) {
            return Err(ProxyError::DuplicateMetric {
                name: name.to_owned(),
            });
        }
        registered.push(Registered {
            name: name.to_owned(),
            help: help.to_owned(),
            kind,
            collect: Box::new(collect),
        });
        Ok(())
    }

    /// Number of connections currently open (opened and not yet closed).
    pub fn open_connections(&self) -> usize {
        self.traffic().open.len()
    }

    /// Every metric in Prometheus text format 0.0.4 ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        self.encode_traffic(&mut out);
        write_header(&mut out, BUILD, "Istio component build info", MetricKind::Gauge);
        write_sample(
            &mut out,
            BUILD,
            [
                ("component", self.build.0.as_str()),
                ("tag", self.build.1.as_str()),
            ],
            Value::Int(1),
        );
        process::encode(&mut out);
        self.encode_registered(&mut out);
        out
    }

    fn traffic(&self) -> MutexGuard<'_, Traffic> {
        // The map updates cannot leave the state inconsistent halfway, so a poisoned lock is still usable.
        self.traffic.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn encode_traffic(&self, out: &mut String) {
        // Copy what is needed under the lock, then read live counters and format without it, so a scrape
        // holds the data path up for no longer than the copy.
        let (mut opened, mut closed, mut bytes, open) = {
            let traffic = self.traffic();
            let opened: Vec<_> = traffic.opened.iter().map(|(l, n)| (l.clone(), *n)).collect();
            let closed: Vec<_> = traffic
                .closed
                .iter()
                .map(|((l, f), n)| (l.clone(), *f, *n))
                .collect();
            let bytes: HashMap<_, _> = traffic.bytes.iter().map(|(l, b)| (l.clone(), *b)).collect();
            let open: Vec<_> = traffic
                .open
                .values()
                .map(|o| (o.labels.clone(), o.record.clone()))
                .collect();
            (opened, closed, bytes, open)
        };
        for (labels, record) in open {
            bytes.entry(labels).or_default().add(Bytes::of(&record));
        }
        let mut bytes: Vec<_> = bytes.into_iter().collect();
        // Sorted by their printed labels, so that scrapes are stable and diffable.
        opened.sort_by_cached_key(|(l, _)| l.pairs(ResponseFlag::None).map(|(_, v)| v.to_owned()));
        closed.sort_by_cached_key(|(l, f, _)| l.pairs(*f).map(|(_, v)| v.to_owned()));
        bytes.sort_by_cached_key(|(l, _)| l.pairs(ResponseFlag::None).map(|(_, v)| v.to_owned()));

        write_header(
            out,
            OPENED,
            "The total number of TCP connections opened",
            MetricKind::Counter,
        );
        for (labels, n) in &opened {
            write_sample(out, OPENED, labels.pairs(ResponseFlag::None), Value::Int(*n));
        }
        write_header(
            out,
            CLOSED,
            "The total number of TCP connections closed",
            MetricKind::Counter,
        );
        for (labels, flag, n) in &closed {
            write_sample(out, CLOSED, labels.pairs(*flag), Value::Int(*n));
        }
        write_header(
            out,
            RECEIVED,
            "The size of total bytes received during request in case of a TCP connection",
            MetricKind::Counter,
        );
        for (labels, b) in &bytes {
            write_sample(
                out,
                RECEIVED,
                labels.pairs(ResponseFlag::None),
                Value::Int(b.received),
            );
        }
        write_header(
            out,
            SENT,
            "The size of total bytes sent during response in case of a TCP connection",
            MetricKind::Counter,
        );
        for (labels, b) in &bytes {
            write_sample(out, SENT, labels.pairs(ResponseFlag::None), Value::Int(b.sent));
        }
    }

    fn encode_registered(&self, out: &mut String) {
        let registered = self.registered.read().unwrap_or_else(PoisonError::into_inner);
        for metric in registered.iter() {
            let samples = (metric.collect)();
            write_header(out, &metric.name, &metric.help, metric.kind);
            for sample in &samples {
                if !sample.labels.iter().all(|(name, _)| text::is_label_name(name)) {
                    tracing::debug!(metric = %metric.name, "skipping a sample with an invalid label name");
                    continue;
                }
                let labels = sample.labels.iter().map(|(k, v)| (k.as_str(), v.as_str()));
                write_sample(out, &metric.name, labels, Value::Float(sample.value));
            }
        }
    }
}

/// The map key of an open record: its address, which cannot be reused while the map holds the `Arc`.
fn key(record: &Arc<ConnectionRecord>) -> usize {
    Arc::as_ptr(record) as usize
}

impl ConnectionObserver for Metrics {
    fn opened(&self, connection: &Arc<ConnectionRecord>) {
        // Labels are built before taking the lock: the lock only covers the map updates.
        let labels = Arc::new(TrafficLabels::of(connection));
        let mut traffic = self.traffic();
        if traffic.open.contains_key(&key(connection)) {
            return;
        }
        *traffic.opened.entry(labels.clone()).or_default() += 1;
        traffic.bytes.entry(labels.clone()).or_default();
        traffic.open.insert(
            key(connection),
            Open {
                labels,
                record: connection.clone(),
            },
        );
    }

    fn closed(&self, connection: &Arc<ConnectionRecord>, outcome: &ConnectionOutcome) {
        let mut traffic = self.traffic();
        let labels = match traffic.open.remove(&key(connection)) {
            Some(open) => open.labels,
            // Closed without having been opened: count it anyway rather than lose its bytes.
            None => Arc::new(TrafficLabels::of(connection)),
        };
        // Moving the final counts to the closed totals under the same lock that removed the record keeps
        // a concurrent scrape from seeing them twice or not at all.
        traffic
            .bytes
            .entry(labels.clone())
            .or_default()
            .add(Bytes::of(connection));
        *traffic.closed.entry((labels, outcome.flag)).or_default() += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Reporter;

    fn record() -> Arc<ConnectionRecord> {
        Arc::new(ConnectionRecord::new(
            Reporter::Source,
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        ))
    }

    fn sample_value(text: &str, prefix: &str) -> Option<String> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit_once(' '))
            .map(|(_, v)| v.to_owned())
    }

    #[test]
    fn live_bytes_then_closed_totals() {
        let metrics = Metrics::new();
        let conn = record();
        metrics.opened(&conn);
        conn.add_sent(10);
        conn.add_received(300);
        let out = metrics.encode();
        assert_eq!(
            sample_value(&out, "istio_tcp_received_bytes_total{").as_deref(),
            Some("10")
        );
        assert_eq!(
            sample_value(&out, "istio_tcp_sent_bytes_total{").as_deref(),
            Some("300")
        );
        assert!(!out.contains("istio_tcp_connections_closed_total{"));

        conn.add_sent(5);
        metrics.closed(&conn, &ConnectionOutcome::ok());
        // The final count moved to the closed totals, once.
        let out = metrics.encode();
        assert_eq!(
            sample_value(&out, "istio_tcp_received_bytes_total{").as_deref(),
            Some("15")
        );
        assert_eq!(
            sample_value(&out, "istio_tcp_connections_closed_total{").as_deref(),
            Some("1")
        );
        assert_eq!(metrics.open_connections(), 0);
    }

    #[test]
    fn opening_twice_counts_once() {
        let metrics = Metrics::new();
        let conn = record();
        metrics.opened(&conn);
        metrics.opened(&conn);
        let out = metrics.encode();
        assert_eq!(
            sample_value(&out, "istio_tcp_connections_opened_total{").as_deref(),
            Some("1")
        );
        assert_eq!(metrics.open_connections(), 1);
    }

    #[test]
    fn registration_rules() {
        let metrics = Metrics::new();
        metrics
            .register_gauge("istio_xds_connected", "xDS stream up", || 1.0)
            .unwrap();
        assert!(matches!(
            metrics.register_gauge("istio_xds_connected", "again", || 0.0),
            Err(ProxyError::DuplicateMetric { name }) if name == "istio_xds_connected"
        ));
        assert!(matches!(
            metrics.register_gauge(OPENED, "clash", || 0.0),
            Err(ProxyError::DuplicateMetric { name }) if name == OPENED
        ));
        assert!(matches!(
            metrics.register_counter("ca_fetches", "no suffix", || 0.0),
            Err(ProxyError::MetricName { .. })
        ));
        assert!(matches!(
            metrics.register_gauge("bad-name", "dash", || 0.0),
            Err(ProxyError::MetricName { .. })
        ));
        metrics
            .register_family("istio_xds_message_total", "by type", MetricKind::Counter, || {
                vec![
                    Sample::new(3.0).with_label("url", "type.googleapis.com/istio.workload.Address"),
                    Sample::new(1.0).with_label("bad-label", "x"),
                ]
            })
            .unwrap();
        let out = metrics.encode();
        assert!(
            out.contains("# TYPE istio_xds_connected gauge\nistio_xds_connected 1\n"),
            "{out}"
        );
        assert!(out.contains(
            "# TYPE istio_xds_message_total counter\n\
             istio_xds_message_total{url=\"type.googleapis.com/istio.workload.Address\"} 3\n"
        ));
        assert!(!out.contains("bad-label"));
    }
}
