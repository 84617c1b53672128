/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas: capability checks, the disk content index, statistics
 */
#include "qemu/osdep.h"
#include "qemu/error-report.h"
#include "qemu/rcu.h"
#include "qemu/timer.h"
#include "qemu/units.h"
#include "qapi/error.h"
#include "crypto/random.h"
#include "exec/target_page.h"
#include "hw/boards.h"
#include "monitor/monitor.h"
#include "migration.h"
#include "options.h"
#include "nas-dedup-int.h"
#include "trace.h"

NasDedupCounters nas_dedup_counters;

static struct {
    QemuMutex lock;             /* serializes creation and resizing */
    void *index;                /* NasDedupIndex, RCU-protected */
    /*
     * The secret of the keyed hash, drawn once from the host's random
     * source (never from the guest's), when the first index is made.
     * Every index of this QEMU uses it; the destination gets it in the
     * stream.  See the threat model in docs/devel/nas-dedup.rst.
     */
    NasDedupKey key;
    bool have_key;
    int64_t index_born_ms;      /* QEMU_CLOCK_REALTIME, when it was made */
} nas_dedup;

void nas_dedup_init(void)
{
    qemu_mutex_init(&nas_dedup.lock);
}

bool nas_dedup_caps_check(const bool *new_caps, Error **errp)
{
    static const struct {
        MigrationCapability cap;
        const char *why;
    } conflicts[] = {
        { MIGRATION_CAPABILITY_MAPPED_RAM, "mapped-ram writes to a file" },
        { MIGRATION_CAPABILITY_BACKGROUND_SNAPSHOT,
          "a snapshot has no destination to read the disks" },
        { MIGRATION_CAPABILITY_X_COLO, "COLO keeps sending after switchover" },
        { MIGRATION_CAPABILITY_XBZRLE,
          "its cache would not match pages sent as references" },
    };
    size_t i;

#ifndef CONFIG_LIBXXHASH
    error_setg(errp, "Capability 'dedup-nas' is not available: this QEMU "
               "was built without libxxhash");
    error_append_hint(errp, "Build it with libxxhash (configure "
                      "--enable-libxxhash) for dedup-nas.\n");
    return false;
#endif
    for (i = 0; i < ARRAY_SIZE(conflicts); i++) {
        if (new_caps[conflicts[i].cap]) {
            error_setg(errp, "Capability 'dedup-nas' is not compatible with "
                       "'%s': %s", MigrationCapability_str(conflicts[i].cap),
                       conflicts[i].why);
            return false;
        }
    }
    if (migrate_rdma()) {
        error_setg(errp, "Capability 'dedup-nas' is not compatible with "
                   "RDMA migration");
        return false;
    }
    if (qemu_target_page_size() != NAS_DEDUP_CHUNK) {
        error_setg(errp, "Capability 'dedup-nas' needs %u-byte target pages",
                   NAS_DEDUP_CHUNK);
        return false;
    }
    return true;
}

#define NAS_DEDUP_INDEX_MAX_BYTES (64 * GiB)

bool nas_dedup_index_size_check(uint64_t size, Error **errp)
{
    if (size != 0 && (size < NAS_DEDUP_INDEX_MIN_BYTES ||
                      size > NAS_DEDUP_INDEX_MAX_BYTES)) {
        error_setg(errp, "Parameter 'dedup-nas-index-size' must be 0 (auto) "
                   "or between %u and %" PRIu64 " bytes",
                   NAS_DEDUP_INDEX_MIN_BYTES,
                   (uint64_t)NAS_DEDUP_INDEX_MAX_BYTES);
        return false;
    }
    return true;
}

#define NAS_DEDUP_SLACK_MAX_MS 60000

bool nas_dedup_switchover_slack_check(uint64_t ms, Error **errp)
{
    if (ms > NAS_DEDUP_SLACK_MAX_MS) {
        error_setg(errp, "Parameter 'dedup-nas-switchover-slack' must be at "
                   "most %u ms", NAS_DEDUP_SLACK_MAX_MS);
        return false;
    }
    return true;
}

