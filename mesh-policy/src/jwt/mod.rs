//! JWT authentication: Istio's `RequestAuthentication`, compiled for one target into a
//! [`JwtAuthenticator`], with remote keys in a shared [`JwksCache`] and an [`AuthenticateLayer`] for
//! `http::Request` services.
//!
//! ## Semantics (istio.io, "RequestAuthentication" and "JWTRule" reference)
//! - Which policies apply is decided as for AuthorizationPolicies (see [`applies`]): at a workload
//!   ([`Enforcement::Ztunnel`], the sidecar-style scope) the root
//!   namespace's and the workload's namespace's policies without `targetRefs` whose `selector` matches; at
//!   a waypoint the policies whose `targetRefs` name its `Gateway`, the called `Service`, or (root
//!   namespace) the `istio-waypoint` `GatewayClass`. Their `jwtRules` are merged.
//! - Each rule looks for a token in its `fromHeaders` (name and prefix), `fromParams` and
//!   `fromCookies`; a rule naming none uses `Authorization: Bearer <token>` and the `access_token` query
//!   parameter. A header without the prefix holds no token (so `Authorization: Basic ...` is not an
//!   error).
//! - No token anywhere: `Ok(None)`, the request goes on unauthenticated and authorization decides.
//! - A token that fails any check is an error and the request is refused with `401`: a malformed token,
//!   `alg: none`, HMAC (`HS*`) or an unknown algorithm, an `iss` that no rule covering that location names,
//!   no key for its `kid`, a bad signature, `exp` passed or `nbf` not reached (with
//!   [`JwtConfig::clock_skew`] of tolerance, 60 s by default), or, when the rule lists `audiences`, no
//!   `aud` among them. Accepted algorithms: RS256/384/512, PS256/384/512, ES256/384 and EdDSA (Ed25519).
//! - Several tokens (at different locations): Istio calls the resulting principal nondeterministic; here
//!   every token must verify, and the first rule's token provides the [`AuthInfo`].
//! - The result, an [`AuthInfo`], has principal `<iss>/<sub>` (empty without `sub`), the `aud` values,
//!   `azp` as presenter, and all claims for `request.auth.claims[..]`.
//! - Keys come from the rule's inline `jwks`, its `jwksUri`, or else OpenID Connect discovery
//!   (`<issuer>/.well-known/openid-configuration`) when the issuer is a URL; remote keys are cached,
//!   refreshed and rate-limited by [`JwksCache`]. Until the first successful fetch, tokens of that issuer
//!   fail closed (as istiod's substitute JWKS makes them fail) while requests without tokens pass.
//! - After success, [`JwtAuthenticator::request_edits`] gives the edits for the upstream request: the
//!   token removed from where it was found unless `forwardOriginalToken`, the payload (base64url JSON)
//!   in `outputPayloadToHeader`, claims in `outputClaimToHeaders`. Every configured output header is also
//!   removed from requests that did not earn it, so a client cannot forge them; and a token in a query
//!   parameter or cookie is removed too (Envoy only removes header tokens).
//!
//! Errors are [`JwtError`], this module's own enum: token errors end as a `401`, apart from
//! [`crate::PolicyError`], which is about configuration.
//!
//! ## Example
//! ```
//! use std::collections::BTreeMap;
//! use mesh_policy::authz::{Enforcement, Target};
//! use mesh_policy::jwt::{JwksCache, JwtAuthenticator, JwtError};
//! use mesh_policy::resource::parse_resources;
//!
//! let yaml = r#"
//! apiVersion: security.istio.io/v1
//! kind: RequestAuthentication
//! metadata: {name: jwt, namespace: foo}
//! spec:
//!   selector: {matchLabels: {app: httpbin}}
//!   jwtRules:
//!   - issuer: issuer-foo
//!     jwks: '{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","x":"Oq8MG4Y4SzYkGSBb4ScNjp77vEUwBzO5P-KbT918Pm4","y":"qcLC76dZK360RUA7hQPkbDtksERj-t7vSpeDj56wNNU"}]}'
//! "#;
//! let parsed = parse_resources(yaml)?;
//! let labels = BTreeMap::from([("app".to_owned(), "httpbin".to_owned())]);
//! let target = Target { namespace: "foo", labels: &labels, enforcement: Enforcement::Ztunnel };
//! // Inline keys only (as istiod sends them): nothing is ever fetched.
//! let cache = JwksCache::without_fetching();
//! let authn = JwtAuthenticator::compile(parsed.request_authentications(), &target, "istio-system", &cache)?;
//!
//! let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//! let mut request = http::Request::get("/headers").body(())?;
//! // No token: unauthenticated, not refused.
//! assert_eq!(runtime.block_on(authn.authenticate(request.headers(), request.uri()))?, None);
//! // A token of an issuer no rule names: refused (401).
//! request.headers_mut().insert("authorization", "Bearer eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJvdGhlciJ9.c2ln".parse()?);
//! let refused = runtime.block_on(authn.authenticate(request.headers(), request.uri()));
//! assert!(matches!(refused, Err(JwtError::UnknownIssuer { .. })));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod cache;
mod edits;
mod error;
mod extract;
mod fetch;
mod keys;
mod layer;
mod verify;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, Uri};

