/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas: the link/NAS split
 *
 * A page whose content is on a shared disk can reach the destination two
 * ways: in full over the migration link, or as a reference that the
 * destination reads from the storage.  Both paths work at once, and the
 * migration is over when the slower one is:
 *
 *     time = max(link work / link rate, NAS work / fetch rate)
 *
 * Sending every such page as a reference is best while the destination
 * reads faster than the link carries pages; when it reads slower (a fast
 * link, a busy or distant NAS), the link idles while the destination is
 * still reading.  The split sends a share of those pages as references
 * and the rest in full, so that both paths end together.
 *
 * The share is fixed (dedup-nas-ref-share 1..100, for experiments) or
 * found while the migration runs (0, the default).  Both paths end
 * together when the destination keeps pace: when references come as fast
 * as it reads them.  Every NAS_DEDUP_SPLIT_PERIOD_US the source compares
 *
 *     pages the destination reads a second (from its DEDUP_PROGRESS)
 *     pages found on disk the source offers a second
 *
 * and moves the share part of the way (NAS_DEDUP_SPLIT_GAIN) to their
 * ratio, corrected so that the destination has NAS_DEDUP_SPLIT_AHEAD_US
 * of reading queued.  The pages the source offers a second depend on the
 * share (references are cheaper to send than pages), which is why it
 * moves only part of the way: the loop converges without knowing the
 * link's rate, only what the source achieves with the share it has.
 * docs/devel/nas-dedup.rst ("Link/NAS split") has the model.
 *
 * This file needs no QEMU: it is unit-tested standalone, against a model
 * of a link and a NAS (tests/unit/test-nas-dedup-split.c).
 */
#ifndef MIGRATION_NAS_DEDUP_SPLIT_H
#define MIGRATION_NAS_DEDUP_SPLIT_H

/* References in a row, so that the destination reads long runs. */
#define NAS_DEDUP_SPLIT_SPAN        256
/*
 * The smallest share: a few references keep the destination's reports,
 * and so the measure of its fetch rate, coming.
 */
#define NAS_DEDUP_SPLIT_MIN         0.02
#define NAS_DEDUP_SPLIT_PERIOD_US   50000
#define NAS_DEDUP_SPLIT_GAIN        0.5
/*
 * The destination should have this much reading queued, so that it never
 * idles while the source deals with pages that are not on disk; a
 * difference is made up over NAS_DEDUP_SPLIT_CATCHUP_US.
 */
#define NAS_DEDUP_SPLIT_AHEAD_US    20000
#define NAS_DEDUP_SPLIT_CATCHUP_US  100000
/*
 * Fewer references queued than this and the destination reads fewer
 * blocks at once than it can (its fetch engine reads 8 runs at once).
 */
#define NAS_DEDUP_SPLIT_DEPTH       (8 * NAS_DEDUP_SPLIT_SPAN)
#define NAS_DEDUP_SPLIT_DEPTH_MAX_US 100000
/*
 * However the share is, references the destination has not read yet may
 * not exceed what it reads in NAS_DEDUP_SPLIT_GUARD_US; before its first
 * report (its rate unknown), NAS_DEDUP_SPLIT_PROBE pages; once the guest
 * is stopped, what it reads in the downtime limit's time left (nothing
 * before its first report).  On a fast link the source could send the
 * whole of a guest's page cache as references in the time the first
 * report takes.
 */
#define NAS_DEDUP_SPLIT_GUARD_US    250000
/*
 * While the link runs at its max-bandwidth, it is the bottleneck: the
 * share only grows, and the destination may fall this much further
 * behind.
 */
#define NAS_DEDUP_SPLIT_GUARD_SAT_US 1000000
#define NAS_DEDUP_SPLIT_PROBE       1024
/* A rate from less reading than this is noise. */
#define NAS_DEDUP_SPLIT_MIN_BUSY_US 2000
/* Offers between two calls of nas_dedup_split_update(), guest running. */
#define NAS_DEDUP_SPLIT_SAMPLE      64

/* What the source knows at one moment; counts are of pages. */
typedef struct NasDedupSplitSample {
    int64_t now_us;
    uint64_t refs_sent;     /* pages sent as references */
    /* The destination's last report; @reports counts them (0: none). */
    uint64_t reports;
    uint64_t refs_done;     /* references whose read is over */
    uint64_t fetched_bytes; /* bytes it read from the drives */
    uint64_t fetch_busy_us; /* time with reads in flight */
    int64_t report_us;      /* when that report came (as @now_us) */
    /* Bytes the source put on the link, and its max-bandwidth (0: none). */
    uint64_t wire_bytes;
    uint64_t link_limit;
    /*
     * The guest is stopped for switchover, with this much of the downtime
     * limit left (negative: it runs).
     */
    int64_t stop_left_us;
} NasDedupSplitSample;

typedef struct NasDedupSplit {
    unsigned fixed;         /* percent, 1..100; 0: found as it goes */
    double share;           /* of eligible pages, sent as references */
    double credit;
    unsigned span;          /* references still to take in a row */
    uint64_t eligible;      /* pages offered */
    uint64_t taken;         /* of which taken as references */
    uint64_t backlog;       /* references not read, as of the last sample */
    uint64_t taken_then;    /* @taken at the last sample */
    uint64_t backlog_cap;
    /* For the automatic share. */
    bool started;
    int64_t last_us;
    uint64_t last_eligible;
    uint64_t last_wire;
    bool saturated;         /* the link ran at its limit last period */
    uint64_t last_reports;
    uint64_t last_fetched;
    uint64_t last_busy_us;
    /* Negative: not measured yet. */
    double page_rate;       /* eligible pages offered a second */
    double fetch_rate;      /* bytes the destination reads a busy second */
    double fetch_rate_all;  /* the same, since the migration started */
} NasDedupSplit;

/* @fixed_pct: 1..100 fixes the share; 0 finds it. */
void nas_dedup_split_init(NasDedupSplit *sp, unsigned fixed_pct);

/*
 * A page whose content is on a shared disk is to be sent: true to send it
 * as a reference, false to send it in full.
 */
bool nas_dedup_split_take(NasDedupSplit *sp);

/*
 * Take in what @x says (call it often: every NAS_DEDUP_SPLIT_SAMPLE offers),
 * and adjust the share to it at most once every NAS_DEDUP_SPLIT_PERIOD_US:
 * returns true if it did.
 */
bool nas_dedup_split_update(NasDedupSplit *sp, const NasDedupSplitSample *x);

/* The share, in percent, as the statistics show it. */
unsigned nas_dedup_split_percent(const NasDedupSplit *sp);

#endif
