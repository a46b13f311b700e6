//! Arbitrary text as a local control plane file (`mesh_xds::local::load_str`): Istio ztunnel's
//! `LOCAL_XDS` YAML and `kubectl get -o yaml` output (Pods, Services, Namespaces, Nodes, ServiceEntries,
//! Gateways, AuthorizationPolicies, PeerAuthentications), parsed, converted as istiod converts them, and
//! validated as a whole.
//!
//! Checked: a typed error or a configuration, never a panic; errors stay short (a hostile file cannot
//! make a log line of any size); and what loads is what the local control plane can serve: every
//! workload, service and policy survives the trip through its xDS proto (what ztunnel is sent) and back
//! unchanged (but for a workload type the proto's enum cannot carry), and a second load of the same text
//! gives the same configuration.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_xds::local::{LocalOptions, load_str};

/// Room for `file:line:column: field path: reason` with the reason capped at 512 characters.
const MAX_ERROR_CHARS: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let options = LocalOptions::default();
    let config = match load_str(text, "fuzz.yaml", &options) {
        Ok(config) => config,
        Err(error) => {
            let message = error.to_string();
            assert!(
                message.chars().count() <= MAX_ERROR_CHARS,
                "a {}-character error: {}...",
                message.len(),
                message.chars().take(200).collect::<String>()
            );
            return;
        }
    };
    for workload in &config.workloads {
        let again = mesh_xds::workload_from_proto(&mesh_xds::workload_to_proto(workload));
        // The proto's workload type is an enum of four kinds, DEPLOYMENT by default: a file may name
        // another kind, or none (Istio's ztunnel keeps "" for a local file too), which reads back as that
        // default. Only telemetry sees the type, and it already takes "" as `deployment`.
        let mut expected = workload.clone();
        if !["deployment", "cronjob", "pod", "job"].contains(&&*expected.workload_type) {
            expected.workload_type = "deployment".into();
        }
        assert_eq!(
            again.as_ref().ok(),
            Some(&expected),
            "workload changed through its proto: {again:?}"
        );
    }
    for service in &config.services {
        let again = mesh_xds::service_from_proto(&mesh_xds::service_to_proto(service));
        assert_eq!(
            again.as_ref().ok(),
            Some(service),
            "service changed through its proto: {again:?}"
        );
    }
    for policy in &config.policies {
        let again = mesh_xds::authorization_from_proto(&mesh_xds::authorization_to_proto(policy));
        assert_eq!(
            again.as_ref().ok(),
            Some(policy),
            "policy changed through its proto: {again:?}"
        );
    }
    let reloaded = load_str(text, "fuzz.yaml", &options).expect("the same text loads again");
    assert_eq!(reloaded, config, "two loads of one text differ");
});
