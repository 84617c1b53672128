#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Fuzz every decoder of bytes from the migration peer (migration/
# nas-dedup-wire.c) for a bounded time: tests/fuzz/fuzz-nas-dedup-wire.c
# built with clang, libFuzzer, ASan and UBSan (Debian: clang,
# libclang-rt-dev, llvm; scripts/install-deps.sh installs them).
#
#   scripts/fuzz.sh [SECONDS]        run for SECONDS (default 60)
#   scripts/fuzz.sh --write-seeds    regenerate tests/fuzz/corpus/ (the seeds
#                                    are committed; this is how they were made)
#
# Builds into build/fuzz/ (again only when a source or flag changed), fuzzes
# a fresh copy of the seeds in build/fuzz/corpus (the repository is not
# written), and prints TAP: "1..1", libFuzzer's final stats as comments,
# then "ok 1 fuzz-nas-dedup-wire (N execs, cov C)" or "not ok 1 ...".  Exits
# non-zero on any crash, leak, sanitizer report, failed check or timeout;
# the input that did it is kept in build/fuzz/artifacts/ and the command
# that replays it is printed.
#
# Environment: NASDEDUP_FUZZ_WIRE_SRC=FILE compiles FILE instead of
# migration/nas-dedup-wire.c (to show that the harness catches a broken
# decoder, with a scratch copy outside the tree); NASDEDUP_FUZZ_ARGS adds
# libFuzzer options (e.g. "-seed=1").
set -uo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top" || exit 1
name=fuzz-nas-dedup-wire
seeds=tests/fuzz/corpus
out=build/fuzz
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$(dirname "$0")/lib/common.sh"   # say, die, warn

