//! Pods, Services and ServiceEntries to workloads and services, as istiod's ambient controller builds them
//! (`workloads.go`, `services.go`, `waypoints.go`, `helpers.go`).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use mesh_core::model::{
    self, GatewayAddress, HealthStatus, LoadBalancing, LoadBalancingMode, Locality, LocalityScope,
    NamespacedHostname, NetworkAddr, PortMap, ServicePort, TunnelProtocol,
};

use super::policy::Policies;
use super::{Gateway, IntOrString, KubeService, Meta, Objects, Pod, ServiceEntry, WorkloadEntry};
use crate::XdsError;
use crate::local::ztunnel::{check_identity, subject_alt_names};
use crate::local::{LocalOptions, Located, Origin};

const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
const REDIRECTION: &str = "ambient.istio.io/redirection";
const TUNNEL: &str = "networking.istio.io/tunnel";
const USE_WAYPOINT: &str = "istio.io/use-waypoint";
const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
const GATEWAY_NAME: &str = "gateway.networking.k8s.io/gateway-name";
const GATEWAY_MANAGED: &str = "gateway.istio.io/managed";
const MESH_CONTROLLER: &str = "istio.io-mesh-controller";
const NETWORK: &str = "topology.istio.io/network";

/// A converted service, with what workloads need to map their ports to it.
struct ServiceInfo<'a> {
    namespace: &'a str,
    /// Selects workloads when non-empty (a Service's selector, a ServiceEntry's `workloadSelector`).
    selector: &'a BTreeMap<String, String>,
    key: NamespacedHostname,
    ports: Vec<PortInfo<'a>>,
}

struct PortInfo<'a> {
    service_port: u16,
    /// The number, or `0` for a named target port.
    target_port: u16,
    /// A Service's named target port, looked up in each pod's container ports.
    target_port_name: Option<&'a str>,
    /// A ServiceEntry port's name, looked up in each endpoint's `ports`.
    port_name: &'a str,
}

/// The objects indexed for the conversion.
pub(crate) struct Context<'a> {
    objects: &'a Objects,
    options: &'a LocalOptions,
    policies: &'a Policies,
    namespaces: HashMap<&'a str, &'a Meta>,
    nodes: HashMap<&'a str, &'a Meta>,
    gateways: HashMap<(&'a str, &'a str), &'a Gateway>,
}

impl<'a> Context<'a> {
    pub(crate) fn new(
        objects: &'a Objects,
        options: &'a LocalOptions,
        policies: &'a Policies,
    ) -> Result<Self, XdsError> {
        let mut namespaces = HashMap::new();
        for (origin, ns) in &objects.namespaces {
            if namespaces
                .insert(ns.metadata.name.as_str(), &ns.metadata)
                .is_some()
            {
                return Err(origin.error("metadata.name", "the Namespace is defined twice"));
            }
        }
        let nodes = objects
            .nodes
            .iter()
            .map(|(_, node)| (node.metadata.name.as_str(), &node.metadata))
            .collect();
        let gateways = objects
            .gateways
            .iter()
            .map(|(_, g)| ((g.metadata.namespace.as_str(), g.metadata.name.as_str()), g))
            .collect();
        Ok(Context {
            objects,
            options,
            policies,
            namespaces,
            nodes,
            gateways,
        })
    }

    /// Services first (Services, then ServiceEntries' hosts), then workloads (Pods, then ServiceEntry
    /// endpoints).
    pub(crate) fn convert(&self, out: &mut Located) -> Result<(), XdsError> {
        let mut infos = Vec::new();
        for (origin, service) in &self.objects.services {
            let (converted, info) = self.service(service, origin)?;
            out.services.push((converted, origin.clone()));
            infos.push(info);
        }
        let mut entry_services = Vec::with_capacity(self.objects.service_entries.len());
        for (origin, entry) in &self.objects.service_entries {
            let converted = self.service_entry_services(entry, origin)?;
            for (service, _) in &converted {
                out.services.push((service.clone(), origin.clone()));
            }
            entry_services.push(converted.into_iter().map(|(_, info)| info).collect::<Vec<_>>());
        }
        for (origin, pod) in &self.objects.pods {
            let all = infos.iter().chain(entry_services.iter().flatten());
            if let Some(workload) = self.pod(pod, origin, all)? {
                out.workloads.push((workload, origin.clone()));
            }
        }
        for ((origin, entry), services) in self.objects.service_entries.iter().zip(&entry_services) {
            for workload in self.service_entry_workloads(entry, origin, services)? {
                out.workloads.push((workload, origin.clone()));
            }
        }
        Ok(())
    }

