//! Pure parts of the CA client and service: response checking, CSR inspection, authenticators.

use std::time::Duration;

use mesh_core::{DevCa, SpiffeId, TrustDomain};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::UnixTime;
use tonic::metadata::MetadataMap;

use super::authn::{CallInfo, Caller, CallerAuthenticator, DevAnyToken, StaticTokens};
use super::client::signed_cert_from_response;
use super::csr;
use super::server::pem_for_tests as pem;
use crate::proto::istio::v1::auth::{IstioCertificateResponse, Roots};

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn csr_pem(uris: &[&str]) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    params.serialize_request(&key).unwrap().pem().unwrap()
}

#[test]
fn csr_with_one_spiffe_id_in_the_trust_domain_is_accepted() {
    let inspected = csr::inspect(&csr_pem(&["spiffe://cluster.local/ns/a/sa/b"]), &td()).unwrap();
    assert_eq!(inspected.identity, id("spiffe://cluster.local/ns/a/sa/b"));
    assert!(!inspected.der.is_empty());
}

#[test]
fn csr_refusals_say_why() {
    let cases: &[(String, &str)] = &[
        ("garbage".to_owned(), "not a PEM certificate request"),
        (csr_pem(&[]), "no URI SAN"),
        (
            csr_pem(&[
                "spiffe://cluster.local/ns/a/sa/b",
                "spiffe://cluster.local/ns/a/sa/c",
            ]),
            "2 URI SANs",
        ),
        (
            csr_pem(&["spiffe://other.local/ns/a/sa/b"]),
            "outside this CA's trust domain",
        ),
        (csr_pem(&["https://example.com/x"]), "URI SAN"),
        ("x".repeat(40_000), "larger than"),
    ];
    for (pem, expected) in cases {
        let error = csr::inspect(pem, &td()).unwrap_err();
        assert!(error.contains(expected), "{error:?} should contain {expected:?}");
    }
}

#[test]
fn csr_with_a_broken_signature_is_refused() {
    let pem = csr_pem(&["spiffe://cluster.local/ns/a/sa/b"]);
    let mut der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec();
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let tampered = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &der)
    );
    let error = csr::inspect(&tampered, &td()).unwrap_err();
    assert!(error.contains("does not parse"), "{error}");
}

use rustls_pki_types::pem::PemObject;

struct Issued {
    ca: DevCa,
    leaf: rustls_pki_types::CertificateDer<'static>,
}

fn issued() -> Issued {
    let ca = DevCa::new(td(), Duration::from_secs(3600)).unwrap();
    let cert = ca
        .issue(&id("spiffe://cluster.local/ns/a/sa/b"), Duration::from_secs(600))
        .unwrap();
    let leaf = cert.chain()[0].clone();
    Issued { ca, leaf }
}

#[test]
fn roots_come_from_the_last_chain_entry_and_leave_the_chain() {
    let Issued { ca, leaf } = issued();
    let response = IstioCertificateResponse {
        cert_chain: vec![pem(&leaf), pem(ca.root_cert())],
        root_cert: None,
    };
    let signed = signed_cert_from_response(&response, &[], UnixTime::now()).unwrap();
    assert_eq!(signed.chain, vec![leaf]);
    assert_eq!(signed.roots, vec![ca.root_cert().clone()]);
}

#[test]
fn roots_prefer_root_cert_then_configuration() {
    let Issued { ca, leaf } = issued();
    let other = DevCa::new(td(), Duration::from_secs(3600)).unwrap();
    // root_cert wins over a (wrong) configured root.
    let response = IstioCertificateResponse {
        cert_chain: vec![pem(&leaf)],
        root_cert: Some(Roots {
            ca_cert: vec![pem(ca.root_cert())],
        }),
    };
    let signed = signed_cert_from_response(&response, &[other.root_cert().clone()], UnixTime::now()).unwrap();
    assert_eq!(signed.roots, vec![ca.root_cert().clone()]);
    // Without root_cert, the configured roots win over the chain's last entry, which is then checked
    // against them: a leaf from another CA is refused.
    let response = IstioCertificateResponse {
        cert_chain: vec![pem(&leaf), pem(ca.root_cert())],
        root_cert: None,
    };
    let error =
        signed_cert_from_response(&response, &[other.root_cert().clone()], UnixTime::now()).unwrap_err();
    assert!(error.contains("does not chain to the roots"), "{error}");
    let signed = signed_cert_from_response(&response, &[ca.root_cert().clone()], UnixTime::now()).unwrap();
    assert_eq!(signed.chain, vec![leaf]);
}

