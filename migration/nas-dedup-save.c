/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas: source side
 *
 * ram.c offers each page it would send in full; a page whose content the
 * index finds on a drive becomes part of a run of references (consecutive
 * pages of one RAMBlock backed by consecutive blocks of one drive) that is
 * written as one REFS record.  At switchover, SYNC records and the
 * destination's answers on the return path make sure that every reference
 * was verified, and that every page it could not verify was sent again.
 *
 * No fault of the destination may freeze the stopped guest or the source
 * QEMU: see "Bounds" in docs/devel/nas-dedup.rst, and the watchdog below.
 */
#include "qemu/osdep.h"
#include "qemu/bitmap.h"
#include "qemu/cutils.h"
#include "qemu/error-report.h"
#include "qemu/host-utils.h"
#include "qemu/rcu.h"
#include "qapi/error.h"
#include "io/channel.h"
#include "exec/target_page.h"
#include "migration.h"
#include "qemu-file.h"
#include "ram.h"
#include "nas-dedup-int.h"
#include "nas-dedup-wire.h"
#include "options.h"
#include "trace.h"

/* Rounds of "resend, sync again" before giving up. */
#define NAS_DEDUP_SYNC_ROUNDS 16
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

/* Pages the destination asked again, by RAMBlock. */
typedef struct SaveBlock {
    unsigned long *noref;       /* send in full, not as a reference */
    unsigned long *asked;       /* of those, not dirtied again yet */
    unsigned long *scratch;     /* for redirty_requested() */
    unsigned long npages;
} SaveBlock;

typedef enum WatchKind {
    WATCH_NONE,
    WATCH_LIVE,                 /* a live SYNC is unanswered */
    WATCH_SWITCHOVER,           /* the guest is stopped */
} WatchKind;

static struct {
    /*
     * The return-path thread and the migration thread share what @lock
     * protects.  The lock and @ack_sem live as long as QEMU
     * (nas_dedup_save_init()), so that a message arriving before setup,
     * after cleanup, or in a migration without dedup-nas finds them and
     * fails that migration, never QEMU.  The return-path thread must not
     * take ram.c's bitmap mutex: the migration thread holds it while it
     * blocks sending to a destination that may itself be blocked sending
     * on the return path.  So RESEND only marks pages in @blocks, and the
     * migration thread dirties them (redirty_requested()).  Lock order:
     * bitmap mutex, then @lock.
     */
    QemuMutex lock;
    QemuSemaphore ack_sem;      /* posted on SYNC_ACK */
    bool active;                /* set up, with a return path */
    bool final_sent;            /* no more failing on our account */
    GHashTable *blocks;         /* RAMBlock * -> SaveBlock */
    unsigned long noref_pages;  /* bits set in the noref bitmaps */
    unsigned long asked_pages;  /* bits set in the asked bitmaps */
    uint32_t sent_seq;          /* last SYNC sent */
    uint32_t acked_seq;         /* last SYNC answered */
    /*
     * Pages the destination asked again (RESEND) since its previous
     * SYNC_ACK, as its last SYNC_ACK says: sent in full before the next
     * SYNC.
     */
    uint32_t acked_resends;

    /*
     * The watchdog thread, one a migration with a return path.  Armed by
     * the migration thread (@wd_kind, @wd_deadline_ms, @wd_live_seq under
     * @wd_lock): when the deadline passes and, for a live SYNC, no answer
     * came, it fails the migration by shutting its channels down, as
     * migrate_cancel does, which also unblocks a migration thread stuck
     * writing to a destination that stopped reading.
     */
    QemuThread wd_thread;
    QemuMutex wd_lock;
    QemuCond wd_cond;
    bool wd_running;
    bool wd_quit;
    WatchKind wd_kind;
    int64_t wd_deadline_ms;
    uint32_t wd_live_seq;

    /* Migration thread only from here on. */
    /* The pending run of references. */
    NasDedupRecord run;
    RAMBlock *run_block;
    ram_addr_t run_offset;
    QEMUFile *f;
    NasDedupPutHeader put_header;
    void *opaque;

