//! The local control plane's configuration: a file, a directory of YAML files, or an inline string, turned
//! into a validated [`LocalConfig`] (workloads, services and L4 authorization policies), and a
//! [`LocalWatcher`] that reloads it when the files change.
//!
//! ## Formats
//! Each YAML document (files may hold several, `---` separated) is one of:
//! - **Istio ztunnel's static configuration** (`LOCAL_XDS_PATH` / `LOCAL_XDS`): a document with top-level
//!   `workloads`, `services` and/or `policies` and no `kind`. Files written for Istio's ztunnel load
//!   unchanged; unknown fields are refused, as ztunnel refuses them (`deny_unknown_fields`). The only
//!   readings that differ from ztunnel's: an empty `trustDomain` means [`LocalOptions::trust_domain`]
//!   and an empty `serviceAccount` means `default` (ztunnel would build `spiffe:///ns/..`, an identity no
//!   certificate can carry); an empty `clusterId` means [`LocalOptions::cluster_id`]; a workload without a
//!   `uid` gets istiod's pod uid `<cluster>//Pod/<namespace>/<name>`; `workloadIps`, `vips`, `ports`,
//!   `rules` and `dryRun` may be left out (ztunnel requires some of them). String matches use serde_yaml's
//!   tags: `!Exact "cluster.local/ns/default/sa/client"`, `!Prefix`, `!Suffix`, `!Presence []`.
//! - **Kubernetes objects as `kubectl get -o yaml` prints them** (one object, several, or a `kind: List`;
//!   `status`, `managedFields` and every other field the conversion does not read are ignored), converted
//!   as istiod's ambient controller converts them for ztunnel: `v1` `Pod`, `Service`, `Namespace` and
//!   `Node`, `networking.istio.io` `ServiceEntry`, `gateway.networking.k8s.io` `Gateway` (waypoints), and
//!   `security.istio.io` `AuthorizationPolicy` and `PeerAuthentication`. See [`LocalOptions`] for the
//!   cluster facts the conversion needs, and the notes below for the rules.
//!
//! Objects of other kinds are refused ([`XdsError::LocalUnsupportedKind`]) unless they are in
//! [`IGNORED_KINDS`]: kinds that commonly sit next to the objects above in a manifest and carry nothing
//! ztunnel is sent (workload controllers, ConfigMaps, Secrets, ServiceAccounts, Endpoints, ...). A kind we
//! do not understand is an error rather than silently nothing, so that a policy kind we do not enforce is
//! never mistaken for one we do.
//!
//! ## Kubernetes conversion (istiod's rules, with the differences named)
//! - A `Pod` in phase `Running` or `Pending` with a pod IP, not on the host network, becomes a workload:
//!   uid `<cluster>//Pod/<namespace>/<name>` (istiod's spelling), addresses from `status.podIPs` (else
//!   `status.podIP`), service account `spec.serviceAccountName` (default `default`), node
//!   `spec.nodeName`, locality from its `Node`'s topology labels if that Node is loaded, network from the
//!   `topology.istio.io/network` label of the pod or its namespace (else
//!   [`LocalOptions::default_network`]), healthy when its `Ready` condition is `True`, workload name and
//!   type from its controller (a Deployment behind a ReplicaSet, a Job, a CronJob, else the pod), canonical
//!   name and revision from the usual labels (a Pod without `status`, hand-written say, is not a
//!   workload: istiod waits for its phase and IP). Its tunnel protocol is HBONE when the CNI marked it
//!   (`ambient.istio.io/redirection: enabled`) or, since there is no CNI here, when it is enrolled by
//!   label: `istio.io/dataplane-mode: ambient` on the pod, or on its namespace unless the pod says `none`.
//!   It backs every Service of its namespace whose non-empty selector matches its labels, with named
//!   target ports resolved through its TCP container ports (a port it does not declare is left out).
//! - A `Service` becomes `<namespace>/<name>.<namespace>.svc.<cluster domain>` with VIPs from
//!   `spec.clusterIPs` (else `spec.clusterIP`, never `None`) on the default network, its ports (a named
//!   target port is `0`: each workload maps it), and istiod's load-balancing for `PreferClose`,
//!   `internalTrafficPolicy: Local` and waypoint Services.
//! - Waypoints: the `istio.io/use-waypoint` label (and `istio.io/use-waypoint-namespace`) on the object,
//!   else on its namespace; `none` on the object opts out. The waypoint is reached as
//!   `<namespace>/<name>.<namespace>.svc.<cluster domain>` on port 15008. As in istiod, a waypoint serves
//!   Services unless its `Gateway` is labelled `istio.io/waypoint-for: workload` or `all`, which is also
//!   what lets workloads use it; a waypoint whose `Gateway` is not loaded counts as one for Services (istiod
//!   would wait for the Gateway to be ready: we do not have one to wait for). Waypoint pods
//!   (`gateway.networking.k8s.io/gateway-name`) and waypoint Services get no waypoint. Not modelled: a
//!   Gateway's `allowedRoutes` (which namespaces may attach), waypoint instances' inbound binding, and
//!   the implicit `istio_allow_waypoint_*` policies istiod adds when `DEFAULT_ALLOW_FROM_WAYPOINT` is on.
//! - A `ServiceEntry` becomes one service per host (addresses must be IPs or single-address CIDRs: one
//!   that is not is refused, where istiod drops the whole entry; with several hosts, the addresses go to
//!   the first, since a VIP names one service), and each endpoint a workload with uid
//!   `<cluster>/networking.istio.io/ServiceEntry/<namespace>/<name>/<address>`; a `DNS` entry without
//!   endpoints or selector gets one hostname workload per host, as in istiod.
//! - An `AuthorizationPolicy` becomes an [`XdsAuthorization`] as istiod converts it for ztunnel: ALLOW and
//!   DENY only (AUDIT and CUSTOM need a waypoint and are not sent), none with `targetRef(s)` (those are for
//!   waypoints), none with the `istio.io/dry-run` annotation; scope Global in
//!   [`LocalOptions::root_namespace`], WorkloadSelector with a selector (each selected workload of the
//!   policy's namespace, or of any namespace for a root-namespace policy, lists `namespace/name` in its
//!   `authorization_policies`, sorted), Namespace otherwise. An ALLOW rule with any L7 attribute is dropped;
//!   a DENY rule loses its L7 attributes. **Where we differ, failing closed**: when dropping L7 attributes
//!   leaves a DENY `from`/`to`/`when` entry empty, that part of the rule matches everything (istiod sends
//!   an empty match, which ztunnel skips, so such a DENY silently denies nothing: istio/istio#61126); an
//!   ALLOW `from`/`to` entry that is empty never matches.
//! - `PeerAuthentication`: as soon as one exists, istiod's static policy
//!   `<root namespace>/istio_converted_static_strict` (DENY connections without a peer identity) is sent,
//!   and every workload whose effective mode is STRICT (mesh, namespace, then workload policy, oldest
//!   first) lists it; a workload policy with port-level modes becomes
//!   `<namespace>/converted_peer_authentication_<name>`, merged with the namespace or mesh STRICT mode as
//!   istiod merges it.
//!
//! ## Validation
//! The whole set is validated before it is returned: a repeated workload uid, service key or policy key,
//! two workloads with one address on one network, two services with one VIP, a service listing a port
//! twice, and every workload identity (it must be valid SPIFFE). Each error names the file and line. A
//! workload may back a service that is not in the set (ztunnel keeps such endpoints until the service
//! arrives, and does the same with a local file), and may name an authorization policy that is not in the
//! set (istiod does it too; ztunnel ignores the name until the policy exists).
//!
//! ## Example
//! ```
//! use mesh_xds::local::{LocalOptions, load_str};
//!
//! let yaml = r#"
//! workloads:
//! - uid: cluster1//v1/Pod/default/server
//!   name: server
//!   namespace: default
//!   serviceAccount: server
//!   workloadIps: ["198.18.0.2"]
//!   protocol: HBONE
//!   services:
//!     "default/echo.default.svc.cluster.local": {80: 8080}
//! services:
//! - name: echo
//!   namespace: default
//!   hostname: echo.default.svc.cluster.local
//!   vips: ["/198.19.0.10"]
//!   ports: {80: 8080}
//! "#;
//! let config = load_str(yaml, "inline", &LocalOptions::default())?;
//! assert_eq!(config.workloads[0].identity()?.as_str(), "spiffe://cluster.local/ns/default/sa/server");
//! assert_eq!(config.services[0].vips[0].to_string(), "/198.19.0.10");
//!
//! // Errors name the file, line and column, and the field.
//! let bad = yaml.replace("198.18.0.2", "198.18.0.300");
//! assert_eq!(
//!     load_str(&bad, "inline", &LocalOptions::default()).unwrap_err().to_string(),
//!     "inline:7:17: workloads[0].workloadIps[0]: invalid IP address syntax",
//! );
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod kube;
mod source;
#[cfg(test)]
mod tests;
mod watch;
mod ztunnel;

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use mesh_core::TrustDomain;
use mesh_core::model::{MeshSnapshot, ModelError, Service, Workload};

