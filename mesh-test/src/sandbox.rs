//! A private sandbox for tests that build networks: each such test runs in fresh user, network, mount and
//! PID namespaces of its own, so it needs no root and cannot touch the host's network.
//!
//! ## How a test uses it
//! ```no_run
//! #[test]
//! fn two_namespaces_talk() {
//!     mesh_test::netns::isolated(|| {
//!         let a = mesh_test::netns::Netns::create("a").unwrap();
//!         // ... veths, iptables, the proxy binary, as root would ...
//!     });
//! }
//! ```
//!
//! ## How it works
//! Called in the ordinary test process, [`isolated`] does not run the body: it re-executes the current
//! test binary for exactly this test (`<binary> <test> --exact --nocapture --test-threads 1`, the test's
//! name being its thread's, as libtest names it) under util-linux's
//! `unshare --user --map-root-user --net --mount --pid --fork --mount-proc --kill-child`, relays the child's
//! output (through `println!`, so libtest captures it like the test's own and shows it when the test
//! fails), and fails the test unless the child ran the body to its end and exited successfully. A child
//! that matched no test (a renamed test) fails too: the body's completion is signalled by a line carrying a
//! token only this run knows.
//!
//! In the child, an environment variable marks the sandbox (with the host's network namespace, so a
//! stray variable can never make a test run on the host: [`isolated`] refuses when the namespace is the
//! same). Before the body runs, `isolated` mounts a private tmpfs on `/run` (where `ip netns` keeps its
//! namespace files and legacy iptables its lock, both owned by the real root otherwise), gives the test
//! a temporary directory of its own (`TMPDIR`, removed afterwards: PIDs restart at 1 in every sandbox,
//! so names built from them would collide between sandboxes running at once) and brings the sandbox's
//! loopback up. The process is then uid 0 of its own user namespace, holding every capability over the
//! namespaces it creates: `ip netns add` and `ip netns exec` (which remounts `/sys`: the private mount
//! namespace allows it), veth pairs, iptables with either backend (`nat` REDIRECT, `mangle` TPROXY and
//! CONNMARK), sysctls under `/proc/sys/net`, `AF_PACKET` sockets, `SO_MARK` and `IP_TRANSPARENT` all work,
//! and so do the programs the test starts, which inherit the namespaces. When the child exits, the PID
//! namespace takes every process left in it along, and with them every namespace, interface and rule
//! the test made: nothing outlives the test, even a test that crashed.
//!
//! Istio's ztunnel tests enter such namespaces from a constructor run before `main`, in the test process
//! itself. A child per test needs no unsafe code (`unshare(CLONE_NEWUSER)` refuses a process that already
//! has threads, so it must run before libtest starts any) and gives every test namespaces of its own, so
//! tests still run in parallel. It costs a few milliseconds per test.
//!
//! ## When user namespaces are refused
//! Some kernels refuse unprivileged user namespaces (`user.max_user_namespaces=0`, Debian's older
//! `kernel.unprivileged_userns_clone=0`, Ubuntu's `kernel.apparmor_restrict_unprivileged_userns=1`,
//! container seccomp profiles). Run as root there, and the sandbox is made of new network, mount and PID
//! namespaces without a user namespace: still away from the host's network. Neither available, the test
//! fails with a message naming the setting to change. [`MODE_VARIABLE`] forces one kind or the other.
//!
//! ## What it needs
//! `unshare` (util-linux), `ip` (iproute2) and, for tests that capture traffic, `iptables`.
//!
//! ## Inside the sandbox
//! The body runs on the test's thread, as it would outside. Files outside `/run` and the test's `TMPDIR`
//! are the host's (the source tree, `target/`, `/tmp`); in a user namespace they are accessed with the
//! invoking user's rights, and files owned by users that are not mapped (the real root's) show as owned by
//! `nobody`.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Marks a process that runs inside a sandbox: `<kind>:<host network namespace inode>:<token>`.
const MARKER: &str = "MESH_TEST_SANDBOX";

