#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# End-to-end smoke test: boot the test guest from a real NFS export, warm its
# page cache, live-migrate it between two QEMUs and let the guest verify on
# the destination that what it read, wrote and dirtied survived.
#
#   1. scripts/guest-assets.sh   (kernel, initramfs, data disk; cached)
#   2. scripts/nfs-export.sh start; copy a fresh data disk into the export
#      (removed again on exit)
#   3. source QEMU in the namespace, disk nfs://127.0.0.1/export/e2e-PID.<fmt>;
#      wait for NASDEDUP-READY on its serial console
#   4. destination QEMU with -incoming tcp:127.0.0.1:PORT, same disk
#   5. migrate over QMP, print query-migrate's statistics
#   6. "verify" (and "verify-disk") on the destination's serial console;
#      expect NASDEDUP-VERDICT: OK
#
# Usage: scripts/e2e-smoke.sh
#
# Environment (defaults in brackets):
#   NASDEDUP_MEM            guest RAM                               [1G]
#   NASDEDUP_READ_MB        MiB the guest reads into its page cache [600]
#   NASDEDUP_WRITE_MB       MiB of new files it writes (left dirty) [16]
#   NASDEDUP_DIRTY_MB       MiB of tmpfs it keeps rewriting         [16]
#   NASDEDUP_CHURN_MB       MiB of disk files it keeps overwriting
#                           in place (+fsync) during the migration  [8]
#   NASDEDUP_DATA_MB        MiB of files on the disk  [max(400, READ_MB)]
#   NASDEDUP_DISK_FORMAT    raw | qcow2                             [raw]
#   NASDEDUP_DISK_IMAGE     image in build/guest to boot  [data.<format>]
#                           (data-1k.raw, data-p63.raw: legacy layouts,
#                           scripts/guest-assets.sh layouts)
#   NASDEDUP_GUEST_DISK     the guest's device for it  [/dev/vda]
#   NASDEDUP_SYNC           1: the guest syncs after writing        [0]
#   NASDEDUP_SETTLE_S       seconds between READY and migrate       [2]
#   NASDEDUP_DST_EARLY      1: start the destination right after the
#                           source instead of after READY           [0]
#   NASDEDUP_MIGRATE_CAPS   capabilities to turn on over QMP, on both
#                           sides, before migrating, e.g. "xbzrle"  []
#   NASDEDUP_MIGRATE_PARAMS JSON for migrate-set-parameters on the source,
#                           e.g. '{"max-bandwidth": 0}' (0 = unlimited;
#                           QEMU's default is 128 MiB/s)            []
#   NASDEDUP_MIGRATE_DST_PARAMS  JSON for migrate-set-parameters on the
#                           destination, e.g. '{"multifd-compression":
#                           "zstd"}' (must match the source)        []
#   NASDEDUP_POSTCOPY       1: migrate-start-postcopy right after
#                           migrate (postcopy-ram must be on, e.g. from
#                           NASDEDUP_QEMU_ARGS); reports postcopy_ms,
#                           when the source said postcopy-active     [0]
#                           With it, the destination traces postcopy's
#                           page requests: fault_n and fault_lat_{med,
#                           p99,max}_us, from a vCPU's (or QEMU's) fault
#                           on a page not there to its placing; and
#                           dedup-nas's faults on pages still to fill read
#                           from the storage first: fault_read_n,
#                           fault_read_lat_{med,p99,max}_us, and
#                           fault_read_timeout_n (asked from the source)
#   NASDEDUP_TOUCH_MB       if > 0: the guest reads the first N MiB of
#                           its cached files over and over from READY on,
#                           timing each round ("touch" in its /init):
#                           touch_base_cs (median round on the source
#                           before the migration), touch_fill_cs_med /
#                           _max (rounds that ended on the destination
#                           and began before the migration completed) [0]
#   NASDEDUP_VERIFY_DISK    also run verify-disk on the destination [1]
#   NASDEDUP_QEMU_ARGS      extra arguments for both QEMUs          []
#                           dedup-nas must be on from the start to see
#                           the guest's disk reads, so use:
#                           "-global migration.x-dedup-nas=on
#                            -global migration.x-return-path=on"
#                           (its query-migrate stats are printed as
#                           src_dedup_* / dst_dedup_*)
#   NASDEDUP_DST_QEMU_ARGS  extra arguments for the destination QEMU
#                           only, e.g. "-mem-prealloc" (its RAM is
#                           allocated before the migration starts)  []
#   NASDEDUP_SNAPSHOT_DIR   if set: keep the destination paused at the
#                           end of the migration (-S), save the stopped
#                           source's RAM (pmemsave) as DIR/ram.bin and the
#                           disk image as DIR/disk.raw, then let the
#                           destination run; for benchmark floors   []
#   NASDEDUP_IOBENCH_ROUNDS if set (N): no migration; instead time the
#                           guest's iobench workload N times with the
#                           dedup-nas capability off and N times on, in
#                           alternating order ("IOBENCH ..." lines)  []
#   NASDEDUP_IOBENCH_WRITE_MB  MiB each iobench round writes        [32]
#   NASDEDUP_IOBENCH_READ_MB   MiB each iobench round reads        [all]
#   NASDEDUP_PORT           migration port (inside the namespace)   [4444]
#   NASDEDUP_KEEP_NFS       1: leave an export this script started  [0]
#   NASDEDUP_BOOT_TIMEOUT / NASDEDUP_MIGRATE_TIMEOUT / NASDEDUP_VERIFY_TIMEOUT
#                           seconds                         [300 / 600 / 300]
#   NASDEDUP_QEMU_WAIT_S    how long to wait for the QEMU build     [1800]
#
# Output: logs, console logs, sockets and query-migrate.json in build/e2e/;
# a final "E2E-RESULT key=value ..." line on stdout.  Besides
# query-migrate's statistics it holds src_cpu_s / dst_cpu_s, the CPU time
# (utime + stime, all threads: the source's includes the guest's vCPU)
# each QEMU used from `migrate` until the migration completed on its side,
# and dst_rss_mib, the destination's resident memory when `migrate` was
# sent.  Exit 0 only on
# NASDEDUP-VERDICT: OK.  Every process started here is killed by PID on exit.
set -euo pipefail
# shellcheck disable=SC2034 # read by lib/common.sh
NASDEDUP_NAME=e2e-smoke
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$(dirname "$0")/lib/common.sh"

