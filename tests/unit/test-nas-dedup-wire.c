/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Unit tests of the dedup-nas wire records: round trips, and rejection of
 * every truncated or malformed form.
 */
#include "qemu/osdep.h"
#include "qapi/error.h"
#include "../migration/nas-dedup-wire.h"

typedef struct Buf {
    const uint8_t *p;
    size_t left;
} Buf;

static bool buf_read(void *opaque, void *dst, size_t len)
{
    Buf *b = opaque;

    if (b->left < len) {
        return false;
    }
    memcpy(dst, b->p, len);
    b->p += len;
    b->left -= len;
    return true;
}

static bool decode(const uint8_t *data, size_t len, NasDedupRecord *rec,
                   Error **err, size_t *left)
{
    Buf b = { data, len };
    bool ok = nas_dedup_record_decode(buf_read, &b, rec, err);

    *left = b.left;
    return ok;
}

#define NRECS 4

static void sample_records(NasDedupRecord *recs)
{
    uint32_t k;

    memset(recs, 0, NRECS * sizeof(*recs));
    recs[0].type = NAS_DEDUP_REC_DRIVE;
    recs[0].drive = 7;
    strcpy(recs[0].id, "/machine/peripheral/vd0/virtio-backend");
    recs[0].disk_size = 512ull << 20;

    recs[1].type = NAS_DEDUP_REC_REFS;
    recs[1].drive = 7;
    recs[1].npages = 5;
    recs[1].disk_offset = 0x123000;
    for (k = 0; k < 5; k++) {
        recs[1].hash[k] = (NasDedupHash){ .hi = ~(uint64_t)k, .lo = k * 3 };
    }

    recs[2].type = NAS_DEDUP_REC_SYNC;
    recs[2].seq = 0xdeadbeef;
    recs[2].final = true;

    recs[3].type = NAS_DEDUP_REC_SETUP;
    recs[3].version = NAS_DEDUP_WIRE_VERSION;
    recs[3].resend_msg = 0x0a;
    recs[3].sync_ack_msg = 0x10b;
    recs[3].progress_msg = 0x20c;
    for (k = 0; k < NAS_DEDUP_KEY_SIZE; k++) {
        ((uint8_t *)recs[3].key.secret)[k] = k * 7 + 1;
    }
}

static void test_round_trip(void)
{
    NasDedupRecord *in = g_new0(NasDedupRecord, NRECS);
    NasDedupRecord *out = g_new0(NasDedupRecord, 1);
    int i;

    sample_records(in);
    for (i = 0; i < NRECS; i++) {
        g_autoptr(GByteArray) a = g_byte_array_new();
        g_autoptr(Error) err = NULL;
        size_t left;

        nas_dedup_record_encode(a, &in[i]);
        g_assert_true(decode(a->data, a->len, out, &err, &left));
        g_assert_null(err);
        g_assert_cmpuint(left, ==, 0);
        g_assert_cmpuint(out->type, ==, in[i].type);
        switch (in[i].type) {
        case NAS_DEDUP_REC_DRIVE:
            g_assert_cmpuint(out->drive, ==, 7);
            g_assert_cmpstr(out->id, ==, in[i].id);
            g_assert_cmpuint(out->disk_size, ==, in[i].disk_size);
            break;
        case NAS_DEDUP_REC_REFS:
            g_assert_cmpuint(out->drive, ==, 7);
            g_assert_cmpuint(out->npages, ==, 5);
            g_assert_cmpuint(out->disk_offset, ==, 0x123000);
            g_assert_cmpmem(out->hash, 5 * sizeof(NasDedupHash),
                            in[i].hash, 5 * sizeof(NasDedupHash));
            /* 1 type + 2 drive + 2 npages + 8 offset + 16 a page */
            g_assert_cmpuint(a->len, ==, 13 + 5 * 16);
            break;
        case NAS_DEDUP_REC_SYNC:
            g_assert_cmpuint(out->seq, ==, 0xdeadbeef);
            g_assert_true(out->final);
            g_assert_false(out->lazy);
            break;
        case NAS_DEDUP_REC_SETUP:
            g_assert_cmpuint(out->version, ==, NAS_DEDUP_WIRE_VERSION);
            g_assert_cmpuint(out->resend_msg, ==, 0x0a);
            g_assert_cmpuint(out->sync_ack_msg, ==, 0x10b);
            g_assert_cmpuint(out->progress_msg, ==, 0x20c);
            g_assert_cmpmem(out->key.secret, NAS_DEDUP_KEY_SIZE,
                            in[i].key.secret, NAS_DEDUP_KEY_SIZE);
            /* 1 type + 1 version + 3 x 2 msg numbers + 2 len + key */
            g_assert_cmpuint(a->len, ==, 10 + NAS_DEDUP_KEY_SIZE);
            break;
        }
    }
    g_free(in);
    g_free(out);
}

