#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Build the test guest offline from Debian packages into build/guest/:
#
#   vmlinuz       Debian's linux-image-<ver>-amd64 (the version the
#                 linux-image-amd64 metapackage depends on), fetched with
#                 `apt-get download` into build/cache/debs, never installed
#   initrd.gz     busybox-static + the virtio-blk/ext4 modules + scripts/guest/init
#   data.raw      ext4 data disk with deterministic pseudo-random files
#   data.qcow2    the same disk as qcow2 (only if build/qemu/qemu-img exists)
#
# Usage: scripts/guest-assets.sh [all|kernel|initramfs|disk]...   (default: all)
#
# Environment (defaults in brackets):
#   NASDEDUP_DATA_MB   MiB of file data on the data disk               [400]
#   NASDEDUP_DISK_MB   data disk size in MiB  [data + data/16 + 64, rounded
#                      up to 64, at least 512]
#   NASDEDUP_FILE_MB   size of each data file in MiB                   [4]
#   NASDEDUP_SEED      seed of the file contents                       [nasdedup-v1]
#   NASDEDUP_KERNEL_PKG  kernel package to use  [resolved via apt-cache]
#   NASDEDUP_QCOW2_OPTS  qemu-img -o options for data.qcow2, e.g.
#                      preallocation=metadata (the file then never grows)  []
#
# Steps whose inputs have not changed are skipped (stamp files *.stamp in
# build/guest/ record the inputs; the disk stamps also the image's size,
# mtime and inode, so an image modified in place gets rebuilt).  Treat the
# images as templates: boot copies of them (scripts/e2e-smoke.sh does).
# Rebuilt files replace the old ones by rename, so QEMUs that still have the
# old ones open are not disturbed.
#
# Data disk layout (ext4, 4 KiB blocks, so every file page is one disk block):
#   /data/fNNNN.bin   NASDEDUP_FILE_MB MiB each; contents are
#                     SHAKE128(seed "/" name), so every 4 KiB page is unique
#                     and non-zero and anyone can regenerate them
#   /INDEX            "<path> <bytes> <md5>" per file, in read order
#   /MANIFEST.md5     the same sums in `md5sum -c` format
#   /INFO             the generation parameters
#
# Host <-> guest protocol (implemented by scripts/guest/init, used by
# scripts/e2e-smoke.sh):
#
#   Kernel command line (besides console=ttyS0):
#     nasdedup.read_mb=N   read the first N MiB of files listed in /INDEX
#                          (md5sum -c, i.e. into the page cache and checked
#                          against the manifest); default: all files
#     nasdedup.write_mb=K  then write K MiB of new random files to
#                          /nasdedup-w/ on the data disk (default 0); they
#                          stay dirty in the page cache unless nasdedup.sync=1
#     nasdedup.dirty_mb=M  then keep rewriting an M MiB tmpfs file with random
#                          data in the background (default 0)
#     nasdedup.churn_mb=C  and keep overwriting in place, with fsync, one
#                          file at a time of a C MiB set /nasdedup-c/cNNNN.bin
#                          on the data disk (default 0): disk blocks and their
#                          page-cache pages change during the migration
#     nasdedup.file_mb=F   size of the written files (default 4)
#     nasdedup.disk=DEV    data disk (default /dev/vda)
#
#   Guest -> host, lines on the serial console (ttyS0):
#     "nasdedup: ..."                       progress
#     "NASDEDUP-READY read_files=.. read_mib=.. write_mib=.. dirty_mib=.. churn_mib=.. uptime=.."
#                                           the workload is in place
#     "NASDEDUP-VERDICT: OK <detail>"       answer to verify / verify-disk
#     "NASDEDUP-VERDICT: FAIL <what> (<detail>)"
#                                           a check failed; also printed as
#                                           "FAIL boot ..." (then power-off)
#                                           when booting/reading goes wrong
#     "NASDEDUP-PONG ..."                   answer to ping
#
#   Host -> guest, lines on the serial console's input (the host connects to
#   QEMU's `-chardev socket,...,server=on,wait=off` behind `-serial`):
#     verify        stop the dirtier and churner after their current
#                   generation, md5-check the read, written, dirtied and
#                   churned files against the sums recorded in guest RAM,
#                   print the verdict, restart the workers.  Send it to the
#                   destination after a migration: it checks what was migrated
#                   (page cache, tmpfs).
#     verify-disk   the same, but sync and drop the page cache before the
#                   checks, so files are read back from the disk
#     ping          liveness check
#     readdev DEV   read all of /dev/DEV through the page cache (the block
#                   device's own), answer "NASDEDUP-VERDICT: OK readdev
#                   DEV bytes=N"
#     poweroff      stop the workers, unmount, power off
set -euo pipefail
# shellcheck disable=SC2034 # read by lib/common.sh
NASDEDUP_NAME=guest-assets
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$(dirname "$0")/lib/common.sh"