MEM=${NASDEDUP_MEM:-1G}
READ_MB=${NASDEDUP_READ_MB:-600}
WRITE_MB=${NASDEDUP_WRITE_MB:-16}
DIRTY_MB=${NASDEDUP_DIRTY_MB:-16}
CHURN_MB=${NASDEDUP_CHURN_MB:-8}
DATA_MB=${NASDEDUP_DATA_MB:-$((READ_MB > 400 ? READ_MB : 400))}
FMT=${NASDEDUP_DISK_FORMAT:-raw}
# Another disk layout (scripts/guest-assets.sh layouts): the image in
# build/guest and the guest's device for the data file system.
IMAGE=${NASDEDUP_DISK_IMAGE:-data.$FMT}
GUEST_DISK=${NASDEDUP_GUEST_DISK:-/dev/vda}
SETTLE_S=${NASDEDUP_SETTLE_S:-2}
SYNC=${NASDEDUP_SYNC:-0}
DST_EARLY=${NASDEDUP_DST_EARLY:-0}
CAPS=${NASDEDUP_MIGRATE_CAPS:-}
PARAMS=${NASDEDUP_MIGRATE_PARAMS:-}
DST_PARAMS=${NASDEDUP_MIGRATE_DST_PARAMS:-}
VERIFY_DISK=${NASDEDUP_VERIFY_DISK:-1}
POSTCOPY=${NASDEDUP_POSTCOPY:-0}
TOUCH_MB=${NASDEDUP_TOUCH_MB:-0}
PORT=${NASDEDUP_PORT:-4444}
BOOT_TIMEOUT=${NASDEDUP_BOOT_TIMEOUT:-300}
MIGRATE_TIMEOUT=${NASDEDUP_MIGRATE_TIMEOUT:-600}
VERIFY_TIMEOUT=${NASDEDUP_VERIFY_TIMEOUT:-300}
RUN=$NASDEDUP_BUILD/e2e
QMP_PY=$NASDEDUP_TOP/scripts/qmp.py
NFS=$NASDEDUP_TOP/scripts/nfs-export.sh
QEMU=$(qemu_system)
QCOMM=qemu-system-x86 # /proc/PID/comm (15 characters)

