//! Istio's standard TCP traffic labels (ztunnel's `CommonTrafficLabels`), derived from a
//! [`ConnectionRecord`].

use std::sync::Arc;

use mesh_core::SpiffeId;
use mesh_core::model::Workload;

use crate::telemetry::{ConnectionRecord, ResponseFlag};

/// The value of a label whose source is missing or empty.
pub(crate) const UNKNOWN: &str = "unknown";

/// One label value; `None` prints as [`UNKNOWN`].
type Label = Option<Arc<str>>;

/// The traffic labels of one connection, except `response_flags`, which is only known when it closes and
/// is kept beside these (so closing a connection never allocates a second label set).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub(crate) struct TrafficLabels {
    reporter: &'static str,
    source_workload: Label,
    source_canonical_service: Label,
    source_canonical_revision: Label,
    source_workload_namespace: Label,
    source_principal: Label,
    source_app: Label,
    source_version: Label,
    source_cluster: Label,
    destination_service: Label,
    destination_service_namespace: Label,
    destination_service_name: Label,
    destination_workload: Label,
    destination_canonical_service: Label,
    destination_canonical_revision: Label,
    destination_workload_namespace: Label,
    destination_principal: Label,
    destination_app: Label,
    destination_version: Label,
    destination_cluster: Label,
    connection_security_policy: &'static str,
}

/// Empty strings are as good as missing: Istio prints both as `unknown`.
fn label(value: &Arc<str>) -> Label {
    (!value.is_empty()).then(|| value.clone())
}

fn principal(id: &SpiffeId) -> Label {
    Some(Arc::from(id.as_str()))
}

impl TrafficLabels {
    /// The labels of `record`, the way ztunnel derives them: workload fields from the workload (app and
    /// version are the canonical name and revision), the source principal only from the identity the
    /// connection proved (never guessed from the source workload), the destination principal from the
    /// destination workload's identity, or else the identity the destination proved.
    pub(crate) fn of(record: &ConnectionRecord) -> Self {
        let mut labels = TrafficLabels {
            reporter: record.reporter.as_str(),
            source_principal: record.source_identity.as_ref().and_then(principal),
            connection_security_policy: record.security.as_str(),
            ..TrafficLabels::default()
        };
        if let Some(source) = &record.source_workload {
            labels.source_workload = label(&source.workload_name);
            labels.source_canonical_service = label(&source.canonical_name);
            labels.source_canonical_revision = label(&source.canonical_revision);
            labels.source_workload_namespace = label(&source.namespace);
            labels.source_app = label(&source.canonical_name);
            labels.source_version = label(&source.canonical_revision);
            labels.source_cluster = label(&source.cluster_id);
        }
        if let Some(service) = &record.destination_service {
            labels.destination_service = label(&service.hostname);
            labels.destination_service_namespace = label(&service.namespace);
            labels.destination_service_name = label(&service.name);
        }
        if let Some(destination) = &record.destination_workload {
            labels.destination_workload = label(&destination.workload_name);
            labels.destination_canonical_service = label(&destination.canonical_name);
            labels.destination_canonical_revision = label(&destination.canonical_revision);
            labels.destination_workload_namespace = label(&destination.namespace);
            labels.destination_principal = workload_principal(destination);
            labels.destination_app = label(&destination.canonical_name);
            labels.destination_version = label(&destination.canonical_revision);
            labels.destination_cluster = label(&destination.cluster_id);
        }
        if labels.destination_principal.is_none() {
            labels.destination_principal = record.destination_identity.as_ref().and_then(principal);
        }
        labels
    }

    /// Every label in ztunnel's order, with `response_flags` set to `flag`.
    pub(crate) fn pairs(&self, flag: ResponseFlag) -> [(&'static str, &str); 23] {
        fn value(label: &Label) -> &str {
            label.as_deref().unwrap_or(UNKNOWN)
        }
        [
            ("reporter", self.reporter),
            ("source_workload", value(&self.source_workload)),
            ("source_canonical_service", value(&self.source_canonical_service)),
            (
                "source_canonical_revision",
                value(&self.source_canonical_revision),
            ),
            (
                "source_workload_namespace",
                value(&self.source_workload_namespace),
            ),
            ("source_principal", value(&self.source_principal)),
            ("source_app", value(&self.source_app)),
            ("source_version", value(&self.source_version)),
            ("source_cluster", value(&self.source_cluster)),
            ("destination_service", value(&self.destination_service)),
            (
                "destination_service_namespace",
                value(&self.destination_service_namespace),
            ),
            ("destination_service_name", value(&self.destination_service_name)),
            ("destination_workload", value(&self.destination_workload)),
            (
                "destination_canonical_service",
                value(&self.destination_canonical_service),
            ),
            (
                "destination_canonical_revision",
                value(&self.destination_canonical_revision),
            ),
            (
                "destination_workload_namespace",
                value(&self.destination_workload_namespace),
            ),
            ("destination_principal", value(&self.destination_principal)),
            ("destination_app", value(&self.destination_app)),
            ("destination_version", value(&self.destination_version)),
            ("destination_cluster", value(&self.destination_cluster)),
            ("request_protocol", "tcp"),
            ("response_flags", flag.as_str()),
            ("connection_security_policy", self.connection_security_policy),
        ]
    }
}

/// A workload whose namespace or service account is not a valid identity segment has no principal.
fn workload_principal(workload: &Workload) -> Label {
    workload.identity().ok().as_ref().and_then(principal)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use mesh_core::model::Service;

    use super::*;
    use crate::telemetry::{Reporter, SecurityPolicy};

    fn as_map(labels: &TrafficLabels) -> BTreeMap<&'static str, String> {
        labels
            .pairs(ResponseFlag::None)
            .into_iter()
            .map(|(k, v)| (k, v.to_owned()))
            .collect()
    }

