/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas: destination side
 *
 * A REFS record names a run of guest pages and the drive blocks that held
 * the same bytes on the source.  The loader starts an asynchronous read of
 * the blocks from this VM's own drive (the same shared image) and goes on
 * with the stream; up to NAS_DEDUP_INFLIGHT reads run at once.  When a read
 * completes, each block whose keyed hash (two XXH3-64, the key in the SETUP
 * record) matches goes into guest RAM, unless newer data for that page
 * arrived meanwhile; any other page is asked from the source again on the
 * return path.  So is every page of a reference that this VM cannot
 * resolve: a drive it does not have, a range past the end of its view of
 * the drive.  Only protocol violations (malformed records, pages outside
 * guest RAM, REFS before SETUP) fail the incoming migration.
 *
 * Reads go to the drive's node through a BlockBackend of our own: not
 * throttled by the guest's iotune limits, and keeping the node alive if
 * the device is unplugged while the migration comes in.
 *
 * Every page sent as a reference carries a ticket (its record's sequence
 * number) until it is resolved: verified, superseded by newer data, or
 * received again in full.  SYNC waits for all reads and answers how many
 * pages are still waiting for the source; the final SYNC, and the end of
 * loading, fail the migration if any page is unresolved.
 *
 * Everything here runs in the main loop: the incoming coroutine and the
 * fetch coroutines it starts.  Only the incoming coroutine writes to the
 * return path: fetches queue their RESEND requests for it.  The return path
 * is a non-blocking channel, so a writer yields when it is full, holding
 * the (thread) mutex of the return path; a second coroutine writing then
 * would block the main loop, and with it the first, for good.
 */
#include "qemu/osdep.h"
#include "qemu/coroutine.h"
#include "qemu/cutils.h"
#include "qemu/error-report.h"
#include "qemu/main-loop.h"
#include "qemu/memalign.h"
#include "qapi/error.h"
#include "io/channel.h"
#include "system/block-backend.h"
#include "exec/target_page.h"
#include "migration.h"
#include "qemu-file.h"
#include "nas-dedup-int.h"
#include "nas-dedup-wire.h"
#include "trace.h"

/*
 * Reads in flight.  The read of a run is up to 1 MiB; more than a few in
 * flight only made them slower here (loopback nfs-ganesha on 2 cores:
 * 4 and 8 best, 32 a third slower, 64 slower still).
 */
#define NAS_DEDUP_INFLIGHT 8
/*
 * REFS records waiting for a free read slot.  While the queue has room
 * the incoming stream goes on at link speed; when it is full (~4 GiB of
 * references queued, ~20 MiB of records), the stream waits.
 */
#define NAS_DEDUP_QUEUE_MAX 4096
/* Read buffers are kept for the next fetch: fresh ones cost page faults. */
#define NAS_DEDUP_BUF_SIZE (NAS_DEDUP_REFS_MAX * NAS_DEDUP_CHUNK)
#define TICKET_AWAITING UINT32_MAX  /* asked from the source again */

/*
 * A read-only view of one of this VM's guest drives: a BlockBackend of
 * our own on the drive's node.
 */
typedef struct LoadView {
    char *id;                   /* the guest device's id or QOM path */
    BlockBackend *blk;
    uint64_t size;
} LoadView;

/* A drive number of the stream. */
typedef struct LoadDrive {
    BlockBackend *blk;          /* a view's; NULL: this VM has no such drive */
    uint64_t size;              /* the smaller of what both sides know */
} LoadDrive;

/* The tickets of the pages of one RAMBlock. */
typedef struct Tickets {
    uint32_t *t;
    unsigned long npages;
} Tickets;

typedef struct LoadState LoadState;

/* Pages to ask from the source again, not asked yet. */
typedef struct Resend {
    RAMBlock *block;
    ram_addr_t offset;
    uint32_t npages;
} Resend;

