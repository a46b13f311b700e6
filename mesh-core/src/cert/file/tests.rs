//! FileCertProvider against files the tests write: loading, rotation seen by real TLS handshakes on
//! loopback, refused changes that keep the last good certificate, and the identity rules.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_RSA_SHA256, RsaKeySize};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use test_case::test_case;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;
use crate::ca::{DevCa, LeafSpec};
use crate::identity::TrustDomain;

const POLL: Duration = Duration::from_millis(50);
/// Long enough for any poll on a loaded machine; a test that waits this long has failed.
const PATIENCE: Duration = Duration::from_secs(20);

/// A directory removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let unique = format!(
            "mesh-core-file-cert-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(unique);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn files(&self) -> CertFiles {
        CertFiles::in_dir(&self.0)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

fn ca() -> DevCa {
    DevCa::new(td(), Duration::from_secs(24 * 3600)).unwrap()
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::istio(&td(), "default", sa).unwrap()
}

/// How the private key is written.
#[derive(Debug, Clone, Copy)]
enum KeyFormat {
    Pkcs8Ec,
    Sec1Ec,
    Pkcs1Rsa,
}

/// A leaf for `identity` signed by `ca`: (chain PEM, key PEM).
fn issue(ca: &DevCa, identity: &SpiffeId, format: KeyFormat) -> (String, String) {
    let key = match format {
        KeyFormat::Pkcs8Ec | KeyFormat::Sec1Ec => KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap(),
        KeyFormat::Pkcs1Rsa => KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_2048).unwrap(),
    };
    let csr = crate::cert::caching::csr_for(identity, &key).unwrap();
    let leaf = ca
        .sign_csr(identity, csr.der(), Duration::from_secs(3600))
        .unwrap();
    let pkcs8 = key.serialize_der();
    let key_pem = match format {
        KeyFormat::Pkcs8Ec => pem("PRIVATE KEY", &pkcs8),
        KeyFormat::Sec1Ec => pem("EC PRIVATE KEY", inner_private_key(&pkcs8)),
        KeyFormat::Pkcs1Rsa => pem("RSA PRIVATE KEY", inner_private_key(&pkcs8)),
    };
    (pem("CERTIFICATE", &leaf), key_pem)
}

fn write(dir: &TempDir, chain: &str, key: &str, roots: &str) {
    std::fs::write(dir.0.join(CERT_CHAIN_FILE), chain).unwrap();
    std::fs::write(dir.0.join(KEY_FILE), key).unwrap();
    std::fs::write(dir.0.join(ROOT_CERT_FILE), roots).unwrap();
}

/// A directory holding a fresh certificate for `identity` from `ca`; returns the chain PEM too.
fn dir_with(name: &str, ca: &DevCa, identity: &SpiffeId) -> (TempDir, String) {
    let dir = TempDir::new(name);
    let (chain, key) = issue(ca, identity, KeyFormat::Pkcs8Ec);
    write(&dir, &chain, &key, ca.root_pem());
    (dir, chain)
}

fn der_of(chain_pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(chain_pem.as_bytes()).unwrap()
}

/// The leaf a server presents in a real mutual-TLS handshake over loopback, verified by a client that
/// trusts `client`'s bundle.
async fn presented_leaf(server: CertWatch, client: CertWatch, expected: SpiffeId) -> CertificateDer<'static> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(crate::tls::server_config(server, vec![td()]).unwrap());
    let connector = TlsConnector::from(crate::tls::client_config(client, vec![expected]).unwrap());
    let accept = async {
        let (tcp, _) = listener.accept().await.unwrap();
        acceptor.accept(tcp).await.unwrap()
    };
    let connect = async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        connector.connect(crate::tls::server_name(), tcp).await.unwrap()
    };
    let (_server, client) = tokio::time::timeout(PATIENCE, async { tokio::join!(accept, connect) })
        .await
        .unwrap();
    client.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// Waits (bounded) until `identity`'s files have a refused change recorded, and returns it.
