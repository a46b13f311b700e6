//! The Istio CA client against the local CA service, over real TLS gRPC on 127.0.0.1.

#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use mesh_core::cert::{CachingCertConfig, SignRequest};
use mesh_core::{CachingCertProvider, CertSigner, DevCa, SpiffeId};
use mesh_test::TestPki;
use mesh_xds::XdsError;
use mesh_xds::ca::{
    CaService, CallInfo, Caller, CallerAuthenticator, ClientCertAuthenticator, DevAnyToken, IstioCaConfig,
    IstioCaSigner, StaticTokens,
};
use mesh_xds::proto::istio::v1::auth::IstioCertificateRequest;
use mesh_xds::proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use mesh_xds::transport::{self, CallCredentials, GrpcClientConfig, TlsIncoming, TokenSource};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use tokio::net::TcpListener;
use tonic::Code;
use tonic::transport::Channel;

/// Every await on the network is bounded by this, so a broken test fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(20);

const ZTUNNEL: &str = "spiffe://cluster.local/ns/istio-system/sa/ztunnel";
const WORKLOAD: &str = "spiffe://cluster.local/ns/a/sa/b";

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

async fn bounded<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(LIMIT, future)
        .await
        .expect("the test's time limit passed")
}

/// A CA service served over TLS (the DevCa helper's server certificate) on a loopback port; dropped with
/// the test's runtime.
struct Server {
    addr: SocketAddr,
    ca: Arc<DevCa>,
}

