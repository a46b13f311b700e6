use std::sync::Arc;

use prost::Message;
use test_case::test_case;

use super::*;

fn exact(s: &str) -> pb::StringMatch {
    pb::StringMatch {
        match_type: Some(pb::string_match::MatchType::Exact(s.into())),
    }
}

fn cidr(ip: &str, length: u32) -> pb::Address {
    pb::Address {
        address: ip_to_bytes(ip.parse().unwrap()),
        length,
    }
}

/// A policy with one rule, one clause and the given match.
fn policy(m: pb::Match) -> pb::Authorization {
    pb::Authorization {
        name: "p".into(),
        namespace: "ns".into(),
        rules: vec![pb::Rule {
            clauses: vec![pb::Clause { matches: vec![m] }],
        }],
        ..Default::default()
    }
}

#[test]
fn protocols_policy_example() {
    // PROTOCOLS.md 2.2, "the policy example": deny port 5201 from the client's identity.
    let proto = pb::Authorization {
        name: "deny-iperf-from-client".into(),
        namespace: "default".into(),
        scope: pb::Scope::Namespace.into(),
        action: pb::Action::Deny.into(),
        dry_run: false,
        rules: vec![pb::Rule {
            clauses: vec![pb::Clause {
                matches: vec![pb::Match {
                    destination_ports: vec![5201],
                    principals: vec![exact("cluster.local/ns/default/sa/client")],
                    ..Default::default()
                }],
            }],
        }],
    };
    let policy = authorization_from_proto(&proto).unwrap();
    assert_eq!(
        policy,
        XdsAuthorization {
            name: "deny-iperf-from-client".into(),
            namespace: "default".into(),
            scope: AuthzScope::Namespace,
            action: AuthzAction::Deny,
            dry_run: false,
            rules: vec![AuthzRule {
                clauses: vec![AuthzClause {
                    matches: vec![AuthzMatch {
                        destination_ports: vec![5201],
                        principals: vec![StringMatch::Exact("cluster.local/ns/default/sa/client".into())],
                        ..AuthzMatch::default()
                    }],
                }],
            }],
        }
    );
    assert_eq!(policy.key(), "default/deny-iperf-from-client");
    assert_eq!(authorization_to_proto(&policy), proto);
}

fn full_policy() -> XdsAuthorization {
    let s = |v: &str| -> Arc<str> { v.into() };
    XdsAuthorization {
        name: s("full"),
        namespace: s("istio-system"),
        scope: AuthzScope::WorkloadSelector,
        action: AuthzAction::Allow,
        dry_run: true,
        rules: vec![
            AuthzRule {
                clauses: vec![
                    AuthzClause {
                        matches: vec![
                            AuthzMatch {
                                namespaces: vec![StringMatch::Prefix(s("team-")), StringMatch::Presence],
                                not_namespaces: vec![StringMatch::Suffix(s("-test"))],
                                service_accounts: vec![ServiceAccountMatch {
                                    namespace: s("default"),
                                    service_account: s("client"),
                                }],
                                not_service_accounts: vec![ServiceAccountMatch {
                                    namespace: s("default"),
                                    service_account: s("attacker"),
                                }],
                                principals: vec![StringMatch::Exact(s("cluster.local/ns/default/sa/client"))],
                                not_principals: vec![StringMatch::Presence],
                                ..AuthzMatch::default()
                            },
                            AuthzMatch::default(),
                        ],
                    },
                    AuthzClause {
                        matches: vec![AuthzMatch {
                            source_ips: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/64".parse().unwrap()],
                            not_source_ips: vec!["10.1.2.3/32".parse().unwrap()],
                            destination_ips: vec!["0.0.0.0/0".parse().unwrap()],
                            not_destination_ips: vec!["::1/128".parse().unwrap()],
                            destination_ports: vec![80, 65535, 0],
                            not_destination_ports: vec![22],
                            ..AuthzMatch::default()
                        }],
                    },
                ],
            },
            AuthzRule::default(),
        ],
    }
}

#[test]
fn round_trips() {
    for policy in [
        full_policy(),
        XdsAuthorization {
            rules: Vec::new(),
            scope: AuthzScope::Global,
            action: AuthzAction::Deny,
            dry_run: false,
            ..full_policy()
        },
    ] {
        let proto = authorization_to_proto(&policy);
        assert_eq!(authorization_from_proto(&proto).unwrap(), policy);
        let bytes = proto.encode_to_vec();
        assert_eq!(crate::decode_authorization(&bytes).unwrap(), policy);
        crate::__fuzz::convert_authorization(&bytes);
        // proto -> model -> proto is stable too.
        assert_eq!(
            authorization_to_proto(&authorization_from_proto(&proto).unwrap()),
            proto
        );
    }
}

