/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas with postcopy-ram
 *
 * Postcopy places pages with UFFDIO_COPY once the destination listens,
 * and the page request path only sends pages that are dirty on the
 * source: a page sent as a reference and not read yet when postcopy
 * starts is neither sent by the source nor copied into RAM by the
 * destination.  By default (the fill, docs/devel/nas-dedup.rst,
 * "postcopy"):
 *
 * 1. once postcopy is asked for, the first pass over RAM sends only
 *    references; the other pages are left out of the dirty bitmap;
 * 2. at the end of the iteration where the pass wrapped, they are dirty
 *    again, no more references go, and the lazy final SYNC tells the
 *    destination to place what it still reads after LISTEN; postcopy
 *    starts;
 * 3. the migration completes once the destination answered that SYNC
 *    and every page it asked again is dirty again.
 *
 * Otherwise (host pages over 4 KiB, x-dedup-nas-postcopy-lazy=off) the
 * references are resolved before postcopy starts, while the guest still
 * runs on the source:
 *
 * 1. once postcopy is asked for and the first pass over RAM is done, the
 *    source sends no more references ("closed");
 * 2. at the end of the next iteration it sends SYNC(final=0); the
 *    destination reads every block still to read and answers, after its
 *    DEDUP_RESEND requests, how many pages it awaits;
 * 3. if some, they are dirtied again and sent in full by the next
 *    iterations, and once they went, 2. is repeated;
 * 4. otherwise the source sends SYNC(final=1), and postcopy may start.
 *    The destination fails the load (before it listens) if a reference
 *    is not resolved by then.
 *
 * Until the final SYNC (lazy or not), dedup-nas may fail the migration:
 * the guest keeps running on the source.  The gate only delays postcopy;
 * the migration may also complete as pre-copy (not after the lazy SYNC),
 * but only once nothing is left out and the gate found everything
 * resolved (nas_dedup_live_can_switchover()).
 */
#include "qemu/osdep.h"
#include "qemu/notify.h"
#include "qemu/rcu.h"
#include "exec/ramblock.h"
#include "exec/target_page.h"
#include "qapi/error.h"
#include "migration.h"
#include "postcopy-ram.h"
#include "ram.h"
#include "nas-dedup-int.h"
#include "options.h"
#include "trace.h"

/*
 * Answers in a row that count no fewer pages awaited than the one before,
 * before the source gives up.
 */
#define NAS_DEDUP_POSTCOPY_ROUNDS 16
/*
 * Pages asked again are re-sent by the next iterations; the next SYNC
 * waits for that, but no longer than this many iterations (a page the
 * guest zeroed since goes as a zero page, which does not count).
 */
#define NAS_DEDUP_POSTCOPY_RESEND_ITERATIONS 64
/*
 * Pages still to fill that the source dirties at a time, from the far end
 * of the fill, when fewer than that are left to send: as many as go
 * after the destination answered (they are still sent, and skipped by
 * it), so a few ms of a 1 GbE link.
 */
#define NAS_DEDUP_POSTCOPY_MEET_PAGES 256
/* How long one check waits for an answer, not to spin. */
#define NAS_DEDUP_POSTCOPY_WAIT_MS 20

typedef enum {
    GATE_OPEN,          /* references go out as usual */
    GATE_LAZY_WANTED,   /* closed: the lazy final SYNC at the next flush */
    GATE_SYNC_WANTED,   /* closed: SYNC at the end of the next iteration */
    GATE_SYNC_SENT,     /* waiting for its answer */
    GATE_RESENDING,     /* pages asked again: SYNC once they went */
    GATE_FINAL_WANTED,  /* all resolved: the final SYNC at the next flush */
    GATE_DONE,          /* postcopy may start */
} NasDedupPostcopyGate;

static const char *const gate_names[] = {
    [GATE_OPEN] = "open",
    [GATE_LAZY_WANTED] = "lazy-wanted",
    [GATE_SYNC_WANTED] = "sync-wanted",
    [GATE_SYNC_SENT] = "sync-sent",
    [GATE_RESENDING] = "resending",
    [GATE_FINAL_WANTED] = "final-wanted",
    [GATE_DONE] = "done",
};

/* Migration thread only. */
static struct {
    NasDedupPostcopyGate state;
    uint32_t seq;               /* of the SYNC in flight */
    uint32_t last_pending;      /* pages awaited, as last answered */
    unsigned stuck;             /* answers in a row without progress */
    unsigned iterations;        /* spent in GATE_RESENDING */
    /* The final SYNC was the lazy one: the fill runs after LISTEN. */
    bool lazy;
    bool filled;                /* ... and the destination answered it */
    bool resumed;               /* postcopy recovered since */
} gate;

void nas_dedup_postcopy_setup(void)
{
    memset(&gate, 0, sizeof(gate));
    gate.last_pending = UINT32_MAX;
}

