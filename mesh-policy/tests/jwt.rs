//! JWT (RequestAuthentication) semantics, table-driven. Each case names its source: the istio.io
//! RequestAuthentication and JWTRule reference, the RFCs, or Envoy's jwt_authn (which Istio configures).
#![allow(clippy::unwrap_used, missing_docs)]

mod jwt_support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use jwt_support::{Family, SigningKey, claims, jwks, now, tampered, unsigned, with};
use mesh_policy::authz::{AuthInfo, Enforcement, Target};
use mesh_policy::jwt::{
    AuthenticateLayer, JwksCache, JwtAuthenticator, JwtConfig, JwtError, RequestEdit, applies, apply_edits,
};
use mesh_policy::resource::{RequestAuthentication, parse_resources};
use serde_json::{Value, json};
use test_case::test_case;
use tower::{Layer, ServiceExt};

const ISSUER: &str = "testing@secure.istio.io";
const ISSUER2: &str = "https://example.com";
const AUD_ANDROID: &str = "bookstore_android.apps.example.com";

struct Fixture {
    authn: JwtAuthenticator,
    rsa: SigningKey,
    ec256: SigningKey,
    ec384: SigningKey,
    ed: SigningKey,
}

impl Fixture {
    fn key(&self, family: Family, alg: Algorithm) -> SigningKey {
        let kid = match family {
            Family::Rsa | Family::RsaOther => &self.rsa.kid,
            Family::P256 => &self.ec256.kid,
            Family::P384 => &self.ec384.kid,
            Family::Ed25519 => &self.ed.kid,
        };
        SigningKey::new(family, alg, kid)
    }

    /// A valid token of the first rule's issuer.
    fn token(&self) -> String {
        self.rsa.sign(&claims(ISSUER, "alice"))
    }
}

fn policy_yaml(jwks: &str) -> String {
    format!(
        r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt-example, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  jwtRules:
  - issuer: {ISSUER}
    jwks: '{jwks}'
    outputPayloadToHeader: x-jwt-payload
    outputClaimToHeaders:
    - {{header: x-jwt-claim-group, claim: nested.group}}
    - {{header: x-jwt-claim-roles, claim: roles}}
  - issuer: {ISSUER2}
    audiences: [{AUD_ANDROID}, bookstore_web.apps.example.com]
    jwks: '{jwks}'
    fromHeaders: [{{name: x-goog-iap-jwt-assertion, prefix: "Bearer "}}]
    fromParams: [my_token]
    fromCookies: [session]
    forwardOriginalToken: true
"#
    )
}

fn httpbin() -> BTreeMap<String, String> {
    BTreeMap::from([("app".to_owned(), "httpbin".to_owned())])
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let rsa = SigningKey::new(Family::Rsa, Algorithm::RS256, "rsa");
        let ec256 = SigningKey::new(Family::P256, Algorithm::ES256, "ec256");
        let ec384 = SigningKey::new(Family::P384, Algorithm::ES384, "ec384");
        let ed = SigningKey::new(Family::Ed25519, Algorithm::EdDSA, "ed");
        let parsed = parse_resources(&policy_yaml(&jwks(&[&rsa, &ec256, &ec384, &ed]))).unwrap();
        let labels = httpbin();
        let target = Target {
            namespace: "foo",
            labels: &labels,
            enforcement: Enforcement::Ztunnel,
        };
        let authn = JwtAuthenticator::compile(
            parsed.request_authentications(),
            &target,
            "istio-system",
            &JwksCache::without_fetching(),
        )
        .unwrap();
        assert_eq!(authn.len(), 2);
        Fixture {
            authn,
            rsa,
            ec256,
            ec384,
            ed,
        }
    })
}

fn req(uri: &str, headers: &[(&str, String)]) -> http::Request<()> {
    let mut builder = http::Request::get(uri);
    for (name, value) in headers {
        builder = builder.header(*name, value.as_str());
    }
    builder.body(()).unwrap()
}