OUT=$NASDEDUP_GUEST_DIR
CACHE=${NASDEDUP_CACHE:-$NASDEDUP_BUILD/cache/debs}
DATA_MB=${NASDEDUP_DATA_MB:-400}
FILE_MB=${NASDEDUP_FILE_MB:-4}
SEED=${NASDEDUP_SEED:-nasdedup-v1}
QCOW2_OPTS=${NASDEDUP_QCOW2_OPTS:-}
if [ -n "${NASDEDUP_DISK_MB:-}" ]; then
    DISK_MB=$NASDEDUP_DISK_MB
else
    # ext4's overhead: inode tables, the journal (128 MiB from 4 GiB on)
    # and the 5 % reserved for root, which mke2fs -d does not fill.
    # Above 4 GiB of data, 1/16 of it is not enough.
    DISK_MB=$(((DATA_MB + DATA_MB / (DATA_MB >= 4096 ? 8 : 16) + 64 + 63) / 64 * 64))
    [ "$DISK_MB" -ge 512 ] || DISK_MB=512
fi
# Modules the guest needs (their dependencies are added by modprobe).
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
         virtio_blk crc16 mbcache jbd2 crc32c_generic ext4)
INIT_SRC=$NASDEDUP_TOP/scripts/guest/init
BUSYBOX=${NASDEDUP_BUSYBOX:-/bin/busybox}

need_cmd apt-get apt-cache dpkg-deb depmod modprobe mke2fs gzip sha256sum "$NASDEDUP_PYTHON"
mkdir -p "$OUT" "$CACHE"

# --- kernel + modules ----------------------------------------------------------