async fn refusal(provider: &FileCertProvider, identity: &SpiffeId) -> FileCertError {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(error) = provider.last_error(identity) {
            return error;
        }
        assert!(tokio::time::Instant::now() < deadline, "no refusal recorded");
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test]
async fn loads_a_directory_and_serves_only_the_leafs_identity() {
    let ca = ca();
    let (dir, chain) = dir_with("load", &ca, &id("client"));
    let provider = FileCertProvider::start([dir.files()], POLL).await.unwrap();
    assert_eq!(provider.identities(), vec![id("client")]);
    assert_eq!(provider.files(&id("client")), Some(&dir.files()));
    let watch = provider.certificate(&id("client")).await.unwrap();
    assert_eq!(watch.current().identity(), &id("client"));
    assert_eq!(watch.current().chain()[0], der_of(&chain));
    assert_eq!(watch.current().roots(), std::slice::from_ref(ca.root_cert()));
    let error = provider.certificate(&id("server")).await.unwrap_err();
    assert!(matches!(error, Error::Signing { .. }), "{error}");
    assert!(provider.last_error(&id("client")).is_none());
}

#[test_case(KeyFormat::Pkcs8Ec ; "pkcs8 ec")]
#[test_case(KeyFormat::Sec1Ec ; "sec1 ec")]
#[test_case(KeyFormat::Pkcs1Rsa ; "pkcs1 rsa")]
fn key_formats_rustls_reads_are_accepted(format: KeyFormat) {
    let ca = ca();
    let dir = TempDir::new("formats");
    let (chain, key) = issue(&ca, &id("client"), format);
    write(&dir, &chain, &key, ca.root_pem());
    let cert = dir.files().expecting(id("client")).load().unwrap();
    assert_eq!(cert.identity(), &id("client"));
    assert_eq!(cert.chain()[0], der_of(&chain));
}

#[tokio::test]
async fn rewritten_files_rotate_the_certificate_in_new_handshakes() {
    let ca = ca();
    let (server_dir, first_chain) = dir_with("rotate-server", &ca, &id("server"));
    let (client_dir, _) = dir_with("rotate-client", &ca, &id("client"));
    let provider = FileCertProvider::start([server_dir.files(), client_dir.files()], POLL)
        .await
        .unwrap();
    let server = provider.certificate(&id("server")).await.unwrap();
    let client = provider.certificate(&id("client")).await.unwrap();
    let leaf = presented_leaf(server.clone(), client.clone(), id("server")).await;
    assert_eq!(leaf, der_of(&first_chain));

    let (second_chain, second_key) = issue(&ca, &id("server"), KeyFormat::Pkcs8Ec);
    write(&server_dir, &second_chain, &second_key, ca.root_pem());
    let mut changes = server.clone();
    let rotated = tokio::time::timeout(PATIENCE, changes.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rotated.chain()[0], der_of(&second_chain));
    let leaf = presented_leaf(server, client, id("server")).await;
    assert_eq!(leaf, der_of(&second_chain));
    assert!(provider.last_error(&id("server")).is_none());
}

