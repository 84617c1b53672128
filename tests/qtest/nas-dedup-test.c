/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * QTest of the dedup-nas migration capability
 *
 * The source fills guest RAM with real AHCI DMA reads from a raw image
 * that the destination opens too (the shared disk), so that its block
 * layer hook indexes those blocks; pre-copy then sends the DMA-filled
 * pages as references, which the destination reads back from the image
 * and verifies.  The tests that migrate compare destination RAM with
 * source RAM byte for byte (the stopped source stays readable after
 * migration), and the DMA buffers with what the image holds.
 *
 *  /nas-dedup/dma-refs     references are sent, verified, and save bytes
 *                          against the same migration without dedup-nas
 *  /nas-dedup/race         disk blocks overwritten behind the source's back,
 *                          before and while migrating: the destination
 *                          detects it and the source sends the pages again
 *  /nas-dedup/malformed/X  the first REFS record of a real stream made
 *                          malformed by a proxy (offsets, counts, drive
 *                          numbers, type, truncation) fails the incoming
 *                          migration with a message naming the problem;
 *                          the source keeps running
 *  /nas-dedup/multifd/{none,zstd}  with multifd (4 channels): the race
 *                          case and randomized migrations, RAM identical
 *  /nas-dedup/postcopy/{plain,preempt}  with postcopy-ram (and preempt),
 *                          asked for at once: references still unread at
 *                          the switch are filled after it (the race case
 *                          before it), RAM identical
 *  /nas-dedup/postcopy/meet  the same, with the source sending the pages
 *                          still to fill from the far end (on a link much
 *                          faster than the reads): the destination places
 *                          whichever copy comes first, skips reads with
 *                          nothing left to place; RAM identical
 *  /nas-dedup/postcopy/fault-read[-late]  a thread other than the main
 *                          one (dump-guest-memory's) reads pages still to
 *                          fill: they are read from the disk first, or,
 *                          if that takes longer than
 *                          x-dedup-nas-fault-read-ms, come from the
 *                          source; RAM identical
 *  /nas-dedup/postcopy/stale-resend  a DEDUP_RESEND that crosses a newer
 *                          copy of its pages is dropped by the source
 *  /nas-dedup/multifd/stall  a destination that stops reading its multifd
 *                          sockets during switchover: the migration fails
 *                          within the bound, the source runs
 *  /nas-dedup/dest-capability-off  a destination with dedup-nas off loads
 *                          the references all the same, and says so in
 *                          query-migrate
 *  /nas-dedup/fetch-after-failure/late-read[-error]  reads of shared
 *                          storage that complete (or fail) after the load
 *                          failed leave guest RAM and the statistics alone
 *  /nas-dedup/malformed-exit  same, destination with the default
 *                          exit-on-error: it exits with an error message
 *  /nas-dedup/unresolvable/N  references the destination cannot resolve
 *                          or verify (a drive it lacks, a range past its
 *                          end of the disk, changed hashes, an offset
 *                          one sector off, a RAMBlock grown under them):
 *                          asked again, RAM identical
 *  /nas-dedup/collision    a disk block and a RAM page that collide under
 *                          XXH3 with its published secret: RAM identical
 *  /nas-dedup/rp/...       a destination that sends unexpected or bad
 *                          return-path messages: the migration fails, the
 *                          source runs on
 *  /nas-dedup/rp-numbering the destination answers with the return-path
 *                          numbers the source declared
 *  /nas-dedup/switchover-bound  the destination never answers the final
 *                          SYNC: the stopped guest resumes after
 *                          downtime-limit + dedup-nas-switchover-slack,
 *                          and a second migration succeeds
 *  /nas-dedup/throttled-dest  the destination's drive has iotune limits:
 *                          fetches are not throttled by them
 *  /nas-dedup/auto-converge   auto-converge counts references as moved:
 *                          the throttle steps for the real dirty rate
 *  /nas-dedup/unaligned/sector-63, 1k  pages DMAed from disk offsets that
 *                          are not 4 KiB-aligned (partition at sector 63,
 *                          1 KiB file system blocks) go as references,
 *                          RAM identical
 *  /nas-dedup/estimate     query-dedup-nas-estimate (and HMP info
 *                          dedup_nas_estimate) predicts the references and
 *                          bytes of the migration that follows
 *  /nas-dedup/track/from-boot, off  the capability turned on just before
 *                          "migrate" (HMP): the page cache read before is
 *                          found (tracking from boot), or, with tracking
 *                          off, "migrate" warns that nothing is indexed
 *  /nas-dedup/resize/grow, shrink  block_resize through another BlockBackend:
 *                          a grow keeps what the index knew of the drive,
 *                          a shrink drops what it cut
 *  /nas-dedup/drive-del    removing the drive's medium drops all of it
 *  /nas-dedup/fault/...    the channel cut at several points, migrate_cancel
 *                          while a live or the final SYNC is unanswered, the
 *                          destination killed: the migration fails, the
 *                          source runs on, and migrates again with RAM
 *                          identical
 *  /nas-dedup/stress       randomized migrations (NAS_DEDUP_STRESS of them,
 *                          NAS_DEDUP_STRESS_SEED), each RAM-identical
 *  /nas-dedup/savevm       savevm and loadvm still work with dedup-nas on
 *  /nas-dedup/caps         capability checks (return-path needed at
 *                          migrate, not when capabilities are set)
 */

#include "qemu/osdep.h"
#include <sys/socket.h>
#include <sys/un.h>
#include <poll.h>
#include "qemu/units.h"
#include "qemu/bswap.h"
#include "qemu/atomic.h"
#include "qemu/cutils.h"
#include "libqtest.h"
#include "libqos/libqos-pc.h"
#include "libqos/ahci.h"
#include "qobject/qdict.h"
#include "qobject/qlist.h"
#include "qobject/qnum.h"
#include "migration/migration-qmp.h"
#include "migration/migration-util.h"

#define CHUNK           4096            /* dedup-nas chunk = target page */
#define RAM_BYTES       (128 * MiB)
#define IMAGE_BYTES     (32 * MiB)
#define IMAGE_BLOCKS    (IMAGE_BYTES / CHUNK)
#define DMA_CMD_BYTES   (4 * MiB)       /* one READ DMA EXT command */
#define DMA_PRD_BYTES   (64 * KiB)      /* one PRD entry */
#define CMP_BYTES       (4 * MiB)       /* RAM compared this much at a time */
/*
 * libqtest receives a reply 1 KiB at a time and looks for its end from the
 * start each time: read guest memory in pieces small enough for that.
 */
#define READ_PIECE      (16 * KiB)
/* Guest RAM below 1 MiB that is RAM on q35 with no firmware run. */
#define LOW_RAM_END     0xa0000
#define HIGH_RAM_START  0x100000
#define WAIT_SECONDS    120

static char *tmpdir;
static char *image_path;
/* The guest's drive: image_path as raw, unless a test says otherwise. */
static const char *drive_file;
static const char *drive_format = "raw";
static char *mig_uri;
static bool dst_direct_io;

/*** Disk content ***/

/*
 * Generation @gen of disk block @block: non-zero, different for every
 * block and generation.
 */
static void fill_block(uint8_t *buf, uint64_t block, uint32_t gen)
{
    uint64_t x = ((block + 1) * 0x9e3779b97f4a7c15ULL) ^
                 ((uint64_t)gen << 40) ^ 0x2545f4914f6cdd1dULL;
    size_t i;

    x |= 1;
    for (i = 0; i < CHUNK; i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        stq_le_p(buf + i, x);
    }
    stq_le_p(buf, block);
    stl_le_p(buf + 8, gen);
    stl_le_p(buf + 12, 0x4e415344);     /* "DSAN" */
}

static void make_image(void)
{
    g_autofree uint8_t *buf = g_malloc(MiB);
    int fd = open(image_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    uint64_t b, off;

    g_assert(fd >= 0);
    for (off = 0; off < IMAGE_BYTES; off += MiB) {
        for (b = 0; b < MiB / CHUNK; b++) {
            fill_block(buf + b * CHUNK, off / CHUNK + b, 0);
        }
        g_assert_cmpint(pwrite(fd, buf, MiB, off), ==, MiB);
    }
    g_assert_cmpint(fsync(fd), ==, 0);
    close(fd);
}

/*
 * Overwrite @count blocks, every @stride blocks from block @first, with
 * generation @gen, as another host sharing the image would: the source
 * QEMU does not see it.
 */
static void overwrite_blocks(uint64_t first, uint64_t count, uint64_t stride,
                             uint32_t gen)
{
    uint8_t buf[CHUNK];
    int fd = open(image_path, O_WRONLY);
    uint64_t i;

    g_assert(fd >= 0);
    for (i = 0; i < count; i++) {
        uint64_t b = first + i * stride;

        g_assert_cmpuint(b, <, IMAGE_BLOCKS);
        fill_block(buf, b, gen);
        g_assert_cmpint(pwrite(fd, buf, CHUNK, b * CHUNK), ==, CHUNK);
    }
    g_assert_cmpint(fdatasync(fd), ==, 0);
    close(fd);
}

static bool probe_direct_io(const char *path)
{
#ifdef O_DIRECT
    int fd = open(path, O_RDONLY | O_DIRECT);
    g_autofree uint8_t *buf = NULL;
    bool ok;

    if (fd < 0) {
        return false;
    }
    buf = g_malloc(2 * CHUNK);
    ok = pread(fd, (uint8_t *)QEMU_ALIGN_PTR_UP(buf, CHUNK), CHUNK, 0) == CHUNK;
    close(fd);
    return ok;
#else
    return false;
#endif
}

/*** Machines ***/

typedef struct Source {
    AHCIQState *ahci;
    QTestState *qts;
    uint8_t port;
} Source;

/* More migration globals for both sides (the multifd tests). */
static const char *mig_globals = "";

/*
 * The same drive and device, with the same id, on both sides; @drive, if
 * not NULL, replaces the -drive options that follow "id=drive0,".
 */
static char *machine_args_drive(bool dedup, bool direct, const char *drive,
                                const char *extra)
{
    g_autofree char *opts = drive ? g_strdup(drive) :
        g_strdup_printf("file=%s,format=%s,cache.direct=%s",
                        drive_file ? drive_file : image_path, drive_format,
                        direct ? "on" : "off");

    /*
     * Every page found on disk goes as a reference unless a test asks for
     * the link/NAS split (/nas-dedup/ref-share/): the other tests count
     * references, and over a local socket and a local file the split
     * would send some of them in full.
     */
    return g_strdup_printf("-M q35 -m %" PRIu64 "M -nodefaults "
                           "-drive if=none,id=drive0,%s "
                           "-device ide-hd,drive=drive0,bus=ide.0,id=disk0 "
                           "-global migration.x-return-path=on "
                           "-global migration.dedup-nas-ref-share=100 "
                           "-global migration.x-dedup-nas=%s %s %s",
                           (uint64_t)(RAM_BYTES / MiB), opts,
                           dedup ? "on" : "off", mig_globals,
                           extra ? extra : "");
}

static char *machine_args(bool dedup, bool direct, const char *extra)
{
    return machine_args_drive(dedup, direct, NULL, extra);
}

G_GNUC_PRINTF(1, 2)
static QOSState *pc_boot(const char *fmt, ...)
{
    QOSState *qs;
    va_list ap;

    va_start(ap, fmt);
    qs = qtest_pc_vboot(fmt, ap);
    va_end(ap);
    return qs;
}

/* Boot the source and bring up its AHCI HBA and the port of disk0. */
static void source_boot_args(Source *src, bool dedup, const char *more)
{
    g_autofree char *args = machine_args(dedup, false, more);
    AHCIQState *ahci = g_new0(AHCIQState, 1);

    ahci->parent = pc_boot("%s", args);
    ahci->dev = get_ahci_device(ahci->parent->qts, &ahci->fingerprint);
    ahci_pci_enable(ahci);
    ahci_hba_enable(ahci);
    src->port = ahci_port_select(ahci);
    ahci_port_clear(ahci, src->port);
    src->ahci = ahci;
    src->qts = ahci->parent->qts;
}

static void source_boot(Source *src, bool dedup)
{
    source_boot_args(src, dedup, NULL);
}

static void source_shutdown(Source *src)
{
    QOSState *qs = src->ahci->parent;

    ahci_clean_mem(src->ahci);
    free_ahci_device(src->ahci->dev);
    g_free(src->ahci);
    qtest_shutdown(qs);
    src->ahci = NULL;
    src->qts = NULL;
}

/* Guest RAM for @bytes, 4 KiB aligned (the libqos PC allocator's pages). */
static uint64_t guest_buf(Source *src, uint64_t bytes)
{
    uint64_t addr = ahci_alloc(src->ahci, bytes);

    g_assert(addr);
    g_assert_cmphex(addr & (CHUNK - 1), ==, 0);
    g_assert_cmphex(addr + bytes, <=, RAM_BYTES);
    return addr;
}

/* Real device DMA between disk [@disk_off, +@bytes) and guest RAM @gpa. */
static void dma_disk(Source *src, uint8_t ata_cmd, uint64_t gpa,
                     uint64_t disk_off, uint64_t bytes)
{
    uint64_t done, n;

    g_assert_cmphex(disk_off & (AHCI_SECTOR_SIZE - 1), ==, 0);
    g_assert_cmphex(gpa & (CHUNK - 1), ==, 0);
    for (done = 0; done < bytes; done += n) {
        AHCICommand *cmd = ahci_command_create(ata_cmd);

        n = MIN(DMA_CMD_BYTES, bytes - done);
        ahci_command_adjust(cmd, (disk_off + done) / AHCI_SECTOR_SIZE,
                            gpa + done, n, DMA_PRD_BYTES);
        ahci_command_commit(src->ahci, cmd, src->port);
        ahci_command_issue(src->ahci, cmd);
        ahci_command_verify(src->ahci, cmd);
        ahci_command_free(cmd);
    }
}

/* READ DMA EXT: disk [@disk_off, +@bytes) to guest RAM @gpa. */
static void dma_read_disk(Source *src, uint64_t gpa, uint64_t disk_off,
                          uint64_t bytes)
{
    dma_disk(src, CMD_READ_DMA_EXT, gpa, disk_off, bytes);
}

/* Fill guest RAM [@gpa, +@bytes) with pseudo-random data from the test. */
static void write_random(QTestState *qts, uint64_t gpa, uint64_t bytes,
                         uint32_t seed)
{
    g_autoptr(GRand) rand = g_rand_new_with_seed(seed);
    g_autofree uint32_t *buf = g_malloc(MiB);
    uint64_t off;
    size_t i;

    for (off = 0; off < bytes; off += MiB) {
        size_t n = MIN(MiB, bytes - off);

        for (i = 0; i < n / 4; i++) {
            buf[i] = g_rand_int(rand);
        }
        qtest_bufwrite(qts, gpa + off, buf, n);
    }
}

static QTestState *dest_boot(bool dedup, const char *extra)
{
    g_autofree char *args = machine_args(dedup, dst_direct_io, extra);

    return qtest_init(args);
}

/*** Checks ***/

static void read_guest(QTestState *qts, uint64_t gpa, void *buf, size_t len)
{
    size_t off, n;

    for (off = 0; off < len; off += n) {
        n = MIN(READ_PIECE, len - off);
        qtest_bufread(qts, gpa + off, (uint8_t *)buf + off, n);
    }
}

static void assert_ram_range_equal(QTestState *a, QTestState *b,
                                   uint64_t start, uint64_t end)
{
    g_autofree uint8_t *ba = g_malloc(CMP_BYTES);
    g_autofree uint8_t *bb = g_malloc(CMP_BYTES);
    uint64_t addr, n, i;

    for (addr = start; addr < end; addr += n) {
        n = MIN(CMP_BYTES, end - addr);
        read_guest(a, addr, ba, n);
        read_guest(b, addr, bb, n);
        if (memcmp(ba, bb, n)) {
            for (i = 0; i < n && ba[i] == bb[i]; i++) {
                /* find the first difference */
            }
            g_test_message("RAM differs at 0x%" PRIx64 ": source %02x%02x%02x"
                           "%02x..., destination %02x%02x%02x%02x...",
                           addr + i, ba[i], ba[i + 1], ba[i + 2], ba[i + 3],
                           bb[i], bb[i + 1], bb[i + 2], bb[i + 3]);
            g_assert_cmphex(addr + i, ==, UINT64_MAX);
        }
    }
}

/* Compare all guest RAM of the source and the destination. */
static void assert_ram_equal(QTestState *a, QTestState *b)
{
    assert_ram_range_equal(a, b, 0, LOW_RAM_END);
    assert_ram_range_equal(a, b, HIGH_RAM_START, RAM_BYTES);
}

/*
 * Guest RAM [@gpa, +@nblocks blocks) holds disk blocks from @first_block,
 * each of the generation @gen_of says (NULL: 0).
 */
static void assert_ram_holds_disk(QTestState *qts, uint64_t gpa,
                                  uint64_t first_block, uint64_t nblocks,
                                  uint32_t (*gen_of)(uint64_t block))
{
    g_autofree uint8_t *buf = g_malloc(MiB);
    uint8_t expect[CHUNK];
    uint64_t off, bytes = nblocks * CHUNK;
    size_t i;

    for (off = 0; off < bytes; off += MiB) {
        size_t n = MIN(MiB, bytes - off);

        read_guest(qts, gpa + off, buf, n);
        for (i = 0; i < n; i += CHUNK) {
            uint64_t b = first_block + (off + i) / CHUNK;

            fill_block(expect, b, gen_of ? gen_of(b) : 0);
            if (memcmp(buf + i, expect, CHUNK)) {
                g_test_message("guest page 0x%" PRIx64 " does not hold disk "
                               "block %" PRIu64, gpa + off + i, b);
                g_assert_not_reached();
            }
        }
    }
}

static uint64_t stat_u64(QDict *d, const char *key)
{
    QNum *n = qobject_to(QNum, qdict_get(d, key));
    uint64_t v;

    g_assert(n);
    g_assert(qnum_get_try_uint(n, &v));
    return v;
}

typedef struct DedupStats {
    /* source */
    uint64_t transferred;
    uint64_t ref_pages;
    uint64_t ref_bytes;
    uint64_t bytes_saved;
    uint64_t resent_pages;
    uint64_t index_entries;
    uint64_t ref_share;
    /* destination */
    uint64_t fetched_blocks;
    uint64_t fetched_bytes;
    uint64_t verified_pages;
    uint64_t mismatches;
    uint64_t read_errors;
    uint64_t resend_requests;
    uint64_t fetch_connections;
    uint64_t fill_pages;
    uint64_t fill_faults;
    uint64_t fill_fault_reads;
    uint64_t fill_met;
} DedupStats;

static void read_stats(QTestState *from, QTestState *to, bool dedup,
                       DedupStats *st)
{
    QDict *rsp, *ram, *dn;

    memset(st, 0, sizeof(*st));
    rsp = migrate_query(from);
    g_assert_cmpstr(qdict_get_str(rsp, "status"), ==, "completed");
    ram = qdict_get_qdict(rsp, "ram");
    g_assert(ram);
    st->transferred = stat_u64(ram, "transferred");
    dn = qdict_get_qdict(rsp, "dedup-nas");
    g_assert(!dn == !dedup);
    /* Each side returns its own statistics only. */
    g_assert(!qdict_haskey(rsp, "dedup-nas-incoming"));
    if (dn) {
        st->ref_pages = stat_u64(dn, "reference-pages");
        st->ref_bytes = stat_u64(dn, "reference-bytes");
        st->bytes_saved = stat_u64(dn, "bytes-saved");
        st->resent_pages = stat_u64(dn, "resent-pages");
        st->index_entries = stat_u64(dn, "index-entries");
        st->ref_share = stat_u64(dn, "reference-share");
    }
    qobject_unref(rsp);

    rsp = migrate_query(to);
    g_assert_cmpstr(qdict_get_str(rsp, "status"), ==, "completed");
    dn = qdict_get_qdict(rsp, "dedup-nas-incoming");
    g_assert(!dn == !dedup);
    g_assert(!qdict_haskey(rsp, "dedup-nas"));
    if (dn) {
        st->fetched_blocks = stat_u64(dn, "fetched-blocks");
        st->fetched_bytes = stat_u64(dn, "fetched-bytes");
        st->verified_pages = stat_u64(dn, "verified-pages");
        st->mismatches = stat_u64(dn, "mismatches");
        st->read_errors = stat_u64(dn, "read-errors");
        st->resend_requests = stat_u64(dn, "resend-requests");
        st->fetch_connections = stat_u64(dn, "fetch-connections");
        st->fill_pages = stat_u64(dn, "postcopy-fill-pages");
        st->fill_faults = stat_u64(dn, "postcopy-fill-faults");
        st->fill_fault_reads = stat_u64(dn, "postcopy-fill-fault-reads");
        st->fill_met = stat_u64(dn, "postcopy-fill-met");
    }
    qobject_unref(rsp);

    g_test_message("dedup-nas %s: transferred %" PRIu64
                   " reference-pages %" PRIu64 " reference-bytes %" PRIu64
                   " bytes-saved %" PRIu64
                   " resent-pages %" PRIu64 " index-entries %" PRIu64
                   " | fetched-blocks %" PRIu64 " verified-pages %" PRIu64
                   " mismatches %" PRIu64 " read-errors %" PRIu64
                   " resend-requests %" PRIu64, dedup ? "on" : "off",
                   st->transferred, st->ref_pages, st->ref_bytes,
                   st->bytes_saved, st->resent_pages, st->index_entries,
                   st->fetched_blocks, st->verified_pages, st->mismatches,
                   st->read_errors, st->resend_requests);
}

/*
 * Poll @who's query-migrate until its status is @goal (or @or_goal, if not
 * NULL); never 'completed'.
 */
static QDict *wait_for_status(QTestState *who, const char *goal,
                              const char *or_goal)
{
    g_autoptr(GTimer) timer = g_timer_new();

    for (;;) {
        QDict *rsp = migrate_query(who);
        const char *status = qdict_get_str(rsp, "status");

        if (!strcmp(status, goal) || (or_goal && !strcmp(status, or_goal))) {
            return rsp;
        }
        g_assert_cmpstr(status, !=, "completed");
        qobject_unref(rsp);
        g_assert_cmpfloat(g_timer_elapsed(timer, NULL), <, WAIT_SECONDS);
        g_usleep(10 * 1000);
    }
}

static void assert_running(QTestState *who)
{
    g_autoptr(GTimer) timer = g_timer_new();
    QDict *rsp;

    /*
     * A migration is "failed" as soon as its thread sets the state, and
     * the guest stopped for the switchover runs again right after, in
     * migration_iteration_finish(): until then its state is still
     * finish-migrate.
     */
    for (;;) {
        rsp = qtest_qmp_assert_success_ref(who,
                                           "{ 'execute': 'query-status' }");
        if (strcmp(qdict_get_str(rsp, "status"), "finish-migrate") ||
            g_timer_elapsed(timer, NULL) > 5) {
            break;
        }
        qobject_unref(rsp);
        g_usleep(10 * 1000);
    }
    g_assert(qdict_get_bool(rsp, "running"));
    g_assert_cmpstr(qdict_get_str(rsp, "status"), ==, "running");
    qobject_unref(rsp);
}

/*** Tests ***/

/* Layout of the guest RAM the tests fill (all of it 4 KiB aligned). */
typedef struct Guest {
    Source src;
    QTestState *dst;
    uint64_t rand_addr, rand_bytes;
    uint64_t dma_addr, dma_bytes;
} Guest;

/*
 * Boot both sides; the source gets @rand_bytes of random data (low, so it
 * is sent first) then @dma_bytes of disk from offset 0 read by DMA.
 */
static void guest_setup(Guest *g, bool dedup, uint64_t rand_bytes,
                        uint64_t dma_bytes)
{
    memset(g, 0, sizeof(*g));
    make_image();
    source_boot(&g->src, dedup);
    g->rand_bytes = rand_bytes;
    if (rand_bytes) {
        g->rand_addr = guest_buf(&g->src, rand_bytes);
        write_random(g->src.qts, g->rand_addr, rand_bytes, 0x5eed);
    }
    g->dma_bytes = dma_bytes;
    g->dma_addr = guest_buf(&g->src, dma_bytes);
    dma_read_disk(&g->src, g->dma_addr, 0, dma_bytes);
    /* The device did fill guest RAM with the disk. */
    assert_ram_holds_disk(g->src.qts, g->dma_addr, 0, dma_bytes / CHUNK,
                          NULL);

    g->dst = dest_boot(dedup, "-incoming defer");
    migrate_incoming_qmp(g->dst, mig_uri, NULL, "{ 'exit-on-error': false }");
}

static void guest_teardown(Guest *g)
{
    source_shutdown(&g->src);
    qtest_quit(g->dst);
    g->dst = NULL;
    unlink(image_path);
    unlink(mig_uri + strlen("unix:"));
}

static void migrate_and_check(Guest *g, bool dedup, DedupStats *st)
{
    migrate_ensure_converge(g->src.qts);
    migrate_qmp(g->src.qts, g->dst, mig_uri, NULL, "{}");
    wait_for_migration_complete(g->src.qts);
    wait_for_migration_complete(g->dst);
    read_stats(g->src.qts, g->dst, dedup, st);
    assert_ram_equal(g->src.qts, g->dst);
}

static void do_dma_refs(bool dedup, DedupStats *st)
{
    Guest g;
    uint64_t dma_pages = 16 * MiB / CHUNK;
    uint64_t half = 8 * MiB;

    guest_setup(&g, dedup, 4 * MiB, 16 * MiB);
    /*
     * Read again, the disk's second 16 MiB in both halves of the buffer,
     * swapped: the runs of references start anew in mid-buffer.
     */
    dma_read_disk(&g.src, g.dma_addr, 16 * MiB + half, half);
    dma_read_disk(&g.src, g.dma_addr + half, 16 * MiB, half);
    migrate_and_check(&g, dedup, st);
    assert_ram_holds_disk(g.dst, g.dma_addr, (16 * MiB + half) / CHUNK,
                          half / CHUNK, NULL);
    assert_ram_holds_disk(g.dst, g.dma_addr + half, 16 * MiB / CHUNK,
                          half / CHUNK, NULL);

    if (dedup) {
        /* The DMA-filled pages went as references; nothing else did. */
        g_assert_cmpuint(st->index_entries, >=, 2 * dma_pages);
        g_assert_cmpuint(st->ref_pages, >=, dma_pages * 95 / 100);
        g_assert_cmpuint(st->ref_pages, <=, dma_pages);
        g_assert_cmpuint(st->bytes_saved, >, st->ref_pages * (CHUNK - 64));
        g_assert_cmpuint(st->resent_pages, ==, 0);
        /* ... and the destination read and verified every one of them. */
        g_assert_cmpuint(st->fetched_blocks, ==, st->ref_pages);
        g_assert_cmpuint(st->fetched_bytes, ==, st->ref_pages * CHUNK);
        g_assert_cmpuint(st->verified_pages, ==, st->ref_pages);
        g_assert_cmpuint(st->mismatches, ==, 0);
        /*
         * One drive, a shared file, not on NFS through libnfs: its own
         * node only, whatever dedup-nas-fetch-connections says (the
         * functional test checks the connections to an NFS export).
         */
        g_assert_cmpuint(st->fetch_connections, ==, 1);
        g_assert_cmpuint(st->read_errors, ==, 0);
        g_assert_cmpuint(st->resend_requests, ==, 0);
    }
    guest_teardown(&g);
}

static void test_dma_refs(void)
{
    DedupStats off, on;
    uint64_t dma_bytes = 16 * MiB;

    do_dma_refs(false, &off);
    do_dma_refs(true, &on);
    /* The same guest RAM, with 90% of the DMA-filled bytes not sent. */
    g_assert_cmpuint(off.transferred, >, dma_bytes);
    g_assert_cmpuint(on.transferred, <, off.transferred - dma_bytes * 9 / 10);
}

/*
 * A source with dedup-nas on, and @dma_bytes of its disk read by DMA into
 * its RAM; no destination yet.
 */
static void source_with_dma(Guest *g, uint64_t dma_bytes)
{
    memset(g, 0, sizeof(*g));
    make_image();
    source_boot(&g->src, true);
    g->dma_bytes = dma_bytes;
    g->dma_addr = guest_buf(&g->src, dma_bytes);
    dma_read_disk(&g->src, g->dma_addr, 0, dma_bytes);
}

/*
 * The destination loads references whatever its own capability says (the
 * stream carries them), and its statistics say so all the same.
 */
static void test_dest_capability_off(void)
{
    Guest g;
    DedupStats st;

    source_with_dma(&g, 4 * MiB);
    g.dst = dest_boot(false, "-incoming defer");
    migrate_incoming_qmp(g.dst, mig_uri, NULL, "{ 'exit-on-error': false }");
    migrate_and_check(&g, true, &st);
    g_assert_cmpuint(st.ref_pages, >=, g.dma_bytes / CHUNK * 95 / 100);
    g_assert_cmpuint(st.verified_pages, ==, st.ref_pages);
    guest_teardown(&g);
}

/* Race: blocks rewritten since the source read them. */
#define RACE_DMA_BYTES      (16 * MiB)
#define RACE_DMA_BLOCKS     (RACE_DMA_BYTES / CHUNK)
#define RACE_STRIDE         4
/* Before migrating: every 4th block of the first half, from block 1. */
#define RACE_BEFORE_FIRST   1
/* While migrating: every 4th block of the second half, from block 2050. */
#define RACE_DURING_FIRST   (RACE_DMA_BLOCKS / 2 + 2)
#define RACE_COUNT          (RACE_DMA_BLOCKS / 2 / RACE_STRIDE)

static uint32_t race_gen(uint64_t block)
{
    if (block % RACE_STRIDE == RACE_BEFORE_FIRST % RACE_STRIDE &&
        block >= RACE_BEFORE_FIRST && block < RACE_DMA_BLOCKS / 2) {
        return 1;
    }
    if (block % RACE_STRIDE == RACE_DURING_FIRST % RACE_STRIDE &&
        block >= RACE_DURING_FIRST && block < RACE_DMA_BLOCKS) {
        return 2;
    }
    return 0;
}

static void test_race(void)
{
    Guest g;
    DedupStats st;
    g_autofree gchar *image = NULL;
    gsize image_len;
    uint8_t expect[CHUNK];
    uint64_t rand_bytes = 4 * MiB, transferred, b;
    bool during_before_refs;
    QDict *rsp;

    guest_setup(&g, true, rand_bytes, RACE_DMA_BYTES);

    overwrite_blocks(RACE_BEFORE_FIRST, RACE_COUNT, RACE_STRIDE, 1);

    /*
     * Slowly: the random pages, sent before the DMA buffer, take about a
     * second; overwrite the other blocks meanwhile.
     */
    migrate_set_parameter_int(g.src.qts, "downtime-limit", 30 * 1000);
    migrate_set_parameter_int(g.src.qts, "max-bandwidth", 4 * MiB);
    /* Postcopy may be over before a query sees it: its event tells. */
    migrate_set_capability(g.src.qts, "events", true);
    migrate_qmp(g.src.qts, g.dst, mig_uri, NULL, "{}");
    rsp = wait_for_status(g.src.qts, "active", NULL);
    qobject_unref(rsp);
    overwrite_blocks(RACE_DURING_FIRST, RACE_COUNT, RACE_STRIDE, 2);
    /*
     * If the source had not sent all the random pages by then, it had
     * sent no reference to the DMA buffer either.
     */
    transferred = read_ram_property_int(g.src.qts, "transferred");
    during_before_refs = transferred < rand_bytes;
    g_test_message("overwrote blocks while migrating after %" PRIu64
                   " bytes: %s the references", transferred,
                   during_before_refs ? "before" : "maybe after");
    migrate_ensure_converge(g.src.qts);

    wait_for_migration_complete(g.src.qts);
    wait_for_migration_complete(g.dst);
    read_stats(g.src.qts, g.dst, true, &st);
    assert_ram_equal(g.src.qts, g.dst);

    /* The destination holds what the device read, not the new blocks. */
    assert_ram_holds_disk(g.dst, g.dma_addr, 0, RACE_DMA_BLOCKS, NULL);
    /* ... and the image does hold the new blocks. */
    g_assert(g_file_get_contents(image_path, &image, &image_len, NULL));
    g_assert_cmpuint(image_len, ==, IMAGE_BYTES);
    for (b = 0; b < RACE_DMA_BLOCKS; b++) {
        fill_block(expect, b, race_gen(b));
        g_assert(!memcmp(image + b * CHUNK, expect, CHUNK));
    }

    g_assert_cmpuint(st.ref_pages, >=, RACE_DMA_BLOCKS * 95 / 100);
    g_assert_cmpuint(st.mismatches, >=, RACE_COUNT);
    if (during_before_refs) {
        g_assert_cmpuint(st.mismatches, >=, 2 * RACE_COUNT);
    }
    g_assert_cmpuint(st.mismatches, <=, 2 * RACE_COUNT);
    g_assert_cmpuint(st.read_errors, ==, 0);
    g_assert_cmpuint(st.resend_requests, ==, st.mismatches);
    g_assert_cmpuint(st.resent_pages, ==, st.mismatches);
    g_assert_cmpuint(st.verified_pages + st.mismatches, ==, st.ref_pages);
    if (*mig_globals) {
        /* The pages sent in full, and the resent ones, took the channels. */
        g_assert_cmpuint(read_ram_property_int(g.src.qts, "multifd-bytes"),
                         >, rand_bytes);
    }
    guest_teardown(&g);
}

/* Postcopy: the source keeps rewriting its random pages, all of them. */
#define PC_RAND_BYTES   (4 * MiB)
/* The destination's reads of the shared disk, slower than the first pass. */
#define PC_READ_BPS     (4 * MiB)
/* ... and slower still where the test acts during the fill (~8 s). */
#define PC_FILL_BPS     (2 * MiB)
/* ... and slower still where a read of the fill must wait (~16 s). */
#define PC_SLOW_BPS     (1 * MiB)
/* Pages at the end of the region that dump-guest-memory reads early. */
#define PC_DUMP_PAGES   16
/* A storage stalled for the test: a read of 1 MiB takes minutes. */
#define PC_STALL_BPS    4096
/* Pages of the last disk blocks the test reads on the destination early. */
#define PC_FAULT_PAGES  16
/* Blocks the destination writes during the fill, just before those. */
#define PC_DST_WRITES   64

typedef struct PostcopyCase {
    bool preempt;
    bool resolve_first;     /* x-dedup-nas-postcopy-lazy=off */
    bool race;              /* faults, and destination writes, in the fill */
    bool recover;           /* postcopy paused and recovered in the fill */
    /*
     * Another thread than the main one (dump-guest-memory's) reads pages
     * still to fill (postcopy_dump()), its faults read from the disk
     * first for up to this many ms (x-dedup-nas-fault-read-ms); 0: no
     * such thread, and the default deadline.
     */
    unsigned dump_read_ms;
    /*
     * x-dedup-nas-postcopy-meet on (the default): the source sends the
     * pages still to fill, from the far end; off in the other cases, which
     * test the fill itself.
     */
    bool meet;
    /*
     * The storage all but stalls (PC_STALL_BPS): the reads in flight at
     * the switch do not end before the test does.
     */
    bool stall;
} PostcopyCase;

/*
 * The counts of a "nas_dedup_load_fill_end" trace in @dout: pages that
 * came from the source before the fill placed them, reads skipped.
 */
static void fill_end_counts(const char *dout, uint64_t *met,
                            uint64_t *skipped)
{
    const char *p = strstr(dout, "nas_dedup_load_fill_end ");

    g_assert(p);
    p = strstr(p, "never placed ");
    g_assert(p);
    g_assert_cmpint(sscanf(p, "never placed %*u; %" SCNu64 " came from the "
                           "source first, %" SCNu64 " reads skipped",
                           met, skipped), ==, 2);
}

/* Pages of a "nas_dedup_load_mismatch" trace in @log within [@lo, @hi). */
static unsigned count_mismatches(const char *log, uint64_t lo, uint64_t hi)
{
    g_autofree char *out = NULL;
    g_auto(GStrv) lines = NULL;
    unsigned n = 0;
    int i;

    g_assert(g_file_get_contents(log, &out, NULL, NULL));
    lines = g_strsplit(out, "\n", -1);
    for (i = 0; lines[i]; i++) {
        const char *p = strstr(lines[i], "nas_dedup_load_mismatch ");
        uint64_t off;

        p = p ? strstr(p, " 0x") : NULL;
        if (p && !qemu_strtou64(p + 1, NULL, 16, &off) &&
            off >= lo && off < hi) {
            n++;
        }
    }
    return n;
}

/*
 * While the destination fills: the test reads the last pages of the
 * region there (from the main thread, as device state loading might:
 * each must come from the source at once, not wait for a read behind the
 * main loop), and the destination writes to the disk blocks just before
 * them (through its block layer, as its guest would) before the fill
 * read them: those must not verify, and come from the source.
 */
static void postcopy_race(Guest *g, uint64_t *write_lo, uint64_t *write_hi)
{
    uint64_t first = RACE_DMA_BLOCKS - PC_FAULT_PAGES;
    uint64_t wfirst = first - PC_DST_WRITES;
    g_autofree uint8_t *dst = g_malloc(PC_FAULT_PAGES * CHUNK);
    g_autofree uint8_t *src = g_malloc(PC_FAULT_PAGES * CHUNK);
    g_autofree char *out = NULL;
    g_autofree char *image = NULL;
    gsize image_len;
    g_autoptr(GTimer) timer = g_timer_new();
    QDict *rsp;

    read_guest(g->dst, g->dma_addr + first * CHUNK, dst,
               PC_FAULT_PAGES * CHUNK);
    read_guest(g->src.qts, g->dma_addr + first * CHUNK, src,
               PC_FAULT_PAGES * CHUNK);
    g_assert(!memcmp(dst, src, PC_FAULT_PAGES * CHUNK));

    /* The guest runs there once the device state is in. */
    for (;;) {
        rsp = qtest_qmp_assert_success_ref(g->dst,
                                           "{ 'execute': 'query-status' }");
        if (qdict_get_bool(rsp, "running")) {
            qobject_unref(rsp);
            break;
        }
        qobject_unref(rsp);
        g_assert_cmpfloat(g_timer_elapsed(timer, NULL), <, WAIT_SECONDS);
        g_usleep(10 * 1000);
    }
    out = qtest_hmp(g->dst, "qemu-io drive0 \"write -P 0x5a %" PRIu64
                    " %u\"", wfirst * CHUNK, PC_DST_WRITES * CHUNK);
    g_assert_cmpstr(out, ==, "");
    /* It went through to the image. */
    g_assert(g_file_get_contents(image_path, &image, &image_len, NULL));
    g_assert_cmpuint(image_len, ==, IMAGE_BYTES);
    g_assert_cmpuint(image[wfirst * CHUNK], ==, 0x5a);
    g_assert_cmpuint(image[first * CHUNK - 1], ==, 0x5a);
    *write_lo = g->dma_addr + wfirst * CHUNK;
    *write_hi = g->dma_addr + first * CHUNK;
}

/*
 * While the destination fills: dump-guest-memory's thread (not the main
 * one) reads the last PC_DUMP_PAGES pages of the region there, whose
 * run's read the fill has not even started (it reads the region in
 * order, 8 runs of 1 MiB at a time, through a throttle).  With
 * x-dedup-nas-fault-read-ms long enough, each page is read from the disk
 * first, by its own read, which starts at once; with 1 ms, its read
 * (queued in the throttle) cannot place it in time, the page comes from
 * the source, and the read, landing later, must change nothing.
 */
static void postcopy_dump(Guest *g)
{
    g_autofree char *path = g_build_filename(tmpdir, "postcopy.dump", NULL);
    g_autofree char *uri = g_strdup_printf("file:%s", path);
    g_autoptr(GTimer) timer = g_timer_new();

    qtest_qmp_assert_success(g->dst, "{ 'execute': 'dump-guest-memory', "
                             "  'arguments': { 'paging': false, "
                             "                 'protocol': %s, "
                             "                 'begin': %" PRIu64 ", "
                             "                 'length': %u, "
                             "                 'detach': true } }", uri,
                             g->dma_addr + RACE_DMA_BYTES -
                             PC_DUMP_PAGES * CHUNK, PC_DUMP_PAGES * CHUNK);
    for (;;) {
        QDict *rsp = qtest_qmp_assert_success_ref(
            g->dst, "{ 'execute': 'query-dump' }");
        g_autofree char *status = g_strdup(qdict_get_str(rsp, "status"));

        qobject_unref(rsp);
        g_assert_cmpstr(status, !=, "failed");
        if (!strcmp(status, "completed")) {
            break;
        }
        g_assert_cmpfloat(g_timer_elapsed(timer, NULL), <, WAIT_SECONDS);
        g_usleep(20 * 1000);
    }
    unlink(path);
}

/*
 * The source of the postcopy tests: random pages to keep rewriting, and
 * the page cache of RACE_DMA_BYTES read from disk by DMA.
 */
static void postcopy_source(Guest *g, const char *trace)
{
    memset(g, 0, sizeof(*g));
    make_image();
    source_boot_args(&g->src, true, trace);
    g->rand_bytes = PC_RAND_BYTES;
    g->rand_addr = guest_buf(&g->src, PC_RAND_BYTES);
    write_random(g->src.qts, g->rand_addr, PC_RAND_BYTES, 0x5eed);
    g->dma_bytes = RACE_DMA_BYTES;
    g->dma_addr = guest_buf(&g->src, RACE_DMA_BYTES);
    dma_read_disk(&g->src, g->dma_addr, 0, RACE_DMA_BYTES);
}

/*
 * The destination (@g->dst) waits; blocks the source read are overwritten
 * behind its back; @keep gets the random pages, which the tests write back
 * over and over.  4 KiB may go while the guest is stopped, and the pages
 * rewritten between two syncs of the dirty bitmap take a second to send:
 * pre-copy cannot end.  Postcopy may be over before a query sees it: its
 * event tells (saw_postcopy()).
 */
static void postcopy_prepare(Guest *g, uint8_t *keep)
{
    migrate_incoming_qmp(g->dst, mig_uri, NULL,
                         "{ 'exit-on-error': false }");
    overwrite_blocks(RACE_BEFORE_FIRST, RACE_COUNT, RACE_STRIDE, 1);
    read_guest(g->src.qts, g->rand_addr, keep, PC_RAND_BYTES);
    migrate_set_parameter_int(g->src.qts, "downtime-limit", 1);
    migrate_set_parameter_int(g->src.qts, "max-bandwidth", 4 * MiB);
    migrate_set_capability(g->src.qts, "events", true);
}

/* Whether the MIGRATION events @who queued say postcopy-active. */
static bool saw_postcopy(QTestState *who)
{
    bool postcopy = false;
    QDict *ev;

    while ((ev = qtest_qmp_event_ref(who, "MIGRATION"))) {
        postcopy |= !strcmp(qdict_get_str(qdict_get_qdict(ev, "data"),
                                          "status"), "postcopy-active");
        qobject_unref(ev);
    }
    return postcopy;
}

/*
 * dedup-nas with postcopy-ram.  Postcopy is asked for at once; it waits
 * for the first pass, which sends the blocks the device read as
 * references (some overwritten behind the source's back before, which
 * must not verify).  The destination reads the shared disk through a
 * throttle node, slower than the first pass goes, so that references are
 * still unresolved when postcopy may start:
 *  - by default the destination fills them after the switch, and the
 *    source completes once the destination answered the lazy SYNC
 *    (optionally with the races of postcopy_race(), or a postcopy pause
 *    and recovery in the middle of the fill, after which every page not
 *    placed comes from the source);
 *  - with x-dedup-nas-postcopy-lazy=off, the source resolves them before
 *    postcopy starts (its gate's first SYNC finds pages still awaited,
 *    "resending", and must SYNC again).
 * The source keeps dirtying its random pages by writing back what they
 * hold, so that pre-copy does not converge, and a write that comes after
 * the guest stopped changes nothing.
 */
static void test_postcopy(const void *opaque)
{
    const PostcopyCase *pc = opaque;
    g_autofree uint8_t *keep = g_malloc(PC_RAND_BYTES);
    g_autofree char *log = g_build_filename(tmpdir, "postcopy-src.log", NULL);
    g_autofree char *dlog = g_build_filename(tmpdir, "postcopy-dst.log",
                                             NULL);
    g_autofree char *trace = g_strdup_printf(
        "-trace nas_dedup_postcopy_gate -trace nas_dedup_postcopy_filled "
        "-trace nas_dedup_save_undefer -trace nas_dedup_save_meet 2>%s", log);
    g_autofree char *drive = g_strdup_printf(
        "driver=throttle,throttle-group=tg0,file.driver=raw,"
        "file.file.driver=file,file.file.filename=%s", image_path);
    g_autofree char *throttle = g_strdup_printf(
        "-object throttle-group,id=tg0,x-bps-read=%u -incoming defer "
        "-trace nas_dedup_load_mismatch -trace 'nas_dedup_load_fill_*' "
        "2>%s", (unsigned)(pc->stall ? PC_STALL_BPS :
                           pc->dump_read_ms ? PC_SLOW_BPS :
                           pc->race || pc->recover ? PC_FILL_BPS :
                           PC_READ_BPS), dlog);
    g_autofree char *recover_uri = g_strdup_printf("%s-recover", mig_uri);
    g_autofree char *fault_read = pc->dump_read_ms ? g_strdup_printf(
        "-global migration.x-dedup-nas-fault-read-ms=%u", pc->dump_read_ms) :
        NULL;
    g_autofree char *dst_args = NULL;
    g_autofree char *status = NULL;
    g_autofree char *out = NULL;
    g_autofree char *dout = NULL;
    g_autoptr(GTimer) timer = g_timer_new();
    uint64_t write_lo = 0, write_hi = 0, met = 0, skipped = 0;
    unsigned writes = 0;
    DedupStats st;
    Guest g;

    if (!ufd_version_check(NULL)) {
        g_test_skip("userfaultfd is not available");
        return;
    }
    mig_globals = g_strdup_printf(
        "-global migration.x-postcopy-ram=on %s %s %s %s",
        pc->meet ? "" : "-global migration.x-dedup-nas-postcopy-meet=off",
        pc->preempt ? "-global migration.x-postcopy-preempt=on" : "",
        pc->resolve_first ? "-global migration.x-dedup-nas-postcopy-lazy=off"
                          : "",
        fault_read ? fault_read : "");
    postcopy_source(&g, trace);
    dst_args = machine_args_drive(true, false, drive, throttle);
    g.dst = qtest_init(dst_args);
    postcopy_prepare(&g, keep);
    migrate_qmp(g.src.qts, g.dst, mig_uri, NULL, "{}");
    qtest_qmp_assert_success(g.src.qts,
                             "{ 'execute': 'migrate-start-postcopy' }");
    for (;;) {
        QDict *rsp;

        qtest_bufwrite(g.src.qts, g.rand_addr, keep, PC_RAND_BYTES);
        writes++;
        rsp = migrate_query(g.src.qts);
        g_free(status);
        status = g_strdup(qdict_get_str(rsp, "status"));
        qobject_unref(rsp);
        if (strcmp(status, "active") && strcmp(status, "setup") &&
            strcmp(status, "device")) {
            break;
        }
        g_assert_cmpfloat(g_timer_elapsed(timer, NULL), <, WAIT_SECONDS);
    }
    g_test_message("%s after %u rewrites of %u KiB", status, writes,
                   (unsigned)(PC_RAND_BYTES / KiB));

    if (pc->race || pc->recover || pc->dump_read_ms) {
        /* The fill takes seconds: the destination listens by now. */
        wait_for_migration_status(g.dst, "postcopy-active",
                                  (const char * []) { "failed", "completed",
                                                      NULL });
    }
    if (pc->race) {
        postcopy_race(&g, &write_lo, &write_hi);
    }
    if (pc->dump_read_ms) {
        postcopy_dump(&g);
    }
    if (pc->recover) {
        /* As a network failure in the middle of the fill would. */
        migrate_pause(g.src.qts);
        wait_for_migration_status(g.dst, "postcopy-paused",
                                  (const char * []) { "failed", "active",
                                                      "completed", NULL });
        /* (Not out-of-band: the destination's main loop is not stuck.) */
        qtest_qmp_assert_success(g.dst, "{ 'execute': 'migrate-recover', "
                                 "  'arguments': { 'uri': %s } }",
                                 recover_uri);
        wait_for_migration_status(g.src.qts, "postcopy-paused",
                                  (const char * []) { "failed", "active",
                                                      "completed", NULL });
        migrate_qmp(g.src.qts, g.dst, recover_uri, NULL,
                    "{ 'resume': true }");
    }

    wait_for_migration_complete(g.src.qts);
    wait_for_migration_complete(g.dst);
    /* The events of the migration came before the last answer. */
    g_assert(saw_postcopy(g.src.qts));
    read_stats(g.src.qts, g.dst, true, &st);
    g_test_message("postcopy-fill-pages %" PRIu64 " postcopy-fill-faults %"
                   PRIu64 " postcopy-fill-fault-reads %" PRIu64,
                   st.fill_pages, st.fill_faults, st.fill_fault_reads);
    assert_ram_equal(g.src.qts, g.dst);
    /* The destination holds what the device read, not the new blocks. */
    assert_ram_holds_disk(g.dst, g.dma_addr, 0, RACE_DMA_BLOCKS, NULL);

    /* References went; each was verified, or asked again and resent. */
    g_assert_cmpuint(st.ref_pages, >=, RACE_DMA_BLOCKS * 95 / 100);
    g_assert_cmpuint(st.ref_pages, <=, RACE_DMA_BLOCKS);
    g_assert_cmpuint(st.read_errors, ==, 0);
    g_assert_cmpuint(st.fill_pages, <=, st.verified_pages);
    g_assert(g_file_get_contents(log, &out, NULL, NULL));
    g_test_message("source: %s", out);
    g_assert(g_file_get_contents(dlog, &dout, NULL, NULL));
    if (!pc->resolve_first) {
        fill_end_counts(dout, &met, &skipped);
        g_test_message("%" PRIu64 " pages came from the source before the "
                       "fill, %" PRIu64 " reads skipped", met, skipped);
        /* The statistic tells what the trace does. */
        g_assert_cmpuint(st.fill_met, ==, met);
    }
    if (pc->meet) {
        /*
         * The link (no max-postcopy-bandwidth) is much faster than the
         * reads: the source sent most of the pages still to fill, from
         * the far end, and the migration ended without waiting for the
         * reads left with nothing to place.
         */
        g_assert(strstr(out, "nas_dedup_save_meet "));
        g_assert(!strstr(out, "; 0 pages to fill sent in full"));
        g_assert_cmpuint(met, >, 0);
        if (pc->stall) {
            /*
             * The reads in flight at the switch never ended: the source
             * sent every page still to fill, and the destination answered
             * without waiting for them.
             */
            g_assert_cmpuint(st.fill_pages, ==, 0);
        }
    } else if (!pc->recover) {
        /* (After a recovery, the source sends every page not placed.) */
        g_assert(!strstr(out, "nas_dedup_save_meet "));
        g_assert_cmpuint(met, ==, 0);
    }
    if (pc->resolve_first) {
        /* The gate waited for pages asked again, then let postcopy go. */
        g_assert(strstr(out, "-> resending"));
        g_assert(strstr(out, "final-wanted -> done"));
        g_assert_cmpuint(st.fill_pages, ==, 0);
    } else {
        g_assert(strstr(out, "lazy-wanted -> done"));
        g_assert(strstr(out, "nas_dedup_postcopy_filled"));
        g_assert(!strstr(out, "resending"));
        /* The first pass left the random pages for postcopy. */
        g_assert(strstr(out, "nas_dedup_save_undefer"));
        g_assert(!strstr(out, " 0 pages left for postcopy"));
        /*
         * ... and sent others in full on the link the references left
         * (3/4 of each 100 ms window of max-bandwidth: as the region of
         * random pages takes more than one window to scan, some).
         */
        g_assert(strstr(out, " sent in full on the spare link"));
        g_assert(!strstr(out, "; 0 sent in full on the spare link"));
    }
    if (pc->recover) {
        /*
         * What the destination had not placed when postcopy paused came
         * from the source after recovery: fewer pages verified than sent.
         */
        g_assert(strstr(out, "recovered: 1"));
        g_assert_cmpuint(st.verified_pages + st.mismatches, <,
                         st.ref_pages);
        g_assert_cmpuint(st.resend_requests, <=,
                         st.mismatches + st.fill_faults);
    } else {
        g_assert_cmpuint(st.verified_pages + st.mismatches + st.fill_faults +
                         met, ==, st.ref_pages);
        g_assert_cmpuint(st.resend_requests, ==,
                         st.mismatches + st.fill_faults);
        g_assert_cmpuint(st.resent_pages, ==, st.resend_requests);
        /* Each overwritten block was read and did not verify, or met. */
        g_assert_cmpuint(st.mismatches + met, >=,
                         RACE_COUNT - (RACE_DMA_BLOCKS - st.ref_pages));
    }
    if (!pc->resolve_first && !pc->recover && !pc->meet) {
        /* Some pages were still unresolved at the switch, and filled. */
        g_assert_cmpuint(st.fill_pages, >, 0);
    }
    if (!pc->resolve_first) {
        /* At the end, every page with a reference was placed. */
        g_assert(strstr(dout, "nas_dedup_load_fill_listen"));
        g_assert(strstr(dout, " never placed 0"));
        g_assert(!strstr(dout, "were never placed"));
    }
    if (pc->race) {
        unsigned dst_mismatches = count_mismatches(dlog, write_lo, write_hi);

        g_test_message("%u of the %u blocks the destination wrote did not "
                       "verify", dst_mismatches, PC_DST_WRITES);
        g_assert_cmpuint(st.fill_faults, >=, 1);
        g_assert_cmpuint(st.fill_faults, <=, PC_FAULT_PAGES);
        g_assert_cmpuint(dst_mismatches, >, 0);
        /* The main thread's faults never wait for a read (the main loop). */
        g_assert_cmpuint(st.fill_fault_reads, ==, 0);
        g_assert(!strstr(dout, "nas_dedup_load_fill_urgent "));
        g_assert_cmpuint(st.mismatches, <=, RACE_COUNT + PC_DST_WRITES);
    } else if (!pc->recover) {
        g_assert_cmpuint(st.mismatches, <=, RACE_COUNT);
    }
    if (pc->dump_read_ms > 1) {
        /*
         * Its faults waited for the disk, never for the source (no fault
         * of the main thread in this case), and reads of their own
         * placed pages.
         */
        g_assert_cmpuint(st.fill_fault_reads, >=, 1);
        g_assert_cmpuint(st.fill_fault_reads, <=, PC_DUMP_PAGES);
        g_assert_cmpuint(st.fill_faults, ==, 0);
        g_assert(strstr(dout, "nas_dedup_load_fill_urgent "));
        g_assert(strstr(dout, " read after "));
        g_assert(!strstr(dout, " timeout after "));
    } else if (pc->dump_read_ms) {
        /*
         * The reads came too late: the pages came from the source, and
         * the reads, when they landed, placed nothing.
         */
        g_assert_cmpuint(st.fill_faults, >=, 1);
        g_assert_cmpuint(st.fill_fault_reads, ==, 0);
        g_assert(strstr(dout, " timeout after "));
        g_assert(strstr(dout, " late after "));
        g_assert(!strstr(dout, " read after "));
    }
    g_free((char *)mig_globals);
    mig_globals = "";
    guest_teardown(&g);
    unlink(recover_uri + strlen("unix:"));
    unlink(log);
    unlink(dlog);
}

/*
 * A snapshot has no destination to read the disks: savevm must send every
 * page in full, even with dedup-nas on and the page cache indexed.
 */
static void test_savevm(void)
{
    g_autofree char *qcow = g_build_filename(tmpdir, "overlay.qcow2", NULL);
    g_autofree char *args = NULL;
    g_autofree char *out = NULL;
    g_autoptr(GError) gerr = NULL;
    const char *qemu_img = getenv("QTEST_QEMU_IMG");
    const char *argv[] = {
        qemu_img, "create", "-q", "-f", "qcow2", "-F", "raw",
        "-b", image_path, qcow, NULL
    };
    AHCIQState *ahci;
    Source src;
    uint64_t buf;
    int status;

    if (!qemu_img) {
        g_test_skip("QTEST_QEMU_IMG not set");
        return;
    }
    make_image();
    g_assert(g_spawn_sync(NULL, (char **)argv, NULL, G_SPAWN_DEFAULT, NULL,
                          NULL, NULL, NULL, &status, &gerr));
    g_assert(g_spawn_check_exit_status(status, &gerr));

    /* The source, with the overlay (snapshots need qcow2) as its disk. */
    args = g_strdup_printf("-M q35 -m %" PRIu64 "M -nodefaults "
                           "-drive if=none,id=drive0,file=%s,format=qcow2 "
                           "-device ide-hd,drive=drive0,bus=ide.0,id=disk0 "
                           "-global migration.x-return-path=on "
                           "-global migration.x-dedup-nas=on",
                           (uint64_t)(RAM_BYTES / MiB), qcow);
    ahci = g_new0(AHCIQState, 1);
    ahci->parent = pc_boot("%s", args);
    ahci->dev = get_ahci_device(ahci->parent->qts, &ahci->fingerprint);
    ahci_pci_enable(ahci);
    ahci_hba_enable(ahci);
    src.ahci = ahci;
    src.qts = ahci->parent->qts;
    src.port = ahci_port_select(ahci);
    ahci_port_clear(ahci, src.port);

    buf = guest_buf(&src, 4 * MiB);
    dma_read_disk(&src, buf, 0, 4 * MiB);

    out = qtest_hmp(src.qts, "savevm s1");
    g_test_message("savevm: '%s'", out);
    g_assert_cmpstr(out, ==, "");
    g_free(out);

    /* Lose the page cache, then get it back from the snapshot. */
    write_random(src.qts, buf, 4 * MiB, 0xbad);
    out = qtest_hmp(src.qts, "loadvm s1");
    g_test_message("loadvm: '%s'", out);
    g_assert_cmpstr(out, ==, "");
    assert_ram_holds_disk(src.qts, buf, 0, 4 * MiB / CHUNK, NULL);

    source_shutdown(&src);
    unlink(qcow);
    unlink(image_path);
}

/* Setting capability @cap to @state fails with an error saying @expect. */
static void assert_cap_fails(QTestState *qts, const char *cap, bool state,
                             const char *expect)
{
    QDict *err = qtest_qmp_assert_failure_ref(
        qts, "{ 'execute': 'migrate-set-capabilities',"
        "   'arguments': { 'capabilities': ["
        "       { 'capability': %s, 'state': %i } ] } }", cap, state);
    const char *desc = qdict_get_str(err, "desc");

    g_test_message("%s=%d: %s", cap, state, desc);
    g_assert(strstr(desc, expect));
    qobject_unref(err);
}

static bool cap_state(QTestState *qts, const char *cap)
{
    QDict *rsp = qtest_qmp(qts, "{ 'execute': 'query-migrate-capabilities' }");
    QList *list = qdict_get_qlist(rsp, "return");
    QListEntry *e;
    bool found = false, state = false;

    QLIST_FOREACH_ENTRY(list, e) {
        QDict *d = qobject_to(QDict, qlist_entry_obj(e));

        if (!strcmp(qdict_get_str(d, "capability"), cap)) {
            found = true;
            state = qdict_get_bool(d, "state");
        }
    }
    g_assert(found);
    qobject_unref(rsp);
    return state;
}

static void test_caps(void)
{
    QTestState *qts = qtest_init("-M q35 -m 128M -nodefaults");
    QDict *err, *rsp;

    /*
     * dedup-nas needs return-path when it migrates, not before: libvirt
     * turns return-path on for each migration and every capability it
     * knows off after one, with dedup-nas on from -global.
     */
    migrate_set_capability(qts, "dedup-nas", true);
    g_assert(cap_state(qts, "dedup-nas"));
    err = qtest_qmp_assert_failure_ref(
        qts, "{ 'execute': 'migrate',"
        "   'arguments': { 'uri': 'unix:/nonexistent/nas-dedup' } }");
    g_test_message("migrate without return-path: %s",
                   qdict_get_str(err, "desc"));
    g_assert(strstr(qdict_get_str(err, "desc"),
                    "requires capability 'return-path'"));
    qobject_unref(err);
    migrate_set_capability(qts, "return-path", true);
    migrate_set_capability(qts, "return-path", false);
    g_assert(cap_state(qts, "dedup-nas"));
    migrate_set_capability(qts, "return-path", true);
    /* Pages sent in full go through the multifd channels. */
    migrate_set_capability(qts, "multifd", true);
    g_assert(cap_state(qts, "multifd"));
    migrate_set_capability(qts, "multifd", false);
    /* References are resolved before postcopy starts (/nas-dedup/postcopy). */
    migrate_set_capability(qts, "postcopy-ram", true);
    migrate_set_capability(qts, "postcopy-preempt", true);
    g_assert(cap_state(qts, "postcopy-preempt"));
    migrate_set_capability(qts, "postcopy-preempt", false);
    migrate_set_capability(qts, "postcopy-ram", false);
    assert_cap_fails(qts, "xbzrle", true, "not compatible with 'xbzrle'");
    g_assert(cap_state(qts, "dedup-nas"));
    g_assert(cap_state(qts, "return-path"));
    g_assert(!cap_state(qts, "multifd"));

    /* The other order: xbzrle first. */
    migrate_set_capability(qts, "dedup-nas", false);
    migrate_set_capability(qts, "xbzrle", true);
    assert_cap_fails(qts, "dedup-nas", true, "not compatible with 'xbzrle'");
    migrate_set_capability(qts, "xbzrle", false);
    migrate_set_capability(qts, "postcopy-ram", true);
    migrate_set_capability(qts, "dedup-nas", true);
    g_assert(cap_state(qts, "postcopy-ram"));
    migrate_set_capability(qts, "postcopy-ram", false);

    /* The index size is 0 (auto) or within bounds. */
    err = qtest_qmp_assert_failure_ref(
        qts, "{ 'execute': 'migrate-set-parameters',"
        "   'arguments': { 'dedup-nas-index-size': 1 } }");
    g_assert(strstr(qdict_get_str(err, "desc"), "dedup-nas-index-size"));
    qobject_unref(err);
    migrate_set_parameter_int(qts, "dedup-nas-index-size", 0);

    /* Fetch connections: 1 by default, up to 16. */
    rsp = qtest_qmp_assert_success_ref(
        qts, "{ 'execute': 'query-migrate-parameters' }");
    g_assert_cmpint(qdict_get_int(rsp, "dedup-nas-fetch-connections"), ==, 1);
    qobject_unref(rsp);
    for (int bad = 0; bad <= 17; bad += 17) {
        err = qtest_qmp_assert_failure_ref(
            qts, "{ 'execute': 'migrate-set-parameters',"
            "   'arguments': { 'dedup-nas-fetch-connections': %d } }", bad);
        g_test_message("fetch-connections %d: %s", bad,
                       qdict_get_str(err, "desc"));
        g_assert(strstr(qdict_get_str(err, "desc"),
                        "dedup-nas-fetch-connections"));
        qobject_unref(err);
    }
    /* Checks that it reads back. */
    migrate_set_parameter_int(qts, "dedup-nas-fetch-connections", 16);

    qtest_quit(qts);
}

/*
 * Collision: XXH3 adds, for each 8-byte lane d of a 64-byte stripe with
 * secret word k, lo32(d ^ k) * hi32(d ^ k) to one accumulator and d to its
 * neighbour.  Lane 0 of stripes 0 and 1 (secret words at 0 and 8): with
 * lo32(d ^ k) = 0 the product is 0 whatever the high half, so moving
 * 2^32 * c from one lane to the other keeps both sums: two different
 * blocks, one XXH3-128 under the published secret (tests/unit/
 * test-nas-dedup-hash.c checks the construction against libxxhash).  A
 * guest can put one on disk and the other in RAM.
 */
static const uint8_t xxh3_ksecret_head[16] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe,
    0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
};
#define COLL_BLOCK 100

static void make_collision(uint8_t *a, uint8_t *b)
{
    uint64_t k0 = ldq_le_p(xxh3_ksecret_head);
    uint64_t k1 = ldq_le_p(xxh3_ksecret_head + 8);
    uint64_t v0 = (0x1234567ull << 32) | (uint32_t)k0;
    uint64_t v1 = (0x7654321ull << 32) | (uint32_t)k1;
    uint64_t delta = 0x1000ull << 32;

    fill_block(a, COLL_BLOCK, 7);
    stq_le_p(a, v0);
    stq_le_p(a + 64, v1);
    memcpy(b, a, CHUNK);
    stq_le_p(b, v0 + delta);
    stq_le_p(b + 64, v1 - delta);
}

static void test_collision(void)
{
    uint8_t a[CHUNK], b[CHUNK], got[CHUNK];
    DedupStats st;
    uint64_t pa, pb;
    Guest g;
    int fd;

    make_collision(a, b);
    g_assert(memcmp(a, b, CHUNK));
    guest_setup(&g, true, 0, 1 * MiB);
    /* Block A on the disk, read into the page cache by the device ... */
    fd = open(image_path, O_WRONLY);
    g_assert(fd >= 0);
    g_assert_cmpint(pwrite(fd, a, CHUNK, COLL_BLOCK * CHUNK), ==, CHUNK);
    close(fd);
    pa = guest_buf(&g.src, CHUNK);
    dma_read_disk(&g.src, pa, COLL_BLOCK * CHUNK, CHUNK);
    /* ... and page B in RAM, written by the guest. */
    pb = guest_buf(&g.src, CHUNK);
    qtest_bufwrite(g.src.qts, pb, b, CHUNK);

    migrate_and_check(&g, true, &st);
    read_guest(g.dst, pa, got, CHUNK);
    g_assert(!memcmp(got, a, CHUNK));
    read_guest(g.dst, pb, got, CHUNK);
    g_assert(!memcmp(got, b, CHUNK));
    g_assert_cmpuint(st.mismatches, ==, 0);
    guest_teardown(&g);
}

/*** A proxy between source and destination, or a fake destination ***/

#define MIG_RP_MSG_DEDUP_RESEND     8
#define MIG_RP_MSG_DEDUP_SYNC_ACK   9
#define MIG_RP_MSG_DEDUP_PROGRESS   10
#define INJECT_AFTER                (64 * KiB)

typedef enum ProxyMode {
    /*
     * No destination: drain the stream, and send @inject on the return path
     * once the source has sent INJECT_AFTER bytes (set up by then)
     */
    PROXY_FAKE_DEST,
    PROXY_HOLD_ACKS,    /* forward, but never a DEDUP_SYNC_ACK */
    /*
     * Forward, and cut the connection once the source sent @cut_after bytes
     * (0: once the first DEDUP_SYNC_ACK went back to it)
     */
    PROXY_CUT,
    /*
     * Swap the return-path numbers the SETUP record declares, and swap them
     * back on the way back
     */
    PROXY_SWAP_MSGS,
    /*
     * Forward the stream, but close the return path: the destination's
     * messages cannot be sent
     */
    PROXY_NO_RP,
    /*
     * Rewrite the first REFS record as @mutation says (the stream is held
     * until it has passed)
     */
    PROXY_MUTATE,
    /*
     * Forward, but from the first DEDUP_RESEND on, hold every return-path
     * message, in order, until @release is set
     */
    PROXY_HOLD_RP,
} ProxyMode;

typedef struct Mutation Mutation;

/*
 * The start of the SETUP record: type 4, version 6, RESEND as 8,
 * SYNC_ACK as 9, PROGRESS as 10, a 384-byte key.
 */
static const uint8_t setup_sig[10] = { 4, 6, 0, 8, 0, 9, 0, 10, 1, 128 };

typedef struct Proxy {
    ProxyMode mode;
    const Mutation *mutation;
    GByteArray *held_stream;    /* PROXY_MUTATE, until it has mutated */
    bool mutated;
    unsigned mutated_npages;    /* the run of the REFS record mutated */
    const uint8_t *inject;
    size_t inject_len;
    char *path;             /* the source migrates to unix:@path */
    char *dst_path;         /* the destination listens there */
    int lfd;
    int quit[2];
    GThread *thread;
    uint64_t cut_after;
    bool cut;
    bool swapped;           /* the SETUP record was rewritten */
    uint8_t held[sizeof(setup_sig) - 1];
    size_t nheld;
    unsigned acks_held;
    unsigned acks_passed;
    GByteArray *held_rp;        /* PROXY_HOLD_RP */
    unsigned resends_held;      /* qatomic_*() access */
    bool release;               /* qatomic_*() access */
    /* Return-path message being parsed (destination to source). */
    uint8_t msg[4 + 65536];
    size_t msg_len;
    int s, d;               /* to the source, to the destination (or -1) */
} Proxy;

static bool write_all(int fd, const void *buf, size_t len)
{
    const uint8_t *p = buf;

    while (len) {
        /* A peer that went away is an error here, not a signal. */
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return false;
        }
        p += n;
        len -= n;
    }
    return true;
}