/* The budget for an index with one entry for every page of guest RAM. */
static uint64_t nas_dedup_auto_size(void)
{
    uint64_t ram = current_machine ? current_machine->ram_size : 0;

    return MAX(nas_dedup_index_bytes_for(MAX(ram / NAS_DEDUP_CHUNK, 1)),
               (uint64_t)NAS_DEDUP_INDEX_MIN_BYTES);
}

static uint64_t nas_dedup_index_budget(void)
{
    uint64_t size = migrate_get_current()->parameters.dedup_nas_index_size;

    return size ? size : nas_dedup_auto_size();
}

/*
 * From the VM's start by default (x-dedup-nas-track), so that the page
 * cache is known whenever the capability is turned on; the cost is the
 * index's memory and hashing the guest's disk I/O as it completes.
 */
bool nas_dedup_tracking(void)
{
#ifdef CONFIG_LIBXXHASH
    return migrate_dedup_nas() || migrate_get_current()->dedup_nas_track;
#else
    return false;               /* no hash (and no capability) */
#endif
}

#define NAS_DEDUP_INDEX_YOUNG_MS (60 * 1000)

/*
 * At "migrate", in the monitor's context.  dedup-nas needs return-path;
 * checked here, not when capabilities are set: libvirt sets return-path
 * itself for each migration and clears every capability it knows after
 * one, which must not fail with dedup-nas on from -global.
 *
 * Pages are found on disk only for disk I/O the index saw: say so when
 * that cannot be much, with the way out (HMP prints it; QMP clients see
 * index-entries in query-migrate).
 */
bool nas_dedup_migrate_check(Error **errp)
{
    NasDedupIndexStats is = { 0 };
    int64_t age = 0;

    if (!migrate_dedup_nas()) {
        return true;
    }
    if (!migrate_return_path()) {
        error_setg(errp, "Capability 'dedup-nas' requires capability "
                   "'return-path'");
        error_append_hint(errp, "The destination asks for the pages it "
                          "could not verify on the return path.\n");
        return false;
    }
    WITH_RCU_READ_LOCK_GUARD() {
        NasDedupIndex *idx = nas_dedup_index_peek();

        if (idx) {
            nas_dedup_index_get_stats(idx, &is);
            age = qemu_clock_get_ms(QEMU_CLOCK_REALTIME) -
                  nas_dedup.index_born_ms;
        }
    }
    if (!is.entries) {
        warn_report("dedup-nas: no guest disk content is indexed, every "
                    "page will be sent in full");
        error_printf("The index learns from guest disk I/O %s.\n",
                     migrate_get_current()->dedup_nas_track ?
                     "since the VM started, and there was none" :
                     "while dedup-nas is on (x-dedup-nas-track=off): turn "
                     "it on well before migrating, or drop "
                     "x-dedup-nas-track=off");
    } else if (!migrate_get_current()->dedup_nas_track &&
               age < NAS_DEDUP_INDEX_YOUNG_MS) {
        /* (Tracking from the start, a young index is a young VM.) */
        warn_report("dedup-nas: the index only knows the guest disk I/O of "
                    "the last %" PRId64 " s (%" PRIu64 " blocks): pages read "
                    "before are sent in full", age / 1000, is.entries);
        error_printf("Tracking starts with the VM unless "
                     "x-dedup-nas-track=off.\n");
    }
    return true;
}

