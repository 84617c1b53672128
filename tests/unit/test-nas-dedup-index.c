/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Unit tests of the dedup-nas content index.
 */
#include "qemu/osdep.h"
#include "qemu/memalign.h"
#include "migration/nas-dedup-index.h"

#define MiB (1024 * 1024)
#define C NAS_DEDUP_CHUNK

static uint64_t H(uint64_t n)
{
    uint64_t h = n;
    return h;
}

/* Like H(), but with well-spread bits, as keyed hashes have. */
static uint64_t Hr(uint64_t n)
{
    uint64_t z = n * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;

    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
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

/* A fixed key: the tests do not depend on its value. */
static const NasDedupKey test_key = { .secret = { { 0x5a, 0xa5, 0x3c } } };

static NasDedupIndex *index_new(uint64_t max_bytes)
{
    return nas_dedup_index_new(max_bytes, &test_key);
}

static void assert_at(NasDedupIndex *idx, uint64_t n, uint16_t drive,
                      uint64_t off)
{
    uint64_t h = H(n);
    NasDedupLoc loc;

    g_assert_true(nas_dedup_index_lookup(idx, h, &loc));
    g_assert_cmpuint(loc.drive, ==, drive);
    g_assert_cmpuint(loc.offset, ==, off);
}

static void assert_absent(NasDedupIndex *idx, uint64_t n)
{
    uint64_t h = H(n);
    NasDedupLoc loc;

    g_assert_false(nas_dedup_index_lookup(idx, h, &loc));
}

static void assert_absent_r(NasDedupIndex *idx, uint64_t n)
{
    uint64_t h = Hr(n);
    NasDedupLoc loc;

    g_assert_false(nas_dedup_index_lookup(idx, h, &loc));
}

static void test_insert_lookup(void)
{
    NasDedupIndex *idx = index_new(MiB);
    NasDedupIndexStats st;

    g_assert_nonnull(idx);
    assert_absent(idx, 1);
    nas_dedup_index_insert(idx, H(1), 3, 5 * C);
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
    NasDedupIndex *idx = index_new(MiB);
    uint64_t h1 = H(1), h2 = H(2);
    NasDedupIndexStats st;

    nas_dedup_index_insert(idx, h1, 0, 0);
    nas_dedup_index_insert(idx, h2, 0, 0);     /* block overwritten */
    assert_absent(idx, 1);
    assert_at(idx, 2, 0, 0);
    nas_dedup_index_insert(idx, h2, 0, 0);     /* same content again */
    nas_dedup_index_get_stats(idx, &st);
    g_assert_cmpuint(st.entries, ==, 1);
    g_assert_true(nas_dedup_index_selfcheck(idx));
    nas_dedup_index_free(idx);
}

static void test_same_content_two_places(void)
{
    NasDedupIndex *idx = index_new(MiB);
    uint64_t h = H(7);
    NasDedupLoc loc;

    nas_dedup_index_insert(idx, h, 0, 10 * C);
    nas_dedup_index_insert(idx, h, 1, 20 * C);
    g_assert_true(nas_dedup_index_lookup(idx, h, &loc));
    /* Invalidate whichever was found: the other must still be found. */
    nas_dedup_index_invalidate(idx, loc.drive, loc.offset, C);
    g_assert_true(nas_dedup_index_lookup(idx, h, &loc));
    nas_dedup_index_invalidate(idx, loc.drive, loc.offset, 1);
    assert_absent(idx, 7);
    g_assert_true(nas_dedup_index_selfcheck(idx));
    nas_dedup_index_free(idx);
}

static void test_invalidate_ranges(void)
{
    NasDedupIndex *idx = index_new(MiB);
    uint64_t i;

    for (i = 0; i < 16; i++) {
        uint64_t h = H(i);
        nas_dedup_index_insert(idx, h, 2, i * C);
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
    /* A huge range, then the whole drive. */
    nas_dedup_index_invalidate(idx, 2, 10 * C, 1ull << 50);
    assert_at(idx, 9, 2, 9 * C);
    assert_absent(idx, 10);
    assert_absent(idx, 15);
    nas_dedup_index_invalidate_drive(idx, 2);
    assert_absent(idx, 9);
    /* Huge ranges starting just below or past the last chunk indexed. */
    for (i = 40; i < 43; i++) {
        uint64_t h = H(i);
        nas_dedup_index_insert(idx, h, 4, (i - 40) * 100 * C);
    }
    nas_dedup_index_invalidate(idx, 4, 201 * C, 1ull << 56);
    nas_dedup_index_invalidate(idx, 4, 150 * C, 1ull << 56);
    assert_at(idx, 40, 4, 0);
    assert_at(idx, 41, 4, 100 * C);
    assert_absent(idx, 42);
    g_assert_true(nas_dedup_index_selfcheck(idx));
    nas_dedup_index_free(idx);
}

static void test_bounds_and_eviction(void)
{
    const uint64_t budget = 256 * 1024;
    NasDedupIndex *idx = index_new(budget);
    NasDedupIndexStats st;
    uint64_t i, n;

    g_assert_null(index_new(NAS_DEDUP_INDEX_MIN_BYTES - 1));
    nas_dedup_index_get_stats(idx, &st);
    g_assert_cmpuint(st.bytes, <=, budget);
    /* Uses the budget reasonably: at least 3/4 of it. */
    g_assert_cmpuint(st.bytes, >=, budget / 4 * 3);
    n = st.capacity;
    g_assert_cmpuint(n, >, 1000);

    for (i = 0; i < 3 * n; i++) {
        uint64_t h = H(i);

        nas_dedup_index_insert(idx, h, 0, i * C);
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

/*
 * Reference model of the index without eviction: what each chunk holds
 * and which chunks are indexed.  A content is indexed at no more than
 * NAS_DEDUP_INDEX_MAX_COPIES chunks; an insert beyond that records
 * nothing, and a chunk whose content changes or that is invalidated is
 * never returned for its old content.
 */
#define MODEL_CHUNKS   4096
#define MODEL_CONTENTS 3000

typedef struct Model {
    uint32_t content[MODEL_CHUNKS];     /* 0: unknown */
    bool indexed[MODEL_CHUNKS];
    uint32_t copies[MODEL_CONTENTS];
    uint64_t entries;
} Model;

static void model_forget(Model *m, uint64_t chunk)
{
    if (m->indexed[chunk]) {
        m->indexed[chunk] = false;
        m->copies[m->content[chunk]]--;
        m->entries--;
    }
}

static void model_insert(Model *m, uint32_t content, uint64_t chunk)
{
    if (m->indexed[chunk] && m->content[chunk] == content) {
        return;
    }
    model_forget(m, chunk);
    m->content[chunk] = content;
    if (m->copies[content] < NAS_DEDUP_INDEX_MAX_COPIES) {
        m->indexed[chunk] = true;
        m->copies[content]++;
        m->entries++;
    }
}

static void model_check(NasDedupIndex *idx, Model *m, uint32_t content)
{
    uint64_t h = H(content);
    NasDedupLoc loc;
    bool found = nas_dedup_index_lookup(idx, h, &loc);

    g_assert_cmpint(found, ==, m->copies[content] > 0);
    if (found) {
        uint64_t k = loc.offset / C;

        g_assert_cmpuint(loc.drive, ==, 0);
        g_assert_cmpuint(loc.offset % C, ==, 0);
        g_assert_cmpuint(k, <, MODEL_CHUNKS);
        g_assert_true(m->indexed[k]);
        g_assert_cmpuint(m->content[k], ==, content);
    }
}

/* nas_dedup_index_bytes_for() gives the smallest budget that fits. */
static void test_bytes_for(void)
{
    static const uint64_t want[] = {
        1, 1000, 1537, 24576, 24577, 65536, 100000, 1 << 20,
    };
    size_t i;

    for (i = 0; i < G_N_ELEMENTS(want); i++) {
        uint64_t bytes = nas_dedup_index_bytes_for(want[i]);
        NasDedupIndex *idx = index_new(bytes);
        NasDedupIndexStats st;

        nas_dedup_index_get_stats(idx, &st);
        g_assert_cmpuint(bytes, >=, NAS_DEDUP_INDEX_MIN_BYTES);
        g_assert_cmpuint(st.capacity, >=, want[i]);
        g_assert_cmpuint(st.bytes, <=, bytes);
        nas_dedup_index_free(idx);
        if (bytes > NAS_DEDUP_INDEX_MIN_BYTES) {
            idx = index_new(bytes - 1);
            nas_dedup_index_get_stats(idx, &st);
            g_assert_cmpuint(st.capacity, <, want[i]);
            nas_dedup_index_free(idx);
        }
    }
}

/* Random operations against the model (no eviction: big budget). */
static void test_model(void)
{
    NasDedupIndex *idx = index_new(8 * MiB);
    g_autofree Model *m = g_new0(Model, 1);
    g_autoptr(GRand) r = g_rand_new_with_seed(42);
    NasDedupIndexStats st;
    uint32_t c;
    int i;

    for (i = 0; i < 200000; i++) {
        uint64_t chunk = g_rand_int_range(r, 0, MODEL_CHUNKS);
        /* Few contents, so many duplicates; some runs of one content. */
        uint32_t content = i % 50000 < 5000 ? 7 :
                           g_rand_int_range(r, 1, MODEL_CONTENTS);
        uint64_t h = H(content);

        if (g_rand_int_range(r, 0, 4) == 0) {
            nas_dedup_index_invalidate(idx, 0, chunk * C, C);
            model_forget(m, chunk);
            m->content[chunk] = 0;
        } else {
            nas_dedup_index_insert(idx, h, 0, chunk * C);
            model_insert(m, content, chunk);
        }
        if (i % 997 == 0) {
            for (c = 1; c < MODEL_CONTENTS; c += 7) {
                model_check(idx, m, c);
            }
            model_check(idx, m, 7);
        }
    }
    for (c = 1; c < MODEL_CONTENTS; c++) {
        model_check(idx, m, c);
    }
    nas_dedup_index_get_stats(idx, &st);
    g_assert_cmpuint(st.entries, ==, m->entries);
    g_assert_cmpuint(st.evictions, ==, 0);
    g_assert_true(nas_dedup_index_selfcheck(idx));
    nas_dedup_index_free(idx);
}

/* A chunk number: clustered near 0, scattered, or near the top. */
static uint64_t random_chunk(GRand *r)
{
    const uint64_t top = NAS_DEDUP_MAX_OFFSET / C;

    switch (g_rand_int_range(r, 0, 4)) {
    case 0:
    case 1:
        return g_rand_int_range(r, 0, 1 << 16);
    case 2:
        return ((uint64_t)g_rand_int(r) << 12 ^ g_rand_int(r)) % top;
    default:
        return top - 1 - g_rand_int_range(r, 0, 1 << 20);
    }
}

/*
 * Range invalidations of every size against a model, in a small index
 * whose summary cells collide a lot, on drives that share summary cells
 * (0 and 64, 1 and 65).
 */
static void test_model_ranges(void)
{
    static const uint16_t drives[] = { 0, 1, 64, 65, NAS_DEDUP_MAX_DRIVES };
    NasDedupIndex *idx = index_new(256 * 1024);
    GHashTable *model = g_hash_table_new_full(g_int64_hash, g_int64_equal,
                                              g_free, NULL);
    g_autoptr(GRand) r = g_rand_new_with_seed(1234);
    uint64_t content = 1, dropped = 0;
    NasDedupIndexStats st;
    int round, k;

    for (round = 0; round < 400; round++) {
        uint16_t drive;
        uint64_t first, last, offset, bytes;
        bool ignored = false;
        GHashTableIter it;
        gpointer key, val;

        for (k = 0; k < 40 && g_hash_table_size(model) < 3000; k++) {
            uint64_t *loc = g_new(uint64_t, 1);
            uint64_t chunk = random_chunk(r);
            uint64_t h = H(content);

            drive = drives[g_rand_int_range(r, 0, G_N_ELEMENTS(drives))];
            *loc = (uint64_t)drive << 45 | chunk;
            nas_dedup_index_insert(idx, h, drive, chunk * C);
            g_hash_table_insert(model, loc, GSIZE_TO_POINTER(content++));
        }

        drive = drives[g_rand_int_range(r, 0, G_N_ELEMENTS(drives))];
        offset = random_chunk(r) * C + g_rand_int_range(r, 0, C);
        bytes = (1ull << g_rand_int_range(r, 0, 50)) +
                g_rand_int_range(r, 0, 3 * C);
        if (g_rand_int_range(r, 0, 50) == 0) {
            nas_dedup_index_invalidate_drive(idx, drive);
            offset = 0;
            bytes = NAS_DEDUP_MAX_OFFSET;
        } else if (g_rand_boolean(r)) {
            nas_dedup_index_note_io(idx, drive, offset, bytes, NULL, 0, 0,
                                    true);
            /* A write beyond the offsets indexed is not looked at. */
            ignored = offset + bytes > NAS_DEDUP_MAX_OFFSET;
        } else {
            nas_dedup_index_invalidate(idx, drive, offset, bytes);
        }
        first = offset / C;
        last = (MIN(offset + bytes, NAS_DEDUP_MAX_OFFSET) - 1) / C;
        g_hash_table_iter_init(&it, model);
        while (g_hash_table_iter_next(&it, &key, &val)) {
            uint64_t l = *(uint64_t *)key, c = l & ((1ull << 45) - 1);

            if (!ignored && l >> 45 == drive && c >= first && c <= last) {
                g_hash_table_iter_remove(&it);
                dropped++;
            }
        }

        /* Exactly the model's entries are left. */
        nas_dedup_index_get_stats(idx, &st);
        g_assert_cmpuint(st.entries, ==, g_hash_table_size(model));
        g_assert_cmpuint(st.evictions, ==, 0);
        if (round % 20 == 0) {
            g_hash_table_iter_init(&it, model);
            while (g_hash_table_iter_next(&it, &key, &val)) {
                uint64_t l = *(uint64_t *)key;
                uint64_t h = H(GPOINTER_TO_SIZE(val));
                NasDedupLoc loc;

                g_assert_true(nas_dedup_index_lookup(idx, h, &loc));
                g_assert_cmpuint(loc.drive, ==, l >> 45);
                g_assert_cmpuint(loc.offset / C, ==, l & ((1ull << 45) - 1));
            }
            g_assert_true(nas_dedup_index_selfcheck(idx));
        }
    }
    g_test_message("%" PRIu64 " entries dropped by ranges", dropped);
    g_assert_cmpuint(dropped, >, 5000);
    g_assert_true(nas_dedup_index_selfcheck(idx));
    g_hash_table_destroy(model);
    nas_dedup_index_free(idx);
}

/* @pages pages of memory aligned as guest RAM is, freed by the caller. */
static uint8_t *pages_new(size_t pages)
{
    uint8_t *p = qemu_memalign(C, pages * C);

    memset(p, 0, pages * C);
    return p;
}

static void assert_page_at(NasDedupIndex *idx, const uint8_t *page,
                           uint16_t drive, uint64_t offset)
{
    uint64_t h = nas_dedup_hash64(&test_key, 0, page);
    NasDedupLoc loc;

    g_assert_true(nas_dedup_index_lookup(idx, h, &loc));
    g_assert_cmpuint(loc.drive, ==, drive);
    g_assert_cmpuint(loc.offset, ==, offset);
}

static void assert_page_unknown(NasDedupIndex *idx, const uint8_t *page)
{
    NasDedupLoc loc;

    g_assert_false(nas_dedup_index_lookup(
        idx, nas_dedup_hash64(&test_key, 0, page), &loc));
}

/*
 * A read indexes the pages of memory it filled whole, at the disk offset
 * their bytes came from: any sector, as with file systems of 1 KiB blocks
 * or a partition at sector 63.
 */
static void test_note_io_read(void)
{
    NasDedupIndex *idx = index_new(MiB);
    uint8_t *mem = pages_new(9);
    const uint64_t at = 63 * 512;
    struct iovec iov[4];
    NasDedupIndexStats st;
    int k;

    for (k = 0; k < 9; k++) {
        if (k != 4) {                    /* page 4 stays all zero */
            fill_chunk(mem + k * C, k);
        }
    }
    /*
     * Disk bytes [at, at + 7C) read into pages 0..6, the iovec split
     * unevenly (pages straddle elements, which are contiguous).
     */
    iov[0] = (struct iovec){ mem, 1000 };
    iov[1] = (struct iovec){ mem + 1000, 3 * C };
    iov[2] = (struct iovec){ mem + 1000 + 3 * C, 7 * C - 1000 - 3 * C };
    nas_dedup_index_note_io(idx, 1, at, 7 * C, iov, 3, 0, false);
    for (k = 0; k < 7; k++) {
        if (k == 4) {
            assert_page_unknown(idx, mem + k * C);
        } else {
            assert_page_at(idx, mem + k * C, 1, at + k * C);
        }
    }
    nas_dedup_index_get_stats(idx, &st);
    g_assert_cmpuint(st.entries, ==, 6);
    nas_dedup_index_invalidate_drive(idx, 1);

    /*
     * Memory not page-aligned at the start of the request: disk bytes
     * [0, 7C) into mem + 512.  Whole pages 1..6 of memory hold disk bytes
     * from k * C - 512; the partial first and last ones are not indexed.
     */
    iov[0] = (struct iovec){ mem + 512, 7 * C };
    nas_dedup_index_note_io(idx, 2, 0, 7 * C, iov, 1, 0, false);
    for (k = 1; k < 7; k++) {
        if (k != 4) {
            assert_page_at(idx, mem + k * C, 2, k * C - 512);
        }
    }
    assert_page_unknown(idx, mem);
    nas_dedup_index_get_stats(idx, &st);
    g_assert_cmpuint(st.entries, ==, 5);
    nas_dedup_index_invalidate_drive(idx, 2);

    /*
     * Elements that are not contiguous in memory: a page split between
     * them is not what any page of RAM holds.  And @iov_offset: the
     * request's data starts that far into the iovec.
     */
    iov[0] = (struct iovec){ mem, C + 2048 };           /* page 0, half 1 */
    iov[1] = (struct iovec){ mem + 3 * C, 2 * C };      /* pages 3, 4 */
    iov[2] = (struct iovec){ mem + 6 * C, C };          /* page 6 */
    nas_dedup_index_note_io(idx, 3, 0, 4 * C + 2048 - C, iov, 3, C, false);
    /* From iovec byte C: half of page 1, then page 3 at disk 2048, ... */
    assert_page_unknown(idx, mem);                      /* before @iov_offset */
    assert_page_unknown(idx, mem + C);                  /* split */
    assert_page_at(idx, mem + 3 * C, 3, 2048);
    assert_page_at(idx, mem + 6 * C, 3, 2048 + 2 * C);
    nas_dedup_index_get_stats(idx, &st);
    g_assert_cmpuint(st.entries, ==, 2);
    nas_dedup_index_invalidate_drive(idx, 3);

    /* A page whose disk offset is not a sector: not indexed. */
    iov[0] = (struct iovec){ mem + C - 100, 2 * C };
    nas_dedup_index_note_io(idx, 4, 0, 2 * C, iov, 1, 0, false);
    nas_dedup_index_get_stats(idx, &st);
    g_assert_cmpuint(st.entries, ==, 0);
    g_assert_true(nas_dedup_index_selfcheck(idx));
    qemu_vfree(mem);
    nas_dedup_index_free(idx);
}

static void test_note_io_write(void)
{
    NasDedupIndex *idx = index_new(MiB);
    uint8_t *data = pages_new(4);
    uint8_t *newdata = pages_new(2);
    struct iovec iov = { data, 4 * C };
    struct iovec niov;
    int k;

    for (k = 0; k < 4; k++) {
        fill_chunk(data + k * C, 100 + k);
    }
    fill_chunk(newdata, 200);
    fill_chunk(newdata + C, 201);
    nas_dedup_index_note_io(idx, 0, 0, 4 * C, &iov, 1, 0, false);

    /*
     * Write two pages at disk C/2: they overlap chunks 0, 1 and 2, which
     * are forgotten, and are indexed where they now are.
     */
    niov = (struct iovec){ newdata, 2 * C };
    nas_dedup_index_note_io(idx, 0, C / 2, 2 * C, &niov, 1, 0, true);
    for (k = 0; k < 3; k++) {
        assert_page_unknown(idx, data + k * C);
    }
    assert_page_at(idx, data + 3 * C, 0, 3 * C);
    assert_page_at(idx, newdata, 0, C / 2);
    assert_page_at(idx, newdata + C, 0, 3 * C / 2);

    /*
     * Write-zeroes / discard (no data) of [C, 2C) invalidates what
     * overlaps it: both new pages, which start before it and in it.
     */
    nas_dedup_index_note_io(idx, 0, C, C, NULL, 0, 0, true);
    assert_page_unknown(idx, newdata);
    assert_page_unknown(idx, newdata + C);
    assert_page_at(idx, data + 3 * C, 0, 3 * C);

    /* Writing a zero page over chunk 3 invalidates it. */
    memset(newdata, 0, C);
    niov = (struct iovec){ newdata, C };
    nas_dedup_index_note_io(idx, 0, 3 * C, C, &niov, 1, 0, true);
    assert_page_unknown(idx, data + 3 * C);

    /*
     * A one-sector write drops the chunk starting 7 sectors before it,
     * not one that ends where it starts.
     */
    fill_chunk(newdata, 202);
    fill_chunk(newdata + C, 203);
    niov = (struct iovec){ newdata, C };
    nas_dedup_index_note_io(idx, 0, 8 * C - 7 * 512, C, &niov, 1, 0, false);
    niov = (struct iovec){ newdata + C, C };
    nas_dedup_index_note_io(idx, 0, 7 * C - 8 * 512, C, &niov, 1, 0, false);
    assert_page_at(idx, newdata, 0, 8 * C - 7 * 512);
    assert_page_at(idx, newdata + C, 0, 7 * C - 8 * 512);
    nas_dedup_index_note_io(idx, 0, 8 * C - 512, 512, NULL, 0, 0, true);
    assert_page_unknown(idx, newdata);
    assert_page_at(idx, newdata + C, 0, 7 * C - 8 * 512);
    g_assert_true(nas_dedup_index_selfcheck(idx));
    qemu_vfree(data);
    qemu_vfree(newdata);
    nas_dedup_index_free(idx);
}

/*
 * One content at many places: a bounded number of them is indexed, and
 * whatever lookup returns still holds that content.
 */
static void test_copies(void)
{
    NasDedupIndex *idx = index_new(MiB);
    uint8_t *data = pages_new(256);
    struct iovec iov = { data, 256 * C };
    uint64_t h = H(9), h2 = H(10);
    NasDedupIndexStats st;
    NasDedupLoc loc;
    uint64_t i;

    g_assert_cmpuint(NAS_DEDUP_INDEX_MAX_COPIES, >=, 2);
    for (i = 0; i < 100; i++) {
        nas_dedup_index_insert(idx, h, 1, i * C);
    }
    nas_dedup_index_get_stats(idx, &st);
    g_assert_cmpuint(st.entries, ==, NAS_DEDUP_INDEX_MAX_COPIES);
    /* Overwrite every place lookup names: never a stale answer. */
    for (i = 0; i < 100 && nas_dedup_index_lookup(idx, h, &loc); i++) {
        g_assert_cmpuint(loc.drive, ==, 1);
        g_assert_cmpuint(loc.offset % C, ==, 0);
        g_assert_cmpuint(loc.offset, <, 100 * C);
        nas_dedup_index_insert(idx, h2, loc.drive, loc.offset);
        g_assert_true(nas_dedup_index_selfcheck(idx));
    }
    g_assert_cmpuint(i, ==, NAS_DEDUP_INDEX_MAX_COPIES);
    /* Seen again at a place not yet indexed: indexed there. */
    nas_dedup_index_insert(idx, h, 1, 99 * C);
    assert_at(idx, 9, 1, 99 * C);

    /* A read of 256 identical chunks. */
    for (i = 0; i < 256; i++) {
        fill_chunk(data + i * C, 1234);
    }
    nas_dedup_index_note_io(idx, 2, 0, 256 * C, &iov, 1, 0, false);
    h = nas_dedup_hash64(&test_key, 0, data);
    g_assert_true(nas_dedup_index_lookup(idx, h, &loc));
    g_assert_cmpuint(loc.drive, ==, 2);
    /* Writing that place drops it: the other copy is returned. */
    fill_chunk(data, 4321);
    iov.iov_len = C;
    nas_dedup_index_note_io(idx, 2, loc.offset, C, &iov, 1, 0, true);
    g_assert_true(nas_dedup_index_lookup(idx, h, &loc));
    g_assert_cmpuint(loc.drive, ==, 2);
    nas_dedup_index_get_stats(idx, &st);
    g_assert_cmpuint(st.entries, <=, 2 * NAS_DEDUP_INDEX_MAX_COPIES + 2);
    g_assert_true(nas_dedup_index_selfcheck(idx));
    qemu_vfree(data);
    nas_dedup_index_free(idx);
}

/*
 * The cost of each operation, in steps (slots probed, CLOCK hand moves,
 * summary cells examined), must not grow with the index nor with the
 * workload: each test runs at two index sizes, with the same bounds.  The
 * bounds leave a margin over what linear probing costs at the highest
 * load the index allows (3/4: ~2.5 slots to find an entry, ~8.5 to miss
 * or insert, and as many to close the gap when removing one).
 */
static const uint64_t step_budgets[] = { MiB, 16 * MiB };

static uint64_t steps_of(NasDedupIndex *idx)
{
    NasDedupIndexStats st;

    nas_dedup_index_get_stats(idx, &st);
    return st.steps;
}

/* A guest writes a large file of one repeated block. */
static void test_steps_same_content(void)
{
    const uint64_t n = 60000;
    size_t b;

    for (b = 0; b < G_N_ELEMENTS(step_budgets); b++) {
        NasDedupIndex *idx = index_new(step_budgets[b]);
        uint64_t h = Hr(77);
        NasDedupLoc loc;
        uint64_t i, s0 = steps_of(idx), avg;

        for (i = 0; i < n; i++) {
            nas_dedup_index_insert(idx, h, 0, i * C);
        }
        avg = (steps_of(idx) - s0) / n;
        g_test_message("budget %" PRIu64 " MiB: %" PRIu64 " steps/insert",
                       step_budgets[b] / MiB, avg);
        g_assert_cmpuint(avg, <=, 8);
        g_assert_true(nas_dedup_index_lookup(idx, h, &loc));
        g_assert_cmpuint(loc.offset, <, n * C);
        g_assert_true(nas_dedup_index_selfcheck(idx));
        nas_dedup_index_free(idx);
    }
}

/* Fill the index completely with distinct content on drive 0. */
static uint64_t fill_index(NasDedupIndex *idx)
{
    NasDedupIndexStats st;
    uint64_t i;

    nas_dedup_index_get_stats(idx, &st);
    for (i = 0; i < st.capacity; i++) {
        uint64_t h = Hr(i);

        nas_dedup_index_insert(idx, h, 0, i * C);
    }
    nas_dedup_index_get_stats(idx, &st);
    g_assert_cmpuint(st.entries, ==, st.capacity);
    g_assert_cmpuint(st.evictions, ==, 0);
    return st.capacity;
}

/* A full index (the normal state) whose blocks the guest overwrites. */
static void test_steps_overwrite_full(void)
{
    size_t b;

    for (b = 0; b < G_N_ELEMENTS(step_budgets); b++) {
        NasDedupIndex *idx = index_new(step_budgets[b]);
        g_autoptr(GRand) r = g_rand_new_with_seed(7);
        uint64_t n = fill_index(idx), m = 50000, i, s0, avg;
        NasDedupIndexStats st;

        s0 = steps_of(idx);
        for (i = 0; i < m; i++) {
            uint64_t h = Hr(n + i);
            uint64_t c = g_rand_int_range(r, 0, n);

            nas_dedup_index_insert(idx, h, 0, c * C);
        }
        avg = (steps_of(idx) - s0) / m;
        g_test_message("budget %" PRIu64 " MiB, %" PRIu64 " entries: %"
                       PRIu64 " steps/overwrite", step_budgets[b] / MiB, n,
                       avg);
        g_assert_cmpuint(avg, <=, 48);
        nas_dedup_index_get_stats(idx, &st);
        g_assert_cmpuint(st.entries, ==, n);
        g_assert_cmpuint(st.evictions, ==, 0);

        /* New places, some looked up again: CLOCK evicts, amortised O(1). */
        s0 = steps_of(idx);
        for (i = 0; i < m; i++) {
            uint64_t h = Hr(2 * n + m + i);
            NasDedupLoc loc;

            nas_dedup_index_insert(idx, h, 1, i * C);
            h = Hr(2 * n + m + g_rand_int_range(r, 0, i + 1));
            nas_dedup_index_lookup(idx, h, &loc);
        }
        avg = (steps_of(idx) - s0) / m;
        g_test_message("  %" PRIu64 " steps/(insert + lookup) when evicting",
                       avg);
        g_assert_cmpuint(avg, <=, 96);
        g_assert_true(nas_dedup_index_selfcheck(idx));
        nas_dedup_index_free(idx);
    }
}

/* Discards of 2 GiB, and dropping whole drives, in a full index. */
static void test_steps_invalidate(void)
{
    const uint64_t GiB = 1024 * MiB;
    static const uint64_t few[] = {
        3 * C, 100 * MiB + C, 700 * MiB, GiB + 5 * C, 2 * GiB - C,
    };
    size_t b, k;

    for (b = 0; b < G_N_ELEMENTS(step_budgets); b++) {
        NasDedupIndex *idx = index_new(step_budgets[b]);
        uint64_t n = fill_index(idx), s0, steps;
        NasDedupIndexStats st;

        for (k = 0; k < G_N_ELEMENTS(few); k++) {
            uint64_t h = Hr(n + k);

            nas_dedup_index_insert(idx, h, 2, few[k]);
        }
        /* Drive with no entries; drive 0 where it has none. */
        s0 = steps_of(idx);
        nas_dedup_index_invalidate(idx, 1, 0, 2 * GiB);
        nas_dedup_index_invalidate(idx, 1, 1024 * GiB, 2 * GiB);
        nas_dedup_index_note_io(idx, 1, 0, 2 * GiB, NULL, 0, 0, true);
        nas_dedup_index_invalidate(idx, 0, 4096 * GiB, 2 * GiB);
        steps = steps_of(idx) - s0;
        g_test_message("budget %" PRIu64 " MiB: %" PRIu64 " steps for 4 "
                       "discards where nothing is indexed",
                       step_budgets[b] / MiB, steps);
        g_assert_cmpuint(steps, <=, 4 * 16);

        /* Drive 2: a few entries in the range. */
        nas_dedup_index_get_stats(idx, &st);
        s0 = st.steps;
        nas_dedup_index_invalidate(idx, 2, 0, 2 * GiB);
        steps = steps_of(idx) - s0;
        g_test_message("  %" PRIu64 " steps to drop %zu entries in 2 GiB",
                       steps, G_N_ELEMENTS(few));
        g_assert_cmpuint(steps, <=, 64 + 512 * G_N_ELEMENTS(few));
        for (k = 0; k < G_N_ELEMENTS(few); k++) {
            assert_absent_r(idx, n + k);
        }
        nas_dedup_index_get_stats(idx, &st);
        g_assert_cmpuint(st.entries, ==, n - G_N_ELEMENTS(few));

        /* A whole drive: bounded work per entry dropped. */
        s0 = st.steps;
        nas_dedup_index_invalidate_drive(idx, 0);
        steps = steps_of(idx) - s0;
        g_test_message("  %" PRIu64 " steps to drop drive 0 (%" PRIu64
                       " entries)", steps, st.entries);
        g_assert_cmpuint(steps, <=, 64 + 16 * st.entries);
        nas_dedup_index_get_stats(idx, &st);
        g_assert_cmpuint(st.entries, ==, 0);
        g_assert_true(nas_dedup_index_selfcheck(idx));
        nas_dedup_index_free(idx);
    }
}

typedef struct {
    NasDedupIndex *idx;
    int seed;
} ThreadArg;

static gpointer worker(gpointer opaque)
{
    ThreadArg *a = opaque;
    g_autoptr(GRand) r = g_rand_new_with_seed(a->seed);
    uint8_t *buf = pages_new(4);
    int i;

    for (i = 0; i < 20000; i++) {
        uint64_t chunk = g_rand_int_range(r, 0, 2048);
        uint64_t h = H(g_rand_int_range(r, 1, 5000));
        NasDedupLoc loc;
        struct iovec iov = { buf, 4 * C };

        switch (g_rand_int_range(r, 0, 5)) {
        case 0:
            nas_dedup_index_insert(a->idx, h, a->seed % 4, chunk * C);
            break;
        case 1:
            nas_dedup_index_lookup(a->idx, h, &loc);
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
            } else if (i % 1000 == 500) {
                /* A discard large enough to be done in several batches. */
                nas_dedup_index_note_io(a->idx, a->seed % 4, chunk * C,
                                        1ull << 40, NULL, 0, 0, true);
            }
        }
    }
    qemu_vfree(buf);
    return NULL;
}

#define FILLER_CHUNKS 2000

/* Inserts FILLER_CHUNKS distinct locations with distinct content. */
static gpointer filler(gpointer opaque)
{
    ThreadArg *a = opaque;
    uint64_t i;

    for (i = 0; i < FILLER_CHUNKS; i++) {
        uint64_t h = H(a->seed * 1000000 + i);

        nas_dedup_index_insert(a->idx, h, a->seed, i * C);
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
    NasDedupIndex *idx = index_new(128 * 1024);
    NasDedupIndexStats st;

    run_threads(idx, worker);
    nas_dedup_index_get_stats(idx, &st);
    g_assert_cmpuint(st.entries, <=, st.capacity);
    g_assert_true(nas_dedup_index_selfcheck(idx));
    nas_dedup_index_free(idx);

    /* Concurrent inserts of more distinct chunks than fit: exact counts. */
    idx = index_new(128 * 1024);
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
    g_test_add_func("/nas-dedup/index/insert-lookup", test_insert_lookup);
    g_test_add_func("/nas-dedup/index/replace", test_replace);
    g_test_add_func("/nas-dedup/index/same-content-two-places",
                    test_same_content_two_places);
    g_test_add_func("/nas-dedup/index/invalidate-ranges",
                    test_invalidate_ranges);
    g_test_add_func("/nas-dedup/index/bounds-eviction",
                    test_bounds_and_eviction);
    g_test_add_func("/nas-dedup/index/bytes-for", test_bytes_for);
    g_test_add_func("/nas-dedup/index/model", test_model);
    g_test_add_func("/nas-dedup/index/model-ranges", test_model_ranges);
    g_test_add_func("/nas-dedup/index/note-io-read", test_note_io_read);
    g_test_add_func("/nas-dedup/index/note-io-write", test_note_io_write);
    g_test_add_func("/nas-dedup/index/copies", test_copies);
    g_test_add_func("/nas-dedup/index/concurrency", test_concurrency);
    g_test_add_func("/nas-dedup/index/steps/same-content",
                    test_steps_same_content);
    g_test_add_func("/nas-dedup/index/steps/overwrite-full",
                    test_steps_overwrite_full);
    g_test_add_func("/nas-dedup/index/steps/invalidate",
                    test_steps_invalidate);
    return g_test_run();
}
