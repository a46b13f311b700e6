//! # mesh-hbone
//!
//! HBONE, the transport of Istio's ambient mode: one HTTP/2 `CONNECT` stream per proxied TCP connection,
//! inside SPIFFE mutual TLS on port 15008, wire-compatible with Istio's ztunnel.
//!
//! ## Layout
//! This crate is being built (issue "mesh-hbone"); its planned types are `HboneConnector` (a pooled
//! `tower::Service<ConnectRequest>`), `HboneAcceptor<S>`, `HboneStream`, and the `baggage` and
//! `forwarded` header codecs. The TLS configurations it uses are already available in
//! [`mesh_core::tls`].
//!
//! ## Example
//! ```
//! // The HBONE ALPN protocol, shared with mesh-core's TLS configurations.
//! assert_eq!(mesh_core::tls::ALPN_H2, b"h2");
//! ```
#![forbid(unsafe_code)]
