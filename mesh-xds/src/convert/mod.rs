//! Pure conversions between Istio's `istio.workload` protos and the [`mesh_core::model`] types, both ways.
//!
//! From proto to model, each function validates and follows Istio's reading of the fields (as Istio's
//! ztunnel does): addresses are raw 4- or 16-byte IPs; an empty `trust_domain` means `cluster.local`, an
//! empty `service_account` means `default` and an empty `cluster_id` means `Kubernetes`; `services` map
//! keys are `namespace/hostname`; a workload's identity must be a valid SPIFFE ID. Where ztunnel would
//! silently truncate or drop a value (a port above 65535, an undecodable address), these refuse the
//! resource instead, naming the field. From model to proto, nothing can fail.
//!
//! What the model has no place for is dropped on the way in, and written as its default on the way out:
//! a workload's `native_tunnel`, `extensions` and `capacity`, and a service's
//! `ip_families` and `extensions`. `LEGACY_ISTIO_MTLS` (a sidecar workload) becomes
//! [`TunnelProtocol::None`](mesh_core::model::TunnelProtocol::None): like Istio's ztunnel, meshkit does
//! not originate sidecar mutual TLS, and sends such a workload plain TCP.

mod service;
#[cfg(test)]
mod tests;
mod workload;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use bytes::Bytes;
use mesh_core::model::{self, GatewayAddress, GatewayDestination, NamespacedHostname, NetworkAddr};

use crate::XdsError;
use crate::error::{FieldProblem, Invalid};
use crate::proto::istio::workload as pb;

pub use service::{service_from_proto, service_to_proto};
pub use workload::{workload_from_proto, workload_to_proto};

/// An `istio.workload.Address` resource, converted: a workload or a service.
///
/// Each is behind an `Arc`, the form [`MeshSnapshotBuilder`](mesh_core::model::MeshSnapshotBuilder)
/// stores, so that a client can keep the resource and put it in every later snapshot without copying it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XdsAddress {
    /// The resource is a workload.
    Workload(Arc<model::Workload>),
    /// The resource is a service.
    Service(Arc<model::Service>),
}

impl XdsAddress {
    /// The xDS resource name istiod gives this address: the workload's uid, or the service's
    /// `namespace/hostname`.
    pub fn resource_name(&self) -> String {
        match self {
            XdsAddress::Workload(workload) => workload.uid.to_string(),
            XdsAddress::Service(service) => service.key().to_string(),
        }
    }
}

/// Converts an `istio.workload.Address` to the workload or service it holds.
pub fn address_from_proto(address: &pb::Address) -> Result<XdsAddress, XdsError> {
    match &address.r#type {
        Some(pb::address::Type::Workload(workload)) => {
            workload_from_proto(workload).map(|w| XdsAddress::Workload(Arc::new(w)))
        }
        Some(pb::address::Type::Service(service)) => {
            service_from_proto(service).map(|s| XdsAddress::Service(Arc::new(s)))
        }
        None => Err(XdsError::EmptyAddress),
    }
}

/// Converts a workload or service to the `istio.workload.Address` istiod would send for it.
pub fn address_to_proto(address: &XdsAddress) -> pb::Address {
    let r#type = match address {
        XdsAddress::Workload(workload) => pb::address::Type::Workload(workload_to_proto(workload)),
        XdsAddress::Service(service) => pb::address::Type::Service(service_to_proto(service)),
    };
    pb::Address { r#type: Some(r#type) }
}

/// Converts an `istio.workload.NetworkAddress` to a [`NetworkAddr`].
pub fn network_addr_from_proto(address: &pb::NetworkAddress) -> Result<NetworkAddr, XdsError> {
    network_addr(address).map_err(Invalid::standalone)
}

/// Converts a [`NetworkAddr`] to an `istio.workload.NetworkAddress`.
pub fn network_addr_to_proto(address: &NetworkAddr) -> pb::NetworkAddress {
    pb::NetworkAddress {
        network: address.network.to_string(),
        address: ip_to_bytes(address.ip),
    }
}