need_root
case $FMT in raw | qcow2) ;; *) die "NASDEDUP_DISK_FORMAT must be raw or qcow2" ;; esac
[ "$DATA_MB" -ge "$READ_MB" ] || die "NASDEDUP_DATA_MB ($DATA_MB) < NASDEDUP_READ_MB ($READ_MB)"

# --- cleanup: only what this script started ----------------------------------
SRC_PID='' DST_PID='' NFS_STARTED=0 DISK=''
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [ -z "$SRC_PID" ] || kill_pid "$SRC_PID" "$QCOMM" 10
    [ -z "$DST_PID" ] || kill_pid "$DST_PID" "$QCOMM" 10
    if [ "$NFS_STARTED" = 1 ] && [ "${NASDEDUP_KEEP_NFS:-0}" != 1 ]; then
        "$NFS" stop || true
    fi
    [ -z "$DISK" ] || rm -f "$NASDEDUP_EXPORT_DIR/$DISK"
    exit "$rc"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

# --- assets, QEMU, export ------------------------------------------------------
NASDEDUP_DATA_MB=$DATA_MB "$NASDEDUP_TOP/scripts/guest-assets.sh"
wait_for_exe "$QEMU" "${NASDEDUP_QEMU_WAIT_S:-1800}" || die "$QEMU did not appear"
say "$("$QEMU" --version | head -1)"
mapfile -t FW < <(qemu_firmware_args "$QEMU")
[ ${#FW[@]} -eq 0 ] || say "firmware not in QEMU's own search path, adding: ${FW[*]}"
[ -f "$NASDEDUP_GUEST_DIR/$IMAGE" ] || die "no $NASDEDUP_GUEST_DIR/$IMAGE (qcow2 needs build/qemu/qemu-img; layouts: scripts/guest-assets.sh layouts)"

if ! "$NFS" status >/dev/null 2>&1; then
    "$NFS" start
    NFS_STARTED=1
fi
mkdir -p "$RUN"
rm -f "$RUN"/*.sock "$RUN"/*.log "$RUN"/*.json
# A fresh copy under a new name each run: ganesha caches directory entries
# and handles, so a file replaced by rename reads as NFS3ERR_STALE.
# Copies left by earlier runs that were killed (their PID is gone); another
# run's copy stays.
for f in "$NASDEDUP_EXPORT_DIR"/e2e-*.raw "$NASDEDUP_EXPORT_DIR"/e2e-*.qcow2; do
    [ -e "$f" ] || continue
    pid=${f##*/e2e-}
    pid=${pid%.*}
    case $pid in *[!0-9]* | "") continue ;; esac
    pid_alive "$pid" || rm -f "$f"
done
DISK=e2e-$$.$FMT
t0=$(now_ms)
cp --sparse=always "$NASDEDUP_GUEST_DIR/$IMAGE" "$NASDEDUP_EXPORT_DIR/$DISK"
say "fresh copy of $IMAGE in the export as $DISK ($(($(now_ms) - t0)) ms)"

# --- QEMUs ---------------------------------------------------------------------
APPEND="console=ttyS0 panic=-1 quiet nasdedup.read_mb=$READ_MB nasdedup.write_mb=$WRITE_MB nasdedup.dirty_mb=$DIRTY_MB nasdedup.churn_mb=$CHURN_MB nasdedup.sync=$SYNC nasdedup.disk=$GUEST_DISK"
# -display none -nodefaults instead of -nographic: no monitor/serial on
# stdio, no default NIC (whose option ROM q35 would need).
read -r -a EXTRA <<<"${NASDEDUP_QEMU_ARGS:-}"
read -r -a DST_EXTRA <<<"${NASDEDUP_DST_QEMU_ARGS:-}"
# Postcopy's page requests, timestamped, for the fault latencies.
[ "$POSTCOPY" != 1 ] ||
    DST_EXTRA+=(-msg timestamp=on -trace postcopy_page_req_add -trace postcopy_page_req_del
                -trace nas_dedup_load_fill_urgent_done)
