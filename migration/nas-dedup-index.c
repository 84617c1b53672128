/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas: bounded content index of guest disk blocks
 *
 * Data structure
 *
 * - entries: a fixed array of 24-byte entries (hash + packed location).  An
 *   entry is in use (LOC_VALID), or free: on the free list of dropped
 *   entries (linked through hash), or never used yet (number >= fresh).
 *
 * - by_hash and by_loc: two open-addressing tables of entry numbers, keyed
 *   by hash and by location, with linear probing and backward-shift
 *   deletion (no tombstones, so probes stay short however much churn there
 *   is).  The location table makes "a write replaces what was known about
 *   that block" O(1).  Hashes are keyed with a secret, so distinct ones
 *   spread over by_hash; equal ones share a home slot, so a content is
 *   indexed at no more than NAS_DEDUP_INDEX_MAX_COPIES places: inserting it
 *   elsewhere then only marks the copies referenced.  Each entry states
 *   what its location held when last reported read or written, so lookup
 *   never names a location for content reported overwritten since.
 *
 * - Summary of where entries are, so that invalidating a range (discard,
 *   drive detached) costs about the entries it drops, not the size of the
 *   range: for each drive (folded into SUM_DRIVE_CELLS cells) a count of
 *   entries and the sector past the last one's, and for regions of 64^L
 *   sectors (L = 1..SUM_LEVELS: 32 KiB, 2 MiB, 128 MiB) counts in hashed cells,
 *   tagged with the region while only one uses the cell (see sum_cell()).
 *   A region whose cell is zero or tagged for another region has no entry,
 *   and its sub-regions are not looked at.  Cells shared by regions with
 *   entries only cost extra look-ups (with entries scattered thinly over a
 *   large disk, up to one per chunk of the range); once a walk cost as much
 *   as looking at every entry would, it does that instead.  The cells take
 *   about half a byte per table slot, part of the byte budget.
 *
 * - Eviction is CLOCK: lookups and re-inserts set a referenced bit.  Free
 *   entries are used first; only when every entry is in use does the hand
 *   move, clearing referenced bits, to the first unreferenced entry.  So
 *   each operation is O(1) amortised (a full sweep clears every bit).
 *
 * Locking: one mutex protects everything.  Everything done under it is
 * O(1) amortised per chunk inserted, invalidated or looked up, except the
 * invalidation of a large range: that is done in batches of about
 * INVAL_BATCH steps, dropping the lock between them.  The caller waits for
 * the last batch before the guest sees its write complete.  A chunk of the
 * range indexed meanwhile comes from a read or write racing with that
 * write, whose result the guest cannot rely on; and it could as well be
 * indexed just after an invalidation done in one go.
 */
#include "qemu/osdep.h"
#include "qemu/thread.h"
#include "qemu/cutils.h"
#include "qemu/iov.h"
#include "migration/nas-dedup-index.h"

/*
 * Entry.loc: bit 63 valid, bit 62 referenced, bits 45..59 drive,
 * bits 0..44 the sector the chunk starts at (offsets below 2^54 bytes).
 * Locations, the summary below and invalidations count in sectors; an
 * entry covers NAS_DEDUP_CHUNK_SECTORS of them from its own.
 */
#define LOC_VALID       (1ull << 63)
#define LOC_REF         (1ull << 62)
#define LOC_SECTOR_BITS 45
#define LOC_SECTOR_MASK ((1ull << LOC_SECTOR_BITS) - 1)
#define LOC_DRIVE_SHIFT LOC_SECTOR_BITS
#define LOC_KEY_MASK    ((1ull << 60) - 1)

/* Tables have at most 2^SLOT_MAX_BITS slots. */
#define SLOT_MAX_BITS   31

/* End of the free list. */
#define FREE_END        UINT32_MAX

/* Summary: levels of regions of 64^L chunks, and cells for drives. */
#define SUM_FANOUT_BITS 6
#define SUM_LEVELS      3
#define SUM_MIN_BITS    6
#define SUM_DRIVE_CELLS 64

/* Steps between two releases of the lock while invalidating a range. */
#define INVAL_BATCH     1024
/* Ranges of fewer chunks are looked up chunk by chunk. */
#define INVAL_DIRECT    64

typedef struct Entry {
    uint64_t hash;              /* the first half of NasDedupHash */
    uint64_t loc;
} Entry;

