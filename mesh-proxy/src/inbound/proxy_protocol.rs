//! The PROXY protocol v2 header the inbound side writes in front of the stream for workloads that ask
//! for it (`applicationTunnel: {protocol: PROXY}`, typically a waypoint), so they learn the original
//! client, the address it targeted and its identity, as Istio's ztunnel sends them.

use std::io;
use std::net::{IpAddr, SocketAddr};

use mesh_core::SpiffeId;

/// The fixed v2 signature.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY.
const VERSION_PROXY: u8 = 0x21;
/// AF_INET + STREAM.
const TCP4: u8 = 0x11;
/// AF_INET6 + STREAM.
const TCP6: u8 = 0x21;
/// ztunnel's custom TLV carrying the client's SPIFFE identity.
pub(super) const TLV_PEER_IDENTITY: u8 = 0xD0;
/// ztunnel's custom TLV carrying the service hostname the client addressed (double HBONE).
pub(super) const TLV_SERVICE_HOSTNAME: u8 = 0xD1;

/// Encodes a header for a connection from `source` to `destination`, with the client's identity and
/// the addressed service hostname as TLVs when known. Mixed address families are written as IPv6 (an
/// IPv4 address mapped), since the header has one family for both.
pub(super) fn encode(
    source: SocketAddr,
    destination: SocketAddr,
    identity: Option<&SpiffeId>,
    hostname: Option<&str>,
) -> io::Result<Vec<u8>> {
    let (family, source_ip, destination_ip) = match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (TCP4, s.octets().to_vec(), d.octets().to_vec()),
        (s, d) => (TCP6, v6_octets(s).to_vec(), v6_octets(d).to_vec()),
    };
    let mut tlvs = Vec::new();
    if let Some(identity) = identity {
        push_tlv(&mut tlvs, TLV_PEER_IDENTITY, identity.as_str().as_bytes())?;
    }
    if let Some(hostname) = hostname {
        push_tlv(&mut tlvs, TLV_SERVICE_HOSTNAME, hostname.as_bytes())?;
    }
    let body_len = source_ip.len() * 2 + 4 + tlvs.len();
    let body_len = u16::try_from(body_len).map_err(|_| too_long())?;
    let mut header = Vec::with_capacity(16 + usize::from(body_len));
    header.extend_from_slice(&SIGNATURE);
    header.push(VERSION_PROXY);
    header.push(family);
    header.extend_from_slice(&body_len.to_be_bytes());
    header.extend_from_slice(&source_ip);
    header.extend_from_slice(&destination_ip);
    header.extend_from_slice(&source.port().to_be_bytes());
    header.extend_from_slice(&destination.port().to_be_bytes());
    header.extend_from_slice(&tlvs);
    Ok(header)
}

fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn push_tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) -> io::Result<()> {
    let len = u16::try_from(value.len()).map_err(|_| too_long())?;
    out.push(kind);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(value);
    Ok(())
}

fn too_long() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "PROXY protocol header too long")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_with_identity() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/client").unwrap();
        let header = encode(
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.2:8080".parse().unwrap(),
            Some(&id),
            None,
        )
        .unwrap();
        let tlv_len = 3 + id.as_str().len();
        assert_eq!(&header[..12], &SIGNATURE);
        assert_eq!(header[12], 0x21);
        assert_eq!(header[13], 0x11);
        assert_eq!(
            usize::from(u16::from_be_bytes([header[14], header[15]])),
            12 + tlv_len
        );
        assert_eq!(&header[16..20], &[10, 0, 0, 1]);
        assert_eq!(&header[20..24], &[10, 0, 0, 2]);
        assert_eq!(u16::from_be_bytes([header[24], header[25]]), 40000);
        assert_eq!(u16::from_be_bytes([header[26], header[27]]), 8080);
        assert_eq!(header[28], TLV_PEER_IDENTITY);
        assert_eq!(&header[31..], id.as_str().as_bytes());
    }

    #[test]
    fn mixed_families_are_written_as_ipv6() {
        let header = encode(
            "10.0.0.1:1".parse().unwrap(),
            "[2001:db8::2]:80".parse().unwrap(),
            None,
            Some("echo.default.svc.cluster.local"),
        )
        .unwrap();
        assert_eq!(header[13], 0x21);
        assert_eq!(
            &header[16..32],
            &"::ffff:10.0.0.1".parse::<std::net::Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(header[52], TLV_SERVICE_HOSTNAME);
        assert_eq!(&header[55..], b"echo.default.svc.cluster.local");
    }
}
