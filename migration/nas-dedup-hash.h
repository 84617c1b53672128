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
 * hash is XXH3-128 with a secret that the guest never sees: random bytes
 * drawn by the source QEMU at start-up and sent to the destination in the
 * migration stream (see docs/devel/nas-dedup.rst, "Threat model").
 *
 * This file needs no QEMU: it is unit-tested standalone.
 */
#ifndef MIGRATION_NAS_DEDUP_HASH_H
#define MIGRATION_NAS_DEDUP_HASH_H

#define NAS_DEDUP_CHUNK_BITS 12
#define NAS_DEDUP_CHUNK      (1u << NAS_DEDUP_CHUNK_BITS)

/*
 * Size of the secret: XXH3's default secret size, so that a 4 KiB chunk is
 * hashed in the same 4 blocks of 16 stripes as with the default secret.
 */
#define NAS_DEDUP_KEY_SIZE 192

typedef struct NasDedupHash {
    uint64_t hi;
    uint64_t lo;
} NasDedupHash;

typedef struct NasDedupKey {
    uint8_t secret[NAS_DEDUP_KEY_SIZE];
} NasDedupKey;

/* Hash one NAS_DEDUP_CHUNK-sized buffer with @key. */
void nas_dedup_hash_chunk(const NasDedupKey *key, const void *buf,
                          NasDedupHash *out);
/* The same, portable (libxxhash as built), and for CPUs with AVX2. */
void nas_dedup_hash_chunk_generic(const NasDedupKey *key, const void *buf,
                                  NasDedupHash *out);
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NAS_DEDUP_HASH_AVX2
void nas_dedup_hash_chunk_avx2(const NasDedupKey *key, const void *buf,
                               NasDedupHash *out);
/* True if this CPU runs nas_dedup_hash_chunk_avx2(). */
bool nas_dedup_hash_have_avx2(void);
#endif
bool nas_dedup_hash_equal(const NasDedupHash *a, const NasDedupHash *b);
/* True if the NAS_DEDUP_CHUNK bytes at @buf are all zero. */
bool nas_dedup_chunk_is_zero(const void *buf);

#endif
