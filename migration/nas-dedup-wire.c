/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas: wire records (see nas-dedup-wire.h for the format)
 */
#include "qemu/osdep.h"
#include "qemu/bswap.h"
#include "qapi/error.h"
#include "nas-dedup-wire.h"

static void put_u8(GByteArray *out, uint8_t v)
{
    g_byte_array_append(out, &v, 1);
}

static void put_be16(GByteArray *out, uint16_t v)
{
    uint8_t b[2];

    stw_be_p(b, v);
    g_byte_array_append(out, b, sizeof(b));
}

static void put_be32(GByteArray *out, uint32_t v)
{
    uint8_t b[4];

    stl_be_p(b, v);
    g_byte_array_append(out, b, sizeof(b));
}

static void put_be64(GByteArray *out, uint64_t v)
{
    uint8_t b[8];

    stq_be_p(b, v);
    g_byte_array_append(out, b, sizeof(b));
}

static void put_id(GByteArray *out, const char *id)
{
    size_t len = strlen(id);

    assert(len >= 1 && len <= NAS_DEDUP_ID_MAX);
    put_u8(out, len);
    g_byte_array_append(out, (const guint8 *)id, len);
}

/* A bounded cursor over a byte buffer, used for return-path payloads. */
typedef struct Cursor {
    const uint8_t *p;
    size_t left;
} Cursor;

static bool cursor_read(void *opaque, void *buf, size_t len)
{
    Cursor *c = opaque;

    if (c->left < len) {
        return false;
    }
    memcpy(buf, c->p, len);
    c->p += len;
    c->left -= len;
    return true;
}

static bool id_valid(const char *id, size_t len)
{
    size_t i;

    for (i = 0; i < len; i++) {
        if (id[i] < 0x20 || id[i] > 0x7e) {
            return false;
        }
    }
    return len > 0;
}

/* Read a u8 length + id; @what names the id in messages. */
static bool read_id(NasDedupReadFn read, void *opaque, char *id,
                    const char *what, Error **errp)
{
    uint8_t len;

    if (!read(opaque, &len, 1) || !read(opaque, id, len)) {
        error_setg(errp, "truncated %s", what);
        return false;
    }
    id[len] = '\0';
    if (!id_valid(id, len)) {
        error_setg(errp, "invalid %s (empty or not printable)", what);
        return false;
    }
    return true;
}

void nas_dedup_record_encode(GByteArray *out, const NasDedupRecord *rec)
{
    uint32_t k;

    put_u8(out, rec->type);
    switch (rec->type) {
    case NAS_DEDUP_REC_DRIVE:
        put_be16(out, rec->drive);
        put_id(out, rec->id);
        put_be64(out, rec->disk_size);
        break;
    case NAS_DEDUP_REC_REFS:
        assert(rec->npages >= 1 && rec->npages <= NAS_DEDUP_REFS_MAX);
        put_be16(out, rec->drive);
        put_be16(out, rec->npages);
        put_be64(out, rec->disk_offset);
        for (k = 0; k < rec->npages; k++) {
            put_be64(out, rec->hash[k].hi);
            put_be64(out, rec->hash[k].lo);
        }
        break;
    case NAS_DEDUP_REC_SYNC:
        put_be32(out, rec->seq);
        assert(rec->final || !rec->lazy);
        put_u8(out, !rec->final ? NAS_DEDUP_SYNC_LIVE :
                    rec->lazy ? NAS_DEDUP_SYNC_LAZY : NAS_DEDUP_SYNC_FINAL);
        break;
    case NAS_DEDUP_REC_SETUP:
        put_u8(out, rec->version);
        put_be16(out, rec->resend_msg);
        put_be16(out, rec->sync_ack_msg);
        put_be16(out, rec->progress_msg);
        put_be16(out, sizeof(rec->key.secret));
        g_byte_array_append(out, (const guint8 *)rec->key.secret,
                            sizeof(rec->key.secret));
        break;
    default:
        g_assert_not_reached();
    }
}

