//! # mesh-hbone
//!
//! HBONE, the transport of Istio's ambient mode: one HTTP/2 `CONNECT` stream per proxied TCP connection,
//! inside SPIFFE mutual TLS (usually on port 15008), wire-compatible with Istio's ztunnel.
//!
//! ## Layout
//! - [`HboneConnector`]: the client, a `tower::Service<ConnectRequest, Response = HboneStream>` that
//!   pools HTTP/2 connections per (source identity, expected destination identities, destination address,
//!   source address), with one handshake in flight per key and stream limits per connection. Its TCP
//!   connections come from a [`SocketFactory`] ([`MarkedSockets`] keeps a node proxy's own traffic out of
//!   capture; a request's `source_addr` binds its connection to the client's own IP).
//! - [`HboneAcceptor`]: the server; answers protocol errors itself and hands each valid CONNECT as an
//!   [`InboundTunnel`] to your `tower::Service`, which accepts it (200) or rejects it (401, 503, ...).
//!   It presents one certificate, or per connection the one a [`ServerConfigSelector`] picks from the
//!   local address ([`WorkloadConfigSelector`]: the workload at that IP, for a node proxy).
//! - [`HboneStream`]: the tunnelled bytes, `AsyncRead + AsyncWrite`, with FIN and RST kept distinct.
//! - [`headers`]: the `baggage`, `forwarded` and `traceparent` codecs.
//! - [`HboneConfig`]: the wire contract's numbers (windows, frame size, stream limits, PING, pool).
//! - `testkit` (feature `testkit`): an acceptor over an in-memory pipe, driven frame by frame by a raw
//!   HTTP/2 client inside real mutual TLS.
//!
//! The TLS configurations come from [`mesh_core::tls`], certificates from a [`mesh_core::CertProvider`].
//!
//! ## Example
//! A tunnel through a real acceptor on loopback, echoing bytes back:
//! ```
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::{convert::Infallible, sync::Arc};
//! use mesh_core::{cert::StaticCertProvider, tls};
//! use mesh_hbone::{ConnectRequest, HboneAcceptor, HboneConfig, HboneConnector, InboundTunnel};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! let pki = mesh_test::TestPki::new();
//! let server_cert = pki.cert("default", "server");
//! let server_tls = tls::server_config(server_cert, vec![pki.trust_domain().clone()])?;
//! // Echo every tunnel's bytes back.
//! let echo = tower::service_fn(|tunnel: InboundTunnel| async move {
//!     if let Ok(stream) = tunnel.accept(Default::default()) {
//!         let (mut read, mut write) = tokio::io::split(stream);
//!         let _ = tokio::io::copy(&mut read, &mut write).await;
//!         let _ = write.shutdown().await;
//!     }
//!     Ok::<(), Infallible>(())
//! });
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! let (_trigger, drain) = mesh_core::drain::channel();
//! tokio::spawn(HboneAcceptor::new(HboneConfig::default(), server_tls, echo).serve(listener, drain));
//!
//! let mut certs = StaticCertProvider::new();
//! certs.insert(pki.ca().issue(&pki.id("default", "client"), mesh_test::TEST_CERT_LIFETIME)?);
//! let connector = HboneConnector::new(HboneConfig::default(), Arc::new(certs));
//! let request = ConnectRequest::new(
//!     pki.id("default", "client"),
//!     addr,
//!     vec![pki.id("default", "server")],
//!     format!("127.0.0.1:{}", 8080),
//! );
//! let mut stream = connector.connect(request).await?;
//! stream.write_all(b"hello").await?;
//! stream.shutdown().await?;
//! let mut echoed = Vec::new();
//! stream.read_to_end(&mut echoed).await?;
//! assert_eq!(echoed, b"hello");
//! # Ok(())
//! # }
//! # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
//! ```
#![forbid(unsafe_code)]

mod client;
mod config;
mod error;
pub mod headers;
mod keepalive;
mod select;
mod server;
mod socket;
mod stream;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use client::{ConnectRequest, HboneConnector, PoolStats};
pub use config::HboneConfig;
pub use error::HboneError;
pub use select::{ServerConfigSelector, WorkloadConfigSelector};
pub use server::{HboneAcceptor, InboundTunnel, PROXY_PORTS, TunnelTarget};
pub use socket::{MarkedSockets, PlainSockets, SocketFactory};
pub use stream::HboneStream;