    fn namespace_labels(&self, namespace: &str) -> Option<&'a BTreeMap<String, String>> {
        self.namespaces.get(namespace).map(|meta| &meta.labels)
    }

    /// A label of the object, else of its namespace.
    fn inherited(&self, labels: &BTreeMap<String, String>, namespace: &str, key: &str) -> Option<String> {
        labels
            .get(key)
            .or_else(|| self.namespace_labels(namespace).and_then(|l| l.get(key)))
            .cloned()
    }

    fn network(&self, labels: &BTreeMap<String, String>, namespace: &str) -> Arc<str> {
        self.inherited(labels, namespace, NETWORK)
            .unwrap_or_else(|| self.options.default_network.clone())
            .into()
    }

    /// istiod's `fetchWaypointForTarget`, then the traffic-type check (see the module docs of
    /// [`crate::local`] for what stands in for the Gateway when it is not loaded).
    fn waypoint(
        &self,
        labels: &BTreeMap<String, String>,
        namespace: &str,
        for_service: bool,
    ) -> Option<GatewayAddress> {
        let use_waypoint = |labels: &BTreeMap<String, String>| {
            labels.get(USE_WAYPOINT).map(|name| {
                let ns = labels
                    .get(USE_WAYPOINT_NAMESPACE)
                    .map_or(namespace, String::as_str);
                (name.clone(), ns.to_owned())
            })
        };
        let (name, waypoint_namespace) = match use_waypoint(labels) {
            Some((name, _)) if name == "none" => return None,
            Some(found) => found,
            None => match self.namespace_labels(namespace).and_then(use_waypoint) {
                Some((name, _)) if name == "none" => return None,
                Some(found) => found,
                None => return None,
            },
        };
        let traffic = self
            .gateways
            .get(&(waypoint_namespace.as_str(), name.as_str()))
            .and_then(|g| g.metadata.labels.get(WAYPOINT_FOR))
            .map_or("service", String::as_str);
        let wanted = if for_service { "service" } else { "workload" };
        if traffic != wanted && traffic != "all" {
            return None;
        }
        let hostname = format!("{name}.{waypoint_namespace}.svc.{}", self.options.cluster_domain);
        Some(GatewayAddress::hostname(NamespacedHostname::new(
            waypoint_namespace.as_str(),
            hostname,
        )))
    }

    fn service(
        &self,
        s: &'a KubeService,
        origin: &Origin,
    ) -> Result<(model::Service, ServiceInfo<'a>), XdsError> {
        let meta = &s.metadata;
        if meta.name.is_empty() {
            return Err(origin.error("metadata.name", "must not be empty"));
        }
        let ips = if s.spec.cluster_ips.is_empty() {
            s.spec.cluster_ip.iter().copied().collect()
        } else {
            s.spec.cluster_ips.clone()
        };
        let vips = ips
            .iter()
            .filter_map(|ip| ip.0)
            .map(|ip| NetworkAddr::new(self.options.default_network.as_str(), ip))
            .collect();
        let mut ports = Vec::with_capacity(s.spec.ports.len());
        let mut infos = Vec::with_capacity(s.spec.ports.len());
        for p in &s.spec.ports {
            let (target_port, target_port_name) = match &p.target_port {
                None => (p.port, None),
                Some(IntOrString::Int(n)) => (*n, None),
                Some(IntOrString::String(name)) => (0, Some(name.as_str())),
            };
            ports.push(ServicePort::new(p.port, target_port));
            infos.push(PortInfo {
                service_port: p.port,
                target_port,
                target_port_name,
                port_name: &p.name,
            });
        }
        let is_waypoint = meta
            .labels
            .get(GATEWAY_MANAGED)
            .is_some_and(|v| v == MESH_CONTROLLER);
        let failover = || LoadBalancing {
            routing_preference: vec![
                LocalityScope::Network,
                LocalityScope::Region,
                LocalityScope::Zone,
                LocalityScope::Subzone,
            ],
            mode: LoadBalancingMode::Failover,
            ..LoadBalancing::default()
        };
        let mut load_balancing = None;
        if s.spec.traffic_distribution.as_deref() == Some("PreferClose") || is_waypoint {
            load_balancing = Some(failover());
        }
        if s.spec.internal_traffic_policy.as_deref() == Some("Local") {
            load_balancing = Some(LoadBalancing {
                routing_preference: vec![LocalityScope::Node],
                mode: LoadBalancingMode::Strict,
                ..LoadBalancing::default()
            });
        }
        let hostname = format!(
            "{}.{}.svc.{}",
            meta.name, meta.namespace, self.options.cluster_domain
        );
        let service = model::Service {
            vips,
            ports,
            waypoint: if is_waypoint {
                None
            } else {
                self.waypoint(&meta.labels, &meta.namespace, true)
            },
            load_balancing,
            ..model::Service::new(meta.name.as_str(), meta.namespace.as_str(), hostname)
        };
        let info = ServiceInfo {
            namespace: &meta.namespace,
            selector: &s.spec.selector,
            key: service.key(),
            ports: infos,
        };
        Ok((service, info))
    }

    fn service_entry_services(
        &self,
        entry: &'a ServiceEntry,
        origin: &Origin,
    ) -> Result<Vec<(model::Service, ServiceInfo<'a>)>, XdsError> {
        let meta = &entry.metadata;
        if meta.name.is_empty() {
            return Err(origin.error("metadata.name", "must not be empty"));
        }
        let mut vips = Vec::with_capacity(entry.spec.addresses.len());
        for (i, address) in entry.spec.addresses.iter().enumerate() {
            let ip = single_address(address).ok_or_else(|| {
                origin.error(
                    format!("spec.addresses[{i}]"),
                    format!("{address:?} is not an IP address or a single-address CIDR"),
                )
            })?;
            vips.push(NetworkAddr::new(self.options.default_network.as_str(), ip));
        }
        let ports: Vec<ServicePort> = entry
            .spec
            .ports
            .iter()
            .map(|p| ServicePort::new(p.number, p.target_port.filter(|&t| t != 0).unwrap_or(p.number)))
            .collect();
        let subject_alt_names =
            subject_alt_names(&entry.spec.subject_alt_names, origin, "spec.subjectAltNames")?;
        let waypoint = self.waypoint(&meta.labels, &meta.namespace, true);
        let selector = entry.spec.workload_selector.as_ref().map(|s| &s.labels);
        Ok(entry
            .spec
            .hosts
            .iter()
            .enumerate()
            .map(|(h, host)| {
                let service = model::Service {
                    // A VIP names one service: with several hosts, the first one has the addresses
                    // (ztunnel would keep whichever host it saw last; all of them have the same
                    // endpoints).
                    vips: if h == 0 { vips.clone() } else { Vec::new() },
                    ports: ports.clone(),
                    subject_alt_names: subject_alt_names.clone(),
                    waypoint: waypoint.clone(),
                    ..model::Service::new(meta.name.as_str(), meta.namespace.as_str(), host.as_str())
                };
                let info = ServiceInfo {
                    namespace: &meta.namespace,
                    selector: selector.unwrap_or(&EMPTY),
                    key: service.key(),
                    ports: entry
                        .spec
                        .ports
                        .iter()
                        .zip(&ports)
                        .map(|(p, converted)| PortInfo {
                            service_port: p.number,
                            target_port: converted.target_port,
                            target_port_name: None,
                            port_name: &p.name,
                        })
                        .collect(),
                };
                (service, info)
            })
            .collect())
    }

    fn pod<'s>(
        &self,
        pod: &Pod,
        origin: &Origin,
        services: impl Iterator<Item = &'s ServiceInfo<'s>>,
    ) -> Result<Option<model::Workload>, XdsError> {
        let meta = &pod.metadata;
        let running = matches!(pod.status.phase.as_str(), "Running" | "Pending");
        if !running || pod.spec.host_network {
            tracing::debug!(pod = %format!("{}/{}", meta.namespace, meta.name), phase = %pod.status.phase,
                host_network = pod.spec.host_network, "pod is not a workload (as in istiod)");
            return Ok(None);
        }
        let addresses: Vec<IpAddr> = if pod.status.pod_ips.is_empty() {
            pod.status.pod_ip.into_iter().collect()
        } else {
            pod.status.pod_ips.iter().map(|p| p.ip).collect()
        };
        if addresses.is_empty() {
            tracing::debug!(pod = %format!("{}/{}", meta.namespace, meta.name), "pod has no IP yet");
            return Ok(None);
        }
        if meta.name.is_empty() {
            return Err(origin.error("metadata.name", "must not be empty"));
        }
        let service_account = [&pod.spec.service_account_name, &pod.spec.service_account]
            .into_iter()
            .find(|sa| !sa.is_empty())
            .map_or("default", String::as_str);
        check_identity(
            &self.options.trust_domain,
            &meta.namespace,
            service_account,
            origin,
            ("metadata.namespace", "spec.serviceAccountName"),
        )?;

        let mut service_ports = BTreeMap::new();
        for service in services {
            if service.namespace != meta.namespace
                || service.selector.is_empty()
                || !subset(service.selector, &meta.labels)
            {
                continue;
            }
            let mut ports = PortMap::new();
            for port in &service.ports {
                let target = match port.target_port_name {
                    Some(name) => match container_port(pod, name) {
                        Some(number) => number,
                        // The pod does not declare the named port: it does not serve this one.
                        None => continue,
                    },
                    None => port.target_port,
                };
                ports.insert(port.service_port, target);
            }
            service_ports.insert(service.key.clone(), ports);
        }

        let is_waypoint_instance = meta.labels.contains_key(GATEWAY_NAME);
        let (workload_name, workload_type) = workload_name_and_type(pod);
        let (canonical_name, canonical_revision) = canonical(&meta.labels, &workload_name);
        let ready = pod
            .status
            .conditions
            .iter()
            .any(|c| c.kind == "Ready" && c.status == "True");
        Ok(Some(model::Workload {
            uid: format!(
                "{}//Pod/{}/{}",
                self.options.cluster_id, meta.namespace, meta.name
            )
            .into(),
            name: meta.name.as_str().into(),
            namespace: meta.namespace.as_str().into(),
            service_account: service_account.into(),
            trust_domain: self.options.trust_domain.clone(),
            addresses,
            network: self.network(&meta.labels, &meta.namespace),
            node: pod.spec.node_name.as_str().into(),
            protocol: self.pod_protocol(meta),
            waypoint: if is_waypoint_instance {
                None
            } else {
                self.waypoint(&meta.labels, &meta.namespace, false)
            },
            canonical_name: canonical_name.into(),
            canonical_revision: canonical_revision.into(),
            workload_type: workload_type.into(),
            workload_name: workload_name.into(),
            cluster_id: self.options.cluster_id.as_str().into(),
            locality: self.node_locality(&pod.spec.node_name),
            status: if ready {
                HealthStatus::Healthy
            } else {
                HealthStatus::Unhealthy
            },
            services: service_ports,
            authorization_policies: self
                .policies
                .for_workload(&meta.namespace, &meta.labels, &meta.labels),
            ..model::Workload::new("", "", "")
        }))
    }

    /// HBONE when the CNI marked the pod, or when it is enrolled by label (what the CNI would act on);
    /// also istiod's native-tunnel label.
    fn pod_protocol(&self, meta: &Meta) -> TunnelProtocol {
        let enrolled = match meta.annotations.get(REDIRECTION) {
            Some(value) => value == "enabled",
            None => match meta.labels.get(DATAPLANE_MODE).map(String::as_str) {
                Some("ambient") => true,
                Some("none") => false,
                _ => self
                    .namespace_labels(&meta.namespace)
                    .and_then(|l| l.get(DATAPLANE_MODE))
                    .is_some_and(|mode| mode == "ambient"),
            },
        };
        if enrolled || native_tunnel(&meta.labels) {
            TunnelProtocol::Hbone
        } else {
            TunnelProtocol::None
        }
    }

    fn node_locality(&self, node: &str) -> Option<Locality> {
        let labels = &self.nodes.get(node)?.labels;
        let get = |key: &str| labels.get(key).map_or("", String::as_str);
        let locality = Locality {
            region: get("topology.kubernetes.io/region").into(),
            zone: get("topology.kubernetes.io/zone").into(),
            subzone: get("topology.istio.io/subzone").into(),
        };
        (!locality.region.is_empty() || !locality.zone.is_empty() || !locality.subzone.is_empty())
            .then_some(locality)
    }

    /// istiod's `serviceEntryWorkloadBuilder`: one workload per endpoint, or, for a DNS entry with neither
    /// endpoints nor selector, one hostname workload per host.
    fn service_entry_workloads(
        &self,
        entry: &ServiceEntry,
        origin: &Origin,
        services: &[ServiceInfo<'_>],
    ) -> Result<Vec<model::Workload>, XdsError> {
        let meta = &entry.metadata;
        let implicit = entry.spec.endpoints.is_empty()
            && matches!(entry.spec.resolution.as_str(), "DNS" | "DNS_ROUND_ROBIN")
            && entry.spec.workload_selector.is_none();
        let implicit_endpoints: Vec<WorkloadEntry>;
        let endpoints = if implicit {
            implicit_endpoints = entry
                .spec
                .hosts
                .iter()
                .map(|host| WorkloadEntry {
                    address: host.clone(),
                    ..WorkloadEntry::default()
                })
                .collect();
            &implicit_endpoints
        } else {
            &entry.spec.endpoints
        };
        let (canonical_name, canonical_revision) = canonical(&meta.labels, &meta.name);
        let mut workloads = Vec::with_capacity(endpoints.len());
        for (i, endpoint) in endpoints.iter().enumerate() {
            let service_account = if endpoint.service_account.is_empty() {
                "default"
            } else {
                endpoint.service_account.as_str()
            };
            let field = format!("spec.endpoints[{i}]");
            if endpoint.address.is_empty() {
                return Err(origin.error(format!("{field}.address"), "must not be empty"));
            }
            check_identity(
                &self.options.trust_domain,
                &meta.namespace,
                service_account,
                origin,
                ("metadata.namespace", &format!("{field}.serviceAccount")),
            )?;
            // For an implicit endpoint, only the service of its own host.
            let own: &[ServiceInfo<'_>] = if implicit {
                services.get(i..=i).unwrap_or_default()
            } else {
                services
            };
            let (addresses, hostname) = match endpoint.address.parse::<IpAddr>() {
                Ok(ip) => (vec![ip], String::new()),
                Err(_) => (Vec::new(), endpoint.address.clone()),
            };
            let network = if endpoint.network.is_empty() {
                self.network(&endpoint.labels, &meta.namespace)
            } else {
                endpoint.network.as_str().into()
            };
            let mut locality = endpoint.locality.splitn(3, '/');
            let mut part = || locality.next().unwrap_or_default();
            let locality = Locality {
                region: part().into(),
                zone: part().into(),
                subzone: part().into(),
            };
            workloads.push(model::Workload {
                uid: format!(
                    "{}/networking.istio.io/ServiceEntry/{}/{}/{}",
                    self.options.cluster_id, meta.namespace, meta.name, endpoint.address
                )
                .into(),
                name: meta.name.as_str().into(),
                namespace: meta.namespace.as_str().into(),
                service_account: service_account.into(),
                trust_domain: self.options.trust_domain.clone(),
                addresses,
                hostname: hostname.into(),
                network,
                protocol: if meta.annotations.get(REDIRECTION).is_some_and(|v| v == "enabled")
                    || native_tunnel(&meta.labels)
                {
                    TunnelProtocol::Hbone
                } else {
                    TunnelProtocol::None
                },
                waypoint: if implicit {
                    None
                } else {
                    self.waypoint(&endpoint.labels, &meta.namespace, false)
                },
                canonical_name: canonical_name.as_str().into(),
                canonical_revision: canonical_revision.as_str().into(),
                workload_type: "pod".into(),
                workload_name: meta.name.as_str().into(),
                cluster_id: self.options.cluster_id.as_str().into(),
                locality: (!endpoint.locality.is_empty()).then_some(locality),
                status: HealthStatus::Healthy,
                services: own
                    .iter()
                    .map(|service| (service.key.clone(), entry_ports(service, endpoint)))
                    .collect(),
                authorization_policies: self.policies.for_workload(
                    &meta.namespace,
                    &meta.labels,
                    &endpoint.labels,
                ),
                ..model::Workload::new("", "", "")
            });
        }
        Ok(workloads)
    }
}

