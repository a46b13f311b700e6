//! What a run needs before it starts: root, `ip` and `iptables`, the load generators (installed with
//! `apt-get` when missing), our ztunnel binary (built with cargo unless given), the kernel's clock tick,
//! and a description of the machine for the report.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{Args, Error, Result};

/// The machine the figures were measured on, printed and recorded beside them.
#[derive(Debug, Clone)]
pub(crate) struct Machine {
    /// Cores this process may use.
    pub(crate) cores: usize,
    /// `uname -r`.
    pub(crate) kernel: String,
    /// The first `model name` of `/proc/cpuinfo`.
    pub(crate) cpu: String,
    /// `/proc/loadavg`'s first three fields when the run started: other work on the machine skews figures.
    pub(crate) load_average: String,
}

impl Machine {
    /// Reads the machine's description from `/proc`.
    pub(crate) fn read() -> Machine {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find(|line| line.starts_with("model name"))
            .and_then(|line| line.split_once(':'))
            .map(|(_, model)| model.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            // The same string `uname -r` prints.
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpu,
            load_average: load_average(),
        }
    }
}

/// `/proc/loadavg`'s 1, 5 and 15-minute averages.
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The programs and constants a run uses, found or prepared by [`prepare`].
#[derive(Debug, Clone)]
pub(crate) struct Tools {
    /// Our ztunnel binary.
    pub(crate) ztunnel: PathBuf,
    /// The kernel's clock ticks per second, the unit of `/proc/<pid>/stat`'s CPU times.
    pub(crate) clk_tck: u64,
    /// Where [`Tools::clk_tck`] came from: `getconf CLK_TCK`, or the assumed 100.
    pub(crate) clk_tck_source: &'static str,
    /// `wrk -v`'s first line.
    pub(crate) wrk_version: String,
    /// `iperf3 --version`'s first line.
    pub(crate) iperf3_version: String,
    /// Extra environment for both proxies (`--proxy-env`).
    pub(crate) proxy_env: Vec<(String, String)>,
    /// Where callgrind writes its dumps, when the proxies run under it (`--callgrind DIR`).
    pub(crate) callgrind: Option<PathBuf>,
    /// Whether the proxy binary is laid out by `bins/ztunnel/symbol-order.txt` (see `layout`).
    pub(crate) code_layout: String,
}

/// The Debian packages of the load generators, by the command each provides.
const LOAD_GENERATORS: [(&str, &str); 2] = [("wrk", "wrk"), ("iperf3", "iperf3")];

/// Checks the machine and prepares the tools, saying on stdout what it installs or builds.
pub(crate) fn prepare(args: &Args) -> Result<Tools> {
    mesh_test::netns::require_root().map_err(|e| Error::Setup(e.0))?;
    if find_program("iptables").is_none() {
        return Err(Error::Setup(
            "`iptables` is not on the PATH (apt-get install iptables)".into(),
        ));
    }
    install_missing()?;
    if let Some(dir) = &args.callgrind {
        for program in ["valgrind", "callgrind_control"] {
            if find_program(program).is_none() {
                return Err(Error::Setup(format!(
                    "--callgrind needs `{program}` on the PATH (apt-get install valgrind)"
                )));
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::Io(format!("creating {}", dir.display()), e))?;
    }
    let ztunnel = match &args.ztunnel {
        Some(path) if path.is_file() => path.clone(),
        Some(path) => {
            return Err(Error::Setup(format!(
                "--ztunnel {}: no such file",
                path.display()
            )));
        }
        None => build_ztunnel()?,
    };
    let (clk_tck, clk_tck_source) = clock_ticks();
    let code_layout = crate::layout::describe_layout(&ztunnel);
    println!("meshbench: code layout: {code_layout}");
    Ok(Tools {
        code_layout,
        ztunnel,
        clk_tck,
        clk_tck_source,
        wrk_version: first_line(Command::new("wrk").arg("-v")),
        iperf3_version: first_line(Command::new("iperf3").arg("--version")),
        proxy_env: args.proxy_env.clone(),
        callgrind: args.callgrind.clone(),
    })
}

/// `program`'s path if it is an executable file in one of `PATH`'s directories.
fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// Installs the Debian packages of whichever load generators are missing: `apt-get install`, and if
/// that fails (an empty package list, as in fresh containers), `apt-get update` and once more.
fn install_missing() -> Result<()> {
    let missing: Vec<&str> = LOAD_GENERATORS
        .iter()
        .filter(|(program, _)| find_program(program).is_none())
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if find_program("apt-get").is_none() {
        return Err(Error::Setup(format!(
            "{} missing and there is no apt-get to install them; install them and rerun",
            missing.join(" and ")
        )));
    }
    println!(
        "meshbench: installing the load generators: apt-get install -y --no-install-recommends {}",
        missing.join(" ")
    );
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    };
    if !install() {
        println!("meshbench: apt-get install failed; running apt-get update and trying once more");
        let updated = Command::new("apt-get")
            .arg("update")
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !updated || !install() {
            return Err(Error::Setup(format!(
                "could not install {} with apt-get (see its output above)",
                missing.join(" ")
            )));
        }
    }
    match LOAD_GENERATORS
        .iter()
        .find(|(program, _)| find_program(program).is_none())
    {
        Some((program, _)) => Err(Error::Setup(format!(
            "`{program}` is still not on the PATH after installing it"
        ))),
        None => Ok(()),
    }
}

