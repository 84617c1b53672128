/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas: the source's end of the return path
 *
 * The destination answers on the return path: DEDUP_RESEND names pages it
 * could not verify, DEDUP_SYNC_ACK answers a SYNC record, DEDUP_PROGRESS
 * tells how far its reads are (for the link/NAS split).  The handlers
 * run in the return-path thread and only record what came; the migration
 * thread (nas-dedup-save.c) acts on it.  A message that is malformed,
 * unexpected (dedup-nas off, or not set up yet, or torn down already) or
 * inconsistent fails the migration, never QEMU.
 *
 * Waiting for the destination is bounded: a watchdog thread fails the
 * migration when an answer does not come in time, or when the stopped
 * guest would wait longer than it may (docs/devel/nas-dedup.rst, "Bounds").
 */
#include "qemu/osdep.h"
#include "qemu/bitmap.h"
#include "qemu/host-utils.h"
#include "qemu/rcu.h"
#include "qapi/error.h"
#include "qapi/qapi-commands-yank.h"
#include "qemu/yank.h"
#include "exec/target_page.h"
#include "migration.h"
#include "qemu-file.h"
#include "ram.h"
#include "nas-dedup-int.h"
#include "nas-dedup-wire.h"
#include "options.h"
#include "trace.h"

/* Pages the destination asked again, by RAMBlock. */
typedef struct RpBlock {
    unsigned long *noref;       /* send in full, not as a reference */
    unsigned long *asked;       /* of those, not dirtied again yet */
    unsigned long *scratch;     /* for nas_dedup_rp_redirty() */
    /*
     * The dirty-bitmap sync (modulo 2^16) in which each page was last
     * offered for sending, in full or as a reference: a RESEND for a
     * reference sent in an earlier one is stale (nas_dedup_rp_sending()).
     */
    uint16_t *sent_epoch;
    unsigned long npages;
} RpBlock;

/* REFS records numbered @first and on were offered in sync @epoch. */
typedef struct RefsEpoch {
    uint64_t first;
    uint32_t epoch;
} RefsEpoch;

static struct {
    /*
     * The return-path thread and the migration thread share what @lock
     * protects.  The lock and @ack_sem live as long as QEMU
     * (nas_dedup_rp_init()), so that a message arriving before setup,
     * after cleanup, or in a migration without dedup-nas finds them and
     * fails that migration, never QEMU.  The return-path thread must not
     * take ram.c's bitmap mutex: the migration thread holds it while it
     * blocks sending to a destination that may itself be blocked sending
     * on the return path.  So RESEND only marks pages in @blocks, and the
     * migration thread dirties them (nas_dedup_rp_redirty()).  Lock order:
     * bitmap mutex, then @lock.
     */
    QemuMutex lock;
    QemuSemaphore ack_sem;      /* posted on SYNC_ACK */
    bool active;                /* set up, with a return path */
    bool final_sent;            /* no more failing on our account */
    /*
     * The final SYNC was a lazy one: the destination fills references
     * after postcopy started, and may still ask pages again.
     */
    bool lazy;
    GHashTable *blocks;         /* RAMBlock * -> RpBlock */
    unsigned gen;               /* changes when @blocks is made or freed */
    unsigned long noref_pages;  /* bits set in the noref bitmaps */
    unsigned long asked_pages;  /* bits set in the asked bitmaps */
    /*
     * REFS records sent, and the sync each was offered in, a row per
     * sync that sent any (nas_dedup_rp_refs_sent()).
     */
    uint64_t refs_sent;
    GArray *refs_epochs;
    uint32_t sent_seq;          /* last SYNC sent */
    uint32_t acked_seq;         /* last SYNC answered */
    /*
     * Pages the destination asked again (RESEND) and has not received
     * yet, as its last SYNC_ACK says: sent in full before the next SYNC.
     */
    uint32_t acked_pending;
    /* The destination's last PROGRESS, and how many came. */
    NasDedupProgress progress;
    uint64_t progress_reports;
    int64_t progress_us;        /* when the last came, monotonic */

