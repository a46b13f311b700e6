//! Arbitrary YAML as Istio security resources (`mesh_policy::resource::parse_resources`:
//! AuthorizationPolicy, RequestAuthentication, PeerAuthentication), and, for what compiles, requests
//! built from the input evaluated at ztunnel (L4) and at a waypoint (L7: method, host, path, headers and
//! a verified JWT's principal, audiences and claims).
//!
//! Input: the first 64 bytes (if any) describe the request, the rest is the YAML. Checked: typed errors
//! or decisions, never a panic or a hang; a decision and its reason agree (allowed by an ALLOW match or
//! for want of ALLOW policies, denied by a DENY match, by no ALLOW match, or by an external
//! authorizer); the decision does not depend on the order the policies were listed in; the
//! PeerAuthentication mode a workload resolves to agrees with the fast per-connection check, and is never
//! UNSET; RequestAuthentications compile to an authenticator or a typed error at ztunnel and at a
//! waypoint.
#![no_main]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use mesh_core::SpiffeId;
use mesh_policy::authz::{
    AuthInfo, ConnectionAttrs, Decision, Enforcement, HttpAttrs, PathNormalization, Reason, Request, Target,
};
use mesh_policy::jwt::{JwksCache, JwtAuthenticator};
use mesh_policy::resource::{MtlsMode, parse_resources};
use mesh_policy::{Evaluation, PeerAuthnSet, PolicySet};

const ROOT: &str = "istio-system";

fn consistent(evaluation: &Evaluation) {
    let agrees = matches!(
        (&evaluation.decision, &evaluation.reason),
        (Decision::Allow, Reason::NoAllowPolicy | Reason::AllowedBy(_))
            | (
                Decision::Deny,
                Reason::DeniedBy(_) | Reason::NoAllowMatched { .. } | Reason::ExternalDenied(_)
            )
    );
    assert!(agrees, "decision and reason disagree: {evaluation:?}");
    let _ = evaluation.to_string();
}

fuzz_target!(|data: &[u8]| {
    let (request, yaml) = data.split_at(data.len().min(64));
    let Ok(yaml) = std::str::from_utf8(yaml) else {
        return;
    };
    // The crate's own entry point: parse, compile, evaluate one request at both enforcement points.
    mesh_policy::__fuzz::parse_and_evaluate(yaml, request);

    let Ok(parsed) = parse_resources(yaml) else { return };
    let byte = |i: usize| request.get(i).copied().unwrap_or(0);
    let namespaces = ["ns0", "ns1", ROOT];
    let labels = BTreeMap::from([("app".to_owned(), format!("app{}", byte(0) % 3))]);
    let port = u16::from_be_bytes([byte(6), byte(7)]);

    if let Ok(peer_authn) = PeerAuthnSet::compile(parsed.peer_authentications(), ROOT) {
        for namespace in namespaces {
            for port in [port, 80, 8080] {
                let resolved = peer_authn.resolve(namespace, &labels, port);
                assert_ne!(resolved.mode, MtlsMode::Unset, "{resolved:?}");
                assert_eq!(
                    peer_authn.plaintext_allowed(namespace, &labels, port),
                    resolved.plaintext_allowed(),
                    "the per-connection check disagrees with {resolved}"
                );
            }
        }
    }

    let waypoint = Enforcement::Waypoint {
        gateway: "waypoint",
        gateway_namespace: "ns0",
        service: Some(("ns0", "svc")),
    };
    let cache = JwksCache::without_fetching();
    for enforcement in [Enforcement::Ztunnel, waypoint] {
        let target = Target {
            namespace: "ns0",
            labels: &labels,
            enforcement,
        };
        if let Err(error) = JwtAuthenticator::compile(parsed.request_authentications(), &target, ROOT, &cache)
        {
            let _ = error.to_string();
        }
    }

    let policies: Vec<_> = parsed.authorization_policies().collect();
    let Ok(set) = PolicySet::compile(policies.iter().copied(), ROOT) else {
        return;
    };
    let reversed =
        PolicySet::compile(policies.iter().rev().copied(), ROOT).expect("the same policies compile");
    // The same policy twice (one key) is a stream no cluster can hold: order then decides which is seen.
    let mut keys: Vec<String> = policies.iter().map(|p| p.metadata.key()).collect();
    keys.sort();
    let unique_keys = keys.windows(2).all(|pair| pair[0] != pair[1]);

    // Request text after the first 8 bytes: `METHOD PATH HOST`, then header lines `name: value`.
    let text = String::from_utf8_lossy(request.get(8..).unwrap_or_default()).into_owned();
    let (first, header_lines) = text.split_once('\n').unwrap_or((&text, ""));
    let mut words = first.splitn(3, ' ');
    let method = words.next().unwrap_or("GET");
    let path = words.next().unwrap_or("/");
    let host = words.next().unwrap_or("svc.ns0.svc.cluster.local");
    let mut headers = HeaderMap::new();
    for line in header_lines.lines() {
        if let Some((name, value)) = line.split_once(':')
            && let (Ok(name), Ok(value)) = (
                HeaderName::try_from(name.trim()),
                HeaderValue::try_from(value.trim()),
            )
        {
            headers.append(name, value);
        }
    }
    let principal = format!("spiffe://cluster.local/ns/ns{}/sa/sa{}", byte(1) % 3, byte(2) % 3);
    let peer = SpiffeId::parse(&principal).ok();
    let auth = AuthInfo {
        principal: format!("iss-{}/sub-{}", byte(3) % 2, byte(4) % 2),
        audiences: vec![format!("aud-{}", byte(5) % 2)],
        presenter: None,
        claims: serde_json::json!({
            "iss": format!("iss-{}", byte(3) % 2),
            "groups": ["dev", format!("g{}", byte(0) % 2)],
            "nested": {"role": "admin"},
        }),
    };
    let mut http = HttpAttrs::new(method, host, path, &headers, PathNormalization::MergeSlashes);
    http.auth = (byte(2) % 2 == 0).then_some(&auth);
    http.remote_ip = Some(IpAddr::V4(Ipv4Addr::new(192, 168, byte(3), byte(4))));
    let connection = ConnectionAttrs {
        source: peer.as_ref().filter(|_| byte(1) % 4 != 0),
        source_ip: IpAddr::V4(Ipv4Addr::new(10, 0, byte(3), byte(4))),
        destination_ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, byte(5))),
        destination_port: port,
        sni: None,
    };
    for enforcement in [Enforcement::Ztunnel, waypoint] {
        for namespace in namespaces {
            let target = Target {
                namespace,
                labels: &labels,
                enforcement,
            };
            let request = Request {
                connection,
                http: matches!(enforcement, Enforcement::Waypoint { .. }).then_some(&http),
            };
            let evaluation = set.evaluate(&target, &request);
            consistent(&evaluation);
            if unique_keys {
                assert_eq!(
                    reversed.evaluate(&target, &request),
                    evaluation,
                    "the decision depends on the order policies were listed in"
                );
            }
        }
    }
});
