//! # meshbench: our ztunnel end to end, against the same path without it and with the cheapest proxies
//!
//! `cargo run -p meshkit-benches --release --bin meshbench -- [--quick] [--json FILE] [--plot FILE.svg]
//! [--ztunnel PATH]`
//! (as root). One command measures what issue 7 asks of the data plane, as ratios against a baseline
//! measured in the same run, and against a floor measured in the same run too: a plain relay pair
//! (`relay`) that does only what any pair of user-space proxies must (accept, connect, copy both ways),
//! so that `mesh / relay` isolates what our proxies' own code costs on this machine:
//!
//! 1. **Setup** (`setup`): checks root, `ip` and `iptables`; installs `wrk` and `iperf3` with
//!    `apt-get install` when they are missing (and says so); builds our proxy with
//!    `cargo build --release -p ztunnel` as a subprocess (a no-op when it is up to date, so a stale binary is
//!    never measured) unless `--ztunnel PATH` names one.
//! 2. **Topology** (`topology`): namespaces "client" (10.10.0.1) and "server" (10.10.0.2) joined by a veth;
//!    our ztunnel in each (dedicated mode: one workload per proxy); the local control plane
//!    (`mesh_xds::server::Server`, static tokens) on a thread joined to the server namespace; an HTTP/1.1
//!    keep-alive server (`http`, `GET /` answers 200 with 1 KiB), an echo server (`fixedrate`, each
//!    1 KiB request answered with itself) and `iperf3 -s` in the server namespace; the plain relay pair,
//!    meshbench's own binary run again with a hidden subcommand (`--relay-client 0.0.0.0:15101
//!    10.10.0.2:15108` in the client namespace, `--relay-server 10.10.0.2:15108` in the server
//!    namespace: a 6-byte header with the original destination, then `copy_bidirectional`, plaintext, two
//!    tokio workers, `TCP_NODELAY`). In the client namespace one iptables rule REDIRECTs the application's
//!    traffic: to 15001 for the mesh, to 15101 for the relay path, and no rule for the baseline, so the
//!    same client reaches the same server directly over the veth. Each measurement checks the server
//!    proxy's connection counter and the server node's SYN counter for 15108 to prove which path it took.
//! 3. **Loads** (`load`), each bounded in time (10 s, 3 s with `--quick`) and run direct, then through the
//!    relays, then through the mesh: `wrk --latency` keep-alive with 1 and 64 connections, `wrk` with
//!    `Connection: close` and 16
//!    connections, `iperf3 -J` with one stream, and our fixed-rate generator (`fixedrate`: 1,000
//!    requests/s of 1 KiB over 4 connections, latency from each request's due time, so without
//!    coordinated omission, in an HdrHistogram; after a 1 s warm-up). Before them: the proxies' idle memory, and the memory
//!    each idle tunnelled connection costs (500 connections held open through the mesh).
//! 4. **Report** (`report`): requests/s or Gbit/s, p50/p99, the ratios relay / direct, mesh / direct
//!    and mesh / relay, CPU of both proxies and of both relays per 1,000 requests or per GB (from
//!    `/proc/<pid>/stat`, see `procfs`), each proxy's RSS idle, under load and at peak (the relays' too),
//!    the fixed-rate load's p50/p90/p99/p99.9/max on each path, the targets (ratios to direct)
//!    beside our figures with one line per load against the floor, and the machine; as a table, as JSON
//!    with `--json FILE`, and with `--plot FILE.svg` as a chart of the fixed-rate load's latency by
//!    percentile, direct, relay and mesh (`plot`).
//! 5. **Cleanup**: every namespace, process, rule and file belongs to a guard that removes it when dropped,
//!    on success, on error, and on Ctrl-C or SIGTERM (the signal ends the run at its next step and the
//!    guards run).
//!
//! `wrk` is a closed-loop generator: its latencies are the ones a saturated client sees. The fixed-rate
//! load's are those of a steady, moderate request rate, which is what most services see.
//!
//! `--only iperf3,wrk1,...` runs a subset of the loads, for quick comparisons of one figure.
//! `--callgrind DIR` runs both proxies under callgrind and `meshbench symbol-order DIR` lists the functions
//! they ran, which is how `bins/ztunnel/symbol-order.txt` (the release binary's code layout) is made
//! (`layout`); every report says how much of that list the measured binary still has.
//!
//! Results and how to read them: `docs/performance.md`, section "End to end (meshbench)".
#![forbid(unsafe_code)]

