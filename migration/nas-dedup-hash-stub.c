/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas: the keyed hash when QEMU is built without libxxhash.  The
 * capability is refused then (nas_dedup_caps_check()), so nothing calls
 * these: not even the tracking, which hashes only with the capability on.
 */
#include "qemu/osdep.h"
#include "migration/nas-dedup-hash.h"

uint64_t nas_dedup_hash64(const NasDedupKey *key, int which, const void *buf)
{
    g_assert_not_reached();
}

void nas_dedup_hash_chunk(const NasDedupKey *key, const void *buf,
                          NasDedupHash *out)
{
    g_assert_not_reached();
}

bool nas_dedup_hash_equal(const NasDedupHash *a, const NasDedupHash *b)
{
    return a->hi == b->hi && a->lo == b->lo;
}
