/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas: send RAM pages that are also on the guest's (shared) disks as
 * references to disk blocks.  QEMU-facing glue; see docs/devel/nas-dedup.rst.
 */
#ifndef MIGRATION_NAS_DEDUP_INT_H
#define MIGRATION_NAS_DEDUP_INT_H

#include "qapi/qapi-types-migration.h"
#include "qemu/stats64.h"
#include "exec/ramblock.h"
#include "migration/nas-dedup.h"

typedef struct MigrationIncomingState MigrationIncomingState;

/* nas-dedup.c: capability, parameters, index, statistics */
/* Once, at start-up (migration_object_init()). */
void nas_dedup_init(void);
bool nas_dedup_caps_check(const bool *new_caps, Error **errp);
bool nas_dedup_switchover_slack_check(uint64_t ms, Error **errp);
bool nas_dedup_index_size_check(uint64_t size, Error **errp);
void nas_dedup_index_resize(Error **errp);
void nas_dedup_fill_info(MigrationInfo *info, bool incoming);
void nas_dedup_hmp_info(Monitor *mon, const MigrationInfo *info);
void nas_dedup_stats_reset(bool incoming);
/*
 * At migrate: refuse without return-path; warn if the index cannot know
 * the page cache.
 */
bool nas_dedup_migrate_check(Error **errp);

typedef struct NasDedupCounters {
    /* source */
    Stat64 ref_pages;
    Stat64 ref_bytes;
    Stat64 resent_pages;
    /* destination */
    Stat64 fetched_blocks;
    Stat64 fetched_bytes;
    Stat64 verified_pages;
    Stat64 mismatches;
    Stat64 read_errors;
    Stat64 resend_requests;
    Stat64 fill_pages;          /* placed after postcopy started */
    Stat64 fill_faults;         /* faulted on before, asked from source */
    Stat64 fill_fault_reads;    /* faulted on before, read first */
    Stat64 fill_met;            /* came from the source before placed */
    Stat64 fetch_time_us;       /* with at least one read in flight */
    /* Reads in flight since (us); 0: none.  qatomic_*_i64() access. */
    int64_t fetch_busy_since;
    /*
     * The incoming stream used dedup-nas (a SETUP record came), whatever
     * this side's capability says.  qatomic_*() access.
     */
    bool incoming_used;
    /* Connections the fetch reads through.  qatomic_*() access. */
    unsigned fetch_connections;
    /*
     * Source: the link/NAS split's share (percent) and the destination's
     * fetch rate as last reported (bytes a second).
     */
    unsigned ref_share;         /* qatomic_*() access */
    Stat64 fetch_rate;
} NasDedupCounters;
extern NasDedupCounters nas_dedup_counters;

/* nas-dedup-save.c: source side, called from ram.c */
/*
 * Writes a RAM page header (offset | flags, and the RAMBlock id unless it is
 * the last one sent) for @block/@offset_flags to @f; @opaque is ram.c's.
 */
typedef size_t (*NasDedupPutHeader)(void *opaque, QEMUFile *f,
                                    RAMBlock *block, ram_addr_t offset_flags);
int nas_dedup_save_setup(Error **errp);
void nas_dedup_save_cleanup(void);
/*
 * Try to send the target page at @offset of @block as a reference.
 * Returns 1 if it was (possibly queued in a run of references), 0 if it
 * must be sent another way, negative on a stream error.
 */
int nas_dedup_save_page(QEMUFile *f, NasDedupPutHeader put_header,
                        void *opaque, RAMBlock *block, ram_addr_t offset);
/*
 * The target page at @offset of @block is about to be sent, in whatever
 * form: a reference to it sent before is superseded.
 */
void nas_dedup_save_sending(RAMBlock *block, ram_addr_t offset);
/* ram.c synced its dirty bitmap (under its bitmap mutex). */
void nas_dedup_save_bitmap_synced(void);
/*
 * Send the pending run of references, if any; dirty again the pages the
 * destination asked for.
 */
int nas_dedup_save_flush(Error **errp);
/*
 * Send the pending run of references, if any (the bitmap mutex may be
 * held): before each multifd sync, so that references go before the data
 * of the next round.  Returns the stream's error.
 */