static void gate_set(NasDedupPostcopyGate state, uint32_t pending)
{
    trace_nas_dedup_postcopy_gate(gate_names[gate.state], gate_names[state],
                                  gate.seq, pending);
    gate.state = state;
}

/*
 * The fill after LISTEN places 4 KiB pages with UFFDIO_COPY, which
 * postcopy allows only where host pages are that small.
 */
static bool lazy_possible(void)
{
    RAMBlock *block;

    if (!migrate_get_current()->dedup_nas_postcopy_lazy) {
        return false;
    }
    RCU_READ_LOCK_GUARD();
    RAMBLOCK_FOREACH_NOT_IGNORED(block) {
        if (qemu_ram_pagesize(block) != TARGET_PAGE_SIZE) {
            return false;
        }
    }
    return true;
}

bool nas_dedup_postcopy_can_start(MigrationState *s)
{
    g_autoptr(Error) err = NULL;
    uint32_t pending;

    if (!migrate_dedup_nas() || !nas_dedup_save_active()) {
        return true;
    }
    switch (gate.state) {
    case GATE_OPEN:
        /* The first pass sends what the index knows as references. */
        if (!nas_dedup_save_passes()) {
            return false;
        }
        nas_dedup_save_close();
        if (nas_dedup_save_refs_sent() && lazy_possible()) {
            gate_set(GATE_LAZY_WANTED, 0);
            return false;
        }
        if (!nas_dedup_save_refs_sent()) {
            /* Nothing to resolve; nothing of ours fails postcopy. */
            if (nas_dedup_rp_final(s, false, &err) < 0) {
                nas_dedup_rp_fail(s, err);
                return false;
            }
            nas_dedup_save_set_resolved();
            gate_set(GATE_DONE, 0);
            return true;
        }
        gate_set(GATE_SYNC_WANTED, 0);
        return false;
    case GATE_SYNC_SENT:
        if ((int32_t)(nas_dedup_rp_acked(&pending) - gate.seq) < 0) {
            /* The watchdog fails the migration if it does not come. */
            nas_dedup_rp_wait(NAS_DEDUP_POSTCOPY_WAIT_MS);
            return false;
        }
        nas_dedup_rp_watch(NAS_DEDUP_WATCH_NONE, 0, 0);
        if (!pending) {
            nas_dedup_save_set_resolved();
            gate_set(GATE_FINAL_WANTED, 0);
            return false;
        }
        gate.stuck = pending < gate.last_pending ? 0 : gate.stuck + 1;
        if (gate.stuck >= NAS_DEDUP_POSTCOPY_ROUNDS) {
            error_setg(&err, "dedup-nas: the destination still awaits %u "
                       "pages after %u answers in a row without progress, "
                       "before postcopy", pending, gate.stuck);
            nas_dedup_rp_fail(s, err);
            return false;
        }
        gate.last_pending = pending;
        gate.iterations = 0;
        gate_set(GATE_RESENDING, pending);
        return false;
    case GATE_DONE:
        return true;
    default:
        return false;           /* nas_dedup_postcopy_flush() moves on */
    }
}

static void put_sync(uint64_t backlog_pages)
{
    gate.seq = nas_dedup_save_put_sync(false, false);
    nas_dedup_live_watch(gate.seq, backlog_pages);
    gate_set(GATE_SYNC_SENT, 0);
}

void nas_dedup_postcopy_flush(void)
{
    g_autoptr(Error) err = NULL;
    MigrationState *s = migrate_get_current();

    switch (gate.state) {
    case GATE_OPEN:
        /*
         * Postcopy asked for, and the fill possible: the first pass sends
         * references only, the other pages go by postcopy; once it is
         * over, the lazy SYNC goes at once and postcopy may start.
         */
        if (!qatomic_read(&s->start_postcopy) || !nas_dedup_save_active() ||
            !lazy_possible()) {
            break;
        }
        if (!nas_dedup_save_passes()) {
            nas_dedup_save_defer();
            break;
        }
        nas_dedup_save_close();
        if (!nas_dedup_save_refs_sent()) {
            if (nas_dedup_save_undefer(&err) < 0 ||
                nas_dedup_rp_final(s, false, &err) < 0) {
                nas_dedup_rp_fail(s, err);
                break;
            }
            nas_dedup_save_set_resolved();
            gate_set(GATE_DONE, 0);
            break;
        }
        gate_set(GATE_LAZY_WANTED, 0);
        /* fall through */
    case GATE_LAZY_WANTED:
        /*
         * After the last references (the run was flushed just before).
         * The pages left for postcopy are dirty again before it starts
         * (its discard names them).  From here on, nothing of dedup-nas
         * fails the migration; what the destination still reads, it
         * places once it listens.
         */
        if (nas_dedup_save_undefer(&err) < 0 ||
            nas_dedup_rp_final(s, true, &err) < 0) {
            nas_dedup_rp_fail(s, err);
            break;
        }
        gate.seq = nas_dedup_save_put_sync(true, true);
        gate.lazy = true;
        nas_dedup_save_set_resolved();
        gate_set(GATE_DONE, 0);
        break;
    case GATE_SYNC_WANTED:
        /*
         * After the last references (the run was flushed just before);
         * the answer may take as long as reading what the destination
         * has not confirmed yet.
         */
        put_sync(nas_dedup_live_unconfirmed());
        break;
    case GATE_RESENDING:
        /*
         * nas_dedup_save_flush() dirtied the pages asked again (those it
         * knew of at the answer, at the latest now).  If the previous
         * answer made no progress either, dirty all that are still owed:
         * a free page hint may have cleared a bit since.
         */
        if (!gate.iterations++ && gate.stuck &&
            nas_dedup_rp_redirty(true, &err) < 0) {
            nas_dedup_rp_fail(s, err);
            break;
        }
        if (!nas_dedup_rp_noref_pages() ||
            gate.iterations > NAS_DEDUP_POSTCOPY_RESEND_ITERATIONS) {
            put_sync(0);        /* no reference since the last answer */
        }
        break;
    case GATE_FINAL_WANTED:
        /* From here on, nothing of dedup-nas fails the migration. */
        if (nas_dedup_rp_final(s, false, &err) < 0) {
            nas_dedup_rp_fail(s, err);
            break;
        }
        nas_dedup_save_put_sync(true, false);
        gate_set(GATE_DONE, 0);
        break;
    default:
        break;
    }
}

