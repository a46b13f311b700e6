//! The loads and what they measure. Each runs in the client node, bounded in time, three times: direct
//! (no capture), through the plain relay pair (capture to 15101, the floor of any pair of user-space
//! proxies) and through the mesh (capture to 15001), while both proxies' and both relays' CPU time and
//! memory are read from `/proc`. The server proxy's connection counter and the server node's SYN counter
//! for the server relay say which path each run took, and a run that took the wrong one is an error, not
//! a figure.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::fixedrate::{self, FixedRateOutput, Plan};
use crate::procfs::Sample;
use crate::setup::{self, Tools};
use crate::topology::{ChildGuard, DataPath, IPERF_PORT, SERVER_IP, Topology};
use crate::{Args, Error, Result};

/// Idle connections held open through the mesh to measure what each costs the proxies.
pub(crate) const IDLE_CONNECTIONS: usize = 500;
/// How often memory is sampled while a load runs.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// How long a load generator may overrun its own duration before it is killed and the run fails.
const GRACE: Duration = Duration::from_secs(30);
/// Time for the proxies to settle (finish handshakes, free buffers) before memory is read as "idle".
const SETTLE: Duration = Duration::from_secs(2);

/// A load generator and its settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `wrk --latency` against the HTTP server.
    Wrk {
        /// Connections held by wrk.
        connections: u32,
        /// wrk's threads (at most the connections).
        threads: u32,
        /// `Connection: close` on every request: a new connection (and a new tunnel) per request.
        close: bool,
    },
    /// `iperf3 -J`, one stream, client to server.
    Iperf,
    /// Our fixed-rate generator (`fixedrate`) against the echo server: 1 KiB requests and answers,
    /// latency from each request's due time.
    FixedRate {
        /// Requests per second over all connections.
        rate_per_second: u32,
        /// Connections, each with its share of the timetable.
        connections: u32,
    },
}

/// One named load.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    /// Its name in the table and the JSON.
    pub(crate) name: &'static str,
    /// Its short name on the command line (`--only`).
    pub(crate) key: &'static str,
    /// What runs.
    pub(crate) kind: Kind,
}

/// The loads, in the order they run. Bulk comes first, so that the proxies' `VmHWM` after it is the peak
/// of the bulk transfer (the issue's "peak during bulk"), not of a later load.
pub(crate) const LOADS: [Load; 5] = [
    Load {
        name: "iperf3, 1 stream",
        key: "iperf3",
        kind: Kind::Iperf,
    },
    Load {
        name: "wrk keep-alive, 1 conn",
        key: "wrk1",
        kind: Kind::Wrk {
            connections: 1,
            threads: 1,
            close: false,
        },
    },
    Load {
        name: "wrk keep-alive, 64 conns",
        key: "wrk64",
        kind: Kind::Wrk {
            connections: 64,
            threads: 2,
            close: false,
        },
    },
    Load {
        name: "wrk Connection: close, 16",
        key: "close",
        kind: Kind::Wrk {
            connections: 16,
            threads: 2,
            close: true,
        },
    },
    Load {
        name: "fixed rate 1,000 req/s, 4 conns",
        key: "fixed",
        kind: Kind::FixedRate {
            rate_per_second: 1000,
            connections: 4,
        },
    },
];

/// What `wrk --latency` reported.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WrkOutput {
    /// Responses received.
    pub(crate) requests: u64,
    /// `Requests/sec`.
    pub(crate) requests_per_second: f64,
    /// The 50th percentile of latency, µs.
    pub(crate) p50_us: f64,
    /// The 99th percentile of latency, µs.
    pub(crate) p99_us: f64,
    /// Socket errors of all kinds (connect, read, write, timeout).
    pub(crate) socket_errors: u64,
    /// Responses that were not 2xx or 3xx.
    pub(crate) non_2xx: u64,
}

/// What `iperf3 -J` reported.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct IperfOutput {
    /// Bytes the server received.
    pub(crate) bytes: u64,
    /// The receiver's rate, bits per second.
    pub(crate) bits_per_second: f64,
    /// TCP retransmissions the sender counted, when iperf3 reports them.
    pub(crate) retransmits: Option<u64>,
}

/// A load generator's figures.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Output {
    /// From wrk.
    Wrk(WrkOutput),
    /// From iperf3.
    Iperf(IperfOutput),
    /// From our fixed-rate generator.
    FixedRate(FixedRateOutput),
}

