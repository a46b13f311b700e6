//! PeerAuthentication precedence: mesh, namespace, workload and port scopes, UNSET inheritance, and the
//! PERMISSIVE default. Each case names its source.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;

use mesh_policy::peer_authn::{MtlsScope, PeerAuthnSet};
use mesh_policy::resource::{PeerAuthentication, parse_resources};
use test_case::test_case;

/// One PeerAuthentication document: `namespace/name` and the spec in flow YAML.
fn pa(key: &str, spec: &str) -> String {
    let (namespace, name) = key.split_once('/').unwrap();
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
    )
}

fn labels(app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("app".to_owned(), app.to_owned())])
}

const MESH_STRICT: &str = "{mtls: {mode: STRICT}}";
const STRICT: &str = "{mtls: {mode: STRICT}}";
const PERMISSIVE: &str = "{mtls: {mode: PERMISSIVE}}";
const DISABLE: &str = "{mtls: {mode: DISABLE}}";
const UNSET: &str = "{mtls: {mode: UNSET}}";

const REF: &str = "istio.io PeerAuthentication reference";
// Port keys are quoted below: `kubectl get -o yaml` prints them as strings. (The reference's examples
// write bare `8080:`, which `resource::PeerAuthenticationSpec` does not yet read.)

#[test_case(&[], "foo", "finance", 8080, "PERMISSIVE (default)" ; "nothing set is PERMISSIVE")]
#[test_case(&[("istio-system/default", MESH_STRICT)], "foo", "finance", 8080, "STRICT (mesh istio-system/default)" ; "mesh STRICT in the root namespace")]
#[test_case(&[("istio-system/default", MESH_STRICT), ("foo/default", PERMISSIVE)], "foo", "finance", 8080, "PERMISSIVE (namespace foo/default)" ; "namespace overrides mesh")]
#[test_case(&[("istio-system/default", MESH_STRICT), ("foo/default", UNSET)], "foo", "finance", 8080, "STRICT (mesh istio-system/default)" ; "namespace UNSET inherits mesh")]
#[test_case(&[("istio-system/default", MESH_STRICT), ("foo/default", "{}")], "foo", "finance", 8080, "STRICT (mesh istio-system/default)" ; "namespace without mtls inherits mesh")]
#[test_case(&[("istio-system/default", MESH_STRICT), ("bar/default", PERMISSIVE)], "foo", "finance", 8080, "STRICT (mesh istio-system/default)" ; "another namespace's policy does not apply")]
#[test_case(&[("istio-system/default", DISABLE)], "foo", "finance", 8080, "DISABLE (mesh istio-system/default)" ; "mesh DISABLE allows plaintext")]
#[test_case(&[("foo/default", PERMISSIVE), ("foo/finance", "{selector: {matchLabels: {app: finance}}, mtls: {mode: STRICT}}")], "foo", "finance", 8080, "STRICT (workload foo/finance)" ; "example: PERMISSIVE namespace, STRICT for finance")]
#[test_case(&[("foo/default", PERMISSIVE), ("foo/finance", "{selector: {matchLabels: {app: finance}}, mtls: {mode: STRICT}}")], "foo", "orders", 8080, "PERMISSIVE (namespace foo/default)" ; "example: other workloads keep the namespace mode")]
#[test_case(&[("foo/finance", "{selector: {matchLabels: {app: finance}}, mtls: {mode: STRICT}, portLevelMtls: {'8080': {mode: DISABLE}}}")], "foo", "finance", 8080, "DISABLE (port foo/finance)" ; "example: STRICT workload leaves port 8080 plaintext")]
#[test_case(&[("foo/finance", "{selector: {matchLabels: {app: finance}}, mtls: {mode: STRICT}, portLevelMtls: {'8080': {mode: DISABLE}}}")], "foo", "finance", 9090, "STRICT (workload foo/finance)" ; "example: other ports stay STRICT")]
#[test_case(&[("foo/default", STRICT), ("foo/finance", "{selector: {matchLabels: {app: finance}}, mtls: {mode: UNSET}, portLevelMtls: {'8080': {mode: DISABLE}}}")], "foo", "finance", 8080, "DISABLE (port foo/finance)" ; "example: UNSET workload overrides port 8080")]
#[test_case(&[("foo/default", STRICT), ("foo/finance", "{selector: {matchLabels: {app: finance}}, mtls: {mode: UNSET}, portLevelMtls: {'8080': {mode: DISABLE}}}")], "foo", "finance", 9090, "STRICT (namespace foo/default)" ; "example: UNSET workload inherits the namespace")]
#[test_case(&[("foo/finance", "{selector: {matchLabels: {app: finance}}, mtls: {mode: PERMISSIVE}, portLevelMtls: {'8080': {mode: UNSET}}}")], "foo", "finance", 8080, "PERMISSIVE (workload foo/finance)" ; "port UNSET inherits the workload")]
#[test_case(&[("foo/finance", "{selector: {matchLabels: {app: finance}}, mtls: {mode: PERMISSIVE}, portLevelMtls: {'8080': {mode: STRICT}}}")], "foo", "finance", 8080, "STRICT (port foo/finance)" ; "port STRICT under a PERMISSIVE workload")]
#[test_case(&[("foo/finance", "{selector: {matchLabels: {app: finance}}, portLevelMtls: {'8080': {mode: STRICT}}}"), ("istio-system/default", PERMISSIVE)], "foo", "finance", 9090, "PERMISSIVE (mesh istio-system/default)" ; "workload without mtls inherits the mesh")]
#[test_case(&[("istio-system/default", MESH_STRICT), ("istio-system/finance", "{selector: {matchLabels: {app: finance}}, mtls: {mode: DISABLE}}")], "foo", "finance", 8080, "STRICT (mesh istio-system/default)" ; "a selector policy in the root namespace applies to no workload")]
#[test_case(&[("istio-system/default", MESH_STRICT), ("foo/finance", "{selector: {matchLabels: {app: finance}}, mtls: {mode: DISABLE}}")], "bar", "finance", 8080, "STRICT (mesh istio-system/default)" ; "a workload policy stays in its namespace")]
#[test_case(&[("istio-system/default", MESH_STRICT), ("foo/empty-selector", "{selector: {matchLabels: {}}, mtls: {mode: PERMISSIVE}}")], "foo", "orders", 8080, "PERMISSIVE (namespace foo/empty-selector)" ; "an empty selector is namespace scope")]
#[test_case(&[("foo/b-newer", STRICT), ("foo/a-older", PERMISSIVE)], "foo", "orders", 8080, "PERMISSIVE (namespace foo/a-older)" ; "two namespace policies: the first by name wins")]
#[test_case(&[("foo/b", "{selector: {matchLabels: {app: finance}}, mtls: {mode: STRICT}}"), ("foo/a", "{selector: {matchLabels: {app: finance}}, mtls: {mode: DISABLE}}")], "foo", "finance", 8080, "DISABLE (workload foo/a)" ; "two workload policies: the first by name wins")]
fn precedence(policies: &[(&str, &str)], namespace: &str, app: &str, port: u16, expected: &str) {
    let yaml: String = policies.iter().map(|(key, spec)| pa(key, spec)).collect();
    let parsed = parse_resources(&yaml).unwrap();
    let set = PeerAuthnSet::compile(parsed.peer_authentications(), "istio-system").unwrap();
    let labels = labels(app);
    let resolved = set.resolve(namespace, &labels, port);
    assert_eq!(resolved.to_string(), expected, "source: {REF}");
    assert_eq!(
        set.plaintext_allowed(namespace, &labels, port),
        !expected.starts_with("STRICT"),
        "plaintext_allowed must agree with resolve; source: {REF}"
    );
    assert_eq!(resolved.plaintext_allowed(), !expected.starts_with("STRICT"));
}

