//! Linux socket plumbing for a transparent proxy: where a captured connection was going, marking the
//! proxy's own sockets so capture rules skip them, and connecting from a client's address.
//!
//! DESIGN.md principle 7 reserves this module for `unsafe` code. The socket options need none, because
//! [`socket2`] wraps each of them safely; the one submodule that needs it is [`allocator`] (one call to
//! glibc's `mallopt`, with its `SAFETY` comment). Everything here is Linux-only: on other systems every function
//! returns an [`io::ErrorKind::Unsupported`] error, so the crate still builds there.
//!
//! How Istio's capture uses these:
//! - `iptables -j REDIRECT` (or `DNAT`) rewrites a connection's destination to the proxy's port; the
//!   kernel's connection tracking remembers the original, which [`original_destination`] reads back.
//! - `iptables -j TPROXY` delivers the connection without rewriting it, to a listener with
//!   [`set_transparent`]; the accepted socket's local address *is* the original destination
//!   ([`tproxy_original_destination`]).
//! - The proxy's own sockets carry [`PROXY_MARK`] ([`set_mark`]), which the capture rules exempt, so
//!   its upstream connections are not captured again.
//! - [`transparent_socket`] binds to an address the host does not own (the client's), so an upstream sees
//!   the original source (ztunnel's `ENABLE_ORIG_SRC`).

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpSocket, TcpStream};

// The crate forbids `unsafe` everywhere else (DESIGN.md principle 7).
#[allow(unsafe_code)]
pub mod allocator;

/// The packet mark Istio's ztunnel puts on its own sockets (`0x539`, 1337); the capture rules installed
/// by istio-cni skip packets carrying it.
pub const PROXY_MARK: u32 = 0x539;

/// A type that owns a socket: tokio's and the standard library's sockets, listeners and streams.
#[cfg(unix)]
pub trait AsSocket: std::os::fd::AsFd {}

#[cfg(unix)]
impl<T: std::os::fd::AsFd + ?Sized> AsSocket for T {}

/// A type that owns a socket: tokio's and the standard library's sockets, listeners and streams.
#[cfg(not(unix))]
pub trait AsSocket {}

#[cfg(not(unix))]
impl<T: ?Sized> AsSocket for T {}

/// The destination a connection was addressed to before `iptables` redirected it to this proxy, from
/// the kernel's connection tracking (`SO_ORIGINAL_DST` for IPv4, `IP6T_SO_ORIGINAL_DST` for IPv6; an
/// IPv4 client on a dual-stack socket is asked for with the IPv4 option). IPv4-mapped IPv6 results are
/// returned as IPv4.
///
/// On a connection that was not redirected, Linux answers in one of two ways, and callers must handle
/// both: an error (`ENOPROTOOPT` when netfilter's connection tracking is not loaded, `ENOENT` when this
/// connection is not tracked), or, for a tracked connection that was not rewritten, the local address
/// itself. A proxy that gets its own listening address back must refuse the connection, or it would
/// connect to itself.
pub fn original_destination(stream: &TcpStream) -> io::Result<SocketAddr> {
    imp::original_destination(stream)
}

/// The original destination of a connection delivered by the `TPROXY` target: its local address, which
/// `TPROXY` leaves untouched (the listener must have [`set_transparent`] to accept it). IPv4-mapped IPv6
/// addresses are returned as IPv4.
pub fn tproxy_original_destination(stream: &TcpStream) -> io::Result<SocketAddr> {
    let local = stream.local_addr()?;
    Ok(SocketAddr::new(local.ip().to_canonical(), local.port()))
}

/// Sets `SO_MARK` on `socket`: every packet it sends carries `mark`, which routing rules and netfilter
/// can match (Istio's capture rules skip [`PROXY_MARK`]). Needs `CAP_NET_ADMIN`; set it before
/// connecting, so the handshake is marked too.
pub fn set_mark<S: AsSocket>(socket: &S, mark: u32) -> io::Result<()> {
    imp::set_mark(socket, mark)
}

/// Reads `SO_MARK` back from `socket`. Needs `CAP_NET_ADMIN`.
pub fn mark<S: AsSocket>(socket: &S) -> io::Result<u32> {
    imp::mark(socket)
}

/// Sets `IP_TRANSPARENT` (or `IPV6_TRANSPARENT` on an IPv6 socket): a listener then accepts connections
/// that `TPROXY` delivers to addresses the host does not own, and a socket may bind to such an address
/// before connecting. Needs `CAP_NET_ADMIN` (or `CAP_NET_RAW`).
pub fn set_transparent<S: AsSocket>(socket: &S) -> io::Result<()> {
    imp::set_transparent(socket)
}

