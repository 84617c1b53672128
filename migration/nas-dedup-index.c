/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas: bounded content index of guest disk blocks
 *
 * Layout: a fixed array of 24-byte entries (hash + packed location) and two
 * open-addressing tables of 32-bit entry numbers, one keyed by hash and one
 * keyed by location, with linear probing and backward-shift deletion (no
 * tombstones, so lookups stay short however much churn there is).  The
 * location table makes "a write replaces what was known about that block"
 * O(1).  Several entries may share a hash (the same content at several
 * places); lookup returns one of them.
 *
 * Eviction is CLOCK: lookups and re-inserts set a referenced bit; the hand
 * skips (and clears) referenced entries and reuses the first free or
 * unreferenced one.
 */
#include "qemu/osdep.h"
#include "qemu/thread.h"
#include <xxhash.h>
#include "nas-dedup-index.h"

/*
 * Entry.loc: bit 63 valid, bit 62 referenced, bits 45..59 drive,
 * bits 0..44 chunk number (offsets below 2^57 bytes).
 */
#define LOC_VALID       (1ull << 63)
#define LOC_REF         (1ull << 62)
#define LOC_CHUNK_BITS  45
#define LOC_CHUNK_MASK  ((1ull << LOC_CHUNK_BITS) - 1)
#define LOC_DRIVE_SHIFT LOC_CHUNK_BITS
#define LOC_KEY_MASK    ((1ull << 60) - 1)

typedef struct Entry {
    NasDedupHash hash;
    uint64_t loc;
} Entry;

struct NasDedupIndex {
    QemuMutex lock;
    Entry *entries;
    uint32_t nentries;          /* capacity */
    uint32_t used;
    uint32_t hand;              /* CLOCK hand */
    uint32_t *by_hash;          /* entry number + 1, 0 = empty */
    uint32_t *by_loc;
    uint32_t mask;              /* table size - 1 */
    uint64_t bytes;
    NasDedupIndexStats st;
};

void nas_dedup_hash_chunk_generic(const void *buf, NasDedupHash *out)
{
    XXH128_hash_t h = XXH3_128bits(buf, NAS_DEDUP_CHUNK);

    out->hi = h.high64;
    out->lo = h.low64;
}

#ifdef NAS_DEDUP_HASH_AVX2
static bool hash_avx2;

static void __attribute__((constructor)) nas_dedup_hash_init(void)
{
    __builtin_cpu_init();
    hash_avx2 = __builtin_cpu_supports("avx2");
}

bool nas_dedup_hash_have_avx2(void)
{
    return hash_avx2;
}
#endif

void nas_dedup_hash_chunk(const void *buf, NasDedupHash *out)
{
#ifdef NAS_DEDUP_HASH_AVX2
    if (hash_avx2) {
        nas_dedup_hash_chunk_avx2(buf, out);
        return;
    }
#endif
    nas_dedup_hash_chunk_generic(buf, out);
}

bool nas_dedup_hash_equal(const NasDedupHash *a, const NasDedupHash *b)
{
    return a->hi == b->hi && a->lo == b->lo;
}

bool nas_dedup_chunk_is_zero(const void *buf)
{
    const uint64_t *p = buf;
    size_t i;

    for (i = 0; i < NAS_DEDUP_CHUNK / sizeof(uint64_t); i += 4) {
        if (p[i] | p[i + 1] | p[i + 2] | p[i + 3]) {
            return false;
        }
    }
    return true;
}

static inline uint64_t loc_key(uint16_t drive, uint64_t offset)
{
    return ((uint64_t)drive << LOC_DRIVE_SHIFT) |
           ((offset >> NAS_DEDUP_CHUNK_BITS) & LOC_CHUNK_MASK);
}

static inline uint32_t slot_of_hash(const NasDedupIndex *idx,
                                    const NasDedupHash *h)
{
    return (uint32_t)(h->lo ^ (h->lo >> 32)) & idx->mask;
}

static inline uint32_t slot_of_key(const NasDedupIndex *idx, uint64_t key)
{
    return (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 32) & idx->mask;
}

static uint32_t home_slot(const NasDedupIndex *idx, const uint32_t *table,
                          uint32_t e)
{
    const Entry *ent = &idx->entries[e];

    return table == idx->by_hash ? slot_of_hash(idx, &ent->hash)
                                 : slot_of_key(idx, ent->loc & LOC_KEY_MASK);
}

