//! Matching mirrors the cases of Istio ztunnel's `src/rbac.rs` tests (same connections, same expectations),
//! and selection and precedence its `assert_rbac`.

use std::net::IpAddr;
use std::sync::{Arc, LazyLock};

use ipnet::IpNet;
use mesh_core::SpiffeId;
use mesh_core::model::Workload;
use test_case::test_case;

use super::*;
use crate::authz::Decision;

static TLS_ID: LazyLock<SpiffeId> =
    LazyLock::new(|| SpiffeId::parse("spiffe://td/ns/namespace/sa/account").unwrap());
static ALT_ID: LazyLock<SpiffeId> =
    LazyLock::new(|| SpiffeId::parse("spiffe://td-alt/ns/ns-alt/sa/sa-alt").unwrap());

fn conn<'a>(source: Option<&'a SpiffeId>, src: &str, dst: &str, port: u16) -> ConnectionAttrs<'a> {
    ConnectionAttrs {
        source,
        source_ip: src.parse().unwrap(),
        destination_ip: dst.parse().unwrap(),
        destination_port: port,
        sni: None,
    }
}

/// ztunnel's three test connections: plaintext, mutual TLS, and mutual TLS from elsewhere.
fn plaintext() -> ConnectionAttrs<'static> {
    conn(None, "127.0.0.1", "127.0.0.2", 8080)
}

fn tls() -> ConnectionAttrs<'static> {
    conn(Some(&TLS_ID), "127.0.0.1", "127.0.0.2", 8080)
}

fn tls_alt() -> ConnectionAttrs<'static> {
    conn(Some(&ALT_ID), "127.0.0.3", "127.0.0.4", 9090)
}