int nas_dedup_save_flush_run(void);
/*
 * Send a SYNC record (@final: the last one; @lazy: the last one before
 * postcopy, whose references are filled after it starts) on the stream
 * of the last reference.  Returns its sequence number, or 0 if no
 * reference was sent yet (no stream to send it on).
 */
uint32_t nas_dedup_save_put_sync(bool final, bool lazy);
/* Pages sent (or queued in a run) as references; 0 if none. */
uint64_t nas_dedup_save_refs_sent(void);
/*
 * Bytes that references saved on the wire so far (what the pages would
 * have taken in full, less what the references took).
 */
uint64_t nas_dedup_save_bytes_saved(void);
/* What @pages pages sent as references in @bytes bytes saved. */
static inline uint64_t nas_dedup_saved(uint64_t pages, uint64_t bytes)
{
    return pages * NAS_DEDUP_CHUNK > bytes ? pages * NAS_DEDUP_CHUNK - bytes
                                           : 0;
}
/* This migration may send references (it has a return path). */
bool nas_dedup_save_active(void);
/*
 * No more references from now on (migration thread); and whether that
 * was said.
 */
void nas_dedup_save_close(void);
bool nas_dedup_save_closed(void);
/*
 * Closed, and the destination confirmed every reference (the postcopy
 * gate says so): the guest may stop without a backlog of reads.
 */
void nas_dedup_save_set_resolved(void);
bool nas_dedup_save_resolved(void);
/*
 * The scan of the dirty bitmap wrapped to the first RAMBlock (a pass over
 * RAM is over: ram.c's find_dirty_block()); how many times it did.
 */
void nas_dedup_save_pass_done(void);
uint64_t nas_dedup_save_passes(void);
/*
 * Migration thread, postcopy asked for: until the first pass is over,
 * send pages only as references, and leave the others for postcopy
 * (they go out of the dirty bitmap, and nas_dedup_save_undefer() puts
 * them back, without ram.c's bitmap mutex; it returns how many).  Pages
 * left out and not put back yet: pre-copy must not complete.
 */
void nas_dedup_save_defer(void);
int64_t nas_dedup_save_undefer(Error **errp);
uint64_t nas_dedup_save_deferred(void);
/*
 * Migration thread, in postcopy after that pass, without ram.c's bitmap
 * mutex: dirty up to @max of the pages it sent as references, from the
 * last one back, so that they go in full while the destination fills
 * from the first one on.  Returns how many it took (0: none left); and
 * how many it took in all.
 */
int64_t nas_dedup_save_meet(uint64_t max, Error **errp);
uint64_t nas_dedup_save_met_pages(void);
/*
 * The guest just stopped for switchover (top of ram_save_complete()): arm
 * the bound on how long dedup-nas may keep it stopped.
 */
void nas_dedup_save_switchover(void);
/*
 * At switchover, with every page sent: make sure the destination verified
 * or got again every page sent as a reference.  Returns > 0 if pages were
 * re-dirtied and must be sent before calling it again, 0 when done.
 */
int nas_dedup_save_complete(QEMUFile *f, NasDedupPutHeader put_header,
                            void *opaque, Error **errp);

/* nas-dedup-rp.c: the source's end of the return path */
/* Once, at start-up (migration_object_init()). */
void nas_dedup_rp_init(void);
/* A migration with dedup-nas and a return path starts, and ends. */
void nas_dedup_rp_start(MigrationState *s);
void nas_dedup_rp_stop(void);
/* Return-path handlers, in the return-path thread. */
int nas_dedup_rp_resend(MigrationState *s, const uint8_t *buf, size_t len,
                        Error **errp);
int nas_dedup_rp_sync_ack(MigrationState *s, const uint8_t *buf, size_t len,
                          Error **errp);
int nas_dedup_rp_progress(MigrationState *s, const uint8_t *buf, size_t len,
                          Error **errp);
/*
 * Migration thread: what the destination last reported of its reads
 * (@refs_done, @fetched_bytes, @fetch_busy_us) and when it came
 * (@when_us, g_get_monotonic_time()); returns how many reports came (0:
 * none yet, and the four are 0).
 */
uint64_t nas_dedup_rp_progress_get(uint64_t *refs_done,
                                   uint64_t *fetched_bytes,
                                   uint64_t *fetch_busy_us,
                                   int64_t *when_us);