mod fixedrate;
mod http;
mod layout;
mod load;
mod plot;
mod procfs;
mod relay;
mod report;
mod setup;
mod topology;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// What went wrong, by the step that failed; each carries a message for the person running the tool.
#[derive(Debug)]
pub(crate) enum Error {
    /// The machine lacks something the run needs (root, a tool, the proxy binary).
    Setup(String),
    /// Namespaces, proxies, control plane or servers could not be brought up.
    Topology(String),
    /// A load generator failed, timed out, or printed something we cannot read.
    Load(String),
    /// Reading or writing a file.
    Io(String, std::io::Error),
    /// Ctrl-C or SIGTERM: the run stopped early.
    Interrupted,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Setup(why) => write!(f, "setup: {why}"),
            Error::Topology(why) => write!(f, "topology: {why}"),
            Error::Load(why) => write!(f, "load: {why}"),
            Error::Io(what, error) => write!(f, "{what}: {error}"),
            Error::Interrupted => f.write_str("interrupted; namespaces and processes were cleaned up"),
        }
    }
}

impl std::error::Error for Error {}

impl From<mesh_test::netns::NetnsError> for Error {
    fn from(error: mesh_test::netns::NetnsError) -> Self {
        Error::Topology(error.0)
    }
}

pub(crate) type Result<T> = std::result::Result<T, Error>;

/// The command line.
#[derive(Debug)]
pub(crate) struct Args {
    /// Each load runs this long (10 s; 3 s with `--quick`).
    pub(crate) duration: Duration,
    /// Whether `--quick` was given (recorded in the report).
    pub(crate) quick: bool,
    /// Where to write the JSON report.
    pub(crate) json: Option<PathBuf>,
    /// Where to write the fixed-rate load's latency chart (SVG).
    pub(crate) plot: Option<PathBuf>,
    /// A ztunnel binary to use instead of building one.
    pub(crate) ztunnel: Option<PathBuf>,
    /// Extra environment for both proxies (`--proxy-env NAME=VALUE`), for experiments such as
    /// `ZTUNNEL_WORKER_THREADS=1`.
    pub(crate) proxy_env: Vec<(String, String)>,
    /// The loads to run, by key (`--only iperf3,wrk1`); all of them when empty.
    pub(crate) only: Vec<&'static str>,
    /// Run both proxies under callgrind, writing a dump per phase to this directory (see `layout`).
    pub(crate) callgrind: Option<PathBuf>,
}

const USAGE: &str = "\
usage: meshbench [--quick] [--only LOAD,...] [--json FILE] [--plot FILE.svg] [--ztunnel PATH]
                 [--proxy-env NAME=VALUE]... [--callgrind DIR]
       meshbench symbol-order DIR

Measures our ztunnel end to end in two network namespaces against the same path
without it (direct) and through a plain relay pair (relay: plaintext, no HTTP/2,
the floor of any two user-space proxies), each load direct, relay, then mesh
(see docs/performance.md). Needs root; installs wrk and iperf3 with apt-get when
they are missing; builds the proxy with
`cargo build --release -p ztunnel` unless --ztunnel names a binary.

  --quick         3-second loads instead of 10
  --only LOAD,... run only these loads (iperf3, wrk1, wrk64, close, fixed),
                  for quick comparisons of one figure; the idle memory
                  measurements always run
  --json FILE     also write the results as JSON to FILE
  --plot FILE.svg also write the fixed-rate load's latency by percentile,
                  direct, relay and mesh, as an SVG chart to FILE.svg
  --ztunnel PATH  use this ztunnel binary instead of building one
  --proxy-env NAME=VALUE
                  also set NAME=VALUE in both proxies' environment (repeatable),
                  e.g. ZTUNNEL_WORKER_THREADS=1
  --callgrind DIR run both proxies under valgrind's callgrind and dump what
                  they ran after each phase into DIR (their CPU and memory
                  figures are then callgrind's, not the proxies')

`meshbench symbol-order DIR` prints, from those dumps, the functions of ztunnel
that ran, for bins/ztunnel/symbol-order.txt (bins/ztunnel/update-symbol-order.sh
does both steps).";

impl Args {
    /// Whether `load` is one this run measures.
    pub(crate) fn runs(&self, load: &load::Load) -> bool {
        self.only.is_empty() || self.only.contains(&load.key)
    }

