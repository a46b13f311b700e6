//! SPIFFE identities: [`TrustDomain`], [`SpiffeId`] and [`PeerIdentity`].
//!
//! Parsing is strict on purpose: an identity decides who may talk to whom, so anything a peer could use to
//! make two different strings compare or print as the same identity is refused. The rules are the SPIFFE ID
//! specification's (scheme `spiffe`, a lower-case trust domain of `[a-z0-9._-]`, path segments of
//! `[A-Za-z0-9._-]`, no empty, `.` or `..` segment, no percent-encoding, port, user info, query or fragment,
//! at most 2048 bytes), which also rules out NUL bytes and non-ASCII text.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::error::{Error, IdentityErrorKind};

/// The URI scheme every SPIFFE ID starts with.
const SCHEME: &str = "spiffe://";
/// The SPIFFE specification's limit for a whole SPIFFE ID URI.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// The SPIFFE specification's limit for a trust domain name.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// A SPIFFE trust domain such as `cluster.local`: the scope within which identities are issued by one root
/// of trust.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(Arc<str>);

impl TrustDomain {
    /// Parses a trust domain name (without the `spiffe://` scheme).
    pub fn new(name: &str) -> Result<Self, Error> {
        validate_trust_domain(name).map_err(|kind| Error::invalid_trust_domain(name, kind))?;
        Ok(TrustDomain(Arc::from(name)))
    }

    /// The trust domain name, e.g. `cluster.local`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The Istio-shaped identity `spiffe://<this>/ns/<namespace>/sa/<service_account>`.
    pub fn istio_identity(&self, namespace: &str, service_account: &str) -> Result<SpiffeId, Error> {
        SpiffeId::istio(self, namespace, service_account)
    }
}

impl Default for TrustDomain {
    /// Istio's default trust domain, `cluster.local`.
    fn default() -> Self {
        TrustDomain(Arc::from("cluster.local"))
    }
}

impl FromStr for TrustDomain {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        TrustDomain::new(s)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

/// A validated SPIFFE ID naming a workload, such as `spiffe://cluster.local/ns/default/sa/client`.
///
/// Cloning is cheap (one reference count), so identities can be used freely as pool and map keys. Istio
/// identities have the path `/ns/<namespace>/sa/<service account>`; [`SpiffeId::namespace`] and
/// [`SpiffeId::service_account`] read those parts, and return `None` for other path shapes (which SPIRE, for
/// one, may issue).
#[derive(Clone)]
pub struct SpiffeId {
    uri: Arc<str>,
    /// Byte offset where the path starts (the `/` after the trust domain).
    path_start: u16,
    /// Byte ranges of the namespace and service account of an Istio-shaped path, found once at parse time
    /// because authorization reads them on every decision.
    istio: Option<IstioParts>,
}

#[derive(Clone, Copy, Debug)]
struct IstioParts {
    namespace: (u16, u16),
    service_account: (u16, u16),
}

// Identity is the URI alone; the offsets are derived from it.
impl PartialEq for SpiffeId {
    fn eq(&self, other: &Self) -> bool {
        self.uri == other.uri
    }
}

impl Eq for SpiffeId {}

impl std::hash::Hash for SpiffeId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.uri.hash(state);
    }
}