#[test]
fn the_root_namespace_is_configurable() {
    let yaml = pa("mesh-root/default", STRICT) + &pa("istio-system/default", PERMISSIVE);
    let parsed = parse_resources(&yaml).unwrap();
    let set = PeerAuthnSet::compile(parsed.peer_authentications(), "mesh-root").unwrap();
    let resolved = set.resolve("foo", &labels("x"), 80);
    assert_eq!(resolved.scope, MtlsScope::Mesh);
    assert!(!set.plaintext_allowed("foo", &labels("x"), 80));
    // istio-system is an ordinary namespace here.
    assert!(set.plaintext_allowed("istio-system", &labels("x"), 80));
}

#[test]
fn an_empty_set_allows_plaintext() {
    let set = PeerAuthnSet::empty();
    assert!(set.plaintext_allowed("foo", &BTreeMap::new(), 15008));
}

#[test]
fn compile_refuses_an_unknown_mode_naming_the_field() {
    // Deserialized directly, so parse_resources' own validation is not what refuses it.
    let policy: PeerAuthentication =
        serde_yaml::from_str("metadata: {name: x, namespace: foo}\nspec: {mtls: {mode: strict}}").unwrap();
    let error = PeerAuthnSet::compile([&policy], "istio-system").unwrap_err();
    assert_eq!(
        error.to_string(),
        "PeerAuthentication foo/x: spec.mtls.mode: unknown mode \"strict\" (UNSET, DISABLE, PERMISSIVE or STRICT)"
    );
}
