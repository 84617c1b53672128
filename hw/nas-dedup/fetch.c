/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas: the destination's fetch engine (the storage side)
 *
 * The loader (migration/nas-dedup-load.c) names drives by the number and
 * identity the source gave them, and asks for ranges of them; the engine
 * reads them from this VM's own drives (the same shared images) and hands
 * each result back.  It knows nothing of the stream, of guest RAM or of
 * hashes.
 *
 * Reads go to the drive's node through a BlockBackend of our own (a
 * *view*): not throttled by the guest's iotune limits, and keeping the
 * node alive if the device is unplugged while the migration comes in.
 * When the drive's image is on an NFS export through QEMU's libnfs driver,
 * one connection to the server would carry every read: like the kernel's
 * nconnect, the view then also opens the same image read-only again, a
 * node graph of its own with a connection of its own, up to
 * @dedup-nas-fetch-connections in all, and the reads take turns among
 * them.  What the extra connections read may be stale by as much as
 * the guest's own node may be (the source is still writing): the loader
 * checks every block's hash either way.
 * Up to NAS_DEDUP_FETCH_INFLIGHT reads run at once, each in a coroutine of
 * its own with a buffer it keeps for the next read; more requests wait in
 * a queue, and the submitter (the incoming coroutine) waits when the queue
 * is full.  An urgent read (a page a thread faulted on, in postcopy)
 * starts at once, in a coroutine of its own, whatever is in flight; below
 * us it may still wait behind those (a throttle group, the connection).
 * The reads run in the main loop; what the loader does with a result
 * (hash checks, copies into guest RAM, which fault it in) runs in a
 * worker of the main loop's thread pool while the read's coroutine
 * waits, so that the main loop goes on with the stream and the other
 * reads meanwhile.
 */
#include "qemu/osdep.h"
#include "qemu/coroutine.h"
#include "qemu/error-report.h"
#include "qemu/main-loop.h"
#include "qemu/memalign.h"
#include "block/thread-pool.h"
#include "qapi/error.h"
#include "qobject/qdict.h"
#include "block/qdict.h"
#include "block/block_int.h"
#include "system/block-backend.h"
#include "migration/nas-dedup.h"
#include "trace.h"

/*
 * Reads in flight.  A read is up to 1 MiB; more than a few in flight only
 * made them slower here (loopback nfs-ganesha on 2 cores: 4 and 8 best,
 * 32 a third slower, 64 slower still).
 */
#define NAS_DEDUP_FETCH_INFLIGHT 8
/*
 * Requests waiting for a free read slot.  While the queue has room the
 * incoming stream goes on at link speed; when it is full (~4 GiB of
 * blocks queued, ~20 MiB of records), the stream waits.
 */
#define NAS_DEDUP_FETCH_QUEUE_MAX 4096

/* A read-only view of one of this VM's guest drives. */
typedef struct FetchView {
    char *id;                   /* the guest device's id or QOM path */
    /* [0] on the guest's node; the others on nodes of their own */
    BlockBackend *blk[NAS_DEDUP_FETCH_CONNECTIONS_MAX];
    unsigned nblk;
    uint64_t size;
} FetchView;

/* A drive number of the source. */
typedef struct FetchDrive {
    FetchView *view;            /* NULL: this VM has no such drive */
    unsigned next;              /* the connection for the next read */
    uint64_t size;              /* the smaller of what both sides know */
} FetchDrive;

typedef struct FetchReq {
    NasDedupFetcher *fetcher;
    FetchDrive *drive;
    uint64_t offset;
    size_t len;
    NasDedupFetchWanted *wanted;
    NasDedupFetchDone *done;
    void *opaque;
} FetchReq;

/*
 * Freed by nas_dedup_fetcher_free(), or, if reads are still in flight
 * then, by the last of them.
 */
