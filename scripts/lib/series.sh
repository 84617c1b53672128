# SPDX-License-Identifier: GPL-2.0-or-later
# Sourced by assemble.sh and export-patches.sh: the patch series in patches/.

# Our new files at their QEMU paths, overlaid on the tree (directories or
# single files, relative to the checkout); the posting maps each file under
# them to a patch (patches/posting).
OVERLAY=(migration hw/nas-dedup include/migration tests/qtest tests/functional
         tests/unit/test-nas-dedup-hash.c tests/unit/test-nas-dedup-index.c
         tests/unit/test-nas-dedup-wire.c tests/unit/test-nas-dedup-split.c
         docs/devel/nas-dedup.rst)

# The files under OVERLAY, relative to the checkout $1, sorted.
overlay_files() {
    local o
    for o in "${OVERLAY[@]}"; do
        [ -e "$1/$o" ] || continue
        (cd "$1" && find "$o" -type f ! -name '*.pyc' ! -path '*/__pycache__/*')
    done | sort
}

# The patch file names of patches/series, in order (comments, blanks dropped).
series_list() {
    sed -e 's/#.*//' -e '/^\s*$/d' "$1/patches/series"
}

# A hash of patches/series and of every patch it names: the tree assembled
# from it is up to date when the hash recorded at assembly time is this one.
series_hash() {
    (cat "$1/patches/series" && series_list "$1" | while read -r p; do
        [ -f "$1/patches/$p" ] && cat "$1/patches/$p"; done) | sha256sum | cut -d' ' -f1
}
