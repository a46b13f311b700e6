//! # mesh-policy
//!
//! Istio's security resources and the decisions they make, as pure functions over immutable, compiled
//! sets: the same answer Istio gives, plus the reason.
//!
//! ## Layout
//! - [`resource`]: AuthorizationPolicy, RequestAuthentication and PeerAuthentication as `kubectl get -o
//!   yaml` prints them ([`resource::parse_resources`]), validated with errors that name the field.
//! - [`authz`]: [`PolicySet`] (compiled, indexed by namespace) and [`PolicySet::evaluate`], for ztunnel (L4)
//!   and waypoints (L7), returning an [`Evaluation`] that prints as one readable line.
//! - [`l4`]: the policies istiod compiles for ztunnel (`istio.security.Authorization`, as `mesh-xds`
//!   converts them) as [`L4Policy`] values, indexed in an [`L4PolicySet`] whose [`L4PolicySet::evaluate`]
//!   decides a connection exactly as Istio's ztunnel does, returning an [`L4Evaluation`] that names the
//!   policy and rule.
//! - [`PolicyEngine`]: the current set behind a `watch`, and the [`ExternalAuthorizer`] hook for CUSTOM.
//! - [`jwt`]: RequestAuthentication as a [`JwtAuthenticator`] (tokens checked into an
//!   [`AuthInfo`](authz::AuthInfo)), remote keys in a [`JwksCache`], and the [`AuthenticateLayer`].
//! - [`peer_authn`]: PeerAuthentication resolved to "is plaintext inbound allowed for this workload and
//!   port" ([`PeerAuthnSet`]).
//! - [`PolicyError`]: the crate's one error type.
//!
//! ## Example
//! ```
//! use std::collections::BTreeMap;
//! use mesh_core::SpiffeId;
//! use mesh_policy::authz::{ConnectionAttrs, Enforcement, Request, Target};
//! use mesh_policy::{PolicySet, resource::parse_resources};
//!
//! let yaml = r#"
//! apiVersion: security.istio.io/v1
//! kind: AuthorizationPolicy
//! metadata: {name: deny-ext, namespace: default}
//! spec:
//!   action: DENY
//!   rules:
//!   - from:
//!     - source: {namespaces: [ext]}
//! "#;
//! let parsed = parse_resources(yaml)?;
//! let set = PolicySet::compile(parsed.authorization_policies(), "istio-system")?;
//! let peer = SpiffeId::parse("spiffe://cluster.local/ns/ext/sa/client")?;
//! let request = Request::l4(ConnectionAttrs {
//!     source: Some(&peer),
//!     source_ip: "10.0.0.1".parse()?,
//!     destination_ip: "10.0.0.2".parse()?,
//!     destination_port: 8080,
//!     sni: None,
//! });
//! let labels = BTreeMap::new();
//! let target = Target { namespace: "default", labels: &labels, enforcement: Enforcement::Ztunnel };
//! let evaluation = set.evaluate(&target, &request);
//! assert!(!evaluation.is_allowed());
//! assert_eq!(evaluation.to_string(), "denied by default/deny-ext rule 0: source.namespace ext matched");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

pub mod authz;
mod engine;
mod error;
pub mod jwt;
pub mod l4;
pub mod peer_authn;
pub mod resource;

pub use authz::{Decision, Evaluation, PolicySet};
pub use engine::{ExternalAuthorizer, PolicyEngine, PolicyPublisher, channel};
pub use error::PolicyError;
pub use jwt::{AuthenticateLayer, JwksCache, JwtAuthenticator, JwtError};
pub use l4::{L4Evaluation, L4Policy, L4PolicySet, L4Target};
pub use peer_authn::PeerAuthnSet;

#[doc(hidden)]
/// Entry points for the fuzz targets in `fuzz/`: each must return normally for any input.
pub mod __fuzz {
    use std::collections::BTreeMap;
    use std::net::{IpAddr, Ipv4Addr};

    use crate::authz::{ConnectionAttrs, Enforcement, HttpAttrs, PathNormalization, Request, Target};

    /// Parses `yaml` as security resources; if they compile, evaluates a request built from `request`
    /// bytes at ztunnel and at a waypoint.
    pub fn parse_and_evaluate(yaml: &str, request: &[u8]) {
        let Ok(parsed) = crate::resource::parse_resources(yaml) else {
            return;
        };
        let Ok(set) = crate::PolicySet::compile(parsed.authorization_policies(), "istio-system") else {
            return;
        };
        let byte = |i: usize| request.get(i).copied().unwrap_or(0);
        let text = String::from_utf8_lossy(request.get(8..).unwrap_or_default()).into_owned();
        let (method, rest) = text.split_once(' ').unwrap_or(("GET", &text));
        let (path, host) = rest.split_once(' ').unwrap_or((rest, "host"));
        let principal = format!("spiffe://cluster.local/ns/ns{}/sa/sa{}", byte(0) % 4, byte(1) % 4);
        let peer = mesh_core::SpiffeId::parse(&principal).ok();
        let headers = http::HeaderMap::new();
        let http = HttpAttrs::new(method, host, path, &headers, PathNormalization::Base);
        let connection = ConnectionAttrs {
            source: peer.as_ref().filter(|_| byte(2) % 2 == 0),
            source_ip: IpAddr::V4(Ipv4Addr::new(10, 0, byte(3), byte(4))),
            destination_ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, byte(5))),
            destination_port: u16::from_be_bytes([byte(6), byte(7)]),
            sni: None,
        };
        let mut labels = BTreeMap::new();
        labels.insert("app".to_owned(), format!("app{}", byte(0) % 3));
        for enforcement in [
            Enforcement::Ztunnel,
            Enforcement::Waypoint {
                gateway: "waypoint",
                gateway_namespace: "ns0",
                service: Some(("ns0", "svc")),
            },
        ] {
            let target = Target {
                namespace: "ns0",
                labels: &labels,
                enforcement,
            };
            let http_layer = matches!(enforcement, Enforcement::Waypoint { .. }).then_some(&http);
            let evaluation = set.evaluate(
                &target,
                &Request {
                    connection,
                    http: http_layer,
                },
            );
            let _ = evaluation.to_string();
        }
    }
}