    unsigned long *drive_sent;      /* DRIVE records sent, by drive */
    bool setup_sent;
    bool any_refs;
    uint32_t seq;
    unsigned rounds;
    int64_t deadline_ms;            /* of the switchover */

    /*
     * Live SYNC: before switchover, while the guest still runs, let the
     * destination catch up with its reads, so that the stopped guest only
     * waits for the references of the last round.
     */
    uint64_t resolved_mark;         /* ref-pages when the acked SYNC went */
    uint32_t live_seq;              /* live SYNC in flight, or 0 */
    uint64_t live_mark;
    unsigned live_syncs;
    bool want_live_sync;
} save;

static GByteArray *nas_dedup_buf(void)
{
    static __thread GByteArray *buf;

    if (!buf) {
        buf = g_byte_array_sized_new(16 + 16 * NAS_DEDUP_REFS_MAX);
    }
    g_byte_array_set_size(buf, 0);
    return buf;
}

static size_t put_record(RAMBlock *block, ram_addr_t offset,
                         const NasDedupRecord *rec)
{
    GByteArray *buf = nas_dedup_buf();
    size_t len;

    len = save.put_header(save.opaque, save.f, block,
                          offset | RAM_SAVE_FLAG_DEDUP);
    nas_dedup_record_encode(buf, rec);
    qemu_put_buffer(save.f, buf->data, buf->len);
    len += buf->len;
    ram_transferred_add(len);
    return len;
}

void nas_dedup_save_init(void)
{
    qemu_mutex_init(&save.lock);
    qemu_sem_init(&save.ack_sem, 0);
    qemu_mutex_init(&save.wd_lock);
    qemu_cond_init(&save.wd_cond);
}

static void save_block_free(gpointer p)
{
    SaveBlock *sb = p;

    g_free(sb->noref);
    g_free(sb->asked);
    g_free(sb->scratch);
    g_free(sb);
}

/*
 * Fail the migration with @err (taken) from any thread, unless the final
 * SYNC went out: from then on the destination may complete and run the
 * guest, and a source that resumed too would run it twice.  Shutting the
 * channels down, as migrate_cancel does, also frees a migration thread
 * blocked writing to a destination that stopped reading.
 */
static void fail_migration(MigrationState *s, const Error *err)
{
    /* Atomic with "the final SYNC goes out" (nas_dedup_save_complete()). */
    QEMU_LOCK_GUARD(&save.lock);
    if (save.final_sent) {
        return;
    }
    migrate_set_error(s, err);
    WITH_QEMU_LOCK_GUARD(&s->qemu_file_lock) {
        if (s->rp_state.from_dst_file) {
            qemu_file_shutdown(s->rp_state.from_dst_file);
        }
        if (s->to_dst_file) {
            qemu_file_shutdown(s->to_dst_file);
        }
    }
}

static void *watchdog_thread(void *opaque)
{
    MigrationState *s = opaque;
    Error *err = NULL;

    qemu_mutex_lock(&save.wd_lock);
    while (!save.wd_quit) {
        int64_t left;

        if (save.wd_kind == WATCH_NONE) {
            qemu_cond_wait(&save.wd_cond, &save.wd_lock);
            continue;
        }
        if (save.wd_kind == WATCH_LIVE &&
            (int32_t)(qatomic_load_acquire(&save.acked_seq) -
                      save.wd_live_seq) >= 0) {
            save.wd_kind = WATCH_NONE;      /* answered */
            continue;
        }
        left = save.wd_deadline_ms - qemu_clock_get_ms(QEMU_CLOCK_REALTIME);
        if (left > 0) {
            qemu_cond_timedwait(&save.wd_cond, &save.wd_lock,
                                MIN(left, 1000));
            continue;
        }
        if (save.wd_kind == WATCH_LIVE) {
            error_setg(&err, "dedup-nas: the destination did not answer "
                       "SYNC %u in time (its reads of shared storage are "
                       "stalled?)", save.wd_live_seq);
        } else {
            error_setg(&err, "dedup-nas: switchover exceeded "
                       "downtime-limit + dedup-nas-switchover-slack (%"
                       PRIu64 " ms); the source resumes",
                       migrate_downtime_limit() +
                       migrate_dedup_nas_switchover_slack());
        }
        trace_nas_dedup_save_watchdog(save.wd_kind);
        save.wd_kind = WATCH_NONE;
        qemu_mutex_unlock(&save.wd_lock);
        fail_migration(s, err);
        error_free(err);
        err = NULL;
        qemu_mutex_lock(&save.wd_lock);
    }
    qemu_mutex_unlock(&save.wd_lock);
    return NULL;
}

