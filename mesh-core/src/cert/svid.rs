//! Reading the SPIFFE ID and validity out of an X.509-SVID leaf certificate.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::{Error, SvidErrorKind};
use crate::identity::SpiffeId;

/// What the TLS layer and the certificate provider need from a leaf certificate.
#[derive(Debug)]
pub(crate) struct SvidInfo {
    pub(crate) identity: SpiffeId,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
}

/// The SPIFFE ID of an X.509-SVID leaf: its one URI SAN, parsed strictly.
///
/// Fails when the certificate does not parse, has no URI SAN or several (the X.509-SVID rules allow
/// exactly one, and two would make the identity ambiguous), or when the URI is not a valid SPIFFE ID.
/// This does not check the chain: call it on certificates that passed path validation.
pub fn svid_identity(leaf: &CertificateDer<'_>) -> Result<SpiffeId, Error> {
    parse_svid(leaf).map(|info| info.identity)
}

/// Checks that `chain` (leaf first, then intermediates) is valid at `now` for client authentication and
/// chains to one of `anchors`: what a peer's verifier will check, so that a certificate an issuer handed out
/// can be refused (and the previous one kept) before it fails every handshake.
pub fn verify_chain(
    chain: &[CertificateDer<'_>],
    anchors: &[TrustAnchor<'_>],
    now: UnixTime,
) -> Result<(), Error> {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(Error::malformed("certificate chain", "it is empty"));
    };
    let leaf = webpki::EndEntityCert::try_from(leaf).map_err(Error::ChainInvalid)?;
    leaf.verify_for_usage(
        crate::tls::crypto_provider()
            .signature_verification_algorithms
            .all,
        anchors,
        intermediates,
        now,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map(|_| ())
    .map_err(Error::ChainInvalid)
}

pub(crate) fn parse_svid(leaf: &CertificateDer<'_>) -> Result<SvidInfo, Error> {
    let (rest, cert) = X509Certificate::from_der(leaf).map_err(|e| Error::malformed("certificate", e))?;
    if !rest.is_empty() {
        return Err(Error::malformed(
            "certificate",
            "trailing data after the certificate",
        ));
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|e| Error::malformed("certificate", e))?;
    let mut uris = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    let uri = match (uris.next(), uris.next()) {
        (None, _) => return Err(not_svid(SvidErrorKind::NoUriSan)),
        (Some(uri), None) => uri,
        (Some(_), Some(_)) => return Err(not_svid(SvidErrorKind::SeveralUriSans(2 + uris.count()))),
    };
    let identity = SpiffeId::parse(uri).map_err(|e| match e {
        Error::InvalidSpiffeId { reason, .. } => not_svid(SvidErrorKind::InvalidUri(reason)),
        other => other,
    })?;
    let validity = cert.validity();
    Ok(SvidInfo {
        identity,
        not_before: to_system_time(validity.not_before.timestamp()),
        not_after: to_system_time(validity.not_after.timestamp()),
    })
}

fn not_svid(reason: SvidErrorKind) -> Error {
    Error::NotSvid { reason }
}

fn to_system_time(unix_seconds: i64) -> SystemTime {
    match u64::try_from(unix_seconds) {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
        // Before 1970: only ever a not-before; the epoch is as good for every decision we make.
        Err(_) => UNIX_EPOCH,
    }
}