impl Server {
    async fn start(pki: &TestPki, configure: impl FnOnce(CaService) -> CaService) -> Server {
        let ca = pki.ca().clone();
        let service = configure(CaService::new(ca.clone()));
        let tls = transport::local_server_tls(
            &ca,
            transport::LOCAL_SERVER_DNS_NAMES,
            &[IpAddr::from([127, 0, 0, 1])],
            Duration::from_secs(3600),
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = TlsIncoming::new(listener, tls, Default::default()).unwrap();
        tokio::spawn(
            tonic::transport::Server::builder().serve_with_incoming(service.into_server(), incoming),
        );
        Server { addr, ca }
    }

    fn client_config(&self) -> GrpcClientConfig {
        GrpcClientConfig::new(format!("https://localhost:{}", self.addr.port()))
            .with_roots_pem(self.ca.root_pem())
    }

    fn channel(&self) -> Channel {
        transport::connect_lazy(&self.client_config()).unwrap()
    }

    fn signer(&self, token: &str, config: IstioCaConfig) -> IstioCaSigner {
        let credentials = CallCredentials::bearer(TokenSource::Literal(token.into())).unwrap();
        IstioCaSigner::new(self.channel(), credentials, config)
    }
}

fn csr_pem(uris: &[&str]) -> (String, Vec<u8>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    let csr = params.serialize_request(&key).unwrap();
    (csr.pem().unwrap(), csr.der().to_vec())
}

fn sign_request(identity: &str) -> SignRequest {
    let (csr_pem, csr_der) = csr_pem(&[identity]);
    SignRequest {
        identity: id(identity),
        csr_der,
        csr_pem,
        validity: Duration::from_secs(3600),
    }
}

/// The raw gRPC status of one call with `token` (or none), for checking codes exactly.
async fn raw_call(server: &Server, token: Option<&str>, request: IstioCertificateRequest) -> tonic::Status {
    let mut client = IstioCertificateServiceClient::new(server.channel());
    let mut request = tonic::Request::new(request);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    bounded(client.create_certificate(request))
        .await
        .expect_err("the call should be refused")
}

fn request_for(uris: &[&str]) -> IstioCertificateRequest {
    IstioCertificateRequest {
        csr: csr_pem(uris).0,
        validity_duration: 3600,
        metadata: None,
    }
}

#[tokio::test]
async fn round_trip_caching_provider_gets_a_certificate_that_works_for_mutual_tls() {
    let pki = TestPki::new();
    let server = Server::start(&pki, |s| {
        s.with_authenticator(StaticTokens::new().with("token-b", Caller::new(id(WORKLOAD))))
    })
    .await;
    let signer = server.signer("token-b", IstioCaConfig::default());
    let provider = CachingCertProvider::new(Arc::new(signer), CachingCertConfig::default());

    let watch = bounded(provider.fetch(&id(WORKLOAD))).await.unwrap();
    let cert = watch.current();
    assert_eq!(cert.identity(), &id(WORKLOAD));
    // istiod's shape: [leaf, root]; the root becomes the trust bundle and leaves the chain.
    assert_eq!(cert.chain().len(), 1);
    assert_eq!(cert.roots(), std::slice::from_ref(pki.ca().root_cert()));
    assert_eq!(provider.identities(), vec![id(WORKLOAD)]);

    // The certificate proves its identity to a mesh peer, and accepts the peer's.
    let server_cert = pki.cert("default", "server");
    let pair = bounded(mesh_test::tls_pair(
        watch,
        vec![pki.id("default", "server")],
        server_cert,
    ))
    .await
    .unwrap();
    let server_side = mesh_core::tls::peer_identity(pair.server.get_ref().1).unwrap();
    assert_eq!(server_side, id(WORKLOAD));
}

#[tokio::test]
async fn node_proxy_impersonates_only_workloads_on_its_node() {
    let pki = TestPki::new();
    let server = Server::start(&pki, |s| {
        s.with_authenticator(
            StaticTokens::new()
                .with("ztunnel-1", Caller::new(id(ZTUNNEL)).on_node("node-1"))
                .with("ztunnel-2", Caller::new(id(ZTUNNEL)).on_node("node-2"))
                .with(
                    "impostor",
                    Caller::new(id("spiffe://cluster.local/ns/x/sa/y")).on_node("node-1"),
                ),
        )
        .with_impersonators([id(ZTUNNEL)])
        .with_node_authorizer(|node: &str, identity: &SpiffeId| {
            node == "node-1" && identity.as_str() == WORKLOAD
        })
    })
    .await;
    let node_mode = IstioCaConfig::default().with_impersonation(true);

    let signed = bounded(
        server
            .signer("ztunnel-1", node_mode.clone())
            .sign(&sign_request(WORKLOAD)),
    )
    .await
    .unwrap();
    assert_eq!(
        mesh_core::cert::svid_identity(&signed.chain[0]).unwrap(),
        id(WORKLOAD)
    );

    let refusals = [
        ("impostor", node_mode.clone(), "is not allowed to impersonate"),
        (
            "ztunnel-2",
            node_mode.clone(),
            "no workload with identity spiffe://cluster.local/ns/a/sa/b runs on node node-2",
        ),
        // Asking for another identity without impersonation.
        (
            "ztunnel-1",
            IstioCaConfig::default(),
            "may only have its own identity certified",
        ),
    ];
    for (token, config, expected) in refusals {
        let error = bounded(server.signer(token, config).sign(&sign_request(WORKLOAD)))
            .await
            .unwrap_err();
        let mesh_core::Error::Signing { identity, reason } = &error else {
            panic!("{token}: unexpected error {error}");
        };
        assert_eq!(identity, &id(WORKLOAD));
        assert!(reason.starts_with("PermissionDenied: "), "{token}: {reason}");
        assert!(
            reason.contains(expected),
            "{token}: {reason:?} should contain {expected:?}"
        );
    }

    // The exact code on the wire, and an ImpersonatedIdentity that differs from the CSR.
    let mut request = request_for(&[WORKLOAD]);
    request.metadata = Some(prost_types::Struct {
        fields: [(
            "ImpersonatedIdentity".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(
                    "spiffe://cluster.local/ns/a/sa/other".into(),
                )),
            },
        )]
        .into(),
    });
    let status = raw_call(&server, Some("ztunnel-1"), request).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("differs from the CSR's identity"),
        "{status:?}"
    );
    let status = raw_call(&server, Some("impostor"), request_for(&[WORKLOAD])).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
}

/// Records the bearer token, `clusterid` and `x-extra` headers of every call, and accepts the caller as
/// the workload.
#[derive(Debug, Default)]
struct RecordingTokens {
    seen: Mutex<Vec<[String; 3]>>,
}