static void watch(WatchKind kind, int64_t deadline_ms, uint32_t live_seq)
{
    QEMU_LOCK_GUARD(&save.wd_lock);
    save.wd_kind = kind;
    save.wd_deadline_ms = deadline_ms;
    save.wd_live_seq = live_seq;
    qemu_cond_signal(&save.wd_cond);
}

static void watchdog_stop(void)
{
    if (!save.wd_running) {
        return;
    }
    WITH_QEMU_LOCK_GUARD(&save.wd_lock) {
        save.wd_quit = true;
        qemu_cond_signal(&save.wd_cond);
    }
    qemu_thread_join(&save.wd_thread);
    save.wd_running = false;
    object_unref(OBJECT(migrate_get_current()));
}

int nas_dedup_save_setup(Error **errp)
{
    MigrationState *s = migrate_get_current();

    if (migrate_rdma()) {
        error_setg(errp, "Capability 'dedup-nas' is not compatible with "
                   "RDMA migration");
        return -1;
    }
    nas_dedup_save_cleanup();
    memset(&save.run, 0, sizeof(save.run));
    save.run_block = NULL;
    save.f = NULL;
    save.setup_sent = false;
    save.any_refs = false;
    save.seq = 0;
    save.rounds = 0;
    save.deadline_ms = 0;
    save.resolved_mark = 0;
    save.live_seq = 0;
    save.live_mark = 0;
    save.live_syncs = 0;
    save.want_live_sync = false;
    nas_dedup_stats_reset(false);
    if (!s->rp_state.rp_thread_created) {
        /*
         * No destination to read the disks and answer (savevm, a snapshot
         * to a file): send every page in full.
         */
        return 0;
    }
    /*
     * SYNC is a small record that the guest, stopped, waits on: do not let
     * Nagle hold it back behind unacknowledged stream data.
     */
    if (s->to_dst_file) {
        qio_channel_set_delay(qemu_file_get_ioc(s->to_dst_file), false);
    }
    save.drive_sent = bitmap_new(NAS_DEDUP_MAX_DRIVES + 1);
    /* An answer to an earlier migration's SYNC must not count. */
    while (qemu_sem_timedwait(&save.ack_sem, 0) == 0) {
        /* drain */
    }
    WITH_QEMU_LOCK_GUARD(&save.lock) {
        save.blocks = g_hash_table_new_full(NULL, NULL, NULL, save_block_free);
        qatomic_set(&save.noref_pages, 0);
        qatomic_set(&save.asked_pages, 0);
        save.sent_seq = 0;
        save.acked_seq = 0;
        save.acked_resends = 0;
        save.final_sent = false;
        save.active = true;
    }
    save.wd_quit = false;
    save.wd_kind = WATCH_NONE;
    save.wd_running = true;
    object_ref(OBJECT(s));      /* until the thread is joined */
    qemu_thread_create(&save.wd_thread, "mig/dedup-wd", watchdog_thread, s,
                       QEMU_THREAD_JOINABLE);
    return 0;
}