static EMPTY: BTreeMap<String, String> = BTreeMap::new();

fn subset(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn native_tunnel(labels: &BTreeMap<String, String>) -> bool {
    labels.get(TUNNEL).is_some_and(|v| v == "http")
}

/// istiod's `FindPortName`: a TCP container port with this name.
fn container_port(pod: &Pod, name: &str) -> Option<u16> {
    pod.spec
        .containers
        .iter()
        .flat_map(|c| &c.ports)
        .find(|p| p.name == name && p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .map(|p| p.container_port)
}

/// istiod's `constructServicesFromWorkloadEntry` for a ServiceEntry's own ports: an endpoint port of the
/// same name overrides the target port.
fn entry_ports(service: &ServiceInfo<'_>, endpoint: &WorkloadEntry) -> PortMap {
    service
        .ports
        .iter()
        .map(|port| {
            let target = match endpoint.ports.get(port.port_name) {
                Some(&number) => number,
                None if port.target_port == 0 => port.service_port,
                None => port.target_port,
            };
            (port.service_port, target)
        })
        .collect()
}

/// An IP, or a CIDR of exactly one address (istiod's `parseCidrOrIP`).
fn single_address(text: &str) -> Option<IpAddr> {
    if text.contains('/') {
        let net: IpNet = text.parse().ok()?;
        (net.prefix_len() == net.max_prefix_len()).then_some(net.addr())
    } else {
        text.parse().ok()
    }
}

/// istiod's `workloadNameAndType` over Kubernetes' `GetDeployMetaFromPod` heuristics: a Deployment behind
/// a ReplicaSet, a CronJob behind a Job, a Job; otherwise the pod itself.
fn workload_name_and_type(pod: &Pod) -> (String, &'static str) {
    let meta = &pod.metadata;
    let pod_itself = (meta.name.clone(), "pod");
    if meta.generate_name.is_empty() {
        return pod_itself;
    }
    let Some(controller) = meta.owner_references.iter().find(|r| r.controller) else {
        return pod_itself;
    };
    match controller.kind.as_str() {
        "ReplicaSet" => {
            let hash = meta.labels.get("pod-template-hash").map_or("", String::as_str);
            match controller
                .name
                .strip_suffix(hash)
                .and_then(|n| n.strip_suffix('-'))
            {
                Some(deployment) if !hash.is_empty() => (deployment.to_owned(), "deployment"),
                _ => pod_itself,
            }
        }
        "Job" => match cron_job_name(&controller.name) {
            Some(cron) => (cron.to_owned(), "cronjob"),
            None => (controller.name.clone(), "job"),
        },
        _ => pod_itself,
    }
}

/// The CronJob behind a Job named `<cronjob>-<8 to 10 digits>`.
fn cron_job_name(job: &str) -> Option<&str> {
    let (name, suffix) = job.rsplit_once('-')?;
    ((8..=10).contains(&suffix.len()) && suffix.bytes().all(|b| b.is_ascii_digit()) && !name.is_empty())
        .then_some(name)
}

/// Istio's canonical service name and revision, from the usual labels.
fn canonical(labels: &BTreeMap<String, String>, workload_name: &str) -> (String, String) {
    let first = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k)).cloned();
    let name = first(&["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"])
        .unwrap_or_else(|| workload_name.to_owned());
    let revision = first(&[
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ])
    .unwrap_or_else(|| "latest".to_owned());
    (name, revision)
}