# shellcheck disable=SC2054 # commas are QEMU option syntax
QARGS=("${FW[@]}" -M q35 -accel tcg -m "$MEM" -smp 1 -display none -nodefaults -no-reboot
    -kernel "$NASDEDUP_GUEST_DIR/vmlinuz" -initrd "$NASDEDUP_GUEST_DIR/initrd.gz"
    -append "$APPEND"
    -drive "file=nfs://127.0.0.1/export/$DISK,format=$FMT,if=none,id=disk0,cache.direct=on"
    -device virtio-blk-pci,drive=disk0,id=vd0
    "${EXTRA[@]}")

# start_qemu NAME [ARGS...]: start a QEMU in the namespace; sets QEMU_PID.
# Its serial console is $RUN/NAME-serial.sock (also logged to
# $RUN/NAME-console.log), QMP $RUN/NAME-qmp.sock, output $RUN/NAME-qemu.log.
start_qemu() {
    local name=$1
    shift
    "$NFS" exec "$QEMU" "${QARGS[@]}" -name "$name" \
        -chardev "socket,id=ser0,path=$RUN/$name-serial.sock,server=on,wait=off,logfile=$RUN/$name-console.log" \
        -serial chardev:ser0 \
        -qmp "unix:$RUN/$name-qmp.sock,server=on,wait=off" \
        "$@" </dev/null >"$RUN/$name-qemu.log" 2>&1 &
    QEMU_PID=$!
    # nsenter execs QEMU, so $! is QEMU's PID once the exec happened.
    wait_for 5 0.05 pid_alive "$QEMU_PID" "$QCOMM" || {
        cat "$RUN/$name-qemu.log" >&2
        die "$name QEMU did not start"
    }
}

# The destination waits on -incoming; sets DST_PID.
start_dst() {
    local paused=()
    [ -z "${NASDEDUP_SNAPSHOT_DIR:-}" ] || paused=(-S)
    start_qemu dst -incoming "tcp:127.0.0.1:$PORT" "${paused[@]}" "${DST_EXTRA[@]}"
    DST_PID=$QEMU_PID
    "$NASDEDUP_PYTHON" "$QMP_PY" wait-status "$RUN/dst-qmp.sock" inmigrate --timeout 30 >/dev/null ||
        die "destination not in state inmigrate"
}

qmp() { "$NASDEDUP_PYTHON" "$QMP_PY" cmd "$@"; }