void nas_dedup_save_cleanup(void)
{
    watchdog_stop();
    WITH_QEMU_LOCK_GUARD(&save.lock) {
        save.active = false;
        if (save.blocks) {
            g_hash_table_destroy(save.blocks);
            save.blocks = NULL;
        }
    }
    g_free(save.drive_sent);
    save.drive_sent = NULL;
}

/* Send the pending run; the bitmap mutex may be held. */
static int flush_run(void)
{
    size_t len;

    if (!save.run.npages) {
        return 0;
    }
    trace_nas_dedup_save_refs(save.run_block->idstr, save.run_offset,
                              save.run.drive, save.run.disk_offset,
                              save.run.npages);
    len = put_record(save.run_block, save.run_offset, &save.run);
    stat64_add(&nas_dedup_counters.ref_pages, save.run.npages);
    stat64_add(&nas_dedup_counters.ref_bytes, len);
    save.run.npages = 0;
    return qemu_file_get_error(save.f);
}

/*
 * Dirty again the pages the destination asked for since the last call
 * (@all: every page asked and not sent in full yet), unless they were sent
 * in full meanwhile.  Returns how many pages it dirtied.  Migration
 * thread, without the bitmap mutex (which is taken before save.lock): a
 * block's pages are moved to its scratch bitmap under save.lock, then
 * dirtied under the bitmap mutex.  No memory is allocated on the way,
 * however many requests came.
 */
static int64_t redirty_requested(bool all, Error **errp)
{
    g_autofree gpointer *keys = NULL;
    guint nkeys = 0, k;
    int64_t pages = 0;

    if (!all && !qatomic_read(&save.asked_pages)) {
        return 0;
    }
    RCU_READ_LOCK_GUARD();      /* the RAMBlocks we hold keys of */
    WITH_QEMU_LOCK_GUARD(&save.lock) {
        if (!save.active) {
            return 0;
        }
        /* The table may grow while we drop the lock: keep its keys. */
        keys = g_hash_table_get_keys_as_array(save.blocks, &nkeys);
    }
    for (k = 0; k < nkeys; k++) {
        SaveBlock *sb;
        unsigned long i;
        bool any = false;
        int64_t ret;

        WITH_QEMU_LOCK_GUARD(&save.lock) {
            sb = save.active ? g_hash_table_lookup(save.blocks, keys[k])
                             : NULL;
            if (!sb) {
                break;
            }
            for (i = 0; i < BITS_TO_LONGS(sb->npages); i++) {
                /* Only those still to be sent in full. */
                sb->scratch[i] = (all ? ~0UL : sb->asked[i]) & sb->noref[i];
                any |= sb->scratch[i] != 0;
                qatomic_set(&save.asked_pages,
                            save.asked_pages - ctpopl(sb->asked[i]));
                sb->asked[i] = 0;
            }
        }
        if (!sb) {
            break;
        }
        if (!any) {
            continue;               /* all sent in full meanwhile */
        }
        /*
         * The bitmap mutex comes before save.lock; the scratch bitmap is
         * the migration thread's own.
         */
        ret = ram_dedup_redirty(keys[k], sb->scratch, sb->npages, errp);
        if (ret < 0) {
            return ret;
        }
        pages += ret;
    }
    return pages;
}

static void put_sync(QEMUFile *f, NasDedupPutHeader put_header, void *opaque,
                     bool final)
{
    NasDedupRecord *rec = g_new0(NasDedupRecord, 1);

    save.f = f;
    save.put_header = put_header;
    save.opaque = opaque;
    rec->type = NAS_DEDUP_REC_SYNC;
    rec->seq = ++save.seq;
    rec->final = final;
    WITH_QEMU_LOCK_GUARD(&save.lock) {
        save.sent_seq = rec->seq;
    }
    trace_nas_dedup_save_sync(rec->seq, final);
    /* Any RAMBlock will do: the record is about all of them. */
    put_record(save.run_block, 0, rec);
    g_free(rec);
}