#[test]
fn malformed_responses_are_refused_with_a_clear_reason() {
    let Issued { ca, leaf } = issued();
    let root = pem(ca.root_cert());
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![], "empty cert_chain"),
        (vec![pem(&leaf)], "no root certificate"),
        (
            vec!["not pem".to_owned(), root.clone()],
            "cert_chain[0] holds no PEM certificate",
        ),
        (
            vec![
                "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n".to_owned(),
                root.clone(),
            ],
            "cert_chain[0] is malformed PEM",
        ),
        (vec![root.clone(); 17], "at most 16"),
        (
            vec![format!("{}{}", root.repeat(9), root.repeat(8))],
            "more than 16 certificates",
        ),
    ];
    for (chain, expected) in cases {
        let response = IstioCertificateResponse {
            cert_chain: chain,
            root_cert: None,
        };
        let error = signed_cert_from_response(&response, &[], UnixTime::now()).unwrap_err();
        assert!(error.contains(expected), "{error:?} should contain {expected:?}");
    }
}

fn metadata_with_token(token: &str) -> MetadataMap {
    let mut metadata = MetadataMap::new();
    metadata.insert("authorization", format!("Bearer {token}").parse().unwrap());
    metadata
}

fn call<'a>(
    metadata: &'a MetadataMap,
    remote: &str,
    requested: Option<&'a SpiffeId>,
    impersonation: bool,
) -> CallInfo<'a> {
    CallInfo {
        metadata,
        connection: None,
        remote_addr: Some(remote.parse().unwrap()),
        requested_identity: requested,
        impersonation,
    }
}

#[tokio::test]
async fn static_tokens_map_tokens_to_callers() {
    let b = Caller::new(id("spiffe://cluster.local/ns/a/sa/b"));
    let tokens = StaticTokens::new().with("t-b", b.clone());
    let good = metadata_with_token("t-b");
    assert_eq!(
        tokens
            .authenticate(&call(&good, "10.0.0.1:1", None, false))
            .await
            .unwrap(),
        b
    );
    for (metadata, expected) in [
        (metadata_with_token("t-c"), "unknown bearer token"),
        (MetadataMap::new(), "no bearer token"),
    ] {
        let error = tokens
            .authenticate(&call(&metadata, "10.0.0.1:1", None, false))
            .await
            .unwrap_err();
        assert!(error.to_string().contains(expected), "{error}");
    }
    let mut basic = MetadataMap::new();
    basic.insert("authorization", "Basic dDpi".parse().unwrap());
    let error = tokens
        .authenticate(&call(&basic, "10.0.0.1:1", None, false))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("not a bearer token"), "{error}");
    // Tokens never appear in Debug output.
    assert!(!format!("{tokens:?}").contains("t-b"));
}

#[tokio::test]
async fn dev_any_token_accepts_only_loopback_callers_as_the_csr_identity() {
    let requested = id("spiffe://cluster.local/ns/a/sa/b");
    let any = DevAnyToken::new();
    let token = metadata_with_token("whatever");
    for loopback in ["127.0.0.1:5000", "[::1]:5000", "[::ffff:127.0.0.1]:5000"] {
        let caller = any
            .authenticate(&call(&token, loopback, Some(&requested), false))
            .await
            .unwrap();
        assert_eq!(caller, Caller::new(requested.clone()));
    }
    let error = any
        .authenticate(&call(&token, "10.1.2.3:5000", Some(&requested), false))
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("only accepts loopback callers"),
        "{error}"
    );
    let empty = MetadataMap::new();
    assert!(
        any.authenticate(&call(&empty, "127.0.0.1:1", Some(&requested), false))
            .await
            .is_err()
    );
    assert!(
        any.authenticate(&call(&token, "127.0.0.1:1", None, false))
            .await
            .is_err()
    );

    // Impersonation is attributed to the workload itself, unless a node proxy is configured.
    let caller = any
        .authenticate(&call(&token, "127.0.0.1:1", Some(&requested), true))
        .await
        .unwrap();
    assert_eq!(caller.identity, requested);
    let ztunnel = Caller::new(id("spiffe://cluster.local/ns/istio-system/sa/ztunnel")).on_node("local");
    let with = DevAnyToken::new().with_impersonator(ztunnel.clone());
    let caller = with
        .authenticate(&call(&token, "127.0.0.1:1", Some(&requested), true))
        .await
        .unwrap();
    assert_eq!(caller, ztunnel);
}
