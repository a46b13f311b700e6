//! A small HTTP/1.1 server for operations endpoints: every limit a client could push against is bounded
//! (header size and count, body size, time to send headers and body, connection lifetime, concurrent
//! connections), request bodies are read in full before the handler runs, and a drain stops accepting and
//! closes connections gracefully.

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Body;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use mesh_core::drain::DrainWatch;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ProxyError;

/// hyper refuses read buffers smaller than this (it panics), so header limits below it are enforced by
/// `max_header_size` alone.
const HYPER_MIN_BUF: usize = 8 * 1024;

/// Limits of an [`HttpServer`]. The defaults suit operations endpoints: small requests, few clients.
#[derive(Debug, Clone)]
pub struct HttpServerConfig {
    /// Largest request head (request line and headers) in bytes; larger ones get `431`.
    pub max_header_bytes: usize,
    /// Most header fields in a request.
    pub max_headers: usize,
    /// Largest request body in bytes; larger ones get `413`.
    pub max_body_bytes: usize,
    /// Time a client has to send a request's headers (also how long an idle keep-alive connection stays).
    pub header_read_timeout: Duration,
    /// Time a client has to send a request's body once its headers are in; slower ones get `408`.
    pub body_read_timeout: Duration,
    /// Longest a connection may stay open, whatever it is doing (bounds a client that never reads).
    pub max_connection_duration: Duration,
    /// Most connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// On drain, how long in-flight requests get to finish before their connections are closed.
    pub drain_grace: Duration,
}

impl Default for HttpServerConfig {
    fn default() -> Self {
        HttpServerConfig {
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            max_body_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            max_connection_duration: Duration::from_secs(120),
            max_connections: 64,
            drain_grace: Duration::from_secs(5),
        }
    }
}

/// Answers one request whose body has been read (within the limits). Handlers run on the server's task,
/// so they should be quick: operations endpoints read state that is already in memory.
pub trait HttpHandler: Send + Sync + fmt::Debug {
    /// The response to `request`.
    fn handle(&self, request: Request<Bytes>) -> Response<Bytes>;
}

/// A bound listener with its limits, ready to [`serve`](HttpServer::serve) a handler.
#[derive(Debug)]
pub struct HttpServer {
    name: &'static str,
    listener: TcpListener,
    local_addr: SocketAddr,
    config: Arc<HttpServerConfig>,
}

impl HttpServer {
    /// Binds `addr`; `name` (e.g. `"stats"`) labels its log lines.
    pub async fn bind(
        name: &'static str,
        addr: SocketAddr,
        config: HttpServerConfig,
    ) -> Result<Self, ProxyError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ProxyError::HttpBind { addr, source })?;
        HttpServer::from_listener(name, listener, config)
            .map_err(|source| ProxyError::HttpBind { addr, source })
    }

    /// Serves on an already bound listener (socket activation, tests); fails only if the listener's
    /// address cannot be read.
    pub fn from_listener(
        name: &'static str,
        listener: TcpListener,
        config: HttpServerConfig,
    ) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        Ok(HttpServer {
            name,
            listener,
            local_addr,
            config: Arc::new(config),
        })
    }

    /// The address it listens on (with the port the system chose, if bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Accepts and serves connections until `drain` is signalled; then stops accepting, lets in-flight
    /// requests finish (within [`HttpServerConfig::drain_grace`]) and closes. Each connection holds a clone
    /// of `drain`, so the drain trigger's wait covers them.
    pub async fn serve(self, handler: Arc<dyn HttpHandler>, drain: DrainWatch) {
        let HttpServer {
            name,
            listener,
            local_addr,
            config,
        } = self;
        tracing::info!(component = name, address = %local_addr, "listener established");
        let slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
        loop {
            let permit = tokio::select! {
                biased;
                () = drain.signaled() => break,
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let stream = tokio::select! {
                biased;
                () = drain.signaled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        // Out of descriptors and similar: back off instead of spinning on the error.
                        tracing::warn!(component = name, %error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            tokio::spawn(serve_connection(
                stream,
                handler.clone(),
                config.clone(),
                drain.clone(),
                permit,
            ));
        }
        tracing::info!(component = name, address = %local_addr, "listener drained");
    }
}

async fn serve_connection(
    stream: TcpStream,
    handler: Arc<dyn HttpHandler>,
    config: Arc<HttpServerConfig>,
    drain: DrainWatch,
    _permit: OwnedSemaphorePermit,
) {
    // Small request/response exchanges: send each response without waiting to fill a segment.
    let _ = stream.set_nodelay(true);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_headers(config.max_headers)
        .max_header_size(config.max_header_bytes)
        .max_buf_size(config.max_header_bytes.max(HYPER_MIN_BUF));
    let service_config = config.clone();
    let service = service_fn(move |request| {
        let handler = handler.clone();
        let config = service_config.clone();
        async move { Ok::<_, Infallible>(respond(request, &*handler, &config).await) }
    });
    let mut connection = pin!(builder.serve_connection(TokioIo::new(stream), service));
    let lifetime = tokio::time::sleep(config.max_connection_duration);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%error, "admin connection ended with an error");
            }
        }
        () = drain.signaled() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(config.drain_grace, connection).await;
        }
        () = lifetime => tracing::debug!("admin connection reached its maximum duration"),
    }
}

