#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# The benchmark command: dedup-nas against plain pre-copy, xbzrle and
# multifd+zstd on the same guest, side by side (scripts/bench.py does the
# runs and the report).  Sets everything up first, like the demo:
# packages, the QEMU build, the guest assets, the NFS export (stopped
# again at the end if this script started it).
#
# Usage: scripts/bench.sh [--matrix smoke|links|postcopy|scaling|standard|full] [--doc] [...]
#        scripts/bench.sh --help        (every option of scripts/bench.py)
#
#   scripts/bench.sh --doc          the results page docs/benchmark.md
#                                   (standard matrix, about an hour)
#   scripts/bench.sh --matrix smoke one scenario, two modes (the test
#                                   command runs this)
#   scripts/bench.sh --matrix links --out build/bench-links
#                                   1 GiB, 60 % page cache on 1 GbE, 10 GbE
#                                   and uncapped links (and 0 % on 10 GbE),
#                                   every mode, multifd and dedup-nas with
#                                   multifd among them, each without and
#                                   with destination RAM preallocation;
#                                   then the scaling series (~1 h 45 min)
#   scripts/bench.sh --matrix postcopy --out build/bench-postcopy
#                                   1 GiB, 60 % page cache, 1 GbE: pre-copy,
#                                   postcopy, dedup-nas, dedup-nas+postcopy;
#                                   when the guest runs on the destination
#                                   (about 5 min)
#   scripts/bench.sh --matrix scaling
#                                   the scaling series alone: 1, 2, 4 and
#                                   8 GiB guests at 60 % page cache, 1 GbE
#                                   (about 50 min; a short test:
#                                   --only '^(1G|2G),')
#   scripts/bench.sh --stress [N]   randomized RAM-identity stress: N (30)
#                                   migrations of /nas-dedup/stress, each
#                                   with random page-cache share, raw or
#                                   qcow2, index size, bandwidth and guest
#                                   and foreign disk churn; report in
#                                   build/bench/stress.txt (no NFS needed)
#
# Environment: NASDEDUP_SKIP_SETUP=1 skips packages and build (the test
# command has done them).
set -euo pipefail
# shellcheck disable=SC2034 # read by lib/common.sh
NASDEDUP_NAME=bench
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$(dirname "$0")/lib/common.sh"

case " $* " in *" --help "* | *" -h "*) exec "$NASDEDUP_PYTHON" "$NASDEDUP_TOP/scripts/bench.py" --help ;; esac
need_root
if [ "${NASDEDUP_SKIP_SETUP:-0}" != 1 ]; then
    say "packages"
    "$NASDEDUP_TOP/scripts/install-deps.sh"
    say "QEMU with the dedup-nas series (log: build/bench-build.log)"
    mkdir -p "$NASDEDUP_BUILD"
    "$NASDEDUP_TOP/scripts/build.sh" >"$NASDEDUP_BUILD/bench-build.log" 2>&1 || {
        tail -30 "$NASDEDUP_BUILD/bench-build.log" >&2
        die "build failed"
    }
fi

if [ "${1:-}" = --stress ]; then
    n=${2:-30}
    case $n in *[!0-9]* | "") die "--stress N: N must be a number" ;; esac
    out=$NASDEDUP_BUILD/bench
    mkdir -p "$out"
    seed=${NAS_DEDUP_STRESS_SEED:-$(date +%s)}
    say "stress: $n migrations, seed $seed (log: $out/stress.log)"
    t0=$(now_ms)
    rc=0
    (cd "$NASDEDUP_BUILD/qemu-src" &&
        NAS_DEDUP_STRESS=$n NAS_DEDUP_STRESS_SEED=$seed \
        QTEST_QEMU_BINARY="$(qemu_system)" QTEST_QEMU_IMG="$(qemu_img)" \
        exec "$NASDEDUP_QEMU_BUILD/tests/qtest/nas-dedup-test" --tap -k \
            -p /nas-dedup/stress) >"$out/stress.log" 2>&1 || rc=$?
    {
        echo "# /nas-dedup/stress: NAS_DEDUP_STRESS=$n NAS_DEDUP_STRESS_SEED=$seed, $((($(now_ms) - t0) / 1000)) s"
        grep -o 'stress-result .*' "$out/stress.log" | sed 's/^stress-result //'
        done_n=$(grep -c 'stress-result ' "$out/stress.log" || true)
        if [ "$rc" = 0 ] && grep -q '^ok 1 /nas-dedup/stress' "$out/stress.log"; then
            echo "# $done_n of $n migrations, destination RAM identical to the source's in every one (0 differing pages)"
        else
            echo "# FAILED after $done_n of $n migrations (exit status $rc): see $out/stress.log"
            grep -E 'differs|ERROR|Bail' "$out/stress.log" | head -5 | sed 's/^/#   /'
        fi
    } >"$out/stress.txt"
    cat "$out/stress.txt"
    [ "$rc" = 0 ] || exit 1
    exit 0
fi

NFS=$NASDEDUP_TOP/scripts/nfs-export.sh
NFS_STARTED=0 BENCH_PID=''
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$BENCH_PID" ] && kill -0 "$BENCH_PID" 2>/dev/null; then
        # bench.py stops the run in progress (and its QEMUs) on SIGTERM.
        kill -TERM "$BENCH_PID" 2>/dev/null || true
        wait "$BENCH_PID" 2>/dev/null || true
    fi
    [ "$NFS_STARTED" = 0 ] || "$NFS" stop || true
    exit "$rc"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM
if ! "$NFS" status >/dev/null 2>&1; then
    "$NFS" start
    NFS_STARTED=1
fi
# In the background, so that a signal reaches the trap at once.
"$NASDEDUP_PYTHON" "$NASDEDUP_TOP/scripts/bench.py" "$@" &
BENCH_PID=$!
wait "$BENCH_PID"
rc=$?
BENCH_PID=''
exit "$rc"
