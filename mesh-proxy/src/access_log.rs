//! The access log: one structured `tracing` event per connection at target `access`, with ztunnel's field
//! names, so that log pipelines written for ztunnel's output keep working.
//!
//! A finished connection logs `connection complete` (INFO, or ERROR with `error=` when it failed); an
//! opened one logs `connection opened` at DEBUG. A connection refused before it could be labelled (no
//! [`ConnectionRecord`] yet) is logged with [`log_early_failure`] as `connection failed` at WARN, as
//! ztunnel does. With `tracing-subscriber`'s fmt layer the fields print as
//! `src.addr=10.0.0.1:40000 src.workload=sleep ... bytes_sent=10 bytes_recv=300 duration="12ms"`.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::model::Workload;

use crate::telemetry::{
    ConnectionObserver, ConnectionOutcome, ConnectionRecord, Reporter, ResponseFlag, SecurityPolicy,
};

/// The `tracing` target of access log events; filter on it to route or silence them (`access=off`).
pub const TARGET: &str = "access";

/// A [`ConnectionObserver`] that writes the access log.
#[derive(Debug, Clone, Copy, Default)]
pub struct AccessLog;

impl AccessLog {
    /// The access log observer.
    pub fn new() -> Self {
        AccessLog
    }
}

/// What the log says about a connection, derived once per event.
struct Entry<'a> {
    src_workload: Option<&'a str>,
    src_namespace: Option<&'a str>,
    src_identity: Option<&'a str>,
    dst_addr: SocketAddr,
    dst_hbone_addr: Option<SocketAddr>,
    dst_service: Option<&'a str>,
    dst_workload: Option<&'a str>,
    dst_namespace: Option<&'a str>,
    dst_identity: Option<String>,
    direction: &'static str,
}

fn non_empty(value: &str) -> Option<&str> {
    (!value.is_empty()).then_some(value)
}

/// A workload is named by its pod name, or else its canonical service (as ztunnel falls back).
fn workload_name(workload: Option<&Arc<Workload>>) -> Option<&str> {
    let workload = workload?;
    non_empty(&workload.name).or_else(|| non_empty(&workload.canonical_name))
}

fn direction(reporter: Reporter) -> &'static str {
    match reporter {
        Reporter::Source => "outbound",
        Reporter::Destination => "inbound",
    }
}

impl<'a> Entry<'a> {
    fn of(record: &'a ConnectionRecord) -> Self {
        // Identities are only logged for mutual TLS, where they were proven.
        let mtls = record.security == SecurityPolicy::MutualTls;
        let dst_identity = record
            .destination_workload
            .as_ref()
            .and_then(|w| w.identity().ok())
            .or_else(|| record.destination_identity.clone())
            .filter(|_| mtls)
            .map(|id| id.as_str().to_owned());
        Entry {
            src_workload: workload_name(record.source_workload.as_ref()),
            src_namespace: record
                .source_workload
                .as_ref()
                .and_then(|w| non_empty(&w.namespace)),
            src_identity: record
                .source_identity
                .as_ref()
                .filter(|_| mtls)
                .map(|id| id.as_str()),
            // As in ztunnel, `dst.addr` is where the bytes went (the HBONE gateway for a tunnel) and
            // `dst.hbone_addr` the address inside the tunnel.
            dst_addr: record.upstream_addr.unwrap_or(record.destination_addr),
            dst_hbone_addr: mtls.then_some(record.destination_addr),
            dst_service: record
                .destination_service
                .as_ref()
                .and_then(|s| non_empty(&s.hostname)),
            dst_workload: workload_name(record.destination_workload.as_ref()),
            dst_namespace: record
                .destination_workload
                .as_ref()
                .and_then(|w| non_empty(&w.namespace)),
            dst_identity,
            direction: direction(record.reporter),
        }
    }
}

