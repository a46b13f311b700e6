//! `istio.workload.Workload` <-> [`model::Workload`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use mesh_core::model::{
    self, ApplicationTunnel, ApplicationTunnelProtocol, HealthStatus, Locality, NamespacedHostname, PortMap,
    TunnelProtocol,
};
use mesh_core::{SpiffeId, TrustDomain};

use super::{gateway_to_proto, ip_from_bytes, ip_to_bytes, known_enum, optional_gateway, port};
use crate::XdsError;
use crate::error::{FieldProblem, Invalid, truncate_for_log};
use crate::proto::istio::workload as pb;

/// Istio's default for an empty `service_account`.
const DEFAULT_SERVICE_ACCOUNT: &str = "default";
/// Istio's default for an empty `cluster_id` (ztunnel's `CLUSTER_ID` default).
const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

/// Converts an `istio.workload.Workload` to a [`model::Workload`], validating every field the model
/// keeps (see the [module docs](crate::convert) for the defaults applied and the fields dropped).
pub fn workload_from_proto(workload: &pb::Workload) -> Result<model::Workload, XdsError> {
    convert(workload).map_err(|invalid| {
        let id = if workload.uid.is_empty() {
            format!("{}/{}", workload.namespace, workload.name)
        } else {
            workload.uid.clone()
        };
        invalid.for_workload(&id)
    })
}

fn convert(w: &pb::Workload) -> Result<model::Workload, Invalid> {
    if w.uid.is_empty() {
        return Err(Invalid::new("uid", FieldProblem::Empty));
    }
    let trust_domain = if w.trust_domain.is_empty() {
        TrustDomain::default()
    } else {
        TrustDomain::new(&w.trust_domain)
            .map_err(|e| Invalid::new("trust_domain", FieldProblem::Identity(Box::new(e))))?
    };
    let service_account = if w.service_account.is_empty() {
        DEFAULT_SERVICE_ACCOUNT
    } else {
        w.service_account.as_str()
    };
    check_identity(&trust_domain, &w.namespace, service_account)?;

    let addresses = w
        .addresses
        .iter()
        .enumerate()
        .map(|(i, bytes)| ip_from_bytes(bytes, format!("addresses[{i}]")))
        .collect::<Result<_, _>>()?;
    let protocol = match known_enum(
        w.tunnel_protocol,
        "istio.workload.TunnelProtocol",
        "tunnel_protocol",
    )? {
        pb::TunnelProtocol::Hbone => TunnelProtocol::Hbone,
        // Sidecar mutual TLS is not something meshkit originates (nor does Istio's ztunnel): such a
        // workload gets plain TCP, which its sidecar accepts unless its PeerAuthentication is STRICT.
        pb::TunnelProtocol::None | pb::TunnelProtocol::LegacyIstioMtls => TunnelProtocol::None,
    };
    let status = match known_enum(w.status, "istio.workload.WorkloadStatus", "status")? {
        pb::WorkloadStatus::Healthy => HealthStatus::Healthy,
        pb::WorkloadStatus::Unhealthy => HealthStatus::Unhealthy,
    };
    // Telemetry only: like ztunnel, a workload type this version does not know reads as the default.
    let workload_type = pb::WorkloadType::try_from(w.workload_type).unwrap_or(pb::WorkloadType::Deployment);

    Ok(model::Workload {
        uid: w.uid.as_str().into(),
        name: w.name.as_str().into(),
        namespace: w.namespace.as_str().into(),
        service_account: service_account.into(),
        trust_domain,
        addresses,
        network: w.network.as_str().into(),
        node: w.node.as_str().into(),
        hostname: w.hostname.as_str().into(),
        protocol,
        waypoint: optional_gateway(w.waypoint.as_ref(), "waypoint")?,
        network_gateway: optional_gateway(w.network_gateway.as_ref(), "network_gateway")?,
        canonical_name: w.canonical_name.as_str().into(),
        canonical_revision: w.canonical_revision.as_str().into(),
        workload_type: workload_type.as_str_name().to_ascii_lowercase().into(),
        workload_name: w.workload_name.as_str().into(),
        cluster_id: if w.cluster_id.is_empty() {
            DEFAULT_CLUSTER_ID.into()
        } else {
            w.cluster_id.as_str().into()
        },
        locality: w.locality.as_ref().map(|l| Locality {
            region: l.region.as_str().into(),
            zone: l.zone.as_str().into(),
            subzone: l.subzone.as_str().into(),
        }),
        status,
        services: services(&w.services)?,
        authorization_policies: w
            .authorization_policies
            .iter()
            .map(|p| Arc::from(p.as_str()))
            .collect(),
        application_tunnel: w
            .application_tunnel
            .as_ref()
            .map(application_tunnel)
            .transpose()?,
        network_mode: match w.network_mode() {
            pb::NetworkMode::HostNetwork => model::NetworkMode::HostNetwork,
            pb::NetworkMode::Standard => model::NetworkMode::Standard,
        },
    })
}

/// Refuses a workload whose Istio identity `spiffe://td/ns/<namespace>/sa/<service account>` is not a
/// valid SPIFFE ID, naming whichever of the two parts is at fault.
fn check_identity(trust_domain: &TrustDomain, namespace: &str, service_account: &str) -> Result<(), Invalid> {
    match SpiffeId::istio(trust_domain, namespace, service_account) {
        Ok(_) => Ok(()),
        Err(e) => {
            let namespace_ok = SpiffeId::istio(trust_domain, namespace, DEFAULT_SERVICE_ACCOUNT).is_ok();
            let field = if namespace_ok {
                "service_account"
            } else {
                "namespace"
            };
            Err(Invalid::new(field, FieldProblem::Identity(Box::new(e))))
        }
    }
}

