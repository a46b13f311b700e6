//! AuthorizationPolicy semantics against istio.io's documentation. Each case names its source:
//! - "ref": istio.io/latest/docs/reference/config/security/authorization-policy/ (the reference page)
//! - "conditions": istio.io/latest/docs/reference/config/security/conditions/
//! - "concepts": istio.io/latest/docs/concepts/security/#authorization (evaluation order, implicit enablement)
//! - "l4": istio.io/latest/docs/ambient/usage/l4-policy/ (what ztunnel enforces)

#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::net::IpAddr;

use http::{HeaderMap, HeaderValue};
use mesh_core::SpiffeId;
use mesh_policy::authz::{
    AuthInfo, ConnectionAttrs, Enforcement, HttpAttrs, PathNormalization, Request, Target,
};
use mesh_policy::{Decision, PolicySet, resource::parse_resources};

/// A request as a test case describes it.
#[derive(Clone)]
struct Req {
    principal: Option<&'static str>,
    source_ip: &'static str,
    dest_ip: &'static str,
    port: u16,
    method: &'static str,
    path: &'static str,
    host: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    jwt: Option<serde_json::Value>,
    remote_ip: Option<&'static str>,
    sni: Option<&'static str>,
}

impl Default for Req {
    fn default() -> Self {
        Req {
            principal: Some("cluster.local/ns/default/sa/sleep"),
            source_ip: "10.0.0.1",
            dest_ip: "10.0.0.2",
            port: 8000,
            method: "GET",
            path: "/",
            host: "httpbin.foo.svc.cluster.local",
            headers: Vec::new(),
            jwt: None,
            remote_ip: None,
            sni: None,
        }
    }
}

fn from(principal: &'static str) -> Req {
    Req {
        principal: Some(principal),
        ..Req::default()
    }
}

/// Where the case is enforced.
#[derive(Clone, Copy, PartialEq)]
enum At {
    /// A waypoint in the workload's namespace named `waypoint`, with full L7 evaluation.
    Waypoint,
    /// ztunnel: L4 only.
    Ztunnel,
}

fn decide(
    yaml: &str,
    namespace: &str,
    labels: &[(&str, &str)],
    at: At,
    req: &Req,
) -> mesh_policy::Evaluation {
    let parsed = parse_resources(yaml).unwrap();
    let set = PolicySet::compile(parsed.authorization_policies(), "istio-system").unwrap();
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let peer = req
        .principal
        .map(|p| SpiffeId::parse(&format!("spiffe://{p}")).unwrap());
    let mut headers = HeaderMap::new();
    for (name, value) in &req.headers {
        headers.append(*name, HeaderValue::from_static(value));
    }
    let auth = req.jwt.as_ref().map(|claims| AuthInfo {
        principal: format!(
            "{}/{}",
            claims["iss"].as_str().unwrap_or_default(),
            claims["sub"].as_str().unwrap_or_default()
        ),
        audiences: match &claims["aud"] {
            serde_json::Value::String(s) => vec![s.clone()],
            serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
            _ => vec![],
        },
        presenter: claims["azp"].as_str().map(str::to_owned),
        claims: claims.clone(),
    });
    let mut http = HttpAttrs::new(req.method, req.host, req.path, &headers, PathNormalization::Base);
    http.remote_ip = req.remote_ip.map(|ip| ip.parse().unwrap());
    http.auth = auth.as_ref();
    let request = Request {
        connection: ConnectionAttrs {
            source: peer.as_ref(),
            source_ip: req.source_ip.parse::<IpAddr>().unwrap(),
            destination_ip: req.dest_ip.parse().unwrap(),
            destination_port: req.port,
            sni: req.sni,
        },
        http: (at == At::Waypoint).then_some(&http),
    };
    let enforcement = match at {
        At::Waypoint => Enforcement::Waypoint {
            gateway: "waypoint",
            gateway_namespace: namespace,
            service: Some((namespace, "httpbin")),
        },
        At::Ztunnel => Enforcement::Ztunnel,
    };
    set.evaluate(
        &Target {
            namespace,
            labels: &labels,
            enforcement,
        },
        &request,
    )
}

/// Attaches a plain (selector-less) policy body to the waypoint, so L7 fields are evaluated.
fn at_waypoint(body: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: httpbin, namespace: foo}}\nspec:\n  targetRefs:\n  - {{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}\n{body}"
    )
}

