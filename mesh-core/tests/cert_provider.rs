//! `CachingCertProvider` against scripted signers: coalescing, failure, backoff, forget, and refusal of
//! certificates that do not match the request.

#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use mesh_core::cert::{CachingCertConfig, CertSigner, SignRequest, SignedCert};
use mesh_core::{CachingCertProvider, CertProvider, DevCa, Error, SpiffeId, TrustDomain};
use tokio::time::Instant;

/// Wraps the dev CA: counts calls, records when they happened, can delay, fail chosen calls, or sign for
/// the wrong identity.
#[derive(Debug)]
struct ScriptedSigner {
    ca: DevCa,
    calls: AtomicUsize,
    call_times: Mutex<Vec<Instant>>,
    delay: Duration,
    /// 1-based call numbers that fail.
    failing_calls: Vec<usize>,
    sign_for_other_identity: bool,
}

impl ScriptedSigner {
    fn new() -> Self {
        ScriptedSigner {
            ca: DevCa::new(TrustDomain::default(), Duration::from_secs(3600)).unwrap(),
            calls: AtomicUsize::new(0),
            call_times: Mutex::new(Vec::new()),
            delay: Duration::ZERO,
            failing_calls: Vec::new(),
            sign_for_other_identity: false,
        }
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl CertSigner for ScriptedSigner {
    fn sign<'a>(&'a self, request: &'a SignRequest) -> BoxFuture<'a, Result<SignedCert, Error>> {
        Box::pin(async move {
            let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            self.call_times.lock().unwrap().push(Instant::now());
            tokio::time::sleep(self.delay).await;
            if self.failing_calls.contains(&call) {
                return Err(Error::Signing {
                    identity: request.identity.clone(),
                    reason: format!("scripted failure of call {call}"),
                });
            }
            let identity = if self.sign_for_other_identity {
                id("someone-else")
            } else {
                request.identity.clone()
            };
            let leaf = self.ca.sign_csr(&identity, &request.csr_der, request.validity)?;
            Ok(SignedCert {
                chain: vec![leaf],
                roots: vec![self.ca.root_cert().clone()],
            })
        })
    }
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::istio(&TrustDomain::default(), "default", sa).unwrap()
}

fn provider(signer: &Arc<ScriptedSigner>, validity: Duration) -> CachingCertProvider {
    CachingCertProvider::new(
        signer.clone(),
        CachingCertConfig {
            validity,
            ..CachingCertConfig::default()
        },
    )
}

#[tokio::test]
async fn concurrent_requests_for_one_identity_make_one_ca_call() {
    let signer = Arc::new(ScriptedSigner {
        delay: Duration::from_millis(200),
        ..ScriptedSigner::new()
    });
    let provider = provider(&signer, Duration::from_secs(3600));
    let client = id("client");
    let fetches = (0..50).map(|_| provider.fetch(&client));
    let watches = futures_util::future::join_all(fetches).await;
    assert_eq!(signer.calls(), 1, "50 concurrent callers must share one CA call");
    let first = watches[0].as_ref().unwrap().current();
    for watch in &watches {
        assert!(Arc::ptr_eq(&watch.as_ref().unwrap().current(), &first));
    }
    // Cached afterwards; another identity is its own call.
    provider.fetch(&client).await.unwrap();
    provider.fetch(&id("server")).await.unwrap();
    assert_eq!(signer.calls(), 2);
    assert_eq!(provider.identities(), vec![id("client"), id("server")]);
    // Through the object-safe trait as well.
    let dyn_provider: Arc<dyn CertProvider> = Arc::new(provider.clone());
    assert_eq!(
        dyn_provider.certificate(&client).await.unwrap().identity(),
        client
    );
    assert_eq!(signer.calls(), 2);
}

#[tokio::test]
async fn a_failed_first_fetch_fails_every_waiter_and_the_next_call_retries() {
    let signer = Arc::new(ScriptedSigner {
        delay: Duration::from_millis(100),
        failing_calls: vec![1],
        ..ScriptedSigner::new()
    });
    let provider = provider(&signer, Duration::from_secs(3600));
    let client = id("client");
    let results = futures_util::future::join_all((0..10).map(|_| provider.fetch(&client))).await;
    assert_eq!(signer.calls(), 1);
    for result in results {
        assert!(matches!(result, Err(Error::Signing { ref identity, .. }) if identity == &client));
    }
    assert!(provider.identities().is_empty());
    assert!(provider.fetch(&client).await.is_ok());
    assert_eq!(signer.calls(), 2);
}

#[tokio::test]
async fn a_certificate_for_another_identity_is_refused() {
    let signer = Arc::new(ScriptedSigner {
        sign_for_other_identity: true,
        ..ScriptedSigner::new()
    });
    let provider = provider(&signer, Duration::from_secs(3600));
    match provider.fetch(&id("client")).await {
        Err(Error::SignedCertMismatch { identity, .. }) => assert_eq!(identity, id("client")),
        other => panic!("expected SignedCertMismatch, got {other:?}"),
    }
}

#[tokio::test]
async fn a_slow_ca_times_out() {
    let signer = Arc::new(ScriptedSigner {
        delay: Duration::from_secs(5),
        ..ScriptedSigner::new()
    });
    let provider = CachingCertProvider::new(
        signer.clone(),
        CachingCertConfig {
            sign_timeout: Duration::from_millis(100),
            ..CachingCertConfig::default()
        },
    );
    let started = Instant::now();
    let result = provider.fetch(&id("client")).await;
    assert!(
        matches!(result, Err(Error::Signing { ref reason, .. }) if reason.contains("no answer")),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// Renewal failures back off exponentially and keep the current certificate until a new one is in hand.
/// Tokio's clock is paused, so the backoff schedule is exact; certificate validity still uses the wall
/// clock, which barely moves during the test, so the certificate stays valid throughout.
#[tokio::test(start_paused = true)]
async fn renewal_retries_with_backoff_and_keeps_serving_the_old_certificate() {
    let signer = Arc::new(ScriptedSigner {
        failing_calls: vec![2, 3, 4],
        ..ScriptedSigner::new()
    });
    let config = CachingCertConfig {
        validity: Duration::from_secs(3600),
        retry_initial: Duration::from_secs(1),
        retry_max: Duration::from_secs(3),
        ..CachingCertConfig::default()
    };
    let provider = CachingCertProvider::new(signer.clone(), config);
    let mut watch = provider.fetch(&id("client")).await.unwrap();
    let first = watch.current();

    let renewed = watch.changed().await.expect("renewal after three failures");
    assert_eq!(signer.calls(), 5);
    assert!(!Arc::ptr_eq(&renewed, &first));
    assert_eq!(renewed.identity(), &id("client"));

    let times = signer.call_times.lock().unwrap().clone();
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    // First renewal near half life (up to 5% earlier for jitter), then 1 s, 2 s, 3 s (capped), each up to
    // 20% earlier for jitter.
    assert!(
        gaps[0] >= Duration::from_secs(1700) && gaps[0] <= Duration::from_secs(1800),
        "{gaps:?}"
    );
    for (gap, nominal) in gaps[1..].iter().zip([1.0, 2.0, 3.0]) {
        let secs = gap.as_secs_f64();
        assert!(
            secs <= nominal && secs >= nominal * 0.8,
            "gap {secs} for nominal {nominal}: {gaps:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn forget_stops_renewal() {
    let signer = Arc::new(ScriptedSigner::new());
    let provider = provider(&signer, Duration::from_secs(60));
    let mut watch = provider.fetch(&id("client")).await.unwrap();
    provider.forget(&id("client"));
    assert!(provider.identities().is_empty());
    // The watch keeps its last certificate, but will never change again.
    assert_eq!(watch.current().identity(), &id("client"));
    assert!(watch.changed().await.is_none());
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(signer.calls(), 1);
}