    fn parse(mut args: impl Iterator<Item = String>) -> std::result::Result<Args, String> {
        let mut parsed = Args {
            duration: Duration::from_secs(10),
            quick: false,
            json: None,
            plot: None,
            ztunnel: None,
            proxy_env: Vec::new(),
            only: Vec::new(),
            callgrind: None,
        };
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => {
                    parsed.quick = true;
                    parsed.duration = Duration::from_secs(3);
                }
                "--json" => {
                    let file = args.next().ok_or("--json needs a file name")?;
                    parsed.json = Some(PathBuf::from(file));
                }
                "--plot" => {
                    let file = PathBuf::from(args.next().ok_or("--plot needs a file name")?);
                    // Only the SVG backend is built in (no bitmap encoder, no font libraries).
                    if file
                        .extension()
                        .is_none_or(|ext| !ext.eq_ignore_ascii_case("svg"))
                    {
                        return Err(format!(
                            "--plot writes SVG: give a file name ending in .svg, not {}",
                            file.display()
                        ));
                    }
                    parsed.plot = Some(file);
                }
                "--ztunnel" => {
                    let path = args.next().ok_or("--ztunnel needs a path")?;
                    parsed.ztunnel = Some(PathBuf::from(path));
                }
                "--proxy-env" => {
                    let pair = args.next().ok_or("--proxy-env needs NAME=VALUE")?;
                    let (name, value) = pair
                        .split_once('=')
                        .filter(|(name, _)| !name.is_empty())
                        .ok_or_else(|| format!("--proxy-env needs NAME=VALUE, not {pair:?}"))?;
                    parsed.proxy_env.push((name.to_owned(), value.to_owned()));
                }
                "--only" => {
                    let list = args.next().ok_or("--only needs a list of loads")?;
                    for wanted in list.split(',').filter(|key| !key.is_empty()) {
                        let load = load::LOADS
                            .iter()
                            .find(|load| load.key == wanted)
                            .ok_or_else(|| {
                                let known: Vec<&str> = load::LOADS.iter().map(|load| load.key).collect();
                                format!("--only: no load {wanted:?} (the loads are {})", known.join(", "))
                            })?;
                        parsed.only.push(load.key);
                    }
                    if parsed.only.is_empty() {
                        return Err("--only needs a list of loads".into());
                    }
                }
                "--callgrind" => {
                    let dir = args.next().ok_or("--callgrind needs a directory")?;
                    parsed.callgrind = Some(PathBuf::from(dir));
                }
                "-h" | "--help" => return Err(String::new()),
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        if parsed.plot.is_some() && !parsed.only.is_empty() && !parsed.only.contains(&"fixed") {
            return Err("--plot charts the fixed-rate load: add fixed to --only".into());
        }
        Ok(parsed)
    }
}