/// A new TCP socket bound to `source`, which may be an address this host does not own (the client's, for
/// original-source preservation): [`set_transparent`], then `bind`. Port 0 picks an ephemeral port.
/// Connect it with [`TcpSocket::connect`]; replies only come back through this proxy if routing sends
/// them here (the TPROXY routing setup), so use it only where that holds. Needs `CAP_NET_ADMIN`.
pub fn transparent_socket(source: SocketAddr) -> io::Result<TcpSocket> {
    let socket = if source.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    set_transparent(&socket)?;
    socket.bind(source)?;
    Ok(socket)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod imp {
    use std::io;
    use std::net::SocketAddr;

    use socket2::{Domain, SockAddr, SockRef};
    use tokio::net::TcpStream;

    use super::AsSocket;

    pub(super) fn original_destination(stream: &TcpStream) -> io::Result<SocketAddr> {
        let socket = SockRef::from(stream);
        // The option to ask depends on the family of the connection, not of the socket: a dual-stack
        // IPv6 socket accepting an IPv4 client was redirected by the IPv4 rules.
        let original = if stream.local_addr()?.ip().to_canonical().is_ipv4() {
            socket.original_dst_v4()?
        } else {
            socket.original_dst_v6()?
        };
        to_socket_addr(&original)
    }

    pub(super) fn set_mark<S: AsSocket>(socket: &S, mark: u32) -> io::Result<()> {
        SockRef::from(socket).set_mark(mark)
    }

    pub(super) fn mark<S: AsSocket>(socket: &S) -> io::Result<u32> {
        SockRef::from(socket).mark()
    }

    pub(super) fn set_transparent<S: AsSocket>(socket: &S) -> io::Result<()> {
        let socket = SockRef::from(socket);
        match socket.domain()? {
            Domain::IPV4 => socket.set_ip_transparent_v4(true),
            Domain::IPV6 => socket.set_ip_transparent_v6(true),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "IP_TRANSPARENT applies to IPv4 and IPv6 sockets only",
            )),
        }
    }

    fn to_socket_addr(addr: &SockAddr) -> io::Result<SocketAddr> {
        let addr = addr.as_socket().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "the original destination is not an IP socket address",
            )
        })?;
        Ok(SocketAddr::new(addr.ip().to_canonical(), addr.port()))
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod imp {
    use std::io;
    use std::net::SocketAddr;

    use tokio::net::TcpStream;

    use super::AsSocket;

    fn unsupported(what: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::Unsupported,
            format!("{what} is only available on Linux"),
        )
    }

    pub(super) fn original_destination(_stream: &TcpStream) -> io::Result<SocketAddr> {
        Err(unsupported("SO_ORIGINAL_DST"))
    }

    pub(super) fn set_mark<S: AsSocket>(_socket: &S, _mark: u32) -> io::Result<()> {
        Err(unsupported("SO_MARK"))
    }

    pub(super) fn mark<S: AsSocket>(_socket: &S) -> io::Result<u32> {
        Err(unsupported("SO_MARK"))
    }

    pub(super) fn set_transparent<S: AsSocket>(_socket: &S) -> io::Result<()> {
        Err(unsupported("IP_TRANSPARENT"))
    }
}

#[cfg(test)]
#[cfg(any(target_os = "linux", target_os = "android"))]
mod tests {
    use super::*;

    use tokio::net::TcpListener;

    /// Explains a permission failure: these options need `CAP_NET_ADMIN`, and CI runs as root
    /// (docs/testing.md); a test must fail loudly rather than pass without checking anything.
    fn needs_root(error: &io::Error, what: &str) -> String {
        if error.kind() == io::ErrorKind::PermissionDenied {
            format!("{what} needs CAP_NET_ADMIN: run the tests as root (see docs/testing.md): {error}")
        } else {
            format!("{what} failed: {error}")
        }
    }

    async fn loopback_pair(bind: &str) -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind(bind).await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn original_destination_of_an_unredirected_connection_is_an_error_or_the_local_address() {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let (_client, server) = loopback_pair(bind).await;
            let local = server.local_addr().unwrap();
            match original_destination(&server) {
                Ok(addr) => assert_eq!(addr, local, "a tracked, unrewritten connection reports itself"),
                Err(error) => {
                    let code = error.raw_os_error();
                    assert!(
                        code == Some(ENOENT) || code == Some(ENOPROTOOPT),
                        "unexpected error for {bind}: {error:?}"
                    );
                }
            }
        }
    }

    // The two errno values Linux answers with here, spelled out so the test needs no libc dependency.
    const ENOENT: i32 = 2;
    const ENOPROTOOPT: i32 = 92;

    #[tokio::test]
    async fn tproxy_original_destination_is_the_local_address() {
        let (_client, server) = loopback_pair("127.0.0.1:0").await;
        assert_eq!(
            tproxy_original_destination(&server).unwrap(),
            server.local_addr().unwrap()
        );
    }

    #[tokio::test]
    async fn mark_is_set_and_read_back() {
        let socket = TcpSocket::new_v4().unwrap();
        if let Err(error) = set_mark(&socket, PROXY_MARK) {
            panic!("{}", needs_root(&error, "SO_MARK"));
        }
        assert_eq!(mark(&socket).unwrap(), 1337);
        // The mark stays on the connected stream, so the whole connection is exempt from capture.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = socket.connect(listener.local_addr().unwrap()).await.unwrap();
        assert_eq!(mark(&stream).unwrap(), PROXY_MARK);
    }

    #[tokio::test]
    async fn transparent_socket_binds_a_foreign_address() {
        // 198.18.0.0/15 is reserved for benchmarking: never an address of this host.
        for source in ["198.18.0.1:0", "[2001:db8::1]:0"] {
            let source: SocketAddr = source.parse().unwrap();
            let socket = match transparent_socket(source) {
                Ok(socket) => socket,
                Err(error) => panic!("{}", needs_root(&error, "IP_TRANSPARENT")),
            };
            assert_eq!(socket.local_addr().unwrap().ip(), source.ip());
        }
    }

    #[tokio::test]
    async fn without_transparent_a_foreign_address_cannot_be_bound() {
        let socket = TcpSocket::new_v4().unwrap();
        let error = socket.bind("198.18.0.1:0".parse().unwrap()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AddrNotAvailable);
    }
}
