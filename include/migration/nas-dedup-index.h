/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas: bounded content index of guest disk blocks
 *
 * Maps the keyed hash of a 4 KiB disk chunk (the first half of its
 * NasDedupHash: nas_dedup_hash64(key, 0, ...)) to where it lives on a
 * guest drive: (drive, byte offset, a multiple of NAS_DEDUP_SECTOR: a
 * chunk may start at any sector).  Filled from the guest's own disk reads
 * and writes; looked up when a RAM page is about to be sent.
 *
 * The index never grows beyond the byte budget it was created with: it
 * evicts with a CLOCK policy when full.  All functions are thread-safe.
 *
 * This file needs no QEMU: it is unit-tested standalone.
 */
#ifndef MIGRATION_NAS_DEDUP_INDEX_H
#define MIGRATION_NAS_DEDUP_INDEX_H

#include <sys/uio.h>
#include "migration/nas-dedup-hash.h"

/* Drive numbers fit in 15 bits (see the entry layout in the .c file). */
#define NAS_DEDUP_MAX_DRIVES 32767
/* A drive's identity (its device's qdev id or QOM path): at most this long */
#define NAS_DEDUP_ID_MAX 255
/* Offsets are sector-aligned and below 2^54 bytes (16 PiB). */
#define NAS_DEDUP_MAX_OFFSET (1ull << 54)
/*
 * A content found at more places is indexed at this many of them only:
 * one place is enough to send a reference.
 */
#define NAS_DEDUP_INDEX_MAX_COPIES 2
/* Smallest index the budget may describe. */
#define NAS_DEDUP_INDEX_MIN_BYTES (64 * 1024)

typedef struct NasDedupLoc {
    uint16_t drive;
    uint64_t offset;            /* bytes, multiple of NAS_DEDUP_SECTOR */
} NasDedupLoc;

typedef struct NasDedupIndexStats {
    uint64_t capacity;          /* entries the budget allows */
    uint64_t entries;           /* entries in use */
    uint64_t bytes;             /* memory used by the index */
    uint64_t inserts;
    uint64_t hits;
    uint64_t misses;
    uint64_t evictions;
    uint64_t invalidations;
    /*
     * Work done under the lock, in steps: table slots probed, CLOCK hand
     * moves, summary cells and entries examined.  For tests and tuning.
     */
    uint64_t steps;
} NasDedupIndexStats;

typedef struct NasDedupIndex NasDedupIndex;

/*
 * Create an index using at most @max_bytes of memory (tables included),
 * whose hashes are keyed with (a copy of) @key.  Returns NULL if
 * @max_bytes is below NAS_DEDUP_INDEX_MIN_BYTES.
 */
NasDedupIndex *nas_dedup_index_new(uint64_t max_bytes,
                                   const NasDedupKey *key);
/*
 * The smallest budget for nas_dedup_index_new() whose index holds at least
 * @entries entries, or as many as an index can (about 1.6 billion); at
 * least NAS_DEDUP_INDEX_MIN_BYTES.
 */
uint64_t nas_dedup_index_bytes_for(uint64_t entries);
/* The key the index hashes with. */
const NasDedupKey *nas_dedup_index_key(NasDedupIndex *idx);
void nas_dedup_index_free(NasDedupIndex *idx);

/*
 * Record that the chunk at @drive/@offset (sector-aligned) holds content
 * @hash: forget what was recorded at that offset before, and index it
 * there unless @hash is indexed at NAS_DEDUP_INDEX_MAX_COPIES places
 * already.  (Chunks recorded at other sectors that overlap it stay: the
 * caller invalidates what a write changed.)
 */
void nas_dedup_index_insert(NasDedupIndex *idx, uint64_t hash,
                            uint16_t drive, uint64_t offset);
/*
 * Find a chunk recorded with content @hash and not written or invalidated
 * since; counts a hit or a miss.
 */
bool nas_dedup_index_lookup(NasDedupIndex *idx, uint64_t hash,
                            NasDedupLoc *loc);
/*
 * Like nas_dedup_index_lookup(), but changes nothing: no hit or miss
 * counted, no CLOCK reference.  For estimates.
 */
bool nas_dedup_index_find(NasDedupIndex *idx, uint64_t hash,
                          NasDedupLoc *loc);
/*
 * Forget every chunk overlapping [@offset, @offset + @bytes) of @drive,
 * wherever it starts.  Costs about the chunks it forgets, not the size of
 * the range; a large range is done in batches, letting other threads in
 * between.
 */
void nas_dedup_index_invalidate(NasDedupIndex *idx, uint16_t drive,
                                uint64_t offset, uint64_t bytes);
/* Forget everything about @drive (detached, truncated, ...). */
void nas_dedup_index_invalidate_drive(NasDedupIndex *idx, uint16_t drive);

/*
 * Account for a completed guest I/O on @drive covering [@offset, +@bytes),
 * whose data is in @iov starting @iov_offset bytes in.  Reads index every
 * non-zero *page of memory* they moved whole: each NAS_DEDUP_CHUNK-aligned
 * address range of the iovec's memory (contiguous, possibly over several
 * elements) that lies within the request, at the disk offset its bytes
 * came from, if that is sector-aligned.  That is what a RAM page looked
 * up later hashes to, wherever the guest's file system and partitions
 * put it on disk.  Writes first invalidate the whole range (so chunks
 * overlapping it, the pages that became zero and the pages written only
 * in part stay forgotten), then do the same.  A write with @iov == NULL
 * (write-zeroes, discard) only invalidates.
 */
void nas_dedup_index_note_io(NasDedupIndex *idx, uint16_t drive,
                             uint64_t offset, uint64_t bytes,
                             const struct iovec *iov, unsigned int niov,
                             size_t iov_offset, bool is_write);

void nas_dedup_index_get_stats(NasDedupIndex *idx, NasDedupIndexStats *stats);

/*
 * Verify the index's internal invariants (both tables and the entries agree,
 * counts match).  For tests; returns false and logs what is broken.
 */
bool nas_dedup_index_selfcheck(NasDedupIndex *idx);

#endif