/// One proxy (or relay) process during one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ProxyUse {
    /// CPU time (user + system, all threads) spent during the run, seconds.
    pub(crate) cpu_seconds: f64,
    /// The highest `VmRSS` sampled while the load ran, KiB.
    pub(crate) rss_under_load_kib: u64,
    /// The peak since the proxy started, KiB: `VmHWM` when the run ended, or the highest sample if that
    /// is higher.
    pub(crate) peak_kib: u64,
}

/// One run of one load on one path.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Run {
    /// The generator's figures.
    pub(crate) output: Output,
    /// The client proxy.
    pub(crate) client: ProxyUse,
    /// The server proxy.
    pub(crate) server: ProxyUse,
    /// The client relay.
    pub(crate) client_relay: ProxyUse,
    /// The server relay.
    pub(crate) server_relay: ProxyUse,
    /// Connections the server proxy accepted from the mesh during the run (0 off the mesh path).
    pub(crate) mesh_connections: f64,
    /// TCP connections opened to the server relay during the run (0 off the relay path).
    pub(crate) relay_connections: u64,
    /// TCP connections opened to the server proxy's 15008 during the run: HBONE connections, each with
    /// its own TLS handshake, as opposed to streams on a pooled one.
    pub(crate) hbone_connections: u64,
}

/// A load, direct, through the relays and through the mesh.
#[derive(Debug, Clone)]
pub(crate) struct LoadResult {
    /// Which load.
    pub(crate) load: Load,
    /// No capture: straight over the veth.
    pub(crate) direct: Run,
    /// Captured to the plain relay pair.
    pub(crate) relay: Run,
    /// Captured to our proxies.
    pub(crate) mesh: Run,
}

/// The memory each idle tunnelled connection costs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IdleConnections {
    /// Connections held open.
    pub(crate) count: usize,
    /// Each proxy's `VmRSS` before they were opened, KiB (client, server).
    pub(crate) before_kib: [u64; 2],
    /// Each proxy's `VmRSS` with them open and idle, KiB (client, server).
    pub(crate) open_kib: [u64; 2],
}

/// Everything a run measured.
#[derive(Debug, Clone)]
pub(crate) struct Results {
    /// Each proxy's `VmRSS` when idle, after start-up and one request, KiB (client, server).
    pub(crate) idle_kib: [u64; 2],
    /// Each relay's `VmRSS` when idle, after start-up and one request, KiB (client, server).
    pub(crate) relay_idle_kib: [u64; 2],
    /// The idle-connection measurement.
    pub(crate) idle_connections: IdleConnections,
    /// Each load, in [`LOADS`] order.
    pub(crate) loads: Vec<LoadResult>,
    /// `/proc/loadavg` when the loads ended.
    pub(crate) load_average_after: String,
    /// HBONE (TCP) connections opened to the server proxy over the whole run, warm-up included.
    pub(crate) hbone_connections_total: u64,
}

/// Runs the idle measurements, then every load direct, through the relays and through the mesh,
/// printing progress.
pub(crate) async fn run_all(topology: &mut Topology, tools: &Tools, args: &Args) -> Result<Results> {
    tokio::time::sleep(SETTLE).await;
    let idle = sample_all(topology)?;
    let idle_kib = [idle[0].rss_kib, idle[1].rss_kib];
    callgrind_dump(topology, tools, "start-up, one request, idle");
    let relay_idle_kib = [idle[2].rss_kib, idle[3].rss_kib];
    println!(
        "meshbench: idle RSS: client proxy {} KiB, server proxy {} KiB; client relay {} KiB, server relay {} KiB",
        idle_kib[0], idle_kib[1], relay_idle_kib[0], relay_idle_kib[1]
    );

    // What an idle tunnel costs: connections through the mesh, each used once, then left open.
    topology.set_capture(DataPath::Mesh)?;
    let tunnels_before = topology.mesh_connections()?;
    let streams = topology.open_idle_connections(IDLE_CONNECTIONS)?;
    let tunnelled = topology.mesh_connections()? - tunnels_before;
    if tunnelled < IDLE_CONNECTIONS as f64 {
        return Err(Error::Load(format!(
            "only {tunnelled} of {IDLE_CONNECTIONS} idle connections went through the mesh"
        )));
    }
    tokio::time::sleep(SETTLE).await;
    let open = sample_all(topology)?;
    drop(streams);
    callgrind_dump(topology, tools, "idle connections");
    let idle_connections = IdleConnections {
        count: IDLE_CONNECTIONS,
        before_kib: idle_kib,
        open_kib: [open[0].rss_kib, open[1].rss_kib],
    };
    println!(
        "meshbench: {IDLE_CONNECTIONS} idle tunnelled connections: client proxy {} KiB, server proxy {} KiB",
        idle_connections.open_kib[0], idle_connections.open_kib[1]
    );
    tokio::time::sleep(SETTLE).await;

    let mut loads = Vec::with_capacity(LOADS.len());
    for load in LOADS.into_iter().filter(|load| args.runs(load)) {
        topology.set_capture(DataPath::Direct)?;
        let direct = measure(topology, tools, &load, args.duration, DataPath::Direct).await?;
        topology.set_capture(DataPath::Relay)?;
        let relay = measure(topology, tools, &load, args.duration, DataPath::Relay).await?;
        topology.set_capture(DataPath::Mesh)?;
        let mesh = measure(topology, tools, &load, args.duration, DataPath::Mesh).await?;
        let result = LoadResult {
            load,
            direct,
            relay,
            mesh,
        };
        println!("meshbench: {}: {}", load.name, result.summary());
        callgrind_dump(topology, tools, load.name);
        loads.push(result);
    }
    Ok(Results {
        idle_kib,
        relay_idle_kib,
        idle_connections,
        loads,
        load_average_after: setup::load_average(),
        hbone_connections_total: topology.hbone_connections()?,
    })
}

