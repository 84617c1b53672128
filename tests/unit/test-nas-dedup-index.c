/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Unit tests of the dedup-nas content index.
 */
#include "qemu/osdep.h"
#include "nas-dedup-index.h"

#define MiB (1024 * 1024)
#define C NAS_DEDUP_CHUNK

static NasDedupHash H(uint64_t n)
{
    NasDedupHash h = { .hi = n * 0x9E3779B97F4A7C15ull, .lo = n };
    return h;
}

/* A chunk of content unique to @seed (never all zero). */
static void fill_chunk(uint8_t *buf, uint64_t seed)
{
    uint64_t *p = (uint64_t *)buf;
    size_t i;

    for (i = 0; i < C / 8; i++) {
        p[i] = (seed + 1) * 0x2545F4914F6CDD1Dull + i;
    }
}

static void assert_at(NasDedupIndex *idx, uint64_t n, uint16_t drive,
                      uint64_t off)
{
    NasDedupHash h = H(n);
    NasDedupLoc loc;

    g_assert_true(nas_dedup_index_lookup(idx, &h, &loc));
    g_assert_cmpuint(loc.drive, ==, drive);
    g_assert_cmpuint(loc.offset, ==, off);
}

static void assert_absent(NasDedupIndex *idx, uint64_t n)
{
    NasDedupHash h = H(n);
    NasDedupLoc loc;

    g_assert_false(nas_dedup_index_lookup(idx, &h, &loc));
}

static void test_hash(void)
{
    g_autofree uint8_t *a = g_malloc0(C);
    g_autofree uint8_t *b = g_malloc0(C);
    NasDedupHash ha, hb;

    g_assert_true(nas_dedup_chunk_is_zero(a));
    b[C - 1] = 1;
    g_assert_false(nas_dedup_chunk_is_zero(b));
    nas_dedup_hash_chunk(a, &ha);
    nas_dedup_hash_chunk(b, &hb);
    g_assert_false(nas_dedup_hash_equal(&ha, &hb));
    b[C - 1] = 0;
    nas_dedup_hash_chunk(b, &hb);
    g_assert_true(nas_dedup_hash_equal(&ha, &hb));
}

/*
 * Both hash implementations give the same XXH3-128 (hosts with and without
 * AVX2 must agree), on random buffers and odd alignments.
 */
static void test_hash_impls(void)
{
    g_autofree uint8_t *buf = g_malloc(C + 64);
    GRand *r = g_rand_new_with_seed(42);
    NasDedupHash g, d;
    unsigned int i, k;

#ifdef NAS_DEDUP_HASH_AVX2
    if (!nas_dedup_hash_have_avx2()) {
        g_test_skip("this CPU has no AVX2");
    }
#endif
    for (i = 0; i < 200; i++) {
        uint8_t *p = buf + (i % 64);

        for (k = 0; k < C; k++) {
            p[k] = g_rand_int(r);
        }
        nas_dedup_hash_chunk_generic(p, &g);
        nas_dedup_hash_chunk(p, &d);
        g_assert_true(nas_dedup_hash_equal(&g, &d));
#ifdef NAS_DEDUP_HASH_AVX2
        if (nas_dedup_hash_have_avx2()) {
            nas_dedup_hash_chunk_avx2(p, &d);
            g_assert_true(nas_dedup_hash_equal(&g, &d));
        }
#endif
    }
    g_rand_free(r);
}

static void test_insert_lookup(void)
{
    NasDedupIndex *idx = nas_dedup_index_new(MiB);
    NasDedupIndexStats st;

    g_assert_nonnull(idx);
    assert_absent(idx, 1);
    nas_dedup_index_insert(idx, &(NasDedupHash){ H(1).hi, H(1).lo }, 3, 5 * C);
    assert_at(idx, 1, 3, 5 * C);
    assert_absent(idx, 2);
    nas_dedup_index_get_stats(idx, &st);
    g_assert_cmpuint(st.entries, ==, 1);
    g_assert_cmpuint(st.hits, ==, 1);
    g_assert_cmpuint(st.misses, ==, 2);
    g_assert_true(nas_dedup_index_selfcheck(idx));
    nas_dedup_index_free(idx);
}