const REF_ALLOW_EXAMPLE: &str = r#"
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
    - source:
        namespaces: ["test"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/info*"]
    - operation:
        methods: ["POST"]
        paths: ["/data"]
    when:
    - key: request.auth.claims[iss]
      values: ["https://accounts.google.com"]
"#;

fn google_jwt() -> Option<serde_json::Value> {
    Some(serde_json::json!({"iss": "https://accounts.google.com", "sub": "alice"}))
}

#[test]
fn ref_first_example_allow_sleep_or_test_namespace_get_info_post_data_with_google_jwt() {
    let yaml = at_waypoint(REF_ALLOW_EXAMPLE);
    let cases: Vec<(&str, Req, Decision)> = vec![
        (
            "sleep GET /info with google JWT",
            Req {
                path: "/info",
                jwt: google_jwt(),
                ..Req::default()
            },
            Decision::Allow,
        ),
        (
            "sleep GET /info/sub (prefix)",
            Req {
                path: "/info/sub",
                jwt: google_jwt(),
                ..Req::default()
            },
            Decision::Allow,
        ),
        (
            "test namespace POST /data",
            Req {
                method: "POST",
                path: "/data",
                jwt: google_jwt(),
                ..from("cluster.local/ns/test/sa/any")
            },
            Decision::Allow,
        ),
        (
            "POST /data/x is not /data",
            Req {
                method: "POST",
                path: "/data/x",
                jwt: google_jwt(),
                ..Req::default()
            },
            Decision::Deny,
        ),
        (
            "POST /info is not allowed",
            Req {
                method: "POST",
                path: "/info",
                jwt: google_jwt(),
                ..Req::default()
            },
            Decision::Deny,
        ),
        (
            "no JWT",
            Req {
                path: "/info",
                ..Req::default()
            },
            Decision::Deny,
        ),
        (
            "JWT from another issuer",
            Req {
                path: "/info",
                jwt: Some(serde_json::json!({"iss": "https://evil", "sub": "x"})),
                ..Req::default()
            },
            Decision::Deny,
        ),
        (
            "other namespace",
            Req {
                path: "/info",
                jwt: google_jwt(),
                ..from("cluster.local/ns/other/sa/sleep")
            },
            Decision::Deny,
        ),
        (
            "lower-case get must not pass a GET rule (HTTP/2 method is verbatim)",
            Req {
                method: "get",
                path: "/info",
                jwt: google_jwt(),
                ..Req::default()
            },
            Decision::Deny,
        ),
        (
            "/x/../info normalizes to /info",
            Req {
                path: "/x/../info",
                jwt: google_jwt(),
                ..Req::default()
            },
            Decision::Allow,
        ),
    ];
    for (name, req, expected) in cases {
        let evaluation = decide(&yaml, "foo", &[], At::Waypoint, &req);
        assert_eq!(
            evaluation.final_decision(),
            expected,
            "ref example 1: {name}: {evaluation}"
        );
    }
}

#[test]
fn ref_deny_post_from_dev_namespace() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin, namespace: foo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules:
  - from:
    - source:
        namespaces: ["dev"]
    to:
    - operation:
        methods: ["POST"]
"#;
    let dev = "cluster.local/ns/dev/sa/app";
    let post_from_dev = decide(
        yaml,
        "foo",
        &[],
        At::Waypoint,
        &Req {
            method: "POST",
            ..from(dev)
        },
    );
    assert_eq!(post_from_dev.final_decision(), Decision::Deny);
    assert_eq!(
        post_from_dev.to_string(),
        "denied by foo/httpbin rule 0: source.namespace dev matched"
    );
    assert!(
        decide(
            yaml,
            "foo",
            &[],
            At::Waypoint,
            &Req {
                method: "GET",
                ..from(dev)
            }
        )
        .is_allowed()
    );
    assert!(
        decide(
            yaml,
            "foo",
            &[],
            At::Waypoint,
            &Req {
                method: "POST",
                ..Req::default()
            }
        )
        .is_allowed()
    );
}

#[test]
fn ref_audit_marks_without_deciding() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-profile, namespace: foo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: AUDIT
  rules:
  - to:
    - operation:
        methods: ["GET"]
        paths: ["/user/profile/*"]
