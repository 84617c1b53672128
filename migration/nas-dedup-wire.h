/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas: wire records
 *
 * In the RAM stream, a record is a page header with RAM_SAVE_FLAG_DEDUP
 * (naming a RAMBlock and a page in it, as for any page) followed by:
 *
 *   u8 type
 *   SETUP: u8 version, be16 resend_msg, be16 sync_ack_msg,
 *          be16 progress_msg, be16 key_len, key_len bytes key
 *          Sent once, before the first REFS record.  @version is
 *          NAS_DEDUP_WIRE_VERSION; the destination refuses any other.
 *          @resend_msg, @sync_ack_msg and @progress_msg are the
 *          return-path message numbers the source expects RESEND,
 *          SYNC_ACK and PROGRESS under (the destination uses them, so the
 *          two sides need not agree on the numbering at build time).
 *          @key is the secret of the keyed hash (NAS_DEDUP_KEY_SIZE
 *          bytes) that REFS hashes are computed with.
 *   DRIVE: be16 drive, u8 id_len, id_len bytes id, be64 disk_size
 *          Defines drive number @drive for later REFS records: the drive is
 *          the guest device whose id (qdev id or QOM path) is @id.
 *   REFS:  be16 drive, be16 npages, be64 disk_offset,
 *          npages x (be64 hash_hi, be64 hash_lo)
 *          Page k of the run (k = 0..npages-1) at the header's page address
 *          + k x 4 KiB holds the 4 KiB at disk_offset + k x 4 KiB of the
 *          drive, whose keyed hash (two XXH3-64 under SETUP's key) is
 *          hash k.  @disk_offset is a multiple of 512 (since version 3:
 *          a guest page may start at any sector of its disk).  The n-th
 *          REFS record of a migration has the sequence number n
 *          (nas_dedup_refs_seq_next()), which RESEND names.
 *   SYNC:  be32 seq, u8 final
 *          Asks the destination to resolve every reference it has and to
 *          answer SYNC_ACK(seq) on the return path after any RESEND.
 *          @final 1: the last SYNC, no REFS after it.  @final 2
 *          (NAS_DEDUP_SYNC_LAZY, since version 4): the last SYNC, right
 *          before postcopy starts; the references still unresolved are
 *          filled once the destination listens, and SYNC_ACK(seq) comes
 *          when every one is placed or asked again.  Since version 6,
 *          the source may meanwhile send pages still to fill (the meet),
 *          and the destination places whichever copy comes first, once.
 *
 * On the return path (destination to source):
 *   RESEND:   u8 id_len, id, be64 offset, be32 npages, be32 refs_seq
 *             (RAMBlock pages, sent as references by the REFS record
 *             numbered @refs_seq; since version 5)
 *   SYNC_ACK: be32 seq, be32 pending (pages asked again, not received yet)
 *   PROGRESS: be64 refs_done, be64 fetched_bytes, be64 fetch_busy_us
 *             (pages of references whose read is over, bytes read from
 *             the drives, time with reads in flight; all since the
 *             migration started, never decreasing)
 *
 * This file needs no QEMU: it is unit-tested standalone.
 */
#ifndef MIGRATION_NAS_DEDUP_WIRE_H
#define MIGRATION_NAS_DEDUP_WIRE_H

#include "migration/nas-dedup-index.h"

typedef struct Error Error;

enum {
    NAS_DEDUP_REC_DRIVE = 1,
    NAS_DEDUP_REC_REFS = 2,
    NAS_DEDUP_REC_SYNC = 3,
    NAS_DEDUP_REC_SETUP = 4,
};

#define NAS_DEDUP_WIRE_VERSION 6

/* SYNC's final byte */
#define NAS_DEDUP_SYNC_LIVE     0
#define NAS_DEDUP_SYNC_FINAL    1
#define NAS_DEDUP_SYNC_LAZY     2

#define NAS_DEDUP_REFS_MAX     256     /* pages in one REFS run */
/* NAS_DEDUP_ID_MAX (nas-dedup-index.h) bounds drive and RAMBlock ids. */

typedef struct NasDedupRecord {
    uint8_t type;
    uint16_t drive;                     /* DRIVE, REFS */
    char id[NAS_DEDUP_ID_MAX + 1];      /* DRIVE */
    uint64_t disk_size;                 /* DRIVE */
    uint32_t npages;                    /* REFS */
    uint64_t disk_offset;               /* REFS */
    uint32_t seq;                       /* SYNC */
    bool final;                         /* SYNC */
    bool lazy;                          /* SYNC, final only */
    uint8_t version;                    /* SETUP */
    uint16_t resend_msg;                /* SETUP */
    uint16_t sync_ack_msg;              /* SETUP */
    uint16_t progress_msg;              /* SETUP */
    NasDedupKey key;                    /* SETUP */
    NasDedupHash hash[NAS_DEDUP_REFS_MAX]; /* REFS */
} NasDedupRecord;

/* What the destination's reads have done so far (PROGRESS). */
typedef struct NasDedupProgress {
    uint64_t refs_done;
    uint64_t fetched_bytes;
    uint64_t fetch_busy_us;
} NasDedupProgress;

typedef struct NasDedupResend {
    char id[NAS_DEDUP_ID_MAX + 1];      /* RAMBlock idstr */
    uint64_t offset;
    uint32_t npages;
    uint32_t refs_seq;                  /* the REFS record they came in */
} NasDedupResend;

/*
 * The sequence number of the REFS record after the one numbered @seq (0
 * before the first): 1, 2, ... UINT32_MAX - 1, then 1 again.
 */
static inline uint32_t nas_dedup_refs_seq_next(uint32_t seq)
{
    return seq + 1 == UINT32_MAX ? 1 : seq + 1;
}

/* Reads exactly @len bytes into @buf; returns false on EOF or error. */
typedef bool (*NasDedupReadFn)(void *opaque, void *buf, size_t len);

/* Append the encoding of @rec (everything after the page header). */
void nas_dedup_record_encode(GByteArray *out, const NasDedupRecord *rec);

/*
 * Decode one record through @read.  Returns false with @errp set to a
 * message naming what is wrong for a truncated or malformed record.
 * Checks only what the record itself says; see nas_dedup_refs_check().
 */
bool nas_dedup_record_decode(NasDedupReadFn read, void *opaque,
                             NasDedupRecord *rec, Error **errp);

/*
 * Check a REFS record against its surroundings: the run of pages starting
 * at @page_offset must fit the RAMBlock's @ram_len, and the disk range must
 * fit the drive's @disk_len (the smaller of what both sides know).
 */
bool nas_dedup_refs_check(const NasDedupRecord *rec, uint64_t page_offset,
                          uint64_t ram_len, uint64_t disk_len, Error **errp);

void nas_dedup_resend_encode(GByteArray *out, const NasDedupResend *r);
bool nas_dedup_resend_decode(const uint8_t *buf, size_t len,
                             NasDedupResend *r, Error **errp);
void nas_dedup_sync_ack_encode(GByteArray *out, uint32_t seq,
                               uint32_t pending);
bool nas_dedup_sync_ack_decode(const uint8_t *buf, size_t len,
                               uint32_t *seq, uint32_t *pending,
                               Error **errp);
void nas_dedup_progress_encode(GByteArray *out, const NasDedupProgress *p);
bool nas_dedup_progress_decode(const uint8_t *buf, size_t len,
                               NasDedupProgress *p, Error **errp);

#endif
