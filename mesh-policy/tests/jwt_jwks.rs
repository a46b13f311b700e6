//! `jwksUri` over real HTTPS on 127.0.0.1: a JWKS server with its own throwaway CA (rcgen), key rotation,
//! refetch on unknown `kid` with a rate limit, stale-if-error, fetch timeouts and OpenID discovery.
//!
//! Real sockets need real time (tokio's paused clock would fire fetch timeouts while the socket waits), so
//! the cache intervals here are a few hundred milliseconds and waits are bounded polls.
#![allow(clippy::unwrap_used, missing_docs)]

mod jwt_support;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::Algorithm;
use jwt_support::{Family, SigningKey, claims, jwks};
use mesh_policy::authz::{Enforcement, Target};
use mesh_policy::jwt::{HttpsFetcher, JwksCache, JwksCacheConfig, JwtAuthenticator, JwtError};
use mesh_policy::resource::parse_resources;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// How the server answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Up,
    /// Closes every connection right after accepting it: the endpoint is down.
    Down,
    /// Accepts and then never answers.
    Hang,
}

struct ServerState {
    jwks: Mutex<String>,
    mode: Mutex<Mode>,
    connections: AtomicUsize,
    jwks_requests: AtomicUsize,
}

struct JwksServer {
    addr: SocketAddr,
    state: Arc<ServerState>,
    /// Trusts the server's certificate (and nothing else).
    client_config: Arc<rustls::ClientConfig>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl JwksServer {
    async fn start(jwks: String) -> JwksServer {
        // A throwaway CA and a server certificate for 127.0.0.1 (DevCa only issues SPIFFE identities).
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let server_key = KeyPair::generate().unwrap();
        let mut server_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        server_params.subject_alt_names = vec![SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST))];
        let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();

        let server_config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![server_cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(ca_cert.der().to_vec())).unwrap();
        let client_config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ServerState {
            jwks: Mutex::new(jwks),
            mode: Mutex::new(Mode::Up),
            connections: AtomicUsize::new(0),
            jwks_requests: AtomicUsize::new(0),
        });
        let acceptor = TlsAcceptor::from(Arc::new(server_config));
        let served = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                served.connections.fetch_add(1, Ordering::SeqCst);
                let mode = *served.mode.lock().unwrap();
                if mode == Mode::Down {
                    drop(tcp);
                    continue;
                }
                let acceptor = acceptor.clone();
                let state = served.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    if mode == Mode::Hang {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        return;
                    }
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&request);
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    let (status, body) = match path.as_str() {
                        "/jwks" => {
                            state.jwks_requests.fetch_add(1, Ordering::SeqCst);
                            ("200 OK", state.jwks.lock().unwrap().clone())
                        }
                        "/.well-known/openid-configuration" => (
                            "200 OK",
                            format!(r#"{{"issuer":"https://{addr}","jwks_uri":"https://{addr}/jwks"}}"#),
                        ),
                        _ => ("404 Not Found", String::new()),
                    };
                    let response = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(response.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        JwksServer {
            addr,
            state,
            client_config: Arc::new(client_config),
            task,
        }
    }

    fn uri(&self) -> String {
        format!("https://{}/jwks", self.addr)
    }

    fn serve(&self, jwks: String) {
        *self.state.jwks.lock().unwrap() = jwks;
    }

    fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    fn jwks_requests(&self) -> usize {
        self.state.jwks_requests.load(Ordering::SeqCst)
    }

    fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    fn cache(&self, config: JwksCacheConfig) -> JwksCache {
        JwksCache::new(Arc::new(HttpsFetcher::new(self.client_config.clone())), config)
    }
}

const ISSUER: &str = "https://issuer.example.com";

fn authenticator(rule: &str, cache: &JwksCache) -> JwtAuthenticator {
    let yaml = format!(
        "
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: remote, namespace: istio-system}}
spec:
  jwtRules:
  - {rule}