fn bearer(token: String) -> http::Request<()> {
    req("/headers", &[("authorization", format!("Bearer {token}"))])
}

/// What a case expects.
enum Expect {
    /// Authenticated, with this principal.
    Principal(&'static str),
    /// No token: passes unauthenticated.
    Unauthenticated,
    /// Refused (401) with an error the predicate accepts.
    Refused(fn(&JwtError) -> bool),
}

const SRC_ALGS: &str = "istio.io RequestAuthentication reference: JWTRule.jwks; algorithms of Envoy jwt_authn (RS/PS 256-512, ES256/384, EdDSA)";
const SRC_INVALID: &str = "istio.io RequestAuthentication reference: 'It will reject a request if the request contains invalid authentication information'";
const SRC_NO_TOKEN: &str = "istio.io RequestAuthentication reference: 'A request that does not contain any authentication credentials will be accepted but will not have any authenticated identity'";
const SRC_ISSUER: &str =
    "istio.io JWTRule reference: issuer, 'A JWT with different iss claim will be rejected'";
const SRC_AUD: &str =
    "istio.io JWTRule reference: audiences, 'A JWT containing any of these audiences will be accepted'";
const SRC_LOCATION: &str = "istio.io JWTRule reference: fromHeaders / fromParams / fromCookies, and the default locations (Authorization: Bearer, access_token)";
const SRC_RULE_LOCATION: &str = "istio.io RequestAuthentication reference: jwtRules, 'Each rule will be activated only when a token is presented at the location recognized by the rule'";
const SRC_TIME: &str =
    "RFC 7519 sections 4.1.4 (exp) and 4.1.5 (nbf); Envoy jwt_authn clock_skew_seconds (default 60)";
const SRC_ALG_NONE: &str =
    "RFC 8725 section 3.1 (algorithm verification); Envoy jwt_authn accepts only asymmetric JWKS algorithms";

#[test_case(SRC_ALGS, |f| bearer(f.key(Family::Rsa, Algorithm::RS256).sign(&claims(ISSUER, "alice"))), Expect::Principal("testing@secure.istio.io/alice") ; "valid RS256")]
#[test_case(SRC_ALGS, |f| bearer(f.key(Family::Rsa, Algorithm::RS384).sign(&claims(ISSUER, "alice"))), Expect::Principal("testing@secure.istio.io/alice") ; "valid RS384")]
#[test_case(SRC_ALGS, |f| bearer(f.key(Family::Rsa, Algorithm::RS512).sign(&claims(ISSUER, "alice"))), Expect::Principal("testing@secure.istio.io/alice") ; "valid RS512")]
#[test_case(SRC_ALGS, |f| bearer(f.key(Family::Rsa, Algorithm::PS256).sign(&claims(ISSUER, "alice"))), Expect::Principal("testing@secure.istio.io/alice") ; "valid PS256")]
#[test_case(SRC_ALGS, |f| bearer(f.key(Family::Rsa, Algorithm::PS384).sign(&claims(ISSUER, "alice"))), Expect::Principal("testing@secure.istio.io/alice") ; "valid PS384")]
#[test_case(SRC_ALGS, |f| bearer(f.key(Family::Rsa, Algorithm::PS512).sign(&claims(ISSUER, "alice"))), Expect::Principal("testing@secure.istio.io/alice") ; "valid PS512")]
#[test_case(SRC_ALGS, |f| bearer(f.key(Family::P256, Algorithm::ES256).sign(&claims(ISSUER, "alice"))), Expect::Principal("testing@secure.istio.io/alice") ; "valid ES256")]
#[test_case(SRC_ALGS, |f| bearer(f.key(Family::P384, Algorithm::ES384).sign(&claims(ISSUER, "alice"))), Expect::Principal("testing@secure.istio.io/alice") ; "valid ES384")]
#[test_case(SRC_ALGS, |f| bearer(f.key(Family::Ed25519, Algorithm::EdDSA).sign(&claims(ISSUER, "alice"))), Expect::Principal("testing@secure.istio.io/alice") ; "valid EdDSA")]
#[test_case(SRC_ALGS, |f| bearer(f.ec256.sign_without_kid(&claims(ISSUER, "alice"))), Expect::Principal("testing@secure.istio.io/alice") ; "no kid tries every key of the family")]
#[test_case(SRC_INVALID, |_| bearer(SigningKey::new(Family::RsaOther, Algorithm::RS256, "").sign_without_kid(&claims(ISSUER, "alice"))), Expect::Refused(|e| matches!(e, JwtError::BadSignature)) ; "no kid and no key verifies")]
#[test_case(SRC_TIME, |f| bearer(f.rsa.sign(&with(claims(ISSUER, "alice"), json!({"exp": now() - 3600}))) ), Expect::Refused(|e| matches!(e, JwtError::Expired)) ; "expired")]
#[test_case(SRC_TIME, |f| bearer(f.rsa.sign(&with(claims(ISSUER, "alice"), json!({"exp": now() - 20}))) ), Expect::Principal("testing@secure.istio.io/alice") ; "expired within the clock skew")]
#[test_case(SRC_TIME, |f| bearer(f.rsa.sign(&with(claims(ISSUER, "alice"), json!({"nbf": now() + 3600}))) ), Expect::Refused(|e| matches!(e, JwtError::NotYetValid)) ; "not yet valid")]
#[test_case(SRC_TIME, |f| bearer(f.rsa.sign(&with(claims(ISSUER, "alice"), json!({"exp": null}))) ), Expect::Principal("testing@secure.istio.io/alice") ; "no exp is accepted as Envoy does")]
#[test_case(SRC_TIME, |f| bearer(f.rsa.sign(&with(claims(ISSUER, "alice"), json!({"exp": "tomorrow"}))) ), Expect::Refused(|e| matches!(e, JwtError::BadClaim { claim: "exp" })) ; "exp of the wrong type")]
#[test_case(SRC_ISSUER, |f| bearer(f.rsa.sign(&claims("https://evil.example.com", "alice"))), Expect::Refused(|e| matches!(e, JwtError::UnknownIssuer { issuer } if issuer == "https://evil.example.com")) ; "wrong issuer")]
#[test_case(SRC_ISSUER, |f| bearer(f.rsa.sign(&with(claims(ISSUER, "alice"), json!({"iss": null})))), Expect::Refused(|e| matches!(e, JwtError::UnknownIssuer { issuer } if issuer.is_empty())) ; "no issuer")]
#[test_case(SRC_AUD, |f| req("/", &[("x-goog-iap-jwt-assertion", format!("Bearer {}", f.rsa.sign(&with(claims(ISSUER2, "bob"), json!({"aud": "someone-else"})))))]), Expect::Refused(|e| matches!(e, JwtError::AudienceMismatch)) ; "wrong audience")]
#[test_case(SRC_AUD, |f| req("/", &[("x-goog-iap-jwt-assertion", format!("Bearer {}", f.rsa.sign(&claims(ISSUER2, "bob"))))]), Expect::Refused(|e| matches!(e, JwtError::AudienceMismatch)) ; "no audience when the rule lists some")]
#[test_case(SRC_AUD, |f| req("/", &[("x-goog-iap-jwt-assertion", format!("Bearer {}", f.rsa.sign(&with(claims(ISSUER2, "bob"), json!({"aud": ["x", AUD_ANDROID]})))))]), Expect::Principal("https://example.com/bob") ; "audience array intersects")]
#[test_case(SRC_AUD, |f| bearer(f.rsa.sign(&with(claims(ISSUER, "alice"), json!({"aud": "anyone"})))), Expect::Principal("testing@secure.istio.io/alice") ; "any audience when the rule lists none")]
#[test_case(SRC_INVALID, |_| bearer(SigningKey::new(Family::RsaOther, Algorithm::RS256, "rsa").sign(&claims(ISSUER, "alice"))), Expect::Refused(|e| matches!(e, JwtError::BadSignature)) ; "bad signature from another key under a known kid")]
#[test_case(SRC_INVALID, |f| bearer(tampered(&f.token(), &claims(ISSUER, "admin"))), Expect::Refused(|e| matches!(e, JwtError::BadSignature)) ; "tampered payload")]
#[test_case(SRC_INVALID, |_| bearer(SigningKey::new(Family::Rsa, Algorithm::RS256, "rotated-away").sign(&claims(ISSUER, "alice"))), Expect::Refused(|e| matches!(e, JwtError::UnknownKey { kid: Some(k) } if k == "rotated-away")) ; "unknown kid")]
#[test_case(SRC_INVALID, |_| bearer("not-a-jwt".into()), Expect::Refused(|e| matches!(e, JwtError::Malformed { .. })) ; "malformed token")]
#[test_case(SRC_INVALID, |_| bearer(format!("{}.{}.sig", URL_SAFE_NO_PAD.encode("{\"alg\":\"RS256\"}"), "!!!")), Expect::Refused(|e| matches!(e, JwtError::Malformed { .. })) ; "payload not base64url")]
#[test_case(SRC_ALG_NONE, |_| bearer(unsigned(&json!({"alg": "none"}), &claims(ISSUER, "alice"), "")), Expect::Refused(|e| matches!(e, JwtError::AlgorithmNotAllowed { alg } if alg == "none")) ; "alg none")]
#[test_case(SRC_ALG_NONE, |_| bearer(hs256(b"shared-secret")), Expect::Refused(|e| matches!(e, JwtError::AlgorithmNotAllowed { alg } if alg == "HS256")) ; "HS256 refused")]
#[test_case(SRC_ALG_NONE, |f| bearer(hs256(f.rsa.jwk().to_string().as_bytes())), Expect::Refused(|e| matches!(e, JwtError::AlgorithmNotAllowed { .. })) ; "HS256 keyed with the public key (algorithm confusion)")]
#[test_case(SRC_ALG_NONE, |_| bearer(SigningKey::new(Family::P256, Algorithm::ES256, "rsa").sign(&claims(ISSUER, "alice"))), Expect::Refused(|e| matches!(e, JwtError::UnknownKey { .. })) ; "alg of another family than the kid's key")]
#[test_case(SRC_NO_TOKEN, |_| req("/headers", &[]), Expect::Unauthenticated ; "missing token passes unauthenticated")]
#[test_case(SRC_NO_TOKEN, |_| req("/headers", &[("authorization", "Basic dXNlcjpwYXNz".into())]), Expect::Unauthenticated ; "another auth scheme is no token")]
#[test_case(SRC_LOCATION, |f| req(&format!("/headers?access_token={}", f.token()), &[]), Expect::Principal("testing@secure.istio.io/alice") ; "default access_token query param")]
#[test_case(SRC_LOCATION, |f| req("/headers", &[("authorization", format!("bearer {}", f.token()))]), Expect::Principal("testing@secure.istio.io/alice") ; "bearer scheme case-insensitive")]
#[test_case(SRC_LOCATION, |f| req("/", &[("x-goog-iap-jwt-assertion", format!("Bearer {}", f.rsa.sign(&with(claims(ISSUER2, "bob"), json!({"aud": AUD_ANDROID})))))]), Expect::Principal("https://example.com/bob") ; "custom header with prefix")]
#[test_case(SRC_LOCATION, |f| req("/", &[("x-goog-iap-jwt-assertion", f.rsa.sign(&with(claims(ISSUER2, "bob"), json!({"aud": AUD_ANDROID}))))]), Expect::Unauthenticated ; "custom header without its prefix holds no token")]
#[test_case(SRC_LOCATION, |f| req(&format!("/x?a=1&my_token={}", f.rsa.sign(&with(claims(ISSUER2, "bob"), json!({"aud": AUD_ANDROID}))) ), &[]), Expect::Principal("https://example.com/bob") ; "custom query param")]
#[test_case(SRC_LOCATION, |f| req("/", &[("cookie", format!("theme=dark; session={}", f.rsa.sign(&with(claims(ISSUER2, "bob"), json!({"aud": AUD_ANDROID})))))]), Expect::Principal("https://example.com/bob") ; "cookie")]
#[test_case(SRC_RULE_LOCATION, |f| req("/", &[("x-goog-iap-jwt-assertion", format!("Bearer {}", f.token()))]), Expect::Refused(|e| matches!(e, JwtError::UnknownIssuer { .. })) ; "token at a location its issuer's rule does not read")]
#[test_case(SRC_RULE_LOCATION, |f| req("/", &[("authorization", format!("Bearer {}", f.rsa.sign(&with(claims(ISSUER2, "bob"), json!({"aud": AUD_ANDROID})))))]), Expect::Refused(|e| matches!(e, JwtError::UnknownIssuer { .. })) ; "second rule's token in the first rule's location")]
#[test_case(SRC_RULE_LOCATION, |f| { let mut r = bearer(f.token()); r.headers_mut().insert("x-goog-iap-jwt-assertion", "Bearer not.a.jwt".parse().unwrap()); r }, Expect::Refused(|e| matches!(e, JwtError::Malformed { .. })) ; "every token present must verify")]
#[tokio::test]
async fn token_cases(source: &str, request: fn(&Fixture) -> http::Request<()>, expect: Expect) {
    let f = fixture();
    let request = request(f);
    let result = f.authn.authenticate(request.headers(), request.uri()).await;
    match (expect, result) {
        (Expect::Principal(principal), Ok(Some(info))) => {
            assert_eq!(info.principal, principal, "source: {source}")
        }
        (Expect::Unauthenticated, Ok(None)) => {}
        (Expect::Refused(accepts), Err(error)) => {
            assert!(accepts(&error), "unexpected error {error:?}; source: {source}");
            assert!(error.is_token_error());
        }
        (_, other) => panic!("unexpected result {other:?}; source: {source}"),
    }
}

fn hs256(secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(ISSUER, "alice"),
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

#[tokio::test]
async fn auth_info_carries_audiences_presenter_and_nested_claims() {
    // Source: istio.io AuthorizationPolicy reference, conditions request.auth.audiences, .presenter,
    // .claims[..] including nested claims; the principal is <iss>/<sub>.
    let f = fixture();
    let token = f.ed.sign(&with(
        claims(ISSUER, "alice"),
        json!({
            "aud": ["a", "b"],
            "azp": "web-client",
            "nested": {"group": "admins", "deeper": {"level": 3}},
            "roles": ["reader", "writer"],
        }),
    ));
    let request = bearer(token);
    let info: AuthInfo = f
        .authn
        .authenticate(request.headers(), request.uri())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(info.principal, "testing@secure.istio.io/alice");
    assert_eq!(info.audiences, vec!["a".to_owned(), "b".to_owned()]);
    assert_eq!(info.presenter.as_deref(), Some("web-client"));
    assert_eq!(info.claims["nested"]["group"], "admins");
    assert_eq!(info.claims["nested"]["deeper"]["level"], 3);
    assert_eq!(
        mesh_policy::jwt::claim(&info.claims, "nested.deeper.level"),
        Some(&json!(3))
    );
}

#[tokio::test]
async fn no_sub_leaves_the_principal_empty() {
    // Source: Istio's authn filter sets request.auth.principal only when both iss and sub are present.
    let f = fixture();
    let request = bearer(f.rsa.sign(&with(claims(ISSUER, "x"), json!({"sub": null}))));
    let info = f
        .authn
        .authenticate(request.headers(), request.uri())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(info.principal, "");
}

#[tokio::test]
async fn clock_skew_is_configurable() {
    // Source: Envoy jwt_authn clock_skew_seconds; RFC 7519 section 4.1.4 allows "some small leeway".
    let fixture = fixture();
    let exp = now() - 30;
    let token = fixture
        .rsa
        .sign(&with(claims(ISSUER, "alice"), json!({ "exp": exp })));
    let request = bearer(token);
    let labels = httpbin();
    let target = Target {
        namespace: "foo",
        labels: &labels,
        enforcement: Enforcement::Ztunnel,
    };
    let parsed = parse_resources(&policy_yaml(&jwks(&[&fixture.rsa]))).unwrap();
    let strict = JwtAuthenticator::compile(
        parsed.request_authentications(),
        &target,
        "istio-system",
        &JwksCache::without_fetching(),
    )
    .unwrap()
    .with_config(JwtConfig {
        clock_skew: Duration::ZERO,
        ..JwtConfig::default()
    });
    let refused = strict.verify(request.headers(), request.uri()).await;
    assert!(matches!(refused, Err(JwtError::Expired)), "{refused:?}");
    // The same token at a time before its expiry is fine: the clock is an input.
    let earlier = SystemTime::UNIX_EPOCH + Duration::from_secs(exp - 10);
    let accepted = strict.verify_at(request.headers(), request.uri(), earlier).await;
    assert!(matches!(accepted, Ok(Some(_))), "{accepted:?}");
}

#[tokio::test]
async fn edits_strip_the_token_and_output_payload_and_claims() {
    // Source: istio.io JWTRule reference: forwardOriginalToken (default false: the token is removed),
    // outputPayloadToHeader (base64url of the payload JSON), outputClaimToHeaders (nested claims with '.').
    let f = fixture();
    let payload = with(
        claims(ISSUER, "alice"),
        json!({"nested": {"group": "admins"}, "roles": ["reader", "writer"]}),
    );
    let mut request = bearer(f.rsa.sign(&payload));
    request
        .headers_mut()
        .insert("x-jwt-claim-roles", "forged".parse().unwrap());
    let verified = f
        .authn
        .verify(request.headers(), request.uri())
        .await
        .unwrap()
        .unwrap();
    let edits = f.authn.request_edits(Some(&verified));
    assert!(edits.contains(&RequestEdit::RemoveHeader(http::header::AUTHORIZATION)));
    let (mut parts, ()) = request.into_parts();
    apply_edits(&mut parts.headers, &mut parts.uri, &edits);
    assert!(parts.headers.get("authorization").is_none());
    let forwarded = parts.headers["x-jwt-payload"].to_str().unwrap();
    let decoded: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(forwarded).unwrap()).unwrap();
    assert_eq!(decoded, payload);
    assert_eq!(parts.headers["x-jwt-claim-group"], "admins");
    assert_eq!(parts.headers["x-jwt-claim-roles"], "reader,writer");

    // forwardOriginalToken: true keeps the token where it was (second rule, a cookie here).
    let token2 = f
        .rsa
        .sign(&with(claims(ISSUER2, "bob"), json!({"aud": AUD_ANDROID})));
    let request = req("/", &[("cookie", format!("session={token2}"))]);
    let verified = f
        .authn
        .verify(request.headers(), request.uri())
        .await
        .unwrap()
        .unwrap();
    let edits = f.authn.request_edits(Some(&verified));
    assert!(!edits.iter().any(|e| matches!(e, RequestEdit::RemoveCookie(_))));

    // A token in a query parameter is stripped from the URI when not forwarded.
    let request = req(&format!("/p?x=1&access_token={}", f.token()), &[]);
    let verified = f
        .authn
        .verify(request.headers(), request.uri())
        .await
        .unwrap()
        .unwrap();
    let (mut parts, ()) = request.into_parts();
    apply_edits(
        &mut parts.headers,
        &mut parts.uri,
        &f.authn.request_edits(Some(&verified)),
    );
    assert_eq!(parts.uri, "/p?x=1");
}

#[tokio::test]
async fn forged_output_headers_are_removed_without_a_token() {
    // A client must not be able to pass as verified by sending the headers the proxy writes.
    let f = fixture();
    let mut request = req("/", &[]);
    request
        .headers_mut()
        .insert("x-jwt-payload", "eyJzdWIiOiJhZG1pbiJ9".parse().unwrap());
    let verified = f.authn.verify(request.headers(), request.uri()).await.unwrap();
    assert!(verified.is_none());
    let (mut parts, ()) = request.into_parts();
    apply_edits(&mut parts.headers, &mut parts.uri, &f.authn.request_edits(None));
    assert!(parts.headers.get("x-jwt-payload").is_none());
}

#[tokio::test]
async fn layer_refuses_invalid_tokens_and_passes_auth_info() {
    // Source: istio.io RequestAuthentication reference (invalid token rejected, missing token accepted
    // without identity); the waypoint answers 401.
    let f = fixture();
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let inner = tower::service_fn(move |request: http::Request<()>| {
        seen.fetch_add(1, Ordering::SeqCst);
        let principal = request
            .extensions()
            .get::<AuthInfo>()
            .map(|i| i.principal.clone())
            .unwrap_or_default();
        let authorization = request.headers().contains_key("authorization");
        async move {
            Ok::<_, Infallible>(http::Response::new(format!(
                "principal={principal} authorization={authorization}"
            )))
        }
    });
    let authn = Arc::new(
        JwtAuthenticator::compile(
            parse_resources(&policy_yaml(&jwks(&[&f.rsa])))
                .unwrap()
                .request_authentications(),
            &Target {
                namespace: "foo",
                labels: &httpbin(),
                enforcement: Enforcement::Ztunnel,
            },
            "istio-system",
            &JwksCache::without_fetching(),
        )
        .unwrap(),
    );
    let service = AuthenticateLayer::new(authn).layer(inner);

    let response = service.clone().oneshot(bearer(f.token())).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.body(),
        "principal=testing@secure.istio.io/alice authorization=false"
    );

