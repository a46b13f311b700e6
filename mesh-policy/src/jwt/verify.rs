//! Checking one token: its shape, algorithm, signature and claims, into an [`AuthInfo`].

use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::JwtError;
use super::keys::{KeySet, allowed};
use crate::authz::AuthInfo;

/// A token split and decoded but not yet verified: enough to pick the rule (by `iss`) and the key (by
/// `kid` and `alg`).
#[derive(Debug)]
pub(crate) struct Unverified<'t> {
    pub(crate) token: &'t str,
    pub(crate) alg: Algorithm,
    pub(crate) kid: Option<String>,
    pub(crate) issuer: String,
    pub(crate) payload_segment: &'t str,
}

/// Splits and decodes `token`, refusing what no rule could accept: a bad shape, `alg: none`, HMAC,
/// unknown algorithms, a missing `iss`.
pub(crate) fn peek(token: &str, max_bytes: usize) -> Result<Unverified<'_>, JwtError> {
    if token.len() > max_bytes {
        return Err(JwtError::TooLarge { limit: max_bytes });
    }
    let mut segments = token.split('.');
    let (Some(header), Some(payload), Some(_signature), None) =
        (segments.next(), segments.next(), segments.next(), segments.next())
    else {
        return Err(malformed("a JWT has three segments"));
    };
    let header = json_object(header, "header")?;
    let alg = match header.get("alg") {
        Some(Value::String(alg)) => alg,
        _ => return Err(malformed("the header has no `alg`")),
    };
    let alg = Algorithm::from_str(alg)
        .ok()
        .filter(|a| allowed(*a))
        .ok_or_else(|| JwtError::AlgorithmNotAllowed { alg: alg.clone() })?;
    let kid = match header.get("kid") {
        None | Some(Value::Null) => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(malformed("the header's `kid` is not a string")),
    };
    let claims = json_object(payload, "payload")?;
    let issuer = match claims.get("iss") {
        Some(Value::String(iss)) if !iss.is_empty() => iss.clone(),
        _ => {
            return Err(JwtError::UnknownIssuer {
                issuer: String::new(),
            });
        }
    };
    Ok(Unverified {
        token,
        alg,
        kid,
        issuer,
        payload_segment: payload,
    })
}

fn malformed(reason: &str) -> JwtError {
    JwtError::Malformed {
        reason: reason.to_owned(),
    }
}

fn json_object(segment: &str, what: &str) -> Result<Map<String, Value>, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment.trim_end_matches('='))
        .map_err(|_| malformed(&format!("the {what} is not base64url")))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(malformed(&format!("the {what} is not a JSON object"))),
    }
}

/// Verifies the signature with the candidate keys; the claims on success. `Err(UnknownKey)` when no key
/// fits, which the caller may answer with a refetch.
pub(crate) fn verify_signature(
    token: &Unverified<'_>,
    keys: &KeySet,
) -> Result<Map<String, Value>, JwtError> {
    let mut validation = Validation::new(token.alg);
    // Claims are checked below, as Envoy checks them (exp and nbf optional, our clock skew, Istio's
    // audience rule); jsonwebtoken only verifies the signature here.
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    let mut tried = false;
    for key in keys.candidates(token.kid.as_deref(), token.alg) {
        tried = true;
        match decode(token.token, key, &validation) {
            Ok(claims) => return Ok(claims),
            Err(DecodeError::Signature) => continue,
            Err(DecodeError::Malformed(reason)) => return Err(malformed(&reason)),
        }
    }
    if tried {
        Err(JwtError::BadSignature)
    } else {
        Err(JwtError::UnknownKey {
            kid: token.kid.clone(),
        })
    }
}

enum DecodeError {
    Signature,
    Malformed(String),
}