kernel_pkg() {
    if [ -n "${NASDEDUP_KERNEL_PKG:-}" ]; then
        echo "$NASDEDUP_KERNEL_PKG"
        return
    fi
    local p
    p=$(apt-cache depends linux-image-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
    if [ -z "$p" ]; then
        say "apt-cache knows no linux-image-amd64; running apt-get update"
        apt-get update -q >&2
        p=$(apt-cache depends linux-image-amd64 |
            awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
    fi
    [ -n "$p" ] || die "cannot resolve the kernel package linux-image-amd64 depends on"
    echo "$p"
}

step_kernel() {
    local pkg ver deb stamp tree kver mod f name
    pkg=$(kernel_pkg)
    ver=$(apt-cache show --no-all-versions "$pkg" | awk '/^Version:/ { print $2; exit }')
    [ -n "$ver" ] || die "apt-cache has no version of $pkg"
    deb=$(ls "$CACHE/${pkg}_${ver//:/%3a}_"*.deb 2>/dev/null | head -1 || true)
    stamp="$pkg $ver ${MODULES[*]}"
    if [ -n "$deb" ] && [ -f "$OUT/vmlinuz" ] && [ -s "$OUT/modules/order" ] &&
        stamp_ok "$OUT/kernel.stamp" "$stamp"; then
        say "kernel: $pkg $ver up to date"
        return
    fi
    if [ -z "$deb" ]; then
        say "kernel: apt-get download $pkg=$ver into $CACHE"
        (cd "$CACHE" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$ver" >&2)
        deb=$(ls "$CACHE/${pkg}_${ver//:/%3a}_"*.deb | head -1)
    fi
    tree=$OUT/kernel-tree
    rm -rf "$tree" "$OUT/modules"
    say "kernel: extracting $(basename "$deb")"
    dpkg-deb -x "$deb" "$tree"
    # Debian 12 ships /lib/modules; later releases /usr/lib/modules.
    kver=$(basename "$(ls -d "$tree"/lib/modules/* "$tree"/usr/lib/modules/* 2>/dev/null | head -1)")
    if [ -z "$kver" ] || [ ! -f "$tree/boot/vmlinuz-$kver" ]; then
        die "no vmlinuz/modules in $deb"
    fi
    [ -d "$tree/lib/modules/$kver" ] || { mkdir -p "$tree/lib/modules" &&
        ln -s "../../usr/lib/modules/$kver" "$tree/lib/modules/$kver"; }
    depmod -b "$tree" "$kver"
    # modprobe --show-depends prints "insmod PATH" for each module and its
    # dependencies (soft ones too) in load order; keep the first occurrence.
    mkdir -p "$OUT/modules"
    : >"$OUT/modules/order"
    for mod in "${MODULES[@]}"; do
        modprobe -d "$tree" -S "$kver" --show-depends "$mod" |
            awk '$1 == "insmod" { print $2 }'
    done | awk '!seen[$0]++' | while read -r f; do
        name=$(basename "$f")
        case $name in
            *.ko.xz) xz -dc "$f" >"$OUT/modules/${name%.xz}" ;;
            *.ko.zst) zstd -qdc "$f" >"$OUT/modules/${name%.zst}" ;;
            *.ko.gz) gzip -dc "$f" >"$OUT/modules/${name%.gz}" ;;
            *.ko) cp "$f" "$OUT/modules/$name" ;;
            *) die "unexpected module file $f" ;;
        esac
        echo "${name%.ko*}.ko" >>"$OUT/modules/order"
    done
    for mod in "${MODULES[@]}"; do
        grep -qx "$mod.ko" "$OUT/modules/order" || die "module $mod not found in $pkg"
    done
    cp "$tree/boot/vmlinuz-$kver" "$OUT/vmlinuz"
    echo "$kver" >"$OUT/kernel.version"
    rm -rf "$tree"
    stamp_write "$OUT/kernel.stamp" "$stamp"
    say "kernel: $kver, modules in load order: $(tr '\n' ' ' <"$OUT/modules/order")"
}

# --- initramfs -------------------------------------------------------------------

step_initramfs() {
    local root stamp
    [ -s "$OUT/modules/order" ] || die "run the kernel step first"
    [ -x "$BUSYBOX" ] || die "$BUSYBOX missing (apt-get install busybox-static)"
    if ldd "$BUSYBOX" >/dev/null 2>&1; then
        die "$BUSYBOX is dynamically linked; install busybox-static"
    fi
    stamp=$(cat "$INIT_SRC" "$BUSYBOX" "$OUT/modules/order" "$OUT/modules/"*.ko | sha256sum | cut -d' ' -f1)
    if [ -f "$OUT/initrd.gz" ] && stamp_ok "$OUT/initramfs.stamp" "$stamp"; then
        say "initramfs: up to date"
        return
    fi
    root=$OUT/initramfs-root
    rm -rf "$root"
    mkdir -p "$root"/{bin,dev,proc,sys,run,mnt,tmp,etc/nasdedup,lib/modules}
    cp "$BUSYBOX" "$root/bin/busybox"
    ln -s busybox "$root/bin/sh"
    cp "$INIT_SRC" "$root/init"
    chmod 0755 "$root/init"
    cp "$OUT/modules/"*.ko "$root/lib/modules/"
    cp "$OUT/modules/order" "$root/etc/nasdedup/modules"
    # The kernel opens /dev/console for init before devtmpfs is mounted.
    mknod -m 600 "$root/dev/console" c 5 1
    mknod -m 666 "$root/dev/null" c 1 3
    (cd "$root" && find . | LC_ALL=C sort | "$BUSYBOX" cpio -o -H newc 2>/dev/null) |
        gzip -9n >"$OUT/initrd.gz.tmp"
    mv "$OUT/initrd.gz.tmp" "$OUT/initrd.gz"
    rm -rf "$root"
    stamp_write "$OUT/initramfs.stamp" "$stamp"
    say "initramfs: $OUT/initrd.gz ($(du -h "$OUT/initrd.gz" | cut -f1))"
}

# --- data disk -------------------------------------------------------------------

