//! `istio.workload.Service` <-> [`model::Service`].

use mesh_core::SpiffeId;
use mesh_core::model::{
    self, AppProtocol, HealthPolicy, LoadBalancing, LoadBalancingMode, LocalityScope, ServicePort,
};

use super::{gateway_to_proto, known_enum, network_addr, network_addr_to_proto, optional_gateway, port};
use crate::XdsError;
use crate::error::{FieldProblem, Invalid};
use crate::proto::istio::workload as pb;

/// Converts an `istio.workload.Service` to a [`model::Service`].
///
/// Subject alternative names that are not SPIFFE URIs (a `ServiceEntry` may list DNS names) are skipped:
/// meshkit checks peers by their SPIFFE URI SAN only, so such a name could never match, and skipping it
/// narrows what is accepted rather than widening it. A SAN that starts with `spiffe://` but is not a valid
/// SPIFFE ID is refused. An undeclared or unknown application protocol reads as none.
pub fn service_from_proto(service: &pb::Service) -> Result<model::Service, XdsError> {
    convert(service)
        .map_err(|invalid| invalid.for_service(&format!("{}/{}", service.namespace, service.hostname)))
}

fn convert(s: &pb::Service) -> Result<model::Service, Invalid> {
    if s.hostname.is_empty() {
        return Err(Invalid::new("hostname", FieldProblem::Empty));
    }
    let vips = s
        .addresses
        .iter()
        .enumerate()
        .map(|(i, address)| network_addr(address).map_err(|e| e.within(format!("addresses[{i}]"))))
        .collect::<Result<_, _>>()?;
    let mut ports: Vec<ServicePort> = Vec::with_capacity(s.ports.len());
    for (i, p) in s.ports.iter().enumerate() {
        let at = |name: &str| format!("ports[{i}].{name}");
        let service_port = port(p.service_port, at("service_port"))?;
        if ports.iter().any(|existing| existing.port == service_port) {
            return Err(Invalid::new(
                at("service_port"),
                FieldProblem::DuplicatePort { port: service_port },
            ));
        }
        ports.push(ServicePort {
            port: service_port,
            target_port: port(p.target_port, at("target_port"))?,
            app_protocol: app_protocol(p.app_protocol),
        });
    }
    let mut subject_alt_names = Vec::with_capacity(s.subject_alt_names.len());
    for (i, san) in s.subject_alt_names.iter().enumerate() {
        if !san.starts_with("spiffe://") {
            continue;
        }
        let id = SpiffeId::parse(san).map_err(|e| {
            Invalid::new(
                format!("subject_alt_names[{i}]"),
                FieldProblem::Identity(Box::new(e)),
            )
        })?;
        subject_alt_names.push(id);
    }
    Ok(model::Service {
        name: s.name.as_str().into(),
        namespace: s.namespace.as_str().into(),
        hostname: s.hostname.as_str().into(),
        vips,
        ports,
        subject_alt_names,
        waypoint: optional_gateway(s.waypoint.as_ref(), "waypoint")?,
        load_balancing: s
            .load_balancing
            .as_ref()
            .map(|lb| load_balancing(lb).map_err(|e| e.within("load_balancing")))
            .transpose()?,
    })
}

fn app_protocol(value: i32) -> Option<AppProtocol> {
    // A newer control plane may declare a protocol this version does not know: the port is then
    // treated as opaque TCP, which is what an undeclared protocol means anyway.
    match pb::AppProtocol::try_from(value).ok()? {
        pb::AppProtocol::Unknown => None,
        pb::AppProtocol::Http11 => Some(AppProtocol::Http11),
        pb::AppProtocol::Http2 => Some(AppProtocol::Http2),
        pb::AppProtocol::Grpc => Some(AppProtocol::Grpc),
    }
}