/*
 * Fail the migration with @err from any thread, unless the final SYNC
 * went out: from then on the destination may complete and run the guest,
 * and a source that resumed too would run it twice.  Shutting the
 * channels down, as migrate_cancel does, also frees a migration thread
 * blocked writing to a destination that stopped reading.
 */
void nas_dedup_rp_fail(MigrationState *s, const Error *err);
/*
 * The final SYNC is about to go: from then on nothing of ours may fail
 * the migration, or the guest could run on both sides.  Fails if the
 * migration failed already.  @lazy: the final SYNC hands the references
 * still unresolved over to the destination's fill after postcopy starts;
 * its RESEND and SYNC_ACK still count, and what would fail the migration
 * pauses postcopy instead.
 */
int nas_dedup_rp_final(MigrationState *s, bool lazy, Error **errp);
/*
 * Migration thread: true if the destination asked for this page (send it
 * in full, once).
 */
bool nas_dedup_rp_take_noref(RAMBlock *block, ram_addr_t offset);
/*
 * Under ram.c's bitmap mutex, for a page postcopy's destination requests
 * that is not dirty: true if the destination asked for it again (its
 * DEDUP_RESEND precedes the request) and it is not dirty again yet, and
 * then it is no longer asked; the caller dirties it and sends it now.
 */
bool nas_dedup_rp_take_asked(RAMBlock *block, unsigned long page);
/* Pages asked again and not offered to nas_dedup_save_page() since. */
uint64_t nas_dedup_rp_noref_pages(void);
/*
 * Migration thread, without ram.c's bitmap mutex: dirty again the pages
 * the destination asked for since the last call (@all: every page asked
 * and not sent in full yet), unless they were sent in full meanwhile.
 * Returns how many pages it dirtied.
 */
int64_t nas_dedup_rp_redirty(bool all, Error **errp);
/* SYNC @seq is being sent. */
void nas_dedup_rp_sync_sent(uint32_t seq);
/*
 * Migration thread: a REFS record is about to be sent (the next number),
 * of pages offered in dirty-bitmap sync @epoch.
 */
void nas_dedup_rp_refs_sent(uint32_t epoch);
/*
 * The page at @offset of @block is offered for sending in sync @epoch (in
 * whatever form), by the thread that sends it.  A RESEND for a
 * reference sent in an earlier sync is stale from now on, and the page
 * is no longer owed if it was asked.
 */
void nas_dedup_rp_sending(RAMBlock *block, ram_addr_t offset,
                          uint32_t epoch);
/*
 * The last SYNC answered and (@pending) how many pages asked again the
 * destination had not received when it answered.  @pending goes with the
 * returned SYNC when that is the last one sent (no other answer can come
 * after it).
 */
uint32_t nas_dedup_rp_acked(uint32_t *pending);
/* Wait up to @ms for an answer to a SYNC. */
void nas_dedup_rp_wait(int64_t ms);
typedef enum NasDedupWatch {
    NAS_DEDUP_WATCH_NONE,
    NAS_DEDUP_WATCH_SYNC,       /* SYNC seq must be answered by deadline */
    NAS_DEDUP_WATCH_SWITCHOVER, /* the guest is stopped until deadline */
} NasDedupWatch;
/* Arm (or, NONE, disarm) the watchdog: it fails the migration. */
void nas_dedup_rp_watch(NasDedupWatch kind, int64_t deadline_ms,
                        uint32_t seq);

/* nas-dedup-live.c: live SYNC before switchover, source */
void nas_dedup_live_setup(void);
/*
 * Arm the watchdog for the answer to SYNC @seq, sent with @backlog_pages
 * pages of references not confirmed yet, while the guest runs.
 */
void nas_dedup_live_watch(uint32_t seq, uint64_t backlog_pages);
/*
 * Pages sent as references since the last live SYNC the destination
 * answered.
 */
uint64_t nas_dedup_live_unconfirmed(void);
/* Send a live SYNC if nas_dedup_live_can_switchover() asked for one. */
void nas_dedup_live_flush(void);
/*
 * Migration thread, about to stop the guest with @pending_bytes left to
 * send: false while that and the blocks of the references the destination
 * has not resolved yet exceed @threshold_bytes (the downtime budget); a
 * live SYNC then lets the destination catch up while the guest runs.
 */
