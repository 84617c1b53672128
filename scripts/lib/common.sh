# SPDX-License-Identifier: GPL-2.0-or-later
#
# Shared helpers for the qemu-nas-dedup scripts.  Source it, do not run it:
#
#   NASDEDUP_NAME=my-script
#   . "$(dirname "$0")/lib/common.sh"
#
# Everything the scripts generate lives under $NASDEDUP_BUILD (default
# <repo>/build).  Paths can be overridden through the environment.

# shellcheck shell=bash

NASDEDUP_TOP=${NASDEDUP_TOP:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
NASDEDUP_BUILD=${NASDEDUP_BUILD:-$NASDEDUP_TOP/build}
NASDEDUP_QEMU_BUILD=${NASDEDUP_QEMU_BUILD:-$NASDEDUP_BUILD/qemu}
NASDEDUP_GUEST_DIR=${NASDEDUP_GUEST_DIR:-$NASDEDUP_BUILD/guest}
NASDEDUP_NETNS=${NASDEDUP_NETNS:-$NASDEDUP_BUILD/netns/nasdedup}
NASDEDUP_NFS_STATE=${NASDEDUP_NFS_STATE:-$NASDEDUP_BUILD/nfs}
NASDEDUP_EXPORT_DIR=${NASDEDUP_EXPORT_DIR:-$NASDEDUP_BUILD/nfs-export}
NASDEDUP_PYTHON=${NASDEDUP_PYTHON:-/usr/bin/python3}
: "${NASDEDUP_NAME:=$(basename "$0" .sh)}"

say() { printf '[%s] %s\n' "$NASDEDUP_NAME" "$*" >&2; }
warn() { printf '[%s] WARNING: %s\n' "$NASDEDUP_NAME" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$NASDEDUP_NAME" "$*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" = 0 ] || die "must run as root (network namespaces, nsenter)"
}

need_cmd() {
    local c
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 || die "missing command '$c' (run scripts/install-deps.sh)"
    done
}

# Monotonic-ish wall clock in milliseconds.
now_ms() { date +%s%3N; }

# pid_alive PID [COMM]: PID exists (and its /proc comm equals COMM, which
# guards against a recycled PID).
pid_alive() {
    local pid=$1 comm=${2:-}
    [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
    # A zombie is not alive for our purposes.
    [ "$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null)" != Z ] || return 1
    [ -z "$comm" ] || [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]
}

# kill_pid PID [COMM] [TIMEOUT_S]: SIGTERM, wait up to TIMEOUT_S (default 5),
# then SIGKILL.  Only ever touches the given PID.
kill_pid() {
    local pid=$1 comm=${2:-} t=${3:-5} i
    pid_alive "$pid" "$comm" || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < t * 10; i++)); do
        pid_alive "$pid" "$comm" || return 0
        sleep 0.1
    done
    warn "pid $pid ${comm:+($comm) }ignored SIGTERM for ${t}s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 20; i++)); do
        pid_alive "$pid" "$comm" || return 0
        sleep 0.1
    done
    warn "pid $pid still present after SIGKILL"
}

# wait_for TIMEOUT_S INTERVAL_S CMD...: run CMD until it succeeds; fail
# after TIMEOUT_S.
wait_for() {
    local timeout=$1 interval=$2 deadline
    shift 2
    deadline=$(($(now_ms) + timeout * 1000))
    while :; do
        "$@" && return 0
        [ "$(now_ms)" -lt "$deadline" ] || return 1
        sleep "$interval"
    done
}

# How QEMU is configured, for the patched build (build.sh) and the
# posting's prefix builds (posting.sh): the same line, so that the two
# share objects through ccache.  Firmware comes from Debian's packages
# (seabios, ipxe-qemu, qemu-system-data): --firmwarepath makes the binary
# find it without -L.
QEMU_CONFIGURE=(
    --python=/usr/bin/python3
    --target-list=x86_64-softmmu
    --without-default-features
    --enable-tcg --enable-libnfs --enable-slirp --enable-zstd --enable-avx2
    --enable-libxxhash
    --enable-fdt=system --enable-tools
    --disable-docs --disable-install-blobs --enable-werror
    --firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu
)
# Compile through ccache, paths relative to build/ (both trees are
# build/<x>/qemu-src with build/<x>/qemu beside it, or build/qemu-src and
# build/qemu), and without the build directory in the hash.
use_ccache() {
    if [ -d /usr/lib/ccache ]; then
        export PATH=/usr/lib/ccache:$PATH
        export CCACHE_BASEDIR=$NASDEDUP_BUILD CCACHE_NOHASHDIR=1
    fi
}

# The QEMU binaries of the patched build.  Another job may be (re)building
# them, so callers can wait a bounded time for them to appear.
qemu_system() { printf '%s\n' "${NASDEDUP_QEMU:-$NASDEDUP_QEMU_BUILD/qemu-system-x86_64}"; }
qemu_img() { printf '%s\n' "${NASDEDUP_QEMU_IMG:-$NASDEDUP_QEMU_BUILD/qemu-img}"; }

# qemu_firmware_args QEMU: print "-L DIR" lines for Debian's firmware
# directories unless QEMU already finds bios-256k.bin.  A QEMU run from its
# build tree redirects every configured path, --firmwarepath included, into
# <build>/qemu-bundle/ (see get_relocated_path()), which has no firmware
# with --disable-install-blobs.
qemu_firmware_args() {
    local d
    for d in $("$1" -L help 2>/dev/null); do
        [ ! -f "$d/bios-256k.bin" ] || return 0
    done
    for d in /usr/share/seabios /usr/share/qemu /usr/lib/ipxe/qemu; do
        [ ! -d "$d" ] || printf '%s\n' -L "$d"
    done
}

# wait_for_exe PATH TIMEOUT_S: wait until PATH is an executable that has not
# changed for 5 s (a linker may still be writing it).
wait_for_exe() {
    local exe=$1 timeout=$2 deadline m1 m2
    deadline=$(($(now_ms) + timeout * 1000))
    while :; do
        if [ -x "$exe" ]; then
            m1=$(stat -c %Y.%s "$exe" 2>/dev/null || true)
            sleep 5
            m2=$(stat -c %Y.%s "$exe" 2>/dev/null || true)
            [ -n "$m1" ] && [ "$m1" = "$m2" ] && return 0
        else
            sleep 5
        fi
        [ "$(now_ms)" -lt "$deadline" ] || return 1
        say "waiting for $exe (being built?)"
    done
}

# netns_exec CMD...: run CMD inside the private network namespace.
netns_exec() {
    netns_mounted || die "network namespace $NASDEDUP_NETNS is not set up (scripts/nfs-export.sh start)"
    nsenter --net="$NASDEDUP_NETNS" -- "$@"
}

netns_mounted() {
    [ -e "$NASDEDUP_NETNS" ] && findmnt -rn -o FSTYPE --mountpoint "$NASDEDUP_NETNS" 2>/dev/null | grep -qx nsfs
}

# stamp_ok STAMP CONTENT: STAMP exists and holds CONTENT (the inputs that
# produced an output); stamp_write STAMP CONTENT records them.
stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }
stamp_write() { printf '%s\n' "$2" >"$1"; }