fn exact(s: &str) -> StringMatch {
    StringMatch::Exact(s.into())
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn sa(namespace: &str, service_account: &str) -> ServiceAccountMatch {
    ServiceAccountMatch {
        namespace: namespace.into(),
        service_account: service_account.into(),
    }
}

/// A policy keyed `key` (`namespace/name`).
fn policy(key: &str, scope: L4Scope, action: L4Action, rules: Vec<L4Rule>) -> L4Policy {
    let (namespace, name) = key.split_once('/').unwrap();
    L4Policy {
        name: name.into(),
        namespace: namespace.into(),
        scope,
        action,
        dry_run: false,
        rules,
    }
}

/// A rule with one clause of the given alternatives.
fn rule(matches: Vec<L4Match>) -> L4Rule {
    L4Rule {
        clauses: vec![L4Clause { matches }],
    }
}

/// A rule without clauses: it matches every connection.
fn any() -> L4Rule {
    L4Rule::default()
}

fn ports(ports: &[u16]) -> L4Match {
    L4Match {
        destination_ports: ports.to_vec(),
        ..L4Match::default()
    }
}

fn from_namespace(namespace: &str) -> L4Match {
    L4Match {
        namespaces: vec![exact(namespace)],
        ..L4Match::default()
    }
}

fn matches(m: &L4Match, conn: &ConnectionAttrs<'_>) -> bool {
    policy(
        "ns/p",
        L4Scope::Global,
        L4Action::Allow,
        vec![rule(vec![m.clone()])],
    )
    .matching_rule(conn)
    .is_some()
}

#[test_case(L4Match { namespaces: vec![exact("namespace")], ..L4Match::default() }, [false, true, false]; "namespaces")]
#[test_case(L4Match { not_namespaces: vec![exact("namespace")], ..L4Match::default() }, [true, false, true]; "not namespaces")]
#[test_case(L4Match { service_accounts: vec![sa("namespace", "account")], ..L4Match::default() }, [false, true, false]; "service accounts")]
#[test_case(L4Match { not_service_accounts: vec![sa("namespace", "account")], ..L4Match::default() }, [true, false, true]; "not service accounts")]
#[test_case(L4Match { principals: vec![exact("td/ns/namespace/sa/account")], ..L4Match::default() }, [false, true, false]; "principals")]
#[test_case(L4Match { not_principals: vec![exact("td/ns/namespace/sa/account")], ..L4Match::default() }, [true, false, true]; "not principals")]
#[test_case(L4Match { source_ips: vec![net("127.0.0.1/32")], ..L4Match::default() }, [true, true, false]; "source ips")]
#[test_case(L4Match { not_source_ips: vec![net("127.0.0.1/32")], ..L4Match::default() }, [false, false, true]; "not source ips")]
#[test_case(L4Match { destination_ips: vec![net("127.0.0.2/32")], ..L4Match::default() }, [true, true, false]; "destination ips")]
#[test_case(L4Match { not_destination_ips: vec![net("127.0.0.2/32")], ..L4Match::default() }, [false, false, true]; "not destination ips")]
#[test_case(L4Match { destination_ips: vec![net("127.0.0.1/24")], ..L4Match::default() }, [true, true, true]; "cidr range")]
#[test_case(ports(&[8080]), [true, true, false]; "destination ports")]
#[test_case(L4Match { not_destination_ports: vec![8080], ..L4Match::default() }, [false, false, true]; "not destination ports")]
// Beyond ztunnel's own table: the same rules on the other string kinds and combinations.
#[test_case(L4Match { principals: vec![StringMatch::Presence], ..L4Match::default() }, [false, true, true]; "principal presence needs an identity")]
#[test_case(L4Match { not_principals: vec![StringMatch::Presence], ..L4Match::default() }, [true, false, false]; "not principal presence")]
#[test_case(L4Match { principals: vec![StringMatch::Prefix("".into())], ..L4Match::default() }, [false, true, true]; "empty principal prefix needs an identity")]
#[test_case(L4Match { principals: vec![StringMatch::Prefix("td/".into())], ..L4Match::default() }, [false, true, false]; "principal prefix")]
#[test_case(L4Match { principals: vec![StringMatch::Suffix("/sa/sa-alt".into())], ..L4Match::default() }, [false, false, true]; "principal suffix")]
#[test_case(L4Match { principals: vec![exact("spiffe://td/ns/namespace/sa/account")], ..L4Match::default() }, [false, false, false]; "principals have no scheme")]
#[test_case(L4Match { namespaces: vec![StringMatch::Presence], ..L4Match::default() }, [false, true, true]; "namespace presence")]
#[test_case(L4Match { not_namespaces: vec![StringMatch::Presence], ..L4Match::default() }, [true, false, false]; "not namespace presence")]
// ztunnel tests a plaintext peer's namespace as "", which an empty prefix or exact "" matches.
#[test_case(L4Match { namespaces: vec![StringMatch::Prefix("".into())], ..L4Match::default() }, [true, true, true]; "empty namespace prefix")]
#[test_case(L4Match { namespaces: vec![exact("")], ..L4Match::default() }, [true, false, false]; "empty namespace")]
#[test_case(L4Match { namespaces: vec![StringMatch::Suffix("-alt".into())], ..L4Match::default() }, [false, false, true]; "namespace suffix")]
#[test_case(L4Match { service_accounts: vec![sa("ns-alt", "sa-alt")], ..L4Match::default() }, [false, false, true]; "service account in any trust domain")]
#[test_case(L4Match { service_accounts: vec![sa("namespace", "sa-alt")], ..L4Match::default() }, [false, false, false]; "service account of another namespace")]
#[test_case(L4Match { namespaces: vec![exact("namespace"), exact("ns-alt")], ..L4Match::default() }, [false, true, true]; "any positive value")]
#[test_case(L4Match { not_namespaces: vec![exact("namespace"), exact("ns-alt")], ..L4Match::default() }, [true, false, false]; "no negative value")]
#[test_case(L4Match { source_ips: vec![net("127.0.0.0/8")], not_source_ips: vec![net("127.0.0.3/32")], ..L4Match::default() }, [true, true, false]; "positive and negative")]
#[test_case(L4Match { namespaces: vec![exact("namespace")], destination_ports: vec![9090], ..L4Match::default() }, [false, false, false]; "every kind must hold")]
#[test_case(L4Match { namespaces: vec![exact("namespace")], destination_ports: vec![80, 8080], ..L4Match::default() }, [false, true, false]; "kinds combined")]
#[test_case(L4Match { destination_ports: vec![9090], not_namespaces: vec![exact("namespace")], ..L4Match::default() }, [false, false, true]; "negative with other kind")]
#[test_case(L4Match::default(), [false, false, false]; "empty match matches nothing")]
fn match_fields(m: L4Match, expected: [bool; 3]) {
    let got = [plaintext(), tls(), tls_alt()].map(|c| matches(&m, &c));
    assert_eq!(got, expected, "{m:?} against [plaintext, tls, tls_alt]");
    // The public matchers agree with the policy's.
    assert_eq!([plaintext(), tls(), tls_alt()].map(|c| m.matches(&c)), expected);
}

#[test_case("10.0.0.0/8", "10.1.2.3", true; "v4 inside")]
#[test_case("10.0.0.0/8", "11.0.0.1", false; "v4 outside")]
#[test_case("10.1.2.3/32", "10.1.2.3", true; "v4 host")]
#[test_case("10.1.2.3/8", "10.200.0.1", true; "host bits ignored")]
#[test_case("0.0.0.0/0", "203.0.113.9", true; "v4 everything")]
#[test_case("0.0.0.0/0", "2001:db8::1", false; "v4 range never holds a v6 address")]
#[test_case("::/0", "10.0.0.1", false; "v6 range never holds a v4 address")]
#[test_case("2001:db8::/32", "2001:db8:ffff::1", true; "v6 inside")]
#[test_case("2001:db8::/32", "2001:db9::1", false; "v6 outside")]
#[test_case("2001:db8::1/128", "2001:db8::1", true; "v6 host")]
#[test_case("10.0.0.0/8", "::ffff:10.0.0.1", true; "v4-mapped address is its v4 address")]
#[test_case("::ffff:0:0/96", "::ffff:10.0.0.1", false; "v4-mapped address is not in a v6 range")]
fn ip_ranges(range: &str, ip: &str, expected: bool) {
    let ip: IpAddr = ip.parse().unwrap();
    let at = |source_ip, destination_ip| ConnectionAttrs {
        source: None,
        source_ip,
        destination_ip,
        destination_port: 80,
        sni: None,
    };
    let other: IpAddr = "192.0.2.1".parse().unwrap();
    let source = L4Match {
        source_ips: vec![net(range)],
        ..L4Match::default()
    };
    let destination = L4Match {
        destination_ips: vec![net(range)],
        ..L4Match::default()
    };
    assert_eq!(source.matches(&at(ip, other)), expected, "source");
    assert_eq!(destination.matches(&at(other, ip)), expected, "destination");
    let not_source = L4Match {
        not_source_ips: vec![net(range)],
        ..L4Match::default()
    };
    assert_eq!(not_source.matches(&at(ip, other)), !expected, "not source");
}

#[test_case(exact("foo"), "foo", true; "exact match")]
#[test_case(exact("foo"), "not", false; "exact mismatch")]
#[test_case(exact("foo"), "", false; "exact empty mismatch")]
#[test_case(StringMatch::Prefix("foo".into()), "foobar", true; "prefix match")]
#[test_case(StringMatch::Prefix("foo".into()), "notfoo", false; "prefix mismatch")]
#[test_case(StringMatch::Prefix("foo".into()), "", false; "prefix empty mismatch")]
#[test_case(StringMatch::Suffix("foo".into()), "barfoo", true; "suffix match")]
#[test_case(StringMatch::Suffix("foo".into()), "foonot", false; "suffix mismatch")]
#[test_case(StringMatch::Suffix("foo".into()), "", false; "suffix empty mismatch")]
#[test_case(StringMatch::Presence, "foo", true; "presence match")]
#[test_case(StringMatch::Presence, "", false; "presence mismatch")]
fn string_match(m: StringMatch, value: &str, expected: bool) {
    assert_eq!(m.matches(value), expected);
}

#[test_case(vec![rule(vec![L4Match::default()])], None; "a rule whose only match is empty")]
#[test_case(vec![rule(Vec::new())], Some(0); "a clause without matches")]
#[test_case(vec![any()], Some(0); "a rule without clauses")]
#[test_case(Vec::new(), None; "no rules")]
#[test_case(vec![rule(vec![L4Match::default(), ports(&[8080])])], Some(0); "empty alternatives are skipped")]
#[test_case(vec![rule(vec![ports(&[1])]), rule(vec![ports(&[8080])]), any()], Some(1); "first matching rule")]
fn empty_structures(rules: Vec<L4Rule>, expected: Option<usize>) {
    let p = policy("ns/p", L4Scope::Global, L4Action::Allow, rules);
    assert_eq!(p.matching_rule(&plaintext()), expected);
}

fn spiffe(namespace: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://td/ns/{namespace}/sa/account")).unwrap()
}

#[test]
fn nesting() {
    // (namespace a OR namespace b) AND port 80.
    let p = policy(
        "ns/nested",
        L4Scope::Global,
        L4Action::Allow,
        vec![L4Rule {
            clauses: vec![
                L4Clause {
                    matches: vec![from_namespace("a"), from_namespace("b")],
                },
                L4Clause {
                    matches: vec![ports(&[80])],
                },
            ],
        }],
    );
    let (a, b, bad) = (spiffe("a"), spiffe("b"), spiffe("bad"));
    let at = |id, port| conn(Some(id), "127.0.0.1", "127.0.0.2", port);
    assert_eq!(p.matching_rule(&at(&a, 80)), Some(0));
    assert_eq!(p.matching_rule(&at(&b, 80)), Some(0));
    assert_eq!(p.matching_rule(&at(&bad, 80)), None, "wrong namespace");
    assert_eq!(p.matching_rule(&at(&b, 12345)), None, "wrong port");
    assert!(p.rules[0].clauses[0].matches(&at(&a, 12345)));
    assert!(!p.rules[0].matches(&at(&a, 12345)));
}

#[test]
fn multi_rule() {
    let p = policy(
        "ns/multi",
        L4Scope::Global,
        L4Action::Allow,
        vec![rule(vec![from_namespace("a")]), rule(vec![from_namespace("b")])],
    );
    let (a, b, bad) = (spiffe("a"), spiffe("b"), spiffe("bad"));
    let at = |id| conn(Some(id), "127.0.0.1", "127.0.0.2", 80);
    assert_eq!(p.matching_rule(&at(&a)), Some(0));
    assert_eq!(p.matching_rule(&at(&b)), Some(1));
    assert_eq!(p.matching_rule(&at(&bad)), None);
}

#[test]
fn identity_that_is_not_istio_shaped() {
    // SPIRE may issue paths without /ns/../sa/..: the principal still matches, the namespace is "" and
    // no service account matches.
    let id = SpiffeId::parse("spiffe://td/workload/db").unwrap();
    let c = conn(Some(&id), "10.0.0.1", "10.0.0.2", 5432);
    let principal = L4Match {
        principals: vec![exact("td/workload/db")],
        ..L4Match::default()
    };
    assert!(principal.matches(&c));
    assert!(
        !L4Match {
            namespaces: vec![StringMatch::Presence],
            ..L4Match::default()
        }
        .matches(&c)
    );
    assert!(
        !L4Match {
            service_accounts: vec![sa("workload", "db")],
            ..L4Match::default()
        }
        .matches(&c)
    );
    assert!(
        L4Match {
            not_service_accounts: vec![sa("workload", "db")],
            ..L4Match::default()
        }
        .matches(&c)
    );
}

fn keys(listed: &[&str]) -> Vec<Arc<str>> {
    listed.iter().map(|&k| Arc::from(k)).collect()
}

/// One DENY policy that matches everything, keyed and scoped as given; whether it applies to a workload
/// in `namespace` that lists `listed`.
#[test_case("istio-system/p", L4Scope::Global, "ns1", &[], true; "global applies everywhere")]
#[test_case("ns9/p", L4Scope::Global, "ns1", &[], true; "global is not tied to its namespace")]
#[test_case("ns1/p", L4Scope::Namespace, "ns1", &[], true; "namespace scope in its namespace")]
#[test_case("ns1/p", L4Scope::Namespace, "ns2", &[], false; "namespace scope elsewhere")]
#[test_case("istio-system/p", L4Scope::Namespace, "ns1", &[], false; "namespace scope in the root namespace")]
#[test_case("ns1/p", L4Scope::WorkloadSelector, "ns1", &[], false; "selector not listed")]
#[test_case("ns1/p", L4Scope::WorkloadSelector, "ns1", &["ns1/p"], true; "selector listed")]
#[test_case("ns1/p", L4Scope::WorkloadSelector, "ns1", &["ns1/q", "ns2/p", "p"], false; "other keys listed")]
#[test_case("ns1/p", L4Scope::WorkloadSelector, "ns2", &["ns1/p"], true; "a listed key applies wherever listed")]
#[test_case("ns2/p", L4Scope::Namespace, "ns1", &["ns2/p"], true; "a listed key applies whatever its scope")]
fn scope_selection(key: &str, scope: L4Scope, namespace: &str, listed: &[&str], applies: bool) {
    let set = L4PolicySet::new([policy(key, scope, L4Action::Deny, vec![any()])]);
    let listed = keys(listed);
    let target = L4Target {
        namespace,
        authorization_policies: &listed,
    };
    let evaluation = set.evaluate(&target, &tls());
    if applies {
        assert_eq!(evaluation.decision, Decision::Deny);
        assert_eq!(evaluation.to_string(), format!("denied by {key} rule 0"));
    } else {
        assert_eq!(evaluation.decision, Decision::Allow);
        assert_eq!(evaluation.reason, L4Reason::NoPolicy);
        assert_eq!(evaluation.to_string(), "allowed: no policy applies");
    }
}

/// A mesh of policies for the decision tests: the workload is in `ns1` and lists `ns1/selected`.
fn mesh(extra: Vec<L4Policy>) -> L4PolicySet {
    let mut policies = vec![
        // Mesh-wide: nobody from namespace "blocked".
        policy(
            "istio-system/no-blocked",
            L4Scope::Global,
            L4Action::Deny,
            vec![rule(vec![from_namespace("blocked")])],
        ),
        // Selected: port 9090 from anyone in ns-alt, or port 8080 from namespace.
        policy(
            "ns1/selected",
            L4Scope::WorkloadSelector,
            L4Action::Allow,
            vec![
                rule(vec![L4Match {
                    namespaces: vec![exact("ns-alt")],
                    destination_ports: vec![9090],
                    ..L4Match::default()
                }]),
                rule(vec![L4Match {
                    namespaces: vec![exact("namespace")],
                    destination_ports: vec![8080],
                    ..L4Match::default()
                }]),
            ],
        ),
        // Another namespace's: would deny everything, but does not apply.
        policy("ns2/deny-all", L4Scope::Namespace, L4Action::Deny, vec![any()]),
        // Another workload's selector policy: does not apply either.
        policy(
            "ns1/unlisted",
            L4Scope::WorkloadSelector,
            L4Action::Deny,
            vec![any()],
        ),
    ];
    policies.extend(extra);
    L4PolicySet::new(policies)
}

fn decide(set: &L4PolicySet, c: &ConnectionAttrs<'_>) -> L4Evaluation {
    let listed = keys(&["ns1/selected"]);
    set.evaluate(
        &L4Target {
            namespace: "ns1",
            authorization_policies: &listed,
        },
        c,
    )
}

#[test]
fn allow_policies() {
    let set = mesh(Vec::new());
    assert_eq!(set.len(), 4);
    let allowed = decide(&set, &tls());
    assert!(allowed.is_allowed());
    assert_eq!(allowed.to_string(), "allowed by ns1/selected rule 1");
    let L4Reason::AllowedBy(decided) = &allowed.reason else {
        panic!("{allowed:?}");
    };
    assert_eq!(decided.policy().key(), "ns1/selected");
    assert_eq!(decided.rule(), 1);
    assert_eq!(allowed.dry_run, None);

    assert_eq!(
        decide(&set, &tls_alt()).to_string(),
        "allowed by ns1/selected rule 0"
    );
    let denied = decide(&set, &plaintext());
    assert!(!denied.is_allowed());
    assert_eq!(denied.reason, L4Reason::NoAllowMatched { policies: 1 });
    assert_eq!(denied.to_string(), "denied: no ALLOW policy matched (1 applied)");
}

#[test]
fn deny_takes_precedence() {
    let blocked = SpiffeId::parse("spiffe://td/ns/blocked/sa/account").unwrap();
    // An ALLOW that matches everything, and the mesh-wide DENY that matches this peer.
    let set = mesh(vec![policy(
        "ns1/allow-all",
        L4Scope::Namespace,
        L4Action::Allow,
        vec![any()],
    )]);
    let evaluation = decide(&set, &conn(Some(&blocked), "10.0.0.1", "10.0.0.2", 8080));
    assert_eq!(evaluation.decision, Decision::Deny);
    assert_eq!(evaluation.to_string(), "denied by istio-system/no-blocked rule 0");
    assert_eq!(
        decide(&set, &plaintext()).to_string(),
        "allowed by ns1/allow-all rule 0"
    );
}

#[test]
fn explanation_names_the_lowest_key_whatever_the_order() {
    let deny = |key| {
        policy(
            key,
            L4Scope::Namespace,
            L4Action::Deny,
            vec![rule(vec![ports(&[1])]), any()],
        )
    };
    let forward = L4PolicySet::new([deny("ns1/a"), deny("ns1/b"), deny("ns1/c")]);
    let backward = L4PolicySet::new([deny("ns1/c"), deny("ns1/b"), deny("ns1/a")]);
    for set in [forward, backward] {
        assert_eq!(decide(&set, &tls()).to_string(), "denied by ns1/a rule 1");
    }
}

#[test]
fn counts_and_explanations() {
    let allow_port = |key, port| {
        policy(
            key,
            L4Scope::Namespace,
            L4Action::Allow,
            vec![rule(vec![ports(&[port])])],
        )
    };
    // Two namespace ALLOWs plus the listed one: three apply, none matches port 8080 from ns-alt.
    let set = mesh(vec![allow_port("ns1/a", 1), allow_port("ns1/b", 2)]);
    assert_eq!(
        decide(&set, &tls_alt()).to_string(),
        "allowed by ns1/selected rule 0"
    );
    let from_alt_8080 = conn(Some(&ALT_ID), "127.0.0.3", "127.0.0.4", 8080);
    assert_eq!(
        decide(&set, &from_alt_8080).to_string(),
        "denied: no ALLOW policy matched (3 applied)"
    );
    // A DENY that applies but does not match, and no ALLOW.
    let only_deny = L4PolicySet::new([policy(
        "ns1/d",
        L4Scope::Namespace,
        L4Action::Deny,
        vec![rule(vec![ports(&[1])])],
    )]);
    let evaluation = decide(&only_deny, &tls());
    assert_eq!(evaluation.reason, L4Reason::NoAllowPolicy { deny_policies: 1 });
    assert_eq!(
        evaluation.to_string(),
        "allowed: no ALLOW policy applies and no DENY policy matched (1 applied)"
    );
    // An empty set allows everything.
    let empty = L4PolicySet::default();
    assert!(empty.is_empty());
    assert_eq!(
        decide(&empty, &plaintext()).to_string(),
        "allowed: no policy applies"
    );
}

#[test]
fn a_policy_found_twice_counts_once() {
    // A namespace policy that the workload also lists, and a global one listed too.
    let set = L4PolicySet::new([
        policy(
            "ns1/a",
            L4Scope::Namespace,
            L4Action::Allow,
            vec![rule(vec![ports(&[1])])],
        ),
        policy(
            "istio-system/g",
            L4Scope::Global,
            L4Action::Allow,
            vec![rule(vec![ports(&[2])])],
        ),
    ]);
    let listed = keys(&["ns1/a", "istio-system/g"]);
    let evaluation = set.evaluate(
        &L4Target {
            namespace: "ns1",
            authorization_policies: &listed,
        },
        &tls(),
    );
    assert_eq!(
        evaluation.to_string(),
        "denied: no ALLOW policy matched (2 applied)"
    );
}

fn dry(mut p: L4Policy) -> L4Policy {
    p.dry_run = true;
    p
}

#[test_case(
    vec![dry(policy("ns1/d", L4Scope::Namespace, L4Action::Deny, vec![any()]))],
    Decision::Allow, Decision::Deny,
    "allowed: no policy applies; dry-run: DENY ns1/d rule 0 matches; if enforced: denied";
    "dry-run deny is not enforced"
)]
#[test_case(
    vec![dry(policy("ns1/a", L4Scope::Namespace, L4Action::Allow, vec![rule(vec![ports(&[1])])]))],
    Decision::Allow, Decision::Deny,
    "allowed: no policy applies; dry-run: no ALLOW policy matched (1 applied); if enforced: denied";
    "dry-run allow does not count as an allow policy"
)]
#[test_case(
    vec![
        dry(policy("ns1/a", L4Scope::Namespace, L4Action::Allow, vec![rule(vec![ports(&[1])]), any()])),
        policy("ns1/e", L4Scope::Namespace, L4Action::Allow, vec![rule(vec![ports(&[2])])]),
    ],
    Decision::Deny, Decision::Allow,
    "denied: no ALLOW policy matched (1 applied); dry-run: ALLOW ns1/a rule 1 matches; if enforced: allowed";
    "dry-run allow does not allow"
)]
#[test_case(
    vec![
        dry(policy("ns1/d", L4Scope::Namespace, L4Action::Deny, vec![any()])),
        policy("ns1/e", L4Scope::Namespace, L4Action::Deny, vec![any()]),
    ],
    Decision::Deny, Decision::Deny,
    "denied by ns1/e rule 0; dry-run: DENY ns1/d rule 0 matches; if enforced: denied";
    "both deny"
)]
#[test_case(
    vec![
        dry(policy("ns1/d", L4Scope::Namespace, L4Action::Deny, vec![rule(vec![ports(&[1])])])),
        dry(policy("ns1/a", L4Scope::Namespace, L4Action::Allow, vec![any()])),
        policy("ns1/e", L4Scope::Namespace, L4Action::Allow, vec![any()]),
    ],
    Decision::Allow, Decision::Allow,
    "allowed by ns1/e rule 0; dry-run: no DENY policy matched (1 applied), ALLOW ns1/a rule 0 matches; \
     if enforced: allowed";
    "nothing would change"
)]
#[test_case(
    vec![dry(policy("ns2/d", L4Scope::Namespace, L4Action::Deny, vec![any()]))],
    Decision::Allow, Decision::Allow,
    "allowed: no policy applies";
    "dry-run policy that does not apply"
)]
fn dry_run(policies: Vec<L4Policy>, decision: Decision, if_enforced: Decision, text: &str) {
    let set = L4PolicySet::new(policies);
    let evaluation = decide(&set, &tls());
    assert_eq!(evaluation.decision, decision);
    assert_eq!(
        evaluation.dry_run.as_ref().map_or(decision, |d| d.decision),
        if_enforced
    );
    assert_eq!(evaluation.to_string(), text);
}