bool nas_dedup_live_can_switchover(uint64_t pending_bytes,
                                   uint64_t threshold_bytes);

/* nas-dedup-postcopy.c: dedup-nas with postcopy-ram */
/* Once, at start-up (migration_object_init()): the LISTEN check. */
void nas_dedup_postcopy_init(void);
/* Source, a migration starts (ram_save_setup()). */
void nas_dedup_postcopy_setup(void);
/*
 * Migration thread, postcopy asked for and otherwise ready to start:
 * false until every reference sent is resolved and the final SYNC went
 * out.  May fail the migration (the guest keeps running on the source).
 */
bool nas_dedup_postcopy_can_start(MigrationState *s);
/* End of a RAM iteration (ram_save_iterate()): send what the gate wants. */
void nas_dedup_postcopy_flush(void);
/*
 * Migration thread, about to complete with @pending_bytes left to send:
 * false while pages are left out for postcopy, or while the destination's
 * fill after LISTEN may still ask pages from us (then, with nothing to
 * send, waits a little for its messages).
 */
bool nas_dedup_postcopy_can_complete(MigrationState *s,
                                     uint64_t pending_bytes);
/* Migration thread: postcopy resumes after a recovery. */
void nas_dedup_postcopy_resumed(void);

/* nas-dedup-load.c: destination side, called from ram.c */
int nas_dedup_load_setup(Error **errp);
void nas_dedup_load_cleanup(void);
/* Load a record whose page header named @block/@offset. */
int nas_dedup_load_record(QEMUFile *f, RAMBlock *block, ram_addr_t offset,
                          Error **errp);
/*
 * Newer data for the page at @offset of @block has arrived (incoming
 * coroutine, main channel).
 */
void nas_dedup_load_page_arrived(RAMBlock *block, ram_addr_t offset);
/*
 * The incoming coroutine read a flag of the RAM section (end of section,
 * multifd flush): with multifd, the main channel may carry nothing else
 * for a while, and the source waits for our reports.
 */
void nas_dedup_load_poll(void);
/*
 * Newer data for the pages at @offsets[0..@n-1] of @block is about to be
 * written (any thread: multifd's receive threads).
 */
void nas_dedup_load_pages_arrived(RAMBlock *block, const ram_addr_t *offsets,
                                  uint32_t n);
/*
 * At the end of loading: false (and @errp set) if any page sent as a
 * reference was neither verified nor sent again.
 */
bool nas_dedup_load_check(Error **errp);
/*
 * The destination is about to listen for postcopy pages: false (and @errp
 * set) if any page sent as a reference is not resolved, or the final SYNC
 * has not come.  With the fill after LISTEN, a thread that faults on a
 * page still to fill waits up to @fault_read_ms for its read from the
 * storage (x-dedup-nas-fault-read-ms; 0: the source is asked at once).
 */
bool nas_dedup_load_postcopy_listen(uint32_t fault_read_ms, Error **errp);
/*
 * Postcopy with the fill after LISTEN (the lazy final SYNC), destination:
 * the source discards @len bytes at @start of RAMBlock @ramid before
 * LISTEN, and will send them (incoming coroutine); postcopy pauses
 * (listen thread); postcopy is over.
 */
void nas_dedup_load_postcopy_discard(const char *ramid, uint64_t start,
                                     uint64_t len);
/*
 * Thread @tid (0: unknown) faulted on @offset of @block (fault thread).
 * True if dedup-nas reads the page from the storage first: postcopy must
 * not ask the source for it now (dedup-nas does, if the read does not
 * place it in time).
 */
bool nas_dedup_load_postcopy_fault(RAMBlock *block, ram_addr_t offset,
                                   uint32_t tid);
/*
 * Postcopy's listen thread (either channel) is about to place the page at
 * @host of @block, which came from the source, in postcopy's fill (the
 * source sends pages the fill has not reached, see nas_dedup_save_meet()).
 * True if the fill placed it already or is placing it, with the same
 * bytes: it must not be placed again.  Otherwise a reference it still
 * had is void, and the fill leaves the page to the caller.
 */
bool nas_dedup_load_postcopy_placed(RAMBlock *block, void *host);
void nas_dedup_load_postcopy_pause(void);
void nas_dedup_load_postcopy_end(void);

#endif
