/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * libFuzzer harness for every dedup-nas decoder that sees bytes from the
 * migration peer (migration/nas-dedup-wire.c):
 *
 *   selector 0  nas_dedup_record_decode(): a stream of records, decoded one
 *               after the other (through a NasDedupReadFn) until one fails
 *   selector 1  nas_dedup_refs_check(): be64 page_offset, be64 ram_len,
 *               be64 disk_len, then one record; a decoded REFS record is
 *               checked against those, and the verdict against an oracle
 *   selector 2  nas_dedup_resend_decode(): the rest is one RESEND payload
 *   selector 3  nas_dedup_sync_ack_decode(): the rest is one SYNC_ACK payload
 *
 * The selector is the first input byte modulo 4 (the seeds in
 * tests/fuzz/corpus/ use 0..3).  Besides the sanitizers' findings, it
 * asserts that:
 *   - a decoder fails with an error message, or succeeds without one;
 *   - what decodes satisfies the format's rules (nas-dedup-wire.h);
 *   - what decodes re-encodes to exactly the bytes it was decoded from (so
 *     every accepted encoding is the canonical one), and that encoding
 *     decodes again to the same record.
 *
 * Build and run: scripts/fuzz.sh [SECONDS].
 */
#include "qemu/osdep.h"
#include "qapi/error.h"
#include "nas-dedup-wire.h"

#define CHECK(cond, ...)                                                     \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "fuzz-nas-dedup-wire: %s:%d: check failed: %s: ",\
                    __FILE__, __LINE__, #cond);                              \
            fprintf(stderr, __VA_ARGS__);                                    \
            fputc('\n', stderr);                                             \
            abort();                                                         \
        }                                                                    \
    } while (0)

/* A decoder that fails must say why. */
#define HAS_MSG(err) ((err) && *error_get_pretty(err))
#define MSG(err) ((err) ? error_get_pretty(err) : "(no message)")

/* The peer's bytes, read exactly as the migration stream hands them out. */
typedef struct Stream {
    const uint8_t *p;
    size_t left;
    size_t reads;
} Stream;

static bool stream_read(void *opaque, void *buf, size_t len)
{
    Stream *s = opaque;

    s->reads++;
    if (s->left < len) {
        /* Like qemu_get_buffer() at EOF: what is there is consumed. */
        s->p += s->left;
        s->left = 0;
        return false;
    }
    memcpy(buf, s->p, len);
    s->p += len;
    s->left -= len;
    return true;
}

static uint64_t be64(const uint8_t *b)
{
    uint64_t v = 0;
    int i;

    for (i = 0; i < 8; i++) {
        v = (v << 8) | b[i];
    }
    return v;
}

static bool id_ok(const char *id)
{
    size_t len = strnlen(id, NAS_DEDUP_ID_MAX + 1), i;

    if (len < 1 || len > NAS_DEDUP_ID_MAX) {
        return false;
    }
    for (i = 0; i < len; i++) {
        if (id[i] < 0x20 || id[i] > 0x7e) {
            return false;
        }
    }
    return true;
}

/* The rules a decoded record must satisfy (nas-dedup-wire.h). */
static void check_record_rules(const NasDedupRecord *r)
{
    switch (r->type) {
    case NAS_DEDUP_REC_DRIVE:
        CHECK(r->drive <= NAS_DEDUP_MAX_DRIVES, "drive %u", r->drive);
        CHECK(id_ok(r->id), "DRIVE id not printable");
        CHECK(r->disk_size <= NAS_DEDUP_MAX_OFFSET, "disk size %" PRIu64,
              r->disk_size);
        break;
    case NAS_DEDUP_REC_REFS:
        CHECK(r->drive <= NAS_DEDUP_MAX_DRIVES, "drive %u", r->drive);
        CHECK(r->npages >= 1 && r->npages <= NAS_DEDUP_REFS_MAX,
              "npages %u", r->npages);
        CHECK(r->disk_offset % NAS_DEDUP_SECTOR == 0 &&
              r->disk_offset < NAS_DEDUP_MAX_OFFSET,
              "disk offset 0x%" PRIx64, r->disk_offset);
        break;
    case NAS_DEDUP_REC_SYNC:
        /* Only a final SYNC may be the lazy one. */
        CHECK(r->final || !r->lazy, "lazy SYNC that is not final");
        break;
    case NAS_DEDUP_REC_SETUP:
        CHECK(r->version == NAS_DEDUP_WIRE_VERSION, "version %u", r->version);
        break;
    default:
        CHECK(false, "decoded a record of unknown type %u", r->type);
    }
}

