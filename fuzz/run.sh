#!/usr/bin/env bash
# Builds the fuzz targets with libFuzzer on the stable toolchain and runs them, each in a
# sandbox: a private mount namespace where every file system is read-only but the target's
# work directory, with empty /dev, /proc and /sys, and a private network namespace (fuzzed
# QMP commands and images may name any path or address).
#
#   fuzz/run.sh TARGET|all [SECONDS] [libFuzzer options...]
#
# TARGET: qmp_session, nbd_session, nbd_client, qcow2_image, command_line. SECONDS: per target (60).
# Seeds come from fuzz/seeds/TARGET (written by fuzz/seeds.py) and fuzz/regressions/TARGET
# (inputs that once found something, kept once fixed), both read only; new corpus entries,
# crash and hang inputs go to fuzz/work/TARGET (FUZZ_WORK overrides fuzz/work). Exits
# non-zero on a finding.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TARGETS=(command_line qmp_session nbd_session nbd_client qcow2_image)
what=${1:?usage: fuzz/run.sh TARGET|all [SECONDS] [libFuzzer options...]}
secs=${2:-60}
shift $(( $# >= 2 ? 2 : 1 ))
if [ "$what" = all ]; then chosen=("${TARGETS[@]}"); else chosen=("$what"); fi

host=$(rustc -vV | sed -n 's/^host: //p')
# libFuzzer's instrumentation through stable rustc flags (what cargo-fuzz passes, minus
# the sanitizers that need a nightly compiler): 8-bit edge counters, the PC table, and
# comparison tracing so the fuzzer can learn magic numbers and keywords.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions \
-Coverflow-checks"
# --target keeps the flags off build scripts and proc macros.
cargo build --release --quiet --locked --manifest-path fuzz/Cargo.toml --target "$host" \
    --target-dir fuzz/target --bins

work_root=${FUZZ_WORK:-$ROOT/fuzz/work}
status=0
for t in "${chosen[@]}"; do
    bin=$ROOT/fuzz/target/$host/release/$t
    [ -x "$bin" ] || { echo "fuzz: no target '$t' (${TARGETS[*]})" >&2; exit 2; }
    work=$work_root/$t
    mkdir -p "$work/corpus" "$work/artifacts" "$work/scratch" "$work/tmp" \
        "$ROOT/fuzz/regressions/$t"
    echo "== fuzz $t for ${secs}s (work: $work)"
    # Inside the namespaces: the work directory bound over itself, every other mount
    # read-only, then empty /dev, /proc and /sys.
    if ! unshare --mount --net --fork -- bash -s -- "$bin" "$work" "$ROOT/fuzz/seeds/$t" "$ROOT/fuzz/regressions/$t" "$secs" "$@" <<'SANDBOX'
set -eu
bin=$1 work=$2 seeds=$3 regressions=$4 secs=$5
shift 5
mount --make-rprivate /
mount --bind "$work" "$work"
for mp in $(awk '{print $5}' /proc/self/mountinfo); do
    case $mp in /dev|/dev/*|/proc|/proc/*|/sys|/sys/*|"$work") continue ;; esac
    mount -o remount,bind,ro "$mp" 2>/dev/null || true
done
for m in /dev /proc /sys; do mount -t tmpfs -o size=1m,mode=755,ro fuzz-empty "$m"; done
cd "$work/scratch"
export TMPDIR=$work/tmp
exec "$bin" "$work/corpus" "$seeds" "$regressions" -max_total_time="$secs" -timeout=60 \
    -rss_limit_mb=4096 -artifact_prefix="$work/artifacts/" -print_final_stats=1 "$@"
SANDBOX
    then
        echo "fuzz: $t failed: a finding leaves its input in $work/artifacts" >&2
        status=1
    fi
done
exit $status
