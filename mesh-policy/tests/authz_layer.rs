//! `AuthorizeLayer` in front of an HTTP service, as a waypoint stacks it.

#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::{Request, Response, StatusCode};
use mesh_core::SpiffeId;
use mesh_policy::authz::{AuthorizeLayer, ConnectionInfo, PathNormalization, WaypointTarget};
use mesh_policy::{PolicyEngine, PolicySet, resource::parse_resources};
use tower::{Layer, ServiceExt, service_fn};

const POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: readers, namespace: shop}
spec:
  targetRefs: [{kind: Service, name: catalog}]
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]
    to: [{operation: {methods: ["GET"], paths: ["/items*"]}}]
"#;

fn request(method: &str, path: &str, peer: &str, with_context: bool) -> Request<String> {
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://catalog.shop.svc.cluster.local{path}"))
        .body(String::new())
        .unwrap();
    if with_context {
        request.extensions_mut().insert(ConnectionInfo {
            peer: Some(SpiffeId::parse(&format!("spiffe://cluster.local/ns/shop/sa/{peer}")).unwrap()),
            source_ip: "10.0.0.1".parse().unwrap(),
            destination_ip: "10.96.0.10".parse().unwrap(),
            destination_port: 80,
        });
        request.extensions_mut().insert(WaypointTarget {
            namespace: "shop".into(),
            labels: Default::default(),
            gateway: "waypoint".into(),
            gateway_namespace: "shop".into(),
            service: Some(("shop".into(), "catalog".into())),
        });
    }
    request
}

#[tokio::test]
async fn allowed_requests_reach_the_service_and_denied_ones_get_403() {
    let parsed = parse_resources(POLICY).unwrap();
    let engine =
        PolicyEngine::fixed(PolicySet::compile(parsed.authorization_policies(), "istio-system").unwrap());
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let inner = service_fn(move |_request: Request<String>| {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Response::new("catalog".to_owned())) }
    });
    let service = AuthorizeLayer::new(engine, PathNormalization::Base).layer(inner);

    let ok = service
        .clone()
        .oneshot(request("GET", "/items/42", "frontend", true))
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(ok.body(), "catalog");
    for denied in [
        request("DELETE", "/items/42", "frontend", true),
        request("GET", "/admin", "frontend", true),
        request("GET", "/items/../admin", "frontend", true),
        request("GET", "/items/42", "intruder", true),
        // No connection or target in the extensions: fail closed.
        request("GET", "/items/42", "frontend", false),
    ] {
        let response = service.clone().oneshot(denied).await.unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "denied requests never reach the service"
    );
}
