//! Shared by the JWT tests: signing keys generated in the test (RSA 2048, EC P-256 and P-384, Ed25519),
//! tokens signed with jsonwebtoken's `encode`, JWKS documents, and the clock.
#![allow(clippy::unwrap_used, missing_docs, dead_code, unreachable_pub)]

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519, PKCS_RSA_SHA256};
use serde_json::{Value, json};

/// A private key of one family, generated once per test binary (RSA generation is the slow one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Rsa,
    /// A second RSA key: a token it signs under another key's `kid` has a bad signature.
    RsaOther,
    P256,
    P384,
    Ed25519,
}

/// A private key (PKCS#8 PEM) and its raw public key.
type Generated = (String, Vec<u8>);

/// The generated key of `family`.
fn generated(family: Family) -> &'static Generated {
    static PEMS: OnceLock<Vec<(Family, Generated)>> = OnceLock::new();
    let pems = PEMS.get_or_init(|| {
        [
            (Family::Rsa, &PKCS_RSA_SHA256),
            (Family::RsaOther, &PKCS_RSA_SHA256),
            (Family::P256, &PKCS_ECDSA_P256_SHA256),
            (Family::P384, &PKCS_ECDSA_P384_SHA384),
            (Family::Ed25519, &PKCS_ED25519),
        ]
        .into_iter()
        .map(|(family, alg)| {
            let key = KeyPair::generate_for(alg).unwrap();
            (family, (key.serialize_pem(), key.public_key_raw().to_vec()))
        })
        .collect()
    });
    &pems.iter().find(|(f, _)| *f == family).unwrap().1
}

/// A signing key with its `kid` and algorithm.
pub struct SigningKey {
    pub kid: String,
    pub alg: Algorithm,
    pub family: Family,
    encoding: EncodingKey,
}

impl SigningKey {
    pub fn new(family: Family, alg: Algorithm, kid: &str) -> SigningKey {
        let pem = generated(family).0.as_bytes();
        let encoding = match family {
            Family::Rsa | Family::RsaOther => EncodingKey::from_rsa_pem(pem),
            Family::P256 | Family::P384 => EncodingKey::from_ec_pem(pem),
            Family::Ed25519 => EncodingKey::from_ed_pem(pem),
        }
        .unwrap();
        SigningKey {
            kid: kid.to_owned(),
            alg,
            family,
            encoding,
        }
    }

    /// The public JWK, with `kid` and `use: sig` (and no `alg`, so one RSA key serves every RSA algorithm).
    pub fn jwk(&self) -> Value {
        let mut value = if self.family == Family::Ed25519 {
            // jsonwebtoken derives Ed25519 JWKs only from PKCS#8 v1 keys; aws-lc writes v2.
            json!({"kty": "OKP", "crv": "Ed25519", "x": URL_SAFE_NO_PAD.encode(&generated(self.family).1)})
        } else {
            serde_json::to_value(Jwk::from_encoding_key(&self.encoding, self.alg).unwrap()).unwrap()
        };
        let object = value.as_object_mut().unwrap();
        object.remove("alg");
        object.insert("kid".into(), json!(self.kid));
        object.insert("use".into(), json!("sig"));
        value
    }

    /// A token with header `{alg}` only.
    pub fn sign_without_kid(&self, claims: &Value) -> String {
        jsonwebtoken::encode(&Header::new(self.alg), claims, &self.encoding).unwrap()
    }

    /// A token with header `{alg, kid}` and these claims.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }
}

/// A JWKS document holding these keys' public halves.
pub fn jwks(keys: &[&SigningKey]) -> String {
    json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() }).to_string()
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Claims valid for an hour: `iss`, `sub`, `iat`, `exp`.
pub fn claims(issuer: &str, subject: &str) -> Value {
    let now = now();
    json!({ "iss": issuer, "sub": subject, "iat": now, "exp": now + 3600 })
}

/// `claims` with `extra` merged in (a `null` removes a claim).
pub fn with(mut claims: Value, extra: Value) -> Value {
    let object = claims.as_object_mut().unwrap();
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            object.remove(k);
        } else {
            object.insert(k.clone(), v.clone());
        }
    }
    claims
}

/// An unsigned token with a header of our choosing (`alg: none`, or anything else).
pub fn unsigned(header: &Value, claims: &Value, signature: &str) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        signature
    )
}

/// The token with its payload replaced (the signature no longer matches).
pub fn tampered(token: &str, claims: &Value) -> String {
    let mut parts = token.split('.');
    let header = parts.next().unwrap();
    parts.next();
    let signature = parts.next().unwrap();
    format!(
        "{header}.{}.{signature}",
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}
