//! Arbitrary bytes as a peer's leaf certificate: the SVID reader returns an identity or a typed error,
//! never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustls_pki_types::CertificateDer;

fuzz_target!(|data: &[u8]| {
    let _ = mesh_core::cert::svid_identity(&CertificateDer::from(data));
});