"#;
    let audited = decide(
        yaml,
        "foo",
        &[],
        At::Waypoint,
        &Req {
            path: "/user/profile/1",
            ..Req::default()
        },
    );
    assert!(audited.is_allowed(), "AUDIT never changes the decision");
    assert_eq!(
        audited.audit.as_ref().map(|a| a.policy()),
        Some("foo/audit-profile")
    );
    let not_audited = decide(
        yaml,
        "foo",
        &[],
        At::Waypoint,
        &Req {
            path: "/other",
            ..Req::default()
        },
    );
    assert!(not_audited.audit.is_none());
}

#[test]
fn ref_allow_read_with_selector_applies_only_to_selected_workloads() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-read, namespace: default}
spec:
  selector:
    matchLabels:
      app: products
  action: ALLOW
  rules:
  - to:
    - operation:
        ports: ["8000"]
"#;
    // At ztunnel, the selector picks the workload; ports are L4.
    let products = [("app", "products")];
    assert!(decide(yaml, "default", &products, At::Ztunnel, &Req::default()).is_allowed());
    let other_port = decide(
        yaml,
        "default",
        &products,
        At::Ztunnel,
        &Req {
            port: 9000,
            ..Req::default()
        },
    );
    assert_eq!(
        other_port.to_string(),
        "denied: 1 ALLOW policy applies and does not match"
    );
    // Another workload in the namespace is not selected: no ALLOW policy applies.
    let reviews = decide(
        yaml,
        "default",
        &[("app", "reviews")],
        At::Ztunnel,
        &Req {
            port: 9000,
            ..Req::default()
        },
    );
    assert!(reviews.is_allowed());
    assert_eq!(reviews.to_string(), "allowed: no ALLOW policy applies");
    // Another namespace: not in scope.
    assert!(
        decide(
            yaml,
            "other",
            &products,
            At::Ztunnel,
            &Req {
                port: 9000,
                ..Req::default()
            }
        )
        .is_allowed()
    );
}

#[test]
fn ref_allow_nothing_deny_all_allow_all() {
    let policy = |name: &str, spec: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: foo}}\nspec: {spec}\n"
        )
    };
    // "allow-nothing": an ALLOW policy with no rules matches nothing, so everything is denied.
    let allow_nothing = policy("allow-nothing", "{action: ALLOW}");
    assert!(!decide(&allow_nothing, "foo", &[], At::Ztunnel, &Req::default()).is_allowed());
    // `spec: {}` is the same (ALLOW is the default action).
    assert!(!decide(&policy("empty", "{}"), "foo", &[], At::Ztunnel, &Req::default()).is_allowed());
    // "deny-all": a DENY policy with an empty rule matches everything.
    let deny_all = policy("deny-all", "{action: DENY, rules: [{}]}");
    let evaluation = decide(&deny_all, "foo", &[], At::Ztunnel, &Req::default());
    assert_eq!(
        evaluation.to_string(),
        "denied by foo/deny-all rule 0: rule {} (matches everything) matched"
    );
    // "allow-all": an ALLOW policy with an empty rule, which also wins over allow-nothing.
    let both = format!(
        "{allow_nothing}---\n{}",
        policy("allow-all", "{action: ALLOW, rules: [{}]}")
    );
    assert!(decide(&both, "foo", &[], At::Ztunnel, &Req::default()).is_allowed());
    // A DENY policy with no rules never matches.
    assert!(
        decide(
            &policy("deny-none", "{action: DENY}"),
            "foo",
            &[],
            At::Ztunnel,
            &Req::default()
        )
        .is_allowed()
    );
}

#[test]
fn concepts_deny_wins_over_allow_and_root_namespace_is_mesh_wide() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: foo}
spec: {rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: global-deny-ext, namespace: istio-system}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: ["ext"]}}]
"#;
    let ext = decide(yaml, "foo", &[], At::Ztunnel, &from("cluster.local/ns/ext/sa/x"));
    assert_eq!(
        ext.to_string(),
        "denied by istio-system/global-deny-ext rule 0: source.namespace ext matched"
    );
    assert!(decide(yaml, "foo", &[], At::Ztunnel, &Req::default()).is_allowed());
    // The mesh-wide policy applies in every namespace.
    assert!(!decide(yaml, "bar", &[], At::Ztunnel, &from("cluster.local/ns/ext/sa/x")).is_allowed());
}

