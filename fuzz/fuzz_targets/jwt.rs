//! Arbitrary tokens, claims, request locations and key sets through the waypoint's JWT authentication
//! (`mesh_policy::jwt::JwtAuthenticator`, compiled from a RequestAuthentication with inline keys).
//!
//! The first byte picks what the rest is (modulo 4):
//! - 0: a raw `Authorization` header value (a token, or anything else).
//! - 1: a JWT header and payload as JSON, separated by a NUL byte, which the harness encodes and signs
//!   with the Ed25519 key the JWKS holds: so claim checks run on tokens whose signature verifies.
//! - 2: a query string and a `Cookie` header, separated by a newline, in which every `TOKEN` is replaced
//!   with a valid signed token: the token extraction and removal paths.
//! - 3: a JWKS document, inlined in the rule, in which every `KEY_X` is replaced with the base64url
//!   public key of the token's signer; a valid token is sent.
//!
//! Checked: no panic; a verified token's principal is `<iss>/<sub>` (empty without `sub`); a token
//! expired or not yet valid by more than the clock skew, or lacking a required audience, is never
//! accepted; the output headers a client sends (`x-jwt-sub`, ...) never survive unless a verified token
//! set them; and once the edits of a verified request are applied, no token is left where one was found
//! (the rule does not forward the original token).
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, HeaderValue, Uri};
use libfuzzer_sys::fuzz_target;
use mesh_policy::authz::{Enforcement, Target};
use mesh_policy::jwt::{JwksCache, JwtAuthenticator, apply_edits};
use mesh_policy::resource::parse_resources;
use serde_json::Value;

/// The verification clock: tokens' `exp` and `nbf` are compared with this.
const NOW_SECS: u64 = 1_700_000_000;
/// JwtConfig's default clock skew.
const SKEW_SECS: u64 = 60;
/// Headers the rules write after verification; a client's own values must never pass.
const OUTPUT_HEADERS: [&str; 3] = ["x-jwt-payload", "x-jwt-sub", "x-jwt-groups"];

struct Fixture {
    key: Ed25519KeyPair,
    /// The public key, base64url (a JWK's `x`).
    x: String,
    authenticator: JwtAuthenticator,
    runtime: tokio::runtime::Runtime,
}

/// Two rules: issuer `iss-a` from `Authorization: Bearer`, and issuer `iss-b`, which requires the
/// audience `svc-b`, from the `x-jwt` header, the `token` query parameter and the `session` cookie, and
/// writes the output headers.
fn policy_yaml(jwks: &str) -> String {
    let jwks = serde_json::to_string(jwks).expect("a JSON string");
    format!(
        r#"apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  jwtRules:
  - issuer: iss-a
    jwks: {jwks}
  - issuer: iss-b
    audiences: [svc-b]
    jwks: {jwks}
    fromHeaders: [{{name: x-jwt}}]
    fromParams: [token]
    fromCookies: [session]
    outputPayloadToHeader: x-jwt-payload
    outputClaimToHeaders:
    - {{header: x-jwt-sub, claim: sub}}
    - {{header: x-jwt-groups, claim: groups}}
"#
    )
}

fn compile(jwks: &str) -> Option<JwtAuthenticator> {
    let parsed = parse_resources(&policy_yaml(jwks)).ok()?;
    let labels = BTreeMap::from([("app".to_owned(), "httpbin".to_owned())]);
    let target = Target {
        namespace: "foo",
        labels: &labels,
        enforcement: Enforcement::Ztunnel,
    };
    let cache = JwksCache::without_fetching();
    JwtAuthenticator::compile(parsed.request_authentications(), &target, "istio-system", &cache).ok()
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let key = Ed25519KeyPair::from_seed_unchecked(&[7; 32]).expect("an Ed25519 key");
        let x = URL_SAFE_NO_PAD.encode(key.public_key().as_ref());
        let jwks =
            format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","kid":"k1","alg":"EdDSA","x":"{x}"}}]}}"#);
        let authenticator = compile(&jwks).expect("the fixture's RequestAuthentication compiles");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a tokio runtime");
        Fixture {
            key,
            x,
            authenticator,
            runtime,
        }
    })
}

fn sign(key: &Ed25519KeyPair, header: &[u8], payload: &[u8]) -> String {
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let signature = key.sign(signing_input.as_bytes());
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
}

