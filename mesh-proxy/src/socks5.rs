//! SOCKS5 on port 15080 (Istio's `UNSTABLE_ENABLE_SOCKS5`): the server side of RFC 1928 as Istio's ztunnel
//! implements it, for applications that are not captured by iptables but can be told to use a proxy.
//!
//! Supported: the "no authentication" method only, the `CONNECT` command only, and IPv4, IPv6 and domain
//! name targets (names are resolved here, within [`Socks5Config::resolve_timeout`]). After the handshake
//! the connection takes the same [`Outbound`] path as a captured one, with the requested target as its
//! original destination; the reply is sent once the upstream is connected, so a client learns why a
//! connection failed (RFC 1928 reply codes, [`Reply`]).
//!
//! A client cannot make us hold much: the handshake is parsed from a fixed buffer of
//! [`MAX_HANDSHAKE_BYTES`], and must complete within [`Socks5Config::handshake_timeout`].
//!
//! The wire format is parsed by pure functions, [`parse_greeting`] and [`parse_request`], which take
//! whatever bytes have arrived and say whether they hold a complete message.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::error::ProxyError;
use crate::listener::ConnectionHandler;
use crate::outbound::{Outbound, Passthrough};

/// The protocol version byte of SOCKS5.
pub const VERSION: u8 = 0x05;

/// Authentication method "no authentication required".
const METHOD_NO_AUTH: u8 = 0x00;
/// Method selection reply "no acceptable methods".
const METHOD_NONE_ACCEPTABLE: u8 = 0xFF;
const COMMAND_CONNECT: u8 = 0x01;
const ATYP_IPV4: u8 = 0x01;
const ATYP_DOMAIN: u8 = 0x03;
const ATYP_IPV6: u8 = 0x04;

/// The largest greeting (`VER NMETHODS METHODS[255]`).
const MAX_GREETING_BYTES: usize = 2 + 255;
/// The largest request (`VER CMD RSV ATYP LEN DOMAIN[255] PORT[2]`).
const MAX_REQUEST_BYTES: usize = 4 + 1 + 255 + 2;
/// The handshake buffer: a greeting and a request sent back to back (clients may pipeline them), and any
/// early application bytes that fit after them, which are forwarded upstream.
pub const MAX_HANDSHAKE_BYTES: usize = MAX_GREETING_BYTES + MAX_REQUEST_BYTES;

/// Why a SOCKS5 handshake failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Socks5Error {
    /// A message did not start with version 5.
    #[error("unsupported SOCKS version {0}")]
    UnsupportedVersion(u8),
    /// The client offered no authentication method we accept (we accept "no authentication" only).
    #[error("the client offered no acceptable authentication method")]
    NoAcceptableMethod,
    /// A command other than `CONNECT` (`BIND` is 2, `UDP ASSOCIATE` 3).
    #[error("unsupported SOCKS command {0}")]
    UnsupportedCommand(u8),
    /// An address type other than IPv4 (1), domain name (3) or IPv6 (4).
    #[error("unsupported SOCKS address type {0}")]
    UnsupportedAddressType(u8),
    /// A domain name that is empty or has characters no hostname has.
    #[error("invalid domain name in the SOCKS request")]
    InvalidDomain,
    /// Port 0 cannot be connected to.
    #[error("the SOCKS request names port 0")]
    InvalidPort,
    /// The client closed the connection before completing the handshake.
    #[error("the client closed the connection during the SOCKS handshake")]
    Truncated,
    /// The client did not complete the handshake in time.
    #[error("the SOCKS handshake did not complete within {0:?}")]
    HandshakeTimeout(Duration),
    /// Reading from or writing to the client failed.
    #[error("SOCKS client connection failed: {0}")]
    Io(#[from] io::Error),
}

impl Socks5Error {
    /// The reply a request that failed this way gets, if any: version and greeting failures are not
    /// answered with a reply (the client did not speak the protocol far enough to read one).
    pub fn reply(&self) -> Option<Reply> {
        match self {
            Socks5Error::UnsupportedCommand(_) => Some(Reply::CommandNotSupported),
            Socks5Error::UnsupportedAddressType(_) => Some(Reply::AddressTypeNotSupported),
            Socks5Error::InvalidDomain | Socks5Error::InvalidPort => Some(Reply::HostUnreachable),
            _ => None,
        }
    }
}