/// With `--callgrind`: has callgrind write what each proxy ran during the phase that just ended (see
/// `layout`). A failed dump is reported and the run goes on: later dumps still hold those functions.
fn callgrind_dump(topology: &Topology, tools: &Tools, phase: &str) {
    if tools.callgrind.is_none() {
        return;
    }
    for proxy in [&topology.client_proxy, &topology.server_proxy] {
        match crate::layout::dump(proxy.pid()) {
            Ok(()) => println!(
                "meshbench: callgrind dump of the {} proxy after: {phase}",
                proxy.name
            ),
            Err(why) => eprintln!(
                "meshbench: no callgrind dump of the {} proxy after {phase}: {why}",
                proxy.name
            ),
        }
    }
}

impl LoadResult {
    /// The headline figure of each path, for the progress line.
    fn summary(&self) -> String {
        let figure = |run: &Run| match &run.output {
            Output::Wrk(wrk) => format!("{:.0} req/s", wrk.requests_per_second),
            Output::Iperf(iperf) => format!("{:.2} Gbit/s", iperf.bits_per_second / 1e9),
            Output::FixedRate(fixed) => format!(
                "{:.0} req/s, p50 {} µs, p99 {} µs",
                fixed.achieved_per_second,
                fixed.latency_at(50.0),
                fixed.latency_at(99.0)
            ),
        };
        format!(
            "direct {}, relay {} ({} connections through the server relay), mesh {} ({} connections \
             through the server proxy, {} new HBONE connections)",
            figure(&self.direct),
            figure(&self.relay),
            self.relay.relay_connections,
            figure(&self.mesh),
            self.mesh.mesh_connections,
            self.mesh.hbone_connections
        )
    }
}

/// Reads both proxies and both relays (client proxy, server proxy, client relay, server relay).
fn sample_all(topology: &Topology) -> Result<[Sample; 4]> {
    Ok([
        topology.client_proxy.sample()?,
        topology.server_proxy.sample()?,
        topology.client_relay.sample()?,
        topology.server_relay.sample()?,
    ])
}

/// Whether a run's connection counters match the path it was meant to take: an error naming what went
/// wrong if not. `mesh` counts connections the server proxy accepted, `relay` those the server relay did.
fn check_path(path: DataPath, mesh: f64, relay: u64) -> std::result::Result<(), String> {
    let (want_mesh, want_relay) = match path {
        DataPath::Direct => (false, false),
        DataPath::Relay => (false, true),
        DataPath::Mesh => (true, false),
    };
    match (mesh >= 1.0, relay >= 1) {
        (true, _) if !want_mesh => Err(format!(
            "the server proxy accepted {mesh} connections, so the traffic went through the mesh"
        )),
        (_, true) if !want_relay => Err(format!(
            "the server relay accepted {relay} connections, so the traffic went through the relays"
        )),
        (false, _) if want_mesh => {
            Err("the server proxy accepted no connection, so the traffic did not go through the mesh".into())
        }
        (_, false) if want_relay => Err(
            "the server relay accepted no connection, so the traffic did not go through the relays".into(),
        ),
        _ => Ok(()),
    }
}

