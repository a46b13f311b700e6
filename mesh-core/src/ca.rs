//! [`DevCa`]: a development certificate authority for SPIFFE identities.
//!
//! It generates its own ECDSA P-256 root and signs CSRs with the SPIFFE ID as the only URI SAN, the way
//! Istio's CA shapes workload certificates (empty subject, key usage digitalSignature + keyEncipherment,
//! extended key usage serverAuth + clientAuth). Its key lives in memory: it is for `meshctl demo`, tests and
//! local development, never for production trust.
//!
//! It can also issue a TLS *server* certificate with DNS and IP SANs ([`DevCa::issue_server`]): the serving
//! identity of a local control plane, which clients verify like istiod's (by DNS name, not by SPIFFE ID).

use std::fmt;
use std::net::IpAddr;
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
    root_not_after: SystemTime,
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
        let root_not_after = now + ROOT_VALIDITY;
        params.not_after = root_not_after.into();
        params.serial_number = Some(random_serial());
        let root = params.self_signed(&key)?;
        Ok(DevCa {
            trust_domain,
            root: root.der().clone(),
            root_pem: root.pem(),
            issuer: Issuer::new(params, key),
            max_validity,
            root_not_after,
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

    /// Issues a TLS server certificate for `dns_names` and `ips` (e.g. `localhost`, `istiod.istio-system.svc`
    /// and `127.0.0.1`) with a new key: the serving identity of a local control plane, which clients check
    /// by name against this CA's root, as ztunnel checks istiod. Returns the chain (the leaf alone) and the
    /// key.
    ///
    /// The certificate carries no SPIFFE ID and is only valid for server authentication. It lives `validity`,
    /// capped at the root's own expiry but not at the CA's maximum: that maximum bounds workload
    /// certificates, which rotate, while a server certificate lives as long as the process serving it.
    /// Fails if both lists are empty or a DNS name is not a valid `IA5String`.
    pub fn issue_server(
        &self,
        dns_names: &[&str],
        ips: &[IpAddr],
        validity: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
        if dns_names.is_empty() && ips.is_empty() {
            return Err(Error::malformed(
                "server certificate request",
                "no DNS name or IP address to certify",
            ));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = dns_names
            .iter()
            .map(|name| Ok(SanType::DnsName((*name).try_into()?)))
            .chain(ips.iter().map(|ip| Ok(SanType::IpAddress(*ip))))
            .collect::<Result<_, rcgen::Error>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW_ALLOWANCE).into();
        let not_after = now.checked_add(validity).unwrap_or(self.root_not_after);
        params.not_after = not_after.min(self.root_not_after).into();
        params.serial_number = Some(random_serial());
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let leaf = params.signed_by(&key, &self.issuer)?;
        Ok((
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ))
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

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::{ServerName, UnixTime};

    fn ca() -> DevCa {
        DevCa::new(
            TrustDomain::new("cluster.local").unwrap(),
            Duration::from_secs(60),
        )
        .unwrap()
    }

    #[test]
    fn server_certificate_verifies_by_dns_name_and_ip_against_the_root() {
        let ca = ca();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let (chain, _key) = ca
            .issue_server(
                &["localhost", "istiod.istio-system.svc"],
                &[ip],
                Duration::from_secs(3600),
            )
            .unwrap();
        let anchor = webpki::anchor_from_trusted_cert(ca.root_cert()).unwrap();
        let leaf = webpki::EndEntityCert::try_from(&chain[0]).unwrap();
        let algorithms = crate::tls::crypto_provider()
            .signature_verification_algorithms
            .all;
        leaf.verify_for_usage(
            algorithms,
            &[anchor],
            &[],
            UnixTime::now(),
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .unwrap();
        for name in ["localhost", "istiod.istio-system.svc", "127.0.0.1"] {
            let name = ServerName::try_from(name).unwrap();
            leaf.verify_is_valid_for_subject_name(&name).unwrap();
        }
        let other = ServerName::try_from("evil.example").unwrap();
        assert!(leaf.verify_is_valid_for_subject_name(&other).is_err());
        // Its lifetime is not capped by the 60 s maximum that bounds workload certificates.
        let info = x509_parser::parse_x509_certificate(&chain[0]).unwrap().1;
        let lifetime = info.validity().not_after.timestamp() - info.validity().not_before.timestamp();
        assert!(lifetime > 3000, "lifetime {lifetime}s");
        // ... and it is not a workload identity.
        assert!(crate::cert::svid_identity(&chain[0]).is_err());
    }

    #[test]
    fn server_certificate_needs_a_name() {
        let error = ca().issue_server(&[], &[], Duration::from_secs(60)).unwrap_err();
        assert!(matches!(error, Error::Malformed { .. }), "{error}");
        assert!(
            ca().issue_server(&["bad\u{e9}name"], &[], Duration::from_secs(60))
                .is_err()
        );
    }
}
