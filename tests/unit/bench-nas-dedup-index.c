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
 * Also times the index alone in three cases that once cost far more than
 * the rest (ns and index steps per operation): inserting 60k chunks of one
 * content at distinct places (same_insert_*), overwriting indexed chunks of
 * a full index of ~1M entries (overwrite_*), and discarding 2 GiB of a drive
 * with nothing indexed while the index is full (discard2g_empty_*).
 *
 * Usage: bench-nas-dedup-index [MiB of guest I/O (256)] [request KiB (128)]
 */
#include "qemu/osdep.h"
#include "qemu/memalign.h"
#include "migration/nas-dedup-index.h"

#define C NAS_DEDUP_CHUNK

static double now_s(void)
{
    return g_get_monotonic_time() / 1e6;
}

static uint64_t steps_of(NasDedupIndex *idx)
{
    NasDedupIndexStats st;

    nas_dedup_index_get_stats(idx, &st);
    return st.steps;
}

/* Well-spread 128-bit values, as keyed hashes are. */
static uint64_t mix_hash(uint64_t n)
{
    uint64_t z = n * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;

    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

typedef struct SlowCases {
    double same_ns, same_steps;
    uint64_t full_entries;
    double overwrite_ns, overwrite_steps;
    double discard_ns, discard_steps;
} SlowCases;

/*
 * Repeat @op until @max_ops or @max_s seconds; ns and steps per call.
 * @op gets the call number.
 */
static void time_ops(NasDedupIndex *idx, void (*op)(NasDedupIndex *, uint64_t),
                     uint64_t max_ops, double max_s, double *ns,
                     double *steps)
{
    uint64_t s0 = steps_of(idx), i;
    double t0 = now_s(), t;

    for (i = 0; i < max_ops; i++) {
        op(idx, i);
        if ((i & 15) == 15 && now_s() - t0 > max_s) {
            i++;
            break;
        }
    }
    t = now_s() - t0;
    *ns = t * 1e9 / i;
    *steps = (double)(steps_of(idx) - s0) / i;
}

static uint64_t full_n;

static void op_same(NasDedupIndex *idx, uint64_t i)
{
    uint64_t h = mix_hash(1);

    nas_dedup_index_insert(idx, h, 3, i * C);
}

static void op_overwrite(NasDedupIndex *idx, uint64_t i)
{
    uint64_t h = mix_hash(full_n + i);
    /* A pseudo-random indexed chunk of drive 0. */
    uint64_t c = mix_hash(~i) % full_n;

    nas_dedup_index_insert(idx, h, 0, c * C);
}

static void op_discard(NasDedupIndex *idx, uint64_t i)
{
    nas_dedup_index_note_io(idx, 1, (i % 64) << 31, 1ull << 31, NULL, 0, 0,
                            true);
}

static void slow_cases(const NasDedupKey *key, SlowCases *r)
{
    /* ~1M entries: 24 bytes each, 2 x 4 bytes per slot of 2^21, slack. */
    NasDedupIndex *idx = nas_dedup_index_new(24 * (1 << 20) + 8 * (2 << 20) +
                                             (4 << 20), key);
    NasDedupIndexStats st;
    uint64_t i;

    time_ops(idx, op_same, 60000, 30, &r->same_ns, &r->same_steps);
    nas_dedup_index_invalidate_drive(idx, 3);

    nas_dedup_index_get_stats(idx, &st);
    full_n = st.capacity;
    for (i = 0; i < full_n; i++) {
        uint64_t h = mix_hash(i);

        nas_dedup_index_insert(idx, h, 0, i * C);
    }
    nas_dedup_index_get_stats(idx, &st);
    r->full_entries = st.entries;
    time_ops(idx, op_overwrite, 1000000, 1.0, &r->overwrite_ns,
             &r->overwrite_steps);
    time_ops(idx, op_discard, 100000, 1.0, &r->discard_ns, &r->discard_steps);
    nas_dedup_index_free(idx);
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
    uint64_t h;
    double t0, t_hash, t_note, t_lookup;
    NasDedupKey key;
    uint64_t sink = 0;          /* printed, so the hashing is not elided */
    SlowCases slow;

    if (!mib || req < C || req % C || req > bytes) {
        g_printerr("usage: %s [MiB (>0)] [request KiB (multiple of 4)]\n",
                   argv[0]);
        return 2;
    }
    /*
     * Unique, non-zero, incompressible-looking content, in page-aligned
     * memory as guest RAM is (reads index the pages of memory they fill).
     */
    data = qemu_memalign(C, bytes);
    for (i = 0; i < bytes / 8; i++) {
        ((uint64_t *)data)[i] = (i + 1) * 0x9E3779B97F4A7C15ull ^ (i >> 7);
    }
    for (i = 0; i < sizeof(key.secret); i++) {
        ((uint8_t *)key.secret)[i] = g_random_int();
    }
    /* Room for every block, as the default budget (1% of RAM) allows. */
    idx = nas_dedup_index_new(MAX(NAS_DEDUP_INDEX_MIN_BYTES, bytes / 100),
                              &key);

    t0 = now_s();
    for (i = 0; i < blocks; i++) {
        h = nas_dedup_hash64(&key, 0, data + i * C);
        sink += h;
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
        h = nas_dedup_hash64(&key, 0, data + i * C);
        hits += nas_dedup_index_lookup(idx, h, &loc);
    }
    t_lookup = now_s() - t0;
    nas_dedup_index_free(idx);

    slow_cases(&key, &slow);

    printf("BENCH-INDEX io_mib=%" PRIu64 " request_kib=%" PRIu64
           " blocks=%" PRIu64 " hash_ns_per_block=%.0f"
           " note_read_ns_per_block=%.0f note_read_mb_s=%.0f"
           " lookup_ns_per_page=%.0f lookup_hit_pct=%.1f"
           " same_insert_ns=%.0f same_insert_steps=%.1f"
           " full_entries=%" PRIu64 " overwrite_ns=%.0f overwrite_steps=%.1f"
           " discard2g_empty_ns=%.0f discard2g_empty_steps=%.1f"
           " sink=%" PRIx64 "\n",
           mib, req / 1024, blocks, t_hash * 1e9 / blocks,
           t_note * 1e9 / blocks, bytes / t_note / 1e6,
           t_lookup * 1e9 / blocks, 100.0 * hits / blocks,
           slow.same_ns, slow.same_steps, slow.full_entries,
           slow.overwrite_ns, slow.overwrite_steps, slow.discard_ns,
           slow.discard_steps, sink);
    return 0;
}
