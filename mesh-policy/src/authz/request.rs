//! What an authorization decision looks at: the connection (L4) and, at a waypoint, the HTTP request and
//! its JWT (L7).

use std::net::IpAddr;

use http::HeaderMap;
use mesh_core::SpiffeId;

use super::matcher::{PathNormalization, normalize_path};

/// The connection: what ztunnel knows.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionAttrs<'a> {
    /// The peer's proven identity, if the connection was mutual TLS.
    pub source: Option<&'a SpiffeId>,
    /// The peer's IP (the connection's source).
    pub source_ip: IpAddr,
    /// The destination IP.
    pub destination_ip: IpAddr,
    /// The destination port.
    pub destination_port: u16,
    /// The TLS SNI the client sent to the application, if known.
    pub sni: Option<&'a str>,
}

/// A verified JWT, as `request.auth.*` conditions and `requestPrincipals` see it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuthInfo {
    /// `<iss>/<sub>`.
    pub principal: String,
    /// `aud`, as a list.
    pub audiences: Vec<String>,
    /// `azp`.
    pub presenter: Option<String>,
    /// All claims, for `request.auth.claims[..]`.
    pub claims: serde_json::Value,
}

/// The HTTP request: what a waypoint adds. Build it with [`HttpAttrs::new`], which normalizes the path
/// once, so evaluation against many policies does no string work of its own.
#[derive(Debug, Clone)]
pub struct HttpAttrs<'a> {
    /// The method exactly as received (an HTTP/2 `:method` is case-sensitive and never upper-cased).
    pub method: &'a str,
    /// `:authority` / `Host`.
    pub host: &'a str,
    /// The path after normalization (see [`normalize_path`]).
    pub path: String,
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// The original client IP (`X-Forwarded-For` as the proxy trusts it), for `remoteIpBlocks`.
    pub remote_ip: Option<IpAddr>,
    /// The verified JWT, if the request carried one.
    pub auth: Option<&'a AuthInfo>,
}

impl<'a> HttpAttrs<'a> {
    /// Request attributes with the raw `:path` normalized as `normalization` says.
    pub fn new(
        method: &'a str,
        host: &'a str,
        raw_path: &str,
        headers: &'a HeaderMap,
        normalization: PathNormalization,
    ) -> Self {
        HttpAttrs {
            method,
            host,
            path: normalize_path(raw_path, normalization),
            headers,
            remote_ip: None,
            auth: None,
        }
    }
}

/// Everything one decision looks at.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The connection.
    pub connection: ConnectionAttrs<'a>,
    /// The HTTP request, at a waypoint; `None` at ztunnel.
    pub http: Option<&'a HttpAttrs<'a>>,
}

impl<'a> Request<'a> {
    /// A connection-only request (ztunnel).
    pub fn l4(connection: ConnectionAttrs<'a>) -> Self {
        Request {
            connection,
            http: None,
        }
    }

    pub(crate) fn principal(&self) -> Option<&'a str> {
        self.connection.source.map(SpiffeId::principal)
    }

    pub(crate) fn namespace(&self) -> Option<&'a str> {
        self.connection.source.and_then(SpiffeId::namespace)
    }

    pub(crate) fn auth(&self) -> Option<&'a AuthInfo> {
        self.http.and_then(|h| h.auth)
    }

    /// The original client IP: from the HTTP layer if known, else the connection's source.
    pub(crate) fn remote_ip(&self) -> IpAddr {
        self.http
            .and_then(|h| h.remote_ip)
            .unwrap_or(self.connection.source_ip)
    }
}
