#!/usr/bin/env bash
# The whole test suite, as CI runs it. Rust crates come from crates.io via cargo; the web page's
# end-to-end test needs Debian's chromium, installed once by scripts/install-test-tools.sh. Suites
# that need a broker or an object-store server will start them from scripts/ on 127.0.0.1 and
# stop them on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
# One RUSTFLAGS for every step, so lint, build and test share one set of compiled artifacts.
export RUSTFLAGS="${RUSTFLAGS:-} -D warnings"

# A clean build with the tests is about 6 GB; a full disk shows up as a linker crash ("Bus error")
# deep in the build, so say it plainly first.
target_dir="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target_dir"
free_gb=$(df -Pk "$target_dir" | awk 'NR==2 { print int($4 / 1048576) }')
if [ "$free_gb" -lt 8 ]; then
  echo "error: only ${free_gb} GB free under $target_dir; the build and tests need about 8 GB." >&2
  echo "       Free space (e.g. 'cargo clean' in other checkouts) or set CARGO_TARGET_DIR." >&2
  exit 1
fi

scripts/install-test-tools.sh
echo "== format"
cargo fmt --all -- --check
echo "== lint"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== HDFS feature (built and linted; no NameNode runs here, see docs/storage.md)"
cargo clippy -p cairn-checkpoint --features hdfs --locked -- -D warnings
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
echo "== doctests"
cargo test --workspace --doc --locked
echo "== all tests passed"
