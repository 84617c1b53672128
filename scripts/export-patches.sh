#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Regenerate patches/ from the commits of build/qemu-src on top of the
# "upstream" tag: one file a commit, patches/series in commit order.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
src="$top/build/qemu-src"
. "$top/scripts/lib/series.sh"
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$(dirname "$0")/lib/common.sh"   # say, die, warn
[ -d "$src/.git" ] || die "no assembled tree; run scripts/assemble.sh first"
if [ -n "$(git -C "$src" status --porcelain --untracked-files=no)" ]; then
    die "build/qemu-src has uncommitted changes to upstream files: commit them first"
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git -C "$src" format-patch -q --zero-commit --no-signature --no-stat --full-index \
    -o "$tmp" upstream..HEAD
mkdir -p "$top/patches"
rm -f "$top/patches/"*.patch
(cd "$tmp" && ls) | grep '\.patch$' > "$tmp/series.list" || true
{
    echo "# Applied in this order by scripts/assemble.sh; regenerate with scripts/export-patches.sh"
    cat "$tmp/series.list"
} > "$top/patches/series"
while read -r p; do cp "$tmp/$p" "$top/patches/$p"; done < "$tmp/series.list"
# The tree now matches patches/: record it so assemble.sh keeps it as is.
series_hash "$top" > "$src/.git/nasdedup-stamp"
git -C "$src" rev-parse HEAD >> "$src/.git/nasdedup-stamp"
say "exported $(wc -l < "$tmp/series.list") patches to patches/"
