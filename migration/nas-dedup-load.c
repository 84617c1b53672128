/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas: destination side
 *
 * A REFS record names a run of guest pages and the drive blocks that held
 * the same bytes on the source.  The loader asks the fetch engine
 * (hw/nas-dedup/fetch.c) for an asynchronous read of the blocks from this
 * VM's own drive (the same shared image) and goes on with the stream.
 * When a read completes, each block whose keyed hash (two XXH3-64, the key
 * in the SETUP
 * record) matches goes into guest RAM, unless newer data for that page
 * arrived meanwhile; any other page is asked from the source again on the
 * return path.  So is every page of a reference that this VM cannot
 * resolve: a drive it does not have, a range past the end of its view of
 * the drive.  Only protocol violations (malformed records, pages outside
 * guest RAM, REFS before SETUP) fail the incoming migration.
 *
 * Every page sent as a reference carries a ticket (its record's sequence
 * number) until it is resolved: verified, superseded by newer data, or
 * received again in full.  SYNC waits for all reads and answers how many
 * pages are still waiting for the source; the final SYNC, and the end of
 * loading, fail the migration if any page is unresolved.
 *
 * Three kinds of threads meet here.  The incoming coroutine (main loop)
 * reads the stream and tells of newer data for a page before it writes
 * it; with multifd, so do its receive threads
 * (nas_dedup_load_pages_arrived()).  The fetch engine hands each read's
 * result to fetch_done() in a worker thread of the thread pool, several
 * at once, so that hash checks and the copies into guest RAM (and the
 * faults that populate it) are not on the main loop.  So the tickets and
 * their counts, and everything of @load that fetch_done() touches, are
 * under load_lock, and a fetch installs a page and sets its bit of
 * receivedmap (which multifd's zero pages go by) under it too: a page's
 * ticket is cleared either before the fetch looks at it (the fetch leaves
 * the page alone) or after the fetch installed it (the newer data
 * overwrites it).  (Postcopy's fill places pages with the lock dropped:
 * see Tickets.placing.)  A fetch whose load is over (freed, or a later
 * one started) finds that out under the lock and touches nothing.
 *
 * Until postcopy listens, only the incoming coroutine writes to the
 * return path: fetches queue their RESEND requests for it (after LISTEN,
 * see fill_report()).  The return path
 * is a non-blocking channel, so a writer yields when it is full, holding
 * the (thread) mutex of the return path; a second coroutine writing then
 * would block the main loop, and with it the first, for good.
 */
#include "qemu/osdep.h"
#include "qemu/bitmap.h"
#include "qemu/coroutine.h"
#include "qemu/cutils.h"
#include "qemu/error-report.h"
#include "qemu/madvise.h"
#include "qemu/main-loop.h"
#include "qapi/error.h"
#include "io/channel.h"
#include "exec/target_page.h"
#include "migration.h"
#include "options.h"
#include "postcopy-ram.h"
#include "qemu-file.h"
#include "ram.h"
#include "nas-dedup-int.h"
#include "nas-dedup-wire.h"
#include "trace.h"

#define TICKET_AWAITING UINT32_MAX  /* asked from the source again */

/*
 * The tickets of the pages of one RAMBlock, and (postcopy's fill) the
 * pages being placed with load_lock dropped: by a read, whose ticket
 * stays until they are in place (fill_run()), or from the source's copy
 * by postcopy's listen thread, whose ticket went, and whose bit stays
 * (nas_dedup_load_postcopy_placed()).  Nothing else places them.
 */
typedef struct Tickets {
    uint32_t *t;
    unsigned long *placing;
    unsigned long npages;
} Tickets;

typedef struct LoadState LoadState;

/* Pages to ask from the source again, not asked yet. */
typedef struct Resend {
    RAMBlock *block;
    ram_addr_t offset;
    uint32_t npages;
    uint32_t refs_seq;          /* the ticket: the REFS record they came in */
} Resend;

/* The fetch of one REFS record. */
typedef struct Fetch {
    LoadState *st;              /* only under load_lock, if still @load */
    uint64_t gen;               /* load_gen of @st */
    NasDedupKey key;            /* @st's, for checks outside the lock */
    RAMBlock *block;
    ram_addr_t offset;
    NasDedupRecord *rec;
    uint32_t ticket;
} Fetch;

/*
 * Postcopy's fill: a page a thread faulted on, read from the storage
 * ahead of the fill (docs/devel/nas-dedup.rst, "postcopy").  Until
 * @deadline (monotonic, us), it is not asked from the source.
 */
typedef struct Urgent {
    RAMBlock *block;
    ram_addr_t offset;
    uint32_t ticket;
    int64_t since;              /* when it faulted, us */
    int64_t deadline;
} Urgent;

/* The urgent read of one page, with a copy of its Urgent (which may go). */
typedef struct UrgentRead {
    LoadState *st;              /* only under load_lock, if still @load */
    uint64_t gen;
    NasDedupKey key;
    Urgent u;
    uint16_t drive;
    uint64_t disk_offset;
    NasDedupHash hash;
} UrgentRead;

/* One incoming migration. */
struct LoadState {
    NasDedupFetcher *fetcher;
    GHashTable *tickets;        /* RAMBlock * -> Tickets */
    /* Under load_lock: REFS ticket -> its Fetch, until its result. */
    GHashTable *fetch_of;
    RAMBlock *last_block;       /* cache for tickets_of() */
    Tickets *last_tickets;
    bool have_setup;
    NasDedupKey key;            /* from SETUP */
    uint16_t resend_msg;        /* return-path numbers, from SETUP */
    uint16_t sync_ack_msg;
    uint16_t progress_msg;
    bool resend_failed;         /* reported once */
    uint32_t next_ticket;
    uint64_t pending;           /* pages with a ticket */
    uint64_t awaiting;          /* of which asked from the source */
    /* Under load_lock: fetches end in worker threads. */
    unsigned fetches;           /* Fetch not over yet */
    int64_t busy_since;         /* when fetches became non-zero, in us */
    GArray *resends;            /* Resend, queued by fetches */
    bool resends_queued;        /* hint, read without the lock */
    uint64_t refs_done;         /* pages of refs whose fetch is over */
    unsigned workers;           /* fetch_done() populating, lock dropped */
    uint64_t progress_done;     /* refs_done in the last PROGRESS */
    uint64_t progress_busy_us;  /* fetch_busy_us in the last PROGRESS */
    int64_t progress_us;        /* when it went */
    bool refs_seen;
    bool final_seen;
    bool rp_nodelay;
    /*
     * Postcopy with the fill after LISTEN (docs/devel/nas-dedup.rst,
     * "postcopy"): the lazy final SYNC came (@lazy_seq), and the fetches
     * are held until LISTEN.  Under load_lock, the rest: from LISTEN on,
     * fetches place pages with UFFDIO_COPY (@listening); once postcopy
     * paused, they place nothing (@paused: the source sends every page
     * not placed after recovery); SYNC_ACK(@lazy_seq) went (@lazy_acked).
     */
    bool lazy;
    uint32_t lazy_seq;
    bool listening;
    bool paused;
    bool lazy_acked;
    bool report_scheduled;      /* fill_report_bh() */
    /*
     * Under load_lock, from LISTEN on: reads the fill skipped because none
     * of their pages was still to fill.  (The pages that came from the
     * source first are nas_dedup_counters.fill_met.)
     */
    uint64_t skipped_reads;
    /*
     * Faults read from the storage first (after LISTEN, lazy): under
     * load_lock, host address -> Urgent; @urgent_thread asks the source
     * for those past their deadline, and for all of them once postcopy
     * paused.  @main_tid: the main thread, whose faults go to the source
     * at once (the reads need the main loop).
     */
    GHashTable *urgent;
    QemuCond urgent_cond;
    QemuThread urgent_thread;
    bool urgent_running;
    bool urgent_quit;
    uint32_t main_tid;
    uint32_t fault_read_ms;     /* a fault's deadline; 0: none read first */
};

static LoadState *load;
/* Counts the loads; a fetch of an earlier one leaves a later one alone. */
static uint64_t load_gen;
/*
 * Protects what of @load the fetches touch (see the top), and @load and
 * @load_gen against their change.
 */
static QemuMutex load_lock;
/* Signalled when a LoadState's workers drop to 0. */
static QemuCond load_cond;
/*
 * After LISTEN, RESEND and the last SYNC_ACK go from any thread (fetch
 * workers, the fault thread): taken around taking the queue of RESEND
 * and sending it, so that none goes after the SYNC_ACK that ends them.
 */
static QemuMutex lazy_send_lock;

static void *urgent_thread(void *opaque);

static void tickets_free(gpointer p)
{
    Tickets *t = p;

    g_free(t->t);
    g_free(t->placing);
    g_free(t);
}

static void load_state_free(LoadState *st)
{
    if (st->fetches) {
        /* Cancelled below: the time they took so far is all they count. */
        stat64_add(&nas_dedup_counters.fetch_time_us,
                   g_get_monotonic_time() - st->busy_since);
        qatomic_set_i64(&nas_dedup_counters.fetch_busy_since, 0);
    }
    /* Cancels the fetches still queued or in flight. */
    nas_dedup_fetcher_free(st->fetcher);
    g_hash_table_destroy(st->tickets);
    g_hash_table_destroy(st->fetch_of);
    g_hash_table_destroy(st->urgent);
    qemu_cond_destroy(&st->urgent_cond);
    g_array_free(st->resends, true);
    g_free(st);
}

int nas_dedup_load_setup(Error **errp)
{
    static bool lock_inited;
    LoadState *st = g_new0(LoadState, 1);

    if (!lock_inited) {
        qemu_mutex_init(&load_lock);
        qemu_cond_init(&load_cond);
        qemu_mutex_init(&lazy_send_lock);
        lock_inited = true;
    }
    st->fetcher = nas_dedup_fetcher_new(NAS_DEDUP_REFS_MAX * NAS_DEDUP_CHUNK,
                                        migrate_dedup_nas_fetch_connections());
    st->tickets = g_hash_table_new_full(NULL, NULL, NULL, tickets_free);
    st->fetch_of = g_hash_table_new(NULL, NULL);
    st->urgent = g_hash_table_new_full(NULL, NULL, NULL, g_free);
    qemu_cond_init(&st->urgent_cond);
    st->resends = g_array_new(false, false, sizeof(Resend));
    nas_dedup_load_cleanup();
    WITH_QEMU_LOCK_GUARD(&load_lock) {
        qatomic_set(&load, st);
    }
    nas_dedup_stats_reset(true);
    return 0;
}

void nas_dedup_load_cleanup(void)
{
    LoadState *st = load;

    if (!st) {
        return;
    }
    /*
     * multifd's receive threads were joined before (no more arrivals); a
     * fetch result being handled ends first, later ones find no @load
     * (and no @load_gen of theirs).
     */
    WITH_QEMU_LOCK_GUARD(&load_lock) {
        qatomic_set(&load, NULL);
        load_gen++;
        st->urgent_quit = true;
        qemu_cond_signal(&st->urgent_cond);
        /* Bounded: a worker populating waits for nothing of ours. */
        while (st->workers) {
            qemu_cond_wait(&load_cond, &load_lock);
        }
    }
    if (st->urgent_running) {
        qemu_thread_join(&st->urgent_thread);
    }
    load_state_free(st);
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
        t->placing = g_renew(unsigned long, t->placing, BITS_TO_LONGS(n));
        memset(t->placing + BITS_TO_LONGS(t->npages), 0,
               (BITS_TO_LONGS(n) - BITS_TO_LONGS(t->npages)) *
               sizeof(unsigned long));
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

static void send_resend(LoadState *st, const Resend *q)
{
    MigrationIncomingState *mis = migration_incoming_get_current();
    g_autoptr(GByteArray) buf = g_byte_array_new();
    RAMBlock *block = q->block;
    ram_addr_t offset = q->offset;
    uint32_t npages = q->npages;
    NasDedupResend r = {
        .offset = offset, .npages = npages, .refs_seq = q->refs_seq,
    };

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
 * complete meanwhile queue more, which the loop then sends too.
 */
static void flush_resends(LoadState *st)
{
    g_autoptr(GArray) todo = NULL;
    guint i;

    /* Called for every page: no lock unless a fetch queued something. */
    if (!qemu_in_coroutine()) {
        return;
    }
    while (qatomic_read(&st->resends_queued)) {
        WITH_QEMU_LOCK_GUARD(&load_lock) {
            if (st->resends->len) {
                todo = st->resends;
                st->resends = g_array_new(false, false, sizeof(Resend));
            }
            qatomic_set(&st->resends_queued, false);
        }
        if (!todo) {
            return;
        }
        for (i = 0; i < todo->len; i++) {
            send_resend(st, &g_array_index(todo, Resend, i));
        }
        g_clear_pointer(&todo, g_array_unref);
    }
}

/*
 * Tell the source how far the reads are, at most every
 * NAS_DEDUP_PROGRESS_US and only if some ended since: it shares the
 * pages between the link and the storage by that (the link/NAS split).
 * Called for whatever comes on the main channel (a page, a record, the
 * end of a section, a multifd flush), so that reports keep coming when
 * the source sends no reference.  May yield, as flush_resends().
 */
#define NAS_DEDUP_PROGRESS_US 50000
static void send_progress(LoadState *st)
{
    MigrationIncomingState *mis;
    g_autoptr(GByteArray) buf = NULL;
    NasDedupProgress p;
    int64_t now, since;

    /* Called for every page: the clock first, the lock only then. */
    if (!st->have_setup || !qemu_in_coroutine()) {
        return;
    }
    now = g_get_monotonic_time();
    if (now - st->progress_us < NAS_DEDUP_PROGRESS_US) {
        return;
    }
    /*
     * One snapshot under the lock, as the workers update the counts (the
     * busy time is two of them) under it; and never less than last time,
     * which the source would take for a protocol violation.
     */
    WITH_QEMU_LOCK_GUARD(&load_lock) {
        since = qatomic_read_i64(&nas_dedup_counters.fetch_busy_since);
        p.refs_done = st->refs_done;
        p.fetched_bytes = stat64_get(&nas_dedup_counters.fetched_bytes);
        p.fetch_busy_us = stat64_get(&nas_dedup_counters.fetch_time_us) +
                          (since ? now - since : 0);
    }
    if (p.refs_done == st->progress_done) {
        st->progress_us = now;      /* nothing new: look again later */
        return;
    }
    p.fetch_busy_us = MAX(p.fetch_busy_us, st->progress_busy_us);
    mis = migration_incoming_get_current();
    st->progress_done = p.refs_done;
    st->progress_busy_us = p.fetch_busy_us;
    st->progress_us = now;
    buf = g_byte_array_new();
    nas_dedup_progress_encode(buf, &p);
    rp_nodelay(mis);
    /* A broken return path fails the next SYNC; nothing to add here. */
    migrate_send_rp_dedup(mis, st->progress_msg, buf->data, buf->len);
}

void nas_dedup_load_pages_arrived(RAMBlock *block, const ram_addr_t *offsets,
                                  uint32_t n)
{
    LoadState *st = qatomic_read(&load);
    uint32_t i;

    /*
     * No reference yet, no ticket to clear (and no lock to take for every
     * multifd packet of a migration without dedup-nas).  A REFS record
     * and newer data for its pages cannot cross (docs/devel/nas-dedup.rst,
     * "multifd").
     */
    if (!st || !n || !qatomic_read(&st->refs_seen)) {
        return;
    }
    QEMU_LOCK_GUARD(&load_lock);
    for (i = 0; i < n && st->pending; i++) {
        unsigned long page = offsets[i] >> TARGET_PAGE_BITS;
        Tickets *t = tickets_of(st, block, page + 1, false);

        if (t) {
            ticket_clear(st, t->t, page);
        }
    }
}

void nas_dedup_load_poll(void)
{
    if (load) {
        flush_resends(load);
        send_progress(load);
    }
}

void nas_dedup_load_page_arrived(RAMBlock *block, ram_addr_t offset)
{
    nas_dedup_load_poll();
    nas_dedup_load_pages_arrived(block, &offset, 1);
}

/*
 * Under load_lock: the page at @offset of @block was asked from the
 * source.  If a thread faulted on it and waits for its read, that thread
 * is woken (urgent_thread()) so that it faults again, and postcopy's
 * page request follows the RESEND.
 */
static void urgent_asked(LoadState *st, RAMBlock *block, ram_addr_t offset)
{
    Urgent *u;

    if (!g_hash_table_size(st->urgent)) {
        return;
    }
    u = g_hash_table_lookup(st->urgent, block->host + offset);
    if (u) {
        u->deadline = 0;
        qemu_cond_signal(&st->urgent_cond);
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
        .refs_seq = fe->ticket,
    };
    uint32_t k;

    for (k = k0; k < k0 + n; k++) {
        assert(t[first + k] == fe->ticket);
        t[first + k] = TICKET_AWAITING;
        st->awaiting++;
        urgent_asked(st, fe->block, fe->offset + k * NAS_DEDUP_CHUNK);
    }
    g_array_append_val(st->resends, r);
    qatomic_set(&st->resends_queued, true);
}

/*
 * Fault in (allocate) the guest RAM of the pages of the run at @offset of
 * @block whose @match is true, in host pages.  Best effort: where
 * MADV_POPULATE_WRITE is not supported, the copy faults them in.
 */
static void populate(RAMBlock *block, ram_addr_t offset, const bool *match,
                     uint32_t npages)
{
    uintptr_t hps = qemu_real_host_page_size();
    uint32_t k = 0, n;

    while (k < npages) {
        uintptr_t start, end;

        if (!match[k]) {
            k++;
            continue;
        }
        for (n = 1; k + n < npages && match[k + n]; n++) {
            /* a run of pages that verified */
        }
        start = (uintptr_t)block->host + offset + (uint64_t)k * NAS_DEDUP_CHUNK;
        end = start + (uint64_t)n * NAS_DEDUP_CHUNK;
        start = QEMU_ALIGN_DOWN(start, hps);
        end = QEMU_ALIGN_UP(end, hps);
        qemu_madvise((void *)start, end - start, QEMU_MADV_POPULATE_WRITE);
        k += n;
    }
}

/*
 * Postcopy's fill, under load_lock: the verified page @page of @block (at
 * @host, its ticket still the read's) was placed with UFFDIO_COPY, which
 * woke whoever faulted on it, by @by (the fill, a fault's read), or
 * could not be (@ret < 0).  Returns false if it must be asked from the
 * source.
 */
static bool fill_placed(LoadState *st, RAMBlock *block, uint32_t *t,
                        unsigned long page, void *host, int ret,
                        const char *by)
{
    if (ret == -EEXIST) {
        /*
         * Nothing else places a page with a ticket: the source's copy
         * clears it first (nas_dedup_load_postcopy_placed()), and a page
         * being placed (Tickets.placing) is left to its read.
         */
        error_report("dedup-nas: %s 0x%" PRIx64 " was placed by someone "
                     "else", block->idstr,
                     (uint64_t)page << TARGET_PAGE_BITS);
        ticket_clear(st, t, page);
        return true;
    }
    if (ret < 0 && !ramblock_recv_bitmap_test(block, host)) {
        error_report("dedup-nas: cannot place %s 0x%" PRIx64 ": %s",
                     block->idstr, (uint64_t)page << TARGET_PAGE_BITS,
                     strerror(-ret));
        return false;
    }
    /* (In receivedmap, the copy went: only a shared user's wake failed.) */
    ticket_clear(st, t, page);
    if (g_hash_table_size(st->urgent)) {
        Urgent *u = g_hash_table_lookup(st->urgent, host);

        if (u) {
            /* A fault served by the storage: its read, or the fill's. */
            trace_nas_dedup_load_fill_urgent_done(
                block->idstr, u->offset, by,
                g_get_monotonic_time() - u->since);
            stat64_add(&nas_dedup_counters.fill_fault_reads, 1);
            g_hash_table_remove(st->urgent, host);
        }
    }
    stat64_add(&nas_dedup_counters.verified_pages, 1);
    stat64_add(&nas_dedup_counters.fill_pages, 1);
    return true;
}

/*
 * Postcopy's fill, under load_lock: place one verified page @data, as
 * fill_placed().  Once postcopy paused, nothing is placed: the source
 * sends every page not in receivedmap after postcopy-recover, and its
 * copy would then fail with EEXIST.
 */
static bool fill_page(LoadState *st, RAMBlock *block, uint32_t *t,
                      unsigned long page, void *host, uint8_t *data,
                      const char *by)
{
    if (st->paused) {
        return true;
    }
    return fill_placed(st, block, t, page, host,
                       postcopy_place_page(migration_incoming_get_current(),
                                           host, data, block), by);
}

/*
 * Postcopy's fill, under load_lock: place the pages of @fe's run marked
 * in @placing (and in Tickets.placing) from @buf, with load_lock dropped
 * meanwhile: the listen thread takes it for every page the source sends,
 * and UFFDIO_COPY takes microseconds a page.  A page that cannot be
 * placed is asked from the source.
 */
static void fill_run(LoadState *st, Fetch *fe, Tickets *tk,
                     const bool *placing, uint8_t *buf)
{
    MigrationIncomingState *mis = migration_incoming_get_current();
    uint32_t npages = fe->rec->npages;
    unsigned long first = fe->offset >> TARGET_PAGE_BITS;
    g_autofree int *res = g_new0(int, npages);
    uint32_t k;

    /* The load stays (st->workers) while the lock is dropped. */
    st->workers++;
    qemu_mutex_unlock(&load_lock);
    for (k = 0; k < npages; k++) {
        if (placing[k]) {
            res[k] = postcopy_place_page(mis, fe->block->host + fe->offset +
                                         (uint64_t)k * NAS_DEDUP_CHUNK,
                                         buf + k * NAS_DEDUP_CHUNK,
                                         fe->block);
        }
    }
    qemu_mutex_lock(&load_lock);
    if (--st->workers == 0) {
        qemu_cond_broadcast(&load_cond);
    }
    for (k = 0; k < npages; k++) {
        void *host = fe->block->host + fe->offset +
                     (uint64_t)k * NAS_DEDUP_CHUNK;

        if (!placing[k]) {
            continue;
        }
        clear_bit(first + k, tk->placing);
        /* (Nothing but us clears a ticket of a page being placed.) */
        if (!fill_placed(st, fe->block, tk->t, first + k, host, res[k],
                         "fill") && !st->paused) {
            resend_run(st, fe, tk->t, first, k, 1);
        }
    }
}

/*
 * Under load_lock: whether postcopy's fill is over: every page with a
 * ticket is asked from the source.  Reads may still be in flight, when
 * the source sent the pages they are for (nas_dedup_save_meet()): they
 * place nothing when they end, and a stalled storage holds up nothing.
 */
static bool fill_over(LoadState *st)
{
    return !st->fetches || st->pending == st->awaiting;
}

/*
 * Postcopy's fill, any thread but under no lock of ours: send the RESEND
 * queued, and once no read is left, SYNC_ACK for the lazy SYNC, after
 * every RESEND: the source sends EOS only after it, and after every page
 * asked.  The caller keeps @st alive (st->workers, or the main thread).
 */
static void fill_report(LoadState *st)
{
    MigrationIncomingState *mis = migration_incoming_get_current();

    QEMU_LOCK_GUARD(&lazy_send_lock);
    for (;;) {
        g_autoptr(GByteArray) buf = NULL;
        GArray *todo = NULL;
        uint64_t awaiting = 0;
        bool ack = false;
        guint i;

        WITH_QEMU_LOCK_GUARD(&load_lock) {
            if (st->resends->len) {
                todo = st->resends;
                st->resends = g_array_new(false, false, sizeof(Resend));
            }
            qatomic_set(&st->resends_queued, false);
            if (todo && st->paused) {
                /* After recovery the source sends every page not placed. */
                g_array_set_size(todo, 0);
            }
            if (!todo && st->listening && !st->paused && !st->lazy_acked &&
                fill_over(st)) {
                st->lazy_acked = true;
                ack = true;
                awaiting = st->awaiting;
            }
        }
        if (todo) {
            for (i = 0; i < todo->len; i++) {
                send_resend(st, &g_array_index(todo, Resend, i));
            }
            g_array_free(todo, true);
            continue;
        }
        if (ack) {
            trace_nas_dedup_load_fill_done(st->lazy_seq, awaiting);
            buf = g_byte_array_new();
            nas_dedup_sync_ack_encode(buf, st->lazy_seq, awaiting);
            rp_nodelay(mis);
            if (migrate_send_rp_dedup(mis, st->sync_ack_msg, buf->data,
                                      buf->len) < 0) {
                /* Postcopy pauses; the recovery needs no answer. */
                error_report("dedup-nas: cannot answer SYNC %u on the "
                             "return path", st->lazy_seq);
            }
        }
        return;
    }
}

/*
 * fill_report() from under load_lock, dropped meanwhile: @st stays
 * (st->workers).
 */
static void fill_report_locked(LoadState *st)
{
    st->workers++;
    qemu_mutex_unlock(&load_lock);
    fill_report(st);
    qemu_mutex_lock(&load_lock);
    if (--st->workers == 0) {
        qemu_cond_broadcast(&load_cond);
    }
}

/*
 * Under load_lock, after a page with a ticket was resolved by other than
 * its read: whether that was the last page to fill while reads are still
 * in flight, so that the answer must go now (once the reads end, their
 * worker sends it).
 */
static bool fill_report_due(LoadState *st)
{
    return st->listening && !st->paused && !st->lazy_acked &&
           st->fetches && fill_over(st);
}

typedef struct ReportBH {
    LoadState *st;
    uint64_t gen;
} ReportBH;

/*
 * fill_report() for postcopy's listen threads, in the main loop: they
 * must not wait for the return path (the source's return-path thread may
 * be writing to the channel one of them reads) nor for lazy_send_lock.
 */
static void fill_report_bh(void *opaque)
{
    ReportBH *r = opaque;

    WITH_QEMU_LOCK_GUARD(&load_lock) {
        if (load == r->st && load_gen == r->gen) {
            r->st->report_scheduled = false;
            fill_report_locked(r->st);
        }
    }
    g_free(r);
}

/*
 * Whether a page of @opaque's run is still to read (main loop, as its
 * read starts): in postcopy's fill, the source may have sent them all
 * meanwhile (nas_dedup_save_meet()).
 */
static bool fetch_wanted(void *opaque)
{
    Fetch *fe = opaque;
    LoadState *st = fe->st;
    unsigned long first = fe->offset >> TARGET_PAGE_BITS;
    uint32_t *t, k;

    QEMU_LOCK_GUARD(&load_lock);
    if (load != st || load_gen != fe->gen) {
        return true;            /* fetch_done() finds out */
    }
    if (!st->listening) {
        /*
         * Before, every REFS record is read once (fetched-blocks counts
         * them all): newer data for a whole run is rare, and the reads
         * are soon over anyway.
         */
        return true;
    }
    t = tickets_of(st, fe->block, first + fe->rec->npages, false)->t;
    for (k = 0; k < fe->rec->npages; k++) {
        if (t[first + k] == fe->ticket) {
            return true;
        }
    }
    st->skipped_reads++;
    return false;
}

/*
 * The fetch engine read the blocks of @opaque's run into @buf, or could
 * not (@ret < 0): verify and install them, ask the source for the others.
 * In a worker thread (see the top of the file).
 */
static void fetch_done(void *opaque, uint8_t *buf, int ret)
{
    Fetch *fe = opaque;
    LoadState *st = fe->st;
    NasDedupRecord *rec = fe->rec;
    unsigned long first = fe->offset >> TARGET_PAGE_BITS;
    g_autofree bool *match = NULL;
    g_autofree bool *placing = NULL;
    Tickets *tk;
    uint32_t *t;
    uint32_t k, bad_start = 0, bad = 0, nplace = 0;

    if (ret == -ECANCELED) {
        /* The load is over: guest RAM and @st are no longer ours. */
        goto out;
    }
    if (ret >= 0) {
        /* Verified before taking the lock, which others wait on. */
        match = g_new(bool, rec->npages);
        for (k = 0; k < rec->npages; k++) {
            NasDedupHash h;

            nas_dedup_hash_chunk(&fe->key, buf + k * NAS_DEDUP_CHUNK, &h);
            match[k] = nas_dedup_hash_equal(&h, &rec->hash[k]);
        }
    }
    qemu_mutex_lock(&load_lock);
    if (load != st || load_gen != fe->gen) {
        /* Over meanwhile, as above. */
        qemu_mutex_unlock(&load_lock);
        goto out;
    }
    if (ret >= 0) {
        /*
         * Populate the guest RAM of the pages that verified, with the lock
         * dropped (the first touch zeroes them, which is slow) and the
         * load kept alive by st->workers: the copies under the lock then
         * only copy.  A page that newer data overwrites meanwhile would
         * have been populated by that data anyway.  Not in postcopy's
         * fill (after the lazy SYNC, which held the results until LISTEN):
         * userfaultfd guards the pages, and UFFDIO_COPY allocates them.
         */
        if (!st->lazy) {
            st->workers++;
            qemu_mutex_unlock(&load_lock);
            populate(fe->block, fe->offset, match, rec->npages);
            qemu_mutex_lock(&load_lock);
            if (--st->workers == 0) {
                qemu_cond_broadcast(&load_cond);
            }
        }
        stat64_add(&nas_dedup_counters.fetched_blocks, rec->npages);
        stat64_add(&nas_dedup_counters.fetched_bytes,
                   (uint64_t)rec->npages * NAS_DEDUP_CHUNK);
    }
    g_hash_table_remove(st->fetch_of, GUINT_TO_POINTER(fe->ticket));
    /* Created for this run by load_refs(); never shrinks. */
    tk = tickets_of(st, fe->block, first + rec->npages, false);
    t = tk->t;
    if (st->lazy && ret >= 0) {
        placing = g_new0(bool, rec->npages);
    }
    for (k = 0; k <= rec->npages; k++) {
        bool ok = false;

        if (k < rec->npages) {
            if (t[first + k] != fe->ticket) {
                ok = true;      /* superseded by newer data: nothing to do */
            } else if (ret == -ENOENT || ret == -EALREADY) {
                /* not ours to read: asked again (skipped: none is left) */
            } else if (ret < 0) {
                stat64_add(&nas_dedup_counters.read_errors, 1);
            } else if (match[k]) {
                void *host = fe->block->host + fe->offset +
                             k * NAS_DEDUP_CHUNK;

                if (placing) {
                    /* Placed by fill_run(), unless postcopy paused. */
                    if (!st->paused) {
                        set_bit(first + k, tk->placing);
                        placing[k] = true;
                        nplace++;
                    }
                    ok = true;
                } else {
                    memcpy(host, buf + k * NAS_DEDUP_CHUNK, NAS_DEDUP_CHUNK);
                    ramblock_recv_bitmap_set(fe->block, host);
                    ticket_clear(st, t, first + k);
                    stat64_add(&nas_dedup_counters.verified_pages, 1);
                    ok = true;
                }
            } else {
                stat64_add(&nas_dedup_counters.mismatches, 1);
                trace_nas_dedup_load_mismatch(fe->block->idstr,
                    fe->offset + k * NAS_DEDUP_CHUNK);
            }
            if (!ok && st->paused) {
                /* Sent again anyway after postcopy-recover. */
                ok = true;
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
    if (nplace) {
        fill_run(st, fe, tk, placing, buf);
    }
    st->refs_done += rec->npages;
    if (--st->fetches == 0) {
        /* (A reader between the two may count the interval twice.) */
        stat64_add(&nas_dedup_counters.fetch_time_us,
                   g_get_monotonic_time() - st->busy_since);
        qatomic_set_i64(&nas_dedup_counters.fetch_busy_since, 0);
    }
    if (st->listening) {
        /* Postcopy: no incoming coroutine to send what we queued. */
        fill_report_locked(st);
    }
    qemu_mutex_unlock(&load_lock);
out:
    g_free(rec);
    g_free(fe);
}

static bool qemufile_read(void *opaque, void *buf, size_t len)
{
    QEMUFile *f = opaque;

    return qemu_get_buffer(f, buf, len) == len && !qemu_file_get_error(f);
}

static int coroutine_fn load_drive(const NasDedupRecord *rec, Error **errp)
{
    int ret = nas_dedup_fetcher_define(load->fetcher, rec->drive, rec->id,
                                       rec->disk_size, errp);

    qatomic_set(&nas_dedup_counters.fetch_connections,
                nas_dedup_fetcher_connections(load->fetcher));
    return ret;
}

static int coroutine_fn load_refs(NasDedupRecord *rec, RAMBlock *block,
                                  ram_addr_t offset, Error **errp)
{
    g_autoptr(Error) err = NULL;
    unsigned long first = offset >> TARGET_PAGE_BITS;
    uint32_t *t, k, ticket;
    Fetch *fe;

    if (!load->have_setup) {
        error_setg(errp, "dedup-nas: REFS record before the SETUP record");
        return -EINVAL;
    }
    if (load->final_seen) {
        error_setg(errp, "dedup-nas: REFS record after the final SYNC");
        return -EINVAL;
    }
    if (!nas_dedup_fetcher_has_drive(load->fetcher, rec->drive)) {
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
    qatomic_set(&load->refs_seen, true);
    /* The record's number (nas-dedup-wire.h), which RESEND names. */
    ticket = load->next_ticket = nas_dedup_refs_seq_next(load->next_ticket);
    fe = g_new0(Fetch, 1);
    fe->st = load;
    fe->key = load->key;
    fe->block = block;
    fe->offset = offset;
    fe->rec = rec;
    fe->ticket = ticket;
    WITH_QEMU_LOCK_GUARD(&load_lock) {
        fe->gen = load_gen;
        t = tickets_of(load, block, first + rec->npages, true)->t;
        for (k = 0; k < rec->npages; k++) {
            ticket_clear(load, t, first + k);
            t[first + k] = ticket;
            load->pending++;
        }
        g_hash_table_insert(load->fetch_of, GUINT_TO_POINTER(ticket), fe);
        if (!load->fetches++) {
            load->busy_since = g_get_monotonic_time();
            qatomic_set_i64(&nas_dedup_counters.fetch_busy_since,
                            load->busy_since);
        }
    }
    nas_dedup_fetcher_read(load->fetcher, rec->drive, rec->disk_offset,
                           (size_t)rec->npages * NAS_DEDUP_CHUNK,
                           fetch_wanted, fetch_done, fe);
    return 0;
}

/*
 * The lazy final SYNC: postcopy is about to start, and the references
 * still unresolved are filled once the destination listens (see
 * nas_dedup_load_postcopy_listen()).  Until then, hold the results of
 * the reads: from when postcopy registers guest RAM with userfaultfd, a
 * write to a page not yet there would fault and wait for the source,
 * which does not send pages it sent as references.
 */
static int coroutine_fn load_sync_lazy(const NasDedupRecord *rec,
                                       Error **errp)
{
    if (!migrate_postcopy_ram()) {
        error_setg(errp, "dedup-nas: lazy final SYNC record, but postcopy "
                   "is not on");
        return -EINVAL;
    }
    /* The RESEND queued so far, from here: no result is handled later. */
    flush_resends(load);
    nas_dedup_fetcher_hold(load->fetcher);
    flush_resends(load);
    WITH_QEMU_LOCK_GUARD(&load_lock) {
        trace_nas_dedup_load_sync(rec->seq, rec->final, load->pending);
        load->final_seen = true;
        load->lazy = true;
        load->lazy_seq = rec->seq;
    }
    return 0;
}

static int coroutine_fn load_sync(const NasDedupRecord *rec, Error **errp)
{
    MigrationIncomingState *mis = migration_incoming_get_current();
    g_autoptr(GByteArray) buf = g_byte_array_new();
    uint64_t pending, awaiting;

    if (!load->have_setup) {
        error_setg(errp, "dedup-nas: SYNC record before the SETUP record");
        return -EINVAL;
    }
    if (rec->lazy) {
        return load_sync_lazy(rec, errp);
    }
    nas_dedup_fetcher_drain(load->fetcher);
    /* Every RESEND goes before the SYNC_ACK that counts it. */
    flush_resends(load);
    WITH_QEMU_LOCK_GUARD(&load_lock) {
        pending = load->pending;
        awaiting = load->awaiting;
    }
    trace_nas_dedup_load_sync(rec->seq, rec->final, pending);
    if (rec->final) {
        load->final_seen = true;
        nas_dedup_fetcher_close(load->fetcher);     /* no more reads */
        return nas_dedup_load_check(errp) ? 0 : -EINVAL;
    }
    /* With no read in flight, every pending page awaits the source. */
    if (pending != awaiting) {
        error_setg(errp, "dedup-nas: internal error: %" PRIu64 " pages "
                   "pending, %" PRIu64 " awaiting", pending, awaiting);
        return -EINVAL;
    }
    nas_dedup_sync_ack_encode(buf, rec->seq, awaiting);
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
        !migrate_rp_dedup_msg_valid(rec->progress_msg) ||
        rec->resend_msg == rec->sync_ack_msg ||
        rec->resend_msg == rec->progress_msg ||
        rec->sync_ack_msg == rec->progress_msg) {
        error_setg(errp, "dedup-nas: SETUP record: bad return-path message "
                   "numbers %u, %u and %u", rec->resend_msg,
                   rec->sync_ack_msg, rec->progress_msg);
        return -EINVAL;
    }
    qatomic_set(&nas_dedup_counters.incoming_used, true);
    load->key = rec->key;
    load->resend_msg = rec->resend_msg;
    load->sync_ack_msg = rec->sync_ack_msg;
    load->progress_msg = rec->progress_msg;
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
    nas_dedup_load_poll();
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

bool nas_dedup_load_postcopy_listen(uint32_t fault_read_ms, Error **errp)
{
    LoadState *st = load;
    uint64_t pending = 0, awaiting = 0;
    unsigned fetches = 0;
    GHashTableIter iter;
    gpointer key, value;

    if (!st || !st->refs_seen) {
        return true;
    }
    if (!st->final_seen) {
        error_setg(errp, "dedup-nas: postcopy started before the final "
                   "SYNC: references may be unresolved");
        return false;
    }
    if (!st->lazy) {
        return nas_dedup_load_check(errp);
    }
    /*
     * Guest RAM is registered with userfaultfd by now, the fetches are
     * held.  Every page with a ticket holds stale data (or none): drop it
     * and clear its receivedmap bit, so that a vCPU touching it faults
     * and waits until the fill (or the source) places it with
     * UFFDIO_COPY.  Pages the source will send were discarded before,
     * which cleared their tickets.
     */
    RCU_READ_LOCK_GUARD();
    WITH_QEMU_LOCK_GUARD(&load_lock) {
        g_hash_table_iter_init(&iter, st->tickets);
        while (g_hash_table_iter_next(&iter, &key, &value)) {
            RAMBlock *block = key;
            Tickets *t = value;
            unsigned long page = 0, n;

            while (page < t->npages) {
                if (!t->t[page]) {
                    page++;
                    continue;
                }
                for (n = 1; page + n < t->npages && t->t[page + n]; n++) {
                    /* a run of pages with tickets */
                }
                if (block->page_size != TARGET_PAGE_SIZE ||
                    ram_discard_range(block->idstr,
                                      (uint64_t)page << TARGET_PAGE_BITS,
                                      (uint64_t)n << TARGET_PAGE_BITS)) {
                    error_setg(errp, "dedup-nas: cannot drop %s 0x%" PRIx64
                               " x%lu to fill it after postcopy starts",
                               block->idstr,
                               (uint64_t)page << TARGET_PAGE_BITS, n);
                    return false;
                }
                page += n;
            }
        }
        st->listening = true;
        st->main_tid = qemu_get_thread_id();
        st->fault_read_ms = fault_read_ms;
        pending = st->pending;
        awaiting = st->awaiting;
        fetches = st->fetches;
    }
    trace_nas_dedup_load_fill_listen(pending, awaiting, fetches);
    if (fault_read_ms && pending) {
        /* Before faults may find it running (load_lock orders them). */
        qemu_thread_create(&st->urgent_thread, "nasdedup-fault",
                           urgent_thread, st, QEMU_THREAD_JOINABLE);
        WITH_QEMU_LOCK_GUARD(&load_lock) {
            st->urgent_running = true;
        }
    }
    /* With no read left, the answer goes now. */
    fill_report(st);
    nas_dedup_fetcher_release(st->fetcher);
    return true;
}

void nas_dedup_load_postcopy_discard(const char *ramid, uint64_t start,
                                     uint64_t len)
{
    LoadState *st = load;
    RAMBlock *block;
    Tickets *t;
    unsigned long page, end;

    if (!st || !qatomic_read(&st->refs_seen)) {
        return;
    }
    RCU_READ_LOCK_GUARD();
    block = qemu_ram_block_by_name(ramid);
    if (!block) {
        return;                 /* the discard itself fails */
    }
    QEMU_LOCK_GUARD(&load_lock);
    t = g_hash_table_lookup(st->tickets, block);
    if (!t) {
        return;
    }
    /* Newer data comes for these pages: their references are void. */
    end = MIN((start + len) >> TARGET_PAGE_BITS, t->npages);
    for (page = start >> TARGET_PAGE_BITS; page < end && st->pending;
         page++) {
        ticket_clear(st, t->t, page);
    }
}

/*
 * Under load_lock: ask the source for @page of @block again (its ticket,
 * @t[page], is still that of a read), with a RESEND that fill_report()
 * sends once the lock is dropped.
 */
static void ask_source(LoadState *st, RAMBlock *block, uint32_t *t,
                       unsigned long page)
{
    Resend r = {
        .block = block, .offset = (ram_addr_t)page << TARGET_PAGE_BITS,
        .npages = 1, .refs_seq = t[page],
    };

    assert(t[page] && t[page] != TICKET_AWAITING);
    t[page] = TICKET_AWAITING;
    st->awaiting++;
    g_array_append_val(st->resends, r);
    qatomic_set(&st->resends_queued, true);
}

/*
 * The urgent read of a page a thread faulted on is over (worker thread):
 * place the page if it verifies and is still to fill; otherwise ask the
 * source, at once.
 */
static void urgent_done(void *opaque, uint8_t *buf, int ret)
{
    UrgentRead *ur = opaque;
    LoadState *st = ur->st;
    RAMBlock *block = ur->u.block;
    unsigned long page = ur->u.offset >> TARGET_PAGE_BITS;
    void *host = block->host + ur->u.offset;
    bool match = false;
    Tickets *tk;
    uint32_t *t;

    if (ret == -ECANCELED) {
        g_free(ur);
        return;
    }
    if (ret >= 0) {
        NasDedupHash h;

        nas_dedup_hash_chunk(&ur->key, buf, &h);
        match = nas_dedup_hash_equal(&h, &ur->hash);
    }
    QEMU_LOCK_GUARD(&load_lock);
    if (load != st || load_gen != ur->gen) {
        g_free(ur);
        return;
    }
    tk = tickets_of(st, block, page + 1, false);
    t = tk->t;
    if (t[page] != ur->u.ticket || st->paused ||
        test_bit(page, tk->placing)) {
        /*
         * Placed (or being placed) by the fill, or asked from the source
         * (its deadline ran out, the fill's read did not verify, postcopy
         * paused): this result must change nothing.
         */
        trace_nas_dedup_load_fill_urgent_done(
            block->idstr, ur->u.offset, "late",
            g_get_monotonic_time() - ur->u.since);
        g_free(ur);
        return;
    }
    if (ret >= 0) {
        stat64_add(&nas_dedup_counters.fetched_blocks, 1);
        stat64_add(&nas_dedup_counters.fetched_bytes, NAS_DEDUP_CHUNK);
    }
    if (match && fill_page(st, block, t, page, host, buf, "read")) {
        if (fill_report_due(st)) {
            fill_report_locked(st);
        }
        g_free(ur);
        return;
    }
    if (ret >= 0 && !match) {
        stat64_add(&nas_dedup_counters.mismatches, 1);
        trace_nas_dedup_load_mismatch(block->idstr, ur->u.offset);
    } else if (ret < 0 && ret != -ENOENT) {
        stat64_add(&nas_dedup_counters.read_errors, 1);
    }
    /* Not placed (fill_page() keeps the ticket when it fails): ours still. */
    ask_source(st, block, t, page);
    urgent_asked(st, block, ur->u.offset);
    g_free(ur);
}

/*
 * Start an urgent read, in the main loop (the fetcher's).  The load
 * cleanup runs under the BQL too: @st, if still @load, stays.
 */
static void urgent_bh(void *opaque)
{
    UrgentRead *ur = opaque;
    bool live;

    assert(bql_locked());
    WITH_QEMU_LOCK_GUARD(&load_lock) {
        live = load == ur->st && load_gen == ur->gen && !ur->st->paused;
    }
    if (!live) {
        g_free(ur);
        return;
    }
    nas_dedup_fetcher_read_urgent(ur->st->fetcher, ur->drive,
                                  ur->disk_offset, NAS_DEDUP_CHUNK,
                                  urgent_done, ur);
}

/*
 * The thread that gives up on the reads of pages that threads faulted
 * on: past their deadline (a stalled storage; a main loop that does not
 * run, e.g. because a vCPU that holds the BQL faulted), asked from the
 * source meanwhile (their fill's read, or their own, did not verify), or
 * all of them once postcopy paused.  It sends the RESEND, then wakes the
 * threads, which fault again: the fault thread, finding the page asked,
 * sends postcopy's page request (only the fault thread may: it alone
 * tracks the RAMBlock of the last request, mis->last_rb).  Waits on
 * nothing but load_lock.
 */
static void *urgent_thread(void *opaque)
{
    MigrationIncomingState *mis = migration_incoming_get_current();
    LoadState *st = opaque;

    qemu_mutex_lock(&load_lock);
    while (!st->urgent_quit) {
        g_autoptr(GArray) wake = NULL;
        int64_t now = g_get_monotonic_time(), next = INT64_MAX;
        GHashTableIter iter;
        gpointer value;
        guint i;

        g_hash_table_iter_init(&iter, st->urgent);
        while (g_hash_table_iter_next(&iter, NULL, &value)) {
            Urgent u = *(Urgent *)value;
            unsigned long page = u.offset >> TARGET_PAGE_BITS;
            Tickets *tk = tickets_of(st, u.block, page + 1, false);
            uint32_t *t = tk->t;
            const char *why = "asked";

            if (t[page] == u.ticket && !st->paused &&
                test_bit(page, tk->placing)) {
                continue;       /* the fill's copy wakes it, and drops it */
            }
            if (t[page] == u.ticket && !st->paused && u.deadline > now) {
                next = MIN(next, u.deadline);
                continue;
            }
            g_hash_table_iter_remove(&iter);    /* frees *value */
            if (!t[page]) {
                continue;       /* placed */
            }
            if (st->paused) {
                /* Their page requests are sent again after recovery. */
                why = "paused";
            } else if (t[page] == u.ticket) {
                ask_source(st, u.block, t, page);
                stat64_add(&nas_dedup_counters.fill_faults, 1);
                /* (The main thread faulted on it too: cut short.) */
                why = u.deadline ? "timeout" : "main";
            }
            trace_nas_dedup_load_fill_urgent_done(u.block->idstr, u.offset,
                                                  why, now - u.since);
            if (!wake) {
                wake = g_array_new(false, false, sizeof(Urgent));
            }
            g_array_append_val(wake, u);
        }
        if (wake) {
            st->workers++;
            qemu_mutex_unlock(&load_lock);
            fill_report(st);    /* the RESEND first */
            for (i = 0; i < wake->len; i++) {
                Urgent *u = &g_array_index(wake, Urgent, i);

                /* UFFDIO_WAKE on our userfaultfd, not a shared one. */
                postcopy_wake_shared(&(struct PostCopyFD) {
                                         .fd = mis->userfault_fd },
                                     (uintptr_t)u->block->host + u->offset,
                                     u->block);
            }
            qemu_mutex_lock(&load_lock);
            if (--st->workers == 0) {
                qemu_cond_broadcast(&load_cond);
            }
            continue;
        }
        if (next == INT64_MAX) {
            qemu_cond_wait(&st->urgent_cond, &load_lock);
        } else {
            /* At most a second at a time: no overflow of the int. */
            qemu_cond_timedwait(&st->urgent_cond, &load_lock,
                                MIN((next - now + 999) / 1000, 1000));
        }
    }
    qemu_mutex_unlock(&load_lock);
    return NULL;
}

bool nas_dedup_load_postcopy_fault(RAMBlock *block, ram_addr_t offset,
                                   uint32_t tid)
{
    UrgentRead *ur = NULL;
    LoadState *st;
    bool asked = false, urgent = false;

    qemu_mutex_lock(&load_lock);
    st = load;
    if (st && st->listening && !st->paused && st->pending) {
        unsigned long page = offset >> TARGET_PAGE_BITS;
        Tickets *t = tickets_of(st, block, page + 1, false);
        uint32_t ticket = t ? t->t[page] : 0;
        void *host = block->host + offset;
        /* Unknown (0) may be the main thread too. */
        bool main_thread = !tid || tid == st->main_tid;
        Urgent *u = NULL;
        Fetch *fe = NULL;

        if (ticket && ticket != TICKET_AWAITING) {
            u = g_hash_table_lookup(st->urgent, host);
            fe = g_hash_table_lookup(st->fetch_of, GUINT_TO_POINTER(ticket));
        }
        if (ticket && test_bit(page, t->placing)) {
            /* The fill is placing it: its copy wakes the thread. */
            urgent = true;
        } else if (u) {
            /* Its read is under way; the main thread must not wait. */
            if (main_thread) {
                u->deadline = 0;
                qemu_cond_signal(&st->urgent_cond);
            }
            urgent = true;
        } else if (fe && st->urgent_running && !main_thread) {
            /*
             * Read it from the storage, ahead of the fill; the source
             * only if that does not place it in time.
             */
            unsigned k = page - (fe->offset >> TARGET_PAGE_BITS);

            u = g_new0(Urgent, 1);
            u->block = block;
            u->offset = offset;
            u->ticket = ticket;
            u->since = g_get_monotonic_time();
            u->deadline = u->since + (int64_t)st->fault_read_ms * 1000;
            g_hash_table_insert(st->urgent, host, u);
            qemu_cond_signal(&st->urgent_cond);
            ur = g_new0(UrgentRead, 1);
            ur->st = st;
            ur->gen = load_gen;
            ur->key = st->key;
            ur->u = *u;
            ur->drive = fe->rec->drive;
            ur->disk_offset = fe->rec->disk_offset +
                              (uint64_t)k * NAS_DEDUP_CHUNK;
            ur->hash = fe->rec->hash[k];
            urgent = true;
        } else if (ticket && ticket != TICKET_AWAITING) {
            /*
             * From the source at once: the main thread faulted (loading
             * device state, or a device's emulation), and the reads need
             * the main loop; or reads first are off.  The run's fetch
             * leaves the page alone now.
             */
            ask_source(st, block, t->t, page);
            stat64_add(&nas_dedup_counters.fill_faults, 1);
            st->workers++;
            asked = true;
        }
    }
    qemu_mutex_unlock(&load_lock);
    if (ur) {
        trace_nas_dedup_load_fill_urgent(block->idstr, offset, tid);
        aio_bh_schedule_oneshot(qemu_get_aio_context(), urgent_bh, ur);
    }
    if (asked) {
        trace_nas_dedup_load_fill_fault(block->idstr, offset);
        fill_report(st);
        WITH_QEMU_LOCK_GUARD(&load_lock) {
            if (--st->workers == 0) {
                qemu_cond_broadcast(&load_cond);
            }
        }
    }
    return urgent;
}

bool nas_dedup_load_postcopy_placed(RAMBlock *block, void *host)
{
    LoadState *st = qatomic_read(&load);
    unsigned long page;
    ReportBH *report = NULL;
    bool skip = false;
    Tickets *t;

    if (!st || !qatomic_read(&st->lazy)) {
        return false;
    }
    page = ((uint8_t *)host - block->host) >> TARGET_PAGE_BITS;
    qemu_mutex_lock(&load_lock);
    if (load != st || !st->listening) {
        qemu_mutex_unlock(&load_lock);
        return false;
    }
    t = tickets_of(st, block, page + 1, false);
    if (t && test_bit(page, t->placing)) {
        /*
         * Being placed, with load_lock dropped: by the fill (its ticket
         * still on, fill_run()), whose copy wakes whoever faulted on it;
         * or by the listen thread of the other channel (postcopy-preempt),
         * which took the ticket of a copy sent before (below).  The same
         * bytes as this one either way.
         */
        skip = true;
    } else if (t && t->t[page]) {
        /*
         * The source's copy is as good as the reference: the guest was
         * stopped there before postcopy, and the pages it wrote since the
         * reference went were discarded here, which cleared their
         * tickets.  So the page is the source's to place, and its read
         * places nothing: the ticket is gone.
         */
        if (t->t[page] != TICKET_AWAITING) {
            stat64_add(&nas_dedup_counters.fill_met, 1);
        }
        ticket_clear(st, t->t, page);
        /*
         * Asked again and sent by the meet too, its other copy may come
         * on the other channel before this one is in receivedmap.
         */
        set_bit(page, t->placing);
        if (g_hash_table_size(st->urgent) &&
            g_hash_table_lookup(st->urgent, host)) {
            /* Its thread wakes when the page is placed: forget the wait. */
            qemu_cond_signal(&st->urgent_cond);
        }
        /* The last page to fill, with reads still in flight: answer. */
        if (fill_report_due(st) && !st->report_scheduled) {
            report = g_new0(ReportBH, 1);
            report->st = st;
            report->gen = load_gen;
            st->report_scheduled = true;
        }
    } else {
        /*
         * Without a ticket, the page is either not one of ours, or placed
         * by the fill, which sets its bit of receivedmap before it clears
         * the ticket: then UFFDIO_COPY would fail with EEXIST, and the
         * page stays as it is (the guest may have written to it since).
         */
        skip = ramblock_recv_bitmap_test(block, host);
    }
    qemu_mutex_unlock(&load_lock);
    if (report) {
        aio_bh_schedule_oneshot(qemu_get_aio_context(), fill_report_bh,
                                report);
    }
    return skip;
}

void nas_dedup_load_postcopy_pause(void)
{
    GHashTableIter iter;
    gpointer value;

    QEMU_LOCK_GUARD(&load_lock);
    if (load) {
        /*
         * The listen threads stopped: a page whose ticket one of them took
         * but which is not in receivedmap failed to be placed, and comes
         * again after recovery.  (A read's pages being placed keep their
         * ticket and bit until fill_run() is done with them.)
         */
        g_hash_table_iter_init(&iter, load->tickets);
        while (g_hash_table_iter_next(&iter, NULL, &value)) {
            Tickets *t = value;
            unsigned long page = find_first_bit(t->placing, t->npages);

            for (; page < t->npages;
                 page = find_next_bit(t->placing, t->npages, page + 1)) {
                if (!t->t[page]) {
                    clear_bit(page, t->placing);
                }
            }
        }
        load->paused = true;
        /* Its faults read first are asked now, and again after recovery. */
        qemu_cond_signal(&load->urgent_cond);
    }
}

void nas_dedup_load_postcopy_end(void)
{
    LoadState *st = load;
    uint64_t missing = 0;
    GHashTableIter iter;
    gpointer key, value;

    if (!st || !st->lazy) {
        return;
    }
    QEMU_LOCK_GUARD(&load_lock);
    g_hash_table_iter_init(&iter, st->tickets);
    while (g_hash_table_iter_next(&iter, &key, &value)) {
        RAMBlock *block = key;
        Tickets *t = value;
        unsigned long page;

        for (page = 0; page < t->npages; page++) {
            /* Asked again, or left to the source by a recovery. */
            if (t->t[page] &&
                !ramblock_recv_bitmap_test_byte_offset(
                    block, (uint64_t)page << TARGET_PAGE_BITS)) {
                missing++;
            }
        }
    }
    trace_nas_dedup_load_fill_end(st->pending, missing,
                                  stat64_get(&nas_dedup_counters.fill_met),
                                  st->skipped_reads);
    if (missing) {
        error_report("dedup-nas: %" PRIu64 " pages sent as references were "
                     "never placed", missing);
    }
}

bool nas_dedup_load_check(Error **errp)
{
    uint64_t pending;
    unsigned fetches;

    if (!load || !load->refs_seen) {
        return true;
    }
    WITH_QEMU_LOCK_GUARD(&load_lock) {
        pending = load->pending;
        fetches = load->fetches;
    }
    if (fetches || pending) {
        error_setg(errp, "dedup-nas: %" PRIu64 " pages sent as references "
                   "were neither verified nor sent again (%u reads in "
                   "flight)", pending,
                   nas_dedup_fetcher_inflight(load->fetcher));
        return false;
    }
    if (!load->final_seen) {
        error_setg(errp, "dedup-nas: the stream ended without the final "
                   "SYNC");
        return false;
    }
    return true;
}
