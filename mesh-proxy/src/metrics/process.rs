//! Process metrics read from `/proc/self` at scrape time: open and maximum file descriptors, resident
//! memory, CPU time. Each is omitted when its file cannot be read (non-Linux, a restricted `/proc`), so a
//! scrape never fails because of them.

use std::fs;

use super::text::{MetricKind, Value, write_header, write_sample};

/// Linux reports CPU times in `/proc/<pid>/stat` in clock ticks of `USER_HZ`, which the kernel's ABI fixes
/// at 100 on every architecture it supports (`sysconf(_SC_CLK_TCK)` would need `libc` and unsafe code to
/// say the same).
const USER_HZ: f64 = 100.0;

/// Appends every process metric that can be read.
pub(crate) fn encode(out: &mut String) {
    if let Some(open) = open_fds() {
        write_header(
            out,
            "process_open_fds",
            "Number of open file descriptors.",
            MetricKind::Gauge,
        );
        write_sample(out, "process_open_fds", [], Value::Int(open));
    }
    if let Some(max) = max_fds() {
        write_header(
            out,
            "process_max_fds",
            "Maximum number of open file descriptors.",
            MetricKind::Gauge,
        );
        write_sample(out, "process_max_fds", [], Value::Int(max));
    }
    if let Some(rss) = resident_memory_bytes() {
        write_header(
            out,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            MetricKind::Gauge,
        );
        write_sample(out, "process_resident_memory_bytes", [], Value::Int(rss));
    }
    if let Some(cpu) = cpu_seconds() {
        write_header(
            out,
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
            MetricKind::Counter,
        );
        write_sample(out, "process_cpu_seconds_total", [], Value::Float(cpu));
    }
}

fn open_fds() -> Option<u64> {
    let entries = fs::read_dir("/proc/self/fd").ok()?;
    // The directory handle being read is itself an open descriptor: do not count it.
    let count = u64::try_from(entries.count()).ok()?;
    Some(count.saturating_sub(1))
}

fn max_fds() -> Option<u64> {
    parse_max_open_files(&fs::read_to_string("/proc/self/limits").ok()?)
}

fn resident_memory_bytes() -> Option<u64> {
    parse_vm_rss(&fs::read_to_string("/proc/self/status").ok()?)
}

fn cpu_seconds() -> Option<f64> {
    parse_cpu_ticks(&fs::read_to_string("/proc/self/stat").ok()?).map(|ticks| ticks as f64 / USER_HZ)
}

/// The soft limit from the `Max open files` row of `/proc/<pid>/limits` (absent when `unlimited`).
fn parse_max_open_files(limits: &str) -> Option<u64> {
    let row = limits.lines().find(|line| line.starts_with("Max open files"))?;
    row.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `VmRSS:   1234 kB` from `/proc/<pid>/status`, in bytes.
fn parse_vm_rss(status: &str) -> Option<u64> {
    let row = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let mut fields = row.trim_start_matches("VmRSS:").split_whitespace();
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") => value.checked_mul(1024),
        _ => None,
    }
}

/// `utime + stime` (fields 14 and 15) of `/proc/<pid>/stat`, in clock ticks. The command name (field 2) is
/// in parentheses and may itself contain spaces and parentheses, so fields are counted after the last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // After the name come field 3 (state) onwards: utime is field 14, the 12th of these.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_row() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_max_open_files(limits), Some(1024));
        let unlimited = "Max open files            unlimited            unlimited            files     \n";
        assert_eq!(parse_max_open_files(unlimited), None);
        assert_eq!(parse_max_open_files("nothing here"), None);
    }

    #[test]
    fn vm_rss() {
        assert_eq!(
            parse_vm_rss("Name:\tx\nVmRSS:\t    2048 kB\nThreads:\t4\n"),
            Some(2048 * 1024)
        );
        assert_eq!(parse_vm_rss("VmRSS:\t2048 MB\n"), None);
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
    }

    #[test]
    fn stat_with_a_hostile_command_name() {
        // The name `a) b (c` contains both parentheses and spaces; utime = 250, stime = 50.
        let stat = "1234 (a) b (c) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 100 1000 200";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert_eq!(parse_cpu_ticks("1234 (x) S 1"), None);
        assert_eq!(parse_cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn reads_this_process_on_linux() {
        let mut out = String::new();
        encode(&mut out);
        if cfg!(target_os = "linux") {
            for name in [
                "process_open_fds ",
                "process_max_fds ",
                "process_resident_memory_bytes ",
                "process_cpu_seconds_total ",
            ] {
                assert!(
                    out.lines().any(|line| line.starts_with(name)),
                    "{name} missing from:\n{out}"
                );
            }
        }
    }
}
