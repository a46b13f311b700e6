//! Arbitrary text as a CONNECT `:authority`, through the parser the acceptor uses
//! (`mesh_hbone::TunnelTarget::parse`), both directly and after `http`'s URI parsing as h2 delivers it.
//!
//! Checked: a target has a non-zero port; a hostname target is lower-case DNS characters and is never
//! something a resolver would read as an IP address (that would slip past the acceptor's check that an
//! IP target is the connection's own address); the printed form parses back to the same target (one
//! spelling per target); and what our connector would send for a target (`ConnectRequest::authority`,
//! parsed as a URI the way the client does) reaches the acceptor as the same target.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use libfuzzer_sys::fuzz_target;
use mesh_hbone::TunnelTarget;

fn check(target: &TunnelTarget) {
    assert_ne!(target.port(), 0, "{target:?}");
    let printed = target.to_string();
    assert_eq!(
        TunnelTarget::parse(&printed).as_ref(),
        Some(target),
        "{printed:?} reads back differently"
    );
    match target {
        TunnelTarget::Addr(addr) => {
            // IPv4-mapped IPv6 addresses are compared as IPv4 by the acceptor: they arrive unmapped.
            if let IpAddr::V6(v6) = addr.ip() {
                assert!(v6.to_ipv4_mapped().is_none(), "{target:?} kept its IPv4 mapping");
            }
        }
        TunnelTarget::Host { host, .. } => {
            assert!(!host.is_empty() && host.len() <= 253, "{host:?}");
            assert!(
                host.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-'),
                "{host:?}"
            );
            // A resolver ignores one trailing dot (the root label).
            let bare = host.strip_suffix('.').unwrap_or(host);
            // RFC 1123 labels: none empty (`a..b`), none over 63 bytes, no hyphen at either end.
            for label in bare.split('.') {
                assert!((1..=63).contains(&label.len()), "{host:?} has label {label:?}");
                assert!(
                    !label.starts_with('-') && !label.ends_with('-'),
                    "{host:?} has label {label:?}"
                );
            }
            assert!(
                bare.parse::<IpAddr>().is_err(),
                "hostname {host:?} is an IP address"
            );
            // The legacy inet_aton forms (`127.1`, `0x7f.1`, `017700000001`) resolvers still accept.
            assert!(
                inet_aton(bare).is_none(),
                "hostname {host:?} reads as an IPv4 address"
            );
        }
    }
    // What the client sends for this target: it parses the authority as a URI and sends its authority.
    let uri: http::Uri = printed
        .parse()
        .expect("a printed target is a valid URI authority");
    let sent = uri.authority().expect("an authority").as_str();
    assert_eq!(
        TunnelTarget::parse(sent).as_ref(),
        Some(target),
        "the connector would send {sent:?}"
    );
}

/// The BSD `inet_aton` reading: one to four dot-separated parts, each decimal, octal (leading `0`) or
/// hex (`0x`), the last filling the remaining bytes.
fn inet_aton(text: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = text.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut values = Vec::with_capacity(parts.len());
    for part in &parts {
        let (digits, radix) = if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
            (hex, 16)
        } else if part.len() > 1 && part.starts_with('0') {
            (&part[1..], 8)
        } else {
            (*part, 10)
        };
        if digits.is_empty() && radix != 16 {
            return None;
        }
        let value = if digits.is_empty() {
            0
        } else {
            u64::from_str_radix(digits, radix).ok()?
        };
        values.push(value);
    }
    let (last, leading) = values.split_last()?;
    if leading.iter().any(|v| *v > 255) || *last >= 1u64 << (8 * (4 - leading.len())) {
        return None;
    }
    let mut address = *last;
    for (i, v) in leading.iter().enumerate() {
        address |= v << (8 * (3 - i));
    }
    Some(Ipv4Addr::from(u32::try_from(address).ok()?))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(target) = TunnelTarget::parse(text) {
        check(&target);
    }
    // The acceptor sees the authority as h2 parsed it into the request URI.
    if let Ok(authority) = text.parse::<http::uri::Authority>()
        && let Some(target) = TunnelTarget::parse(authority.as_str())
    {
        check(&target);
    }
});
