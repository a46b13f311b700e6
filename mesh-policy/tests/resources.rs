//! Reading security resources as `kubectl get -o yaml` prints them, and the exact errors for bad ones.

#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

use mesh_policy::resource::{Action, MtlsMode, Resource, parse_resources};
use test_case::test_case;

#[test]
fn kubectl_list_output_with_unknown_fields_and_other_kinds() {
    // The shape `kubectl get authorizationpolicies,peerauthentications,svc -A -o yaml` prints.
    let yaml = r#"
apiVersion: v1
kind: List
metadata:
  resourceVersion: ""
items:
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata:
    creationTimestamp: "2026-11-20T10:00:00Z"
    generation: 1
    name: allow-read
    namespace: default
    resourceVersion: "12345"
    uid: 0b9e2f7c-0000-4000-8000-000000000001
  spec:
    action: ALLOW
    selector:
      matchLabels:
        app: products
    rules:
    - to:
      - operation:
          methods: ["GET", "HEAD"]
  status:
    conditions:
    - type: ZtunnelAccepted
      status: "True"
- apiVersion: security.istio.io/v1beta1
  kind: PeerAuthentication
  metadata: {name: default, namespace: istio-system}
  spec:
    mtls: {mode: STRICT}
- apiVersion: v1
  kind: Service
  metadata: {name: products, namespace: default}
  spec: {ports: [{port: 80}]}
"#;
    let parsed = parse_resources(yaml).unwrap();
    assert_eq!(parsed.resources.len(), 2);
    assert_eq!(parsed.skipped, 1, "the Service is left to other parsers");
    let policy = parsed.authorization_policies().next().unwrap();
    assert_eq!(policy.metadata.key(), "default/allow-read");
    assert_eq!(policy.action().unwrap(), Action::Allow);
    assert_eq!(policy.spec.rules[0].to[0].operation.methods, ["GET", "HEAD"]);
    let peer = parsed.peer_authentications().next().unwrap();
    assert_eq!(peer.spec.mtls.as_ref().unwrap().mode().unwrap(), MtlsMode::Strict);
}

#[test]
fn several_documents_empty_ones_and_default_namespace() {
    let yaml = r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: one}
spec: {}
---
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: foo}
spec:
  jwtRules:
  - issuer: https://accounts.google.com
    jwksUri: https://www.googleapis.com/oauth2/v3/certs
"#;
    let parsed = parse_resources(yaml).unwrap();
    assert_eq!(parsed.resources.len(), 2);
    match &parsed.resources[0] {
        Resource::AuthorizationPolicy(p) => assert_eq!(p.metadata.key(), "default/one", "namespace defaults"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        parsed
            .request_authentications()
            .next()
            .unwrap()
            .spec
            .jwt_rules
            .len(),
        1
    );
}

fn error(yaml: &str) -> String {
    parse_resources(yaml).unwrap_err().to_string()
}

fn policy(spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: ns}}\nspec:\n{spec}"
    )
}