# ---------------------------------------------------------------------------
# Seeds: real encodings (layouts of migration/nas-dedup-wire.h), each behind
# the harness's selector byte: 0 records, 1 refs_check, 2 RESEND, 3 SYNC_ACK,
# 4 PROGRESS.
write_seeds() {
    mkdir -p "$seeds"
    rm -f "$seeds"/*.bin
    python3 - "$seeds" <<'EOF'
import struct, sys, os
d = sys.argv[1]
def w(name, b):
    open(os.path.join(d, name + '.bin'), 'wb').write(b)
def drive(n, ident, size):
    i = ident.encode()
    return struct.pack('>BHB', 1, n, len(i)) + i + struct.pack('>Q', size)
def refs(n, off, hashes):
    b = struct.pack('>BHHQ', 2, n, len(hashes), off)
    return b + b''.join(struct.pack('>QQ', hi, lo) for hi, lo in hashes)
def sync(seq, final):
    return struct.pack('>BIB', 3, seq, final)
def setup(ver=6, resend=0x0a, ack=0x10b, progress=0x20c, keylen=384):
    return struct.pack('>BBHHHH', 4, ver, resend, ack, progress, keylen) + \
           bytes((k * 7 + 1) & 0xff for k in range(384))
def hs(n):
    return [((~k) & (2**64 - 1), k * 3) for k in range(n)]
def resend(ident, off, n, seq=1):
    i = ident.encode()
    return struct.pack('>B', len(i)) + i + struct.pack('>QII', off, n, seq)
R = lambda b: b'\x00' + b          # record stream
C = lambda po, ram, disk, b: b'\x01' + struct.pack('>QQQ', po, ram, disk) + b
P = lambda b: b'\x02' + b          # RESEND payload
A = lambda b: b'\x03' + b          # SYNC_ACK payload
G = lambda b: b'\x04' + b          # PROGRESS payload

w('rec-drive', R(drive(7, '/machine/peripheral/vd0/virtio-backend', 512 << 20)))
w('rec-drive-max', R(drive(32767, 'x' * 255, 1 << 54)))
w('rec-refs-1', R(refs(7, 0x123000, hs(1))))
w('rec-refs-5', R(refs(7, 0x123000, hs(5))))
w('rec-refs-256', R(refs(0, 0, hs(256))))
w('rec-sync', R(sync(0xdeadbeef, 1)))
w('rec-sync-notfinal', R(sync(1, 0)))
w('rec-sync-lazy', R(sync(3, 2)))
w('rec-setup', R(setup()))
w('rec-stream', R(setup() + drive(0, 'disk0', 1 << 30) + refs(0, 0x2000, hs(3))
                  + drive(1, 'disk1', 1 << 20) + refs(1, 0x1000, hs(2))
                  + sync(1, 0) + refs(0, 0x8000, hs(1)) + sync(2, 1)))
# rejected forms (the decoder's error paths)
w('bad-type', R(b'\x09\x00\x00'))
w('bad-drive-number', R(drive(0x8000, 'a', 1)))
w('bad-drive-id-empty', R(drive(0, '', 1)))
w('bad-drive-id-nl', R(drive(0, 'a\n', 1)))
w('bad-drive-size', R(drive(0, 'a', 2**64 - 1)))
w('bad-refs-0', R(refs(0, 0, [])))
w('bad-refs-257', R(struct.pack('>BHHQ', 2, 0, 257, 0) + b'\x00' * 16 * 4))
w('bad-refs-unaligned', R(refs(0, 0x1001, hs(1))))
w('rec-refs-sector', R(refs(0, 63 * 512, hs(2))))
w('bad-refs-offset', R(refs(0, 0xf0 << 56, hs(1))))
w('bad-refs-truncated', R(refs(0, 0, hs(4))[:-9]))
w('bad-sync-final', R(sync(1, 3)))
w('bad-setup-version', R(setup(ver=1)))
w('bad-setup-version-2', R(setup(ver=2)))
w('bad-setup-version-3', R(setup(ver=3)))
w('bad-setup-version-4', R(setup(ver=4)))
w('bad-setup-version-5', R(setup(ver=5)))
w('bad-setup-keylen', R(setup(keylen=16)))
C4 = 4096
w('check-ok', C(0, 16 * C4, 100 * C4, refs(0, 8 * C4, hs(4))))
w('check-ram-edge', C(12 * C4, 16 * C4, 12 * C4, refs(0, 8 * C4, hs(4))))
w('check-ram-past', C(13 * C4, 16 * C4, 100 * C4, refs(0, 8 * C4, hs(4))))
w('check-ram-wrap', C(2**64 - C4, 16 * C4, 100 * C4, refs(0, 0, hs(4))))
w('check-disk-past', C(0, 16 * C4, 11 * C4, refs(0, 8 * C4, hs(4))))
w('resend', P(resend('pc.ram', 0x7000, 3)))
w('resend-256', P(resend('/rom@etc/acpi/tables', 0xfffff000, 256)))
w('resend-trailing', P(resend('pc.ram', 0x7000, 3) + b'x'))
w('resend-0', P(resend('pc.ram', 0, 0)))
w('resend-id-ctrl', P(resend('pc\x01ram', 0, 1)))
w('resend-seq-max', P(resend('pc.ram', 0x7000, 3, 0xfffffffe)))
w('resend-seq-0', P(resend('pc.ram', 0x7000, 3, 0)))
w('sync-ack', A(struct.pack('>II', 42, 17)))
w('sync-ack-short', A(struct.pack('>II', 42, 17)[:7]))
w('progress', G(struct.pack('>QQQ', 157201, 643 << 20, 1700000)))
w('progress-long', G(struct.pack('>QQQ', 1, 2, 3) + b'x'))
EOF
    say "wrote $(find "$seeds" -name '*.bin' | wc -l) seeds into $seeds"
}

if [ "${1:-}" = --write-seeds ]; then
    write_seeds
    exit $?
fi

secs=${1:-60}
echo "1..1"
fail() {    # reason
    echo "not ok 1 $name ($*)"
    exit 1
}
case $secs in
    ''|*[!0-9]*) fail "bad duration '$secs'" ;;
esac

# ---------------------------------------------------------------------------
# Build.
CC=${CC:-clang}
command -v "$CC" >/dev/null || fail "$CC not found: run scripts/install-deps.sh"
wire_src=${NASDEDUP_FUZZ_WIRE_SRC:-migration/nas-dedup-wire.c}
srcs=("tests/fuzz/$name.c" "$wire_src" migration/nas-dedup-hash.c standalone/error.c)
deps=$(pkg-config --cflags --libs glib-2.0 libxxhash) ||
    fail "glib-2.0 or libxxhash development files missing"
# shellcheck disable=SC2054  # (the commas are clang's)
cflags=(-g -O1 -std=gnu11 -fno-omit-frame-pointer
        -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
        -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers
        -Istandalone/include -Imigration -Iinclude)
mkdir -p "$out"
bin=$out/$name
# Rebuild when a source, a header, a flag or the compiler changed.
key=$( { "$CC" --version; echo "${cflags[*]} $deps ${srcs[*]}";
         cat "${srcs[@]}" migration/*.h include/migration/nas-dedup*.h \
             standalone/include/qemu/*.h standalone/include/host/*.h; } |
       sha256sum | cut -d' ' -f1)
if [ ! -x "$bin" ] || [ "$(cat "$bin.key" 2>/dev/null)" != "$key" ]; then
    say "building $bin ($wire_src)"
    # shellcheck disable=SC2086
    if ! "$CC" "${cflags[@]}" "${srcs[@]}" $deps -o "$bin.tmp" \
            > "$out/build.log" 2>&1; then
        sed 's/^/# /' "$out/build.log"
        fail "build failed (log: $out/build.log)"
    fi
    mv "$bin.tmp" "$bin" && echo "$key" > "$bin.key"
fi

# ---------------------------------------------------------------------------
# Run on a fresh copy of the seeds.
# (earlier crash inputs in artifacts/ are kept; this run's are those newer
# than the stamp)
rm -rf "$out/corpus"
mkdir -p "$out/corpus" "$out/artifacts"
touch "$out/run.stamp"
cp "$seeds"/*.bin "$out/corpus/" 2>/dev/null ||
    fail "no seeds in $seeds"
log=$out/fuzz.log
say "fuzzing for $secs s (log: $log)"
# Leak checking, and the symbolized stack of any report.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
# shellcheck disable=SC2086
"$bin" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
    -max_len=8192 -print_final_stats=1 -artifact_prefix="$out/artifacts/" \
    ${NASDEDUP_FUZZ_ARGS:-} "$out/corpus" > "$log" 2>&1
rc=$?

done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1)
execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
[ -n "$execs" ] || execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
grep -E '^(Seed:|INFO: seed corpus:|#[0-9]+[[:space:]]+(INITED|DONE))' "$log" |
    sed 's/^/# /'
grep -E '^stat::' "$log" | sed 's/^/# /'

if [ "$rc" != 0 ] || [ -z "$done_line" ]; then
    # The report: sanitizer or check failure, and the input that did it.
    grep -nE 'ERROR: |SUMMARY: |check failed|runtime error|deadly signal|Test unit written' \
        "$log" | head -20 | sed 's/^/# /'
    tail -40 "$log" | sed 's/^/# /' >&2
    find "$out/artifacts" -type f -newer "$out/run.stamp" |
        sed "s|^|# replay: $bin |"
    fail "exit $rc after ${execs:-?} execs, cov ${cov:-?}; log: $log"
fi
echo "ok 1 $name (${execs:-?} execs, cov ${cov:-?})"