struct NasDedupIndex {
    QemuMutex lock;
    NasDedupKey key;
    Entry *entries;
    uint32_t nentries;          /* capacity */
    uint32_t used;
    uint32_t fresh;             /* entries from here on never used */
    uint32_t free_head;         /* dropped entries, FREE_END-terminated */
    uint32_t hand;              /* CLOCK hand */
    uint32_t *by_hash;          /* entry number + 1, 0 = empty */
    uint32_t *by_loc;
    uint32_t mask;              /* table size - 1 */
    uint8_t slot_shift;         /* 64 - log2(table size) */
    uint32_t *sum[SUM_LEVELS + 1];      /* cells of level 1.. */
    uint8_t sum_shift[SUM_LEVELS + 1];  /* 64 - log2(cells) */
    uint64_t sum_salt;
    uint32_t drive_count[SUM_DRIVE_CELLS];
    uint64_t drive_end[SUM_DRIVE_CELLS];        /* 0 when count is */
    uint64_t drop_steps;        /* part of st.steps spent dropping */
    uint64_t bytes;
    NasDedupIndexStats st;
};

static inline uint64_t loc_key(uint16_t drive, uint64_t offset)
{
    return ((uint64_t)drive << LOC_DRIVE_SHIFT) |
           ((offset >> NAS_DEDUP_SECTOR_BITS) & LOC_SECTOR_MASK);
}

static inline uint32_t slot_of_hash(const NasDedupIndex *idx, uint64_t h)
{
    return (uint32_t)(h ^ (h >> 32)) & idx->mask;
}

/*
 * Fibonacci hashing: the top bits of the product, which depend on every
 * bit of the key (chunk-aligned locations are multiples of 8 sectors).
 */
static inline uint32_t slot_of_key(const NasDedupIndex *idx, uint64_t key)
{
    return (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> idx->slot_shift);
}

static uint32_t home_slot(const NasDedupIndex *idx, const uint32_t *table,
                          uint32_t e)
{
    const Entry *ent = &idx->entries[e];

    return table == idx->by_hash ? slot_of_hash(idx, ent->hash)
                                 : slot_of_key(idx, ent->loc & LOC_KEY_MASK);
}

/*
 * Summary cell: bits 0..23 count the entries of the regions that hash to
 * it; bits 24..31 hold the tag of that region while all of them are in
 * one region, 0 once several regions shared it (until the count drops to
 * 0).  So a cell with a count and another region's tag says that this
 * region has no entry.  A count that reaches CELL_COUNT_MAX stays there.
 */
#define CELL_COUNT_MAX  0xffffffu
#define CELL_TAG_SHIFT  24

/*
 * The summary cell of the level-@level region holding location @key, and
 * that region's tag (1..255).  Regions are numbered across drives:
 * @key >> (6 * @level) holds both.
 */
static inline uint32_t *sum_cell(const NasDedupIndex *idx, unsigned level,
                                 uint64_t key, uint32_t *tag)
{
    uint64_t h = ((key >> (SUM_FANOUT_BITS * level)) ^ idx->sum_salt) *
                 0x9E3779B97F4A7C15ull;

    /* The tag from bits that do not pick the cell (at most 28 do). */
    *tag = 1 + (uint32_t)((((h >> 8) & 0xffffff) * 255) >> 24);
    return &idx->sum[level][h >> idx->sum_shift[level]];
}

/* Whether the region with @tag may have entries, as far as @cell knows. */
static inline bool cell_may_hold(uint32_t cell, uint32_t tag)
{
    uint32_t t = cell >> CELL_TAG_SHIFT;

    return (cell & CELL_COUNT_MAX) && (t == 0 || t == tag);
}

static inline unsigned drive_cell(uint64_t key)
{
    return (key >> LOC_DRIVE_SHIFT) & (SUM_DRIVE_CELLS - 1);
}

/* Account for an entry at @key appearing (@add) or going away. */
static void sum_update(NasDedupIndex *idx, uint64_t key, bool add)
{
    unsigned level, d = drive_cell(key);

    for (level = 1; level <= SUM_LEVELS; level++) {
        uint32_t tag, *cell = sum_cell(idx, level, key, &tag);
        uint32_t count = *cell & CELL_COUNT_MAX;

        if (count == CELL_COUNT_MAX) {
            continue;
        }
        if (add && !count) {
            *cell = tag << CELL_TAG_SHIFT | 1;
        } else if (add) {
            if (*cell >> CELL_TAG_SHIFT != tag) {
                *cell = count;          /* several regions now */
            }
            (*cell)++;
        } else {
            assert(count > 0);
            *cell = count == 1 ? 0 : *cell - 1;
        }
    }
    if (add) {
        idx->drive_count[d]++;
        idx->drive_end[d] = MAX(idx->drive_end[d],
                                (key & LOC_SECTOR_MASK) + 1);
    } else {
        assert(idx->drive_count[d] > 0);
        if (--idx->drive_count[d] == 0) {
            idx->drive_end[d] = 0;
        }
    }
}

