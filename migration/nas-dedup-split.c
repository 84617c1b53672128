/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas: the link/NAS split (see nas-dedup-split.h)
 */
#include "qemu/osdep.h"
#include <math.h>
#include "migration/nas-dedup-index.h"
#include "nas-dedup-split.h"

void nas_dedup_split_init(NasDedupSplit *sp, unsigned fixed_pct)
{
    memset(sp, 0, sizeof(*sp));
    sp->fixed = MIN(fixed_pct, 100);
    /* Found as it goes: all references until the destination reports. */
    sp->share = sp->fixed ? sp->fixed / 100.0 : 1.0;
    sp->backlog_cap = sp->fixed ? UINT64_MAX : NAS_DEDUP_SPLIT_PROBE;
    sp->page_rate = -1;         /* not measured yet */
    sp->fetch_rate = -1;
    sp->fetch_rate_all = -1;
}

/*
 * Every eligible page earns @share of a reference; references go
 * NAS_DEDUP_SPLIT_SPAN in a row once that many are earned.
 */
static bool split_earned(NasDedupSplit *sp)
{
    if (sp->share >= 1.0) {
        return true;
    }
    sp->credit += sp->share;
    if (sp->span) {
        sp->span--;
        return true;
    }
    if (sp->credit >= NAS_DEDUP_SPLIT_SPAN) {
        sp->credit -= NAS_DEDUP_SPLIT_SPAN;
        sp->span = NAS_DEDUP_SPLIT_SPAN - 1;
        return true;
    }
    return false;
}

bool nas_dedup_split_take(NasDedupSplit *sp)
{
    sp->eligible++;
    if (sp->backlog + (sp->taken - sp->taken_then) >= sp->backlog_cap) {
        return false;           /* the destination is behind enough */
    }
    if (!split_earned(sp)) {
        return false;
    }
    sp->taken++;
    return true;
}

/* The destination's pace, from what it did since its last report. */
static void split_fetch_rate(NasDedupSplit *sp, const NasDedupSplitSample *x)
{
    double fr;

    /*
     * The first rate only once the first guess has been read, from all of
     * it: the first reads can be much faster than the storage (a cache on
     * its side, a throttle's burst).
     */
    if (sp->fetch_rate < 0 &&
        x->fetched_bytes < (uint64_t)NAS_DEDUP_SPLIT_PROBE * NAS_DEDUP_CHUNK) {
        return;
    }
    /* (rp.c refuses reports whose counts go back.) */
    if (x->reports == sp->last_reports ||
        x->fetch_busy_us < sp->last_busy_us ||
        x->fetch_busy_us - sp->last_busy_us < NAS_DEDUP_SPLIT_MIN_BUSY_US ||
        x->fetched_bytes < sp->last_fetched) {
        return;
    }
    fr = (x->fetched_bytes - sp->last_fetched) * 1e6 /
         (x->fetch_busy_us - sp->last_busy_us);
    if (!isfinite(fr)) {
        return;
    }
    /* The last report's alone: the storage's pace changes, and so may ours. */
    sp->fetch_rate = fr;
    sp->fetch_rate_all = (double)x->fetched_bytes * 1e6 / x->fetch_busy_us;
    sp->last_reports = x->reports;
    sp->last_fetched = x->fetched_bytes;
    sp->last_busy_us = x->fetch_busy_us;
}

/* What the destination reads in @us at @rate bytes a second, in pages. */
static uint64_t pages_in(double rate, double us)
{
    double pages = rate / NAS_DEDUP_CHUNK * us / 1e6;

    return pages < 1 ? 0 : pages > UINT32_MAX ? UINT32_MAX : pages;
}