/// Runs one load on the current path and checks that it took `path`.
async fn measure(
    topology: &Topology,
    tools: &Tools,
    load: &Load,
    duration: Duration,
    path: DataPath,
) -> Result<Run> {
    let connections_before = topology.mesh_connections()?;
    let hbone_before = topology.hbone_connections()?;
    let relay_before = topology.relay_connections()?;
    let before = sample_all(topology)?;
    let mut rss_max = [0u64; 4];
    let name = path.name();
    let mut generator = Generator::start(topology, load, duration, name)?;
    let deadline = Instant::now() + duration + GRACE;
    loop {
        let now = sample_all(topology)?;
        for (max, sample) in rss_max.iter_mut().zip(now) {
            *max = (*max).max(sample.rss_kib);
        }
        if generator.finished(load)? {
            break;
        }
        if Instant::now() >= deadline {
            return Err(Error::Load(format!(
                "{} ({name}) did not finish within {:?}; stopped",
                load.name,
                duration + GRACE
            )));
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    let after = sample_all(topology)?;
    let output = generator.output(load, name)?;
    let mesh_connections = topology.mesh_connections()? - connections_before;
    let hbone_connections = topology.hbone_connections()?.saturating_sub(hbone_before);
    let relay_connections = topology.relay_connections()?.saturating_sub(relay_before);
    if let Err(why) = check_path(path, mesh_connections, relay_connections) {
        return Err(Error::Load(format!(
            "{} ({name}): {why}\n{}\n{}\n{}\n{}",
            load.name,
            topology.client_proxy.log_tail(),
            topology.server_proxy.log_tail(),
            topology.client_relay.log_tail(),
            topology.server_relay.log_tail()
        )));
    }
    let ticks = tools.clk_tck as f64;
    let proxy_use = |i: usize| ProxyUse {
        cpu_seconds: after[i].cpu_ticks.saturating_sub(before[i].cpu_ticks) as f64 / ticks,
        rss_under_load_kib: rss_max[i],
        // The kernel records the high-water mark lazily (when memory is unmapped), so `VmHWM` can lag
        // behind a peak that was sampled directly.
        peak_kib: after[i].hwm_kib.max(rss_max[i]),
    };
    Ok(Run {
        output,
        client: proxy_use(0),
        server: proxy_use(1),
        client_relay: proxy_use(2),
        server_relay: proxy_use(3),
        mesh_connections,
        relay_connections,
        hbone_connections,
    })
}

/// A load generator while it runs: a process (wrk, iperf3) writing its report to a file, or our
/// fixed-rate generator on threads of this process. Dropping it kills the process or tells the threads
/// to stop.
enum Generator {
    /// A program started in the client node.
    Process {
        child: ChildGuard,
        output_file: PathBuf,
        status: Option<ExitStatus>,
    },
    /// `fixedrate`'s generator.
    InProcess(fixedrate::Running),
}

impl Generator {
    /// Starts `load`'s generator in the client node for `duration`; `path` ("direct", "relay" or
    /// "mesh") names its output file.
    fn start(topology: &Topology, load: &Load, duration: Duration, path: &str) -> Result<Generator> {
        match load.kind {
            Kind::FixedRate {
                rate_per_second,
                connections,
            } => {
                let plan = Plan {
                    rate_per_second,
                    connections,
                    warm_up: fixedrate::WARM_UP,
                    duration,
                    answer_timeout: fixedrate::ANSWER_TIMEOUT,
                };
                let running = fixedrate::Running::start(&topology.client, topology.echo_addr(), plan)?;
                Ok(Generator::InProcess(running))
            }
            Kind::Wrk { .. } | Kind::Iperf => {
                let output_file = topology
                    .dir
                    .path()
                    .join(format!("{}-{path}.out", file_stem(load.name)));
                let child = spawn(topology, load, duration, &output_file)?;
                Ok(Generator::Process {
                    child,
                    output_file,
                    status: None,
                })
            }
        }
    }

    /// Whether it has finished.
    fn finished(&mut self, load: &Load) -> Result<bool> {
        match self {
            Generator::Process { child, status, .. } => {
                if status.is_none() {
                    *status = child
                        .try_wait()
                        .map_err(|e| Error::Load(format!("waiting for {}: {e}", load.name)))?;
                }
                Ok(status.is_some())
            }
            Generator::InProcess(running) => Ok(running.is_finished()),
        }
    }

    /// What the finished generator measured.
    fn output(self, load: &Load, path: &str) -> Result<Output> {
        match self {
            Generator::Process {
                output_file, status, ..
            } => {
                let text = std::fs::read_to_string(&output_file)
                    .map_err(|e| Error::Io(format!("reading {}", output_file.display()), e))?;
                let parsed = match load.kind {
                    Kind::Iperf => parse_iperf3(&text).map(Output::Iperf),
                    _ => parse_wrk(&text).map(Output::Wrk),
                };
                parsed.map_err(|why| {
                    let status = status.map_or_else(|| "no status".to_owned(), |s| s.to_string());
                    Error::Load(format!(
                        "{} ({path}) exited with {status}; its output: {why}\n{text}",
                        load.name
                    ))
                })
            }
            Generator::InProcess(running) => running
                .join()
                .map(Output::FixedRate)
                .map_err(|why| Error::Load(format!("{} ({path}): {why}", load.name))),
        }
    }
}

/// Starts a wrk or iperf3 load in the client node, its stdout going to `output_file`.
fn spawn(topology: &Topology, load: &Load, duration: Duration, output_file: &Path) -> Result<ChildGuard> {
    let out = std::fs::File::create(output_file)
        .map_err(|e| Error::Io(format!("creating {}", output_file.display()), e))?;
    let err = out
        .try_clone()
        .map_err(|e| Error::Io(format!("opening {}", output_file.display()), e))?;
    let seconds = duration.as_secs().max(1).to_string();
    let mut command = match load.kind {
        Kind::Wrk {
            connections,
            threads,
            close,
        } => {
            let mut command = topology.client.command("wrk");
            command.args([
                &format!("-t{threads}"),
                &format!("-c{connections}"),
                &format!("-d{seconds}s"),
                "--timeout",
                "5s",
                "--latency",
            ]);
            if close {
                command.args(["-H", "Connection: close"]);
            }
            command.arg(format!("http://{}/", topology.http_addr()));
            command
        }
        Kind::Iperf => {
            let mut command = topology.client.command("iperf3");
            command.args([
                "-c",
                SERVER_IP,
                "-p",
                &IPERF_PORT.to_string(),
                "-t",
                &seconds,
                "-J",
                "--connect-timeout",
                "5000",
            ]);
            command
        }
        Kind::FixedRate { .. } => {
            return Err(Error::Load(format!(
                "{} runs in this process, not as a program",
                load.name
            )));
        }
    };
    command.stdin(Stdio::null()).stdout(out).stderr(err);
    ChildGuard::spawn(&mut command, load.name)
}

/// A load's name as a file name.
fn file_stem(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// A wrk duration (`52.17us`, `1.23ms`, `2.00s`, `1.00m`, `1.00h`) in µs.
fn wrk_time_us(text: &str) -> Option<f64> {
    let (number, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1e6)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60e6)
    } else if let Some(n) = text.strip_suffix('h') {
        (n, 3600e6)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * scale)
}

/// Reads `wrk --latency`'s report.
pub(crate) fn parse_wrk(text: &str) -> std::result::Result<WrkOutput, String> {
    let mut requests = None;
    let mut requests_per_second = None;
    let (mut p50_us, mut p99_us) = (None, None);
    let mut socket_errors = 0;
    let mut non_2xx = 0;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", rate] => requests_per_second = rate.parse::<f64>().ok(),
            ["50%", latency] => p50_us = wrk_time_us(latency),
            ["99%", latency] => p99_us = wrk_time_us(latency),
            [count, "requests", "in", ..] => requests = count.parse::<u64>().ok(),
            ["Socket", "errors:", counts @ ..] => {
                // `connect 0, read 0, write 0, timeout 0`
                socket_errors = counts
                    .iter()
                    .filter_map(|word| word.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            ["Non-2xx", "or", "3xx", "responses:", count] => non_2xx = count.parse().unwrap_or(0),
            _ => {}
        }
    }
    let missing = |what: &str| format!("no {what} in wrk's output");
    Ok(WrkOutput {
        requests: requests.ok_or_else(|| missing("request count"))?,
        requests_per_second: requests_per_second.ok_or_else(|| missing("Requests/sec"))?,
        p50_us: p50_us.ok_or_else(|| missing("50% latency"))?,
        p99_us: p99_us.ok_or_else(|| missing("99% latency"))?,
        socket_errors,
        non_2xx,
    })
}

/// Reads `iperf3 -J`'s report: the receiver's totals.
pub(crate) fn parse_iperf3(text: &str) -> std::result::Result<IperfOutput, String> {
    let report: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("iperf3's output is not JSON: {e}"))?;
    if let Some(error) = report["error"].as_str() {
        return Err(format!("iperf3: {error}"));
    }
    let received = &report["end"]["sum_received"];
    let bytes = received["bytes"]
        .as_u64()
        .ok_or("no end.sum_received.bytes in iperf3's output")?;
    let bits_per_second = received["bits_per_second"]
        .as_f64()
        .ok_or("no end.sum_received.bits_per_second in iperf3's output")?;
    Ok(IperfOutput {
        bytes,
        bits_per_second,
        retransmits: report["end"]["sum_sent"]["retransmits"].as_u64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "\
Running 3s test @ http://10.10.0.2:8080/
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.02ms    1.10ms  21.43ms   80.12%
    Req/Sec    10.71k     1.02k   12.60k    71.67%
  Latency Distribution
     50%    2.87ms
     75%    3.41ms
     90%    4.18ms
     99%    6.90ms
  63981 requests in 3.00s, 69.54MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 2
Requests/sec:  21310.55
Transfer/sec:     23.16MB
";

    #[test]
    fn wrk_reports_are_read_with_their_units() {
        let output = parse_wrk(WRK).unwrap();
        assert_eq!(output.requests, 63_981);
        assert!((output.requests_per_second - 21_310.55).abs() < 1e-6);
        assert!((output.p50_us - 2_870.0).abs() < 1e-6);
        assert!((output.p99_us - 6_900.0).abs() < 1e-6);
        assert_eq!(output.socket_errors, 4);
        assert_eq!(output.non_2xx, 2);
        assert_eq!(wrk_time_us("48.00us"), Some(48.0));
        assert_eq!(wrk_time_us("1.50s"), Some(1.5e6));
        assert_eq!(wrk_time_us("2.00m"), Some(120e6));
        assert_eq!(wrk_time_us("12"), None);
    }

    #[test]
    fn a_wrk_failure_is_an_error_naming_what_is_missing() {
        let error = parse_wrk("unable to connect to 10.10.0.2:8080 Connection refused\n").unwrap_err();
        assert!(error.contains("request count"), "{error}");
    }

    #[test]
    fn iperf3_reports_are_read_from_the_receivers_totals() {
        let json = r#"{"start":{},"intervals":[],"end":{
            "sum_sent":{"start":0,"end":3.0,"seconds":3.0,"bytes":1500000000,"bits_per_second":4.0e9,"retransmits":12},
            "sum_received":{"start":0,"end":3.0,"seconds":3.0,"bytes":1499000000,"bits_per_second":3.997e9}}}"#;
        let output = parse_iperf3(json).unwrap();
        assert_eq!(output.bytes, 1_499_000_000);
        assert!((output.bits_per_second - 3.997e9).abs() < 1.0);
        assert_eq!(output.retransmits, Some(12));
        let error =
            parse_iperf3(r#"{"start":{},"end":{},"error":"unable to connect to server"}"#).unwrap_err();
        assert!(error.contains("unable to connect"), "{error}");
        assert!(parse_iperf3("iperf3: error").is_err());
    }

    #[test]
    fn each_path_must_show_in_its_own_counter_and_no_other() {
        assert!(check_path(DataPath::Direct, 0.0, 0).is_ok());
        assert!(check_path(DataPath::Relay, 0.0, 2).is_ok());
        assert!(check_path(DataPath::Mesh, 64.0, 0).is_ok());
        let error = check_path(DataPath::Direct, 0.0, 1).unwrap_err();
        assert!(error.contains("through the relays"), "{error}");
        let error = check_path(DataPath::Relay, 0.0, 0).unwrap_err();
        assert!(error.contains("did not go through the relays"), "{error}");
        let error = check_path(DataPath::Relay, 3.0, 3).unwrap_err();
        assert!(error.contains("through the mesh"), "{error}");
        let error = check_path(DataPath::Mesh, 0.0, 0).unwrap_err();
        assert!(error.contains("did not go through the mesh"), "{error}");
        let error = check_path(DataPath::Mesh, 5.0, 1).unwrap_err();
        assert!(error.contains("through the relays"), "{error}");
    }

    #[test]
    fn load_names_become_file_names() {
        assert_eq!(
            file_stem("wrk Connection: close, 16"),
            "wrk-Connection--close--16"
        );
    }
}