/* Remove entry number @e from @table, starting the probe at @slot. */
static void table_remove(NasDedupIndex *idx, uint32_t *table, uint32_t slot,
                         uint32_t e)
{
    uint32_t i = slot, j;

    idx->st.steps++;
    while (table[i] != e + 1) {
        assert(table[i] != 0);
        i = (i + 1) & idx->mask;
        idx->st.steps++;
    }
    /* Backward-shift deletion. */
    j = i;
    for (;;) {
        uint32_t home;

        table[i] = 0;
        do {
            j = (j + 1) & idx->mask;
            idx->st.steps++;
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
    idx->st.steps++;
    while (table[slot] != 0) {
        slot = (slot + 1) & idx->mask;
        idx->st.steps++;
    }
    table[slot] = e + 1;
}

/*
 * Forget entry @e, already out of by_hash: take it out of by_loc and the
 * summary, and put it on the free list.
 */
static void entry_release(NasDedupIndex *idx, uint32_t e)
{
    Entry *ent = &idx->entries[e];
    uint64_t key = ent->loc & LOC_KEY_MASK;

    table_remove(idx, idx->by_loc, slot_of_key(idx, key), e);
    sum_update(idx, key, false);
    ent->loc = 0;
    ent->hash = idx->free_head;
    idx->free_head = e;
    idx->used--;
}

static void entry_drop(NasDedupIndex *idx, uint32_t e)
{
    table_remove(idx, idx->by_hash, slot_of_hash(idx, idx->entries[e].hash),
                 e);
    entry_release(idx, e);
}

static int64_t find_by_key(NasDedupIndex *idx, uint64_t key)
{
    uint32_t i;

    for (i = slot_of_key(idx, key);; i = (i + 1) & idx->mask) {
        uint32_t v = idx->by_loc[i];

        idx->st.steps++;
        if (!v) {
            return -1;
        }
        if ((idx->entries[v - 1].loc & LOC_KEY_MASK) == key) {
            return v - 1;
        }
    }
}

/*
 * Take a free entry: a dropped one, else a never used one, else (the index
 * is full) evict one with CLOCK.  *@evicted tells whether the tables
 * changed.
 */
static uint32_t entry_alloc(NasDedupIndex *idx, bool *evicted)
{
    uint32_t e;

    *evicted = false;
    if (idx->free_head == FREE_END && idx->fresh == idx->nentries) {
        assert(idx->used == idx->nentries);
        for (;;) {
            Entry *ent = &idx->entries[idx->hand];

            e = idx->hand;
            idx->hand = (e + 1 == idx->nentries) ? 0 : e + 1;
            idx->st.steps++;
            assert(ent->loc & LOC_VALID);
            if (!(ent->loc & LOC_REF)) {
                entry_drop(idx, e);
                idx->st.evictions++;
                *evicted = true;
                break;
            }
            ent->loc &= ~LOC_REF;
        }
    }
    if (idx->free_head != FREE_END) {
        e = idx->free_head;
        idx->free_head = idx->entries[e].hash;
        return e;
    }
    return idx->fresh++;
}

static void insert_locked(NasDedupIndex *idx, uint64_t hash,
                          uint64_t key)
{
    int64_t old = find_by_key(idx, key);
    unsigned copies = 0;
    uint32_t slot, e;
    bool evicted = false;

    idx->st.inserts++;
    if (old >= 0) {
        Entry *ent = &idx->entries[old];

        if (ent->hash == hash) {
            ent->loc |= LOC_REF;
            return;
        }
        /* Overwritten: the entry keeps its location, if it stays. */
        table_remove(idx, idx->by_hash, slot_of_hash(idx, ent->hash), old);
    }
    /* Count the copies of @hash and find where a new one would go. */
    for (slot = slot_of_hash(idx, hash);; slot = (slot + 1) & idx->mask) {
        Entry *ent;

        idx->st.steps++;
        if (!idx->by_hash[slot]) {
            break;
        }
        ent = &idx->entries[idx->by_hash[slot] - 1];
        if (ent->hash == hash) {
            ent->loc |= LOC_REF;
            if (++copies == NAS_DEDUP_INDEX_MAX_COPIES) {
                break;
            }
        }
    }
    if (copies == NAS_DEDUP_INDEX_MAX_COPIES) {
        /* Enough places known for this content. */
        if (old >= 0) {
            entry_release(idx, old);
        }
        return;
    }
    e = old >= 0 ? old : entry_alloc(idx, &evicted);
    idx->entries[e].hash = hash;
    idx->entries[e].loc = key | LOC_VALID;
    if (evicted) {
        /* The eviction may have moved the end of the probe run. */
        table_insert(idx, idx->by_hash, slot_of_hash(idx, hash), e);
    } else {
        idx->by_hash[slot] = e + 1;
    }
    if (old < 0) {
        table_insert(idx, idx->by_loc, slot_of_key(idx, key), e);
        sum_update(idx, key, true);
        idx->used++;
    }
}

static bool invalidate_key_locked(NasDedupIndex *idx, uint64_t key)
{
    int64_t e = find_by_key(idx, key);
    uint64_t steps = idx->st.steps;

    if (e < 0) {
        return false;
    }
    entry_drop(idx, e);
    idx->st.invalidations++;
    idx->drop_steps += idx->st.steps - steps;
    return true;
}

/*
 * log2 of the summary cells of @level for tables of 2^@tbits slots: 1 per
 * 8 slots at level 1, 16 times fewer at each level up.
 */
static unsigned sum_bits(unsigned tbits, unsigned level)
{
    int bits = (int)tbits + 1 - 4 * (int)level;

    return MAX(bits, SUM_MIN_BITS);
}

static uint64_t sum_bytes(unsigned tbits)
{
    uint64_t cells = 0;
    unsigned level;

    for (level = 1; level <= SUM_LEVELS; level++) {
        cells += 1ull << sum_bits(tbits, level);
    }
    return cells * sizeof(uint32_t);
}

/* Bytes besides the entries for tables of 2^@tbits slots. */
static uint64_t overhead_bytes(unsigned tbits)
{
    return 2 * (sizeof(uint32_t) << tbits) + sum_bytes(tbits) +
           SUM_DRIVE_CELLS * (sizeof(uint32_t) + sizeof(uint64_t));
}

uint64_t nas_dedup_index_bytes_for(uint64_t entries)
{
    unsigned tbits = 6;

    entries = MIN(entries, (1ull << SLOT_MAX_BITS) / 4 * 3);
    while ((1ull << tbits) / 4 * 3 < entries) {
        tbits++;
    }
    return MAX(entries * sizeof(Entry) + overhead_bytes(tbits),
               (uint64_t)NAS_DEDUP_INDEX_MIN_BYTES);
}

NasDedupIndex *nas_dedup_index_new(uint64_t max_bytes,
                                   const NasDedupKey *key)
{
    NasDedupIndex *idx;
    uint64_t best_n = 0, t;
    unsigned tbits, best_tbits = 0, level, i;
    uint32_t *cells;

    QEMU_BUILD_BUG_ON(NAS_DEDUP_KEY_SIZE % sizeof(uint64_t));
    if (max_bytes < NAS_DEDUP_INDEX_MIN_BYTES) {
        return NULL;
    }
    /*
     * Pick the table size (a power of two, load factor <= 3/4) that lets
     * the most entries fit the budget: 24 bytes an entry, 2 x 4 bytes a
     * table slot, and the summary (about half a byte a slot).
     */
    for (tbits = 6; tbits <= SLOT_MAX_BITS; tbits++) {
        uint64_t over, n;

        t = 1ull << tbits;
        over = overhead_bytes(tbits);
        if (over >= max_bytes) {
            break;
        }
        n = MIN(t / 4 * 3, (max_bytes - over) / sizeof(Entry));
        if (n > best_n) {
            best_n = n;
            best_tbits = tbits;
        }
    }
    best_n = MIN(best_n, UINT32_MAX - 1);
    t = 1ull << best_tbits;

    idx = g_new0(NasDedupIndex, 1);
    qemu_mutex_init(&idx->lock);
    idx->key = *key;
    idx->nentries = best_n;
    idx->free_head = FREE_END;
    idx->mask = t - 1;
    idx->slot_shift = 64 - best_tbits;
    idx->entries = g_new0(Entry, best_n);
    idx->by_hash = g_new0(uint32_t, t);
    idx->by_loc = g_new0(uint32_t, t);
    cells = g_malloc0(sum_bytes(best_tbits));
    for (level = 1; level <= SUM_LEVELS; level++) {
        idx->sum[level] = cells;
        idx->sum_shift[level] = 64 - sum_bits(best_tbits, level);
        cells += 1ull << sum_bits(best_tbits, level);
    }
    /* Cells the guest cannot aim at: salted with the secret. */
    for (i = 0; i < NAS_DEDUP_KEY_SIZE; i += sizeof(uint64_t)) {
        uint64_t w;

        memcpy(&w, (const uint8_t *)key->secret + i, sizeof(w));
        idx->sum_salt = (idx->sum_salt ^ w) * 0x9E3779B97F4A7C15ull;
    }
    idx->bytes = best_n * sizeof(Entry) + overhead_bytes(best_tbits);
    assert(idx->bytes <= max_bytes);
    idx->st.capacity = best_n;
    return idx;
}

const NasDedupKey *nas_dedup_index_key(NasDedupIndex *idx)
{
    return &idx->key;
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
    g_free(idx->sum[1]);
    g_free(idx);
}

void nas_dedup_index_insert(NasDedupIndex *idx, uint64_t hash,
                            uint16_t drive, uint64_t offset)
{
    assert(drive <= NAS_DEDUP_MAX_DRIVES);
    assert(offset < NAS_DEDUP_MAX_OFFSET);
    qemu_mutex_lock(&idx->lock);
    insert_locked(idx, hash, loc_key(drive, offset));
    qemu_mutex_unlock(&idx->lock);
}

/* @peek: change nothing (no step, hit or miss counted, no reference). */
static bool lookup(NasDedupIndex *idx, uint64_t hash, NasDedupLoc *loc,
                   bool peek)
{
    bool found = false;
    uint32_t i;

    qemu_mutex_lock(&idx->lock);
    for (i = slot_of_hash(idx, hash);; i = (i + 1) & idx->mask) {
        Entry *ent;

        idx->st.steps += !peek;
        if (!idx->by_hash[i]) {
            break;
        }
        ent = &idx->entries[idx->by_hash[i] - 1];
        if (ent->hash == hash) {
            if (!peek) {
                ent->loc |= LOC_REF;
            }
            loc->drive = (ent->loc >> LOC_DRIVE_SHIFT) & NAS_DEDUP_MAX_DRIVES;
            loc->offset = (ent->loc & LOC_SECTOR_MASK) <<
                          NAS_DEDUP_SECTOR_BITS;
            found = true;
            break;
        }
    }
    if (!peek) {
        if (found) {
            idx->st.hits++;
        } else {
            idx->st.misses++;
        }
    }
    qemu_mutex_unlock(&idx->lock);
    return found;
}

bool nas_dedup_index_lookup(NasDedupIndex *idx, uint64_t hash,
                            NasDedupLoc *loc)
{
    return lookup(idx, hash, loc, false);
}

bool nas_dedup_index_find(NasDedupIndex *idx, uint64_t hash,
                          NasDedupLoc *loc)
{
    return lookup(idx, hash, loc, true);
}

/*
 * Invalidating a range: walk the regions that overlap it, top level
 * first, skipping those whose summary cell says they have no entry, down
 * to regions of 64 chunks whose chunks are looked up one by one.  The walk
 * of a region stops as soon as its cell, an enclosing region's or the
 * drive's says that nothing is left there.
 */
typedef struct InvalWalk {
    uint64_t drive_key;         /* loc_key(drive, 0) */
    uint64_t first, last;       /* chunks, inclusive */
    /* Cells and tags of the regions being walked (not the drive's). */
    uint32_t *cell[SUM_LEVELS + 1];
    uint32_t tag[SUM_LEVELS + 1];
    uint32_t *drive_count;
    uint64_t stop_at;           /* end the batch once st.steps reaches it */
    bool progress;              /* some region done in this batch */
    uint64_t resume;            /* first chunk not done when a batch ends */
} InvalWalk;

/* True if a region walked at @level or above has no entry left. */
static bool walk_empty(const InvalWalk *w, unsigned level)
{
    for (; level <= SUM_LEVELS; level++) {
        if (!cell_may_hold(*w->cell[level], w->tag[level])) {
            return true;
        }
    }
    return *w->drive_count == 0;
}

/*
 * Drop the entries of the level-@level region starting at chunk @start
 * that are in the range.  Returns false if the batch ended before, with
 * w->resume set.
 */
static bool walk_region(NasDedupIndex *idx, InvalWalk *w, unsigned level,
                        uint64_t start)
{
    unsigned bits = SUM_FANOUT_BITS * level;
    uint64_t lo = MAX(w->first, start);
    uint64_t hi = MIN(w->last, start + (1ull << bits) - 1);
    uint64_t c, sub = 1ull << (bits - SUM_FANOUT_BITS);

    w->cell[level] = sum_cell(idx, level, w->drive_key | start,
                              &w->tag[level]);
    idx->st.steps++;
    if (level == 1) {
        for (c = lo; c <= hi && !walk_empty(w, 1); c++) {
            invalidate_key_locked(idx, w->drive_key | c);
        }
        return true;
    }
    for (c = lo & ~(sub - 1); c <= hi && !walk_empty(w, level); c += sub) {
        if (w->progress && idx->st.steps >= w->stop_at) {
            w->resume = MAX(c, w->first);
            return false;
        }
        if (!walk_region(idx, w, level - 1, c)) {
            return false;
        }
        w->progress = true;
    }
    return true;
}

/*
 * Drop the entries of @drive in chunks [@first, @last], or of a first part
 * of it, bounded by INVAL_BATCH steps.  Returns the first chunk not done:
 * > @last if all is.
 */
static uint64_t invalidate_batch_locked(NasDedupIndex *idx, uint16_t drive,
                                        uint64_t first, uint64_t last)
{
    const uint64_t top = 1ull << (SUM_FANOUT_BITS * SUM_LEVELS);
    uint64_t key = loc_key(drive, 0), upto, c;
    unsigned d = drive_cell(key);
    InvalWalk w;

    idx->st.steps++;
    if (!idx->drive_count[d] || first >= idx->drive_end[d]) {
        return last + 1;
    }
    /* Nothing of the drive is indexed beyond drive_end. */
    upto = MIN(last, idx->drive_end[d] - 1);
    if (upto - first < INVAL_DIRECT) {
        for (c = first; c <= upto && idx->drive_count[d]; c++) {
            invalidate_key_locked(idx, key | c);
        }
        return last + 1;
    }
    w = (InvalWalk) {
        .drive_key = key,
        .first = first,
        .last = upto,
        .drive_count = &idx->drive_count[d],
        .stop_at = idx->st.steps + INVAL_BATCH,
    };
    for (c = first & ~(top - 1); c <= w.last && idx->drive_count[d];
         c += top) {
        if (w.progress && idx->st.steps >= w.stop_at) {
            return MAX(c, first);
        }
        if (!walk_region(idx, &w, SUM_LEVELS, c)) {
            return w.resume;
        }
        w.progress = true;
    }
    return last + 1;
}

/*
 * Byte range to the sectors where chunks overlapping it start; false if
 * nothing of it can be indexed.
 */
static bool range_chunks(uint16_t drive, uint64_t offset, uint64_t bytes,
                         uint64_t *first, uint64_t *last)
{
    uint64_t end, s;

    if (bytes == 0 || drive > NAS_DEDUP_MAX_DRIVES ||
        offset >= NAS_DEDUP_MAX_OFFSET) {
        return false;
    }
    end = bytes > NAS_DEDUP_MAX_OFFSET - offset ? NAS_DEDUP_MAX_OFFSET
                                                : offset + bytes;
    s = offset >> NAS_DEDUP_SECTOR_BITS;
    *first = s >= NAS_DEDUP_CHUNK_SECTORS - 1 ?
             s - (NAS_DEDUP_CHUNK_SECTORS - 1) : 0;
    *last = (end - 1) >> NAS_DEDUP_SECTOR_BITS;
    return true;
}

/*
 * Drop the entries of @drive in chunks [@first, @last] among entries
 * [@e, ...), INVAL_BATCH of them.  Returns the next entry to look at.
 */
static uint32_t scan_batch_locked(NasDedupIndex *idx, uint16_t drive,
                                  uint64_t first, uint64_t last, uint32_t e)
{
    uint64_t lo = loc_key(drive, 0) | first, hi = loc_key(drive, 0) | last;
    uint32_t end = MIN(idx->fresh, e + INVAL_BATCH);

    if (!idx->drive_count[drive_cell(lo)]) {
        return idx->fresh;
    }
    for (; e < end; e++) {
        uint64_t l = idx->entries[e].loc;

        idx->st.steps++;
        if ((l & LOC_VALID) && (l & LOC_KEY_MASK) >= lo &&
            (l & LOC_KEY_MASK) <= hi) {
            uint64_t steps = idx->st.steps;

            entry_drop(idx, e);
            idx->st.invalidations++;
            idx->drop_steps += idx->st.steps - steps;
        }
    }
    return e;
}

void nas_dedup_index_invalidate(NasDedupIndex *idx, uint16_t drive,
                                uint64_t offset, uint64_t bytes)
{
    uint64_t first, last, spent = 0;
    uint32_t e = 0;
    bool scan = false;

    if (!range_chunks(drive, offset, bytes, &first, &last)) {
        return;
    }
    qemu_mutex_lock(&idx->lock);
    for (;;) {
        uint64_t steps = idx->st.steps - idx->drop_steps;

        if (!scan) {
            first = invalidate_batch_locked(idx, drive, first, last);
            if (first > last) {
                break;
            }
            /*
             * Once walking the regions cost as much as looking at every
             * entry would (summary cells shared by many regions), do that
             * instead: at most twice the cheaper of the two, besides what
             * dropping the entries costs either way.
             */
            spent += idx->st.steps - idx->drop_steps - steps;
            scan = spent >= idx->fresh;
        } else {
            e = scan_batch_locked(idx, drive, first, last, e);
            if (e >= idx->fresh) {
                break;
            }
        }
        /* Let the I/O threads and the migration thread in. */
        qemu_mutex_unlock(&idx->lock);
        qemu_mutex_lock(&idx->lock);
    }
    qemu_mutex_unlock(&idx->lock);
}

void nas_dedup_index_invalidate_drive(NasDedupIndex *idx, uint16_t drive)
{
    nas_dedup_index_invalidate(idx, drive, 0, NAS_DEDUP_MAX_OFFSET);
}

/*
 * Whether the @len bytes of memory from @addr, which starts in element @i
 * of @iov, are all in the iovec: the rest of element @i and the elements
 * after it, each starting where the previous one ends.
 */
static bool iov_contiguous(const struct iovec *iov, unsigned int niov,
                           unsigned int i, uintptr_t addr, size_t len)
{
    uintptr_t end = addr + len;
    uintptr_t at = (uintptr_t)iov[i].iov_base + iov[i].iov_len;

    for (i++; at < end; i++) {
        if (i >= niov || (uintptr_t)iov[i].iov_base != at) {
            return false;
        }
        at += iov[i].iov_len;
    }
    return true;
}

#define NOTE_BATCH 32

/* Pages of memory an I/O moved whole, a batch at a time. */
typedef struct NotePages {
    const struct iovec *iov;
    unsigned int niov;
    unsigned int i;             /* element being walked */
    size_t pos;                 /* request bytes before element @i */
    uintptr_t next;             /* next page address to look at in it */
    uint64_t offset;            /* disk offset of request byte 0 */
    size_t lo, hi;              /* the request's bytes of the iovec */
} NotePages;

/* Up to NOTE_BATCH pages: their memory and disk offsets.  0: no more. */
static unsigned int note_pages(NotePages *np, const void **page,
                               uint64_t *disk)
{
    unsigned int n = 0;

    while (n < NOTE_BATCH && np->i < np->niov) {
        const struct iovec *v = &np->iov[np->i];
        uintptr_t base = (uintptr_t)v->iov_base;
        uintptr_t a = MAX(np->next, QEMU_ALIGN_UP(base, NAS_DEDUP_CHUNK));
        size_t at = np->pos + (a - base);

        if (a >= base + v->iov_len || at + NAS_DEDUP_CHUNK > np->hi) {
            if (at + NAS_DEDUP_CHUNK > np->hi && a < base + v->iov_len) {
                np->i = np->niov;       /* past the request's end */
                break;
            }
            np->pos += v->iov_len;
            np->i++;
            np->next = 0;
            continue;
        }
        np->next = a + NAS_DEDUP_CHUNK;
        if (at < np->lo ||
            !QEMU_IS_ALIGNED(np->offset + (at - np->lo), NAS_DEDUP_SECTOR) ||
            (a + NAS_DEDUP_CHUNK > base + v->iov_len &&
             !iov_contiguous(np->iov, np->niov, np->i, a, NAS_DEDUP_CHUNK))) {
            continue;
        }
        page[n] = (const void *)a;
        disk[n] = np->offset + (at - np->lo);
        n++;
    }
    return n;
}

void nas_dedup_index_note_io(NasDedupIndex *idx, uint16_t drive,
                             uint64_t offset, uint64_t bytes,
                             const struct iovec *iov, unsigned int niov,
                             size_t iov_offset, bool is_write)
{
    NotePages np = {
        .iov = iov, .niov = niov, .offset = offset,
        .lo = iov_offset, .hi = iov_offset + bytes,
    };
    const void *page[NOTE_BATCH];
    uint64_t disk[NOTE_BATCH], hashes[NOTE_BATCH];
    bool zero[NOTE_BATCH];
    unsigned int n, k;

    if (bytes == 0 || drive > NAS_DEDUP_MAX_DRIVES ||
        offset >= NAS_DEDUP_MAX_OFFSET ||
        bytes > NAS_DEDUP_MAX_OFFSET - offset) {
        return;
    }
    if (is_write) {
        /*
         * Forget what the range held before hashing what it holds now, so
         * that no lookup meanwhile names a chunk for its old content.  This
         * also drops the chunks that overlap it in part.
         */
        nas_dedup_index_invalidate(idx, drive, offset, bytes);
    }
    if (!iov || bytes < NAS_DEDUP_CHUNK) {
        return;
    }

    /* Hash outside the lock, a batch at a time. */
    while ((n = note_pages(&np, page, disk))) {
        for (k = 0; k < n; k++) {
            zero[k] = buffer_is_zero(page[k], NAS_DEDUP_CHUNK);
            if (!zero[k]) {
                hashes[k] = nas_dedup_hash64(&idx->key, 0, page[k]);
            }
        }
        qemu_mutex_lock(&idx->lock);
        for (k = 0; k < n; k++) {
            /* Within the request, which ends below NAS_DEDUP_MAX_OFFSET. */
            uint64_t key = loc_key(drive, disk[k]);

            if (zero[k]) {
                invalidate_key_locked(idx, key);
            } else {
                insert_locked(idx, hashes[k], key);
            }
        }
        qemu_mutex_unlock(&idx->lock);
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

/* Entries in use, free list, never used ones: they add up. */
static bool entries_check(NasDedupIndex *idx)
{
    uint32_t e, n = 0, nfree = 0;

    for (e = 0; e < idx->nentries; e++) {
        if (idx->entries[e].loc & LOC_VALID) {
            n += 1;
            if (e >= idx->fresh) {
                g_warning("entry %u in use, beyond %u", e, idx->fresh);
                return false;
            }
        }
    }
    if (n != idx->used || idx->fresh > idx->nentries ||
        (idx->nentries && idx->hand >= idx->nentries)) {
        g_warning("%u valid entries, %u counted", n, idx->used);
        return false;
    }
    for (e = idx->free_head; e != FREE_END; e = idx->entries[e].hash) {
        if (e >= idx->fresh || (idx->entries[e].loc & LOC_VALID) ||
            ++nfree > idx->nentries) {
            g_warning("free list: bad entry %u", e);
            return false;
        }
    }
    if (idx->used + nfree + (idx->nentries - idx->fresh) != idx->nentries) {
        g_warning("%u used + %u on the free list + %u never used != %u",
                  idx->used, nfree, idx->nentries - idx->fresh,
                  idx->nentries);
        return false;
    }
    return true;
}

/* Each location at most once, each content at most MAX_COPIES times. */
static bool copies_check(NasDedupIndex *idx)
{
    uint32_t e, i;

    for (e = 0; e < idx->nentries; e++) {
        const Entry *ent = &idx->entries[e];
        unsigned copies = 0;

        if (!(ent->loc & LOC_VALID)) {
            continue;
        }
        if (find_by_key(idx, ent->loc & LOC_KEY_MASK) != e) {
            g_warning("entry %u not found by its location", e);
            return false;
        }
        for (i = slot_of_hash(idx, ent->hash); idx->by_hash[i];
             i = (i + 1) & idx->mask) {
            copies += idx->entries[idx->by_hash[i] - 1].hash == ent->hash;
        }
        if (copies > NAS_DEDUP_INDEX_MAX_COPIES) {
            g_warning("entry %u: content indexed %u times", e, copies);
            return false;
        }
    }
    return true;
}

/* The summary cells, recomputed from the entries. */
static bool sum_check(NasDedupIndex *idx)
{
    uint32_t count[SUM_DRIVE_CELLS] = { 0 };
    uint64_t end[SUM_DRIVE_CELLS] = { 0 };
    unsigned level, d;
    uint32_t e, i, n;
    bool ok = true;

    for (level = 1; level <= SUM_LEVELS && ok; level++) {
        /* Per cell: entries, and their regions' tag (256: several). */
        g_autofree uint32_t *want = NULL;
        g_autofree uint16_t *tags = NULL;

        n = 1u << (64 - idx->sum_shift[level]);
        want = g_new0(uint32_t, n);
        tags = g_new0(uint16_t, n);
        for (e = 0; e < idx->nentries; e++) {
            uint64_t l = idx->entries[e].loc;
            uint32_t tag, *cell;

            if (!(l & LOC_VALID)) {
                continue;
            }
            cell = sum_cell(idx, level, l & LOC_KEY_MASK, &tag);
            i = cell - idx->sum[level];
            want[i]++;
            tags[i] = !tags[i] || tags[i] == tag ? tag : 256;
        }
        for (i = 0; i < n; i++) {
            uint32_t cell = idx->sum[level][i];
            uint32_t t = cell >> CELL_TAG_SHIFT;

            if ((cell & CELL_COUNT_MAX) == CELL_COUNT_MAX) {
                continue;               /* saturated: only stays non-zero */
            }
            if ((cell & CELL_COUNT_MAX) != want[i] || (!want[i] && cell) ||
                (want[i] && t && t != tags[i])) {
                g_warning("summary level %u cell %u is 0x%x: %u entries, "
                          "tag %u", level, i, cell, want[i], tags[i]);
                ok = false;
                break;
            }
        }
    }
    for (e = 0; e < idx->nentries; e++) {
        uint64_t l = idx->entries[e].loc;

        if (l & LOC_VALID) {
            d = drive_cell(l & LOC_KEY_MASK);
            count[d]++;
            end[d] = MAX(end[d], (l & LOC_SECTOR_MASK) + 1);
        }
    }
    for (d = 0; d < SUM_DRIVE_CELLS; d++) {
        if (count[d] != idx->drive_count[d] || end[d] > idx->drive_end[d] ||
            (!count[d] && idx->drive_end[d])) {
            g_warning("drive cell %u: %u entries up to %" PRIu64
                      ", summary says %u up to %" PRIu64, d, count[d],
                      end[d], idx->drive_count[d], idx->drive_end[d]);
            ok = false;
        }
    }
    return ok;
}

bool nas_dedup_index_selfcheck(NasDedupIndex *idx)
{
    uint64_t steps;
    bool ok;

    qemu_mutex_lock(&idx->lock);
    steps = idx->st.steps;      /* checking is not the index's work */
    ok = entries_check(idx) &&
         table_check(idx, idx->by_hash, "by_hash") &&
         table_check(idx, idx->by_loc, "by_loc") &&
         copies_check(idx) && sum_check(idx);
    idx->st.steps = steps;
    qemu_mutex_unlock(&idx->lock);
    return ok;
}