typedef struct Fetch {
    LoadState *st;
    LoadDrive *drive;
    RAMBlock *block;
    ram_addr_t offset;
    NasDedupRecord *rec;
    uint32_t ticket;
} Fetch;

/*
 * One incoming migration.  Fetches still running when the load ends (it
 * failed) keep it alive; the last one frees it.
 */
struct LoadState {
    bool dead;
    GHashTable *drives;         /* drive number -> LoadDrive */
    GPtrArray *views;           /* LoadView, made at the first DRIVE */
    GHashTable *tickets;        /* RAMBlock * -> Tickets */
    RAMBlock *last_block;       /* cache for tickets_of() */
    Tickets *last_tickets;
    bool have_setup;
    NasDedupKey key;            /* from SETUP */
    uint16_t resend_msg;        /* return-path numbers, from SETUP */
    uint16_t sync_ack_msg;
    bool resend_failed;         /* reported once */
    uint32_t next_ticket;
    uint64_t pending;           /* pages with a ticket */
    uint64_t awaiting;          /* of which asked from the source */
    unsigned inflight;          /* fetch coroutines */
    GQueue queue;               /* Fetch, waiting for a fetch coroutine */
    int64_t busy_since;         /* when inflight became non-zero, in us */
    CoQueue waitq;
    GArray *resends;            /* Resend, queued by fetches */
    GPtrArray *bufs;            /* free read buffers, NAS_DEDUP_BUF_SIZE */
    bool refs_seen;
    bool final_seen;
    bool rp_nodelay;
};

static LoadState *load;

static void views_free_bh(void *opaque)
{
    GPtrArray *views = opaque;
    guint i;

    for (i = 0; i < views->len; i++) {
        LoadView *v = g_ptr_array_index(views, i);

        blk_unref(v->blk);
        g_free(v->id);
        g_free(v);
    }
    g_ptr_array_free(views, true);
}

/*
 * Let go of the views, once no fetch uses them: from a bottom half, as
 * unref may need to change the block graph, which a coroutine (the
 * incoming one, or the last fetch) must not do while it is in the middle
 * of tearing the load down.  Until then, a view keeps the node alive and
 * lets it move to another AioContext (an iothread started with the
 * guest).
 */
static void views_drop(LoadState *st)
{
    GHashTableIter iter;
    gpointer value;

    if (!st->views) {
        return;
    }
    g_hash_table_iter_init(&iter, st->drives);
    while (g_hash_table_iter_next(&iter, NULL, &value)) {
        ((LoadDrive *)value)->blk = NULL;
    }
    aio_bh_schedule_oneshot(qemu_get_aio_context(), views_free_bh, st->views);
    st->views = NULL;
}

static void tickets_free(gpointer p)
{
    Tickets *t = p;

    g_free(t->t);
    g_free(t);
}

static void load_state_free(LoadState *st)
{
    Fetch *fe;

    while ((fe = g_queue_pop_head(&st->queue))) {
        g_free(fe->rec);
        g_free(fe);
    }
    g_ptr_array_free(st->bufs, true);
    views_drop(st);
    g_hash_table_destroy(st->drives);
    g_hash_table_destroy(st->tickets);
    g_array_free(st->resends, true);
    g_free(st);
}

int nas_dedup_load_setup(Error **errp)
{
    LoadState *st = g_new0(LoadState, 1);

    st->drives = g_hash_table_new_full(NULL, NULL, NULL, g_free);
    st->tickets = g_hash_table_new_full(NULL, NULL, NULL, tickets_free);
    qemu_co_queue_init(&st->waitq);
    g_queue_init(&st->queue);
    st->resends = g_array_new(false, false, sizeof(Resend));
    st->bufs = g_ptr_array_new_with_free_func(qemu_vfree);
    nas_dedup_load_cleanup();
    load = st;
    nas_dedup_stats_reset(true);
    return 0;
}