static bool record_equal(const NasDedupRecord *a, const NasDedupRecord *b)
{
    if (a->type != b->type) {
        return false;
    }
    switch (a->type) {
    case NAS_DEDUP_REC_DRIVE:
        return a->drive == b->drive && !strcmp(a->id, b->id) &&
               a->disk_size == b->disk_size;
    case NAS_DEDUP_REC_REFS:
        return a->drive == b->drive && a->npages == b->npages &&
               a->disk_offset == b->disk_offset &&
               !memcmp(a->hash, b->hash, a->npages * sizeof(a->hash[0]));
    case NAS_DEDUP_REC_SYNC:
        return a->seq == b->seq && a->final == b->final &&
               a->lazy == b->lazy;
    case NAS_DEDUP_REC_SETUP:
        return a->version == b->version && a->resend_msg == b->resend_msg &&
               a->sync_ack_msg == b->sync_ack_msg &&
               a->progress_msg == b->progress_msg &&
               !memcmp(a->key.secret, b->key.secret, sizeof(a->key.secret));
    default:
        return false;
    }
}

/*
 * Decode one record from @s into @rec (exactly sized on the heap, so that
 * ASan sees any write past it).  On success, check it and its round trip.
 */
static bool decode_one(Stream *s, NasDedupRecord *rec)
{
    const uint8_t *start = s->p;
    Error *err = NULL;
    bool ok;

    memset(rec, 0, sizeof(*rec));
    ok = nas_dedup_record_decode(stream_read, s, rec, &err);
    if (!ok) {
        CHECK(HAS_MSG(err), "decode failed without a message");
        error_free(err);
        err = NULL;
        return false;
    }
    CHECK(err == NULL, "decode succeeded with message '%s'", MSG(err));
    check_record_rules(rec);

    {
        size_t consumed = s->p - start;
        GByteArray *a = g_byte_array_new();
        NasDedupRecord *again = g_new0(NasDedupRecord, 1);
        Stream s2;

        nas_dedup_record_encode(a, rec);
        CHECK(a->len == consumed && !memcmp(a->data, start, consumed),
              "record type %u: decoded %zu bytes, re-encodes to %u "
              "different bytes (non-canonical encoding accepted?)",
              rec->type, consumed, a->len);
        s2 = (Stream){ a->data, a->len, 0 };
        ok = nas_dedup_record_decode(stream_read, &s2, again, &err);
        CHECK(ok, "re-encoded record type %u does not decode: %s", rec->type,
              MSG(err));
        CHECK(err == NULL && s2.left == 0,
              "re-decode left %zu bytes", s2.left);
        CHECK(record_equal(rec, again), "record type %u differs after a "
              "round trip", rec->type);
        g_free(again);
        g_byte_array_free(a, true);
    }
    return true;
}

static void fuzz_records(const uint8_t *data, size_t size)
{
    NasDedupRecord *rec = malloc(sizeof(*rec));
    Stream s = { data, size, 0 };

    while (s.left && decode_one(&s, rec)) {
        /* next record */
    }
    free(rec);
}

static void fuzz_refs_check(const uint8_t *data, size_t size)
{
    NasDedupRecord *rec;
    uint64_t page_offset, ram_len, disk_len;
    Stream s;

    if (size < 24) {
        return;
    }
    page_offset = be64(data);
    ram_len = be64(data + 8);
    disk_len = be64(data + 16);
    s = (Stream){ data + 24, size - 24, 0 };
    rec = malloc(sizeof(*rec));
    if (decode_one(&s, rec) && rec->type == NAS_DEDUP_REC_REFS) {
        unsigned __int128 run = (unsigned __int128)rec->npages *
                                NAS_DEDUP_CHUNK;
        bool want = page_offset + run <= ram_len &&
                    rec->disk_offset + run <= disk_len;
        Error *err = NULL;
        bool ok = nas_dedup_refs_check(rec, page_offset, ram_len, disk_len,
                                       &err);

        CHECK(ok == want, "refs_check(npages %u, disk 0x%" PRIx64
              ", page 0x%" PRIx64 ", ram 0x%" PRIx64 ", disk_len 0x%" PRIx64
              ") = %d, expected %d", rec->npages, rec->disk_offset,
              page_offset, ram_len, disk_len, ok, want);
        CHECK(ok ? err == NULL : HAS_MSG(err), "refs_check error message");
        if (!ok) {
            error_free(err);
            err = NULL;
        }
    }
    free(rec);
}

