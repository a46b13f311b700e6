//! Lays out the release binary's code so that what a running proxy executes sits together.
//!
//! `symbol-order.txt` lists the functions a proxy ran from start-up through idleness and traffic (made by
//! `update-symbol-order.sh` under callgrind). The linker places them first in `.text`, in that order;
//! everything else follows as usual. The kernel maps code in 64 KiB groups around each page that faults,
//! so with the functions a proxy uses spread over the whole 8.5 MiB `.text`, nearly all of it became
//! resident: packed together they cost a third of that (idle RSS 11.5 -> 7.5 MB, docs/performance.md).
//! Names the binary no longer has are skipped silently, so a stale list only costs memory.
//!
//! Only for release builds for `x86_64-unknown-linux-gnu` with rustc 1.90 or newer, whose default linker
//! is LLD (which knows `--symbol-ordering-file`), and only when no other linker is chosen through
//! RUSTFLAGS or `CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER`. `MESHKIT_SYMBOL_ORDER=off` turns it off
//! (for a linker chosen in a Cargo config file, which a build script cannot see).

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=symbol-order.txt");
    println!("cargo:rerun-if-env-changed=MESHKIT_SYMBOL_ORDER");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER");
    let env = |name: &str| std::env::var(name).unwrap_or_default();
    let wanted = env("MESHKIT_SYMBOL_ORDER") != "off"
        && env("TARGET") == "x86_64-unknown-linux-gnu"
        && env("PROFILE") == "release"
        && std::env::var_os("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER").is_none()
        && !env("CARGO_ENCODED_RUSTFLAGS").contains("linker")
        && rustc_links_with_lld(&env("RUSTC"));
    if !wanted {
        return;
    }
    let order = Path::new(&env("CARGO_MANIFEST_DIR")).join("symbol-order.txt");
    if order.is_file() {
        println!(
            "cargo:rustc-link-arg-bin=ztunnel=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bin=ztunnel=-Wl,--no-warn-symbol-ordering");
    }
}

/// Whether `rustc` is 1.90 or newer, the first to link `x86_64-unknown-linux-gnu` with its own LLD.
fn rustc_links_with_lld(rustc: &str) -> bool {
    let Ok(out) = Command::new(if rustc.is_empty() { "rustc" } else { rustc })
        .arg("--version")
        .output()
    else {
        return false;
    };
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let version = String::from_utf8_lossy(&out.stdout);
    let mut numbers = version
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .split('.')
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    (major, minor) >= (1, 90)
}