static bool proxy_rp(Proxy *px, int s, const uint8_t *buf, size_t len);
static bool proxy_release_rp(Proxy *px, int s);

/* PROXY_HOLD_RP: once @release is set, forward what was held. */
static bool proxy_check_release(Proxy *px)
{
    return px->mode != PROXY_HOLD_RP || !qatomic_read(&px->release) ||
           proxy_release_rp(px, px->s);
}

/*
 * Read what the return path has, if anything (its two readers, the loop
 * and write_dst(), may both have been told it had something), and handle
 * it.  False if it closed or failed.
 */
static bool proxy_read_rp(Proxy *px)
{
    uint8_t buf[4096];
    ssize_t n = recv(px->d, buf, sizeof(buf), MSG_DONTWAIT);

    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        return true;
    }
    return n > 0 && proxy_rp(px, px->s, buf, n);
}

/*
 * Write to the destination, and meanwhile read its return path: the
 * destination may wait to write a return-path message before it reads
 * more of the stream (the channel is full, its incoming coroutine
 * yields), and a proxy that waited for it without reading would wait for
 * good.
 */
static bool write_dst(Proxy *px, const void *buf, size_t len)
{
    const uint8_t *p = buf;

    while (len) {
        struct pollfd pf[2] = {
            { .fd = px->d, .events = POLLOUT |
                                     (px->mode == PROXY_NO_RP ? 0 : POLLIN) },
            { .fd = px->quit[0], .events = POLLIN } };
        ssize_t n = send(px->d, p, len, MSG_NOSIGNAL | MSG_DONTWAIT);

        if (n > 0) {
            p += n;
            len -= n;
            continue;
        }
        if (n == 0 || (errno != EINTR && errno != EAGAIN &&
                       errno != EWOULDBLOCK)) {
            return false;
        }
        /* (PROXY_HOLD_RP: look at @release every 10 ms, as the loop.) */
        if (poll(pf, 2, px->mode == PROXY_HOLD_RP ? 10 : -1) < 0 ?
            errno != EINTR : pf[1].revents != 0) {
            return false;
        }
        if (!proxy_check_release(px) ||
            ((pf[0].revents & POLLIN) && !proxy_read_rp(px))) {
            return false;
        }
    }
    return true;
}