# cpu_ticks PID: utime + stime of PID, all its threads, in clock ticks
# (/proc/PID/stat fields 14 and 15, counted after the ")" that ends comm).
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() {
    local st
    st=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    st=${st##*) }
    # shellcheck disable=SC2086 # split into fields on purpose
    set -- $st
    echo $((${12} + ${13}))
}
# ticks_s TICKS: seconds, two decimals.
ticks_s() { awk -v t="$1" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", t / hz }'; }

# wait_console NAME PID REGEX TIMEOUT_S: wait for a console line matching
# REGEX; fail early on a FAIL verdict or when QEMU exits.
wait_console() {
    local name=$1 pid=$2 re=$3 timeout=$4 log deadline
    log=$RUN/$name-console.log
    deadline=$(($(now_ms) + timeout * 1000))
    while :; do
        if grep -aEq "$re" "$log" 2>/dev/null; then
            return 0
        fi
        if grep -aq 'NASDEDUP-VERDICT: FAIL' "$log" 2>/dev/null; then
            grep -a 'NASDEDUP-VERDICT: FAIL' "$log" >&2
            die "$name guest reported a failure (console: $log)"
        fi
        if ! pid_alive "$pid" "$QCOMM"; then
            tail -20 "$log" "$RUN/$name-qemu.log" >&2 || true
            die "$name QEMU exited while waiting for /$re/"
        fi
        [ "$(now_ms)" -lt "$deadline" ] || {
            tail -20 "$log" >&2 || true
            die "$name: no /$re/ within ${timeout}s (console: $log)"
        }
        sleep 0.1
    done
}

say "source: -m $MEM, append '$APPEND', disk nfs://127.0.0.1/export/$DISK"
t_launch=$(now_ms)
start_qemu src
SRC_PID=$QEMU_PID
[ "$DST_EARLY" = 0 ] || start_dst
wait_console src "$SRC_PID" 'nasdedup: init start' "$BOOT_TIMEOUT"
t_init=$(now_ms)
wait_console src "$SRC_PID" 'NASDEDUP-READY' "$BOOT_TIMEOUT"
t_ready=$(now_ms)
ready_line=$(grep -a 'NASDEDUP-READY' "$RUN/src-console.log" | head -1 | tr -d '\r')
say "boot: /init after $((t_init - t_launch))ms, ready after $((t_ready - t_launch))ms: $ready_line"
grep -a 'nasdedup: read ' "$RUN/src-console.log" | tr -d '\r' | sed 's/^/    /' >&2 || true
# guest_uptime NAME: the guest's /proc/uptime, asked on NAME's console.
guest_uptime() {
    "$NASDEDUP_PYTHON" "$QMP_PY" serial "$RUN/$1-serial.sock" --send ping \
        --expect 'NASDEDUP-PONG' --timeout 30 | grep -a 'NASDEDUP-PONG' | tail -1 |
        tr -d '\r' | sed 's/.*uptime=//'
}
if [ "$TOUCH_MB" -gt 0 ]; then
    "$NASDEDUP_PYTHON" "$QMP_PY" serial "$RUN/src-serial.sock" --send "touch $TOUCH_MB" \
        --expect 'NASDEDUP-TOUCH' --timeout 60 >/dev/null || die "no touch round from the guest"
fi
sleep "$SETTLE_S"

# --- iobench: the guest's disk workload with tracking off and on -----------------
if [ -n "${NASDEDUP_IOBENCH_ROUNDS:-}" ]; then
    iobench() {    # on|off
        local out
        qmp "$RUN/src-qmp.sock" migrate-set-capabilities \
            "{\"capabilities\":[{\"capability\":\"dedup-nas\",\"state\":$([ "$1" = on ] && echo true || echo false)}]}" \
            >/dev/null || die "cannot turn dedup-nas $1"
        out=$("$NASDEDUP_PYTHON" "$QMP_PY" serial "$RUN/src-serial.sock" \
            --send "iobench ${NASDEDUP_IOBENCH_WRITE_MB:-32} ${NASDEDUP_IOBENCH_READ_MB:-}" \
            --expect 'NASDEDUP-IOBENCH' --timeout "$VERIFY_TIMEOUT") ||
            die "no iobench answer from the guest"
        out=$(printf '%s\n' "$out" | grep -a 'NASDEDUP-IOBENCH' | tail -1 | tr -d '\r')
        case $out in *FAIL*) die "guest: $out" ;; esac
        echo "IOBENCH tracking=$1 ${out#NASDEDUP-IOBENCH }"
    }
    for ((i = 0; i < NASDEDUP_IOBENCH_ROUNDS; i++)); do
        # off/on, then on/off: a drift of the machine hits both alike.
        if ((i % 2 == 0)); then iobench off; iobench on; else iobench on; iobench off; fi
    done
    say "iobench done"
    exit 0
fi

[ "$DST_EARLY" = 1 ] || start_dst

if [ -n "$CAPS" ]; then
    caps=$(for c in $CAPS; do printf '{"capability":"%s","state":true}\n' "$c"; done | paste -sd,)
    for side in src dst; do
        qmp "$RUN/$side-qmp.sock" migrate-set-capabilities "{\"capabilities\":[$caps]}" >/dev/null ||
            die "migrate-set-capabilities $CAPS failed on $side"
    done
    say "capabilities on: $CAPS"
fi
if [ -n "$PARAMS" ]; then
    qmp "$RUN/src-qmp.sock" migrate-set-parameters "$PARAMS" >/dev/null || die "migrate-set-parameters failed"
fi
if [ -n "$DST_PARAMS" ]; then
    qmp "$RUN/dst-qmp.sock" migrate-set-parameters "$DST_PARAMS" >/dev/null ||
        die "migrate-set-parameters failed on dst"
fi
say "source parameters: $(qmp "$RUN/src-qmp.sock" query-migrate-parameters |
    "$NASDEDUP_PYTHON" -c 'import json,sys; p=json.load(sys.stdin); print("max-bandwidth=%d B/s downtime-limit=%d ms" % (p["max-bandwidth"], p["downtime-limit"]))')"

