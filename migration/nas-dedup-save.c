/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas: source side
 *
 * ram.c offers each page it would send in full; a page whose content the
 * index finds on a drive becomes part of a run of references (consecutive
 * pages of one RAMBlock backed by consecutive blocks of one drive) that is
 * written as one REFS record.  At switchover, SYNC records and the
 * destination's answers on the return path make sure that every reference
 * was verified, and that every page it could not verify was sent again.
 */
#include "qemu/osdep.h"
#include "qemu/bitmap.h"
#include "qemu/cutils.h"
#include "qemu/error-report.h"
#include "qemu/rcu.h"
#include "qapi/error.h"
#include "io/channel.h"
#include "exec/target_page.h"
#include "migration.h"
#include "qemu-file.h"
#include "ram.h"
#include "nas-dedup.h"
#include "nas-dedup-wire.h"
#include "options.h"
#include "trace.h"

/* How long the stopped source waits for the destination's answer. */
#define NAS_DEDUP_SYNC_TIMEOUT_MS (120 * 1000)
/* Rounds of "resend, sync again" before giving up. */
#define NAS_DEDUP_SYNC_ROUNDS 16
/*
 * Live SYNCs before switchover gives up waiting for a small backlog (the
 * guest keeps the destination busy); the final SYNC still resolves all.
 */
#define NAS_DEDUP_LIVE_SYNCS 8
/* How long one switchover check waits for an answer, not to spin. */
#define NAS_DEDUP_LIVE_WAIT_MS 20

static struct {
    /* The pending run of references; migration thread only. */
    NasDedupRecord run;
    RAMBlock *run_block;
    ram_addr_t run_offset;
    QEMUFile *f;
    NasDedupPutHeader put_header;
    void *opaque;

    unsigned long *drive_sent;      /* DRIVE records sent, by drive */
    bool any_refs;
    bool injected;
    uint32_t seq;
    unsigned rounds;

    /* Pages the destination asked again: send them in full.  */
    QemuMutex noref_lock;
    GHashTable *noref;              /* RAMBlock * -> unsigned long bitmap */
    /*
     * Of those, the ones not dirtied again yet (NasDedupResend).  The return
     * path thread must not take the bitmap mutex: the migration thread holds
     * it while it blocks sending to a destination that may itself be blocked
     * sending on the return path.  The migration thread dirties them.
     */
    GArray *redirty;

    /* SYNC_ACK from the return path thread. */
    QemuSemaphore ack_sem;
    uint32_t acked_seq;
    uint32_t acked_pending;

    /*
     * Live SYNC: before switchover, while the guest still runs, let the
     * destination catch up with its reads, so that the stopped guest only
     * waits for the references of the last round.  Migration thread only.
     */
    uint64_t resolved_mark;         /* ref-pages when the acked SYNC went */
    uint32_t live_seq;              /* live SYNC in flight, or 0 */
    uint64_t live_mark;
    unsigned live_syncs;
    bool want_live_sync;
} save;

static GByteArray *nas_dedup_buf(void)
{
    static __thread GByteArray *buf;

    if (!buf) {
        buf = g_byte_array_sized_new(16 + 16 * NAS_DEDUP_REFS_MAX);
    }
    g_byte_array_set_size(buf, 0);
    return buf;
}

static size_t put_record(RAMBlock *block, ram_addr_t offset,
                         const NasDedupRecord *rec)
{
    GByteArray *buf = nas_dedup_buf();
    size_t len;

    len = save.put_header(save.opaque, save.f, block,
                          offset | RAM_SAVE_FLAG_DEDUP);
    nas_dedup_record_encode(buf, rec);
    qemu_put_buffer(save.f, buf->data, buf->len);
    len += buf->len;
    ram_transferred_add(len);
    return len;
}

