/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas: tracking of guest disk I/O (the storage side)
 *
 * Every completed read and write of a BlockBackend attached to a guest
 * device goes through the block layer's I/O observer; while
 * nas_dedup_tracking() (the capability, or x-dedup-nas-track: from the
 * VM's start by default), its data is hashed into the index chunk by
 * chunk.  Otherwise an existing index is still kept true: writes only
 * invalidate what they cover, so that turning it on again never refers to
 * stale content.
 *
 * Drives are numbered in the order they are first seen.  Their wire
 * identity is the attached device's qdev id (or its QOM path), which both
 * command lines share.
 *
 * A drive that is resized (by the guest's device or by block_resize
 * through another BlockBackend: the node tells every parent) keeps its
 * number and entries, but for those of blocks a shrink cut.  A drive that
 * loses its medium or is detached from its device (hot-unplug) is
 * *retired*: its number is never used again, so everything the index
 * knows of it is stale at once, in O(1), from the block layer's callback.
 * The source drops a retired drive's entries as it finds them (and CLOCK
 * evicts the rest); the next I/O of the BlockBackend gives it a new number
 * and learns its identity and size afresh.
 */
#include "qemu/osdep.h"
#include "qemu/rcu.h"
#include "system/block-backend.h"
#include "migration/nas-dedup.h"
#include "trace.h"

typedef struct NasDedupDrive {
    BlockBackend *blk;          /* NULL once retired */
    char *id;
    uint64_t size;
} NasDedupDrive;

static struct {
    QemuMutex lock;
    GHashTable *by_blk;         /* BlockBackend * -> live drive number + 1 */
    GArray *drives;             /* NasDedupDrive, by drive number */
    /* Retired drive numbers, read without the lock. */
    unsigned long retired[BITS_TO_LONGS(NAS_DEDUP_MAX_DRIVES + 1)];
} track;

bool nas_dedup_drive_live(uint16_t drive)
{
    return drive <= NAS_DEDUP_MAX_DRIVES &&
           !(qatomic_read(&track.retired[BIT_WORD(drive)]) & BIT_MASK(drive));
}

static int coroutine_fn nas_dedup_drive_of(BlockBackend *blk)
{
    NasDedupDrive d;
    int64_t len;
    gpointer n;

    WITH_QEMU_LOCK_GUARD(&track.lock) {
        n = g_hash_table_lookup(track.by_blk, blk);
        if (n) {
            return GPOINTER_TO_INT(n) - 1;
        }
        if (track.drives->len > NAS_DEDUP_MAX_DRIVES) {
            return -1;
        }
    }
    /* First I/O of this drive: learn its identity outside the lock. */
    d.blk = blk;
    d.id = blk_get_attached_dev_id(blk);
    len = blk_co_getlength(blk);
    d.size = len < 0 ? 0 : len;
    if (!d.id[0] || strlen(d.id) > NAS_DEDUP_ID_MAX) {
        g_free(d.id);
        return -1;
    }

    QEMU_LOCK_GUARD(&track.lock);
    n = g_hash_table_lookup(track.by_blk, blk);
    if (n) {                    /* raced with another request */
        g_free(d.id);
        return GPOINTER_TO_INT(n) - 1;
    }
    g_array_append_val(track.drives, d);
    g_hash_table_insert(track.by_blk, blk, GINT_TO_POINTER(track.drives->len));
    trace_nas_dedup_drive_new(track.drives->len - 1, d.id, d.size);
    return track.drives->len - 1;
}

bool nas_dedup_drive_info(uint16_t drive, char **id, uint64_t *size)
{
    QEMU_LOCK_GUARD(&track.lock);
    if (drive >= track.drives->len ||
        !g_array_index(track.drives, NasDedupDrive, drive).blk) {
        return false;
    }
    *id = g_strdup(g_array_index(track.drives, NasDedupDrive, drive).id);
    *size = g_array_index(track.drives, NasDedupDrive, drive).size;
    return true;
}