# Writes the files, INDEX, MANIFEST.md5 and INFO into argv[1].
GENERATOR='
import hashlib, os, sys
out, data_mb, file_mb, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
os.makedirs(os.path.join(out, "data"))
left, i, index = data_mb << 20, 0, []
while left > 0:
    size = min(file_mb << 20, left)
    name = "data/f%04d.bin" % i
    buf = hashlib.shake_128(("%s/%s" % (seed, name)).encode()).digest(size)
    with open(os.path.join(out, name), "wb") as f:
        f.write(buf)
    index.append((name, size, hashlib.md5(buf).hexdigest()))
    left -= size
    i += 1
with open(os.path.join(out, "INDEX"), "w") as f:
    f.writelines("%s %d %s\n" % e for e in index)
with open(os.path.join(out, "MANIFEST.md5"), "w") as f:
    f.writelines("%s  %s\n" % (e[2], e[0]) for e in index)
with open(os.path.join(out, "INFO"), "w") as f:
    f.write("data_mb=%d file_mb=%d files=%d seed=%s content=shake128(seed/name)\n"
            % (data_mb, file_mb, len(index), seed))
'

# out_stamp INPUTS FILE: stamp content for FILE built from INPUTS; it also
# names FILE's size, mtime and inode, so a modified output is noticed.
out_stamp() { printf '%s\nid=%s' "$1" "$(stat -c %s.%Y.%i "$2" 2>/dev/null)"; }

