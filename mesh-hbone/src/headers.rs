//! The request headers HBONE carries besides the CONNECT itself: `baggage` (who is calling, as OpenTelemetry
//! attributes), `forwarded` (the original client address, RFC 7239) and `traceparent` (W3C trace context).
//!
//! Encoders produce exactly what Istio's ztunnel sends; parsers accept what it sends and are lenient about
//! what they do not understand (unknown keys are skipped), but never panic and never grow without bound.

use std::fmt::{self, Write as _};
use std::net::SocketAddr;

use http::HeaderValue;
use http::header::HeaderMap;

/// Header name of [`Baggage`].
pub const BAGGAGE: &str = "baggage";
/// Header name of [`Forwarded`].
pub const FORWARDED: &str = "forwarded";
/// Header name of [`TraceParent`].
pub const TRACEPARENT: &str = "traceparent";
/// The header on the inner CONNECT of double HBONE naming the destination network.
pub const X_FORWARDED_NETWORK: &str = "x-forwarded-network";

/// How many `key=value` members one baggage value may hold before the rest are ignored (W3C allows 64).
const MAX_BAGGAGE_MEMBERS: usize = 64;

/// Workload metadata sent in the `baggage` header: the source on a CONNECT request, the destination on the
/// `200` response. Istio's telemetry fills metric labels from it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baggage {
    /// `k8s.cluster.name`.
    pub cluster_name: Option<String>,
    /// `k8s.namespace.name`.
    pub namespace: Option<String>,
    /// The `<kind>` of `k8s.<kind>.name`: `deployment`, `pod`, `job`, `cronjob`, ...
    pub workload_kind: Option<String>,
    /// The value of `k8s.<kind>.name`.
    pub workload_name: Option<String>,
    /// `service.name` (Istio's canonical service).
    pub service_name: Option<String>,
    /// `service.version` (Istio's canonical revision).
    pub service_version: Option<String>,
    /// `cloud.region`.
    pub region: Option<String>,
    /// `cloud.availability_zone`.
    pub zone: Option<String>,
}

impl Baggage {
    /// The header value, members in ztunnel's order, empty members left out. Characters outside the W3C
    /// baggage value set are percent-encoded, so a value can never split or inject a member.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let mut member = |key: &dyn fmt::Display, value: &Option<String>| {
            if let Some(value) = value.as_deref().filter(|v| !v.is_empty()) {
                if !out.is_empty() {
                    out.push(',');
                }
                let _ = write!(out, "{key}=");
                percent_encode_into(value, &mut out);
            }
        };
        member(&"k8s.cluster.name", &self.cluster_name);
        member(&"k8s.namespace.name", &self.namespace);
        if let Some(kind) = self.workload_kind.as_deref().filter(|k| is_token(k)) {
            member(&format_args!("k8s.{kind}.name"), &self.workload_name);
        }
        member(&"service.name", &self.service_name);
        member(&"service.version", &self.service_version);
        member(&"cloud.region", &self.region);
        member(&"cloud.availability_zone", &self.zone);
        out
    }

    /// [`Baggage::encode`] as a header value.
    pub fn to_header_value(&self) -> HeaderValue {
        // encode() only emits visible ASCII, which is always a valid header value.
        HeaderValue::from_str(&self.encode()).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// Reads every `baggage` header in `headers` (a peer may split members across several lines). Values
    /// that are not text are skipped.
    pub fn from_headers(headers: &HeaderMap) -> Baggage {
        let mut baggage = Baggage::default();
        for value in headers.get_all(BAGGAGE) {
            if let Ok(text) = value.to_str() {
                baggage.merge(text);
            }
        }
        baggage
    }

    /// Parses one header value.
    pub fn parse(value: &str) -> Baggage {
        let mut baggage = Baggage::default();
        baggage.merge(value);
        baggage
    }

    fn merge(&mut self, value: &str) {
        for member in value.split(',').take(MAX_BAGGAGE_MEMBERS) {
            // Properties after ';' are metadata about the member; we have no use for them.
            let member = member.split(';').next().unwrap_or_default();
            let Some((key, raw)) = member.split_once('=') else {
                continue;
            };
            let key = key.trim();
            let value = percent_decode(raw.trim()).filter(|v| !v.is_empty());
            match key {
                "k8s.cluster.name" => self.cluster_name = value,
                "k8s.namespace.name" => self.namespace = value,
                "service.name" => self.service_name = value,
                "service.version" => self.service_version = value,
                "cloud.region" => self.region = value,
                "cloud.availability_zone" => self.zone = value,
                _ => {
                    let kind = key.strip_prefix("k8s.").and_then(|k| k.strip_suffix(".name"));
                    if let Some(kind) = kind.filter(|k| is_token(k)) {
                        // An empty or undecodable name leaves no workload at all: a kind without a name
                        // would not survive re-encoding.
                        self.workload_kind = value.is_some().then(|| kind.to_owned());
                        self.workload_name = value;
                    }
                }
            }
        }
    }
}

