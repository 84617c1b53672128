/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas: unit tests of the link/NAS split, against a model of a link
 * and a NAS.
 *
 * The model: the source deals with the guest's pages one after the other;
 * a zero page costs it little, a page sent in full costs 4 KiB of link, a
 * reference its record's bytes of link and the hashing.  References queue
 * at the destination, which reads them one after the other at the fetch
 * rate, and reports what it did every 50 ms.  The migration is over when
 * both are done.  For every scenario, the automatic share must come
 * within 10 % of the best fixed share found by trying them all, and close
 * to that share.  The model's link has no max-bandwidth: the rule for a
 * link at its limit has a test of its own.
 */
#include "qemu/osdep.h"
#include <math.h>
#include "migration/nas-dedup-index.h"
#include "migration/nas-dedup-split.h"

#define PAGE            4096.0
#define REPORT_US       50000

typedef struct Scenario {
    const char *name;
    double link;        /* bytes a second */
    double fetch;       /* bytes a second */
    double zero;        /* share of zero pages */
    double eligible;    /* share of pages on a shared disk */
    uint64_t pages;
} Scenario;

typedef struct Outcome {
    double time;        /* seconds until both paths are done */
    double share;       /* of eligible pages taken as references */
    double link_end, nas_end;
} Outcome;

/*
 * @share_pct: 0 finds the share, 1..100 fixes it, -1 sends every page in
 * full.
 */
static Outcome simulate(const Scenario *sc, int share_pct)
{
    NasDedupSplit sp;
    NasDedupSplitSample x = { .stop_left_us = -1 };
    /* 0.2 us a zero page; 0.4 us and a record's bytes a reference */
    const double zero_cost = 0.2 / 1000000;
    const double ref_cost = 0.4 / 1000000 + 16 / sc->link;
    double t = 0, nas_t = 0, next_report = 0;
    double rep_done = 0, rep_bytes = 0, rep_busy = 0, busy = 0;
    uint64_t i, refs = 0, refs_done = 0, reports = 0, eligible = 0;
    GArray *queue = g_array_new(false, false, sizeof(double));
    guint head = 0;
    uint32_t rnd = 12345;
    Outcome o;

    nas_dedup_split_init(&sp, share_pct > 0 ? share_pct : 0);
    for (i = 0; i < sc->pages; i++) {
        double r;

        rnd = rnd * 1103515245 + 12345;
        r = (rnd >> 8) / (double)(1 << 24);
        x.refs_sent = refs;
        x.now_us = t * 1e6;

        /* The destination reads what came by now; reports every 50 ms. */
        while (head < queue->len && nas_t < t) {
            double arrived = g_array_index(queue, double, head);

            if (arrived > nas_t) {
                nas_t = MIN(arrived, t);
                continue;
            }
            nas_t += PAGE / sc->fetch;
            busy += PAGE / sc->fetch;
            refs_done++;
            head++;
        }
        /* As the destination does: when reads ended, every 50 ms at most. */
        if (t >= next_report && refs_done != rep_done) {
            rep_done = refs_done;
            rep_bytes = refs_done * PAGE;
            rep_busy = busy;
            x.report_us = t * 1e6;
            reports++;
            next_report = t + REPORT_US / 1e6;
        }
        x.reports = reports;
        x.refs_done = rep_done;
        x.fetched_bytes = rep_bytes;
        x.fetch_busy_us = rep_busy * 1e6;

        if (r < sc->zero) {
            t += zero_cost;
        } else if (r < sc->zero + sc->eligible && share_pct >= 0) {
            eligible++;
            if (eligible % NAS_DEDUP_SPLIT_SAMPLE == 0) {
                nas_dedup_split_update(&sp, &x);
            }
            if (nas_dedup_split_take(&sp)) {
                t += ref_cost;
                g_array_append_val(queue, t);
                refs++;
            } else {
                t += PAGE / sc->link;
            }
        } else {
            t += PAGE / sc->link;
        }
    }
    /* The rest of the queue. */
    for (; head < queue->len; head++) {
        nas_t = MAX(nas_t, g_array_index(queue, double, head)) +
                PAGE / sc->fetch;
    }
    o.link_end = t;
    o.nas_end = nas_t;
    o.time = MAX(t, nas_t);
    o.share = eligible ? (double)refs / eligible : 0;
    g_array_free(queue, true);
    return o;
}