impl PartialOrd for SpiffeId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SpiffeId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.uri.cmp(&other.uri)
    }
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID URI. A workload ID must have a path: the bare trust-domain ID
    /// `spiffe://td` names no workload and is refused.
    pub fn parse(uri: &str) -> Result<Self, Error> {
        let path_start = validate_spiffe_id(uri).map_err(|kind| Error::invalid_spiffe_id(uri, kind))?;
        Ok(SpiffeId {
            uri: Arc::from(uri),
            path_start,
            istio: istio_parts(uri, path_start),
        })
    }

    /// Builds `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`, Istio's identity for the pods
    /// of a service account. Each part must be a valid path segment.
    pub fn istio(trust_domain: &TrustDomain, namespace: &str, service_account: &str) -> Result<Self, Error> {
        let uri = format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}");
        // A '/' inside a part would still make a valid SPIFFE ID, but a different identity than asked for.
        if namespace.contains('/') || service_account.contains('/') {
            return Err(Error::invalid_spiffe_id(&uri, IdentityErrorKind::Character('/')));
        }
        SpiffeId::parse(&uri)
    }

    /// The full URI, e.g. `spiffe://cluster.local/ns/default/sa/client`.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The trust domain name (the URI's authority).
    pub fn trust_domain_str(&self) -> &str {
        &self.uri[SCHEME.len()..usize::from(self.path_start)]
    }

    /// Whether this identity belongs to `trust_domain`.
    pub fn is_member_of(&self, trust_domain: &TrustDomain) -> bool {
        self.trust_domain_str() == trust_domain.as_str()
    }

    /// The trust domain as an owned value.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(Arc::from(self.trust_domain_str()))
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.uri[usize::from(self.path_start)..]
    }

    /// The principal as Istio's authorization policies write it: the ID without `spiffe://`, e.g.
    /// `cluster.local/ns/default/sa/client`.
    pub fn principal(&self) -> &str {
        &self.uri[SCHEME.len()..]
    }

    /// The namespace of an Istio-shaped identity (`/ns/<namespace>/sa/<sa>`).
    pub fn namespace(&self) -> Option<&str> {
        self.istio.map(|parts| self.slice(parts.namespace))
    }

    /// The service account of an Istio-shaped identity (`/ns/<namespace>/sa/<sa>`).
    pub fn service_account(&self) -> Option<&str> {
        self.istio.map(|parts| self.slice(parts.service_account))
    }

    fn slice(&self, (start, end): (u16, u16)) -> &str {
        &self.uri[usize::from(start)..usize::from(end)]
    }
}

/// Finds `/ns/<namespace>/sa/<sa>` in a validated id; `None` for other path shapes.
fn istio_parts(uri: &str, path_start: u16) -> Option<IstioParts> {
    let start = usize::from(path_start);
    let mut segments = uri[start..].strip_prefix('/')?.split('/');
    let (Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return None;
    };
    // Offsets within a validated id (at most 2048 bytes) fit u16.
    let ns_start = start + "/ns/".len();
    let sa_start = ns_start + ns.len() + "/sa/".len();
    let range = |from: usize, len: usize| Some((u16::try_from(from).ok()?, u16::try_from(from + len).ok()?));
    Some(IstioParts {
        namespace: range(ns_start, ns.len())?,
        service_account: range(sa_start, sa.len())?,
    })
}

impl FromStr for SpiffeId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        SpiffeId::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.uri)
    }
}

impl AsRef<str> for SpiffeId {
    fn as_ref(&self) -> &str {
        &self.uri
    }
}

/// What a connection proved about the peer on its other end.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PeerIdentity {
    /// The peer presented a certificate chained to our trust bundle, carrying this SPIFFE ID.
    Mtls(SpiffeId),
    /// The connection was not mutually authenticated (for example inbound plaintext on port 15006).
    Plaintext,
}

impl PeerIdentity {
    /// The authenticated SPIFFE ID, if there is one.
    pub fn spiffe_id(&self) -> Option<&SpiffeId> {
        match self {
            PeerIdentity::Mtls(id) => Some(id),
            PeerIdentity::Plaintext => None,
        }
    }

    /// Istio's `connection_security_policy` metric label: `mutual_tls` or `unknown`.
    pub fn security_policy(&self) -> &'static str {
        match self {
            PeerIdentity::Mtls(_) => "mutual_tls",
            PeerIdentity::Plaintext => "unknown",
        }
    }
}

impl fmt::Display for PeerIdentity {
    /// The SPIFFE ID, or `unknown` as Istio's metrics and access logs print a missing identity.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerIdentity::Mtls(id) => fmt::Display::fmt(id, f),
            PeerIdentity::Plaintext => f.write_str("unknown"),
        }
    }
}

fn validate_trust_domain(name: &str) -> Result<(), IdentityErrorKind> {
    if name.is_empty() {
        return Err(IdentityErrorKind::EmptyTrustDomain);
    }
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdentityErrorKind::TooLong {
            limit: MAX_TRUST_DOMAIN_LEN,
        });
    }
    for &b in name.as_bytes() {
        match b {
            b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' => {}
            b':' => return Err(IdentityErrorKind::Port),
            b'@' => return Err(IdentityErrorKind::UserInfo),
            other => return Err(disallowed(other, true)),
        }
    }
    Ok(())
}