/// Builds the release ztunnel with `cargo build --release -p ztunnel` (quick when it is up to date) and
/// returns the executable cargo reports. Building rather than picking up `target/release/ztunnel` means
/// an edit made since the last build is always what gets measured.
fn build_ztunnel() -> Result<PathBuf> {
    // `cargo run` tells the program which cargo ran it; fall back to the one on the PATH.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    println!(
        "meshbench: building the proxy: cargo build --release -p ztunnel --manifest-path {}",
        manifest.display()
    );
    let output = Command::new(&cargo)
        .args(["build", "--release", "-p", "ztunnel", "--bin", "ztunnel"])
        .arg("--message-format=json-render-diagnostics")
        .arg("--manifest-path")
        .arg(&manifest)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| Error::Setup(format!("cannot run {}: {e}", Path::new(&cargo).display())))?;
    if !output.status.success() {
        return Err(Error::Setup(format!(
            "cargo build --release -p ztunnel failed ({}); see its output above",
            output.status
        )));
    }
    executable_from_cargo(&String::from_utf8_lossy(&output.stdout))
        .ok_or_else(|| Error::Setup("cargo built ztunnel but did not name its executable".into()))
}

/// The `executable` of the `ztunnel` binary's `compiler-artifact` message in cargo's JSON output.
fn executable_from_cargo(messages: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact" && message["target"]["name"] == "ztunnel")
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
}

/// `getconf CLK_TCK`, or 100 (what Linux reports on every common architecture) when it cannot be read.
fn clock_ticks() -> (u64, &'static str) {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .filter(|output| output.status.success())
        .and_then(|output| String::from_utf8_lossy(&output.stdout).trim().parse().ok())
        .filter(|ticks: &u64| *ticks > 0)
        .map_or((100, "assumed 100 (getconf CLK_TCK failed)"), |ticks| {
            (ticks, "getconf CLK_TCK")
        })
}

/// The first line a command prints on stdout or stderr (version banners go to either).
fn first_line(command: &mut Command) -> String {
    command
        .output()
        .ok()
        .map(|output| {
            let text = [output.stdout, output.stderr].concat();
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ztunnel_executable_is_taken_from_cargos_messages() {
        let messages = concat!(
            r#"{"reason":"compiler-artifact","target":{"name":"mesh_core","kind":["lib"]},"executable":null}"#,
            "\n",
            r#"{"reason":"compiler-artifact","target":{"name":"ztunnel","kind":["bin"]},"executable":"/w/target/release/ztunnel","fresh":true}"#,
            "\n",
            r#"{"reason":"build-finished","success":true}"#,
        );
        assert_eq!(
            executable_from_cargo(messages),
            Some(PathBuf::from("/w/target/release/ztunnel"))
        );
        assert_eq!(executable_from_cargo(r#"{"reason":"build-finished"}"#), None);
    }

    #[test]
    fn the_machine_description_comes_from_proc() {
        let machine = Machine::read();
        assert!(machine.cores >= 1);
        assert!(!machine.kernel.is_empty());
        assert_eq!(machine.load_average.split(' ').count(), 3);
    }
}