#[test_case("  action: PERMIT\n", "AuthorizationPolicy ns/p: spec.action: unknown action \"PERMIT\" (ALLOW, DENY, AUDIT or CUSTOM)" ; "unknown action")]
#[test_case("  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.0.0.0/33\"]\n", "AuthorizationPolicy ns/p: spec.rules[0].from[0].source.ipBlocks[0]: \"10.0.0.0/33\" is not an IP address or CIDR" ; "bad cidr")]
#[test_case("  rules:\n  - from:\n    - source:\n        notRemoteIpBlocks: [\"1.2.3.4\", \"x\"]\n", "AuthorizationPolicy ns/p: spec.rules[0].from[0].source.notRemoteIpBlocks[1]: \"x\" is not an IP address or CIDR" ; "bad remote ip")]
#[test_case("  rules:\n  - to:\n    - operation:\n        ports: [\"80\", \"http\"]\n", "AuthorizationPolicy ns/p: spec.rules[0].to[0].operation.ports[1]: \"http\" is not a port (1-65535)" ; "bad port name")]
#[test_case("  rules:\n  - to:\n    - operation:\n        notPorts: [70000]\n", "AuthorizationPolicy ns/p: spec.rules[0].to[0].operation.notPorts[0]: \"70000\" is not a port (1-65535)" ; "port out of range")]
#[test_case("  selector: {matchLabels: {app: a}}\n  targetRefs: [{kind: Service, name: a}]\n", "AuthorizationPolicy ns/p: spec.selector: only one of selector or targetRefs may be set" ; "selector and targetRefs")]
#[test_case("  targetRefs: [{kind: Deployment, group: apps, name: a}]\n", "AuthorizationPolicy ns/p: spec.targetRefs[0]: unsupported target apps/Deployment" ; "bad target kind")]
#[test_case("  targetRefs: [{kind: Service, name: a, namespace: other}]\n", "AuthorizationPolicy ns/p: spec.targetRefs[0].namespace: cross-namespace targets are not allowed" ; "cross namespace target")]
#[test_case("  action: CUSTOM\n", "AuthorizationPolicy ns/p: spec.provider.name: a CUSTOM policy needs a provider" ; "custom without provider")]
#[test_case("  rules:\n  - when:\n    - key: request.method\n      values: [GET]\n", "AuthorizationPolicy ns/p: spec.rules[0].when[0].key: unknown condition key \"request.method\"" ; "unknown condition key")]
#[test_case("  rules:\n  - when:\n    - key: source.ip\n", "AuthorizationPolicy ns/p: spec.rules[0].when[0]: needs values or notValues" ; "condition without values")]
#[test_case("  rules:\n  - when:\n    - key: destination.port\n      values: [\"http\"]\n", "AuthorizationPolicy ns/p: spec.rules[0].when[0].values[0]: \"http\" is not a port (1-65535)" ; "condition port")]
#[test_case("  rules:\n  - from:\n    - source:\n        serviceAccounts: [\"sleep\"]\n", "AuthorizationPolicy ns/p: spec.rules[0].from[0].source.serviceAccounts[0]: \"sleep\" is not <namespace>/<service account>" ; "service account form")]
#[test_case("  rules:\n  - to:\n    - operation:\n        paths: [\"/{**}/foo/{*}\"]\n", "AuthorizationPolicy ns/p: spec.rules[0].to[0].operation.paths[0]: \"/{**}/foo/{*}\" is not a valid path template: {**} must be the last operator" ; "path template rest not last")]
#[test_case("  rules:\n  - from: {source: {}}\n", "AuthorizationPolicy ns/p: spec.rules[0].from: invalid type: map, expected a sequence" ; "wrong yaml type names the field")]
fn invalid_authorization_policies(spec: &str, expected: &str) {
    assert_eq!(error(&policy(spec)), expected);
}

#[test]
fn other_invalid_resources() {
    assert_eq!(
        error(
            "apiVersion: security.istio.io/v2\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: ns}\n"
        ),
        "AuthorizationPolicy ns/p: unsupported apiVersion \"security.istio.io/v2\" (want security.istio.io/v1 or v1beta1)"
    );
    assert_eq!(
        error(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: ns}\nspec: {mtls: {mode: STRICTER}}\n"
        ),
        "PeerAuthentication ns/p: spec.mtls.mode: unknown mode \"STRICTER\" (UNSET, DISABLE, PERMISSIVE or STRICT)"
    );
    assert_eq!(
        error(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: ns}\nspec: {portLevelMtls: {\"8080\": {mode: DISABLE}}}\n"
        ),
        "PeerAuthentication ns/p: spec.portLevelMtls: needs a selector"
    );
    assert_eq!(
        error(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: r, namespace: ns}\nspec: {jwtRules: [{issuer: a, jwks: '{}', jwksUri: 'https://x'}]}\n"
        ),
        "RequestAuthentication ns/r: spec.jwtRules[0].jwks: only one of jwks or jwksUri may be set"
    );
    assert_eq!(
        error(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ok, namespace: ns}\n---\n  - not: [valid\n"
        ),
        "YAML document 1: did not find expected ',' or ']' at line 6 column 1, while parsing a flow sequence at line 5 column 10"
    );
    assert_eq!(
        error("apiVersion: v1\nkind: List\nitems: {a: b}\n"),
        "YAML document 0: `items` of a List must be a sequence"
    );
}

#[test]
fn port_level_mtls_keys_may_be_bare_numbers_as_in_istios_examples() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: finance, namespace: foo}
spec:
  selector: {matchLabels: {app: finance}}
  mtls: {mode: STRICT}
  portLevelMtls:
    8080:
      mode: DISABLE
    "9090":
      mode: PERMISSIVE
"#;
    let parsed = parse_resources(yaml).unwrap();
    let peer = parsed.peer_authentications().next().unwrap();
    assert_eq!(
        peer.spec.port_level_mtls["8080"].mode().unwrap(),
        MtlsMode::Disable
    );
    assert_eq!(
        peer.spec.port_level_mtls["9090"].mode().unwrap(),
        MtlsMode::Permissive
    );
}
