//! Keeps `deploy/kubernetes/ztunnel.yaml` honest without a cluster: it must parse, set only environment
//! variables this ztunnel reads (taken from its source), point those variables at the mounts that hold
//! what they name, probe the readiness endpoint the binary serves, and keep Istio's ports, privileges and
//! placement.

#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_yaml::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The manifest's documents.
fn documents() -> Vec<Value> {
    let text = read("deploy/kubernetes/ztunnel.yaml");
    text.split("\n---\n")
        .map(|doc| serde_yaml::from_str::<Value>(doc).unwrap())
        .filter(|doc| !doc.is_null())
        .collect()
}

fn document(kind: &str) -> Value {
    let matching: Vec<_> = documents()
        .into_iter()
        .filter(|doc| doc["kind"].as_str() == Some(kind))
        .collect();
    assert_eq!(matching.len(), 1, "exactly one {kind} expected");
    matching.into_iter().next().unwrap()
}

fn daemonset() -> Value {
    let ds = document("DaemonSet");
    assert_eq!(ds["apiVersion"].as_str(), Some("apps/v1"));
    assert_eq!(ds["metadata"]["name"].as_str(), Some("ztunnel"));
    assert_eq!(ds["metadata"]["namespace"].as_str(), Some("istio-system"));
    ds
}

/// The one container (Istio's chart names it `istio-proxy`, which `kubectl set image` relies on).
fn container() -> Value {
    let containers = daemonset()["spec"]["template"]["spec"]["containers"].clone();
    let containers = containers.as_sequence().unwrap();
    assert_eq!(containers.len(), 1);
    assert_eq!(containers[0]["name"].as_str(), Some("istio-proxy"));
    containers[0].clone()
}

fn str_list(value: &Value) -> BTreeSet<String> {
    value
        .as_sequence()
        .unwrap()
        .iter()
        .map(|item| item.as_str().unwrap().to_owned())
        .collect()
}

/// The environment variables ztunnel reads: clap's `env = "..."` names and `std::env::var("...")` calls
/// in `bins/ztunnel/src`.
fn variables_read() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for marker in ["env = \"", "env::var(\""] {
            for (at, _) in text.match_indices(marker) {
                let rest = &text[at + marker.len()..];
                let name = &rest[..rest.find('"').unwrap()];
                names.insert(name.to_owned());
            }
        }
    }
    assert!(names.len() > 20, "the scan found too few variables: {names:?}");
    names
}

#[test]
fn the_scan_of_the_source_finds_the_variables_it_should() {
    let names = variables_read();
    for known in ["XDS_ADDRESS", "CA_ADDRESS", "NODE_NAME", "SECRET_TTL", "RUST_LOG"] {
        assert!(names.contains(known), "{known} missing from {names:?}");
    }
}

#[test]
fn every_variable_set_is_one_ztunnel_reads_and_each_is_set_once() {
    let read = variables_read();
    let env = container()["env"].as_sequence().unwrap().clone();
    let mut seen = BTreeSet::new();
    for var in &env {
        let name = var["name"].as_str().unwrap();
        assert!(read.contains(name), "{name} is set but ztunnel does not read it");
        assert!(seen.insert(name.to_owned()), "{name} is set twice");
        assert!(
            var.get("value").is_some() != var.get("valueFrom").is_some(),
            "{name} needs exactly one of value and valueFrom"
        );
    }
    for required in [
        "XDS_ADDRESS",
        "CA_ADDRESS",
        "XDS_ROOT_CA",
        "AUTH_TOKEN",
        "CLUSTER_ID",
        "POD_NAME",
        "POD_NAMESPACE",
        "NODE_NAME",
        "INSTANCE_IP",
        "SERVICE_ACCOUNT",
        "INPOD_ENABLED",
        "INPOD_UDS",
    ] {
        assert!(seen.contains(required), "{required} is not set");
    }
}

fn env_value(name: &str) -> Value {
    container()["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|var| var["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("{name} is not set"))
        .clone()
}

