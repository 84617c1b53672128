#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Run the dedup-nas functional test (tests/functional/test_x86_64_nas_dedup.py,
# in the style of QEMU's tests/functional) against the patched build:
#
#   1. the environment meson gives functional tests: QEMU_TEST_QEMU_BINARY,
#      QEMU_TEST_QEMU_IMG, QEMU_BUILD_ROOT, PYTHONPATH (build/qemu-src/python
#      and build/qemu-src/tests/functional), meson's Python (build/qemu/pyvenv,
#      which sees Debian's python3-pycotap)
#   2. scripts/guest-assets.sh (kernel, initramfs, data disk; built locally
#      from Debian packages, cached)
#   3. scripts/nfs-export.sh start, unless it already serves
#   4. the test, inside the export's network namespace; TAP on stdout (also
#      saved in build/test-logs/functional-nas-dedup.tap), test output and a
#      summary on stderr
#   5. on exit: the test process and the QEMUs it started (by PID), the disk
#      copies it put in the export, and the export if this script started it
#
# Usage: scripts/functional-test.sh
#
# Environment (defaults in brackets):
#   NASDEDUP_FT_READ_MB, _WRITE_MB, _DIRTY_MB, _CHURN_MB, _MAX_BANDWIDTH
#                       passed to the test (see its header)
#   NASDEDUP_KEEP_NFS   1: leave running an export this script started  [0]
#   NASDEDUP_FT_ONLY    run only the tests whose name matches this regex
#                       (the others are reported skipped, so the run fails)
#   QEMU_BUILD_ROOT     where the test writes its logs (as meson: the QEMU
#                       build directory)                        [build/qemu]
#   QEMU_TEST_KEEP_SCRATCH  keep the tests' scratch directories (qemu_test)
#   NASDEDUP_QEMU_WAIT_S  how long to wait for the QEMU build        [600]
#
# Exit status: 0 only if every test case passed (skips are failures here:
# this script provides everything the test needs).  Needs root (netns).
set -euo pipefail
# shellcheck disable=SC2034 # read by lib/common.sh
NASDEDUP_NAME=functional-test
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$(dirname "$0")/lib/common.sh"

TEST=$NASDEDUP_TOP/tests/functional/test_x86_64_nas_dedup.py
QEMU_SRC=$NASDEDUP_BUILD/qemu-src
NFS=$NASDEDUP_TOP/scripts/nfs-export.sh
QEMU=$(qemu_system)
QEMU_IMG=$(qemu_img)
LOGDIR=$NASDEDUP_BUILD/test-logs
TAP=$LOGDIR/functional-nas-dedup.tap
QCOMM=qemu-system-x86 # /proc/PID/comm (15 characters)
# Disk copies in the export are named $PREFIX-*.
PREFIX=ft-$$

need_root
need_cmd nsenter cp
[ -f "$TEST" ] || die "no $TEST"
if [ ! -d "$QEMU_SRC/python/qemu/machine" ] || [ ! -d "$QEMU_SRC/tests/functional/qemu_test" ]; then
    die "no QEMU source tree with python/qemu and tests/functional/qemu_test in $QEMU_SRC (scripts/build.sh)"
fi
# Another job may be relinking it: wait until it is there and stable.
wait_for_exe "$QEMU" "${NASDEDUP_QEMU_WAIT_S:-600}" || die "no $QEMU (scripts/build.sh)"
# meson runs functional tests with the Python of its pyvenv (system site
# packages included); `python3` on PATH may be another one without pycotap.
PY=$NASDEDUP_QEMU_BUILD/pyvenv/bin/python3
[ -x "$PY" ] || PY=$NASDEDUP_PYTHON
"$PY" -c 'import pycotap' 2>/dev/null ||
    die "$PY cannot import pycotap (apt-get install python3-pycotap)"