use crate::{XdsAuthorization, XdsError};

pub use kube::IGNORED_KINDS;
pub use source::{MAX_FILE_BYTES, MAX_TOTAL_BYTES};
pub use watch::{DEFAULT_POLL_INTERVAL, LocalWatcher, MIN_POLL_INTERVAL};

/// A validated local configuration: what the local control plane serves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalConfig {
    /// The workloads, in the order their files and documents list them.
    pub workloads: Vec<Workload>,
    /// The services, in the order their files and documents list them.
    pub services: Vec<Service>,
    /// The L4 authorization policies, as ztunnel is sent them: those written in ztunnel's format, then
    /// those converted from AuthorizationPolicies, then those derived from PeerAuthentications.
    pub policies: Vec<XdsAuthorization>,
}

/// The cluster facts the loader needs to convert Kubernetes objects (ztunnel-format documents carry
/// their own, except where an empty field falls back to these).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalOptions {
    /// The cluster id in workload uids and `cluster_id` (Istio's `CLUSTER_ID`; default `Kubernetes`).
    pub cluster_id: String,
    /// The trust domain of workload identities (default `cluster.local`).
    pub trust_domain: TrustDomain,
    /// The DNS suffix of Service hostnames (Kubernetes' cluster domain; default `cluster.local`).
    pub cluster_domain: String,
    /// Istio's root namespace: policies there apply mesh-wide (default `istio-system`).
    pub root_namespace: String,
    /// The network of pods, VIPs and endpoints that name none (default `""`, the default network).
    pub default_network: String,
}