fn main() -> ExitCode {
    // The relay processes are this binary run again (`relay`); they never reach the benchmark's setup.
    let raw: Vec<String> = std::env::args().skip(1).collect();
    if let Some(code) = relay::main_if_relay(&raw) {
        return code;
    }
    if raw.first().map(String::as_str) == Some("symbol-order") {
        let [_, dir] = raw.as_slice() else {
            eprintln!("meshbench: usage: meshbench symbol-order DIR");
            return ExitCode::from(2);
        };
        return match layout::print_symbol_order(std::path::Path::new(dir)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(why) => {
                eprintln!("meshbench: {why}");
                ExitCode::FAILURE
            }
        };
    }
    let args = match Args::parse(raw.into_iter()) {
        Ok(args) => args,
        Err(why) if why.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(why) => {
            eprintln!("meshbench: {why}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // Two workers serve the in-process HTTP server; the run itself is driven from this thread, where
    // its short blocking steps (namespace commands, readiness probes) cannot starve the server.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("meshbench: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = run(&args) => outcome,
            () = interrupted() => Err(Error::Interrupted),
        }
    });
    // The run's future (and with it every guard) has been dropped by now: cleanup is done.
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Interrupted) => {
            eprintln!("meshbench: {}", Error::Interrupted);
            ExitCode::from(130)
        }
        Err(error) => {
            eprintln!("meshbench: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM; never, if the handlers cannot be installed (the default action, ending
/// the process, then applies, and the proxies die with their namespaces' commands).
async fn interrupted() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let sigterm = async {
        match terminate.as_mut() {
            Some(signal) => {
                signal.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        result = tokio::signal::ctrl_c() => {
            if result.is_err() {
                std::future::pending::<()>().await;
            }
        }
        () = sigterm => {}
    }
}

async fn run(args: &Args) -> Result<()> {
    let machine = setup::Machine::read();
    let tools = setup::prepare(args)?;
    println!(
        "meshbench: {} cores, kernel {}, load average {} ; proxy {}",
        machine.cores,
        machine.kernel,
        machine.load_average,
        tools.ztunnel.display()
    );
    let mut topology = topology::Topology::start(&tools).await?;
    println!("meshbench: topology up (client 10.10.0.1 -> server 10.10.0.2, both proxies ready)");
    let results = load::run_all(&mut topology, &tools, args).await?;
    let chart = match &args.plot {
        Some(path) => Some((path, plot::fixed_rate_chart(&results).map_err(Error::Load)?)),
        None => None,
    };
    let report = report::Report::new(args, &machine, &tools, results);
    println!("{}", report.table());
    if let Some(path) = &args.json {
        std::fs::write(path, report.json())
            .map_err(|e| Error::Io(format!("writing {}", path.display()), e))?;
        println!("meshbench: JSON written to {}", path.display());
    }
    if let Some((path, svg)) = chart {
        std::fs::write(path, svg).map_err(|e| Error::Io(format!("writing {}", path.display()), e))?;
        println!("meshbench: latency chart written to {}", path.display());
    }
    drop(topology);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> std::result::Result<Args, String> {
        Args::parse(args.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn quick_shortens_each_load_and_json_takes_a_file() {
        let args = parse(&["--quick", "--json", "out.json"]).unwrap();
        assert_eq!(args.duration, Duration::from_secs(3));
        assert!(args.quick);
        assert_eq!(args.json, Some(PathBuf::from("out.json")));
        assert_eq!(parse(&[]).unwrap().duration, Duration::from_secs(10));
    }

    #[test]
    fn plot_takes_an_svg_file_and_refuses_other_formats() {
        let args = parse(&["--plot", "out/latency.SVG"]).unwrap();
        assert_eq!(args.plot, Some(PathBuf::from("out/latency.SVG")));
        assert!(parse(&[]).unwrap().plot.is_none());
        let error = parse(&["--plot", "latency.png"]).unwrap_err();
        assert!(error.contains(".svg") && error.contains("latency.png"), "{error}");
        assert!(parse(&["--plot", "latency"]).unwrap_err().contains(".svg"));
        assert!(parse(&["--plot"]).unwrap_err().contains("--plot"));
    }

    #[test]
    fn missing_values_and_unknown_flags_are_refused() {
        assert!(parse(&["--json"]).unwrap_err().contains("--json"));
        assert!(parse(&["--fast"]).unwrap_err().contains("--fast"));
        assert_eq!(parse(&["--help"]).unwrap_err(), "");
    }

    #[test]
    fn only_picks_loads_by_key_and_refuses_unknown_ones() {
        let all = parse(&[]).unwrap();
        assert!(load::LOADS.iter().all(|load| all.runs(load)));
        let some = parse(&["--only", "iperf3,wrk1"]).unwrap();
        let run: Vec<&str> = load::LOADS
            .iter()
            .filter(|l| some.runs(l))
            .map(|l| l.key)
            .collect();
        assert_eq!(run, ["iperf3", "wrk1"]);
        let error = parse(&["--only", "iperf"]).unwrap_err();
        assert!(error.contains("\"iperf\"") && error.contains("wrk64"), "{error}");
        assert!(parse(&["--only", ","]).unwrap_err().contains("--only"));
        assert!(parse(&["--only"]).unwrap_err().contains("--only"));
        let error = parse(&["--only", "wrk1", "--plot", "a.svg"]).unwrap_err();
        assert!(error.contains("fixed"), "{error}");
        assert!(parse(&["--only", "fixed", "--plot", "a.svg"]).is_ok());
    }

    #[test]
    fn proxy_env_takes_name_value_pairs_and_repeats() {
        let args = parse(&[
            "--proxy-env",
            "ZTUNNEL_WORKER_THREADS=1",
            "--proxy-env",
            "RUST_LOG=warn,ztunnel=info",
        ])
        .unwrap();
        assert_eq!(
            args.proxy_env,
            vec![
                ("ZTUNNEL_WORKER_THREADS".to_owned(), "1".to_owned()),
                ("RUST_LOG".to_owned(), "warn,ztunnel=info".to_owned()),
            ]
        );
        assert!(
            parse(&["--proxy-env", "NOVALUE"])
                .unwrap_err()
                .contains("NAME=VALUE")
        );
        assert!(parse(&["--proxy-env", "=1"]).unwrap_err().contains("NAME=VALUE"));
        assert!(parse(&["--proxy-env"]).unwrap_err().contains("--proxy-env"));
    }
}