/* Every strict prefix of every record fails to decode, with a message. */
/* SYNC's last byte: live, final, and final with the fill after LISTEN. */
static void test_sync_kinds(void)
{
    static const struct {
        bool final, lazy;
        uint8_t byte;
    } kinds[] = {
        { false, false, NAS_DEDUP_SYNC_LIVE },
        { true, false, NAS_DEDUP_SYNC_FINAL },
        { true, true, NAS_DEDUP_SYNC_LAZY },
    };
    size_t i;

    for (i = 0; i < ARRAY_SIZE(kinds); i++) {
        g_autoptr(GByteArray) a = g_byte_array_new();
        g_autoptr(Error) err = NULL;
        NasDedupRecord in = {
            .type = NAS_DEDUP_REC_SYNC, .seq = 7,
            .final = kinds[i].final, .lazy = kinds[i].lazy,
        };
        NasDedupRecord out;
        size_t left;

        nas_dedup_record_encode(a, &in);
        g_assert_cmpuint(a->len, ==, 6);
        g_assert_cmpuint(a->data[5], ==, kinds[i].byte);
        g_assert_true(decode(a->data, a->len, &out, &err, &left));
        g_assert_cmpuint(out.seq, ==, 7);
        g_assert_cmpint(out.final, ==, kinds[i].final);
        g_assert_cmpint(out.lazy, ==, kinds[i].lazy);
    }
}

static void test_truncated(void)
{
    NasDedupRecord *in = g_new0(NasDedupRecord, NRECS);
    NasDedupRecord *out = g_new0(NasDedupRecord, 1);
    int i;

    sample_records(in);
    for (i = 0; i < NRECS; i++) {
        g_autoptr(GByteArray) a = g_byte_array_new();
        size_t cut;

        nas_dedup_record_encode(a, &in[i]);
        for (cut = 0; cut < a->len; cut++) {
            g_autoptr(Error) err = NULL;
            size_t left;

            g_assert_false(decode(a->data, cut, out, &err, &left));
            g_assert_nonnull(err);
            g_assert_nonnull(strstr(error_get_pretty(err), "truncated"));
        }
    }
    g_free(in);
    g_free(out);
}

static void expect_reject(const uint8_t *data, size_t len, const char *what)
{
    NasDedupRecord *out = g_new0(NasDedupRecord, 1);
    g_autoptr(Error) err = NULL;
    size_t left;

    g_assert_false(decode(data, len, out, &err, &left));
    g_assert_nonnull(err);
    if (!strstr(error_get_pretty(err), what)) {
        g_error("error '%s' does not mention '%s'", error_get_pretty(err),
                what);
    }
    g_free(out);
}

/* expect_reject() of the bytes listed, as many as there are. */
#define REJECT(what, ...) \
    expect_reject((const uint8_t[]){ __VA_ARGS__ }, \
                  sizeof((const uint8_t[]){ __VA_ARGS__ }), what)