bool nas_dedup_postcopy_can_complete(MigrationState *s,
                                     uint64_t pending_bytes)
{
    g_autoptr(Error) err = NULL;
    uint32_t pending;
    int64_t ret;
    bool acked;

    if (!migrate_dedup_nas()) {
        return true;
    }
    if (nas_dedup_save_deferred()) {
        return false;           /* pages left for postcopy, not dirty */
    }
    if (gate.state != GATE_DONE || !gate.lazy || gate.filled) {
        return true;
    }
    if (!migration_in_postcopy()) {
        /* Postcopy starts first: the destination fills after LISTEN. */
        return false;
    }
    /*
     * The source stays the authority until every reference is placed: no
     * EOS until the destination answered the lazy SYNC (its reads are
     * over, after the RESEND of every page that did not verify) and the
     * pages it asked went in full.  After a recovery, no answer comes:
     * the destination placed nothing more since it paused, and every page
     * it had not placed was sent again (the dirty bitmap was rebuilt from
     * its receivedmap).
     */
    /*
     * Every RESEND comes before the answer, and the return-path thread
     * handles them in order: so look at the answer first, then dirty
     * again the pages asked so far (a vCPU may be waiting for one).  If
     * the answer had come and none was left to dirty, completing sends
     * every page asked (in full, or as zero pages).
     */
    acked = gate.resumed ||
            (int32_t)(nas_dedup_rp_acked(&pending) - gate.seq) >= 0;
    ret = nas_dedup_rp_redirty(false, &err);
    if (!ret && !acked && s->dedup_nas_postcopy_meet &&
        pending_bytes < NAS_DEDUP_POSTCOPY_MEET_PAGES * TARGET_PAGE_SIZE) {
        /*
         * The link has room: send the pages still to fill from the far
         * end of the fill, until the destination answers (meet).
         */
        ret = nas_dedup_save_meet(NAS_DEDUP_POSTCOPY_MEET_PAGES, &err);
    }
    if (ret < 0) {
        nas_dedup_rp_fail(s, err);
        return false;
    }
    if (ret > 0) {
        return false;
    }
    if (!acked) {
        if (!pending_bytes) {
            /* Nothing to send: wait for a RESEND or the answer. */
            nas_dedup_rp_wait(NAS_DEDUP_POSTCOPY_WAIT_MS);
        }
        return false;
    }
    gate.filled = true;
    trace_nas_dedup_postcopy_filled(gate.seq, gate.resumed,
                                    nas_dedup_save_met_pages());
    return true;
}

void nas_dedup_postcopy_resumed(void)
{
    gate.resumed = true;
}

/*
 * Destination: at LISTEN, references are resolved (the final SYNC), or
 * the fill starts (the lazy one); faults are handled in
 * nas_dedup_load_postcopy_fault(), and at the end the fill is checked.
 */
static int listen_notify(NotifierWithReturn *n, void *data, Error **errp)
{
    struct PostcopyNotifyData *pnd = data;

    if (pnd->reason == POSTCOPY_NOTIFY_INBOUND_END) {
        nas_dedup_load_postcopy_end();
        return 0;
    }
    if (pnd->reason != POSTCOPY_NOTIFY_INBOUND_LISTEN) {
        return 0;
    }
    return nas_dedup_load_postcopy_listen(
        migrate_get_current()->dedup_nas_fault_read_ms, errp) ? 0 : -1;
}

static NotifierWithReturn listen_notifier = { .notify = listen_notify };

void nas_dedup_postcopy_init(void)
{
    postcopy_add_notifier(&listen_notifier);
}