int nas_dedup_save_flush(Error **errp)
{
    int ret = flush_run();

    if (ret < 0) {
        error_setg_errno(errp, -ret, "dedup-nas: failed to send references");
        return ret;
    }
    if (save.want_live_sync && !save.live_seq && save.f) {
        uint64_t backlog;

        put_sync(save.f, save.put_header, save.opaque, false);
        save.live_seq = save.seq;
        save.live_mark = stat64_get(&nas_dedup_counters.ref_pages);
        save.live_syncs++;
        save.want_live_sync = false;
        /* The answer must come in time, even if we block writing. */
        backlog = (save.live_mark - save.resolved_mark) * NAS_DEDUP_CHUNK;
        watch(WATCH_LIVE, qemu_clock_get_ms(QEMU_CLOCK_REALTIME) +
              NAS_DEDUP_LIVE_TIMEOUT_MS +
              backlog * 1000 / NAS_DEDUP_MIN_FETCH_RATE, save.live_seq);
    }
    if (redirty_requested(false, errp) < 0) {
        return -EINVAL;
    }
    return 0;
}

/* True if the destination asked for this page: send it in full once. */
static bool take_noref(RAMBlock *block, ram_addr_t offset)
{
    SaveBlock *sb;

    if (!qatomic_read(&save.noref_pages)) {
        return false;
    }
    QEMU_LOCK_GUARD(&save.lock);
    sb = save.blocks ? g_hash_table_lookup(save.blocks, block) : NULL;
    if (sb && (offset >> TARGET_PAGE_BITS) < sb->npages &&
        test_and_clear_bit(offset >> TARGET_PAGE_BITS, sb->noref)) {
        qatomic_set(&save.noref_pages, save.noref_pages - 1);
        return true;
    }
    return false;
}

/* The SETUP record: protocol version, return-path numbering, hash key. */
static void send_setup(RAMBlock *block, ram_addr_t offset,
                       const NasDedupKey *key)
{
    g_autofree NasDedupRecord *rec = g_new0(NasDedupRecord, 1);

    rec->type = NAS_DEDUP_REC_SETUP;
    rec->version = NAS_DEDUP_WIRE_VERSION;
    migrate_rp_dedup_msgs(&rec->resend_msg, &rec->sync_ack_msg);
    rec->key = *key;
    put_record(block, offset, rec);
    save.setup_sent = true;
}

static int define_drive(RAMBlock *block, ram_addr_t offset, uint16_t drive)
{
    g_autofree NasDedupRecord *rec = g_new0(NasDedupRecord, 1);
    g_autofree char *id = NULL;

    if (test_bit(drive, save.drive_sent)) {
        return 0;
    }
    if (!nas_dedup_drive_info(drive, &id, &rec->disk_size)) {
        return -1;
    }
    rec->type = NAS_DEDUP_REC_DRIVE;
    rec->drive = drive;
    pstrcpy(rec->id, sizeof(rec->id), id);
    put_record(block, offset, rec);
    set_bit(drive, save.drive_sent);
    return 0;
}

