#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# The test command (README): sets everything up on a fresh Debian 12
# machine, then runs every suite and ends with one line
#   N passed, N failed[, N skipped]
# counted over the individual test cases of all suites.  Exit status is
# non-zero if anything failed or could not run.
#
#   1. unit tests of the QEMU-independent core (standalone meson build),
#      and 60 s of fuzzing of its decoders
#   2. builds QEMU 10.0.x with our patch series; then writes the series as
#      it would be posted and checks it: checkpatch, every prefix builds
#   3. the dedup-nas qtests (tests/qtest/nas-dedup-test.c)
#   4. the functional test: Linux guest on an NFS export, pre-copy vs dedup-nas;
#      then `virsh migrate --live` between two libvirt hosts on that export,
#      and the guest on disk layouts whose pages are not 4 KiB-aligned
#   5. the benchmark's smoke mode (one scenario, two modes, one round of the
#      tracking-overhead workload; numbers in build/bench-smoke/bench.md)
#   6. upstream's migration qtests (the set meson runs without KVM) on it
#
# Environment: NASDEDUP_SKIP_UPSTREAM=1 skips step 6 (developer loop only).
set -uo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
logdir="$top/build/test-logs"
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$(dirname "$0")/lib/common.sh"   # say, die, warn

passed=0 failed=0 skipped=0 broken=0

# Count TAP results of one suite from its log; a suite that exits non-zero
# without a failing case counts as one failure of its own.
count_tap() {
    local name=$1 log=$2 rc=$3 p f s
    p=$(grep -cE '^ok [0-9]+' "$log" | tr -d ' ')
    s=$(grep -E '^ok [0-9]+' "$log" | grep -ci '# skip' | tr -d ' ')
    f=$(grep -cE '^not ok [0-9]+' "$log" | tr -d ' ')
    p=$((p - s))
    if [ "$rc" != 0 ] && [ "$f" = 0 ]; then
        f=1
        say "$name exited with status $rc (log: $log)"
    fi
    passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))
    say "$name: $p passed, $f failed, $s skipped"
    [ "$f" = 0 ] || grep -E '^not ok' "$log" | sed 's/^/[test]   /' >&2
}

run_tap() {    # name, command...
    local name=$1; shift
    local log="$logdir/$name.tap" rc
    say "running $name"
    "$@" > "$log" 2> "$log.stderr"
    rc=$?
    count_tap "$name" "$log" "$rc"
}

# A command that is one test case: passes if it exits 0.
run_one() {    # name, command...
    local name=$1; shift
    local log="$logdir/$name.log"
    say "running $name"
    if "$@" > "$log" 2>&1; then
        passed=$((passed + 1))
        say "$name: passed"
    else
        failed=$((failed + 1))
        say "$name: FAILED (log: $log)"
        tail -15 "$log" | sed 's/^/[test]   /' >&2
    fi
}

finish() {
    echo "$passed passed, $failed failed, $skipped skipped"
    [ "$failed" = 0 ] && [ "$broken" = 0 ]
    exit $?
}

mkdir -p "$logdir"
t0=$(date +%s)

if ! scripts/install-deps.sh; then
    say "installing dependencies failed"
    failed=$((failed + 1)); broken=1; finish
fi

# 1. Core unit tests (seconds).
if [ ! -f build/core/build.ninja ]; then
    meson setup build/core >/dev/null || { failed=$((failed + 1)); finish; }
fi
if meson compile -C build/core >"$logdir/core-build.log" 2>&1; then
    for t in build/core/test-nas-dedup-*; do
        [ -x "$t" ] && [ -f "$t" ] || continue
        run_tap "unit-$(basename "$t")" "$t" --tap
    done
else
    tail -30 "$logdir/core-build.log" >&2
    say "core build failed"
    failed=$((failed + 1))
fi

# 1b. Fuzzing of every decoder of bytes from the peer (libFuzzer, ASan,
#     UBSan), for a bounded time; longer on demand: scripts/fuzz.sh SECONDS.
run_tap fuzz-nas-dedup-wire timeout 300 scripts/fuzz.sh 60

# 2. QEMU with the series.
if ! scripts/build.sh > "$logdir/qemu-build.log" 2>&1; then
    tail -40 "$logdir/qemu-build.log" >&2
    say "QEMU build failed (log: $logdir/qemu-build.log)"
    failed=$((failed + 1)); broken=1; finish
fi
say "QEMU built in $(( $(date +%s) - t0 )) s since start: $(build/qemu/qemu-system-x86_64 --version | head -1)"

# 2b. The series as it would be posted (build/posting/series): every patch
#     checkpatch-clean and signed off, every prefix builds.
run_tap posting timeout 2400 scripts/posting.sh --check

export QTEST_QEMU_BINARY="$top/build/qemu/qemu-system-x86_64"
export QTEST_QEMU_IMG="$top/build/qemu/qemu-img"
export QTEST_QEMU_STORAGE_DAEMON_BINARY="$top/build/qemu/storage-daemon/qemu-storage-daemon"
export PYTHON=/usr/bin/python3

# 3. Our qtests: real AHCI DMA, byte-for-byte RAM comparison, races,
#    malformed streams.
run_tap nas-dedup-qtest timeout 1200 \
    sh -c 'cd build/qemu-src && exec ../qemu/tests/qtest/nas-dedup-test --tap -k'

# 4. End to end on real shared storage: a Linux guest on an NFS export,
#    pre-copy against dedup-nas (tests/functional/test_x86_64_nas_dedup.py).
run_tap functional-nas-dedup timeout 1200 scripts/functional-test.sh

# 4b. The operator's path: `virsh migrate --live` between two libvirt
#     hosts (namespaces) sharing the NFS export, with dedup-nas from the
#     domain XML, set just before migrating, and off
#     (scripts/libvirt-test.sh).
run_tap libvirt timeout 900 scripts/libvirt-test.sh

# 4c. Legacy disk layouts: ext4 with 1 KiB blocks, a partition at sector
#     63; pages found at any sector (scripts/layout-test.sh).
run_tap layouts timeout 1800 scripts/layout-test.sh

# 5. The benchmark command in its smoke mode: it must run end to end and
#    every guest must verify (the numbers are reported, not asserted).
run_one bench-smoke timeout 900 env NASDEDUP_SKIP_SETUP=1 scripts/bench.sh \
    --matrix smoke --iobench-rounds 1 --iobench-read-mb 64 --check \
    --out "$top/build/bench-smoke"

# 6. Upstream's migration qtests on the patched build.
if [ "${NASDEDUP_SKIP_UPSTREAM:-0}" != 1 ]; then
    # Run from the source tree, as meson does (analyze-script needs it).
    run_tap upstream-migration-test timeout 1800 \
        sh -c 'cd build/qemu-src && exec ../qemu/tests/qtest/migration-test --tap -k'
fi

say "total time $(( $(date +%s) - t0 )) s"
finish