static bool proxy_mutate(Proxy *px, const uint8_t *buf, size_t len);

/*
 * Stream to the destination: in PROXY_SWAP_MSGS mode, until the SETUP
 * record is found, hold back the last bytes of each read in case the
 * record straddles two (the source waits for no answer before it).
 */
static bool proxy_stream(Proxy *px, const uint8_t *buf, size_t len)
{
    g_autofree uint8_t *all = NULL;
    size_t n, i;

    if (px->mode == PROXY_MUTATE && !px->mutated) {
        return proxy_mutate(px, buf, len);
    }
    if (px->mode != PROXY_SWAP_MSGS || px->swapped) {
        return write_dst(px, buf, len);
    }
    n = px->nheld + len;
    all = g_malloc(n);
    memcpy(all, px->held, px->nheld);
    memcpy(all + px->nheld, buf, len);
    for (i = 0; i + sizeof(setup_sig) <= n; i++) {
        if (!memcmp(all + i, setup_sig, sizeof(setup_sig))) {
            all[i + 3] = MIG_RP_MSG_DEDUP_SYNC_ACK;
            all[i + 5] = MIG_RP_MSG_DEDUP_RESEND;
            px->swapped = true;
            px->nheld = 0;
            return write_dst(px, all, n);
        }
    }
    px->nheld = MIN(n, sizeof(px->held));
    memcpy(px->held, all + n - px->nheld, px->nheld);
    return write_dst(px, all, n - px->nheld);
}