/// Checks `uri` and returns the byte offset where its path starts.
fn validate_spiffe_id(uri: &str) -> Result<u16, IdentityErrorKind> {
    if uri.len() > MAX_SPIFFE_ID_LEN {
        return Err(IdentityErrorKind::TooLong {
            limit: MAX_SPIFFE_ID_LEN,
        });
    }
    let rest = uri.strip_prefix(SCHEME).ok_or(IdentityErrorKind::Scheme)?;
    let (trust_domain, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    validate_trust_domain(trust_domain)?;
    if path.is_empty() {
        return Err(IdentityErrorKind::EmptyPath);
    }
    // `path` starts with '/'; every segment after it must be non-empty and made of allowed characters.
    for segment in path[1..].split('/') {
        match segment {
            "" => return Err(IdentityErrorKind::EmptySegment),
            "." | ".." => return Err(IdentityErrorKind::DotSegment),
            _ => {}
        }
        for &b in segment.as_bytes() {
            match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_' => {}
                other => return Err(disallowed(other, false)),
            }
        }
    }
    // The length check above bounds the offset to 2048, which fits u16.
    u16::try_from(SCHEME.len() + trust_domain.len()).map_err(|_| IdentityErrorKind::TooLong {
        limit: MAX_SPIFFE_ID_LEN,
    })
}