#[tokio::test]
async fn broken_writes_are_kept_out_until_the_files_are_whole_again() {
    let ca = ca();
    let (dir, first_chain) = dir_with("broken", &ca, &id("client"));
    let provider = FileCertProvider::start([dir.files()], POLL).await.unwrap();
    let watch = provider.certificate(&id("client")).await.unwrap();
    let (second_chain, second_key) = issue(&ca, &id("client"), KeyFormat::Pkcs8Ec);

    // A writer that has replaced the chain but not yet the key.
    std::fs::write(dir.0.join(CERT_CHAIN_FILE), &second_chain).unwrap();
    let error = refusal(&provider, &id("client")).await;
    assert!(
        matches!(&error, FileCertError::Rejected { path, .. } if path == &dir.files().cert_chain),
        "{error}"
    );
    assert_eq!(watch.current().chain()[0], der_of(&first_chain));

    // ... then a truncated key: refused, and the message does not quote it.
    let truncated = &second_key[..second_key.len() / 2];
    std::fs::write(dir.0.join(KEY_FILE), truncated).unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let error = loop {
        match provider.last_error(&id("client")) {
            Some(error @ FileCertError::Pem { .. }) => break error,
            _ => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "truncated key not refused"
                );
                tokio::time::sleep(POLL).await;
            }
        }
    };
    assert!(
        matches!(&error, FileCertError::Pem { path, .. } if path == &dir.files().key),
        "{error}"
    );
    let body_line = truncated.lines().nth(1).unwrap();
    assert!(!error.to_string().contains(body_line), "{error}");
    assert_eq!(watch.current().chain()[0], der_of(&first_chain));

    // ... and finally the whole key: published, and the error cleared.
    std::fs::write(dir.0.join(KEY_FILE), &second_key).unwrap();
    let mut changes = watch.clone();
    let rotated = tokio::time::timeout(PATIENCE, changes.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rotated.chain()[0], der_of(&second_chain));
    assert!(provider.last_error(&id("client")).is_none());
}

#[tokio::test]
async fn a_deleted_file_keeps_the_certificate_and_its_return_clears_the_error() {
    let ca = ca();
    let (dir, chain) = dir_with("deleted", &ca, &id("client"));
    let provider = FileCertProvider::start([dir.files()], POLL).await.unwrap();
    let roots = std::fs::read(dir.0.join(ROOT_CERT_FILE)).unwrap();
    std::fs::remove_file(dir.0.join(ROOT_CERT_FILE)).unwrap();
    let error = refusal(&provider, &id("client")).await;
    assert!(
        matches!(&error, FileCertError::Io { path, .. } if path == &dir.files().root_cert),
        "{error}"
    );
    let watch = provider.certificate(&id("client")).await.unwrap();
    assert_eq!(watch.current().chain()[0], der_of(&chain));
    // The same bytes come back: nothing to publish, but the files are usable again.
    std::fs::write(dir.0.join(ROOT_CERT_FILE), roots).unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while provider.last_error(&id("client")).is_some() {
        assert!(tokio::time::Instant::now() < deadline, "error never cleared");
        tokio::time::sleep(POLL).await;
    }
    assert_eq!(watch.current().chain()[0], der_of(&chain));
}

#[tokio::test]
async fn another_identity_is_refused_at_start_and_on_rotation() {
    let ca = ca();
    let (dir, chain) = dir_with("identity", &ca, &id("client"));
    let error = FileCertProvider::start([dir.files().expecting(id("server"))], POLL)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, FileCertError::IdentityMismatch { expected, found, .. }
            if *expected == id("server") && *found == id("client")),
        "{error}"
    );

    let provider = FileCertProvider::start([dir.files()], POLL).await.unwrap();
    let (other_chain, other_key) = issue(&ca, &id("intruder"), KeyFormat::Pkcs8Ec);
    write(&dir, &other_chain, &other_key, ca.root_pem());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let error = loop {
        match provider.last_error(&id("client")) {
            Some(error @ FileCertError::IdentityMismatch { .. }) => break error,
            _ => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "other identity not refused"
                );
                tokio::time::sleep(POLL).await;
            }
        }
    };
    assert!(
        matches!(&error, FileCertError::IdentityMismatch { expected, found, .. }
            if *expected == id("client") && *found == id("intruder")),
        "{error}"
    );
    let watch = provider.certificate(&id("client")).await.unwrap();
    assert_eq!(watch.current().chain()[0], der_of(&chain));
    assert!(provider.certificate(&id("intruder")).await.is_err());
}

