/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas: source side
 *
 * ram.c offers each page it would send in full; a page whose content the
 * index finds on a drive becomes part of a run of references (consecutive
 * pages of one RAMBlock backed by consecutive blocks of one drive) that is
 * written as one REFS record.  At switchover, SYNC records and the
 * destination's answers on the return path (nas-dedup-rp.c) make sure
 * that every reference was verified, and that every page it could not
 * verify was sent again.
 *
 * Not every page found on a disk goes as a reference: the link/NAS split
 * (nas-dedup-split.h) sends a share of them in full, so that the link and
 * the destination's reads end together.
 *
 * No fault of the destination may freeze the stopped guest or the source
 * QEMU: see "Bounds" in docs/devel/nas-dedup.rst, and the watchdog in
 * nas-dedup-rp.c.
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
#include "multifd.h"
#include "migration-stats.h"
#include "nas-dedup-int.h"
#include "nas-dedup-split.h"
#include "nas-dedup-wire.h"
#include "options.h"
#include "trace.h"

/* Rounds of "resend, sync again" before giving up. */
#define NAS_DEDUP_SYNC_ROUNDS 16
/* Migration thread only. */
static struct {
    /* The pending run of references. */
    NasDedupRecord run;
    RAMBlock *run_block;
    ram_addr_t run_offset;
    uint32_t run_epoch;             /* the dirty-bitmap sync of its pages */
    QEMUFile *f;
    NasDedupPutHeader put_header;
    void *opaque;

    unsigned long *drive_sent;      /* DRIVE records sent, by drive */
    bool setup_sent;
    bool any_refs;
    /*
     * No more references: every page goes in full from now on (before
     * postcopy, see nas-dedup-postcopy.c).  Set by the migration thread;
     * read by the return-path thread too, which sends urgent pages with
     * postcopy-preempt: qatomic_*() access.
     */
    bool closed;
    bool final_sent;                /* SYNC(final=1) went out */
    /*
     * Syncs of the dirty bitmap so far, changed under ram.c's bitmap
     * mutex (nas_dedup_save_bitmap_synced()), under which pages are
     * offered (but by postcopy-preempt, when there are no more syncs):
     * qatomic_*() access.
     */
    uint32_t epoch;
    uint64_t passes;                /* over RAM, completed */
    /*
     * Postcopy asked for (nas-dedup-postcopy.c): the first pass sends
     * references only, and leaves the other pages for postcopy (@defer);
     * those not dirtied again yet (RAMBlock * -> bitmap of max_length
     * pages), and how many.
     */
    bool defer;
    GHashTable *deferred;
    uint64_t deferred_pages;
    /* That pass's references, and the pages it sent in full. */
    uint64_t defer_refs;
    uint64_t defer_full;            /* on the spare link */
    /*
     * The pages that pass sent as references, a LazyRefs for each block
     * in the order the pass went: after the switch, those the destination
     * may still be filling go in full, from the far end
     * (nas_dedup_save_meet()), block @meet_next - 1 next.
     */
    GPtrArray *lazy_refs;
    guint meet_next;
    uint64_t met_pages;             /* dirtied for that so far */
    bool resolved;                  /* closed, and nothing is awaited */
    uint32_t seq;
    unsigned rounds;
    int64_t deadline_ms;            /* of the switchover */
    int64_t stop_until_ms;          /* guest stopped: the downtime limit */
    NasDedupSplit split;            /* which eligible pages go as refs */
} save;

/* The pages of @block the pass that leaves pages for postcopy referenced. */
typedef struct LazyRefs {
    RAMBlock *block;
    unsigned long *refs;            /* cleared as they go in full */
    unsigned long *scratch;         /* for meet_pick() */
    unsigned long npages;
    unsigned long cursor;           /* none left at or above it */
} LazyRefs;

