#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# dedup-nas on the disk layouts operators still have: the Linux test guest
# on an NFS export whose file system has 1 KiB blocks (mke2fs's default
# below 512 MiB), and whose partition starts at sector 63 (the DOS-era
# default).  On neither does a guest page's content start on a 4 KiB
# boundary of the disk.  Each layout is migrated with dedup-nas
# (scripts/e2e-smoke.sh); the guest verifies its page cache, memory and
# disk on the destination, and at least 95 % of the pages it read must go
# as references.
#
# Usage: scripts/layout-test.sh       TAP on stdout, progress on stderr
# Environment: NASDEDUP_LAYOUT_READ_MB  MiB the guest reads   [200]
set -euo pipefail
# shellcheck disable=SC2034 # read by lib/common.sh
NASDEDUP_NAME=layout-test
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$(dirname "$0")/lib/common.sh"

READ_MB=${NASDEDUP_LAYOUT_READ_MB:-200}
DATA_MB=$((READ_MB > 200 ? READ_MB : 200))
LOGS=$NASDEDUP_BUILD/layout-test
mkdir -p "$LOGS"
NASDEDUP_DATA_MB=$DATA_MB "$NASDEDUP_TOP/scripts/guest-assets.sh" layouts >&2

n=0
failures=0
# layout IMAGE GUEST-DEVICE
for spec in "1k-blocks data-1k.raw /dev/vda" "partition-at-sector-63 data-p63.raw /dev/vda1"; do
    read -r name image dev <<<"$spec"
    n=$((n + 1))
    log=$LOGS/$name.log
    say "$name: $image, guest device $dev"
    # Every page found on disk goes as a reference (the split would send
    # some in full on this local link): the test counts what is found.
    if out=$(NASDEDUP_DATA_MB=$DATA_MB NASDEDUP_DISK_IMAGE=$image NASDEDUP_GUEST_DISK=$dev \
            NASDEDUP_MEM=512M NASDEDUP_READ_MB=$READ_MB NASDEDUP_WRITE_MB=0 \
            NASDEDUP_DIRTY_MB=0 NASDEDUP_CHURN_MB=0 NASDEDUP_VERIFY_DISK=1 \
            NASDEDUP_QEMU_ARGS="-global migration.x-dedup-nas=on -global migration.x-return-path=on -global migration.dedup-nas-ref-share=100" \
            timeout 900 "$NASDEDUP_TOP/scripts/e2e-smoke.sh" 2>"$log"); then
        rc=0
    else
        rc=$?
    fi
    result=$(printf '%s\n' "$out" | grep '^E2E-RESULT ' | tail -1)
    refs=$(printf '%s\n' "$result" | tr ' ' '\n' | sed -n 's/^src_dedup_reference_pages=//p')
    verified=$(printf '%s\n' "$result" | tr ' ' '\n' | sed -n 's/^dst_dedup_verified_pages=//p')
    wire=$(printf '%s\n' "$result" | tr ' ' '\n' | sed -n 's/^ram_transferred_bytes=//p')
    want=$((READ_MB * 256 * 95 / 100))
    echo "# $name: rc $rc, ${refs:-?} references (want >= $want), ${verified:-?} verified, ${wire:-?} bytes on the wire"
    if [ "$rc" = 0 ] && [ -n "$refs" ] && [ "$refs" -ge "$want" ] &&
        [ "${verified:-0}" -ge "$want" ]; then
        echo "ok $n $name: guest verdict OK, $refs of $((READ_MB * 256)) cached pages as references"
    else
        failures=$((failures + 1))
        tail -5 "$log" >&2
        echo "not ok $n $name: rc $rc, ${refs:-no} references (log $log)"
    fi
done
echo "1..$n"
[ "$failures" = 0 ]