bool nas_dedup_split_update(NasDedupSplit *sp, const NasDedupSplitSample *x)
{
    double dt, offered, reads, want, backlog, target;
    double old_share = sp->share;
    double short_queue;

    if (sp->fixed) {
        return false;
    }
    sp->backlog = x->refs_sent > x->refs_done ? x->refs_sent - x->refs_done
                                               : 0;
    sp->taken_then = sp->taken;
    split_fetch_rate(sp, x);
    if (x->stop_left_us >= 0) {
        /*
         * The guest is stopped: every reference now makes it wait for a
         * read, and the link's pages fit the downtime limit already (the
         * switchover decision counted them in full).
         */
        sp->backlog_cap = sp->fetch_rate < 0 ? 0 :
                          pages_in(MIN(sp->fetch_rate, sp->fetch_rate_all),
                                   x->stop_left_us);
        return false;
    }
    if (sp->fetch_rate >= 0) {
        /*
         * At least a run: a destination that read nothing lately (a
         * stalled storage, read errors) still gets references, and so
         * still reports.
         */
        sp->backlog_cap = MAX(NAS_DEDUP_SPLIT_SPAN,
                              pages_in(sp->fetch_rate,
                                       sp->saturated ?
                                       NAS_DEDUP_SPLIT_GUARD_SAT_US :
                                       NAS_DEDUP_SPLIT_GUARD_US));
    }
    if (!sp->started) {
        sp->started = true;
        sp->last_us = x->now_us;
        sp->last_eligible = sp->eligible;
        sp->last_wire = x->wire_bytes;
        return false;
    }
    dt = (x->now_us - sp->last_us) / 1e6;
    if (dt < NAS_DEDUP_SPLIT_PERIOD_US / 1e6) {
        return false;
    }

    /* Pages found on disk that the source offers a second, as it goes. */
    offered = (sp->eligible - sp->last_eligible) / dt;
    sp->page_rate = sp->page_rate >= 0 ? (sp->page_rate + offered) / 2
                                       : offered;
    sp->saturated = x->link_limit && x->wire_bytes >= sp->last_wire &&
                    (x->wire_bytes - sp->last_wire) / dt >=
                    0.9 * x->link_limit;
    sp->last_us = x->now_us;
    sp->last_eligible = sp->eligible;
    sp->last_wire = x->wire_bytes;
    if (sp->fetch_rate < 0 || sp->page_rate <= 0) {
        return true;            /* nothing to go by yet */
    }

    /*
     * The destination keeps pace when references come as fast as it reads
     * them, with NAS_DEDUP_SPLIT_AHEAD_US of reads queued (so that it
     * never idles while the source deals with other pages), the
     * difference made up over NAS_DEDUP_SPLIT_CATCHUP_US.  Its queue now
     * is what its last report left, less what it read since.
     */
    reads = sp->fetch_rate / NAS_DEDUP_CHUNK;
    want = reads * NAS_DEDUP_SPLIT_AHEAD_US / 1e6;
    backlog = MAX(0.0, (double)sp->backlog -
                  reads * MAX(0, x->now_us - x->report_us) / 1e6);
    reads += (want - backlog) / (NAS_DEDUP_SPLIT_CATCHUP_US / 1e6);
    target = MAX(NAS_DEDUP_SPLIT_MIN, MIN(1.0, reads / sp->page_rate));
    if (!isfinite(target)) {
        return true;
    }
    sp->share += NAS_DEDUP_SPLIT_GAIN * (target - sp->share);
    /*
     * Its pace is measured with the reads it had: with fewer runs queued
     * than it reads at once, it reads slower than it can (measured: 10
     * MB/s from a storage that gives 370).  So while its queue is that
     * short (but two runs at least, and no more than
     * NAS_DEDUP_SPLIT_DEPTH_MAX_US of reading) the share only grows, by
     * a quarter a period at least; reads queue up, and the pace measured
     * then is its own.  So it does while the link runs at its
     * max-bandwidth: every page sent in full then waits for the link.
     */
    short_queue = MIN(NAS_DEDUP_SPLIT_DEPTH,
                      MAX(2 * NAS_DEDUP_SPLIT_SPAN,
                          pages_in(sp->fetch_rate,
                                   NAS_DEDUP_SPLIT_DEPTH_MAX_US)));
    if (backlog < MAX(want / 4, short_queue) || sp->saturated) {
        sp->share = MIN(1.0, MAX(sp->share, old_share * 1.25));
    }
    return true;
}

unsigned nas_dedup_split_percent(const NasDedupSplit *sp)
{
    return (unsigned)(sp->share * 100 + 0.5);     /* within [0.02, 1] */
}
