//! Logs: `RUST_LOG` (default `info`), changeable at run time through the admin endpoint's `/logging`;
//! plain text or, with LOG_FORMAT=json, one JSON object per line with the event's fields at the top level
//! (the shape Istio's ztunnel writes, so the same log pipelines parse both).

use std::fmt;

use mesh_proxy::admin::LogControl;
use tracing_subscriber::layer::SubscriberExt;
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
            .json()
            .flatten_event(true)
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
