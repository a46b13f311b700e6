//! Who may open an ADS stream.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::ca::{CallInfo, CallerAuthenticator};
use crate::transport::ConnectionInfo;

/// What an [`AdsAccess`] check sees of a stream being opened.
#[derive(Debug, Clone, Copy)]
pub struct StreamInfo<'a> {
    /// The request's gRPC metadata (`authorization`, `clusterid`, ...).
    pub metadata: &'a MetadataMap,
    /// The TLS connection, when the server runs over [`crate::transport::TlsIncoming`].
    pub connection: Option<&'a ConnectionInfo>,
    /// The client's address, if known.
    pub remote_addr: Option<SocketAddr>,
}

/// Decides whether a client may open an ADS stream; returns a name for it (for logs) or the refusal.
/// istiod authenticates xDS clients exactly as CA callers (a Kubernetes token or a client certificate).
pub trait AdsAccess: Send + Sync + fmt::Debug {
    /// Allows or refuses the stream described by `stream`.
    fn check<'a>(&'a self, stream: &'a StreamInfo<'a>) -> BoxFuture<'a, Result<String, Status>>;
}

/// **Development only.** Any non-empty bearer token, from a loopback address only: what the local
/// control plane accepts in its documented dev mode, so that Istio's own ztunnel (which always sends a
/// token) can be pointed at it on one machine.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoopbackAnyToken;

impl AdsAccess for LoopbackAnyToken {
    fn check<'a>(&'a self, stream: &'a StreamInfo<'a>) -> BoxFuture<'a, Result<String, Status>> {
        let outcome = (|| {
            let addr = stream
                .remote_addr
                .ok_or_else(|| Status::unauthenticated("the caller's address is unknown"))?;
            if !addr.ip().to_canonical().is_loopback() {
                return Err(Status::unauthenticated(format!(
                    "development mode only accepts loopback clients, not {}",
                    addr.ip()
                )));
            }
            let token = stream
                .metadata
                .get("authorization")
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.split_once(' '))
                .filter(|(scheme, token)| scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty());
            if token.is_none() {
                return Err(Status::unauthenticated("no bearer token"));
            }
            Ok(format!("loopback client {addr}"))
        })();
        Box::pin(std::future::ready(outcome))
    }
}

/// Clients authenticated by a CA [`CallerAuthenticator`] (static tokens, client certificates): the same
/// credentials open ADS streams and obtain certificates, as with istiod.
#[derive(Debug, Clone)]
pub struct AuthenticatedCallers(pub Arc<dyn CallerAuthenticator>);

impl AdsAccess for AuthenticatedCallers {
    fn check<'a>(&'a self, stream: &'a StreamInfo<'a>) -> BoxFuture<'a, Result<String, Status>> {
        Box::pin(async move {
            let call = CallInfo {
                metadata: stream.metadata,
                connection: stream.connection,
                remote_addr: stream.remote_addr,
                requested_identity: None,
                impersonation: false,
            };
            self.0
                .authenticate(&call)
                .await
                .map(|caller| caller.to_string())
                .map_err(|error| Status::unauthenticated(error.to_string()))
        })
    }
}