int nas_dedup_save_setup(Error **errp)
{
    if (migrate_rdma()) {
        error_setg(errp, "Capability 'dedup-nas' is not compatible with "
                   "RDMA migration");
        return -1;
    }
    memset(&save.run, 0, sizeof(save.run));
    save.run_block = NULL;
    save.f = NULL;
    save.any_refs = false;
    save.injected = false;
    save.seq = 0;
    save.rounds = 0;
    nas_dedup_stats_reset(false);
    if (!migrate_get_current()->rp_state.rp_thread_created) {
        /*
         * No destination to read the disks and answer (savevm, a snapshot
         * to a file): send every page in full.
         */
        return 0;
    }
    /*
     * SYNC is a small record that the guest, stopped, waits on: do not let
     * Nagle hold it back behind unacknowledged stream data.
     */
    if (migrate_get_current()->to_dst_file) {
        qio_channel_set_delay(
            qemu_file_get_ioc(migrate_get_current()->to_dst_file), false);
    }
    save.drive_sent = bitmap_new(NAS_DEDUP_MAX_DRIVES + 1);
    qemu_mutex_init(&save.noref_lock);
    save.noref = g_hash_table_new_full(NULL, NULL, NULL, g_free);
    save.redirty = g_array_new(false, false, sizeof(NasDedupResend));
    qemu_sem_init(&save.ack_sem, 0);
    save.acked_seq = 0;
    save.acked_pending = 0;
    save.resolved_mark = 0;
    save.live_seq = 0;
    save.live_mark = 0;
    save.live_syncs = 0;
    save.want_live_sync = false;
    return 0;
}

void nas_dedup_save_cleanup(void)
{
    if (!save.noref) {
        return;
    }
    g_free(save.drive_sent);
    save.drive_sent = NULL;
    g_hash_table_destroy(save.noref);
    save.noref = NULL;
    g_array_free(save.redirty, true);
    save.redirty = NULL;
    qemu_mutex_destroy(&save.noref_lock);
    qemu_sem_destroy(&save.ack_sem);
}

/*
 * Test knob: send the run malformed, once, in the way @how says (see
 * NasDedupInject).  The destination must reject it; the source then goes
 * on running.
 */
typedef enum NasDedupInject {
    INJECT_NONE,
    INJECT_OUTSIDE_RAM,         /* run extends past the RAMBlock */
    INJECT_UNDEFINED_DRIVE,     /* drive number never defined */
    INJECT_UNKNOWN_DRIVE,       /* DRIVE id the destination lacks */
    INJECT_PAST_DISK_END,       /* disk range past the end of the drive */
    INJECT_BAD_TYPE,            /* unknown record type */
    INJECT_ABSURD_RUN,          /* run longer than allowed */
    INJECT_TRUNCATED,           /* stream ends inside the record */
} NasDedupInject;

static bool inject_malformed(void)
{
    MigrationState *s = migrate_get_current();
    g_autofree NasDedupRecord *rec = NULL;
    GByteArray *buf;
    ram_addr_t offset = save.run_offset;
    uint32_t how = s->dedup_nas_inject;

    if (!how || save.injected) {
        return false;
    }
    save.injected = true;
    rec = g_memdup2(&save.run, sizeof(save.run));
    switch (how) {
    case INJECT_OUTSIDE_RAM:
        offset = save.run_block->used_length - NAS_DEDUP_CHUNK;
        rec->npages = 2;
        break;
    case INJECT_UNDEFINED_DRIVE:
        rec->drive = NAS_DEDUP_MAX_DRIVES;
        break;
    case INJECT_UNKNOWN_DRIVE:
        rec->type = NAS_DEDUP_REC_DRIVE;
        rec->drive = NAS_DEDUP_MAX_DRIVES - 1;
        pstrcpy(rec->id, sizeof(rec->id), "no-such-drive");
        put_record(save.run_block, offset, rec);
        rec->type = NAS_DEDUP_REC_REFS;
        break;
    case INJECT_PAST_DISK_END:
        rec->disk_offset = NAS_DEDUP_MAX_OFFSET - NAS_DEDUP_CHUNK;
        break;
    default:
        /* Raw bytes: a type or a length no encoder would write. */
        save.put_header(save.opaque, save.f, save.run_block,
                        offset | RAM_SAVE_FLAG_DEDUP);
        buf = nas_dedup_buf();
        nas_dedup_record_encode(buf, rec);
        if (how == INJECT_BAD_TYPE) {
            buf->data[0] = 0x7f;
        } else if (how == INJECT_ABSURD_RUN) {
            buf->data[3] = 0xff;        /* npages = 0xffxx */
        } else {
            /*
             * Truncated: half a record, then the stream ends.  Flush first:
             * once the file has an error, nothing buffered goes out.
             */
            qemu_put_buffer(save.f, buf->data, buf->len / 2);
            qemu_fflush(save.f);
            qemu_file_set_error(save.f, -EIO);
            return true;
        }
        qemu_put_buffer(save.f, buf->data, buf->len);
        return true;
    }
    put_record(save.run_block, offset, rec);
    return true;
}