struct NasDedupFetcher {
    bool dead;
    size_t max_len;
    unsigned connections;       /* per drive on an NFS export, at most */
    GHashTable *drives;         /* drive number -> FetchDrive */
    GPtrArray *views;           /* FetchView, made at the first drive */
    unsigned inflight;          /* fetch coroutines */
    GQueue queue;               /* FetchReq, waiting for a coroutine */
    CoQueue waitq;              /* room in the queue, or no read in flight */
    /*
     * Held (nas_dedup_fetcher_hold()): results wait in their coroutine
     * instead of going to a worker, until released.
     */
    bool held;
    CoQueue heldq;
    unsigned in_worker;         /* results being handled by a worker */
    CoQueue workq;              /* in_worker dropped to 0 */
    GPtrArray *bufs;            /* free read buffers of max_len bytes */
};

NasDedupFetcher *nas_dedup_fetcher_new(size_t max_len, unsigned connections)
{
    NasDedupFetcher *f = g_new0(NasDedupFetcher, 1);

    assert(connections >= 1 &&
           connections <= NAS_DEDUP_FETCH_CONNECTIONS_MAX);
    f->max_len = max_len;
    f->connections = connections;
    f->drives = g_hash_table_new_full(NULL, NULL, NULL, g_free);
    g_queue_init(&f->queue);
    qemu_co_queue_init(&f->waitq);
    qemu_co_queue_init(&f->heldq);
    qemu_co_queue_init(&f->workq);
    f->bufs = g_ptr_array_new_with_free_func(qemu_vfree);
    return f;
}

static void views_free_bh(void *opaque)
{
    GPtrArray *views = opaque;
    guint i;

    for (i = 0; i < views->len; i++) {
        FetchView *v = g_ptr_array_index(views, i);
        unsigned j;

        for (j = 0; j < v->nblk; j++) {
            blk_unref(v->blk[j]);
        }
        g_free(v->id);
        g_free(v);
    }
    g_ptr_array_free(views, true);
}

/*
 * Let go of the views; no read may be in flight (a view's unref would
 * wait for it, in the main loop).  From a bottom half, as
 * unref may need to change the block graph, which a coroutine (the
 * incoming one, or the last read) must not do while it is in the middle
 * of tearing the load down.  Until then, a view keeps the node alive and
 * lets it move to another AioContext (an iothread started with the
 * guest).
 */
void nas_dedup_fetcher_close(NasDedupFetcher *f)
{
    GHashTableIter iter;
    gpointer value;

    assert(!f->inflight);
    if (!f->views) {
        return;
    }
    g_hash_table_iter_init(&iter, f->drives);
    while (g_hash_table_iter_next(&iter, NULL, &value)) {
        ((FetchDrive *)value)->view = NULL;
    }
    aio_bh_schedule_oneshot(qemu_get_aio_context(), views_free_bh, f->views);
    f->views = NULL;
}

static void fetcher_destroy(NasDedupFetcher *f)
{
    nas_dedup_fetcher_close(f);
    g_ptr_array_free(f->bufs, true);
    g_hash_table_destroy(f->drives);
    g_free(f);
}

void nas_dedup_fetcher_free(NasDedupFetcher *f)
{
    FetchReq *req;

    if (!f) {
        return;
    }
    while ((req = g_queue_pop_head(&f->queue))) {
        req->done(req->opaque, NULL, -ECANCELED);
        g_free(req);
    }
    if (f->inflight) {
        f->dead = true;         /* the last read frees it */
        /* Held results are cancelled, now. */
        f->held = false;
        qemu_co_queue_restart_all(&f->heldq);
    } else {
        fetcher_destroy(f);
    }
}

/* True if @bs reads its data from an NFS export through libnfs. */
static bool coroutine_fn GRAPH_RDLOCK on_libnfs(BlockDriverState *bs)
{
    while (bs) {
        if (bs->drv && !strcmp(bs->drv->format_name, "nfs")) {
            return true;
        }
        bs = bdrv_primary_bs(bs);
    }
    return false;
}

/*
 * Open @v's image again, read-only, from @options (the guest's node's
 * full options), for connections of their own.  Failing that, the view
 * goes on with what it has.
 */