/// The result of parsing the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<T> {
    /// The bytes are a valid beginning; read more.
    Incomplete,
    /// A whole message, the first `len` bytes of the input.
    Complete {
        /// The message.
        value: T,
        /// How many bytes of the input it took.
        len: usize,
    },
}

/// The client's first message: the authentication methods it offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// Whether "no authentication required" is among them.
    pub no_auth: bool,
}

/// Where a `CONNECT` request asks to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An IPv4 or IPv6 address and port.
    Addr(SocketAddr),
    /// A domain name (validated: letters, digits, `-`, `.`, `_`) and port, resolved by the server.
    Domain {
        /// The name, without a trailing dot.
        host: String,
        /// The port.
        port: u16,
    },
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Addr(addr) => write!(f, "{addr}"),
            Target::Domain { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// RFC 1928 reply codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    /// `0x00`: connected.
    Succeeded = 0x00,
    /// `0x01`: general SOCKS server failure.
    GeneralFailure = 0x01,
    /// `0x02`: connection not allowed by ruleset (unknown client, policy denial, passthrough refused).
    NotAllowed = 0x02,
    /// `0x03`: network unreachable.
    NetworkUnreachable = 0x03,
    /// `0x04`: host unreachable (including names that do not resolve, and upstream timeouts).
    HostUnreachable = 0x04,
    /// `0x05`: connection refused.
    ConnectionRefused = 0x05,
    /// `0x07`: command not supported.
    CommandNotSupported = 0x07,
    /// `0x08`: address type not supported.
    AddressTypeNotSupported = 0x08,
}

impl Reply {
    /// The reply message: this code, and a bound address of `0.0.0.0:0` (as ztunnel sends; the bound
    /// address of an HBONE tunnel would mean nothing to the client).
    pub fn encode(self) -> [u8; 10] {
        [VERSION, self as u8, 0x00, ATYP_IPV4, 0, 0, 0, 0, 0, 0]
    }
}

/// Parses a greeting, `VER NMETHODS METHODS...`.
pub fn parse_greeting(buf: &[u8]) -> Result<Parsed<Greeting>, Socks5Error> {
    let Some(&version) = buf.first() else {
        return Ok(Parsed::Incomplete);
    };
    if version != VERSION {
        return Err(Socks5Error::UnsupportedVersion(version));
    }
    let Some(&count) = buf.get(1) else {
        return Ok(Parsed::Incomplete);
    };
    let len = 2 + usize::from(count);
    let Some(methods) = buf.get(2..len) else {
        return Ok(Parsed::Incomplete);
    };
    Ok(Parsed::Complete {
        value: Greeting {
            no_auth: methods.contains(&METHOD_NO_AUTH),
        },
        len,
    })
}

/// Parses a request, `VER CMD RSV ATYP DST.ADDR DST.PORT`; only `CONNECT` is accepted. The reserved byte
/// is ignored, as ztunnel does. A domain that is an IP literal is returned as [`Target::Addr`].
pub fn parse_request(buf: &[u8]) -> Result<Parsed<Target>, Socks5Error> {
    let Some(&version) = buf.first() else {
        return Ok(Parsed::Incomplete);
    };
    if version != VERSION {
        return Err(Socks5Error::UnsupportedVersion(version));
    }
    let Some(&command) = buf.get(1) else {
        return Ok(Parsed::Incomplete);
    };
    if command != COMMAND_CONNECT {
        return Err(Socks5Error::UnsupportedCommand(command));
    }
    let Some(&address_type) = buf.get(3) else {
        return Ok(Parsed::Incomplete);
    };
    let (address_len, address_start) = match address_type {
        ATYP_IPV4 => (4, 4),
        ATYP_IPV6 => (16, 4),
        ATYP_DOMAIN => match buf.get(4) {
            Some(&n) => (usize::from(n), 5),
            None => return Ok(Parsed::Incomplete),
        },
        other => return Err(Socks5Error::UnsupportedAddressType(other)),
    };
    let port_start = address_start + address_len;
    let len = port_start + 2;
    let (Some(address), Some(&[high, low])) = (
        buf.get(address_start..port_start),
        buf.get(port_start..len)
            .and_then(|p| <&[u8; 2]>::try_from(p).ok()),
    ) else {
        return Ok(Parsed::Incomplete);
    };
    let port = u16::from_be_bytes([high, low]);
    if port == 0 {
        return Err(Socks5Error::InvalidPort);
    }
    let target = match address_type {
        ATYP_IPV4 => Target::Addr(SocketAddr::new(IpAddr::V4(ipv4(address)?), port)),
        ATYP_IPV6 => Target::Addr(SocketAddr::new(IpAddr::V6(ipv6(address)?), port)),
        _ => domain_target(address, port)?,
    };
    Ok(Parsed::Complete { value: target, len })
}

