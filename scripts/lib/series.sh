# SPDX-License-Identifier: GPL-2.0-or-later
# Sourced by assemble.sh and export-patches.sh: the patch series in patches/.

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