#[test]
fn a_later_policy_with_the_same_key_replaces_the_earlier() {
    let set = L4PolicySet::new([
        policy("ns1/p", L4Scope::Namespace, L4Action::Deny, vec![any()]),
        policy(
            "ns1/p",
            L4Scope::Namespace,
            L4Action::Allow,
            vec![rule(vec![ports(&[1])])],
        ),
    ]);
    assert_eq!(set.len(), 1);
    assert_eq!(set.get("ns1/p").unwrap().action, L4Action::Allow);
    assert_eq!(set.iter().count(), 1);
    assert_eq!(
        decide(&set, &tls()).to_string(),
        "denied: no ALLOW policy matched (1 applied)"
    );
}

#[test]
fn shared_policies_and_workload_targets() {
    // The Arcs an xDS watch holds go in as they are.
    let shared = Arc::new(policy(
        "ns1/selected",
        L4Scope::WorkloadSelector,
        L4Action::Deny,
        vec![rule(vec![ports(&[8080])])],
    ));
    let set = L4PolicySet::new([shared.clone()]);
    assert!(Arc::ptr_eq(set.get("ns1/selected").unwrap(), &shared));

    let mut workload = Workload::new("uid", "server", "ns1");
    assert!(set.evaluate(&L4Target::from(&workload), &tls()).is_allowed());
    workload.authorization_policies = keys(&["ns1/selected"]);
    let evaluation = set.evaluate(&(&workload).into(), &tls());
    assert_eq!(evaluation.to_string(), "denied by ns1/selected rule 0");
    // The explanation holds the policy itself, so it outlives the set.
    drop(set);
    let L4Reason::DeniedBy(decided) = evaluation.reason else {
        panic!("not denied");
    };
    assert!(Arc::ptr_eq(decided.policy(), &shared));
}

#[test]
fn action_names() {
    assert_eq!(L4Action::Allow.as_str(), "ALLOW");
    assert_eq!(L4Action::Deny.as_str(), "DENY");
    assert_eq!(
        policy("default/x", L4Scope::Global, L4Action::Deny, Vec::new()).key(),
        "default/x"
    );
}
