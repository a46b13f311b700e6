//! From an `X509SVIDResponse` to checked [`WorkloadCert`]s: each SVID on its own, so that one bad entry
//! costs only itself.

use std::collections::{BTreeMap, HashSet};

use mesh_core::{SpiffeId, WorkloadCert};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};

use crate::ca::MAX_CHAIN_CERTS;
use crate::proto::{X509svid, X509svidResponse};

/// The most root certificates one SVID's bundle may hold. A bundle holds the trust domain's current roots,
/// two or three during a root rotation; this leaves ample room while bounding what one entry can cost.
pub(crate) const MAX_BUNDLE_CERTS: usize = 64;

/// What one response amounts to.
#[derive(Debug, Default)]
pub(crate) struct Parsed {
    /// The usable SVIDs, at most one per identity (the first entry for it).
    pub(crate) certs: Vec<WorkloadCert>,
    /// Every identity the response names with a well-formed SPIFFE ID, usable or not: an identity absent
    /// from this set has been withdrawn by the agent.
    pub(crate) present: HashSet<SpiffeId>,
    /// The identities whose entry was refused, and why (for the error a caller of that identity gets).
    pub(crate) rejected: BTreeMap<SpiffeId, String>,
}

/// Checks the first `max_svids` entries of `response` at time `now`. Entries past the bound, entries whose
/// `spiffe_id` is not a SPIFFE ID, and repeated identities are logged and left out; the federated bundles
/// and CRLs are ignored (see the module documentation).
pub(crate) fn parse_response(response: &X509svidResponse, max_svids: usize, now: UnixTime) -> Parsed {
    let mut parsed = Parsed::default();
    if response.svids.len() > max_svids {
        tracing::warn!(
            count = response.svids.len(),
            limit = max_svids,
            "the SPIFFE Workload API sent more SVIDs than accepted; ignoring the rest"
        );
    }
    for (index, svid) in response.svids.iter().take(max_svids).enumerate() {
        let identity = match SpiffeId::parse(&svid.spiffe_id) {
            Ok(identity) => identity,
            Err(error) => {
                tracing::warn!(index, %error, "skipping an SVID whose spiffe_id is invalid");
                continue;
            }
        };
        if !parsed.present.insert(identity.clone()) {
            // The specification says the first of two entries with one hint wins; the same rule for two
            // entries with one identity keeps the choice deterministic.
            tracing::warn!(index, %identity, "skipping a second SVID for the same identity");
            continue;
        }
        match checked_cert(&identity, svid, now) {
            Ok(cert) => parsed.certs.push(cert),
            Err(reason) => {
                tracing::warn!(index, %identity, %reason, "skipping an unusable SVID");
                parsed.rejected.insert(identity, reason);
            }
        }
    }
    parsed
}

/// One entry as a [`WorkloadCert`]: its chain, key and bundle decoded, the leaf proving `identity` with
/// that key (checked by [`WorkloadCert::new`]), and the chain valid now up to a root of its own bundle.
fn checked_cert(identity: &SpiffeId, svid: &X509svid, now: UnixTime) -> Result<WorkloadCert, String> {
    for (field, value) in [
        ("x509_svid", &svid.x509_svid),
        ("x509_svid_key", &svid.x509_svid_key),
        ("bundle", &svid.bundle),
    ] {
        if value.is_empty() {
            return Err(format!("{field} is empty"));
        }
    }
    let chain =
        split_certificates(&svid.x509_svid, MAX_CHAIN_CERTS).map_err(|e| format!("x509_svid: {e}"))?;
    let roots = split_certificates(&svid.bundle, MAX_BUNDLE_CERTS).map_err(|e| format!("bundle: {e}"))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.x509_svid_key.to_vec()));
    let cert = WorkloadCert::new(identity, chain, key, roots).map_err(|e| e.to_string())?;
    verify_chain(&cert, now)?;
    Ok(cert)
}

/// Refuses a certificate that is expired, not yet valid, or does not chain to its own bundle: peers would
/// refuse it in every handshake, so it is better reported now, as the agent's fault, and the previous
/// certificate kept.
fn verify_chain(cert: &WorkloadCert, now: UnixTime) -> Result<(), String> {
    mesh_core::cert::verify_chain(cert.chain(), cert.trust_anchors(), now)
        .map_err(|e| format!("the certificate does not chain to its bundle now: {e}"))
}