/* PROXY_HOLD_RP: forward to @s the messages held, if any. */
static bool proxy_release_rp(Proxy *px, int s)
{
    if (px->held_rp->len &&
        !write_all(s, px->held_rp->data, px->held_rp->len)) {
        return false;
    }
    g_byte_array_set_size(px->held_rp, 0);
    return true;
}

/* Forward whole return-path messages, except those the mode holds. */
static bool proxy_rp(Proxy *px, int s, const uint8_t *buf, size_t len)
{
    size_t i;

    for (i = 0; i < len; i++) {
        size_t want;

        px->msg[px->msg_len++] = buf[i];
        if (px->msg_len < 4) {
            continue;
        }
        want = 4 + lduw_be_p(px->msg + 2);
        if (px->msg_len < want) {
            continue;
        }
        if (px->mode == PROXY_SWAP_MSGS) {
            uint16_t type = lduw_be_p(px->msg);

            if (type == MIG_RP_MSG_DEDUP_RESEND ||
                type == MIG_RP_MSG_DEDUP_SYNC_ACK) {
                stw_be_p(px->msg, type ^ MIG_RP_MSG_DEDUP_RESEND ^
                                  MIG_RP_MSG_DEDUP_SYNC_ACK);
            }
        }
        if (px->mode == PROXY_HOLD_RP) {
            if (!qatomic_read(&px->release) &&
                (px->held_rp->len ||
                 lduw_be_p(px->msg) == MIG_RP_MSG_DEDUP_RESEND)) {
                g_byte_array_append(px->held_rp, px->msg, px->msg_len);
                if (lduw_be_p(px->msg) == MIG_RP_MSG_DEDUP_RESEND) {
                    qatomic_inc(&px->resends_held);
                }
                px->msg_len = 0;
                continue;
            }
            if (!proxy_release_rp(px, s)) {
                return false;
            }
        }
        if (px->mode == PROXY_HOLD_ACKS &&
            lduw_be_p(px->msg) == MIG_RP_MSG_DEDUP_SYNC_ACK) {
            px->acks_held++;
        } else if (!write_all(s, px->msg, px->msg_len)) {
            return false;
        } else if (lduw_be_p(px->msg) == MIG_RP_MSG_DEDUP_SYNC_ACK) {
            px->acks_passed++;
            if (px->mode == PROXY_CUT && !px->cut_after) {
                return false;   /* cut right after it */
            }
        }
        px->msg_len = 0;
    }
    return true;
}

static gpointer proxy_thread(gpointer opaque)
{
    Proxy *px = opaque;
    struct pollfd pf[3] = { { .fd = px->lfd, .events = POLLIN },
                            { .fd = px->quit[0], .events = POLLIN } };
    uint8_t *buf = g_malloc(64 * KiB);
    uint64_t from_src = 0;
    bool injected = false;
    int s = -1, d = -1;

    if (poll(pf, 2, -1) < 0 || !(pf[0].revents & POLLIN)) {
        goto out;
    }
    s = accept(px->lfd, NULL, NULL);
    g_assert(s >= 0);
    if (px->mode != PROXY_FAKE_DEST) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };

        d = socket(AF_UNIX, SOCK_STREAM, 0);
        g_assert(d >= 0);
        pstrcpy(sa.sun_path, sizeof(sa.sun_path), px->dst_path);
        g_assert_cmpint(connect(d, (struct sockaddr *)&sa, sizeof(sa)), ==,
                        0);
        if (px->mode == PROXY_NO_RP) {
            /* The destination's writes fail from now on (EPIPE). */
            g_assert_cmpint(shutdown(d, SHUT_RD), ==, 0);
        }
    }
    px->s = s;
    px->d = d;
    for (;;) {
        struct pollfd p[3] = { { .fd = s, .events = POLLIN },
                               { .fd = px->quit[0], .events = POLLIN },
                               { .fd = d, .events = px->mode == PROXY_NO_RP ?
                                                    0 : POLLIN } };
        ssize_t n;

        /* (PROXY_HOLD_RP: look at @release every 10 ms.) */
        if (poll(p, d >= 0 ? 3 : 2, px->mode == PROXY_HOLD_RP ? 10 : -1) < 0 ||
            p[1].revents) {
            break;
        }
        if (!proxy_check_release(px)) {
            break;
        }
        if (p[0].revents) {
            n = read(s, buf, 64 * KiB);
            if (n <= 0 || (d >= 0 && !proxy_stream(px, buf, n))) {
                break;
            }
            from_src += n;
            if (px->mode == PROXY_CUT && px->cut_after &&
                from_src >= px->cut_after) {
                break;
            }
            if (px->mode == PROXY_FAKE_DEST && !injected &&
                from_src >= INJECT_AFTER) {
                g_assert(write_all(s, px->inject, px->inject_len));
                injected = true;
            }
        }
        if (d >= 0 && p[2].revents && !proxy_read_rp(px)) {
            break;
        }
    }
out:
    px->cut = true;
    if (s >= 0) {
        shutdown(s, SHUT_RDWR);
        close(s);
    }
    if (d >= 0) {
        shutdown(d, SHUT_RDWR);
        close(d);
    }
    g_free(buf);
    return NULL;
}

/*
 * A unix socket listening at @path (@backlog connections), and a pipe to
 * tell the thread that serves it to quit (server_stop()).
 */
static int listen_unix(const char *path, int backlog, int quit[2])
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    int fd;

    unlink(path);
    fd = socket(AF_UNIX, SOCK_STREAM, 0);
    g_assert(fd >= 0);
    pstrcpy(sa.sun_path, sizeof(sa.sun_path), path);
    g_assert_cmpint(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), ==, 0);
    g_assert_cmpint(listen(fd, backlog), ==, 0);
    g_assert_cmpint(pipe(quit), ==, 0);
    return fd;
}

/* Tell the thread serving @lfd to quit, join it, close and unlink. */
static void server_stop(GThread *thread, int lfd, int quit[2],
                        const char *path)
{
    g_assert_cmpint(write(quit[1], "q", 1), ==, 1);
    g_thread_join(thread);
    close(quit[0]);
    close(quit[1]);
    close(lfd);
    unlink(path);
}

static Proxy *proxy_start(ProxyMode mode, const uint8_t *inject,
                          size_t inject_len)
{
    Proxy *px = g_new0(Proxy, 1);

    px->mode = mode;
    px->inject = inject;
    px->inject_len = inject_len;
    px->held_rp = g_byte_array_new();
    px->path = g_build_filename(tmpdir, "proxysocket", NULL);
    px->dst_path = g_strdup(mig_uri + strlen("unix:"));
    px->lfd = listen_unix(px->path, 1, px->quit);
    px->thread = g_thread_new("nas-dedup-proxy", proxy_thread, px);
    return px;
}

static char *proxy_uri(Proxy *px)
{
    return g_strdup_printf("unix:%s", px->path);
}

static void proxy_stop(Proxy *px)
{
    server_stop(px->thread, px->lfd, px->quit, px->path);
    if (px->held_stream) {
        g_byte_array_unref(px->held_stream);
    }
    g_byte_array_unref(px->held_rp);
    g_free(px->path);
    g_free(px->dst_path);
    g_free(px);
}

/*** A RESEND that crosses a newer copy ***/

static uint64_t dst_stat(QTestState *qts, const char *key)
{
    QDict *rsp = migrate_query(qts);
    QDict *dn = qdict_get_qdict(rsp, "dedup-nas-incoming");
    uint64_t v;

    g_assert(dn);
    v = stat_u64(dn, key);
    qobject_unref(rsp);
    return v;
}

/*
 * A DEDUP_RESEND that crosses a newer copy of its pages: the destination
 * asks for the pages whose blocks were overwritten behind the source's
 * back; before the request arrives, the source's guest rewrites them and
 * pre-copy sends them in full (a proxy holds the return path from the
 * first RESEND until the destination listens in postcopy).  The source
 * must take the request for stale: those pages must not go once more in
 * postcopy (the destination would skip them, as they are placed, but
 * the link would carry them for nothing).
 */
static void test_postcopy_stale_resend(void)
{
    g_autofree uint8_t *keep = g_malloc(PC_RAND_BYTES);
    g_autofree char *log = g_build_filename(tmpdir, "stale-src.log", NULL);
    g_autofree char *dlog = g_build_filename(tmpdir, "stale-dst.log", NULL);
    g_autofree char *trace = g_strdup_printf(
        "-trace nas_dedup_rp_resend_stale 2>%s", log);
    g_autofree char *dst_extra = g_strdup_printf("-incoming defer 2>%s",
                                                 dlog);
    g_autofree char *uri = NULL;
    g_autofree char *out = NULL;
    g_autofree char *dout = NULL;
    g_autoptr(GTimer) timer = g_timer_new();
    uint64_t syncs, k;
    unsigned held;
    DedupStats st;
    Proxy *px;
    Guest g;

    if (!ufd_version_check(NULL)) {
        g_test_skip("userfaultfd is not available");
        return;
    }
    mig_globals = "-global migration.x-postcopy-ram=on "
                  "-global migration.x-dedup-nas-postcopy-meet=off";
    postcopy_source(&g, trace);
    g.dst = dest_boot(true, dst_extra);
    postcopy_prepare(&g, keep);
    px = proxy_start(PROXY_HOLD_RP, NULL, 0);
    uri = proxy_uri(px);
    migrate_qmp(g.src.qts, NULL, uri, NULL, "{}");

    /* The references went, and the destination asks for some again. */
    while (!qatomic_read(&px->resends_held) ||
           dst_stat(g.dst, "mismatches") < RACE_COUNT / 2) {
        qtest_bufwrite(g.src.qts, g.rand_addr, keep, PC_RAND_BYTES);
        g_assert_cmpfloat(g_timer_elapsed(timer, NULL), <, WAIT_SECONDS);
    }
    /*
     * The guest rewrites half of those pages; pre-copy sends them in full.
     * The requests for the other half are not stale: dropped, those pages
     * would never come.
     */
    for (k = 0; k < RACE_COUNT; k += 2) {
        write_random(g.src.qts, g.dma_addr +
                     (RACE_BEFORE_FIRST + k * RACE_STRIDE) * CHUNK, CHUNK,
                     0x57a1e + k);
    }
    syncs = get_migration_pass(g.src.qts);
    while (get_migration_pass(g.src.qts) < syncs + 2) {
        qtest_bufwrite(g.src.qts, g.rand_addr, keep, PC_RAND_BYTES);
        g_assert_cmpfloat(g_timer_elapsed(timer, NULL), <, WAIT_SECONDS);
    }
    held = qatomic_read(&px->resends_held);
    qtest_qmp_assert_success(g.src.qts,
                             "{ 'execute': 'migrate-start-postcopy' }");
    /* The discard went, the destination listens: let the requests go. */
    wait_for_migration_status(g.dst, "postcopy-active",
                              (const char * []) { "failed", "completed",
                                                  NULL });
    qatomic_set(&px->release, true);
    wait_for_migration_complete(g.src.qts);
    wait_for_migration_complete(g.dst);
    g_test_message("%u RESEND held before the rewrite, %u in all", held,
                   qatomic_read(&px->resends_held));
    g_assert(saw_postcopy(g.src.qts));
    read_stats(g.src.qts, g.dst, true, &st);
    assert_ram_equal(g.src.qts, g.dst);
    g_assert_cmpuint(st.mismatches, >=, RACE_COUNT / 2);
    g_assert(g_file_get_contents(log, &out, NULL, NULL));
    g_assert(g_file_get_contents(dlog, &dout, NULL, NULL));
    g_test_message("source: %s", out);
    g_test_message("destination: %s", dout);
    /* The race happened, and the source saw the requests were stale. */
    g_assert(strstr(out, "nas_dedup_rp_resend_stale"));
    /*
     * (Before the source dropped them: "uffd_copy_page() failed ...
     * errno=17" here, and postcopy paused.)
     */
    g_assert(!strstr(dout, "uffd_copy_page"));
    g_assert(!strstr(dout, "paused"));

    mig_globals = "";
    proxy_stop(px);
    guest_teardown(&g);
    unlink(log);
    unlink(dlog);
}

/*** Malformed and unresolvable streams, made by mutating a real one ***/

/*
 * The proxy finds the source's first REFS record in the real stream and
 * rewrites it (or the DRIVE record before it) on its way to the
 * destination: the product has no test knob for this.  It parses only
 * what can come between the SETUP record and that REFS record in the
 * RAM section of a pre-copy stream (page headers, zero and normal pages,
 * dedup-nas records); the RAM flags and record layouts below are the
 * stream format (docs/devel/nas-dedup.rst).
 */
#define RAM_SAVE_FLAG_ZERO          0x002
#define RAM_SAVE_FLAG_MEM_SIZE      0x004
#define RAM_SAVE_FLAG_PAGE          0x008
#define RAM_SAVE_FLAG_CONTINUE      0x020
#define RAM_SAVE_FLAG_DEDUP         0x100
#define RAM_SAVE_FLAG_MULTIFD_FLUSH 0x200
#define REC_DRIVE                   1
#define REC_REFS                    2
#define REC_SYNC                    3
#define SETUP_KEY_BYTES             384
#define REFS_FIXED                  13  /* type, drive, npages, offset */
#define REFS_HASH_BYTES             16
/* A resizable RAMBlock of q35 (used 128 KiB, at most 2 MiB). */
#define ACPI_BLOCK                  "/rom@etc/acpi/tables"
#define ACPI_BLOCK_MAX              (2 * MiB)
#define NAS_REFS_MAX                256 /* pages in a REFS record */