    /*
     * The watchdog thread, one a migration with a return path.  Armed by
     * the migration thread (@wd_kind, @wd_deadline_ms, @wd_seq under
     * @wd_lock): when the deadline passes and, for a SYNC, no answer came,
     * it fails the migration by shutting its channels down, as
     * migrate_cancel does, which also unblocks a migration thread stuck
     * writing to a destination that stopped reading.
     */
    QemuThread wd_thread;
    MigrationState *wd_owner;   /* referenced while the thread runs */
    QemuMutex wd_lock;
    QemuCond wd_cond;
    bool wd_running;
    bool wd_quit;
    NasDedupWatch wd_kind;
    int64_t wd_deadline_ms;
    uint32_t wd_seq;
} rp;

void nas_dedup_rp_init(void)
{
    qemu_mutex_init(&rp.lock);
    qemu_sem_init(&rp.ack_sem, 0);
    qemu_mutex_init(&rp.wd_lock);
    qemu_cond_init(&rp.wd_cond);
}

static void rp_block_free(gpointer p)
{
    RpBlock *rb = p;

    g_free(rb->noref);
    g_free(rb->asked);
    g_free(rb->scratch);
    g_free(rb->sent_epoch);
    g_free(rb);
}

/* Under rp.lock, while active: @block's state, made on first use. */
static RpBlock *rp_block(RAMBlock *block)
{
    RpBlock *rb = g_hash_table_lookup(rp.blocks, block);

    if (!rb) {
        /* Bounded: 3 bits and 2 bytes a page of guest RAM. */
        rb = g_new0(RpBlock, 1);
        rb->npages = block->max_length >> TARGET_PAGE_BITS;
        rb->noref = bitmap_new(rb->npages);
        rb->asked = bitmap_new(rb->npages);
        rb->scratch = bitmap_new(rb->npages);
        rb->sent_epoch = g_new0(uint16_t, rb->npages);
        g_hash_table_insert(rp.blocks, block, rb);
    }
    return rb;
}

void nas_dedup_rp_fail(MigrationState *s, const Error *err)
{
    /* Atomic with "the final SYNC goes out" (nas_dedup_rp_final()). */
    QEMU_LOCK_GUARD(&rp.lock);
    if (rp.final_sent && !rp.lazy) {
        return;
    }
    if (rp.final_sent) {
        /*
         * Postcopy runs the guest on the destination, which may still
         * wait for pages we would send on its word: shutting the channels
         * down pauses postcopy (postcopy-paused), and postcopy-recover
         * resumes it, with every page the destination has not placed
         * sent in full.  No error set: that would fail the recovery too.
         */
        error_report("dedup-nas: %s; postcopy pauses",
                     error_get_pretty(err));
    } else {
        migrate_set_error(s, err);
    }
    WITH_QEMU_LOCK_GUARD(&s->qemu_file_lock) {
        if (s->rp_state.from_dst_file) {
            qemu_file_shutdown(s->rp_state.from_dst_file);
        }
        if (s->to_dst_file) {
            qemu_file_shutdown(s->to_dst_file);
        }
    }
    if (migrate_multifd()) {
        /*
         * The migration thread may be waiting for a multifd sender that
         * is stuck writing to a destination that stopped reading: shut
         * the multifd channels down too (the migration's yank functions
         * do it for all its channels), and the senders fail.
         */
        YankInstanceList list = { .value = MIGRATION_YANK_INSTANCE };

        qmp_yank(&list, NULL);
    }
}