fn literal(name: &str) -> String {
    env_value(name)["value"].as_str().unwrap().to_owned()
}

#[test]
fn identity_variables_come_from_the_downward_api() {
    for (name, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("NODE_NAME", "spec.nodeName"),
        ("INSTANCE_IP", "status.podIP"),
        ("SERVICE_ACCOUNT", "spec.serviceAccountName"),
    ] {
        assert_eq!(
            env_value(name)["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
            Some(field),
            "{name}"
        );
    }
}

#[test]
fn istiod_is_reached_over_tls_on_15012() {
    for name in ["XDS_ADDRESS", "CA_ADDRESS"] {
        // Our ztunnel requires the scheme (Istio's adds it when missing).
        assert_eq!(literal(name), "https://istiod.istio-system.svc:15012", "{name}");
    }
}

/// The volume mounted at the directory holding `path`.
fn volume_holding(path: &str) -> Value {
    let spec = daemonset()["spec"]["template"]["spec"].clone();
    let mounts = container()["volumeMounts"].as_sequence().unwrap().clone();
    let (dir, _file) = path.rsplit_once('/').unwrap();
    let mount = mounts
        .iter()
        .find(|m| m["mountPath"].as_str() == Some(dir))
        .unwrap_or_else(|| panic!("nothing is mounted at {dir}"));
    let name = mount["name"].as_str().unwrap();
    spec["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no volume {name}"))
        .clone()
}