    let expired = f
        .rsa
        .sign(&with(claims(ISSUER, "alice"), json!({"exp": now() - 3600})));
    let response = service.clone().oneshot(bearer(expired)).await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the inner service is not called on 401"
    );

    let response = service.oneshot(req("/", &[])).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.body(), "principal= authorization=false");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

fn ra(yaml: &str) -> RequestAuthentication {
    parse_resources(yaml)
        .unwrap()
        .request_authentications()
        .next()
        .unwrap()
        .clone()
}

const ROOT_POLICY: &str = "
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: req-authn-for-all, namespace: istio-system}
spec:
  jwtRules: [{issuer: issuer-foo, jwksUri: 'https://example.com/.well-known/jwks.json'}]
";
const SELECTOR_POLICY: &str = "
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  jwtRules: [{issuer: issuer-foo, jwksUri: 'https://example.com/.well-known/jwks.json'}]
";
const NAMESPACE_POLICY: &str = "
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: all, namespace: foo}
spec:
  jwtRules: [{issuer: issuer-foo}]
";
const GATEWAY_POLICY: &str = "
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: at-waypoint, namespace: foo}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  jwtRules: [{issuer: issuer-foo}]
";
const SERVICE_POLICY: &str = "
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: on-service, namespace: foo}
spec:
  targetRefs: [{kind: Service, group: '', name: reviews}]
  jwtRules: [{issuer: issuer-foo}]