pub use cache::{JwksCache, JwksCacheConfig, JwksStatus};
pub use edits::{RequestEdit, apply_edits, claim};
pub use error::JwtError;
pub use fetch::{DEFAULT_MAX_DOCUMENT_BYTES, HttpsFetcher, JwksFetcher};
pub use layer::{Authenticate, AuthenticateLayer};

use crate::authz::{AuthInfo, Enforcement, Target};
use crate::error::PolicyError;
use crate::resource::{JwtRule, RequestAuthentication};
use cache::{Entry, RemoteSource};
use extract::Location;
use keys::KeySet;
use verify::Unverified;

/// Verification settings that are not in the resources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtConfig {
    /// Tolerance for `exp` and `nbf` (Envoy's `clock_skew_seconds`, 60 s by default).
    pub clock_skew: Duration,
    /// Tokens longer than this are refused before any decoding.
    pub max_token_bytes: usize,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            clock_skew: Duration::from_secs(60),
            max_token_bytes: 32 * 1024,
        }
    }
}

/// The jwtRules that apply to one target, compiled: token locations parsed, inline keys decoded, remote
/// keys attached to a [`JwksCache`]. Immutable; compile a new one when the resources change (the cache
/// keeps the keys already fetched).
#[derive(Debug)]
pub struct JwtAuthenticator {
    rules: Vec<Rule>,
    config: JwtConfig,
    /// Every `outputPayloadToHeader` and `outputClaimToHeaders` header, removed from requests that did not
    /// earn them.
    output_headers: Vec<HeaderName>,
}

#[derive(Debug)]
struct Rule {
    /// `namespace/name` of the RequestAuthentication, for logs.
    resource: String,
    issuer: String,
    audiences: Vec<String>,
    locations: Vec<Location>,
    keys: Keys,
    forward_original_token: bool,
    payload_header: Option<HeaderName>,
    claim_headers: Vec<(HeaderName, String)>,
}

#[derive(Debug)]
enum Keys {
    Inline(Arc<KeySet>),
    Remote(Arc<Entry>),
    /// No `jwks`, no `jwksUri`, and an issuer that is not a URL to discover them from.
    Missing,
}

/// A verified request: what authorization sees, plus what [`JwtAuthenticator::request_edits`] needs.
#[derive(Clone)]
pub struct Verified {
    /// The verified token, as `request.auth.*` sees it.
    pub info: AuthInfo,
    rule: usize,
    removals: Vec<RequestEdit>,
    payload_segment: String,
}

impl std::fmt::Debug for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verified")
            .field("info", &self.info)
            .field("rule", &self.rule)
            .finish_non_exhaustive()
    }
}

/// Whether a RequestAuthentication applies at `target`: the same scoping as AuthorizationPolicies (see
/// the [module docs](self)).
pub fn applies(policy: &RequestAuthentication, target: &Target<'_>, root_namespace: &str) -> bool {
    let namespace = policy.metadata.namespace.as_str();
    let in_root = namespace == root_namespace;
    match target.enforcement {
        Enforcement::Ztunnel => {
            policy.target_refs().next().is_none()
                && policy
                    .spec
                    .attachment
                    .selector
                    .as_ref()
                    .is_none_or(|s| s.matches(target.labels))
                && (in_root || namespace == target.namespace)
        }
        Enforcement::Waypoint {
            gateway,
            gateway_namespace,
            service,
        } => policy.target_refs().any(|t| match t.kind.as_str() {
            "Gateway" => t.name == gateway && namespace == gateway_namespace,
            "GatewayClass" => in_root && t.name == "istio-waypoint",
            "Service" | "ServiceEntry" => service.is_some_and(|(ns, name)| t.name == name && namespace == ns),
            _ => false,
        }),
    }
}

