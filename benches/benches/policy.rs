//! Authorization decisions with 10, 1,000 and 10,000 AuthorizationPolicies: L4 (ztunnel) and L7 (waypoint)
//! from Kubernetes resources (`authz_decision`), and L4 from the compiled policies istiod sends ztunnel over
//! xDS (`l4_xds_decision`, `mesh_policy::L4PolicySet`).
//!
//! The policies are spread the way a mesh has them: 10 per namespace (a namespace-wide DENY, selector
//! policies for five apps, waypoint policies or, for xDS, selector policies of other workloads), plus
//! mesh-wide ones in the root namespace. Each decision is for one workload. Before timing, every scenario
//! checks with a counting allocator that a decision allocates nothing, and prints the count. The same-run
//! baseline of each group is a decision against an empty set.
#![allow(missing_docs)]

use std::alloc::System;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::HeaderMap;
use mesh_core::SpiffeId;
use mesh_policy::authz::{ConnectionAttrs, Enforcement, HttpAttrs, PathNormalization, Request, Target};
use mesh_policy::l4::{L4Action, L4Clause, L4Match, L4Rule, L4Scope, StringMatch};
use mesh_policy::{L4Policy, L4PolicySet, L4Target, PolicySet, resource::parse_resources};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// `count` policies: 10 per namespace `ns<i>`, and 5 mesh-wide.
fn policies_yaml(count: usize) -> String {
    let mut yaml = String::new();
    for i in 0..5.min(count) {
        yaml.push_str(&format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: mesh-{i}, namespace: istio-system}}\nspec:\n  action: DENY\n  rules:\n  - from: [{{source: {{namespaces: [\"blocked-{i}\"]}}}}]\n"
        ));
    }
    for i in 5..count {
        let ns = i / 10;
        let name = format!("p{i}");
        let body = match i % 10 {
            0 => {
                "  action: DENY\n  rules:\n  - from: [{source: {ipBlocks: [\"192.0.2.0/24\"]}}]\n".to_owned()
            }
            1..=5 => format!(
                "  selector: {{matchLabels: {{app: app{}}}}}\n  rules:\n  - from: [{{source: {{principals: [\"cluster.local/ns/ns{ns}/sa/client\", \"cluster.local/ns/other/sa/*\"]}}}}]\n    to: [{{operation: {{ports: [\"8080\", \"9090\"]}}}}]\n",
                i % 10
            ),
            _ => format!(
                "  targetRefs: [{{kind: Service, name: svc{}}}]\n  rules:\n  - to: [{{operation: {{methods: [\"GET\"], paths: [\"/api/*\"]}}}}]\n    when: [{{key: \"request.headers[x-tenant]\", values: [\"t{}\"]}}]\n",
                i % 10,
                i % 10
            ),
        };
        yaml.push_str(&format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: ns{ns}}}\nspec:\n{body}"
        ));
    }
    yaml
}

fn compile(count: usize) -> PolicySet {
    let parsed = parse_resources(&policies_yaml(count)).expect("generated policies parse");
    PolicySet::compile(parsed.authorization_policies(), "istio-system").expect("generated policies compile")
}