# out_ok NAME INPUTS: build/guest/NAME is up to date.  Warns when it was
# changed after it was built (e.g. booted read-write instead of a copy).
out_ok() {
    local f=$OUT/$1 st=$OUT/${1%%.*}.${1##*.}.stamp
    [ -f "$f" ] && [ -f "$st" ] || return 1
    stamp_ok "$st" "$(out_stamp "$2" "$f")" && return 0
    if [ "$(head -1 "$st")" = "$2" ]; then
        warn "disk: $1 was modified after it was built (boot a copy, not the template); rebuilding"
    fi
    return 1
}

# to_qcow2 RAW QCOW2: qemu-img convert (atomically replaces QCOW2).
to_qcow2() {
    say "disk: qemu-img convert -O qcow2 ${QCOW2_OPTS:+-o $QCOW2_OPTS }$(basename "$1") $(basename "$2")"
    rm -f "$2.tmp"
    "$(qemu_img)" convert -f raw -O qcow2 ${QCOW2_OPTS:+-o "$QCOW2_OPTS"} "$1" "$2.tmp" ||
        die "qemu-img convert failed (is $1 in use by a running QEMU?)"
    mv "$2.tmp" "$2"
}

step_disk() {
    local inputs qinputs src t0 have_img=0
    inputs="data_mb=$DATA_MB file_mb=$FILE_MB disk_mb=$DISK_MB seed=$SEED gen=$(printf '%s' "$GENERATOR" | sha256sum | cut -c1-16)"
    qinputs="$inputs qcow2_opts=$QCOW2_OPTS"
    [ "$DISK_MB" -gt "$((DATA_MB + 32))" ] || die "disk ($DISK_MB MiB) too small for $DATA_MB MiB of data"
    [ ! -x "$(qemu_img)" ] || have_img=1
    if out_ok data.raw "$inputs"; then
        say "disk: data.raw up to date ($inputs)"
    else
        src=$OUT/data-src
        rm -rf "$src" "$OUT/data.raw.tmp"
        t0=$(now_ms)
        say "disk: generating $DATA_MB MiB of files ($FILE_MB MiB each, seed $SEED)"
        "$NASDEDUP_PYTHON" -c "$GENERATOR" "$src" "$DATA_MB" "$FILE_MB" "$SEED"
        say "disk: mke2fs -t ext4 -d ... data.raw ${DISK_MB}M"
        mke2fs -q -F -t ext4 -b 4096 -L nasdedup -E root_owner=0:0 \
            -d "$src" "$OUT/data.raw.tmp" "${DISK_MB}M" >&2
        rm -rf "$src"
        # Convert before the rename: nobody can be using the new image yet.
        # Renames leave QEMUs that still use the old files undisturbed.
        if [ $have_img = 1 ]; then
            to_qcow2 "$OUT/data.raw.tmp" "$OUT/data.qcow2"
            stamp_write "$OUT/data.qcow2.stamp" "$(out_stamp "$qinputs" "$OUT/data.qcow2")"
        fi
        mv "$OUT/data.raw.tmp" "$OUT/data.raw"
        stamp_write "$OUT/data.raw.stamp" "$(out_stamp "$inputs" "$OUT/data.raw")"
        say "disk: done in $((($(now_ms) - t0) / 1000)) s"
    fi

    if out_ok data.qcow2 "$qinputs"; then
        say "disk: data.qcow2 up to date"
    elif [ $have_img = 1 ]; then
        to_qcow2 "$OUT/data.raw" "$OUT/data.qcow2"
        stamp_write "$OUT/data.qcow2.stamp" "$(out_stamp "$qinputs" "$OUT/data.qcow2")"
    else
        warn "disk: $(qemu_img) not built yet, skipping data.qcow2 (run again later)"
    fi
}

# Legacy disk layouts (scripts/layout-test.sh), the same files as data.raw
# (their own DATA_MB, LAYOUT_MB): data-1k.raw, ext4 with 1 KiB blocks (the
# default of mke2fs below 512 MiB); data-p63.raw, an MBR partition at
# sector 63 (the DOS-era default) holding ext4 with 4 KiB blocks.  Neither
# has a guest page's bytes on a 4 KiB boundary of the disk.
step_layouts() {
    local inputs src fs sectors
    need_cmd sfdisk
    inputs="layout data_mb=$DATA_MB file_mb=$FILE_MB disk_mb=$DISK_MB seed=$SEED gen=$(printf '%s' "$GENERATOR" | sha256sum | cut -c1-16)"
    if out_ok data-1k.raw "$inputs" && out_ok data-p63.raw "$inputs"; then
        say "layouts: data-1k.raw, data-p63.raw up to date"
        return 0
    fi
    src=$OUT/layout-src
    rm -rf "$src"
    "$NASDEDUP_PYTHON" -c "$GENERATOR" "$src" "$DATA_MB" "$FILE_MB" "$SEED"
    say "layouts: mke2fs -b 1024 data-1k.raw ${DISK_MB}M"
    rm -f "$OUT/data-1k.raw.tmp"
    mke2fs -q -F -t ext4 -b 1024 -L nasdedup -E root_owner=0:0 \
        -d "$src" "$OUT/data-1k.raw.tmp" "${DISK_MB}M" >&2
    mv "$OUT/data-1k.raw.tmp" "$OUT/data-1k.raw"
    stamp_write "$OUT/data-1k.raw.stamp" "$(out_stamp "$inputs" "$OUT/data-1k.raw")"
    say "layouts: partition at sector 63, ext4 (4 KiB blocks) in it: data-p63.raw"
    fs=$OUT/layout-fs.tmp
    rm -f "$fs" "$OUT/data-p63.raw.tmp"
    mke2fs -q -F -t ext4 -b 4096 -L nasdedup -E root_owner=0:0 \
        -d "$src" "$fs" "${DISK_MB}M" >&2
    sectors=$((DISK_MB * 2048))
    truncate -s $(((63 + sectors) * 512)) "$OUT/data-p63.raw.tmp"
    printf 'label: dos\nstart=63, size=%d, type=83\n' "$sectors" |
        sfdisk -q "$OUT/data-p63.raw.tmp" >&2
    dd if="$fs" of="$OUT/data-p63.raw.tmp" bs=512 seek=63 conv=notrunc,sparse \
        status=none
    rm -rf "$src" "$fs"
    mv "$OUT/data-p63.raw.tmp" "$OUT/data-p63.raw"
    stamp_write "$OUT/data-p63.raw.stamp" "$(out_stamp "$inputs" "$OUT/data-p63.raw")"
}

[ $# -gt 0 ] || set -- all
for step in "$@"; do
    case $step in
        all) step_kernel; step_initramfs; step_disk ;;
        kernel) step_kernel ;;
        initramfs) step_initramfs ;;
        disk) step_disk ;;
        layouts) step_layouts ;;
        *) die "unknown step '$step' (all|kernel|initramfs|disk|layouts)" ;;
    esac
done
say "assets in $OUT: $(cd "$OUT" && ls vmlinuz initrd.gz data.raw data.qcow2 2>/dev/null | tr '\n' ' ')"
