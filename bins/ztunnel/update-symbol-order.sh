#!/bin/sh
# Regenerates bins/ztunnel/symbol-order.txt, the functions a running proxy executes, which the build
# script hands to the linker so that they sit together in the release binary (see build.rs).
#
# Runs meshbench (as root) with both proxies under valgrind's callgrind for start-up, one request,
# idleness, 500 idle connections and the fixed-rate load, then lists the functions of ztunnel that ran,
# those of start-up and idleness first. Rerun after dependency updates or large changes, then compare
# idle RSS with `meshbench --quick --only fixed` before and after (docs/performance.md).
set -eu
cd "$(dirname "$0")/../.."
dumps=$(mktemp -d /tmp/meshkit-callgrind.XXXXXX)
trap 'rm -rf "$dumps"' EXIT
cargo build --release -p meshkit-benches --bin meshbench
target/release/meshbench --quick --only fixed --callgrind "$dumps"
target/release/meshbench symbol-order "$dumps" > bins/ztunnel/symbol-order.txt.new
mv bins/ztunnel/symbol-order.txt.new bins/ztunnel/symbol-order.txt
echo "bins/ztunnel/symbol-order.txt: $(wc -l < bins/ztunnel/symbol-order.txt) functions"
