/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas: the link/NAS split (see nas-dedup-split.h)
 */
#include "qemu/osdep.h"
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
}

bool nas_dedup_split_take(NasDedupSplit *sp)
{
    sp->eligible++;
    if (sp->backlog + (sp->taken - sp->taken_then) >= sp->backlog_cap) {
        return false;           /* the destination is behind enough */
    }
    if (sp->share >= 1.0) {
        goto take;
    }
    /*
     * Every eligible page earns @share of a reference; references go
     * NAS_DEDUP_SPLIT_SPAN in a row once that many are earned.
     */
    sp->credit += sp->share;
    if (sp->span) {
        sp->span--;
        goto take;
    }
    if (sp->credit >= NAS_DEDUP_SPLIT_SPAN) {
        sp->credit -= NAS_DEDUP_SPLIT_SPAN;
        sp->span = NAS_DEDUP_SPLIT_SPAN - 1;
        goto take;
    }
    return false;
take:
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
    if (x->reports == sp->last_reports ||
        x->fetch_busy_us < sp->last_busy_us + NAS_DEDUP_SPLIT_MIN_BUSY_US ||
        x->fetched_bytes < sp->last_fetched) {
        return;
    }
    fr = (x->fetched_bytes - sp->last_fetched) * 1e6 /
         (x->fetch_busy_us - sp->last_busy_us);
    /* The last report's alone: the storage's pace changes, and so may ours. */
    sp->fetch_rate = fr;
    sp->last_reports = x->reports;
    sp->last_fetched = x->fetched_bytes;
    sp->last_busy_us = x->fetch_busy_us;
}

bool nas_dedup_split_update(NasDedupSplit *sp, const NasDedupSplitSample *x)
{
    double dt, offered, reads, target;

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
                          MIN((double)UINT64_MAX / 2,
                              sp->fetch_rate / NAS_DEDUP_CHUNK *
                              x->stop_left_us / 1e6);
        return false;
    }
    if (sp->fetch_rate >= 0) {
        sp->backlog_cap = MIN((double)UINT64_MAX / 2,
                              sp->fetch_rate / NAS_DEDUP_CHUNK *
                              NAS_DEDUP_SPLIT_GUARD_US / 1e6);
    }
    if (!sp->started) {
        sp->started = true;
        sp->last_us = x->now_us;
        sp->last_eligible = sp->eligible;
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
    sp->last_us = x->now_us;
    sp->last_eligible = sp->eligible;
    if (sp->fetch_rate < 0 || sp->page_rate <= 0) {
        return true;            /* nothing to go by yet */
    }

    /*
     * The destination keeps pace when references come as fast as it reads
     * them, with NAS_DEDUP_SPLIT_AHEAD_US of reads queued (so that it
     * never idles while the source deals with other pages), the
     * difference made up over NAS_DEDUP_SPLIT_CATCHUP_US.
     */
    reads = sp->fetch_rate / NAS_DEDUP_CHUNK;
    reads += (reads * NAS_DEDUP_SPLIT_AHEAD_US / 1e6 - sp->backlog) /
             (NAS_DEDUP_SPLIT_CATCHUP_US / 1e6);
    target = MAX(NAS_DEDUP_SPLIT_MIN, MIN(1.0, reads / sp->page_rate));
    sp->share += NAS_DEDUP_SPLIT_GAIN * (target - sp->share);
    return true;
}

unsigned nas_dedup_split_percent(const NasDedupSplit *sp)
{
    return (unsigned)(sp->share * 100 + 0.5);
}