#[test]
fn a_chain_from_another_ca_than_the_bundle_is_refused() {
    let (issuer, other) = (ca(), ca());
    let dir = TempDir::new("foreign");
    let (chain, key) = issue(&issuer, &id("client"), KeyFormat::Pkcs8Ec);
    write(&dir, &chain, &key, other.root_pem());
    let error = dir.files().load().unwrap_err();
    assert!(
        matches!(
            &error,
            FileCertError::Rejected { source, .. } if matches!(**source, Error::ChainInvalid(_))
        ),
        "{error}"
    );
}

#[test]
fn an_expired_leaf_is_refused() {
    let ca = ca();
    let dir = TempDir::new("expired");
    let now = SystemTime::now();
    let spec = LeafSpec {
        uri_sans: vec![id("client").as_str().to_owned()],
        not_before: now - Duration::from_secs(7200),
        not_after: now - Duration::from_secs(3600),
    };
    let (chain, key) = ca.issue_raw(&spec).unwrap();
    let PrivateKeyDer::Pkcs8(key) = key else {
        panic!("DevCa keys are PKCS#8")
    };
    write(
        &dir,
        &pem("CERTIFICATE", &chain[0]),
        &pem("PRIVATE KEY", key.secret_pkcs8_der()),
        ca.root_pem(),
    );
    let error = dir.files().load().unwrap_err();
    assert!(
        matches!(&error, FileCertError::Expired { identity, .. } if *identity == id("client")),
        "{error}"
    );
}

#[test]
fn a_leaf_without_a_spiffe_id_is_refused() {
    let ca = ca();
    let dir = TempDir::new("not-svid");
    let ip = "127.0.0.1".parse().unwrap();
    let (chain, key) = ca
        .issue_server(&["localhost"], &[ip], Duration::from_secs(3600))
        .unwrap();
    let PrivateKeyDer::Pkcs8(key) = key else {
        panic!("DevCa keys are PKCS#8")
    };
    write(
        &dir,
        &pem("CERTIFICATE", &chain[0]),
        &pem("PRIVATE KEY", key.secret_pkcs8_der()),
        ca.root_pem(),
    );
    let error = dir.files().load().unwrap_err();
    assert!(
        matches!(
            &error,
            FileCertError::Rejected { source, .. } if matches!(**source, Error::NotSvid { .. })
        ),
        "{error}"
    );
}

#[test_case(CERT_CHAIN_FILE, "" ; "empty chain")]
#[test_case(CERT_CHAIN_FILE, "not pem at all" ; "chain without pem")]
#[test_case(ROOT_CERT_FILE, "-----BEGIN CERTIFICATE-----\nAAAA\n" ; "bundle without end line")]
#[test_case(KEY_FILE, "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n" ; "encrypted key")]
fn files_that_are_not_the_pem_expected_are_refused_naming_them(file: &str, content: &str) {
    let ca = ca();
    let (dir, _) = dir_with("pem", &ca, &id("client"));
    std::fs::write(dir.0.join(file), content).unwrap();
    let error = dir.files().load().unwrap_err();
    assert!(
        matches!(&error, FileCertError::Pem { path, .. } if *path == dir.0.join(file)),
        "{error}"
    );
}

#[test]
fn oversized_missing_and_irregular_files_are_refused() {
    let ca = ca();
    let (dir, _) = dir_with("sizes", &ca, &id("client"));
    let big = "#".repeat(usize::try_from(MAX_PEM_FILE_BYTES).unwrap() + 1);
    std::fs::write(dir.0.join(ROOT_CERT_FILE), big).unwrap();
    let error = dir.files().load().unwrap_err();
    assert!(
        matches!(&error, FileCertError::TooLarge { size, limit: MAX_PEM_FILE_BYTES, .. }
            if *size == MAX_PEM_FILE_BYTES + 1),
        "{error}"
    );

    std::fs::remove_file(dir.0.join(ROOT_CERT_FILE)).unwrap();
    let error = dir.files().load().unwrap_err();
    assert!(
        matches!(&error, FileCertError::Io { path, .. } if *path == dir.0.join(ROOT_CERT_FILE)),
        "{error}"
    );

    std::fs::create_dir(dir.0.join(ROOT_CERT_FILE)).unwrap();
    let error = dir.files().load().unwrap_err();
    assert!(matches!(&error, FileCertError::Io { .. }), "{error}");
}