fn decisions(c: &mut Criterion) {
    let peer = SpiffeId::parse("spiffe://cluster.local/ns/ns1/sa/client").expect("valid id");
    let connection = ConnectionAttrs {
        source: Some(&peer),
        source_ip: "10.0.1.7".parse::<IpAddr>().expect("ip"),
        destination_ip: "10.0.1.9".parse().expect("ip"),
        destination_port: 8080,
        sni: None,
    };
    let labels: BTreeMap<String, String> = [("app", "app1"), ("version", "v1")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut headers = HeaderMap::new();
    headers.insert("x-tenant", "t6".parse().expect("header"));
    let http = HttpAttrs::new(
        "GET",
        "svc6.ns1.svc.cluster.local",
        "/api/v1/items?x=1",
        &headers,
        PathNormalization::Base,
    );
    let l4_target = Target {
        namespace: "ns1",
        labels: &labels,
        enforcement: Enforcement::Ztunnel,
    };
    let l7_target = Target {
        namespace: "ns1",
        labels: &labels,
        enforcement: Enforcement::Waypoint {
            gateway: "waypoint",
            gateway_namespace: "ns1",
            service: Some(("ns1", "svc6")),
        },
    };
    let l4 = Request::l4(connection);
    let l7 = Request {
        connection,
        http: Some(&http),
    };

    let mut group = c.benchmark_group("authz_decision");
    let empty = PolicySet::empty();
    group.bench_function("baseline_empty_set_l4", |b| {
        b.iter(|| black_box(empty.evaluate(&l4_target, &l4)))
    });
    for count in [10, 1_000, 10_000] {
        let set = compile(count);
        for (name, target, request) in [("l4", &l4_target, &l4), ("l7", &l7_target, &l7)] {
            let region = Region::new(GLOBAL);
            let evaluation = set.evaluate(target, request);
            let allocations = region.change().allocations;
            println!("{name} with {count} policies: {evaluation} ({allocations} allocations)");
            assert_eq!(allocations, 0, "a decision must not allocate");
            group.bench_with_input(BenchmarkId::new(name, count), &count, |b, _| {
                b.iter(|| black_box(set.evaluate(target, request)))
            });
        }
    }
    group.finish();
}

/// `count` xDS policies, spread as [`policies_yaml`] spreads resources: 5 global DENYs, then per namespace a
/// namespace-wide DENY, five selector ALLOWs (by principal and port) and four selector DENYs.
fn l4_policies(count: usize) -> Vec<L4Policy> {
    let one_match = |m: L4Match| {
        vec![L4Rule {
            clauses: vec![L4Clause { matches: vec![m] }],
        }]
    };
    let policy = |namespace: String, name: String, scope, action, rules| L4Policy {
        name: name.into(),
        namespace: namespace.into(),
        scope,
        action,
        dry_run: false,
        rules,
    };
    (0..count)
        .map(|i| {
            if i < 5 {
                return policy(
                    "istio-system".into(),
                    format!("mesh-{i}"),
                    L4Scope::Global,
                    L4Action::Deny,
                    one_match(L4Match {
                        namespaces: vec![StringMatch::Exact(format!("blocked-{i}").into())],
                        ..L4Match::default()
                    }),
                );
            }
            let ns = i / 10;
            let (scope, action, m) = match i % 10 {
                0 => (
                    L4Scope::Namespace,
                    L4Action::Deny,
                    L4Match {
                        source_ips: vec!["192.0.2.0/24".parse().expect("net")],
                        ..L4Match::default()
                    },
                ),
                1..=5 => (
                    L4Scope::WorkloadSelector,
                    L4Action::Allow,
                    L4Match {
                        principals: vec![
                            StringMatch::Exact(format!("cluster.local/ns/ns{ns}/sa/client").into()),
                            StringMatch::Prefix("cluster.local/ns/other/sa/".into()),
                        ],
                        destination_ports: vec![8080, 9090],
                        ..L4Match::default()
                    },
                ),
                _ => (
                    L4Scope::WorkloadSelector,
                    L4Action::Deny,
                    L4Match {
                        namespaces: vec![StringMatch::Prefix("blocked".into())],
                        ..L4Match::default()
                    },
                ),
            };
            policy(format!("ns{ns}"), format!("p{i}"), scope, action, one_match(m))
        })
        .collect()
}

fn l4_xds_decisions(c: &mut Criterion) {
    let peer = SpiffeId::parse("spiffe://cluster.local/ns/ns1/sa/client").expect("valid id");
    let connection = ConnectionAttrs {
        source: Some(&peer),
        source_ip: "10.0.1.7".parse::<IpAddr>().expect("ip"),
        destination_ip: "10.0.1.9".parse().expect("ip"),
        destination_port: 8080,
        sni: None,
    };
    // The workload in ns1 that the selector policies for "app1" and "app2" select (when they exist).
    let listed: Vec<Arc<str>> = vec!["ns1/p11".into(), "ns1/p12".into()];
    let target = L4Target {
        namespace: "ns1",
        authorization_policies: &listed,
    };

    let mut group = c.benchmark_group("l4_xds_decision");
    let empty = L4PolicySet::default();
    group.bench_function("baseline_empty_set", |b| {
        b.iter(|| black_box(empty.evaluate(&target, &connection)))
    });
    for count in [10, 1_000, 10_000] {
        let set = L4PolicySet::new(l4_policies(count));
        let region = Region::new(GLOBAL);
        let evaluation = set.evaluate(&target, &connection);
        let allocations = region.change().allocations;
        println!("l4 xDS with {count} policies: {evaluation} ({allocations} allocations)");
        assert_eq!(allocations, 0, "a decision must not allocate");
        group.bench_with_input(BenchmarkId::new("l4_xds", count), &count, |b, _| {
            b.iter(|| black_box(set.evaluate(&target, &connection)))
        });
    }
    group.finish();
}

criterion_group!(benches, decisions, l4_xds_decisions);
criterion_main!(benches);
