/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas: what a migration would send now (query-dedup-nas-estimate)
 *
 * Every page of migratable guest RAM is classified as a migration would
 * see it: zero, found on a guest disk by the index (a reference), or
 * neither (sent in full).  The bytes on the wire follow ram.c's page
 * header and nas-dedup-save.c's REFS records; the times follow the model
 * of the link/NAS split (docs/devel/nas-dedup.rst): the link carries the
 * pages in full and the references, the storage gives the destination
 * the blocks, and the split shares the references so that both end
 * together.  Dirtying while migrating is not predicted.
 */
#include "qemu/osdep.h"
#include "qemu/cutils.h"
#include "qemu/rcu.h"
#include "qapi/error.h"
#include "qapi/qapi-commands-migration.h"
#include "qobject/qdict.h"
#include "exec/target_page.h"
#include "monitor/hmp.h"
#include "monitor/monitor.h"
#include "migration.h"
#include "options.h"
#include "ram.h"
#include "nas-dedup-int.h"
#include "nas-dedup-wire.h"

/* Bytes on the wire: a page header is a be64 of address and flags. */
#define EST_PAGE_HDR    8
#define EST_ZERO        (EST_PAGE_HDR + 1)
#define EST_PAGE        (EST_PAGE_HDR + NAS_DEDUP_CHUNK)
/* A REFS record: page header, type, drive, npages, disk offset. */
#define EST_RUN         (EST_PAGE_HDR + 1 + 2 + 2 + 8)
#define EST_REF         16

typedef struct Tally {
    uint64_t total, zero, refs, unique, runs;
} Tally;

static void tally_ram(Tally *t)
{
    NasDedupIndex *idx;
    RAMBlock *block;

    RCU_READ_LOCK_GUARD();
    idx = nas_dedup_index_peek();
    RAMBLOCK_FOREACH_MIGRATABLE(block) {
        NasDedupLoc prev = { 0 };
        unsigned run = 0;          /* pages in the current run, 0: none */
        ram_addr_t off;

        for (off = 0; off < block->used_length; off += NAS_DEDUP_CHUNK) {
            const void *p = block->host + off;
            NasDedupLoc loc;

            t->total++;
            if (buffer_is_zero(p, NAS_DEDUP_CHUNK)) {
                t->zero++;
                run = 0;
                continue;
            }
            if (!idx ||
                !nas_dedup_index_find(idx,
                    nas_dedup_hash64(nas_dedup_index_key(idx), 0, p), &loc) ||
                !nas_dedup_drive_live(loc.drive)) {
                t->unique++;
                run = 0;
                continue;
            }
            t->refs++;
            if (!run || run == NAS_DEDUP_REFS_MAX || loc.drive != prev.drive ||
                loc.offset != prev.offset + NAS_DEDUP_CHUNK) {
                t->runs++;
                run = 0;
            }
            run++;
            prev = loc;
        }
    }
}

DedupNasEstimate *qmp_query_dedup_nas_estimate(bool has_link_bandwidth,
                                               uint64_t link_bandwidth,
                                               bool has_storage_bandwidth,
                                               uint64_t storage_bandwidth,
                                               Error **errp)
{
    DedupNasEstimate *e;
    Tally t = { 0 };
    double link, storage, full, ref_wire, s, t_link, t_nas;

    if (qemu_target_page_size() != NAS_DEDUP_CHUNK) {
        error_setg(errp, "dedup-nas needs %u-byte target pages",
                   NAS_DEDUP_CHUNK);
        return NULL;
    }
    tally_ram(&t);

    e = g_new0(DedupNasEstimate, 1);
    e->total_pages = t.total;
    e->zero_pages = t.zero;
    e->reference_pages = t.refs;
    e->unique_pages = t.unique;
    full = (double)t.unique * EST_PAGE + (double)t.zero * EST_ZERO;
    e->precopy_bytes = full + (double)t.refs * EST_PAGE;
    e->dedup_nas_bytes = full + (double)t.refs * EST_REF +
                         (double)t.runs * EST_RUN;
    e->storage_bytes = t.refs * NAS_DEDUP_CHUNK;

    link = has_link_bandwidth ? link_bandwidth : migrate_max_bandwidth();
    storage = has_storage_bandwidth ? storage_bandwidth :
              stat64_get(&nas_dedup_counters.fetch_rate);
    if (link <= 0) {
        return e;
    }
    e->has_link_bandwidth = true;
    e->link_bandwidth = link;
    e->has_precopy_time = true;
    e->precopy_time = e->precopy_bytes * 1000.0 / link;
    if (storage <= 0) {
        return e;
    }
    e->has_storage_bandwidth = true;
    e->storage_bandwidth = storage;

    /*
     * With a share s of the references sent as such: the link carries
     * the rest in full, the storage s of them.  s = 1 unless the storage
     * would then end last; else the s at which both end together.
     */
    ref_wire = t.refs ? (double)(e->dedup_nas_bytes - full) / t.refs : 0;
    s = 1;
    t_link = (double)e->dedup_nas_bytes / link;
    t_nas = (double)e->storage_bytes / storage;
    if (t_nas > t_link) {
        s = (full + (double)t.refs * EST_PAGE) / link /
            ((double)t.refs * NAS_DEDUP_CHUNK / storage +
             (double)t.refs * (EST_PAGE - ref_wire) / link);
        t_link = (full + t.refs * ((1 - s) * EST_PAGE + s * ref_wire)) / link;
        t_nas = s * t.refs * NAS_DEDUP_CHUNK / storage;
    }
    e->has_dedup_nas_time = true;
    e->dedup_nas_time = MAX(t_link, t_nas) * 1000;
    e->has_reference_share = true;
    e->reference_share = s * 100;
    return e;
}

void hmp_info_dedup_nas_estimate(Monitor *mon, const QDict *qdict)
{
    Error *err = NULL;
    DedupNasEstimate *e = qmp_query_dedup_nas_estimate(
        qdict_haskey(qdict, "link"), qdict_get_try_int(qdict, "link", 0),
        qdict_haskey(qdict, "storage"),
        qdict_get_try_int(qdict, "storage", 0), &err);

    if (!e) {
        hmp_handle_error(mon, err);
        return;
    }
    monitor_printf(mon, "pages: %" PRIu64 " (%" PRIu64 " zero, %" PRIu64
                   " found on disks, %" PRIu64 " unique)\n", e->total_pages,
                   e->zero_pages, e->reference_pages, e->unique_pages);
    monitor_printf(mon, "on the wire: pre-copy %" PRIu64 " bytes, dedup-nas %"
                   PRIu64 " bytes and %" PRIu64 " read from storage\n",
                   e->precopy_bytes, e->dedup_nas_bytes, e->storage_bytes);
    if (e->has_precopy_time) {
        monitor_printf(mon, "at %" PRIu64 " bytes/s: pre-copy %" PRIu64
                       " ms\n", e->link_bandwidth, e->precopy_time);
    }
    if (e->has_dedup_nas_time) {
        monitor_printf(mon, "and %" PRIu64 " bytes/s from storage: dedup-nas %"
                       PRIu64 " ms (%u %% of the pages on disk as "
                       "references)\n", e->storage_bandwidth,
                       e->dedup_nas_time, e->reference_share);
    } else {
        monitor_printf(mon, "(dedup-nas time: give the storage rate)\n");
    }
    qapi_free_DedupNasEstimate(e);
}
