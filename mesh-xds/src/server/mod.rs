//! The local control plane: delta ADS and the Istio CA service over gRPC, fed from files.
//!
//! ## Layout
//! - [`ResourceSnapshot`], [`ServedResource`] and [`ResourcePublisher`]: what is served, encoded once and
//!   versioned by content.
//! - [`AdsService`]: `DeltaAggregatedResources` over a publisher, with [`AdsLimits`] and [`AdsEvent`]s, and
//!   an [`AdsAccess`] check per stream ([`LoopbackAnyToken`], [`AuthenticatedCallers`]).
//! - [`GrpcRouter`]: ADS and the CA service ([`crate::ca::CaService`]) on one endpoint.
//! - [`Server`]: all of it over TLS, fed from a [`crate::local::LocalWatcher`], as istiod serves port 15012.
//! - [`resources_from_mesh`]: workloads, services and policies encoded as istiod names them.

mod access;
mod ads;
mod control_plane;
mod resources;
mod router;

pub use access::{AdsAccess, AuthenticatedCallers, LoopbackAnyToken, StreamInfo};
pub use ads::{AdsEvent, AdsLimits, AdsService, MAX_NAME_BYTES, MAX_TYPES_PER_STREAM};
pub use control_plane::{ClientAuth, Server, ServerConfig};
pub use resources::{ResourcePublisher, ResourceSnapshot, ServedResource, TypeResources};
pub use router::GrpcRouter;

use std::sync::Arc;

use mesh_core::model::{Service, Workload};

use crate::XdsAuthorization;
use crate::proto::istio::workload as pb;

/// Encodes workloads, services and policies as istiod serves them to ztunnel: `istio.workload.Address`
/// resources named by workload uid (aliases: each `network/ip`) and by service `namespace/hostname`
/// (aliases: each `network/vip`), and `istio.security.Authorization` resources named `namespace/name`.
pub fn resources_from_mesh<'a>(
    workloads: impl IntoIterator<Item = &'a Workload>,
    services: impl IntoIterator<Item = &'a Service>,
    policies: impl IntoIterator<Item = &'a XdsAuthorization>,
) -> ResourceSnapshot {
    let mut snapshot = ResourceSnapshot::new();
    for workload in workloads {
        let aliases = workload
            .network_addrs()
            .map(|addr| Arc::from(addr.to_string()))
            .collect();
        let address = pb::Address {
            r#type: Some(pb::address::Type::Workload(crate::workload_to_proto(workload))),
        };
        snapshot.insert_message(crate::ADDRESS_TYPE_URL, workload.uid.clone(), aliases, &address);
    }
    for service in services {
        let aliases = service
            .vips
            .iter()
            .map(|vip| Arc::from(vip.to_string()))
            .collect();
        let address = pb::Address {
            r#type: Some(pb::address::Type::Service(crate::service_to_proto(service))),
        };
        snapshot.insert_message(
            crate::ADDRESS_TYPE_URL,
            service.key().to_string(),
            aliases,
            &address,
        );
    }
    for policy in policies {
        let proto = crate::authorization_to_proto(policy);
        snapshot.insert_message(crate::AUTHORIZATION_TYPE_URL, policy.key(), Vec::new(), &proto);
    }
    snapshot
}
