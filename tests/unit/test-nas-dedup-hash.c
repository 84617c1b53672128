/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Unit tests of the dedup-nas keyed chunk hash.
 */
#include "qemu/osdep.h"
#define XXH_INLINE_ALL          /* for XXH3_kSecret, the published secret */
#include <xxhash.h>
#include "qemu/cutils.h"
#include "migration/nas-dedup-hash.h"

#define C NAS_DEDUP_CHUNK

static void random_bytes(GRand *r, void *buf, size_t len)
{
    uint8_t *p = buf;
    size_t i;

    for (i = 0; i < len; i++) {
        p[i] = g_rand_int(r);
    }
}

static void random_key(GRand *r, NasDedupKey *key)
{
    random_bytes(r, key->secret, sizeof(key->secret));
}

static uint64_t rd64(const uint8_t *p)
{
    uint64_t v;

    memcpy(&v, p, 8);
    return GUINT64_FROM_LE(v);
}

static void wr64(uint8_t *p, uint64_t v)
{
    v = GUINT64_TO_LE(v);
    memcpy(p, &v, 8);
}

/*
 * Make two different 4 KiB blocks @a and @b that XXH3 with @secret
 * (NAS_DEDUP_SECRET_SIZE bytes) hashes alike, 64 or 128 bits.  XXH3 adds,
 * for each 8-byte lane d of a 64-byte stripe with secret word k,
 * lo32(d ^ k) * hi32(d ^ k) to one accumulator and d to its neighbour.
 * Lane 0 of stripes 0 and 1 (secret words at 0 and 8): with
 * lo32(d ^ k) = 0 the product is 0 whatever the high half, so moving
 * 2^32 * c from one lane to the other keeps both sums.  This is what a
 * guest that knows the secret can do.
 */
static void make_collision(const uint8_t *secret, GRand *r, uint8_t *a,
                           uint8_t *b)
{
    uint64_t k0 = rd64(secret), k1 = rd64(secret + 8);
    uint64_t v0, v1, delta = (uint64_t)(g_rand_int(r) | 1) << 32;

    random_bytes(r, a, C);
    v0 = ((uint64_t)g_rand_int(r) << 32) | (uint32_t)k0;
    v1 = ((uint64_t)g_rand_int(r) << 32) | (uint32_t)k1;
    wr64(a, v0);
    wr64(a + 64, v1);
    memcpy(b, a, C);
    wr64(b, v0 + delta);
    wr64(b + 64, v1 - delta);
}

static void test_hash(void)
{
    g_autofree uint8_t *a = g_malloc0(C);
    g_autofree uint8_t *b = g_malloc0(C);
    GRand *r = g_rand_new_with_seed(1);
    NasDedupKey key;
    NasDedupHash ha, hb;

    random_key(r, &key);
    g_assert_true(buffer_is_zero(a, NAS_DEDUP_CHUNK));
    b[C - 1] = 1;
    g_assert_false(buffer_is_zero(b, NAS_DEDUP_CHUNK));
    nas_dedup_hash_chunk(&key, a, &ha);
    nas_dedup_hash_chunk(&key, b, &hb);
    g_assert_false(nas_dedup_hash_equal(&ha, &hb));
    b[C - 1] = 0;
    nas_dedup_hash_chunk(&key, b, &hb);
    g_assert_true(nas_dedup_hash_equal(&ha, &hb));
    g_rand_free(r);
}

/* Another secret, another half: both secrets are really used. */
static void test_keyed(void)
{
    g_autofree uint8_t *a = g_malloc(C);
    GRand *r = g_rand_new_with_seed(2);
    NasDedupKey k1, k2;
    NasDedupHash h1, h2;
    int which;

    random_bytes(r, a, C);
    random_key(r, &k1);
    nas_dedup_hash_chunk(&k1, a, &h1);
    g_assert_cmphex(h1.hi, ==, nas_dedup_hash64(&k1, 0, a));
    g_assert_cmphex(h1.lo, ==, nas_dedup_hash64(&k1, 1, a));
    for (which = 0; which < 2; which++) {
        k2 = k1;
        k2.secret[which][NAS_DEDUP_SECRET_SIZE - 1] ^= 1;
        nas_dedup_hash_chunk(&k2, a, &h2);
        g_assert_cmphex(which ? h2.hi : h2.lo, ==, which ? h1.hi : h1.lo);
        g_assert_cmphex(which ? h2.lo : h2.hi, !=, which ? h1.lo : h1.hi);
    }
    g_rand_free(r);
}

