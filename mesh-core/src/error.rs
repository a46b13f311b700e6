//! The one error type of `mesh-core`.
//!
//! Each variant is something a caller can act on: a bad identity string to report, a peer to refuse, a CA
//! to retry. Variants carry small reason enums instead of strings where a caller may want to match on them.

use std::fmt;

use crate::identity::{SpiffeId, TrustDomain};

/// Errors from `mesh-core`: identity parsing, certificate handling, TLS verification and the mesh model.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A string is not a valid SPIFFE workload ID.
    #[error("invalid SPIFFE ID {input:?}: {reason}")]
    InvalidSpiffeId {
        /// The rejected input, cut to 128 characters for logging.
        input: String,
        /// Which rule it broke.
        reason: IdentityErrorKind,
    },

    /// A string is not a valid SPIFFE trust domain name.
    #[error("invalid trust domain {input:?}: {reason}")]
    InvalidTrustDomain {
        /// The rejected input, cut to 128 characters for logging.
        input: String,
        /// Which rule it broke.
        reason: IdentityErrorKind,
    },

    /// A certificate, key or CSR could not be parsed.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What was being parsed (`certificate`, `private key`, `CSR`, ...).
        what: &'static str,
        /// The parser's explanation.
        reason: String,
    },

    /// A certificate does not carry exactly one URI SAN holding a valid SPIFFE ID (the X.509-SVID rule).
    #[error("certificate is not an X.509-SVID: {reason}")]
    NotSvid {
        /// What is wrong with its subject alternative names.
        reason: SvidErrorKind,
    },

    /// The peer's identity is valid but in a trust domain this side does not accept.
    #[error("peer {peer} is outside the accepted trust domains {accepted:?}")]
    UntrustedDomain {
        /// The identity the peer proved.
        peer: SpiffeId,
        /// The trust domains this side accepts.
        accepted: Vec<TrustDomain>,
    },

    /// The server proved an identity other than the ones the client expected to reach.
    #[error("peer {peer} is not one of the expected identities {expected:?}")]
    UnexpectedIdentity {
        /// The identity the server proved.
        peer: SpiffeId,
        /// The identities the client would have accepted.
        expected: Vec<SpiffeId>,
    },

    /// A certificate chain failed path validation against the trust bundle (bad signature, unknown issuer,
    /// expired, not yet valid, wrong key usage, ...).
    #[error("certificate chain rejected: {0}")]
    ChainInvalid(webpki::Error),

    /// A signer (a CA) could not issue a certificate.
    #[error("signing a certificate for {identity} failed: {reason}")]
    Signing {
        /// The identity that was requested.
        identity: SpiffeId,
        /// The signer's explanation (transport error, refusal, ...).
        reason: String,
    },

    /// A signer returned a certificate that does not match the request (wrong identity or wrong key): it is
    /// never used.
    #[error("signer returned an unusable certificate for {identity}: {reason}")]
    SignedCertMismatch {
        /// The identity that was requested.
        identity: SpiffeId,
        /// What did not match.
        reason: String,
    },

    /// Generating a key pair or building a certificate or CSR failed.
    #[error("certificate generation failed: {0}")]
    Generation(#[from] rcgen::Error),

    /// rustls refused a configuration built from our certificates or keys.
    #[error("TLS configuration rejected: {0}")]
    Tls(#[from] rustls::Error),

    /// A mesh model object is invalid or conflicts with another one in the same snapshot.
    #[error("invalid mesh model: {0}")]
    Model(#[from] crate::model::ModelError),
}

impl Error {
    pub(crate) fn invalid_spiffe_id(input: &str, reason: IdentityErrorKind) -> Self {
        Error::InvalidSpiffeId {
            input: truncate_for_log(input),
            reason,
        }
    }

    pub(crate) fn invalid_trust_domain(input: &str, reason: IdentityErrorKind) -> Self {
        Error::InvalidTrustDomain {
            input: truncate_for_log(input),
            reason,
        }
    }

    pub(crate) fn malformed(what: &'static str, reason: impl fmt::Display) -> Self {
        Error::Malformed {
            what,
            reason: reason.to_string(),
        }
    }
}

/// Peer-controlled strings go into logs; cap what one of them can make us print.
fn truncate_for_log(input: &str) -> String {
    const LIMIT: usize = 128;
    match input.char_indices().nth(LIMIT) {
        Some((cut, _)) => format!("{}...", &input[..cut]),
        None => input.to_owned(),
    }
}

/// The rule a SPIFFE ID or trust domain broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdentityErrorKind {
    /// Does not start with `spiffe://`.
    Scheme,
    /// The trust domain is empty.
    EmptyTrustDomain,
    /// The trust domain has upper-case letters (SPIFFE trust domains are lower case).
    UppercaseTrustDomain,
    /// There is no path, so the ID names a trust domain and not a workload.
    EmptyPath,
    /// A path segment is empty (`//` or a trailing `/`).
    EmptySegment,
    /// A path segment is `.` or `..`.
    DotSegment,
    /// A `%` escape, which would let two spellings denote one identity.
    PercentEncoded,
    /// A NUL byte, which C-string consumers would truncate at.
    Nul,
    /// A non-ASCII character.
    NonAscii,
    /// A port after the trust domain.
    Port,
    /// User info (`user@`) before the trust domain.
    UserInfo,
    /// A query string.
    Query,
    /// A fragment.
    Fragment,
    /// Some other character outside the allowed set.
    Character(char),
    /// Longer than the SPIFFE limit.
    TooLong {
        /// The limit in bytes.
        limit: usize,
    },
}

impl fmt::Display for IdentityErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityErrorKind::Scheme => f.write_str("must start with spiffe://"),
            IdentityErrorKind::EmptyTrustDomain => f.write_str("empty trust domain"),
            IdentityErrorKind::UppercaseTrustDomain => f.write_str("trust domain must be lower case"),
            IdentityErrorKind::EmptyPath => f.write_str("no path: a workload ID needs one"),
            IdentityErrorKind::EmptySegment => f.write_str("empty path segment"),
            IdentityErrorKind::DotSegment => f.write_str("'.' or '..' path segment"),
            IdentityErrorKind::PercentEncoded => f.write_str("percent-encoding is not allowed"),
            IdentityErrorKind::Nul => f.write_str("NUL byte"),
            IdentityErrorKind::NonAscii => f.write_str("non-ASCII character"),
            IdentityErrorKind::Port => f.write_str("a port is not allowed"),
            IdentityErrorKind::UserInfo => f.write_str("user info is not allowed"),
            IdentityErrorKind::Query => f.write_str("a query is not allowed"),
            IdentityErrorKind::Fragment => f.write_str("a fragment is not allowed"),
            IdentityErrorKind::Character(c) => write!(f, "character {c:?} is not allowed"),
            IdentityErrorKind::TooLong { limit } => write!(f, "longer than {limit} bytes"),
        }
    }
}

/// Why a certificate is not a usable X.509-SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SvidErrorKind {
    /// No URI subject alternative name.
    NoUriSan,
    /// More than one URI SAN; the SPIFFE X.509-SVID rules allow exactly one, so the identity is ambiguous.
    SeveralUriSans(usize),
    /// The URI SAN is not a valid SPIFFE ID, for this reason.
    InvalidUri(IdentityErrorKind),
    /// The certificate has no leaf at all (an empty chain).
    EmptyChain,
}

impl fmt::Display for SvidErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SvidErrorKind::NoUriSan => f.write_str("no URI SAN"),
            SvidErrorKind::SeveralUriSans(n) => write!(f, "{n} URI SANs, exactly one is allowed"),
            SvidErrorKind::InvalidUri(reason) => write!(f, "URI SAN is not a SPIFFE ID: {reason}"),
            SvidErrorKind::EmptyChain => f.write_str("no certificate"),
        }
    }
}
