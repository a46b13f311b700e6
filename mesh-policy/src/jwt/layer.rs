//! [`AuthenticateLayer`]: JWT authentication in front of an `http::Request` service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use http::header::WWW_AUTHENTICATE;
use http::{HeaderValue, Request, Response, StatusCode};
use tower::{Layer, Service};

use super::{JwtAuthenticator, apply_edits};

type Select = dyn Fn(&http::request::Parts) -> Option<Arc<JwtAuthenticator>> + Send + Sync;

/// Authenticates each request with a [`JwtAuthenticator`] before the inner service sees it:
/// - an invalid token: answered `401` (with `www-authenticate: Bearer error="invalid_token"` and an empty
///   body), and the inner service is not called;
/// - a valid token: the [`AuthInfo`](crate::authz::AuthInfo) is inserted into the request's extensions
///   (for authorization), and the request is edited as the rule says (token stripped, output headers);
/// - no token: passed on unauthenticated, with forged output headers removed.
#[derive(Clone)]
pub struct AuthenticateLayer {
    select: Arc<Select>,
}

impl fmt::Debug for AuthenticateLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthenticateLayer").finish_non_exhaustive()
    }
}

impl AuthenticateLayer {
    /// Every request is authenticated by `authenticator`.
    pub fn new(authenticator: Arc<JwtAuthenticator>) -> Self {
        Self::per_request(move |_| Some(Arc::clone(&authenticator)))
    }

    /// The authenticator is chosen per request (a waypoint picks it by the called service, or reads the
    /// current one from a `watch`); `None` passes the request on untouched.
    pub fn per_request<F>(select: F) -> Self
    where
        F: Fn(&http::request::Parts) -> Option<Arc<JwtAuthenticator>> + Send + Sync + 'static,
    {
        AuthenticateLayer {
            select: Arc::new(select),
        }
    }
}

impl<S> Layer<S> for AuthenticateLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticate {
            inner,
            select: Arc::clone(&self.select),
        }
    }
}

/// The service [`AuthenticateLayer`] makes.
#[derive(Clone)]
pub struct Authenticate<S> {
    inner: S,
    select: Arc<Select>,
}

impl<S: fmt::Debug> fmt::Debug for Authenticate<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticate")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, B, ResBody> Service<Request<B>> for Authenticate<S>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The instance that was polled ready serves this request; a fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (mut parts, body) = request.into_parts();
        let authenticator = (self.select)(&parts);
        Box::pin(async move {
            if let Some(authenticator) = authenticator {
                match authenticator.verify(&parts.headers, &parts.uri).await {
                    Ok(verified) => {
                        let edits = authenticator.request_edits(verified.as_ref());
                        apply_edits(&mut parts.headers, &mut parts.uri, &edits);
                        if let Some(verified) = verified {
                            parts.extensions.insert(verified.info);
                        }
                    }
                    Err(error) => {
                        tracing::debug!(%error, uri = %parts.uri, "request refused: invalid JWT");
                        return Ok(unauthorized());
                    }
                }
            }
            inner.call(Request::from_parts(parts, body)).await
        })
    }
}

fn unauthorized<B: Default>() -> Response<B> {
    let mut response = Response::new(B::default());
    *response.status_mut() = StatusCode::UNAUTHORIZED;
    response.headers_mut().insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer error=\"invalid_token\""),
    );
    response
}
