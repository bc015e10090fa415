#!/usr/bin/env bash
# Runs every test: installs the peers the tests need (scripts/setup.sh), builds, checks style
# (fmt, clippy with warnings as errors, docs of every public item), runs the Rust
# unit/property tests, a short run of every fuzz target, and the Python suites that drive the real binary against
# qemu-storage-daemon. Prints each runner's summary; exits non-zero on any failure.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

SECONDS=0
phase() { # a phase's heading, with the minutes and seconds spent so far
  printf '== %s (at %dm%02ds)\n' "$1" $((SECONDS / 60)) $((SECONDS % 60))
}

bash scripts/setup.sh

phase "cargo build"
cargo build --workspace --all-targets --locked 2>&1 | tail -n 3

phase "style: cargo fmt, cargo clippy, cargo doc (public items documented)"
style() { # a check's output only when it fails
  "$@" >target/style.log 2>&1 || { cat target/style.log; echo "style check failed: $*" >&2; exit 1; }
}
style cargo fmt --all --check
style cargo fmt --manifest-path fuzz/Cargo.toml --check
style cargo clippy --workspace --all-targets --locked -- -D warnings
RUSTDOCFLAGS="-D warnings" style cargo doc --workspace --no-deps --locked
echo "style: fmt, clippy and doc clean"

phase "cargo test"
cargo test --workspace --locked 2>&1 | tee target/cargo-test.log | grep -E '^(test result|running|error|failures:|---- )' || true
if grep -qE '^test result: FAILED|^error' target/cargo-test.log; then
  echo "cargo test failed" >&2
  exit 1
fi
passed=$(grep -oE 'ok\. [0-9]+ passed' target/cargo-test.log | awk '{s+=$2} END {print s+0}')
echo "cargo test: ${passed} passed, 0 failed"

phase "fuzz: libFuzzer, ${FUZZ_SECONDS:-30} s per target, sandboxed (fuzz/run.sh)"
if ! bash fuzz/run.sh all "${FUZZ_SECONDS:-30}" >target/fuzz.log 2>&1; then
  grep -E '^(== fuzz|fuzz:)|panicked|ERROR|SUMMARY' target/fuzz.log | tail -n 40
  echo "fuzzing found something (target/fuzz.log; inputs under fuzz/work/*/artifacts)" >&2
  exit 1
fi
awk '/^== fuzz/ {t=$3} /^stat::number_of_executed_units/ {n=$2}
     /^stat::new_units_added/ {printf "fuzz %s: %s runs, %s new corpus units, no findings\n", t, n, $2}' \
  target/fuzz.log

phase "pytest (tests/python, against the real binary and qemu-storage-daemon)"
# Two processes, each taking a whole module at a time (a module's tests share servers on
# fixed ports, such as NFS's): about 9.5 minutes here, against 16 in one process (three take
# 7.5, but load the machine enough to shake timing-bound tests of qemu-system loose).
# A test that hangs fails after 300 s (the slowest takes about 95 s here) with its stack, and
# the whole run is interrupted after 45 minutes, so a hang costs one test, never CI's whole
# budget, and the summary still names what failed.
rc=0
timeout --signal=INT --kill-after=60 2700 \
  .venv/bin/python -m pytest tests/python -q -p no:cacheprovider -rfEs --timeout=300 --durations=15 \
  -n 2 --dist loadfile || rc=$?
phase "done"
exit "$rc"