static void fuzz_resend(const uint8_t *data, size_t size)
{
    NasDedupResend *r = malloc(sizeof(*r)), *again;
    Error *err = NULL;
    GByteArray *a;

    memset(r, 0, sizeof(*r));
    if (!nas_dedup_resend_decode(data, size, r, &err)) {
        CHECK(HAS_MSG(err), "RESEND decode failed without a message");
        error_free(err);
        err = NULL;
        free(r);
        return;
    }
    CHECK(err == NULL, "RESEND decode succeeded with message '%s'", MSG(err));
    CHECK(id_ok(r->id), "RESEND id not printable");
    CHECK(r->npages >= 1 && r->npages <= NAS_DEDUP_REFS_MAX, "RESEND npages %u",
          r->npages);

    a = g_byte_array_new();
    nas_dedup_resend_encode(a, r);
    CHECK(a->len == size && !memcmp(a->data, data, size),
          "RESEND of %zu bytes re-encodes to %u different bytes", size, a->len);
    again = g_new0(NasDedupResend, 1);
    CHECK(nas_dedup_resend_decode(a->data, a->len, again, &err),
          "re-encoded RESEND does not decode: %s", MSG(err));
    CHECK(err == NULL, "RESEND re-decode message");
    CHECK(!strcmp(r->id, again->id) && r->offset == again->offset &&
          r->npages == again->npages, "RESEND differs after a round trip");
    g_free(again);
    g_byte_array_free(a, true);
    free(r);
}

static void fuzz_sync_ack(const uint8_t *data, size_t size)
{
    uint32_t seq, resends, seq2, resends2;
    Error *err = NULL;
    GByteArray *a;

    if (!nas_dedup_sync_ack_decode(data, size, &seq, &resends, &err)) {
        CHECK(HAS_MSG(err), "SYNC_ACK decode failed without a message");
        error_free(err);
        err = NULL;
        return;
    }
    CHECK(err == NULL, "SYNC_ACK decode succeeded with message '%s'", MSG(err));
    a = g_byte_array_new();
    nas_dedup_sync_ack_encode(a, seq, resends);
    CHECK(a->len == size && !memcmp(a->data, data, size),
          "SYNC_ACK of %zu bytes re-encodes to %u different bytes", size,
          a->len);
    CHECK(nas_dedup_sync_ack_decode(a->data, a->len, &seq2, &resends2, &err),
          "re-encoded SYNC_ACK does not decode: %s", MSG(err));
    CHECK(err == NULL && seq == seq2 && resends == resends2,
          "SYNC_ACK differs after a round trip");
    g_byte_array_free(a, true);
}

static void fuzz_progress(const uint8_t *data, size_t size)
{
    NasDedupProgress p, p2;
    Error *err = NULL;
    GByteArray *a;

    if (!nas_dedup_progress_decode(data, size, &p, &err)) {
        CHECK(HAS_MSG(err), "PROGRESS decode failed without a message");
        error_free(err);
        err = NULL;
        return;
    }
    CHECK(err == NULL, "PROGRESS decode succeeded with message '%s'",
          MSG(err));
    a = g_byte_array_new();
    nas_dedup_progress_encode(a, &p);
    CHECK(a->len == size && !memcmp(a->data, data, size),
          "PROGRESS of %zu bytes re-encodes to %u different bytes", size,
          a->len);
    CHECK(nas_dedup_progress_decode(a->data, a->len, &p2, &err) &&
          !memcmp(&p, &p2, sizeof(p)), "PROGRESS differs after a round trip");
    g_byte_array_free(a, true);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) {
        return 0;
    }
    switch (data[0] % 5) {
    case 0:
        fuzz_records(data + 1, size - 1);
        break;
    case 1:
        fuzz_refs_check(data + 1, size - 1);
        break;
    case 2:
        fuzz_resend(data + 1, size - 1);
        break;
    case 3:
        fuzz_sync_ack(data + 1, size - 1);
        break;
    case 4:
        fuzz_progress(data + 1, size - 1);
        break;
    }
    return 0;
}