static void test_replace(void)
{
    NasDedupIndex *idx = nas_dedup_index_new(MiB);
    NasDedupHash h1 = H(1), h2 = H(2);
    NasDedupIndexStats st;

    nas_dedup_index_insert(idx, &h1, 0, 0);
    nas_dedup_index_insert(idx, &h2, 0, 0);     /* block overwritten */
    assert_absent(idx, 1);
    assert_at(idx, 2, 0, 0);
    nas_dedup_index_insert(idx, &h2, 0, 0);     /* same content again */
    nas_dedup_index_get_stats(idx, &st);
    g_assert_cmpuint(st.entries, ==, 1);
    g_assert_true(nas_dedup_index_selfcheck(idx));
    nas_dedup_index_free(idx);
}

static void test_same_content_two_places(void)
{
    NasDedupIndex *idx = nas_dedup_index_new(MiB);
    NasDedupHash h = H(7);
    NasDedupLoc loc;

    nas_dedup_index_insert(idx, &h, 0, 10 * C);
    nas_dedup_index_insert(idx, &h, 1, 20 * C);
    g_assert_true(nas_dedup_index_lookup(idx, &h, &loc));
    /* Invalidate whichever was found: the other must still be found. */
    nas_dedup_index_invalidate(idx, loc.drive, loc.offset, C);
    g_assert_true(nas_dedup_index_lookup(idx, &h, &loc));
    nas_dedup_index_invalidate(idx, loc.drive, loc.offset, 1);
    assert_absent(idx, 7);
    g_assert_true(nas_dedup_index_selfcheck(idx));
    nas_dedup_index_free(idx);
}

static void test_invalidate_ranges(void)
{
    NasDedupIndex *idx = nas_dedup_index_new(MiB);
    uint64_t i;

    for (i = 0; i < 16; i++) {
        NasDedupHash h = H(i);
        nas_dedup_index_insert(idx, &h, 2, i * C);
    }
    /* Bytes 1..(2C+1): touches chunks 0, 1 and 2. */
    nas_dedup_index_invalidate(idx, 2, 1, 2 * C + 1);
    assert_absent(idx, 0);
    assert_absent(idx, 1);
    assert_absent(idx, 2);
    assert_at(idx, 3, 2, 3 * C);
    /* Other drive, same offsets: untouched. */
    nas_dedup_index_invalidate(idx, 1, 0, 16 * C);
    assert_at(idx, 4, 2, 4 * C);
    /* A huge range (scan path), then the whole drive. */
    nas_dedup_index_invalidate(idx, 2, 10 * C, 1ull << 50);
    assert_at(idx, 9, 2, 9 * C);
    assert_absent(idx, 10);
    assert_absent(idx, 15);
    nas_dedup_index_invalidate_drive(idx, 2);
    assert_absent(idx, 9);
    g_assert_true(nas_dedup_index_selfcheck(idx));
    nas_dedup_index_free(idx);
}