impl Default for LocalOptions {
    fn default() -> Self {
        LocalOptions {
            cluster_id: "Kubernetes".to_owned(),
            trust_domain: TrustDomain::default(),
            cluster_domain: "cluster.local".to_owned(),
            root_namespace: "istio-system".to_owned(),
            default_network: String::new(),
        }
    }
}

/// Where in the configuration something is: a file (or the name given to inline configuration), and a
/// 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SourceLocation {
    /// The file's path as the loader was given it (joined with the file name for a directory), or the
    /// name of inline configuration.
    pub file: Arc<str>,
    /// The line, from 1.
    pub line: usize,
    /// The column, from 1.
    pub column: usize,
}

impl fmt::Display for SourceLocation {
    /// `file:line:column`, the form editors and terminals link to.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// Loads a file, or every `*.yaml` / `*.yml` file of a directory (sorted by name, not recursive, hidden
/// files skipped), and validates the whole set. Each file may hold at most [`MAX_FILE_BYTES`], and a
/// directory's files together [`MAX_TOTAL_BYTES`].
pub fn load_path(path: impl AsRef<Path>, options: &LocalOptions) -> Result<LocalConfig, XdsError> {
    let sources = source::read_path(path.as_ref())?;
    load_sources(&sources, options)
}

/// Loads inline configuration (Istio's `LOCAL_XDS`); `name` stands for the file name in errors.
pub fn load_str(text: &str, name: &str, options: &LocalOptions) -> Result<LocalConfig, XdsError> {
    source::check_size(name, text.len() as u64, MAX_FILE_BYTES)?;
    load_sources(
        &[source::Source {
            name: name.into(),
            text: text.to_owned(),
        }],
        options,
    )
}

/// Parses every document of every source, converts, and validates the whole set.
pub(crate) fn load_sources(
    sources: &[source::Source],
    options: &LocalOptions,
) -> Result<LocalConfig, XdsError> {
    let mut inventory = source::Inventory::default();
    for source in sources {
        source::parse_into(source, &mut inventory)?;
    }
    let mut located = Located::default();
    for (origin, document) in &inventory.ztunnel {
        ztunnel::convert(document, origin, options, &mut located)?;
    }
    kube::convert(&inventory.kube, options, &mut located)?;
    validate(&located)?;
    Ok(LocalConfig {
        workloads: located.workloads.into_iter().map(|(w, _)| w).collect(),
        services: located.services.into_iter().map(|(s, _)| s).collect(),
        policies: located.policies.into_iter().map(|(p, _)| p).collect(),
    })
}

/// Converted objects, each with where it was written (for errors found when checking the whole set).
#[derive(Debug, Default)]
pub(crate) struct Located {
    pub(crate) workloads: Vec<(Workload, Origin)>,
    pub(crate) services: Vec<(Service, Origin)>,
    pub(crate) policies: Vec<(XdsAuthorization, Origin)>,
}

/// Where an object was written: the start of its document, and its path within it (`workloads[2]`,
/// `items[0]`, or empty for a document that is the object).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    pub(crate) location: SourceLocation,
    pub(crate) path: String,
}

