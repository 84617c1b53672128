#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# The benchmark command: dedup-nas against plain pre-copy, xbzrle and
# multifd+zstd on the same guest, side by side (scripts/bench.py does the
# runs and the report).  Sets everything up first, like the demo:
# packages, the QEMU build, the guest assets, the NFS export (stopped
# again at the end if this script started it).
#
# Usage: scripts/bench.sh [--matrix smoke|standard|full] [--doc] [...]
#        scripts/bench.sh --help        (every option of scripts/bench.py)
#
#   scripts/bench.sh --doc          the results page docs/benchmark.md
#                                   (standard matrix, about an hour)
#   scripts/bench.sh --matrix smoke one scenario, two modes (the test
#                                   command runs this)
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
