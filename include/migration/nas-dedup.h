/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas: the interface between its two halves, and to the rest of QEMU
 *
 * The stream side (migration/nas-dedup*.c: the index, the wire records,
 * sending and loading) and the storage side (hw/nas-dedup/: the observer
 * of guest device I/O on the source and the fetch engine of the
 * destination, which talk to drives, not to the stream) meet here.
 * See docs/devel/nas-dedup.rst.
 */
#ifndef INCLUDE_MIGRATION_NAS_DEDUP_H
#define INCLUDE_MIGRATION_NAS_DEDUP_H

#include "migration/nas-dedup-hash.h"
#include "migration/nas-dedup-index.h"

/* Stream side (migration/nas-dedup.c), for the storage side. */

/* True while the dedup-nas capability is on: index what the guest moves. */
bool nas_dedup_tracking(void);
/* The index, created on first use; call within an RCU read section. */
NasDedupIndex *nas_dedup_index_get(void);
/* The index if it exists, without creating it; same rules. */
NasDedupIndex *nas_dedup_index_peek(void);

/* Storage side (hw/nas-dedup/track.c), for the stream side. */

/* Once, at start-up (migration_object_init()). */
void nas_dedup_track_init(void);
/*
 * The identity (attached device's id or QOM path) and size of tracked drive
 * number @drive, as the index knows it.  False if there is no such drive.
 */
bool nas_dedup_drive_info(uint16_t drive, char **id, uint64_t *size);
/*
 * False once drive number @drive lost its medium or was detached: its index
 * entries are stale.  Lock-free.
 */
bool nas_dedup_drive_live(uint16_t drive);

/* Storage side (hw/nas-dedup/fetch.c), for the destination's loader. */

typedef struct NasDedupFetcher NasDedupFetcher;
/*
 * A read asked with nas_dedup_fetcher_read() is over: @buf holds its data
 * if @ret >= 0 (valid until the callback returns).  Otherwise @buf is
 * NULL and @ret is -ENOENT if the drive or the range is not this VM's to
 * read (no such drive, past the end of it), -ECANCELED if the fetcher was
 * freed meanwhile (free @opaque, touch nothing else), another negative
 * errno if the read failed.  Runs in a worker thread of the main loop's
 * thread pool, several at once, concurrently with the main loop; only
 * with -ECANCELED may it run in the main loop instead.  A result handed
 * to a worker before nas_dedup_fetcher_free() may arrive after it: the
 * callback checks that what @opaque belongs to is still alive.
 */
typedef void NasDedupFetchDone(void *opaque, uint8_t *buf, int ret);
/*
 * Asked just before a queued read starts (main loop): whether its data is
 * still wanted.  If not, the read is skipped and its NasDedupFetchDone
 * gets -EALREADY.
 */
typedef bool NasDedupFetchWanted(void *opaque);
/* Connections to one drive's NFS export, at most (see fetch.c). */
#define NAS_DEDUP_FETCH_CONNECTIONS_MAX 16
/*
 * A fetcher for one incoming migration; reads are at most @max_len, through
 * up to @connections connections to each drive on an NFS export.
 */
NasDedupFetcher *nas_dedup_fetcher_new(size_t max_len, unsigned connections);
/*
 * Drive number @drive of the source is the guest drive whose attached
 * device has id (or QOM path) @id, and @size bytes long on the source.
 * A drive this VM does not have is only warned about: its reads fail
 * with -ENOENT.  Fails if @drive was defined before.
 */
int coroutine_fn nas_dedup_fetcher_define(NasDedupFetcher *f, uint16_t drive,
                                          const char *id, uint64_t size,
                                          Error **errp);
bool nas_dedup_fetcher_has_drive(NasDedupFetcher *f, uint16_t drive);
/* Connections to storage the reads take turns among, over all drives. */
unsigned nas_dedup_fetcher_connections(NasDedupFetcher *f);
/*
 * Read @len bytes at @offset of defined drive @drive, then call @done;
 * if @wanted is not NULL, only if it still says so when the read starts.
 * Waits (yields) while too many reads are queued.  Incoming coroutine.
 */
void coroutine_fn nas_dedup_fetcher_read(NasDedupFetcher *f, uint16_t drive,
                                         uint64_t offset, size_t len,
                                         NasDedupFetchWanted *wanted,
                                         NasDedupFetchDone *done,
                                         void *opaque);
/*
 * The same, for one read that something waits for (a postcopy fault): it
 * starts at once, ahead of the reads queued, whatever is in flight.  Main
 * loop thread, outside coroutines too.
 */
void nas_dedup_fetcher_read_urgent(NasDedupFetcher *f, uint16_t drive,
                                   uint64_t offset, size_t len,
                                   NasDedupFetchDone *done, void *opaque);
/* Wait until every read asked so far is over. */
void coroutine_fn nas_dedup_fetcher_drain(NasDedupFetcher *f);
/*
 * Hold the results: from now on, a read that is over keeps its result
 * (and its buffer) until nas_dedup_fetcher_release(), reads go on.
 * Returns once no callback runs any more.  Incoming coroutine.  For
 * postcopy, whose destination must not write guest RAM from when it
 * registers it with userfaultfd until the loader places pages with
 * UFFDIO_COPY instead.
 */
void coroutine_fn nas_dedup_fetcher_hold(NasDedupFetcher *f);
/* Hand the held results over to the callbacks; main loop thread. */
void nas_dedup_fetcher_release(NasDedupFetcher *f);
/* Reads asked and not over yet. */
unsigned nas_dedup_fetcher_inflight(NasDedupFetcher *f);
/*
 * No more reads: let go of the drives (later reads fail with -ENOENT).
 * None may be in flight: drain first.
 */
void nas_dedup_fetcher_close(NasDedupFetcher *f);
/*
 * Free @f (NULL: nothing).  Reads still queued or in flight are cancelled
 * (their callbacks run with -ECANCELED); the last read in flight frees it.
 */
void nas_dedup_fetcher_free(NasDedupFetcher *f);

#endif
