//! [`UpstreamConnector`]: how the inbound side opens its connection to the destination workload.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use mesh_core::model::Workload;
use tokio::net::TcpStream;

/// What a connector may use besides the address: who the client is (for original-source spoofing) and
/// which workload the connection is for (for entering its pod's network namespace).
#[derive(Debug, Clone)]
pub struct UpstreamHint {
    /// The client's address as the proxy saw it (the HBONE peer, or the plaintext client).
    pub client_addr: SocketAddr,
    /// The destination workload.
    pub workload: Arc<Workload>,
}

/// The future [`UpstreamConnector::connect`] returns.
pub type ConnectFuture = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + 'static>>;

/// Opens the TCP connection from the proxy to a destination workload. Object-safe, shared as
/// `Arc<dyn UpstreamConnector>`, so a node proxy can swap in one that connects from inside the pod's
/// network namespace or binds the client's original address. The caller bounds the time it takes.
pub trait UpstreamConnector: Send + Sync + fmt::Debug {
    /// Connects to `destination` on behalf of the connection `hint` describes.
    fn connect(&self, destination: SocketAddr, hint: &UpstreamHint) -> ConnectFuture;
}

/// The default connector: a plain `TcpStream::connect` from the proxy's own network namespace and
/// address, with Nagle's algorithm off (the client's segmentation already happened upstream of us).
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpConnector;

impl UpstreamConnector for TcpConnector {
    fn connect(&self, destination: SocketAddr, _hint: &UpstreamHint) -> ConnectFuture {
        Box::pin(async move {
            let stream = TcpStream::connect(destination).await?;
            // Failing to set an option is not worth refusing the connection over.
            let _ = stream.set_nodelay(true);
            Ok(stream)
        })
    }
}