"
    );
    let parsed = parse_resources(&yaml).unwrap();
    let labels = BTreeMap::new();
    let target = Target {
        namespace: "foo",
        labels: &labels,
        enforcement: Enforcement::Ztunnel,
    };
    JwtAuthenticator::compile(parsed.request_authentications(), &target, "istio-system", cache).unwrap()
}

async fn check(authn: &JwtAuthenticator, token: &str) -> Result<Option<String>, JwtError> {
    let request = http::Request::get("/")
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .unwrap();
    authn
        .authenticate(request.headers(), request.uri())
        .await
        .map(|info| info.map(|i| i.principal))
}

fn key(kid: &str) -> SigningKey {
    SigningKey::new(Family::P256, Algorithm::ES256, kid)
}

fn rsa_key(kid: &str) -> SigningKey {
    SigningKey::new(Family::Rsa, Algorithm::RS256, kid)
}

/// Polls `condition` every 20 ms for up to 5 s.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn rotation_refetches_on_unknown_kid_at_most_once_per_interval() {
    // Source: Envoy jwt_authn remote_jwks (keys cached, refetched when a token's kid is unknown);
    // istio.io JWTRule reference, jwksUri.
    let old = key("2024-old");
    let new = rsa_key("2025-new");
    let server = JwksServer::start(jwks(&[&old])).await;
    let min_refetch = Duration::from_millis(500);
    let cache = server.cache(JwksCacheConfig {
        refresh_interval: Duration::from_secs(3600),
        min_refetch_interval: min_refetch,
        fetch_timeout: Duration::from_secs(5),
    });
    let authn = authenticator(
        &format!("{{issuer: '{ISSUER}', jwksUri: '{}'}}", server.uri()),
        &cache,
    );
    let principal = Some(format!("{ISSUER}/alice"));

    assert_eq!(
        check(&authn, &old.sign(&claims(ISSUER, "alice"))).await,
        Ok(principal.clone())
    );
    assert_eq!(server.jwks_requests(), 1, "fetched on first use");
    assert_eq!(
        check(&authn, &old.sign(&claims(ISSUER, "alice"))).await,
        Ok(principal.clone())
    );
    assert_eq!(server.jwks_requests(), 1, "then served from the cache");

    // The issuer rotates: the new key replaces the old one.
    server.serve(jwks(&[&new]));
    tokio::time::sleep(min_refetch + Duration::from_millis(100)).await;
    assert_eq!(
        check(&authn, &new.sign(&claims(ISSUER, "alice"))).await,
        Ok(principal.clone()),
        "an unknown kid triggers a refetch"
    );
    assert_eq!(server.jwks_requests(), 2);

    // Old-key tokens now fail: their kid is gone, and the refetch they ask for is rate-limited.
    let refused = check(&authn, &old.sign(&claims(ISSUER, "alice"))).await;
    assert!(
        matches!(refused, Err(JwtError::UnknownKey { kid: Some(ref k) }) if k == "2024-old"),
        "{refused:?}"
    );
    // A flood of unknown kids cannot hammer the endpoint.
    for i in 0..50 {
        let forged = key(&format!("random-{i}")).sign(&claims(ISSUER, "mallory"));
        assert!(matches!(
            check(&authn, &forged).await,
            Err(JwtError::UnknownKey { .. })
        ));
    }
    assert_eq!(
        server.jwks_requests(),
        2,
        "no refetch within the minimum interval"
    );
    tokio::time::sleep(min_refetch + Duration::from_millis(100)).await;
    for i in 0..20 {
        let forged = key(&format!("later-{i}")).sign(&claims(ISSUER, "mallory"));
        assert!(matches!(
            check(&authn, &forged).await,
            Err(JwtError::UnknownKey { .. })
        ));
    }
    assert_eq!(server.jwks_requests(), 3, "one refetch per interval");
    assert_eq!(
        check(&authn, &new.sign(&claims(ISSUER, "bob"))).await,
        Ok(Some(format!("{ISSUER}/bob")))
    );
}