/* Send the pending run; the bitmap mutex may be held. */
static int flush_run(void)
{
    size_t len;

    if (!save.run.npages) {
        return 0;
    }
    if (unlikely(inject_malformed())) {
        save.run.npages = 0;
        return qemu_file_get_error(save.f);
    }
    trace_nas_dedup_save_refs(save.run_block->idstr, save.run_offset,
                              save.run.drive, save.run.disk_offset,
                              save.run.npages);
    len = put_record(save.run_block, save.run_offset, &save.run);
    stat64_add(&nas_dedup_counters.ref_pages, save.run.npages);
    stat64_add(&nas_dedup_counters.ref_bytes, len);
    save.run.npages = 0;
    return qemu_file_get_error(save.f);
}

/*
 * Dirty again the pages the destination asked for since the last call,
 * unless they were sent in full meanwhile.  Returns how many pages it
 * dirtied.  Migration thread, without the bitmap mutex (which is taken
 * before noref_lock).
 */
static int redirty_requested(Error **errp)
{
    g_autoptr(GArray) asked = NULL;
    g_autoptr(GArray) todo = g_array_new(false, false, sizeof(NasDedupResend));
    int pages = 0;
    guint i;

    if (!save.noref) {
        return 0;               /* not set up, or no return path */
    }
    WITH_QEMU_LOCK_GUARD(&save.noref_lock) {
        if (!save.redirty->len) {
            return 0;
        }
        asked = save.redirty;
        save.redirty = g_array_new(false, false, sizeof(NasDedupResend));
        RCU_READ_LOCK_GUARD();
        for (i = 0; i < asked->len; i++) {
            NasDedupResend *r = &g_array_index(asked, NasDedupResend, i);
            RAMBlock *block = qemu_ram_block_by_name(r->id);
            unsigned long *bmap = block ?
                g_hash_table_lookup(save.noref, block) : NULL;
            unsigned long first = r->offset >> TARGET_PAGE_BITS;
            uint32_t k = 0, n;

            while (bmap && k < r->npages) {
                for (n = 0; k + n < r->npages &&
                            test_bit(first + k + n, bmap); n++) {
                    /* a run of pages still to be sent in full */
                }
                if (n) {
                    NasDedupResend sub = *r;

                    sub.offset = r->offset + (uint64_t)k * NAS_DEDUP_CHUNK;
                    sub.npages = n;
                    g_array_append_val(todo, sub);
                }
                k += n + 1;
            }
        }
    }
    for (i = 0; i < todo->len; i++) {
        NasDedupResend *r = &g_array_index(todo, NasDedupResend, i);

        if (ram_dedup_redirty(r->id, r->offset, r->npages, errp) < 0) {
            return -EINVAL;
        }
        pages += r->npages;
    }
    return pages;
}

static void put_sync(QEMUFile *f, NasDedupPutHeader put_header, void *opaque,
                     bool final)
{
    NasDedupRecord *rec = g_new0(NasDedupRecord, 1);

    save.f = f;
    save.put_header = put_header;
    save.opaque = opaque;
    rec->type = NAS_DEDUP_REC_SYNC;
    rec->seq = ++save.seq;
    rec->final = final;
    trace_nas_dedup_save_sync(rec->seq, final);
    /* Any RAMBlock will do: the record is about all of them. */
    put_record(save.run_block, 0, rec);
    g_free(rec);
}

int nas_dedup_save_flush(void)
{
    Error *local_err = NULL;
    int ret = flush_run();

    if (ret < 0) {
        return ret;
    }
    if (save.want_live_sync && !save.live_seq && save.f) {
        put_sync(save.f, save.put_header, save.opaque, false);
        save.live_seq = save.seq;
        save.live_mark = stat64_get(&nas_dedup_counters.ref_pages);
        save.live_syncs++;
        save.want_live_sync = false;
    }
    if (redirty_requested(&local_err) < 0) {
        migrate_set_error(migrate_get_current(), local_err);
        error_report_err(local_err);
        return -EINVAL;
    }
    return 0;
}