#[tokio::test]
async fn two_sets_of_files_for_one_identity_are_refused() {
    let ca = ca();
    let (first, _) = dir_with("dup-a", &ca, &id("client"));
    let (second, _) = dir_with("dup-b", &ca, &id("client"));
    let error = FileCertProvider::start([first.files(), second.files()], POLL)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, FileCertError::DuplicateIdentity { identity, first: a, second: b }
            if *identity == id("client") && *a == first.files().cert_chain && *b == second.files().cert_chain),
        "{error}"
    );
}

#[tokio::test]
async fn dropping_the_provider_stops_polling_and_ends_the_watches() {
    let ca = ca();
    let (dir, chain) = dir_with("drop", &ca, &id("client"));
    let provider = FileCertProvider::start([dir.files()], POLL).await.unwrap();
    let mut watch = provider.certificate(&id("client")).await.unwrap();
    assert_eq!(provider.poll_interval(), POLL);
    drop(provider);
    let ended = tokio::time::timeout(PATIENCE, watch.changed()).await.unwrap();
    assert!(ended.is_none());
    assert_eq!(watch.current().chain()[0], der_of(&chain));
}

#[test]
fn the_poll_interval_has_a_floor() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ca = ca();
    let (dir, _) = dir_with("floor", &ca, &id("client"));
    let provider = runtime
        .block_on(FileCertProvider::start([dir.files()], Duration::ZERO))
        .unwrap();
    assert_eq!(provider.poll_interval(), MIN_FILE_POLL_INTERVAL);
    drop(provider);
    let outside = futures_util::FutureExt::now_or_never(FileCertProvider::start([dir.files()], POLL));
    assert!(matches!(outside, Some(Err(FileCertError::NoRuntime))));
}

/// The key inside a PKCS#8 PrivateKeyInfo (SEQUENCE { INTEGER, SEQUENCE, OCTET STRING, ... }): the SEC1
/// ECPrivateKey or PKCS#1 RSAPrivateKey it wraps.
fn inner_private_key(pkcs8: &[u8]) -> &[u8] {
    let (tag, body, _) = der_tlv(pkcs8);
    assert_eq!(tag, 0x30);
    let (_, _, rest) = der_tlv(body); // version
    let (_, _, rest) = der_tlv(rest); // algorithm
    let (tag, key, _) = der_tlv(rest);
    assert_eq!(tag, 0x04);
    key
}

/// One DER tag-length-value: (tag, value, what follows).
fn der_tlv(input: &[u8]) -> (u8, &[u8], &[u8]) {
    let tag = input[0];
    let (len, header) = match input[1] {
        short @ 0..=0x7f => (usize::from(short), 2),
        long => {
            let count = usize::from(long & 0x7f);
            let len = input[2..2 + count]
                .iter()
                .fold(0usize, |acc, byte| (acc << 8) | usize::from(*byte));
            (len, 2 + count)
        }
    };
    (tag, &input[header..header + len], &input[header + len..])
}

/// PEM with 64-column base64 lines.
fn pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut encoded = String::new();
    for chunk in der.chunks(3) {
        let bytes = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(bytes[0]) << 16) | (u32::from(bytes[1]) << 8) | u32::from(bytes[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                encoded.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                encoded.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in encoded.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[test]
fn the_test_pem_encoder_round_trips() {
    for len in 0..8 {
        let der: Vec<u8> = (0..len).map(|i| i * 37 + 1).collect();
        let text = pem("CERTIFICATE", &der);
        let (_, decoded) = rustls_pki_types::pem::from_buf(&mut text.as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(decoded, der, "{text}");
    }
}
