//! Graceful shutdown: one [`DrainTrigger`] tells every [`DrainWatch`] to wind down, then waits until they
//! have all finished.
//!
//! Listeners and connections each hold a `DrainWatch`. On drain they stop taking new work (a listener stops
//! accepting, an HTTP/2 connection sends GOAWAY) and drop the watch once their in-flight work is done;
//! [`DrainTrigger::drain`] resolves when the last watch is gone, and the caller bounds that wait with its
//! own deadline.

use tokio::sync::watch;

/// The sending half: starts a drain and waits for it to complete.
#[derive(Debug)]
pub struct DrainTrigger {
    tx: watch::Sender<bool>,
}

/// The receiving half, held by everything that must finish before shutdown. Clone it for each task.
#[derive(Debug, Clone)]
pub struct DrainWatch {
    rx: watch::Receiver<bool>,
}

/// A new trigger and its first watch.
pub fn channel() -> (DrainTrigger, DrainWatch) {
    let (tx, rx) = watch::channel(false);
    (DrainTrigger { tx }, DrainWatch { rx })
}

impl DrainTrigger {
    /// Signals every watch, then waits until all of them are dropped. Bound it with `tokio::time::timeout`
    /// to enforce a termination deadline.
    pub async fn drain(self) {
        self.tx.send_replace(true);
        self.tx.closed().await;
    }

    /// A new watch on this trigger (for listeners created after the first).
    pub fn watch(&self) -> DrainWatch {
        DrainWatch {
            rx: self.tx.subscribe(),
        }
    }
}

impl DrainWatch {
    /// Resolves once a drain has started (at once if it already has). If the trigger was dropped without
    /// draining, this never resolves: dropping a trigger is not a shutdown request.
    pub async fn signaled(&self) {
        let mut rx = self.rx.clone();
        if rx.wait_for(|draining| *draining).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Whether a drain has started.
    pub fn is_draining(&self) -> bool {
        *self.rx.borrow()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_every_watch() {
        let (trigger, watch) = channel();
        let second = trigger.watch();
        assert!(!watch.is_draining());
        let worker = tokio::spawn(async move {
            watch.signaled().await;
            // Finish in-flight work, then drop the watch.
            tokio::time::sleep(Duration::from_secs(3)).await;
            drop(watch);
        });
        let other = tokio::spawn(async move {
            second.signaled().await;
            assert!(second.is_draining());
        });
        let started = tokio::time::Instant::now();
        trigger.drain().await;
        assert!(started.elapsed() >= Duration::from_secs(3));
        worker.await.unwrap();
        other.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_trigger_is_not_a_drain() {
        let (trigger, watch) = channel();
        drop(trigger);
        let waited = tokio::time::timeout(Duration::from_secs(60), watch.signaled()).await;
        assert!(waited.is_err());
    }
}