/// Reads the body within the limits, then asks the handler.
async fn respond<B>(
    request: Request<B>,
    handler: &dyn HttpHandler,
    config: &HttpServerConfig,
) -> Response<Full<Bytes>>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let (parts, body) = request.into_parts();
    let body = match read_body(&parts.headers, body, config).await {
        Ok(body) => body,
        Err(status) => {
            return text_response(status, status.canonical_reason().unwrap_or("error")).map(Full::new);
        }
    };
    handler.handle(Request::from_parts(parts, body)).map(Full::new)
}

/// The body, or the status refusing it: `413` when larger than the limit (by its declared length, before
/// reading any of it, or as it arrives), `408` when too slow, `400` when malformed.
pub(crate) async fn read_body<B>(
    headers: &http::HeaderMap,
    body: B,
    config: &HttpServerConfig,
) -> Result<Bytes, StatusCode>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let limit = u64::try_from(config.max_body_bytes).unwrap_or(u64::MAX);
    if declared.is_some_and(|len| len > limit) {
        return Err(StatusCode::PAYLOAD_TOO_LARGE);
    }
    let collected = tokio::time::timeout(
        config.body_read_timeout,
        Limited::new(body, config.max_body_bytes).collect(),
    )
    .await
    .map_err(|_| StatusCode::REQUEST_TIMEOUT)?;
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<LengthLimitError>() => Err(StatusCode::PAYLOAD_TOO_LARGE),
        Err(_) => Err(StatusCode::BAD_REQUEST),
    }
}

/// A `text/plain` response.
pub fn text_response(status: StatusCode, body: impl Into<String>) -> Response<Bytes> {
    let mut body: String = body.into();
    if !body.ends_with('\n') {
        body.push('\n');
    }
    with_type(status, "text/plain; charset=utf-8", Bytes::from(body))
}

/// A response with this status, `Content-Type` and body.
pub(crate) fn with_type(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Bytes> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use http::HeaderMap;
    use hyper::body::Frame;

    use super::*;

    /// A body whose next frame never comes.
    struct Endless;

    impl Body for Endless {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn body_limits() {
        let config = HttpServerConfig {
            max_body_bytes: 16,
            ..HttpServerConfig::default()
        };
        let small = Full::new(Bytes::from_static(b"level=debug"));
        assert_eq!(
            read_body(&HeaderMap::new(), small, &config).await,
            Ok(Bytes::from_static(b"level=debug"))
        );

        // No declared length (chunked): refused as it arrives.
        let big = Full::new(Bytes::from(vec![b'x'; 17]));
        assert_eq!(
            read_body(&HeaderMap::new(), big, &config).await,
            Err(StatusCode::PAYLOAD_TOO_LARGE)
        );

        // A declared length over the limit is refused before reading: this body would never end.
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, "100000".parse().unwrap());
        assert_eq!(
            read_body(&headers, Endless, &config).await,
            Err(StatusCode::PAYLOAD_TOO_LARGE)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn slow_body_times_out() {
        let config = HttpServerConfig::default();
        assert_eq!(
            read_body(&HeaderMap::new(), Endless, &config).await,
            Err(StatusCode::REQUEST_TIMEOUT)
        );
    }
}
