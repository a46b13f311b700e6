//! Readiness, ztunnel's model: the proxy is ready once every component that registered a "not ready yet"
//! task (certificates fetched, first xDS push applied, listeners bound, ...) has marked it done.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};

use super::server::{HttpHandler, text_response};

/// The set of tasks still blocking readiness. Cheap to clone; clones share the set.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    /// Pending task names, counted: two components may block on tasks of the same name.
    pending: Arc<Mutex<BTreeMap<String, usize>>>,
}

impl Readiness {
    /// Ready, until a task is registered.
    pub fn new() -> Self {
        Readiness::default()
    }

    /// Blocks readiness until the returned token is [`done`](ReadyToken::done).
    pub fn register(&self, name: impl Into<String>) -> ReadyToken {
        let name = name.into();
        *self.lock().entry(name.clone()).or_default() += 1;
        ReadyToken {
            readiness: self.clone(),
            name,
            done: false,
        }
    }

    /// The names of the tasks not done yet, sorted.
    pub fn pending(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Whether every registered task is done.
    pub fn is_ready(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, usize>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One task blocking readiness.
///
/// Unlike ztunnel's, which marks its task done when dropped, this token must be marked done explicitly:
/// a component that fails (its task panics, or gives up and drops the token) leaves the proxy not ready,
/// with the task named in `/healthz/ready`, rather than reporting ready without it.
#[must_use = "readiness stays blocked until the token is marked done"]
pub struct ReadyToken {
    readiness: Readiness,
    name: String,
    done: bool,
}

impl fmt::Debug for ReadyToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadyToken")
            .field("name", &self.name)
            .field("done", &self.done)
            .finish()
    }
}

impl ReadyToken {
    /// The task's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Registers another task on the same readiness (e.g. one per identity while fetching certificates).
    pub fn subtask(&self, name: impl Into<String>) -> ReadyToken {
        self.readiness.register(name)
    }

    /// Marks the task done.
    pub fn done(mut self) {
        self.done = true;
        let mut pending = self.readiness.lock();
        if let Some(count) = pending.get_mut(&self.name) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                pending.remove(&self.name);
            }
        }
        let left = pending.len();
        drop(pending);
        if left == 0 {
            tracing::info!(task = %self.name, "task complete, marking the proxy ready");
        } else {
            tracing::info!(task = %self.name, left, "task complete, still waiting for other tasks");
        }
    }
}

impl Drop for ReadyToken {
    fn drop(&mut self) {
        if !self.done {
            tracing::warn!(task = %self.name, "readiness task dropped without completing; staying not ready");
        }
    }
}

/// The readiness endpoint (`:15021`): `GET /healthz/ready` answers `200 ready` or `503` naming the pending
/// tasks; other paths are `404`.
#[derive(Debug, Clone)]
pub struct ReadinessEndpoint {
    readiness: Readiness,
}

impl ReadinessEndpoint {
    /// The endpoint reporting `readiness`.
    pub fn new(readiness: Readiness) -> Self {
        ReadinessEndpoint { readiness }
    }
}

impl HttpHandler for ReadinessEndpoint {
    fn handle(&self, request: Request<Bytes>) -> Response<Bytes> {
        if request.uri().path() != "/healthz/ready" {
            return text_response(StatusCode::NOT_FOUND, "not found");
        }
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return text_response(StatusCode::METHOD_NOT_ALLOWED, "use GET");
        }
        let pending = self.readiness.pending();
        if pending.is_empty() {
            text_response(StatusCode::OK, "ready")
        } else {
            // ztunnel answers 500; 503 is what a probe or load balancer reads as "not yet".
            text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready, pending: {}", pending.join(", ")),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_block_until_done() {
        let readiness = Readiness::new();
        assert!(readiness.is_ready());
        let certs = readiness.register("certificates");
        let xds = certs.subtask("xds");
        let xds_again = readiness.register("xds");
        assert_eq!(readiness.pending(), ["certificates", "xds"]);
        xds.done();
        // Another task of the same name is still pending.
        assert_eq!(readiness.pending(), ["certificates", "xds"]);
        xds_again.done();
        certs.done();
        assert!(readiness.is_ready());
    }

    #[test]
    fn dropping_a_token_does_not_make_the_proxy_ready() {
        let readiness = Readiness::new();
        drop(readiness.register("listeners"));
        assert_eq!(readiness.pending(), ["listeners"]);
    }
}
