//! [`LocalWatcher`]: polls a configuration path and publishes each new valid [`LocalConfig`].
//!
//! Polling rather than inotify: it needs no new dependency, works the same on every platform and on
//! Kubernetes ConfigMap volumes (whose files change by a symlink swap), and a local control plane's
//! configuration changes at human speed.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_core::drain::DrainWatch;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::source::{self, Source};
use super::{LocalConfig, LocalOptions, load_sources};
use crate::XdsError;

/// How often [`LocalWatcher`] polls unless told otherwise: often enough that an edit reaches the proxies
/// well within a second (a policy change must take effect that fast), rarely enough that reading small
/// configuration files costs nothing measurable.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(250);
/// The shortest polling interval [`LocalWatcher`] uses: shorter ones are raised to this, so that a
/// misconfigured interval cannot turn the watcher into a busy loop over the file system.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// What a poll compares: each file's name, length, modification time and a hash of its content. The
/// content hash is what catches an edit within the file system's timestamp granularity that keeps the
/// length; the modification time makes a `touch` count as a change (which republishes nothing unless
/// the configuration differs).
type Fingerprint = Vec<(Arc<str>, u64, Option<SystemTime>, u64)>;

/// Watches a configuration file or directory and publishes each new valid [`LocalConfig`] through a
/// `tokio::sync::watch` channel.
///
/// Every poll reads the files (within the loader's size limits); when they differ from the last poll,
/// they are loaded and validated. A valid configuration that differs from the current one is published.
/// An invalid one is not: the last good configuration stays, the error is logged (`tracing::warn!`,
/// with the file and line) and kept for [`last_error`](Self::last_error) until a later poll loads
/// cleanly.
///
/// The watcher runs as a tokio task. It stops when the `LocalWatcher` is dropped, or when the
/// [`DrainWatch`] given to [`start_with_shutdown`](Self::start_with_shutdown) signals; the
/// configuration channel then closes.
#[derive(Debug)]
pub struct LocalWatcher {
    path: PathBuf,
    interval: Duration,
    config: watch::Receiver<Arc<LocalConfig>>,
    errors: watch::Receiver<Option<XdsError>>,
    task: JoinHandle<()>,
}

impl Drop for LocalWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LocalWatcher {
    /// Loads `path` (see [`load_path`](super::load_path)) and starts polling it every `interval` (at
    /// least [`MIN_POLL_INTERVAL`]). Fails if the first load fails: a control plane should not start
    /// serving a configuration it could not read. Must be called within a tokio runtime.
    pub async fn start(
        path: impl Into<PathBuf>,
        options: LocalOptions,
        interval: Duration,
    ) -> Result<Self, XdsError> {
        Self::spawn(path.into(), options, interval, None).await
    }

    /// Like [`start`](Self::start), and the watcher also stops when `shutdown` signals.
    pub async fn start_with_shutdown(
        path: impl Into<PathBuf>,
        options: LocalOptions,
        interval: Duration,
        shutdown: DrainWatch,
    ) -> Result<Self, XdsError> {
        Self::spawn(path.into(), options, interval, Some(shutdown)).await
    }

