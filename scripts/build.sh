#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Build the patched QEMU out of tree in build/qemu: qemu-system-x86_64,
# qemu-img and the qtests we run.  Fetches and assembles the source first.
# Incremental: reconfigures only when the configure line changes.
#
# Usage: scripts/build.sh [extra ninja targets...]
set -euo pipefail
# shellcheck disable=SC2034 # read by lib/common.sh
NASDEDUP_NAME=build
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$(dirname "$0")/lib/common.sh"
top=$NASDEDUP_TOP

"$top/scripts/assemble.sh"
src="$top/build/qemu-src"
bld="$top/build/qemu"

use_ccache
CONFIGURE=("${QEMU_CONFIGURE[@]}")
want="${CONFIGURE[*]}"
if [ ! -f "$bld/build.ninja" ] || [ "$(cat "$bld/.nasdedup-configure" 2>/dev/null)" != "$want" ]; then
    say "configure ${CONFIGURE[*]}"
    rm -rf "$bld"
    mkdir -p "$bld"
    (cd "$bld" && "$src/configure" "${CONFIGURE[@]}" >configure.log 2>&1) || {
        tail -40 "$bld/configure.log" >&2
        say "configure failed; full log: $bld/configure.log"
        exit 1
    }
    echo "$want" > "$bld/.nasdedup-configure"
fi

TARGETS=(qemu-system-x86_64 qemu-img qemu-io
         tests/qtest/migration-test tests/qtest/nas-dedup-test "$@")
say "ninja ${TARGETS[*]}"
ninja -C "$bld" "${TARGETS[@]}" >&2
# Run from the build tree, QEMU looks for its data under qemu-bundle/<path>:
# point those paths at Debian's firmware packages.
for d in /usr/share/qemu /usr/share/seabios /usr/lib/ipxe/qemu; do
    mkdir -p "$bld/qemu-bundle$(dirname "$d")"
    ln -sfn "$d" "$bld/qemu-bundle$d"
done
"$bld/qemu-system-x86_64" --version | head -1 >&2