int nas_dedup_save_page(QEMUFile *f, NasDedupPutHeader put_header,
                        void *opaque, RAMBlock *block, ram_addr_t offset)
{
    NasDedupRecord *run = &save.run;
    const NasDedupKey *key;
    NasDedupIndex *idx;
    NasDedupHash hash;
    NasDedupLoc loc;

    if (!save.drive_sent || take_noref(block, offset)) {
        return 0;
    }
    RCU_READ_LOCK_GUARD();
    idx = nas_dedup_index_peek();
    if (!idx) {
        return 0;
    }
    /* The index's half first; the other one only for a hit. */
    key = nas_dedup_index_key(idx);
    hash.hi = nas_dedup_hash64(key, 0, block->host + offset);
    if (!nas_dedup_index_lookup(idx, hash.hi, &loc)) {
        return 0;
    }
    hash.lo = nas_dedup_hash64(key, 1, block->host + offset);
    if (!nas_dedup_drive_live(loc.drive)) {
        /* Resized, ejected or unplugged since: forget that entry. */
        nas_dedup_index_invalidate(idx, loc.drive, loc.offset,
                                   NAS_DEDUP_CHUNK);
        return 0;
    }

    if (run->npages &&
        (save.run_block != block || save.f != f ||
         run->npages == NAS_DEDUP_REFS_MAX || run->drive != loc.drive ||
         offset != save.run_offset + run->npages * NAS_DEDUP_CHUNK ||
         loc.offset != run->disk_offset + run->npages * NAS_DEDUP_CHUNK)) {
        int ret = flush_run();
        if (ret < 0) {
            return ret;
        }
    }
    save.f = f;
    save.put_header = put_header;
    save.opaque = opaque;
    if (!run->npages) {
        if (!save.setup_sent) {
            send_setup(block, offset, nas_dedup_index_key(idx));
        }
        if (define_drive(block, offset, loc.drive) < 0) {
            return 0;
        }
        run->type = NAS_DEDUP_REC_REFS;
        run->drive = loc.drive;
        run->disk_offset = loc.offset;
        save.run_block = block;
        save.run_offset = offset;
        save.any_refs = true;
    }
    run->hash[run->npages++] = hash;
    return 1;
}

uint64_t nas_dedup_save_bytes_saved(void)
{
    return nas_dedup_saved(stat64_get(&nas_dedup_counters.ref_pages),
                           stat64_get(&nas_dedup_counters.ref_bytes));
}

bool nas_dedup_save_can_switchover(uint64_t pending_bytes,
                                   uint64_t threshold_bytes)
{
    uint64_t backlog;
    uint32_t acked;

    if (!migrate_dedup_nas() || !save.drive_sent || !save.any_refs) {
        return true;
    }
    acked = qatomic_load_acquire(&save.acked_seq);
    if (save.live_seq && (int32_t)(acked - save.live_seq) >= 0) {
        save.resolved_mark = save.live_mark;
        save.live_seq = 0;
        watch(WATCH_NONE, 0, 0);
    }
    backlog = (stat64_get(&nas_dedup_counters.ref_pages) + save.run.npages -
               save.resolved_mark) * NAS_DEDUP_CHUNK;
    /*
     * The stopped guest waits for the pages still to send and for the
     * blocks still to read: together they must fit the downtime budget.
     */
    if (pending_bytes + backlog <= threshold_bytes ||
        save.live_syncs >= NAS_DEDUP_LIVE_SYNCS) {
        trace_nas_dedup_save_switchover(backlog, save.live_syncs);
        return true;
    }
    if (save.live_seq) {
        /*
         * Answer pending: wait a little rather than spin on bitmap syncs.
         * The watchdog fails the migration if it does not come in time.
         */
        qemu_sem_timedwait(&save.ack_sem, NAS_DEDUP_LIVE_WAIT_MS);
    } else {
        save.want_live_sync = true;     /* sent by nas_dedup_save_flush() */
    }
    return false;
}

void nas_dedup_save_switchover(void)
{
    MigrationState *s = migrate_get_current();

    if (!save.drive_sent) {
        return;
    }
    /*
     * Even without a reference yet (the final pass may make the first):
     * the guest stopped at downtime_start: from then on, what dedup-nas
     * makes it wait for (the pages and references still to send to a
     * destination that may have stopped reading, the handshake) must be
     * over by downtime_start + downtime-limit + switchover slack.
     */
    save.deadline_ms = MAX(s->downtime_start,
                           qemu_clock_get_ms(QEMU_CLOCK_REALTIME) - 1) +
                       migrate_downtime_limit() +
                       migrate_dedup_nas_switchover_slack();
    watch(WATCH_SWITCHOVER, save.deadline_ms, 0);
}

/*
 * From now on the destination may complete (it has, or will get, all it
 * needs from us): nothing of ours may fail the migration any more, or the
 * guest could run on both sides.  Unless it failed already.
 */