/// Splits concatenated DER certificates (the Workload API's encoding of chains and bundles) into one
/// [`CertificateDer`] each, refusing more than `limit`. Only the outer framing is read here: each
/// certificate's contents are checked by whoever parses it.
pub(crate) fn split_certificates(
    mut bytes: &[u8],
    limit: usize,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut certs = Vec::new();
    while !bytes.is_empty() {
        if certs.len() == limit {
            return Err(format!("more than {limit} certificates"));
        }
        let len = der_element_len(bytes).map_err(|e| format!("certificate {}: {e}", certs.len()))?;
        let (cert, rest) = bytes.split_at(len);
        certs.push(CertificateDer::from(cert.to_vec()));
        bytes = rest;
    }
    if certs.is_empty() {
        return Err("no certificate".to_owned());
    }
    Ok(certs)
}

/// The length, header included, of the DER SEQUENCE at the start of `bytes` (a certificate is one),
/// checked to fit in `bytes`.
fn der_element_len(bytes: &[u8]) -> Result<usize, String> {
    const SEQUENCE: u8 = 0x30;
    match bytes.first() {
        Some(&SEQUENCE) => {}
        Some(tag) => return Err(format!("starts with tag {tag:#04x}, not a DER SEQUENCE")),
        None => return Err("no bytes".to_owned()),
    }
    let first = *bytes.get(1).ok_or("truncated length")?;
    let (header, content) = if first < 0x80 {
        (2, usize::from(first))
    } else {
        // Long form: the low bits count the length bytes that follow. 0x80 (indefinite length) is BER,
        // not DER; more than 4 bytes would describe more than any message we accept.
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 {
            return Err(format!("length form {first:#04x} is not DER"));
        }
        let digits = bytes.get(2..2 + count).ok_or("truncated length")?;
        let content = digits
            .iter()
            .fold(0usize, |acc, &digit| (acc << 8) | usize::from(digit));
        (2 + count, content)
    };
    let total = header
        .checked_add(content)
        .ok_or_else(|| "length overflows".to_owned())?;
    if total > bytes.len() {
        return Err(format!("declares {total} bytes but only {} remain", bytes.len()));
    }
    Ok(total)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]
mod tests {
    use super::*;

    #[test]
    fn splits_short_and_long_form_elements() {
        let short = [0x30, 0x02, 0xaa, 0xbb];
        let mut long = vec![0x30, 0x81, 0x80];
        long.extend(std::iter::repeat_n(0x01, 0x80));
        let mut longer = vec![0x30, 0x82, 0x01, 0x00];
        longer.extend(std::iter::repeat_n(0x02, 0x100));
        let joined = [short.as_slice(), &long, &longer].concat();
        let certs = split_certificates(&joined, 16).unwrap();
        assert_eq!(certs.len(), 3);
        assert_eq!(certs[0].as_ref(), short.as_slice());
        assert_eq!(certs[1].as_ref(), long.as_slice());
        assert_eq!(certs[2].as_ref(), longer.as_slice());
    }

    #[test]
    fn refuses_malformed_framing() {
        for (bytes, expected) in [
            (&[][..], "no certificate"),
            (&[0x31, 0x00][..], "not a DER SEQUENCE"),
            (&[0x30][..], "truncated length"),
            (&[0x30, 0x80, 0x00, 0x00][..], "is not DER"),
            (&[0x30, 0x85, 1, 1, 1, 1, 1][..], "is not DER"),
            (&[0x30, 0x82, 0x01][..], "truncated length"),
            (&[0x30, 0x05, 0x00][..], "declares 7 bytes but only 3 remain"),
            (
                &[0x30, 0x00, 0x30, 0x03, 0x00][..],
                "certificate 1: declares 5 bytes",
            ),
            (&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff][..], "remain"),
        ] {
            let error = split_certificates(bytes, 16).unwrap_err();
            assert!(error.contains(expected), "{bytes:?}: {error}");
        }
    }

    #[test]
    fn refuses_more_than_the_limit() {
        let three = [0x30, 0x00].repeat(3);
        assert_eq!(split_certificates(&three, 3).unwrap().len(), 3);
        assert_eq!(
            split_certificates(&three, 2).unwrap_err(),
            "more than 2 certificates"
        );
    }
}