fn disallowed(byte: u8, in_trust_domain: bool) -> IdentityErrorKind {
    match byte {
        0 => IdentityErrorKind::Nul,
        b'%' => IdentityErrorKind::PercentEncoded,
        b'?' => IdentityErrorKind::Query,
        b'#' => IdentityErrorKind::Fragment,
        b if !b.is_ascii() => IdentityErrorKind::NonAscii,
        b'A'..=b'Z' if in_trust_domain => IdentityErrorKind::UppercaseTrustDomain,
        b => IdentityErrorKind::Character(char::from(b)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    #[test]
    fn istio_identity_round_trip() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let id = SpiffeId::istio(&td, "default", "client").unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/default/sa/client");
        assert_eq!(id.trust_domain_str(), "cluster.local");
        assert_eq!(id.namespace(), Some("default"));
        assert_eq!(id.service_account(), Some("client"));
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/client");
        assert_eq!(id.path(), "/ns/default/sa/client");
        assert!(id.is_member_of(&td));
        assert!(!id.is_member_of(&TrustDomain::new("other.td").unwrap()));
        assert_eq!(SpiffeId::parse(id.as_str()).unwrap(), id);
    }

    #[test]
    fn non_istio_path_has_no_namespace() {
        let id = SpiffeId::parse("spiffe://example.org/workload/db-1").unwrap();
        assert_eq!(id.namespace(), None);
        assert_eq!(id.service_account(), None);
        let id = SpiffeId::parse("spiffe://example.org/ns/a/sa/b/extra").unwrap();
        assert_eq!(id.namespace(), None);
    }

    #[test_case("spiffe://cluster.local/ns/default/sa/client" ; "istio")]
    #[test_case("spiffe://a/b" ; "minimal")]
    #[test_case("spiffe://my-td_1.example/A.b-c_d/Z9" ; "all allowed characters")]
    #[test_case("spiffe://td/a/.hidden/..dots" ; "dots inside segments")]
    fn accepts(input: &str) {
        let id = SpiffeId::parse(input).unwrap();
        assert_eq!(id.as_str(), input);
    }

    #[test_case("", IdentityErrorKind::Scheme ; "empty")]
    #[test_case("http://cluster.local/ns/a/sa/b", IdentityErrorKind::Scheme ; "other scheme")]
    #[test_case("SPIFFE://cluster.local/ns/a/sa/b", IdentityErrorKind::Scheme ; "upper case scheme")]
    #[test_case("spiffe:/cluster.local/ns/a", IdentityErrorKind::Scheme ; "one slash")]
    #[test_case("spiffe:///ns/a/sa/b", IdentityErrorKind::EmptyTrustDomain ; "empty trust domain")]
    #[test_case("spiffe://cluster.local", IdentityErrorKind::EmptyPath ; "no path")]
    #[test_case("spiffe://cluster.local/", IdentityErrorKind::EmptySegment ; "trailing slash only")]
    #[test_case("spiffe://cluster.local/ns/a/sa/b/", IdentityErrorKind::EmptySegment ; "trailing slash")]
    #[test_case("spiffe://cluster.local/ns//sa/b", IdentityErrorKind::EmptySegment ; "empty segment")]
    #[test_case("spiffe://cluster.local/ns/./sa/b", IdentityErrorKind::DotSegment ; "dot segment")]
    #[test_case("spiffe://cluster.local/ns/../sa/b", IdentityErrorKind::DotSegment ; "dot dot segment")]
    #[test_case("spiffe://cluster.local/ns/a%2Fb/sa/c", IdentityErrorKind::PercentEncoded ; "percent in path")]
    #[test_case("spiffe://cluster%2elocal/ns/a", IdentityErrorKind::PercentEncoded ; "percent in td")]
    #[test_case("spiffe://cluster.local/ns/a\0/sa/b", IdentityErrorKind::Nul ; "nul in path")]
    #[test_case("spiffe://cluster.local\0/ns/a", IdentityErrorKind::Nul ; "nul in td")]
    #[test_case("spiffe://cluster.local/ns/défaut/sa/b", IdentityErrorKind::NonAscii ; "non ascii path")]
    #[test_case("spiffe://clüster.local/ns/a", IdentityErrorKind::NonAscii ; "non ascii td")]
    #[test_case("spiffe://cluster.local:8080/ns/a", IdentityErrorKind::Port ; "port")]
    #[test_case("spiffe://user@cluster.local/ns/a", IdentityErrorKind::UserInfo ; "user info")]
    #[test_case("spiffe://cluster.local/ns/a?x=1", IdentityErrorKind::Query ; "query")]
    #[test_case("spiffe://cluster.local/ns/a#frag", IdentityErrorKind::Fragment ; "fragment")]
    #[test_case("spiffe://Cluster.local/ns/a", IdentityErrorKind::UppercaseTrustDomain ; "upper case td")]
    #[test_case("spiffe://cluster.local/ns/a b", IdentityErrorKind::Character(' ') ; "space")]
    #[test_case("spiffe://cluster.local/ns/a:b", IdentityErrorKind::Character(':') ; "colon in path")]
    fn rejects(input: &str, expected: IdentityErrorKind) {
        match SpiffeId::parse(input) {
            Err(Error::InvalidSpiffeId { reason, .. }) => assert_eq!(reason, expected, "{input:?}"),
            other => panic!("{input:?}: expected {expected:?}, got {other:?}"),
        }
    }

    #[test]
    fn rejects_over_long_ids() {
        let longest = format!(
            "spiffe://td/{}",
            "a".repeat(MAX_SPIFFE_ID_LEN - "spiffe://td/".len())
        );
        assert_eq!(longest.len(), MAX_SPIFFE_ID_LEN);
        assert!(SpiffeId::parse(&longest).is_ok());
        let too_long = format!("{longest}a");
        assert!(matches!(
            SpiffeId::parse(&too_long),
            Err(Error::InvalidSpiffeId {
                reason: IdentityErrorKind::TooLong {
                    limit: MAX_SPIFFE_ID_LEN
                },
                ..
            })
        ));
        let long_td = "a".repeat(MAX_TRUST_DOMAIN_LEN + 1);
        assert!(matches!(
            TrustDomain::new(&long_td),
            Err(Error::InvalidTrustDomain { .. })
        ));
    }

    #[test]
    fn istio_constructor_validates_parts() {
        let td = TrustDomain::default();
        assert!(
            SpiffeId::istio(&td, "a/b", "sa").is_err(),
            "a slash would inject a segment"
        );
        assert!(SpiffeId::istio(&td, "", "sa").is_err());
        assert!(SpiffeId::istio(&td, "ns", "..").is_err());
    }

    #[test]
    fn error_message_names_input_and_reason() {
        let err = SpiffeId::parse("spiffe://td/ns/%41").unwrap_err().to_string();
        assert!(err.contains("spiffe://td/ns/%41"), "{err}");
        assert!(err.contains("percent"), "{err}");
    }

    #[test]
    fn peer_identity_labels() {
        let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
        assert_eq!(PeerIdentity::Mtls(id.clone()).security_policy(), "mutual_tls");
        assert_eq!(PeerIdentity::Plaintext.security_policy(), "unknown");
        assert_eq!(PeerIdentity::Plaintext.to_string(), "unknown");
        assert_eq!(PeerIdentity::Mtls(id.clone()).spiffe_id(), Some(&id));
    }
}