static void coroutine_fn open_connections(NasDedupFetcher *f, FetchView *v,
                                          QDict *options)
{
    while (v->nblk < f->connections) {
        Error *local_err = NULL;
        QDict *opts = qdict_clone_shallow(options);   /* deep below */
        BlockBackend *blk;

        qdict_flatten(opts);    /* "file": {...} to "file.*" */
        qdict_put_str(opts, BDRV_OPT_READ_ONLY, "on");
        /* Consumes @opts. */
        blk = blk_co_new_open(NULL, NULL, opts, 0, &local_err);
        if (!blk) {
            warn_reportf_err(local_err, "dedup-nas: drive '%s' fetches "
                             "through %u connection(s), not %u: ", v->id,
                             v->nblk, f->connections);
            return;
        }
        blk_set_allow_aio_context_change(blk, true);
        v->blk[v->nblk++] = blk;
    }
}

/*
 * Views of every drive attached to a guest device, made at once before
 * the first read: making one takes the block graph's writer lock, which
 * waits for every read in flight, and a read stuck on a stalled NAS would
 * then stall the main loop.  Devices on -blockdev nodes have anonymous
 * BlockBackends: walk them all.
 */
static void coroutine_fn make_views(NasDedupFetcher *f)
{
    g_autoptr(GPtrArray) ids = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(GPtrArray) nodes = g_ptr_array_new();
    /* Their full options if they are on NFS and more connections are due */
    g_autoptr(GPtrArray) nfs = g_ptr_array_new_with_free_func(
        (GDestroyNotify)qobject_unref_impl);
    BlockBackend *blk;
    guint i;

    /*
     * First the drives and their nodes, referenced, without yielding:
     * making a view yields, and the monitor may eject or unplug meanwhile.
     */
    for (blk = blk_all_next(NULL); blk; blk = blk_all_next(blk)) {
        BlockDriverState *bs = blk_bs(blk);
        QDict *opts = NULL;

        if (!blk_get_attached_dev(blk) || !bs) {
            continue;           /* not a guest drive, or no medium */
        }
        g_ptr_array_add(ids, blk_get_attached_dev_id(blk));
        bdrv_ref(bs);
        g_ptr_array_add(nodes, bs);
        if (f->connections > 1) {
            GRAPH_RDLOCK_GUARD();
            if (on_libnfs(bs)) {
                bdrv_refresh_filename(bs);
                /* Replaced, never changed in place: a reference will do. */
                opts = qobject_ref(bs->full_open_options);
            }
        }
        g_ptr_array_add(nfs, opts);
    }
    f->views = g_ptr_array_new();
    for (i = 0; i < nodes->len; i++) {
        Error *local_err = NULL;
        FetchView *v = g_new0(FetchView, 1);
        int64_t len;

        v->id = g_strdup(g_ptr_array_index(ids, i));
        v->blk[0] = blk_co_new_with_bs(g_ptr_array_index(nodes, i),
                                       BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL,
                                       &local_err);
        bdrv_co_unref(g_ptr_array_index(nodes, i));
        if (!v->blk[0]) {
            warn_reportf_err(local_err, "dedup-nas: no view of drive '%s', "
                             "its pages will be sent in full: ", v->id);
            g_free(v->id);
            g_free(v);
            continue;
        }
        v->nblk = 1;
        blk_set_allow_aio_context_change(v->blk[0], true);
        len = blk_co_getlength(v->blk[0]);
        v->size = len < 0 ? 0 : len;
        if (g_ptr_array_index(nfs, i)) {
            open_connections(f, v, g_ptr_array_index(nfs, i));
        }
        trace_nas_dedup_fetch_view(v->id, v->nblk);
        g_ptr_array_add(f->views, v);
    }
}

