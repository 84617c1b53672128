#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# The main job (README command 1): set everything up, then live-migrate a
# real Linux guest whose disk is on a real NFS export twice -- plain
# pre-copy and dedup-nas -- over loopback TCP with max-bandwidth modelling
# a 1 GbE link, and print the numbers side by side.
#
# Environment: NASDEDUP_MEM [1G], NASDEDUP_READ_MB [600],
# NASDEDUP_DISK_FORMAT [raw], NASDEDUP_LINK_BPS [125000000], and everything
# scripts/e2e-smoke.sh takes.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$(dirname "$0")/lib/common.sh"   # say, die, warn

say "step 1/4: packages"
scripts/install-deps.sh
say "step 2/4: QEMU 10.0 with the dedup-nas series (log: build/demo-build.log)"
mkdir -p build
scripts/build.sh > build/demo-build.log 2>&1 || {
    tail -30 build/demo-build.log >&2
    say "build failed"
    exit 1
}
say "step 3/4: guest kernel, initramfs and data disk from Debian packages"
scripts/guest-assets.sh >&2

link=${NASDEDUP_LINK_BPS:-125000000}
export NASDEDUP_MEM=${NASDEDUP_MEM:-1G}
export NASDEDUP_READ_MB=${NASDEDUP_READ_MB:-600}
export NASDEDUP_MIGRATE_PARAMS="{\"max-bandwidth\": $link}"
results=()
run() {    # label, extra QEMU args
    local label=$1 out
    say "step 4/4: $label migration of a ${NASDEDUP_MEM} guest with ${NASDEDUP_READ_MB} MiB of page cache"
    out=$(NASDEDUP_QEMU_ARGS="$2" scripts/e2e-smoke.sh | grep '^E2E-RESULT ') || {
        say "$label run failed"
        results+=("mode=$label verdict=FAIL")
        return 1
    }
    results+=("mode=$label ${out#E2E-RESULT }")
}
status=0
run pre-copy "" || status=1
run dedup-nas "-global migration.x-dedup-nas=on -global migration.x-return-path=on" || status=1

python3 - "$link" "${results[@]}" <<'PY'
import sys
link = int(sys.argv[1])
rows = [dict(kv.split("=", 1) for kv in r.split() if "=" in kv) for r in sys.argv[2:]]
def num(r, k):
    try:
        return float(r.get(k, "nan"))
    except ValueError:
        return float("nan")
MB = 1e6
print()
print("Live migration over loopback TCP, max-bandwidth %.0f MB/s (1 GbE model)" % (link / MB))
if rows and "mem" in rows[0]:
    r = rows[0]
    print("guest: %s RAM, %s MiB read into page cache, %s MiB files written, %s MiB dirtied, disk %s on nfs://"
          % (r.get("mem"), r.get("read_mb"), r.get("write_mb"), r.get("dirty_mb"), r.get("fmt")))
print()
hdr = ("mode", "RAM on wire", "read from NFS", "total time", "downtime", "pages as refs", "verdict")
print("| " + " | ".join(hdr) + " |")
print("|" + "---|" * len(hdr))
for r in rows:
    print("| %s | %.1f MB | %.1f MB | %.2f s | %d ms | %d | %s |" % (
        r["mode"], num(r, "ram_transferred_bytes") / MB,
        num(r, "dst_dedup_fetched_bytes") / MB if "dst_dedup_fetched_bytes" in r else 0.0,
        num(r, "total_ms") / 1000, num(r, "downtime_ms") if r.get("downtime_ms") else -1,
        num(r, "src_dedup_reference_pages") if "src_dedup_reference_pages" in r else 0,
        r.get("verdict", "?")))
if len(rows) == 2 and all(r.get("verdict") == "OK" for r in rows):
    a, b = rows
    print()
    print("dedup-nas vs pre-copy: %.1fx fewer RAM bytes on the wire; total time %.2f s -> %.2f s (%.2fx)"
          % (num(a, "ram_transferred_bytes") / num(b, "ram_transferred_bytes"),
             num(a, "total_ms") / 1000, num(b, "total_ms") / 1000,
             num(a, "total_ms") / num(b, "total_ms")))
PY
exit $status