typedef enum MutationKind {
    MUT_OUTSIDE_RAM,        /* the run ends past the end of its RAMBlock */
    MUT_UNDEFINED_DRIVE,    /* a drive number no DRIVE record defined */
    MUT_DRIVE_RANGE,        /* a drive number out of range */
    MUT_BAD_TYPE,           /* an unknown record type */
    MUT_ZERO_RUN,           /* a run of 0 pages */
    MUT_ABSURD_RUN,         /* a run longer than allowed */
    MUT_UNALIGNED,          /* a disk offset not a multiple of 512 */
    MUT_SECTOR_SHIFT,       /* the disk offset one sector further */
    MUT_TRUNCATED,          /* the stream ends inside the record */
    /* The record is fine, the next one has an unknown type */
    MUT_BAD_NEXT,
    /* The DRIVE record names a drive the destination lacks */
    MUT_UNKNOWN_DRIVE,
    MUT_PAST_DISK_END,      /* a disk range past the end of the drive */
    MUT_BAD_HASH,           /* two hashes of the run changed */
    /*
     * A reference into a resizable RAMBlock, the block grown by a later
     * MEM_SIZE, then a reference past its old end
     */
    MUT_GROWN_BLOCK,
} MutationKind;

struct Mutation {
    const char *name;           /* first, for add_cases() */
    MutationKind kind;
    /*
     * In the destination's error; NULL: the migration completes, RAM
     * identical
     */
    const char *expect;
};

static const Mutation malformed_cases[] = {
    { "outside-ram", MUT_OUTSIDE_RAM, "outside RAMBlock" },
    { "undefined-drive", MUT_UNDEFINED_DRIVE, "never defined" },
    { "drive-range", MUT_DRIVE_RANGE, "drive number 65535 out of range" },
    { "bad-type", MUT_BAD_TYPE, "unknown record type 127" },
    { "zero-run", MUT_ZERO_RUN, "run of 0 pages" },
    { "absurd-run", MUT_ABSURD_RUN, "REFS record: run of" },
    { "unaligned", MUT_UNALIGNED, "bad disk offset" },
    { "truncated", MUT_TRUNCATED, "truncated REFS record" },
};

/*
 * Not protocol errors: references this destination cannot resolve, or
 * whose blocks do not verify.  Their pages are asked again and the
 * migration completes with RAM identical.
 */
static const Mutation unresolvable_cases[] = {
    { "unknown-drive", MUT_UNKNOWN_DRIVE, NULL },
    { "past-disk-end", MUT_PAST_DISK_END, NULL },
    { "bad-hash", MUT_BAD_HASH, NULL },
    { "grown-block", MUT_GROWN_BLOCK, NULL },
    { "sector-shift", MUT_SECTOR_SHIFT, NULL },
};

/* Where the first REFS record is, in the stream held so far. */
typedef struct RefsItem {
    size_t start;               /* its page header */
    size_t rec;                 /* its type byte */
    size_t end;
    uint64_t header;            /* page address | flags */
    uint16_t npages;
    size_t drive_id;            /* the id in the DRIVE record before it */
    uint8_t drive_id_len;
} RefsItem;

/* True once the first REFS record after the SETUP record is all in @b. */
static bool find_first_refs(const uint8_t *b, size_t len, RefsItem *it)
{
    const uint8_t *sig = memmem(b, len, setup_sig, sizeof(setup_sig));
    size_t p;

    if (!sig) {
        return false;
    }
    memset(it, 0, sizeof(*it));
    p = sig - b + sizeof(setup_sig) + SETUP_KEY_BYTES;
    for (;;) {
        size_t start = p;
        uint64_t header, flags;

        if (p + 9 > len) {
            return false;
        }
        header = ldq_be_p(b + p);
        flags = header & (CHUNK - 1);
        p += 8;
        if ((flags & (RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE |
                      RAM_SAVE_FLAG_DEDUP)) &&
            !(flags & RAM_SAVE_FLAG_CONTINUE)) {
            p += 1 + b[p];                  /* the RAMBlock's id */
        }
        switch (flags & ~RAM_SAVE_FLAG_CONTINUE) {
        case RAM_SAVE_FLAG_ZERO:
            p += 1;
            continue;
        case RAM_SAVE_FLAG_PAGE:
            p += CHUNK;
            continue;
        case RAM_SAVE_FLAG_MULTIFD_FLUSH:
            continue;
        case RAM_SAVE_FLAG_DEDUP:
            break;
        default:
            g_error("unexpected RAM item 0x%" PRIx64 " before REFS", flags);
        }
        if (p + REFS_FIXED > len) {
            return false;
        }
        switch (b[p]) {
        case REC_DRIVE:     /* type, be16 drive, u8 len, id, be64 size */
            it->drive_id = p + 4;
            it->drive_id_len = b[p + 3];
            p += 4 + b[p + 3] + 8;
            continue;
        case REC_SYNC:      /* type, be32 seq, u8 final */
            p += 6;
            continue;
        case REC_REFS:
            it->start = start;
            it->rec = p;
            it->header = header;
            it->npages = lduw_be_p(b + p + 3);
            it->end = p + REFS_FIXED + it->npages * REFS_HASH_BYTES;
            return it->end <= len;
        default:
            g_error("unexpected record type %u before REFS", b[p]);
        }
    }
}

static void put_be64(GByteArray *out, uint64_t v)
{
    uint8_t b[8];

    stq_be_p(b, v);
    g_byte_array_append(out, b, 8);
}

/* A page header that names its RAMBlock (no RAM_SAVE_FLAG_CONTINUE). */
static void put_header(GByteArray *out, uint64_t addr, uint64_t flags,
                       const char *block)
{
    uint8_t len = strlen(block);

    put_be64(out, addr | flags);
    g_byte_array_append(out, &len, 1);
    g_byte_array_append(out, (const uint8_t *)block, len);
}

/*
 * MUT_GROWN_BLOCK: one reference into the ACPI tables' block (the
 * destination starts its bookkeeping for that block at its length then), a
 * MEM_SIZE item that grows the block to its maximum, the run again at the
 * end of the grown block, then the original REFS record, with a header
 * naming its own block again.
 */
static void grow_block(GByteArray *out, const uint8_t *b, const RefsItem *it)
{
    const uint8_t *rec = b + it->rec;
    size_t len = it->end - it->rec;
    g_autofree uint8_t *one = g_memdup2(rec, REFS_FIXED + REFS_HASH_BYTES);

    stw_be_p(one + 3, 1);
    put_header(out, 0, RAM_SAVE_FLAG_DEDUP, ACPI_BLOCK);
    g_byte_array_append(out, one, REFS_FIXED + REFS_HASH_BYTES);

    /* MEM_SIZE: the total, then each block's id and length. */
    put_header(out, ACPI_BLOCK_MAX, RAM_SAVE_FLAG_MEM_SIZE, ACPI_BLOCK);
    put_be64(out, ACPI_BLOCK_MAX);

    put_header(out, ACPI_BLOCK_MAX - it->npages * CHUNK, RAM_SAVE_FLAG_DEDUP,
               ACPI_BLOCK);
    g_byte_array_append(out, rec, len);

    put_header(out, it->header & ~(uint64_t)(CHUNK - 1), RAM_SAVE_FLAG_DEDUP,
               "pc.ram");
    g_byte_array_append(out, rec, len);
}

/*
 * Write to @out the stream held in @in with the first REFS record (@it)
 * mutated.  Returns false if the stream is to end there (MUT_TRUNCATED).
 */
static bool mutate(const Mutation *m, GByteArray *in, const RefsItem *it,
                   GByteArray *out)
{
    uint8_t *rec = in->data + it->rec;
    size_t i;

    switch (m->kind) {
    case MUT_OUTSIDE_RAM:
        /* The last page of pc.ram, and the run goes on past it. */
        g_assert_cmpuint(it->npages, >=, 2);
        stq_be_p(in->data + it->start,
                 (RAM_BYTES - CHUNK) | (it->header & (CHUNK - 1)));
        break;
    case MUT_UNDEFINED_DRIVE:
        stw_be_p(rec + 1, 1);
        break;
    case MUT_DRIVE_RANGE:
        stw_be_p(rec + 1, 0xffff);
        break;
    case MUT_BAD_TYPE:
        rec[0] = 0x7f;
        break;
    case MUT_ZERO_RUN:
        stw_be_p(rec + 3, 0);
        break;
    case MUT_ABSURD_RUN:
        rec[3] = 0xff;
        break;
    case MUT_UNALIGNED:
        stq_be_p(rec + 5, ldq_be_p(rec + 5) + 100);
        break;
    case MUT_SECTOR_SHIFT:
        stq_be_p(rec + 5, ldq_be_p(rec + 5) + 512);
        break;
    case MUT_TRUNCATED:
        g_byte_array_append(out, in->data, it->rec + REFS_FIXED +
                            it->npages * REFS_HASH_BYTES / 2);
        return false;
    case MUT_UNKNOWN_DRIVE:
        g_assert(it->drive_id_len);
        for (i = 0; i < it->drive_id_len; i++) {
            in->data[it->drive_id + i] = 'z';
        }
        break;
    case MUT_PAST_DISK_END:
        stq_be_p(rec + 5, IMAGE_BYTES * 1024);
        break;
    case MUT_BAD_HASH:
        g_assert_cmpuint(it->npages, >=, 8);
        rec[REFS_FIXED + 3 * REFS_HASH_BYTES] ^= 1;        /* hi of 3 */
        rec[REFS_FIXED + 7 * REFS_HASH_BYTES + 15] ^= 0x80; /* lo of 7 */
        break;
    case MUT_BAD_NEXT: {
        uint8_t bad[9];

        stq_be_p(bad, (it->header & ~(uint64_t)(CHUNK - 1)) |
                      RAM_SAVE_FLAG_DEDUP | RAM_SAVE_FLAG_CONTINUE);
        bad[8] = 0x7f;
        g_byte_array_append(out, in->data, it->end);
        g_byte_array_append(out, bad, sizeof(bad));
        g_byte_array_append(out, in->data + it->end, in->len - it->end);
        return true;
    }
    case MUT_GROWN_BLOCK:
        g_byte_array_append(out, in->data, it->start);
        grow_block(out, in->data, it);
        g_byte_array_append(out, in->data + it->end, in->len - it->end);
        return true;
    }
    g_byte_array_append(out, in->data, in->len);
    return true;
}

/* PROXY_MUTATE: hold the stream until the first REFS record is in. */
static bool proxy_mutate(Proxy *px, const uint8_t *buf, size_t len)
{
    g_autoptr(GByteArray) out = g_byte_array_new();
    RefsItem it;
    bool go_on;

    if (!px->held_stream) {
        px->held_stream = g_byte_array_new();
    }
    g_byte_array_append(px->held_stream, buf, len);
    if (!find_first_refs(px->held_stream->data, px->held_stream->len, &it)) {
        return true;
    }
    go_on = mutate(px->mutation, px->held_stream, &it, out);
    px->mutated_npages = it.npages;
    px->mutated = true;
    g_byte_array_set_size(px->held_stream, 0);
    return write_dst(px, out->data, out->len) && go_on;
}

/* The source, whose migration failed, runs on as if nothing happened. */
static void assert_source_survived(QTestState *src)
{
    QDict *rsp = wait_for_status(src, "failed", NULL);

    g_test_message("source: %s", qdict_haskey(rsp, "error-desc") ?
                   qdict_get_str(rsp, "error-desc") : "(no error-desc)");
    qobject_unref(rsp);
    assert_running(src);
}

static Proxy *proxy_start_mutate(const Mutation *m, Guest *g)
{
    Proxy *px = proxy_start(PROXY_MUTATE, NULL, 0);
    g_autofree char *uri = proxy_uri(px);

    px->mutation = m;
    migrate_ensure_converge(g->src.qts);
    migrate_qmp(g->src.qts, NULL, uri, NULL, "{}");
    return px;
}

/*
 * A malformed record fails the incoming migration with a message naming
 * it; the source runs on.
 */
static void test_malformed(const void *opaque)
{
    const Mutation *m = opaque;
    const char *desc;
    QDict *rsp;
    Proxy *px;
    Guest g;

    guest_setup(&g, true, 0, 1 * MiB);
    px = proxy_start_mutate(m, &g);

    rsp = wait_for_status(g.dst, "failed", NULL);
    g_assert(px->mutated);
    g_assert(qdict_haskey(rsp, "error-desc"));
    desc = qdict_get_str(rsp, "error-desc");
    g_test_message("%s: destination: %s", m->name, desc);
    g_assert(strstr(desc, "dedup-nas"));
    g_assert(strstr(desc, m->expect));
    qobject_unref(rsp);

    assert_source_survived(g.src.qts);
    proxy_stop(px);
    guest_teardown(&g);
}

/* The used length of RAMBlock @name, from "info ramblock". */
static uint64_t ramblock_used(QTestState *qts, const char *name)
{
    g_autofree char *out = qtest_hmp(qts, "info ramblock");
    g_auto(GStrv) lines = g_strsplit(out, "\n", 0);
    uint64_t used = 0;
    size_t i;

    for (i = 0; lines[i]; i++) {
        g_auto(GStrv) f = g_strsplit_set(g_strstrip(lines[i]), " ", 0);
        g_autoptr(GPtrArray) cols = g_ptr_array_new();
        size_t j;

        for (j = 0; f[j]; j++) {
            if (*f[j]) {
                g_ptr_array_add(cols, f[j]);
            }
        }
        /* Block Name, PSize (2 words), Offset, Used, Total, HVA, RO */
        if (cols->len >= 5 && !strcmp(cols->pdata[0], name)) {
            g_assert(!qemu_strtou64(cols->pdata[4], NULL, 16, &used));
        }
    }
    g_assert(used);
    return used;
}

static void test_unresolvable(const void *opaque)
{
    const Mutation *m = opaque;
    uint64_t acpi_used;
    DedupStats st;
    Proxy *px;
    Guest g;

    guest_setup(&g, true, 0, 1 * MiB);
    acpi_used = ramblock_used(g.dst, ACPI_BLOCK);
    g_assert_cmpuint(acpi_used, <, ACPI_BLOCK_MAX - NAS_REFS_MAX * CHUNK);
    px = proxy_start_mutate(m, &g);
    wait_for_migration_complete(g.src.qts);
    wait_for_migration_complete(g.dst);
    g_assert(px->mutated);
    read_stats(g.src.qts, g.dst, true, &st);
    assert_ram_equal(g.src.qts, g.dst);
    assert_ram_holds_disk(g.dst, g.dma_addr, 0, 1 * MiB / CHUNK, NULL);
    g_assert_cmpuint(st.read_errors, ==, 0);
    g_assert_cmpuint(st.resent_pages, ==, st.resend_requests);

    switch (m->kind) {
    case MUT_BAD_HASH:
        /* The two pages whose hash changed do not verify: sent again. */
        g_assert_cmpuint(st.mismatches, ==, 2);
        g_assert_cmpuint(st.resend_requests, ==, 2);
        break;
    case MUT_SECTOR_SHIFT:
        /*
         * A well-formed reference one sector off: read, and none of its
         * pages verifies (each block holds its own number), all sent
         * again.
         */
        g_assert_cmpuint(st.mismatches, ==, px->mutated_npages);
        g_assert_cmpuint(st.resend_requests, >=, px->mutated_npages);
        break;
    case MUT_GROWN_BLOCK:
        /*
         * Nothing to ask again: the destination grew the block as the
         * stream said and resolved the references past its old end too
         * (with per-page state sized at first use, they were written past
         * its end).  fw_cfg's post_load then sized the block as the
         * source has it.
         */
        g_assert_cmpuint(ramblock_used(g.dst, ACPI_BLOCK), ==, acpi_used);
        g_assert_cmpuint(st.mismatches, ==, 0);
        g_assert_cmpuint(st.resend_requests, ==, 0);
        g_assert_cmpuint(st.verified_pages, ==,
                         st.ref_pages + 1 + px->mutated_npages);
        break;
    default:
        /* The mutated run was asked again, not fetched. */
        g_assert_cmpuint(st.mismatches, ==, 0);
        g_assert_cmpuint(st.resend_requests, >=, px->mutated_npages);
        break;
    }
    proxy_stop(px);
    guest_teardown(&g);
}

/*
 * The load fails while the destination's read for the references before
 * the bad record is still in flight, and guest RAM is no longer the load's
 * to write: when that read completes, the pages stay as they were (zero),
 * not the disk's blocks.  The destination's drive is under a throttle
 * filter node, which its own BlockBackends read through too; a read of
 * 1 MiB through it first (qemu-io) fills the throttle bucket, so that the
 * fetch waits about 4 s.  The trace of the fetch's completion must come
 * after the failure, or the test proves nothing.
 *
 * With @opaque non-NULL, the read also fails when it completes (blkdebug
 * under the throttle): a failed read, too, must find the load gone and
 * count nothing (it once took the freed load's state for its own and
 * counted a read error).  Either way the destination's fetch-time stops
 * when the load does.
 */
#define SLOW_READ_BPS   (256 * KiB)

static void test_fetch_after_failure(const void *opaque)
{
    bool read_error = opaque != NULL;
    static const Mutation m = { "bad-next", MUT_BAD_NEXT,
                                "unknown record type 127" };
    g_autofree char *log = g_build_filename(tmpdir, "dst.stderr", NULL);
    g_autofree char *drive = NULL;
    g_autofree char *extra = NULL;
    g_autofree char *args = NULL;
    g_autofree uint8_t *buf = g_malloc(1 * MiB);
    g_autoptr(GTimer) timer = g_timer_new();
    g_autofree char *out = NULL;
    const char *desc;
    QDict *rsp;
    Proxy *px;
    Guest g;

    source_with_dma(&g, 1 * MiB);
    if (read_error) {
        drive = g_strdup_printf("driver=throttle,throttle-group=tg0,"
                                "file.driver=raw,file.file.driver=blkdebug,"
                                "file.file.inject-error.0.event=read_aio,"
                                "file.file.inject-error.0.errno=5,"
                                "file.file.image.driver=file,"
                                "file.file.image.filename=%s", image_path);
    } else {
        drive = g_strdup_printf("driver=throttle,throttle-group=tg0,"
                                "file.driver=raw,file.file.driver=file,"
                                "file.file.filename=%s", image_path);
    }
    extra = g_strdup_printf("-object throttle-group,id=tg0,x-bps-read=%u "
                            "-trace nas_dedup_fetch_done "
                            "-incoming defer 2>%s",
                            (unsigned)SLOW_READ_BPS, log);
    args = machine_args_drive(true, false, drive, extra);
    /*
     * glibc fills freed memory with this byte: a use of the freed load's
     * state crashes the destination instead of reading stale values.
     */
    g_setenv("MALLOC_PERTURB_", "165", true);
    g.dst = qtest_init(args);
    g_unsetenv("MALLOC_PERTURB_");
    g_free(qtest_hmp(g.dst, "qemu-io drive0 \"read 0 1M\""));
    migrate_incoming_qmp(g.dst, mig_uri, NULL, "{ 'exit-on-error': false }");
    px = proxy_start_mutate(&m, &g);

    rsp = wait_for_status(g.dst, "failed", NULL);
    desc = qdict_get_str(rsp, "error-desc");
    g_test_message("destination: %s", desc);
    g_assert(strstr(desc, m.expect));
    qobject_unref(rsp);
    g_assert(g_file_get_contents(log, &out, NULL, NULL));
    g_assert(!strstr(out, "nas_dedup_fetch_done"));
    g_clear_pointer(&out, g_free);
    assert_source_survived(g.src.qts);

    /* The read completes, after the failure... */
    for (;;) {
        g_assert(g_file_get_contents(log, &out, NULL, NULL));
        if (strstr(out, "nas_dedup_fetch_done")) {
            break;
        }
        g_clear_pointer(&out, g_free);
        g_assert_cmpfloat(g_timer_elapsed(timer, NULL), <, WAIT_SECONDS);
        g_usleep(50 * 1000);
    }
    g_test_message("destination: %s", out);
    g_assert(!read_error || strstr(out, "ret -5"));
    /* ... and leaves guest RAM alone, and counts nothing. */
    read_guest(g.dst, g.dma_addr, buf, g.dma_bytes);
    g_assert(buffer_is_zero(buf, g.dma_bytes));
    g_assert_cmpuint(dst_stat(g.dst, "read-errors"), ==, 0);
    g_assert_cmpuint(dst_stat(g.dst, "verified-pages"), ==, 0);
    {
        uint64_t t = dst_stat(g.dst, "fetch-time");

        g_usleep(300 * 1000);
        g_assert_cmpuint(dst_stat(g.dst, "fetch-time"), ==, t);
    }
    proxy_stop(px);
    guest_teardown(&g);
    unlink(log);
}

/*
 * With -incoming on its command line (exit-on-error), the destination
 * exits with status 1 and the reason on stderr.
 */
static void test_malformed_exit(void)
{
    const Mutation *m = &malformed_cases[0];
    g_autofree char *log = g_build_filename(tmpdir, "dst.stderr", NULL);
    g_autofree char *extra = g_strdup_printf("-incoming %s 2>%s", mig_uri,
                                             log);
    g_autofree char *err = NULL;
    Proxy *px;
    Guest g = { 0 };

    make_image();
    source_boot(&g.src, true);
    dma_read_disk(&g.src, guest_buf(&g.src, 1 * MiB), 0, 1 * MiB);
    g.dst = dest_boot(true, extra);

    px = proxy_start_mutate(m, &g);
    qtest_set_expected_status(g.dst, EXIT_FAILURE);
    qtest_wait_qemu(g.dst);
    assert_source_survived(g.src.qts);

    g_assert(g_file_get_contents(log, &err, NULL, NULL));
    g_test_message("destination stderr: %s", err);
    g_assert(strstr(err, "dedup-nas"));
    g_assert(strstr(err, m->expect));

    proxy_stop(px);
    qtest_quit(g.dst);
    source_shutdown(&g.src);
    unlink(log);
    unlink(image_path);
}

