/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas: keyed content hash of a 4 KiB chunk
 *
 * A page is sent as a reference to a disk block, and the destination
 * installs the block it reads, only if both have the same hash; so two
 * different chunks with one hash would silently corrupt guest RAM.  The
 * guest chooses both its disk content and its RAM content, and XXH3 with
 * its published default secret is not collision resistant: a guest that
 * knows the secret makes colliding 4 KiB blocks in microseconds.  So the
 * hash is keyed with secrets that the guest never sees: random bytes
 * drawn by the source QEMU and sent to the destination in the migration
 * stream (see docs/devel/nas-dedup.rst, "Threat model").
 *
 * The 128-bit hash of a chunk is two XXH3-64 values under two independent
 * secrets.  The first alone keys the index (tracking guest I/O costs one
 * hash a block); a reference carries both, and the destination checks
 * both.  One secret is not enough against a guest: XXH3's weakness lets a
 * blind guest plant colliding pairs that work with probability 2^-64
 * each (two 32-bit guesses of the secret), whatever the output width; it
 * must succeed under both secrets at once.
 *
 * This file needs no QEMU: it is unit-tested standalone.
 */
#ifndef MIGRATION_NAS_DEDUP_HASH_H
#define MIGRATION_NAS_DEDUP_HASH_H

#define NAS_DEDUP_CHUNK_BITS 12
#define NAS_DEDUP_CHUNK      (1u << NAS_DEDUP_CHUNK_BITS)
/*
 * Where a chunk may start on disk: any sector (a guest page read from a
 * file system with 1 KiB blocks, or from a partition at sector 63).
 */
#define NAS_DEDUP_SECTOR_BITS 9
#define NAS_DEDUP_SECTOR      (1u << NAS_DEDUP_SECTOR_BITS)
#define NAS_DEDUP_CHUNK_SECTORS (NAS_DEDUP_CHUNK / NAS_DEDUP_SECTOR)

/*
 * Size of one secret: XXH3's default secret size, so that a 4 KiB chunk is
 * hashed in the same 4 blocks of 16 stripes as with the default secret.
 */
#define NAS_DEDUP_SECRET_SIZE 192
#define NAS_DEDUP_KEY_SIZE (2 * NAS_DEDUP_SECRET_SIZE)

typedef struct NasDedupHash {
    uint64_t hi;                /* under secret 0: the index's key */
    uint64_t lo;                /* under secret 1 */
} NasDedupHash;

typedef struct NasDedupKey {
    uint8_t secret[2][NAS_DEDUP_SECRET_SIZE];
} NasDedupKey;

/* The hash of one NAS_DEDUP_CHUNK-sized buffer under secret @which. */
uint64_t nas_dedup_hash64(const NasDedupKey *key, int which, const void *buf);
/* Both: the full hash that references carry and fetches verify. */
void nas_dedup_hash_chunk(const NasDedupKey *key, const void *buf,
                          NasDedupHash *out);
/* The same, portable (libxxhash as built), and for CPUs with AVX2. */
uint64_t nas_dedup_hash64_generic(const NasDedupKey *key, int which,
                                  const void *buf);
#ifdef CONFIG_AVX2_OPT
uint64_t nas_dedup_hash64_avx2(const NasDedupKey *key, int which,
                               const void *buf);
/* True if this CPU runs nas_dedup_hash64_avx2(). */
bool nas_dedup_hash_have_avx2(void);
#endif
bool nas_dedup_hash_equal(const NasDedupHash *a, const NasDedupHash *b);

#endif
