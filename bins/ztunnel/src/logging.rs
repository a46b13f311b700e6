//! Logs: `RUST_LOG` (default `info`), changeable at run time through the admin endpoint's `/logging`;
//! plain text or, with LOG_FORMAT=json, one JSON object per line in the shape Istio's ztunnel writes
//! (`level` in lower case, `time`, `scope` for the target, the event's fields at the top level and each
//! enclosing span's fields under its name), so the same log pipelines parse both.

use std::fmt;

use mesh_proxy::admin::LogControl;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::LogFormat;

/// The run-time handle on the log filter.
pub(crate) struct Logging {
    handle: reload::Handle<EnvFilter, Registry>,
    initial: String,
}

impl fmt::Debug for Logging {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Logging")
            .field("initial", &self.initial)
            .finish_non_exhaustive()
    }
}

/// Installs the global subscriber (logs to stderr in `format`) and returns the handle `/logging` uses.
pub(crate) fn init(format: LogFormat) -> Logging {
    let initial = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let filter = EnvFilter::try_new(&initial).unwrap_or_else(|error| {
        eprintln!("ztunnel: RUST_LOG={initial:?} is not a valid filter ({error}); using info");
        EnvFilter::new("info")
    });
    let (filter, handle) = reload::Layer::new(filter);
    let output = match format {
        LogFormat::Plain => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            // Colour only on a terminal: log collectors and files get plain lines.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .event_format(IstioJson)
            // Span fields are kept as JSON text, which the event format nests under the span's name.
            .fmt_fields(JsonFields::new())
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry().with(filter).with(output).init();
    Logging { handle, initial }
}

impl LogControl for Logging {
    fn current(&self) -> String {
        self.handle
            .with_current(|filter| filter.to_string())
            .unwrap_or_else(|_| self.initial.clone())
    }

    fn set(&self, directive: &str) -> Result<(), String> {
        let filter =
            EnvFilter::try_new(directive).map_err(|e| format!("invalid filter {directive:?}: {e}"))?;
        self.handle.reload(filter).map_err(|e| e.to_string())
    }

    fn reset(&self) -> Result<(), String> {
        self.set(&self.initial.clone())
    }
}

/// One log event as Istio's ztunnel writes it with LOG_FORMAT=json.
struct IstioJson;

impl<S, N> FormatEvent<S, N> for IstioJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert("level".into(), meta.level().as_str().to_ascii_lowercase().into());
        let mut time = String::new();
        SystemTime.format_time(&mut Writer::new(&mut time))?;
        line.insert("time".into(), time.into());
        line.insert("scope".into(), meta.target().into());
        event.record(&mut JsonFieldVisitor(&mut line));
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>()
                    && let Ok(value) = serde_json::from_str::<Value>(fields)
                {
                    line.insert(span.name().into(), value);
                }
            }
        }
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// Puts an event's fields into the line: numbers and booleans as themselves, everything else as text.
struct JsonFieldVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonFieldVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
}