impl CallerAuthenticator for RecordingTokens {
    fn authenticate<'a>(&'a self, call: &'a CallInfo<'a>) -> BoxFuture<'a, Result<Caller, XdsError>> {
        let header = |name: &str| {
            let value = call.metadata.get(name).and_then(|v| v.to_str().ok());
            value.unwrap_or_default().to_owned()
        };
        let token = header("authorization").strip_prefix("Bearer ").map(str::to_owned);
        let result = match token {
            Some(token) => {
                self.seen
                    .lock()
                    .unwrap()
                    .push([token, header("clusterid"), header("x-extra")]);
                Ok(Caller::new(id(WORKLOAD)))
            }
            None => Err(XdsError::Unauthenticated {
                reason: "no token".into(),
            }),
        };
        Box::pin(std::future::ready(result))
    }
}

#[tokio::test]
async fn token_is_checked_and_its_file_is_reread_for_every_call() {
    let pki = TestPki::new();
    let server = Server::start(&pki, |s| {
        s.with_authenticator(StaticTokens::new().with("right", Caller::new(id(WORKLOAD))))
    })
    .await;
    for token in [None, Some("wrong")] {
        let status = raw_call(&server, token, request_for(&[WORKLOAD])).await;
        assert_eq!(status.code(), Code::Unauthenticated, "{token:?}: {status:?}");
        assert!(
            status.message().contains("request authentication failed"),
            "{status:?}"
        );
    }
    let error = bounded(
        server
            .signer("wrong", IstioCaConfig::default())
            .sign(&sign_request(WORKLOAD)),
    )
    .await
    .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("Unauthenticated: request authentication failed: unknown bearer token"),
        "{error}"
    );

    // A rotating token file: the server sees each version, on the same channel.
    let recorder = Arc::new(RecordingTokens::default());
    let recording = Server::start(&pki, |s| s.with_shared_authenticator(recorder.clone())).await;
    let dir = std::env::temp_dir().join(format!("mesh-xds-ca-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("istio-token");
    std::fs::write(&path, "token-one\n").unwrap();
    let credentials = CallCredentials::bearer(TokenSource::File(path.clone()))
        .unwrap()
        .with_cluster_id("Kubernetes")
        .unwrap()
        .with_header("x-extra", "yes")
        .unwrap();
    let signer = IstioCaSigner::new(recording.channel(), credentials, IstioCaConfig::default());
    bounded(signer.sign(&sign_request(WORKLOAD))).await.unwrap();
    std::fs::write(&path, "token-two").unwrap();
    bounded(signer.sign(&sign_request(WORKLOAD))).await.unwrap();
    let headers = |token: &str| [token.to_owned(), "Kubernetes".to_owned(), "yes".to_owned()];
    assert_eq!(
        *recorder.seen.lock().unwrap(),
        [headers("token-one"), headers("token-two")]
    );

    // A missing or empty token file fails the call locally, naming the file.
    std::fs::write(&path, "  \n").unwrap();
    let error = bounded(signer.sign(&sign_request(WORKLOAD))).await.unwrap_err();
    assert!(error.to_string().contains("Unauthenticated"), "{error}");
    assert!(error.to_string().contains("it is empty"), "{error}");
    std::fs::remove_file(&path).unwrap();
    let error = bounded(signer.sign(&sign_request(WORKLOAD))).await.unwrap_err();
    assert!(error.to_string().contains(&path.display().to_string()), "{error}");
    assert!(error.to_string().contains("cannot read it"), "{error}");
    assert_eq!(
        recorder.seen.lock().unwrap().len(),
        2,
        "refused calls are never sent"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn bad_csrs_are_invalid_arguments_and_the_client_error_names_the_identity() {
    let pki = TestPki::new();
    let server = Server::start(&pki, |s| {
        s.with_authenticator(StaticTokens::new().with("token-b", Caller::new(id(WORKLOAD))))
    })
    .await;
    let garbage = IstioCertificateRequest {
        csr: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
        validity_duration: 3600,
        metadata: None,
    };
    let cases = [
        (garbage, "the CSR does not parse"),
        (
            request_for(&[WORKLOAD, "spiffe://cluster.local/ns/a/sa/c"]),
            "2 URI SANs",
        ),
        (
            request_for(&["spiffe://other.local/ns/a/sa/b"]),
            "outside this CA's trust domain cluster.local",
        ),
    ];
    for (request, expected) in cases {
        let status = raw_call(&server, Some("token-b"), request).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains(expected),
            "{status:?} should contain {expected:?}"
        );
    }

    // Through the signer: a CSR for another trust domain.
    let foreign = "spiffe://other.local/ns/a/sa/b";
    let error = bounded(
        server
            .signer("token-b", IstioCaConfig::default())
            .sign(&sign_request(foreign)),
    )
    .await
    .unwrap_err();
    let text = error.to_string();
    assert!(
        text.starts_with(&format!(
            "signing a certificate for {foreign} failed: InvalidArgument:"
        )),
        "{text}"
    );
}

#[tokio::test]
async fn client_refuses_a_server_that_does_not_chain_to_its_roots() {
    let pki = TestPki::new();
    let server = Server::start(&pki, |s| {
        s.with_authenticator(StaticTokens::new().with("token-b", Caller::new(id(WORKLOAD))))
    })
    .await;
    // (Another trust domain, so that the stranger's root does not even share the issuer's name.)
    let stranger = TestPki::for_trust_domain("stranger.local");
    let config = server.client_config().with_roots_pem(stranger.ca().root_pem());
    let credentials = CallCredentials::bearer(TokenSource::Literal("token-b".into())).unwrap();
    let signer = IstioCaSigner::new(
        transport::connect_lazy(&config).unwrap(),
        credentials,
        IstioCaConfig::default(),
    );
    let error = bounded(signer.sign(&sign_request(WORKLOAD))).await.unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains(&format!("signing a certificate for {WORKLOAD} failed")),
        "{text}"
    );
    assert!(text.contains("TLS handshake as localhost"), "{text}");
    assert!(text.contains("invalid peer certificate: UnknownIssuer"), "{text}");

    // The right root, but a name the certificate does not carry; then the override to a name it does.
    let wrong_name = GrpcClientConfig::new(format!("https://127.0.0.1:{}", server.addr.port()))
        .with_roots_pem(pki.ca().root_pem())
        .with_server_name("istiod.example.com");
    let mut client = IstioCertificateServiceClient::new(transport::connect_lazy(&wrong_name).unwrap());
    let status = bounded(client.create_certificate(request_for(&[WORKLOAD])))
        .await
        .unwrap_err();
    let text = format!("{status:?}");
    assert_eq!(status.code(), Code::Unavailable, "{text}");
    assert!(
        status
            .message()
            .contains("certificate not valid for name \"istiod.example.com\""),
        "{text}"
    );
    let renamed = wrong_name.with_server_name("istiod.istio-system.svc");
    let mut client = IstioCertificateServiceClient::new(transport::connect_lazy(&renamed).unwrap());
    let status = bounded(client.create_certificate(request_for(&[WORKLOAD])))
        .await
        .unwrap_err();
    // The handshake succeeded: the refusal is the CA's, for want of a token.
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

#[tokio::test]
async fn client_certificate_authenticates_without_a_token() {
    let pki = TestPki::new();
    let server = Server::start(&pki, |s| {
        s.with_authenticator(StaticTokens::new())
            .with_authenticator(ClientCertAuthenticator::for_ca(pki.ca()).unwrap())
    })
    .await;
    let config = server.client_config().with_client_cert(pki.cert("a", "b"));
    let signer = IstioCaSigner::new(
        transport::connect_lazy(&config).unwrap(),
        CallCredentials::anonymous(),
        IstioCaConfig::default(),
    );
    let signed = bounded(signer.sign(&sign_request(WORKLOAD))).await.unwrap();
    assert_eq!(
        mesh_core::cert::svid_identity(&signed.chain[0]).unwrap(),
        id(WORKLOAD)
    );
    // The certificate's identity is all it may ask for.
    let error = bounded(signer.sign(&sign_request("spiffe://cluster.local/ns/a/sa/c")))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("PermissionDenied"), "{error}");

    // A certificate from another CA does not even complete the handshake.
    let stranger = TestPki::new();
    let config = server.client_config().with_client_cert(stranger.cert("a", "b"));
    let signer = IstioCaSigner::new(
        transport::connect_lazy(&config).unwrap(),
        CallCredentials::anonymous(),
        IstioCaConfig::default(),
    );
    assert!(bounded(signer.sign(&sign_request(WORKLOAD))).await.is_err());
}

#[tokio::test]
async fn a_stalled_handshake_does_not_block_other_clients() {
    let pki = TestPki::new();
    let server = Server::start(&pki, |s| {
        s.with_authenticator(StaticTokens::new().with("token-b", Caller::new(id(WORKLOAD))))
    })
    .await;
    // Clients that connect and never speak, and one that speaks garbage.
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    let mut garbage = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut garbage, b"GET / HTTP/1.1\r\n\r\n")
        .await
        .unwrap();

    let signed = bounded(
        server
            .signer("token-b", IstioCaConfig::default())
            .sign(&sign_request(WORKLOAD)),
    )
    .await
    .unwrap();
    assert_eq!(
        mesh_core::cert::svid_identity(&signed.chain[0]).unwrap(),
        id(WORKLOAD)
    );
    drop(silent);
}