";
const GATEWAY_CLASS_POLICY: &str = "
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: all-waypoints, namespace: istio-system}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: GatewayClass, name: istio-waypoint}]
  jwtRules: [{issuer: issuer-foo}]
";

const WAYPOINT: Enforcement<'static> = Enforcement::Waypoint {
    gateway: "waypoint",
    gateway_namespace: "foo",
    service: Some(("foo", "reviews")),
};

#[test_case(ROOT_POLICY, "bar", &[], Enforcement::Ztunnel, true ; "istio.io RequestAuthentication reference: a policy in the root namespace applies to workloads in all namespaces")]
#[test_case(SELECTOR_POLICY, "foo", &[("app", "httpbin")], Enforcement::Ztunnel, true ; "istio.io RequestAuthentication reference: selector matches app httpbin")]
#[test_case(SELECTOR_POLICY, "foo", &[("app", "other")], Enforcement::Ztunnel, false ; "istio.io RequestAuthentication reference: selector does not match")]
#[test_case(SELECTOR_POLICY, "bar", &[("app", "httpbin")], Enforcement::Ztunnel, false ; "istio.io RequestAuthentication reference: selector policy stays in its namespace")]
#[test_case(NAMESPACE_POLICY, "foo", &[], Enforcement::Ztunnel, true ; "istio.io RequestAuthentication reference: no selector applies to the whole namespace")]
#[test_case(NAMESPACE_POLICY, "foo", &[], WAYPOINT, false ; "istio.io ambient: policies without targetRefs are not for waypoints")]
#[test_case(GATEWAY_POLICY, "foo", &[], WAYPOINT, true ; "istio.io ambient: targetRefs naming the waypoint Gateway")]
#[test_case(GATEWAY_POLICY, "foo", &[], Enforcement::Ztunnel, false ; "istio.io ambient: targetRefs policies are not for workloads")]
#[test_case(SERVICE_POLICY, "foo", &[], WAYPOINT, true ; "istio.io ambient: targetRefs naming the called Service")]
#[test_case(GATEWAY_CLASS_POLICY, "foo", &[], WAYPOINT, true ; "istio.io ambient: root-namespace GatewayClass istio-waypoint applies to every waypoint")]
fn scoping(
    yaml: &str,
    namespace: &str,
    labels: &[(&str, &str)],
    enforcement: Enforcement<'_>,
    expected: bool,
) {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let target = Target {
        namespace,
        labels: &labels,
        enforcement,
    };
    assert_eq!(applies(&ra(yaml), &target, "istio-system"), expected);
}