#[tokio::test]
async fn stale_keys_serve_while_the_endpoint_is_down_and_refresh_rotates_them() {
    // Source: istiod keeps the last good JWKS when a refresh fails; Envoy remote_jwks async_fetch serves
    // cached keys while refetching.
    let current = key("current");
    let next = key("next");
    let server = JwksServer::start(jwks(&[&current])).await;
    let refresh_interval = Duration::from_millis(300);
    let cache = server.cache(JwksCacheConfig {
        refresh_interval,
        min_refetch_interval: Duration::from_millis(100),
        fetch_timeout: Duration::from_secs(5),
    });
    let authn = authenticator(
        &format!("{{issuer: '{ISSUER}', jwksUri: '{}'}}", server.uri()),
        &cache,
    );
    let token = current.sign(&claims(ISSUER, "alice"));
    assert!(check(&authn, &token).await.unwrap().is_some());

    // The endpoint goes down; the keys go stale.
    server.set_mode(Mode::Down);
    tokio::time::sleep(refresh_interval + Duration::from_millis(50)).await;
    assert!(
        check(&authn, &token).await.unwrap().is_some(),
        "stale keys keep serving"
    );
    // That request started a background refresh, which fails.
    eventually("the background refresh to fail", || {
        cache
            .status(&server.uri())
            .is_some_and(|s| s.attempts == 2 && s.last_error.is_some())
    })
    .await;
    let status = cache.status(&server.uri()).unwrap();
    assert_eq!(status.keys, 1, "{status:?}");
    assert!(check(&authn, &token).await.unwrap().is_some(), "stale-if-error");
    let forced = cache.refresh(&server.uri()).await;
    assert!(matches!(forced, Err(JwtError::Fetch { .. })), "{forced:?}");
    assert!(check(&authn, &token).await.unwrap().is_some());

    // The endpoint comes back with rotated keys: a refresh installs them, and old tokens fail.
    server.serve(jwks(&[&next]));
    server.set_mode(Mode::Up);
    cache.refresh(&server.uri()).await.unwrap();
    assert!(
        check(&authn, &next.sign(&claims(ISSUER, "bob")))
            .await
            .unwrap()
            .is_some()
    );
    let refused = check(&authn, &token).await;
    assert!(matches!(refused, Err(JwtError::UnknownKey { .. })), "{refused:?}");
    assert_eq!(cache.status(&server.uri()).unwrap().last_error, None);
}

#[tokio::test]
async fn stale_keys_are_replaced_by_the_background_refresh() {
    let old = key("old");
    let new = key("new");
    let server = JwksServer::start(jwks(&[&old])).await;
    let refresh_interval = Duration::from_millis(300);
    let cache = server.cache(JwksCacheConfig {
        refresh_interval,
        // Long: the only fetches are the first and the interval-driven one.
        min_refetch_interval: Duration::from_millis(250),
        fetch_timeout: Duration::from_secs(5),
    });
    let authn = authenticator(
        &format!("{{issuer: '{ISSUER}', jwksUri: '{}'}}", server.uri()),
        &cache,
    );
    let old_token = old.sign(&claims(ISSUER, "alice"));
    assert!(check(&authn, &old_token).await.unwrap().is_some());
    server.serve(jwks(&[&new]));
    tokio::time::sleep(refresh_interval + Duration::from_millis(50)).await;
    // Served from the stale set; starts the refresh.
    assert!(check(&authn, &old_token).await.unwrap().is_some());
    eventually("the background refresh", || server.jwks_requests() == 2).await;
    eventually("the new keys", || {
        cache.status(&server.uri()).is_some_and(|s| s.attempts == 2)
    })
    .await;
    assert!(
        check(&authn, &new.sign(&claims(ISSUER, "bob")))
            .await
            .unwrap()
            .is_some()
    );
    let refused = check(&authn, &old_token).await;
    assert!(matches!(refused, Err(JwtError::UnknownKey { .. })), "{refused:?}");
}