static void lazy_refs_free(gpointer p)
{
    LazyRefs *lr = p;

    g_free(lr->refs);
    g_free(lr->scratch);
    g_free(lr);
}

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
    MigrationState *s = migrate_get_current();

    if (migrate_rdma()) {
        error_setg(errp, "Capability 'dedup-nas' is not compatible with "
                   "RDMA migration");
        return -1;
    }
    if (migrate_multifd() && multifd_ram_sync_per_section()) {
        /*
         * The destination syncs with the multifd channels only at the end
         * of a section then, so a SYNC record could overtake pages still
         * in the channels (see "multifd" in docs/devel/nas-dedup.rst).
         */
        error_setg(errp, "dedup-nas with multifd needs the multifd channels "
                   "synchronised every round (multifd-flush-after-each-"
                   "section off: machine types from 8.1)");
        return -1;
    }
#ifdef CONFIG_UADK
    if (migrate_multifd() &&
        migrate_multifd_compression() == MULTIFD_COMPRESSION_UADK) {
        /*
         * Its receive side does not mark the pages it writes in
         * receivedmap, by which a later zero page decides to clear a page
         * (a fetched one included).
         */
        error_setg(errp, "dedup-nas is not compatible with multifd "
                   "compression 'uadk'");
        return -1;
    }
#endif
    nas_dedup_save_cleanup();
    memset(&save.run, 0, sizeof(save.run));
    save.run_block = NULL;
    save.f = NULL;
    save.setup_sent = false;
    save.any_refs = false;
    qatomic_set(&save.closed, false);
    save.final_sent = false;
    save.passes = 0;
    save.resolved = false;
    save.seq = 0;
    save.rounds = 0;
    save.deadline_ms = 0;
    save.stop_until_ms = 0;
    nas_dedup_stats_reset(false);
    nas_dedup_split_init(&save.split, migrate_dedup_nas_ref_share());
    qatomic_set(&nas_dedup_counters.ref_share,
                nas_dedup_split_percent(&save.split));
    if (!s->rp_state.rp_thread_created) {
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
    if (s->to_dst_file) {
        qio_channel_set_delay(qemu_file_get_ioc(s->to_dst_file), false);
    }
    save.drive_sent = bitmap_new(NAS_DEDUP_MAX_DRIVES + 1);
    nas_dedup_rp_start(s);
    return 0;
}

void nas_dedup_save_cleanup(void)
{
    nas_dedup_rp_stop();
    g_free(save.drive_sent);
    save.drive_sent = NULL;
    save.defer = false;
    g_clear_pointer(&save.deferred, g_hash_table_destroy);
    save.deferred_pages = 0;
    g_clear_pointer(&save.lazy_refs, g_ptr_array_unref);
    save.meet_next = 0;
    save.met_pages = 0;
}

/* Send the pending run; the bitmap mutex may be held. */
int nas_dedup_save_flush_run(void)
{
    size_t len;

    if (!save.run.npages) {
        return 0;
    }
    trace_nas_dedup_save_refs(save.run_block->idstr, save.run_offset,
                              save.run.drive, save.run.disk_offset,
                              save.run.npages);
    /* Before it can be asked about. */
    nas_dedup_rp_refs_sent(save.run_epoch);
    len = put_record(save.run_block, save.run_offset, &save.run);
    stat64_add(&nas_dedup_counters.ref_pages, save.run.npages);
    stat64_add(&nas_dedup_counters.ref_bytes, len);
    save.run.npages = 0;
    return qemu_file_get_error(save.f);
}

uint32_t nas_dedup_save_put_sync(bool final, bool lazy)
{
    NasDedupRecord *rec;

    /*
     * Nothing sent yet; or past the final SYNC, or in postcopy, where
     * ram_load_postcopy() takes no record of ours.
     */
    if (!save.f || save.final_sent || migration_in_postcopy()) {
        return 0;
    }
    rec = g_new0(NasDedupRecord, 1);
    rec->type = NAS_DEDUP_REC_SYNC;
    rec->seq = ++save.seq;
    rec->final = final;
    rec->lazy = lazy;
    save.final_sent |= final;
    nas_dedup_rp_sync_sent(rec->seq);
    trace_nas_dedup_save_sync(rec->seq, final, lazy);
    /* Any RAMBlock will do: the record is about all of them. */
    put_record(save.run_block, 0, rec);
    g_free(rec);
    return save.seq;
}

