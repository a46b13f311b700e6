//! The one error type of `mesh-hbone`.

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;

/// Errors from opening or serving HBONE tunnels. Each says which step failed, so a caller can map it to a
/// metric flag (CONNECT, TLS_FAILURE, H2_HANDSHAKE_FAILURE, ...) and an access-log reason.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HboneError {
    /// The TCP connection to the peer's HBONE port failed.
    #[error("connecting to {addr} failed: {source}")]
    Connect {
        /// The peer address.
        addr: SocketAddr,
        /// The socket error.
        source: std::io::Error,
    },
    /// The mutual-TLS handshake failed (identity mismatch, unknown root, expired certificate, ...).
    #[error("TLS handshake with {addr} failed: {source}")]
    Tls {
        /// The peer address.
        addr: SocketAddr,
        /// The handshake error; `mesh_core::tls::identity_error` extracts an identity refusal from it.
        source: std::io::Error,
    },
    /// The peer did not negotiate ALPN `h2`.
    #[error("peer {addr} did not negotiate ALPN h2")]
    NoH2Alpn {
        /// The peer address.
        addr: SocketAddr,
    },
    /// The HTTP/2 handshake or the HTTP/2 connection failed.
    #[error("HTTP/2 error: {0}")]
    H2(#[from] h2::Error),
    /// A step took longer than its limit.
    #[error("{step} timed out after {after:?}")]
    Timeout {
        /// What was being waited for.
        step: &'static str,
        /// The limit.
        after: Duration,
    },
    /// The server answered the CONNECT with a status other than 200.
    #[error("the HBONE server answered {0}")]
    Status(StatusCode),
    /// The request cannot be sent as an HBONE CONNECT (an authority that does not parse, a header value
    /// that is not valid).
    #[error("invalid HBONE request: {0}")]
    InvalidRequest(String),
    /// No certificate for the source identity.
    #[error("no certificate for the source identity: {0}")]
    Certificate(#[from] mesh_core::Error),
    /// The acceptor has no certificate to present on the address a connection arrived on: no workload
    /// of this node has that address. The connection is closed before the TLS handshake.
    #[error("no workload identity serves local address {local}")]
    NoLocalIdentity {
        /// The local address the connection arrived on.
        local: SocketAddr,
    },
    /// The certificate (or the TLS configuration) of the workload a connection arrived for could not be
    /// had, so the connection is closed before the TLS handshake.
    #[error("no server certificate for {identity} (local address {local}): {source}")]
    ServerCertificate {
        /// The local address the connection arrived on.
        local: SocketAddr,
        /// The workload identity that address belongs to.
        identity: mesh_core::SpiffeId,
        /// Why: the certificate provider's error, or a configuration that could not be built (boxed to
        /// keep every `Result<_, HboneError>` small).
        source: Box<mesh_core::Error>,
    },
    /// Socket-level failure while serving (accept, local address).
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
}