void nas_dedup_load_cleanup(void)
{
    if (!load) {
        return;
    }
    if (load->inflight) {
        load->dead = true;      /* the last fetch frees it */
    } else {
        load_state_free(load);
    }
    load = NULL;
}

/*
 * The ticket array of @block, with room for at least its pages up to
 * @end_page (created or grown to the RAMBlock's current length if
 * @create).  A resizable RAMBlock can grow while the stream comes in
 * (RAM_SAVE_FLAG_MEM_SIZE): the array follows.  NULL if there is none or
 * it is too short.
 */
static Tickets *tickets_of(LoadState *st, RAMBlock *block,
                           unsigned long end_page, bool create)
{
    Tickets *t;

    if (block == st->last_block && end_page <= st->last_tickets->npages) {
        return st->last_tickets;
    }
    t = g_hash_table_lookup(st->tickets, block);
    if (create && (!t || t->npages < end_page)) {
        unsigned long n = MAX(end_page,
                              block->used_length >> TARGET_PAGE_BITS);

        if (!t) {
            t = g_new0(Tickets, 1);
            g_hash_table_insert(st->tickets, block, t);
        }
        t->t = g_renew(uint32_t, t->t, n);
        memset(t->t + t->npages, 0, (n - t->npages) * sizeof(uint32_t));
        t->npages = n;
    }
    if (!t || t->npages < end_page) {
        return NULL;
    }
    st->last_block = block;
    st->last_tickets = t;
    return t;
}

/* Forget the ticket of one page; the page is resolved. */
static void ticket_clear(LoadState *st, uint32_t *t, unsigned long page)
{
    if (!t[page]) {
        return;
    }
    if (t[page] == TICKET_AWAITING) {
        st->awaiting--;
    }
    st->pending--;
    t[page] = 0;
}

/*
 * Our return path messages are small and the source may be waiting for
 * them with the guest stopped: no Nagle on the return path.
 */
static void rp_nodelay(MigrationIncomingState *mis)
{
    if (load && !load->rp_nodelay && mis->to_src_file) {
        qio_channel_set_delay(qemu_file_get_ioc(mis->to_src_file), false);
        load->rp_nodelay = true;
    }
}

static void send_resend(LoadState *st, RAMBlock *block, ram_addr_t offset,
                        uint32_t npages)
{
    MigrationIncomingState *mis = migration_incoming_get_current();
    g_autoptr(GByteArray) buf = g_byte_array_new();
    NasDedupResend r = { .offset = offset, .npages = npages };

    pstrcpy(r.id, sizeof(r.id), block->idstr);
    nas_dedup_resend_encode(buf, &r);
    stat64_add(&nas_dedup_counters.resend_requests, npages);
    rp_nodelay(mis);
    if (migrate_send_rp_dedup(mis, st->resend_msg, buf->data,
                              buf->len) < 0 && !st->resend_failed) {
        /*
         * The return path is broken: the final SYNC will not be answered
         * and the load check fails; say it once, not once a run.
         */
        st->resend_failed = true;
        error_report("dedup-nas: could not ask the source for %s 0x%"
                     PRIx64 " x%u (return path failed)", block->idstr,
                     (uint64_t)offset, npages);
    }
}

/*
 * Send the RESEND requests the fetches queued.  May yield: only the
 * incoming coroutine calls it (see the top of the file).  Fetches that
 * complete meanwhile append to the queue, which the loop then sends too.
 */
static void flush_resends(LoadState *st)
{
    guint i;

    if (!st->resends->len || !qemu_in_coroutine()) {
        return;
    }
    for (i = 0; i < st->resends->len; i++) {
        Resend r = g_array_index(st->resends, Resend, i);

        send_resend(st, r.block, r.offset, r.npages);
    }
    g_array_set_size(st->resends, 0);
}