fn ipv4(bytes: &[u8]) -> Result<Ipv4Addr, Socks5Error> {
    <[u8; 4]>::try_from(bytes)
        .map(Ipv4Addr::from)
        .map_err(|_| Socks5Error::UnsupportedAddressType(ATYP_IPV4))
}

fn ipv6(bytes: &[u8]) -> Result<Ipv6Addr, Socks5Error> {
    <[u8; 16]>::try_from(bytes)
        .map(Ipv6Addr::from)
        .map_err(|_| Socks5Error::UnsupportedAddressType(ATYP_IPV6))
}

/// A domain target; IP literals (which some clients send as names) become addresses, so they are not
/// resolved.
fn domain_target(name: &[u8], port: u16) -> Result<Target, Socks5Error> {
    let name = std::str::from_utf8(name).map_err(|_| Socks5Error::InvalidDomain)?;
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(Target::Addr(SocketAddr::new(ip, port)));
    }
    let host = name.strip_suffix('.').unwrap_or(name);
    let valid = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        && !host.split('.').any(str::is_empty);
    if !valid {
        return Err(Socks5Error::InvalidDomain);
    }
    Ok(Target::Domain {
        host: host.to_ascii_lowercase(),
        port,
    })
}

/// Settings of the SOCKS5 port.
#[derive(Debug, Clone)]
pub struct Socks5Config {
    /// Time for a client to send its greeting and request.
    pub handshake_timeout: Duration,
    /// Time to resolve a domain name target.
    pub resolve_timeout: Duration,
    /// Whether targets outside the mesh may be reached (plain TCP passthrough). Off by default, as in
    /// ztunnel: the SOCKS port is for reaching mesh destinations, not a general egress proxy.
    pub allow_passthrough: bool,
}

impl Default for Socks5Config {
    fn default() -> Self {
        Socks5Config {
            handshake_timeout: Duration::from_secs(10),
            resolve_timeout: Duration::from_secs(5),
            allow_passthrough: false,
        }
    }
}

/// The SOCKS5 server: handshake, then the [`Outbound`] path. Cheap to clone; serve it with
/// [`serve_tcp`](crate::listener::serve_tcp) on `127.0.0.1:15080`.
#[derive(Debug, Clone)]
pub struct Socks5 {
    outbound: Outbound,
    config: Arc<Socks5Config>,
}

impl Socks5 {
    /// A server sending its connections through `outbound`.
    pub fn new(outbound: Outbound, config: Socks5Config) -> Self {
        Socks5 {
            outbound,
            config: Arc::new(config),
        }
    }

    /// Serves one client connection: handshake, resolution, upstream connection, reply, then bytes
    /// both ways until the connection ends.
    pub async fn serve_connection(&self, mut stream: TcpStream, peer: SocketAddr) -> Result<(), ProxyError> {
        let timeout = self.config.handshake_timeout;
        let (target, early) = tokio::time::timeout(timeout, handshake(&mut stream))
            .await
            .map_err(|_| Socks5Error::HandshakeTimeout(timeout))??;
        let destination = match self.resolve(&target).await {
            Ok(destination) => destination,
            Err(error) => {
                self.reply(&mut stream, Reply::HostUnreachable).await;
                return Err(error);
            }
        };
        let passthrough = if self.config.allow_passthrough {
            Passthrough::Allow
        } else {
            Passthrough::Refuse
        };
        let connection = match Box::pin(self.outbound.connect(peer, destination, passthrough)).await {
            Ok(connection) => connection,
            Err(error) => {
                self.reply(&mut stream, reply_for(&error)).await;
                return Err(error);
            }
        };
        tokio::time::timeout(timeout, stream.write_all(&Reply::Succeeded.encode()))
            .await
            .map_err(|_| Socks5Error::HandshakeTimeout(timeout))?
            .map_err(Socks5Error::Io)?;
        let mut client = Prefixed {
            prefix: early,
            offset: 0,
            inner: stream,
        };
        connection.forward(&mut client).await
    }