#[test]
fn host_bits_are_kept() {
    // Istio sends single IPs as /32 and /128, and ranges as written; nothing is normalized away.
    let proto = policy(pb::Match {
        source_ips: vec![cidr("10.1.2.3", 8), cidr("2001:db8::1", 128)],
        ..Default::default()
    });
    let converted = authorization_from_proto(&proto).unwrap();
    let ips = &converted.rules[0].clauses[0].matches[0].source_ips;
    assert_eq!(ips[0].to_string(), "10.1.2.3/8");
    assert!(ips[0].contains(&"10.200.0.1".parse::<std::net::IpAddr>().unwrap()));
    assert_eq!(ips[1].to_string(), "2001:db8::1/128");
    assert_eq!(authorization_to_proto(&converted), proto);
}

#[test_case(StringMatch::Exact("a".into()), "a", true)]
#[test_case(StringMatch::Exact("a".into()), "ab", false)]
#[test_case(StringMatch::Prefix("cluster.local/".into()), "cluster.local/ns/a/sa/b", true)]
#[test_case(StringMatch::Prefix("cluster.local/".into()), "other/ns/a", false)]
#[test_case(StringMatch::Suffix("/sa/b".into()), "cluster.local/ns/a/sa/b", true)]
#[test_case(StringMatch::Suffix("/sa/b".into()), "cluster.local/ns/a/sa/c", false)]
#[test_case(StringMatch::Presence, "x", true)]
#[test_case(StringMatch::Presence, "", false)]
fn string_matches(m: StringMatch, value: &str, expected: bool) {
    assert_eq!(m.matches(value), expected);
}

fn match_error(m: pb::Match) -> String {
    authorization_from_proto(&policy(m)).unwrap_err().to_string()
}

#[test_case(
    pb::Match { principals: vec![exact("a"), pb::StringMatch { match_type: None }], ..Default::default() },
    "principals[1].match_type: is not set" ; "string match kind"
)]
#[test_case(
    pb::Match { not_namespaces: vec![pb::StringMatch::default()], ..Default::default() },
    "not_namespaces[0].match_type: is not set" ; "not namespaces"
)]
#[test_case(
    pb::Match { source_ips: vec![pb::Address { address: vec![10, 0, 0].into(), length: 8 }], ..Default::default() },
    "source_ips[0].address: 3 bytes is not an IPv4 or IPv6 address" ; "address bytes"
)]
#[test_case(
    pb::Match { not_destination_ips: vec![cidr("10.0.0.1", 32), cidr("10.0.0.1", 33)], ..Default::default() },
    "not_destination_ips[1].length: prefix length 33 is longer than the 32 bits of the address" ; "v4 prefix"
)]
#[test_case(
    pb::Match { destination_ips: vec![cidr("::1", 300)], ..Default::default() },
    "destination_ips[0].length: prefix length 300 is longer than the 128 bits of the address" ; "v6 prefix"
)]
#[test_case(
    pb::Match { destination_ports: vec![80, 65616], ..Default::default() },
    "destination_ports[1]: 65616 is not a port number (0-65535)" ; "port"
)]
#[test_case(
    pb::Match { not_destination_ports: vec![u32::MAX], ..Default::default() },
    "not_destination_ports[0]: 4294967295 is not a port number (0-65535)" ; "not port"
)]
#[test_case(
    pb::Match {
        service_accounts: vec![pb::ServiceAccountMatch { namespace: String::new(), service_account: "sa".into() }],
        ..Default::default()
    },
    "service_accounts[0].namespace: must not be empty" ; "service account namespace"
)]
#[test_case(
    pb::Match {
        not_service_accounts: vec![pb::ServiceAccountMatch { namespace: "ns".into(), service_account: String::new() }],
        ..Default::default()
    },
    "not_service_accounts[0].serviceAccount: must not be empty" ; "service account name"
)]
fn match_errors(m: pb::Match, expected: &str) {
    assert_eq!(
        match_error(m),
        format!("authorization ns/p: rules[0].clauses[0].matches[0].{expected}")
    );
}

#[test]
fn policy_errors() {
    let error = |p: pb::Authorization| authorization_from_proto(&p).unwrap_err().to_string();
    assert_eq!(
        error(pb::Authorization {
            name: String::new(),
            ..policy(pb::Match::default())
        }),
        "authorization ns/: name: must not be empty"
    );
    assert_eq!(
        error(pb::Authorization {
            scope: 3,
            ..policy(pb::Match::default())
        }),
        "authorization ns/p: scope: 3 is not a known istio.security.Scope value"
    );
    assert_eq!(
        error(pb::Authorization {
            action: 2,
            ..policy(pb::Match::default())
        }),
        "authorization ns/p: action: 2 is not a known istio.security.Action value"
    );
    // The path names the rule and clause too.
    let mut p = policy(pb::Match::default());
    p.rules.push(pb::Rule {
        clauses: vec![
            pb::Clause::default(),
            pb::Clause {
                matches: vec![
                    pb::Match::default(),
                    pb::Match {
                        destination_ports: vec![70000],
                        ..Default::default()
                    },
                ],
            },
        ],
    });
    assert_eq!(
        error(p),
        "authorization ns/p: rules[1].clauses[1].matches[1].destination_ports[0]: 70000 is not a port number \
         (0-65535)"
    );
    let err = crate::decode_authorization(&[0xff]).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("istio.security.Authorization does not decode: "),
        "{err}"
    );
}