void nas_dedup_load_page_arrived(RAMBlock *block, ram_addr_t offset)
{
    unsigned long page = offset >> TARGET_PAGE_BITS;
    Tickets *t;

    if (!load || !load->pending) {
        return;
    }
    flush_resends(load);
    t = tickets_of(load, block, page + 1, false);
    if (t) {
        ticket_clear(load, t->t, page);
    }
}

/* Ask the source for the pages of @fe's run whose ticket is still @fe's. */
static void resend_run(LoadState *st, Fetch *fe, uint32_t *t, uint32_t first,
                       uint32_t k0, uint32_t n)
{
    Resend r = {
        .block = fe->block,
        .offset = fe->offset + (uint64_t)k0 * NAS_DEDUP_CHUNK,
        .npages = n,
    };
    uint32_t k;

    for (k = k0; k < k0 + n; k++) {
        assert(t[first + k] == fe->ticket);
        t[first + k] = TICKET_AWAITING;
        st->awaiting++;
    }
    if (!st->dead) {
        g_array_append_val(st->resends, r);
    }
}

/*
 * Read, verify and install one run; frees @fe.  @buf may be NULL (no
 * memory: every page is asked again), and so may the drive's BlockBackend
 * (this VM has no such drive).
 */
static void coroutine_fn fetch_one(LoadState *st, Fetch *fe, uint8_t *buf)
{
    NasDedupRecord *rec = fe->rec;
    size_t len = (size_t)rec->npages * NAS_DEDUP_CHUNK;
    unsigned long first = fe->offset >> TARGET_PAGE_BITS;
    uint32_t *t;
    uint32_t k, bad_start = 0, bad = 0;
    int ret = -ENOMEM;

    if (!fe->drive->blk ||
        rec->disk_offset + len > fe->drive->size) {
        ret = -ENOENT;
    } else if (buf) {
        ret = blk_co_pread(fe->drive->blk, rec->disk_offset, len, buf, 0);
        trace_nas_dedup_load_fetch_done(rec->drive, rec->disk_offset,
                                        rec->npages, ret);
        if (ret >= 0) {
            stat64_add(&nas_dedup_counters.fetched_blocks, rec->npages);
            stat64_add(&nas_dedup_counters.fetched_bytes, len);
        }
    }
    /* Created for this run by load_refs(); never shrinks. */
    t = tickets_of(st, fe->block, first + rec->npages, false)->t;
    for (k = 0; k <= rec->npages; k++) {
        bool ok = false;

        if (k < rec->npages) {
            NasDedupHash h;

            if (t[first + k] != fe->ticket) {
                ok = true;      /* superseded by newer data: nothing to do */
            } else if (st->dead) {
                /* The load failed: guest RAM is no longer ours to write. */
                ok = true;
            } else if (ret == -ENOENT) {
                /* not ours to read: asked again */
            } else if (ret < 0) {
                stat64_add(&nas_dedup_counters.read_errors, 1);
            } else {
                nas_dedup_hash_chunk(&st->key, buf + k * NAS_DEDUP_CHUNK, &h);
                if (nas_dedup_hash_equal(&h, &rec->hash[k])) {
                    memcpy(fe->block->host + fe->offset + k * NAS_DEDUP_CHUNK,
                           buf + k * NAS_DEDUP_CHUNK, NAS_DEDUP_CHUNK);
                    ticket_clear(st, t, first + k);
                    stat64_add(&nas_dedup_counters.verified_pages, 1);
                    ok = true;
                } else {
                    stat64_add(&nas_dedup_counters.mismatches, 1);
                    trace_nas_dedup_load_mismatch(fe->block->idstr,
                        fe->offset + k * NAS_DEDUP_CHUNK);
                }
            }
            if (!ok) {
                if (!bad++) {
                    bad_start = k;
                }
                continue;
            }
        }
        if (bad) {
            resend_run(st, fe, t, first, bad_start, bad);
            bad = 0;
        }
    }
    g_free(rec);
    g_free(fe);
}

/*
 * A fetch coroutine: reads the run it was started for, then those queued
 * meanwhile, with one buffer.
 */
