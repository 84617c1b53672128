#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Assemble the QEMU tree we build: Debian's upstream source, then our patch
# series (patches/series, in order) as git commits, then our own new files
# overlaid as symlinks at their QEMU paths.
#
# The result, build/qemu-src, is a git repository:
#   tag "upstream"      the Debian source as extracted by fetch-qemu.sh
#   one commit a patch  edit them there, then run scripts/export-patches.sh
# Overlaid files are symlinks into this checkout (ignored by that git repo),
# so editing them anywhere edits our repository.
#
# Idempotent and incremental: when patches/ is unchanged only the overlay
# links are refreshed; when it changed, the tree is reset to "upstream" and
# the series re-applied (git only rewrites files that differ).
#
# Usage: scripts/assemble.sh [--force]   (--force drops unexported changes)
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$(dirname "$0")/lib/common.sh"   # say, die, warn
force=0
[ "${1:-}" = --force ] && force=1

"$top/scripts/fetch-qemu.sh"
upstream=$(cat "$top/build/debian-src/.extracted")
src="$top/build/qemu-src"
git_() { git -C "$src" -c user.name=qemu-nas-dedup -c user.email=qemu-nas-dedup@localhost \
             -c core.autocrlf=false -c advice.detachedHead=false "$@"; }

. "$top/scripts/lib/series.sh"

if [ ! -d "$src/.git" ]; then
    say "creating $src from $upstream"
    rm -rf "$src"
    cp -a "$upstream" "$src"
    git_ init -q
    git_ add -A -f .
    git_ commit -q -m "upstream: qemu $(cat "$top/build/debian-src/.version") (Debian source)"
    git_ tag upstream
    : > "$src/.git/nasdedup-stamp"
fi

stamp="$src/.git/nasdedup-stamp"
want=$(series_hash "$top")
have=$(sed -n 1p "$stamp" 2>/dev/null || true)
have_head=$(sed -n 2p "$stamp" 2>/dev/null || true)

if [ "$want" != "$have" ]; then
    head=$(git_ rev-parse HEAD)
    dirty=$(git_ status --porcelain --untracked-files=no)
    if [ "$force" = 0 ] && [ -n "$have" ] && { [ "$head" != "$have_head" ] || [ -n "$dirty" ]; }; then
        die "build/qemu-src has changes not exported to patches/ (commits or edits).
  Run scripts/export-patches.sh to keep them, or scripts/assemble.sh --force to drop them."
    fi
    say "applying patch series ($(series_list "$top" | wc -l) patches)"
    git_ am --abort >/dev/null 2>&1 || true
    git_ reset -q --hard upstream
    while read -r p; do
        [ -f "$top/patches/$p" ] || die "patches/series names '$p', which is not in patches/"
        if ! git_ am -q --keep-cr "$top/patches/$p" >/dev/null 2>"$src/.git/am-error"; then
            cat "$src/.git/am-error" >&2
            git_ am --abort >/dev/null 2>&1 || true
            git_ reset -q --hard upstream
            : > "$stamp"
            die "patch '$p' does not apply to qemu $(cat "$top/build/debian-src/.version")"
        fi
        say "  applied $p"
    done < <(series_list "$top")
    printf '%s\n%s\n' "$want" "$(git_ rev-parse HEAD)" > "$stamp"
fi

# Overlay our files as symlinks; refuse to shadow an upstream file.
exclude="$src/.git/info/exclude"
mkdir -p "$(dirname "$exclude")"
: > "$exclude.new"
while IFS= read -r rel; do
    f=$top/$rel
    if git_ cat-file -e "upstream:$rel" 2>/dev/null; then
        die "$rel exists upstream: change it with a patch, not an overlay"
    fi
    mkdir -p "$src/$(dirname "$rel")"
    if [ "$(readlink "$src/$rel" 2>/dev/null)" != "$f" ]; then
        ln -sfn "$f" "$src/$rel"
    fi
    printf '/%s\n' "$rel" >> "$exclude.new"
done < <(overlay_files "$top")
# Remove links to overlay files that no longer exist.
if [ -f "$exclude" ]; then
    while IFS= read -r rel; do
        rel=${rel#/}
        [ -L "$src/$rel" ] && [ ! -e "$src/$rel" ] && rm -f "$src/$rel"
    done < "$exclude"
fi
mv "$exclude.new" "$exclude"
say "tree ready: $src"