#[test]
fn fuzz_entry_point_survives_garbage() {
    for input in [&b""[..], &[0xff; 8], &[0x2a, 0x02, 0x0a, 0x00], &[0x18, 0x07]] {
        crate::__fuzz::convert_authorization(input);
    }
}

#[test]
fn converted_policies_decide_through_mesh_policy() {
    use mesh_core::SpiffeId;
    use mesh_policy::authz::{ConnectionAttrs, Decision};
    use mesh_policy::{L4PolicySet, L4Target};

    // PROTOCOLS.md 2.2's DENY, as bytes off the wire, and a selector ALLOW for one workload that admits
    // the 10.0.0.0/8 range on any port but 22.
    let deny = pb::Authorization {
        name: "deny-iperf-from-client".into(),
        namespace: "default".into(),
        scope: pb::Scope::Namespace.into(),
        action: pb::Action::Deny.into(),
        dry_run: false,
        rules: vec![pb::Rule {
            clauses: vec![pb::Clause {
                matches: vec![pb::Match {
                    destination_ports: vec![5201],
                    principals: vec![exact("cluster.local/ns/default/sa/client")],
                    ..Default::default()
                }],
            }],
        }],
    };
    let allow = pb::Authorization {
        name: "allow-internal".into(),
        namespace: "default".into(),
        scope: pb::Scope::WorkloadSelector.into(),
        action: pb::Action::Allow.into(),
        dry_run: false,
        rules: vec![pb::Rule {
            clauses: vec![pb::Clause {
                matches: vec![pb::Match {
                    source_ips: vec![cidr("10.0.0.0", 8)],
                    not_destination_ports: vec![22],
                    ..Default::default()
                }],
            }],
        }],
    };
    let set = L4PolicySet::new([
        crate::decode_authorization(&deny.encode_to_vec()).unwrap(),
        authorization_from_proto(&allow).unwrap(),
    ]);
    assert_eq!(set.len(), 2);

    let client = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/client").unwrap();
    let other = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/other").unwrap();
    let attrs = |source, ip: &str, port| ConnectionAttrs {
        source,
        source_ip: ip.parse().unwrap(),
        destination_ip: "10.0.0.9".parse().unwrap(),
        destination_port: port,
        sni: None,
    };
    let listed: Vec<Arc<str>> = vec!["default/allow-internal".into()];
    let server = L4Target {
        namespace: "default",
        authorization_policies: &listed,
    };
    let unselected = L4Target {
        namespace: "default",
        authorization_policies: &[],
    };
    let elsewhere = L4Target {
        namespace: "prod",
        authorization_policies: &[],
    };
    for (target, source, ip, port, decision, text) in [
        (
            &server,
            Some(&client),
            "10.0.0.1",
            5201,
            Decision::Deny,
            "denied by default/deny-iperf-from-client rule 0",
        ),
        (
            &server,
            Some(&other),
            "10.0.0.1",
            5201,
            Decision::Allow,
            "allowed by default/allow-internal rule 0",
        ),
        (
            &server,
            Some(&client),
            "10.0.0.1",
            5202,
            Decision::Allow,
            "allowed by default/allow-internal rule 0",
        ),
        (
            &server,
            Some(&other),
            "10.0.0.1",
            22,
            Decision::Deny,
            "denied: no ALLOW policy matched (1 applied)",
        ),
        (
            &server,
            None,
            "192.0.2.1",
            80,
            Decision::Deny,
            "denied: no ALLOW policy matched (1 applied)",
        ),
        (
            &unselected,
            None,
            "192.0.2.1",
            80,
            Decision::Allow,
            "allowed: no ALLOW policy applies and no DENY policy matched (1 applied)",
        ),
        (
            &elsewhere,
            Some(&client),
            "10.0.0.1",
            5201,
            Decision::Allow,
            "allowed: no policy applies",
        ),
    ] {
        let evaluation = set.evaluate(target, &attrs(source, ip, port));
        assert_eq!(evaluation.decision, decision, "{text}");
        assert_eq!(evaluation.to_string(), text);
    }
}