static void test_malformed(void)
{
    /* unknown type */
    REJECT("unknown record type 0", 0);
    REJECT("unknown record type 9", 9, 0, 0);
    /* DRIVE: drive number out of range, empty id, unprintable id, size */
    REJECT("drive number", 1, 0x80, 0x00, 1, 'a', 0, 0, 0, 0, 0, 0, 0, 1);
    REJECT("invalid DRIVE", 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1);
    REJECT("invalid DRIVE", 1, 0, 1, 2, 'a', '\n', 0, 0, 0, 0, 0, 0, 0, 1);
    REJECT("absurd disk size", 1, 0, 1, 1, 'a', 0xff, 0xff, 0xff, 0xff, 0xff,
           0xff, 0xff, 0xff);
    /* REFS: drive, run length 0 and too long, unaligned and absurd offset */
    REJECT("drive number", 2, 0xff, 0xff, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    REJECT("run of 0 pages", 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    REJECT("run of 257 pages", 2, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    REJECT("bad disk offset", 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0x10, 0x01);
    REJECT("bad disk offset", 2, 0, 0, 0, 1, 0xf0, 0, 0, 0, 0, 0, 0, 0);
    /* SYNC: bad final flag */
    REJECT("final flag", 3, 0, 0, 0, 1, 3);
    /* SETUP: unknown version, wrong key length */
    REJECT("protocol version 1", 4, 1, 0, 9, 0, 10, 0, 11, 1, 128);
    REJECT("protocol version 2", 4, 2, 0, 9, 0, 10, 0, 11, 1, 128);
    REJECT("protocol version 3", 4, 3, 0, 9, 0, 10, 0, 11, 1, 128);
    REJECT("protocol version 4", 4, 4, 0, 9, 0, 10, 0, 11, 1, 128);
    REJECT("protocol version 5", 4, 5, 0, 9, 0, 10, 0, 11, 1, 128);
    REJECT("key of 16 bytes", 4, 6, 0, 9, 0, 10, 0, 11, 0, 16);
}

static void test_refs_check(void)
{
    NasDedupRecord *r = g_new0(NasDedupRecord, 1);
    const uint64_t C = NAS_DEDUP_CHUNK;
    Error *err = NULL;

    r->type = NAS_DEDUP_REC_REFS;
    r->npages = 4;
    r->disk_offset = 8 * C;
    g_assert_true(nas_dedup_refs_check(r, 0, 4 * C, 12 * C, &err));
    g_assert_null(err);
    g_assert_true(nas_dedup_refs_check(r, 12 * C, 16 * C, 100 * C, &err));
    /* run runs past the RAMBlock */
    g_assert_false(nas_dedup_refs_check(r, 13 * C, 16 * C, 100 * C, &err));
    g_assert_nonnull(strstr(error_get_pretty(err), "outside RAMBlock"));
    error_free(err);
    err = NULL;
    g_assert_false(nas_dedup_refs_check(r, UINT64_MAX - C + 1, 16 * C,
                                        100 * C, &err));
    error_free(err);
    err = NULL;
    /* disk range past the end of the drive */
    g_assert_false(nas_dedup_refs_check(r, 0, 16 * C, 11 * C, &err));
    g_assert_nonnull(strstr(error_get_pretty(err), "past the end of drive"));
    error_free(err);
    err = NULL;
    g_assert_false(nas_dedup_refs_check(r, 0, 16 * C, 4 * C, &err));
    error_free(err);
    err = NULL;
    g_free(r);
}

static void test_return_path(void)
{
    g_autoptr(GByteArray) a = g_byte_array_new();
    NasDedupResend in = { .offset = 0x7000, .npages = 3,
                          .refs_seq = 0xfffffffe }, out;
    NasDedupProgress pr;
    uint32_t seq, n;
    Error *err = NULL;
    size_t cut;

    strcpy(in.id, "pc.ram");
    nas_dedup_resend_encode(a, &in);
    g_assert_true(nas_dedup_resend_decode(a->data, a->len, &out, &err));
    g_assert_cmpstr(out.id, ==, "pc.ram");
    g_assert_cmpuint(out.offset, ==, 0x7000);
    g_assert_cmpuint(out.npages, ==, 3);
    g_assert_cmpuint(out.refs_seq, ==, 0xfffffffe);
    for (cut = 0; cut < a->len; cut++) {
        g_assert_false(nas_dedup_resend_decode(a->data, cut, &out, &err));
        g_assert_nonnull(err);
        error_free(err);
        err = NULL;
    }
    /* trailing garbage */
    g_byte_array_append(a, (const guint8 *)"x", 1);
    g_assert_false(nas_dedup_resend_decode(a->data, a->len, &out, &err));
    error_free(err);
    err = NULL;
    /* zero pages */
    g_byte_array_set_size(a, 0);
    in.npages = 0;
    nas_dedup_resend_encode(a, &in);
    g_assert_false(nas_dedup_resend_decode(a->data, a->len, &out, &err));
    error_free(err);
    err = NULL;
    /* REFS record numbers 0 and UINT32_MAX are never used */
    in.npages = 1;
    in.refs_seq = 0;
    g_byte_array_set_size(a, 0);
    nas_dedup_resend_encode(a, &in);
    g_assert_false(nas_dedup_resend_decode(a->data, a->len, &out, &err));
    g_assert_nonnull(strstr(error_get_pretty(err), "REFS record number 0"));
    error_free(err);
    err = NULL;
    in.refs_seq = UINT32_MAX;
    g_byte_array_set_size(a, 0);
    nas_dedup_resend_encode(a, &in);
    g_assert_false(nas_dedup_resend_decode(a->data, a->len, &out, &err));
    error_free(err);
    err = NULL;
    g_assert_cmpuint(nas_dedup_refs_seq_next(0), ==, 1);
    g_assert_cmpuint(nas_dedup_refs_seq_next(41), ==, 42);
    g_assert_cmpuint(nas_dedup_refs_seq_next(UINT32_MAX - 1), ==, 1);

    g_byte_array_set_size(a, 0);
    nas_dedup_sync_ack_encode(a, 42, 17);
    g_assert_true(nas_dedup_sync_ack_decode(a->data, a->len, &seq, &n, &err));
    g_assert_cmpuint(seq, ==, 42);
    g_assert_cmpuint(n, ==, 17);
    g_assert_false(nas_dedup_sync_ack_decode(a->data, a->len - 1, &seq, &n,
                                             &err));
    error_free(err);
    err = NULL;

    g_byte_array_set_size(a, 0);
    nas_dedup_progress_encode(a, &(NasDedupProgress) {
        .refs_done = 1ULL << 40, .fetched_bytes = 3, .fetch_busy_us = 5 });
    g_assert_cmpuint(a->len, ==, 24);
    g_assert_true(nas_dedup_progress_decode(a->data, a->len, &pr, &err));
    g_assert_cmpuint(pr.refs_done, ==, 1ULL << 40);
    g_assert_cmpuint(pr.fetched_bytes, ==, 3);
    g_assert_cmpuint(pr.fetch_busy_us, ==, 5);
    for (cut = 0; cut < a->len; cut++) {
        g_assert_false(nas_dedup_progress_decode(a->data, cut, &pr, &err));
        g_assert_nonnull(strstr(error_get_pretty(err), "PROGRESS"));
        error_free(err);
        err = NULL;
    }
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/nas-dedup/wire/round-trip", test_round_trip);
    g_test_add_func("/nas-dedup/wire/sync-kinds", test_sync_kinds);
    g_test_add_func("/nas-dedup/wire/truncated", test_truncated);
    g_test_add_func("/nas-dedup/wire/malformed", test_malformed);
    g_test_add_func("/nas-dedup/wire/refs-check", test_refs_check);
    g_test_add_func("/nas-dedup/wire/return-path", test_return_path);
    return g_test_run();
}