/*
 * A destination that sends return-path messages the source must reject:
 * the migration fails with an error naming the message, the source runs
 * on, whether dedup-nas is on or not (libvirt turns return-path on for
 * every migration).
 */
typedef struct RpCase {
    const char *name;
    bool dedup;
    uint8_t msg[64];
    size_t len;
    const char *expect;
} RpCase;

static const RpCase rp_cases[] = {
    { "sync-ack-dedup-off", false,
      { 0, MIG_RP_MSG_DEDUP_SYNC_ACK, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0 }, 12,
      "unexpected DEDUP_SYNC_ACK" },
    { "resend-dedup-off", false,
      { 0, MIG_RP_MSG_DEDUP_RESEND, 0, 18, 1, 'x',
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1 }, 22,
      "unexpected DEDUP_RESEND" },
    { "sync-ack-never-sent", true,
      { 0, MIG_RP_MSG_DEDUP_SYNC_ACK, 0, 8, 0, 0, 0, 5, 0, 0, 0, 0 }, 12,
      "DEDUP_SYNC_ACK for SYNC 5" },
    { "resend-outside-ram", true,
      { 0, MIG_RP_MSG_DEDUP_RESEND, 0, 18, 1, 'x',
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1 }, 22,
      "outside guest RAM" },
    /* pc.ram 0x1000, as REFS record 0xfffffffe, which never went */
    { "resend-refs-never-sent", true,
      { 0, MIG_RP_MSG_DEDUP_RESEND, 0, 23, 6, 'p', 'c', '.', 'r', 'a', 'm',
        0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xfe }, 27,
      "REFS record 4294967294, but" },
    { "sync-ack-short", true,
      { 0, MIG_RP_MSG_DEDUP_SYNC_ACK, 0, 4, 0, 0, 0, 1 }, 8,
      "DEDUP_SYNC_ACK" },
    { "progress-dedup-off", false,
      { 0, MIG_RP_MSG_DEDUP_PROGRESS, 0, 24, [27] = 0 }, 28,
      "unexpected DEDUP_PROGRESS" },
    /* Two reports, the second with fewer bytes read than the first. */
    { "progress-backwards", true,
      { [1] = MIG_RP_MSG_DEDUP_PROGRESS, [3] = 24, [14] = 1, [27] = 1,
        [29] = MIG_RP_MSG_DEDUP_PROGRESS, [31] = 24, [47] = 1, [55] = 1 },
      56,
      "DEDUP_PROGRESS says 0 pages read, 1 bytes in 1 us, after 0, "
      "1099511627776 and 1" },
    { "progress-short", true,
      { 0, MIG_RP_MSG_DEDUP_PROGRESS, 0, 8, [11] = 0 }, 12,
      "DEDUP_PROGRESS" },
    { "garbled", true,
      { 0x7f, 0xff, 0, 4, 0xde, 0xad, 0xbe, 0xef }, 8,
      "invalid message" },
};

static void test_rp(const void *opaque)
{
    g_autoptr(GTimer) timer = NULL;
    const RpCase *c = opaque;
    Source src;
    Proxy *px;
    g_autofree char *uri = NULL;
    QDict *rsp;
    const char *desc;

    make_image();
    source_boot(&src, c->dedup);
    dma_read_disk(&src, guest_buf(&src, 1 * MiB), 0, 1 * MiB);
    px = proxy_start(PROXY_FAKE_DEST, c->msg, c->len);
    uri = proxy_uri(px);
    migrate_qmp(src.qts, NULL, uri, NULL, "{}");
    rsp = wait_for_status(src.qts, "failed", NULL);
    desc = qdict_haskey(rsp, "error-desc") ?
           qdict_get_str(rsp, "error-desc") : "";
    g_test_message("%s: source: %s", c->name, desc);
    g_assert(strstr(desc, c->expect));
    qobject_unref(rsp);
    /* The monitor answers at once. */
    timer = g_timer_new();
    assert_running(src.qts);
    g_assert_cmpfloat(g_timer_elapsed(timer, NULL), <, 1.0);
    proxy_stop(px);
    source_shutdown(&src);
    unlink(image_path);
}

/*
 * After a dedup-nas migration completed, the source migrates again,
 * without dedup-nas, to a destination that answers with DEDUP_SYNC_ACK:
 * that migration fails on it like any other without dedup-nas (the
 * completed one's "final SYNC sent", after which messages are ignored,
 * must not carry over).
 */
static void test_rp_after_completed(void)
{
    const RpCase *c = &rp_cases[0];     /* sync-ack-dedup-off */
    g_autoptr(GTimer) timer = g_timer_new();
    g_autofree char *uri = NULL;
    DedupStats st;
    g_autofree char *status = NULL;
    Proxy *px;
    Guest g;

    guest_setup(&g, true, 0, 1 * MiB);
    migrate_and_check(&g, true, &st);
    g_assert_cmpuint(st.ref_pages, >, 0);
    qtest_quit(g.dst);
    g.dst = NULL;

    /* The operator resumes the source (the destination went away). */
    qtest_qmp_assert_success(g.src.qts, "{ 'execute': 'cont' }");
    migrate_set_capability(g.src.qts, "dedup-nas", false);
    g_assert(!c->dedup);
    px = proxy_start(PROXY_FAKE_DEST, c->msg, c->len);
    uri = proxy_uri(px);
    migrate_qmp(g.src.qts, NULL, uri, NULL, "{}");
    while (g_timer_elapsed(timer, NULL) < 60) {
        QDict *rsp = migrate_query(g.src.qts);

        g_free(status);
        status = g_strdup(qdict_get_str(rsp, "status"));
        if (!strcmp(status, "failed")) {
            g_assert(strstr(qdict_get_try_str(rsp, "error-desc") ?: "",
                            c->expect));
            qobject_unref(rsp);
            break;
        }
        qobject_unref(rsp);
        g_usleep(100 * 1000);
    }
    g_test_message("second migration: %s after %.1f s", status,
                   g_timer_elapsed(timer, NULL));
    g_assert_cmpstr(status, ==, "failed");
    proxy_stop(px);
    source_shutdown(&g.src);
    unlink(image_path);
    unlink(mig_uri + strlen("unix:"));
}

/*
 * The destination answers on the return path with the message numbers
 * the source declared in its SETUP record, not with numbers of its own
 * build: a proxy swaps them in the SETUP record and swaps them back in
 * the answers, and the migration still verifies every reference.
 */
static void test_rp_numbering(void)
{
    g_autofree char *uri = NULL;
    DedupStats st;
    Proxy *px;
    Guest g;

    guest_setup(&g, true, 0, 4 * MiB);
    overwrite_blocks(1, 16, 4, 1);      /* some RESENDs too */
    px = proxy_start(PROXY_SWAP_MSGS, NULL, 0);
    uri = proxy_uri(px);
    migrate_ensure_converge(g.src.qts);
    migrate_qmp(g.src.qts, NULL, uri, NULL, "{}");
    wait_for_migration_complete(g.src.qts);
    wait_for_migration_complete(g.dst);
    g_assert(px->swapped);
    read_stats(g.src.qts, g.dst, true, &st);
    assert_ram_equal(g.src.qts, g.dst);
    g_assert_cmpuint(st.resend_requests, ==, 16);
    g_assert_cmpuint(st.resent_pages, ==, 16);
    g_assert_cmpuint(st.verified_pages + st.mismatches, ==, st.ref_pages);
    proxy_stop(px);
    guest_teardown(&g);
}

/*
 * The destination's answers to SYNC never reach the source (a stalled
 * NAS, a destination that hangs).  At switchover (@live false: the
 * downtime budget holds every reference, so the guest stops at once), the
 * stopped guest resumes after downtime-limit + dedup-nas-switchover-slack,
 * not minutes.  Before it (@live: the backlog exceeds the budget, so the
 * source asks a live SYNC first), the running source gives up after its
 * live-SYNC bound (30 s + the backlog at 8 MB/s) instead of waiting
 * forever.  Either way the source runs on, and the next migration
 * succeeds with RAM identical.
 */
#define BOUND_DOWNTIME_MS   300
#define BOUND_SLACK_MS      1000

static void test_sync_bound(bool live)
{
    g_autofree char *uri = NULL;
    g_autoptr(GTimer) timer = g_timer_new();
    DedupStats st;
    QDict *rsp;
    Proxy *px;
    Guest g;
    double secs;

    guest_setup(&g, true, 4 * MiB, 16 * MiB);
    migrate_ensure_converge(g.src.qts);
    migrate_set_parameter_int(g.src.qts, "downtime-limit", BOUND_DOWNTIME_MS);
    migrate_set_parameter_int(g.src.qts, "dedup-nas-switchover-slack",
                              BOUND_SLACK_MS);
    /*
     * The downtime budget is avail-switchover-bandwidth x downtime-limit:
     * 300 MB holds every page and reference; 1 MB does not.
     */
    migrate_set_parameter_int(g.src.qts, "avail-switchover-bandwidth",
                              live ? 1000 * 1000 * 1000 / 300
                                   : 1000ull * 1000 * 1000);
    px = proxy_start(PROXY_HOLD_ACKS, NULL, 0);
    uri = proxy_uri(px);
    migrate_qmp(g.src.qts, NULL, uri, NULL, "{}");
    rsp = wait_for_status(g.src.qts, "failed", NULL);
    secs = g_timer_elapsed(timer, NULL);
    g_test_message("source failed after %.1f s (%u SYNC_ACK held): %s", secs,
                   px->acks_held, qdict_get_try_str(rsp, "error-desc"));
    g_assert(strstr(qdict_get_try_str(rsp, "error-desc") ?: "",
                    live ? "did not answer SYNC 1"
                         : "dedup-nas-switchover-slack"));
    qobject_unref(rsp);
    g_assert_cmpuint(px->acks_held, >=, 1);
    /*
     * Not a timing test: the bounds are 1.3 s and 32 s, the old waits
     * 120 s and forever; a loaded machine gets plenty of margin.
     */
    g_assert_cmpfloat(secs, <, live ? 100 : 30);
    assert_running(g.src.qts);
    proxy_stop(px);

    /* A new destination; this time the answers get through. */
    qtest_quit(g.dst);
    unlink(mig_uri + strlen("unix:"));
    g.dst = dest_boot(true, "-incoming defer");
    migrate_incoming_qmp(g.dst, mig_uri, NULL, "{ 'exit-on-error': false }");
    migrate_set_parameter_int(g.src.qts, "downtime-limit", 30 * 1000);
    migrate_set_parameter_int(g.src.qts, "avail-switchover-bandwidth", 0);
    migrate_and_check(&g, true, &st);
    assert_ram_holds_disk(g.dst, g.dma_addr, 0, 16 * MiB / CHUNK, NULL);
    g_assert_cmpuint(st.verified_pages, ==, st.ref_pages);
    g_assert_cmpuint(st.ref_pages, >=, 16 * MiB / CHUNK * 95 / 100);
    guest_teardown(&g);
}

/*
 * A relay for every connection of a migration (the main channel with the
 * return path on it, and multifd's channels, told apart by their first
 * bytes): once @stall_after bytes went through the multifd channels, it
 * stops reading them, as a destination that stopped reading its multifd
 * sockets would.
 */
#define RELAY_MAX       8
#define MULTIFD_MAGIC   0x11223344U

typedef struct Relay {
    char *path;
    int lfd;
    int quit[2];
    GThread *thread;
    uint64_t stall_after;
    uint64_t multifd_bytes;
    bool stalled;
} Relay;

static int relay_connect(void)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    int d = socket(AF_UNIX, SOCK_STREAM, 0);

    g_assert(d >= 0);
    pstrcpy(sa.sun_path, sizeof(sa.sun_path), mig_uri + strlen("unix:"));
    g_assert_cmpint(connect(d, (struct sockaddr *)&sa, sizeof(sa)), ==, 0);
    return d;
}

static gpointer relay_thread(gpointer opaque)
{
    Relay *r = opaque;
    int src[RELAY_MAX], dst[RELAY_MAX];
    bool multifd[RELAY_MAX], known[RELAY_MAX];
    uint8_t *buf = g_malloc(64 * KiB);
    unsigned n = 0, i;

    /*
     * A connection that ends (either side) is closed on both sides; the
     * others go on.  The stalled multifd ones stay open and unread, as
     * behind a network partition, until relay_stop().
     */
    for (;;) {
        struct pollfd p[2 + 2 * RELAY_MAX] = {
            { .fd = r->lfd, .events = POLLIN },
            { .fd = r->quit[0], .events = POLLIN },
        };

        for (i = 0; i < n; i++) {
            p[2 + 2 * i].fd = src[i];
            p[2 + 2 * i].events = multifd[i] && r->stalled ? 0 : POLLIN;
            p[3 + 2 * i].fd = dst[i];
            p[3 + 2 * i].events = POLLIN;
        }
        if (poll(p, 2 + 2 * n, -1) < 0 || p[1].revents) {
            break;
        }
        if ((p[0].revents & POLLIN) && n < RELAY_MAX) {
            src[n] = accept(r->lfd, NULL, NULL);
            g_assert(src[n] >= 0);
            dst[n] = relay_connect();
            known[n] = multifd[n] = false;
            n++;
            continue;
        }
        for (i = 0; i < n; i++) {
            bool end = false;
            ssize_t k;

            if (src[i] < 0) {
                continue;
            }
            if (p[2 + 2 * i].revents) {
                k = read(src[i], buf, 64 * KiB);
                end = k <= 0;
                if (!end && !known[i]) {
                    known[i] = true;
                    multifd[i] = k >= 4 && ldl_be_p(buf) == MULTIFD_MAGIC;
                }
                end = end || !write_all(dst[i], buf, k);
                if (!end && multifd[i]) {
                    r->multifd_bytes += k;
                    if (r->multifd_bytes >= r->stall_after) {
                        r->stalled = true;
                    }
                }
            }
            if (!end && p[3 + 2 * i].revents) {
                k = read(dst[i], buf, 64 * KiB);
                end = k <= 0 || !write_all(src[i], buf, k);
            }
            if (end && !(multifd[i] && r->stalled)) {
                close(src[i]);
                close(dst[i]);
                /* Out of poll()'s way: an fd of -1 is ignored. */
                src[i] = dst[i] = -1;
            } else if (end) {
                close(dst[i]);
                dst[i] = -1;
            }
        }
    }
    for (i = 0; i < n; i++) {
        if (src[i] >= 0) {
            close(src[i]);
        }
        if (dst[i] >= 0) {
            close(dst[i]);
        }
    }
    g_free(buf);
    return NULL;
}

static Relay *relay_start(uint64_t stall_after)
{
    Relay *r = g_new0(Relay, 1);

    r->stall_after = stall_after;
    r->path = g_build_filename(tmpdir, "relaysocket", NULL);
    r->lfd = listen_unix(r->path, RELAY_MAX, r->quit);
    r->thread = g_thread_new("nas-dedup-relay", relay_thread, r);
    return r;
}

static void relay_stop(Relay *r)
{
    server_stop(r->thread, r->lfd, r->quit, r->path);
    g_free(r->path);
    g_free(r);
}

/*
 * With multifd, the bound on switchover holds too: the destination stops
 * reading its multifd sockets during the final pass (16 MiB of random
 * pages are left for it: the downtime budget takes everything at the
 * first check), the senders block, and the migration thread with them,
 * the guest stopped.  The watchdog must free it (the multifd channels
 * too, not only the main one) by downtime-limit + slack: the migration
 * fails, the source runs.  Not a timing test: 1.3 s against 30 s.  (When
 * the watchdog shut only the main channel and the return path, the source
 * stayed stopped for good: the relay keeps the multifd sockets open.)
 */
static void test_multifd_stall(void)
{
    g_autofree char *uri = NULL;
    g_autoptr(GTimer) timer = g_timer_new();
    QDict *rsp;
    Relay *r;
    Guest g;
    double secs;

    mig_globals = "-global migration.x-multifd=on "
                  "-global migration.multifd-channels=2 "
                  "-trace multifd_send_error -trace nas_dedup_rp_watchdog";
    guest_setup(&g, true, 16 * MiB, 4 * MiB);
    mig_globals = "";
    migrate_set_parameter_int(g.src.qts, "downtime-limit", BOUND_DOWNTIME_MS);
    migrate_set_parameter_int(g.src.qts, "dedup-nas-switchover-slack",
                              BOUND_SLACK_MS);
    migrate_set_parameter_int(g.src.qts, "max-bandwidth", 64 * KiB);
    migrate_set_parameter_int(g.src.qts, "avail-switchover-bandwidth",
                              1000ull * 1000 * 1000 * 1000);
    r = relay_start(1 * MiB);
    uri = g_strdup_printf("unix:%s", r->path);
    migrate_qmp(g.src.qts, NULL, uri, NULL, "{}");
    rsp = wait_for_status(g.src.qts, "failed", NULL);
    secs = g_timer_elapsed(timer, NULL);
    g_test_message("source failed after %.1f s (multifd stalled after "
                   "%" PRIu64 " bytes): %s", secs, r->multifd_bytes,
                   qdict_get_try_str(rsp, "error-desc"));
    g_assert(r->stalled);
    g_assert(strstr(qdict_get_try_str(rsp, "error-desc") ?: "",
                    "dedup-nas-switchover-slack"));
    qobject_unref(rsp);
    g_assert_cmpfloat(secs, <, 30);
    assert_running(g.src.qts);
    relay_stop(r);
    guest_teardown(&g);
}

static void test_switchover_bound(void)
{
    test_sync_bound(false);
}

static void test_live_sync_bound(void)
{
    test_sync_bound(true);
}

/*
 * iotune limits of the destination's guest drive do not slow the fetches:
 * at 4 KiB/s, 16 MiB of references would take more than an hour.
 */
static void test_throttled_dest(void)
{
    DedupStats st;
    Guest g;

    source_with_dma(&g, 16 * MiB);
    g.dst = dest_boot(true, "-incoming defer "
                      "-set drive.drive0.throttling.bps-total=4096");
    migrate_incoming_qmp(g.dst, mig_uri, NULL, "{ 'exit-on-error': false }");
    migrate_and_check(&g, true, &st);
    assert_ram_holds_disk(g.dst, g.dma_addr, 0, g.dma_bytes / CHUNK, NULL);
    g_assert_cmpuint(st.ref_pages, >=, g.dma_bytes / CHUNK * 95 / 100);
    g_assert_cmpuint(st.verified_pages, ==, st.ref_pages);
    guest_teardown(&g);
}

/*
 * Auto-converge compares the bytes the guest dirties with the bytes the
 * migration moves.  A page sent as a reference moves 4 KiB in a few bytes
 * of stream: counted by the wire alone, a guest that dirties pages of disk
 * content no faster than they are sent looked about 140 times too fast,
 * and with cpu-throttle-tailslow its second step went straight to
 * max-cpu-throttle.  Here the test rewrites the same disk content into
 * guest RAM (dirty, and a reference each time it is sent) all along the
 * migration, whose link is slow enough that it never runs out of pages to
 * send: the dirty rate is about what the migration moves, twice the
 * trigger threshold, so tailslow's second step is about half of the CPU
 * the guest still has.  The migration cannot converge (downtime-limit
 * 1 ms) as long as a dirty sync finds pages dirty; it is cancelled once
 * the throttle has stepped twice.  The rewrites come in 1 MiB writes
 * about 50 ms apart, and at 64 KiB/s (about 4000 references a second)
 * the migration sometimes caught up with them in such a gap and found
 * nothing dirty at a sync: it completed (2 runs in 11; traced, no page
 * was dirtied between its last three syncs).  At AC_BPS, half that, it
 * falls behind for good (0 runs in 20).
 */
#define AC_BYTES        (8 * MiB)
#define AC_INITIAL      20
#define AC_MAX          99
#define AC_BPS          (32 * KiB)