int coroutine_fn nas_dedup_fetcher_define(NasDedupFetcher *f, uint16_t drive,
                                          const char *id, uint64_t size,
                                          Error **errp)
{
    FetchDrive *d = g_hash_table_lookup(f->drives, GUINT_TO_POINTER(drive));
    FetchView *v = NULL;
    guint i;

    if (d) {
        error_setg(errp, "dedup-nas: drive %u defined twice", drive);
        return -EINVAL;
    }
    if (!f->views) {
        make_views(f);
    }
    d = g_new0(FetchDrive, 1);
    g_hash_table_insert(f->drives, GUINT_TO_POINTER(drive), d);
    for (i = 0; i < f->views->len; i++) {
        v = g_ptr_array_index(f->views, i);
        if (!strcmp(v->id, id)) {
            break;
        }
        v = NULL;
    }
    if (!v) {
        /* Not an error: reads of it fail with -ENOENT. */
        warn_report("dedup-nas: the source refers to drive '%s', which this "
                    "VM does not have (or has no medium in); its pages will "
                    "be sent in full", id);
        return 0;
    }
    d->view = v;
    d->size = MIN(v->size, size);
    trace_nas_dedup_fetch_drive(drive, id, d->size);
    return 0;
}

bool nas_dedup_fetcher_has_drive(NasDedupFetcher *f, uint16_t drive)
{
    return g_hash_table_contains(f->drives, GUINT_TO_POINTER(drive));
}

unsigned nas_dedup_fetcher_connections(NasDedupFetcher *f)
{
    unsigned n = 0;
    guint i;

    for (i = 0; f->views && i < f->views->len; i++) {
        n += ((FetchView *)g_ptr_array_index(f->views, i))->nblk;
    }
    return n;
}

unsigned nas_dedup_fetcher_inflight(NasDedupFetcher *f)
{
    return f->inflight + g_queue_get_length(&f->queue);
}

/* A result handed back from a worker thread. */
typedef struct FetchResult {
    FetchReq *req;
    uint8_t *buf;
    int ret;
} FetchResult;

static int fetch_result_work(void *opaque)
{
    FetchResult *r = opaque;

    r->req->done(r->req->opaque, r->buf, r->ret);
    return 0;
}

/* Read one request into @buf (NULL: no memory) and hand it back. */
static void coroutine_fn fetch_one(NasDedupFetcher *f, FetchReq *req,
                                   uint8_t *buf)
{
    FetchDrive *d = req->drive;
    FetchResult r = { .req = req };
    int ret = -ENOMEM;

    if (f->dead) {
        ret = -ECANCELED;
    } else if (!d->view || req->offset + req->len > d->size) {
        ret = -ENOENT;
    } else if (req->wanted && !req->wanted(req->opaque)) {
        ret = -EALREADY;
        trace_nas_dedup_fetch_skipped(req->offset, req->len);
    } else if (buf) {
        BlockBackend *blk = d->view->blk[d->next++ % d->view->nblk];

        ret = blk_co_pread(blk, req->offset, req->len, buf, 0);
        trace_nas_dedup_fetch_done(req->offset, req->len, ret);
        if (f->dead) {
            /* Freed while the read was in flight, whatever it returned. */
            ret = -ECANCELED;
        }
    }
    while (ret != -ECANCELED && f->held) {
        qemu_co_queue_wait(&f->heldq, NULL);
        if (f->dead) {
            ret = -ECANCELED;
        }
    }
    if (ret == -ECANCELED) {
        req->done(req->opaque, NULL, ret);
    } else {
        /* @buf is ours until the worker is done with it. */
        assert(qemu_get_current_aio_context() == qemu_get_aio_context());
        r.buf = ret >= 0 ? buf : NULL;
        r.ret = ret;
        f->in_worker++;
        thread_pool_submit_co(fetch_result_work, &r);
        if (--f->in_worker == 0) {
            qemu_co_queue_restart_all(&f->workq);
        }
    }
    g_free(req);
}

/* A fetch coroutine ends. */
static void coroutine_fn fetch_co_end(NasDedupFetcher *f)
{
    if (--f->inflight == 0 && f->dead) {
        fetcher_destroy(f);
        return;
    }
    qemu_co_queue_restart_all(&f->waitq);
}

