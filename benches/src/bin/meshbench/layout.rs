//! The code layout of the release `ztunnel`: which functions a running proxy executes.
//!
//! An idle proxy's resident memory is mostly its own code: the kernel maps a binary's pages in 64 KiB
//! groups around each page that faults, so functions scattered over the 8.5 MiB `.text` made nearly all
//! of it resident although a proxy runs about a third of it. `bins/ztunnel/symbol-order.txt` lists the
//! functions a proxy runs, and the ztunnel build script hands it to the linker
//! (`--symbol-ordering-file`), which places them together at the start of `.text`.
//!
//! This module makes that list. `meshbench --callgrind DIR` runs both proxies under valgrind's callgrind
//! and asks it for a dump ([`dump`]) after each phase of the run: start-up, one request and idleness
//! first, then the idle connections, then each load. `meshbench symbol-order DIR` reads the dumps
//! ([`executed_functions`]) and prints the mangled names of the functions of the `ztunnel` binary that
//! ran, those of the first phase first, so that what an idle proxy touches is the most tightly packed.
//! `bins/ztunnel/update-symbol-order.sh` runs both.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The valgrind command line a proxy runs under with `--callgrind DIR`: names unmangled (the linker
/// matches mangled names), no per-instruction data, one output file per process and dump.
pub(crate) fn valgrind_args(dir: &Path, name: &str, ztunnel: &Path) -> Vec<String> {
    vec![
        "--tool=callgrind".into(),
        "--demangle=no".into(),
        "--dump-instr=no".into(),
        "-q".into(),
        format!("--callgrind-out-file={}/callgrind.{name}.%p", dir.display()),
        ztunnel.display().to_string(),
    ]
}

/// Asks callgrind in process `pid` to write what it counted since the last dump (and to start counting
/// afresh), with `callgrind_control`. An error says what failed; the run goes on without that dump.
pub(crate) fn dump(pid: u32) -> Result<(), String> {
    let out = Command::new("callgrind_control")
        .args(["--dump", &pid.to_string()])
        .output()
        .map_err(|e| format!("running callgrind_control: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "callgrind_control --dump {pid}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The dump files in `dir`, in the order they were written: callgrind names them
/// `callgrind.<proxy>.<pid>.<n>` for the n-th dump on request, and writes what was left at exit to
/// `callgrind.<proxy>.<pid>` (which comes last). The first phase of both proxies comes first.
pub(crate) fn dump_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or_default();
        let parts: Vec<&str> = name.split('.').collect();
        let number = |part: &str| part.parse::<u32>().ok();
        let dump_number = match parts.as_slice() {
            ["callgrind", _, pid, dump] if number(pid).is_some() => number(dump),
            ["callgrind", _, pid] if number(pid).is_some() => Some(u32::MAX),
            _ => None,
        };
        if let Some(dump_number) = dump_number {
            files.push((dump_number, path));
        }
    }
    files.sort();
    Ok(files.into_iter().map(|(_, path)| path).collect())
}

/// The functions of the object file named `object` (by file name, e.g. `ztunnel`) that ran, from
/// callgrind dumps in the order given: each name once, where it first appears. Callgrind's recursion
/// marks (`name'2`) are dropped; so are entries without a symbol (`0x...`, `(below main)`).
pub(crate) fn executed_functions<'a>(object: &str, dumps: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for dump in dumps {
        // Callgrind compresses names: `fn=(12) name` the first time, `fn=(12)` afterwards; ids are per file.
        let mut objects: HashMap<&str, &str> = HashMap::new();
        let mut functions: HashMap<&str, &str> = HashMap::new();
        let mut in_object = false;
        for line in dump.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let (id, name) = match value.strip_prefix('(').and_then(|rest| rest.split_once(')')) {
                Some((id, rest)) => (Some(id), rest.strip_prefix(' ')),
                None => (None, Some(value)),
            };
            let table = match key {
                "ob" | "cob" => &mut objects,
                "fn" | "cfn" => &mut functions,
                _ => continue,
            };
            let name = match (id, name) {
                (Some(id), Some(name)) => {
                    table.insert(id, name);
                    Some(name)
                }
                (Some(id), None) => table.get(id).copied(),
                (None, name) => name,
            };
            match key {
                "ob" => {
                    in_object = name.is_some_and(|path| Path::new(path).file_name() == Some(object.as_ref()));
                }
                "fn" if in_object => {
                    let Some(name) = name else { continue };
                    let name = match name.rsplit_once('\'') {
                        Some((base, depth)) if depth.parse::<u32>().is_ok() => base,
                        _ => name,
                    };
                    if name.starts_with("0x") || name.starts_with('(') || name.is_empty() {
                        continue;
                    }
                    if seen.insert(name.to_owned()) {
                        order.push(name.to_owned());
                    }
                }
                _ => {}
            }
        }
    }
    order
}

/// The list the ztunnel build script hands to the linker.
pub(crate) fn symbol_order_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../bins/ztunnel/symbol-order.txt")
}

/// Below this share of the listed functions present in the binary, the report calls the list stale.
const STALE_BELOW: f64 = 0.9;

