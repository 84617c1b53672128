/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * CPU cost of dedup-nas tracking and lookup, without QEMU: what the block
 * observer adds to each guest read (hash every 4 KiB block, insert it into
 * the index) and what the source adds to each page it sends (hash, look
 * up).  Prints one "BENCH-INDEX key=value ..." line; scripts/bench.py
 * reports it next to the guest-level overhead measurement.  Not a test:
 * it asserts nothing about speed.
 *
 * Usage: bench-nas-dedup-index [MiB of guest I/O (256)] [request KiB (128)]
 */
#include "qemu/osdep.h"
#include "nas-dedup-index.h"

#define C NAS_DEDUP_CHUNK

static double now_s(void)
{
    return g_get_monotonic_time() / 1e6;
}

int main(int argc, char **argv)
{
    uint64_t mib = argc > 1 ? g_ascii_strtoull(argv[1], NULL, 10) : 256;
    uint64_t req_kib = argc > 2 ? g_ascii_strtoull(argv[2], NULL, 10) : 128;
    uint64_t req = req_kib * 1024;
    uint64_t bytes = mib * 1024 * 1024;
    uint64_t blocks = bytes / C, i, off, hits = 0;
    g_autofree uint8_t *data = NULL;
    NasDedupIndex *idx;
    NasDedupLoc loc;
    NasDedupHash h;
    double t0, t_hash, t_note, t_lookup;
    uint64_t sink = 0;          /* printed, so the hashing is not elided */

    if (!mib || req < C || req % C || req > bytes) {
        g_printerr("usage: %s [MiB (>0)] [request KiB (multiple of 4)]\n",
                   argv[0]);
        return 2;
    }
    /* Unique, non-zero, incompressible-looking content. */
    data = g_malloc(bytes);
    for (i = 0; i < bytes / 8; i++) {
        ((uint64_t *)data)[i] = (i + 1) * 0x9E3779B97F4A7C15ull ^ (i >> 7);
    }
    /* Room for every block, as the default budget (1% of RAM) allows. */
    idx = nas_dedup_index_new(MAX(NAS_DEDUP_INDEX_MIN_BYTES, bytes / 100));

    t0 = now_s();
    for (i = 0; i < blocks; i++) {
        nas_dedup_hash_chunk(data + i * C, &h);
        sink += h.lo;
    }
    t_hash = now_s() - t0;

    t0 = now_s();
    for (off = 0; off < bytes; off += req) {
        struct iovec iov = { .iov_base = data + off, .iov_len = req };

        nas_dedup_index_note_io(idx, 0, off, req, &iov, 1, 0, false);
    }
    t_note = now_s() - t0;

    t0 = now_s();
    for (i = 0; i < blocks; i++) {
        nas_dedup_hash_chunk(data + i * C, &h);
        hits += nas_dedup_index_lookup(idx, &h, &loc);
    }
    t_lookup = now_s() - t0;

    printf("BENCH-INDEX io_mib=%" PRIu64 " request_kib=%" PRIu64
           " blocks=%" PRIu64 " hash_ns_per_block=%.0f"
           " note_read_ns_per_block=%.0f note_read_mb_s=%.0f"
           " lookup_ns_per_page=%.0f lookup_hit_pct=%.1f sink=%" PRIx64 "\n",
           mib, req / 1024, blocks, t_hash * 1e9 / blocks,
           t_note * 1e9 / blocks, bytes / t_note / 1e6,
           t_lookup * 1e9 / blocks, 100.0 * hits / blocks, sink);
    nas_dedup_index_free(idx);
    return 0;
}