/// The environment variable that chooses the kind of sandbox: `userns` (a user namespace, or fail),
/// `root` (real root without a user namespace, or fail); unset, the first of the two that works.
pub const MODE_VARIABLE: &str = "MESH_TEST_SANDBOX_MODE";

/// A sandboxed test still running after this long is killed and fails. Tests bound their own waits far
/// below it; this only keeps a hung child from hanging the suite.
pub const TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// How long output is still read once the child has exited (a process that escaped the PID namespace
/// could hold the pipe open forever).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// At most this much of a child's output is kept in [`SandboxRun::output`] (all of it is relayed).
const KEPT_OUTPUT: usize = 1 << 20;

/// Lines longer than this are relayed in pieces.
const MAX_LINE: u64 = 64 * 1024;

/// What a sandbox is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// New user, network, mount and PID namespaces: needs no privilege.
    UserNamespace,
    /// New network, mount and PID namespaces made by the real root (where user namespaces are refused).
    Root,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::UserNamespace => "userns",
            Kind::Root => "root",
        }
    }

    fn parse(text: &str) -> Option<Kind> {
        match text {
            "userns" => Some(Kind::UserNamespace),
            "root" => Some(Kind::Root),
            _ => None,
        }
    }

    /// `unshare`'s options for this kind. `--kill-child` takes the sandbox down if `unshare` is killed
    /// (the test's timeout); the PID namespace then takes everything in it along.
    fn unshare_args(self) -> &'static [&'static str] {
        match self {
            Kind::UserNamespace => &[
                "--user",
                "--map-root-user",
                "--net",
                "--mount",
                "--pid",
                "--fork",
                "--mount-proc",
                "--kill-child",
            ],
            Kind::Root => &[
                "--net",
                "--mount",
                "--pid",
                "--fork",
                "--mount-proc",
                "--kill-child",
            ],
        }
    }
}

/// Why a sandbox could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// `unshare` is not installed.
    #[error(
        "network-namespace tests run in a sandbox made by `unshare` from util-linux, which is not on the \
         PATH: install it (apt-get install util-linux)"
    )]
    MissingUnshare,
    /// Neither kind of sandbox is available here; the message says what to enable.
    #[error("{0}")]
    Unavailable(String),
    /// [`MODE_VARIABLE`] holds something else than `userns` or `root`.
    #[error("{MODE_VARIABLE}={0:?}: use `userns`, `root`, or leave it unset")]
    BadMode(String),
    /// [`isolated`] was called outside a test's own thread, so the test to re-execute is unknown.
    #[error(
        "mesh_test::netns::isolated must be called on the test's own thread (libtest names it after the \
         test), not on {0:?}"
    )]
    NotATest(Option<String>),
    /// The sandbox marker is set, but this process is in the host's network namespace.
    #[error(
        "{MARKER} is set but this process shares the host's network namespace: refusing to run a network \
         test outside its sandbox (unset {MARKER})"
    )]
    Escaped,
    /// The sandbox marker is malformed.
    #[error("{MARKER}={0:?} is not a sandbox marker set by mesh-test (unset it)")]
    BadMarker(String),
    /// Preparing the inside of the sandbox failed.
    #[error("setting up the sandbox: {0}")]
    Setup(String),
    /// Running the child failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let what = what.into();
    move |source| SandboxError::Io { what, source }
}

/// How a test run in a sandbox by [`run_isolated`] ended.
#[derive(Debug)]
pub struct SandboxRun {
    /// The kind of sandbox it ran in.
    pub kind: Kind,
    /// The exit status of `unshare`, which is the test process's.
    pub status: ExitStatus,
    /// Whether the body of [`isolated`] ran to its end inside.
    pub completed: bool,
    /// Whether the run was killed at [`TIMEOUT`].
    pub timed_out: bool,
    /// The child's stdout and stderr, interleaved (the first MiB).
    pub output: String,
}