/// How much of `symbol-order.txt` the proxy binary has, as a line for the report: the list's names
/// change with the toolchain, the dependencies and the code, and names the binary lacks are laid out
/// wherever the linker puts them, which costs idle memory. Read with `nm`; says so when it cannot.
pub(crate) fn describe_layout(ztunnel: &Path) -> String {
    let listed = match std::fs::read_to_string(symbol_order_file()) {
        Ok(text) => text
            .lines()
            .map(str::to_owned)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>(),
        Err(e) => return format!("not checked (reading bins/ztunnel/symbol-order.txt: {e})"),
    };
    let out = match Command::new("nm").args(["--defined-only"]).arg(ztunnel).output() {
        Ok(out) if out.status.success() => out.stdout,
        Ok(out) => {
            return format!(
                "not checked (nm: {})",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Err(e) => return format!("not checked (running nm: {e})"),
    };
    let symbols: HashSet<&str> = std::str::from_utf8(&out)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().nth(2))
        .collect();
    let present = listed
        .iter()
        .filter(|name| symbols.contains(name.as_str()))
        .count();
    layout_line(present, listed.len())
}

fn layout_line(present: usize, listed: usize) -> String {
    let mut line = format!(
        "{present} of the {listed} functions in bins/ztunnel/symbol-order.txt are in the proxy binary"
    );
    if (present as f64) < STALE_BELOW * listed as f64 {
        line.push_str(
            " (the list is stale, which costs idle memory: rerun bins/ztunnel/update-symbol-order.sh)",
        );
    }
    line
}

/// `meshbench symbol-order DIR`: prints the functions of `ztunnel` that ran in the dumps in `DIR`.
pub(crate) fn print_symbol_order(dir: &Path) -> Result<(), String> {
    let files = dump_files(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    if files.is_empty() {
        return Err(format!(
            "no callgrind dumps in {} (meshbench --callgrind {0} writes them)",
            dir.display()
        ));
    }
    let mut texts = Vec::with_capacity(files.len());
    for file in &files {
        texts.push(std::fs::read_to_string(file).map_err(|e| format!("reading {}: {e}", file.display()))?);
    }
    let functions = executed_functions("ztunnel", texts.iter().map(String::as_str));
    if functions.is_empty() {
        return Err(format!(
            "the dumps in {} name no function of ztunnel",
            dir.display()
        ));
    }
    let mut out = functions.join("\n");
    out.push('\n');
    print!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST: &str = "\
version: 1
creator: callgrind-3.19.0
cmd: /work/main/target/release/ztunnel
events: Ir
ob=(1) /work/main/target/release/ztunnel
fl=(1) ???
fn=(1) _ZN4main17h0123456789abcdefE
10 5
cob=(2) /usr/lib/x86_64-linux-gnu/libc.so.6
cfl=(2) ???
cfn=(2) malloc
calls=1 0
0 20
fn=(3) _ZN3run17h0123456789abcdefE'2
3 4
fn=(4) 0x0000000000238ba0
1 1
ob=(2)
fl=(2)
fn=(2)
0 20
ob=(1)
fn=(5) (below main)
1 1
fn=(1)
4 4
";

    const SECOND: &str = "\
version: 1
ob=(7) /work/main/target/release/ztunnel
fl=(1) ???
fn=(9) _ZN3run17h0123456789abcdefE
1 1
fn=(8) _ZN6tunnel17h0123456789abcdefE
5 5
";

    #[test]
    fn lists_each_function_of_the_object_once_in_order_of_first_dump() {
        let functions = executed_functions("ztunnel", [FIRST, SECOND]);
        assert_eq!(
            functions,
            [
                "_ZN4main17h0123456789abcdefE",
                "_ZN3run17h0123456789abcdefE",
                "_ZN6tunnel17h0123456789abcdefE",
            ]
        );
    }

    #[test]
    fn other_objects_and_unnamed_code_are_left_out() {
        let functions = executed_functions("ztunnel", [FIRST]);
        assert!(
            !functions
                .iter()
                .any(|f| f == "malloc" || f.starts_with("0x") || f.starts_with('('))
        );
        assert!(executed_functions("libc.so.6", [FIRST]).contains(&"malloc".to_owned()));
        assert!(executed_functions("envoy", [FIRST, SECOND]).is_empty());
    }

    #[test]
    fn dump_files_come_in_dump_order_and_other_files_are_ignored() {
        let dir = std::env::temp_dir().join(format!("meshbench-layout-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let names = [
            "callgrind.server.7.2",
            "callgrind.client.6.1",
            "callgrind.client.6",
            "notes.1",
        ];
        for name in names {
            std::fs::write(dir.join(name), "").unwrap();
        }
        std::fs::write(dir.join("callgrind.server.7.10"), "").unwrap();
        let files: Vec<String> = dump_files(&dir)
            .unwrap()
            .iter()
            .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            files,
            [
                "callgrind.client.6.1",
                "callgrind.server.7.2",
                "callgrind.server.7.10",
                "callgrind.client.6"
            ]
        );
    }

    #[test]
    fn a_list_the_binary_mostly_lacks_is_called_stale() {
        assert!(!layout_line(2246, 2246).contains("stale"));
        assert!(!layout_line(2100, 2246).contains("stale"));
        let stale = layout_line(1000, 2246);
        assert!(stale.starts_with("1000 of the 2246") && stale.contains("update-symbol-order.sh"));
        assert!(symbol_order_file().is_file(), "{}", symbol_order_file().display());
    }

    #[test]
    fn an_empty_directory_is_an_error_that_says_how_to_fill_it() {
        let dir = std::env::temp_dir().join(format!("meshbench-layout-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let error = print_symbol_order(&dir).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(error.contains("--callgrind"), "{error}");
    }
}
