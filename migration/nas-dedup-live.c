/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas: live SYNC, before switchover
 *
 * The stopped guest waits, at switchover, for the destination to read the
 * blocks of every reference it has not resolved yet.  A large backlog of
 * reads would make that wait exceed the downtime limit.  So before
 * switchover, while the guest still runs, migration_iteration_run() asks
 * nas_dedup_live_can_switchover(): while the pages left to send plus the
 * backlog exceed the downtime budget, it answers no and has a SYNC record
 * sent (a *live* SYNC); its answer says the destination caught up with
 * every reference sent before it.  The stopped guest then only waits for
 * the references of the last rounds.
 */
#include "qemu/osdep.h"
#include "migration.h"
#include "nas-dedup-int.h"
#include "nas-dedup-wire.h"
#include "options.h"
#include "trace.h"

/*
 * Live SYNCs before switchover gives up waiting for a small backlog (the
 * guest keeps the destination busy); the final SYNC still resolves all.
 */
#define NAS_DEDUP_LIVE_SYNCS 8
/* How long one switchover check waits for an answer, not to spin. */
#define NAS_DEDUP_LIVE_WAIT_MS 20
/*
 * A live SYNC is answered once the destination has read every block
 * referred to so far.  It may take a while for a large backlog, but not
 * forever: the answer must come within NAS_DEDUP_LIVE_TIMEOUT_MS plus the
 * time to read the backlog at NAS_DEDUP_MIN_FETCH_RATE, or the migration
 * fails (the guest keeps running on the source).
 */
#define NAS_DEDUP_LIVE_TIMEOUT_MS 30000
#define NAS_DEDUP_MIN_FETCH_RATE (8 * 1000 * 1000)      /* bytes a second */

/* Migration thread only. */
static struct {
    uint64_t resolved_mark;         /* refs sent when the acked SYNC went */
    uint32_t seq;                   /* live SYNC in flight, or 0 */
    uint64_t mark;                  /* refs sent when it went */
    unsigned syncs;
    bool wanted;
} live;

void nas_dedup_live_setup(void)
{
    memset(&live, 0, sizeof(live));
}

uint64_t nas_dedup_live_unconfirmed(void)
{
    return nas_dedup_save_refs_sent() - live.resolved_mark;
}

void nas_dedup_live_watch(uint32_t seq, uint64_t backlog_pages)
{
    nas_dedup_rp_watch(NAS_DEDUP_WATCH_SYNC,
                       qemu_clock_get_ms(QEMU_CLOCK_REALTIME) +
                       NAS_DEDUP_LIVE_TIMEOUT_MS +
                       backlog_pages * NAS_DEDUP_CHUNK * 1000 /
                       NAS_DEDUP_MIN_FETCH_RATE, seq);
}

void nas_dedup_live_flush(void)
{
    /* Closed for postcopy: the gate's SYNCs do the live SYNC's job. */
    if (!live.wanted || live.seq || nas_dedup_save_closed()) {
        return;
    }
    live.seq = nas_dedup_save_put_sync(false, false);
    if (!live.seq) {
        return;
    }
    live.mark = nas_dedup_save_refs_sent();
    live.syncs++;
    live.wanted = false;
    /* The answer must come in time, even if we block writing. */
    nas_dedup_live_watch(live.seq, live.mark - live.resolved_mark);
}

bool nas_dedup_live_can_switchover(uint64_t pending_bytes,
                                   uint64_t threshold_bytes)
{
    uint64_t sent, backlog;

    if (!migrate_dedup_nas()) {
        return true;
    }
    /*
     * Closed for postcopy (nas-dedup-postcopy.c): no more references, and
     * the postcopy gate's SYNCs let the destination catch up; the guest
     * may stop (for pre-copy's switchover or postcopy's) once they did.
     */
    if (nas_dedup_save_closed()) {
        return nas_dedup_save_resolved();
    }
    sent = nas_dedup_save_refs_sent();
    if (!sent) {
        return true;            /* no reference to resolve */
    }
    if (live.seq && (int32_t)(nas_dedup_rp_acked(NULL) - live.seq) >= 0) {
        live.resolved_mark = live.mark;
        live.seq = 0;
        nas_dedup_rp_watch(NAS_DEDUP_WATCH_NONE, 0, 0);
    }
    backlog = (sent - live.resolved_mark) * NAS_DEDUP_CHUNK;
    /*
     * The stopped guest waits for the pages still to send and for the
     * blocks still to read: together they must fit the downtime budget.
     */
    if (pending_bytes + backlog <= threshold_bytes ||
        live.syncs >= NAS_DEDUP_LIVE_SYNCS) {
        trace_nas_dedup_live_switchover(backlog, live.syncs);
        return true;
    }
    if (live.seq) {
        /*
         * Answer pending: wait a little rather than spin on bitmap syncs.
         * The watchdog fails the migration if it does not come in time.
         */
        nas_dedup_rp_wait(NAS_DEDUP_LIVE_WAIT_MS);
    } else {
        live.wanted = true;     /* sent by nas_dedup_live_flush() */
    }
    return false;
}
