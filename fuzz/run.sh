#!/usr/bin/env bash
# Fuzzes every target (or the ones named) for SECONDS each, starting from a copy of the seed corpus, and
# fails if any target crashes, times out or runs out of memory. See docs/fuzzing.md.
#
#   fuzz/run.sh SECONDS [--grow] [--sanitizer none|address] [TARGET...]
#
#   --grow       merge the new inputs that add coverage into fuzz/corpus/<target> (minimized), to commit
#   --sanitizer  none (the default) or address: AddressSanitizer, 5-8 times slower (docs/fuzzing.md)
#
# Needs the Rust toolchain (stable is enough: RUSTC_BOOTSTRAP=1 lets it take cargo-fuzz's -Z flags) and a C
# compiler; installs cargo-fuzz with `cargo install --locked` when it is missing. Builds every target once,
# then runs them one after the other: the whole run takes about SECONDS x targets plus the build. Builds go to
# fuzz/target/<sanitizer>, so that switching sanitizers does not rebuild everything.
set -euo pipefail

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[[ $# -ge 1 && $1 =~ ^[0-9]+$ && $1 -gt 0 ]] || usage
seconds=$1
shift
grow=0
sanitizer=none
targets=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --grow) grow=1 ;;
        --sanitizer)
            [[ $# -ge 2 ]] || usage
            sanitizer=$2
            shift
            ;;
        -*) usage ;;
        *) targets+=("$1") ;;
    esac
    shift
done
case $sanitizer in address | none) ;; *) usage ;; esac

cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=never

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "run.sh: installing cargo-fuzz (cargo install cargo-fuzz --locked)" >&2
    cargo install cargo-fuzz --locked
fi

all_targets=$(cargo fuzz list)
if [[ ${#targets[@]} -eq 0 ]]; then
    mapfile -t targets <<<"$all_targets"
fi
for target in "${targets[@]}"; do
    grep -qx "$target" <<<"$all_targets" || { echo "run.sh: no fuzz target named $target" >&2; exit 2; }
    [[ -d corpus/$target ]] || { echo "run.sh: no seed corpus in fuzz/corpus/$target" >&2; exit 2; }
done

# cargo-fuzz builds without --locked, so a stale fuzz/Cargo.lock is updated silently: say so, since CI checks
# the fuzz crate with --locked and the update has to be committed.
if ! cargo metadata --locked --format-version 1 >/dev/null 2>&1; then
    echo "run.sh: fuzz/Cargo.lock is out of date; this build updates it: commit the change" >&2
fi
echo "=== building every target (sanitizer: $sanitizer)"
build_start=$SECONDS
cargo fuzz build -O --sanitizer "$sanitizer" --target-dir "target/$sanitizer"
echo "=== built in $((SECONDS - build_start)) s"

binaries=target/$sanitizer/x86_64-unknown-linux-gnu/release
work=$(mktemp -d -t meshkit-fuzz.XXXXXX)
trap 'rm -rf "$work"' EXIT
report=()
failed=0
for target in "${targets[@]}"; do
    corpus=$work/corpus/$target
    mkdir -p "$corpus" "artifacts/$target"
    cp -r "corpus/$target/." "$corpus/"
    log=$work/$target.log
    echo "=== $target: ${seconds} s from $(ls "corpus/$target" | wc -l) seeds"
    status=0
    # -timeout: one input taking this long is a hang; -rss_limit_mb (also the largest single allocation):
    # growth a peer could cause without bound ends as an out-of-memory crash.
    "$binaries/$target" "$corpus" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="artifacts/$target/" -print_final_stats=1 >"$log" 2>&1 || status=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    per_second=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    peak=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)
    progress=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$progress")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$progress")
    units=$(sed -n 's/.* corp: \([0-9]*\)\/.*/\1/p' <<<"$progress")
    if [[ $status -eq 0 ]]; then
        result=ok
    else
        failed=1
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
        result="FAILED (exit $status)${artifact:+: fuzz/$artifact}"
        echo "--- $target failed; the end of its log:"
        tail -40 "$log"
        if [[ -n $artifact ]]; then
            echo "--- reproduce: fuzz/$binaries/$target fuzz/$artifact"
        fi
    fi
    if [[ $grow -eq 1 && $status -eq 0 ]]; then
        before=$(ls "corpus/$target" | wc -l)
        "$binaries/$target" -merge=1 "corpus/$target" "$corpus" >"$work/$target.merge.log" 2>&1
        echo "    corpus/$target: $before -> $(ls "corpus/$target" | wc -l) inputs"
    fi
    report+=("$(printf '%-18s %12s %9s %7s %7s %7s %8s  %s' "$target" "${execs:-?}" "${per_second:-?}" \
        "${cov:-?}" "${ft:-?}" "${units:-?}" "${peak:-?}" "$result")")
done

echo
echo "=== $(date -u +%Y-%m-%dT%H:%MZ), ${seconds} s per target, sanitizer $sanitizer"
printf '%-18s %12s %9s %7s %7s %7s %8s  %s\n' target executions exec/s cov features corpus "rss MB" result
printf '%s\n' "${report[@]}"
exit $failed