/*
 * A fetch coroutine: reads the request it was started for, then those
 * queued meanwhile, with one buffer.
 */
static void coroutine_fn fetch_co(void *opaque)
{
    FetchReq *req = opaque;
    NasDedupFetcher *f = req->fetcher;
    uint8_t *buf = f->bufs->len ? g_ptr_array_steal_index_fast(f->bufs, 0) :
                   qemu_try_memalign(qemu_real_host_page_size(), f->max_len);

    while (req) {
        fetch_one(f, req, buf);
        req = g_queue_pop_head(&f->queue);
        qemu_co_queue_restart_all(&f->waitq);  /* the queue has room */
    }
    if (buf) {
        g_ptr_array_add(f->bufs, buf);
    }
    fetch_co_end(f);
}

static FetchReq *fetch_req_new(NasDedupFetcher *f, uint16_t drive,
                               uint64_t offset, size_t len,
                               NasDedupFetchWanted *wanted,
                               NasDedupFetchDone *done, void *opaque)
{
    FetchReq *req = g_new0(FetchReq, 1);

    assert(len <= f->max_len && !f->dead);
    req->fetcher = f;
    req->drive = g_hash_table_lookup(f->drives, GUINT_TO_POINTER(drive));
    assert(req->drive);
    req->offset = offset;
    req->len = len;
    req->wanted = wanted;
    req->done = done;
    req->opaque = opaque;
    return req;
}

void coroutine_fn nas_dedup_fetcher_read(NasDedupFetcher *f, uint16_t drive,
                                         uint64_t offset, size_t len,
                                         NasDedupFetchWanted *wanted,
                                         NasDedupFetchDone *done,
                                         void *opaque)
{
    FetchReq *req = fetch_req_new(f, drive, offset, len, wanted, done,
                                  opaque);

    if (f->inflight < NAS_DEDUP_FETCH_INFLIGHT) {
        f->inflight++;
        qemu_coroutine_enter(qemu_coroutine_create(fetch_co, req));
        return;
    }
    g_queue_push_tail(&f->queue, req);
    while (g_queue_get_length(&f->queue) >= NAS_DEDUP_FETCH_QUEUE_MAX) {
        qemu_co_queue_wait(&f->waitq, NULL);
    }
}

/*
 * An urgent read's coroutine: that read only, ahead of the queue, into a
 * buffer of its size.
 */
static void coroutine_fn fetch_urgent_co(void *opaque)
{
    FetchReq *req = opaque;
    NasDedupFetcher *f = req->fetcher;
    uint8_t *buf = qemu_try_memalign(qemu_real_host_page_size(), req->len);

    fetch_one(f, req, buf);
    qemu_vfree(buf);
    fetch_co_end(f);
}

void nas_dedup_fetcher_read_urgent(NasDedupFetcher *f, uint16_t drive,
                                   uint64_t offset, size_t len,
                                   NasDedupFetchDone *done, void *opaque)
{
    FetchReq *req = fetch_req_new(f, drive, offset, len, NULL, done,
                                  opaque);

    assert(qemu_get_current_aio_context() == qemu_get_aio_context());
    trace_nas_dedup_fetch_urgent(offset, len, f->inflight);
    /* Not counted against NAS_DEDUP_FETCH_INFLIGHT: it waits for none. */
    f->inflight++;
    qemu_coroutine_enter(qemu_coroutine_create(fetch_urgent_co, req));
}

void coroutine_fn nas_dedup_fetcher_hold(NasDedupFetcher *f)
{
    f->held = true;
    while (f->in_worker) {
        qemu_co_queue_wait(&f->workq, NULL);
    }
}

void nas_dedup_fetcher_release(NasDedupFetcher *f)
{
    f->held = false;
    qemu_co_queue_restart_all(&f->heldq);
}

void coroutine_fn nas_dedup_fetcher_drain(NasDedupFetcher *f)
{
    while (f->inflight) {
        qemu_co_queue_wait(&f->waitq, NULL);
    }
}
