//! [`DevCa`]: a development certificate authority for SPIFFE identities.
//!
//! It generates its own ECDSA P-256 root and signs CSRs with the SPIFFE ID as the only URI SAN, the way
//! Istio's CA shapes workload certificates (empty subject, key usage digitalSignature + keyEncipherment,
//! extended key usage serverAuth + clientAuth). Its key lives in memory: it is for `meshctl demo`, tests and
//! local development, never for production trust.
//!
//! It can also issue a TLS *server* certificate with DNS and IP SANs ([`DevCa::issue_server`]): the serving
//! identity of a local control plane, which clients verify like istiod's (by DNS name, not by SPIFFE ID).
//!
//! Istio's ztunnel has `FAKE_CA` for the same purpose, with a root and key compiled into the binary so that
//! every instance trusts every other. We keep no private key in the repository: instead a root is generated
//! once ([`DevCa::new`], written out by `meshctl dev-ca init` with [`DevCa::root_key_pem`]) and every
//! process that should share it loads it from disk with [`DevCa::from_pem`].

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
    SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime,
};
use x509_parser::prelude::{FromDer, X509Certificate};

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

    /// Loads a CA from a PEM root certificate and its PEM private key (PKCS#8, SEC1 or PKCS#1), as written
    /// by `meshctl dev-ca init`, so that several processes issue certificates under one root and trust each
    /// other. Leaves it signs live at most `max_validity` and carry identities of `trust_domain`.
    ///
    /// Refused with [`Error::Malformed`] (whose reason never quotes key material): a file that does not
    /// hold exactly one certificate or a private key, a certificate that is not a CA (basicConstraints) or
    /// may not sign certificates (keyUsage), one that has expired, a key that is not the certificate's,
    /// and a root whose leaves would not verify against it (checked by issuing and verifying one).
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        trust_domain: TrustDomain,
        max_validity: Duration,
    ) -> Result<Self, Error> {
        let root = single_certificate(cert_pem)?;
        let root_not_after = check_ca_certificate(&root)?;
        let key = ca_key(key_pem)?;
        let (_, parsed) =
            X509Certificate::from_der(&root).map_err(|e| Error::malformed("CA certificate", e))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(Error::malformed(
                "CA private key",
                "it is not the key of the CA certificate",
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&root, key)?;
        let ca = DevCa {
            trust_domain,
            root,
            root_pem: cert_pem.trim().to_owned() + "\n",
            issuer,
            max_validity,
            root_not_after,
        };
        ca.self_test()?;
        Ok(ca)
    }

    /// The root's private key, PEM-encoded (PKCS#8): for `meshctl dev-ca init`, which writes it to a file
    /// only its owner can read, so that other processes can [`DevCa::from_pem`] the same root. Anyone with
    /// it can issue any identity in this trust domain; never log it.
    pub fn root_key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a leaf and verifies it against the root, as a peer would: a loaded root whose subject does
    /// not re-encode identically (so issuer and subject names would not match) or that webpki refuses as a
    /// trust anchor fails here, at load, instead of in every handshake.
    fn self_test(&self) -> Result<(), Error> {
        let probe = SpiffeId::istio(&self.trust_domain, "dev-ca", "self-test")?;
        let now = SystemTime::now();
        let spec = LeafSpec {
            uri_sans: vec![probe.as_str().to_owned()],
            not_before: now - CLOCK_SKEW_ALLOWANCE,
            not_after: now + CLOCK_SKEW_ALLOWANCE,
        };
        let (chain, _key) = self.issue_raw(&spec)?;
        let refused = |e: webpki::Error| {
            Error::malformed(
                "CA certificate",
                format!("a leaf it signs does not verify against it: {e}"),
            )
        };
        let anchor = webpki::anchor_from_trusted_cert(&self.root).map_err(refused)?;
        let leaf = webpki::EndEntityCert::try_from(&chain[0]).map_err(refused)?;
        let algorithms = crate::tls::crypto_provider()
            .signature_verification_algorithms
            .all;
        for usage in [webpki::KeyUsage::server_auth(), webpki::KeyUsage::client_auth()] {
            leaf.verify_for_usage(
                algorithms,
                std::slice::from_ref(&anchor),
                &[],
                UnixTime::now(),
                usage,
                None,
                None,
            )
            .map_err(refused)?;
        }
        Ok(())
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

/// The one certificate of a PEM text (a CA file with a chain in it would leave unclear which one signs).
fn single_certificate(pem: &str) -> Result<CertificateDer<'static>, Error> {
    let mut certs = CertificateDer::pem_slice_iter(pem.as_bytes());
    let first = match certs.next() {
        Some(Ok(cert)) => cert,
        Some(Err(e)) => {
            return Err(Error::malformed(
                "CA certificate",
                crate::cert::file::pem_error(&e),
            ));
        }
        None => return Err(Error::malformed("CA certificate", "no CERTIFICATE block")),
    };
    if certs.next().is_some() {
        return Err(Error::malformed(
            "CA certificate",
            "more than one certificate: give the root alone",
        ));
    }
    Ok(first)
}

/// Checks that `cert` may sign certificates and has not expired; returns its expiry.
fn check_ca_certificate(cert: &CertificateDer<'_>) -> Result<SystemTime, Error> {
    let (rest, parsed) =
        X509Certificate::from_der(cert).map_err(|e| Error::malformed("CA certificate", e))?;
    if !rest.is_empty() {
        return Err(Error::malformed(
            "CA certificate",
            "trailing data after the certificate",
        ));
    }
    let is_ca = parsed
        .basic_constraints()
        .map_err(|e| Error::malformed("CA certificate", e))?
        .is_some_and(|ext| ext.value.ca);
    if !is_ca {
        return Err(Error::malformed(
            "CA certificate",
            "not a CA certificate (basicConstraints cA is not set)",
        ));
    }
    let key_usage = parsed
        .key_usage()
        .map_err(|e| Error::malformed("CA certificate", e))?;
    if key_usage.is_some_and(|ext| !ext.value.key_cert_sign()) {
        return Err(Error::malformed(
            "CA certificate",
            "its keyUsage does not allow keyCertSign",
        ));
    }
    let not_after = parsed.validity().not_after.timestamp();
    let not_after = u64::try_from(not_after)
        .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    if not_after <= SystemTime::now() {
        return Err(Error::malformed(
            "CA certificate",
            format!("expired at {}", parsed.validity().not_after),
        ));
    }
    Ok(not_after)
}

/// The CA's signing key from PEM. Errors name the problem, never the bytes: this is the one secret a dev
/// mesh has.
fn ca_key(pem: &str) -> Result<KeyPair, Error> {
    let der = PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| Error::malformed("CA private key", crate::cert::file::pem_error(&e)))?;
    KeyPair::try_from(&der).map_err(|_| {
        Error::malformed(
            "CA private key",
            "not an ECDSA (P-256, P-384), Ed25519 or RSA key that can sign certificates",
        )
    })
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

    /// Verifies `leaf` against `root` as both ends of mutual TLS do.
    fn verifies_against(leaf: &CertificateDer<'_>, root: &CertificateDer<'_>) -> Result<(), webpki::Error> {
        let anchor = webpki::anchor_from_trusted_cert(root)?;
        let leaf = webpki::EndEntityCert::try_from(leaf)?;
        let algorithms = crate::tls::crypto_provider()
            .signature_verification_algorithms
            .all;
        for usage in [webpki::KeyUsage::server_auth(), webpki::KeyUsage::client_auth()] {
            leaf.verify_for_usage(
                algorithms,
                std::slice::from_ref(&anchor),
                &[],
                UnixTime::now(),
                usage,
                None,
                None,
            )?;
        }
        Ok(())
    }

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    #[test]
    fn a_ca_loaded_from_pem_issues_under_the_same_root() {
        let original = ca();
        let key_pem = original.root_key_pem();
        assert!(
            key_pem.starts_with("-----BEGIN PRIVATE KEY-----"),
            "PKCS#8 expected"
        );
        let loaded = DevCa::from_pem(original.root_pem(), &key_pem, td(), Duration::from_secs(30)).unwrap();
        assert_eq!(loaded.root_cert(), original.root_cert());
        assert_eq!(loaded.trust_domain(), &td());
        let identity = SpiffeId::istio(&td(), "default", "client").unwrap();
        let cert = loaded.issue(&identity, Duration::from_secs(3600)).unwrap();
        verifies_against(&cert.chain()[0], original.root_cert()).unwrap();
        // The loaded CA's own cap applies, not the original's.
        let lifetime = cert.not_after().duration_since(cert.not_before()).unwrap();
        assert!(
            lifetime <= Duration::from_secs(30) + CLOCK_SKEW_ALLOWANCE,
            "{lifetime:?}"
        );
        // ... and the original trusts it back.
        let back = original.issue(&identity, Duration::from_secs(60)).unwrap();
        verifies_against(&back.chain()[0], loaded.root_cert()).unwrap();
        // A second load of the same files is the same root again.
        let again = DevCa::from_pem(
            loaded.root_pem(),
            &loaded.root_key_pem(),
            td(),
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(again.root_cert(), original.root_cert());
    }

    #[test]
    fn a_root_made_elsewhere_with_a_p384_key_and_printable_names_loads() {
        // Another tool's root: a P-384 key, PrintableString names and a subject key identifier. Leaves must
        // name it as issuer byte for byte, which the self-test at load checks.
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(
            DnType::CountryName,
            rcgen::DnValue::PrintableString("NL".try_into().unwrap()),
        );
        name.push(
            DnType::CommonName,
            rcgen::DnValue::PrintableString("Other Root".try_into().unwrap()),
        );
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let root = params.self_signed(&key).unwrap();
        let loaded =
            DevCa::from_pem(&root.pem(), &key.serialize_pem(), td(), Duration::from_secs(60)).unwrap();
        let identity = SpiffeId::istio(&td(), "default", "client").unwrap();
        let cert = loaded.issue(&identity, Duration::from_secs(60)).unwrap();
        verifies_against(&cert.chain()[0], root.der()).unwrap();
    }

    #[test]
    fn unusable_ca_material_is_refused_without_quoting_the_key() {
        let (a, b) = (ca(), ca());
        let refuse = |cert: &str, key: &str| {
            let error = DevCa::from_pem(cert, key, td(), Duration::from_secs(60)).expect_err("refused");
            assert!(matches!(error, Error::Malformed { .. }), "{error}");
            error.to_string()
        };
        let message = refuse(a.root_pem(), &b.root_key_pem());
        assert!(message.contains("not the key of the CA certificate"), "{message}");
        // A chain instead of the root alone.
        let both = format!("{}{}", a.root_pem(), b.root_pem());
        assert!(refuse(&both, &a.root_key_pem()).contains("more than one certificate"));
        assert!(refuse("", &a.root_key_pem()).contains("no CERTIFICATE block"));
        // A certificate that is not a CA, or a CA that may not sign certificates.
        for (is_ca, usages, expected) in [
            (IsCa::ExplicitNoCa, vec![], "not a CA certificate"),
            (
                IsCa::Ca(BasicConstraints::Unconstrained),
                vec![KeyUsagePurpose::DigitalSignature],
                "keyCertSign",
            ),
        ] {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = CertificateParams::default();
            params.is_ca = is_ca;
            params.key_usages = usages;
            let cert = params.self_signed(&key).unwrap();
            let message = refuse(&cert.pem(), &key.serialize_pem());
            assert!(message.contains(expected), "{message}");
        }
        // A damaged key names the problem, not the bytes.
        let key = a.root_key_pem();
        let truncated = &key[..key.len() / 2];
        let message = refuse(a.root_pem(), truncated);
        let body = truncated.lines().nth(1).unwrap();
        assert!(!message.contains(body), "{message}");
        assert!(refuse(a.root_pem(), "").contains("no PEM block"));
    }

    #[test]
    fn an_expired_root_is_refused() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(7200)).into();
        params.not_after = (now - Duration::from_secs(3600)).into();
        let root = params.self_signed(&key).unwrap();
        let error = DevCa::from_pem(&root.pem(), &key.serialize_pem(), td(), Duration::from_secs(60))
            .expect_err("refused");
        assert!(error.to_string().contains("expired"), "{error}");
    }
}
