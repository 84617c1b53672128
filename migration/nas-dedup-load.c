/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas: destination side
 *
 * A REFS record names a run of guest pages and the drive blocks that held
 * the same bytes on the source.  The loader starts an asynchronous read of
 * the blocks from this VM's own drive (the same shared image) and goes on
 * with the stream; up to NAS_DEDUP_INFLIGHT reads run at once.  When a read
 * completes, each block whose XXH3-128 matches goes into guest RAM, unless
 * newer data for that page arrived meanwhile; any other page is asked from
 * the source again on the return path.
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
#include "nas-dedup.h"
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

typedef struct LoadDrive {
    BlockBackend *blk;
    uint64_t size;
} LoadDrive;

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
    GHashTable *tickets;        /* RAMBlock * -> uint32_t[pages] */
    RAMBlock *last_block;       /* cache for tickets_of() */
    uint32_t *last_tickets;
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

static void load_state_free(LoadState *st)
{
    Fetch *fe;

    while ((fe = g_queue_pop_head(&st->queue))) {
        g_free(fe->rec);
        g_free(fe);
    }
    g_ptr_array_free(st->bufs, true);
    g_hash_table_destroy(st->drives);
    g_hash_table_destroy(st->tickets);
    g_array_free(st->resends, true);
    g_free(st);
}

