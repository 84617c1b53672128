#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Fetch the pinned Debian source package of QEMU with apt-get source, check
# the upstream tarball's sha256 and extract it with dpkg-source -x (which
# applies Debian's own patches).  Result: build/debian-src/qemu-<version>/.
# Idempotent: does nothing when the extracted tree is already there.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
. "$top/scripts/qemu-version.sh"
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$(dirname "$0")/lib/common.sh"   # say, die, warn

dl="$top/build/debian-src"
mkdir -p "$dl"
cd "$dl"

if [ -f .extracted ] && [ -d "$(cat .extracted)" ]; then
    say "using $(cat .extracted)"
    exit 0
fi

version="$QEMU_DEB_VERSION"
if ! apt-cache showsrc qemu 2>/dev/null | grep -qx "Version: $version"; then
    newest=$(apt-cache showsrc qemu 2>/dev/null | sed -n 's/^Version: //p' |
             grep -E "^1:${QEMU_SERIES_PREFIX//./\\.}" | sort -V | tail -1 || true)
    [ -n "$newest" ] || die "no qemu ${QEMU_SERIES_PREFIX}x source package in apt's deb-src lists; run scripts/install-deps.sh"
    cat >&2 <<WARN
################################################################################
[fetch-qemu] WARNING: pinned qemu $QEMU_DEB_VERSION is no longer in the archive.
[fetch-qemu] WARNING: falling back to the newest 10.0.x: $newest
[fetch-qemu] WARNING: its tarball is checked against the sha256 its .dsc lists
[fetch-qemu] WARNING: (which apt checked against the signed archive), not against
[fetch-qemu] WARNING: our pin; update scripts/qemu-version.sh once the patches
[fetch-qemu] WARNING: are verified on it.
################################################################################
WARN
    version="$newest"
fi

say "apt-get source --download-only qemu=$version"
apt-get source -q --download-only "qemu=$version" >&2
upver=${version#*:}; upver=${upver%%-*}          # 10.0.13+ds
dsc=$(ls qemu_"${version#*:}".dsc)
orig=$(ls qemu_"$upver".orig.tar.*)
if [ "$version" = "$QEMU_DEB_VERSION" ]; then
    echo "$QEMU_ORIG_SHA256  $QEMU_ORIG_TARBALL" | sha256sum -c --quiet - ||
        die "sha256 of $QEMU_ORIG_TARBALL does not match the pin in scripts/qemu-version.sh"
    say "sha256 OK: $QEMU_ORIG_TARBALL"
else
    # The sha256 the .dsc lists for it (Checksums-Sha256: " sum size name").
    want=$(awk -v f="$orig" '/^Checksums-Sha256:/ { on = 1; next }
                             /^[^ ]/ { on = 0 } on && $3 == f { print $1 }' "$dsc")
    [ -n "$want" ] || die "$dsc lists no sha256 for $orig"
    echo "$want  $orig" | sha256sum -c --quiet - ||
        die "sha256 of $orig does not match $dsc"
    say "sha256 OK against $dsc: $orig"
fi
dir="qemu-${upver%+ds}"
rm -rf "$dir"
say "dpkg-source -x $dsc $dir (applies Debian's patches)"
dpkg-source -q -x "$dsc" "$dir" >&2
echo "$dl/$dir" > .extracted
echo "$version" > .version
say "extracted $dl/$dir"
