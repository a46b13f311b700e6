//! [`FileCertProvider`]: workload certificates that someone else issues (cert-manager, Vault, a mounted
//! Kubernetes Secret), read from PEM files and reloaded when they change.
//!
//! Each identity has three files: the chain (`cert-chain.pem`, leaf first), its private key (`key.pem`:
//! PKCS#8, SEC1 or PKCS#1), and the trust bundle (`root-cert.pem`). The identity is the leaf's SPIFFE ID;
//! nothing outside the certificate is trusted to name it.
//!
//! Polling rather than inotify, as `mesh-xds`'s local configuration watcher does: no new dependency, the
//! same behaviour on every platform and on Secret volumes (whose files change by a symlink swap), and
//! certificates rotate at most every few minutes. A change is taken only when the three files together
//! form a usable certificate; writers that replace the files one at a time therefore publish nothing
//! until the last one lands.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{CertProvider, CertWatch, WorkloadCert, svid_identity};
use crate::error::Error;
use crate::identity::SpiffeId;

/// The largest certificate, key or bundle file read. A chain of a few certificates, or a bundle of dozens
/// of roots, is far smaller; the bound keeps a wrong path (a log file, a device) from being read whole.
pub const MAX_PEM_FILE_BYTES: u64 = 1 << 20;
/// How often [`FileCertProvider`] polls unless told otherwise.
pub const DEFAULT_FILE_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// The shortest polling interval used: shorter ones are raised to this, so that a misconfigured interval
/// cannot turn the poller into a busy loop over the file system.
pub const MIN_FILE_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The chain file's name in a directory laid out as Istio's and cert-manager istio-csr's are.
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
/// The private key file's name in such a directory.
pub const KEY_FILE: &str = "key.pem";
/// The trust bundle file's name in such a directory.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";

/// Where one identity's certificate lives on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The certificate chain, PEM, leaf first.
    pub cert_chain: PathBuf,
    /// The leaf's private key, PEM (PKCS#8, SEC1 `EC PRIVATE KEY` or PKCS#1 `RSA PRIVATE KEY`; not
    /// encrypted).
    pub key: PathBuf,
    /// The root certificates peers are verified against, PEM.
    pub root_cert: PathBuf,
    /// When set, the leaf must carry exactly this SPIFFE ID, or the files are refused.
    pub identity: Option<SpiffeId>,
}

impl CertFiles {
    /// The three files under explicit paths.
    pub fn new(
        cert_chain: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
        root_cert: impl Into<PathBuf>,
    ) -> Self {
        CertFiles {
            cert_chain: cert_chain.into(),
            key: key.into(),
            root_cert: root_cert.into(),
            identity: None,
        }
    }

    /// `cert-chain.pem`, `key.pem` and `root-cert.pem` in `dir`.
    pub fn in_dir(dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref();
        Self::new(
            dir.join(CERT_CHAIN_FILE),
            dir.join(KEY_FILE),
            dir.join(ROOT_CERT_FILE),
        )
    }

    /// Requires the leaf to carry `identity`.
    pub fn expecting(mut self, identity: SpiffeId) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Reads and checks the files once (blocking): the certificate they hold, or why it is not usable.
    pub fn load(&self) -> Result<WorkloadCert, FileCertError> {
        let contents = Contents::read(self)?;
        contents.parse(self, self.identity.as_ref())
    }
}

/// Why certificate files were refused. Messages name files and identities, never key material.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum FileCertError {
    /// A file could not be read (missing, not a regular file, no permission).
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: Arc<std::io::Error>,
    },
    /// A file is larger than [`MAX_PEM_FILE_BYTES`].
    #[error("{} holds at least {size} bytes, more than the limit of {limit}", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size as far as it was read.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A file is not PEM, or holds no block of the kind expected there.
    #[error("{}: {reason}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong, without quoting the file.
        reason: &'static str,
    },
    /// The certificate is not usable: not an X.509-SVID, a key that does not fit it, roots that do not
    /// parse, or a chain that does not verify against the roots.
    #[error("{}: {source}", path.display())]
    Rejected {
        /// The chain file.
        path: PathBuf,
        /// Why, as `mesh-core` says it (boxed: it is much larger than the other variants).
        source: Box<Error>,
    },
    /// The leaf is for another identity than the one expected.
    #[error("{} is for {found}, not {expected}", path.display())]
    IdentityMismatch {
        /// The chain file.
        path: PathBuf,
        /// The identity asked for.
        expected: SpiffeId,
        /// The identity the leaf carries.
        found: SpiffeId,
    },
    /// The leaf has expired.
    #[error("{}: the certificate for {identity} has expired", path.display())]
    Expired {
        /// The chain file.
        path: PathBuf,
        /// Its identity.
        identity: SpiffeId,
    },
    /// Two sets of files hold the same identity, so which one to serve would be a guess.
    #[error("{identity} is in both {} and {}", first.display(), second.display())]
    DuplicateIdentity {
        /// The identity.
        identity: SpiffeId,
        /// The first chain file.
        first: PathBuf,
        /// The second chain file.
        second: PathBuf,
    },
    /// [`FileCertProvider::start`] was called outside a tokio runtime.
    #[error("the certificate file poller needs a tokio runtime")]
    NoRuntime,
}

