//! The local configuration loader on a real file system: directories, limits, and the polling watcher
//! seeing files added, changed, broken, fixed and removed.

#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mesh_xds::XdsError;
use mesh_xds::local::{
    LocalConfig, LocalOptions, LocalWatcher, MAX_FILE_BYTES, MIN_POLL_INTERVAL, load_path,
};
use tokio::sync::watch;
use tokio::time::timeout;

/// How long a test waits for the watcher to notice a change: generous, since CI machines stall; a
/// watcher that works sees it within a few 50 ms polls.
const WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let unique = format!(
            "mesh-xds-local-{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(unique);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes a file whole, as editors and ConfigMap volumes do (a temporary file renamed over the
    /// target), so that a poll never reads it half-written. The temporary name is hidden: not loaded.
    fn write(&self, name: &str, text: &str) {
        let temporary = self.file(&format!(".{name}.tmp"));
        std::fs::write(&temporary, text).unwrap();
        std::fs::rename(&temporary, self.file(name)).unwrap();
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/local")
        .join(name)
}

fn workload_yaml(uid: &str, ip: &str) -> String {
    format!("workloads:\n- uid: {uid}\n  name: {uid}\n  namespace: default\n  workloadIps: [\"{ip}\"]\n")
}

fn uids(config: &LocalConfig) -> Vec<String> {
    config.workloads.iter().map(|w| w.uid.to_string()).collect()
}

/// Waits (bounded) until the published configuration satisfies `done`.
async fn wait_config(
    rx: &mut watch::Receiver<Arc<LocalConfig>>,
    what: &str,
    done: impl Fn(&LocalConfig) -> bool,
) -> Arc<LocalConfig> {
    let waited = timeout(WAIT, async {
        loop {
            let current = rx.borrow_and_update().clone();
            if done(&current) {
                return current;
            }
            rx.changed().await.expect("the watcher is running");
        }
    })
    .await;
    waited.unwrap_or_else(|_| panic!("timed out waiting for {what}; config is {:?}", uids(&rx.borrow())))
}

/// Waits (bounded) until the watcher's last error satisfies `done`.
async fn wait_error(
    rx: &mut watch::Receiver<Option<XdsError>>,
    what: &str,
    done: impl Fn(Option<&XdsError>) -> bool,
) -> Option<XdsError> {
    let waited = timeout(WAIT, async {
        loop {
            let current = rx.borrow_and_update().clone();
            if done(current.as_ref()) {
                return current;
            }
            rx.changed().await.expect("the watcher is running");
        }
    })
    .await;
    waited.unwrap_or_else(|_| panic!("timed out waiting for {what}; last error is {:?}", rx.borrow()))
}

#[test]
fn directory_loads_yaml_files_in_name_order_only() {
    let dir = TempDir::new("order");
    dir.write("20-b.yaml", &workload_yaml("b", "10.0.0.2"));
    dir.write("10-a.yml", &workload_yaml("a", "10.0.0.1"));
    dir.write("30-c.YAML", &workload_yaml("c", "10.0.0.3"));
    // None of these is read: each would fail the load if it were.
    dir.write(".hidden.yaml", "not: [valid");
    dir.write("notes.txt", "not: [valid");
    std::fs::create_dir(dir.file("nested.yaml")).unwrap();
    std::fs::write(dir.file("nested.yaml").join("inner.yaml"), "not: [valid").unwrap();

    let config = load_path(&dir.0, &LocalOptions::default()).unwrap();
    assert_eq!(uids(&config), ["a", "b", "c"]);
}

#[test]
fn errors_name_the_file_of_a_directory() {
    let dir = TempDir::new("errors");
    dir.write("a.yaml", &workload_yaml("a", "10.0.0.1"));
    dir.write(
        "b.yaml",
        "# second file\nworkloads:\n- uid: b\n  namespace: default\n  workloadIps: [\"10.0.0.999\"]\n",
    );
    let error = load_path(&dir.0, &LocalOptions::default()).unwrap_err();
    let expected = format!(
        "{}:5:17: workloads[0].workloadIps[0]: invalid IP address syntax",
        dir.file("b.yaml").display()
    );
    assert_eq!(error.to_string(), expected);
}

#[test]
fn a_single_file_of_any_name_loads() {
    let dir = TempDir::new("single");
    dir.write("config.conf", &workload_yaml("a", "10.0.0.1"));
    let config = load_path(dir.file("config.conf"), &LocalOptions::default()).unwrap();
    assert_eq!(uids(&config), ["a"]);
}

#[test]
fn missing_path_is_an_io_error() {
    let dir = TempDir::new("missing");
    let error = load_path(dir.file("absent.yaml"), &LocalOptions::default()).unwrap_err();
    assert!(
        matches!(error, XdsError::LocalIo { ref path, .. } if path.ends_with("absent.yaml")),
        "{error}"
    );
}

#[test]
fn oversized_file_is_refused() {
    let dir = TempDir::new("big");
    let file = std::fs::File::create(dir.file("big.yaml")).unwrap();
    // Sparse: no 16 MiB of disk is written.
    file.set_len(MAX_FILE_BYTES + 1).unwrap();
    let error = load_path(&dir.0, &LocalOptions::default()).unwrap_err();
    assert!(
        matches!(error, XdsError::LocalTooLarge { size, limit: MAX_FILE_BYTES, .. } if size == MAX_FILE_BYTES + 1),
        "{error}"
    );
}

#[test]
fn fixtures_load_from_disk() {
    let options = LocalOptions::default();
    let kube = load_path(data("kube-ambient.yaml"), &options).unwrap();
    assert_eq!(kube.workloads.len(), 3);
    let policy = load_path(data("two-workloads-policy.yaml"), &options).unwrap();
    assert_eq!(policy.policies[0].key(), "default/deny-iperf-from-client");
    let localhost = load_path(data("localhost.yaml"), &options).unwrap();
    assert_eq!(localhost.services.len(), 2);
    // The data directory as a whole holds the two-workload example twice: the duplicate names both files.
    let error = load_path(data(""), &options).unwrap_err().to_string();
    assert!(
        error.contains("two-workloads.yaml") && error.contains("two-workloads-policy.yaml"),
        "{error}"
    );
    assert!(
        error.contains("duplicate workload uid \"cluster1//v1/Pod/default/client\""),
        "{error}"
    );
}

#[tokio::test]
async fn watcher_sees_files_added_changed_broken_fixed_and_removed() {
    let dir = TempDir::new("watch");
    dir.write("a.yaml", &workload_yaml("a", "10.0.0.1"));
    let watcher = LocalWatcher::start(&dir.0, LocalOptions::default(), POLL)
        .await
        .unwrap();
    assert_eq!(uids(&watcher.current()), ["a"]);
    assert!(watcher.last_error().is_none());
    let mut config = watcher.subscribe();
    let mut errors = watcher.errors();

    // Added.
    dir.write("b.yaml", &workload_yaml("b", "10.0.0.2"));
    wait_config(&mut config, "b.yaml to be added", |c| uids(c) == ["a", "b"]).await;

    // Changed (same length: only the content hash can tell).
    dir.write("a.yaml", &workload_yaml("a", "10.0.0.3"));
    let changed = wait_config(&mut config, "a.yaml to change", |c| {
        c.workloads.first().map(|w| w.addresses.clone()) == Some(vec!["10.0.0.3".parse().unwrap()])
    })
    .await;

    // Broken: the last good configuration stays, and the error names the file and line.
    dir.write(
        "b.yaml",
        "workloads:\n- uid: b\n  namespace: default\n  workloadIps: [\"10.0.0.2\"\n",
    );
    let b = dir.file("b.yaml").display().to_string();
    let error = wait_error(&mut errors, "the broken edit to be reported", |e| {
        e.is_some_and(|e| e.to_string().starts_with(&format!("{b}:")))
    })
    .await;
    let message = error.unwrap().to_string();
    assert!(message.contains("did not find expected ',' or ']'"), "{message}");
    assert_eq!(
        *watcher.current(),
        *changed,
        "the last good configuration is kept"
    );
    assert!(watcher.last_error().is_some());

    // An invalid set (two workloads on one address) is refused the same way.
    dir.write("b.yaml", &workload_yaml("b", "10.0.0.3"));
    wait_error(&mut errors, "the duplicate address to be reported", |e| {
        e.is_some_and(|e| e.to_string().contains("is claimed by workloads"))
    })
    .await;
    assert_eq!(*watcher.current(), *changed);

    // Fixed: published, and the error is cleared.
    dir.write("b.yaml", &workload_yaml("b", "10.0.0.4"));
    wait_config(&mut config, "the fix to be published", |c| {
        uids(c) == ["a", "b"] && c.workloads[1].addresses == ["10.0.0.4".parse::<std::net::IpAddr>().unwrap()]
    })
    .await;
    wait_error(&mut errors, "the error to clear", |e| e.is_none()).await;

    // Removed.
    std::fs::remove_file(dir.file("b.yaml")).unwrap();
    wait_config(&mut config, "b.yaml to be removed", |c| uids(c) == ["a"]).await;
    assert!(watcher.last_error().is_none());

    // Dropping the watcher stops it: the channel closes.
    drop(watcher);
    let closed = timeout(WAIT, async { while config.changed().await.is_ok() {} }).await;
    assert!(
        closed.is_ok(),
        "the configuration channel did not close after the watcher was dropped"
    );
}

#[tokio::test]
async fn watcher_reports_a_vanished_directory_and_recovers() {
    let parent = TempDir::new("vanish");
    let dir = parent.file("conf");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("a.yaml"), workload_yaml("a", "10.0.0.1")).unwrap();
    let watcher = LocalWatcher::start(&dir, LocalOptions::default(), POLL)
        .await
        .unwrap();
    let mut errors = watcher.errors();
    let mut config = watcher.subscribe();

    std::fs::remove_dir_all(&dir).unwrap();
    let error = wait_error(&mut errors, "the missing directory to be reported", |e| {
        e.is_some()
    })
    .await;
    assert!(matches!(error, Some(XdsError::LocalIo { .. })), "{error:?}");
    assert_eq!(
        uids(&watcher.current()),
        ["a"],
        "the last good configuration is kept"
    );

    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("b.yaml"), workload_yaml("b", "10.0.0.2")).unwrap();
    wait_config(&mut config, "the recreated directory to load", |c| {
        uids(c) == ["b"]
    })
    .await;
    wait_error(&mut errors, "the error to clear", |e| e.is_none()).await;
}