    /// Sends a failure reply, best effort: the connection is closed after it either way.
    async fn reply(&self, stream: &mut TcpStream, reply: Reply) {
        let _ = tokio::time::timeout(self.config.handshake_timeout, stream.write_all(&reply.encode())).await;
    }

    async fn resolve(&self, target: &Target) -> Result<SocketAddr, ProxyError> {
        let (host, port) = match target {
            Target::Addr(addr) => return Ok(*addr),
            Target::Domain { host, port } => (host.as_str(), *port),
        };
        let timeout = self.config.resolve_timeout;
        let resolve_error = |source: io::Error| ProxyError::Resolve {
            host: host.to_owned(),
            source,
        };
        let mut addrs = tokio::time::timeout(timeout, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| {
                resolve_error(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {timeout:?}"),
                ))
            })?
            .map_err(resolve_error)?;
        addrs
            .next()
            .ok_or_else(|| resolve_error(io::Error::new(io::ErrorKind::NotFound, "no addresses")))
    }
}

impl ConnectionHandler for Socks5 {
    async fn handle(&self, stream: TcpStream, peer: SocketAddr) {
        if let Err(error) = self.serve_connection(stream, peer).await {
            tracing::info!(%peer, %error, "SOCKS5 connection failed");
        }
    }
}

/// Reads the greeting, answers it, reads the request. Returns the target and any bytes the client sent
/// after the request (they belong to the application and go upstream).
async fn handshake(stream: &mut TcpStream) -> Result<(Target, Vec<u8>), Socks5Error> {
    let mut buf = [0u8; MAX_HANDSHAKE_BYTES];
    let mut filled = 0;
    let (greeting, used) = read_message(stream, &mut buf, &mut filled, 0, parse_greeting).await?;
    if !greeting.no_auth {
        let _ = stream.write_all(&[VERSION, METHOD_NONE_ACCEPTABLE]).await;
        return Err(Socks5Error::NoAcceptableMethod);
    }
    stream.write_all(&[VERSION, METHOD_NO_AUTH]).await?;
    match read_message(stream, &mut buf, &mut filled, used, parse_request).await {
        Ok((target, end)) => Ok((target, buf[end..filled].to_vec())),
        Err(error) => {
            if let Some(reply) = error.reply() {
                let _ = stream.write_all(&reply.encode()).await;
            }
            Err(error)
        }
    }
}

/// Reads into `buf` until `parse` finds a whole message starting at `start`; returns it and the offset
/// just past it. Never reads past the buffer: both messages fit in it by construction.
async fn read_message<T>(
    stream: &mut TcpStream,
    buf: &mut [u8; MAX_HANDSHAKE_BYTES],
    filled: &mut usize,
    start: usize,
    parse: fn(&[u8]) -> Result<Parsed<T>, Socks5Error>,
) -> Result<(T, usize), Socks5Error> {
    loop {
        if let Parsed::Complete { value, len } = parse(&buf[start..*filled])? {
            return Ok((value, start + len));
        }
        if *filled == buf.len() {
            // Unreachable with well-formed sizes; kept so a parsing mistake cannot spin.
            return Err(Socks5Error::Truncated);
        }
        let read = stream.read(&mut buf[*filled..]).await?;
        if read == 0 {
            return Err(Socks5Error::Truncated);
        }
        *filled += read;
    }
}