impl From<FileCertError> for Error {
    fn from(error: FileCertError) -> Self {
        match error {
            FileCertError::Rejected { source, .. } => *source,
            other => Error::malformed("certificate files", other),
        }
    }
}

/// A [`CertProvider`] over certificate files that another system issues and rotates.
///
/// [`start`](Self::start) loads each [`CertFiles`] once (failing if any is unusable: a proxy should not
/// start without its certificates), then polls them every interval. When the files change and together
/// form a usable certificate for the same identity, the new certificate is published to every
/// [`CertWatch`] handed out, so new TLS handshakes use it. When they change into something unusable
/// (a half-written file, a key that does not fit, another identity, an expired leaf), the last good
/// certificate stays, the refusal is logged (`tracing::warn!`, naming the files) and kept for
/// [`last_error`](Self::last_error) until the files are usable again.
///
/// Only the identities found at start are served: [`CertProvider::certificate`] refuses any other. The
/// pollers stop when the provider is dropped; the watches then keep their last certificate.
pub struct FileCertProvider {
    entries: HashMap<SpiffeId, Entry>,
    interval: Duration,
}

struct Entry {
    files: CertFiles,
    watch: CertWatch,
    errors: watch::Receiver<Option<FileCertError>>,
    _poller: AbortOnDrop,
}

/// Stops the poller with its entry.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl FileCertProvider {
    /// Loads every set of files and starts polling them every `poll_interval` (at least
    /// [`MIN_FILE_POLL_INTERVAL`]). Fails on the first unusable set, or if two sets hold the same identity.
    pub async fn start(
        files: impl IntoIterator<Item = CertFiles>,
        poll_interval: Duration,
    ) -> Result<Self, FileCertError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| FileCertError::NoRuntime)?;
        let interval = poll_interval.max(MIN_FILE_POLL_INTERVAL);
        let mut entries: HashMap<SpiffeId, Entry> = HashMap::new();
        for files in files {
            let (cert, stamps) = {
                let files = files.clone();
                blocking(move || {
                    let contents = Contents::read(&files)?;
                    let cert = contents.parse(&files, files.identity.as_ref())?;
                    Ok((cert, contents.stamps))
                })
                .await?
            };
            let identity = cert.identity().clone();
            if let Some(existing) = entries.get(&identity) {
                return Err(FileCertError::DuplicateIdentity {
                    identity,
                    first: existing.files.cert_chain.clone(),
                    second: files.cert_chain,
                });
            }
            tracing::info!(%identity, chain = %files.cert_chain.display(),
                "loaded a workload certificate from files");
            let (cert_tx, cert_rx) = watch::channel(Arc::new(cert));
            let (errors_tx, errors) = watch::channel(None);
            let poller = Poller {
                files: files.clone(),
                identity: identity.clone(),
                interval,
                seen: Some(stamps),
                loaded: hashes(&stamps),
                cert: cert_tx,
                errors: errors_tx,
            };
            let task = runtime.spawn(poller.run());
            entries.insert(
                identity,
                Entry {
                    files,
                    watch: CertWatch::from_receiver(cert_rx),
                    errors,
                    _poller: AbortOnDrop(task),
                },
            );
        }
        Ok(FileCertProvider { entries, interval })
    }

    /// The identities served, sorted.
    pub fn identities(&self) -> Vec<SpiffeId> {
        let mut ids: Vec<_> = self.entries.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// The files an identity is read from.
    pub fn files(&self, identity: &SpiffeId) -> Option<&CertFiles> {
        self.entries.get(identity).map(|entry| &entry.files)
    }

    /// Why the latest change to an identity's files was refused, if it was (cleared once they are usable
    /// again).
    pub fn last_error(&self, identity: &SpiffeId) -> Option<FileCertError> {
        self.entries
            .get(identity)
            .and_then(|entry| entry.errors.borrow().clone())
    }

    /// The polling interval in use (after raising it to [`MIN_FILE_POLL_INTERVAL`]).
    pub fn poll_interval(&self) -> Duration {
        self.interval
    }

    /// The watch for `identity`, if its files are served.
    pub fn watch(&self, identity: &SpiffeId) -> Option<CertWatch> {
        self.entries.get(identity).map(|entry| entry.watch.clone())
    }
}

