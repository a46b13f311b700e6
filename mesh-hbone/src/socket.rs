//! [`SocketFactory`]: how an [`HboneConnector`](crate::HboneConnector) opens its TCP connections.
//!
//! A node proxy must keep its own connections out of the capture rules that redirect application traffic
//! to it: Istio's ztunnel marks them (`SO_MARK` [`PROXY_MARK`], which istio-cni's rules skip), and in
//! other setups it creates them inside a pod's network namespace or bound to a client's address. The
//! connector asks a factory for each new pooled connection, so all of that stays the embedder's choice,
//! while the connector keeps its pooling, its connect timeout and its error mapping.

use std::fmt;
use std::io;
use std::net::SocketAddr;

use futures_util::future::BoxFuture;
use mesh_core::sys::{self, PROXY_MARK};
use tokio::net::{TcpSocket, TcpStream};

/// Opens the TCP connection under each new pooled HBONE connection.
///
/// Object-safe: a connector holds an `Arc<dyn SocketFactory>` (see
/// [`HboneConnector::with_socket_factory`](crate::HboneConnector::with_socket_factory)). The connector
/// bounds each call by its `connect_timeout`, reports an error as
/// [`HboneError::Connect`](crate::HboneError::Connect), sets `TCP_NODELAY` on the result, and calls the
/// factory only when it opens a connection, never for a stream on a pooled one.
pub trait SocketFactory: Send + Sync + fmt::Debug {
    /// Connects to `addr` (the destination's HBONE address).
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>>;
}

/// The default factory: a plain `connect`, with no socket options.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainSockets;

impl SocketFactory for PlainSockets {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>> {
        Box::pin(TcpStream::connect(addr))
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
        let mark = self.mark;
        Box::pin(async move {
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            sys::set_mark(&socket, mark).map_err(|error| {
                io::Error::new(error.kind(), format!("setting SO_MARK {mark:#x}: {error}"))
            })?;
            socket.connect(addr).await
        })
    }
}
