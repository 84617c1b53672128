#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Write the series as it would be posted to qemu-devel, from our sources of
# truth: the pinned upstream tree, patches/series (changes to upstream
# files, one commit each) and patches/posting (which of those commits adds
# each of our files).  Each patch of the posting is one commit of
# patches/series with our files it adds, the posting's author and a
# Signed-off-by; a cover letter (patches/cover-letter) goes first.
#
#   build/posting/qemu-src   git tree: tag "upstream", branch "posting"
#   build/posting/series/    0000-cover-letter.patch, 0001-....patch, ...
#
# Usage: scripts/posting.sh           write the series
#        scripts/posting.sh --check   write it, then check that every patch
#                                     passes QEMU's scripts/checkpatch.pl
#                                     (no error, no warning) and that every
#                                     prefix of the series builds
#                                     (incrementally, in build/posting/qemu,
#                                     through ccache); one TAP line a check
#                                     on stdout
#        NASDEDUP_POSTING_AUTHOR="Name <email>" scripts/posting.sh
#                                     post under that identity (author and
#                                     Signed-off-by) instead of the
#                                     project's placeholder in patches/posting
set -euo pipefail
# shellcheck disable=SC2034 # read by lib/common.sh
NASDEDUP_NAME=posting
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$(dirname "$0")/lib/common.sh"
# shellcheck source-path=SCRIPTDIR source=lib/series.sh
. "$NASDEDUP_TOP/scripts/lib/series.sh"

check=0
case "${1:-}" in
    --check) check=1 ;;
    "") ;;
    *) die "usage: $0 [--check]" ;;
esac
top=$NASDEDUP_TOP
map=$top/patches/posting
out=$NASDEDUP_BUILD/posting
psrc=$out/qemu-src
pbld=$out/qemu
series_dir=$out/series

"$top/scripts/assemble.sh"
upstream_tree=$NASDEDUP_BUILD/qemu-src
[ -f "$map" ] || die "no $map"