impl Origin {
    /// An error at this object's document, on `field` (relative to the object).
    pub(crate) fn error(&self, field: impl fmt::Display, reason: impl fmt::Display) -> XdsError {
        let field = field.to_string();
        let field = match (self.path.is_empty(), field.is_empty()) {
            (true, _) => field,
            (false, true) => self.path.clone(),
            (false, false) => format!("{}.{field}", self.path),
        };
        XdsError::LocalConfig {
            location: self.location.clone(),
            field,
            reason: bounded(&reason.to_string()),
        }
    }

    /// The same document, one level deeper (`workloads[2]` within the document).
    pub(crate) fn child(&self, path: impl fmt::Display) -> Origin {
        let path = path.to_string();
        Origin {
            location: self.location.clone(),
            path: if self.path.is_empty() {
                path
            } else {
                format!("{}.{path}", self.path)
            },
        }
    }
}

/// Caps an error's reason: it can quote configuration (a key, a value), and a file may hold anything.
pub(crate) fn bounded(reason: &str) -> String {
    const LIMIT: usize = 512;
    match reason.char_indices().nth(LIMIT) {
        Some((cut, _)) => format!("{}...", &reason[..cut]),
        None => reason.to_owned(),
    }
}

/// Checks the set as a whole: repeated keys (naming both places), then everything
/// [`MeshSnapshot::builder`] refuses.
fn validate(located: &Located) -> Result<(), XdsError> {
    let mut uids: HashMap<&str, &Origin> = HashMap::new();
    for (workload, origin) in &located.workloads {
        if let Some(first) = uids.insert(&workload.uid, origin) {
            return Err(origin.error(
                "uid",
                format!(
                    "duplicate workload uid {:?} (first at {})",
                    crate::error::truncate_for_log(&workload.uid),
                    first.location
                ),
            ));
        }
    }
    let mut keys: HashMap<String, &Origin> = HashMap::new();
    for (service, origin) in &located.services {
        // Workloads name their services by this key in xDS (`namespace/hostname`): one that does not
        // parse back would make ztunnel refuse every workload of the service.
        let key = service.key().to_string();
        if key.parse::<mesh_core::model::NamespacedHostname>().is_err() {
            return Err(origin.error(
                "",
                format!(
                    "service {:?}: a namespace or hostname must not contain '/'",
                    crate::error::truncate_for_log(&key)
                ),
            ));
        }
        if let Some(first) = keys.insert(key, origin) {
            return Err(origin.error(
                "",
                format!(
                    "duplicate service {} (first at {})",
                    service.key(),
                    first.location
                ),
            ));
        }
    }
    let mut names: HashMap<String, &Origin> = HashMap::new();
    for (policy, origin) in &located.policies {
        if let Some(first) = names.insert(policy.key(), origin) {
            return Err(origin.error(
                "",
                format!("duplicate policy {} (first at {})", policy.key(), first.location),
            ));
        }
    }

    let mut builder = MeshSnapshot::builder();
    builder.allow_unknown_services(true);
    for (workload, _) in &located.workloads {
        builder.add_workload(workload.clone());
    }
    for (service, _) in &located.services {
        builder.add_service(service.clone());
    }
    builder
        .build()
        .map(drop)
        .map_err(|e| locate_model_error(&e, located))
}

/// Attaches the offending object's location to a snapshot error.
fn locate_model_error(error: &ModelError, located: &Located) -> XdsError {
    let workload = |uid: &str| {
        located
            .workloads
            .iter()
            .find(|(w, _)| &*w.uid == uid)
            .map(|(_, o)| o)
    };
    let service = |key: &mesh_core::model::NamespacedHostname| {
        located
            .services
            .iter()
            .find(|(s, _)| s.key() == *key)
            .map(|(_, o)| o)
    };
    let origin = match error {
        ModelError::DuplicateAddress { second_uid, .. } => workload(second_uid),
        ModelError::DuplicateVip { second, .. } => service(second),
        ModelError::DuplicateServicePort { service: key, .. } => service(key),
        ModelError::UnknownService { workload_uid, .. } => workload(workload_uid),
        ModelError::EmptyHostname { namespace, name } => located
            .services
            .iter()
            .find(|(s, _)| s.hostname.is_empty() && s.namespace == *namespace && s.name == *name)
            .map(|(_, o)| o),
        _ => None,
    };
    match origin {
        Some(origin) => origin.error("", error),
        None => XdsError::LocalConfig {
            location: located
                .workloads
                .first()
                .map(|(_, o)| o.location.clone())
                .or_else(|| located.services.first().map(|(_, o)| o.location.clone()))
                .unwrap_or(SourceLocation {
                    file: Arc::from("<config>"),
                    line: 1,
                    column: 1,
                }),
            field: String::new(),
            reason: error.to_string(),
        },
    }
}
