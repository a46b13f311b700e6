//! The JWT module's error type.

/// Why a token was refused, or why RequestAuthentications could not be compiled or their keys fetched.
///
/// This is `mesh-policy`'s second error type, kept apart from [`crate::PolicyError`] on purpose: a
/// [`crate::PolicyError`] is about configuration and is fixed by editing a resource, while most of these
/// are about one request's token and end as a `401` (see [`JwtError::is_token_error`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// The token is not three base64url segments with JSON header and payload.
    #[error("Jwt is not in the form of Header.Payload.Signature: {reason}")]
    Malformed {
        /// What is wrong with it.
        reason: String,
    },
    /// The token is larger than [`super::JwtConfig::max_token_bytes`].
    #[error("Jwt is larger than {limit} bytes")]
    TooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// The header's `alg` is not one Istio accepts: `none`, the HMAC family and unknown names are refused.
    #[error("Jwt algorithm {alg:?} is not allowed")]
    AlgorithmNotAllowed {
        /// The `alg` the header named.
        alg: String,
    },
    /// The token has no `iss`, or one no applicable jwtRule names.
    #[error("Jwt issuer {issuer:?} is not configured")]
    UnknownIssuer {
        /// The `iss` claim ("" when missing).
        issuer: String,
    },
    /// No key of the issuer's JWKS fits the token (its `kid`, or its algorithm), even after a refetch.
    #[error("Jwt verification fails: no key for kid {kid:?}")]
    UnknownKey {
        /// The header's `kid`, if any.
        kid: Option<String>,
    },
    /// The signature does not verify with any candidate key.
    #[error("Jwt verification fails: bad signature")]
    BadSignature,
    /// `exp` is in the past (beyond the clock skew).
    #[error("Jwt is expired")]
    Expired,
    /// `nbf` is in the future (beyond the clock skew). `iat` is not checked, as Envoy does not.
    #[error("Jwt not yet valid")]
    NotYetValid,
    /// A time or identity claim has the wrong JSON type.
    #[error("Jwt claim {claim} is malformed")]
    BadClaim {
        /// The claim name.
        claim: &'static str,
    },
    /// The rule lists audiences and none of the token's `aud` values is among them.
    #[error("Audiences in Jwt are not allowed")]
    AudienceMismatch,
    /// The issuer's keys have never been fetched successfully (so tokens of that issuer fail closed, as
    /// istiod's fake JWKS makes them fail).
    #[error("Jwks for issuer {issuer:?} is unavailable: {reason}")]
    KeysUnavailable {
        /// The rule's issuer.
        issuer: String,
        /// The last fetch error.
        reason: String,
    },
    /// Fetching or parsing a JWKS (or an OpenID discovery document) failed.
    #[error("fetching {uri}: {reason}")]
    Fetch {
        /// The URI fetched.
        uri: String,
        /// What went wrong.
        reason: String,
    },
    /// A RequestAuthentication's rule cannot be compiled (an inline `jwks` that is not a JWKS, a bad
    /// `timeout`).
    #[error("RequestAuthentication {resource}: {field}: {reason}")]
    InvalidRule {
        /// `namespace/name`.
        resource: String,
        /// The field path, e.g. `spec.jwtRules[0].jwks`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl JwtError {
    /// Whether the error is about a request's token (the request is answered `401`), as opposed to
    /// configuration ([`JwtError::InvalidRule`]) or a fetch made outside any request ([`JwtError::Fetch`]).
    pub fn is_token_error(&self) -> bool {
        !matches!(self, JwtError::InvalidRule { .. } | JwtError::Fetch { .. })
    }
}