bool nas_dedup_record_decode(NasDedupReadFn read, void *opaque,
                             NasDedupRecord *rec, Error **errp)
{
    uint8_t b[16];
    uint32_t k;

    if (!read(opaque, b, 1)) {
        error_setg(errp, "truncated record: no type");
        return false;
    }
    rec->type = b[0];
    switch (rec->type) {
    case NAS_DEDUP_REC_DRIVE:
        if (!read(opaque, b, 2)) {
            error_setg(errp, "truncated DRIVE record");
            return false;
        }
        rec->drive = lduw_be_p(b);
        if (rec->drive > NAS_DEDUP_MAX_DRIVES) {
            error_setg(errp, "DRIVE record: drive number %u out of range",
                       rec->drive);
            return false;
        }
        if (!read_id(read, opaque, rec->id, "DRIVE record id", errp)) {
            return false;
        }
        if (!read(opaque, b, 8)) {
            error_setg(errp, "truncated DRIVE record");
            return false;
        }
        rec->disk_size = ldq_be_p(b);
        if (rec->disk_size > NAS_DEDUP_MAX_OFFSET) {
            error_setg(errp, "DRIVE record: absurd disk size %" PRIu64,
                       rec->disk_size);
            return false;
        }
        return true;
    case NAS_DEDUP_REC_REFS:
        if (!read(opaque, b, 12)) {
            error_setg(errp, "truncated REFS record");
            return false;
        }
        rec->drive = lduw_be_p(b);
        rec->npages = lduw_be_p(b + 2);
        rec->disk_offset = ldq_be_p(b + 4);
        if (rec->drive > NAS_DEDUP_MAX_DRIVES) {
            error_setg(errp, "REFS record: drive number %u out of range",
                       rec->drive);
            return false;
        }
        if (rec->npages < 1 || rec->npages > NAS_DEDUP_REFS_MAX) {
            error_setg(errp, "REFS record: run of %u pages "
                       "(1..%u allowed)", rec->npages,
                       NAS_DEDUP_REFS_MAX);
            return false;
        }
        if (!QEMU_IS_ALIGNED(rec->disk_offset, NAS_DEDUP_SECTOR) ||
            rec->disk_offset >= NAS_DEDUP_MAX_OFFSET) {
            error_setg(errp, "REFS record: bad disk offset 0x%" PRIx64,
                       rec->disk_offset);
            return false;
        }
        for (k = 0; k < rec->npages; k++) {
            if (!read(opaque, b, 16)) {
                error_setg(errp, "truncated REFS record: %u of %u hashes",
                           k, rec->npages);
                return false;
            }
            rec->hash[k].hi = ldq_be_p(b);
            rec->hash[k].lo = ldq_be_p(b + 8);
        }
        return true;
    case NAS_DEDUP_REC_SYNC:
        if (!read(opaque, b, 5)) {
            error_setg(errp, "truncated SYNC record");
            return false;
        }
        rec->seq = (uint32_t)ldl_be_p(b);
        if (b[4] > NAS_DEDUP_SYNC_LAZY) {
            error_setg(errp, "SYNC record: bad final flag %u", b[4]);
            return false;
        }
        rec->final = b[4] != NAS_DEDUP_SYNC_LIVE;
        rec->lazy = b[4] == NAS_DEDUP_SYNC_LAZY;
        return true;
    case NAS_DEDUP_REC_SETUP:
        if (!read(opaque, b, 9)) {
            error_setg(errp, "truncated SETUP record");
            return false;
        }
        rec->version = b[0];
        rec->resend_msg = lduw_be_p(b + 1);
        rec->sync_ack_msg = lduw_be_p(b + 3);
        rec->progress_msg = lduw_be_p(b + 5);
        if (rec->version != NAS_DEDUP_WIRE_VERSION) {
            error_setg(errp, "SETUP record: protocol version %u, this "
                       "QEMU speaks version %u", rec->version,
                       NAS_DEDUP_WIRE_VERSION);
            return false;
        }
        if (lduw_be_p(b + 7) != sizeof(rec->key.secret)) {
            error_setg(errp, "SETUP record: key of %u bytes (%zu "
                       "expected)", (unsigned)lduw_be_p(b + 7),
                       sizeof(rec->key.secret));
            return false;
        }
        if (!read(opaque, rec->key.secret, sizeof(rec->key.secret))) {
            error_setg(errp, "truncated SETUP record");
            return false;
        }
        return true;
    default:
        error_setg(errp, "unknown record type %u", rec->type);
        return false;
    }
}