/*
 * The collision of the review: blocks made for XXH3's published secret
 * collide under plain XXH3-128 (what dedup-nas used to send), and do not
 * under the keyed hash.  Blocks made for one of the two secrets collide
 * under that one (the index's half; a guest that guessed it, 2^-64 a
 * pair), never under both: that is why a reference carries both halves.
 */
static void test_collision(void)
{
    g_autofree uint8_t *a = g_malloc(C);
    g_autofree uint8_t *b = g_malloc(C);
    GRand *r = g_rand_new_with_seed(3);
    NasDedupKey key;
    NasDedupHash ha, hb;
    XXH128_hash_t xa, xb;
    int i;

    for (i = 0; i < 100; i++) {
        make_collision(XXH3_kSecret, r, a, b);
        g_assert_true(memcmp(a, b, C) != 0);
        xa = XXH3_128bits(a, C);
        xb = XXH3_128bits(b, C);
        g_assert_true(XXH128_isEqual(xa, xb));

        random_key(r, &key);
        nas_dedup_hash_chunk(&key, a, &ha);
        nas_dedup_hash_chunk(&key, b, &hb);
        g_assert_false(nas_dedup_hash_equal(&ha, &hb));

        make_collision(key.secret[0], r, a, b);
        nas_dedup_hash_chunk(&key, a, &ha);
        nas_dedup_hash_chunk(&key, b, &hb);
        g_assert_cmphex(ha.hi, ==, hb.hi);
        g_assert_cmphex(ha.lo, !=, hb.lo);
        g_assert_false(nas_dedup_hash_equal(&ha, &hb));
        g_assert_true(XXH128_isEqual(
            XXH3_128bits_withSecret(a, C, key.secret[0],
                                    NAS_DEDUP_SECRET_SIZE),
            XXH3_128bits_withSecret(b, C, key.secret[0],
                                    NAS_DEDUP_SECRET_SIZE)));
    }
    g_rand_free(r);
}

/*
 * Both hash implementations give the same value (hosts with and without
 * AVX2 must agree), on random buffers, keys and odd alignments.
 */
static void test_hash_impls(void)
{
    g_autofree uint8_t *buf = g_malloc(C + 64);
    GRand *r = g_rand_new_with_seed(42);
    NasDedupKey key;
    NasDedupHash g, d;
    unsigned int i;

#ifdef CONFIG_AVX2_OPT
    if (!nas_dedup_hash_have_avx2()) {
        g_test_skip("this CPU has no AVX2");
    }
#endif
    for (i = 0; i < 200; i++) {
        uint8_t *p = buf + (i % 64);

        random_key(r, &key);
        random_bytes(r, p, C);
        g.hi = nas_dedup_hash64_generic(&key, 0, p);
        g.lo = nas_dedup_hash64_generic(&key, 1, p);
        nas_dedup_hash_chunk(&key, p, &d);
        g_assert_true(nas_dedup_hash_equal(&g, &d));
#ifdef CONFIG_AVX2_OPT
        if (nas_dedup_hash_have_avx2()) {
            d.hi = nas_dedup_hash64_avx2(&key, 0, p);
            d.lo = nas_dedup_hash64_avx2(&key, 1, p);
            g_assert_true(nas_dedup_hash_equal(&g, &d));
        }
#endif
    }
    g_rand_free(r);
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/nas-dedup/hash/basic", test_hash);
    g_test_add_func("/nas-dedup/hash/keyed", test_keyed);
    g_test_add_func("/nas-dedup/hash/collision", test_collision);
    g_test_add_func("/nas-dedup/hash/impls", test_hash_impls);
    return g_test_run();
}