    async fn spawn(
        path: PathBuf,
        options: LocalOptions,
        interval: Duration,
        shutdown: Option<DrainWatch>,
    ) -> Result<Self, XdsError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| XdsError::Transport {
            reason: "the local configuration watcher needs a tokio runtime".to_owned(),
        })?;
        let interval = interval.max(MIN_POLL_INTERVAL);
        let (sources, fingerprint) = read(path.clone()).await?;
        let options = Arc::new(options);
        let initial = parse(sources, options.clone()).await?;
        let (config_tx, config) = watch::channel(Arc::new(initial));
        let (errors_tx, errors) = watch::channel(None);
        let poller = Poller {
            path: path.clone(),
            options,
            interval,
            fingerprint: Some(fingerprint),
            config: config_tx,
            errors: errors_tx,
        };
        let task = runtime.spawn(poller.run(shutdown));
        Ok(LocalWatcher {
            path,
            interval,
            config,
            errors,
            task,
        })
    }

    /// A receiver of the current configuration; it sees each new one as it is published.
    pub fn subscribe(&self) -> watch::Receiver<Arc<LocalConfig>> {
        self.config.clone()
    }

    /// The configuration in effect: the last one that loaded cleanly.
    pub fn current(&self) -> Arc<LocalConfig> {
        self.config.borrow().clone()
    }

    /// Why the latest change was refused, if it was (cleared once a later change loads cleanly).
    pub fn last_error(&self) -> Option<XdsError> {
        self.errors.borrow().clone()
    }

    /// A receiver of [`last_error`](Self::last_error), for a status page that shows it as it changes.
    pub fn errors(&self) -> watch::Receiver<Option<XdsError>> {
        self.errors.clone()
    }

    /// The path being watched.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The polling interval in use (after raising it to [`MIN_POLL_INTERVAL`]).
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Whether the polling task is still running (it stops on shutdown).
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }
}

struct Poller {
    path: PathBuf,
    options: Arc<LocalOptions>,
    interval: Duration,
    /// The files as last seen; `None` after a read failed, so that any readable state is loaded.
    fingerprint: Option<Fingerprint>,
    config: watch::Sender<Arc<LocalConfig>>,
    errors: watch::Sender<Option<XdsError>>,
}

impl Poller {
    async fn run(mut self, shutdown: Option<DrainWatch>) {
        let stop = async {
            match &shutdown {
                Some(watch) => watch.signaled().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => {
                    tracing::debug!(path = %self.path.display(), "local configuration watcher stopped");
                    return;
                }
                () = tokio::time::sleep(self.interval) => self.poll().await,
            }
        }
    }

    async fn poll(&mut self) {
        let (sources, fingerprint) = match read(self.path.clone()).await {
            Ok(read) => read,
            Err(error) => {
                self.fingerprint = None;
                self.refuse(error);
                return;
            }
        };
        if self.fingerprint.as_ref() == Some(&fingerprint) {
            return;
        }
        self.fingerprint = Some(fingerprint);
        match parse(sources, self.options.clone()).await {
            Ok(config) => {
                self.config.send_if_modified(|current| {
                    if **current == config {
                        return false;
                    }
                    *current = Arc::new(config);
                    true
                });
                if self.errors.borrow().is_some() {
                    tracing::info!(path = %self.path.display(), "local configuration loads cleanly again");
                    self.errors.send_replace(None);
                }
            }
            Err(error) => self.refuse(error),
        }
    }

    fn refuse(&self, error: XdsError) {
        tracing::warn!(path = %self.path.display(), %error,
            "local configuration change refused; keeping the last good configuration");
        self.errors.send_replace(Some(error));
    }
}

/// Reads the sources and their fingerprint, off the async threads.
async fn read(path: PathBuf) -> Result<(Vec<Source>, Fingerprint), XdsError> {
    blocking(move || {
        let sources = source::read_path(&path)?;
        let fingerprint = sources
            .iter()
            .map(|s| {
                let modified = std::fs::metadata(&*s.name).and_then(|m| m.modified()).ok();
                let mut hasher = DefaultHasher::new();
                s.text.hash(&mut hasher);
                (s.name.clone(), s.text.len() as u64, modified, hasher.finish())
            })
            .collect();
        Ok((sources, fingerprint))
    })
    .await
}

/// Loads and validates, off the async threads (a large configuration takes a while to parse).
async fn parse(sources: Vec<Source>, options: Arc<LocalOptions>) -> Result<LocalConfig, XdsError> {
    blocking(move || load_sources(&sources, &options)).await
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, XdsError> + Send + 'static,
) -> Result<T, XdsError> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| {
        Err(XdsError::LocalIo {
            path: "<local configuration reader>".to_owned(),
            source: Arc::new(std::io::Error::other(e.to_string())),
        })
    })
}