static void test_bounds_and_eviction(void)
{
    const uint64_t budget = 256 * 1024;
    NasDedupIndex *idx = nas_dedup_index_new(budget);
    NasDedupIndexStats st;
    uint64_t i, n;

    g_assert_null(nas_dedup_index_new(NAS_DEDUP_INDEX_MIN_BYTES - 1));
    nas_dedup_index_get_stats(idx, &st);
    g_assert_cmpuint(st.bytes, <=, budget);
    /* Uses the budget reasonably: at least 3/4 of it. */
    g_assert_cmpuint(st.bytes, >=, budget / 4 * 3);
    n = st.capacity;
    g_assert_cmpuint(n, >, 1000);

    for (i = 0; i < 3 * n; i++) {
        NasDedupHash h = H(i);

        nas_dedup_index_insert(idx, &h, 0, i * C);
        if (i >= 10) {
            /* Keep entry 5 hot: CLOCK must never evict it. */
            assert_at(idx, 5, 0, 5 * C);
        }
    }
    nas_dedup_index_get_stats(idx, &st);
    g_assert_cmpuint(st.entries, ==, n);
    g_assert_cmpuint(st.evictions, ==, 2 * n);
    g_assert_cmpuint(st.bytes, <=, budget);
    assert_at(idx, 5, 0, 5 * C);
    assert_at(idx, 3 * n - 1, 0, (3 * n - 1) * C);   /* newest survives */
    assert_absent(idx, 6);                            /* an old cold one */
    g_assert_true(nas_dedup_index_selfcheck(idx));
    nas_dedup_index_free(idx);
}

/* Random operations against a simple model (no eviction: big budget). */
static void test_model(void)
{
    NasDedupIndex *idx = nas_dedup_index_new(8 * MiB);
    GHashTable *model = g_hash_table_new(g_int64_hash, g_int64_equal);
    g_autoptr(GRand) r = g_rand_new_with_seed(42);
    uint64_t *keys = g_new0(uint64_t, 4096);
    int i;

    for (i = 0; i < 200000; i++) {
        uint64_t chunk = g_rand_int_range(r, 0, 4096);
        uint64_t content = g_rand_int_range(r, 1, 3000);  /* duplicates */
        NasDedupHash h = H(content);

        keys[chunk] = chunk;
        if (g_rand_int_range(r, 0, 4) == 0) {
            nas_dedup_index_invalidate(idx, 0, chunk * C, C);
            g_hash_table_remove(model, &keys[chunk]);
        } else {
            nas_dedup_index_insert(idx, &h, 0, chunk * C);
            g_hash_table_insert(model, &keys[chunk],
                                GUINT_TO_POINTER((guint)content));
        }
        if (i % 997 == 0) {
            /* Every lookup answer must be true of the model. */
            uint64_t c;

            for (c = 1; c < 3000; c += 7) {
                NasDedupHash hc = H(c);
                NasDedupLoc loc;

                if (nas_dedup_index_lookup(idx, &hc, &loc)) {
                    uint64_t k = loc.offset / C;
                    g_assert_cmpuint(loc.drive, ==, 0);
                    g_assert_cmpuint(GPOINTER_TO_UINT(
                        g_hash_table_lookup(model, &k)), ==, c);
                }
            }
        }
    }
    /* And everything in the model is found. */
    {
        GHashTableIter it;
        gpointer k, v;
        NasDedupIndexStats st;

        g_hash_table_iter_init(&it, model);
        while (g_hash_table_iter_next(&it, &k, &v)) {
            NasDedupHash h = H(GPOINTER_TO_UINT(v));
            NasDedupLoc loc;

            g_assert_true(nas_dedup_index_lookup(idx, &h, &loc));
        }
        nas_dedup_index_get_stats(idx, &st);
        g_assert_cmpuint(st.entries, ==, g_hash_table_size(model));
        g_assert_cmpuint(st.evictions, ==, 0);
    }
    g_assert_true(nas_dedup_index_selfcheck(idx));
    g_hash_table_destroy(model);
    g_free(keys);
    nas_dedup_index_free(idx);
}