# What query-dedup-nas-estimate predicts for this migration, just before
# it (the benchmark reports the error); empty if the command fails.
t_est=$(now_ms)
EST=$(qmp "$RUN/src-qmp.sock" query-dedup-nas-estimate 2>/dev/null |
    "$NASDEDUP_PYTHON" -c 'import json,sys
e = json.load(sys.stdin)
print(" ".join("est_%s=%d" % (k, e[k]) for k in ("total-pages", "zero-pages",
      "reference-pages", "unique-pages", "precopy-bytes", "dedup-nas-bytes",
      "storage-bytes")).replace("-", "_"), end="")' 2>/dev/null) || EST=""
[ -z "$EST" ] || EST+=" est_ms=$(($(now_ms) - t_est))"
say "estimate: ${EST:-none}"

say "migrating to tcp:127.0.0.1:$PORT"
dst_rss_kb=$(awk '/^VmRSS:/ { print $2 }' "/proc/$DST_PID/status" 2>/dev/null || echo 0)
src_cpu0=$(cpu_ticks "$SRC_PID") dst_cpu0=$(cpu_ticks "$DST_PID") dst_cpu1=''
[ "$TOUCH_MB" = 0 ] || up_mig=$(guest_uptime src)
t_mig=$(now_ms)
qmp "$RUN/src-qmp.sock" migrate "{\"uri\":\"tcp:127.0.0.1:$PORT\"}" >/dev/null
postcopy_opt=()
[ "$POSTCOPY" != 1 ] || postcopy_opt=(--start-postcopy --interval 0.01)
if ! "$NASDEDUP_PYTHON" "$QMP_PY" wait-migration "$RUN/src-qmp.sock" --timeout "$MIGRATE_TIMEOUT" \
    "${postcopy_opt[@]}" >"$RUN/query-migrate.json"; then
    cat "$RUN/query-migrate.json" >&2
    die "migration did not complete"
fi
t_migdone=$(now_ms)
src_cpu1=$(cpu_ticks "$SRC_PID")
up_done=''
[ "$TOUCH_MB" = 0 ] || [ -n "${NASDEDUP_SNAPSHOT_DIR:-}" ] || up_done=$(guest_uptime dst)
if [ -n "${NASDEDUP_SNAPSHOT_DIR:-}" ]; then
    # Both VMs are stopped now: the source's RAM and the disk are as they
    # were at switchover.
    mkdir -p "$NASDEDUP_SNAPSHOT_DIR"
    rm -f "$NASDEDUP_SNAPSHOT_DIR/ram.bin" "$NASDEDUP_SNAPSHOT_DIR/disk.raw"
    "$NASDEDUP_PYTHON" "$QMP_PY" wait-status "$RUN/dst-qmp.sock" paused --timeout 60 >/dev/null ||
        die "destination not paused after migration"
    dst_cpu1=$(cpu_ticks "$DST_PID")
    ram_bytes=$(qmp "$RUN/src-qmp.sock" query-memory-size-summary |
        "$NASDEDUP_PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["base-memory"])')
    qmp "$RUN/src-qmp.sock" pmemsave \
        "{\"val\": 0, \"size\": $ram_bytes, \"filename\": \"$NASDEDUP_SNAPSHOT_DIR/ram.bin\"}" \
        --timeout 300 >/dev/null || die "pmemsave failed"
    if [ "$FMT" = raw ]; then
        cp --sparse=always "$NASDEDUP_EXPORT_DIR/$DISK" "$NASDEDUP_SNAPSHOT_DIR/disk.raw"
    else
        "$(qemu_img)" convert -U -f "$FMT" -O raw "$NASDEDUP_EXPORT_DIR/$DISK" \
            "$NASDEDUP_SNAPSHOT_DIR/disk.raw" || die "qemu-img convert failed"
    fi
    say "snapshot at switchover: $NASDEDUP_SNAPSHOT_DIR/{ram.bin,disk.raw}"
    qmp "$RUN/dst-qmp.sock" cont >/dev/null || die "cont on the destination failed"
fi
"$NASDEDUP_PYTHON" "$QMP_PY" wait-status "$RUN/dst-qmp.sock" running --timeout 60 >/dev/null ||
    die "destination not running after migration"
[ -n "$dst_cpu1" ] || dst_cpu1=$(cpu_ticks "$DST_PID")
CPU="src_cpu_s=$(ticks_s $((src_cpu1 - src_cpu0))) dst_cpu_s=$(ticks_s $((dst_cpu1 - dst_cpu0))) dst_rss_mib=$((dst_rss_kb / 1024))"
qmp "$RUN/dst-qmp.sock" query-migrate >"$RUN/query-migrate-dst.json" || true

STATS=$("$NASDEDUP_PYTHON" - "$RUN/query-migrate.json" "$RUN/query-migrate-dst.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
try:
    dst = json.load(open(sys.argv[2]))
except (OSError, ValueError):
    dst = {}
r = m.get("ram", {})
MiB = 1 << 20
print("total_ms=%d downtime_ms=%d setup_ms=%d ram_transferred_bytes=%d "
      "ram_transferred_mib=%.1f downtime_bytes=%d ram_total_mib=%.0f normal_pages=%d "
      "zero_pages=%d dirty_sync_count=%d mbps=%.1f" % (
      m.get("total-time", -1), m.get("downtime", -1), m.get("setup-time", -1),
      r.get("transferred", -1), r.get("transferred", 0) / MiB, r.get("downtime-bytes", -1),
      r.get("total", 0) / MiB, r.get("normal", -1), r.get("duplicate", -1),
      r.get("dirty-sync-count", -1), r.get("mbps", 0.0)), end="")
if "x-postcopy-active-ms" in m:
    print(" postcopy_ms=%d postcopy_requests=%d" % (
          m["x-postcopy-active-ms"], r.get("postcopy-requests", 0)), end="")
# Statistics of the project's dedup-nas capability, when it is on.
for side, key, info in (("src", "dedup-nas", m),
                        ("dst", "dedup-nas-incoming", dst)):
    for k, v in sorted(info.get(key, {}).items()):
        if v:
            print(" %s_dedup_%s=%s" % (side, k.replace("-", "_"), v), end="")
print()
EOF
)
# What the destination's guest saw: postcopy's fault latencies (from its
# trace) and the guest's own timing of its touch rounds.
GUEST=$("$NASDEDUP_PYTHON" - "$RUN/dst-qemu.log" "$RUN/src-console.log" "$RUN/dst-console.log" \
    "$POSTCOPY" "$TOUCH_MB" "${up_mig:-0}" "${up_done:-0}" <<'EOF'
import re, sys, statistics
qlog, scon, dcon, postcopy, touch_mb, up_mig, up_done = sys.argv[1:]
out = []
def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(len(v) * p / 100))]
if postcopy == "1":
    added, lat = {}, []
    pat = re.compile(r"@(\d+\.\d+):postcopy_page_req_(add|del) \S+ page req (0x[0-9a-f]+)")
    for line in open(qlog, errors="replace"):
        m = pat.search(line)
        if not m:
            continue
        t, kind, addr = float(m.group(1)), m.group(2), m.group(3)
        if kind == "add":
            added[addr] = t
        elif addr in added:
            lat.append((t - added.pop(addr)) * 1e6)
    out.append("fault_n=%d" % len(lat))
    if lat:
        out.append("fault_lat_med_us=%d fault_lat_p99_us=%d fault_lat_max_us=%d" % (
                   statistics.median(lat), pct(lat, 99), max(lat)))
    # dedup-nas: faults on pages still to fill, read from the storage first
    # (fault to page placed), or asked from the source after the wait.
    urg = {}
    pat = re.compile(r"nas_dedup_load_fill_urgent_done \S+ 0x[0-9a-f]+ (\w+) after (\d+) us")
    for line in open(qlog, errors="replace"):
        m = pat.search(line)
        if m:
            urg.setdefault(m.group(1), []).append(int(m.group(2)))
    rd = urg.get("read", [])
    out.append("fault_read_n=%d fault_read_timeout_n=%d" % (len(rd), len(urg.get("timeout", []))))
    if rd:
        out.append("fault_read_lat_med_us=%d fault_read_lat_p99_us=%d fault_read_lat_max_us=%d" % (
                   statistics.median(rd), pct(rd, 99), max(rd)))
if int(touch_mb) > 0:
    pat = re.compile(r"NASDEDUP-TOUCH up=([0-9.]+) cs=(\d+)")
    def rounds(path, until, started):
        # (ended, or with started: began, by the guest's uptime until)
        return [int(m.group(2)) for m in (pat.search(l) for l in open(path, errors="replace"))
                if m and float(m.group(1)) - (int(m.group(2)) / 100 if started else 0)
                <= float(until)]
    base = rounds(scon, up_mig, False)
    fill = rounds(dcon, up_done, True) if float(up_done) > 0 else []
    out.append("touch_mb=%s touch_base_n=%d touch_fill_n=%d" % (touch_mb, len(base), len(fill)))
    if base:
        out.append("touch_base_cs=%d" % statistics.median(base))
    if fill:
        out.append("touch_fill_cs_med=%d touch_fill_cs_max=%d" % (statistics.median(fill), max(fill)))
print(" ".join(out), end="")
EOF
)
STATS+=${GUEST:+ $GUEST}
say "migration: $STATS $CPU (wall $((t_migdone - t_mig)) ms; full JSON: $RUN/query-migrate.json)"