int nas_dedup_load_setup(Error **errp)
{
    LoadState *st = g_new0(LoadState, 1);

    st->drives = g_hash_table_new_full(NULL, NULL, NULL, g_free);
    st->tickets = g_hash_table_new_full(NULL, NULL, NULL, g_free);
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

static uint32_t *tickets_of(LoadState *st, RAMBlock *block, bool create)
{
    uint32_t *t;

    if (block == st->last_block) {
        return st->last_tickets;
    }
    t = g_hash_table_lookup(st->tickets, block);
    if (!t && create) {
        t = g_new0(uint32_t, block->used_length >> TARGET_PAGE_BITS);
        g_hash_table_insert(st->tickets, block, t);
    }
    if (t) {
        st->last_block = block;
        st->last_tickets = t;
    }
    return t;
}

/* Forget the ticket of one page; the page is resolved. */
static void ticket_clear(LoadState *st, uint32_t *t, unsigned long page)
{
    if (t[page] == TICKET_AWAITING) {
        st->awaiting--;
    }
    if (t[page]) {
        st->pending--;
        t[page] = 0;
    }
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

static void send_resend(RAMBlock *block, ram_addr_t offset, uint32_t npages)
{
    MigrationIncomingState *mis = migration_incoming_get_current();
    g_autoptr(GByteArray) buf = g_byte_array_new();
    NasDedupResend r = { .offset = offset, .npages = npages };

    pstrcpy(r.id, sizeof(r.id), block->idstr);
    nas_dedup_resend_encode(buf, &r);
    stat64_add(&nas_dedup_counters.resend_requests, npages);
    rp_nodelay(mis);
    if (migrate_send_rp_dedup(mis, false, buf->data, buf->len) < 0) {
        error_report("dedup-nas: could not ask the source for %s 0x%"
                     PRIx64 " x%u", block->idstr, (uint64_t)offset, npages);
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

        send_resend(r.block, r.offset, r.npages);
    }
    g_array_set_size(st->resends, 0);
}

void nas_dedup_load_page_arrived(RAMBlock *block, ram_addr_t offset)
{
    uint32_t *t;

    if (!load || !load->pending) {
        return;
    }
    flush_resends(load);
    t = tickets_of(load, block, false);
    if (t) {
        ticket_clear(load, t, offset >> TARGET_PAGE_BITS);
    }
}

/* Read, verify and install one run; frees @fe.  @buf may be NULL. */
static void coroutine_fn fetch_one(LoadState *st, Fetch *fe, uint8_t *buf)
{
    NasDedupRecord *rec = fe->rec;
    size_t len = (size_t)rec->npages * NAS_DEDUP_CHUNK;
    unsigned long first = fe->offset >> TARGET_PAGE_BITS;
    uint32_t *t;
    uint32_t k, bad_start = 0, bad = 0;
    int ret = -ENOMEM;

    if (buf) {
        ret = blk_co_pread(fe->drive->blk, rec->disk_offset, len, buf, 0);
    }
    trace_nas_dedup_load_fetch_done(rec->drive, rec->disk_offset,
                                    rec->npages, ret);
    if (ret >= 0) {
        stat64_add(&nas_dedup_counters.fetched_blocks, rec->npages);
        stat64_add(&nas_dedup_counters.fetched_bytes, len);
    }
    t = tickets_of(st, fe->block, true);
    for (k = 0; k <= rec->npages; k++) {
        bool ok = false;

        if (k < rec->npages) {
            NasDedupHash h;

            if (t[first + k] != fe->ticket) {
                ok = true;      /* superseded by newer data: nothing to do */
            } else if (ret < 0) {
                stat64_add(&nas_dedup_counters.read_errors, 1);
            } else {
                nas_dedup_hash_chunk(buf + k * NAS_DEDUP_CHUNK, &h);
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
                t[first + k] = TICKET_AWAITING;
                st->awaiting++;
                if (!bad++) {
                    bad_start = k;
                }
                continue;
            }
        }
        if (bad) {
            if (!st->dead) {
                Resend r = {
                    .block = fe->block,
                    .offset = fe->offset + bad_start * NAS_DEDUP_CHUNK,
                    .npages = bad,
                };

                g_array_append_val(st->resends, r);
            }
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
                   qemu_try_blockalign(blk_bs(fe->drive->blk),
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
        stat64_add(&nas_dedup_counters.fetch_time_us,
                   g_get_monotonic_time() - st->busy_since);
        if (st->dead) {
            load_state_free(st);
            return;
        }
    }
    qemu_co_queue_restart_all(&st->waitq);
}

static bool qemufile_read(void *opaque, void *buf, size_t len)
{
    QEMUFile *f = opaque;

    return qemu_get_buffer(f, buf, len) == len && !qemu_file_get_error(f);
}

static int load_drive(const NasDedupRecord *rec, Error **errp)
{
    LoadDrive *d = g_hash_table_lookup(load->drives,
                                       GUINT_TO_POINTER(rec->drive));
    BlockBackend *blk;
    int64_t len;

    if (d) {
        error_setg(errp, "dedup-nas: drive %u defined twice", rec->drive);
        return -EINVAL;
    }
    for (blk = blk_next(NULL); blk; blk = blk_next(blk)) {
        g_autofree char *id = blk_get_attached_dev_id(blk);

        if (!strcmp(id, rec->id)) {
            break;
        }
    }
    if (!blk) {
        error_setg(errp, "dedup-nas: the source refers to drive '%s', which "
                   "this VM does not have", rec->id);
        return -ENOENT;
    }
    len = blk_getlength(blk);
    if (len < 0) {
        error_setg_errno(errp, -len, "dedup-nas: cannot get the size of "
                         "drive '%s'", rec->id);
        return len;
    }
    d = g_new0(LoadDrive, 1);
    d->blk = blk;
    d->size = MIN((uint64_t)len, rec->disk_size);
    g_hash_table_insert(load->drives, GUINT_TO_POINTER(rec->drive), d);
    trace_nas_dedup_drive_new(rec->drive, rec->id, d->size);
    return 0;
}

static int coroutine_fn load_refs(NasDedupRecord *rec, RAMBlock *block,
                                  ram_addr_t offset, Error **errp)
{
    LoadDrive *d = g_hash_table_lookup(load->drives,
                                       GUINT_TO_POINTER(rec->drive));
    g_autofree char *err = NULL;
    unsigned long first = offset >> TARGET_PAGE_BITS;
    uint32_t *t, k, ticket;
    Fetch *fe;

    if (!d) {
        error_setg(errp, "dedup-nas: REFS record for drive %u, which the "
                   "source never defined", rec->drive);
        return -EINVAL;
    }
    if (!nas_dedup_refs_check(rec, offset, block->used_length, d->size,
                              &err)) {
        error_setg(errp, "dedup-nas: %s (RAMBlock %s)", err, block->idstr);
        return -EINVAL;
    }
    trace_nas_dedup_load_refs(block->idstr, offset, rec->drive,
                              rec->disk_offset, rec->npages);
    load->refs_seen = true;
    if (++load->next_ticket == TICKET_AWAITING) {
        load->next_ticket = 1;
    }
    ticket = load->next_ticket;
    t = tickets_of(load, block, true);
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

    while (load->inflight) {
        qemu_co_queue_wait(&load->waitq, NULL);
    }
    /* Every RESEND goes before the SYNC_ACK that counts it. */
    flush_resends(load);
    trace_nas_dedup_load_sync(rec->seq, rec->final, load->pending);
    if (rec->final) {
        load->final_seen = true;
        return nas_dedup_load_check() ? 0 : -EINVAL;
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
    if (migrate_send_rp_dedup(mis, true, buf->data, buf->len) < 0) {
        error_setg(errp, "dedup-nas: cannot answer SYNC on the return path");
        return -EIO;
    }
    return 0;
}

int nas_dedup_load_record(QEMUFile *f, RAMBlock *block, ram_addr_t offset,
                          Error **errp)
{
    NasDedupRecord *rec = g_new0(NasDedupRecord, 1);
    g_autofree char *err = NULL;
    int ret;

    if (!qemu_in_coroutine() || !load) {
        error_setg(errp, "dedup-nas: record outside a precopy RAM load");
        g_free(rec);
        return -EINVAL;
    }
    flush_resends(load);
    if (!nas_dedup_record_decode(qemufile_read, f, rec, &err)) {
        error_setg(errp, "dedup-nas: malformed record at %s 0x%" PRIx64
                   ": %s", block->idstr, (uint64_t)offset, err);
        g_free(rec);
        return -EINVAL;
    }
    switch (rec->type) {
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

uint64_t nas_dedup_load_busy_us(void)
{
    if (!load || !load->inflight) {
        return 0;
    }
    return g_get_monotonic_time() - load->busy_since;
}

bool nas_dedup_load_check(void)
{
    if (!load || !load->refs_seen) {
        return true;
    }
    if (load->inflight || load->pending) {
        error_report("dedup-nas: %" PRIu64 " pages sent as references were "
                     "neither verified nor sent again (%u reads in flight)",
                     load->pending, load->inflight);
        return false;
    }
    if (!load->final_seen) {
        error_report("dedup-nas: the stream ended without the final SYNC");
        return false;
    }
    return true;
}
