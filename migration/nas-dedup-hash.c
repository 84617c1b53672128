/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas: keyed content hash of a 4 KiB chunk (see nas-dedup-hash.h)
 */
#include "qemu/osdep.h"
#include <xxhash.h>
#ifdef CONFIG_AVX2_OPT
#include "host/cpuinfo.h"
#endif
#include "migration/nas-dedup-hash.h"

QEMU_BUILD_BUG_ON(NAS_DEDUP_SECRET_SIZE < XXH3_SECRET_SIZE_MIN);

uint64_t nas_dedup_hash64_generic(const NasDedupKey *key, int which,
                                  const void *buf)
{
    return XXH3_64bits_withSecret(buf, NAS_DEDUP_CHUNK, key->secret[which],
                                  NAS_DEDUP_SECRET_SIZE);
}

#ifdef CONFIG_AVX2_OPT
bool nas_dedup_hash_have_avx2(void)
{
    return cpuinfo & CPUINFO_AVX2;
}
#endif

uint64_t nas_dedup_hash64(const NasDedupKey *key, int which, const void *buf)
{
#ifdef CONFIG_AVX2_OPT
    if (cpuinfo & CPUINFO_AVX2) {
        return nas_dedup_hash64_avx2(key, which, buf);
    }
#endif
    return nas_dedup_hash64_generic(key, which, buf);
}

void nas_dedup_hash_chunk(const NasDedupKey *key, const void *buf,
                          NasDedupHash *out)
{
    out->hi = nas_dedup_hash64(key, 0, buf);
    out->lo = nas_dedup_hash64(key, 1, buf);
}

bool nas_dedup_hash_equal(const NasDedupHash *a, const NasDedupHash *b)
{
    return a->hi == b->hi && a->lo == b->lo;
}