impl JwtAuthenticator {
    /// Compiles the jwtRules of the `policies` that apply at `target` ([`applies`]), with
    /// `root_namespace` as the mesh-wide namespace and `cache` for remote keys. Fails on the first rule
    /// that cannot be used (an invalid resource, an inline `jwks` that is not a JWKS, a bad `timeout`),
    /// naming it.
    pub fn compile<'a>(
        policies: impl IntoIterator<Item = &'a RequestAuthentication>,
        target: &Target<'_>,
        root_namespace: &str,
        cache: &JwksCache,
    ) -> Result<JwtAuthenticator, JwtError> {
        let mut applicable: Vec<&RequestAuthentication> = policies
            .into_iter()
            .filter(|p| applies(p, target, root_namespace))
            .collect();
        // A stable order: mesh-wide policies first, then by name, then each policy's rules in order.
        applicable.sort_by(|a, b| {
            let root = |p: &RequestAuthentication| p.metadata.namespace != root_namespace;
            (root(a), &a.metadata.namespace, &a.metadata.name).cmp(&(
                root(b),
                &b.metadata.namespace,
                &b.metadata.name,
            ))
        });
        let mut rules = Vec::new();
        for policy in applicable {
            policy.validate().map_err(invalid_resource)?;
            for (index, rule) in policy.spec.jwt_rules.iter().enumerate() {
                rules.push(Rule::compile(policy, index, rule, cache)?);
            }
        }
        let mut output_headers: Vec<HeaderName> = rules
            .iter()
            .flat_map(|r| {
                r.payload_header
                    .iter()
                    .chain(r.claim_headers.iter().map(|(h, _)| h))
            })
            .cloned()
            .collect();
        output_headers.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        output_headers.dedup();
        Ok(JwtAuthenticator {
            rules,
            config: JwtConfig::default(),
            output_headers,
        })
    }

    /// The same authenticator with other verification settings.
    pub fn with_config(mut self, config: JwtConfig) -> Self {
        self.config = config;
        self
    }

    /// The verification settings.
    pub fn config(&self) -> &JwtConfig {
        &self.config
    }

    /// Whether no jwtRule applies (every request passes unauthenticated, and nothing is edited).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Number of jwtRules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Fetches every remote key set that has none yet (at startup, so the first requests do not wait).
    /// Returns the first failure; the others are logged by the cache.
    pub async fn prefetch(&self) -> Result<(), JwtError> {
        let mut first_error = None;
        for rule in &self.rules {
            if let Keys::Remote(entry) = &rule.keys
                && let Err(reason) = entry.keys().await
            {
                first_error.get_or_insert(JwtError::Fetch {
                    uri: entry.uri().to_owned(),
                    reason,
                });
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Authenticates a request by its headers and URI (for `fromParams`): `Ok(None)` without a token,
    /// `Ok(Some(_))` with a valid one, an error (answer `401`) for an invalid one.
    pub async fn authenticate(&self, headers: &HeaderMap, uri: &Uri) -> Result<Option<AuthInfo>, JwtError> {
        Ok(self.verify(headers, uri).await?.map(|v| v.info))
    }

    /// Like [`authenticate`](Self::authenticate), keeping what [`request_edits`](Self::request_edits)
    /// needs.
    pub async fn verify(&self, headers: &HeaderMap, uri: &Uri) -> Result<Option<Verified>, JwtError> {
        self.verify_at(headers, uri, SystemTime::now()).await
    }

    /// [`verify`](Self::verify) with the clock given: `exp` and `nbf` are compared with `now`.
    pub async fn verify_at(
        &self,
        headers: &HeaderMap,
        uri: &Uri,
        now: SystemTime,
    ) -> Result<Option<Verified>, JwtError> {
        let found = self.find_tokens(headers, uri);
        let mut result: Option<Verified> = None;
        for token in &found {
            let verified = self.verify_token(token, now).await?;
            match &mut result {
                None => result = Some(verified),
                Some(first) => first.removals.extend(verified.removals),
            }
        }
        Ok(result)
    }

    /// The distinct tokens of the request, each with the rules whose locations it was found at.
    fn find_tokens(&self, headers: &HeaderMap, uri: &Uri) -> Vec<FoundToken> {
        let mut found: Vec<FoundToken> = Vec::new();
        for (rule_index, rule) in self.rules.iter().enumerate() {
            for location in &rule.locations {
                let Some(token) = location.extract(headers, uri) else {
                    continue;
                };
                let entry = match found.iter_mut().position(|f| f.token == token) {
                    Some(i) => &mut found[i],
                    None => {
                        found.push(FoundToken {
                            token,
                            at: Vec::new(),
                        });
                        let last = found.len() - 1;
                        &mut found[last]
                    }
                };
                entry.at.push((rule_index, location.clone()));
            }
        }
        found
    }

    async fn verify_token(&self, found: &FoundToken, now: SystemTime) -> Result<Verified, JwtError> {
        let unverified = verify::peek(&found.token, self.config.max_token_bytes)?;
        let mut candidates: Vec<usize> = found
            .at
            .iter()
            .map(|(rule, _)| *rule)
            .filter(|&rule| self.rules[rule].issuer == unverified.issuer)
            .collect();
        candidates.dedup();
        let mut first_error = None;
        for rule_index in candidates {
            let rule = &self.rules[rule_index];
            match self.verify_with(rule, &unverified, now).await {
                Ok(info) => {
                    let removals = if rule.forward_original_token {
                        Vec::new()
                    } else {
                        found.at.iter().map(|(_, loc)| loc.removal()).collect()
                    };
                    return Ok(Verified {
                        info,
                        rule: rule_index,
                        removals,
                        payload_segment: unverified.payload_segment.to_owned(),
                    });
                }
                Err(error) => {
                    tracing::debug!(policy = %rule.resource, issuer = %rule.issuer, %error, "JWT refused");
                    first_error.get_or_insert(error);
                }
            }
        }
        Err(first_error.unwrap_or(JwtError::UnknownIssuer {
            issuer: unverified.issuer,
        }))
    }

    async fn verify_with(
        &self,
        rule: &Rule,
        token: &Unverified<'_>,
        now: SystemTime,
    ) -> Result<AuthInfo, JwtError> {
        let unavailable = |reason: String| JwtError::KeysUnavailable {
            issuer: rule.issuer.clone(),
            reason,
        };
        let claims = match &rule.keys {
            Keys::Inline(keys) => verify::verify_signature(token, keys)?,
            Keys::Missing => {
                return Err(unavailable(
                    "no jwks or jwksUri, and the issuer is not a URL for OpenID discovery".into(),
                ));
            }
            Keys::Remote(entry) => {
                let keys = entry.keys().await.map_err(unavailable)?;
                match verify::verify_signature(token, &keys) {
                    Err(JwtError::UnknownKey { kid }) => match entry.refetch_for_unknown_kid().await {
                        Some(fresh) => verify::verify_signature(token, &fresh)?,
                        None => return Err(JwtError::UnknownKey { kid }),
                    },
                    other => other?,
                }
            }
        };
        verify::check_claims(&claims, &rule.audiences, now, self.config.clock_skew.as_secs())?;
        verify::auth_info(&token.issuer, claims)
    }

    /// The edits for the request sent upstream: every configured output header removed, then, for a
    /// verified request, the token removed from where it was found (unless `forwardOriginalToken`), the
    /// payload header and the claim headers set.
    pub fn request_edits(&self, verified: Option<&Verified>) -> Vec<RequestEdit> {
        let mut edits: Vec<RequestEdit> = self
            .output_headers
            .iter()
            .cloned()
            .map(RequestEdit::RemoveHeader)
            .collect();
        let Some(verified) = verified else {
            return edits;
        };
        edits.extend(verified.removals.iter().cloned());
        let Some(rule) = self.rules.get(verified.rule) else {
            return edits;
        };
        if let Some(header) = &rule.payload_header
            && let Ok(value) = HeaderValue::from_str(&verified.payload_segment)
        {
            edits.push(RequestEdit::SetHeader(header.clone(), value));
        }
        for (header, name) in &rule.claim_headers {
            if let Some(value) = claim(&verified.info.claims, name).and_then(edits::claim_header_value) {
                edits.push(RequestEdit::SetHeader(header.clone(), value));
            }
        }
        edits
    }
}

struct FoundToken {
    token: String,
    at: Vec<(usize, Location)>,
}

impl Rule {
    fn compile(
        policy: &RequestAuthentication,
        index: usize,
        rule: &JwtRule,
        cache: &JwksCache,
    ) -> Result<Rule, JwtError> {
        let resource = policy.metadata.key();
        let field = |name: &str| format!("spec.jwtRules[{index}].{name}");
        let invalid = |name: &str, reason: String| JwtError::InvalidRule {
            resource: resource.clone(),
            field: field(name),
            reason,
        };
        let header = |name: &str, text: &str| {
            HeaderName::from_bytes(text.as_bytes())
                .map_err(|_| invalid(name, format!("{text:?} is not a valid header name")))
        };
        let mut locations = Vec::new();
        for (i, h) in rule.from_headers.iter().enumerate() {
            locations.push(Location::Header {
                name: header(&format!("fromHeaders[{i}].name"), &h.name)?,
                prefix: h.prefix.clone(),
            });
        }
        locations.extend(rule.from_params.iter().cloned().map(Location::Param));
        locations.extend(rule.from_cookies.iter().cloned().map(Location::Cookie));
        if locations.is_empty() {
            locations = extract::default_locations();
        }
        let timeout = rule
            .timeout
            .as_deref()
            .map(|t| parse_duration(t).map_err(|reason| invalid("timeout", reason)))
            .transpose()?;
        let keys = if let Some(jwks) = &rule.jwks {
            Keys::Inline(Arc::new(
                KeySet::parse(jwks).map_err(|reason| invalid("jwks", reason))?,
            ))
        } else if let Some(uri) = &rule.jwks_uri {
            Keys::Remote(cache.entry(RemoteSource::Jwks(uri.clone()), timeout))
        } else if rule.issuer.starts_with("https://") || rule.issuer.starts_with("http://") {
            Keys::Remote(cache.entry(RemoteSource::Discovery(rule.issuer.clone()), timeout))
        } else {
            Keys::Missing
        };
        let payload_header = rule
            .output_payload_to_header
            .as_deref()
            .filter(|h| !h.is_empty())
            .map(|h| header("outputPayloadToHeader", h))
            .transpose()?;
        let claim_headers = rule
            .output_claim_to_headers
            .iter()
            .enumerate()
            .map(|(i, c)| {
                Ok((
                    header(&format!("outputClaimToHeaders[{i}].header"), &c.header)?,
                    c.claim.clone(),
                ))
            })
            .collect::<Result<Vec<_>, JwtError>>()?;
        Ok(Rule {
            resource: resource.clone(),
            issuer: rule.issuer.clone(),
            audiences: rule.audiences.clone(),
            locations,
            keys,
            forward_original_token: rule.forward_original_token,
            payload_header,
            claim_headers,
        })
    }
}

fn invalid_resource(error: PolicyError) -> JwtError {
    match error {
        PolicyError::Invalid {
            resource,
            field,
            reason,
            ..
        } => JwtError::InvalidRule {
            resource,
            field,
            reason,
        },
        other => JwtError::InvalidRule {
            resource: String::new(),
            field: String::new(),
            reason: other.to_string(),
        },
    }
}

/// A protobuf `Duration` as Kubernetes prints it (`5s`, `1.5s`), also accepting `ms`, `m` and `h`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = text.strip_suffix('h') {
        (n, 3600.0)
    } else {
        return Err(format!("{text:?} is not a duration (e.g. \"5s\")"));
    };
    number
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite() && *n > 0.0)
        .and_then(|n| Duration::try_from_secs_f64(n * unit).ok())
        .ok_or_else(|| format!("{text:?} is not a positive duration (e.g. \"5s\")"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn durations_as_kubernetes_prints_them() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("NaNs").is_err());
    }
}