#[tokio::test]
async fn plain_http_with_the_development_authenticator_on_loopback() {
    let pki = TestPki::new();
    let service = CaService::new(pki.ca().clone()).with_authenticator(DevAnyToken::new());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tonic::transport::Server::builder().serve_with_incoming(
        service.into_server(),
        tonic::transport::server::TcpIncoming::from(listener),
    ));
    let channel = transport::connect_lazy(&GrpcClientConfig::new(format!("http://{addr}"))).unwrap();
    let credentials = CallCredentials::bearer(TokenSource::Literal("anything".into())).unwrap();
    let signer = IstioCaSigner::new(channel.clone(), credentials, IstioCaConfig::default());
    let signed = bounded(signer.sign(&sign_request("spiffe://cluster.local/ns/dev/sa/app")))
        .await
        .unwrap();
    assert_eq!(
        mesh_core::cert::svid_identity(&signed.chain[0]).unwrap(),
        id("spiffe://cluster.local/ns/dev/sa/app")
    );
    // No impersonation rights: the request is attributed to the workload, which is no node proxy.
    let node_mode = IstioCaConfig::default().with_impersonation(true);
    let credentials = CallCredentials::bearer(TokenSource::Literal("anything".into())).unwrap();
    let error = bounded(IstioCaSigner::new(channel, credentials, node_mode).sign(&sign_request(WORKLOAD)))
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("is not allowed to impersonate"),
        "{error}"
    );
}