/* Remove entry number @e from @table, starting the probe at @slot. */
static void table_remove(NasDedupIndex *idx, uint32_t *table, uint32_t slot,
                         uint32_t e)
{
    uint32_t i = slot, j;

    while (table[i] != e + 1) {
        assert(table[i] != 0);
        i = (i + 1) & idx->mask;
    }
    /* Backward-shift deletion. */
    j = i;
    for (;;) {
        uint32_t home;

        table[i] = 0;
        do {
            j = (j + 1) & idx->mask;
            if (table[j] == 0) {
                return;
            }
            home = home_slot(idx, table, table[j] - 1);
            /* Can table[j] move to i?  Only if its home is not in (i, j]. */
        } while (i <= j ? (i < home && home <= j) : (i < home || home <= j));
        table[i] = table[j];
        i = j;
    }
}

static void table_insert(NasDedupIndex *idx, uint32_t *table, uint32_t slot,
                         uint32_t e)
{
    while (table[slot] != 0) {
        slot = (slot + 1) & idx->mask;
    }
    table[slot] = e + 1;
}

static void entry_drop(NasDedupIndex *idx, uint32_t e)
{
    Entry *ent = &idx->entries[e];

    table_remove(idx, idx->by_hash, slot_of_hash(idx, &ent->hash), e);
    table_remove(idx, idx->by_loc, slot_of_key(idx, ent->loc & LOC_KEY_MASK), e);
    ent->loc = 0;
    idx->used--;
}

static int64_t find_by_key(NasDedupIndex *idx, uint64_t key)
{
    uint32_t i = slot_of_key(idx, key);

    while (idx->by_loc[i]) {
        uint32_t e = idx->by_loc[i] - 1;

        if ((idx->entries[e].loc & LOC_KEY_MASK) == key) {
            return e;
        }
        i = (i + 1) & idx->mask;
    }
    return -1;
}

/* Pick a free slot, evicting with CLOCK if the index is full. */
static uint32_t entry_alloc(NasDedupIndex *idx)
{
    for (;;) {
        uint32_t e = idx->hand;
        Entry *ent = &idx->entries[e];

        idx->hand = (e + 1 == idx->nentries) ? 0 : e + 1;
        if (!(ent->loc & LOC_VALID)) {
            return e;
        }
        if (idx->used == idx->nentries && !(ent->loc & LOC_REF)) {
            entry_drop(idx, e);
            idx->st.evictions++;
            return e;
        }
        ent->loc &= ~LOC_REF;
    }
}

static void insert_locked(NasDedupIndex *idx, const NasDedupHash *hash,
                          uint64_t key)
{
    int64_t old = find_by_key(idx, key);
    uint32_t e;

    idx->st.inserts++;
    if (old >= 0) {
        if (nas_dedup_hash_equal(&idx->entries[old].hash, hash)) {
            idx->entries[old].loc |= LOC_REF;
            return;
        }
        entry_drop(idx, old);
    }
    e = entry_alloc(idx);
    idx->entries[e].hash = *hash;
    idx->entries[e].loc = key | LOC_VALID;
    table_insert(idx, idx->by_hash, slot_of_hash(idx, hash), e);
    table_insert(idx, idx->by_loc, slot_of_key(idx, key), e);
    idx->used++;
}

static bool invalidate_key_locked(NasDedupIndex *idx, uint64_t key)
{
    int64_t e = find_by_key(idx, key);

    if (e < 0) {
        return false;
    }
    entry_drop(idx, e);
    idx->st.invalidations++;
    return true;
}

NasDedupIndex *nas_dedup_index_new(uint64_t max_bytes)
{
    NasDedupIndex *idx;
    uint64_t best_n = 0, best_t = 0, t;

    if (max_bytes < NAS_DEDUP_INDEX_MIN_BYTES) {
        return NULL;
    }
    /*
     * Pick the table size (a power of two, load factor <= 3/4) that lets
     * the most entries fit the budget: 24 bytes an entry + 2 x 4 bytes a
     * table slot.
     */
    for (t = 64; t <= (1ull << 31) && 8 * t < max_bytes; t <<= 1) {
        uint64_t n = MIN(t / 4 * 3, (max_bytes - 8 * t) / sizeof(Entry));

        if (n > best_n) {
            best_n = n;
            best_t = t;
        }
    }
    best_n = MIN(best_n, UINT32_MAX - 1);

    idx = g_new0(NasDedupIndex, 1);
    qemu_mutex_init(&idx->lock);
    idx->nentries = best_n;
    idx->mask = best_t - 1;
    idx->entries = g_new0(Entry, best_n);
    idx->by_hash = g_new0(uint32_t, best_t);
    idx->by_loc = g_new0(uint32_t, best_t);
    idx->bytes = best_n * sizeof(Entry) + 2 * best_t * sizeof(uint32_t);
    idx->st.capacity = best_n;
    return idx;
}