/// Emits one access log event; the level must be a constant per call site, hence a macro.
macro_rules! access_event {
    ($level:expr, $record:expr, $entry:expr, $message:literal $(, $($extra:tt)*)?) => {
        tracing::event!(
            target: "access",
            parent: None,
            $level,
            src.addr = %$record.source_addr,
            src.workload = $entry.src_workload,
            src.namespace = $entry.src_namespace,
            src.identity = $entry.src_identity,
            dst.addr = %$entry.dst_addr,
            dst.hbone_addr = $entry.dst_hbone_addr.map(tracing::field::display),
            dst.service = $entry.dst_service,
            dst.workload = $entry.dst_workload,
            dst.namespace = $entry.dst_namespace,
            dst.identity = $entry.dst_identity.as_deref(),
            direction = $entry.direction,
            $($($extra)*)?
            $message
        )
    };
}

impl ConnectionObserver for AccessLog {
    fn opened(&self, connection: &Arc<ConnectionRecord>) {
        if tracing::enabled!(target: "access", tracing::Level::DEBUG) {
            let entry = Entry::of(connection);
            access_event!(tracing::Level::DEBUG, connection, entry, "connection opened");
        }
    }

    fn closed(&self, connection: &Arc<ConnectionRecord>, outcome: &ConnectionOutcome) {
        let failed = outcome.error.is_some() || outcome.flag != ResponseFlag::None;
        let level_enabled = if failed {
            tracing::enabled!(target: "access", tracing::Level::ERROR)
        } else {
            tracing::enabled!(target: "access", tracing::Level::INFO)
        };
        if !level_enabled {
            return;
        }
        let entry = Entry::of(connection);
        // Istio's metrics count bytes from the server's side; ztunnel's log counts them from the side of the
        // workload this proxy serves, so the outbound (source) log shows what the client sent as sent.
        let (bytes_sent, bytes_recv) = match connection.reporter {
            Reporter::Source => (connection.sent(), connection.received()),
            Reporter::Destination => (connection.received(), connection.sent()),
        };
        let duration = format!("{}ms", connection.duration().as_millis());
        let error = outcome
            .error
            .as_deref()
            .or_else(|| failed.then_some(outcome.flag.as_str()));
        let reason = outcome.decision.as_deref();
        if failed {
            access_event!(
                tracing::Level::ERROR,
                connection,
                entry,
                "connection complete",
                bytes_sent,
                bytes_recv,
                duration,
                error,
                reason,
            );
        } else {
            access_event!(
                tracing::Level::INFO,
                connection,
                entry,
                "connection complete",
                bytes_sent,
                bytes_recv,
                duration,
                reason,
            );
        }
    }
}