    #[test]
    fn an_unlabelled_connection_is_all_unknown() {
        let record = ConnectionRecord::new(
            Reporter::Source,
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        let labels = TrafficLabels::of(&record);
        let pairs = labels.pairs(ResponseFlag::Connect);
        let unknown: Vec<_> = pairs
            .iter()
            .filter(|(_, v)| *v == UNKNOWN)
            .map(|(k, _)| *k)
            .collect();
        // The 19 workload, service and principal labels, plus a plain-TCP security policy (also `unknown`).
        assert_eq!(unknown.len(), 20, "{unknown:?}");
        assert_eq!(pairs[0], ("reporter", "source"));
        assert_eq!(pairs[20], ("request_protocol", "tcp"));
        assert_eq!(pairs[21], ("response_flags", "CONNECT"));
        assert_eq!(pairs[22], ("connection_security_policy", "unknown"));
    }

    #[test]
    fn workloads_service_and_identities() {
        let source = Workload {
            workload_name: "sleep".into(),
            canonical_name: "sleep-app".into(),
            canonical_revision: "v1".into(),
            cluster_id: "Kubernetes".into(),
            service_account: "sleep-sa".into(),
            ..Workload::new("uid-src", "sleep-abc", "client-ns")
        };
        let destination = Workload {
            workload_name: "echo".into(),
            canonical_name: "echo-app".into(),
            canonical_revision: "".into(),
            cluster_id: "".into(),
            service_account: "echo-sa".into(),
            ..Workload::new("uid-dst", "echo-xyz", "server-ns")
        };
        let mut record = ConnectionRecord::new(
            Reporter::Destination,
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.2:8080".parse().unwrap(),
        );
        record.source_workload = Some(Arc::new(source));
        record.destination_workload = Some(Arc::new(destination));
        record.destination_service = Some(Arc::new(Service::new(
            "echo",
            "server-ns",
            "echo.server-ns.svc.cluster.local",
        )));
        record.source_identity =
            Some(SpiffeId::parse("spiffe://cluster.local/ns/client-ns/sa/proved").unwrap());
        // The destination workload's own identity wins over the one it proved, as in ztunnel.
        record.destination_identity = Some(SpiffeId::parse("spiffe://cluster.local/ns/x/sa/san").unwrap());
        record.security = SecurityPolicy::MutualTls;

        let map = as_map(&TrafficLabels::of(&record));
        let expected: BTreeMap<&str, &str> = BTreeMap::from([
            ("reporter", "destination"),
            ("source_workload", "sleep"),
            ("source_canonical_service", "sleep-app"),
            ("source_canonical_revision", "v1"),
            ("source_workload_namespace", "client-ns"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/client-ns/sa/proved",
            ),
            ("source_app", "sleep-app"),
            ("source_version", "v1"),
            ("source_cluster", "Kubernetes"),
            ("destination_service", "echo.server-ns.svc.cluster.local"),
            ("destination_service_namespace", "server-ns"),
            ("destination_service_name", "echo"),
            ("destination_workload", "echo"),
            ("destination_canonical_service", "echo-app"),
            ("destination_canonical_revision", "unknown"),
            ("destination_workload_namespace", "server-ns"),
            (
                "destination_principal",
                "spiffe://cluster.local/ns/server-ns/sa/echo-sa",
            ),
            ("destination_app", "echo-app"),
            ("destination_version", "unknown"),
            ("destination_cluster", "unknown"),
            ("request_protocol", "tcp"),
            ("response_flags", "-"),
            ("connection_security_policy", "mutual_tls"),
        ]);
        let actual: BTreeMap<&str, &str> = map.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(actual, expected);
    }

    #[test]
    fn proved_destination_identity_when_no_workload_is_known() {
        let mut record = ConnectionRecord::new(
            Reporter::Source,
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.9:80".parse().unwrap(),
        );
        record.destination_identity = Some(SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap());
        let map = as_map(&TrafficLabels::of(&record));
        assert_eq!(map["destination_principal"], "spiffe://cluster.local/ns/a/sa/b");
        assert_eq!(map["source_principal"], "unknown");
    }
}