NasDedupIndex *nas_dedup_index_get(void)
{
    NasDedupIndex *idx = qatomic_rcu_read(&nas_dedup.index);

    if (idx) {
        return idx;
    }
    QEMU_LOCK_GUARD(&nas_dedup.lock);
    if (!nas_dedup.have_key) {
        Error *err = NULL;

        if (qcrypto_random_bytes(nas_dedup.key.secret,
                                 sizeof(nas_dedup.key.secret), &err) < 0) {
            error_prepend(&err, "dedup-nas: no key for the content hash, "
                          "disk content is not tracked: ");
            error_report_err(err);
            return NULL;
        }
        nas_dedup.have_key = true;
    }
    if (!nas_dedup.index) {
        uint64_t budget = nas_dedup_index_budget();

        idx = nas_dedup_index_new(budget, &nas_dedup.key);
        nas_dedup.index_born_ms = qemu_clock_get_ms(QEMU_CLOCK_REALTIME);
        trace_nas_dedup_index_new(budget);
        qatomic_rcu_set(&nas_dedup.index, idx);
    }
    return nas_dedup.index;
}

NasDedupIndex *nas_dedup_index_peek(void)
{
    return qatomic_rcu_read(&nas_dedup.index);
}

/*
 * A new budget takes effect with a new, empty index: what the old one knew
 * is dropped, so set the size before the guest starts when possible.
 */
void nas_dedup_index_resize(Error **errp)
{
    NasDedupIndex *old;

    WITH_QEMU_LOCK_GUARD(&nas_dedup.lock) {
        old = nas_dedup.index;
        if (!old) {
            return;
        }
        qatomic_rcu_set(&nas_dedup.index,
                        nas_dedup_index_new(nas_dedup_index_budget(),
                                            &nas_dedup.key));
        nas_dedup.index_born_ms = qemu_clock_get_ms(QEMU_CLOCK_REALTIME);
    }
    synchronize_rcu();
    nas_dedup_index_free(old);
}

void nas_dedup_stats_reset(bool incoming)
{
    NasDedupCounters *c = &nas_dedup_counters;

    if (incoming) {
        stat64_set(&c->fetched_blocks, 0);
        stat64_set(&c->fetched_bytes, 0);
        stat64_set(&c->verified_pages, 0);
        stat64_set(&c->mismatches, 0);
        stat64_set(&c->read_errors, 0);
        stat64_set(&c->resend_requests, 0);
        stat64_set(&c->fill_pages, 0);
        stat64_set(&c->fill_faults, 0);
        stat64_set(&c->fill_fault_reads, 0);
        stat64_set(&c->fill_met, 0);
        stat64_set(&c->fetch_time_us, 0);
        qatomic_set_i64(&c->fetch_busy_since, 0);
        qatomic_set(&c->incoming_used, false);
        qatomic_set(&c->fetch_connections, 0);
    } else {
        stat64_set(&c->ref_pages, 0);
        stat64_set(&c->ref_bytes, 0);
        stat64_set(&c->resent_pages, 0);
        stat64_set(&c->fetch_rate, 0);
    }
}