int nas_dedup_save_flush(Error **errp)
{
    int ret = nas_dedup_save_flush_run();

    if (ret < 0) {
        error_setg_errno(errp, -ret, "dedup-nas: failed to send references");
        return ret;
    }
    if (nas_dedup_rp_redirty(false, errp) < 0) {
        return -EINVAL;
    }
    return 0;
}

/* The SETUP record: protocol version, return-path numbering, hash key. */
static void send_setup(RAMBlock *block, ram_addr_t offset,
                       const NasDedupKey *key)
{
    g_autofree NasDedupRecord *rec = g_new0(NasDedupRecord, 1);

    rec->type = NAS_DEDUP_REC_SETUP;
    rec->version = NAS_DEDUP_WIRE_VERSION;
    migrate_rp_dedup_msgs(&rec->resend_msg, &rec->sync_ack_msg,
                          &rec->progress_msg);
    rec->key = *key;
    put_record(block, offset, rec);
    save.setup_sent = true;
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

/* Let the link/NAS split see how both paths are doing. */
static void split_update(void)
{
    NasDedupSplitSample x = {
        .now_us = g_get_monotonic_time(),
        .refs_sent = nas_dedup_save_refs_sent(),
        .stop_left_us = -1,
        .wire_bytes = migration_transferred_bytes(),
        .link_limit = migrate_max_bandwidth(),
    };

    if (save.stop_until_ms) {
        x.stop_left_us = MAX(0, save.stop_until_ms -
                                qemu_clock_get_ms(QEMU_CLOCK_REALTIME)) * 1000;
    }
    x.reports = nas_dedup_rp_progress_get(&x.refs_done, &x.fetched_bytes,
                                          &x.fetch_busy_us, &x.report_us);
    if (nas_dedup_split_update(&save.split, &x)) {
        qatomic_set(&nas_dedup_counters.ref_share,
                    nas_dedup_split_percent(&save.split));
        trace_nas_dedup_save_split(nas_dedup_split_percent(&save.split),
                                   MIN(MAX(save.split.page_rate, 0),
                                       INT64_MAX),
                                   MIN(MAX(save.split.fetch_rate, 0),
                                       INT64_MAX));
    }
}

/*
 * Leave the page at @offset of @block for postcopy: it stays out of the
 * dirty bitmap until nas_dedup_save_undefer().
 */
static int defer_page(RAMBlock *block, ram_addr_t offset)
{
    unsigned long *bm;

    if (!save.deferred) {
        save.deferred = g_hash_table_new_full(NULL, NULL, NULL, g_free);
    }
    bm = g_hash_table_lookup(save.deferred, block);
    if (!bm) {
        bm = bitmap_new(block->max_length >> TARGET_PAGE_BITS);
        g_hash_table_insert(save.deferred, block, bm);
    }
    if (!test_and_set_bit(offset >> TARGET_PAGE_BITS, bm)) {
        save.deferred_pages++;
    }
    return 1;
}

/*
 * The pass that leaves pages for postcopy sent the page at @offset of
 * @block as a reference.
 */
static void lazy_ref(RAMBlock *block, ram_addr_t offset)
{
    LazyRefs *lr = NULL;
    guint i;

    if (!save.lazy_refs) {
        save.lazy_refs = g_ptr_array_new_with_free_func(lazy_refs_free);
    }
    /* The last block first: the pass goes one block after the other. */
    for (i = save.lazy_refs->len; i > 0 && !lr; i--) {
        LazyRefs *o = g_ptr_array_index(save.lazy_refs, i - 1);

        if (o->block == block) {
            lr = o;
        }
    }
    if (!lr) {
        lr = g_new0(LazyRefs, 1);
        lr->block = block;
        lr->npages = block->max_length >> TARGET_PAGE_BITS;
        lr->refs = bitmap_new(lr->npages);
        lr->scratch = bitmap_new(lr->npages);
        g_ptr_array_add(save.lazy_refs, lr);
        save.meet_next = save.lazy_refs->len;
    }
    set_bit_atomic(offset >> TARGET_PAGE_BITS, lr->refs);
    lr->cursor = MAX(lr->cursor, (offset >> TARGET_PAGE_BITS) + 1);
}

/*
 * Whether the pass that leaves pages for postcopy has the link to spare
 * for a page that is not a reference: the pass is as long as hashing
 * every page takes, and references alone leave the link idle meanwhile,
 * although the pages left out will go on it after the switch.  So such a
 * page goes in full instead, as long as the pass stays under 3/4 of the
 * rate limit's window (max-bandwidth's share of XFER_LIMIT_RATIO): room
 * for the references, so that the pass seldom waits for the rate limit.
 * (A budget over the whole pass would not do: its bursts would trip the
 * limit, the pass would wait, and a longer pass is a larger budget.)
 * Approximate: the bytes counted are those flushed (not those still in
 * the QEMUFile's buffer or in multifd's channels); with no limit
 * (max-bandwidth 0) nothing goes so; with a limit above what the link
 * carries, the pass may wait on the socket and switch later.
 */
static bool defer_link_spare(void)
{
    uint64_t max = migration_rate_get();

    return max != RATE_LIMIT_DISABLED &&
           migration_transferred_bytes() -
           stat64_get(&mig_stats.rate_limit_start) + TARGET_PAGE_SIZE <=
           max / 4 * 3;
}

static int save_ref(QEMUFile *f, NasDedupPutHeader put_header,
                    void *opaque, RAMBlock *block, ram_addr_t offset);

void nas_dedup_save_bitmap_synced(void)
{
    qatomic_set(&save.epoch, save.epoch + 1);
}

/*
 * A page with a reference open (sent, maybe asked again) is offered
 * again only after a sync of the dirty bitmap (or, asked again, to answer
 * that): the sync tells a RESEND for its last reference from one that
 * crossed a later copy.
 */
void nas_dedup_save_sending(RAMBlock *block, ram_addr_t offset)
{
    nas_dedup_rp_sending(block, offset, qatomic_read(&save.epoch));
    /*
     * A page of the pass that leaves pages for postcopy goes in full (or
     * as a reference again, which records it again): the meet need not
     * send it.  Atomic: with postcopy-preempt, the migration thread
     * sends pages without the bitmap mutex (the return-path thread sends
     * its urgent pages under it, as meet_pick() takes pages).
     */
    if (save.lazy_refs) {
        guint i;

        for (i = 0; i < save.lazy_refs->len; i++) {
            LazyRefs *lr = g_ptr_array_index(save.lazy_refs, i);

            if (lr->block == block) {
                clear_bit_atomic(offset >> TARGET_PAGE_BITS, lr->refs);
                break;
            }
        }
    }
}

int nas_dedup_save_page(QEMUFile *f, NasDedupPutHeader put_header,
                        void *opaque, RAMBlock *block, ram_addr_t offset)
{
    int ret;

    /*
     * A page asked again goes in full (and is no longer owed once taken
     * here, closed or not: the postcopy gate counts what is owed).
     */
    if (!save.drive_sent || nas_dedup_rp_take_noref(block, offset) ||
        qatomic_read(&save.closed)) {
        return 0;
    }
    /* (Never in postcopy, whose urgent pages the return path sends.) */
    if (save.defer && !migration_in_postcopy()) {
        ret = save_ref(f, put_header, opaque, block, offset);
        if (ret) {
            return ret;
        }
        if (!defer_link_spare()) {
            return defer_page(block, offset);
        }
        save.defer_full++;
        return 0;           /* in full, now */
    }
    return save_ref(f, put_header, opaque, block, offset);
}

/* The page as a reference if the index knows it: 1, or 0 if not. */
static int save_ref(QEMUFile *f, NasDedupPutHeader put_header,
                    void *opaque, RAMBlock *block, ram_addr_t offset)
{
    NasDedupRecord *run = &save.run;
    uint32_t epoch = qatomic_read(&save.epoch);  /* as the hook read it */
    const NasDedupKey *key;
    NasDedupIndex *idx;
    NasDedupHash hash;
    NasDedupLoc loc;

    RCU_READ_LOCK_GUARD();
    idx = nas_dedup_index_peek();
    if (!idx) {
        return 0;
    }
    /* The index's half first; the other one only for a hit. */
    key = nas_dedup_index_key(idx);
    hash.hi = nas_dedup_hash64(key, 0, block->host + offset);
    if (!nas_dedup_index_lookup(idx, hash.hi, &loc)) {
        return 0;
    }
    hash.lo = nas_dedup_hash64(key, 1, block->host + offset);
    if (!nas_dedup_drive_live(loc.drive)) {
        /* Resized, ejected or unplugged since: forget that entry. */
        nas_dedup_index_invalidate(idx, loc.drive, loc.offset,
                                   NAS_DEDUP_CHUNK);
        return 0;
    }
    /*
     * The pass that leaves pages for postcopy sends every hit as a
     * reference: after the switch, the source sends those the
     * destination has not read yet from the other end (meet).
     */
    if (!save.defer) {
        /* With the guest stopped, the time left counts: every page. */
        if (save.stop_until_ms ||
            !(save.split.eligible % NAS_DEDUP_SPLIT_SAMPLE)) {
            split_update();
        }
        if (!nas_dedup_split_take(&save.split)) {
            return 0;           /* the link/NAS split sends it in full */
        }
    }

    if (run->npages &&
        (save.run_block != block || save.f != f ||
         run->npages == NAS_DEDUP_REFS_MAX || run->drive != loc.drive ||
         save.run_epoch != epoch ||
         offset != save.run_offset + run->npages * NAS_DEDUP_CHUNK ||
         loc.offset != run->disk_offset + run->npages * NAS_DEDUP_CHUNK)) {
        int ret = nas_dedup_save_flush_run();
        if (ret < 0) {
            return ret;
        }
    }
    save.f = f;
    save.put_header = put_header;
    save.opaque = opaque;
    if (!run->npages) {
        if (!save.setup_sent) {
            send_setup(block, offset, nas_dedup_index_key(idx));
        }
        if (define_drive(block, offset, loc.drive) < 0) {
            return 0;
        }
        run->type = NAS_DEDUP_REC_REFS;
        run->drive = loc.drive;
        run->disk_offset = loc.offset;
        save.run_block = block;
        save.run_offset = offset;
        save.run_epoch = epoch;
        save.any_refs = true;
    }
    run->hash[run->npages++] = hash;
    if (save.defer) {
        save.defer_refs++;
        lazy_ref(block, offset);
    }
    return 1;
}

uint64_t nas_dedup_save_bytes_saved(void)
{
    return nas_dedup_saved(stat64_get(&nas_dedup_counters.ref_pages),
                           stat64_get(&nas_dedup_counters.ref_bytes));
}

bool nas_dedup_save_active(void)
{
    return save.drive_sent;
}

void nas_dedup_save_close(void)
{
    qatomic_set(&save.closed, true);
}

bool nas_dedup_save_closed(void)
{
    return qatomic_read(&save.closed);
}

void nas_dedup_save_set_resolved(void)
{
    save.resolved = true;
}

bool nas_dedup_save_resolved(void)
{
    return save.resolved;
}

void nas_dedup_save_pass_done(void)
{
    save.passes++;
    save.defer = false;     /* dirtied again by nas_dedup_save_undefer() */
}

void nas_dedup_save_defer(void)
{
    if (save.drive_sent && !save.passes && !qatomic_read(&save.closed) &&
        !save.defer) {
        save.defer = true;
        save.defer_refs = save.defer_full = 0;
    }
}

uint64_t nas_dedup_save_deferred(void)
{
    return save.deferred_pages;
}

/* The pages left out of @block (all of them go again). */
static const unsigned long *undefer_pick(RAMBlock *block,
                                         unsigned long *start,
                                         unsigned long *end, void *opaque)
{
    *end = block->max_length >> TARGET_PAGE_BITS;
    return opaque;
}

int64_t nas_dedup_save_undefer(Error **errp)
{
    GHashTableIter iter;
    gpointer key, value;
    int64_t pages = 0;

    save.defer = false;
    if (!save.deferred) {
        return 0;
    }
    g_hash_table_iter_init(&iter, save.deferred);
    while (g_hash_table_iter_next(&iter, &key, &value)) {
        RAMBlock *block = key;
        int64_t ret = ram_dedup_redirty(block, undefer_pick, value, errp);

        if (ret < 0) {
            return ret;
        }
        pages += ret;
    }
    trace_nas_dedup_save_undefer(save.deferred_pages, pages,
                                 save.defer_refs, save.defer_full);
    g_hash_table_remove_all(save.deferred);
    save.deferred_pages = 0;
    return pages;
}

typedef struct MeetPick {
    LazyRefs *lr;
    uint64_t max;
    uint64_t picked;
} MeetPick;

/*
 * Under ram.c's bitmap mutex: the next pages of @opaque's block that the
 * pass referenced, from its cursor down, at most @max of them.  Each
 * batch looks at the pages it takes and no further: the meet is linear in
 * the size of guest RAM, however many batches it takes.
 */
static const unsigned long *meet_pick(RAMBlock *block, unsigned long *start,
                                      unsigned long *end, void *opaque)
{
    MeetPick *m = opaque;
    LazyRefs *lr = m->lr;
    unsigned long i, n = 0;

    *end = lr->cursor;
    while (lr->cursor && n < m->max) {
        unsigned long p = find_last_bit(lr->refs, lr->cursor);

        if (p >= lr->cursor) {
            lr->cursor = 0;     /* none below */
            break;
        }
        lr->cursor = p;
        n++;
    }
    *start = lr->cursor;
    if (!n) {
        return NULL;
    }
    /* Taken from @refs: those sent meanwhile (a page request) are not. */
    for (i = *start / BITS_PER_LONG; i <= (*end - 1) / BITS_PER_LONG; i++) {
        unsigned long mask = ~0UL;

        if (i == *start / BITS_PER_LONG) {
            mask &= BITMAP_FIRST_WORD_MASK(*start);
        }
        if (i == (*end - 1) / BITS_PER_LONG) {
            mask &= BITMAP_LAST_WORD_MASK(*end);
        }
        lr->scratch[i] = qatomic_fetch_and(&lr->refs[i], ~mask) & mask;
        m->picked += ctpopl(lr->scratch[i]);
    }
    return lr->scratch;
}

int64_t nas_dedup_save_meet(uint64_t max, Error **errp)
{
    while (save.lazy_refs && save.meet_next) {
        LazyRefs *lr = g_ptr_array_index(save.lazy_refs, save.meet_next - 1);
        MeetPick m = { .lr = lr, .max = max };
        unsigned long from = lr->cursor;
        int64_t ret;

        if (!lr->cursor) {
            save.meet_next--;
            continue;
        }
        ret = ram_dedup_redirty(lr->block, meet_pick, &m, errp);
        if (ret < 0) {
            return ret;
        }
        trace_nas_dedup_save_meet(lr->block->idstr,
                                  (uint64_t)from << TARGET_PAGE_BITS,
                                  (uint64_t)lr->cursor << TARGET_PAGE_BITS,
                                  ret);
        save.met_pages += m.picked;
        if (m.picked) {
            return m.picked;
        }
    }
    return 0;
}

uint64_t nas_dedup_save_met_pages(void)
{
    return save.met_pages;
}

uint64_t nas_dedup_save_passes(void)
{
    return save.passes;
}

uint64_t nas_dedup_save_refs_sent(void)
{
    if (!save.drive_sent || !save.any_refs) {
        return 0;
    }
    return stat64_get(&nas_dedup_counters.ref_pages) + save.run.npages;
}

void nas_dedup_save_switchover(void)
{
    MigrationState *s = migrate_get_current();

    /*
     * Nothing to wait for in postcopy: the references were resolved
     * before it started (nas-dedup-postcopy.c), and the guest runs on the
     * destination.
     */
    if (!save.drive_sent || save.final_sent || migration_in_postcopy()) {
        return;
    }
    /*
     * Even without a reference yet (the final pass may make the first):
     * the guest stopped at downtime_start: from then on, what dedup-nas
     * makes it wait for (the pages and references still to send to a
     * destination that may have stopped reading, the handshake) must be
     * over by downtime_start + downtime-limit + switchover slack.
     */
    save.stop_until_ms = MAX(s->downtime_start,
                             qemu_clock_get_ms(QEMU_CLOCK_REALTIME) - 1) +
                         migrate_downtime_limit();
    save.deadline_ms = save.stop_until_ms +
                       migrate_dedup_nas_switchover_slack();
    nas_dedup_rp_watch(NAS_DEDUP_WATCH_SWITCHOVER, save.deadline_ms, 0);
    /*
     * From now on, references only as many as the destination reads
     * within the downtime limit.
     */
    split_update();
}

int nas_dedup_save_complete(QEMUFile *f, NasDedupPutHeader put_header,
                            void *opaque, Error **errp)
{
    MigrationState *s = migrate_get_current();
    uint32_t pending;
    int64_t ret;

    if (save.final_sent) {
        return 0;               /* resolved before postcopy would start */
    }
    ret = nas_dedup_save_flush_run();
    if (ret < 0) {
        error_setg_errno(errp, -ret, "dedup-nas: failed to send references");
        return ret;
    }
    /* Send the pages asked for so far before asking for the rest. */
    ret = nas_dedup_rp_redirty(false, errp);
    if (ret) {
        return ret < 0 ? ret : 1;
    }
    if (!save.drive_sent) {
        return 0;               /* no return path: never a reference */
    }
    if (!save.any_refs) {
        /* Nothing to resolve: the destination may complete from now on. */
        return nas_dedup_rp_final(s, false, errp);
    }
    if (++save.rounds > NAS_DEDUP_SYNC_ROUNDS) {
        error_setg(errp, "dedup-nas: destination still asks for pages after "
                   "%d rounds", NAS_DEDUP_SYNC_ROUNDS);
        return -EIO;
    }

    if (migrate_multifd()) {
        /*
         * Every page sent so far, in full on the multifd channels too,
         * must be in the destination's RAM before it reads SYNC and counts
         * what it still awaits.
         */
        ret = multifd_ram_flush_and_sync(f);
        if (ret < 0) {
            error_setg_errno(errp, -ret, "dedup-nas: failed to synchronise "
                             "the multifd channels before SYNC");
            return ret;
        }
    }
    save.f = f;
    save.put_header = put_header;
    save.opaque = opaque;
    nas_dedup_save_put_sync(false, false);
    ret = qemu_fflush(f);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "dedup-nas: failed to send SYNC");
        return ret;
    }
    while (nas_dedup_rp_acked(&pending) != save.seq) {
        if (migrate_has_error(s) || qemu_file_get_error(f) ||
            !s->rp_state.rp_thread_created) {
            error_setg(errp, "dedup-nas: return path failed while waiting "
                       "for the destination to resolve references");
            return -EIO;
        }
        if (qemu_clock_get_ms(QEMU_CLOCK_REALTIME) >= save.deadline_ms) {
            error_setg(errp, "dedup-nas: the destination did not resolve its "
                       "references within downtime-limit + "
                       "dedup-nas-switchover-slack (%" PRIu64 " ms); the "
                       "source resumes", migrate_downtime_limit() +
                       migrate_dedup_nas_switchover_slack());
            return -ETIMEDOUT;
        }
        nas_dedup_rp_wait(MIN(100, MAX(1, save.deadline_ms -
                                  qemu_clock_get_ms(QEMU_CLOCK_REALTIME))));
    }
    if (pending) {
        /*
         * RESEND came before the ACK: dirty those pages again.  If none
         * is dirty any more (a free page hint cleared its bit since), send
         * every page asked and not sent in full yet.
         */
        ret = nas_dedup_rp_redirty(false, errp);
        if (!ret) {
            ret = nas_dedup_rp_redirty(true, errp);
        }
        if (!ret) {
            error_setg(errp, "dedup-nas: the destination asked again for %u "
                       "pages that were never sent as references", pending);
            return -EIO;
        }
        return ret < 0 ? ret : 1;
    }
    /*
     * Past the final SYNC, the destination may complete and start the
     * guest: failing the migration (and resuming the source) from then on
     * would run the guest twice.  So the watchdog stands down before it
     * is sent, and nothing of ours fails the migration after it
     * (nas_dedup_rp_fail()).  Before it, the destination cannot complete
     * (nas_dedup_load_check()), so failing was safe.
     */
    ret = nas_dedup_rp_final(s, false, errp);
    if (ret < 0) {
        return ret;
    }
    nas_dedup_save_put_sync(true, false);
    ret = qemu_fflush(f);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "dedup-nas: failed to send the final "
                         "SYNC");
        return ret;
    }
    return 0;
}