static void coroutine_fn nas_dedup_fetch_co(void *opaque)
{
    Fetch *fe = opaque;
    LoadState *st = fe->st;
    uint8_t *buf = st->bufs->len ? g_ptr_array_steal_index_fast(st->bufs, 0) :
                   qemu_try_memalign(qemu_real_host_page_size(),
                                     NAS_DEDUP_BUF_SIZE);

    while (fe) {
        fetch_one(st, fe, buf);
        fe = st->dead ? NULL : g_queue_pop_head(&st->queue);
        qemu_co_queue_restart_all(&st->waitq);  /* the queue has room */
    }
    if (buf) {
        g_ptr_array_add(st->bufs, buf);
    }
    if (--st->inflight == 0) {
        if (st->dead) {
            /* Its reads no longer count: the counters may be a new load's. */
            load_state_free(st);
            return;
        }
        /* (A reader between the two may count the interval twice.) */
        stat64_add(&nas_dedup_counters.fetch_time_us,
                   g_get_monotonic_time() - st->busy_since);
        qatomic_set_i64(&nas_dedup_counters.fetch_busy_since, 0);
    }
    qemu_co_queue_restart_all(&st->waitq);
}

static bool qemufile_read(void *opaque, void *buf, size_t len)
{
    QEMUFile *f = opaque;

    return qemu_get_buffer(f, buf, len) == len && !qemu_file_get_error(f);
}

/*
 * Views of every drive attached to a guest device, made at once before
 * the first fetch: making one takes the block graph's writer lock, which
 * waits for every read in flight, and a read stuck on a stalled NAS would
 * then stall the main loop.  Devices on -blockdev nodes have anonymous
 * BlockBackends: walk them all.
 */
static void coroutine_fn make_views(LoadState *st)
{
    g_autoptr(GPtrArray) ids = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(GPtrArray) nodes = g_ptr_array_new();
    BlockBackend *blk;
    guint i;

    /*
     * First the drives and their nodes, referenced, without yielding:
     * making a view yields, and the monitor may eject or unplug meanwhile.
     */
    for (blk = blk_all_next(NULL); blk; blk = blk_all_next(blk)) {
        if (!blk_get_attached_dev(blk) || !blk_bs(blk)) {
            continue;           /* not a guest drive, or no medium */
        }
        g_ptr_array_add(ids, blk_get_attached_dev_id(blk));
        bdrv_ref(blk_bs(blk));
        g_ptr_array_add(nodes, blk_bs(blk));
    }
    st->views = g_ptr_array_new();
    for (i = 0; i < nodes->len; i++) {
        Error *local_err = NULL;
        LoadView *v = g_new0(LoadView, 1);
        int64_t len;

        v->id = g_strdup(g_ptr_array_index(ids, i));
        v->blk = blk_co_new_with_bs(g_ptr_array_index(nodes, i),
                                    BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL,
                                    &local_err);
        bdrv_co_unref(g_ptr_array_index(nodes, i));
        if (!v->blk) {
            warn_reportf_err(local_err, "dedup-nas: no view of drive '%s', "
                             "its pages will be sent in full: ", v->id);
            g_free(v->id);
            g_free(v);
            continue;
        }
        blk_set_allow_aio_context_change(v->blk, true);
        len = blk_co_getlength(v->blk);
        v->size = len < 0 ? 0 : len;
        g_ptr_array_add(st->views, v);
    }
}