#[test]
fn root_and_token_variables_point_at_the_mounts_that_hold_them() {
    let root = literal("XDS_ROOT_CA");
    assert_eq!(root, "/var/run/secrets/istio/root-cert.pem");
    let volume = volume_holding(&root);
    assert_eq!(volume["configMap"]["name"].as_str(), Some("istio-ca-root-cert"));

    let token = literal("AUTH_TOKEN");
    assert_eq!(token, "/var/run/secrets/tokens/istio-token");
    let volume = volume_holding(&token);
    let source = &volume["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(source["audience"].as_str(), Some("istio-ca"));
    assert_eq!(Some(source["path"].as_str().unwrap()), token.rsplit('/').next());
    assert_eq!(source["expirationSeconds"].as_u64(), Some(43200));
}

#[test]
fn readiness_is_probed_where_ztunnel_serves_it() {
    let probe = &container()["readinessProbe"]["httpGet"];
    assert_eq!(probe["port"].as_u64(), Some(15021));
    assert_eq!(probe["path"].as_str(), Some("/healthz/ready"));
    // ... which is where the binary binds it and what the endpoint answers.
    let proxy = read("bins/ztunnel/src/proxy.rs");
    assert!(proxy.contains("15021"), "ztunnel no longer binds 15021");
    let readiness = read("mesh-proxy/src/admin/readiness.rs");
    assert!(readiness.contains("\"/healthz/ready\""));
}

#[test]
fn declared_ports_are_istios() {
    // Istio's ztunnel ports, and the names its chart and monitoring use.
    let istio: BTreeMap<u64, &str> = [
        (15001, "outbound"),
        (15006, "inbound plaintext"),
        (15008, "HBONE"),
        (15020, "ztunnel-stats"),
        (15021, "readiness"),
    ]
    .into();
    let ports = container()["ports"].as_sequence().unwrap().clone();
    let mut declared = BTreeMap::new();
    for port in &ports {
        let number = port["containerPort"].as_u64().unwrap();
        assert!(
            istio.contains_key(&number),
            "{number} is not an Istio ztunnel port"
        );
        assert_eq!(port["protocol"].as_str(), Some("TCP"));
        declared.insert(number, port["name"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        declared.get(&15020).map(String::as_str),
        Some("ztunnel-stats"),
        "Istio's PodMonitor and dashboards find metrics by this port name"
    );
    assert!(
        !declared.contains_key(&15000),
        "the admin port listens on localhost only"
    );
    let annotations = &daemonset()["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"].as_str(), Some("15020"));
}

#[test]
fn privileges_placement_and_volumes_are_istios() {
    let security = container()["securityContext"].clone();
    assert_eq!(
        str_list(&security["capabilities"]["add"]),
        ["NET_ADMIN", "NET_RAW", "SYS_ADMIN"].map(String::from).into()
    );
    assert_eq!(
        str_list(&security["capabilities"]["drop"]),
        ["ALL".to_owned()].into()
    );
    assert_eq!(security["privileged"].as_bool(), Some(false));
    assert_eq!(security["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(security["runAsUser"].as_u64(), Some(0));

    let spec = daemonset()["spec"]["template"]["spec"].clone();
    assert_eq!(spec["priorityClassName"].as_str(), Some("system-node-critical"));
    let tolerations = spec["tolerations"].as_sequence().unwrap();
    for (key, effect) in [
        (None, Some("NoSchedule")),
        (Some("CriticalAddonsOnly"), None),
        (None, Some("NoExecute")),
    ] {
        assert!(
            tolerations
                .iter()
                .any(|t| t["operator"].as_str() == Some("Exists")
                    && t["key"].as_str() == key
                    && t["effect"].as_str() == effect),
            "missing toleration {key:?} {effect:?}"
        );
    }

    // In-pod mode, with istio-cni's socket in its directory on the host, and a writable /tmp under the
    // read-only root.
    assert_eq!(literal("INPOD_ENABLED"), "true");
    let socket = literal("INPOD_UDS");
    assert_eq!(socket, "/var/run/ztunnel/ztunnel.sock");
    let socket_dir = volume_holding(&socket);
    assert_eq!(socket_dir["hostPath"]["path"].as_str(), Some("/var/run/ztunnel"));
    assert!(volume_holding("/tmp/x").get("emptyDir").is_some());

    // The service account istiod trusts to request certificates for a node's pods.
    assert_eq!(spec["serviceAccountName"].as_str(), Some("ztunnel"));
    let account = document("ServiceAccount");
    assert_eq!(account["metadata"]["name"].as_str(), Some("ztunnel"));
    assert_eq!(account["metadata"]["namespace"].as_str(), Some("istio-system"));
}

#[test]
fn ztunnel_drains_before_kubernetes_kills_it() {
    let spec = daemonset()["spec"]["template"]["spec"].clone();
    let kill = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
    let grace: u64 = literal("TERMINATION_GRACE_PERIOD_SECONDS").parse().unwrap();
    // As Istio's chart: the grace period itself is passed, and ztunnel keeps 5 s of it (over 10 s) to close
    // what is left; its drain, plus the second it allows for closing, ends before the SIGKILL.
    assert_eq!(
        grace, kill,
        "TERMINATION_GRACE_PERIOD_SECONDS is the pod's terminationGracePeriodSeconds"
    );
    let drain = if grace > 10 {
        grace - 5
    } else {
        grace.saturating_sub(1).max(1)
    };
    assert!(
        drain + 1 < kill,
        "drain {drain}s must end before SIGKILL at {kill}s"
    );
}

#[test]
fn the_pod_template_is_selected_and_the_image_runs_ztunnel() {
    let ds = daemonset();
    let selector = &ds["spec"]["selector"]["matchLabels"];
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    for (key, value) in selector.as_mapping().unwrap() {
        assert_eq!(&labels[key.as_str().unwrap()], value);
    }
    assert_eq!(labels["istio.io/dataplane-mode"].as_str(), Some("none"));
    // The image's entrypoint is the binary; the manifest neither overrides it nor passes arguments.
    let container = container();
    assert!(container.get("command").is_none() && container.get("args").is_none());
    let dockerfile = read("deploy/Dockerfile");
    assert!(dockerfile.contains("ENTRYPOINT [\"/usr/local/bin/ztunnel\"]"));
    // ztunnel is built on its own (the features of a joint build would rename the functions
    // bins/ztunnel/symbol-order.txt lays out), then meshctl.
    assert!(dockerfile.contains("cargo build --release --locked -p ztunnel \\\n"));
    assert!(dockerfile.contains("cargo build --release --locked -p meshctl"));
}
