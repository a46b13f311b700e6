//! Fetching a JWKS document: the [`JwksFetcher`] seam and its HTTPS implementation.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::header::{ACCEPT, HOST, USER_AGENT};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::JwtError;

/// Fetches a document (a JWKS, or an OpenID discovery document) by URI. The [`super::JwksCache`] adds the
/// timeout, the caching and the rate limits; an implementation only does one GET.
///
/// [`HttpsFetcher`] is the real one; embedders with their own HTTP stack (a proxy, a service mesh
/// egress) implement this instead, and tests can serve documents from memory.
pub trait JwksFetcher: Send + Sync + fmt::Debug {
    /// The response body of a successful (2xx) GET of `uri`.
    fn fetch<'a>(&'a self, uri: &'a str) -> BoxFuture<'a, Result<String, JwtError>>;
}

/// Default cap on a fetched document: real JWKS documents are a few KiB.
pub const DEFAULT_MAX_DOCUMENT_BYTES: usize = 256 * 1024;

/// GETs `https://` (and, as Istio allows, `http://`) URIs with hyper's HTTP/1.1 client connection over
/// tokio-rustls. The rustls [`ClientConfig`](rustls::ClientConfig) is the caller's: its roots decide which
/// JWKS servers are trusted (a test's own CA, the platform's roots, a corporate CA).
///
/// Each fetch opens one connection: fetches are minutes apart, so pooling would only hold sockets open.
/// Redirects are not followed. The client speaks HTTP/1.1 only, so the config should offer no ALPN
/// protocols (or `http/1.1`).
#[derive(Clone)]
pub struct HttpsFetcher {
    tls: TlsConnector,
    max_document_bytes: usize,
}

impl fmt::Debug for HttpsFetcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpsFetcher")
            .field("max_document_bytes", &self.max_document_bytes)
            .finish_non_exhaustive()
    }
}

impl HttpsFetcher {
    /// A fetcher trusting what `client_config` trusts.
    pub fn new(client_config: Arc<rustls::ClientConfig>) -> Self {
        HttpsFetcher {
            tls: TlsConnector::from(client_config),
            max_document_bytes: DEFAULT_MAX_DOCUMENT_BYTES,
        }
    }

    /// Refuses documents larger than `bytes` (default [`DEFAULT_MAX_DOCUMENT_BYTES`]).
    pub fn with_max_document_bytes(mut self, bytes: usize) -> Self {
        self.max_document_bytes = bytes;
        self
    }

    async fn get(&self, uri: &str) -> Result<String, String> {
        let parsed: http::Uri = uri.parse().map_err(|e| format!("invalid URI: {e}"))?;
        let https = match parsed.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err("the URI must be http:// or https://".into()),
        };
        let host = parsed.host().ok_or("the URI has no host")?;
        let authority = parsed
            .authority()
            .map(|a| a.as_str().to_owned())
            .ok_or("the URI has no host")?;
        // `Uri::host` keeps an IPv6 literal's brackets; sockets and SNI want the bare address.
        let bare_host = host.trim_start_matches('[').trim_end_matches(']');
        let port = parsed.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path = parsed.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let request = http::Request::get(path)
            .header(HOST, authority)
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, concat!("meshkit/", env!("CARGO_PKG_VERSION")))
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let tcp = TcpStream::connect((bare_host, port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let body = if https {
            let server_name = ServerName::try_from(bare_host.to_owned())
                .map_err(|e| format!("invalid server name: {e}"))?;
            let tls = self
                .tls
                .connect(server_name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            exchange(TokioIo::new(tls), request, self.max_document_bytes).await?
        } else {
            exchange(TokioIo::new(tcp), request, self.max_document_bytes).await?
        };
        String::from_utf8(body.to_vec()).map_err(|_| "the document is not UTF-8".to_owned())
    }
}

impl JwksFetcher for HttpsFetcher {
    fn fetch<'a>(&'a self, uri: &'a str) -> BoxFuture<'a, Result<String, JwtError>> {
        Box::pin(async move {
            self.get(uri).await.map_err(|reason| JwtError::Fetch {
                uri: uri.to_owned(),
                reason,
            })
        })
    }
}

/// One request on a fresh HTTP/1.1 connection. The connection is driven in this same future (not a
/// spawned task), so a timeout that drops the fetch also closes the socket.
async fn exchange<T>(io: T, request: http::Request<Empty<Bytes>>, max_bytes: usize) -> Result<Bytes, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let exchange = async move {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("HTTP status {status}"));
        }
        let collected = Limited::new(response.into_body(), max_bytes)
            .collect()
            .await
            .map_err(|e| format!("reading the body: {e}"))?;
        Ok(collected.to_bytes())
    };
    tokio::pin!(exchange);
    tokio::pin!(conn);
    tokio::select! {
        result = &mut exchange => result,
        ended = &mut conn => match ended {
            Err(e) => Err(format!("HTTP connection: {e}")),
            // The connection finished cleanly (the server closed after the response): what it delivered
            // is still to be read.
            Ok(()) => exchange.await,
        },
    }
}