/* Forget @blk's drive number and everything indexed under it. */
static void retire(BlockBackend *blk, int why)
{
    gpointer n;
    int drive;

    QEMU_LOCK_GUARD(&track.lock);
    n = g_hash_table_lookup(track.by_blk, blk);
    if (!n) {
        return;                 /* never seen: nothing indexed */
    }
    drive = GPOINTER_TO_INT(n) - 1;
    g_hash_table_remove(track.by_blk, blk);
    g_array_index(track.drives, NasDedupDrive, drive).blk = NULL;
    g_clear_pointer(&g_array_index(track.drives, NasDedupDrive, drive).id,
                    g_free);
    qatomic_or(&track.retired[BIT_WORD(drive)], BIT_MASK(drive));
    trace_nas_dedup_drive_change(drive, why);
}

static void coroutine_fn nas_dedup_observe(BlockBackend *blk,
                                           BlkIOObserveKind kind,
                                           int64_t offset, int64_t bytes,
                                           QEMUIOVector *qiov,
                                           size_t qiov_offset)
{
    bool on = nas_dedup_tracking();
    NasDedupIndex *idx;
    int drive;

    if (!on && kind == BLK_IO_OBSERVE_READ) {
        return;
    }
    RCU_READ_LOCK_GUARD();
    idx = on ? nas_dedup_index_get() : nas_dedup_index_peek();
    if (!idx) {
        return;
    }
    drive = nas_dedup_drive_of(blk);
    if (drive < 0) {
        return;
    }
    if (kind == BLK_IO_OBSERVE_INVALIDATE_ALL) {
        /*
         * A failed zone append.  Not a retirement: the guest can do this
         * at will, and numbers are never reused.
         */
        nas_dedup_index_invalidate_drive(idx, drive);
        return;
    }
    if (!on || kind == BLK_IO_OBSERVE_INVALIDATE) {
        nas_dedup_index_invalidate(idx, drive, offset, bytes);
        return;
    }
    nas_dedup_index_note_io(idx, drive, offset, bytes, qiov->iov, qiov->niov,
                            qiov_offset, kind == BLK_IO_OBSERVE_WRITE);
}

/*
 * Resized to @len bytes (by the guest's device or block_resize; the
 * resizing request's coroutine, with the graph lock held): a shrink cuts
 * blocks, whose entries go; a grow cuts nothing, the content of every
 * offset stays.  Either way the size sent in later DRIVE records is the
 * new one.  (A DRIVE record already sent keeps the old size: references
 * past it are asked again.)
 */
static void resize(BlockBackend *blk, int64_t len)
{
    NasDedupIndex *idx;
    NasDedupDrive *d;
    uint64_t old;
    gpointer n;
    int drive;

    WITH_QEMU_LOCK_GUARD(&track.lock) {
        n = g_hash_table_lookup(track.by_blk, blk);
        if (!n) {
            return;             /* never seen: nothing indexed */
        }
        drive = GPOINTER_TO_INT(n) - 1;
        d = &g_array_index(track.drives, NasDedupDrive, drive);
        old = d->size;
        d->size = len;
    }
    trace_nas_dedup_drive_resize(drive, old, len);
    if ((uint64_t)len >= old) {
        return;
    }
    RCU_READ_LOCK_GUARD();
    idx = nas_dedup_index_peek();
    if (idx) {
        nas_dedup_index_invalidate(idx, drive, len, old - len);
    }
}

/*
 * The drive as a whole changed.  Resized: see resize().  Medium gone or
 * device detached (main loop): retire its number, in O(1).
 */
static void nas_dedup_observe_change(BlockBackend *blk, BlkChangeKind kind,
                                     int64_t size)
{
    if (kind == BLK_CHANGE_RESIZE) {
        resize(blk, size);
    } else {
        retire(blk, kind);
    }
}

static const BlkIOObserverOps nas_dedup_observer = {
    .io = nas_dedup_observe,
    .change = nas_dedup_observe_change,
};

void nas_dedup_track_init(void)
{
    qemu_mutex_init(&track.lock);
    track.by_blk = g_hash_table_new(NULL, NULL);
    track.drives = g_array_new(false, true, sizeof(NasDedupDrive));
    blk_set_io_observer(&nas_dedup_observer);
}
