//! `meshctl dev-ca`: a development root shared by several processes on one machine.
//!
//! Istio's ztunnel has `FAKE_CA`, an in-process CA whose root and key are compiled in, so that every
//! instance trusts every other. We keep no private key in the repository: `meshctl dev-ca init` generates a
//! root once and writes it to a directory, and every process that should share it loads it with
//! `mesh_core::DevCa::from_pem`.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_core::{DevCa, TrustDomain};

use crate::demo::DemoResult;

/// The root certificate's file name: the name Istio gives its trust bundle.
pub(crate) const ROOT_CERT_FILE: &str = "root-cert.pem";
/// The root's private key's file name (Istio's plugged-in CA secret calls it the same).
pub(crate) const CA_KEY_FILE: &str = "ca-key.pem";

/// Options of `meshctl dev-ca`.
#[derive(Debug, clap::Args)]
pub(crate) struct DevCaArgs {
    #[command(subcommand)]
    command: DevCaCommand,
}

#[derive(Debug, clap::Subcommand)]
enum DevCaCommand {
    /// Generate a development root and write root-cert.pem and ca-key.pem (readable by its owner only).
    Init(InitArgs),
}

/// Options of `meshctl dev-ca init`.
#[derive(Debug, clap::Args)]
struct InitArgs {
    /// Directory to write root-cert.pem and ca-key.pem to (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Trust domain written into the root's subject.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Replace an existing root. Certificates issued under the old one stop being trusted.
    #[arg(long)]
    force: bool,
}

pub(crate) fn run(args: DevCaArgs) -> DemoResult<()> {
    match args.command {
        DevCaCommand::Init(args) => init(&args),
    }
}

fn init(args: &InitArgs) -> DemoResult<()> {
    let trust_domain = TrustDomain::new(&args.trust_domain)?;
    // The maximum leaf lifetime is the loader's choice, not a property of the files.
    let ca = DevCa::new(trust_domain.clone(), Duration::from_secs(24 * 3600))?;
    std::fs::create_dir_all(&args.out).map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    let root_path = args.out.join(ROOT_CERT_FILE);
    let key_path = args.out.join(CA_KEY_FILE);
    if !args.force {
        for path in [&root_path, &key_path] {
            if path.exists() {
                return Err(format!(
                    "{} exists; pass --force to replace the root (certificates issued under it stop being trusted)",
                    path.display()
                )
                .into());
            }
        }
    }
    // The key first: a root certificate without its key would look like a usable CA directory.
    install(&key_path, ca.root_key_pem().as_bytes(), 0o600, args.force)?;
    install(&root_path, ca.root_pem().as_bytes(), 0o644, args.force)?;
    // Read back what a proxy will read, so a broken write is reported here and not at its start.
    let cert_pem = std::fs::read_to_string(&root_path)?;
    let key_pem = std::fs::read_to_string(&key_path)?;
    DevCa::from_pem(&cert_pem, &key_pem, trust_domain, Duration::from_secs(3600))?;
    println!("root    {}", root_path.display());
    println!(
        "key     {} (mode 0600: anyone who reads it can issue any identity)",
        key_path.display()
    );
    println!(
        "trust   {} (load both files with DevCa::from_pem in each process that should share this root)",
        args.trust_domain
    );
    Ok(())
}

/// Writes `bytes` to `path` with `mode`, through a temporary file in the same directory so that a reader
/// never sees half a file: renamed over an existing file with `replace`, hard-linked otherwise (which
/// fails instead of replacing a file that appeared meanwhile).
fn install(path: &Path, bytes: &[u8], mode: u32, replace: bool) -> DemoResult<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| format!("{} has no file name", path.display()))?
        .to_string_lossy();
    let temporary = path.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = write_new(&temporary, bytes, mode).and_then(|()| {
        if replace {
            std::fs::rename(&temporary, path)
        } else {
            std::fs::hard_link(&temporary, path)
        }
    });
    // Gone after a rename; after a link (or a failure) the temporary name must not stay behind.
    let _ = std::fs::remove_file(&temporary);
    result.map_err(|e| format!("cannot write {}: {e}", path.display()).into())
}

/// Creates `path` (it must not exist) with `mode` from the start, so the key is never readable by others,
/// whatever the umask.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    // The umask can only remove bits; set them exactly (0644 for the root under a strict umask too).
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    file.write_all(bytes)?;
    file.sync_all()
}