impl CertProvider for FileCertProvider {
    fn certificate<'a>(&'a self, identity: &'a SpiffeId) -> BoxFuture<'a, Result<CertWatch, Error>> {
        let found = self.watch(identity).ok_or_else(|| Error::Signing {
            identity: identity.clone(),
            reason: "no certificate files hold this identity".to_owned(),
        });
        Box::pin(std::future::ready(found))
    }
}

impl fmt::Debug for FileCertProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileCertProvider")
            .field("identities", &self.identities())
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

/// What a poll compares for one file: its length, modification time and a hash of its content. The hash
/// catches a same-length rewrite within the file system's timestamp granularity; the time makes a `touch`
/// count as a change (which publishes nothing unless the content differs from the loaded one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    hash: u64,
}

/// The stamps of the chain, key and bundle files, in that order.
type Stamps = [Stamp; 3];

fn hashes(stamps: &Stamps) -> [u64; 3] {
    stamps.map(|stamp| stamp.hash)
}

/// The three files' bytes, read within [`MAX_PEM_FILE_BYTES`] each.
struct Contents {
    chain: Vec<u8>,
    key: Vec<u8>,
    roots: Vec<u8>,
    stamps: Stamps,
}

impl Contents {
    fn read(files: &CertFiles) -> Result<Contents, FileCertError> {
        let (chain, chain_stamp) = read_bounded(&files.cert_chain)?;
        let (key, key_stamp) = read_bounded(&files.key)?;
        let (roots, roots_stamp) = read_bounded(&files.root_cert)?;
        Ok(Contents {
            chain,
            key,
            roots,
            stamps: [chain_stamp, key_stamp, roots_stamp],
        })
    }

    /// The certificate these bytes make, checked as [`FileCertProvider`] documents.
    fn parse(&self, files: &CertFiles, expected: Option<&SpiffeId>) -> Result<WorkloadCert, FileCertError> {
        let chain = certificates(&self.chain, &files.cert_chain)?;
        let roots = certificates(&self.roots, &files.root_cert)?;
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| FileCertError::Pem {
            path: files.key.clone(),
            reason: pem_error(&e),
        })?;
        let rejected = |source: Error| FileCertError::Rejected {
            path: files.cert_chain.clone(),
            source: Box::new(source),
        };
        let identity = svid_identity(&chain[0]).map_err(rejected)?;
        if let Some(expected) = expected
            && *expected != identity
        {
            return Err(FileCertError::IdentityMismatch {
                path: files.cert_chain.clone(),
                expected: expected.clone(),
                found: identity,
            });
        }
        let cert = WorkloadCert::new(&identity, chain, key, roots).map_err(rejected)?;
        let now = SystemTime::now();
        if cert.not_after() <= now {
            return Err(FileCertError::Expired {
                path: files.cert_chain.clone(),
                identity,
            });
        }
        verify_chain(&cert, now).map_err(rejected)?;
        Ok(cert)
    }
}

/// Every certificate in a PEM file; at least one.
fn certificates(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, FileCertError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| FileCertError::Pem {
            path: path.to_owned(),
            reason: pem_error(&e),
        })?;
    if certs.is_empty() {
        return Err(FileCertError::Pem {
            path: path.to_owned(),
            reason: "no CERTIFICATE block",
        });
    }
    Ok(certs)
}

/// Path validation of the leaf through the file's intermediates to one of its roots, for both ends of
/// mutual TLS, as peers will check it. A chain and a bundle from two different issuers (one file
/// rewritten before the other) fail here. A leaf not yet valid is checked as of its start: a peer whose
/// clock runs behind the issuer's would refuse it for a moment, but refusing it here would keep it out
/// until the files change again.
fn verify_chain(cert: &WorkloadCert, now: SystemTime) -> Result<(), Error> {
    let at = now.max(cert.not_before());
    let at = UnixTime::since_unix_epoch(at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default());
    let (leaf, intermediates) = cert.chain().split_first().ok_or(Error::NotSvid {
        reason: crate::error::SvidErrorKind::EmptyChain,
    })?;
    let leaf = webpki::EndEntityCert::try_from(leaf).map_err(Error::ChainInvalid)?;
    let algorithms = crate::tls::crypto_provider()
        .signature_verification_algorithms
        .all;
    for usage in [webpki::KeyUsage::server_auth(), webpki::KeyUsage::client_auth()] {
        leaf.verify_for_usage(
            algorithms,
            cert.trust_anchors(),
            intermediates,
            at,
            usage,
            None,
            None,
        )
        .map_err(Error::ChainInvalid)?;
    }
    Ok(())
}