void nas_dedup_index_free(NasDedupIndex *idx)
{
    if (!idx) {
        return;
    }
    qemu_mutex_destroy(&idx->lock);
    g_free(idx->entries);
    g_free(idx->by_hash);
    g_free(idx->by_loc);
    g_free(idx);
}

void nas_dedup_index_insert(NasDedupIndex *idx, const NasDedupHash *hash,
                            uint16_t drive, uint64_t offset)
{
    assert(drive <= NAS_DEDUP_MAX_DRIVES);
    assert(offset < NAS_DEDUP_MAX_OFFSET);
    qemu_mutex_lock(&idx->lock);
    insert_locked(idx, hash, loc_key(drive, offset));
    qemu_mutex_unlock(&idx->lock);
}

bool nas_dedup_index_lookup(NasDedupIndex *idx, const NasDedupHash *hash,
                            NasDedupLoc *loc)
{
    bool found = false;
    uint32_t i;

    qemu_mutex_lock(&idx->lock);
    for (i = slot_of_hash(idx, hash); idx->by_hash[i];
         i = (i + 1) & idx->mask) {
        Entry *ent = &idx->entries[idx->by_hash[i] - 1];

        if (nas_dedup_hash_equal(&ent->hash, hash)) {
            ent->loc |= LOC_REF;
            loc->drive = (ent->loc >> LOC_DRIVE_SHIFT) & NAS_DEDUP_MAX_DRIVES;
            loc->offset = (ent->loc & LOC_CHUNK_MASK) << NAS_DEDUP_CHUNK_BITS;
            found = true;
            break;
        }
    }
    if (found) {
        idx->st.hits++;
    } else {
        idx->st.misses++;
    }
    qemu_mutex_unlock(&idx->lock);
    return found;
}

static void invalidate_locked(NasDedupIndex *idx, uint16_t drive,
                              uint64_t offset, uint64_t bytes)
{
    uint64_t first = offset >> NAS_DEDUP_CHUNK_BITS;
    uint64_t last, c;

    if (bytes == 0) {
        return;
    }
    last = (offset + bytes - 1) >> NAS_DEDUP_CHUNK_BITS;
    if (last - first >= idx->nentries) {
        /* Huge range (discard, truncate): a scan of the entries is cheaper. */
        uint64_t lo = loc_key(drive, first << NAS_DEDUP_CHUNK_BITS);
        uint64_t hi = loc_key(drive, MIN(last, LOC_CHUNK_MASK) <<
                                     NAS_DEDUP_CHUNK_BITS);
        uint32_t e;

        for (e = 0; e < idx->nentries; e++) {
            uint64_t l = idx->entries[e].loc;

            if ((l & LOC_VALID) && (l & LOC_KEY_MASK) >= lo &&
                (l & LOC_KEY_MASK) <= hi) {
                entry_drop(idx, e);
                idx->st.invalidations++;
            }
        }
        return;
    }
    for (c = first; c <= last; c++) {
        invalidate_key_locked(idx, loc_key(drive, c << NAS_DEDUP_CHUNK_BITS));
    }
}

void nas_dedup_index_invalidate(NasDedupIndex *idx, uint16_t drive,
                                uint64_t offset, uint64_t bytes)
{
    qemu_mutex_lock(&idx->lock);
    invalidate_locked(idx, drive, offset, bytes);
    qemu_mutex_unlock(&idx->lock);
}

void nas_dedup_index_invalidate_drive(NasDedupIndex *idx, uint16_t drive)
{
    nas_dedup_index_invalidate(idx, drive, 0, NAS_DEDUP_MAX_OFFSET);
}

/*
 * Copy @len bytes at logical position @pos of an iovec into @buf, or return
 * a pointer straight into the iovec when they are contiguous there.
 */
static const void *iov_chunk(const struct iovec *iov, unsigned int niov,
                             size_t pos, void *buf, size_t len)
{
    unsigned int i = 0;
    size_t done = 0;

    while (i < niov && pos >= iov[i].iov_len) {
        pos -= iov[i].iov_len;
        i++;
    }
    if (i < niov && iov[i].iov_len - pos >= len) {
        return (const uint8_t *)iov[i].iov_base + pos;
    }
    while (i < niov && done < len) {
        size_t n = MIN(len - done, iov[i].iov_len - pos);

        memcpy((uint8_t *)buf + done, (const uint8_t *)iov[i].iov_base + pos, n);
        done += n;
        pos = 0;
        i++;
    }
    return done == len ? buf : NULL;
}

#define NOTE_BATCH 32