static int stand_down(MigrationState *s, Error **errp)
{
    watch(WATCH_NONE, 0, 0);
    QEMU_LOCK_GUARD(&save.lock);
    if (migrate_has_error(s)) {
        error_setg(errp, "dedup-nas: migration failed during switchover");
        return -EIO;
    }
    save.final_sent = true;
    return 0;
}

int nas_dedup_save_complete(QEMUFile *f, NasDedupPutHeader put_header,
                            void *opaque, Error **errp)
{
    MigrationState *s = migrate_get_current();
    int64_t ret;

    ret = flush_run();
    if (ret < 0) {
        error_setg_errno(errp, -ret, "dedup-nas: failed to send references");
        return ret;
    }
    /* Send the pages asked for so far before asking for the rest. */
    ret = redirty_requested(false, errp);
    if (ret) {
        return ret < 0 ? ret : 1;
    }
    if (!save.drive_sent) {
        return 0;               /* no return path: never a reference */
    }
    if (!save.any_refs) {
        /* Nothing to resolve: the destination may complete from now on. */
        return stand_down(s, errp);
    }
    if (++save.rounds > NAS_DEDUP_SYNC_ROUNDS) {
        error_setg(errp, "dedup-nas: destination still asks for pages after "
                   "%d rounds", NAS_DEDUP_SYNC_ROUNDS);
        return -EIO;
    }

    put_sync(f, put_header, opaque, false);
    ret = qemu_fflush(f);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "dedup-nas: failed to send SYNC");
        return ret;
    }
    while (qatomic_load_acquire(&save.acked_seq) != save.seq) {
        if (migrate_has_error(s) || qemu_file_get_error(f) ||
            !s->rp_state.rp_thread_created) {
            error_setg(errp, "dedup-nas: return path failed while waiting "
                       "for the destination to resolve references");
            return -EIO;
        }
        if (qemu_clock_get_ms(QEMU_CLOCK_REALTIME) >= save.deadline_ms) {
            error_setg(errp, "dedup-nas: the destination did not resolve its "
                       "references within downtime-limit + "
                       "dedup-nas-switchover-slack (%" PRIu64 " ms); the "
                       "source resumes", migrate_downtime_limit() +
                       migrate_dedup_nas_switchover_slack());
            return -ETIMEDOUT;
        }
        qemu_sem_timedwait(&save.ack_sem,
                           MIN(100, MAX(1, save.deadline_ms -
                               qemu_clock_get_ms(QEMU_CLOCK_REALTIME))));
    }
    if (qatomic_read(&save.acked_resends)) {
        /*
         * RESEND came before the ACK: dirty those pages again.  If none
         * is dirty any more (a free page hint cleared its bit since), send
         * every page asked and not sent in full yet.
         */
        ret = redirty_requested(false, errp);
        if (!ret) {
            ret = redirty_requested(true, errp);
        }
        if (!ret) {
            error_setg(errp, "dedup-nas: the destination asked again for %u "
                       "pages that were never sent as references",
                       save.acked_resends);
            return -EIO;
        }
        return ret < 0 ? ret : 1;
    }
    /*
     * Past the final SYNC, the destination may complete and start the
     * guest: failing the migration (and resuming the source) from then on
     * would run the guest twice.  So the watchdog stands down before it
     * is sent, and nothing of ours fails the migration after it
     * (fail_migration()).  Before it, the destination cannot complete
     * (nas_dedup_load_check()), so failing was safe.
     */
    ret = stand_down(s, errp);
    if (ret < 0) {
        return ret;
    }
    put_sync(f, put_header, opaque, true);
    ret = qemu_fflush(f);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "dedup-nas: failed to send the final "
                         "SYNC");
        return ret;
    }
    return 0;
}

/*
 * Under save.lock, for a return-path message @what that decoded (@err
 * NULL) or not: 1 to handle it, 0 to ignore it (after the final SYNC,
 * too late to matter and not to fail), or -EINVAL with @errp set to fail
 * the migration.
 */