#[test]
fn ref_custom_needs_its_provider() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz, namespace: foo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: CUSTOM
  provider: {name: my-custom-authz}
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
"#;
    let admin = decide(
        yaml,
        "foo",
        &[],
        At::Waypoint,
        &Req {
            path: "/admin/x",
            ..Req::default()
        },
    );
    assert_eq!(
        admin.custom.as_ref().map(|c| &*c.provider),
        Some("my-custom-authz")
    );
    assert!(!admin.is_allowed(), "no authorizer configured: denied");
    assert!(admin.clone().with_external(true).is_allowed());
    let refused = admin.with_external(false);
    assert_eq!(
        refused.to_string(),
        "denied by foo/ext-authz rule 0: external authorizer \"my-custom-authz\" refused"
    );
    assert!(
        decide(
            yaml,
            "foo",
            &[],
            At::Waypoint,
            &Req {
                path: "/public",
                ..Req::default()
            }
        )
        .is_allowed()
    );
}

#[test]
fn ref_source_fields() {
    let case = |source: &str, req: Req| -> bool {
        let yaml = at_waypoint(&format!("  rules:\n  - from:\n    - source: {source}\n"));
        decide(&yaml, "foo", &[], At::Waypoint, &req).is_allowed()
    };
    let ns = |n: &'static str| from(Box::leak(format!("cluster.local/ns/{n}/sa/x").into_boxed_str()));
    // principals: exact, prefix, suffix, presence ("*" = any authenticated peer).
    assert!(case(
        r#"{principals: ["cluster.local/ns/default/sa/sleep"]}"#,
        Req::default()
    ));
    assert!(case(
        r#"{principals: ["cluster.local/ns/default/*"]}"#,
        Req::default()
    ));
    assert!(case(r#"{principals: ["*/sa/sleep"]}"#, Req::default()));
    assert!(case(r#"{principals: ["*"]}"#, Req::default()));
    assert!(
        !case(
            r#"{principals: ["*"]}"#,
            Req {
                principal: None,
                ..Req::default()
            }
        ),
        "plaintext has no principal"
    );
    assert!(!case(
        r#"{notPrincipals: ["cluster.local/ns/default/sa/sleep"]}"#,
        Req::default()
    ));
    // namespaces / notNamespaces.
    assert!(case(r#"{namespaces: ["default", "test"]}"#, ns("test")));
    assert!(!case(r#"{notNamespaces: ["test"]}"#, ns("test")));
    assert!(case(r#"{notNamespaces: ["test"]}"#, ns("prod")));
    // serviceAccounts (ns/sa).
    assert!(case(r#"{serviceAccounts: ["default/sleep"]}"#, Req::default()));
    assert!(!case(
        r#"{notServiceAccounts: ["default/sleep"]}"#,
        Req::default()
    ));
    // ipBlocks: addresses and CIDRs (ref: "203.0.113.4", "203.0.113.0/24").
    assert!(case(
        r#"{ipBlocks: ["203.0.113.4"]}"#,
        Req {
            source_ip: "203.0.113.4",
            ..Req::default()
        }
    ));
    assert!(case(
        r#"{ipBlocks: ["203.0.113.0/24"]}"#,
        Req {
            source_ip: "203.0.113.200",
            ..Req::default()
        }
    ));
    assert!(!case(
        r#"{notIpBlocks: ["203.0.113.0/24"]}"#,
        Req {
            source_ip: "203.0.113.200",
            ..Req::default()
        }
    ));
    assert!(case(
        r#"{ipBlocks: ["2001:db8::/32"]}"#,
        Req {
            source_ip: "2001:db8::1",
            ..Req::default()
        }
    ));
    // remoteIpBlocks: the original client (X-Forwarded-For), falling back to the peer.
    assert!(case(
        r#"{remoteIpBlocks: ["198.51.100.0/24"]}"#,
        Req {
            remote_ip: Some("198.51.100.7"),
            ..Req::default()
        }
    ));
    assert!(!case(
        r#"{notRemoteIpBlocks: ["198.51.100.0/24"]}"#,
        Req {
            remote_ip: Some("198.51.100.7"),
            ..Req::default()
        }
    ));
    // requestPrincipals: <iss>/<sub> of the JWT (ref: "issuer.example.com/subject").
    let jwt = Some(serde_json::json!({"iss": "issuer.example.com", "sub": "subject"}));
    assert!(case(
        r#"{requestPrincipals: ["issuer.example.com/subject"]}"#,
        Req {
            jwt: jwt.clone(),
            ..Req::default()
        }
    ));
    assert!(case(
        r#"{requestPrincipals: ["*"]}"#,
        Req {
            jwt: jwt.clone(),
            ..Req::default()
        }
    ));
    assert!(
        !case(r#"{requestPrincipals: ["*"]}"#, Req::default()),
        "no JWT, no request principal"
    );
    assert!(!case(
        r#"{notRequestPrincipals: ["issuer.example.com/*"]}"#,
        Req {
            jwt,
            ..Req::default()
        }
    ));
}

#[test]
fn ref_operation_fields() {
    let case = |operation: &str, req: Req| -> bool {
        let yaml = at_waypoint(&format!("  rules:\n  - to:\n    - operation: {operation}\n"));
        decide(&yaml, "foo", &[], At::Waypoint, &req).is_allowed()
    };
    // hosts: case-insensitive, with or without port, prefix and suffix forms.
    assert!(case(
        r#"{hosts: ["httpbin.foo.svc.cluster.local"]}"#,
        Req {
            host: "HTTPBIN.foo.svc.cluster.local:8000",
            ..Req::default()
        }
    ));
    assert!(case(r#"{hosts: ["*.foo.svc.cluster.local"]}"#, Req::default()));
    assert!(!case(
        r#"{notHosts: ["httpbin.foo.svc.cluster.local"]}"#,
        Req {
            host: "httpbin.foo.svc.cluster.local:80",
            ..Req::default()
        }
    ));
    // ports / notPorts (strings or numbers).
    assert!(case(r#"{ports: ["8000", 9000]}"#, Req::default()));
    assert!(!case(r#"{notPorts: [8000]}"#, Req::default()));
    // methods are exact and case-sensitive.
    assert!(case(
        r#"{methods: ["GET", "HEAD"]}"#,
        Req {
            method: "HEAD",
            ..Req::default()
        }
    ));
    assert!(!case(
        r#"{methods: ["GET"]}"#,
        Req {
            method: "get",
            ..Req::default()
        }
    ));
    assert!(!case(
        r#"{notMethods: ["DELETE"]}"#,
        Req {
            method: "DELETE",
            ..Req::default()
        }
    ));
    // paths: exact, prefix, suffix, presence; normalized first; query ignored.
    assert!(case(
        r#"{paths: ["/api/v1/*"]}"#,
        Req {
            path: "/api/v1/users?x=1",
            ..Req::default()
        }
    ));
    assert!(case(
        r#"{paths: ["*.js"]}"#,
        Req {
            path: "/static/app.js",
            ..Req::default()
        }
    ));
    assert!(case(r#"{paths: ["*"]}"#, Req::default()));
    assert!(
        !case(
            r#"{paths: ["/public/*"]}"#,
            Req {
                path: "/public/../admin",
                ..Req::default()
            }
        ),
        "dot-dot normalized away"
    );
    assert!(
        !case(
            r#"{notPaths: ["/admin*"]}"#,
            Req {
                path: "/%61dmin",
                ..Req::default()
            }
        ),
        "encoded letters decoded"
    );
    // Path templates (ref, Operation.paths): {*} is one segment, {**} the rest.
    let path = |p: &'static str| Req {
        path: p,
        ..Req::default()
    };
    assert!(case(r#"{paths: ["/foo/{*}"]}"#, path("/foo/bar")));
    assert!(!case(r#"{paths: ["/foo/{*}"]}"#, path("/foo/bar/baz")));
    assert!(case(
        r#"{paths: ["/foo/{*}/bar/{**}"]}"#,
        path("/foo/buzz/bar/baz")
    ));
}

#[test]
fn conditions_page_every_key() {
    let case = |key: &str, values: &str, req: Req| -> bool {
        let yaml = at_waypoint(&format!(
            "  rules:\n  - when:\n    - key: {key}\n      {values}\n"
        ));
        decide(&yaml, "foo", &[], At::Waypoint, &req).is_allowed()
    };
    let with_header = |name: &'static str, value: &'static str| Req {
        headers: vec![(name, value)],
        ..Req::default()
    };
    assert!(case(
        "request.headers[User-Agent]",
        r#"values: ["Mozilla/*"]"#,
        with_header("user-agent", "Mozilla/5.0")
    ));
    assert!(!case(
        "request.headers[User-Agent]",
        r#"values: ["Mozilla/*"]"#,
        with_header("user-agent", "curl/8")
    ));
    assert!(!case(
        "request.headers[User-Agent]",
        r#"notValues: ["curl*"]"#,
        with_header("user-agent", "curl/8")
    ));
    assert!(case(
        "source.ip",
        r#"values: ["10.1.2.3", "10.2.0.0/16"]"#,
        Req {
            source_ip: "10.2.9.9",
            ..Req::default()
        }
    ));
    assert!(case(
        "remote.ip",
        r#"values: ["10.1.2.3"]"#,
        Req {
            remote_ip: Some("10.1.2.3"),
            ..Req::default()
        }
    ));
    assert!(case("source.namespace", r#"values: ["default"]"#, Req::default()));
    assert!(case(
        "source.principal",
        r#"values: ["cluster.local/ns/default/sa/sleep"]"#,
        Req::default()
    ));
    let jwt = Some(serde_json::json!({
        "iss": "accounts.my-svc.com", "sub": "104958560606", "aud": ["my-svc.com", "other"],
        "azp": "123456789012.my-svc.com", "groups": ["admin", "dev"], "nested1": {"nested2": "value"}, "email": "a@foo.com"
    }));
    let j = || Req {
        jwt: jwt.clone(),
        ..Req::default()
    };
    assert!(case(
        "request.auth.principal",
        r#"values: ["accounts.my-svc.com/104958560606"]"#,
        j()
    ));
    assert!(case("request.auth.audiences", r#"values: ["my-svc.com"]"#, j()));
    assert!(case(
        "request.auth.presenter",
        r#"values: ["123456789012.my-svc.com"]"#,
        j()
    ));
    assert!(case(
        "request.auth.claims[email]",
        r#"values: ["*@foo.com"]"#,
        j()
    ));
    assert!(
        case("request.auth.claims[groups]", r#"values: ["admin"]"#, j()),
        "a list claim matches any element"
    );
    assert!(case(
        "request.auth.claims[nested1][nested2]",
        r#"values: ["value"]"#,
        j()
    ));
    assert!(!case(
        "request.auth.claims[nested1][missing]",
        r#"values: ["*"]"#,
        j()
    ));
    assert!(
        !case("request.auth.claims[email]", r#"values: ["*"]"#, Req::default()),
        "no JWT, no claims"
    );
    assert!(case(
        "destination.ip",
        r#"values: ["10.0.0.0/8"]"#,
        Req::default()
    ));
    assert!(case(
        "destination.port",
        r#"values: ["80", "8000"]"#,
        Req::default()
    ));
    assert!(!case(
        "destination.port",
        r#"notValues: ["8000"]"#,
        Req::default()
    ));
    assert!(case(
        "connection.sni",
        r#"values: ["www.example.com"]"#,
        Req {
            sni: Some("www.example.com"),
            ..Req::default()
        }
    ));
}

#[test]
fn l4_allow_rules_with_l7_attributes_never_match_at_ztunnel() {
    // l4: "it fails safe by becoming a DENY policy": the ALLOW rule with methods is dropped at ztunnel, so
    // the workload allows nothing. The same policy at a waypoint behaves as written.
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-get, namespace: foo}
spec:
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}}]
    to: [{operation: {methods: ["GET"]}}]
  - from: [{source: {namespaces: ["trusted"]}}]
"#;
    let sleep = decide(yaml, "foo", &[], At::Ztunnel, &Req::default());
    assert_eq!(sleep.final_decision(), Decision::Deny, "{sleep}");
    // The pure-L4 rule 1 still works at ztunnel, and keeps its index in the explanation.
    let trusted = decide(
        yaml,
        "foo",
        &[],
        At::Ztunnel,
        &from("cluster.local/ns/trusted/sa/x"),
    );
    assert_eq!(
        trusted.to_string(),
        "allowed by foo/allow-get rule 1: source.namespace trusted matched"
    );
}

#[test]
fn l4_deny_rules_with_l7_attributes_deny_more_at_ztunnel() {
    // l4: a DENY rule keeps its L4 part: denying POST from dev becomes denying everything from dev.
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-post-dev, namespace: foo}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: ["dev"]}}]
    to: [{operation: {methods: ["POST"], ports: ["8000"]}}]
    when:
    - key: request.headers[x-debug]
      values: ["1"]
"#;
    let dev_get = decide(yaml, "foo", &[], At::Ztunnel, &from("cluster.local/ns/dev/sa/x"));
    assert_eq!(dev_get.final_decision(), Decision::Deny, "{dev_get}");
    // The port is L4 and stays: another port is not denied.
    let other_port = decide(
        yaml,
        "foo",
        &[],
        At::Ztunnel,
        &Req {
            port: 9000,
            ..from("cluster.local/ns/dev/sa/x")
        },
    );
    assert!(other_port.is_allowed());
    // Without targetRefs the policy is not attached to any waypoint, so a waypoint does not enforce it.
    assert!(
        decide(
            yaml,
            "foo",
            &[],
            At::Waypoint,
            &Req {
                method: "POST",
                ..from("cluster.local/ns/dev/sa/x")
            }
        )
        .is_allowed()
    );
}

#[test]
fn l4_ignores_waypoint_policies_and_waypoints_ignore_selector_policies() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint-only, namespace: foo}
spec:
  targetRefs: [{kind: Service, name: httpbin}]
  action: DENY
  rules: [{}]
"#;
    assert!(decide(yaml, "foo", &[], At::Ztunnel, &Req::default()).is_allowed());
    assert!(
        !decide(yaml, "foo", &[], At::Waypoint, &Req::default()).is_allowed(),
        "attached to the called Service"
    );
    let class = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: all-waypoints, namespace: istio-system}
spec:
  targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"#;
    assert!(
        !decide(
            class,
            "foo",
            &[],
            At::Waypoint,
            &Req {
                path: "/admin",
                ..Req::default()
            }
        )
        .is_allowed()
    );
    assert!(decide(class, "foo", &[], At::Ztunnel, &Req::default()).is_allowed());
}

#[test]
fn dry_run_policies_report_without_enforcing() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-all-trial
  namespace: foo
  annotations: {"istio.io/dry-run": "true"}
spec:
  action: DENY
  rules: [{}]
"#;
    let evaluation = decide(yaml, "foo", &[], At::Ztunnel, &Req::default());
    assert!(evaluation.is_allowed());
    assert_eq!(evaluation.dry_run.len(), 1);
    assert_eq!(evaluation.dry_run[0].matched_rule, Some(0));
    assert_eq!(
        evaluation.to_string(),
        "allowed: no ALLOW policy applies; dry-run DENY foo/deny-all-trial would match rule 0"
    );
}

#[test]
fn index_finds_selector_policies_through_any_label_and_names_a_stable_policy() {
    // concepts: a root-namespace policy with a selector applies to matching workloads in every namespace.
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: z-deny, namespace: foo}
spec:
  selector: {matchLabels: {app: db, tier: data}}
  action: DENY
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a-deny, namespace: istio-system}
spec:
  selector: {matchLabels: {tier: data}}
  action: DENY
  rules: [{}]
"#;
    let both = [("app", "db"), ("tier", "data"), ("version", "v1")];
    let evaluation = decide(yaml, "foo", &both, At::Ztunnel, &Req::default());
    // Both match; the explanation names the first by `namespace/name`, whatever the document order.
    assert!(
        evaluation.to_string().starts_with("denied by foo/z-deny rule 0"),
        "{evaluation}"
    );
    let mut documents: Vec<&str> = yaml.split("---").collect();
    documents.reverse();
    let reversed = documents.join("---\n");
    let evaluation = decide(&reversed, "foo", &both, At::Ztunnel, &Req::default());
    assert!(
        evaluation.to_string().starts_with("denied by foo/z-deny rule 0"),
        "{evaluation}"
    );
    // All of a selector's labels are needed: app=db alone is not enough for z-deny.
    let only_app = decide(yaml, "foo", &[("app", "db")], At::Ztunnel, &Req::default());
    assert!(only_app.is_allowed(), "{only_app}");
    // The root-namespace selector reaches another namespace.
    assert!(!decide(yaml, "bar", &[("tier", "data")], At::Ztunnel, &Req::default()).is_allowed());
}