static void *watchdog_thread(void *opaque)
{
    MigrationState *s = opaque;
    Error *err = NULL;

    qemu_mutex_lock(&rp.wd_lock);
    while (!rp.wd_quit) {
        int64_t left;

        if (rp.wd_kind == NAS_DEDUP_WATCH_NONE) {
            qemu_cond_wait(&rp.wd_cond, &rp.wd_lock);
            continue;
        }
        if (rp.wd_kind == NAS_DEDUP_WATCH_SYNC &&
            (int32_t)(qatomic_load_acquire(&rp.acked_seq) -
                      rp.wd_seq) >= 0) {
            rp.wd_kind = NAS_DEDUP_WATCH_NONE;      /* answered */
            continue;
        }
        left = rp.wd_deadline_ms - qemu_clock_get_ms(QEMU_CLOCK_REALTIME);
        if (left > 0) {
            qemu_cond_timedwait(&rp.wd_cond, &rp.wd_lock, MIN(left, 1000));
            continue;
        }
        if (rp.wd_kind == NAS_DEDUP_WATCH_SYNC) {
            error_setg(&err, "dedup-nas: the destination did not answer "
                       "SYNC %u in time (its reads of shared storage are "
                       "stalled?)", rp.wd_seq);
        } else {
            error_setg(&err, "dedup-nas: switchover exceeded "
                       "downtime-limit + dedup-nas-switchover-slack (%"
                       PRIu64 " ms); the source resumes",
                       migrate_downtime_limit() +
                       migrate_dedup_nas_switchover_slack());
        }
        trace_nas_dedup_rp_watchdog(rp.wd_kind);
        rp.wd_kind = NAS_DEDUP_WATCH_NONE;
        qemu_mutex_unlock(&rp.wd_lock);
        nas_dedup_rp_fail(s, err);
        error_free(err);
        err = NULL;
        qemu_mutex_lock(&rp.wd_lock);
    }
    qemu_mutex_unlock(&rp.wd_lock);
    return NULL;
}

void nas_dedup_rp_watch(NasDedupWatch kind, int64_t deadline_ms,
                        uint32_t seq)
{
    QEMU_LOCK_GUARD(&rp.wd_lock);
    rp.wd_kind = kind;
    rp.wd_deadline_ms = deadline_ms;
    rp.wd_seq = seq;
    qemu_cond_signal(&rp.wd_cond);
}

void nas_dedup_rp_start(MigrationState *s)
{
    nas_dedup_rp_stop();
    /* An answer to an earlier migration's SYNC must not count. */
    while (qemu_sem_timedwait(&rp.ack_sem, 0) == 0) {
        /* drain */
    }
    WITH_QEMU_LOCK_GUARD(&rp.lock) {
        rp.blocks = g_hash_table_new_full(NULL, NULL, NULL, rp_block_free);
        rp.refs_sent = 0;
        rp.refs_epochs = g_array_new(false, false, sizeof(RefsEpoch));
        qatomic_inc(&rp.gen);
        qatomic_set(&rp.noref_pages, 0);
        qatomic_set(&rp.asked_pages, 0);
        rp.sent_seq = 0;
        rp.acked_seq = 0;
        rp.acked_pending = 0;
        memset(&rp.progress, 0, sizeof(rp.progress));
        rp.progress_reports = 0;
        rp.progress_us = 0;
        rp.active = true;       /* final_sent was cleared by the stop */
    }
    rp.wd_quit = false;
    rp.wd_kind = NAS_DEDUP_WATCH_NONE;
    rp.wd_running = true;
    rp.wd_owner = s;
    object_ref(OBJECT(s));      /* until the thread is joined */
    qemu_thread_create(&rp.wd_thread, "mig/dedup-wd", watchdog_thread, s,
                       QEMU_THREAD_JOINABLE);
}

void nas_dedup_rp_stop(void)
{
    if (rp.wd_running) {
        WITH_QEMU_LOCK_GUARD(&rp.wd_lock) {
            rp.wd_quit = true;
            qemu_cond_signal(&rp.wd_cond);
        }
        qemu_thread_join(&rp.wd_thread);
        rp.wd_running = false;
        object_unref(OBJECT(rp.wd_owner));
        rp.wd_owner = NULL;
    }
    WITH_QEMU_LOCK_GUARD(&rp.lock) {
        rp.active = false;
        /*
         * This migration is over: in the next one, with dedup-nas or
         * without, a message of ours is unexpected until it sets up.
         */
        rp.final_sent = false;
        rp.lazy = false;
        if (rp.blocks) {
            g_hash_table_destroy(rp.blocks);
            rp.blocks = NULL;
        }
        if (rp.refs_epochs) {
            g_array_free(rp.refs_epochs, true);
            rp.refs_epochs = NULL;
        }
        qatomic_inc(&rp.gen);
    }
}