/// The `services` map, in key order so that the first error reported does not depend on hash order.
fn services(
    services: &HashMap<String, pb::PortList>,
) -> Result<BTreeMap<NamespacedHostname, PortMap>, Invalid> {
    let mut keys: Vec<&String> = services.keys().collect();
    keys.sort_unstable();
    let mut out = BTreeMap::new();
    for key in keys {
        let field = || format!("services[{:?}]", truncate_for_log(key));
        let service: NamespacedHostname = key
            .parse()
            .map_err(|e| Invalid::new(field(), FieldProblem::ServiceKey(Box::new(e))))?;
        let ports = port_map(&services[key]).map_err(|e| e.within(field()))?;
        out.insert(service, ports);
    }
    Ok(out)
}

fn port_map(list: &pb::PortList) -> Result<PortMap, Invalid> {
    let mut map = PortMap::new();
    for (i, p) in list.ports.iter().enumerate() {
        let at = |name: &str| format!("ports[{i}].{name}");
        let service_port = port(p.service_port, at("service_port"))?;
        let target_port = port(p.target_port, at("target_port"))?;
        if map.insert(service_port, target_port).is_some() {
            return Err(Invalid::new(
                at("service_port"),
                FieldProblem::DuplicatePort { port: service_port },
            ));
        }
    }
    Ok(map)
}

fn application_tunnel(tunnel: &pb::ApplicationTunnel) -> Result<ApplicationTunnel, Invalid> {
    let protocol = match known_enum(
        tunnel.protocol,
        "istio.workload.ApplicationTunnel.Protocol",
        "application_tunnel.protocol",
    )? {
        pb::application_tunnel::Protocol::None => ApplicationTunnelProtocol::None,
        pb::application_tunnel::Protocol::Proxy => ApplicationTunnelProtocol::Proxy,
    };
    let port = match tunnel.port {
        0 => None,
        value => Some(port(value, "application_tunnel.port")?),
    };
    Ok(ApplicationTunnel { protocol, port })
}

/// Converts a [`model::Workload`] to the `istio.workload.Workload` istiod would send for it.
///
/// The trust domain and service account are always written out, even when they are Istio's defaults.
/// A `workload_type` other than `deployment`, `cronjob`, `pod` or `job` (in any case) is written as
/// `DEPLOYMENT`, the proto's default; fields the model does not keep are left at their defaults.
pub fn workload_to_proto(w: &model::Workload) -> pb::Workload {
    let workload_type = pb::WorkloadType::from_str_name(&w.workload_type.to_ascii_uppercase())
        .unwrap_or(pb::WorkloadType::Deployment);
    pb::Workload {
        uid: w.uid.to_string(),
        name: w.name.to_string(),
        namespace: w.namespace.to_string(),
        addresses: w.addresses.iter().map(|&ip| ip_to_bytes(ip)).collect(),
        hostname: w.hostname.to_string(),
        network: w.network.to_string(),
        tunnel_protocol: match w.protocol {
            TunnelProtocol::None => pb::TunnelProtocol::None,
            TunnelProtocol::Hbone => pb::TunnelProtocol::Hbone,
        }
        .into(),
        trust_domain: w.trust_domain.to_string(),
        service_account: w.service_account.to_string(),
        waypoint: w.waypoint.as_ref().map(gateway_to_proto),
        network_gateway: w.network_gateway.as_ref().map(gateway_to_proto),
        node: w.node.to_string(),
        canonical_name: w.canonical_name.to_string(),
        canonical_revision: w.canonical_revision.to_string(),
        workload_type: workload_type.into(),
        workload_name: w.workload_name.to_string(),
        native_tunnel: false,
        authorization_policies: w.authorization_policies.iter().map(ToString::to_string).collect(),
        status: match w.status {
            HealthStatus::Healthy => pb::WorkloadStatus::Healthy,
            HealthStatus::Unhealthy => pb::WorkloadStatus::Unhealthy,
        }
        .into(),
        cluster_id: w.cluster_id.to_string(),
        services: w
            .services
            .iter()
            .map(|(service, ports)| (service.to_string(), port_list(ports)))
            .collect(),
        application_tunnel: w.application_tunnel.map(|tunnel| pb::ApplicationTunnel {
            protocol: match tunnel.protocol {
                ApplicationTunnelProtocol::None => pb::application_tunnel::Protocol::None,
                ApplicationTunnelProtocol::Proxy => pb::application_tunnel::Protocol::Proxy,
            }
            .into(),
            port: tunnel.port.map_or(0, u32::from),
        }),
        locality: w.locality.as_ref().map(|l| pb::Locality {
            region: l.region.to_string(),
            zone: l.zone.to_string(),
            subzone: l.subzone.to_string(),
        }),
        network_mode: match w.network_mode {
            model::NetworkMode::HostNetwork => pb::NetworkMode::HostNetwork,
            model::NetworkMode::Standard => pb::NetworkMode::Standard,
        }
        .into(),
        extensions: Vec::new(),
        capacity: None,
    }
}

fn port_list(ports: &PortMap) -> pb::PortList {
    pb::PortList {
        ports: ports
            .iter()
            .map(|(&service_port, &target_port)| pb::Port {
                service_port: u32::from(service_port),
                target_port: u32::from(target_port),
                app_protocol: pb::AppProtocol::Unknown.into(),
            })
            .collect(),
    }
}