bool nas_dedup_refs_check(const NasDedupRecord *rec, uint64_t page_offset,
                          uint64_t ram_len, uint64_t disk_len, Error **errp)
{
    uint64_t run = (uint64_t)rec->npages * NAS_DEDUP_CHUNK;

    if (page_offset > ram_len || run > ram_len - page_offset) {
        error_setg(errp, "REFS record: pages 0x%" PRIx64 "+0x%" PRIx64
                   " outside RAMBlock of 0x%" PRIx64 " bytes",
                   page_offset, run, ram_len);
        return false;
    }
    if (rec->disk_offset > disk_len || run > disk_len - rec->disk_offset) {
        error_setg(errp, "REFS record: disk range 0x%" PRIx64 "+0x%"
                   PRIx64 " past the end of drive %u (0x%" PRIx64
                   " bytes)", rec->disk_offset, run, rec->drive,
                   disk_len);
        return false;
    }
    return true;
}

void nas_dedup_resend_encode(GByteArray *out, const NasDedupResend *r)
{
    put_id(out, r->id);
    put_be64(out, r->offset);
    put_be32(out, r->npages);
    put_be32(out, r->refs_seq);
}

bool nas_dedup_resend_decode(const uint8_t *buf, size_t len,
                             NasDedupResend *r, Error **errp)
{
    Cursor c = { buf, len };
    uint8_t b[16];

    if (!read_id(cursor_read, &c, r->id, "RESEND RAMBlock id", errp)) {
        return false;
    }
    if (!cursor_read(&c, b, 16) || c.left) {
        error_setg(errp, "RESEND message of %zu bytes is malformed", len);
        return false;
    }
    r->offset = ldq_be_p(b);
    r->npages = (uint32_t)ldl_be_p(b + 8);
    r->refs_seq = (uint32_t)ldl_be_p(b + 12);
    if (r->npages < 1 || r->npages > NAS_DEDUP_REFS_MAX) {
        error_setg(errp, "RESEND message: %u pages", r->npages);
        return false;
    }
    if (!r->refs_seq || r->refs_seq == UINT32_MAX) {
        error_setg(errp, "RESEND message: REFS record number %u",
                   r->refs_seq);
        return false;
    }
    return true;
}

void nas_dedup_sync_ack_encode(GByteArray *out, uint32_t seq,
                               uint32_t pending)
{
    put_be32(out, seq);
    put_be32(out, pending);
}

bool nas_dedup_sync_ack_decode(const uint8_t *buf, size_t len,
                               uint32_t *seq, uint32_t *pending, Error **errp)
{
    if (len != 8) {
        error_setg(errp, "SYNC_ACK message of %zu bytes (8 expected)",
                   len);
        return false;
    }
    *seq = (uint32_t)ldl_be_p(buf);
    *pending = (uint32_t)ldl_be_p(buf + 4);
    return true;
}

void nas_dedup_progress_encode(GByteArray *out, const NasDedupProgress *p)
{
    put_be64(out, p->refs_done);
    put_be64(out, p->fetched_bytes);
    put_be64(out, p->fetch_busy_us);
}

bool nas_dedup_progress_decode(const uint8_t *buf, size_t len,
                               NasDedupProgress *p, Error **errp)
{
    if (len != 24) {
        error_setg(errp, "PROGRESS message of %zu bytes (24 expected)", len);
        return false;
    }
    p->refs_done = ldq_be_p(buf);
    p->fetched_bytes = ldq_be_p(buf + 8);
    p->fetch_busy_us = ldq_be_p(buf + 16);
    return true;
}