fn valid_token(key: &Ed25519KeyPair) -> String {
    let payload = format!(
        r#"{{"iss":"iss-b","sub":"alice","aud":["svc-b"],"exp":{},"groups":["dev","ops"]}}"#,
        NOW_SECS + 3600
    );
    sign(key, br#"{"alg":"EdDSA","kid":"k1"}"#, payload.as_bytes())
}

/// A NumericDate as the verifier reads it: whole seconds, negatives as 0.
fn seconds(value: &Value) -> Option<u64> {
    match value.as_u64() {
        Some(secs) => Some(secs),
        None => value
            .as_f64()
            .filter(|f| f.is_finite())
            .map(|f| f.max(0.0).floor() as u64),
    }
}

/// Checks one request: verification, the claims of what verified, and the edits.
fn check(
    authenticator: &JwtAuthenticator,
    runtime: &tokio::runtime::Runtime,
    mut headers: HeaderMap,
    mut uri: Uri,
) {
    // A client trying to forge what verification writes.
    for name in OUTPUT_HEADERS {
        headers.append(name, HeaderValue::from_static("forged"));
    }
    let now = UNIX_EPOCH + Duration::from_secs(NOW_SECS);
    let verified = match runtime.block_on(authenticator.verify_at(&headers, &uri, now)) {
        Ok(verified) => verified,
        Err(error) => {
            let _ = error.to_string();
            None
        }
    };
    if let Some(verified) = &verified {
        let info = &verified.info;
        let claims = &info.claims;
        let issuer = claims
            .get("iss")
            .and_then(Value::as_str)
            .expect("a verified token has an issuer");
        assert!(issuer == "iss-a" || issuer == "iss-b", "issuer {issuer:?}");
        match claims.get("sub").and_then(Value::as_str) {
            Some(sub) if !sub.is_empty() => assert_eq!(info.principal, format!("{issuer}/{sub}")),
            _ => assert_eq!(info.principal, ""),
        }
        if let Some(exp) = claims.get("exp").and_then(seconds) {
            assert!(
                NOW_SECS <= exp.saturating_add(SKEW_SECS),
                "accepted a token expired at {exp}"
            );
        }
        if let Some(nbf) = claims.get("nbf").and_then(seconds) {
            assert!(
                nbf <= NOW_SECS + SKEW_SECS,
                "accepted a token valid only from {nbf}"
            );
        }
        if issuer == "iss-b" {
            assert!(
                info.audiences.iter().any(|a| a == "svc-b"),
                "accepted audiences {:?}",
                info.audiences
            );
        }
    }
    let edits = authenticator.request_edits(verified.as_ref());
    apply_edits(&mut headers, &mut uri, &edits);
    for name in OUTPUT_HEADERS {
        for value in headers.get_all(name) {
            assert_ne!(value, "forged", "the client's own {name} header passed");
        }
    }
    if verified.is_some() {
        let again = runtime.block_on(authenticator.verify_at(&headers, &uri, now));
        assert!(
            matches!(again, Ok(None)),
            "a token is left after the edits: {again:?} in {uri} {headers:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let fixture = fixture();
    let mut headers = HeaderMap::new();
    let default_uri = Uri::from_static("/headers");
    match mode % 4 {
        0 => {
            let Ok(value) = HeaderValue::from_bytes(rest) else {
                return;
            };
            headers.insert(http::header::AUTHORIZATION, value);
            check(&fixture.authenticator, &fixture.runtime, headers, default_uri);
        }
        1 => {
            let (header, payload) = match rest.iter().position(|b| *b == 0) {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (&br#"{"alg":"EdDSA","kid":"k1"}"#[..], rest),
            };
            let token = sign(&fixture.key, header, payload);
            let Ok(bearer) = HeaderValue::from_str(&format!("Bearer {token}")) else {
                return;
            };
            headers.insert(http::header::AUTHORIZATION, bearer);
            let Ok(value) = HeaderValue::from_str(&token) else {
                return;
            };
            headers.insert("x-jwt", value);
            check(&fixture.authenticator, &fixture.runtime, headers, default_uri);
        }
        2 => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            let text = text.replace("TOKEN", &valid_token(&fixture.key));
            let (query, cookie) = text.split_once('\n').unwrap_or((&text, ""));
            let Ok(uri) = format!("/headers?{query}").parse::<Uri>() else {
                return;
            };
            if !cookie.is_empty() {
                let Ok(value) = HeaderValue::from_str(cookie) else {
                    return;
                };
                headers.insert(http::header::COOKIE, value);
            }
            check(&fixture.authenticator, &fixture.runtime, headers, uri);
        }
        _ => {
            let Ok(jwks) = std::str::from_utf8(rest) else {
                return;
            };
            let Some(authenticator) = compile(&jwks.replace("KEY_X", &fixture.x)) else {
                return;
            };
            let token = valid_token(&fixture.key);
            let Ok(value) = HeaderValue::from_str(&token) else {
                return;
            };
            headers.insert("x-jwt", value);
            check(&authenticator, &fixture.runtime, headers, default_uri);
        }
    }
});
