//! Real SPIFFE mutual-TLS handshakes over loopback TCP: the accepted case and each way a peer is refused.

#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_core::ca::LeafSpec;
use mesh_core::tls::{self, ServerCertVerifier, identity_error};
use mesh_core::{CertWatch, DevCa, Error, IdentityErrorKind, SpiffeId, SvidErrorKind, TrustDomain};
use rustls::{CertificateError, ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

const HOUR: Duration = Duration::from_secs(3600);

struct Pki {
    ca: DevCa,
}

impl Pki {
    fn new(td: &str) -> Self {
        Pki {
            ca: DevCa::new(TrustDomain::new(td).unwrap(), 24 * HOUR).unwrap(),
        }
    }
    fn id(&self, ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::istio(self.ca.trust_domain(), ns, sa).unwrap()
    }
    fn watch(&self, ns: &str, sa: &str) -> CertWatch {
        CertWatch::fixed(self.ca.issue(&self.id(ns, sa), HOUR).unwrap())
    }
    fn raw(&self, uri_sans: &[&str], not_before: SystemTime, not_after: SystemTime) -> RawCert {
        let spec = LeafSpec {
            uri_sans: uri_sans.iter().map(|s| s.to_string()).collect(),
            not_before,
            not_after,
        };
        self.ca.issue_raw(&spec).unwrap()
    }
    fn raw_now(&self, uri_sans: &[&str]) -> RawCert {
        let now = SystemTime::now();
        self.raw(uri_sans, now - Duration::from_secs(60), now + HOUR)
    }
    fn server_config(&self, ns: &str, sa: &str) -> Arc<ServerConfig> {
        tls::server_config(self.watch(ns, sa), vec![self.ca.trust_domain().clone()]).unwrap()
    }
}

type RawCert = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// A client that presents an arbitrary (possibly invalid) certificate but verifies the server properly.
fn raw_client(trust: &Pki, expected: SpiffeId, presented: Option<RawCert>) -> Arc<ClientConfig> {
    raw_client_with(tls::crypto_provider(), trust, expected, presented)
}

/// [`raw_client`] with another crypto provider (another client's cipher suite preferences).
fn raw_client_with(
    provider: Arc<rustls::crypto::CryptoProvider>,
    trust: &Pki,
    expected: SpiffeId,
    presented: Option<RawCert>,
) -> Arc<ClientConfig> {
    let verifier = Arc::new(ServerCertVerifier::new(
        trust.watch("trust", "anchor"),
        vec![expected],
    ));
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match presented {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A server that presents an arbitrary certificate but verifies clients properly.
fn raw_server(trust: &Pki, presented: RawCert) -> Arc<ServerConfig> {
    let verifier = Arc::new(tls::ClientCertVerifier::new(
        trust.watch("trust", "anchor"),
        vec![trust.ca.trust_domain().clone()],
    ));
    let mut config = ServerConfig::builder_with_provider(tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(presented.0, presented.1)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

struct Outcome {
    client: std::io::Result<client::TlsStream<TcpStream>>,
    server: std::io::Result<server::TlsStream<TcpStream>>,
}

/// Runs both sides of one handshake over real loopback TCP. In TLS 1.3 the client finishes before the
/// server has checked its certificate, so when the server refuses, the client learns it on its first read;
/// this helper does one exchange after the handshake so each side's verdict is final.
async fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = async {
        let (tcp, _) = listener.accept().await?;
        let mut stream = TlsAcceptor::from(server).accept(tcp).await?;
        stream.write_all(b"s").await?;
        stream.flush().await?;
        Ok(stream)
    };
    let connect = async {
        let tcp = TcpStream::connect(addr).await?;
        let mut stream = TlsConnector::from(client)
            .connect(tls::server_name(), tcp)
            .await?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await?;
        Ok(stream)
    };
    let (server, client) =
        tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(accept, connect) })
            .await
            .expect("a handshake must finish or fail, never hang");
    Outcome { client, server }
}

fn rustls_error(err: &std::io::Error) -> &rustls::Error {
    err.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("expected a rustls error, got {err:?}"))
}

fn mesh_error(err: &std::io::Error) -> &Error {
    let rustls_err = rustls_error(err);
    identity_error(rustls_err)
        .unwrap_or_else(|| panic!("expected a meshkit identity error, got {rustls_err:?}"))
}

#[tokio::test]
async fn both_sides_see_each_others_identity() {
    let pki = Pki::new("cluster.local");
    let client_cfg =
        tls::client_config(pki.watch("default", "client"), vec![pki.id("default", "server")]).unwrap();
    let out = handshake(client_cfg, pki.server_config("default", "server")).await;
    let client = out.client.unwrap();
    let server = out.server.unwrap();
    assert_eq!(
        tls::peer_identity(client.get_ref().1).unwrap(),
        pki.id("default", "server")
    );
    assert_eq!(
        tls::peer_identity(server.get_ref().1).unwrap(),
        pki.id("default", "client")
    );
    // The wire contract: TLS 1.3, ALPN h2, and no SNI on the wire.
    assert_eq!(
        client.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(client.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(server.get_ref().1.server_name(), None);
    // Our clients ask for AES-128-GCM first (see tls::crypto_provider).
    let suite = client.get_ref().1.negotiated_cipher_suite().unwrap().suite();
    assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
}

#[tokio::test]
async fn a_client_preferring_aes_256_as_istios_ztunnel_does_gets_it_from_our_server() {
    let pki = Pki::new("cluster.local");
    let istio_like = rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
            rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ],
        ..rustls::crypto::aws_lc_rs::default_provider()
    };
    let presented = pki.raw_now(&["spiffe://cluster.local/ns/default/sa/client"]);
    let client_cfg = raw_client_with(
        Arc::new(istio_like),
        &pki,
        pki.id("default", "server"),
        Some(presented),
    );
    let out = handshake(client_cfg, pki.server_config("default", "server")).await;
    let server = out.server.unwrap();
    assert!(out.client.is_ok());
    let suite = server.get_ref().1.negotiated_cipher_suite().unwrap().suite();
    assert_eq!(suite, rustls::CipherSuite::TLS13_AES_256_GCM_SHA384);
}

#[tokio::test]
async fn any_of_several_expected_identities_is_accepted() {
    let pki = Pki::new("cluster.local");
    let expected = vec![pki.id("default", "other"), pki.id("default", "server")];
    let client_cfg = tls::client_config(pki.watch("default", "client"), expected).unwrap();
    let out = handshake(client_cfg, pki.server_config("default", "server")).await;
    assert!(out.client.is_ok() && out.server.is_ok());
}

#[tokio::test]
async fn client_refuses_unexpected_server_identity() {
    let pki = Pki::new("cluster.local");
    let client_cfg = tls::client_config(
        pki.watch("default", "client"),
        vec![pki.id("default", "payments")],
    )
    .unwrap();
    let out = handshake(client_cfg, pki.server_config("default", "server")).await;
    match mesh_error(out.client.as_ref().unwrap_err()) {
        Error::UnexpectedIdentity { peer, expected } => {
            assert_eq!(peer, &pki.id("default", "server"));
            assert_eq!(expected, &vec![pki.id("default", "payments")]);
        }
        other => panic!("wrong error {other:?}"),
    }
    assert!(out.server.is_err(), "the server must see the client's alert");
}

#[tokio::test]
async fn server_refuses_client_from_other_trust_domain() {
    // Same root, so the chain is fine: only the trust-domain rule can refuse it.
    let pki = Pki::new("cluster.local");
    let foreign = pki.raw_now(&["spiffe://other.example/ns/default/sa/client"]);
    let client_cfg = raw_client(&pki, pki.id("default", "server"), Some(foreign));
    let out = handshake(client_cfg, pki.server_config("default", "server")).await;
    match mesh_error(out.server.as_ref().unwrap_err()) {
        Error::UntrustedDomain { peer, accepted } => {
            assert_eq!(peer.as_str(), "spiffe://other.example/ns/default/sa/client");
            assert_eq!(accepted, &vec![TrustDomain::new("cluster.local").unwrap()]);
        }
        other => panic!("wrong error {other:?}"),
    }
    assert!(out.client.is_err(), "the client must learn it was refused");
}

#[tokio::test]
async fn server_refuses_expired_client_certificate() {
    let pki = Pki::new("cluster.local");
    let now = SystemTime::now();
    let expired = pki.raw(
        &["spiffe://cluster.local/ns/default/sa/client"],
        now - 2 * HOUR,
        now - HOUR,
    );
    let client_cfg = raw_client(&pki, pki.id("default", "server"), Some(expired));
    let out = handshake(client_cfg, pki.server_config("default", "server")).await;
    let err = rustls_error(out.server.as_ref().unwrap_err());
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })
        ),
        "{err:?}"
    );
    assert!(out.client.is_err());
}