#[tokio::test]
async fn unreachable_keys_fail_tokens_closed_without_hammering_the_endpoint() {
    let server = JwksServer::start(String::new()).await;
    server.set_mode(Mode::Down);
    let cache = server.cache(JwksCacheConfig {
        refresh_interval: Duration::from_secs(3600),
        min_refetch_interval: Duration::from_secs(60),
        fetch_timeout: Duration::from_secs(5),
    });
    let authn = authenticator(
        &format!("{{issuer: '{ISSUER}', jwksUri: '{}'}}", server.uri()),
        &cache,
    );
    let token = key("k").sign(&claims(ISSUER, "alice"));
    for _ in 0..20 {
        let refused = check(&authn, &token).await;
        assert!(
            matches!(refused, Err(JwtError::KeysUnavailable { .. })),
            "{refused:?}"
        );
    }
    assert_eq!(server.connections(), 1, "one attempt per minimum interval");
    // Without a token the request passes unauthenticated (authorization decides).
    let request = http::Request::get("/").body(()).unwrap();
    assert_eq!(
        authn.authenticate(request.headers(), request.uri()).await,
        Ok(None)
    );
}

#[tokio::test]
async fn a_hanging_endpoint_times_out_as_the_rule_says() {
    // Source: istio.io JWTRule reference, timeout (of the jwksUri fetch).
    let server = JwksServer::start(String::new()).await;
    server.set_mode(Mode::Hang);
    let cache = server.cache(JwksCacheConfig::default());
    let authn = authenticator(
        &format!(
            "{{issuer: '{ISSUER}', jwksUri: '{}', timeout: 300ms}}",
            server.uri()
        ),
        &cache,
    );
    let started = Instant::now();
    let refused = check(&authn, &key("k").sign(&claims(ISSUER, "alice"))).await;
    assert!(
        matches!(refused, Err(JwtError::KeysUnavailable { ref reason, .. }) if reason.contains("timed out")),
        "{refused:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_untrusted_server_certificate_is_refused() {
    let signer = key("k");
    let server = JwksServer::start(jwks(&[&signer])).await;
    // The platform's roots would not trust our throwaway CA either: an empty store stands for them.
    let untrusting = rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let cache = JwksCache::https(Arc::new(untrusting));
    let authn = authenticator(
        &format!("{{issuer: '{ISSUER}', jwksUri: '{}'}}", server.uri()),
        &cache,
    );
    let refused = check(&authn, &signer.sign(&claims(ISSUER, "alice"))).await;
    assert!(
        matches!(refused, Err(JwtError::KeysUnavailable { ref reason, .. }) if reason.contains("TLS")),
        "{refused:?}"
    );
    assert_eq!(server.jwks_requests(), 0);
}

#[tokio::test]
async fn keys_are_discovered_from_the_issuer_when_no_jwks_is_given() {
    // Source: istio.io JWTRule reference, jwksUri: "Optional if the key set document can be retrieved
    // from OpenID Discovery of the issuer".
    let signer = key("discovered");
    let server = JwksServer::start(jwks(&[&signer])).await;
    let issuer = format!("https://{}", server.addr);
    let cache = server.cache(JwksCacheConfig::default());
    let authn = authenticator(&format!("{{issuer: '{issuer}'}}"), &cache);
    authn.prefetch().await.unwrap();
    assert_eq!(server.jwks_requests(), 1);
    assert_eq!(
        check(&authn, &signer.sign(&claims(&issuer, "alice"))).await,
        Ok(Some(format!("{issuer}/alice")))
    );
}

#[tokio::test]
async fn recompiled_authenticators_share_the_fetched_keys() {
    let signer = key("k");
    let server = JwksServer::start(jwks(&[&signer])).await;
    let cache = server.cache(JwksCacheConfig::default());
    let rule = format!("{{issuer: '{ISSUER}', jwksUri: '{}'}}", server.uri());
    let first = authenticator(&rule, &cache);
    assert!(
        check(&first, &signer.sign(&claims(ISSUER, "a")))
            .await
            .unwrap()
            .is_some()
    );
    // A configuration change compiles a new authenticator while the old one still serves.
    let second = authenticator(&rule, &cache);
    drop(first);
    assert!(
        check(&second, &signer.sign(&claims(ISSUER, "a")))
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(server.jwks_requests(), 1);
}
