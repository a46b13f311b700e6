//! A process's CPU time and memory from `/proc`: `/proc/<pid>/stat` for user and system time (all threads,
//! in clock ticks), `/proc/<pid>/status` for the resident set now (`VmRSS`) and at its highest (`VmHWM`).

use crate::{Error, Result};

/// One reading of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sample {
    /// User plus system time of all its threads so far, in clock ticks.
    pub(crate) cpu_ticks: u64,
    /// Resident set size now, KiB.
    pub(crate) rss_kib: u64,
    /// The highest resident set size since the process started, KiB.
    pub(crate) hwm_kib: u64,
}

/// Reads `pid`'s CPU time and memory.
pub(crate) fn sample(pid: u32) -> Result<Sample> {
    let read = |file: &str| {
        let path = format!("/proc/{pid}/{file}");
        std::fs::read_to_string(&path).map_err(|e| Error::Io(format!("reading {path}"), e))
    };
    let stat = read("stat")?;
    let status = read("status")?;
    let unreadable = |what: &str| Error::Load(format!("/proc/{pid}/{what} has an unexpected format"));
    Ok(Sample {
        cpu_ticks: cpu_ticks(&stat).ok_or_else(|| unreadable("stat"))?,
        rss_kib: status_kib(&status, "VmRSS").ok_or_else(|| unreadable("status VmRSS"))?,
        hwm_kib: status_kib(&status, "VmHWM").ok_or_else(|| unreadable("status VmHWM"))?,
    })
}

/// `utime + stime` (fields 14 and 15) of a `/proc/<pid>/stat` line. The command name (field 2) is in
/// parentheses and may itself contain spaces or parentheses, so fields are counted after the last `)`.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts at field 3 (the state), so fields 14 and 15 are its 12th and 13th.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// A `<key>:   1234 kB` line of `/proc/<pid>/status`, in KiB.
fn status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if name != key {
            return None;
        }
        value.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_after_the_command_name_even_when_it_has_spaces() {
        let stat = "4200 (tokio (w) 1) S 1 4200 4200 0 -1 4194560 1200 0 0 0 731 269 0 0 20 0 3 0 \
                    123 159108096 4004 18446744073709551615";
        assert_eq!(cpu_ticks(stat), Some(731 + 269));
        assert_eq!(cpu_ticks("4200 (ztunnel) S 1"), None);
    }

    #[test]
    fn memory_lines_are_read_in_kib() {
        let status = "Name:\tztunnel\nVmHWM:\t   24076 kB\nVmRSS:\t   16036 kB\nThreads:\t4\n";
        assert_eq!(status_kib(status, "VmRSS"), Some(16_036));
        assert_eq!(status_kib(status, "VmHWM"), Some(24_076));
        assert_eq!(status_kib(status, "VmSwap"), None);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let before = sample(std::process::id()).unwrap();
        assert!(before.rss_kib > 0);
        assert!(before.hwm_kib >= before.rss_kib);
    }
}