#[tokio::test]
async fn client_refuses_expired_server_certificate() {
    let pki = Pki::new("cluster.local");
    let now = SystemTime::now();
    let expired = pki.raw(
        &["spiffe://cluster.local/ns/default/sa/server"],
        now - 2 * HOUR,
        now - HOUR,
    );
    let client_cfg =
        tls::client_config(pki.watch("default", "client"), vec![pki.id("default", "server")]).unwrap();
    let out = handshake(client_cfg, raw_server(&pki, expired)).await;
    let err = rustls_error(out.client.as_ref().unwrap_err());
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn server_refuses_client_certificate_from_another_root() {
    let pki = Pki::new("cluster.local");
    let impostor_ca = Pki::new("cluster.local");
    let client_cfg = tls::client_config(
        impostor_ca.watch("default", "client"),
        vec![pki.id("default", "server")],
    )
    .unwrap();
    let out = handshake(client_cfg, pki.server_config("default", "server")).await;
    // Both dev roots carry the same subject name, like an impostor root copying ours: path building finds
    // "our" issuer by name and the signature check fails (BadSignature) instead of UnknownIssuer. Either is
    // a refusal for not chaining to our root.
    let not_our_root = |e: &rustls::Error| {
        matches!(
            e,
            rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature
            )
        )
    };
    // The impostor's client also does not trust our server's root, so both sides refuse.
    let server_err = rustls_error(out.server.as_ref().unwrap_err());
    let client_err = rustls_error(out.client.as_ref().unwrap_err());
    assert!(not_our_root(client_err), "{client_err:?}");
    assert!(
        not_our_root(server_err) || matches!(server_err, rustls::Error::AlertReceived(_)),
        "{server_err:?}"
    );

    // A client that trusts our server but presents the other root's certificate: the server refuses it.
    let (chain, key) = impostor_ca.raw_now(&["spiffe://cluster.local/ns/default/sa/client"]);
    let client_cfg = raw_client(&pki, pki.id("default", "server"), Some((chain, key)));
    let out = handshake(client_cfg, pki.server_config("default", "server")).await;
    let err = rustls_error(out.server.as_ref().unwrap_err());
    assert!(not_our_root(err), "{err:?}");
}

