//! The two SPIFFE verifiers: chain validation against the trust bundle, then identity rules.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::ClientCertVerified;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use webpki::{EndEntityCert, KeyUsage};

use crate::cert::CertWatch;
use crate::cert::svid::parse_svid;
use crate::error::Error;
use crate::identity::{SpiffeId, TrustDomain};

/// Verifies a mesh server's certificate on the client side: chained to our trust bundle, valid now, usable
/// for server auth, and naming one of the expected SPIFFE identities.
#[derive(Debug)]
pub struct ServerCertVerifier {
    cert: CertWatch,
    expected: Vec<SpiffeId>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier {
    /// Trusts the bundle of `cert` (read at each handshake) and accepts only the `expected` identities.
    pub fn new(cert: CertWatch, expected: Vec<SpiffeId>) -> Self {
        ServerCertVerifier {
            cert,
            expected,
            algorithms: super::crypto_provider().signature_verification_algorithms,
        }
    }
}

impl rustls::client::danger::ServerCertVerifier for ServerCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_chain(
            &self.cert,
            &self.algorithms,
            end_entity,
            intermediates,
            now,
            KeyUsage::server_auth(),
        )?;
        let peer = parse_svid(end_entity).map_err(identity_rejected)?.identity;
        if !self.expected.contains(&peer) {
            return Err(identity_rejected(Error::UnexpectedIdentity {
                peer,
                expected: self.expected.clone(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configurations built in this module only enable TLS 1.3.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Verifies a mesh client's certificate on the server side: mandatory, chained to our trust bundle, valid
/// now, usable for client auth, and naming a SPIFFE identity in an accepted trust domain.
#[derive(Debug)]
pub struct ClientCertVerifier {
    cert: CertWatch,
    accepted: Vec<TrustDomain>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier {
    /// Trusts the bundle of `cert` (read at each handshake) and accepts identities in `accepted` trust
    /// domains. An empty list accepts nobody (fail closed).
    pub fn new(cert: CertWatch, accepted: Vec<TrustDomain>) -> Self {
        ClientCertVerifier {
            cert,
            accepted,
            algorithms: super::crypto_provider().signature_verification_algorithms,
        }
    }
}

impl rustls::server::danger::ClientCertVerifier for ClientCertVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Mesh clients have exactly one certificate, so hints would only make the handshake bigger.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_chain(
            &self.cert,
            &self.algorithms,
            end_entity,
            intermediates,
            now,
            KeyUsage::client_auth(),
        )?;
        let peer = parse_svid(end_entity).map_err(identity_rejected)?.identity;
        if !self.accepted.iter().any(|td| peer.is_member_of(td)) {
            return Err(identity_rejected(Error::UntrustedDomain {
                peer,
                accepted: self.accepted.clone(),
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Path validation of `end_entity` (plus the intermediates the peer sent) to a root of our current bundle.
fn verify_chain(
    cert: &CertWatch,
    algorithms: &WebPkiSupportedAlgorithms,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: KeyUsage,
) -> Result<(), rustls::Error> {
    let bundle = cert.current();
    let leaf = EndEntityCert::try_from(end_entity).map_err(chain_rejected)?;
    leaf.verify_for_usage(
        algorithms.all,
        bundle.trust_anchors(),
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map(|_| ())
    .map_err(chain_rejected)
}

/// Maps path-validation failures to rustls' own certificate errors where one fits, so the peer gets the
/// precise TLS alert (certificate_expired, unknown_ca, ...); anything else is carried as our error.
fn chain_rejected(error: webpki::Error) -> rustls::Error {
    let certificate_error = match error {
        webpki::Error::CertExpired { time, not_after } => {
            CertificateError::ExpiredContext { time, not_after }
        }
        webpki::Error::CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }
        }
        webpki::Error::UnknownIssuer => CertificateError::UnknownIssuer,
        webpki::Error::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        webpki::Error::BadDer | webpki::Error::BadDerTime => CertificateError::BadEncoding,
        webpki::Error::CertRevoked => CertificateError::Revoked,
        other => CertificateError::Other(OtherError(Arc::new(Error::ChainInvalid(other)))),
    };
    rustls::Error::InvalidCertificate(certificate_error)
}

/// Identity failures travel inside rustls as our typed error; [`super::identity_error`] recovers it.
fn identity_rejected(error: Error) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
}