static int coroutine_fn load_drive(const NasDedupRecord *rec, Error **errp)
{
    LoadDrive *d = g_hash_table_lookup(load->drives,
                                       GUINT_TO_POINTER(rec->drive));
    LoadView *v = NULL;
    guint i;

    if (d) {
        error_setg(errp, "dedup-nas: drive %u defined twice", rec->drive);
        return -EINVAL;
    }
    if (!load->views) {
        make_views(load);
    }
    d = g_new0(LoadDrive, 1);
    g_hash_table_insert(load->drives, GUINT_TO_POINTER(rec->drive), d);
    for (i = 0; i < load->views->len; i++) {
        v = g_ptr_array_index(load->views, i);
        if (!strcmp(v->id, rec->id)) {
            break;
        }
        v = NULL;
    }
    if (!v) {
        /* Not a protocol error: its references are asked again. */
        warn_report("dedup-nas: the source refers to drive '%s', which this "
                    "VM does not have (or has no medium in); its pages will "
                    "be sent in full", rec->id);
        return 0;
    }
    d->blk = v->blk;
    d->size = MIN(v->size, rec->disk_size);
    trace_nas_dedup_load_drive(rec->drive, rec->id, d->size);
    return 0;
}

static int coroutine_fn load_refs(NasDedupRecord *rec, RAMBlock *block,
                                  ram_addr_t offset, Error **errp)
{
    LoadDrive *d = g_hash_table_lookup(load->drives,
                                       GUINT_TO_POINTER(rec->drive));
    g_autoptr(Error) err = NULL;
    unsigned long first = offset >> TARGET_PAGE_BITS;
    uint32_t *t, k, ticket;
    Fetch *fe;


    if (!load->have_setup) {
        error_setg(errp, "dedup-nas: REFS record before the SETUP record");
        return -EINVAL;
    }
    if (!d) {
        error_setg(errp, "dedup-nas: REFS record for drive %u, which the "
                   "source never defined", rec->drive);
        return -EINVAL;
    }
    /* Pages outside guest RAM are a protocol error; disk ranges are not. */
    if (!nas_dedup_refs_check(rec, offset, block->used_length, UINT64_MAX,
                              &err)) {
        error_setg(errp, "dedup-nas: %s (RAMBlock %s)",
                   error_get_pretty(err), block->idstr);
        return -EINVAL;
    }
    trace_nas_dedup_load_refs(block->idstr, offset, rec->drive,
                              rec->disk_offset, rec->npages);
    load->refs_seen = true;
    if (++load->next_ticket == TICKET_AWAITING) {
        load->next_ticket = 1;
    }
    ticket = load->next_ticket;
    t = tickets_of(load, block, first + rec->npages, true)->t;
    for (k = 0; k < rec->npages; k++) {
        ticket_clear(load, t, first + k);
        t[first + k] = ticket;
        load->pending++;
    }

    fe = g_new0(Fetch, 1);
    fe->st = load;
    fe->drive = d;
    fe->block = block;
    fe->offset = offset;
    fe->rec = rec;
    fe->ticket = ticket;
    if (load->inflight < NAS_DEDUP_INFLIGHT) {
        if (!load->inflight++) {
            load->busy_since = g_get_monotonic_time();
            qatomic_set_i64(&nas_dedup_counters.fetch_busy_since,
                            load->busy_since);
        }
        qemu_coroutine_enter(qemu_coroutine_create(nas_dedup_fetch_co, fe));
        return 0;
    }
    g_queue_push_tail(&load->queue, fe);
    while (load->queue.length >= NAS_DEDUP_QUEUE_MAX) {
        qemu_co_queue_wait(&load->waitq, NULL);
    }
    return 0;
}