#[tokio::test]
async fn watcher_refuses_to_start_on_invalid_configuration() {
    let dir = TempDir::new("invalid-start");
    dir.write("a.yaml", "apiVersion: v1\nkind: Mystery\n");
    let error = LocalWatcher::start(&dir.0, LocalOptions::default(), POLL)
        .await
        .unwrap_err();
    assert!(matches!(error, XdsError::LocalUnsupportedKind { .. }), "{error}");
}

#[tokio::test]
async fn watcher_stops_on_shutdown_and_bounds_its_interval() {
    let dir = TempDir::new("shutdown");
    dir.write("a.yaml", &workload_yaml("a", "10.0.0.1"));
    let (trigger, drain) = mesh_core::drain::channel();
    let watcher =
        LocalWatcher::start_with_shutdown(&dir.0, LocalOptions::default(), Duration::from_millis(1), drain)
            .await
            .unwrap();
    assert_eq!(watcher.interval(), MIN_POLL_INTERVAL);
    assert!(watcher.is_running());
    let mut config = watcher.subscribe();

    // The drain completes once the watcher's task has let go of its watch.
    timeout(WAIT, trigger.drain())
        .await
        .expect("the watcher stopped on shutdown");
    let closed = timeout(WAIT, async { while config.changed().await.is_ok() {} }).await;
    assert!(closed.is_ok(), "the configuration channel closed");
    assert!(!watcher.is_running());
    // The last configuration is still readable.
    assert_eq!(uids(&watcher.current()), ["a"]);
}
