//! Certificate health: [`TrackedCertProvider`] sits in front of any [`CertProvider`] and remembers the
//! workload certificates the proxy holds and how many requests for one failed, for the metrics endpoint
//! (`meshkit_workload_certificate*`) and the admin config dump.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use mesh_core::cert::{CertProvider, CertWatch, WorkloadCert};
use mesh_core::{Error as CoreError, SpiffeId};

use super::{MetricKind, Metrics, Sample};
use crate::ProxyError;

/// A [`CertProvider`] that passes every request to the one it wraps and keeps, per identity, the
/// certificate watch it handed out (so the current certificate after each rotation), and a count of
/// failed requests. Cheap to clone; clones share what they track.
///
/// What it holds is bounded by the identities (service accounts) the proxy has served, not by
/// connections: one watch per identity.
#[derive(Debug, Clone)]
pub struct TrackedCertProvider {
    inner: Arc<dyn CertProvider>,
    tracked: Arc<Tracked>,
}

#[derive(Debug, Default)]
struct Tracked {
    held: Mutex<BTreeMap<SpiffeId, CertWatch>>,
    failures: AtomicU64,
}

impl TrackedCertProvider {
    /// Tracks the certificates `inner` provides.
    pub fn new(inner: Arc<dyn CertProvider>) -> Self {
        TrackedCertProvider {
            inner,
            tracked: Arc::default(),
        }
    }

    /// The current certificate of every identity a request succeeded for, by identity.
    pub fn held(&self) -> Vec<Arc<WorkloadCert>> {
        match self.tracked.held.lock() {
            Ok(held) => held.values().map(CertWatch::current).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Forgets every identity `keep` rejects, here and in the wrapped provider (which stops renewing its
    /// certificate): the proxy no longer serves a workload with it. Returns the identities forgotten.
    pub fn retain(&self, keep: impl Fn(&SpiffeId) -> bool) -> Vec<SpiffeId> {
        let gone: Vec<SpiffeId> = match self.tracked.held.lock() {
            Ok(mut held) => {
                let gone: Vec<SpiffeId> = held.keys().filter(|id| !keep(id)).cloned().collect();
                for identity in &gone {
                    held.remove(identity);
                }
                gone
            }
            Err(_) => Vec::new(),
        };
        for identity in &gone {
            self.inner.forget(identity);
        }
        gone
    }

    /// Requests that failed (the CA refused or could not be reached, no SVID for the identity, ...).
    pub fn failures(&self) -> u64 {
        self.tracked.failures.load(Ordering::Relaxed)
    }

    /// Registers the certificate health metrics on `metrics`, read at every scrape:
    /// - `meshkit_workload_certificates`: certificates held;
    /// - `meshkit_workload_certificate_expiry_seconds{identity}`: seconds until each one expires (below
    ///   zero once it has: a renewal that keeps failing shows here first);
    /// - `meshkit_workload_certificate_failures_total`: failed requests.
    pub fn register_metrics(&self, metrics: &Metrics) -> Result<(), ProxyError> {
        let held = self.clone();
        metrics.register_gauge(
            "meshkit_workload_certificates",
            "Workload certificates this proxy holds.",
            move || held.held().len() as f64,
        )?;
        let held = self.clone();
        metrics.register_family(
            "meshkit_workload_certificate_expiry_seconds",
            "Seconds until each held workload certificate expires (negative once expired).",
            MetricKind::Gauge,
            move || {
                let now = SystemTime::now();
                held.held()
                    .iter()
                    .map(|cert| {
                        let seconds = match cert.not_after().duration_since(now) {
                            Ok(left) => left.as_secs_f64(),
                            Err(past) => -past.duration().as_secs_f64(),
                        };
                        Sample::new(seconds.floor()).with_label("identity", cert.identity().as_str())
                    })
                    .collect()
            },
        )?;
        let failures = self.tracked.clone();
        metrics.register_counter(
            "meshkit_workload_certificate_failures_total",
            "Requests for a workload certificate that failed.",
            move || failures.failures.load(Ordering::Relaxed) as f64,
        )
    }
}

impl CertProvider for TrackedCertProvider {
    fn forget(&self, identity: &SpiffeId) {
        if let Ok(mut held) = self.tracked.held.lock() {
            held.remove(identity);
        }
        self.inner.forget(identity);
    }

    fn certificate<'a>(
        &'a self,
        identity: &'a SpiffeId,
    ) -> Pin<Box<dyn Future<Output = Result<CertWatch, CoreError>> + Send + 'a>> {
        Box::pin(async move {
            match self.inner.certificate(identity).await {
                Ok(watch) => {
                    if let Ok(mut held) = self.tracked.held.lock()
                        && !held.contains_key(identity)
                    {
                        held.insert(identity.clone(), watch.clone());
                    }
                    Ok(watch)
                }
                Err(error) => {
                    self.tracked.failures.fetch_add(1, Ordering::Relaxed);
                    Err(error)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

    use std::time::Duration;

    use mesh_core::cert::StaticCertProvider;
    use mesh_core::{DevCa, TrustDomain};

    use super::*;

    #[tokio::test]
    async fn held_certificates_and_failures_show_on_the_metrics_endpoint() {
        let ca = DevCa::new(
            TrustDomain::new("cluster.local").unwrap(),
            Duration::from_secs(3600),
        )
        .unwrap();
        let known = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/app").unwrap();
        let unknown = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/nobody").unwrap();
        let mut inner = StaticCertProvider::new();
        inner.insert(ca.issue(&known, Duration::from_secs(600)).unwrap());
        let certs = TrackedCertProvider::new(Arc::new(inner));
        let metrics = Metrics::new();
        certs.register_metrics(&metrics).unwrap();

        let before = metrics.encode();
        assert!(before.contains("meshkit_workload_certificates 0\n"), "{before}");
        assert!(
            !before.contains("meshkit_workload_certificate_expiry_seconds{"),
            "{before}"
        );

        // Asked twice (two connections): held once.
        certs.certificate(&known).await.unwrap();
        certs.certificate(&known).await.unwrap();
        assert!(certs.certificate(&unknown).await.is_err());
        assert_eq!(certs.held().len(), 1);
        assert_eq!(certs.failures(), 1);

        let after = metrics.encode();
        assert!(after.contains("meshkit_workload_certificates 1\n"), "{after}");
        assert!(
            after.contains("meshkit_workload_certificate_failures_total 1\n"),
            "{after}"
        );
        let expiry = after
            .lines()
            .find(|line| {
                line.starts_with(
                    "meshkit_workload_certificate_expiry_seconds{identity=\"spiffe://cluster.local/ns/default/sa/app\"} ",
                )
            })
            .unwrap_or_else(|| panic!("no expiry sample:\n{after}"));
        let seconds: f64 = expiry.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((500.0..=600.0).contains(&seconds), "{expiry}");

        // The workload left: its identity is forgotten and no longer reported.
        assert_eq!(certs.retain(|id| *id != known), vec![known.clone()]);
        assert!(certs.held().is_empty());
        let gone = metrics.encode();
        assert!(gone.contains("meshkit_workload_certificates 0\n"), "{gone}");
        assert!(!gone.contains("sa/app"), "{gone}");
    }
}
