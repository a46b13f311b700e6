//! The handlers behind the metrics port (`:15020`) and the admin port (`127.0.0.1:15000`).

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};

use super::dump::ConfigDumpSource;
use super::server::{HttpHandler, text_response, with_type};
use crate::metrics::{self, Metrics};

/// The metrics endpoint: `GET /metrics` and `GET /stats/prometheus` answer Prometheus text format;
/// other paths are `404`.
#[derive(Debug, Clone)]
pub struct MetricsEndpoint {
    metrics: Arc<Metrics>,
}

impl MetricsEndpoint {
    /// The endpoint serving `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        MetricsEndpoint { metrics }
    }
}

impl HttpHandler for MetricsEndpoint {
    fn handle(&self, request: Request<Bytes>) -> Response<Bytes> {
        match request.uri().path() {
            "/metrics" | "/stats/prometheus" => {}
            _ => return text_response(StatusCode::NOT_FOUND, "not found"),
        }
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return text_response(StatusCode::METHOD_NOT_ALLOWED, "use GET");
        }
        with_type(
            StatusCode::OK,
            metrics::CONTENT_TYPE,
            Bytes::from(self.metrics.encode()),
        )
    }
}

/// Reads and changes the log filter at run time, for `/logging`. The binary implements it, typically over
/// a `tracing_subscriber::reload::Handle<EnvFilter, _>`.
pub trait LogControl: Send + Sync + fmt::Debug {
    /// The current filter, e.g. `info,access=off`.
    fn current(&self) -> String;

    /// Replaces the filter with `directive` (`debug`, `mesh_proxy=trace,info`, ...). An invalid directive
    /// is refused with a message for the caller, and the filter stays as it was.
    fn set(&self, directive: &str) -> Result<(), String>;

    /// Restores the filter the process started with (`POST /logging?reset`).
    fn reset(&self) -> Result<(), String> {
        Err("reset is not supported".to_owned())
    }
}

/// What `POST /quitquitquit` calls: start a graceful shutdown and return at once.
pub type ShutdownFn = Arc<dyn Fn() + Send + Sync>;

/// Longest `level` directive accepted; real filters are a few dozen bytes.
const MAX_DIRECTIVE_LEN: usize = 1024;

const USAGE: &str = "usage: GET /logging                        (show the current filter)\n\
usage: POST /logging?level=<directive>     (e.g. debug, or mesh_proxy=trace,info)\n\
usage: POST /logging?reset                 (restore the filter the process started with)\n";

/// The admin endpoint: `/` (a list of endpoints), `GET /config_dump`, `GET`/`POST /logging`,
/// `POST /quitquitquit`. Serve it on loopback only ([`super::bind_admin`]): it changes how the process runs.
#[derive(Clone)]
pub struct AdminEndpoint {
    dump: Arc<dyn ConfigDumpSource>,
    logging: Option<Arc<dyn LogControl>>,
    shutdown: Option<ShutdownFn>,
}

impl fmt::Debug for AdminEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminEndpoint")
            .field("dump", &self.dump)
            .field("logging", &self.logging)
            .field("shutdown", &self.shutdown.is_some())
            .finish()
    }
}

impl AdminEndpoint {
    /// An admin endpoint dumping `dump`; `/logging` and `/quitquitquit` answer `501` until configured.
    pub fn new(dump: Arc<dyn ConfigDumpSource>) -> Self {
        AdminEndpoint {
            dump,
            logging: None,
            shutdown: None,
        }
    }

    /// Lets `/logging` read and change the log filter through `control`.
    pub fn with_logging(mut self, control: Arc<dyn LogControl>) -> Self {
        self.logging = Some(control);
        self
    }

    /// Lets `POST /quitquitquit` call `shutdown`.
    pub fn with_shutdown(mut self, shutdown: impl Fn() + Send + Sync + 'static) -> Self {
        self.shutdown = Some(Arc::new(shutdown));
        self
    }

    fn index(&self) -> Response<Bytes> {
        text_response(
            StatusCode::OK,
            "admin endpoints:\n\
             \x20 /config_dump      dump the current configuration (GET)\n\
             \x20 /logging          show or change the log filter (GET, POST ?level=<directive> or ?reset)\n\
             \x20 /quitquitquit     shut the proxy down gracefully (POST)\n\
             metrics: :15020/metrics and /stats/prometheus; readiness: :15021/healthz/ready\n",
        )
    }

    fn config_dump(&self) -> Response<Bytes> {
        match serde_json::to_vec_pretty(&self.dump.config_dump()) {
            Ok(body) => with_type(StatusCode::OK, "application/json", Bytes::from(body)),
            Err(error) => text_response(StatusCode::INTERNAL_SERVER_ERROR, format!("config dump: {error}")),
        }
    }