/* True if the destination asked for this page: send it in full once. */
static bool take_noref(RAMBlock *block, ram_addr_t offset)
{
    unsigned long *bmap;

    QEMU_LOCK_GUARD(&save.noref_lock);
    bmap = g_hash_table_lookup(save.noref, block);
    return bmap && test_and_clear_bit(offset >> TARGET_PAGE_BITS, bmap);
}

static int define_drive(RAMBlock *block, ram_addr_t offset, uint16_t drive)
{
    g_autofree NasDedupRecord *rec = g_new0(NasDedupRecord, 1);
    g_autofree char *id = NULL;

    if (test_bit(drive, save.drive_sent)) {
        return 0;
    }
    if (!nas_dedup_drive_info(drive, &id, &rec->disk_size)) {
        return -1;
    }
    rec->type = NAS_DEDUP_REC_DRIVE;
    rec->drive = drive;
    pstrcpy(rec->id, sizeof(rec->id), id);
    put_record(block, offset, rec);
    set_bit(drive, save.drive_sent);
    return 0;
}

int nas_dedup_save_page(QEMUFile *f, NasDedupPutHeader put_header,
                        void *opaque, RAMBlock *block, ram_addr_t offset)
{
    NasDedupRecord *run = &save.run;
    NasDedupIndex *idx;
    NasDedupHash hash;
    NasDedupLoc loc;

    if (!save.noref || take_noref(block, offset)) {
        return 0;
    }
    RCU_READ_LOCK_GUARD();
    idx = nas_dedup_index_peek();
    if (!idx) {
        return 0;
    }
    nas_dedup_hash_chunk(block->host + offset, &hash);
    if (!nas_dedup_index_lookup(idx, &hash, &loc)) {
        return 0;
    }

    if (run->npages &&
        (save.run_block != block || save.f != f ||
         run->npages == NAS_DEDUP_REFS_MAX || run->drive != loc.drive ||
         offset != save.run_offset + run->npages * NAS_DEDUP_CHUNK ||
         loc.offset != run->disk_offset + run->npages * NAS_DEDUP_CHUNK)) {
        int ret = flush_run();
        if (ret < 0) {
            return ret;
        }
    }
    save.f = f;
    save.put_header = put_header;
    save.opaque = opaque;
    if (!run->npages) {
        if (define_drive(block, offset, loc.drive) < 0) {
            return 0;
        }
        run->type = NAS_DEDUP_REC_REFS;
        run->drive = loc.drive;
        run->disk_offset = loc.offset;
        save.run_block = block;
        save.run_offset = offset;
        save.any_refs = true;
    }
    run->hash[run->npages++] = hash;
    return 1;
}


bool nas_dedup_save_can_switchover(uint64_t pending_bytes,
                                   uint64_t threshold_bytes)
{
    uint64_t backlog;

    if (!migrate_dedup_nas() || !save.noref || !save.any_refs) {
        return true;
    }
    if (save.live_seq &&
        (int32_t)(qatomic_load_acquire(&save.acked_seq) - save.live_seq) >= 0) {
        save.resolved_mark = save.live_mark;
        save.live_seq = 0;
    }
    backlog = (stat64_get(&nas_dedup_counters.ref_pages) + save.run.npages -
               save.resolved_mark) * NAS_DEDUP_CHUNK;
    /*
     * The stopped guest waits for the pages still to send and for the
     * blocks still to read: together they must fit the downtime budget.
     */
    if (pending_bytes + backlog <= threshold_bytes ||
        save.live_syncs >= NAS_DEDUP_LIVE_SYNCS) {
        trace_nas_dedup_save_switchover(backlog, save.live_syncs);
        return true;
    }
    if (save.live_seq) {
        /* Answer pending: wait a little rather than spin on bitmap syncs. */
        qemu_sem_timedwait(&save.ack_sem, NAS_DEDUP_LIVE_WAIT_MS);
    } else {
        save.want_live_sync = true;     /* sent by nas_dedup_save_flush() */
    }
    return false;
}

