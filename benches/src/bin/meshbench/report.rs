//! The figures a run produced, derived into what issue 7 asks for (ratios to the baseline, CPU per 1,000
//! requests or per GB, memory) and set beside the targets; printed as Markdown tables (so they can
//! be pasted into `docs/performance.md`) and written as JSON. Beside each mesh figure, the plain relay
//! pair's (`relay`): `mesh / relay` is what our proxies cost above the floor any pair of user-space
//! proxies has on this machine, while the targets stay ratios to the direct path.
//!
//! Units: memory in MB of 10^6 bytes (the targets are in MB and KB; `/proc` counts KiB, converted
//! here), bulk CPU per GB of 10^9 bytes, rates in Gbit/s of 10^9 bits.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::Args;
use crate::fixedrate::{self, FixedRateOutput};
use crate::load::{IdleConnections, Kind, LoadResult, Output, ProxyUse, Results, Run};
use crate::setup::{Machine, Tools};

/// KiB (as `/proc` counts) to MB of 10^6 bytes.
fn mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1e6
}

/// One of the targets, with our figure.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// What is measured.
    pub(crate) what: &'static str,
    /// The bound, e.g. `>= 50 %`.
    pub(crate) bound: &'static str,
    /// Istio's ztunnel in the same topology, as the issue gives it.
    pub(crate) reference: &'static str,
    /// Our figure, formatted.
    pub(crate) ours: String,
    /// Our figure as a number, in the bound's unit.
    pub(crate) value: f64,
    /// Whether the bound holds.
    pub(crate) met: bool,
}

/// A finished run, ready to print.
#[derive(Debug)]
pub(crate) struct Report {
    date: String,
    command: String,
    machine: Machine,
    tools: Tools,
    seconds: u64,
    results: Results,
}

/// What one load's mesh and relay runs cost compared with its direct run and with each other.
#[derive(Debug, Clone, Copy)]
struct Derived {
    /// Mesh figure over direct figure.
    ratio: f64,
    /// Relay figure over direct figure.
    relay_ratio: f64,
    /// Mesh figure over relay figure: what our proxies keep of the floor.
    mesh_over_relay: f64,
    /// CPU seconds of both proxies in the mesh run.
    cpu_seconds: f64,
    /// For wrk and the fixed rate: ms of both proxies' CPU per 1,000 requests; for iperf3: s per GB.
    cpu_per_unit: f64,
    /// CPU seconds of both relays in the relay run.
    relay_cpu_seconds: f64,
    /// [`Derived::cpu_per_unit`] of both relays in the relay run.
    relay_cpu_per_unit: f64,
    /// Mesh p50 minus direct p50, µs (not for iperf3).
    added_p50_us: Option<f64>,
    /// Relay p50 minus direct p50, µs (not for iperf3).
    relay_added_p50_us: Option<f64>,
}

/// A run's headline figure (req/s or bit/s), its work (thousands of requests, or GB), the scale that
/// makes CPU seconds per unit of work the unit the report shows (ms per 1,000 requests, s per GB), and
/// its p50 latency in µs when it has one.
fn headline(run: &Run) -> (f64, f64, f64, Option<f64>) {
    match &run.output {
        Output::Wrk(wrk) => (
            wrk.requests_per_second,
            wrk.requests.max(1) as f64 / 1e3,
            1e3,
            Some(wrk.p50_us),
        ),
        Output::Iperf(iperf) => (iperf.bits_per_second, iperf.bytes.max(1) as f64 / 1e9, 1.0, None),
        // At a fixed rate the ratio says whether the path kept up; the latencies are the figures.
        Output::FixedRate(fixed) => (
            fixed.achieved_per_second,
            fixed.requests.max(1) as f64 / 1e3,
            1e3,
            Some(fixed.latency_at(50.0) as f64),
        ),
    }
}

fn derive(result: &LoadResult) -> Derived {
    let (direct, _, _, direct_p50) = headline(&result.direct);
    let (relay, relay_work, scale, relay_p50) = headline(&result.relay);
    let (mesh, mesh_work, _, mesh_p50) = headline(&result.mesh);
    let cpu_seconds = result.mesh.client.cpu_seconds + result.mesh.server.cpu_seconds;
    let relay_cpu_seconds = result.relay.client_relay.cpu_seconds + result.relay.server_relay.cpu_seconds;
    let added = |p50: Option<f64>| p50.zip(direct_p50).map(|(path, direct)| path - direct);
    Derived {
        ratio: mesh / direct,
        relay_ratio: relay / direct,
        mesh_over_relay: mesh / relay,
        cpu_seconds,
        cpu_per_unit: cpu_seconds * scale / mesh_work,
        relay_cpu_seconds,
        relay_cpu_per_unit: relay_cpu_seconds * scale / relay_work,
        added_p50_us: added(mesh_p50),
        relay_added_p50_us: added(relay_p50),
    }
}