#[tokio::test]
async fn server_refuses_client_without_certificate() {
    let pki = Pki::new("cluster.local");
    let client_cfg = raw_client(&pki, pki.id("default", "server"), None);
    let out = handshake(client_cfg, pki.server_config("default", "server")).await;
    let err = rustls_error(out.server.as_ref().unwrap_err());
    assert!(matches!(err, rustls::Error::NoCertificatesPresented), "{err:?}");
    assert!(out.client.is_err());
}

#[tokio::test]
async fn server_refuses_san_with_nul_byte() {
    let pki = Pki::new("cluster.local");
    let nul = pki.raw_now(&["spiffe://cluster.local/ns/default\0/sa/client"]);
    let client_cfg = raw_client(&pki, pki.id("default", "server"), Some(nul));
    let out = handshake(client_cfg, pki.server_config("default", "server")).await;
    match mesh_error(out.server.as_ref().unwrap_err()) {
        Error::NotSvid {
            reason: SvidErrorKind::InvalidUri(IdentityErrorKind::Nul),
        } => {}
        other => panic!("wrong error {other:?}"),
    }
}

#[tokio::test]
async fn server_refuses_certificates_that_are_not_svids() {
    let pki = Pki::new("cluster.local");
    let cases: [(&[&str], SvidErrorKind); 3] = [
        (&[], SvidErrorKind::NoUriSan),
        (
            &[
                "spiffe://cluster.local/ns/default/sa/client",
                "spiffe://cluster.local/ns/default/sa/admin",
            ],
            SvidErrorKind::SeveralUriSans(2),
        ),
        (
            &["https://cluster.local/ns/default/sa/client"],
            SvidErrorKind::InvalidUri(IdentityErrorKind::Scheme),
        ),
    ];
    for (sans, expected) in cases {
        let client_cfg = raw_client(&pki, pki.id("default", "server"), Some(pki.raw_now(sans)));
        let out = handshake(client_cfg, pki.server_config("default", "server")).await;
        match mesh_error(out.server.as_ref().unwrap_err()) {
            Error::NotSvid { reason } => assert_eq!(reason, &expected, "SANs {sans:?}"),
            other => panic!("SANs {sans:?}: wrong error {other:?}"),
        }
    }
}

#[tokio::test]
async fn client_refuses_server_with_several_uri_sans() {
    // Even when one of them is the expected identity: an SVID has exactly one.
    let pki = Pki::new("cluster.local");
    let two = pki.raw_now(&[
        "spiffe://cluster.local/ns/default/sa/server",
        "spiffe://cluster.local/ns/default/sa/other",
    ]);
    let client_cfg =
        tls::client_config(pki.watch("default", "client"), vec![pki.id("default", "server")]).unwrap();
    let out = handshake(client_cfg, raw_server(&pki, two)).await;
    match mesh_error(out.client.as_ref().unwrap_err()) {
        Error::NotSvid {
            reason: SvidErrorKind::SeveralUriSans(2),
        } => {}
        other => panic!("wrong error {other:?}"),
    }
}

#[test]
fn workload_cert_rejects_mismatched_identity_and_key() {
    let pki = Pki::new("cluster.local");
    let (chain, key) = pki.raw_now(&["spiffe://cluster.local/ns/default/sa/a"]);
    let roots = vec![pki.ca.root_cert().clone()];
    let wrong_id = pki.id("default", "b");
    assert!(matches!(
        mesh_core::WorkloadCert::new(&wrong_id, chain.clone(), key.clone_key(), roots.clone()),
        Err(Error::SignedCertMismatch { .. })
    ));
    let (_, other_key) = pki.raw_now(&["spiffe://cluster.local/ns/default/sa/a"]);
    assert!(matches!(
        mesh_core::WorkloadCert::new(&pki.id("default", "a"), chain.clone(), other_key, roots.clone()),
        Err(Error::SignedCertMismatch { .. })
    ));
    assert!(mesh_core::WorkloadCert::new(&pki.id("default", "a"), chain, key, roots).is_ok());
}