static void test_auto_converge(void)
{
    g_autofree uint8_t *disk = g_malloc(AC_BYTES);
    g_autoptr(GTimer) timer = g_timer_new();
    uint64_t steps[2] = { 0, 0 }, b, off;
    unsigned nsteps = 0, writes = 0;
    QDict *rsp;
    Guest g;

    guest_setup(&g, true, 0, AC_BYTES);
    for (b = 0; b < AC_BYTES / CHUNK; b++) {
        fill_block(disk + b * CHUNK, b, 0);
    }
    migrate_set_capability(g.src.qts, "auto-converge", true);
    migrate_set_parameter_bool(g.src.qts, "cpu-throttle-tailslow", true);
    migrate_set_parameter_int(g.src.qts, "cpu-throttle-initial", AC_INITIAL);
    migrate_set_parameter_int(g.src.qts, "cpu-throttle-increment", 90);
    migrate_set_parameter_int(g.src.qts, "max-cpu-throttle", AC_MAX);
    migrate_set_parameter_int(g.src.qts, "throttle-trigger-threshold", 50);
    migrate_set_parameter_int(g.src.qts, "downtime-limit", 1);
    migrate_set_parameter_int(g.src.qts, "max-bandwidth", AC_BPS);
    migrate_qmp(g.src.qts, g.dst, mig_uri, NULL, "{}");

    while (nsteps < 2) {
        uint64_t pct = 0;

        g_assert_cmpfloat(g_timer_elapsed(timer, NULL), <, WAIT_SECONDS);
        for (off = 0; off < AC_BYTES; off += MiB) {
            qtest_bufwrite(g.src.qts, g.dma_addr + off, disk + off, MiB);
        }
        writes++;
        rsp = migrate_query(g.src.qts);
        g_assert_cmpstr(qdict_get_str(rsp, "status"), ==, "active");
        if (qdict_haskey(rsp, "cpu-throttle-percentage")) {
            pct = qdict_get_int(rsp, "cpu-throttle-percentage");
        }
        qobject_unref(rsp);
        if (pct && (!nsteps || pct != steps[nsteps - 1])) {
            g_test_message("throttle step %u: %" PRIu64 " %% after %.1f s "
                           "(%u rewrites of the disk pages)", nsteps + 1,
                           pct, g_timer_elapsed(timer, NULL), writes);
            steps[nsteps++] = pct;
        }
    }
    qtest_qmp_assert_success(g.src.qts, "{ 'execute': 'migrate_cancel' }");
    qobject_unref(wait_for_status(g.src.qts, "cancelled", NULL));
    assert_running(g.src.qts);

    g_assert_cmpuint(steps[0], ==, AC_INITIAL);
    /*
     * Dirty bytes twice the threshold give tailslow's ideal share of half
     * the CPU left: 20 + 40.  Dirtied at half or twice the rate moved (the
     * period boundaries), 20 + 20 to 20 + 60; by the wire alone, 99.
     */
    g_assert_cmpuint(steps[1], >, AC_INITIAL);
    g_assert_cmpuint(steps[1], <=, AC_INITIAL + 60);
    guest_teardown(&g);
}

/*
 * The link/NAS split.  A fixed dedup-nas-ref-share sends that share of
 * the pages found on disk as references, in runs.  With the automatic
 * share (the default), a destination whose reads of the shared storage
 * are far slower than the link (a throttle node under its drive, which
 * its reads go through) gets part of the pages in full: the source sends
 * a first guess of references until it hears how fast the reads are, then
 * no more than keep the destination a bounded time of reading behind, or,
 * with the guest stopped, within the downtime limit.  RAM identical either
 * way.
 */
#define SPLIT_DMA_BYTES     (32 * MiB)
#define SPLIT_NAS_BPS       (8 * MiB)

static void test_ref_share_fixed(void)
{
    uint64_t pages = SPLIT_DMA_BYTES / CHUNK;
    DedupStats st;
    Guest g;

    guest_setup(&g, true, 0, SPLIT_DMA_BYTES);
    migrate_set_parameter_int(g.src.qts, "dedup-nas-ref-share", 50);
    migrate_and_check(&g, true, &st);
    assert_ram_holds_disk(g.dst, g.dma_addr, 0, pages, NULL);
    g_test_message("fixed 50 %%: %" PRIu64 " of %" PRIu64 " pages as "
                   "references", st.ref_pages, pages);
    g_assert_cmpuint(st.ref_share, ==, 50);
    /* Up to a run of references (NAS_DEDUP_SPLIT_SPAN) either way. */
    g_assert_cmpuint(st.ref_pages, >=, pages / 2 - 2 * 256);
    g_assert_cmpuint(st.ref_pages, <=, pages / 2 + 256);
    g_assert_cmpuint(st.verified_pages, ==, st.ref_pages);
    guest_teardown(&g);
}

static void test_ref_share_slow_nas(const void *opaque)
{
    bool multifd = opaque;
    uint64_t pages = SPLIT_DMA_BYTES / CHUNK;
    g_autofree char *drive = NULL;
    g_autofree char *extra = NULL;
    g_autofree char *args = NULL;
    DedupStats st;
    Guest g;

    if (multifd) {
        mig_globals = "-global migration.x-multifd=on "
                      "-global migration.multifd-channels=2";
    }
    source_with_dma(&g, SPLIT_DMA_BYTES);
    drive = g_strdup_printf("driver=throttle,throttle-group=tg0,"
                            "file.driver=raw,file.file.driver=file,"
                            "file.file.filename=%s", image_path);
    extra = g_strdup_printf("-object throttle-group,id=tg0,"
                            "x-bps-total=%u -incoming defer",
                            (unsigned)SPLIT_NAS_BPS);
    args = machine_args_drive(true, false, drive, extra);
    g.dst = qtest_init(args);
    mig_globals = "";
    migrate_incoming_qmp(g.dst, mig_uri, NULL, "{ 'exit-on-error': false }");
    /*
     * A link four times as fast as the storage, and a downtime limit that
     * keeps the migration live long enough (about a second) for the share
     * to follow.
     */
    migrate_ensure_converge(g.src.qts);
    migrate_set_parameter_int(g.src.qts, "max-bandwidth", 4 * SPLIT_NAS_BPS);
    migrate_set_parameter_int(g.src.qts, "downtime-limit", 300);
    migrate_set_parameter_int(g.src.qts, "dedup-nas-ref-share", 0);
    migrate_qmp(g.src.qts, g.dst, mig_uri, NULL, "{}");
    wait_for_migration_complete(g.src.qts);
    wait_for_migration_complete(g.dst);
    read_stats(g.src.qts, g.dst, true, &st);
    assert_ram_equal(g.src.qts, g.dst);
    assert_ram_holds_disk(g.dst, g.dma_addr, 0, pages, NULL);
    g_test_message("automatic share, storage at %u bytes/s: %" PRIu64
                   " of %" PRIu64 " pages as references, share %" PRIu64
                   " %% at the end", (unsigned)SPLIT_NAS_BPS, st.ref_pages,
                   pages, st.ref_share);
    /*
     * The first guess (NAS_DEDUP_SPLIT_PROBE, an eighth of them here),
     * then as many as keep the destination at most a second of reading
     * behind (the link runs at its max-bandwidth when pages go in full, so
     * the share grows again): three quarters at most, all of them without
     * the split.
     */
    g_assert_cmpuint(st.ref_pages, >, 0);
    g_assert_cmpuint(st.ref_pages, <=, pages * 3 / 4);
    /*
     * More than the first guess: the destination's reports kept coming
     * (with multifd, the main channel carries little but the references;
     * it reports at each end of section and multifd flush too).
     */
    g_assert_cmpuint(st.ref_pages, >, 1024);
    g_assert_cmpuint(st.verified_pages, ==, st.ref_pages);
    guest_teardown(&g);
}

/*
 * block_resize goes through a BlockBackend of its own, not the guest
 * device's; the node tells every parent.  A grow cuts nothing: the index
 * keeps what it knew and the pages go as references (the DRIVE record
 * with the new size).  A shrink to 2 MiB cuts the second half of the 4 MiB
 * the guest read: those pages go in full, the first half as references.
 */
static void do_resize(bool grow)
{
    uint64_t size = grow ? IMAGE_BYTES + 1 * MiB : 2 * MiB;
    uint64_t pages = 4 * MiB / CHUNK;
    DedupStats st;
    Guest g;

    guest_setup(&g, true, 0, 4 * MiB);
    qtest_qmp_assert_success(g.src.qts,
                             "{ 'execute': 'block_resize', 'arguments': "
                             "{ 'device': 'drive0', 'size': %" PRIu64 " } }",
                             size);
    /* The destination opens the image as it is now. */
    qtest_quit(g.dst);
    unlink(mig_uri + strlen("unix:"));
    g.dst = dest_boot(true, "-incoming defer");
    migrate_incoming_qmp(g.dst, mig_uri, NULL, "{ 'exit-on-error': false }");
    migrate_and_check(&g, true, &st);
    /* The guest's RAM still holds what it read before the resize. */
    make_image();
    assert_ram_holds_disk(g.dst, g.dma_addr, 0, pages, NULL);
    if (grow) {
        g_assert_cmpuint(st.index_entries, >=, pages);
        g_assert_cmpuint(st.ref_pages, >=, pages * 95 / 100);
    } else {
        g_assert_cmpuint(st.index_entries, <=, pages / 2);
        g_assert_cmpuint(st.ref_pages, >=, pages / 2 * 95 / 100);
        g_assert_cmpuint(st.ref_pages, <=, pages / 2);
    }
    g_assert_cmpuint(st.verified_pages, ==, st.ref_pages);
    g_assert_cmpuint(st.resend_requests, ==, 0);
    guest_teardown(&g);
}

static void test_resize_grow(void)
{
    do_resize(true);
}

static void test_resize_shrink(void)
{
    do_resize(false);
}

/*
 * drive_del takes the medium away from the guest device: whatever the
 * index knew of it is gone with it, and no reference names it.
 */
static void test_drive_del(void)
{
    DedupStats st;
    Guest g;

    guest_setup(&g, true, 0, 4 * MiB);
    qtest_hmp(g.src.qts, "drive_del drive0");
    migrate_and_check(&g, true, &st);
    g_assert_cmpuint(st.index_entries, ==, 0);
    g_assert_cmpuint(st.ref_pages, ==, 0);
    guest_teardown(&g);
}

/*** Faults: the source survives each, and migrates again afterwards ***/

/* A fresh destination, then a migration without faults: RAM identical. */
static void migrate_again(Guest *g)
{
    DedupStats st;

    qtest_quit(g->dst);
    unlink(mig_uri + strlen("unix:"));
    g->dst = dest_boot(true, "-incoming defer");
    migrate_incoming_qmp(g->dst, mig_uri, NULL, "{ 'exit-on-error': false }");
    migrate_set_parameter_int(g->src.qts, "downtime-limit", 30 * 1000);
    migrate_set_parameter_int(g->src.qts, "max-bandwidth", 1000 * MiB);
    migrate_set_parameter_int(g->src.qts, "avail-switchover-bandwidth", 0);
    migrate_and_check(g, true, &st);
    assert_ram_holds_disk(g->dst, g->dma_addr, 0, g->dma_bytes / CHUNK, NULL);
    g_assert_cmpuint(st.verified_pages, >, 0);
}

static void fault_setup(Guest *g, bool final_at_once)
{
    guest_setup(g, true, 4 * MiB, 16 * MiB);
    migrate_ensure_converge(g->src.qts);
    migrate_set_parameter_int(g->src.qts, "downtime-limit", BOUND_DOWNTIME_MS);
    migrate_set_parameter_int(g->src.qts, "dedup-nas-switchover-slack",
                              BOUND_SLACK_MS);
    /* As in test_sync_bound(): everything fits the budget, or not. */
    migrate_set_parameter_int(g->src.qts, "avail-switchover-bandwidth",
                              final_at_once ? 1000ull * 1000 * 1000
                                            : 1000 * 1000 * 1000 / 300);
}

/*
 * The migration channel is cut: during setup, in the middle of the first
 * iteration (the source sends 4 MiB of random pages first, slowly), or
 * right after the destination's answer to the final SYNC.
 */
typedef struct CutCase {
    const char *name;
    uint64_t after;             /* bytes from the source; 0: after the ACK */
} CutCase;

static const CutCase cut_cases[] = {
    { "setup", 16 * KiB },
    { "iteration", 2 * MiB },
    { "after-sync-ack", 0 },
};

static void test_cut(const void *opaque)
{
    const CutCase *c = opaque;
    g_autofree char *uri = NULL;
    Proxy *px;
    Guest g;

    fault_setup(&g, true);
    if (c->after) {
        migrate_set_parameter_int(g.src.qts, "max-bandwidth", 8 * MiB);
    }
    px = proxy_start(PROXY_CUT, NULL, 0);
    px->cut_after = c->after;
    uri = proxy_uri(px);
    migrate_qmp(g.src.qts, NULL, uri, NULL, "{}");
    qobject_unref(wait_for_status(g.src.qts, "failed", NULL));
    g_assert(px->cut);
    assert_running(g.src.qts);
    proxy_stop(px);
    migrate_again(&g);
    guest_teardown(&g);
}

/*
 * The return path is broken (the proxy shuts it down at once) while the
 * destination has blocks to ask again (16 overwritten, 4 blocks apart: as
 * many RESEND messages).  The destination says so once, not once a
 * message; the source, which gets no answer to its final SYNC, fails
 * within its bound and runs on.
 */
static void test_rp_broken(void)
{
    g_autofree char *log = g_build_filename(tmpdir, "dst.stderr", NULL);
    g_autofree char *extra = g_strdup_printf("-incoming defer 2>%s", log);
    g_autofree char *err = NULL;
    g_autofree char *uri = NULL;
    g_auto(GStrv) lines = NULL;
    unsigned said = 0, i;
    Proxy *px;
    Guest g;

    fault_setup(&g, true);
    overwrite_blocks(1, 16, 4, 1);
    qtest_quit(g.dst);
    unlink(mig_uri + strlen("unix:"));
    g.dst = dest_boot(true, extra);
    migrate_incoming_qmp(g.dst, mig_uri, NULL, "{ 'exit-on-error': false }");
    px = proxy_start(PROXY_NO_RP, NULL, 0);
    uri = proxy_uri(px);
    migrate_qmp(g.src.qts, NULL, uri, NULL, "{}");
    assert_source_survived(g.src.qts);
    qobject_unref(wait_for_status(g.dst, "failed", NULL));
    proxy_stop(px);

    g_assert(g_file_get_contents(log, &err, NULL, NULL));
    lines = g_strsplit(err, "\n", 0);
    for (i = 0; lines[i]; i++) {
        said += !!strstr(lines[i], "could not ask the source");
    }
    g_test_message("destination stderr: %s", err);
    g_assert_cmpuint(said, ==, 1);
    migrate_again(&g);
    guest_teardown(&g);
    unlink(log);
}

/*
 * migrate_cancel while a live SYNC is unanswered (the guest running), and
 * while the stopped guest waits for the answer to the final SYNC: the
 * monitor is held then, but only until downtime-limit + slack.
 */
static void do_cancel(bool final)
{
    g_autofree char *uri = NULL;
    g_autoptr(GTimer) timer = NULL;
    QDict *rsp;
    Proxy *px;
    Guest g;
    double secs;

    fault_setup(&g, final);
    px = proxy_start(PROXY_HOLD_ACKS, NULL, 0);
    uri = proxy_uri(px);
    migrate_qmp(g.src.qts, NULL, uri, NULL, "{}");
    /*
     * Until the answer to a SYNC is held: the first SYNC is a live one
     * (the downtime budget is 0 until the first bandwidth estimate), and
     * with everything fitting the budget the second is the final one.
     */
    timer = g_timer_new();
    while (qatomic_read(&px->acks_held) < (final ? 2 : 1)) {
        g_assert_cmpfloat(g_timer_elapsed(timer, NULL), <, WAIT_SECONDS);
        g_usleep(1000);
    }
    g_timer_start(timer);
    qtest_qmp_assert_success(g.src.qts, "{ 'execute': 'migrate_cancel' }");
    secs = g_timer_elapsed(timer, NULL);
    rsp = wait_for_status(g.src.qts, "cancelled", "failed");
    g_test_message("migrate_cancel answered after %.2f s; status %s", secs,
                   qdict_get_str(rsp, "status"));
    qobject_unref(rsp);
    /* Not a timing test: the bound is 1.3 s, a loaded machine has room. */
    g_assert_cmpfloat(secs, <, 30);
    assert_running(g.src.qts);
    proxy_stop(px);
    migrate_again(&g);
    guest_teardown(&g);
}

static void test_cancel_live(void)
{
    do_cancel(false);
}

static void test_cancel_final(void)
{
    do_cancel(true);
}

/* Guest RAM [@gpa, +@bytes) holds the image's bytes from @disk_off. */
static void assert_ram_holds_file(QTestState *qts, uint64_t gpa,
                                  uint64_t disk_off, uint64_t bytes)
{
    g_autofree uint8_t *ram = g_malloc(MiB);
    g_autofree uint8_t *disk = g_malloc(MiB);
    int fd = open(image_path, O_RDONLY);
    uint64_t off;

    g_assert(fd >= 0);
    for (off = 0; off < bytes; off += MiB) {
        size_t n = MIN(MiB, bytes - off);

        g_assert_cmpint(pread(fd, disk, n, disk_off + off), ==, n);
        read_guest(qts, gpa + off, ram, n);
        g_assert(!memcmp(ram, disk, n));
    }
    close(fd);
}

/*
 * Guest pages whose bytes do not start on a 4 KiB boundary of the disk
 * (file systems with 1 KiB blocks, a partition at sector 63): the device
 * DMAs disk bytes from a sector offset into page-aligned guest RAM.  Those
 * pages are indexed at that offset and go as references to it.
 */
static void test_unaligned(const void *opaque)
{
    uint64_t disk_off = *(const uint64_t *)opaque;
    uint64_t bytes = 8 * MiB, pages = bytes / CHUNK;
    DedupStats st;
    Guest g;

    memset(&g, 0, sizeof(g));
    make_image();
    source_boot(&g.src, true);
    g.dma_bytes = bytes;
    g.dma_addr = guest_buf(&g.src, bytes);
    dma_read_disk(&g.src, g.dma_addr, disk_off, bytes);
    assert_ram_holds_file(g.src.qts, g.dma_addr, disk_off, bytes);
    g.dst = dest_boot(true, "-incoming defer");
    migrate_incoming_qmp(g.dst, mig_uri, NULL, "{ 'exit-on-error': false }");
    migrate_and_check(&g, true, &st);
    assert_ram_holds_file(g.dst, g.dma_addr, disk_off, bytes);
    g_test_message("disk offset %" PRIu64 ": %" PRIu64 " of %" PRIu64
                   " pages as references", disk_off, st.ref_pages, pages);
    g_assert_cmpuint(st.ref_pages, >=, pages * 95 / 100);
    g_assert_cmpuint(st.verified_pages, ==, st.ref_pages);
    g_assert_cmpuint(st.mismatches, ==, 0);
    guest_teardown(&g);
}

static const uint64_t unaligned_sector63 = 63 * 512;
static const uint64_t unaligned_1k = 3 * 1024;

/*
 * query-dedup-nas-estimate, without migrating: the pages the device read
 * from disk, random pages and zero pages, classified as the migration
 * then sends them; with a link and a storage rate, the predicted times.
 * The migration that follows sends the predicted references, and about
 * the predicted bytes.
 */
#define EST_LINK        125000000
#define EST_STORAGE     1000000000

static uint64_t est_u64(QDict *d, const char *key)
{
    return stat_u64(d, key);
}

static void test_estimate(void)
{
    g_autofree char *out = NULL;
    uint64_t refs, total, precopy, dedup, expect_ms;
    DedupStats st;
    QDict *e;
    Guest g;

    guest_setup(&g, true, 4 * MiB, 16 * MiB);
    e = qtest_qmp_assert_success_ref(g.src.qts,
        "{ 'execute': 'query-dedup-nas-estimate', 'arguments': {"
        "  'link-bandwidth': %d, 'storage-bandwidth': %d } }",
        EST_LINK, EST_STORAGE);
    refs = est_u64(e, "reference-pages");
    total = est_u64(e, "total-pages");
    precopy = est_u64(e, "precopy-bytes");
    dedup = est_u64(e, "dedup-nas-bytes");
    g_test_message("estimate: %" PRIu64 " pages, %" PRIu64 " zero, %" PRIu64
                   " references, %" PRIu64 " unique; pre-copy %" PRIu64
                   " bytes %" PRIu64 " ms, dedup-nas %" PRIu64 " bytes %"
                   PRIu64 " ms", total, est_u64(e, "zero-pages"), refs,
                   est_u64(e, "unique-pages"), precopy,
                   est_u64(e, "precopy-time"), dedup,
                   est_u64(e, "dedup-nas-time"));
    g_assert_cmpuint(total, >=, RAM_BYTES / CHUNK);
    g_assert_cmpuint(total, ==, est_u64(e, "zero-pages") + refs +
                     est_u64(e, "unique-pages"));
    g_assert_cmpuint(refs, ==, g.dma_bytes / CHUNK);
    g_assert_cmpuint(est_u64(e, "unique-pages"), >=, g.rand_bytes / CHUNK);
    g_assert_cmpuint(est_u64(e, "storage-bytes"), ==, refs * CHUNK);
    g_assert_cmpuint(dedup, <, precopy - refs * (CHUNK - 64));
    expect_ms = precopy * 1000 / EST_LINK;
    g_assert_cmpuint(est_u64(e, "precopy-time"), <=, expect_ms + 1);
    g_assert_cmpuint(est_u64(e, "precopy-time") + 1, >=, expect_ms);
    /* The storage is the faster here: every page on disk a reference. */
    g_assert_cmpuint(est_u64(e, "reference-share"), ==, 100);
    g_assert_cmpuint(est_u64(e, "dedup-nas-time"), <,
                     est_u64(e, "precopy-time"));
    qobject_unref(e);

    /* A storage slower than the link: part of them in full. */
    e = qtest_qmp_assert_success_ref(g.src.qts,
        "{ 'execute': 'query-dedup-nas-estimate', 'arguments': {"
        "  'link-bandwidth': %d, 'storage-bandwidth': %d } }",
        EST_LINK, EST_LINK / 8);
    g_assert_cmpuint(est_u64(e, "reference-share"), <, 100);
    g_assert_cmpuint(est_u64(e, "reference-share"), >, 0);
    qobject_unref(e);

    out = qtest_hmp(g.src.qts, "info dedup_nas_estimate %d %d", EST_LINK,
                    EST_STORAGE);
    g_test_message("info dedup_nas_estimate: %s", out);
    g_assert(strstr(out, "found on disks"));
    g_assert(strstr(out, "dedup-nas"));

    migrate_and_check(&g, true, &st);
    g_test_message("migrated: %" PRIu64 " references, %" PRIu64 " bytes "
                   "(estimate %" PRIu64 ", %" PRIu64 ")", st.ref_pages,
                   st.transferred, refs, dedup);
    g_assert_cmpuint(st.ref_pages, ==, refs);
    /* Device state and section headers come on top of the estimate. */
    g_assert_cmpuint(st.transferred, >=, dedup);
    g_assert_cmpuint(st.transferred, <=, dedup + dedup / 10);
    guest_teardown(&g);
}