#[test]
fn credentials_refuse_bad_headers_when_built() {
    let literal = |t: &str| CallCredentials::bearer(TokenSource::Literal(t.into()));
    assert!(matches!(literal("   "), Err(XdsError::Token { .. })));
    assert!(matches!(literal("a\nb"), Err(XdsError::Token { .. })));
    let ok = literal("t").unwrap();
    assert!(
        !format!("{ok:?}").contains("\"t\""),
        "the token must not be printed: {ok:?}"
    );
    for (name, value) in [
        ("authorization", "x"),
        ("clusterid", "x"),
        ("grpc-timeout", "1S"),
        ("bad name", "x"),
        ("x-data-bin", "x"),
        ("x-fine", "new\nline"),
    ] {
        let result = CallCredentials::anonymous().with_header(name, value);
        assert!(
            matches!(result, Err(XdsError::Header { .. })),
            "{name}: {result:?}"
        );
    }
    assert!(
        CallCredentials::anonymous()
            .with_header("x-istio-extra", "v")
            .is_ok()
    );
    assert!(matches!(
        CallCredentials::anonymous().with_cluster_id("bad\u{7f}"),
        Err(XdsError::Header { .. })
    ));
}

#[test]
fn client_config_is_checked_before_dialling() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cases = [
        (
            GrpcClientConfig::new("ftp://localhost:1"),
            "must start with https:// or http://",
        ),
        (
            GrpcClientConfig::new("https://localhost:1"),
            "needs root certificates",
        ),
        (
            GrpcClientConfig::new("https://localhost:1").with_roots_pem("not pem"),
            "no PEM certificate found",
        ),
        (
            GrpcClientConfig::new("https://localhost:1")
                .with_roots_pem(TestPki::new().ca().root_pem())
                .with_server_name("not a name!"),
            "is not a DNS name or IP address",
        ),
    ];
    for (config, expected) in cases {
        let error = runtime
            .block_on(async { transport::connect_lazy(&config) })
            .unwrap_err();
        assert!(
            error.to_string().contains(expected),
            "{error} should contain {expected:?}"
        );
    }
    // Outside a runtime: a typed error, not a panic.
    let error = transport::connect_lazy(&GrpcClientConfig::new("http://localhost:1")).unwrap_err();
    assert!(error.to_string().contains("tokio runtime"), "{error}");
}