void nas_dedup_index_note_io(NasDedupIndex *idx, uint16_t drive,
                             uint64_t offset, uint64_t bytes,
                             const struct iovec *iov, unsigned int niov,
                             size_t iov_offset, bool is_write)
{
    uint64_t start = QEMU_ALIGN_UP(offset, NAS_DEDUP_CHUNK);
    uint64_t end = QEMU_ALIGN_DOWN(offset + bytes, NAS_DEDUP_CHUNK);
    g_autofree uint8_t *bounce = NULL;
    NasDedupHash hashes[NOTE_BATCH];
    bool zero[NOTE_BATCH];
    uint64_t c;

    if (bytes == 0 || drive > NAS_DEDUP_MAX_DRIVES ||
        offset + bytes > NAS_DEDUP_MAX_OFFSET) {
        return;
    }
    if (is_write) {
        qemu_mutex_lock(&idx->lock);
        if (!iov || start >= end) {
            invalidate_locked(idx, drive, offset, bytes);
        } else {
            invalidate_locked(idx, drive, offset, start - offset);
            invalidate_locked(idx, drive, end, offset + bytes - end);
        }
        qemu_mutex_unlock(&idx->lock);
    }
    if (!iov || start >= end) {
        return;
    }

    /* Hash outside the lock, a batch at a time. */
    for (c = start; c < end; c += NOTE_BATCH * NAS_DEDUP_CHUNK) {
        unsigned int n = MIN(NOTE_BATCH, (end - c) / NAS_DEDUP_CHUNK), k;

        for (k = 0; k < n; k++) {
            size_t pos = iov_offset + (c - offset) + k * NAS_DEDUP_CHUNK;
            const void *p;

            if (!bounce) {
                bounce = g_malloc(NAS_DEDUP_CHUNK);
            }
            p = iov_chunk(iov, niov, pos, bounce, NAS_DEDUP_CHUNK);
            if (!p) {
                n = k;          /* iovec shorter than announced */
                break;
            }
            zero[k] = nas_dedup_chunk_is_zero(p);
            if (!zero[k]) {
                nas_dedup_hash_chunk(p, &hashes[k]);
            }
        }
        qemu_mutex_lock(&idx->lock);
        for (k = 0; k < n; k++) {
            uint64_t key = loc_key(drive, c + k * NAS_DEDUP_CHUNK);

            if (zero[k]) {
                invalidate_key_locked(idx, key);
            } else {
                insert_locked(idx, &hashes[k], key);
            }
        }
        qemu_mutex_unlock(&idx->lock);
        if (n < NOTE_BATCH && c + n * NAS_DEDUP_CHUNK < end) {
            return;
        }
    }
}

void nas_dedup_index_get_stats(NasDedupIndex *idx, NasDedupIndexStats *stats)
{
    qemu_mutex_lock(&idx->lock);
    *stats = idx->st;
    stats->entries = idx->used;
    stats->bytes = idx->bytes;
    qemu_mutex_unlock(&idx->lock);
}

static bool table_check(NasDedupIndex *idx, const uint32_t *table,
                        const char *name)
{
    uint32_t i, n = 0;

    for (i = 0; i <= idx->mask; i++) {
        uint32_t e, home, j;

        if (!table[i]) {
            continue;
        }
        e = table[i] - 1;
        n++;
        if (e >= idx->nentries || !(idx->entries[e].loc & LOC_VALID)) {
            g_warning("%s[%u] names free entry %u", name, i, e);
            return false;
        }
        /* Every slot between the home slot and i must be occupied. */
        home = home_slot(idx, table, e);
        for (j = home; j != i; j = (j + 1) & idx->mask) {
            if (!table[j]) {
                g_warning("%s[%u]: hole at %u after home %u", name, i, j, home);
                return false;
            }
        }
    }
    if (n != idx->used) {
        g_warning("%s holds %u entries, %u in use", name, n, idx->used);
        return false;
    }
    return true;
}

bool nas_dedup_index_selfcheck(NasDedupIndex *idx)
{
    uint32_t e, n = 0;
    bool ok;

    qemu_mutex_lock(&idx->lock);
    for (e = 0; e < idx->nentries; e++) {
        n += !!(idx->entries[e].loc & LOC_VALID);
    }
    ok = n == idx->used && n <= idx->nentries &&
         table_check(idx, idx->by_hash, "by_hash") &&
         table_check(idx, idx->by_loc, "by_loc");
    if (n != idx->used) {
        g_warning("%u valid entries, %u counted", n, idx->used);
    }
    /* Each location at most once. */
    for (e = 0; ok && e < idx->nentries; e++) {
        uint64_t l = idx->entries[e].loc;

        if ((l & LOC_VALID) && find_by_key(idx, l & LOC_KEY_MASK) != e) {
            g_warning("entry %u not found by its location", e);
            ok = false;
        }
    }
    qemu_mutex_unlock(&idx->lock);
    return ok;
}