static void check_scenario(gconstpointer opaque)
{
    const Scenario *sc = opaque;
    Outcome best = { .time = 1e9 }, autom, all_refs, none;
    int pct;

    for (pct = 1; pct <= 100; pct++) {
        Outcome o = simulate(sc, pct);

        if (o.time < best.time) {
            best = o;
        }
    }
    autom = simulate(sc, 0);
    all_refs = simulate(sc, 100);
    none = simulate(sc, -1);
    if (g_test_verbose()) {
        g_test_message("%s: auto %.3f s (share %.2f, link %.3f s, NAS "
                       "%.3f s); best fixed %.3f s (share %.2f); all "
                       "references %.3f s; none %.3f s", sc->name,
                       autom.time, autom.share, autom.link_end,
                       autom.nas_end, best.time, best.share, all_refs.time,
                       none.time);
    }
    g_assert_cmpfloat(autom.time, <=, best.time * 1.10);
    g_assert_cmpfloat(fabs(autom.share - best.share), <=, 0.10);
    /* Never worse than either extreme, by more than the 10 %. */
    g_assert_cmpfloat(autom.time, <=, MIN(all_refs.time, none.time) * 1.10);
}

static const Scenario scenarios[] = {
    /* 1 GiB guest, 60 % page cache: the benchmark's, three links */
    { "1GbE", 125e6, 370e6, 0.30, 0.60, 262144 },
    { "10GbE", 1250e6, 370e6, 0.30, 0.60, 262144 },
    { "link-like-nas", 400e6, 370e6, 0.10, 0.85, 262144 },
    /* a NAS far faster than the link: every page a reference */
    { "slow-link", 125e6, 2000e6, 0.20, 0.70, 262144 },
    /* a NAS far slower than the link: few references */
    { "slow-nas", 2500e6, 60e6, 0.20, 0.70, 1048576 },
    /* nothing but page cache */
    { "all-cache", 1250e6, 600e6, 0.00, 1.00, 262144 },
};

/* A fixed share is kept, in runs of NAS_DEDUP_SPLIT_SPAN references. */
static void test_fixed(void)
{
    NasDedupSplit sp;
    NasDedupSplitSample x = { .now_us = 1, .stop_left_us = -1,
                              .reports = 1, .fetched_bytes = 1,
                              .fetch_busy_us = 1 };
    unsigned run = 0, runs = 0, i;
    bool prev = false;

    nas_dedup_split_init(&sp, 30);
    g_assert_cmpuint(nas_dedup_split_percent(&sp), ==, 30);
    for (i = 0; i < 64000; i++) {
        bool take = nas_dedup_split_take(&sp);

        if (take) {
            run++;
        } else if (prev) {
            g_assert_cmpuint(run, ==, NAS_DEDUP_SPLIT_SPAN);
            runs++;
            run = 0;
        }
        prev = take;
        x.now_us += 100000;
        g_assert_false(nas_dedup_split_update(&sp, &x));
    }
    g_assert_cmpuint(sp.taken, >=, 19200 - NAS_DEDUP_SPLIT_SPAN);
    g_assert_cmpuint(sp.taken, <=, 19200 + NAS_DEDUP_SPLIT_SPAN);
    g_assert_cmpuint(runs, >=, 19200 / NAS_DEDUP_SPLIT_SPAN - 1);
    g_assert_cmpuint(nas_dedup_split_percent(&sp), ==, 30);

    nas_dedup_split_init(&sp, 100);
    for (i = 0; i < 1000; i++) {
        g_assert_true(nas_dedup_split_take(&sp));
    }
}

/*
 * Before the destination's first report, every eligible page goes as a
 * reference, but no more than NAS_DEDUP_SPLIT_PROBE may wait to be read;
 * a destination that reads nothing gets no more; absurd reports move the
 * share only within its bounds.
 */
static void test_guard(void)
{
    NasDedupSplit sp;
    NasDedupSplitSample x = { .stop_left_us = -1 };
    unsigned i, taken = 0;

    nas_dedup_split_init(&sp, 0);
    for (i = 0; i < 2 * NAS_DEDUP_SPLIT_PROBE; i++) {
        if (!(i % NAS_DEDUP_SPLIT_SPAN)) {
            x.now_us += 10000;
            x.refs_sent = taken;
            nas_dedup_split_update(&sp, &x);
        }
        taken += nas_dedup_split_take(&sp);
    }
    g_assert_cmpuint(taken, ==, NAS_DEDUP_SPLIT_PROBE);
    g_assert_cmpuint(nas_dedup_split_percent(&sp), ==, 100);

    /* It reports, but reads nothing: still nothing more. */
    for (i = 0; i < 100; i++) {
        x.now_us += 100000;
        x.reports++;
        x.fetch_busy_us += 100000;
        nas_dedup_split_update(&sp, &x);
        g_assert_false(nas_dedup_split_take(&sp));
        g_assert_cmpfloat(sp.share, >=, NAS_DEDUP_SPLIT_MIN);
        g_assert_cmpfloat(sp.share, <=, 1.0);
    }

    /* It claims to read a petabyte every 100 ms, and all references. */
    for (i = 0; i < 100; i++) {
        x.now_us += 100000;
        x.reports++;
        x.fetched_bytes += 1ULL << 50;
        x.fetch_busy_us += 100000;
        x.refs_done = UINT64_MAX;
        nas_dedup_split_update(&sp, &x);
        g_assert_cmpfloat(sp.share, >=, NAS_DEDUP_SPLIT_MIN);
        g_assert_cmpfloat(sp.share, <=, 1.0);
    }
    g_assert_cmpuint(nas_dedup_split_percent(&sp), ==, 100);
    g_assert_true(nas_dedup_split_take(&sp));
}