# --- patches/posting ---------------------------------------------------------
# The identity the series is posted under: the person posting it certifies
# the DCO with their Signed-off-by, so they name themselves here.
author=${NASDEDUP_POSTING_AUTHOR:-$(sed -n 's/^author: *//p' "$map")}
prefix=$(sed -n 's/^prefix: *//p' "$map")
[ -n "$author" ] || die "$map: no 'author:' line"
name=${author% <*}
email=${author##*<}
email=${email%>}
# Files of subject S: the lines after "[S]" up to the next "[".
files_of() {
    awk -v s="[$1]" '
        /^\[/ { on = ($0 == s); next }
        on && NF && !/^#/ { print $1 }' "$map"
}
mapped=$(awk '/^\[/ { on = 1; next } on && NF && !/^#/ && !/^[a-z]+:/ { print $1 }' "$map" | sort)
dups=$(printf '%s\n' "$mapped" | uniq -d)
[ -z "$dups" ] || die "$map: in two patches: $dups"
missing=$(comm -23 <(overlay_files "$top") <(printf '%s\n' "$mapped"))
[ -z "$missing" ] || die "$map: in no patch: $missing"
extra=$(comm -13 <(overlay_files "$top") <(printf '%s\n' "$mapped"))
[ -z "$extra" ] || die "$map: not our files: $extra"

# --- the posting tree -----------------------------------------------------------
if [ ! -d "$psrc/.git" ]; then
    say "cloning the upstream tree into $psrc"
    mkdir -p "$out"
    git clone -q --no-checkout "$upstream_tree" "$psrc"
    git -C "$psrc" fetch -q "$upstream_tree" 'refs/tags/upstream:refs/tags/upstream'
fi
gitp() {
    git -C "$psrc" -c user.name="$name" -c user.email="$email" \
        -c core.autocrlf=false -c advice.detachedHead=false "$@"
}
gitp am --abort >/dev/null 2>&1 || true
gitp checkout -q -f -B posting upstream
gitp clean -q -fdx
dirty=$(git -C "$top" status --porcelain -- patches migration hw include tests/qtest \
        tests/functional docs/devel/nas-dedup.rst)
[ -z "$dirty" ] || warn "the posting includes changes not committed here:
$dirty"
n=0
subjects=()
while read -r p; do
    n=$((n + 1))
    subject=$(git mailinfo /dev/null /dev/null <"$top/patches/$p" | sed -n 's/^Subject: //p')
    [ -n "$subject" ] || die "$p: no subject"
    grep -qxF "[$subject]" "$map" || die "$map: no [$subject] (patch $p)"
    subjects+=("$subject")
    if ! gitp am -q --committer-date-is-author-date "$top/patches/$p"; then
        gitp am --abort >/dev/null 2>&1 || true
        die "$p does not apply to the upstream tree"
    fi
    while read -r f; do
        [ -n "$f" ] || continue
        mkdir -p "$psrc/$(dirname "$f")"
        cp "$top/$f" "$psrc/$f"
        gitp add -f "$f"
    done < <(files_of "$subject")
    gitp commit -q --amend --no-edit --reset-author -s
done < <(series_list "$top")

rm -rf "$series_dir"
gitp format-patch -q --cover-letter --no-signature --base=upstream \
    ${prefix:+--subject-prefix="$prefix"} -o "$series_dir" upstream..posting
cover=$(ls "$series_dir"/0000-*.patch)
python3 - "$cover" "$top/patches/cover-letter" <<'EOF'
import sys
cover, src = sys.argv[1], sys.argv[2]
text = open(src).read().split('\n', 1)
subject, blurb = text[0], text[1].strip('\n')
s = open(cover).read()
s = s.replace('*** SUBJECT HERE ***', subject)
s = s.replace('*** BLURB HERE ***', blurb)
open(cover, 'w').write(s)
EOF
say "$n patches and a cover letter in $series_dir"
[ "$check" = 1 ] || exit 0

# --- checks -----------------------------------------------------------------------
bad=0
tap=0
echo "1..$((2 * n + 1))"
result() {    # ok?, description
    tap=$((tap + 1))
    if [ "$1" = 0 ]; then
        echo "ok $tap - $2"
    else
        echo "not ok $tap - $2"
        bad=$((bad + 1))
    fi
}
for f in "$series_dir"/0*.patch; do
    case $f in */0000-*) continue ;; esac
    rc=0
    log=$out/checkpatch-$(basename "$f" .patch).log
    (cd "$psrc" && ./scripts/checkpatch.pl "$f") >"$log" 2>&1 || rc=$?
    # Clean: no error and no warning.
    if [ "$rc" = 0 ] && grep -q '^total: 0 errors, 0 warnings' "$log"; then
        :
    else
        rc=1
        say "checkpatch: $(basename "$f") (log: $log):"
        { grep -A4 -E '^(ERROR|WARNING)' "$log" || tail -5 "$log"; } | sed 's/^/    /' >&2
    fi
    grep -qxF "Signed-off-by: $author" "$f" || { say "no Signed-off-by in $(basename "$f")"; rc=1; }
    result "$rc" "checkpatch, Signed-off-by: $(basename "$f")"
done

# The doc builds with Sphinx, warnings as errors (alone: QEMU's docs
# build needs --enable-docs; the patch that adds it also lists it in
# docs/devel/migration/features.rst's toctree).
rc=0
docs=$(mktemp -d)
cp "$psrc/docs/devel/nas-dedup.rst" "$docs/"
sphinx-build -W -q -b html -C -D master_doc=nas-dedup -D root_doc=nas-dedup \
    "$docs" "$docs/_out" >"$out/sphinx.log" 2>&1 || rc=$?
[ "$rc" = 0 ] || sed 's/^/    /' "$out/sphinx.log" >&2
rm -rf "$docs"
result "$rc" "docs/devel/nas-dedup.rst builds with sphinx-build -W"

# Every prefix builds, configured as the main build (build/qemu) is and
# through ccache, so that the two share objects.
use_ccache
built=0
i=0
for c in $(gitp rev-list --reverse upstream..posting); do
    i=$((i + 1))
    gitp checkout -q "$c"
    t0=$(now_ms)
    # Configured for this prefix: an option of a later patch is left out.
    CONFIGURE=()
    for o in "${QEMU_CONFIGURE[@]}"; do
        case $o in
            --enable-libxxhash)
                grep -q "option('libxxhash'" "$psrc/meson_options.txt" || continue ;;
        esac
        CONFIGURE+=("$o")
    done
    if [ ! -f "$pbld/build.ninja" ] ||
       [ "$(cat "$pbld/.nasdedup-configure" 2>/dev/null)" != "${CONFIGURE[*]}" ]; then
        rm -rf "$pbld"
        mkdir -p "$pbld"
        if ! (cd "$pbld" && "$psrc/configure" "${CONFIGURE[@]}" >configure.log 2>&1); then
            echo "Bail out! configure failed at patch $i: $pbld/configure.log"
            die "configure failed at patch $i: $pbld/configure.log"
        fi
        echo "${CONFIGURE[*]}" >"$pbld/.nasdedup-configure"
    fi
    targets=(qemu-system-x86_64)
    [ -f "$psrc/tests/qtest/nas-dedup-test.c" ] && targets+=(tests/qtest/nas-dedup-test)
    for u in "$psrc"/tests/unit/test-nas-dedup-*.c; do
        [ -f "$u" ] && targets+=("tests/unit/$(basename "$u" .c)")
    done
    if ninja -C "$pbld" "${targets[@]}" >"$out/build-$i.log" 2>&1; then
        built=$((built + 1))
        say "patch $i/$n builds ($((($(now_ms) - t0) / 1000)) s): ${subjects[$((i - 1))]}"
        result 0 "patches 1-$i build"
    else
        say "patch $i/$n does NOT build: ${subjects[$((i - 1))]}"
        { grep -E 'error|undefined reference' "$out/build-$i.log" || true; } |
            head -10 | sed 's/^/    /' >&2 || true
        result 1 "patches 1-$i build"
    fi
done
gitp checkout -q posting
say "posting: $n patches, $built of $n prefixes build, $bad problems"
[ "$bad" = 0 ]
