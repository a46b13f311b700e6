//! A parsed JWKS: the public keys tokens may be verified with.

use std::fmt;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};

/// The usable keys of one JWKS document. Keys this crate cannot use for verification (symmetric `oct`
/// keys, encryption keys, unknown key types) are left out; a document with no usable key is refused, as
/// Envoy refuses it.
#[derive(Clone)]
pub(crate) struct KeySet {
    keys: Vec<PublicKey>,
}

#[derive(Clone)]
struct PublicKey {
    kid: Option<String>,
    /// The key's own `alg`, when it names one.
    alg: Option<Algorithm>,
    family: AlgorithmFamily,
    curve: Option<EllipticCurve>,
    key: DecodingKey,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|k| (k.kid.as_deref(), k.family)))
            .finish()
    }
}

/// Cap on the keys kept from one document: a JWKS endpoint is trusted, but not to be unbounded.
const MAX_KEYS: usize = 64;

impl KeySet {
    /// Parses a JWKS JSON document (`{"keys": [...]}`).
    pub(crate) fn parse(json: &str) -> Result<KeySet, String> {
        #[derive(serde::Deserialize)]
        struct Document {
            keys: Vec<serde_json::Value>,
        }
        let document: Document =
            serde_json::from_str(json).map_err(|e| format!("not a JWKS document: {e}"))?;
        let keys: Vec<PublicKey> = document
            .keys
            .into_iter()
            .filter_map(|value| serde_json::from_value::<Jwk>(value).ok())
            .filter_map(|jwk| PublicKey::from_jwk(&jwk))
            .take(MAX_KEYS)
            .collect();
        if keys.is_empty() {
            return Err("the JWKS has no usable public key (RSA, EC P-256/P-384 or Ed25519)".into());
        }
        Ok(KeySet { keys })
    }

    /// Number of usable keys.
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// The keys a token with header `kid` and `alg` may have been signed with: the key with that `kid`
    /// when the token names one, every key otherwise (Envoy tries each), always of the algorithm's family
    /// and curve and, when the key names an `alg`, of that algorithm.
    pub(crate) fn candidates<'a>(
        &'a self,
        kid: Option<&'a str>,
        alg: Algorithm,
    ) -> impl Iterator<Item = &'a DecodingKey> + 'a {
        self.keys
            .iter()
            .filter(move |k| kid.is_none_or(|kid| k.kid.as_deref() == Some(kid)))
            .filter(move |k| k.fits(alg))
            .map(|k| &k.key)
    }
}

impl PublicKey {
    fn from_jwk(jwk: &Jwk) -> Option<PublicKey> {
        if matches!(
            jwk.common.public_key_use,
            Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
        ) {
            return None;
        }
        let alg = match jwk.common.key_algorithm {
            None => None,
            // A key meant for another algorithm (encryption, HMAC, unknown) verifies nothing here.
            Some(alg) => Some(Algorithm::try_from(alg).ok().filter(|a| allowed(*a))?),
        };
        let (family, curve) = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => (AlgorithmFamily::Rsa, None),
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 | EllipticCurve::P384 => (AlgorithmFamily::Ec, Some(p.curve.clone())),
                _ => return None,
            },
            AlgorithmParameters::OctetKeyPair(p) => match p.curve {
                EllipticCurve::Ed25519 => (AlgorithmFamily::Ed, Some(EllipticCurve::Ed25519)),
                _ => return None,
            },
            // Symmetric keys would let anyone holding the JWKS mint tokens: never used.
            _ => return None,
        };
        let key = DecodingKey::from_jwk(jwk).ok()?;
        Some(PublicKey {
            kid: jwk.common.key_id.clone(),
            alg,
            family,
            curve,
            key,
        })
    }

    fn fits(&self, alg: Algorithm) -> bool {
        if self.alg.is_some_and(|own| own != alg) || self.family != alg.family() {
            return false;
        }
        match alg {
            Algorithm::ES256 => self.curve == Some(EllipticCurve::P256),
            Algorithm::ES384 => self.curve == Some(EllipticCurve::P384),
            _ => true,
        }
    }
}

/// The algorithms Istio (Envoy's jwt_authn) verifies: RSA PKCS#1 and PSS, ECDSA P-256/P-384, Ed25519.
/// `none` never parses as an [`Algorithm`]; the HMAC family is refused since a JWKS is public.
pub(crate) fn allowed(alg: Algorithm) -> bool {
    !matches!(alg.family(), AlgorithmFamily::Hmac)
}