fn decode(
    token: &str,
    key: &DecodingKey,
    validation: &Validation,
) -> Result<Map<String, Value>, DecodeError> {
    match jsonwebtoken::decode::<Map<String, Value>>(token, key, validation) {
        Ok(data) => Ok(data.claims),
        Err(e) => match e.kind() {
            ErrorKind::Base64(_) | ErrorKind::Json(_) | ErrorKind::Utf8(_) | ErrorKind::InvalidToken => {
                Err(DecodeError::Malformed(e.to_string()))
            }
            // A signature that does not verify, or a key the backend refuses for this algorithm: either
            // way this key did not sign the token.
            _ => Err(DecodeError::Signature),
        },
    }
}

/// Checks the verified claims against a rule and the clock, as Envoy's jwt_authn does: `exp` and `nbf`
/// are optional and honoured with `clock_skew` seconds of tolerance; when the rule lists audiences, one
/// of the token's must be among them.
pub(crate) fn check_claims(
    claims: &Map<String, Value>,
    audiences: &[String],
    now: SystemTime,
    clock_skew_secs: u64,
) -> Result<(), JwtError> {
    let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    if let Some(exp) = numeric_date(claims, "exp")?
        && now > exp.saturating_add(clock_skew_secs)
    {
        return Err(JwtError::Expired);
    }
    if let Some(nbf) = numeric_date(claims, "nbf")?
        && now.saturating_add(clock_skew_secs) < nbf
    {
        return Err(JwtError::NotYetValid);
    }
    if !audiences.is_empty() {
        let token_audiences = audience_list(claims)?;
        if !token_audiences
            .iter()
            .any(|aud| audiences.iter().any(|a| a == aud))
        {
            return Err(JwtError::AudienceMismatch);
        }
    }
    Ok(())
}

/// A NumericDate claim (RFC 7519 section 2): seconds, possibly fractional.
fn numeric_date(claims: &Map<String, Value>, claim: &'static str) -> Result<Option<u64>, JwtError> {
    match claims.get(claim) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(secs) = n.as_u64() {
                Ok(Some(secs))
            } else {
                match n.as_f64() {
                    // Before 1970, or negative: treat as 0, which is "long ago".
                    Some(f) if f.is_finite() && f < 0.0 => Ok(Some(0)),
                    // In range: checked just before, so the cast cannot truncate.
                    #[allow(clippy::cast_possible_truncation)]
                    Some(f) if f.is_finite() && f < u64::MAX as f64 => Ok(Some(f.floor() as u64)),
                    _ => Err(JwtError::BadClaim { claim }),
                }
            }
        }
        Some(_) => Err(JwtError::BadClaim { claim }),
    }
}

/// `aud`: a string or an array of strings (RFC 7519 section 4.1.3).
fn audience_list(claims: &Map<String, Value>) -> Result<Vec<String>, JwtError> {
    match claims.get("aud") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(aud)) => Ok(vec![aud.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(aud) => Ok(aud.clone()),
                _ => Err(JwtError::BadClaim { claim: "aud" }),
            })
            .collect(),
        Some(_) => Err(JwtError::BadClaim { claim: "aud" }),
    }
}

/// What authorization sees of a verified token: `request.auth.principal` is `<iss>/<sub>` (empty when
/// the token has no `sub`, as Istio leaves it), audiences from `aud`, the presenter from `azp`.
pub(crate) fn auth_info(issuer: &str, claims: Map<String, Value>) -> Result<AuthInfo, JwtError> {
    let subject = match claims.get("sub") {
        None | Some(Value::Null) => None,
        Some(Value::String(sub)) => Some(sub.as_str()),
        Some(_) => return Err(JwtError::BadClaim { claim: "sub" }),
    };
    let presenter = match claims.get("azp") {
        None | Some(Value::Null) => None,
        Some(Value::String(azp)) => Some(azp.clone()),
        Some(_) => return Err(JwtError::BadClaim { claim: "azp" }),
    };
    let principal = match subject {
        Some(sub) if !sub.is_empty() => format!("{issuer}/{sub}"),
        _ => String::new(),
    };
    Ok(AuthInfo {
        principal,
        audiences: audience_list(&claims)?,
        presenter,
        claims: Value::Object(claims),
    })
}
