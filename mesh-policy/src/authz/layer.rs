//! [`AuthorizeLayer`]: AuthorizationPolicy in front of an HTTP service (a waypoint's request path).
//!
//! The layer reads what it decides on from the request: the HBONE connection ([`ConnectionInfo`]) and the
//! target ([`WaypointTarget`]) from request extensions, which the waypoint inserts when it accepts a
//! tunnel, and the verified JWT ([`AuthInfo`]) if the [`crate::AuthenticateLayer`] ran before it. A request
//! missing its connection or target is refused: a misassembled stack must fail closed.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode};
use mesh_core::SpiffeId;
use tower::{Layer, Service};

use super::{AuthInfo, ConnectionAttrs, Enforcement, Evaluation, HttpAttrs, PathNormalization, Target};
use crate::engine::{ExternalAuthorizer, PolicyEngine};

/// The HBONE connection a request arrived on, as request extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The peer's proven identity.
    pub peer: Option<SpiffeId>,
    /// The peer's IP.
    pub source_ip: IpAddr,
    /// The destination IP.
    pub destination_ip: IpAddr,
    /// The destination port.
    pub destination_port: u16,
}

/// What the request is for, as request extension: the waypoint and the Service called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaypointTarget {
    /// The namespace of the destination.
    pub namespace: String,
    /// The destination workload's labels (empty when a Service is the destination).
    pub labels: BTreeMap<String, String>,
    /// The waypoint `Gateway`'s name.
    pub gateway: String,
    /// The waypoint's namespace.
    pub gateway_namespace: String,
    /// The called Service, as (`namespace`, `name`).
    pub service: Option<(String, String)>,
}

/// Wraps an HTTP service with AuthorizationPolicy enforcement.
#[derive(Clone)]
pub struct AuthorizeLayer {
    engine: PolicyEngine,
    normalization: PathNormalization,
    external: Option<Arc<dyn ExternalAuthorizer>>,
}

impl AuthorizeLayer {
    /// Enforces the policies of `engine`, normalizing paths as `normalization` says (Istio's default is
    /// [`PathNormalization::Base`]).
    pub fn new(engine: PolicyEngine, normalization: PathNormalization) -> Self {
        AuthorizeLayer {
            engine,
            normalization,
            external: None,
        }
    }

    /// Asks `authorizer` about requests that match a CUSTOM policy (without one, they are denied).
    pub fn with_external(mut self, authorizer: Arc<dyn ExternalAuthorizer>) -> Self {
        self.external = Some(authorizer);
        self
    }
}

impl fmt::Debug for AuthorizeLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorizeLayer")
            .field("normalization", &self.normalization)
            .field("external", &self.external.is_some())
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`AuthorizeLayer`] makes.
#[derive(Clone, Debug)]
pub struct Authorize<S> {
    inner: S,
    layer: AuthorizeLayer,
}

impl<S, B, RB> Service<Request<B>> for Authorize<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RB>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // Take the service that was polled ready, leave a fresh clone for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            // Decide on the head only, so the body need not be shared across the await.
            let (mut parts, body) = request.into_parts();
            match decide(&layer, &parts).await {
                // The upstream gets the path that was authorized, as Envoy rewrites `:path` to its normalized
                // form; otherwise a backend that resolves paths differently could serve another resource.
                Some((evaluation, path)) if evaluation.is_allowed() => match with_path(&parts.uri, &path) {
                    Some(uri) => {
                        parts.uri = uri;
                        inner.call(Request::from_parts(parts, body)).await
                    }
                    None => Ok(forbidden()),
                },
                Some((evaluation, _)) => {
                    tracing::info!(%evaluation, "request denied");
                    Ok(forbidden())
                }
                None => {
                    tracing::warn!("request without connection or target information: denied");
                    Ok(forbidden())
                }
            }
        })
    }
}

/// A denial is a 403, as Envoy's RBAC filter answers (its `RBAC: access denied` text is left out: the body
/// type is the caller's).
fn forbidden<RB: Default>() -> Response<RB> {
    let mut response = Response::new(RB::default());
    *response.status_mut() = StatusCode::FORBIDDEN;
    response
}

/// `uri` with its path replaced by `path` (the query kept); `None` if that is not a valid URI.
fn with_path(uri: &http::Uri, path: &str) -> Option<http::Uri> {
    if uri.path() == path {
        return Some(uri.clone());
    }
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().ok()?);
    http::Uri::from_parts(parts).ok()
}

/// The decision, and the normalized path it was made on.
async fn decide(layer: &AuthorizeLayer, request: &http::request::Parts) -> Option<(Evaluation, String)> {
    let connection = request.extensions.get::<ConnectionInfo>()?;
    let target = request.extensions.get::<WaypointTarget>()?;
    let auth = request.extensions.get::<AuthInfo>();
    let host = request
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            request
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or_default();
    let raw_path = request.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut http = HttpAttrs::new(
        request.method.as_str(),
        host,
        raw_path,
        &request.headers,
        layer.normalization,
    );
    http.auth = auth;
    let attrs = super::Request {
        connection: ConnectionAttrs {
            source: connection.peer.as_ref(),
            source_ip: connection.source_ip,
            destination_ip: connection.destination_ip,
            destination_port: connection.destination_port,
            sni: None,
        },
        http: Some(&http),
    };
    let target = Target {
        namespace: &target.namespace,
        labels: &target.labels,
        enforcement: Enforcement::Waypoint {
            gateway: &target.gateway,
            gateway_namespace: &target.gateway_namespace,
            service: target
                .service
                .as_ref()
                .map(|(ns, name)| (ns.as_str(), name.as_str())),
        },
    };
    let evaluation = layer
        .engine
        .authorize(&target, &attrs, layer.external.as_deref())
        .await;
    Some((evaluation, http.path))
}