/// A workload kind must be a plain lower-case word, so it cannot smuggle separators into a key.
fn is_token(kind: &str) -> bool {
    !kind.is_empty() && kind.len() <= 32 && kind.bytes().all(|b| b.is_ascii_lowercase())
}

/// W3C baggage-octet: visible ASCII except `"`, `,`, `;`, `\`; `%` is escaped too, so decoding is exact.
fn is_baggage_octet(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E) && b != b'%'
}

fn percent_encode_into(value: &str, out: &mut String) {
    for b in value.bytes() {
        if is_baggage_octet(b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// Decodes `%XX` escapes; `None` if an escape is malformed or the result is not UTF-8.
fn percent_decode(value: &str) -> Option<String> {
    if !value.contains('%') {
        return Some(value.to_owned());
    }
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The `forwarded` header (RFC 7239) as HBONE uses it: the original client address, and the service
/// hostname when the client addressed a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    /// The original client's address (`for=`).
    pub client: SocketAddr,
    /// The service hostname the client targeted (`host=`), if it targeted a service.
    pub host: Option<String>,
}

impl Forwarded {
    /// `for="<ip:port>"` (IPv6 in brackets), plus `;host=<hostname>` when there is one.
    pub fn encode(&self) -> String {
        let mut out = format!("for=\"{}\"", self.client);
        if let Some(host) = self.host.as_deref().filter(|h| is_hostname(h)) {
            let _ = write!(out, ";host={host}");
        }
        out
    }

    /// [`Forwarded::encode`] as a header value.
    pub fn to_header_value(&self) -> HeaderValue {
        HeaderValue::from_str(&self.encode()).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// Parses the first element of a `forwarded` value (the original client when proxies appended more).
    /// `None` when it names no client socket address (RFC 7239 also allows obfuscated identifiers and
    /// `unknown`, which carry nothing we can use).
    pub fn parse(value: &str) -> Option<Forwarded> {
        let first = value.split(',').next()?;
        let mut client = None;
        let mut host = None;
        for pair in first.split(';') {
            let (key, raw) = pair.split_once('=')?;
            let raw = raw.trim();
            let unquoted = raw
                .strip_prefix('"')
                .and_then(|r| r.strip_suffix('"'))
                .unwrap_or(raw);
            match key.trim().to_ascii_lowercase().as_str() {
                "for" => client = unquoted.parse::<SocketAddr>().ok(),
                "host" if is_hostname(unquoted) => host = Some(unquoted.to_owned()),
                _ => {}
            }
        }
        Some(Forwarded {
            client: client?,
            host,
        })
    }

    /// Reads the first `forwarded` header in `headers`.
    pub fn from_headers(headers: &HeaderMap) -> Option<Forwarded> {
        headers.get(FORWARDED)?.to_str().ok().and_then(Forwarded::parse)
    }
}

fn is_hostname(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

/// A W3C `traceparent`: version 00, a 128-bit trace id, a 64-bit parent id and flags. ztunnel sends a new
/// random one per connection so that a connection can be followed across both proxies' logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace id (never zero).
    pub trace_id: u128,
    /// The parent span id (never zero).
    pub parent_id: u64,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceParent {
    /// A fresh random trace context, not sampled.
    pub fn random() -> TraceParent {
        TraceParent {
            trace_id: fastrand::u128(1..),
            parent_id: fastrand::u64(1..),
            flags: 0,
        }
    }

    /// Parses `00-<32 hex>-<16 hex>-<2 hex>`; `None` if malformed or an id is zero (both invalid in W3C).
    pub fn parse(value: &str) -> Option<TraceParent> {
        let mut parts = value.trim().split('-');
        let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        if parts.next().is_some() || version != "00" || !hex(trace, 32) || !hex(parent, 16) || !hex(flags, 2)
        {
            return None;
        }
        let parsed = TraceParent {
            trace_id: u128::from_str_radix(trace, 16).ok()?,
            parent_id: u64::from_str_radix(parent, 16).ok()?,
            flags: u8::from_str_radix(flags, 16).ok()?,
        };
        (parsed.trace_id != 0 && parsed.parent_id != 0).then_some(parsed)
    }

    /// As a header value.
    pub fn to_header_value(&self) -> HeaderValue {
        HeaderValue::from_str(&self.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

#[doc(hidden)]
/// Entry points for the fuzz targets in `fuzz/`: each must return normally for any input.
pub mod __fuzz {
    /// Parses arbitrary text with every header codec and checks that re-encoding is stable.
    pub fn headers(input: &str) {
        let baggage = super::Baggage::parse(input);
        assert_eq!(super::Baggage::parse(&baggage.encode()), baggage);
        if let Some(forwarded) = super::Forwarded::parse(input) {
            assert_eq!(super::Forwarded::parse(&forwarded.encode()), Some(forwarded));
        }
        if let Some(trace) = super::TraceParent::parse(input) {
            assert_eq!(super::TraceParent::parse(&trace.to_string()), Some(trace));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    fn full() -> Baggage {
        Baggage {
            cluster_name: Some("Kubernetes".into()),
            namespace: Some("default".into()),
            workload_kind: Some("deployment".into()),
            workload_name: Some("client".into()),
            service_name: Some("client".into()),
            service_version: Some("v1".into()),
            region: Some("us-east1".into()),
            zone: Some("us-east1-b".into()),
        }
    }

    #[test]
    fn baggage_encodes_in_ztunnel_order() {
        assert_eq!(
            full().encode(),
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=client,\
             service.name=client,service.version=v1,cloud.region=us-east1,cloud.availability_zone=us-east1-b"
        );
        let partial = Baggage {
            namespace: Some("default".into()),
            ..Baggage::default()
        };
        assert_eq!(partial.encode(), "k8s.namespace.name=default");
        assert_eq!(Baggage::default().encode(), "");
    }

    #[test]
    fn baggage_round_trips_including_hostile_values() {
        assert_eq!(Baggage::parse(&full().encode()), full());
        let hostile = Baggage {
            namespace: Some("a,k8s.cluster.name=evil;x=%y \"z\"".into()),
            ..Baggage::default()
        };
        let encoded = hostile.encode();
        assert!(
            !encoded[encoded.find('=').unwrap() + 1..].contains([',', ';', ' ', '"']),
            "{encoded}"
        );
        assert_eq!(Baggage::parse(&encoded), hostile);
    }

    #[test_case("k8s.cluster.name=K1,k8s.namespace.name=NS1,k8s.deployment.name=N1,service.name=N2,service.version=V1", Some("NS1"), Some("N1") ; "ztunnel sample")]
    #[test_case("k8s.namespace.name=,k8s.pod.name=", None, None ; "empty values")]
    #[test_case(" k8s.namespace.name = ns ;prop=1 , k8s.job.name=j", Some("ns"), Some("j") ; "whitespace and properties")]
    #[test_case("garbage,==,=,k8s.namespace.name", None, None ; "malformed members")]
    #[test_case("k8s.namespace.name=%ZZ", None, None ; "bad escape")]
    #[test_case("k8s.Bad.name=x,k8s.a.b.name=y", None, None ; "invalid kinds are ignored")]
    fn baggage_parse(input: &str, namespace: Option<&str>, workload: Option<&str>) {
        let parsed = Baggage::parse(input);
        assert_eq!(parsed.namespace.as_deref(), namespace);
        assert_eq!(parsed.workload_name.as_deref(), workload);
    }

    #[test]
    fn baggage_from_several_header_lines() {
        let mut headers = HeaderMap::new();
        headers.append(BAGGAGE, HeaderValue::from_static("k8s.cluster.name=K1"));
        headers.append(
            BAGGAGE,
            HeaderValue::from_static("k8s.namespace.name=NS1,service.version=V1"),
        );
        headers.append(BAGGAGE, HeaderValue::from_bytes(b"k8s.pod.name=\xff").unwrap());
        let parsed = Baggage::from_headers(&headers);
        assert_eq!(parsed.cluster_name.as_deref(), Some("K1"));
        assert_eq!(parsed.namespace.as_deref(), Some("NS1"));
        assert_eq!(parsed.service_version.as_deref(), Some("V1"));
        assert_eq!(parsed.workload_name, None, "a non-text line is skipped");
    }

    #[test]
    fn baggage_member_count_is_bounded() {
        let many = (0..10_000)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        let input = format!("{many},k8s.namespace.name=late");
        assert_eq!(Baggage::parse(&input).namespace, None);
    }

    #[test_case("198.18.0.1:40000", None, "for=\"198.18.0.1:40000\"" ; "ipv4")]
    #[test_case("[2001:db8::1]:443", None, "for=\"[2001:db8::1]:443\"" ; "ipv6")]
    #[test_case("10.0.0.1:1", Some("echo.default.svc.cluster.local"), "for=\"10.0.0.1:1\";host=echo.default.svc.cluster.local" ; "with host")]
    fn forwarded_encode(client: &str, host: Option<&str>, expected: &str) {
        let forwarded = Forwarded {
            client: client.parse().unwrap(),
            host: host.map(str::to_owned),
        };
        assert_eq!(forwarded.encode(), expected);
        assert_eq!(Forwarded::parse(expected), Some(forwarded));
    }

    #[test]
    fn forwarded_parse_edge_cases() {
        assert_eq!(
            Forwarded::parse("For=\"10.1.1.1:80\";by=x, for=\"10.9.9.9:1\"").map(|f| f.client),
            Some("10.1.1.1:80".parse().unwrap()),
            "the first element is the original client"
        );
        assert_eq!(Forwarded::parse("for=unknown"), None);
        assert_eq!(Forwarded::parse("for=_hidden"), None);
        assert_eq!(Forwarded::parse(""), None);
        assert_eq!(
            Forwarded::parse("for=\"10.1.1.1:80\";host=a b").unwrap().host,
            None,
            "an invalid host is dropped"
        );
        let hostile = Forwarded {
            client: "10.0.0.1:1".parse().unwrap(),
            host: Some("x;for=\"1.2.3.4:5\"".into()),
        };
        assert_eq!(
            hostile.encode(),
            "for=\"10.0.0.1:1\"",
            "an invalid host is never sent"
        );
    }

    #[test]
    fn traceparent_round_trip_and_validation() {
        let trace = TraceParent::random();
        let text = trace.to_string();
        assert_eq!(text.len(), 55);
        assert!(text.starts_with("00-") && text.ends_with("-00"));
        assert_eq!(TraceParent::parse(&text), Some(trace));
        assert_ne!(TraceParent::random(), trace, "a new context per connection");
        let sample = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = TraceParent::parse(sample).unwrap();
        assert_eq!(parsed.parent_id, 0x00f067aa0ba902b7);
        assert_eq!(parsed.to_string(), sample);
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn fuzz_entry_point_accepts_samples() {
        // The first two were found by fuzzing: a workload key with an empty or undecodable value.
        for input in [
            "k8s.pod.name=",
            "k8s.pod.name=%zz",
            "",
            "k8s.pod.name=%41",
            "for=\"[::1]:1\";host=a",
            "00-1-1-1",
            "%",
            "=,=;=",
        ] {
            __fuzz::headers(input);
        }
    }
}