/*
 * The HMP habit: a VM started without dedup-nas, the capability turned on
 * just before "migrate".  Tracking runs from the VM's start by default
 * (x-dedup-nas-track), so the page cache read before is found; with
 * x-dedup-nas-track=off the index is empty, and "migrate" says so and why.
 */
static void do_track_from_boot(bool track)
{
    uint64_t pages = 16 * MiB / CHUNK;
    g_autofree char *out = NULL;
    DedupStats st;
    Guest g;

    memset(&g, 0, sizeof(g));
    make_image();
    source_boot_args(&g.src, false,
                     track ? NULL : "-global migration.x-dedup-nas-track=off");
    g.dma_bytes = pages * CHUNK;
    g.dma_addr = guest_buf(&g.src, g.dma_bytes);
    dma_read_disk(&g.src, g.dma_addr, 0, g.dma_bytes);
    g.dst = dest_boot(false, "-incoming defer");
    migrate_incoming_qmp(g.dst, mig_uri, NULL, "{ 'exit-on-error': false }");

    out = qtest_hmp(g.src.qts, "migrate_set_capability dedup-nas on");
    g_assert_cmpstr(out, ==, "");
    g_clear_pointer(&out, g_free);
    migrate_ensure_converge(g.src.qts);
    out = qtest_hmp(g.src.qts, "migrate -d %s", mig_uri);
    g_test_message("migrate -d printed: '%s'", out);
    if (track) {
        g_assert(!strstr(out, "dedup-nas"));
    } else {
        g_assert(strstr(out, "no guest disk content is indexed"));
        g_assert(strstr(out, "x-dedup-nas-track=off"));
    }
    wait_for_migration_complete(g.src.qts);
    wait_for_migration_complete(g.dst);
    assert_ram_equal(g.src.qts, g.dst);
    if (track) {
        read_stats(g.src.qts, g.dst, true, &st);
        g_assert_cmpuint(st.ref_pages, >=, pages * 95 / 100);
        g_assert_cmpuint(st.verified_pages, ==, st.ref_pages);
    } else {
        /* No reference: the destination (capability off) has no stats. */
        QDict *rsp = migrate_query(g.src.qts);
        QDict *dn = qdict_get_qdict(rsp, "dedup-nas");

        g_assert(dn);
        g_assert_cmpuint(stat_u64(dn, "index-entries"), ==, 0);
        g_assert_cmpuint(stat_u64(dn, "reference-pages"), ==, 0);
        qobject_unref(rsp);
    }
    guest_teardown(&g);
}

static void test_track_from_boot(void)
{
    do_track_from_boot(true);
}

static void test_track_off(void)
{
    do_track_from_boot(false);
}

/* The destination dies in the middle of the first iteration. */
static void test_dest_killed(void)
{
    Guest g;

    fault_setup(&g, false);
    migrate_set_parameter_int(g.src.qts, "max-bandwidth", 2 * MiB);
    migrate_qmp(g.src.qts, g.dst, mig_uri, NULL, "{}");
    while (read_ram_property_int(g.src.qts, "transferred") < 1 * MiB) {
        g_usleep(10 * 1000);
    }
    /*
     * SIGTERM: it exits at once, its sockets closed (libqtest aborts on a
     * QEMU killed by other signals).
     */
    qtest_kill_qemu(g.dst);
    qobject_unref(wait_for_status(g.src.qts, "failed", NULL));
    assert_running(g.src.qts);
    migrate_again(&g);
    guest_teardown(&g);
}

/* Remove the temporary files, also when an assertion fails. */
/*** Randomized RAM-identity stress ***/

/*
 * NAS_DEDUP_STRESS migrations (default 5; `scripts/bench.sh --stress`
 * runs 30 from a seed of the time), each with parameters drawn from
 * NAS_DEDUP_STRESS_SEED + its number (default 1, so that the test command
 * runs the same cases each time; a replay repeats the parameters and the
 * sequence of operations, not their timing against the migration): how
 * much of guest RAM is disk content, raw or qcow2, an index of the minimum
 * size or the default (the minimum holds fewer
 * entries than the cache has pages: evictions), bandwidth, and while
 * migrating a random sequence of guest disk reads into that cache, guest
 * disk writes, guest RAM writes over cached pages and, for raw, blocks
 * rewritten behind the source's back.  Every migration must end with RAM
 * identical, every page asked again sent again and no read error.
 */
#define STRESS_CACHE_MAX    (24 * MiB)
#define STRESS_SCRATCH      (1 * MiB)
#define STRESS_OPS_MAX      48
#define STRESS_RUN_MAX      64          /* blocks of one operation */
#define INDEX_MIN_BYTES     (64 * KiB)  /* dedup-nas-index-size minimum */

/* Write guest RAM [@start, @end) with what it holds: the pages are dirty. */
static void touch_pages(QTestState *qts, uint64_t start, uint64_t end)
{
    uint8_t buf[READ_PIECE];
    uint64_t a;

    for (a = start; a < end; a += sizeof(buf)) {
        size_t n = MIN(sizeof(buf), end - a);

        read_guest(qts, a, buf, n);
        qtest_bufwrite(qts, a, buf, n);
    }
}

static uint64_t stress_blocks(GRand *r, uint64_t max_bytes)
{
    return g_rand_int_range(r, 1, MIN(STRESS_RUN_MAX, max_bytes / CHUNK) + 1);
}

static void stress_one(uint32_t seed, unsigned *mismatches_total)
{
    g_autoptr(GRand) r = g_rand_new_with_seed(seed);
    g_autofree char *qcow = g_build_filename(tmpdir, "stress.qcow2", NULL);
    g_autofree char *more = NULL;
    bool qcow2 = g_rand_boolean(r);
    bool tiny = g_rand_boolean(r);
    uint64_t cache = g_rand_int_range(r, 1, STRESS_CACHE_MAX / MiB + 1) * MiB;
    uint64_t rand = g_rand_int_range(r, 0, 9) * MiB;
    static const uint64_t bws[] = { 8 * MiB, 32 * MiB, 0 };
    uint64_t bw = bws[g_rand_int_range(r, 0, ARRAY_SIZE(bws))];
    unsigned ops = g_rand_int_range(r, 0, STRESS_OPS_MAX + 1);
    unsigned counts[4] = { 0 };
    uint64_t scratch, disk_first, low_buf, gen = 1;
    DedupStats st;
    QDict *rsp;
    Guest g;
    unsigned k;

    memset(&g, 0, sizeof(g));
    make_image();
    if (qcow2) {
        const char *qemu_img = getenv("QTEST_QEMU_IMG");
        const char *argv[] = {
            qemu_img, "convert", "-q", "-f", "raw", "-O", "qcow2",
            image_path, qcow, NULL
        };
        g_autoptr(GError) gerr = NULL;
        gint status;

        g_assert(qemu_img);
        g_assert(g_spawn_sync(NULL, (char **)argv, NULL, 0, NULL, NULL, NULL,
                              NULL, &status, &gerr));
        g_assert_no_error(gerr);
        g_assert(g_spawn_check_exit_status(status, NULL));
        drive_file = qcow;
        drive_format = "qcow2";
    }
    g_test_message("stress seed %u: %s, index %s, cache %" PRIu64 " MiB, "
                   "random %" PRIu64 " MiB, bandwidth %" PRIu64 " MiB/s, "
                   "%u operations", seed, qcow2 ? "qcow2" : "raw",
                   tiny ? "64 KiB" : "default", cache / MiB, rand / MiB,
                   bw / MiB, ops);

    more = g_strdup_printf("-global migration.dedup-nas-index-size=%u",
                           tiny ? (unsigned)INDEX_MIN_BYTES : 0);
    source_boot_args(&g.src, true, more);
    low_buf = guest_buf(&g.src, CHUNK);
    if (rand) {
        g.rand_addr = guest_buf(&g.src, rand);
        write_random(g.src.qts, g.rand_addr, rand, seed);
        g.rand_bytes = rand;
    }
    scratch = guest_buf(&g.src, STRESS_SCRATCH);
    write_random(g.src.qts, scratch, STRESS_SCRATCH, ~seed);
    g.dma_addr = guest_buf(&g.src, cache);
    g.dma_bytes = cache;
    disk_first = g_rand_int_range(r, 0, (IMAGE_BYTES - cache) / MiB + 1) *
                 MiB;
    dma_read_disk(&g.src, g.dma_addr, disk_first, cache);
    g.dst = dest_boot(true, "-incoming defer");
    migrate_incoming_qmp(g.dst, mig_uri, NULL, "{ 'exit-on-error': false }");

    /*
     * The test drives the device whatever the VM's state: no disk I/O once
     * the source's disks are given up (at completion), so the switchover
     * waits for the test (pre-switchover: the guest stopped, disks still
     * the source's).
     */
    migrate_set_capability(g.src.qts, "pause-before-switchover", true);
    /* Live while the operations run, if the test can keep up. */
    migrate_set_parameter_int(g.src.qts, "downtime-limit", 1);
    migrate_set_parameter_int(g.src.qts, "max-bandwidth", bw ? bw : 1000 * GiB);
    migrate_qmp(g.src.qts, g.dst, mig_uri, NULL, "{}");
    /* A small guest at full speed may be past "active" already. */
    qobject_unref(wait_for_status(g.src.qts, "active", "pre-switchover"));

    for (k = 0; k < ops; k++) {
        unsigned op = g_rand_int_range(r, 0, qcow2 ? 3 : 4);
        uint64_t n = stress_blocks(r, cache);
        uint64_t at = g_rand_int_range(r, 0, cache / CHUNK - n + 1) * CHUNK;
        uint64_t disk = g_rand_int_range(r, 0, IMAGE_BLOCKS - n + 1) * CHUNK;

        counts[op]++;
        switch (op) {
        case 0:     /* the guest reads disk into its cache */
            dma_read_disk(&g.src, g.dma_addr + at, disk, n * CHUNK);
            break;
        case 1:     /* the guest writes to disk */
            at = g_rand_int_range(r, 0, STRESS_SCRATCH / CHUNK - n + 1) *
                 CHUNK;
            dma_disk(&g.src, CMD_WRITE_DMA_EXT, scratch + at, disk,
                     n * CHUNK);
            write_random(g.src.qts, scratch + at, n * CHUNK,
                         seed ^ (k << 8));
            break;
        case 2:     /* the guest writes over cached pages */
            write_random(g.src.qts, g.dma_addr + at, n * CHUNK,
                         seed ^ (k << 16));
            break;
        case 3:     /* another host rewrites blocks */
            overwrite_blocks(disk / CHUNK, n, 1, gen++);
            break;
        }
        if (g_rand_int_range(r, 0, 4) == 0) {
            g_usleep(g_rand_int_range(r, 0, 50 * 1000));
        }
    }
    /*
     * AHCI writes its command list and received FISes through mappings it
     * keeps (hw/ide/ahci.c map_page()), which dirty logging does not see:
     * upstream behaviour, not dedup-nas's.  Write those pages (the
     * allocator's first ones, below the test's buffers) back as they are,
     * so that their last state is sent.
     */
    touch_pages(g.src.qts, HIGH_RAM_START, low_buf);
    rsp = migrate_query(g.src.qts);
    g_test_message("stress seed %u: operations done (reads %u, writes %u, "
                   "RAM writes %u, rewrites %u), status %s", seed, counts[0],
                   counts[1], counts[2], counts[3],
                   qdict_get_str(rsp, "status"));
    qobject_unref(rsp);
    migrate_ensure_converge(g.src.qts);
    qobject_unref(wait_for_status(g.src.qts, "pre-switchover", NULL));
    migrate_continue(g.src.qts, "pre-switchover");
    wait_for_migration_complete(g.src.qts);
    wait_for_migration_complete(g.dst);
    read_stats(g.src.qts, g.dst, true, &st);
    assert_ram_equal(g.src.qts, g.dst);
    g_assert_cmpuint(st.read_errors, ==, 0);
    g_assert_cmpuint(st.resent_pages, ==, st.resend_requests);
    g_assert_cmpuint(st.verified_pages + st.mismatches, <=, st.ref_pages);
    /* Test harness output, parsed by scripts/bench.py --stress. */
    g_test_message("stress-result seed=%u fmt=%s index=%s cache_mib=%" PRIu64
                   " bw_mib=%" PRIu64 " ops=%u ref_pages=%" PRIu64
                   " verified=%" PRIu64 " mismatches=%" PRIu64
                   " resent=%" PRIu64 " differing_pages=0", seed,
                   qcow2 ? "qcow2" : "raw", tiny ? "min" : "default",
                   cache / MiB, bw / MiB, ops, st.ref_pages,
                   st.verified_pages, st.mismatches, st.resent_pages);
    *mismatches_total += st.mismatches;

    guest_teardown(&g);
    drive_file = NULL;
    drive_format = "raw";
    unlink(qcow);
}

/*
 * dedup-nas with multifd, 4 channels, @opaque the compression: pages sent
 * in full take the channels, references the main channel.  The race case
 * (blocks overwritten under references: the pages asked again come on the
 * channels), then randomized migrations whose pages change kind (data,
 * reference, data) from round to round; RAM identical in each.
 */
static void test_multifd(const void *opaque)
{
    g_autofree char *globals =
        g_strdup_printf("-global migration.x-multifd=on "
                        "-global migration.multifd-channels=4 "
                        "-global migration.multifd-compression=%s",
                        (const char *)opaque);
    unsigned i, mismatches = 0;

    mig_globals = globals;
    test_race();
    if (getenv("QTEST_QEMU_IMG")) {
        for (i = 0; i < 2; i++) {
            stress_one(1000 + i, &mismatches);
        }
    }
    mig_globals = "";
}

static void test_stress(void)
{
    const char *n_env = getenv("NAS_DEDUP_STRESS");
    const char *seed_env = getenv("NAS_DEDUP_STRESS_SEED");
    uint64_t n = 5, seed = 1;
    unsigned i, mismatches = 0;

    if (n_env) {
        g_assert(!qemu_strtou64(n_env, NULL, 10, &n));
    }
    if (seed_env) {
        g_assert(!qemu_strtou64(seed_env, NULL, 10, &seed));
    }
    if (!getenv("QTEST_QEMU_IMG")) {
        g_test_skip("QTEST_QEMU_IMG not set");
        return;
    }
    g_test_message("stress: %" PRIu64 " migrations, "
                   "NAS_DEDUP_STRESS_SEED=%" PRIu64, n, seed);
    for (i = 0; i < n; i++) {
        stress_one(seed + i, &mismatches);
    }
    g_test_message("stress: %" PRIu64 " migrations, RAM identical in all, "
                   "%u mismatches repaired", n, mismatches);
}

static void cleanup(void *opaque)
{
    g_autoptr(GDir) dir = g_dir_open(tmpdir, 0, NULL);
    const char *name;

    while (dir && (name = g_dir_read_name(dir))) {
        g_autofree char *path = g_build_filename(tmpdir, name, NULL);

        unlink(path);
    }
    rmdir(tmpdir);
}

/* One test @fn a case of @cases, named @prefix/<its name>. */
static void add_cases(const char *prefix, const void *cases, size_t n,
                      size_t size, GTestDataFunc fn)
{
    size_t i;

    for (i = 0; i < n; i++) {
        const void *c = (const char *)cases + i * size;
        g_autofree char *path = g_strdup_printf("%s/%s", prefix,
                                                *(const char *const *)c);

        g_test_add_data_func(path, c, fn);
    }
}
#define ADD_CASES(prefix, cases, fn) \
    add_cases(prefix, cases, ARRAY_SIZE(cases), sizeof(cases[0]), fn)

int main(int argc, char **argv)
{
    g_autoptr(GError) gerr = NULL;
    int ret;

    g_test_init(&argc, &argv, NULL);

    if (!qtest_has_machine("q35")) {
        g_test_skip("q35 machine not available");
        return g_test_run();
    }

    tmpdir = g_dir_make_tmp("nas-dedup-test-XXXXXX", &gerr);
    g_assert_no_error(gerr);
    qtest_add_abrt_handler(cleanup, &tmpdir);
    image_path = g_build_filename(tmpdir, "shared.raw", NULL);
    mig_uri = g_strdup_printf("unix:%s/migsocket", tmpdir);
    make_image();
    dst_direct_io = probe_direct_io(image_path);
    unlink(image_path);

    g_test_add_func("/nas-dedup/caps", test_caps);
    g_test_add_func("/nas-dedup/savevm", test_savevm);
    g_test_add_func("/nas-dedup/dma-refs", test_dma_refs);
    g_test_add_func("/nas-dedup/race", test_race);
    ADD_CASES("/nas-dedup/malformed", malformed_cases, test_malformed);
    g_test_add_func("/nas-dedup/malformed-exit", test_malformed_exit);
    g_test_add_data_func("/nas-dedup/postcopy/plain",
                         &(PostcopyCase) { .race = true }, test_postcopy);
    g_test_add_func("/nas-dedup/postcopy/stale-resend",
                    test_postcopy_stale_resend);
    g_test_add_data_func("/nas-dedup/postcopy/preempt",
                         &(PostcopyCase) { .preempt = true, .race = true },
                         test_postcopy);
    g_test_add_data_func("/nas-dedup/postcopy/preempt-meet",
                         &(PostcopyCase) { .preempt = true, .meet = true },
                         test_postcopy);
    g_test_add_data_func("/nas-dedup/postcopy/resolve-first",
                         &(PostcopyCase) { .resolve_first = true },
                         test_postcopy);
    g_test_add_data_func("/nas-dedup/postcopy/recover",
                         &(PostcopyCase) { .recover = true }, test_postcopy);
    g_test_add_data_func("/nas-dedup/postcopy/meet",
                         &(PostcopyCase) { .meet = true }, test_postcopy);
    g_test_add_data_func("/nas-dedup/postcopy/meet-stalled",
                         &(PostcopyCase) { .meet = true, .stall = true },
                         test_postcopy);
    g_test_add_data_func("/nas-dedup/postcopy/fault-read",
                         &(PostcopyCase) { .dump_read_ms = 60000 },
                         test_postcopy);
    g_test_add_data_func("/nas-dedup/postcopy/fault-read-late",
                         &(PostcopyCase) { .dump_read_ms = 1 },
                         test_postcopy);
    g_test_add_data_func("/nas-dedup/multifd/none", "none", test_multifd);
    g_test_add_func("/nas-dedup/multifd/stall", test_multifd_stall);
#ifdef CONFIG_ZSTD
    g_test_add_data_func("/nas-dedup/multifd/zstd", "zstd", test_multifd);
#endif
    g_test_add_func("/nas-dedup/dest-capability-off",
                    test_dest_capability_off);
    g_test_add_func("/nas-dedup/track/from-boot", test_track_from_boot);
    g_test_add_func("/nas-dedup/estimate", test_estimate);
    g_test_add_data_func("/nas-dedup/unaligned/sector-63",
                         &unaligned_sector63, test_unaligned);
    g_test_add_data_func("/nas-dedup/unaligned/1k", &unaligned_1k,
                         test_unaligned);
    g_test_add_func("/nas-dedup/track/off", test_track_off);
    g_test_add_data_func("/nas-dedup/fetch-after-failure/late-read", NULL,
                         test_fetch_after_failure);
    g_test_add_data_func("/nas-dedup/fetch-after-failure/late-read-error", "",
                         test_fetch_after_failure);
    ADD_CASES("/nas-dedup/unresolvable", unresolvable_cases,
              test_unresolvable);
    g_test_add_func("/nas-dedup/collision", test_collision);
    ADD_CASES("/nas-dedup/rp", rp_cases, test_rp);
    g_test_add_func("/nas-dedup/rp/after-completed", test_rp_after_completed);
    g_test_add_func("/nas-dedup/rp-numbering", test_rp_numbering);
    g_test_add_func("/nas-dedup/switchover-bound", test_switchover_bound);
    g_test_add_func("/nas-dedup/live-sync-bound", test_live_sync_bound);
    g_test_add_func("/nas-dedup/throttled-dest", test_throttled_dest);
    g_test_add_func("/nas-dedup/auto-converge", test_auto_converge);
    g_test_add_func("/nas-dedup/ref-share/fixed", test_ref_share_fixed);
    g_test_add_data_func("/nas-dedup/ref-share/slow-nas", NULL,
                         test_ref_share_slow_nas);
    g_test_add_data_func("/nas-dedup/ref-share/slow-nas-multifd", "",
                         test_ref_share_slow_nas);
    g_test_add_func("/nas-dedup/resize/grow", test_resize_grow);
    g_test_add_func("/nas-dedup/resize/shrink", test_resize_shrink);
    g_test_add_func("/nas-dedup/drive-del", test_drive_del);
    ADD_CASES("/nas-dedup/fault/cut", cut_cases, test_cut);
    g_test_add_func("/nas-dedup/fault/rp-broken", test_rp_broken);
    g_test_add_func("/nas-dedup/fault/cancel-live", test_cancel_live);
    g_test_add_func("/nas-dedup/fault/cancel-final", test_cancel_final);
    g_test_add_func("/nas-dedup/fault/dest-killed", test_dest_killed);
    g_test_add_func("/nas-dedup/stress", test_stress);

    ret = g_test_run();

    qtest_remove_abrt_handler(&tmpdir);
    cleanup(NULL);
    g_free(tmpdir);
    g_free(image_path);
    g_free(mig_uri);
    return ret;
}