/// Converts an `istio.workload.GatewayAddress` (a waypoint or network gateway) to a [`GatewayAddress`].
pub fn gateway_from_proto(gateway: &pb::GatewayAddress) -> Result<GatewayAddress, XdsError> {
    gateway_address(gateway).map_err(Invalid::standalone)
}

/// Converts a [`GatewayAddress`] to an `istio.workload.GatewayAddress`.
pub fn gateway_to_proto(gateway: &GatewayAddress) -> pb::GatewayAddress {
    let destination = match &gateway.destination {
        GatewayDestination::Address(address) => {
            pb::gateway_address::Destination::Address(network_addr_to_proto(address))
        }
        GatewayDestination::Hostname(service) => {
            pb::gateway_address::Destination::Hostname(pb::NamespacedHostname {
                namespace: service.namespace.to_string(),
                hostname: service.hostname.to_string(),
            })
        }
    };
    pb::GatewayAddress {
        destination: Some(destination),
        hbone_mtls_port: u32::from(gateway.hbone_mtls_port),
    }
}

/// An IP from its raw bytes: 4 for IPv4, 16 for IPv6, as Istio encodes every address.
pub(crate) fn ip_from_bytes(bytes: &[u8], field: impl Into<String>) -> Result<IpAddr, Invalid> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        Ok(IpAddr::V4(Ipv4Addr::from(v4)))
    } else if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        Ok(IpAddr::V6(Ipv6Addr::from(v6)))
    } else {
        Err(Invalid::new(field, FieldProblem::IpBytes { len: bytes.len() }))
    }
}

/// The raw bytes of an IP, 4 or 16 of them.
pub(crate) fn ip_to_bytes(ip: IpAddr) -> Bytes {
    match ip {
        IpAddr::V4(v4) => Bytes::copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => Bytes::copy_from_slice(&v6.octets()),
    }
}

/// A port from a proto `uint32`, refusing values above 65535.
pub(crate) fn port(value: u32, field: impl Into<String>) -> Result<u16, Invalid> {
    u16::try_from(value).map_err(|_| Invalid::new(field, FieldProblem::Port { value }))
}

/// A known value of the proto enum `E`, refusing numbers this version does not define.
pub(crate) fn known_enum<E: TryFrom<i32>>(
    value: i32,
    enum_name: &'static str,
    field: impl Into<String>,
) -> Result<E, Invalid> {
    E::try_from(value).map_err(|_| Invalid::new(field, FieldProblem::UnknownEnum { enum_name, value }))
}

fn network_addr(address: &pb::NetworkAddress) -> Result<NetworkAddr, Invalid> {
    let ip = ip_from_bytes(&address.address, "address")?;
    Ok(NetworkAddr::new(address.network.as_str(), ip))
}

pub(crate) fn gateway_address(gateway: &pb::GatewayAddress) -> Result<GatewayAddress, Invalid> {
    let destination = match &gateway.destination {
        Some(pb::gateway_address::Destination::Address(address)) => {
            GatewayDestination::Address(network_addr(address).map_err(|e| e.within("address"))?)
        }
        Some(pb::gateway_address::Destination::Hostname(service)) => {
            let field = |name: &str| format!("hostname.{name}");
            if service.namespace.is_empty() {
                return Err(Invalid::new(field("namespace"), FieldProblem::Empty));
            }
            if service.hostname.is_empty() {
                return Err(Invalid::new(field("hostname"), FieldProblem::Empty));
            }
            GatewayDestination::Hostname(NamespacedHostname::new(
                service.namespace.as_str(),
                service.hostname.as_str(),
            ))
        }
        None => return Err(Invalid::new("destination", FieldProblem::Missing)),
    };
    Ok(GatewayAddress {
        destination,
        hbone_mtls_port: port(gateway.hbone_mtls_port, "hbone_mtls_port")?,
    })
}

/// An optional gateway field (`waypoint`, `network_gateway`), with errors qualified by its name.
pub(crate) fn optional_gateway(
    gateway: Option<&pb::GatewayAddress>,
    field: &str,
) -> Result<Option<GatewayAddress>, Invalid> {
    gateway
        .map(|g| gateway_address(g).map_err(|e| e.within(field)))
        .transpose()
}