# --- verification on the destination -------------------------------------------
verify() {
    local cmd=$1 out
    out=$("$NASDEDUP_PYTHON" "$QMP_PY" serial "$RUN/dst-serial.sock" --send "$cmd" \
        --expect 'NASDEDUP-VERDICT' --timeout "$VERIFY_TIMEOUT") ||
        die "no verdict for '$cmd' from the destination (console: $RUN/dst-console.log)"
    out=$(printf '%s\n' "$out" | grep -a 'NASDEDUP-VERDICT' | tail -1 | tr -d '\r')
    say "destination $cmd: $out"
    VERDICT=$out
}
verify verify
case $VERDICT in *"NASDEDUP-VERDICT: OK"*) ok=1 ;; *) ok=0 ;; esac
DISK_VERDICT=skipped
if [ "$ok" = 1 ] && [ "$VERIFY_DISK" = 1 ]; then
    verify verify-disk
    DISK_VERDICT=$VERDICT
    case $VERDICT in *"NASDEDUP-VERDICT: OK"*) ;; *) ok=0 ;; esac
fi
"$NASDEDUP_PYTHON" "$QMP_PY" serial "$RUN/dst-serial.sock" --send poweroff \
    --expect 'NASDEDUP-POWEROFF' --timeout 30 >/dev/null 2>&1 || true

result="verdict=$([ "$ok" = 1 ] && echo OK || echo FAIL) mem=$MEM read_mb=$READ_MB write_mb=$WRITE_MB dirty_mb=$DIRTY_MB churn_mb=$CHURN_MB fmt=$FMT"
result+=" boot_to_init_ms=$((t_init - t_launch)) boot_to_ready_ms=$((t_ready - t_launch)) migrate_wall_ms=$((t_migdone - t_mig)) $STATS $CPU $EST"
echo "E2E-RESULT $result"
[ "$ok" = 1 ] || die "verification failed: $VERDICT / $DISK_VERDICT"
say "OK"