void nas_dedup_fill_info(MigrationInfo *info, bool incoming)
{
    NasDedupCounters *c = &nas_dedup_counters;
    int64_t since;

    /* A destination loads references with the capability off, too. */
    if (!migrate_dedup_nas() &&
        !(incoming && qatomic_read(&c->incoming_used))) {
        return;
    }
    if (incoming) {
        DedupNasIncomingStats *st = g_new0(DedupNasIncomingStats, 1);

        st->fetched_blocks = stat64_get(&c->fetched_blocks);
        st->fetched_bytes = stat64_get(&c->fetched_bytes);
        st->verified_pages = stat64_get(&c->verified_pages);
        st->mismatches = stat64_get(&c->mismatches);
        st->read_errors = stat64_get(&c->read_errors);
        st->resend_requests = stat64_get(&c->resend_requests);
        st->postcopy_fill_pages = stat64_get(&c->fill_pages);
        st->postcopy_fill_faults = stat64_get(&c->fill_faults);
        st->postcopy_fill_fault_reads = stat64_get(&c->fill_fault_reads);
        st->postcopy_fill_met = stat64_get(&c->fill_met);
        since = qatomic_read_i64(&c->fetch_busy_since);
        st->fetch_time = (stat64_get(&c->fetch_time_us) +
                          (since ? g_get_monotonic_time() - since : 0)) / 1000;
        st->fetch_connections = qatomic_read(&c->fetch_connections);
        info->dedup_nas_incoming = st;
    } else {
        DedupNasOutgoingStats *st = g_new0(DedupNasOutgoingStats, 1);

        st->reference_pages = stat64_get(&c->ref_pages);
        st->reference_bytes = stat64_get(&c->ref_bytes);
        st->resent_pages = stat64_get(&c->resent_pages);
        st->bytes_saved = nas_dedup_saved(st->reference_pages,
                                          st->reference_bytes);
        WITH_RCU_READ_LOCK_GUARD() {
            NasDedupIndex *idx = qatomic_rcu_read(&nas_dedup.index);
            NasDedupIndexStats is;

            if (idx) {
                nas_dedup_index_get_stats(idx, &is);
                st->index_size = is.bytes;
                st->index_capacity = is.capacity;
                st->index_entries = is.entries;
                st->index_hits = is.hits;
                st->index_misses = is.misses;
                st->index_evictions = is.evictions;
            }
        }
        st->reference_share = qatomic_read(&c->ref_share);
        st->fetch_rate = stat64_get(&c->fetch_rate);
        info->dedup_nas = st;
    }
}

void nas_dedup_hmp_info(Monitor *mon, const MigrationInfo *info)
{
    const DedupNasOutgoingStats *s = info->dedup_nas;
    const DedupNasIncomingStats *d = info->dedup_nas_incoming;

    if (s) {
        monitor_printf(mon, "dedup-nas reference pages: %" PRIu64 "\n",
                       s->reference_pages);
        monitor_printf(mon, "dedup-nas reference bytes: %" PRIu64 "\n",
                       s->reference_bytes);
        monitor_printf(mon, "dedup-nas bytes saved: %" PRIu64 "\n",
                       s->bytes_saved);
        monitor_printf(mon, "dedup-nas resent pages: %" PRIu64 "\n",
                       s->resent_pages);
        monitor_printf(mon, "dedup-nas index: %" PRIu64 " of %" PRIu64
                       " entries, %" PRIu64 " bytes\n", s->index_entries,
                       s->index_capacity, s->index_size);
        monitor_printf(mon, "dedup-nas index hits: %" PRIu64 " misses: %"
                       PRIu64 " evictions: %" PRIu64 "\n", s->index_hits,
                       s->index_misses, s->index_evictions);
        monitor_printf(mon, "dedup-nas reference share: %u %%, destination "
                       "fetch rate: %" PRIu64 " bytes/s\n",
                       s->reference_share, s->fetch_rate);
    }
    if (d) {
        monitor_printf(mon, "dedup-nas fetched: %" PRIu64 " blocks, %" PRIu64
                       " bytes in %" PRIu64 " ms through %u connection(s)\n",
                       d->fetched_blocks, d->fetched_bytes, d->fetch_time,
                       d->fetch_connections);
        monitor_printf(mon, "dedup-nas verified pages: %" PRIu64 "\n",
                       d->verified_pages);
        monitor_printf(mon, "dedup-nas mismatches: %" PRIu64
                       " read errors: %" PRIu64 " resend requests: %" PRIu64
                       "\n", d->mismatches, d->read_errors,
                       d->resend_requests);
        if (d->postcopy_fill_pages || d->postcopy_fill_faults ||
            d->postcopy_fill_met) {
            monitor_printf(mon, "dedup-nas postcopy fill: %" PRIu64
                           " pages placed, %" PRIu64 " came from the "
                           "source first, faults: %" PRIu64 " read from "
                           "the storage, %" PRIu64 " asked from the "
                           "source\n", d->postcopy_fill_pages,
                           d->postcopy_fill_met,
                           d->postcopy_fill_fault_reads,
                           d->postcopy_fill_faults);
        }
    }
}
