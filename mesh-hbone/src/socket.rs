//! [`SocketFactory`]: how an [`HboneConnector`](crate::HboneConnector) opens its TCP connections.
//!
//! A node proxy must keep its own connections out of the capture rules that redirect application traffic
//! to it: Istio's ztunnel marks them (`SO_MARK` [`PROXY_MARK`], which istio-cni's rules skip), and in
//! other setups it creates them inside a pod's network namespace or bound to a client's address. The
//! connector asks a factory for each new pooled connection, so all of that stays the embedder's choice,
//! while the connector keeps its pooling, its connect timeout and its error mapping.
//!
//! Binding to the client's address ("original source") matters for a node proxy serving several
//! workloads: the destination reads the client's IP from the TCP peer address for L4 policy
//! (`ipBlocks`) and telemetry, so a connection from the node's address would let a DENY by client IP
//! fail open. A factory therefore either binds exactly the address it is given or fails; it never
//! connects from some other address instead.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};

use futures_util::future::BoxFuture;
use mesh_core::sys::{self, PROXY_MARK};
use tokio::net::{TcpSocket, TcpStream};

/// Opens the TCP connection under each new pooled HBONE connection.
///
/// Object-safe: a connector holds an `Arc<dyn SocketFactory>` (see
/// [`HboneConnector::with_socket_factory`](crate::HboneConnector::with_socket_factory)). The connector
/// bounds each call by its `connect_timeout`, reports an error as
/// [`HboneError::Connect`](crate::HboneError::Connect), sets `TCP_NODELAY` on the result, and calls the
/// factory only when it opens a connection, never for a stream on a pooled one. It always calls
/// [`SocketFactory::connect_from`], with the request's
/// [`source_addr`](crate::ConnectRequest::source_addr).
pub trait SocketFactory: Send + Sync + fmt::Debug {
    /// Connects to `addr` (the destination's HBONE address) from whatever address the system picks.
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>>;

    /// Connects to `addr` from `source` (any port) when it is `Some`, as [`SocketFactory::connect`]
    /// otherwise.
    ///
    /// The provided implementation supports only `None`: with a source address it fails with
    /// [`io::ErrorKind::Unsupported`], because a connection that cannot come from the client's address
    /// must not silently come from another one (the destination's IP-based policy would see the wrong
    /// client). Factories that can bind override it, as [`PlainSockets`] and [`MarkedSockets`] do.
    fn connect_from(
        &self,
        source: Option<IpAddr>,
        addr: SocketAddr,
    ) -> BoxFuture<'static, io::Result<TcpStream>> {
        match source {
            None => self.connect(addr),
            Some(source) => Box::pin(async move {
                Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "this socket factory cannot bind a source address (asked to connect to {addr} \
                         from {source})"
                    ),
                ))
            }),
        }
    }
}

/// The default factory: a plain `connect`, with no socket options; bound to the source address when one
/// is given (directly if the address is local, else with `IP_TRANSPARENT`).
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainSockets;

impl SocketFactory for PlainSockets {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>> {
        Box::pin(TcpStream::connect(addr))
    }

    fn connect_from(
        &self,
        source: Option<IpAddr>,
        addr: SocketAddr,
    ) -> BoxFuture<'static, io::Result<TcpStream>> {
        match source {
            None => self.connect(addr),
            Some(source) => Box::pin(async move {
                let socket = new_socket(addr)?;
                bind_source(&socket, source, addr)?;
                socket.connect(addr).await
            }),
        }
    }
}

/// Sockets carrying `SO_MARK` = `mark` from before the SYN, so that the whole connection bypasses the
/// capture rules that skip the mark (Istio's ztunnel uses [`PROXY_MARK`], which is the `Default`).
///
/// Setting a mark needs `CAP_NET_ADMIN`; without it every connect fails with `PermissionDenied`, which is
/// better than connections silently captured and looped back into the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MarkedSockets {
    /// The packet mark to set.
    pub mark: u32,
}

impl Default for MarkedSockets {
    fn default() -> Self {
        MarkedSockets { mark: PROXY_MARK }
    }
}

impl SocketFactory for MarkedSockets {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>> {
        self.connect_from(None, addr)
    }

    fn connect_from(
        &self,
        source: Option<IpAddr>,
        addr: SocketAddr,
    ) -> BoxFuture<'static, io::Result<TcpStream>> {
        let mark = self.mark;
        Box::pin(async move {
            let socket = new_socket(addr)?;
            sys::set_mark(&socket, mark).map_err(|error| {
                io::Error::new(error.kind(), format!("setting SO_MARK {mark:#x}: {error}"))
            })?;
            if let Some(source) = source {
                bind_source(&socket, source, addr)?;
            }
            socket.connect(addr).await
        })
    }
}

/// A TCP socket of `addr`'s family.
fn new_socket(addr: SocketAddr) -> io::Result<TcpSocket> {
    if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
}

/// Binds `socket` (about to connect to `destination`) to `source` on an ephemeral port: directly if the
/// address is local, else with `IP_TRANSPARENT` (a client's address behind a node proxy, which needs
/// `CAP_NET_ADMIN` and routing that brings the replies back to this host). Errors name the source; the
/// socket is never left unbound for the caller to connect anyway.
fn bind_source(socket: &TcpSocket, source: IpAddr, destination: SocketAddr) -> io::Result<()> {
    let source = source.to_canonical();
    if source.is_ipv4() != destination.is_ipv4() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cannot connect to {destination} from {source}: the addresses are of different families"),
        ));
    }
    let local = SocketAddr::new(source, 0);
    let context = |step: &str, error: io::Error| {
        io::Error::new(
            error.kind(),
            format!("binding the connection to {destination} to source {source}: {step}: {error}"),
        )
    };
    match socket.bind(local) {
        Ok(()) => Ok(()),
        // Not an address of this host: the client's own, which only a transparent socket may use.
        Err(error) if error.kind() == io::ErrorKind::AddrNotAvailable => {
            sys::set_transparent(socket).map_err(|e| context("setting IP_TRANSPARENT", e))?;
            socket
                .bind(local)
                .map_err(|e| context("bind with IP_TRANSPARENT", e))
        }
        Err(error) => Err(context("bind", error)),
    }
}