static void test_note_io_read(void)
{
    NasDedupIndex *idx = nas_dedup_index_new(MiB);
    g_autofree uint8_t *data = g_malloc0(8 * C);
    struct iovec iov[3];
    NasDedupHash h;
    NasDedupLoc loc;
    NasDedupIndexStats st;
    int k;

    for (k = 0; k < 8; k++) {
        if (k != 4) {                    /* chunk 4 stays all zero */
            fill_chunk(data + k * C, k);
        }
    }
    /*
     * A read of disk bytes [C - 512, 8C - 512): the data buffer holds them
     * at data + C - 512 (so chunk k of the disk is at data + k * C).  Split
     * the iovec unevenly so that chunks straddle elements.
     */
    iov[0] = (struct iovec){ data, 1000 };
    iov[1] = (struct iovec){ data + 1000, 3 * C };
    iov[2] = (struct iovec){ data + 1000 + 3 * C, 8 * C - 1000 - 3 * C };
    nas_dedup_index_note_io(idx, 1, C - 512, 7 * C, iov, 3, C - 512, false);

    /* Whole chunks 1..6 are indexed, except the zero chunk 4. */
    for (k = 0; k < 8; k++) {
        nas_dedup_hash_chunk(data + k * C, &h);
        if (k >= 1 && k <= 6 && k != 4) {
            g_assert_true(nas_dedup_index_lookup(idx, &h, &loc));
            g_assert_cmpuint(loc.drive, ==, 1);
            g_assert_cmpuint(loc.offset, ==, k * C);
        } else {
            g_assert_false(nas_dedup_index_lookup(idx, &h, &loc));
        }
    }
    nas_dedup_index_get_stats(idx, &st);
    g_assert_cmpuint(st.entries, ==, 5);
    g_assert_true(nas_dedup_index_selfcheck(idx));
    nas_dedup_index_free(idx);
}

static void test_note_io_write(void)
{
    NasDedupIndex *idx = nas_dedup_index_new(MiB);
    g_autofree uint8_t *data = g_malloc0(4 * C);
    g_autofree uint8_t *newdata = g_malloc0(4 * C);
    struct iovec iov = { data, 4 * C };
    struct iovec niov;
    NasDedupHash h;
    NasDedupLoc loc;
    int k;

    for (k = 0; k < 4; k++) {
        fill_chunk(data + k * C, 100 + k);
        fill_chunk(newdata + k * C, 200 + k);
    }
    nas_dedup_index_note_io(idx, 0, 0, 4 * C, &iov, 1, 0, false);

    /* Write 2 chunks' worth at C/2: chunk 1 whole, chunks 0 and 2 partial. */
    niov = (struct iovec){ newdata, 2 * C };
    nas_dedup_index_note_io(idx, 0, C / 2, 2 * C, &niov, 1, 0, true);
    for (k = 0; k < 4; k++) {
        nas_dedup_hash_chunk(data + k * C, &h);
        g_assert_true(nas_dedup_index_lookup(idx, &h, &loc) == (k == 3));
    }
    /* The whole chunk 1 now holds newdata[C/2, 3C/2). */
    nas_dedup_hash_chunk(newdata + C / 2, &h);
    g_assert_true(nas_dedup_index_lookup(idx, &h, &loc));
    g_assert_cmpuint(loc.offset, ==, C);

    /* Write-zeroes / discard (no data) invalidate. */
    nas_dedup_index_note_io(idx, 0, C, C, NULL, 0, 0, true);
    g_assert_false(nas_dedup_index_lookup(idx, &h, &loc));
    nas_dedup_hash_chunk(data + 3 * C, &h);
    g_assert_true(nas_dedup_index_lookup(idx, &h, &loc));

    /* Writing a zero chunk over chunk 3 invalidates it. */
    memset(newdata, 0, C);
    niov = (struct iovec){ newdata, C };
    nas_dedup_index_note_io(idx, 0, 3 * C, C, &niov, 1, 0, true);
    g_assert_false(nas_dedup_index_lookup(idx, &h, &loc));
    g_assert_true(nas_dedup_index_selfcheck(idx));
    nas_dedup_index_free(idx);
}

typedef struct {
    NasDedupIndex *idx;
    int seed;
} ThreadArg;