# --- cleanup: only what this script started --------------------------------
NFS_STARTED=0 PY_PID=''
# Direct children of PID whose comm is COMM.
children() {
    local parent=$1 comm=$2 p
    for p in /proc/[0-9]*; do
        [ "$(awk '{print $4}' "$p/stat" 2>/dev/null)" = "$parent" ] || continue
        [ "$(cat "$p/comm" 2>/dev/null)" = "$comm" ] && echo "${p#/proc/}"
    done
    return 0
}
cleanup() {
    local rc=$? q qemus=''
    trap - EXIT INT TERM
    if [ -n "$PY_PID" ] && pid_alive "$PY_PID"; then
        # Interrupted: the test's QEMUs are its children; note them before
        # the test goes (they would be reparented), then end both.
        qemus=$(children "$PY_PID" "$QCOMM")
        say "stopping the test (pid $PY_PID)${qemus:+ and its QEMUs: ${qemus//$'\n'/ }}"
        kill_pid "$PY_PID" '' 10
        for q in $qemus; do kill_pid "$q" "$QCOMM" 10; done
    fi
    rm -f "$NASDEDUP_EXPORT_DIR/$PREFIX"-*
    if [ "$NFS_STARTED" = 1 ] && [ "${NASDEDUP_KEEP_NFS:-0}" != 1 ]; then
        "$NFS" stop || true
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

# --- assets, export ----------------------------------------------------------
# The same data disk as scripts/e2e-smoke.sh (600 MiB of files), so the
# cached one is reused; the test reads NASDEDUP_FT_READ_MB of it.
read_mb=${NASDEDUP_FT_READ_MB:-600}
NASDEDUP_DATA_MB=${NASDEDUP_DATA_MB:-$((read_mb > 600 ? read_mb : 600))} \
    "$NASDEDUP_TOP/scripts/guest-assets.sh"
if ! "$NFS" status >/dev/null 2>&1; then
    "$NFS" start
    NFS_STARTED=1
fi

# --- the test, in the namespace ---------------------------------------------
mkdir -p "$LOGDIR"
build_root=${QEMU_BUILD_ROOT:-$NASDEDUP_QEMU_BUILD}
ENV=(QEMU_TEST_QEMU_BINARY="$QEMU"
    QEMU_TEST_QEMU_IMG="$QEMU_IMG"
    QEMU_BUILD_ROOT="$build_root"
    PYTHONPATH="$QEMU_SRC/python:$QEMU_SRC/tests/functional"
    NASDEDUP_GUEST_DIR="$NASDEDUP_GUEST_DIR"
    NASDEDUP_EXPORT_DIR="$NASDEDUP_EXPORT_DIR"
    NASDEDUP_NFS_STATE="$NASDEDUP_NFS_STATE"
    NASDEDUP_FT_PREFIX="$PREFIX"
    NASDEDUP_FT_STRICT=1
    ${NASDEDUP_FT_ONLY:+NASDEDUP_FT_ONLY="$NASDEDUP_FT_ONLY"})
say "$("$QEMU" --version | head -1): $QEMU ($(stat -c '%s bytes, modified %y' "$QEMU"))"
say "logs in $build_root/tests/functional/x86_64/"
t0=$(now_ms)
# `nfs-export.sh exec` and env exec, so $! is the test's Python.
set +e
"$NFS" exec env "${ENV[@]}" "$PY" "$TEST" > >(tee "$TAP") &
PY_PID=$!
wait "$PY_PID"
rc=$?
set -e
PY_PID=''
wait # for tee
elapsed=$((($(now_ms) - t0) / 1000))

passed=$(grep -cE '^ok [0-9]+' "$TAP" || true)
skipped=$(grep -E '^ok [0-9]+' "$TAP" | grep -ci '# skip' || true)
failed=$(grep -cE '^not ok [0-9]+' "$TAP" || true)
passed=$((passed - skipped))
say "$passed passed, $failed failed, $skipped skipped in ${elapsed}s (exit status $rc, TAP in $TAP)"
if [ "$rc" != 0 ] || [ "$failed" != 0 ] || [ "$skipped" != 0 ] || [ "$passed" = 0 ]; then
    exit 1
fi