impl SandboxRun {
    /// Whether the test passed: the body completed and the process exited successfully.
    pub fn passed(&self) -> bool {
        self.completed && self.status.success() && !self.timed_out
    }

    /// Why the test did not pass (for its failure message).
    pub fn failure(&self, test: &str) -> String {
        if self.timed_out {
            format!("`{test}` was still running in its sandbox after {TIMEOUT:?} and was killed")
        } else if !self.status.success() {
            format!(
                "`{test}` failed in its sandbox ({}, {}); its output is above",
                self.status,
                self.kind.as_str()
            )
        } else if !self.completed {
            format!(
                "the sandboxed child exited successfully without running `{test}` to its end (no test by \
                 that exact name?):\n{}",
                self.output
            )
        } else {
            format!("`{test}` passed in its sandbox")
        }
    }
}

/// Runs `body` in a sandbox of its own (see the module docs): called by a test outside one, re-executes
/// this test in a new sandbox and fails if it fails there; called inside, prepares the sandbox and runs
/// `body`.
///
/// # Panics
/// As a test fails: when the sandbox cannot be made (with what to install or enable), when the test
/// failed inside it, and when `body` panics.
pub fn isolated<F: FnOnce()>(body: F) {
    match marker() {
        Some(Ok(marker)) => {
            if let Err(error) = enter(&marker) {
                panic!("{error}");
            }
            body();
            // Only reached when the body returned: the parent's proof that the test really ran.
            println!("{}", done_line(&marker.token));
        }
        Some(Err(error)) => panic!("{error}"),
        None => {
            let current = std::thread::current();
            let test = match current.name() {
                Some(name) if name != "main" => name.to_owned(),
                other => panic!("{}", SandboxError::NotATest(other.map(str::to_owned))),
            };
            match run_isolated(&test, &[]) {
                Ok(run) if run.passed() => {}
                Ok(run) => panic!("{}", run.failure(&test)),
                Err(error) => panic!("{error}"),
            }
        }
    }
}

/// The kind of sandbox this process runs in, or `None` outside one.
pub fn current() -> Option<Kind> {
    match marker() {
        Some(Ok(marker)) if host_netns().ok() != Some(marker.host_netns) => Some(marker.kind),
        _ => None,
    }
}

/// Runs test `test` (its full libtest name) of the current test binary in a new sandbox, with `env` added
/// to its environment, relaying its output as it comes; returns how it ended. [`isolated`] is this plus
/// the verdict; a test that must look at the host before and after its sandbox calls it itself (and
/// calls [`isolated`] when [`current`] says it is the child).
pub fn run_isolated(test: &str, env: &[(&str, &str)]) -> Result<SandboxRun, SandboxError> {
    let kind = kind()?;
    let exe = std::env::current_exe().map_err(io_error("locating the test binary"))?;
    let token = token();
    let tmp = TempDir::create()?;
    let (reader, writer) = std::io::pipe().map_err(io_error("creating a pipe"))?;
    let stdout = writer.try_clone().map_err(io_error("creating a pipe"))?;
    let host = host_netns()?;
    let mut command = Command::new("unshare");
    command
        .args(kind.unshare_args())
        .arg("--")
        .arg(&exe)
        .args([test, "--exact", "--nocapture", "--test-threads", "1"])
        .env(MARKER, format!("{}:{host}:{token}", kind.as_str()))
        .env("TMPDIR", &tmp.0)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(writer);
    let child = command.spawn().map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => SandboxError::MissingUnshare,
        _ => io_error(format!("starting {command:?}"))(source),
    })?;
    // The command holds the pipe's write ends: the output ends only once they are all closed.
    drop(command);
    let mut child = KillOnDrop { child, status: None };

    let (lines, received) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(reader);
        let mut line = Vec::new();
        loop {
            line.clear();
            match (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if lines.send(String::from_utf8_lossy(&line).into_owned()).is_err() {
                        break;
                    }
                }
            }
        }
    });

    let done = done_line(&token);
    let (mut output, mut completed, mut timed_out) = (String::new(), false, false);
    let start = Instant::now();
    let mut exited: Option<(ExitStatus, Instant)> = None;
    loop {
        match received.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                // libtest's "test <name> ... " has no newline of its own, nor may the body's last output.
                if let Some(before) = line.trim_end().strip_suffix(done.as_str()) {
                    completed = true;
                    if !before.is_empty() {
                        println!("{before}");
                    }
                    continue;
                }
                if line.ends_with('\n') {
                    print!("{line}");
                } else {
                    println!("{line}");
                }
                if output.len() < KEPT_OUTPUT {
                    output.push_str(&line);
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
        match exited {
            None => {
                if let Some(status) = child.try_wait()? {
                    exited = Some((status, Instant::now()));
                } else if start.elapsed() > TIMEOUT {
                    timed_out = true;
                    child.kill();
                    break;
                }
            }
            Some((_, at)) if at.elapsed() > DRAIN_AFTER_EXIT => break,
            Some(_) => {}
        }
    }
    let status = match exited {
        Some((status, _)) => status,
        None => child.wait_until(start + TIMEOUT + DRAIN_AFTER_EXIT)?,
    };
    Ok(SandboxRun {
        kind,
        status,
        completed,
        timed_out,
        output,
    })
}