impl Report {
    /// Gathers what the report prints.
    pub(crate) fn new(args: &Args, machine: &Machine, tools: &Tools, results: Results) -> Report {
        let mut command = String::from("cargo run -p meshkit-benches --release --bin meshbench --");
        if args.quick {
            command.push_str(" --quick");
        }
        if !args.only.is_empty() {
            let _ = write!(command, " --only {}", args.only.join(","));
        }
        if let Some(json) = &args.json {
            let _ = write!(command, " --json {}", json.display());
        }
        if let Some(plot) = &args.plot {
            let _ = write!(command, " --plot {}", plot.display());
        }
        if let Some(ztunnel) = &args.ztunnel {
            let _ = write!(command, " --ztunnel {}", ztunnel.display());
        }
        if let Some(dir) = &args.callgrind {
            let _ = write!(command, " --callgrind {}", dir.display());
        }
        let date = std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .ok()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .filter(|date| !date.is_empty())
            .unwrap_or_else(|| "unknown".into());
        Report {
            date,
            command,
            machine: machine.clone(),
            tools: tools.clone(),
            seconds: args.duration.as_secs(),
            results,
        }
    }

    fn load(&self, kind: impl Fn(&Kind) -> bool) -> Option<&LoadResult> {
        self.results.loads.iter().find(|result| kind(&result.load.kind))
    }

    /// Each idle tunnelled connection's cost to each proxy, KB of 10^3 bytes (client, server).
    fn per_idle_connection_kb(idle: &IdleConnections) -> [f64; 2] {
        let per = |i: usize| {
            let grown = idle.open_kib[i] as f64 - idle.before_kib[i] as f64;
            grown * 1024.0 / 1e3 / idle.count.max(1) as f64
        };
        [per(0), per(1)]
    }

    /// The targets beside our figures.
    pub(crate) fn targets(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        let mut add = |what, bound, reference, ours: String, value: f64, met: bool| {
            targets.push(Target {
                what,
                bound,
                reference,
                ours,
                value,
                met,
            });
        };
        let pct = |ratio: f64| format!("{:.0} %", ratio * 100.0);
        if let Some(result) = self.load(|kind| *kind == Kind::Iperf) {
            let derived = derive(result);
            add(
                "iperf3 1 stream, share of direct",
                ">= 50 %",
                "38 %",
                pct(derived.ratio),
                derived.ratio,
                derived.ratio >= 0.50,
            );
            add(
                "bulk CPU of both proxies per GB",
                "<= 0.8 s",
                "1.13 s",
                format!("{:.2} s", derived.cpu_per_unit),
                derived.cpu_per_unit,
                derived.cpu_per_unit <= 0.8,
            );
            let peak = mb(result.mesh.client.peak_kib.max(result.mesh.server.peak_kib));
            add(
                "peak RSS during bulk (larger proxy)",
                "<= 25 MB",
                "37 MB",
                format!("{peak:.1} MB"),
                peak,
                peak <= 25.0,
            );
        }
        let wrk = |connections: u32, close: bool| move |kind: &Kind| matches!(kind, Kind::Wrk { connections: c, close: k, .. } if *c == connections && *k == close);
        if let Some(result) = self.load(wrk(64, false)) {
            let derived = derive(result);
            add(
                "wrk 64 keep-alive, share of direct req/s",
                ">= 45 %",
                "33 %",
                pct(derived.ratio),
                derived.ratio,
                derived.ratio >= 0.45,
            );
            add(
                "wrk 64: CPU of both proxies per 1,000 requests",
                "<= 20 ms",
                "29 ms",
                format!("{:.1} ms", derived.cpu_per_unit),
                derived.cpu_per_unit,
                derived.cpu_per_unit <= 20.0,
            );
        }
        if let Some(result) = self.load(wrk(1, false)) {
            let derived = derive(result);
            add(
                "wrk 1 connection, share of direct req/s",
                ">= 70 %",
                "55 %",
                pct(derived.ratio),
                derived.ratio,
                derived.ratio >= 0.70,
            );
            let added = derived.added_p50_us.unwrap_or(f64::NAN);
            add(
                "wrk 1 connection: added p50 (both proxies)",
                "<= 35 µs",
                "46 µs",
                format!("{added:.0} µs"),
                added,
                added <= 35.0,
            );
        }
        if let Some(result) = self.load(wrk(16, true)) {
            let derived = derive(result);
            add(
                "Connection: close, 16 clients, share of direct",
                ">= 45 %",
                "33 %",
                pct(derived.ratio),
                derived.ratio,
                derived.ratio >= 0.45,
            );
        }
        let idle = mb(self.results.idle_kib[0].max(self.results.idle_kib[1]));
        add(
            "idle RSS (larger proxy)",
            "<= 8 MB",
            "12 MB",
            format!("{idle:.1} MB"),
            idle,
            idle <= 8.0,
        );
        let per = Self::per_idle_connection_kb(&self.results.idle_connections);
        let worst = per[0].max(per[1]);
        add(
            "RSS per idle tunnelled connection (larger proxy)",
            "<= 10 KB",
            "13 KB",
            format!("{worst:.1} KB"),
            worst,
            worst <= 10.0,
        );
        targets
    }