/// The RFC 1928 reply for a failed outbound connection.
fn reply_for(error: &ProxyError) -> Reply {
    use crate::telemetry::ResponseFlag;
    match error {
        ProxyError::UnknownSource { .. }
        | ProxyError::UnknownSourceWorkload { .. }
        | ProxyError::PassthroughRefused { .. } => Reply::NotAllowed,
        ProxyError::Route(_) | ProxyError::UpstreamTimeout { .. } => Reply::HostUnreachable,
        ProxyError::UpstreamConnect { source, .. } => match source.kind() {
            io::ErrorKind::ConnectionRefused => Reply::ConnectionRefused,
            io::ErrorKind::NetworkUnreachable => Reply::NetworkUnreachable,
            io::ErrorKind::HostUnreachable | io::ErrorKind::TimedOut => Reply::HostUnreachable,
            _ => Reply::GeneralFailure,
        },
        ProxyError::HboneConnect { .. } if error.response_flag() == ResponseFlag::Deny => Reply::NotAllowed,
        ProxyError::HboneConnect { .. } => Reply::HostUnreachable,
        _ => Reply::GeneralFailure,
    }
}

/// The client stream with the bytes it sent early (after its request, before our reply) put back in
/// front, so the copy forwards them first.
struct Prefixed {
    prefix: Vec<u8>,
    offset: usize,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(rest) = this.prefix.get(this.offset..).filter(|rest| !rest.is_empty()) {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.offset += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The fuzz entry point: both parsers over arbitrary bytes, with the invariants a caller relies on.
pub(crate) fn fuzz_handshake(bytes: &[u8]) {
    let rest = match parse_greeting(bytes) {
        Ok(Parsed::Complete { len, .. }) => {
            assert!(len <= bytes.len() && len <= MAX_GREETING_BYTES);
            assert_eq!(parse_greeting(&bytes[..len - 1]).ok(), Some(Parsed::Incomplete));
            &bytes[len..]
        }
        Ok(Parsed::Incomplete) => {
            assert!(bytes.len() < MAX_GREETING_BYTES);
            bytes
        }
        Err(_) => bytes,
    };
    match parse_request(rest) {
        Ok(Parsed::Complete { value, len }) => {
            assert!(len <= rest.len() && len <= MAX_REQUEST_BYTES);
            assert_eq!(parse_request(&rest[..len - 1]).ok(), Some(Parsed::Incomplete));
            if let Target::Addr(addr) = value {
                assert_ne!(addr.port(), 0);
            }
        }
        Ok(Parsed::Incomplete) => assert!(rest.len() < MAX_REQUEST_BYTES),
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete<T>(parsed: Result<Parsed<T>, Socks5Error>) -> (T, usize) {
        match parsed {
            Ok(Parsed::Complete { value, len }) => (value, len),
            Ok(Parsed::Incomplete) => panic!("incomplete"),
            Err(error) => panic!("error: {error}"),
        }
    }

    #[test]
    fn greeting_with_no_auth_among_others() {
        let (greeting, len) = complete(parse_greeting(&[5, 3, 2, 0, 1, 0xAA]));
        assert_eq!(greeting, Greeting { no_auth: true });
        assert_eq!(len, 5, "the byte after the greeting is not part of it");
    }

    #[test]
    fn greeting_without_no_auth() {
        let (greeting, _) = complete(parse_greeting(&[5, 1, 2]));
        assert!(!greeting.no_auth);
        let (greeting, _) = complete(parse_greeting(&[5, 0]));
        assert!(!greeting.no_auth, "zero methods offers nothing");
    }

    #[test]
    fn greeting_prefixes_are_incomplete() {
        let whole = [5, 2, 2, 0];
        for end in 0..whole.len() {
            assert_eq!(
                parse_greeting(&whole[..end]).unwrap(),
                Parsed::Incomplete,
                "prefix {end}"
            );
        }
    }

    #[test]
    fn greeting_of_another_version_is_refused() {
        assert!(matches!(
            parse_greeting(&[4, 1, 0]),
            Err(Socks5Error::UnsupportedVersion(4))
        ));
    }

    #[test]
    fn request_ipv4() {
        let (target, len) = complete(parse_request(&[5, 1, 0, 1, 10, 0, 0, 1, 0x1F, 0x90, 7]));
        assert_eq!(target, Target::Addr("10.0.0.1:8080".parse().unwrap()));
        assert_eq!(len, 10);
    }

    #[test]
    fn request_ipv6() {
        let mut bytes = vec![5, 1, 0, 4];
        bytes.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        bytes.extend_from_slice(&443u16.to_be_bytes());
        let (target, len) = complete(parse_request(&bytes));
        assert_eq!(target, Target::Addr("[2001:db8::7]:443".parse().unwrap()));
        assert_eq!(len, 22);
    }

    #[test]
    fn request_domain_is_validated_and_lower_cased() {
        let name = b"Echo.Default.svc.cluster.local.";
        let mut bytes = vec![5, 1, 0, 3, u8::try_from(name.len()).unwrap()];
        bytes.extend_from_slice(name);
        bytes.extend_from_slice(&80u16.to_be_bytes());
        let (target, _) = complete(parse_request(&bytes));
        assert_eq!(
            target,
            Target::Domain {
                host: "echo.default.svc.cluster.local".into(),
                port: 80
            }
        );
    }

    #[test]
    fn request_domain_that_is_an_ip_literal_is_an_address() {
        let name = b"::1";
        let mut bytes = vec![5, 1, 0, 3, 3];
        bytes.extend_from_slice(name);
        bytes.extend_from_slice(&80u16.to_be_bytes());
        let (target, _) = complete(parse_request(&bytes));
        assert_eq!(target, Target::Addr("[::1]:80".parse().unwrap()));
    }

    #[test]
    fn request_refusals_carry_their_reply_code() {
        let bind = parse_request(&[5, 2, 0, 1, 1, 2, 3, 4, 0, 80]).unwrap_err();
        assert!(matches!(bind, Socks5Error::UnsupportedCommand(2)));
        assert_eq!(bind.reply(), Some(Reply::CommandNotSupported));
        let udp = parse_request(&[5, 3]).unwrap_err();
        assert_eq!(udp.reply(), Some(Reply::CommandNotSupported));
        let atyp = parse_request(&[5, 1, 0, 9]).unwrap_err();
        assert_eq!(atyp.reply(), Some(Reply::AddressTypeNotSupported));
        for name in [&b""[..], b"a b", b"bad/host", b"a..b", b"\xff\xfe"] {
            let mut bytes = vec![5, 1, 0, 3, u8::try_from(name.len()).unwrap()];
            bytes.extend_from_slice(name);
            bytes.extend_from_slice(&80u16.to_be_bytes());
            let error = parse_request(&bytes).unwrap_err();
            assert!(matches!(error, Socks5Error::InvalidDomain), "{name:?}: {error}");
        }
        let port_zero = parse_request(&[5, 1, 0, 1, 1, 2, 3, 4, 0, 0]).unwrap_err();
        assert!(matches!(port_zero, Socks5Error::InvalidPort));
        let version = parse_request(&[4, 1, 0, 1]).unwrap_err();
        assert_eq!(version.reply(), None);
    }

    #[test]
    fn request_prefixes_are_incomplete() {
        let whole = [5, 1, 0, 3, 3, b'a', b'.', b'b', 0, 80];
        for end in 0..whole.len() {
            assert_eq!(
                parse_request(&whole[..end]).unwrap(),
                Parsed::Incomplete,
                "prefix {end}"
            );
        }
    }

    #[test]
    fn replies_encode_with_an_empty_bound_address() {
        assert_eq!(Reply::Succeeded.encode(), [5, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(Reply::NotAllowed.encode()[1], 2);
        assert_eq!(Reply::AddressTypeNotSupported.encode()[1], 8);
    }

    #[test]
    fn the_fuzz_invariants_hold_on_the_largest_messages() {
        let mut bytes = vec![5, 255];
        bytes.extend(std::iter::repeat_n(0u8, 255));
        bytes.extend_from_slice(&[5, 1, 0, 3, 255]);
        bytes.extend(std::iter::repeat_n(b'a', 255));
        bytes.extend_from_slice(&[0, 80]);
        assert_eq!(bytes.len(), MAX_HANDSHAKE_BYTES);
        fuzz_handshake(&bytes);
        for end in 0..bytes.len() {
            fuzz_handshake(&bytes[..end]);
        }
    }
}