    fn logging(&self, request: &Request<Bytes>) -> Response<Bytes> {
        let Some(control) = &self.logging else {
            return text_response(
                StatusCode::NOT_IMPLEMENTED,
                "log level changes are not configured",
            );
        };
        let current = |status| text_response(status, format!("current log level is {}", control.current()));
        match *request.method() {
            Method::GET | Method::HEAD => return current(StatusCode::OK),
            Method::POST => {}
            _ => return text_response(StatusCode::METHOD_NOT_ALLOWED, USAGE),
        }
        let query = match parse_query(request.uri().query().unwrap_or("")) {
            Ok(query) => query,
            Err(error) => return text_response(StatusCode::BAD_REQUEST, format!("{error}\n{USAGE}")),
        };
        let level = query.iter().find(|(k, _)| k == "level").map(|(_, v)| v.as_str());
        let reset = query.iter().any(|(k, _)| k == "reset");
        let result = match (level, reset) {
            (None, false) => return current(StatusCode::OK),
            (Some(_), true) => Err("give either level or reset, not both".to_owned()),
            (None, true) => control.reset(),
            (Some(level), false) => validate_directive(level).and_then(|()| control.set(level)),
        };
        match result {
            Ok(()) => {
                tracing::info!(level = %control.current(), "log filter changed through the admin endpoint");
                current(StatusCode::OK)
            }
            Err(error) => text_response(StatusCode::BAD_REQUEST, format!("{error}\n{USAGE}")),
        }
    }

    fn quit(&self, request: &Request<Bytes>) -> Response<Bytes> {
        if request.method() != Method::POST {
            return text_response(StatusCode::METHOD_NOT_ALLOWED, "use POST");
        }
        let Some(shutdown) = &self.shutdown else {
            return text_response(StatusCode::NOT_IMPLEMENTED, "shutdown is not configured");
        };
        tracing::info!("shutdown requested through the admin endpoint");
        shutdown();
        text_response(StatusCode::OK, "shutdown now")
    }
}

impl HttpHandler for AdminEndpoint {
    fn handle(&self, request: Request<Bytes>) -> Response<Bytes> {
        let is_get = request.method() == Method::GET || request.method() == Method::HEAD;
        match request.uri().path() {
            "/" if is_get => self.index(),
            "/config_dump" if is_get => self.config_dump(),
            "/" | "/config_dump" => text_response(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
            "/logging" => self.logging(&request),
            "/quitquitquit" => self.quit(&request),
            _ => text_response(StatusCode::NOT_FOUND, "not found; GET / lists the endpoints"),
        }
    }
}

fn validate_directive(level: &str) -> Result<(), String> {
    if level.is_empty() {
        return Err("empty level".to_owned());
    }
    if level.len() > MAX_DIRECTIVE_LEN {
        return Err(format!("level longer than {MAX_DIRECTIVE_LEN} bytes"));
    }
    if level.chars().any(char::is_control) {
        return Err("level contains control characters".to_owned());
    }
    Ok(())
}

/// Splits an `application/x-www-form-urlencoded` query into decoded pairs (`+` is a space, `%XX` a byte);
/// a key without `=` has an empty value.
pub(crate) fn parse_query(query: &str) -> Result<Vec<(String, String)>, String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(key)?, decode(value)?))
        })
        .collect()
}

fn decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    // `from_str_radix` would also take a sign.
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent-encoding in {text:?}"))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("query parameter {text:?} is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        assert_eq!(
            parse_query("level=mesh_proxy%3Dtrace%2Cinfo&reset").unwrap(),
            vec![
                ("level".to_owned(), "mesh_proxy=trace,info".to_owned()),
                ("reset".to_owned(), String::new())
            ]
        );
        assert_eq!(parse_query("level=a+b").unwrap()[0].1, "a b");
        assert!(parse_query("level=%zz").is_err());
        assert!(parse_query("level=%4").is_err());
        assert!(parse_query("level=%+1").is_err());
        assert!(parse_query("level=%ff").is_err(), "not UTF-8");
        assert!(parse_query("").unwrap().is_empty());
    }

    #[test]
    fn directives_are_bounded() {
        assert!(validate_directive("info").is_ok());
        assert!(validate_directive("").is_err());
        assert!(validate_directive("info\nwarn").is_err());
        assert!(validate_directive(&"a".repeat(MAX_DIRECTIVE_LEN + 1)).is_err());
    }
}