static int rp_accept(const char *what, const Error *err, Error **errp)
{
    if (save.final_sent) {
        return 0;
    }
    if (err) {
        error_setg(errp, "dedup-nas: %s", error_get_pretty(err));
        return -EINVAL;
    }
    if (!save.active) {
        error_setg(errp, "dedup-nas: unexpected %s message: dedup-nas is "
                   "not active in this migration", what);
        return -EINVAL;
    }
    return 1;
}

int nas_dedup_rp_resend(MigrationState *s, const uint8_t *buf, size_t len,
                        Error **errp)
{
    NasDedupResend r;
    g_autoptr(Error) err = NULL;
    RAMBlock *block;
    SaveBlock *sb;
    unsigned long first, n;
    uint32_t i;
    int ret;

    if (nas_dedup_resend_decode(buf, len, &r, &err)) {
        trace_nas_dedup_rp_resend(r.id, r.offset, r.npages);
    }
    RCU_READ_LOCK_GUARD();
    QEMU_LOCK_GUARD(&save.lock);
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
    /* Bounded: three bits a page of guest RAM, however many requests. */
    sb = g_hash_table_lookup(save.blocks, block);
    if (!sb) {
        sb = g_new0(SaveBlock, 1);
        sb->npages = block->max_length >> TARGET_PAGE_BITS;
        sb->noref = bitmap_new(sb->npages);
        sb->asked = bitmap_new(sb->npages);
        sb->scratch = bitmap_new(sb->npages);
        g_hash_table_insert(save.blocks, block, sb);
    }
    first = r.offset >> TARGET_PAGE_BITS;
    if (first + r.npages > sb->npages) {
        error_setg(errp, "dedup-nas: resend request for %s 0x%" PRIx64
                   " x%u is outside the RAMBlock as migration started", r.id,
                   r.offset, r.npages);
        return -EINVAL;
    }
    for (i = 0, n = 0; i < r.npages; i++) {
        if (!test_and_set_bit(first + i, sb->noref)) {
            n++;
        }
        if (!test_and_set_bit(first + i, sb->asked)) {
            qatomic_set(&save.asked_pages, save.asked_pages + 1);
        }
    }
    qatomic_set(&save.noref_pages, save.noref_pages + n);
    /* Every page asked, as the destination's resend-requests counts. */
    stat64_add(&nas_dedup_counters.resent_pages, r.npages);
    return 0;
}

int nas_dedup_rp_sync_ack(MigrationState *s, const uint8_t *buf, size_t len,
                          Error **errp)
{
    g_autoptr(Error) err = NULL;
    uint32_t seq, resends;
    int ret;

    if (nas_dedup_sync_ack_decode(buf, len, &seq, &resends, &err)) {
        trace_nas_dedup_rp_sync_ack(seq, resends);
    }
    WITH_QEMU_LOCK_GUARD(&save.lock) {
        ret = rp_accept("DEDUP_SYNC_ACK", err, errp);
        if (ret <= 0) {
            return ret;
        }
        if (!seq || (int32_t)(seq - save.sent_seq) > 0 ||
            (int32_t)(seq - save.acked_seq) <= 0) {
            error_setg(errp, "dedup-nas: DEDUP_SYNC_ACK for SYNC %u, but the "
                       "last SYNC sent is %u and the last answered %u", seq,
                       save.sent_seq, save.acked_seq);
            return -EINVAL;
        }
        qatomic_set(&save.acked_resends, resends);
        qatomic_store_release(&save.acked_seq, seq);
    }
    qemu_sem_post(&save.ack_sem);
    /* A watchdog waiting for this answer stands down. */
    WITH_QEMU_LOCK_GUARD(&save.wd_lock) {
        qemu_cond_signal(&save.wd_cond);
    }
    return 0;
}

void nas_dedup_rp_error(MigrationState *s, const Error *err)
{
    /*
     * The return-path thread stops reading: the destination's next
     * message would block it, and it would stop reading our stream.  Fail
     * now rather than stall.
     */
    fail_migration(s, err);
}