    /// The report as Markdown tables.
    pub(crate) fn table(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(out, "\n## meshbench, {}", self.date);
        let _ = writeln!(out, "- Command: `{}`", self.command);
        let _ = writeln!(
            out,
            "- Machine: {} cores ({}), kernel `{}`; load average {} at the start, {} at the end",
            m.cores, m.cpu, m.kernel, m.load_average, self.results.load_average_after
        );
        let _ = writeln!(
            out,
            "- {} s per load; {}; {}; CPU from /proc in ticks of 1/{} s ({})",
            self.seconds,
            self.tools.wrk_version,
            self.tools.iperf3_version,
            self.tools.clk_tck,
            self.tools.clk_tck_source
        );
        let _ = writeln!(out, "- Code layout: {}", self.tools.code_layout);
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "| load | direct | relay | mesh | relay / direct | mesh / direct | mesh / relay | p50 direct / relay / mesh | p99 direct / relay / mesh | CPU of both relays | CPU of both proxies | client proxy RSS load / peak | server proxy RSS load / peak |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for result in &self.results.loads {
            let derived = derive(result);
            let figure = |run: &Run| match &run.output {
                Output::Wrk(wrk) => {
                    let errors = wrk.socket_errors + wrk.non_2xx;
                    let errors = if errors > 0 {
                        format!(" ({errors} errors)")
                    } else {
                        String::new()
                    };
                    format!("{:.0} req/s{errors}", wrk.requests_per_second)
                }
                Output::Iperf(iperf) => format!("{:.2} Gbit/s", iperf.bits_per_second / 1e9),
                Output::FixedRate(fixed) => format!("{:.0} req/s", fixed.achieved_per_second),
            };
            let latency = |percentile: f64| {
                let at = |run: &Run| match &run.output {
                    Output::Wrk(wrk) if percentile < 90.0 => Some(format!("{:.0}", wrk.p50_us)),
                    Output::Wrk(wrk) => Some(format!("{:.0}", wrk.p99_us)),
                    Output::FixedRate(fixed) => Some(fixed.latency_at(percentile).to_string()),
                    Output::Iperf(_) => None,
                };
                match (at(&result.direct), at(&result.relay), at(&result.mesh)) {
                    (Some(direct), Some(relay), Some(mesh)) => format!("{direct} / {relay} / {mesh} µs"),
                    _ => "-".into(),
                }
            };
            let cpu = |per_unit: f64, seconds: f64| match result.load.kind {
                Kind::Iperf => format!("{per_unit:.2} s/GB ({seconds:.2} s)"),
                Kind::Wrk { .. } | Kind::FixedRate { .. } => {
                    format!("{per_unit:.1} ms/1k req ({seconds:.2} s)")
                }
            };
            let rss = |proxy: &ProxyUse| {
                format!(
                    "{:.1} / {:.1} MB",
                    mb(proxy.rss_under_load_kib),
                    mb(proxy.peak_kib)
                )
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {:.0} % | **{:.0} %** | {:.0} % | {} | {} | {} | {} | {} | {} |",
                result.load.name,
                figure(&result.direct),
                figure(&result.relay),
                figure(&result.mesh),
                derived.relay_ratio * 100.0,
                derived.ratio * 100.0,
                derived.mesh_over_relay * 100.0,
                latency(50.0),
                latency(99.0),
                cpu(derived.relay_cpu_per_unit, derived.relay_cpu_seconds),
                cpu(derived.cpu_per_unit, derived.cpu_seconds),
                rss(&result.mesh.client),
                rss(&result.mesh.server),
            );
        }
        self.fixed_rate_table(&mut out);
        let idle = &self.results.idle_connections;
        let per = Self::per_idle_connection_kb(idle);
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Memory: idle RSS client proxy {:.1} MB, server proxy {:.1} MB; with {} idle tunnelled connections \
             {:.1} / {:.1} MB, so {:.1} KB / {:.1} KB per connection.",
            mb(self.results.idle_kib[0]),
            mb(self.results.idle_kib[1]),
            idle.count,
            mb(idle.open_kib[0]),
            mb(idle.open_kib[1]),
            per[0],
            per[1]
        );
        let relay_peak = |pick: fn(&Run) -> &ProxyUse| {
            mb(self
                .results
                .loads
                .iter()
                .map(|result| pick(&result.relay).peak_kib)
                .max()
                .unwrap_or(0))
        };
        let _ = writeln!(
            out,
            "Relays (the floor): idle RSS client relay {:.1} MB, server relay {:.1} MB; peak over the run \
             {:.1} / {:.1} MB.",
            mb(self.results.relay_idle_kib[0]),
            mb(self.results.relay_idle_kib[1]),
            relay_peak(|run| &run.client_relay),
            relay_peak(|run| &run.server_relay)
        );
        let _ = writeln!(
            out,
            "HBONE connections opened to the server proxy over the whole run: {} (every tunnel above is a \
             stream on a pooled connection unless this grows with the loads).",
            self.results.hbone_connections_total
        );
        let _ = writeln!(out);
        let _ = writeln!(out, "| target (issue 7) | bound | Istio's ztunnel | ours | |");
        let _ = writeln!(out, "|---|---|---|---|---|");
        for target in self.targets() {
            let _ = writeln!(
                out,
                "| {} | {} | {} | **{}** | {} |",
                target.what,
                target.bound,
                target.reference,
                target.ours,
                if target.met { "met" } else { "missed" }
            );
        }
        self.floor_lines(&mut out);
        out
    }

    /// One line per load: the mesh against the relay floor measured in the same run.
    fn floor_lines(&self, out: &mut String) {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Against the floor (the plain relay pair: the same two extra TCP legs, no TLS, no HTTP/2, no \
             policy), so what our proxies' own code costs:"
        );
        for result in &self.results.loads {
            let derived = derive(result);
            let unit = match result.load.kind {
                Kind::Iperf => "s/GB",
                Kind::Wrk { .. } | Kind::FixedRate { .. } => "ms/1k req",
            };
            let mut line = format!(
                "- {}: mesh / relay **{:.0} %** (relay / direct {:.0} %, mesh / direct {:.0} %); CPU: proxies \
                 {:.2} {unit}, relays {:.2} {unit}",
                result.load.name,
                derived.mesh_over_relay * 100.0,
                derived.relay_ratio * 100.0,
                derived.ratio * 100.0,
                derived.cpu_per_unit,
                derived.relay_cpu_per_unit,
            );
            if let (Some(mesh), Some(relay)) = (derived.added_p50_us, derived.relay_added_p50_us) {
                let _ = write!(line, "; p50 mesh - relay {:+.0} µs", mesh - relay);
            }
            let _ = writeln!(out, "{line}");
        }
    }

    /// The fixed-rate loads' latency distributions, direct, relay and mesh, and what the mesh added to
    /// each of the other two.
    fn fixed_rate_table(&self, out: &mut String) {
        type Fixed<'a> = (
            &'a LoadResult,
            &'a FixedRateOutput,
            &'a FixedRateOutput,
            &'a FixedRateOutput,
        );
        let fixed: Vec<Fixed<'_>> = self
            .results
            .loads
            .iter()
            .filter_map(
                |result| match (&result.direct.output, &result.relay.output, &result.mesh.output) {
                    (Output::FixedRate(direct), Output::FixedRate(relay), Output::FixedRate(mesh)) => {
                        Some((result, direct, relay, mesh))
                    }
                    _ => None,
                },
            )
            .collect();
        if fixed.is_empty() {
            return;
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Fixed rate (our generator): {} KiB requests and answers on a timetable; latency from each request's \
             due time to its whole answer, in an HdrHistogram (µs, 3 significant digits); the first {} s are \
             warm-up, not recorded. Timer lag: how late the generator's threads woke for a due request (part \
             of each latency, the generator's own).",
            fixedrate::MESSAGE_BYTES / 1024,
            fixedrate::WARM_UP.as_secs()
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "| fixed-rate load | path | requests | achieved | p50 | p90 | p99 | p99.9 | max | timer lag p99 |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
        for (result, direct, relay, mesh) in fixed {
            for (path, run) in [("direct", direct), ("relay", relay), ("mesh", mesh)] {
                let mut row = format!(
                    "| {} | {path} | {} | {:.0} req/s |",
                    result.load.name, run.requests, run.achieved_per_second
                );
                for percentile in PERCENTILES {
                    let _ = write!(row, " {} µs |", run.latency_at(percentile));
                }
                let _ = write!(row, " {} µs |", run.timer_lag_us.value_at_percentile(99.0));
                let _ = writeln!(out, "{row}");
            }
            for (name, baseline) in [("mesh - direct", direct), ("mesh - relay", relay)] {
                let mut row = format!("| {} | {name} | | |", result.load.name);
                for percentile in PERCENTILES {
                    let added = mesh.latency_at(percentile) as i64 - baseline.latency_at(percentile) as i64;
                    let _ = write!(row, " **{added:+} µs** |");
                }
                let _ = writeln!(out, "{row} |");
            }
        }
    }

    /// The report as JSON.
    pub(crate) fn json(&self) -> String {
        let proxy = |p: &ProxyUse| {
            json!({
                "cpu_seconds": p.cpu_seconds,
                "rss_under_load_kib": p.rss_under_load_kib,
                "peak_kib": p.peak_kib,
            })
        };
        let run = |r: &Run| {
            let output = match &r.output {
                Output::Wrk(w) => json!({
                    "requests": w.requests,
                    "requests_per_second": w.requests_per_second,
                    "p50_us": w.p50_us,
                    "p99_us": w.p99_us,
                    "socket_errors": w.socket_errors,
                    "non_2xx": w.non_2xx,
                }),
                Output::Iperf(i) => json!({
                    "bytes": i.bytes,
                    "bits_per_second": i.bits_per_second,
                    "retransmits": i.retransmits,
                }),
                Output::FixedRate(f) => fixed_rate_json(f),
            };
            json!({
                "output": output,
                "client_proxy": proxy(&r.client),
                "server_proxy": proxy(&r.server),
                "client_relay": proxy(&r.client_relay),
                "server_relay": proxy(&r.server_relay),
                "mesh_connections": r.mesh_connections,
                "relay_connections": r.relay_connections,
                "hbone_connections": r.hbone_connections,
            })
        };
        let loads: Vec<Value> = self
            .results
            .loads
            .iter()
            .map(|result| {
                let derived = derive(result);
                let per = |value: f64| match result.load.kind {
                    Kind::Iperf => (Some(value), None),
                    Kind::Wrk { .. } | Kind::FixedRate { .. } => (None, Some(value)),
                };
                let (per_gb, per_1000) = per(derived.cpu_per_unit);
                let (relays_per_gb, relays_per_1000) = per(derived.relay_cpu_per_unit);
                json!({
                    "name": result.load.name,
                    "direct": run(&result.direct),
                    "relay": run(&result.relay),
                    "mesh": run(&result.mesh),
                    "ratio": derived.ratio,
                    "relay_ratio": derived.relay_ratio,
                    "mesh_over_relay": derived.mesh_over_relay,
                    "proxies_cpu_seconds": derived.cpu_seconds,
                    "cpu_seconds_per_gb": per_gb,
                    "cpu_ms_per_1000_requests": per_1000,
                    "relays_cpu_seconds": derived.relay_cpu_seconds,
                    "relays_cpu_seconds_per_gb": relays_per_gb,
                    "relays_cpu_ms_per_1000_requests": relays_per_1000,
                    "added_p50_us": derived.added_p50_us,
                    "relay_added_p50_us": derived.relay_added_p50_us,
                })
            })
            .collect();
        let idle = &self.results.idle_connections;
        let per = Self::per_idle_connection_kb(idle);
        let targets: Vec<Value> = self
            .targets()
            .iter()
            .map(|t| {
                json!({
                    "what": t.what,
                    "bound": t.bound,
                    "reference": t.reference,
                    "ours": t.ours,
                    "value": t.value,
                    "met": t.met,
                })
            })
            .collect();
        let report = json!({
            "date": self.date,
            "command": self.command,
            "machine": {
                "cores": self.machine.cores,
                "cpu": self.machine.cpu,
                "kernel": self.machine.kernel,
                "load_average_start": self.machine.load_average,
                "load_average_end": self.results.load_average_after,
            },
            "hbone_connections_total": self.results.hbone_connections_total,
            "tools": {
                "ztunnel": self.tools.ztunnel.display().to_string(),
                "wrk": self.tools.wrk_version,
                "iperf3": self.tools.iperf3_version,
                "clk_tck": self.tools.clk_tck,
                "clk_tck_source": self.tools.clk_tck_source,
                "code_layout": self.tools.code_layout,
            },
            "seconds_per_load": self.seconds,
            "idle_rss_kib": { "client_proxy": self.results.idle_kib[0], "server_proxy": self.results.idle_kib[1] },
            "relay_idle_rss_kib": {
                "client_relay": self.results.relay_idle_kib[0],
                "server_relay": self.results.relay_idle_kib[1],
            },
            "idle_connections": {
                "count": idle.count,
                "before_kib": { "client_proxy": idle.before_kib[0], "server_proxy": idle.before_kib[1] },
                "open_kib": { "client_proxy": idle.open_kib[0], "server_proxy": idle.open_kib[1] },
                "kb_per_connection": { "client_proxy": per[0], "server_proxy": per[1] },
            },
            "loads": loads,
            "targets": targets,
        });
        serde_json::to_string_pretty(&report).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}

/// The percentiles the fixed-rate table shows; 100 is the maximum.
const PERCENTILES: [f64; 5] = [50.0, 90.0, 99.0, 99.9, 100.0];

/// A fixed-rate run as JSON: its figures, its latency at the table's percentiles, and the distribution
/// at the points of the `--plot` chart's percentile axis (every 0.1 of a decade), to plot again later.
fn fixed_rate_json(fixed: &FixedRateOutput) -> Value {
    let at = |percentile: f64| fixed.latency_at(percentile);
    let distribution: Vec<Value> = crate::plot::percentile_points(&fixed.latency_us, 10)
        .into_iter()
        .map(|(percentile, us)| json!([percentile, us]))
        .collect();
    json!({
        "target_per_second": fixed.target_per_second,
        "requests": fixed.requests,
        "achieved_per_second": fixed.achieved_per_second,
        "latency_us": {
            "p50": at(50.0),
            "p90": at(90.0),
            "p99": at(99.0),
            "p99.9": at(99.9),
            "max": fixed.latency_us.max(),
            "mean": fixed.latency_us.mean(),
        },
        "timer_lag_us": {
            "count": fixed.timer_lag_us.len(),
            "p50": fixed.timer_lag_us.value_at_percentile(50.0),
            "p99": fixed.timer_lag_us.value_at_percentile(99.0),
            "max": fixed.timer_lag_us.max(),
        },
        "distribution_percentile_us": distribution,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{IperfOutput, LOADS, WrkOutput};
    use hdrhistogram::Histogram;
    use std::path::PathBuf;
    use std::time::Duration;

    fn proxy(cpu_seconds: f64) -> ProxyUse {
        ProxyUse {
            cpu_seconds,
            rss_under_load_kib: 10_000,
            peak_kib: 20_000,
        }
    }

    fn wrk(rps: f64, requests: u64, p50_us: f64) -> Output {
        Output::Wrk(WrkOutput {
            requests,
            requests_per_second: rps,
            p50_us,
            p99_us: p50_us * 3.0,
            socket_errors: 0,
            non_2xx: 0,
        })
    }

    /// 3,000 requests: 2,940 at `base` µs (to p98), 54 at 10x (to p99.8), 6 at 100x. Values below 2,048
    /// are exact at 3 significant digits; larger ones read back as the top of their bucket.
    fn fixed(achieved_per_second: f64, base: u64) -> Output {
        let mut latency_us = Histogram::new_with_bounds(1, 60_000_000, 3).unwrap();
        latency_us.record_n(base, 2_940).unwrap();
        latency_us.record_n(base * 10, 54).unwrap();
        latency_us.record_n(base * 100, 6).unwrap();
        let mut timer_lag_us = Histogram::new_with_bounds(1, 60_000_000, 3).unwrap();
        timer_lag_us.record_n(5, 3_000).unwrap();
        Output::FixedRate(FixedRateOutput {
            target_per_second: 1_000.0,
            requests: 3_000,
            achieved_per_second,
            latency_us,
            timer_lag_us,
        })
    }

    /// A run whose two proxies and two relays each spent `cpu` seconds.
    fn run(output: Output, cpu: f64) -> Run {
        Run {
            output,
            client: proxy(cpu),
            server: proxy(cpu),
            client_relay: proxy(cpu),
            server_relay: proxy(cpu),
            mesh_connections: 1.0,
            relay_connections: 0,
            hbone_connections: 0,
        }
    }

    fn report() -> Report {
        let iperf = |bps: f64| {
            Output::Iperf(IperfOutput {
                bytes: 2_000_000_000,
                bits_per_second: bps,
                retransmits: Some(0),
            })
        };
        let loads = vec![
            LoadResult {
                load: LOADS[0],
                direct: run(iperf(10e9), 0.0),
                relay: run(iperf(8e9), 0.25),
                mesh: run(iperf(6e9), 0.5),
            },
            LoadResult {
                load: LOADS[1],
                direct: run(wrk(20_000.0, 60_000, 40.0), 0.0),
                relay: run(wrk(16_000.0, 48_000, 50.0), 0.12),
                mesh: run(wrk(12_000.0, 36_000, 70.0), 0.3),
            },
            LoadResult {
                load: LOADS[2],
                direct: run(wrk(50_000.0, 150_000, 900.0), 0.0),
                relay: run(wrk(40_000.0, 120_000, 1000.0), 0.6),
                mesh: run(wrk(20_000.0, 60_000, 2000.0), 0.9),
            },
            LoadResult {
                load: LOADS[4],
                direct: run(fixed(1_000.0, 10), 0.0),
                relay: run(fixed(1_000.0, 15), 0.3),
                mesh: run(fixed(990.0, 20), 0.6),
            },
        ];
        let args = Args {
            duration: Duration::from_secs(3),
            quick: true,
            json: Some(PathBuf::from("out.json")),
            plot: None,
            ztunnel: None,
            proxy_env: Vec::new(),
            only: Vec::new(),
            callgrind: None,
        };
        let machine = Machine {
            cores: 2,
            kernel: "6.1".into(),
            cpu: "test".into(),
            load_average: "0.1 0.2 0.3".into(),
        };
        let tools = Tools {
            ztunnel: PathBuf::from("/bin/ztunnel"),
            clk_tck: 100,
            clk_tck_source: "getconf CLK_TCK",
            wrk_version: "wrk 4.1.0".into(),
            iperf3_version: "iperf 3.12".into(),
            proxy_env: Vec::new(),
            callgrind: None,
            code_layout: "2246 of the 2246 functions".into(),
        };
        let results = Results {
            idle_kib: [5_000, 6_000],
            relay_idle_kib: [2_000, 2_100],
            idle_connections: IdleConnections {
                count: 500,
                before_kib: [5_000, 6_000],
                open_kib: [9_000, 11_000],
            },
            loads,
            load_average_after: "1 1 1".into(),
            hbone_connections_total: 1,
        };
        Report::new(&args, &machine, &tools, results)
    }

    #[test]
    fn targets_are_judged_from_the_derived_figures() {
        let targets = report().targets();
        let find = |what: &str| targets.iter().find(|t| t.what.starts_with(what)).unwrap().clone();
        // 6 of 10 Gbit/s; 1 CPU-second over 2 GB.
        let bulk = find("iperf3");
        assert!((bulk.value - 0.6).abs() < 1e-9 && bulk.met);
        let cpu = find("bulk CPU");
        assert!((cpu.value - 0.5).abs() < 1e-9 && cpu.met);
        // 1.8 CPU-seconds over 60,000 requests: 30 ms per 1,000, over the 20 ms bound.
        let per_request = find("wrk 64: CPU");
        assert!((per_request.value - 30.0).abs() < 1e-9 && !per_request.met);
        let added = find("wrk 1 connection: added");
        assert!((added.value - 30.0).abs() < 1e-9 && added.met);
        // 4,000 KiB over 500 connections = 8.2 KB; 5,000 KiB = 10.24 KB, over the bound.
        let per_connection = find("RSS per idle");
        assert!((per_connection.value - 10.24).abs() < 1e-9 && !per_connection.met);
        // The Connection: close load did not run, so it has no row.
        assert!(!targets.iter().any(|t| t.what.starts_with("Connection: close")));
    }

    #[test]
    fn the_table_and_the_json_carry_every_load_and_the_machine() {
        let report = report();
        let table = report.table();
        // Relay 8 of 10 Gbit/s, mesh 6: 80 %, 60 %, and the mesh keeps 75 % of the floor. The relays
        // spent 0.5 s over 2 GB, the proxies 1 s.
        assert!(
            table.contains(
                "| iperf3, 1 stream | 10.00 Gbit/s | 8.00 Gbit/s | 6.00 Gbit/s | 80 % | **60 %** | 75 % | - | - \
                 | 0.25 s/GB (0.50 s) | 0.50 s/GB (1.00 s) |"
            ),
            "{table}"
        );
        assert!(table.contains("--quick --json out.json"), "{table}");
        // The fixed-rate load: a row in the main table (achieved rate, p50 and p99, CPU per 1,000
        // requests: 1.2 s over 3,000) and its distribution in its own table.
        assert!(
            table.contains(
                "| fixed rate 1,000 req/s, 4 conns | 1000 req/s | 1000 req/s | 990 req/s | 100 % | **99 %** | 99 % \
                 | 10 / 15 / 20 µs | 100 / 150 / 200 µs | 200.0 ms/1k req (0.60 s) | 400.0 ms/1k req (1.20 s) |"
            ),
            "{table}"
        );
        assert!(
            table.contains(
                "| fixed rate 1,000 req/s, 4 conns | relay | 3000 | 1000 req/s | 15 µs | 15 µs | 150 µs | 1500 µs | 1500 µs | 5 µs |"
            ),
            "{table}"
        );
        assert!(
            table.contains(
                "| mesh - relay | | | **+5 µs** | **+5 µs** | **+50 µs** | **+500 µs** | **+500 µs** | |"
            ),
            "{table}"
        );
        // One line per load against the floor: wrk 1 connection keeps 12,000 of the relay's 16,000 req/s,
        // and its p50 is 20 µs above the relay's.
        assert!(
            table.contains(
                "- wrk keep-alive, 1 conn: mesh / relay **75 %** (relay / direct 80 %, mesh / direct 60 %); \
                 CPU: proxies 16.67 ms/1k req, relays 5.00 ms/1k req; p50 mesh - relay +20 µs"
            ),
            "{table}"
        );
        assert!(
            table.contains("idle RSS client relay 2.0 MB, server relay 2.2 MB"),
            "{table}"
        );
        assert!(
            table.contains(
                "| fixed rate 1,000 req/s, 4 conns | mesh | 3000 | 990 req/s | 20 µs | 20 µs | 200 µs | 2000 µs | 2000 µs | 5 µs |"
            ),
            "{table}"
        );
        assert!(
            table.contains("| mesh - direct | | | **+10 µs** | **+10 µs** | **+100 µs** | **+1000 µs** | **+1000 µs** | |"),
            "{table}"
        );
        let json: Value = serde_json::from_str(&report.json()).unwrap();
        assert_eq!(json["machine"]["cores"], 2);
        assert_eq!(json["loads"].as_array().unwrap().len(), 4);
        let fixed = &json["loads"][3];
        assert_eq!(fixed["mesh"]["output"]["latency_us"]["p99.9"], 2_000);
        assert_eq!(fixed["direct"]["output"]["requests"], 3_000);
        assert_eq!(fixed["added_p50_us"], 10.0);
        let distribution = fixed["mesh"]["output"]["distribution_percentile_us"]
            .as_array()
            .unwrap();
        assert_eq!(distribution.last().unwrap(), &serde_json::json!([100.0, 2_000]));
        assert_eq!(json["loads"][2]["cpu_ms_per_1000_requests"], 30.0);
        // The relays of the 64-connection load: 1.2 s over 120,000 requests.
        let relays = json["loads"][2]["relays_cpu_ms_per_1000_requests"]
            .as_f64()
            .unwrap();
        assert!((relays - 10.0).abs() < 1e-9, "{relays}");
        assert_eq!(json["loads"][2]["mesh_over_relay"], 0.5);
        assert_eq!(json["loads"][0]["relays_cpu_seconds_per_gb"], 0.25);
        assert_eq!(json["loads"][1]["relay"]["output"]["requests"], 48_000);
        assert_eq!(json["loads"][1]["relay"]["client_relay"]["cpu_seconds"], 0.12);
        assert_eq!(json["relay_idle_rss_kib"]["server_relay"], 2_100);
        assert_eq!(json["idle_connections"]["count"], 500);
        assert!(
            json["targets"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["met"] == false)
        );
    }
}
