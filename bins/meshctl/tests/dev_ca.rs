//! `meshctl dev-ca init` as a user runs it: the files it writes, and two processes' worth of CAs loaded
//! from them that trust each other over real mutual TLS, while a CA of their own does not.

#![allow(clippy::unwrap_used, missing_docs)] // test code: a failed unwrap is a failed test

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mesh_core::{CertWatch, DevCa, SpiffeId, TrustDomain};

/// A directory removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "meshctl-dev-ca-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn meshctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .output()
        .unwrap()
}

fn init(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["dev-ca", "init", "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    meshctl(&args)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A CA loaded from `dir`, as one process sharing the root would load it.
fn load(dir: &Path) -> DevCa {
    let cert = std::fs::read_to_string(dir.join("root-cert.pem")).unwrap();
    let key = std::fs::read_to_string(dir.join("ca-key.pem")).unwrap();
    DevCa::from_pem(
        &cert,
        &key,
        TrustDomain::new("cluster.local").unwrap(),
        Duration::from_secs(3600),
    )
    .unwrap()
}

fn id(service_account: &str) -> SpiffeId {
    SpiffeId::istio(
        &TrustDomain::new("cluster.local").unwrap(),
        "default",
        service_account,
    )
    .unwrap()
}

fn cert(ca: &DevCa, service_account: &str) -> CertWatch {
    CertWatch::fixed(ca.issue(&id(service_account), Duration::from_secs(600)).unwrap())
}

#[tokio::test]
async fn two_loads_of_one_initialized_root_trust_each_other_and_no_one_else() {
    let dir = TempDir::new("share");
    let output = init(&dir.0, &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("root-cert.pem"), "{stdout}");
    assert_eq!(mode(&dir.0.join("ca-key.pem")), 0o600);
    assert_eq!(mode(&dir.0.join("root-cert.pem")), 0o644);
    // Nothing else: no temporary file left behind.
    let mut names: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["ca-key.pem", "root-cert.pem"]);

    // Two processes' CAs: certificates from one are accepted by the other, both ways.
    let (first, second) = (load(&dir.0), load(&dir.0));
    assert_eq!(first.root_cert(), second.root_cert());
    let pair = mesh_test::tls_pair(
        cert(&first, "client"),
        vec![id("server")],
        cert(&second, "server"),
    )
    .await
    .unwrap();
    assert_eq!(
        mesh_core::tls::peer_identity(pair.server.get_ref().1).unwrap(),
        id("client")
    );
    assert_eq!(
        mesh_core::tls::peer_identity(pair.client.get_ref().1).unwrap(),
        id("server")
    );
    mesh_test::tls_pair(
        cert(&second, "client"),
        vec![id("server")],
        cert(&first, "server"),
    )
    .await
    .unwrap();

    // A root of its own (what each process would have without the shared files) is refused.
    let stranger = DevCa::new(
        TrustDomain::new("cluster.local").unwrap(),
        Duration::from_secs(3600),
    )
    .unwrap();
    let refused = mesh_test::tls_pair(
        cert(&stranger, "client"),
        vec![id("server")],
        cert(&first, "server"),
    )
    .await;
    assert!(refused.is_err(), "a certificate from another root was accepted");
}

#[test]
fn an_existing_root_is_kept_unless_forced() {
    let dir = TempDir::new("force");
    assert!(init(&dir.0, &[]).status.success());
    let key = std::fs::read(dir.0.join("ca-key.pem")).unwrap();
    let root = std::fs::read(dir.0.join("root-cert.pem")).unwrap();

    let again = init(&dir.0, &[]);
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("--force"), "{stderr}");
    assert_eq!(std::fs::read(dir.0.join("ca-key.pem")).unwrap(), key);
    assert_eq!(std::fs::read(dir.0.join("root-cert.pem")).unwrap(), root);

    let forced = init(&dir.0, &["--force"]);
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
    assert_ne!(std::fs::read(dir.0.join("ca-key.pem")).unwrap(), key);
    assert_ne!(std::fs::read(dir.0.join("root-cert.pem")).unwrap(), root);
    assert_eq!(mode(&dir.0.join("ca-key.pem")), 0o600);
    load(&dir.0);
}

#[test]
fn an_invalid_trust_domain_writes_nothing() {
    let dir = TempDir::new("bad-td");
    let output = init(&dir.0, &["--trust-domain", "Not A Domain"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("trust domain"), "{stderr}");
    assert!(!dir.0.join("ca-key.pem").exists());
}