void nas_dedup_rp_refs_sent(uint32_t epoch)
{
    RefsEpoch *last;

    QEMU_LOCK_GUARD(&rp.lock);
    if (!rp.active) {
        return;
    }
    rp.refs_sent++;
    last = rp.refs_epochs->len ?
           &g_array_index(rp.refs_epochs, RefsEpoch,
                          rp.refs_epochs->len - 1) : NULL;
    if (!last || last->epoch != epoch) {
        RefsEpoch e = { .first = rp.refs_sent, .epoch = epoch };

        g_array_append_val(rp.refs_epochs, e);
    }
}

/*
 * Under rp.lock: the sync in which REFS record @seq (a wire number,
 * nas_dedup_refs_seq_next()) was offered, if it was sent: the latest
 * record sent with that number.
 */
static bool refs_epoch(uint32_t seq, uint32_t *epoch)
{
    const uint64_t m = UINT32_MAX - 1;      /* numbers 1 .. m */
    uint64_t d, n;
    guint lo = 0, hi;

    if (!rp.refs_sent || !seq || seq > m) {
        return false;
    }
    /* How many records ago that number was last used. */
    d = ((rp.refs_sent - 1) % m + 1 + m - seq) % m;
    if (d >= rp.refs_sent) {
        return false;
    }
    n = rp.refs_sent - d;
    /* The last row that starts at or before record n. */
    hi = rp.refs_epochs->len;
    while (hi - lo > 1) {
        guint mid = lo + (hi - lo) / 2;

        if (g_array_index(rp.refs_epochs, RefsEpoch, mid).first <= n) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    *epoch = g_array_index(rp.refs_epochs, RefsEpoch, lo).epoch;
    return true;
}

/*
 * The block nas_dedup_rp_sending() was last called for in this thread
 * (the migration thread, or the return-path thread sending
 * postcopy-preempt's urgent pages; with preempt both may send at once,
 * the migration thread without ram.c's bitmap mutex): valid while @gen
 * is rp.gen.
 */
static __thread struct {
    RAMBlock *block;
    RpBlock *rb;
    unsigned gen;
} sending;

void nas_dedup_rp_sending(RAMBlock *block, ram_addr_t offset,
                          uint32_t epoch)
{
    unsigned long page = offset >> TARGET_PAGE_BITS;
    RpBlock *rb;

    if (sending.block != block || sending.gen != qatomic_read(&rp.gen)) {
        QEMU_LOCK_GUARD(&rp.lock);
        sending.block = block;
        sending.rb = rp.active ? rp_block(block) : NULL;
        sending.gen = rp.gen;
    }
    rb = sending.rb;
    if (!rb || page >= rb->npages) {
        return;             /* no return path, no RESEND */
    }
    /*
     * Against rp_resend(), which marks the page asked, then reads its
     * sync: either it sees this one, and drops the request as stale, or
     * we see it asked, and take that back, since the page goes now.
     */
    qatomic_set(&rb->sent_epoch[page], (uint16_t)epoch);
    /* The sync before asked_pages; pairs with the one in rp_resend(). */
    smp_mb();
    if (qatomic_read(&rp.asked_pages)) {
        QEMU_LOCK_GUARD(&rp.lock);
        if (test_and_clear_bit(page, rb->asked)) {
            qatomic_set(&rp.asked_pages, rp.asked_pages - 1);
        }
    }
}

int nas_dedup_rp_final(MigrationState *s, bool lazy, Error **errp)
{
    nas_dedup_rp_watch(NAS_DEDUP_WATCH_NONE, 0, 0);
    QEMU_LOCK_GUARD(&rp.lock);
    if (migrate_has_error(s)) {
        error_setg(errp, "dedup-nas: migration failed during switchover");
        return -EIO;
    }
    rp.final_sent = true;
    rp.lazy = lazy;
    return 0;
}

bool nas_dedup_rp_take_asked(RAMBlock *block, unsigned long page)
{
    RpBlock *rb;

    if (!qatomic_read(&rp.asked_pages)) {
        return false;
    }
    QEMU_LOCK_GUARD(&rp.lock);
    rb = rp.active ? g_hash_table_lookup(rp.blocks, block) : NULL;
    if (!rb || page >= rb->npages || !test_bit(page, rb->noref) ||
        !test_and_clear_bit(page, rb->asked)) {
        return false;
    }
    qatomic_set(&rp.asked_pages, rp.asked_pages - 1);
    return true;
}

uint64_t nas_dedup_rp_noref_pages(void)
{
    return qatomic_read(&rp.noref_pages);
}

bool nas_dedup_rp_take_noref(RAMBlock *block, ram_addr_t offset)
{
    RpBlock *rb;

    if (!qatomic_read(&rp.noref_pages)) {
        return false;
    }
    QEMU_LOCK_GUARD(&rp.lock);
    rb = rp.blocks ? g_hash_table_lookup(rp.blocks, block) : NULL;
    if (rb && (offset >> TARGET_PAGE_BITS) < rb->npages &&
        test_and_clear_bit(offset >> TARGET_PAGE_BITS, rb->noref)) {
        qatomic_set(&rp.noref_pages, rp.noref_pages - 1);
        return true;
    }
    return false;
}

/*
 * Under ram.c's bitmap mutex, then rp.lock: the pages of @block asked
 * (@all: all those still owed), in its scratch bitmap, which only the
 * migration thread uses.  Chosen under the bitmap mutex, so that no page
 * is sent in between (postcopy-preempt's urgent pages are sent under it
 * by the return-path thread), and goes twice.  No memory is allocated on
 * the way, however many requests came.
 */
static const unsigned long *redirty_pick(RAMBlock *block,
                                         unsigned long *start,
                                         unsigned long *end, void *opaque)
{
    bool all = *(bool *)opaque;
    bool any = false;
    unsigned long i;
    RpBlock *rb;

    QEMU_LOCK_GUARD(&rp.lock);
    rb = rp.active ? g_hash_table_lookup(rp.blocks, block) : NULL;
    if (!rb) {
        return NULL;
    }
    for (i = 0; i < BITS_TO_LONGS(rb->npages); i++) {
        /* Only those still to be sent in full. */
        rb->scratch[i] = (all ? ~0UL : rb->asked[i]) & rb->noref[i];
        any |= rb->scratch[i] != 0;
        qatomic_set(&rp.asked_pages, rp.asked_pages - ctpopl(rb->asked[i]));
        rb->asked[i] = 0;
    }
    *end = rb->npages;
    return any ? rb->scratch : NULL;    /* none: all sent meanwhile */
}

int64_t nas_dedup_rp_redirty(bool all, Error **errp)
{
    g_autofree gpointer *keys = NULL;
    guint nkeys = 0, k;
    int64_t pages = 0;

    if (!all && !qatomic_read(&rp.asked_pages)) {
        return 0;
    }
    RCU_READ_LOCK_GUARD();      /* the RAMBlocks we hold keys of */
    WITH_QEMU_LOCK_GUARD(&rp.lock) {
        if (!rp.active) {
            return 0;
        }
        /* The table may grow while we drop the lock: keep its keys. */
        keys = g_hash_table_get_keys_as_array(rp.blocks, &nkeys);
    }
    for (k = 0; k < nkeys; k++) {
        int64_t ret = ram_dedup_redirty(keys[k], redirty_pick, &all, errp);

        if (ret < 0) {
            return ret;
        }
        pages += ret;
    }
    return pages;
}

void nas_dedup_rp_sync_sent(uint32_t seq)
{
    QEMU_LOCK_GUARD(&rp.lock);
    rp.sent_seq = seq;
}

uint32_t nas_dedup_rp_acked(uint32_t *pending)
{
    uint32_t seq = qatomic_load_acquire(&rp.acked_seq);

    if (pending) {
        *pending = qatomic_read(&rp.acked_pending);
    }
    return seq;
}

void nas_dedup_rp_wait(int64_t ms)
{
    qemu_sem_timedwait(&rp.ack_sem, ms);
}

/*
 * Under rp.lock, for a return-path message @what that decoded (@err
 * NULL) or not: 1 to handle it, 0 to ignore it (after the final SYNC,
 * too late to matter and not to fail), or -EINVAL with @errp set to fail
 * the migration.
 */
static int rp_accept(const char *what, const Error *err, Error **errp)
{
    if (rp.final_sent && !rp.lazy) {
        return 0;
    }
    if (err) {
        error_setg(errp, "dedup-nas: %s", error_get_pretty(err));
        return -EINVAL;
    }
    if (!rp.active) {
        error_setg(errp, "dedup-nas: unexpected %s message: dedup-nas is "
                   "not active in this migration", what);
        return -EINVAL;
    }
    return 1;
}

/*
 * Record a RESEND; under RCU.  *@urgent: in postcopy with the fill after
 * LISTEN, where a vCPU may wait for the pages (@block, @first, @npages).
 */
static int rp_resend(const uint8_t *buf, size_t len, RAMBlock **blockp,
                     unsigned long *firstp, uint32_t *npagesp, bool *urgent,
                     Error **errp)
{
    NasDedupResend r;
    g_autoptr(Error) err = NULL;
    RAMBlock *block;
    RpBlock *rb;
    unsigned long first, n;
    uint32_t epoch, i, stale = 0;
    int ret;

    if (nas_dedup_resend_decode(buf, len, &r, &err)) {
        trace_nas_dedup_rp_resend(r.id, r.offset, r.npages, r.refs_seq);
    }
    QEMU_LOCK_GUARD(&rp.lock);
    ret = rp_accept("DEDUP_RESEND", err, errp);
    if (ret <= 0) {
        return ret;
    }
    block = qemu_ram_block_by_name(r.id);
    if (!block || migrate_ram_is_ignored(block) ||
        r.offset > block->used_length ||
        !QEMU_IS_ALIGNED(r.offset, NAS_DEDUP_CHUNK) ||
        (uint64_t)r.npages * NAS_DEDUP_CHUNK >
            block->used_length - r.offset) {
        error_setg(errp, "dedup-nas: resend request for %s 0x%" PRIx64
                   " x%u is outside guest RAM", r.id, r.offset, r.npages);
        return -EINVAL;
    }
    rb = rp_block(block);
    first = r.offset >> TARGET_PAGE_BITS;
    if (first + r.npages > rb->npages) {
        error_setg(errp, "dedup-nas: resend request for %s 0x%" PRIx64
                   " x%u is outside the RAMBlock as migration started", r.id,
                   r.offset, r.npages);
        return -EINVAL;
    }
    if (!refs_epoch(r.refs_seq, &epoch)) {
        error_setg(errp, "dedup-nas: DEDUP_RESEND names REFS record %u, but "
                   "%" PRIu64 " were sent", r.refs_seq, rp.refs_sent);
        return -EINVAL;
    }
    for (i = 0, n = 0; i < r.npages; i++) {
        bool asked = !test_and_set_bit(first + i, rb->asked);

        if (asked) {
            qatomic_set(&rp.asked_pages, rp.asked_pages + 1);
        }
        /* See nas_dedup_rp_sending(). */
        smp_mb();
        if (qatomic_read(&rb->sent_epoch[first + i]) != (uint16_t)epoch) {
            /*
             * Offered again since that reference, in a later sync (the
             * guest dirtied it; a page with a reference open goes again
             * in the same sync only to answer this request, which comes
             * once), and so sent after it: the request crossed that
             * copy, which the destination has, or will.  Sending the
             * page once more would fail postcopy's copy.
             */
            if (asked) {
                clear_bit(first + i, rb->asked);
                qatomic_set(&rp.asked_pages, rp.asked_pages - 1);
            }
            stale++;
            continue;
        }
        if (!test_and_set_bit(first + i, rb->noref)) {
            n++;
        }
    }
    if (stale) {
        trace_nas_dedup_rp_resend_stale(r.id, r.offset, r.npages, stale,
                                        r.refs_seq);
    }
    qatomic_set(&rp.noref_pages, rp.noref_pages + n);
    /* Every page asked, as the destination's resend-requests counts. */
    stat64_add(&nas_dedup_counters.resent_pages, r.npages);
    if (rp.lazy) {
        /* In postcopy: a vCPU there may be waiting for these. */
        qemu_sem_post(&rp.ack_sem);
        *urgent = migration_in_postcopy();
        *blockp = block;
        *firstp = first;
        *npagesp = r.npages;
    }
    return 0;
}

int nas_dedup_rp_resend(MigrationState *s, const uint8_t *buf, size_t len,
                        Error **errp)
{
    RAMBlock *block = NULL;
    unsigned long first = 0;
    uint32_t npages = 0;
    bool urgent = false;

    /*
     * The pages are dirtied by the migration thread (not here: this
     * thread may not take the bitmap mutex, see rp.lock), at its next
     * flush, or at once when postcopy's page request for one, which the
     * destination sends after this message, is served
     * (nas_dedup_rp_take_asked()).
     */
    RCU_READ_LOCK_GUARD();
    return rp_resend(buf, len, &block, &first, &npages, &urgent, errp);
}

int nas_dedup_rp_sync_ack(MigrationState *s, const uint8_t *buf, size_t len,
                          Error **errp)
{
    g_autoptr(Error) err = NULL;
    uint32_t seq, pending;
    int ret;

    if (nas_dedup_sync_ack_decode(buf, len, &seq, &pending, &err)) {
        trace_nas_dedup_rp_sync_ack(seq, pending);
    }
    WITH_QEMU_LOCK_GUARD(&rp.lock) {
        ret = rp_accept("DEDUP_SYNC_ACK", err, errp);
        if (ret <= 0) {
            return ret;
        }
        if (!seq || (int32_t)(seq - rp.sent_seq) > 0 ||
            (int32_t)(seq - rp.acked_seq) <= 0) {
            error_setg(errp, "dedup-nas: DEDUP_SYNC_ACK for SYNC %u, but the "
                       "last SYNC sent is %u and the last answered %u", seq,
                       rp.sent_seq, rp.acked_seq);
            return -EINVAL;
        }
        qatomic_set(&rp.acked_pending, pending);
        qatomic_store_release(&rp.acked_seq, seq);
    }
    qemu_sem_post(&rp.ack_sem);
    /* A watchdog waiting for this answer stands down. */
    WITH_QEMU_LOCK_GUARD(&rp.wd_lock) {
        qemu_cond_signal(&rp.wd_cond);
    }
    return 0;
}

int nas_dedup_rp_progress(MigrationState *s, const uint8_t *buf, size_t len,
                          Error **errp)
{
    g_autoptr(Error) err = NULL;
    NasDedupProgress p;
    int ret;

    if (nas_dedup_progress_decode(buf, len, &p, &err)) {
        trace_nas_dedup_rp_progress(p.refs_done, p.fetched_bytes,
                                    p.fetch_busy_us);
    }
    QEMU_LOCK_GUARD(&rp.lock);
    ret = rp_accept("DEDUP_PROGRESS", err, errp);
    if (ret <= 0) {
        return ret;
    }
    /*
     * Counts that go back are a broken destination.  Any other numbers
     * only steer the link/NAS split, which keeps its share and its bounds
     * finite whatever they say; at worst they cost time (more pages in
     * full, or a stopped guest waiting up to the switchover slack).
     */
    if (p.refs_done < rp.progress.refs_done ||
        p.fetched_bytes < rp.progress.fetched_bytes ||
        p.fetch_busy_us < rp.progress.fetch_busy_us) {
        error_setg(errp, "dedup-nas: DEDUP_PROGRESS says %" PRIu64 " pages "
                   "read, %" PRIu64 " bytes in %" PRIu64 " us, after %"
                   PRIu64 ", %" PRIu64 " and %" PRIu64, p.refs_done,
                   p.fetched_bytes, p.fetch_busy_us, rp.progress.refs_done,
                   rp.progress.fetched_bytes, rp.progress.fetch_busy_us);
        return -EINVAL;
    }
    rp.progress = p;
    rp.progress_reports++;
    rp.progress_us = g_get_monotonic_time();
    if (p.fetch_busy_us) {
        double rate = (double)p.fetched_bytes * 1000000 / p.fetch_busy_us;

        stat64_set(&nas_dedup_counters.fetch_rate,
                   rate < (double)INT64_MAX ? rate : INT64_MAX);
    }
    return 0;
}

uint64_t nas_dedup_rp_progress_get(uint64_t *refs_done,
                                   uint64_t *fetched_bytes,
                                   uint64_t *fetch_busy_us,
                                   int64_t *when_us)
{
    QEMU_LOCK_GUARD(&rp.lock);
    *refs_done = rp.progress.refs_done;
    *fetched_bytes = rp.progress.fetched_bytes;
    *fetch_busy_us = rp.progress.fetch_busy_us;
    *when_us = rp.progress_us;
    return rp.progress_reports;
}