static gpointer worker(gpointer opaque)
{
    ThreadArg *a = opaque;
    g_autoptr(GRand) r = g_rand_new_with_seed(a->seed);
    g_autofree uint8_t *buf = g_malloc(4 * C);
    int i;

    for (i = 0; i < 20000; i++) {
        uint64_t chunk = g_rand_int_range(r, 0, 2048);
        NasDedupHash h = H(g_rand_int_range(r, 1, 5000));
        NasDedupLoc loc;
        struct iovec iov = { buf, 4 * C };

        switch (g_rand_int_range(r, 0, 5)) {
        case 0:
            nas_dedup_index_insert(a->idx, &h, a->seed % 4, chunk * C);
            break;
        case 1:
            nas_dedup_index_lookup(a->idx, &h, &loc);
            break;
        case 2:
            nas_dedup_index_invalidate(a->idx, a->seed % 4, chunk * C, 3 * C);
            break;
        case 3:
            fill_chunk(buf, i);
            fill_chunk(buf + C, i + 1);
            nas_dedup_index_note_io(a->idx, a->seed % 4, chunk * C, 4 * C,
                                    &iov, 1, 0, g_rand_boolean(r));
            break;
        default:
            if (i % 1000 == 0) {
                nas_dedup_index_invalidate_drive(a->idx, a->seed % 4);
            }
        }
    }
    return NULL;
}

#define FILLER_CHUNKS 2000

/* Inserts FILLER_CHUNKS distinct locations with distinct content. */
static gpointer filler(gpointer opaque)
{
    ThreadArg *a = opaque;
    uint64_t i;

    for (i = 0; i < FILLER_CHUNKS; i++) {
        NasDedupHash h = H(a->seed * 1000000 + i);

        nas_dedup_index_insert(a->idx, &h, a->seed, i * C);
    }
    return NULL;
}

static void run_threads(NasDedupIndex *idx, GThreadFunc fn)
{
    ThreadArg args[4];
    GThread *th[4];
    int i;

    for (i = 0; i < 4; i++) {
        args[i] = (ThreadArg){ idx, i + 1 };
        th[i] = g_thread_new("worker", fn, &args[i]);
    }
    for (i = 0; i < 4; i++) {
        g_thread_join(th[i]);
    }
}

static void test_concurrency(void)
{
    /* Small budget: eviction runs concurrently with everything else. */
    NasDedupIndex *idx = nas_dedup_index_new(128 * 1024);
    NasDedupIndexStats st;

    run_threads(idx, worker);
    nas_dedup_index_get_stats(idx, &st);
    g_assert_cmpuint(st.entries, <=, st.capacity);
    g_assert_true(nas_dedup_index_selfcheck(idx));
    nas_dedup_index_free(idx);

    /* Concurrent inserts of more distinct chunks than fit: exact counts. */
    idx = nas_dedup_index_new(128 * 1024);
    run_threads(idx, filler);
    nas_dedup_index_get_stats(idx, &st);
    g_assert_cmpuint(st.capacity, <, 4 * FILLER_CHUNKS);
    g_assert_cmpuint(st.entries, ==, st.capacity);
    g_assert_cmpuint(st.evictions, ==, 4 * FILLER_CHUNKS - st.capacity);
    g_assert_true(nas_dedup_index_selfcheck(idx));
    nas_dedup_index_free(idx);
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/nas-dedup/index/hash", test_hash);
    g_test_add_func("/nas-dedup/index/hash-impls", test_hash_impls);
    g_test_add_func("/nas-dedup/index/insert-lookup", test_insert_lookup);
    g_test_add_func("/nas-dedup/index/replace", test_replace);
    g_test_add_func("/nas-dedup/index/same-content-two-places",
                    test_same_content_two_places);
    g_test_add_func("/nas-dedup/index/invalidate-ranges",
                    test_invalidate_ranges);
    g_test_add_func("/nas-dedup/index/bounds-eviction",
                    test_bounds_and_eviction);
    g_test_add_func("/nas-dedup/index/model", test_model);
    g_test_add_func("/nas-dedup/index/note-io-read", test_note_io_read);
    g_test_add_func("/nas-dedup/index/note-io-write", test_note_io_write);
    g_test_add_func("/nas-dedup/index/concurrency", test_concurrency);
    return g_test_run();
}
