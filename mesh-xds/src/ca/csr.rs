//! What a CSR sent to the CA service asks for.

use mesh_core::{SpiffeId, TrustDomain};
use rcgen::{CertificateSigningRequestParams, SanType};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;

/// A PEM CSR for one identity is well under a kilobyte; anything this large is not one.
const MAX_CSR_PEM_BYTES: usize = 32 * 1024;

/// A CSR whose signature checked out, and the one identity it asks for.
#[derive(Debug)]
pub(super) struct InspectedCsr {
    pub(super) identity: SpiffeId,
    pub(super) der: Vec<u8>,
}

/// Parses `pem` and checks that it asks for exactly one URI SAN, a SPIFFE ID in `trust_domain`. The error
/// is a reason to send back as `InvalidArgument`.
pub(super) fn inspect(pem: &str, trust_domain: &TrustDomain) -> Result<InspectedCsr, String> {
    if pem.len() > MAX_CSR_PEM_BYTES {
        return Err(format!("the CSR is larger than {MAX_CSR_PEM_BYTES} bytes"));
    }
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| format!("the CSR is not a PEM certificate request: {e}"))?;
    // Parsing also checks the CSR's signature: proof that the caller holds the key to be certified.
    let params = CertificateSigningRequestParams::from_der(&der)
        .map_err(|e| format!("the CSR does not parse: {e}"))?;
    let uris: Vec<&str> = params
        .params
        .subject_alt_names
        .iter()
        .filter_map(|san| match san {
            SanType::URI(uri) => Some(uri.as_str()),
            _ => None,
        })
        .collect();
    let uri = match uris.as_slice() {
        [uri] => *uri,
        [] => return Err("the CSR has no URI SAN; it must ask for exactly one SPIFFE ID".to_owned()),
        more => {
            return Err(format!(
                "the CSR has {} URI SANs; it must ask for exactly one SPIFFE ID",
                more.len()
            ));
        }
    };
    let identity = SpiffeId::parse(uri).map_err(|e| format!("the CSR's URI SAN: {e}"))?;
    if !identity.is_member_of(trust_domain) {
        return Err(format!(
            "the CSR asks for {identity}, outside this CA's trust domain {trust_domain}"
        ));
    }
    Ok(InspectedCsr {
        identity,
        der: der.as_ref().to_vec(),
    })
}
