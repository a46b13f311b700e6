//! [`PolicyEngine`]: the current [`PolicySet`], swapped atomically when configuration changes, and the
//! [`ExternalAuthorizer`] hook for CUSTOM policies.

use std::fmt;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::watch;

use crate::authz::{Evaluation, PolicySet, Request, Target};

/// Publishes new policy sets to every [`PolicyEngine`] made from it.
#[derive(Debug)]
pub struct PolicyPublisher {
    tx: watch::Sender<Arc<PolicySet>>,
}

/// A handle on the current policy set; cheap to clone, one per proxy task.
#[derive(Debug, Clone)]
pub struct PolicyEngine {
    rx: watch::Receiver<Arc<PolicySet>>,
}

/// A publisher and its first engine, starting from `initial`.
pub fn channel(initial: PolicySet) -> (PolicyPublisher, PolicyEngine) {
    let (tx, rx) = watch::channel(Arc::new(initial));
    (PolicyPublisher { tx }, PolicyEngine { rx })
}

impl PolicyPublisher {
    /// Replaces the policy set; decisions made after this call use it.
    pub fn publish(&self, set: PolicySet) {
        self.tx.send_replace(Arc::new(set));
    }

    /// Another engine on this publisher.
    pub fn engine(&self) -> PolicyEngine {
        PolicyEngine {
            rx: self.tx.subscribe(),
        }
    }
}

impl PolicyEngine {
    /// An engine that never changes (tests, static configuration).
    pub fn fixed(set: PolicySet) -> PolicyEngine {
        channel(set).1
    }

    /// The current set.
    pub fn current(&self) -> Arc<PolicySet> {
        self.rx.borrow().clone()
    }

    /// Evaluates against the current set.
    pub fn evaluate(&self, target: &Target<'_>, request: &Request<'_>) -> Evaluation {
        self.rx.borrow().evaluate(target, request)
    }

    /// Waits for the next policy change (connection tracking re-checks open connections then). Returns
    /// `false` once the publisher is gone.
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }

    /// Evaluates, and asks `external` when a CUSTOM policy matched; with no authorizer such a request is
    /// denied.
    pub async fn authorize(
        &self,
        target: &Target<'_>,
        request: &Request<'_>,
        external: Option<&dyn ExternalAuthorizer>,
    ) -> Evaluation {
        let evaluation = self.evaluate(target, request);
        match (&evaluation.custom, external) {
            (Some(check), Some(authorizer)) => {
                let allowed = authorizer.check(&check.provider, request).await.unwrap_or_else(|error| {
                    tracing::warn!(provider = %check.provider, %error, "external authorizer failed; denying");
                    false
                });
                evaluation.with_external(allowed)
            }
            _ => evaluation,
        }
    }
}

/// The decision of a CUSTOM policy's provider (ext_authz in Istio). Object-safe.
pub trait ExternalAuthorizer: Send + Sync + fmt::Debug {
    /// Whether `provider` allows `request`. An error counts as a denial.
    fn check<'a>(
        &'a self,
        provider: &'a str,
        request: &'a Request<'a>,
    ) -> BoxFuture<'a, Result<bool, String>>;
}