#[tokio::test]
async fn issuer_without_keys_fails_closed_but_requests_without_tokens_pass() {
    // Source: istiod replaces an unusable JWKS with one that verifies nothing, so tokens of that issuer
    // are refused while requests without tokens go on (istio.io RequestAuthentication reference).
    let policy = ra(NAMESPACE_POLICY);
    let target = Target {
        namespace: "foo",
        labels: &BTreeMap::new(),
        enforcement: Enforcement::Ztunnel,
    };
    let authn = JwtAuthenticator::compile([&policy], &target, "istio-system", &JwksCache::without_fetching())
        .unwrap();
    let key = SigningKey::new(Family::P256, Algorithm::ES256, "k");
    let request = bearer(key.sign(&claims("issuer-foo", "alice")));
    let refused = authn.authenticate(request.headers(), request.uri()).await;
    assert!(
        matches!(refused, Err(JwtError::KeysUnavailable { ref issuer, .. }) if issuer == "issuer-foo"),
        "{refused:?}"
    );
    let request = req("/", &[]);
    assert_eq!(
        authn.authenticate(request.headers(), request.uri()).await,
        Ok(None)
    );
}

#[test]
fn invalid_inline_jwks_is_an_error_naming_the_field() {
    let policy = ra("
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: bad, namespace: foo}
spec:
  jwtRules:
  - issuer: a
  - issuer: b
    jwks: '{\"keys\": [{\"kty\": \"oct\", \"k\": \"c2VjcmV0\"}]}'
");
    let target = Target {
        namespace: "foo",
        labels: &BTreeMap::new(),
        enforcement: Enforcement::Ztunnel,
    };
    let error = JwtAuthenticator::compile([&policy], &target, "istio-system", &JwksCache::without_fetching())
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "RequestAuthentication foo/bad: spec.jwtRules[1].jwks: the JWKS has no usable public key (RSA, EC P-256/P-384 or Ed25519)"
    );
    assert!(!error.is_token_error());
}
