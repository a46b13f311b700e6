//! # mesh-xds
//!
//! The control-plane side of meshkit, speaking Istio's ambient protocols: the workload xDS API that
//! istiod serves to ztunnels (`istio.workload.Address` and `istio.security.Authorization` over delta ADS),
//! and Istio's certificate service. Workloads and services it learns become a
//! [`mesh_core::model::MeshSnapshot`]; certificates it obtains will feed
//! [`mesh_core::CachingCertProvider`].
//!
//! ## Layout
//! - [`proto`]: the protobuf messages and gRPC stubs, generated at build time from the crate's own
//!   `proto/*.proto` files, whose packages, messages and field numbers match Istio's ztunnel:
//!   [`envoy.service.discovery.v3`](proto::envoy::service::discovery::v3) (delta ADS),
//!   [`istio.workload`](proto::istio::workload), [`istio.security`](proto::istio::security),
//!   [`istio.v1.auth`](proto::istio::v1::auth) (the CA) and [`istio.workload.zds`](proto::istio::workload::zds)
//!   (the CNI handshake). No system `protoc` is needed: `protox` compiles the files in Rust.
//! - [`convert`]: pure conversions between `istio.workload` protos and [`mesh_core::model`] types, both
//!   ways: [`workload_from_proto`], [`service_from_proto`], [`address_from_proto`] (to an [`XdsAddress`]),
//!   [`gateway_from_proto`], [`network_addr_from_proto`] and their `_to_proto` counterparts.
//! - [`authz`]: [`XdsAuthorization`], a validated Rust form of `istio.security.Authorization`, with
//!   [`authorization_from_proto`] and [`authorization_to_proto`].
//! - [`client`]: the delta ADS client ([`client::AdsClientBuilder`], typed [`client::Watch`]es, NACKs
//!   naming the refused resources (up to a size bound), reconnects with `initial_resource_versions`,
//!   on-demand lookups) and [`client::publish_snapshots`], which turns the `Address` watch into
//!   [`mesh_core::model::MeshSnapshot`]s.
//! - [`server`]: the local control plane ([`server::Server`]): the ADS service ([`server::AdsService`])
//!   and the CA service on one TLS endpoint, fed from watched YAML files.
//! - [`transport`]: gRPC over rustls for clients ([`transport::connect_lazy`], with the bearer-token
//!   [`transport::CallCredentials`]) and servers ([`transport::TlsIncoming`], whose
//!   [`transport::ConnectionInfo`] names the client's certificate identity).
//! - [`ca`]: Istio's certificate service: [`ca::IstioCaSigner`], a `CertSigner` calling istiod, and
//!   [`ca::CaService`], the local control plane's CA, which authenticates and authorizes callers as istiod
//!   does (node proxies may impersonate only the workloads on their node).
//! - [`local`]: the local control plane's configuration: Istio ztunnel's static `LOCAL_XDS_PATH` files and
//!   Kubernetes objects as `kubectl get -o yaml` prints them, converted as istiod would
//!   ([`load_path`], [`load_str`]) into a validated [`LocalConfig`], and a polling [`LocalWatcher`].
//! - [`spiffe`]: [`WorkloadApiCertProvider`], a `CertProvider` fed by a SPIFFE Workload API (a SPIRE
//!   agent's socket) instead of the Istio CA: one `FetchX509SVID` stream, each SVID checked on its own,
//!   rotation pushed into the watches, reconnects with backoff. Its messages and stubs come from
//!   `proto/workload_api.proto`, which has no package, so they sit at the root of [`proto`].
//! - [`decode_address`] and [`decode_authorization`]: bytes (an xDS resource's `Any` value) to the
//!   converted form; [`ADDRESS_TYPE_URL`] and [`AUTHORIZATION_TYPE_URL`] name the two resource types.
//! - [`XdsError`]: the crate's one error type. A conversion error names the resource and the field, so it
//!   can be sent back to the control plane as a NACK's error detail as is.
//!
//! ## Example
//! Convert a workload as istiod sends it:
//! ```
//! use mesh_xds::proto::istio::workload as pb;
//! use mesh_core::model::{NamespacedHostname, TunnelProtocol};
//!
//! let proto = pb::Workload {
//!     uid: "cluster1//v1/Pod/default/server".into(),
//!     name: "server".into(),
//!     namespace: "default".into(),
//!     service_account: "server".into(),
//!     addresses: vec![vec![198, 18, 0, 2].into()],
//!     tunnel_protocol: pb::TunnelProtocol::Hbone.into(),
//!     services: [(
//!         "default/echo.default.svc.cluster.local".to_string(),
//!         pb::PortList { ports: vec![pb::Port { service_port: 80, target_port: 8080, ..Default::default() }] },
//!     )]
//!     .into(),
//!     ..Default::default()
//! };
//! let workload = mesh_xds::workload_from_proto(&proto)?;
//! assert_eq!(workload.addresses, ["198.18.0.2".parse::<std::net::IpAddr>()?]);
//! assert_eq!(workload.protocol, TunnelProtocol::Hbone);
//! assert_eq!(workload.identity()?.as_str(), "spiffe://cluster.local/ns/default/sa/server");
//! let echo: NamespacedHostname = "default/echo.default.svc.cluster.local".parse()?;
//! assert_eq!(workload.services[&echo][&80], 8080);
//!
//! // A malformed address names the resource and the field.
//! let bad = pb::Workload { addresses: vec![vec![1, 2, 3, 4, 5].into()], ..proto };
//! assert_eq!(
//!     mesh_xds::workload_from_proto(&bad).unwrap_err().to_string(),
//!     "workload cluster1//v1/Pod/default/server: addresses[0]: 5 bytes is not an IPv4 or IPv6 address",
//! );
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