fn load_balancing(lb: &pb::LoadBalancing) -> Result<LoadBalancing, Invalid> {
    use pb::load_balancing::{HealthPolicy as PbHealth, Mode as PbMode, Scope as PbScope};
    let routing_preference = lb
        .routing_preference
        .iter()
        .enumerate()
        .map(|(i, &scope)| {
            let field = format!("routing_preference[{i}]");
            Ok(
                match known_enum(scope, "istio.workload.LoadBalancing.Scope", field.clone())? {
                    PbScope::UnspecifiedScope => {
                        return Err(Invalid::new(field, FieldProblem::UnspecifiedScope));
                    }
                    PbScope::Region => LocalityScope::Region,
                    PbScope::Zone => LocalityScope::Zone,
                    PbScope::Subzone => LocalityScope::Subzone,
                    PbScope::Node => LocalityScope::Node,
                    PbScope::Cluster => LocalityScope::Cluster,
                    PbScope::Network => LocalityScope::Network,
                },
            )
        })
        .collect::<Result<_, _>>()?;
    let mode = match known_enum(lb.mode, "istio.workload.LoadBalancing.Mode", "mode")? {
        PbMode::UnspecifiedMode => LoadBalancingMode::Unspecified,
        PbMode::Strict => LoadBalancingMode::Strict,
        PbMode::Failover => LoadBalancingMode::Failover,
        PbMode::Passthrough => LoadBalancingMode::Passthrough,
    };
    let health_policy = match known_enum(
        lb.health_policy,
        "istio.workload.LoadBalancing.HealthPolicy",
        "health_policy",
    )? {
        PbHealth::OnlyHealthy => HealthPolicy::OnlyHealthy,
        PbHealth::AllowAll => HealthPolicy::AllowAll,
    };
    Ok(LoadBalancing {
        routing_preference,
        mode,
        health_policy,
    })
}

/// Converts a [`model::Service`] to the `istio.workload.Service` istiod would send for it. Fields the
/// model does not keep are left at their defaults.
pub fn service_to_proto(s: &model::Service) -> pb::Service {
    pb::Service {
        name: s.name.to_string(),
        namespace: s.namespace.to_string(),
        hostname: s.hostname.to_string(),
        addresses: s.vips.iter().map(network_addr_to_proto).collect(),
        ports: s
            .ports
            .iter()
            .map(|p| pb::Port {
                service_port: u32::from(p.port),
                target_port: u32::from(p.target_port),
                app_protocol: match p.app_protocol {
                    None => pb::AppProtocol::Unknown,
                    Some(AppProtocol::Http11) => pb::AppProtocol::Http11,
                    Some(AppProtocol::Http2) => pb::AppProtocol::Http2,
                    Some(AppProtocol::Grpc) => pb::AppProtocol::Grpc,
                }
                .into(),
            })
            .collect(),
        subject_alt_names: s.subject_alt_names.iter().map(ToString::to_string).collect(),
        waypoint: s.waypoint.as_ref().map(gateway_to_proto),
        load_balancing: s.load_balancing.as_ref().map(load_balancing_to_proto),
        ip_families: pb::IpFamilies::Automatic.into(),
        extensions: Vec::new(),
    }
}

fn load_balancing_to_proto(lb: &LoadBalancing) -> pb::LoadBalancing {
    use pb::load_balancing::{HealthPolicy as PbHealth, Mode as PbMode, Scope as PbScope};
    pb::LoadBalancing {
        routing_preference: lb
            .routing_preference
            .iter()
            .map(|scope| {
                match scope {
                    LocalityScope::Region => PbScope::Region,
                    LocalityScope::Zone => PbScope::Zone,
                    LocalityScope::Subzone => PbScope::Subzone,
                    LocalityScope::Node => PbScope::Node,
                    LocalityScope::Cluster => PbScope::Cluster,
                    LocalityScope::Network => PbScope::Network,
                }
                .into()
            })
            .collect(),
        mode: match lb.mode {
            LoadBalancingMode::Unspecified => PbMode::UnspecifiedMode,
            LoadBalancingMode::Strict => PbMode::Strict,
            LoadBalancingMode::Failover => PbMode::Failover,
            LoadBalancingMode::Passthrough => PbMode::Passthrough,
        }
        .into(),
        health_policy: match lb.health_policy {
            HealthPolicy::OnlyHealthy => PbHealth::OnlyHealthy,
            HealthPolicy::AllowAll => PbHealth::AllowAll,
        }
        .into(),
    }
}
