#!/usr/bin/env bash
# Runs meshkit's whole test suite. Installs the system packages the suite needs when it can (as root with
# apt-get), and says exactly what is missing when it cannot.
set -euo pipefail
cd "$(dirname "$0")"

# command -> Debian package. util-linux (unshare: each test's sandbox), iproute2 and iptables serve the
# network-namespace tests.
declare -A needed=([unshare]=util-linux [ip]=iproute2 [iptables]=iptables [cc]=gcc)
missing=()
for cmd in "${!needed[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${needed[$cmd]}")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: installing ${missing[*]}" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "test.sh: missing system packages: ${missing[*]}" >&2
        echo "test.sh: install them (Debian/Ubuntu: sudo apt-get install ${missing[*]}) and run again" >&2
        exit 1
    fi
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "test.sh: cargo is not installed: install Rust 1.88 or newer (https://rustup.rs) and run again" >&2
    exit 1
fi

cargo test --workspace --all-targets --locked "$@"
# Doc examples are part of the contract (every crate's overview has one); --all-targets skips them.
cargo test --workspace --doc --locked "$@"