/// Logs a connection refused before it had a [`ConnectionRecord`] (e.g. a source address that does not
/// match the peer's identity): `connection failed` at WARN with the addresses, direction and error.
pub fn log_early_failure(
    source: SocketAddr,
    destination: SocketAddr,
    reporter: Reporter,
    error: &dyn fmt::Display,
) {
    tracing::event!(
        target: "access",
        parent: None,
        tracing::Level::WARN,
        src.addr = %source,
        dst.addr = %destination,
        direction = direction(reporter),
        error = %error,
        "connection failed"
    );
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::Mutex;

    use mesh_core::SpiffeId;
    use mesh_core::model::Service;
    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    /// Collects everything the fmt layer writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    fn capture(level: &str, f: impl FnOnce()) -> String {
        let out = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(level)
            .with_writer(out.clone())
            .with_ansi(false)
            .without_time()
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    fn hbone_record() -> Arc<ConnectionRecord> {
        let mut record = ConnectionRecord::new(
            Reporter::Source,
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.2:8080".parse().unwrap(),
        );
        record.upstream_addr = Some("10.0.0.2:15008".parse().unwrap());
        record.source_workload = Some(Arc::new(Workload {
            service_account: "sleep".into(),
            ..Workload::new("uid-1", "sleep-7d9", "client-ns")
        }));
        record.source_identity =
            Some(SpiffeId::parse("spiffe://cluster.local/ns/client-ns/sa/sleep").unwrap());
        record.destination_workload = Some(Arc::new(Workload {
            canonical_name: "echo".into(),
            service_account: "echo".into(),
            ..Workload::new("uid-2", "", "server-ns")
        }));
        record.destination_service = Some(Arc::new(Service::new(
            "echo",
            "server-ns",
            "echo.server-ns.svc.cluster.local",
        )));
        record.security = SecurityPolicy::MutualTls;
        Arc::new(record)
    }

    #[test]
    fn complete_connection_has_ztunnels_fields() {
        let record = hbone_record();
        record.add_sent(10);
        record.add_received(300);
        let out = capture("access=info", || {
            AccessLog.opened(&record);
            AccessLog.closed(&record, &ConnectionOutcome::ok());
        });
        let lines: Vec<_> = out.lines().collect();
        assert_eq!(lines.len(), 1, "opened is DEBUG, filtered out: {out}");
        let line = lines[0];
        for field in [
            " INFO access: connection complete ",
            "src.addr=10.0.0.1:40000 ",
            "src.workload=\"sleep-7d9\" ",
            "src.namespace=\"client-ns\" ",
            "src.identity=\"spiffe://cluster.local/ns/client-ns/sa/sleep\" ",
            "dst.addr=10.0.0.2:15008 ",
            "dst.hbone_addr=10.0.0.2:8080 ",
            "dst.service=\"echo.server-ns.svc.cluster.local\" ",
            // No pod name: the canonical service stands in.
            "dst.workload=\"echo\" ",
            "dst.namespace=\"server-ns\" ",
            "dst.identity=\"spiffe://cluster.local/ns/server-ns/sa/echo\" ",
            "direction=\"outbound\" ",
            "bytes_sent=10 ",
            "bytes_recv=300 ",
            "duration=\"",
        ] {
            assert!(line.contains(field), "{field:?} missing from {line}");
        }
        assert!(!line.contains("error="), "{line}");
    }

    #[test]
    fn inbound_denied_connection_logs_error_and_reason() {
        let mut record = ConnectionRecord::new(
            Reporter::Destination,
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.2:8080".parse().unwrap(),
        );
        // Plain TCP: no identities are logged even if known.
        record.source_identity = Some(SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap());
        let record = Arc::new(record);
        record.add_sent(7);
        record.add_received(2);
        let outcome = ConnectionOutcome::failed(ResponseFlag::Deny, "policy rejection")
            .with_decision("denied by server-ns/deny-all rule 0");
        let out = capture("access=info", || {
            AccessLog.opened(&record);
            AccessLog.closed(&record, &outcome);
        });
        assert!(out.contains("ERROR access: connection complete"), "{out}");
        assert!(out.contains("direction=\"inbound\""), "{out}");
        // Inbound: the workload behind this proxy sent what the client received.
        assert!(out.contains("bytes_sent=2 bytes_recv=7"), "{out}");
        assert!(out.contains("error=\"policy rejection\""), "{out}");
        assert!(
            out.contains("reason=\"denied by server-ns/deny-all rule 0\""),
            "{out}"
        );
        assert!(!out.contains("src.identity"), "{out}");
        assert!(!out.contains("dst.hbone_addr"), "{out}");
    }

    #[test]
    fn opened_at_debug_and_early_failure_at_warn() {
        let record = hbone_record();
        let out = capture("access=debug", || {
            AccessLog.opened(&record);
            log_early_failure(
                "10.0.0.1:1".parse().unwrap(),
                "10.0.0.2:2".parse().unwrap(),
                Reporter::Destination,
                &"ip mismatch: 10.0.0.1 != 10.0.0.9",
            );
        });
        assert!(out.contains("DEBUG access: connection opened"), "{out}");
        assert!(
            out.contains(
                "WARN access: connection failed src.addr=10.0.0.1:1 dst.addr=10.0.0.2:2 \
                 direction=\"inbound\" error=ip mismatch: 10.0.0.1 != 10.0.0.9"
            ),
            "{out}"
        );
    }
}