int nas_dedup_save_complete(QEMUFile *f, NasDedupPutHeader put_header,
                            void *opaque, Error **errp)
{
    MigrationState *s = migrate_get_current();
    int64_t deadline;
    int ret;

    ret = flush_run();
    if (ret < 0) {
        error_setg_errno(errp, -ret, "dedup-nas: failed to send references");
        return ret;
    }
    /* Send the pages asked for so far before asking for the rest. */
    ret = redirty_requested(errp);
    if (ret) {
        return ret;
    }
    if (!save.any_refs) {
        return 0;
    }
    if (++save.rounds > NAS_DEDUP_SYNC_ROUNDS) {
        error_setg(errp, "dedup-nas: destination still asks for pages after "
                   "%d rounds", NAS_DEDUP_SYNC_ROUNDS);
        return -EIO;
    }

    put_sync(f, put_header, opaque, false);
    ret = qemu_fflush(f);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "dedup-nas: failed to send SYNC");
        return ret;
    }
    deadline = qemu_clock_get_ms(QEMU_CLOCK_REALTIME) +
               NAS_DEDUP_SYNC_TIMEOUT_MS;
    while (qatomic_load_acquire(&save.acked_seq) != save.seq) {
        if (migrate_has_error(s) || qemu_file_get_error(f) ||
            !s->rp_state.rp_thread_created) {
            error_setg(errp, "dedup-nas: return path failed while waiting "
                       "for the destination to resolve references");
            return -EIO;
        }
        if (qemu_clock_get_ms(QEMU_CLOCK_REALTIME) > deadline) {
            error_setg(errp, "dedup-nas: destination did not resolve its "
                       "references within %d s",
                       NAS_DEDUP_SYNC_TIMEOUT_MS / 1000);
            return -ETIMEDOUT;
        }
        qemu_sem_timedwait(&save.ack_sem, 100);
    }
    if (save.acked_pending) {
        /* RESEND came before the ACK: dirty those pages again. */
        ret = redirty_requested(errp);
        return ret < 0 ? ret : 1;
    }
    put_sync(f, put_header, opaque, true);
    return qemu_fflush(f) < 0 ? -EIO : 0;
}

int nas_dedup_rp_resend(MigrationState *s, const uint8_t *buf, size_t len,
                        Error **errp)
{
    NasDedupResend r;
    g_autofree char *err = NULL;
    RAMBlock *block;
    unsigned long *bmap;
    uint32_t i;

    if (!migrate_dedup_nas() || !save.noref) {
        error_setg(errp, "dedup-nas: unexpected resend request");
        return -EINVAL;
    }
    if (!nas_dedup_resend_decode(buf, len, &r, &err)) {
        error_setg(errp, "dedup-nas: %s", err);
        return -EINVAL;
    }
    trace_nas_dedup_rp_resend(r.id, r.offset, r.npages);
    WITH_RCU_READ_LOCK_GUARD() {
        block = qemu_ram_block_by_name(r.id);
        if (!block || r.offset > block->used_length ||
            !QEMU_IS_ALIGNED(r.offset, NAS_DEDUP_CHUNK) ||
            (uint64_t)r.npages * NAS_DEDUP_CHUNK >
                block->used_length - r.offset) {
            error_setg(errp, "dedup-nas: resend request for %s 0x%" PRIx64
                       " x%u is outside guest RAM", r.id, r.offset, r.npages);
            return -EINVAL;
        }
        WITH_QEMU_LOCK_GUARD(&save.noref_lock) {
            bmap = g_hash_table_lookup(save.noref, block);
            if (!bmap) {
                bmap = bitmap_new(block->used_length >> TARGET_PAGE_BITS);
                g_hash_table_insert(save.noref, block, bmap);
            }
            for (i = 0; i < r.npages; i++) {
                set_bit((r.offset >> TARGET_PAGE_BITS) + i, bmap);
            }
            g_array_append_val(save.redirty, r);
        }
    }
    stat64_add(&nas_dedup_counters.resent_pages, r.npages);
    return 0;
}

int nas_dedup_rp_sync_ack(MigrationState *s, const uint8_t *buf, size_t len,
                          Error **errp)
{
    g_autofree char *err = NULL;
    uint32_t seq, pending;

    if (!nas_dedup_sync_ack_decode(buf, len, &seq, &pending, &err)) {
        error_setg(errp, "dedup-nas: %s", err);
        return -EINVAL;
    }
    trace_nas_dedup_rp_sync_ack(seq, pending);
    save.acked_pending = pending;
    qatomic_store_release(&save.acked_seq, seq);
    qemu_sem_post(&save.ack_sem);
    return 0;
}
