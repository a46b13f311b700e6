//! Network namespaces for end-to-end tests: created with `ip netns`, joined by veth pairs, removed on drop.
//!
//! A test that uses them wraps its body in [`isolated`]: the body then runs in a [sandbox](crate::sandbox)
//! of its own (new user, network, mount and PID namespaces, made by `unshare`), where it is root over
//! everything it creates without being root on the host, cannot see or touch the host's interfaces, and
//! leaves nothing behind. It needs util-linux, iproute2 and, to capture traffic, iptables (`test.sh`
//! installs them). Where the sandbox cannot be made, the test fails with a message saying what to install
//! or enable: it never passes by skipping.
//!
//! Outside a sandbox (the `meshbench` load tool), the same types work on the host's own namespaces as real
//! root: [`Netns::create`] refuses otherwise ([`require_root`]).
//!
//! Code runs inside a namespace two ways: [`Netns::run`] runs a closure on a fresh thread that has joined
//! the namespace (sockets created there stay in it, wherever they are used later, so a test binds its
//! servers in the namespace and serves them from its own runtime), and [`Netns::command`] builds an
//! `ip netns exec` command for programs (the proxy binaries, `iptables`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

pub use crate::sandbox::isolated;

/// A network namespace this test created; deleted (with its interfaces) when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

/// Why a namespace operation failed.
#[derive(Debug)]
pub struct NetnsError(pub String);

impl std::fmt::Display for NetnsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NetnsError {}

/// Names are unique per process and call, short enough for interface names derived from them.
static NEXT: AtomicU32 = AtomicU32::new(0);

/// Checks that this process can create namespaces (uid 0, which the [sandbox](crate::sandbox) is, and `ip`
/// on the PATH), saying what is missing.
pub fn require_root() -> Result<(), NetnsError> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("Uid:"))
                .and_then(|line| line.split_whitespace().nth(1).map(str::to_owned))
        })
        .unwrap_or_default();
    if uid != "0" {
        return Err(NetnsError(format!(
            "creating network namespaces needs root (running as uid {uid:?}): a test wraps its body in \
             mesh_test::netns::isolated(..), which gives it a sandbox where it is root; a tool runs as root"
        )));
    }
    match Command::new("ip").arg("-V").output() {
        Ok(output) if output.status.success() => Ok(()),
        _ => Err(NetnsError(
            "network-namespace tests need `ip` from iproute2 (apt-get install iproute2; ./test.sh does it)"
                .into(),
        )),
    }
}

/// Runs a command, failing with its stderr if it does not succeed.
pub fn run(command: &mut Command) -> Result<Output, NetnsError> {
    let output = command
        .output()
        .map_err(|e| NetnsError(format!("cannot run {command:?}: {e}")))?;
    if !output.status.success() {
        return Err(NetnsError(format!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(output)
}

impl Netns {
    /// Creates a namespace named after `role` (e.g. `client`), with its loopback up.
    pub fn create(role: &str) -> Result<Netns, NetnsError> {
        require_root()?;
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("mk{}-{n}-{role}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let netns = Netns { name };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's file (`/var/run/netns/<name>`).
    pub fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// Opens the namespace's file: a handle on the namespace itself, as istio-cni passes one to the node
    /// proxy (see [`crate::cni`]).
    pub fn file(&self) -> Result<File, NetnsError> {
        let path = self.path();
        File::open(&path).map_err(|e| NetnsError(format!("cannot open {}: {e}", path.display())))
    }

    /// A command that runs `program` inside the namespace (`ip netns exec <name> <program>`).
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// Runs `ip <args>` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<Output, NetnsError> {
        run(self.command("ip").args(args))
    }

    /// Runs `iptables <args>` inside the namespace (legacy or nft backend, whichever `iptables` is).
    pub fn iptables(&self, args: &[&str]) -> Result<Output, NetnsError> {
        run(self.command("iptables").args(["-w"]).args(args))
    }

    /// Runs `f` on a new thread that has joined this namespace, and returns its result. Sockets `f` creates
    /// belong to the namespace for their whole life.
    pub fn run<F, R>(&self, f: F) -> Result<R, NetnsError>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let path = format!("/var/run/netns/{}", self.name);
        let file = File::open(&path).map_err(|e| NetnsError(format!("cannot open {path}: {e}")))?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    rustix::thread::move_into_link_name_space(
                        std::os::fd::AsFd::as_fd(&file),
                        Some(rustix::thread::LinkNameSpaceType::Network),
                    )
                    .map_err(|e| NetnsError(format!("setns into {path}: {e}")))?;
                    Ok(f())
                })
                .join()
                .map_err(|_| NetnsError("the closure run in the namespace panicked".into()))?
        })
    }
}

impl Netns {
    /// Runs `f` on a new, detached thread that has joined this namespace (for servers that live as long as
    /// the test); the handle returns `f`'s result, or the error joining the namespace.
    pub fn spawn<F, R>(&self, f: F) -> Result<std::thread::JoinHandle<Result<R, NetnsError>>, NetnsError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let path = format!("/var/run/netns/{}", self.name);
        let file = File::open(&path).map_err(|e| NetnsError(format!("cannot open {path}: {e}")))?;
        Ok(std::thread::spawn(move || {
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&file),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .map_err(|e| NetnsError(format!("setns into {path}: {e}")))?;
            Ok(f())
        }))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace removes its veth ends (and their peers).
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// Joins `a` and `b` with a veth pair, addressing each end (`a_cidr`, `b_cidr`, e.g. `10.0.0.1/24`) and
/// bringing both up. Interface names are `eth-<n>` inside the namespaces, so each side has one per call.
pub fn connect(a: &Netns, a_cidr: &str, b: &Netns, b_cidr: &str) -> Result<(), NetnsError> {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let (a_if, b_if) = (format!("mka{n}"), format!("mkb{n}"));
    // Created inside `a`, with the peer moved straight into `b`: no name ever exists in the host's
    // namespace, so concurrent test processes cannot collide there.
    a.ip(&[
        "link",
        "add",
        &a_if,
        "type",
        "veth",
        "peer",
        "name",
        &b_if,
        "netns",
        b.name(),
    ])?;
    a.ip(&["addr", "add", a_cidr, "dev", &a_if])?;
    b.ip(&["addr", "add", b_cidr, "dev", &b_if])?;
    a.ip(&["link", "set", &a_if, "up"])?;
    b.ip(&["link", "set", &b_if, "up"])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn two_namespaces_joined_by_a_veth_pair_carry_tcp() {
        isolated(|| {
            let a = Netns::create("a").expect("network namespaces are required for this test");
            let b = Netns::create("b").unwrap();
            connect(&a, "10.200.0.1/24", &b, "10.200.0.2/24").unwrap();

            let listener = b.run(|| TcpListener::bind("10.200.0.2:7000")).unwrap().unwrap();
            let server = std::thread::spawn(move || {
                let (mut stream, peer) = listener.accept().unwrap();
                let mut buf = [0u8; 5];
                stream.read_exact(&mut buf).unwrap();
                stream.write_all(&buf).unwrap();
                peer
            });
            let mut client = a.run(|| TcpStream::connect("10.200.0.2:7000")).unwrap().unwrap();
            client.write_all(b"hello").unwrap();
            let mut echoed = [0u8; 5];
            client.read_exact(&mut echoed).unwrap();
            assert_eq!(&echoed, b"hello");
            assert_eq!(server.join().unwrap().ip().to_string(), "10.200.0.1");
        });
    }
}