/// The line the child prints once the body returned.
fn done_line(token: &str) -> String {
    format!("mesh-test sandbox: body completed {token}")
}

/// A token unique to one run, so that no output of the test itself can pass for its completion.
fn token() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{:x}-{:x}-{nanos:x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The inode of this thread's network namespace.
fn host_netns() -> Result<u64, SandboxError> {
    std::fs::metadata("/proc/thread-self/ns/net")
        .map(|m| m.ino())
        .map_err(io_error("reading /proc/thread-self/ns/net"))
}

/// What the parent told the child.
#[derive(Debug)]
struct Marker {
    kind: Kind,
    host_netns: u64,
    token: String,
}

fn marker() -> Option<Result<Marker, SandboxError>> {
    let value = std::env::var(MARKER).ok()?;
    let mut parts = value.splitn(3, ':');
    let parsed = (|| {
        let kind = Kind::parse(parts.next()?)?;
        let host_netns = parts.next()?.parse().ok()?;
        let token = parts.next().filter(|t| !t.is_empty())?.to_owned();
        Some(Marker {
            kind,
            host_netns,
            token,
        })
    })();
    Some(parsed.ok_or(SandboxError::BadMarker(value)))
}

/// Chooses (once per process) the kind of sandbox, by trying to make one.
fn kind() -> Result<Kind, SandboxError> {
    /// The choice, kept as text where it failed (`None`: no `unshare`), since errors are not `Clone`.
    static KIND: OnceLock<Result<Kind, Option<String>>> = OnceLock::new();
    let chosen = KIND.get_or_init(|| {
        choose().map_err(|error| match error {
            SandboxError::MissingUnshare => None,
            other => Some(other.to_string()),
        })
    });
    match chosen {
        Ok(kind) => Ok(*kind),
        Err(None) => Err(SandboxError::MissingUnshare),
        Err(Some(message)) => Err(SandboxError::Unavailable(message.clone())),
    }
}

fn choose() -> Result<Kind, SandboxError> {
    let root = rustix::process::geteuid().is_root();
    let forced = match std::env::var(MODE_VARIABLE) {
        Ok(mode) if mode.is_empty() => None,
        Ok(mode) => Some(Kind::parse(&mode).ok_or(SandboxError::BadMode(mode))?),
        Err(_) => None,
    };
    if forced != Some(Kind::Root) {
        match probe(Kind::UserNamespace)? {
            Ok(()) => return Ok(Kind::UserNamespace),
            Err(refusal) if forced == Some(Kind::UserNamespace) || !root => {
                return Err(SandboxError::Unavailable(userns_advice(&refusal)));
            }
            Err(_) => {}
        }
    }
    if !root {
        return Err(SandboxError::Unavailable(format!(
            "{MODE_VARIABLE}=root: a sandbox without a user namespace needs real root, and this is uid {}",
            rustix::process::geteuid().as_raw()
        )));
    }
    match probe(Kind::Root)? {
        Ok(()) => Ok(Kind::Root),
        Err(refusal) => Err(SandboxError::Unavailable(format!(
            "network-namespace tests run in new network, mount and PID namespaces, and even root cannot \
             make them here: {refusal} (in a container, run it privileged)"
        ))),
    }
}

/// Makes a sandbox of `kind` that runs `true`: the inner `Err` is what `unshare` said.
fn probe(kind: Kind) -> Result<Result<(), String>, SandboxError> {
    let mut command = Command::new("unshare");
    command.args(kind.unshare_args()).arg("true").stdin(Stdio::null());
    let output = command.output().map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => SandboxError::MissingUnshare,
        _ => io_error(format!("running {command:?}"))(source),
    })?;
    if output.status.success() {
        return Ok(Ok(()));
    }
    let args = kind.unshare_args().join(" ");
    Ok(Err(format!(
        "`unshare {args} true` failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    )))
}

/// What to change where user namespaces are refused, with the current values of the settings.
fn userns_advice(refusal: &str) -> String {
    let read = |path: &str| std::fs::read_to_string(path).ok().map(|v| v.trim().to_owned());
    let mut settings = Vec::new();
    if let Some(value) = read("/proc/sys/user/max_user_namespaces") {
        settings.push(format!(
            "user.max_user_namespaces is {value} (needs more than 0: sysctl -w user.max_user_namespaces=15000)"
        ));
    }
    if let Some(value) = read("/proc/sys/kernel/unprivileged_userns_clone") {
        settings.push(format!(
            "kernel.unprivileged_userns_clone is {value} (needs 1: sysctl -w kernel.unprivileged_userns_clone=1)"
        ));
    }
    if let Some(value) = read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") {
        settings.push(format!(
            "kernel.apparmor_restrict_unprivileged_userns is {value} (needs 0: sysctl -w \
             kernel.apparmor_restrict_unprivileged_userns=0)"
        ));
    }
    format!(
        "network-namespace tests run in a private user namespace, which this machine refuses to uid {}: \
         {refusal}. Enable unprivileged user namespaces ({}; in a container, allow the unshare and mount \
         syscalls), or run the tests as root, as CI does",
        rustix::process::geteuid().as_raw(),
        settings.join("; ")
    )
}

/// Prepares the inside of the sandbox, once per process.
fn enter(marker: &Marker) -> Result<(), SandboxError> {
    static ENTERED: OnceLock<Result<(), String>> = OnceLock::new();
    if host_netns()? == marker.host_netns {
        return Err(SandboxError::Escaped);
    }
    ENTERED
        .get_or_init(|| prepare(marker.kind).map_err(|e| e.to_string()))
        .clone()
        .map_err(SandboxError::Setup)
}

fn prepare(kind: Kind) -> Result<(), String> {
    use rustix::mount::{MountFlags, mount};
    let private_run = |path: &str| {
        mount(
            "mesh-test-sandbox",
            path,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            Some(c"mode=0755"),
        )
        .map_err(|e| format!("mounting a tmpfs on {path}: {e}"))
    };
    private_run("/run")?;
    // /sys/class/net describes the namespace of whoever mounted sysfs: the host's, unless remounted.
    // Nothing depends on it, so a refusal only leaves the host's list readable.
    if let Err(e) = mount(
        "sysfs",
        "/sys",
        "sysfs",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        None,
    ) {
        eprintln!("mesh-test: /sys still describes the host's interfaces (remounting it: {e})");
    }
    // `ip` keeps its namespaces under /var/run/netns: the same directory unless /var/run is not /run.
    if std::fs::canonicalize("/var/run").is_ok_and(|p| p != Path::new("/run")) {
        private_run("/var/run")?;
    }
    std::fs::create_dir("/run/netns").map_err(|e| format!("creating /run/netns: {e}"))?;
    // Legacy iptables takes this lock; the host's belongs to the real root.
    std::fs::File::create("/run/xtables.lock").map_err(|e| format!("creating /run/xtables.lock: {e}"))?;
    match Command::new("ip").args(["link", "set", "lo", "up"]).output() {
        Ok(output) if output.status.success() => {}
        Ok(output) => {
            return Err(format!(
                "`ip link set lo up` failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Err(e) => {
            return Err(format!(
                "cannot run `ip` ({e}): network-namespace tests need iproute2 (apt-get install iproute2)"
            ));
        }
    }
    let namespaces = match kind {
        Kind::UserNamespace => "user, network, mount and PID",
        Kind::Root => "network, mount and PID",
    };
    eprintln!("mesh-test: running in a sandbox of its own: new {namespaces} namespaces");
    Ok(())
}

/// The sandbox's temporary directory, removed when the run ends.
struct TempDir(PathBuf);

impl TempDir {
    fn create() -> Result<TempDir, SandboxError> {
        let path = std::env::temp_dir().join(format!("mesh-test-sandbox-{}", token()));
        std::fs::create_dir(&path).map_err(io_error(format!("creating {}", path.display())))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The child, killed if the run is abandoned (the calling test panicked).
struct KillOnDrop {
    child: Child,
    status: Option<ExitStatus>,
}

impl KillOnDrop {
    fn try_wait(&mut self) -> Result<Option<ExitStatus>, SandboxError> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .map_err(io_error("waiting for the sandbox"))?;
        }
        Ok(self.status)
    }

    fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
        }
    }

    /// Waits for the exit until `deadline`, then kills the child and waits for that.
    fn wait_until(&mut self, deadline: Instant) -> Result<ExitStatus, SandboxError> {
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.kill();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::Netns;
    use std::collections::BTreeSet;

    /// The host's interface names, for the sandboxed half of the test.
    const HOST_LINKS: &str = "MESH_TEST_HOST_LINKS";
    /// The line by which the sandboxed half reports the namespace it left behind.
    const LEFT_BEHIND: &str = "left behind: network namespace inode";

    /// The interfaces of this thread's network namespace (`/proc/thread-self/net/dev` follows the
    /// namespace of the reader, where `/sys/class/net` follows sysfs's mount).
    fn links() -> BTreeSet<String> {
        std::fs::read_to_string("/proc/thread-self/net/dev")
            .unwrap()
            .lines()
            .skip(2)
            .filter_map(|line| line.split_once(':').map(|(name, _)| name.trim().to_owned()))
            .collect()
    }

    /// The processes visible here whose network namespace has inode `ino`.
    fn processes_in(ino: u64) -> Vec<String> {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(Result::ok)
            .filter(|entry| {
                entry
                    .file_name()
                    .to_string_lossy()
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            })
            .filter(|entry| std::fs::metadata(entry.path().join("ns/net")).is_ok_and(|m| m.ino() == ino))
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn a_sandboxed_test_sees_none_of_the_hosts_interfaces_and_leaves_nothing_behind() {
        if current().is_some() {
            isolated(|| {
                let host: BTreeSet<String> = std::env::var(HOST_LINKS)
                    .unwrap()
                    .split(',')
                    .map(str::to_owned)
                    .collect();
                let sandbox = links();
                // What every new namespace has (loopback, and the fallback tunnels of loaded modules).
                let fresh = Netns::create("fresh").unwrap();
                let baseline = fresh.run(links).unwrap();
                assert!(
                    sandbox.is_subset(&baseline),
                    "the sandbox has interfaces a new namespace does not: {sandbox:?} vs {baseline:?}"
                );
                let seen: Vec<_> = host
                    .difference(&baseline)
                    .filter(|l| sandbox.contains(*l))
                    .collect();
                assert!(seen.is_empty(), "the host's {seen:?} are visible in the sandbox");
                let loopback =
                    crate::netns::run(Command::new("ip").args(["-o", "link", "show", "lo"])).unwrap();
                let loopback = String::from_utf8_lossy(&loopback.stdout);
                assert!(
                    loopback.contains(",UP"),
                    "the sandbox's loopback is down: {loopback}"
                );
                // sysfs describes the sandbox's namespace too.
                assert!(!Path::new("/sys/class/net/eth0").exists() || !host.contains("eth0"));

                // What a crashed test would leave: a namespace never deleted, with a process in it.
                let leaked = Netns::create("leak").unwrap();
                leaked
                    .ip(&["link", "add", "leak0", "type", "veth", "peer", "name", "leak1"])
                    .unwrap();
                let sleeper = leaked.command("sleep").arg("600").spawn().unwrap();
                let ino = std::fs::metadata(leaked.path()).unwrap().ino();
                println!("{LEFT_BEHIND} {ino} {}", leaked.name());
                std::mem::forget(sleeper);
                std::mem::forget(leaked);
            });
            return;
        }

        let host = links();
        // The scan below sees processes' namespaces: it sees this one's.
        let own = std::process::id().to_string();
        assert!(processes_in(host_netns().unwrap()).contains(&own));
        let test = std::thread::current().name().unwrap().to_owned();
        let joined = host.iter().cloned().collect::<Vec<_>>().join(",");
        let run = run_isolated(&test, &[(HOST_LINKS, &joined)]).unwrap();
        assert!(run.passed(), "{}", run.failure(&test));

        let (ino, name) = run
            .output
            .lines()
            .find_map(|line| line.strip_prefix(LEFT_BEHIND))
            .and_then(|rest| rest.trim().split_once(' '))
            .unwrap_or_else(|| panic!("the sandbox did not report its namespace:\n{}", run.output));
        let ino: u64 = ino.parse().unwrap();
        assert_ne!(ino, host_netns().unwrap());
        // The PID namespace ended with the test: every process in it is gone (bounded wait, as the
        // kernel reaps them), and the namespace with them.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !processes_in(ino).is_empty() {
            assert!(
                Instant::now() < deadline,
                "processes {:?} outlived the sandbox in its namespace",
                processes_in(ino)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let host_names = std::fs::read_dir("/run/netns")
            .map(|dir| {
                dir.filter_map(Result::ok)
                    .map(|e| e.file_name())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        assert!(
            !host_names.iter().any(|n| n.to_string_lossy() == name),
            "{name} appeared in the host's /run/netns"
        );
        assert!(
            !links().contains("leak0"),
            "the sandbox's interface appeared on the host"
        );
    }

    #[test]
    fn a_failure_inside_the_sandbox_fails_the_test_outside() {
        if current().is_some() {
            isolated(|| panic!("failing on purpose inside the sandbox"));
            return;
        }
        let test = std::thread::current().name().unwrap().to_owned();
        let run = run_isolated(&test, &[]).unwrap();
        assert!(
            !run.passed() && !run.completed && !run.status.success(),
            "{run:?}"
        );
        assert!(run.output.contains("failing on purpose"), "{}", run.output);
        assert!(run.failure(&test).contains("failed in its sandbox"));
    }

    #[test]
    fn a_child_that_ran_no_test_does_not_pass() {
        if current().is_some() {
            return;
        }
        let run = run_isolated("sandbox::tests::no_such_test", &[]).unwrap();
        // libtest exits successfully when its filter matches nothing: the missing completion line is
        // what fails the run.
        assert!(run.status.success(), "{run:?}");
        assert!(!run.completed && !run.passed(), "{run:?}");
        assert!(run.failure("x").contains("without running"));
    }

    #[test]
    fn a_stray_marker_on_the_host_is_refused() {
        if current().is_some() {
            return;
        }
        let marker = Marker {
            kind: Kind::UserNamespace,
            host_netns: host_netns().unwrap(),
            token: "t".into(),
        };
        assert!(matches!(enter(&marker), Err(SandboxError::Escaped)));
    }
}