pub mod authz;
pub mod ca;
pub mod client;
pub mod convert;
mod error;
pub mod local;
pub mod server;
pub mod spiffe;
pub mod transport;

pub use authz::{XdsAuthorization, authorization_from_proto, authorization_to_proto};
pub use ca::{CaService, IstioCaConfig, IstioCaSigner};
pub use convert::{
    XdsAddress, address_from_proto, address_to_proto, gateway_from_proto, gateway_to_proto,
    network_addr_from_proto, network_addr_to_proto, service_from_proto, service_to_proto,
    workload_from_proto, workload_to_proto,
};
pub use error::{FieldProblem, TokenProblem, XdsError};
pub use local::{LocalConfig, LocalOptions, LocalWatcher, SourceLocation, load_path, load_str};
pub use spiffe::{WorkloadApiCertProvider, WorkloadApiConfig};
pub use transport::{CallCredentials, GrpcClientConfig, TlsIncoming, TokenSource, connect_lazy};

/// The protobuf messages and gRPC clients and servers, generated from `mesh-xds/proto/*.proto` by
/// `build.rs`. Modules follow the proto packages, e.g. [`proto::istio::workload::Workload`].
///
/// The messages carry their `.proto` comments as docs; enum-typed fields are `i32`, as prost generates
/// them (use the enum's `TryFrom<i32>` and `From<Enum> for i32`), and `bytes` fields are
/// [`bytes::Bytes`].
#[allow(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "generated code: its shape is prost's and tonic's, not ours"
)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/_includes.rs"));
}

/// The xDS type URL of `istio.workload.Address` resources (workloads and services).
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";

/// The xDS type URL of `istio.security.Authorization` resources (compiled authorization policies).
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";

/// Decodes an `istio.workload.Address` (e.g. the value of an xDS resource's `Any`) and converts it.
pub fn decode_address(bytes: &[u8]) -> Result<XdsAddress, XdsError> {
    let address = <proto::istio::workload::Address as prost::Message>::decode(bytes).map_err(|reason| {
        XdsError::Decode {
            message: "istio.workload.Address",
            reason,
        }
    })?;
    address_from_proto(&address)
}

/// Decodes an `istio.security.Authorization` (e.g. the value of an xDS resource's `Any`) and converts it.
pub fn decode_authorization(bytes: &[u8]) -> Result<XdsAuthorization, XdsError> {
    let policy =
        <proto::istio::security::Authorization as prost::Message>::decode(bytes).map_err(|reason| {
            XdsError::Decode {
                message: "istio.security.Authorization",
                reason,
            }
        })?;
    authorization_from_proto(&policy)
}

#[doc(hidden)]
/// Entry points for the fuzz targets in `fuzz/`: each must return normally for any input.
pub mod __fuzz {
    /// Decodes `bytes` as an `istio.workload.Address` and converts it. Whatever converts must survive a
    /// round trip: model -> proto -> model gives the same value (a failed assertion is a finding).
    pub fn convert_address(bytes: &[u8]) {
        let Ok(address) = crate::decode_address(bytes) else {
            return;
        };
        let again = crate::address_from_proto(&crate::address_to_proto(&address));
        assert_eq!(
            again.as_ref().ok(),
            Some(&address),
            "round trip changed {address:?}: {again:?}"
        );
    }

    /// Decodes `bytes` as an `istio.security.Authorization` and converts it, with the same round-trip
    /// check as [`convert_address`]; then evaluates it, as ztunnel would, for a connection with and
    /// without a peer identity (an evaluation must never panic).
    pub fn convert_authorization(bytes: &[u8]) {
        let Ok(policy) = crate::decode_authorization(bytes) else {
            return;
        };
        let again = crate::authorization_from_proto(&crate::authorization_to_proto(&policy));
        assert_eq!(
            again.as_ref().ok(),
            Some(&policy),
            "round trip changed {policy:?}: {again:?}"
        );
        let key: std::sync::Arc<str> = policy.key().into();
        let namespace = policy.namespace.clone();
        let set = mesh_policy::L4PolicySet::new([policy]);
        let listed = [key];
        let target = mesh_policy::L4Target {
            namespace: &namespace,
            authorization_policies: &listed,
        };
        let peer = mesh_core::SpiffeId::parse("spiffe://cluster.local/ns/default/sa/client").ok();
        for source in [peer.as_ref(), None] {
            let evaluation = set.evaluate(
                &target,
                &mesh_policy::authz::ConnectionAttrs {
                    source,
                    source_ip: std::net::IpAddr::from([10, 0, 0, 1]),
                    destination_ip: std::net::IpAddr::from([10, 0, 0, 2]),
                    destination_port: 8080,
                    sni: None,
                },
            );
            let _ = evaluation.to_string();
        }
    }
}
