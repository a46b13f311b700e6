//! `RequestAuthentication` (security.istio.io/v1): which JWTs a workload accepts.

use serde::Deserialize;

use super::{Attachment, ObjectMeta, TargetRef, invalid};
use crate::error::PolicyError;

const KIND: &str = "RequestAuthentication";

/// An Istio RequestAuthentication.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthentication {
    /// Name and namespace.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The policy.
    #[serde(default)]
    pub spec: RequestAuthenticationSpec,
}

/// `spec` of a RequestAuthentication.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    /// `selector` or `targetRefs`.
    #[serde(flatten)]
    pub attachment: Attachment,
    /// The accepted token issuers.
    #[serde(default)]
    pub jwt_rules: Vec<JwtRule>,
}

/// One accepted issuer and how to find and check its tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JwtRule {
    /// The `iss` a token must carry.
    pub issuer: String,
    /// Accepted `aud` values; empty accepts any audience.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Where to fetch the JWKS (HTTPS).
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// An inline JWKS document (JSON).
    #[serde(default)]
    pub jwks: Option<String>,
    /// Headers to take the token from (default: `Authorization: Bearer`).
    #[serde(default)]
    pub from_headers: Vec<JwtHeader>,
    /// Query parameters to take the token from (default: `access_token`).
    #[serde(default)]
    pub from_params: Vec<String>,
    /// Cookies to take the token from.
    #[serde(default)]
    pub from_cookies: Vec<String>,
    /// Header to put the verified payload in (base64url JSON).
    #[serde(default)]
    pub output_payload_to_header: Option<String>,
    /// Keep the token in the request sent upstream (it is removed by default).
    #[serde(default)]
    pub forward_original_token: bool,
    /// Claims to copy into request headers.
    #[serde(default)]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// Timeout for fetching `jwksUri`, as a duration string (`5s`).
    #[serde(default)]
    pub timeout: Option<String>,
}

/// `fromHeaders` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct JwtHeader {
    /// The header name.
    pub name: String,
    /// A prefix to strip (`Bearer `).
    #[serde(default)]
    pub prefix: String,
}

/// `outputClaimToHeaders` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ClaimToHeader {
    /// The header to set.
    pub header: String,
    /// The claim to copy (nested claims with `.`).
    pub claim: String,
}

impl RequestAuthentication {
    /// `targetRefs` plus the deprecated `targetRef`.
    pub fn target_refs(&self) -> impl Iterator<Item = &TargetRef> {
        self.spec.attachment.target_refs()
    }

    /// Refuses what Istio's validation refuses, naming the field.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let meta = &self.metadata;
        if meta.name.is_empty() {
            return Err(invalid(KIND, meta, "metadata.name", "must not be empty"));
        }
        self.spec.attachment.validate(KIND, meta)?;
        for (i, rule) in self.spec.jwt_rules.iter().enumerate() {
            let field = format!("spec.jwtRules[{i}]");
            if rule.issuer.is_empty() {
                return Err(invalid(
                    KIND,
                    meta,
                    format!("{field}.issuer"),
                    "must not be empty",
                ));
            }
            if rule.jwks.is_some() && rule.jwks_uri.is_some() {
                return Err(invalid(
                    KIND,
                    meta,
                    format!("{field}.jwks"),
                    "only one of jwks or jwksUri may be set",
                ));
            }
            if let Some(uri) = &rule.jwks_uri
                && !(uri.starts_with("https://") || uri.starts_with("http://"))
            {
                return Err(invalid(
                    KIND,
                    meta,
                    format!("{field}.jwksUri"),
                    format!("{uri:?} is not an http(s) URL"),
                ));
            }
            for (h, header) in rule.from_headers.iter().enumerate() {
                if http::HeaderName::from_bytes(header.name.as_bytes()).is_err() {
                    return Err(invalid(
                        KIND,
                        meta,
                        format!("{field}.fromHeaders[{h}].name"),
                        "not a valid header name",
                    ));
                }
            }
            for (c, claim) in rule.output_claim_to_headers.iter().enumerate() {
                if http::HeaderName::from_bytes(claim.header.as_bytes()).is_err() {
                    return Err(invalid(
                        KIND,
                        meta,
                        format!("{field}.outputClaimToHeaders[{c}].header"),
                        "not a valid header name",
                    ));
                }
            }
        }
        Ok(())
    }
}