/*
 * While the link runs at its max-bandwidth, the share only grows, even
 * with a destination that reads slower than references come: pages in
 * full would wait for the link.
 */
static void test_saturated(void)
{
    NasDedupSplit sp;
    NasDedupSplitSample x = { .stop_left_us = -1, .link_limit = 1000000 };
    unsigned i;

    nas_dedup_split_init(&sp, 0);
    sp.share = 0.5;
    for (i = 0; i < 20; i++) {
        unsigned k;

        /* 1000 eligible pages a period; it reads 10 a period. */
        for (k = 0; k < 1000; k++) {
            nas_dedup_split_take(&sp);
        }
        x.now_us += 100000;
        x.reports++;
        x.fetch_busy_us += 100000;
        x.fetched_bytes += 10 * NAS_DEDUP_CHUNK +
                           (i ? 0 : NAS_DEDUP_SPLIT_PROBE * NAS_DEDUP_CHUNK);
        x.report_us = x.now_us;
        /* The link at its limit: 100 kB a period of 100 ms. */
        x.wire_bytes += 100000;
        nas_dedup_split_update(&sp, &x);
    }
    g_assert_cmpuint(nas_dedup_split_percent(&sp), ==, 100);
    /* The same without a limit: the share falls. */
    x.link_limit = 0;
    for (i = 0; i < 20; i++) {
        x.now_us += 100000;
        x.reports++;
        x.fetch_busy_us += 100000;
        x.fetched_bytes += 10 * NAS_DEDUP_CHUNK;
        x.report_us = x.now_us;
        x.refs_sent += 1000;
        nas_dedup_split_update(&sp, &x);
        for (unsigned k = 0; k < 1000; k++) {
            nas_dedup_split_take(&sp);
        }
    }
    g_assert_cmpuint(nas_dedup_split_percent(&sp), <, 10);
}

/*
 * With the guest stopped, references may only make it wait as long as the
 * downtime limit has left, at the rate the destination reads.
 */
static void test_stopped(void)
{
    NasDedupSplit sp;
    NasDedupSplitSample x = { .stop_left_us = 10000 };
    unsigned i, taken = 0;

    /* No report yet: nothing. */
    nas_dedup_split_init(&sp, 0);
    nas_dedup_split_update(&sp, &x);
    for (i = 0; i < 100; i++) {
        taken += nas_dedup_split_take(&sp);
    }
    g_assert_cmpuint(taken, ==, 0);

    /* 400 pages a second read, 10 ms left: 4 pages. */
    x.reports = 1;
    x.fetched_bytes = NAS_DEDUP_SPLIT_PROBE * NAS_DEDUP_CHUNK;
    x.fetch_busy_us = NAS_DEDUP_SPLIT_PROBE * 1000000ULL / 400;
    x.refs_sent = x.refs_done = NAS_DEDUP_SPLIT_PROBE;
    nas_dedup_split_update(&sp, &x);
    for (i = 0; i < 100; i++) {
        taken += nas_dedup_split_take(&sp);
    }
    g_assert_cmpuint(taken, ==, 4);
}

int main(int argc, char **argv)
{
    size_t i;

    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/nas-dedup/split/fixed", test_fixed);
    g_test_add_func("/nas-dedup/split/guard", test_guard);
    g_test_add_func("/nas-dedup/split/stopped", test_stopped);
    g_test_add_func("/nas-dedup/split/saturated", test_saturated);
    for (i = 0; i < G_N_ELEMENTS(scenarios); i++) {
        g_autofree char *path = g_strdup_printf("/nas-dedup/split/model/%s",
                                                scenarios[i].name);

        g_test_add_data_func(path, &scenarios[i], check_scenario);
    }
    return g_test_run();
}
