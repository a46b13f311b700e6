//! [`DevCa`]: a development certificate authority for SPIFFE identities.
//!
//! It generates its own ECDSA P-256 root and signs CSRs with the SPIFFE ID as the only URI SAN, the way
//! Istio's CA shapes workload certificates (empty subject, key usage digitalSignature + keyEncipherment,
//! extended key usage serverAuth + clientAuth). Its key lives in memory: it is for `meshctl demo`, tests and
//! local development, never for production trust.

use std::fmt;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
    SerialNumber,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::cert::{CertSigner, SignRequest, SignedCert, WorkloadCert};
use crate::error::Error;
use crate::identity::{SpiffeId, TrustDomain};

/// How long a dev root is valid.
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Leaves start this long before "now", so that a peer whose clock is slightly behind accepts them.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60);

/// A development certificate authority: a generated root that signs CSRs for SPIFFE identities.
pub struct DevCa {
    trust_domain: TrustDomain,
    root: CertificateDer<'static>,
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
    max_validity: Duration,
}

/// A leaf certificate exactly as specified, including shapes a correct peer must refuse (expired, several
/// URI SANs, a non-SPIFFE URI, ...). Used by tests of the verifiers; [`DevCa::sign_csr`] never issues
/// such certificates.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// The URI SANs, verbatim and in order.
    pub uri_sans: Vec<String>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

impl DevCa {
    /// Generates a new root for `trust_domain`. Leaves it signs live at most `max_validity`.
    pub fn new(trust_domain: TrustDomain, max_validity: Duration) -> Result<Self, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, trust_domain.as_str());
        name.push(DnType::CommonName, "meshkit development root");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = (now - CLOCK_SKEW_ALLOWANCE).into();
        params.not_after = (now + ROOT_VALIDITY).into();
        params.serial_number = Some(random_serial());
        let root = params.self_signed(&key)?;
        Ok(DevCa {
            trust_domain,
            root: root.der().clone(),
            root_pem: root.pem(),
            issuer: Issuer::new(params, key),
            max_validity,
        })
    }

    /// The trust domain this CA issues identities in.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The root certificate (DER), to distribute as the trust bundle.
    pub fn root_cert(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// The root certificate, PEM-encoded.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Signs a DER-encoded PKCS#10 CSR for `identity`. The CSR's signature is checked (proof that the
    /// requester holds the key); everything else it asks for is ignored: the certificate carries `identity`
    /// as its only URI SAN, and lives `validity` capped at the CA's maximum. Returns the leaf.
    pub fn sign_csr(
        &self,
        identity: &SpiffeId,
        csr_der: &[u8],
        validity: Duration,
    ) -> Result<CertificateDer<'static>, Error> {
        if !identity.is_member_of(&self.trust_domain) {
            return Err(Error::Signing {
                identity: identity.clone(),
                reason: format!("this CA only issues identities in {}", self.trust_domain),
            });
        }
        let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
            .map_err(|e| Error::malformed("CSR", e))?;
        let now = SystemTime::now();
        let spec = LeafSpec {
            uri_sans: vec![identity.as_str().to_owned()],
            not_before: now - CLOCK_SKEW_ALLOWANCE,
            not_after: now + validity.min(self.max_validity),
        };
        let params = leaf_params(&spec)?;
        Ok(params.signed_by(&csr.public_key, &self.issuer)?.der().clone())
    }

    /// Issues a certificate for `identity` with a freshly generated key, ready to use: for tests and the
    /// demo, where there is no separate requester.
    pub fn issue(&self, identity: &SpiffeId, validity: Duration) -> Result<WorkloadCert, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let csr = crate::cert::caching::csr_for(identity, &key)?;
        let leaf = self.sign_csr(identity, csr.der(), validity)?;
        WorkloadCert::new(
            identity,
            vec![leaf],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            vec![self.root.clone()],
        )
    }

    /// Issues a leaf exactly as `spec` says, valid or not, with a new key: the chain and the key, for
    /// tests that present malformed identities to a peer.
    pub fn issue_raw(
        &self,
        spec: &LeafSpec,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let leaf = leaf_params(spec)?.signed_by(&key, &self.issuer)?;
        Ok((
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ))
    }
}

impl fmt::Debug for DevCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevCa")
            .field("trust_domain", &self.trust_domain)
            .field("max_validity", &self.max_validity)
            .finish_non_exhaustive()
    }
}

impl CertSigner for DevCa {
    fn sign<'a>(&'a self, request: &'a SignRequest) -> BoxFuture<'a, Result<SignedCert, Error>> {
        let result = self
            .sign_csr(&request.identity, &request.csr_der, request.validity)
            .map(|leaf| SignedCert {
                chain: vec![leaf],
                roots: vec![self.root.clone()],
            });
        Box::pin(std::future::ready(result))
    }
}

fn leaf_params(spec: &LeafSpec) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = spec
        .uri_sans
        .iter()
        .map(|uri| Ok(SanType::URI(uri.as_str().try_into()?)))
        .collect::<Result<_, rcgen::Error>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = spec.not_before.into();
    params.not_after = spec.not_after.into();
    params.serial_number = Some(random_serial());
    Ok(params)
}

/// A positive 127-bit serial: unique enough that two leaves never collide.
fn random_serial() -> SerialNumber {
    let mut bytes = fastrand::u128(..).to_be_bytes();
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}
