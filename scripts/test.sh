#!/bin/bash
# The whole vdisk test suite, as CI runs it (as root, on Debian 12):
#   scripts/test.sh
# 1. installs the packages the tests need (QEMU from bookworm-backports, a
#    guest kernel, fio, busybox), 2. checks formatting and clippy, 3. runs
#    every test: unit tests, the property test over random rings, blkio
#    client tests against vdiskd's socket, daemon contract tests and QEMU
#    guest tests, 4. a one-second smoke run of the benchmark.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

"$repo/scripts/install-deps.sh"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --locked
echo "== benchmark smoke (1 s per workload)"
VDISK_BENCH_SECS=1 cargo bench --locked --bench datapath