/// Reads a regular file, at most [`MAX_PEM_FILE_BYTES`], with its stamp.
fn read_bounded(path: &Path) -> Result<(Vec<u8>, Stamp), FileCertError> {
    let io = |source: std::io::Error| FileCertError::Io {
        path: path.to_owned(),
        source: Arc::new(source),
    };
    // Checked before opening: opening a FIFO would block a thread until someone writes to it.
    let metadata = std::fs::metadata(path).map_err(io)?;
    if !metadata.is_file() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    let file = File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    // One byte past the limit, so that a file that grew after the size check is still caught.
    file.take(MAX_PEM_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    let len = bytes.len() as u64;
    if len > MAX_PEM_FILE_BYTES {
        return Err(FileCertError::TooLarge {
            path: path.to_owned(),
            size: len.max(metadata.len()),
            limit: MAX_PEM_FILE_BYTES,
        });
    }
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    let stamp = Stamp {
        len,
        modified: metadata.modified().ok(),
        hash: hasher.finish(),
    };
    Ok((bytes, stamp))
}

/// A PEM parse failure in words, without the offending line (which may be part of a private key).
pub(crate) fn pem_error(error: &rustls_pki_types::pem::Error) -> &'static str {
    use rustls_pki_types::pem::Error as Pem;
    match error {
        Pem::MissingSectionEnd { .. } => "a PEM block has no END line",
        Pem::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed",
        Pem::Base64Decode(_) => "a PEM block is not valid base64",
        Pem::NoItemsFound => "no PEM block of the expected kind (encrypted keys are not supported)",
        Pem::SectionTooLarge => "a PEM block is too large",
        _ => "not valid PEM",
    }
}

/// Polls one identity's files and publishes each new usable certificate.
struct Poller {
    files: CertFiles,
    identity: SpiffeId,
    interval: Duration,
    /// The files as last seen; `None` after a read failed, so that any readable state is considered.
    seen: Option<Stamps>,
    /// The content hashes of the certificate being served.
    loaded: [u64; 3],
    cert: watch::Sender<Arc<WorkloadCert>>,
    errors: watch::Sender<Option<FileCertError>>,
}

impl Poller {
    async fn run(mut self) {
        loop {
            tokio::time::sleep(self.interval).await;
            self.poll().await;
        }
    }

    async fn poll(&mut self) {
        let files = self.files.clone();
        let contents = match blocking(move || Contents::read(&files)).await {
            Ok(contents) => contents,
            Err(error) => {
                self.seen = None;
                self.refuse(error);
                return;
            }
        };
        if self.seen == Some(contents.stamps) {
            return;
        }
        self.seen = Some(contents.stamps);
        if hashes(&contents.stamps) == self.loaded {
            // Touched, or back to what is served after a refused change.
            self.clear_error();
            return;
        }
        let files = self.files.clone();
        let identity = self.identity.clone();
        let stamps = contents.stamps;
        // The identity is pinned to the one loaded at start: the watches handed out promise it.
        match blocking(move || contents.parse(&files, Some(&identity))).await {
            Ok(cert) => {
                tracing::info!(identity = %self.identity, chain = %self.files.cert_chain.display(),
                    not_after = ?cert.not_after(), "workload certificate reloaded from files");
                self.loaded = hashes(&stamps);
                // Cleared first, so that whoever sees the new certificate also sees no error.
                self.clear_error();
                self.cert.send_replace(Arc::new(cert));
            }
            Err(error) => self.refuse(error),
        }
    }

    fn refuse(&self, error: FileCertError) {
        tracing::warn!(identity = %self.identity, chain = %self.files.cert_chain.display(),
            key = %self.files.key.display(), roots = %self.files.root_cert.display(), %error,
            "certificate files changed but are not usable; keeping the last good certificate");
        self.errors.send_replace(Some(error));
    }

    fn clear_error(&self) {
        if self.errors.borrow().is_some() {
            tracing::info!(identity = %self.identity, chain = %self.files.cert_chain.display(),
                "certificate files are usable again");
            self.errors.send_replace(None);
        }
    }
}

/// Runs file work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, FileCertError> + Send + 'static,
) -> Result<T, FileCertError> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| {
        Err(FileCertError::Io {
            path: PathBuf::from("<certificate file reader>"),
            source: Arc::new(std::io::Error::other(e.to_string())),
        })
    })
}

#[cfg(test)]
mod tests;
