#!/bin/bash
# The whole vdisk test suite, as CI runs it (as root, on Debian 12):
#   scripts/test.sh
# 1. installs the packages the tests need (QEMU from bookworm-backports, a
#    guest kernel, fio, busybox), 2. checks formatting and clippy, 3. runs
#    every test: unit tests, the property test over random rings, blkio
#    client tests against vdiskd's socket, daemon contract tests and QEMU
#    guest tests, one test binary at a time, 4. one-second smoke runs of the
#    benchmarks. Prints how long each stage took.
#
# Nothing may hang it: each test binary runs under `timeout`
# (VDISK_TEST_BINARY_TIMEOUT seconds, default 900) and the whole test stage
# under a ceiling (VDISK_TEST_TIMEOUT, default 2400). A binary that hits its
# ceiling is killed with everything it started (timeout signals the whole
# process group), the script names the binary, and libtest's own "test X has
# been running for over 60 seconds" lines above name the test. Inside the
# tests, tests/common/watchdog.rs gives each wait on a process its own
# deadline, so a hang normally ends long before these ceilings.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

binary_ceiling=${VDISK_TEST_BINARY_TIMEOUT:-900}
suite_ceiling=${VDISK_TEST_TIMEOUT:-2400}

timings=()
failed=()
now() { date +%s; }

# stage NAME CMD...: runs CMD, records how long it took and whether it failed.
stage() {
    local name=$1
    shift
    echo "== $name"
    local t0 rc=0
    t0=$(now)
    "$@" || rc=$?
    local dt=$(($(now) - t0))
    if [ $rc -eq 0 ]; then
        timings+=("$(printf '%6ss  %s' "$dt" "$name")")
    else
        timings+=("$(printf '%6ss  %s  FAILED (exit %s)' "$dt" "$name" "$rc")")
        failed+=("$name")
    fi
    return $rc
}

summary() {
    echo
    echo "== time per stage"
    printf '%s\n' "${timings[@]}"
    if [ ${#failed[@]} -gt 0 ]; then
        echo "== failed: ${failed[*]}"
    fi
}
trap summary EXIT

stage "install packages" "$repo/scripts/install-deps.sh"
stage "cargo fmt --check" cargo fmt --all -- --check
stage "cargo clippy" cargo clippy --all-targets --locked -- -D warnings
stage "build tests" cargo test --locked --no-run

# One test binary under its ceiling; a timeout says so in words.
run_tests() {
    local what=$1
    shift
    local left=$((suite_deadline - $(now)))
    if [ $left -le 0 ]; then
        echo "test suite ceiling of ${suite_ceiling}s reached before $what ran" >&2
        return 124
    fi
    local limit=$((left < binary_ceiling ? left : binary_ceiling))
    local rc=0
    timeout --kill-after=10 "$limit" cargo test --locked "$@" || rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "HUNG: $what was killed after ${limit}s; the test still running is the one libtest reported as running for over 60 seconds above" >&2
    fi
    return $rc
}

suite_deadline=$(($(now) + suite_ceiling))
test_rc=0
stage "test: unit tests (lib and bins)" run_tests "unit tests" --lib --bins || test_rc=1
for t in tests/*.rs; do
    name=$(basename "$t" .rs)
    stage "test: $name" run_tests "tests/$name.rs" --test "$name" || test_rc=1
done
stage "test: doc tests" run_tests "doc tests" --doc || test_rc=1
[ $test_rc -eq 0 ] || exit 1

stage "benchmark smoke (1 s per workload)" \
    env VDISK_BENCH_SECS=1 timeout --kill-after=10 600 cargo bench --locked --bench datapath
stage "clone benchmark smoke (1 s per run)" \
    timeout --kill-after=10 600 cargo bench --locked --bench clones -- --quick
