#!/usr/bin/env bash
# Runs every test: installs the peers the tests need (scripts/setup.sh), builds, checks style
# (fmt, clippy with warnings as errors, docs of every public item), runs the Rust
# unit/property tests and the Python suites that drive the real binary against
# qemu-storage-daemon. Prints each runner's summary; exits non-zero on any failure.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

bash scripts/setup.sh

echo "== cargo build"
cargo build --workspace --all-targets --locked 2>&1 | tail -n 3

echo "== style: cargo fmt, cargo clippy, cargo doc (public items documented)"
style() { # a check's output only when it fails
  "$@" >target/style.log 2>&1 || { cat target/style.log; echo "style check failed: $*" >&2; exit 1; }
}
style cargo fmt --all --check
style cargo clippy --workspace --all-targets --locked -- -D warnings
RUSTDOCFLAGS="-D warnings" style cargo doc --workspace --no-deps --locked
echo "style: fmt, clippy and doc clean"

echo "== cargo test"
cargo test --workspace --locked 2>&1 | tee target/cargo-test.log | grep -E '^(test result|running|error|failures:|---- )' || true
if grep -qE '^test result: FAILED|^error' target/cargo-test.log; then
  echo "cargo test failed" >&2
  exit 1
fi
passed=$(grep -oE 'ok\. [0-9]+ passed' target/cargo-test.log | awk '{s+=$2} END {print s+0}')
echo "cargo test: ${passed} passed, 0 failed"

echo "== pytest (tests/python, against the real binary and qemu-storage-daemon)"
.venv/bin/python -m pytest tests/python -q -p no:cacheprovider -rfEs