static int coroutine_fn load_sync(const NasDedupRecord *rec, Error **errp)
{
    MigrationIncomingState *mis = migration_incoming_get_current();
    g_autoptr(GByteArray) buf = g_byte_array_new();

    if (!load->have_setup) {
        error_setg(errp, "dedup-nas: SYNC record before the SETUP record");
        return -EINVAL;
    }
    while (load->inflight) {
        qemu_co_queue_wait(&load->waitq, NULL);
    }
    /* Every RESEND goes before the SYNC_ACK that counts it. */
    flush_resends(load);
    trace_nas_dedup_load_sync(rec->seq, rec->final, load->pending);
    if (rec->final) {
        load->final_seen = true;
        views_drop(load);       /* no more reads */
        return nas_dedup_load_check(errp) ? 0 : -EINVAL;
    }
    /* With no read in flight, every pending page awaits the source. */
    if (load->pending != load->awaiting) {
        error_setg(errp, "dedup-nas: internal error: %" PRIu64 " pages "
                   "pending, %" PRIu64 " awaiting", load->pending,
                   load->awaiting);
        return -EINVAL;
    }
    nas_dedup_sync_ack_encode(buf, rec->seq, load->awaiting);
    rp_nodelay(mis);
    if (migrate_send_rp_dedup(mis, load->sync_ack_msg, buf->data,
                              buf->len) < 0) {
        error_setg(errp, "dedup-nas: cannot answer SYNC on the return path");
        return -EIO;
    }
    return 0;
}

static int load_setup(const NasDedupRecord *rec, Error **errp)
{
    if (load->have_setup) {
        error_setg(errp, "dedup-nas: SETUP record sent twice");
        return -EINVAL;
    }
    /* Every REFS comes after SETUP: checked once here. */
    if (TARGET_PAGE_SIZE != NAS_DEDUP_CHUNK) {
        error_setg(errp, "dedup-nas: SETUP record, but this VM's target "
                   "pages are not %u bytes", NAS_DEDUP_CHUNK);
        return -EINVAL;
    }
    if (!migrate_rp_dedup_msg_valid(rec->resend_msg) ||
        !migrate_rp_dedup_msg_valid(rec->sync_ack_msg) ||
        rec->resend_msg == rec->sync_ack_msg) {
        error_setg(errp, "dedup-nas: SETUP record: bad return-path message "
                   "numbers %u and %u", rec->resend_msg, rec->sync_ack_msg);
        return -EINVAL;
    }
    load->key = rec->key;
    load->resend_msg = rec->resend_msg;
    load->sync_ack_msg = rec->sync_ack_msg;
    load->have_setup = true;
    return 0;
}

int nas_dedup_load_record(QEMUFile *f, RAMBlock *block, ram_addr_t offset,
                          Error **errp)
{
    NasDedupRecord *rec = g_new0(NasDedupRecord, 1);
    g_autoptr(Error) err = NULL;
    int ret;

    if (!qemu_in_coroutine() || !load) {
        error_setg(errp, "dedup-nas: record outside a precopy RAM load");
        g_free(rec);
        return -EINVAL;
    }
    flush_resends(load);
    if (!nas_dedup_record_decode(qemufile_read, f, rec, &err)) {
        error_setg(errp, "dedup-nas: malformed record at %s 0x%" PRIx64
                   ": %s", block->idstr, (uint64_t)offset,
                   error_get_pretty(err));
        g_free(rec);
        return -EINVAL;
    }
    switch (rec->type) {
    case NAS_DEDUP_REC_SETUP:
        ret = load_setup(rec, errp);
        break;
    case NAS_DEDUP_REC_DRIVE:
        ret = load_drive(rec, errp);
        break;
    case NAS_DEDUP_REC_REFS:
        ret = load_refs(rec, block, offset, errp);
        if (ret == 0) {
            return 0;           /* the fetch owns @rec */
        }
        break;
    case NAS_DEDUP_REC_SYNC:
        ret = load_sync(rec, errp);
        break;
    default:
        g_assert_not_reached();
    }
    g_free(rec);
    return ret;
}

bool nas_dedup_load_check(Error **errp)
{
    if (!load || !load->refs_seen) {
        return true;
    }
    if (load->inflight || load->pending) {
        error_setg(errp, "dedup-nas: %" PRIu64 " pages sent as references "
                   "were neither verified nor sent again (%u reads in "
                   "flight)", load->pending, load->inflight);
        return false;
    }
    if (!load->final_seen) {
        error_setg(errp, "dedup-nas: the stream ended without the final "
                   "SYNC");
        return false;
    }
    return true;
}
