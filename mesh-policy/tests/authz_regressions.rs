//! Regressions for defects found in review, each named by what went wrong.

#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http::{HeaderMap, HeaderValue, Request as HttpRequest, Response};
use mesh_core::SpiffeId;
use mesh_policy::authz::{
    AuthorizeLayer, ConnectionAttrs, ConnectionInfo, Enforcement, HttpAttrs, PathNormalization, Request,
    Target, WaypointTarget,
};
use mesh_policy::{PolicyEngine, PolicySet, resource::parse_resources};
use tower::{Layer, ServiceExt, service_fn};

fn set(yaml: &str) -> PolicySet {
    PolicySet::compile(
        parse_resources(yaml).unwrap().authorization_policies(),
        "istio-system",
    )
    .unwrap()
}

fn connection(peer: &SpiffeId) -> ConnectionAttrs<'_> {
    ConnectionAttrs {
        source: Some(peer),
        source_ip: "10.0.0.1".parse().unwrap(),
        destination_ip: "10.0.0.2".parse().unwrap(),
        destination_port: 8080,
        sni: None,
    }
}

#[test]
fn a_waypoint_enforces_policies_on_its_gateway_in_another_namespace() {
    // A waypoint in namespace `waypoints` serving a workload in namespace `app`.
    let policies = set(r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: waypoints}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}]
  action: DENY
  rules: [{}]
"#);
    let peer = SpiffeId::parse("spiffe://cluster.local/ns/app/sa/client").unwrap();
    let headers = HeaderMap::new();
    let http = HttpAttrs::new("GET", "svc.app", "/", &headers, PathNormalization::Base);
    let labels = BTreeMap::new();
    let evaluation = policies.evaluate(
        &Target {
            namespace: "app",
            labels: &labels,
            enforcement: Enforcement::Waypoint {
                gateway: "wp",
                gateway_namespace: "waypoints",
                service: Some(("app", "svc")),
            },
        },
        &Request {
            connection: connection(&peer),
            http: Some(&http),
        },
    );
    assert!(!evaluation.is_allowed(), "{evaluation}");
}

#[test]
fn repeated_headers_are_matched_joined_as_envoy_does() {
    let policies = set(r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: tenant-a, namespace: app}
spec:
  targetRefs: [{kind: Service, name: svc}]
  rules:
  - when: [{key: "request.headers[x-tenant]", values: ["tenant-a"]}]
"#);
    let peer = SpiffeId::parse("spiffe://cluster.local/ns/app/sa/client").unwrap();
    let labels = BTreeMap::new();
    let decide = |copies: &[&'static str]| {
        let mut headers = HeaderMap::new();
        for copy in copies {
            headers.append("x-tenant", HeaderValue::from_static(copy));
        }
        let http = HttpAttrs::new("GET", "svc.app", "/", &headers, PathNormalization::Base);
        policies
            .evaluate(
                &Target {
                    namespace: "app",
                    labels: &labels,
                    enforcement: Enforcement::Waypoint {
                        gateway: "wp",
                        gateway_namespace: "app",
                        service: Some(("app", "svc")),
                    },
                },
                &Request {
                    connection: connection(&peer),
                    http: Some(&http),
                },
            )
            .is_allowed()
    };
    assert!(decide(&["tenant-a"]));
    assert!(
        !decide(&["tenant-a", "tenant-b"]),
        "a second copy must not ride on the first"
    );
}

#[test]
fn a_condition_key_with_stray_whitespace_is_refused_not_left_unvalidated() {
    let error = parse_resources(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: ns}
spec:
  rules:
  - when: [{key: "source.ip ", values: ["10.9.9.9/32x"]}]
"#,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        error,
        "AuthorizationPolicy ns/p: spec.rules[0].when[0].key: unknown condition key \"source.ip \""
    );
}

#[tokio::test]
async fn the_waypoint_forwards_the_path_it_authorized() {
    let policies = set(r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: items, namespace: app}
spec:
  targetRefs: [{kind: Service, name: svc}]
  rules:
  - to: [{operation: {paths: ["/a/*"]}}]
"#);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let inner = service_fn(move |request: HttpRequest<String>| {
        record.lock().unwrap().push(request.uri().to_string());
        async { Ok::<_, Infallible>(Response::new(String::new())) }
    });
    let service = AuthorizeLayer::new(PolicyEngine::fixed(policies), PathNormalization::Base).layer(inner);
    let mut request = HttpRequest::builder()
        .uri("http://svc.app/a/x/../admin/../b?q=1")
        .body(String::new())
        .unwrap();
    request.extensions_mut().insert(ConnectionInfo {
        peer: Some(SpiffeId::parse("spiffe://cluster.local/ns/app/sa/client").unwrap()),
        source_ip: "10.0.0.1".parse().unwrap(),
        destination_ip: "10.0.0.2".parse().unwrap(),
        destination_port: 80,
    });
    request.extensions_mut().insert(WaypointTarget {
        namespace: "app".into(),
        labels: BTreeMap::new(),
        gateway: "wp".into(),
        gateway_namespace: "app".into(),
        service: Some(("app".into(), "svc".into())),
    });
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    assert_eq!(*seen.lock().unwrap(), ["http://svc.app/a/b?q=1"]);
}
