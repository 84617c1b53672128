#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Install everything qemu-nas-dedup needs from Debian's packages.
# Idempotent: running it again changes nothing once all is in place.
#
# Adds to apt's sources (file /etc/apt/sources.list.d/qemu-nas-dedup.sources):
#   deb + deb-src  bookworm-backports  (meson >= 1.5, pycotap, qemu-system-data 10.0)
#   deb-src        trixie              (the qemu 10.0.x source package we build from)
set -euo pipefail

SOURCES=/etc/apt/sources.list.d/qemu-nas-dedup.sources
STAMP_DIR=${NASDEDUP_STAMP_DIR:-/var/lib/qemu-nas-dedup}
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$(dirname "$0")/lib/common.sh"   # say, die, warn

if [ "$(id -u)" != 0 ]; then
    SUDO=sudo
else
    SUDO=
fi

want_sources='Types: deb deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg'

updated=0
if [ ! -f "$SOURCES" ] || [ "$(cat "$SOURCES")" != "$want_sources" ]; then
    say "adding to apt sources ($SOURCES):"
    say "  deb + deb-src bookworm-backports; deb-src trixie (qemu 10.0.x source)"
    printf '%s\n' "$want_sources" | $SUDO tee "$SOURCES" >/dev/null
    $SUDO apt-get update -q
    updated=1
fi

# Packages from bookworm (the default release).
PKGS=(
    build-essential pkgconf git ninja-build ccache dpkg-dev
    libglib2.0-dev libpixman-1-dev libfdt-dev libnfs-dev libxxhash-dev
    libslirp-dev libzstd-dev zlib1g-dev flex bison python3-venv python3
    seabios ipxe-qemu
    # real shared storage and guest assets (end-to-end demo and tests)
    nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils
    busybox-static e2fsprogs cpio kmod iproute2 util-linux fdisk
    # benchmark plot
    python3-matplotlib
    # fuzzing (scripts/fuzz.sh): clang, its libFuzzer/sanitizer runtimes,
    # llvm-symbolizer for the reports
    clang libclang-rt-dev llvm
    # the posting's doc check (scripts/posting.sh --check): Sphinx
    python3-sphinx
)
# Packages we need newer than bookworm has.
# libvirt 11.3 (knows QEMU 10.0) for the two-host test
# (scripts/libvirt-test.sh); it pulls in Debian's qemu-system-x86, which
# our scripts never run (they name build/qemu's binaries).
BPO_PKGS=(meson python3-pycotap qemu-system-data
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
bpo_missing=()
for p in "${BPO_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || bpo_missing+=("$p")
done
# meson from bookworm (1.0) is too old for QEMU 10.0 (needs >= 1.5).
if command -v meson >/dev/null && ! dpkg --compare-versions "$(meson --version)" ge 1.5; then
    bpo_missing+=(meson)
fi

if [ ${#missing[@]} -gt 0 ] || [ ${#bpo_missing[@]} -gt 0 ]; then
    [ "$updated" = 1 ] || $SUDO apt-get update -q
    export DEBIAN_FRONTEND=noninteractive
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing: ${missing[*]}"
        $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
    if [ ${#bpo_missing[@]} -gt 0 ]; then
        say "installing from bookworm-backports: ${bpo_missing[*]}"
        $SUDO apt-get install -y -q --no-install-recommends -t bookworm-backports "${bpo_missing[@]}"
    fi
else
    say "all packages present"
fi
$SUDO mkdir -p "$STAMP_DIR" 2>/dev/null || true
