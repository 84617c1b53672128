#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Functional test of the dedup-nas migration capability: a Linux guest whose
# disk is on an NFS export (QEMU's libnfs driver) fills its page cache from
# that disk, is live-migrated, and checks on the destination, with md5 sums
# it recorded in its own RAM, that its page cache, tmpfs and disk survived.
#
#   test_precopy_vs_dedup  the same workload migrated with plain pre-copy
#                          and with dedup-nas (fresh guests each time): both
#                          guests must say "NASDEDUP-VERDICT: OK" for verify
#                          and verify-disk, dedup-nas must move at most half
#                          the RAM bytes, and its query-migrate statistics
#                          must be consistent between source and destination
#   test_qcow2             dedup-nas with a qcow2 image
#   test_postcopy          dedup-nas with postcopy-ram (small guest): RAM
#                          identical, verdict OK
#   test_fault_*           the fault matrix, each on a small guest of its
#                          own (256 MiB, 64 MiB of page cache): NFS server
#                          stopped 2 s in pre-copy (1), stopped at
#                          switchover (2), killed in pre-copy (3); the
#                          destination's reads failing (4, blkdebug); the
#                          destination killed (5); migrate_cancel (6).
#                          Each must either complete with destination RAM
#                          equal to the source's (pmemsave of both) and
#                          the guest's verdict OK, or fail naming the cause
#                          with the source running, and then migrate again
#                          cleanly.  See "Fault matrix" in
#                          docs/devel/nas-dedup.rst.
#
# The guest (kernel, initramfs with scripts/guest/init, ext4 data disk) is
# built locally from Debian packages by scripts/guest-assets.sh; nothing is
# downloaded through qemu_test's Asset mechanism.  The NFS server
# (scripts/nfs-export.sh) runs in a private network namespace, and so must
# this test: run it through scripts/functional-test.sh, which sets the
# environment meson gives functional tests (QEMU_TEST_QEMU_BINARY,
# QEMU_TEST_QEMU_IMG, QEMU_BUILD_ROOT, PYTHONPATH), builds the assets,
# starts the export and runs this file inside the namespace.  Output: TAP
# on stdout; logs (QEMU output, console.log, base.log) in
# $QEMU_BUILD_ROOT/tests/functional/x86_64/<test id>/.
#
# Environment (defaults in brackets):
#   NASDEDUP_GUEST_DIR    guest assets                   [<repo>/build/guest]
#   NASDEDUP_EXPORT_DIR   directory exported as NASDEDUP_NFS_URL
#                                                   [<repo>/build/nfs-export]
#   NASDEDUP_NFS_URL      [nfs://127.0.0.1/export]
#   NASDEDUP_FT_ONLY      run only the tests whose name matches this regex
#   NASDEDUP_FT_PREFIX    name prefix of the disk copies put in the export
#                         (unique names are made from it)    [ft-<pid>]
#   NASDEDUP_FT_READ_MB / _WRITE_MB / _DIRTY_MB / _CHURN_MB
#                         guest workload, see scripts/guest-assets.sh
#                                                         [600 / 8 / 8 / 4]
#   NASDEDUP_FT_MAX_BANDWIDTH  max-bandwidth in bytes/s, 0: unlimited
#                                                          [125000000]
#   NASDEDUP_FT_STRICT    1: fail instead of skipping when the export or the
#                         assets are missing (set by functional-test.sh) [0]
#   NASDEDUP_FT_QEMU_ARGS extra arguments for every QEMU, split on white
#                         space, e.g. "-trace nas_dedup_load_mismatch"   []
#   NASDEDUP_NFS_STATE    state directory of scripts/nfs-export.sh, where
#                         ganesha.pid is (the fault matrix stops, kills
#                         and restarts that ganesha)         [<repo>/build/nfs]
#   NASDEDUP_FM_MEM_MB / _READ_MB / _SLOW_BANDWIDTH
#                         fault matrix guest RAM, page cache and pre-copy
#                         max-bandwidth before the fault
#                                                  [256 / 64 / 8000000]

import hashlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

from qemu_test import QemuSystemTest, get_qemu_img
from qemu_test.ports import Ports

PAGE = 4096
MiB = 1 << 20

TOP = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.realpath(__file__))))


def _env_int(name, default):
    return int(os.environ.get(name, default))


class GuestConsole:
    """
    Line-oriented access to a QEMUMachine's serial console (its
    set_console() socket), with deadlines: qemu_test's console helpers
    wait forever, and this guest answers with whole lines.  Every line is
    logged to the test's console.log.
    """

    FAIL_RE = re.compile(r'NASDEDUP-VERDICT: FAIL')

    def __init__(self, test, vm, name):
        self.test = test
        self.vm = vm
        self.name = name
        self.buf = b''
        self.log = logging.getLogger('console')

    def send(self, line):
        self.test.log.debug('%s console <- %r', self.name, line)
        self.vm.console_socket.sendall(line.encode() + b'\n')

    def wait(self, regex, timeout):
        """Return the first line matching @regex; fail on a FAIL verdict,
        an exited QEMU or after @timeout seconds."""
        pattern = re.compile(regex)
        sock = self.vm.console_socket
        deadline = time.monotonic() + timeout
        while True:
            while b'\n' in self.buf:
                raw, self.buf = self.buf.split(b'\n', 1)
                line = raw.decode(errors='replace').rstrip('\r')
                self.log.debug('%s: %s', self.name, line)
                if self.FAIL_RE.search(line):
                    self.test.fail(f'{self.name} guest: {line}')
                if pattern.search(line):
                    return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.test.fail(f'{self.name}: no console line matching '
                               f'/{regex}/ within {timeout} s')
            sock.settimeout(min(remaining, 1.0))
            try:
                data = sock.recv(4096)
            except socket.timeout:
                if not self.vm.is_running():
                    self.test.fail(f'{self.name}: QEMU exited while waiting '
                                   f'for /{regex}/')
                continue
            if not data:
                self.test.fail(f'{self.name}: console closed (QEMU exited?) '
                               f'while waiting for /{regex}/')
            self.buf += data

    def command(self, cmd, timeout):
        """Send @cmd, return its verdict line (an OK one)."""
        self.send(cmd)
        return self.wait(r'NASDEDUP-VERDICT: OK', timeout)


class NasDedupMigration(QemuSystemTest):

    # For the record (meson's per-test timeout); the run is bounded by the
    # timeouts below.
    timeout = 900

    MEM = '1G'
    BOOT_TIMEOUT = 300
    MIGRATE_TIMEOUT = 300
    VERIFY_TIMEOUT = 300

    READ_MB = _env_int('NASDEDUP_FT_READ_MB', 600)
    WRITE_MB = _env_int('NASDEDUP_FT_WRITE_MB', 8)
    DIRTY_MB = _env_int('NASDEDUP_FT_DIRTY_MB', 8)
    CHURN_MB = _env_int('NASDEDUP_FT_CHURN_MB', 4)
    MAX_BANDWIDTH = _env_int('NASDEDUP_FT_MAX_BANDWIDTH', 125000000)

    # Every page found on disk as a reference: these tests count them, and
    # the faults they inject need references in flight.  The automatic
    # link/NAS split is measured by scripts/bench.py, on the same guest.
    DEDUP_ARGS = ('-global', 'migration.x-dedup-nas=on',
                  '-global', 'migration.dedup-nas-ref-share=100',
                  '-global', 'migration.x-return-path=on')

    def setUp(self):
        super().setUp()
        self.strict = os.environ.get('NASDEDUP_FT_STRICT', '0') == '1'
        only = os.environ.get('NASDEDUP_FT_ONLY')
        if only and not re.search(only, self._testMethodName):
            self.skipTest(f'not selected by NASDEDUP_FT_ONLY={only}')
        self.guest_dir = os.environ.get('NASDEDUP_GUEST_DIR',
                                        os.path.join(TOP, 'build', 'guest'))
        self.export_dir = os.environ.get('NASDEDUP_EXPORT_DIR',
                                         os.path.join(TOP, 'build',
                                                      'nfs-export'))
        self.nfs_url = os.environ.get('NASDEDUP_NFS_URL',
                                      'nfs://127.0.0.1/export').rstrip('/')
        self.prefix = os.environ.get('NASDEDUP_FT_PREFIX', f'ft-{os.getpid()}')
        if os.geteuid() != 0:
            self._missing('needs root: the NFS export runs in a network '
                          'namespace and the fault cases signal its server')
        self.require_accelerator('tcg')
        self.set_machine('q35')
        self.require_device('virtio-blk-pci')

        for f in ('vmlinuz', 'initrd.gz', 'data.raw'):
            if not os.path.isfile(os.path.join(self.guest_dir, f)):
                self._missing(f'no {f} in {self.guest_dir} '
                              '(run scripts/guest-assets.sh)')
        if not os.path.isdir(self.export_dir):
            self._missing(f'no export directory {self.export_dir}')
        # QEMU mounts through the portmapper, then talks to nfsd.
        for port in (111, 2049):
            try:
                socket.create_connection(('127.0.0.1', port), 2).close()
            except OSError as e:
                self._missing(f'no NFS server on 127.0.0.1:{port} ({e}); run '
                              'inside the namespace of scripts/nfs-export.sh '
                              '(scripts/functional-test.sh does)')
        self.fw_args = self._firmware_args()

    def _missing(self, why):
        if self.strict:
            self.fail(why)
        self.skipTest(why)

    def _firmware_args(self):
        """'-L DIR' for Debian's firmware, only if QEMU's own search path
        lacks it (it should not: build/qemu/qemu-bundle links to it)."""
        out = subprocess.run([self.qemu_bin, '-L', 'help'], check=True,
                             capture_output=True, encoding='utf8').stdout
        if any(os.path.isfile(os.path.join(d, 'bios-256k.bin'))
               for d in out.split()):
            return []
        self.log.warning('bios-256k.bin is not in QEMU\'s firmware path '
                         '(%s); adding Debian\'s directories with -L',
                         ' '.join(out.split()))
        args = []
        for d in ('/usr/share/seabios', '/usr/share/qemu',
                  '/usr/lib/ipxe/qemu'):
            if os.path.isdir(d):
                args += ['-L', d]
        return args

    # --- disk copies in the export ---------------------------------------

    @staticmethod
    def _remove(path):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass

    def _export_disk(self, fmt):
        """A fresh copy of the data disk in the export, under a new name
        (ganesha caches handles: a replaced file would read as stale)."""
        name = f'{self.prefix}-{uuid.uuid4().hex[:8]}.{fmt}'
        path = os.path.join(self.export_dir, name)
        self.addCleanup(self._remove, path)
        template = os.path.join(self.guest_dir, f'data.{fmt}')
        t0 = time.monotonic()
        if os.path.isfile(template):
            subprocess.run(['cp', '--sparse=always', template, path],
                           check=True)
        elif fmt == 'qcow2':
            subprocess.run([get_qemu_img(self), 'convert', '-f', 'raw',
                            '-O', 'qcow2',
                            os.path.join(self.guest_dir, 'data.raw'), path],
                           check=True, capture_output=True)
        else:
            self._missing(f'no {template}')
        self.log.info('disk copy %s (%.1f s)', path, time.monotonic() - t0)
        return name, path

    # --- VMs ---------------------------------------------------------------

    def _append(self):
        return ('console=ttyS0 panic=-1 quiet '
                f'nasdedup.read_mb={self.READ_MB} '
                f'nasdedup.write_mb={self.WRITE_MB} '
                f'nasdedup.dirty_mb={self.DIRTY_MB} '
                f'nasdedup.churn_mb={self.CHURN_MB} nasdedup.sync=0')

    def _new_guest_vm(self, name, disk, fmt, dedup, *extra, mem=None,
                      append=None, drive=None, dev=None):
        """@mem, @append, @drive (the -drive argument), @dev (the -device
        argument of the disk) default to the workload of the two
        pre-copy/dedup-nas tests."""
        vm = self.get_vm(*extra, name=name)
        vm.set_console()
        vm.add_args(*self.fw_args,
                    '-accel', 'tcg', '-m', mem or self.MEM, '-smp', '1',
                    '-nodefaults', '-no-reboot',
                    '-kernel', os.path.join(self.guest_dir, 'vmlinuz'),
                    '-initrd', os.path.join(self.guest_dir, 'initrd.gz'),
                    '-append', append or self._append(),
                    '-drive', drive or f'file={self.nfs_url}/{disk},'
                                       f'format={fmt},if=none,id=disk0,'
                                       'cache.direct=on',
                    '-device', dev or 'virtio-blk-pci,drive=disk0,id=vd0')
        if dedup:
            vm.add_args(*self.DEDUP_ARGS)
        vm.add_args(*os.environ.get('NASDEDUP_FT_QEMU_ARGS', '').split())
        return vm

    def _wait_status(self, vm, name, want, timeout):
        deadline = time.monotonic() + timeout
        while True:
            status = vm.cmd('query-status')['status']
            if status == want:
                return
            if time.monotonic() > deadline:
                self.fail(f'{name}: status {status}, not {want}, '
                          f'after {timeout} s')
            time.sleep(0.2)

    def _assert_completed(self, tag, src, sinfo, dst, dst_status):
        """Both sides say completed (@sinfo: the source's last
        query-migrate), the destination reaches @dst_status and the source
        is postmigrate.  Returns the destination's query-migrate."""
        self.assertEqual(sinfo['status'], 'completed',
                         f'{tag}: source: {sinfo.get("error-desc")}')
        dinfo = self._wait_migration(dst, f'dst-{tag}', 60)
        self.assertEqual(dinfo['status'], 'completed',
                         f'{tag}: destination: {dinfo.get("error-desc")}')
        self._wait_status(dst, f'dst-{tag}', dst_status, 30)
        self.assertEqual(src.cmd('query-status')['status'], 'postmigrate')
        return dinfo

    def _wait_migration(self, vm, name, timeout):
        """Poll query-migrate until it is over; return its last answer."""
        deadline = time.monotonic() + timeout
        while True:
            info = vm.cmd('query-migrate')
            if info.get('status') in ('completed', 'failed', 'cancelled'):
                return info
            if time.monotonic() > deadline:
                self.fail(f'{name}: migration not over after {timeout} s '
                          f'(status {info.get("status")})')
            time.sleep(0.5)

    # --- one migration --------------------------------------------------------

    def migrate_once(self, fmt, dedup, connections=1):
        """Boot a fresh guest on a fresh disk copy, let it fill its page
        cache, migrate it, check the guest's verdicts on the destination.
        The destination fetches through @connections connections to the
        export (dedup-nas-fetch-connections).  Returns timings and both
        sides' query-migrate."""
        tag = f'{"dedup" if dedup else "precopy"}-{fmt}'
        disk, path = self._export_disk(fmt)
        res = {'tag': tag, 'disk': disk, 'connections': connections}
        src = dst = None
        try:
            t0 = time.monotonic()
            src = self._new_guest_vm(f'src-{tag}', disk, fmt, dedup)
            src.launch()
            src_con = GuestConsole(self, src, f'src-{tag}')
            ready = src_con.wait(r'NASDEDUP-READY', self.BOOT_TIMEOUT)
            res['boot_s'] = time.monotonic() - t0
            self.log.info('%s: %s', tag, ready)
            m = re.search(r'read_mib=(\d+)', ready)
            self.assertIsNotNone(m, ready)
            self.assertGreaterEqual(int(m.group(1)), self.READ_MB,
                                    f'the guest read less than asked: {ready}')

            with Ports() as ports:
                port = ports.find_free_port()
                if port is None:
                    self.fail('no free TCP port for the migration')
                uri = f'tcp:127.0.0.1:{port}'
                dst = self._new_guest_vm(
                    f'dst-{tag}', disk, fmt, dedup, '-incoming', uri,
                    '-global',
                    f'migration.dedup-nas-fetch-connections={connections}')
                dst.launch()
            dst_con = GuestConsole(self, dst, f'dst-{tag}')
            self._wait_status(dst, f'dst-{tag}', 'inmigrate', 30)

            src.cmd('migrate-set-parameters',
                    **{'max-bandwidth': self.MAX_BANDWIDTH})
            caps = {c['capability']: c['state']
                    for c in src.cmd('query-migrate-capabilities')}
            self.assertEqual(caps.get('dedup-nas'), dedup)
            t1 = time.monotonic()
            src.cmd('migrate', uri=uri)
            sinfo = self._wait_migration(src, f'src-{tag}',
                                         self.MIGRATE_TIMEOUT)
            res['migrate_s'] = time.monotonic() - t1
            dinfo = self._assert_completed(tag, src, sinfo, dst, 'running')
            res['src'], res['dst'] = sinfo, dinfo

            t2 = time.monotonic()
            res['verify'] = dst_con.command('verify', self.VERIFY_TIMEOUT)
            res['verify_disk'] = dst_con.command('verify-disk',
                                                 self.VERIFY_TIMEOUT)
            res['verify_s'] = time.monotonic() - t2
        finally:
            for vm in (src, dst):
                if vm is not None:
                    vm.shutdown()
            self._remove(path)
        res['total_s'] = time.monotonic() - t0
        self._report(res)
        return res

    def _report(self, res):
        s, d, ram = res['src'], res['dst'], res['src']['ram']
        line = (f'{res["tag"]}: ram.transferred={ram["transferred"]} '
                f'({ram["transferred"] / MiB:.1f} MiB) '
                f'normal={ram["normal"]} duplicate={ram["duplicate"]} '
                f'dirty-sync-count={ram["dirty-sync-count"]} '
                f'total-time={s.get("total-time")} ms '
                f'downtime={s.get("downtime")} ms; '
                f'boot {res["boot_s"]:.1f} s, '
                f'migrate {res["migrate_s"]:.1f} s, '
                f'verify {res["verify_s"]:.1f} s, all {res["total_s"]:.1f} s')
        for side, key, info in (('src', 'dedup-nas', s),
                                ('dst', 'dedup-nas-incoming', d)):
            st = info.get(key)
            if st:
                line += f'; {side} dedup-nas ' + ' '.join(
                    f'{k}={v}' for k, v in sorted(st.items()) if v)
        self.log.info('%s', line)
        self.log.info('%s: %s | %s', res['tag'], res['verify'],
                      res['verify_disk'])
        # The TAP runner sends test output to stderr.
        print(f'# nas-dedup {line}', file=sys.stderr, flush=True)

    def check_dedup_stats(self, res):
        """
        What the counters mean (migration/nas-dedup-save.c, -load.c):
        source reference-pages counts pages of every REFS record sent (a page
        sent as a reference in two iterations counts twice), resent-pages
        the pages DEDUP_RESEND asked again; the destination starts one read
        per REFS record (fetched-blocks/-bytes on success) and resolves each
        page that still holds that record's ticket as verified-pages,
        mismatches or read-errors, asking the latter two again
        (resend-requests).  Pages superseded by newer data before their
        read completed are in none of the three, so
        verified + mismatches + read-errors <= reference-pages, not ==.
        """
        tag = res['tag']
        s = res['src'].get('dedup-nas')
        d = res['dst'].get('dedup-nas-incoming')
        self.assertIsNotNone(s, f'{tag}: no dedup-nas stats on the source')
        self.assertIsNotNone(d, f'{tag}: no dedup-nas stats on the '
                                'destination')
        ref = s['reference-pages']
        self.assertGreater(ref, 0, f'{tag}: nothing sent as a reference')
        self.assertEqual(s['bytes-saved'], ref * PAGE - s['reference-bytes'])
        self.assertLessEqual(ref, s['index-hits'])
        self.assertGreater(s['index-entries'], 0)
        self.assertEqual(d['read-errors'], 0, f'{tag}: {d}')
        # Every REFS record is read exactly once, and all reads are over
        # before the destination answers the final SYNC.
        self.assertEqual(d['fetched-blocks'], ref, f'{tag}: {s} / {d}')
        self.assertEqual(d['fetched-bytes'], d['fetched-blocks'] * PAGE)
        # The one drive is on the NFS export through libnfs: the reads take
        # turns among that many connections (its own and images opened
        # again), and the blocks still verify.
        self.assertEqual(d['fetch-connections'], res['connections'],
                         f'{tag}: {d}')
        resolved = d['verified-pages'] + d['mismatches'] + d['read-errors']
        self.assertLessEqual(resolved, ref, f'{tag}: {s} / {d}')
        self.assertGreater(d['verified-pages'], 0)
        # Each unverified page is asked again, and the source saw every
        # request before the switchover handshake ended.
        self.assertEqual(d['resend-requests'],
                         d['mismatches'] + d['read-errors'])
        self.assertEqual(s['resent-pages'], d['resend-requests'],
                         f'{tag}: {s} / {d}')
        msg = (f'{tag}: reference-pages {ref} = '
               f'verified {d["verified-pages"]} + '
               f'mismatches {d["mismatches"]} + read-errors '
               f'{d["read-errors"]} + superseded {ref - resolved}')
        self.log.info('%s', msg)
        print(f'# nas-dedup {msg}', file=sys.stderr, flush=True)

    # --- tests -------------------------------------------------------------

    def test_precopy_vs_dedup(self):
        pre = self.migrate_once('raw', dedup=False)
        self.assertNotIn('dedup-nas', pre['src'],
                         'dedup-nas statistics without the capability')
        ded = self.migrate_once('raw', dedup=True, connections=4)
        self.check_dedup_stats(ded)

        pre_bytes = pre['src']['ram']['transferred']
        ded_bytes = ded['src']['ram']['transferred']
        saved = 1 - ded_bytes / pre_bytes
        msg = (f'RAM bytes: pre-copy {pre_bytes} ({pre_bytes / MiB:.1f} MiB), '
               f'dedup-nas {ded_bytes} ({ded_bytes / MiB:.1f} MiB): '
               f'{saved * 100:.1f}% fewer')
        self.log.info('%s', msg)
        print(f'# nas-dedup {msg}', file=sys.stderr, flush=True)
        self.assertLessEqual(ded_bytes, pre_bytes * 0.5, msg)

    def test_qcow2(self):
        res = self.migrate_once('qcow2', dedup=True, connections=2)
        self.check_dedup_stats(res)

    # --- fault matrix --------------------------------------------------------
    #
    # Each case boots a small guest of its own (FM_MEM_MB of RAM, FM_READ_MB
    # of page cache), injects one fault into a dedup-nas migration and
    # accepts exactly one of two outcomes:
    #
    #   (a) the migration completes and the destination's RAM equals the
    #       source's byte for byte: the destination runs with -S, so both
    #       VMs are stopped at completion; both RAMs are dumped (pmemsave)
    #       and compared, then the destination continues and the guest's
    #       own verdict must be OK;
    #   (b) the migration fails (or is cancelled) with an error naming the
    #       cause, the source VM is running (query-status) and its guest
    #       answers with a later uptime; then a second migration, to a fresh
    #       destination and without fault, must end as (a).
    #
    # The NFS server is the export's nfs-ganesha, whose PID
    # scripts/nfs-export.sh records in $NASDEDUP_NFS_STATE/ganesha.pid.

    FM_MEM_MB = _env_int('NASDEDUP_FM_MEM_MB', 256)
    FM_READ_MB = _env_int('NASDEDUP_FM_READ_MB', 64)
    # max-bandwidth until a fault is injected in pre-copy: slow enough that
    # pre-copy lasts several seconds (the guest has about 50 MiB of RAM
    # that is neither zero nor on disk).  The guest dirties memory faster
    # than that: max-bandwidth is set back to MAX_BANDWIDTH after the
    # fault, for the migration to converge.
    FM_SLOW_BANDWIDTH = _env_int('NASDEDUP_FM_SLOW_BANDWIDTH', 8000000)
    FM_EXTRA_MB = 16        # case 7's second disk
    FM_DOWNTIME_MS = 300
    FM_SLACK_MS = 500
    # Case 2: how long past downtime-limit + slack the stalled source may
    # take to answer the monitor (TCG on 2 shared cores).
    FM_FREEZE_MARGIN_MS = 1500
    FM_MIGRATE_TIMEOUT = 120

    def _fm_append(self):
        return ('console=ttyS0 panic=-1 quiet '
                f'nasdedup.read_mb={self.FM_READ_MB} nasdedup.write_mb=4 '
                f'nasdedup.dirty_mb=4 nasdedup.churn_mb={self.fm_churn_mb} '
                'nasdedup.sync=0')

    def _fm_vm(self, name, disk, *extra, drive=None, dev=None):
        return self._new_guest_vm(name, disk, 'raw', True,
                                  *self.fm_extra, *extra,
                                  mem=f'{self.FM_MEM_MB}M',
                                  append=self._fm_append(), drive=drive,
                                  dev=dev or self.fm_dev)

    def _fm_start(self, case, *extra, churn_mb=4, both=(), dev=None):
        """Boot the source guest of @case on a fresh disk copy; its guest
        overwrites @churn_mb MiB of files in place all along.  @extra:
        more QEMU arguments for the source; @both: for every VM of the
        case; @dev: the disk's -device argument for every VM of the
        case."""
        self.fm_case = case
        self.fm_churn_mb = churn_mb
        self.fm_extra = both
        self.fm_dev = dev
        self.fm_live = None
        self.fm_inspect = None
        self.fm_t0 = time.monotonic()
        self.fm_rows = []
        disk, _ = self._export_disk('raw')
        src = self._fm_vm(f'src-{case}', disk, *extra)
        src.launch()
        con = GuestConsole(self, src, f'src-{case}')
        ready = con.wait(r'NASDEDUP-READY', self.BOOT_TIMEOUT)
        self.log.info('%s: %s (%.1f s)', case, ready,
                      time.monotonic() - self.fm_t0)
        return disk, src, con

    def _fm_dest(self, name, disk, drive=None, extra=(), dev=None):
        """A destination waiting for a migration, started paused (-S)."""
        with Ports() as ports:
            port = ports.find_free_port()
            if port is None:
                self.fail('no free TCP port for the migration')
            uri = f'tcp:127.0.0.1:{port}'
            dst = self._fm_vm(name, disk, '-S', '-incoming', uri, *extra,
                              drive=drive, dev=dev)
            dst.launch()
        self._wait_status(dst, name, 'inmigrate', 30)
        return dst, uri

    @staticmethod
    def _fm_set(vm, caps=None, **params):
        if caps:
            vm.cmd('migrate-set-capabilities', capabilities=[
                {'capability': k, 'state': v} for k, v in caps.items()])
        if params:
            vm.cmd('migrate-set-parameters',
                   args_dict={k.replace('_', '-'): v
                              for k, v in params.items()})

    def _fm_defaults(self, src):
        """Parameters of a migration without fault."""
        self._fm_set(src, caps={'pause-before-switchover': False},
                     max_bandwidth=self.MAX_BANDWIDTH,
                     downtime_limit=self.FM_DOWNTIME_MS,
                     dedup_nas_switchover_slack=2000,
                     avail_switchover_bandwidth=0)

    def _fm_wait_precopy(self, src, name, min_bytes=4 * MiB, timeout=60):
        """Wait until pre-copy is under way: references sent and @min_bytes
        on the wire.  Returns query-migrate."""
        deadline = time.monotonic() + timeout
        while True:
            info = src.cmd('query-migrate')
            st = info.get('status')
            if st == 'active' and \
               info.get('dedup-nas', {}).get('reference-pages', 0) > 0 and \
               info['ram']['transferred'] >= min_bytes:
                return info
            if st in ('completed', 'failed', 'cancelled') or \
               time.monotonic() > deadline:
                self.fail(f'{name}: pre-copy not reached (status {st}, '
                          f'{info.get("error-desc")}); lower '
                          'NASDEDUP_FM_SLOW_BANDWIDTH?')
            time.sleep(0.05)

    def _fm_wait_end(self, vm, name, timeout):
        """_wait_migration, remembering in self.fm_live the last
        query-migrate that had statistics (a failed migration's has none)."""
        deadline = time.monotonic() + timeout
        while True:
            info = vm.cmd('query-migrate')
            if 'dedup-nas' in info:
                self.fm_live = info
            if info.get('status') in ('completed', 'failed', 'cancelled'):
                return info
            if time.monotonic() > deadline:
                self.fail(f'{name}: migration not over after {timeout} s '
                          f'(status {info.get("status")})')
            time.sleep(0.2)

    def _fm_ping(self, con):
        con.send('ping')
        line = con.wait(r'NASDEDUP-PONG uptime=', 60)
        return float(re.search(r'uptime=([0-9.]+)', line).group(1))

    def _fm_ram(self, vm, path):
        vm.cmd('pmemsave', val=0, size=self.FM_MEM_MB * MiB, filename=path)
        self.addCleanup(self._remove, path)

    def _fm_compare_ram(self, tag, src, dst):
        """Dump both stopped VMs' RAM and compare it page by page."""
        fs = self.scratch_file(f'{tag}-src.ram')
        fd = self.scratch_file(f'{tag}-dst.ram')
        self._fm_ram(src, fs)
        self._fm_ram(dst, fd)
        if getattr(self, 'fm_inspect', None):
            self.fm_inspect(tag, fs)
        bad = []
        with open(fs, 'rb') as a, open(fd, 'rb') as b:
            off = 0
            while True:
                x, y = a.read(MiB), b.read(MiB)
                if x != y:
                    for p in range(0, max(len(x), len(y)), PAGE):
                        if x[p:p + PAGE] != y[p:p + PAGE]:
                            bad.append(off + p)
                if not x and not y:
                    break
                off += MiB
        self._remove(fs)
        self._remove(fd)
        self.assertEqual(len(bad), 0,
                         f'{tag}: destination RAM differs from the source '
                         f'in {len(bad)} pages, first at ' +
                         ' '.join(hex(o) for o in bad[:8]))
        self.log.info('%s: RAM identical (%d MiB)', tag, self.FM_MEM_MB)

    def _fm_expect_completed(self, tag, src, sinfo, dst):
        """Outcome (a).  Returns the destination's query-migrate."""
        dinfo = self._assert_completed(tag, src, sinfo, dst, 'paused')
        self._fm_compare_ram(tag, src, dst)
        dst.cmd('cont')
        self._wait_status(dst, f'dst-{tag}', 'running', 30)
        dcon = GuestConsole(self, dst, f'dst-{tag}')
        verdict = dcon.command('verify', self.VERIFY_TIMEOUT)
        self.log.info('%s: %s', tag, verdict)
        return dinfo

    def _fm_expect_failed(self, tag, src, con, sinfo, uptime0, cause,
                          status='failed'):
        """Outcome (b), first half: the failure and the source alive."""
        self.assertEqual(sinfo['status'], status,
                         f'{tag}: expected {status}, source says '
                         f'{sinfo["status"]} ({sinfo.get("error-desc")})')
        if cause is not None:
            self.assertRegex(sinfo.get('error-desc', ''), cause,
                             f'{tag}: the error does not name the cause')
        self._wait_status(src, f'src-{tag}', 'running', 30)
        uptime = self._fm_ping(con)
        self.assertGreater(uptime, uptime0,
                           f'{tag}: the source guest does not tick')
        self.log.info('%s: %s (%s); source running, guest uptime %.2f -> '
                      '%.2f', tag, sinfo['status'], sinfo.get('error-desc'),
                      uptime0, uptime)

    def _fm_shutdown(self, vm):
        try:
            vm.shutdown()
        except Exception as e:      # a destination that already exited
            self.log.info('shutdown %s: %s', vm._name, e)

    def _fm_row(self, tag, outcome, sinfo, dinfo=None, note=''):
        # A failed or cancelled migration's query-migrate has no statistics:
        # report the last ones seen while it ran.
        s = (sinfo.get('dedup-nas') or
             (getattr(self, 'fm_live', None) or {}).get('dedup-nas') or {})
        self.fm_live = None
        d = (dinfo or {}).get('dedup-nas-incoming') or {}
        row = {'tag': tag, 'outcome': outcome,
               'downtime': sinfo.get('downtime'),
               'resent': s.get('resent-pages', 0),
               'ref': s.get('reference-pages', 0),
               'dst': {k: d.get(k, 0) for k in
                       ('verified-pages', 'mismatches', 'read-errors',
                        'resend-requests')} if d else None,
               'error': sinfo.get('error-desc'), 'note': note}
        self.fm_rows.append(row)
        line = (f'fault {tag}: {outcome}; downtime {row["downtime"]} ms; '
                f'reference-pages {row["ref"]} resent-pages {row["resent"]}; '
                f'dst {row["dst"]}; error {row["error"]!r}'
                + (f'; {note}' if note else ''))
        self.log.info('%s', line)
        print(f'# nas-dedup {line}', file=sys.stderr, flush=True)

    def _fm_done(self):
        msg = (f'fault {self.fm_case}: wall time '
               f'{time.monotonic() - self.fm_t0:.1f} s')
        self.log.info('%s', msg)
        print(f'# nas-dedup {msg}', file=sys.stderr, flush=True)

    def _fm_migrate(self, tag, src, disk, drive=None, extra=(), dev=None):
        """A migration without fault to a fresh paused destination: must
        end as (a).  The destination is left running the guest."""
        self._fm_defaults(src)
        dst, uri = self._fm_dest(f'dst-{tag}', disk, drive=drive, extra=extra,
                                 dev=dev)
        src.cmd('migrate', uri=uri)
        sinfo = self._fm_wait_end(src, f'src-{tag}',
                                  self.FM_MIGRATE_TIMEOUT)
        dinfo = self._fm_expect_completed(tag, src, sinfo, dst)
        self._fm_row(tag, 'a', sinfo, dinfo)
        return dst, sinfo, dinfo

    def _fm_slow_precopy(self, case, src, disk):
        """Start migrating to a fresh paused destination at
        FM_SLOW_BANDWIDTH, so that a fault lands in pre-copy; return the
        destination once pre-copy is under way."""
        dst, uri = self._fm_dest(f'dst-{case}', disk)
        self._fm_defaults(src)
        self._fm_set(src, max_bandwidth=self.FM_SLOW_BANDWIDTH)
        src.cmd('migrate', uri=uri)
        self._fm_wait_precopy(src, case)
        return dst

    def _fm_second(self, case, src, disk):
        """Outcome (b), second half: migrate again, without fault."""
        dst, _, _ = self._fm_migrate(f'{case}-again', src, disk)
        self._fm_shutdown(dst)

    def _fm_at_switchover(self, case):
        """
        Boot the source of @case and migrate it to a fresh paused
        destination until it pauses before switchover (the guest stopped,
        its disks drained and flushed, the BQL free): with
        avail-switchover-bandwidth high, the switchover comes right after
        the migration starts, so most of RAM, page cache included, is sent
        as the guest is stopped.  Returns (disk, src, con, ganesha pid,
        guest uptime before, dst, downtime-limit + slack in ms).
        """
        disk, src, con = self._fm_start(case)
        _, gpid = self._ganesha_pid()
        uptime0 = self._fm_ping(con)
        dst, uri = self._fm_dest(f'dst-{case}', disk)
        self._fm_defaults(src)
        self._fm_set(src, caps={'pause-before-switchover': True,
                                'events': True},
                     downtime_limit=self.FM_DOWNTIME_MS,
                     dedup_nas_switchover_slack=self.FM_SLACK_MS,
                     avail_switchover_bandwidth=10 * 1000 * MiB)
        src.cmd('migrate', uri=uri)
        self._wait_status_migrate(src, case, 'pre-switchover', 60)
        return (disk, src, con, gpid, uptime0, dst,
                self.FM_DOWNTIME_MS + self.FM_SLACK_MS)

    # --- the NFS server ------------------------------------------------------

    def _ganesha_pid(self):
        state = os.environ.get('NASDEDUP_NFS_STATE',
                               os.path.join(TOP, 'build', 'nfs'))
        try:
            with open(os.path.join(state, 'ganesha.pid')) as f:
                pid = int(f.read().strip())
            with open(f'/proc/{pid}/comm') as f:
                comm = f.read().strip()
        except (OSError, ValueError) as e:
            self._missing(f'no ganesha PID in {state}/ganesha.pid ({e})')
        if comm != 'ganesha.nfsd':
            self._missing(f'pid {pid} of {state}/ganesha.pid is {comm}')
        return state, pid

    def _ganesha_restart(self):
        """Start nfs-ganesha again as scripts/nfs-export.sh does (this test
        runs in the export's network namespace), record its PID where
        nfs-export.sh stop finds it, wait until it serves."""
        state = os.environ.get('NASDEDUP_NFS_STATE',
                               os.path.join(TOP, 'build', 'nfs'))
        with open(os.path.join(state, 'ganesha.out'), 'ab') as out:
            proc = subprocess.Popen(
                ['ganesha.nfsd', '-F',
                 '-L', os.path.join(state, 'ganesha.log'),
                 '-f', os.path.join(state, 'ganesha.conf'),
                 '-p', os.path.join(state, 'ganesha.daemon.pid')],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True)
        with open(os.path.join(state, 'ganesha.pid.tmp'), 'w') as f:
            f.write(f'{proc.pid}\n')
        os.replace(os.path.join(state, 'ganesha.pid.tmp'),
                   os.path.join(state, 'ganesha.pid'))
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                return f'ganesha exited ({proc.returncode})'
            r = subprocess.run(['nfs-ls', self.nfs_url], check=False,
                               capture_output=True, timeout=10)
            if r.returncode == 0:
                return None
            if time.monotonic() > deadline:
                return 'ganesha does not serve after 30 s'
            time.sleep(0.2)

    def _ganesha_ensure(self):
        """Restart ganesha unless the one in ganesha.pid runs."""
        state = os.environ.get('NASDEDUP_NFS_STATE',
                               os.path.join(TOP, 'build', 'nfs'))
        try:
            with open(os.path.join(state, 'ganesha.pid')) as f:
                pid = int(f.read().strip())
            with open(f'/proc/{pid}/stat') as f:
                stat = f.read()
            if '(ganesha.nfsd) ' in stat and \
               stat.split(') ', 1)[1][0] != 'Z':
                return
        except (OSError, ValueError):
            pass
        err = self._ganesha_restart()
        if err:
            self.log.warning('ganesha restart: %s', err)

    # --- the cases -----------------------------------------------------------

    def test_fault_01_nfs_sigstop_precopy(self):
        """NFS server stopped (SIGSTOP) for 2 s in pre-copy: (a)."""
        case = 'f1-nfs-stop-precopy'
        disk, src, con = self._fm_start(case)
        _, gpid = self._ganesha_pid()
        dst = self._fm_slow_precopy(case, src, disk)
        os.kill(gpid, signal.SIGSTOP)
        try:
            time.sleep(2)
            during = src.cmd('query-migrate')['status']
        finally:
            os.kill(gpid, signal.SIGCONT)
        self.assertEqual(during, 'active',
                         f'{case}: pre-copy was over before SIGCONT')
        # The guest dirties more than FM_SLOW_BANDWIDTH: converge now.
        self._fm_set(src, max_bandwidth=self.MAX_BANDWIDTH)
        sinfo = self._fm_wait_end(src, f'src-{case}',
                                     self.FM_MIGRATE_TIMEOUT)
        dinfo = self._fm_expect_completed(case, src, sinfo, dst)
        self._fm_row(case, 'a', sinfo, dinfo, 'ganesha stopped 2 s')
        self._fm_done()

    def test_fault_02_nfs_sigstop_switchover(self):
        """
        NFS server stopped at switchover for longer than downtime-limit +
        dedup-nas-switchover-slack: (b), and the source's freeze bounded.

        To stop the server at the handshake every time, the source pauses
        before switchover (capability pause-before-switchover: the guest
        is already stopped, its disks drained and flushed, the BQL free):
        the test stops ganesha there and lets the migration go on
        (migrate-continue).  avail-switchover-bandwidth is set high so
        that the switchover comes right after the migration starts: most
        of RAM, page cache included, is then sent as the guest is stopped,
        after ganesha was, so the handshake has references that cannot be
        read.  The pause counts in the bound (it runs from the moment the
        guest stopped).
        """
        case = 'f2-nfs-stop-switchover'
        disk, src, con, gpid, uptime0, dst, bound_ms = \
            self._fm_at_switchover(case)
        t_stop = time.monotonic()
        os.kill(gpid, signal.SIGSTOP)
        # Whatever happens, ganesha runs again after 10 s (well past the
        # bound, so a source frozen until then is caught).
        safety = threading.Timer(10, os.kill, (gpid, signal.SIGCONT))
        safety.start()
        problems = []
        try:
            src.cmd('migrate-continue', state='pre-switchover')
            ev = src.events_wait(
                [('MIGRATION', {'data': {'status': 'failed'}}),
                 ('MIGRATION', {'data': {'status': 'completed'}})],
                timeout=30)
            t_failed = time.monotonic()
            # The source must answer its monitor, ganesha still stopped.
            t = time.monotonic()
            status = src.cmd('query-status')['status']
            t_answer = time.monotonic()
            latency_ms = (t_answer - t) * 1000
            freeze_ms = (t_answer - t_stop) * 1000
            stalled = safety.is_alive()
        finally:
            safety.cancel()
            os.kill(gpid, signal.SIGCONT)
        self.log.info('%s: failed event %.0f ms after ganesha stopped (%s); '
                      'query-status answered %s in %.0f ms, %.0f ms after '
                      'ganesha stopped (still stopped: %s)', case,
                      (t_failed - t_stop) * 1000, ev, status, latency_ms,
                      freeze_ms, stalled)
        if not stalled or freeze_ms > bound_ms + self.FM_FREEZE_MARGIN_MS:
            # This caught a freeze (fixed): the handshake gave up in time,
            # but migration_iteration_finish() reactivated the source's
            # disks with the BQL held, and nfs_co_getlength() (the first
            # version of patch 0005, an NFS GETATTR) waited for the stopped
            # server until the 10 s timer above sent SIGCONT.  See
            # docs/devel/nas-dedup.rst, "Fault matrix".
            problems.append(
                f'the source did not answer query-status within '
                f'downtime-limit + slack ({bound_ms} ms) + '
                f'{self.FM_FREEZE_MARGIN_MS} ms of the guest stop while '
                f'NFS was stalled: it answered after {freeze_ms:.0f} ms '
                f'(the query itself waited {latency_ms:.0f} ms; ganesha '
                f'still stopped then: {stalled})')
        sinfo = self._fm_wait_end(src, f'src-{case}', 30)
        self._fm_shutdown(dst)
        self._fm_expect_failed(case, src, con, sinfo, uptime0,
                               r'switchover-slack|switchover')
        self._fm_row(case, 'b', sinfo,
                     note=f'freeze {freeze_ms:.0f} ms (bound {bound_ms} ms '
                          f'+ {self.FM_FREEZE_MARGIN_MS} ms margin)')
        self._fm_second(case, src, disk)
        self._fm_done()
        self.assertEqual(problems, [], f'{case}: ' + '; '.join(problems))

    def test_fault_03_nfs_sigkill_precopy(self):
        """NFS server killed (SIGKILL) in pre-copy, for good: (a) or (b);
        then the export is started again for a second migration."""
        case = 'f3-nfs-kill-precopy'
        disk, src, con = self._fm_start(case)
        _, gpid = self._ganesha_pid()
        uptime0 = self._fm_ping(con)
        dst = self._fm_slow_precopy(case, src, disk)
        t_kill = time.monotonic()
        os.kill(gpid, signal.SIGKILL)
        self.addCleanup(self._ganesha_ensure)   # if this case fails midway
        self._fm_set(src, max_bandwidth=self.MAX_BANDWIDTH)
        # Bounded even if the source froze waiting for its own storage:
        # the export comes back after 120 s whatever happens.
        restart = []            # [error or None] once ganesha was started
        safety = threading.Timer(120, lambda: restart.append(
            self._ganesha_restart()))
        safety.start()
        try:
            sinfo = self._fm_wait_end(src, f'src-{case}', 110)
        finally:
            safety.cancel()
        t_end = time.monotonic()
        if safety.is_alive():
            safety.join()
        note = f'ended {t_end - t_kill:.1f} s after the kill'
        if restart:
            note += '; the export was restarted by the 120 s timer'
        self.log.info('%s: migration %s, %s', case, sinfo['status'], note)
        self.assertIn(sinfo['status'], ('completed', 'failed'),
                      f'{case}: neither outcome (a) nor (b)')
        if not restart:
            restart.append(self._ganesha_restart())
        if restart[0]:
            self.log.warning('%s: export not back: %s', case, restart[0])
        if sinfo['status'] == 'completed':
            dinfo = self._fm_expect_completed(case, src, sinfo, dst)
            self._fm_row(case, 'a', sinfo, dinfo, note)
        else:
            self._fm_shutdown(dst)
            self._fm_expect_failed(case, src, con, sinfo, uptime0,
                                   r'dedup-nas|SYNC|stalled|NFS|nfs')
            self._fm_row(case, 'b', sinfo, note=note)
            if restart[0]:
                # The source survived; without an export there is nothing
                # to migrate to.
                self.log.warning('%s: no second migration: %s', case,
                                 restart[0])
            else:
                self._fm_second(case, src, disk)
        self._fm_done()

    def test_fault_04_dst_read_errors(self):
        """
        Only the destination cannot read: its drive is wrapped in blkdebug
        injecting EIO into every read (event read_aio of the raw format
        node) while the migration comes in, so every reference is repaired
        by resends: (a).  A guest write (event write_aio, only possible
        once the destination runs) switches blkdebug to state 2, where
        reads work again, so the guest can go on after the check.
        """
        case = 'f4-dst-read-errors'
        disk, src, con = self._fm_start(case)
        m = re.fullmatch(r'nfs://([^/]+)(/.*)', self.nfs_url)
        self.assertIsNotNone(m, self.nfs_url)
        drive = ('if=none,id=disk0,format=raw,cache.direct=on,'
                 'file.driver=blkdebug,file.image.driver=nfs,'
                 f'file.image.server.type=inet,'
                 f'file.image.server.host={m.group(1)},'
                 f'file.image.path={m.group(2)}/{disk},'
                 'file.inject-error.0.event=read_aio,'
                 'file.inject-error.0.state=1,'
                 'file.inject-error.0.errno=5,'
                 'file.set-state.0.event=write_aio,'
                 'file.set-state.0.state=1,'
                 'file.set-state.0.new_state=2')
        dst, sinfo, dinfo = self._fm_migrate(case, src, disk, drive=drive)
        s, d = sinfo['dedup-nas'], dinfo['dedup-nas-incoming']
        self.assertGreater(s['reference-pages'], 0, f'{case}: {s}')
        self.assertGreater(d['mismatches'] + d['read-errors'], 0,
                           f'{case}: {d}')
        self.assertGreater(d['resend-requests'], 0, f'{case}: {d}')
        self.assertEqual(d['verified-pages'], 0,
                         f'{case}: a read got through blkdebug: {d}')
        self.assertEqual(s['resent-pages'], d['resend-requests'],
                         f'{case}: {s} / {d}')
        self._fm_shutdown(dst)
        self._fm_done()

    def test_fault_05_dst_sigkill(self):
        """Destination QEMU killed (SIGKILL) in pre-copy: (b)."""
        case = 'f5-dst-kill'
        disk, src, con = self._fm_start(case)
        uptime0 = self._fm_ping(con)
        dst = self._fm_slow_precopy(case, src, disk)
        dst.kill()
        sinfo = self._fm_wait_end(src, f'src-{case}', 60)
        self._fm_expect_failed(
            case, src, con, sinfo, uptime0,
            r'(?i)socket|connection|pipe|reset|return path|channel|'
            r'I/O|closed')
        self._fm_row(case, 'b', sinfo)
        self._fm_second(case, src, disk)
        self._fm_done()

    def test_fault_06_cancel_precopy(self):
        """migrate_cancel in pre-copy, then migrate again: cancelled, the
        source running, the second migration (a)."""
        case = 'f6-cancel'
        disk, src, con = self._fm_start(case)
        uptime0 = self._fm_ping(con)
        dst = self._fm_slow_precopy(case, src, disk)
        src.cmd('migrate_cancel')
        sinfo = self._fm_wait_end(src, f'src-{case}', 60)
        self._fm_shutdown(dst)
        self._fm_expect_failed(case, src, con, sinfo, uptime0, None,
                               status='cancelled')
        self._fm_row(case, 'b', sinfo)
        self._fm_second(case, src, disk)
        self._fm_done()

    def test_fault_07_unplugged_drive(self):
        """
        A second disk, read whole by the guest (its blocks in the page
        cache, so in the index), hot-unplugged before the migration; the
        destination has no such drive.  The source must not send
        references to the unplugged drive: (a), and no page asked again
        (the guest overwrites no file in place here, so nothing else makes
        the destination ask).  The unplugged disk's blocks must still be in
        the source guest's RAM at the end (the case counts them), or the
        case would prove nothing.
        """
        case = 'f7-unplugged'
        name = f'{self.prefix}-{uuid.uuid4().hex[:8]}-extra.raw'
        path = os.path.join(self.export_dir, name)
        self.addCleanup(self._remove, path)
        blocks = set()
        with open(path, 'wb') as f:
            for _ in range(self.FM_EXTRA_MB * MiB // PAGE):
                b = os.urandom(PAGE)
                blocks.add(hashlib.sha1(b).digest())
                f.write(b)
        port = ('-device', 'pcie-root-port,id=rp1,chassis=1,slot=1')
        disk, src, con = self._fm_start(
            case, *port,
            '-drive', f'file={self.nfs_url}/{name},format=raw,if=none,'
                      'id=disk1,cache.direct=on',
            '-device', 'virtio-blk-pci,drive=disk1,id=vd1,bus=rp1',
            churn_mb=0)
        self.log.info('%s: %s', case, con.command('readdev vdb', 120))
        src.cmd('device_del', id='vd1')
        src.event_wait('DEVICE_DELETED', timeout=60,
                       match={'data': {'device': 'vd1'}})
        # The -drive's BlockBackend went with the device (auto-deletion).

        found = []

        def inspect(tag, ram):
            n = 0
            with open(ram, 'rb') as f:
                while True:
                    p = f.read(PAGE)
                    if not p:
                        break
                    n += hashlib.sha1(p).digest() in blocks
            found.append(n)
            self.log.info('%s: %d pages of the unplugged disk in RAM', tag, n)
        self.fm_inspect = inspect

        dst, sinfo, dinfo = self._fm_migrate(case, src, disk, extra=port)
        s, d = sinfo['dedup-nas'], dinfo['dedup-nas-incoming']
        self.assertGreater(s['reference-pages'], 0, f'{case}: {s}')
        self.assertGreater(found[0], self.FM_EXTRA_MB * MiB // PAGE // 4,
                           f'{case}: the unplugged disk is not in RAM')
        self.assertEqual(d['resend-requests'], 0, f'{case}: {d}')
        self.assertEqual(d['mismatches'] + d['read-errors'], 0, f'{case}: {d}')
        self._fm_shutdown(dst)
        self._fm_done()

    def test_fault_08_iothread_heavy_io(self):
        """
        The disk in an iothread (the tracking hook runs there, not in the
        main loop), the guest reading and writing hard while it migrates
        (iobench: drop the page cache, read 32 MiB of files, write 16 MiB;
        the churner overwriting 16 MiB of files in place): (a).
        """
        case = 'f8-iothread-io'
        disk, src, con = self._fm_start(
            case, churn_mb=16, both=('-object', 'iothread,id=io0'),
            dev='virtio-blk-pci,drive=disk0,id=vd0,iothread=io0')
        dst = self._fm_slow_precopy(case, src, disk)
        con.send('iobench 16 32')
        line = con.wait(r'NASDEDUP-IOBENCH', 120)
        during = src.cmd('query-migrate')['status']
        self.log.info('%s: %s (migration %s)', case, line, during)
        self.assertEqual(during, 'active',
                         f'{case}: pre-copy was over before the I/O ended')
        self.assertNotIn('FAIL', line)
        self._fm_set(src, max_bandwidth=self.MAX_BANDWIDTH)
        sinfo = self._fm_wait_end(src, f'src-{case}',
                                  self.FM_MIGRATE_TIMEOUT)
        dinfo = self._fm_expect_completed(case, src, sinfo, dst)
        s, d = sinfo['dedup-nas'], dinfo['dedup-nas-incoming']
        # The iothread's I/O was tracked: references were sent and verified.
        self.assertGreater(s['reference-pages'], 0, f'{case}: {s}')
        self.assertGreater(d['verified-pages'], 0, f'{case}: {d}')
        self._fm_row(case, 'a', sinfo, dinfo, 'iobench during pre-copy')
        self._fm_shutdown(dst)
        self._fm_done()

    def test_fault_09_dst_sigkill_handshake(self):
        """
        Destination killed (SIGKILL) during the switchover handshake: (b),
        the source's freeze bounded.  As in case 2, the source pauses
        before switchover and ganesha is stopped there, so that the
        handshake waits for reads; the destination is killed 200 ms into
        it, ganesha let go on right after.
        """
        case = 'f9-dst-kill-handshake'
        disk, src, con, gpid, uptime0, dst, bound_ms = \
            self._fm_at_switchover(case)
        os.kill(gpid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            src.cmd('migrate-continue', state='pre-switchover')
            time.sleep(0.2)
            dst.kill()
        finally:
            os.kill(gpid, signal.SIGCONT)
        sinfo = self._fm_wait_end(src, f'src-{case}', 30)
        t_end = (time.monotonic() - t0) * 1000
        # The dead destination, not the switchover bound, ended it.
        self._fm_expect_failed(
            case, src, con, sinfo, uptime0,
            r'(?i)socket|connection|pipe|reset|return path|channel|'
            r'I/O|closed')
        self.assertNotRegex(sinfo.get('error-desc', ''), 'switchover-slack')
        self.assertLess(t_end, bound_ms + self.FM_FREEZE_MARGIN_MS + 1000,
                        f'{case}: failed {t_end:.0f} ms after switchover')
        self._fm_row(case, 'b', sinfo,
                     note=f'failed {t_end:.0f} ms after the switchover '
                          f'started')
        self._fm_second(case, src, disk)
        self._fm_done()

    def test_fault_10_nfs_sigstop_30s_precopy(self):
        """
        NFS server stopped for 30 s in pre-copy: longer than the live SYNC
        bound's base (30 s), so the migration may complete (a) or fail
        (b) if a live SYNC was waiting; either way never a third outcome.
        """
        case = 'f10-nfs-stop-30s'
        disk, src, con = self._fm_start(case)
        _, gpid = self._ganesha_pid()
        uptime0 = self._fm_ping(con)
        dst = self._fm_slow_precopy(case, src, disk)
        os.kill(gpid, signal.SIGSTOP)
        try:
            time.sleep(30)
            during = src.cmd('query-migrate')['status']
            uptime_stalled = self._fm_ping(con)
        finally:
            os.kill(gpid, signal.SIGCONT)
        self.log.info('%s: after 30 s: migration %s, guest uptime %.2f',
                      case, during, uptime_stalled)
        self.assertGreater(uptime_stalled, uptime0)
        if during == 'active':
            self._fm_set(src, max_bandwidth=self.MAX_BANDWIDTH)
        sinfo = self._fm_wait_end(src, f'src-{case}',
                                  self.FM_MIGRATE_TIMEOUT)
        if sinfo['status'] == 'completed':
            dinfo = self._fm_expect_completed(case, src, sinfo, dst)
            self._fm_row(case, 'a', sinfo, dinfo, 'ganesha stopped 30 s')
            self._fm_shutdown(dst)
        else:
            self._fm_shutdown(dst)
            self._fm_expect_failed(case, src, con, sinfo, uptime0,
                                   r'SYNC|switchover|shared storage')
            self._fm_row(case, 'b', sinfo, note='ganesha stopped 30 s')
            self._fm_second(case, src, disk)
        self._fm_done()

    def test_fault_11_resized_drive(self):
        """The drive grown with block_resize (the guest sees it) before
        the migration: (a)."""
        case = 'f11-resized'
        disk, src, con = self._fm_start(case, churn_mb=0)
        size = os.path.getsize(os.path.join(self.export_dir, disk))
        src.cmd('block_resize', device='disk0', size=size + 64 * MiB)
        self.assertEqual(os.path.getsize(os.path.join(self.export_dir, disk)),
                         size + 64 * MiB)
        dst, sinfo, dinfo = self._fm_migrate(case, src, disk)
        s, d = sinfo['dedup-nas'], dinfo['dedup-nas-incoming']
        self.assertGreater(s['reference-pages'], 0, f'{case}: {s}')
        self.assertEqual(d['resend-requests'], 0, f'{case}: {d}')
        self._fm_shutdown(dst)
        self._fm_done()

    def test_fault_12_other_device_id(self):
        """
        The destination's disk device has another id (vd1, not vd0): the
        source names the drive by its device, so the destination cannot
        resolve any reference and asks for every page again: (a), with
        resend-requests = reference-pages.
        """
        case = 'f12-other-id'
        disk, src, con = self._fm_start(case, churn_mb=0)
        dst, sinfo, dinfo = self._fm_migrate(
            case, src, disk, dev='virtio-blk-pci,drive=disk0,id=vd1')
        s, d = sinfo['dedup-nas'], dinfo['dedup-nas-incoming']
        self.assertGreater(s['reference-pages'], 0, f'{case}: {s}')
        self.assertEqual(d['verified-pages'], 0, f'{case}: {d}')
        self.assertEqual(d['resend-requests'], s['reference-pages'],
                         f'{case}: {s} / {d}')
        self.assertEqual(s['resent-pages'], s['reference-pages'],
                         f'{case}: {s}')
        self._fm_shutdown(dst)
        self._fm_done()

    def test_postcopy(self):
        """dedup-nas with postcopy-ram, postcopy asked for right after
        migrate: the first pass sends references only, postcopy starts
        after it, and the destination reads the referenced blocks while
        the guest runs there (the fill); once over, the destination
        (paused, -S) holds the source's RAM byte for byte, and the guest's
        verdict is OK."""
        case = 'postcopy'
        disk, src, con = self._fm_start(
            case, both=('-global', 'migration.x-postcopy-ram=on'))
        dst, uri = self._fm_dest(f'dst-{case}', disk)
        self._fm_defaults(src)
        # The guest dirties memory faster than FM_SLOW_BANDWIDTH, and with
        # 1 ms of downtime pre-copy cannot end: postcopy must.  Its start
        # is in the MIGRATION events (it may be over between two queries).
        self._fm_set(src, caps={'events': True}, downtime_limit=1,
                     max_bandwidth=self.FM_SLOW_BANDWIDTH)
        src.cmd('migrate', uri=uri)
        src.cmd('migrate-start-postcopy')
        t0 = time.monotonic()
        while True:
            info = src.cmd('query-migrate')
            if 'dedup-nas' in info:
                self.fm_live = info
            if info['status'] in ('completed', 'failed', 'cancelled'):
                break
            if time.monotonic() - t0 > self.FM_MIGRATE_TIMEOUT:
                self.fail(f'{case}: not over after {self.FM_MIGRATE_TIMEOUT}'
                          f' s (status {info["status"]})')
            time.sleep(0.05)
        states = [e['data']['status'] for e in src.get_qmp_events()
                  if e['event'] == 'MIGRATION']
        self.assertIn('postcopy-active', states, f'{case}: postcopy never '
                      f'started ({info["status"]}: {info.get("error-desc")})')
        switch_s = time.monotonic() - t0
        dinfo = self._fm_expect_completed(case, src, info, dst)
        s, d = info['dedup-nas'], dinfo['dedup-nas-incoming']
        self.assertGreater(s['reference-pages'], 0,
                           f'{case}: no reference before postcopy: {s}')
        # Every reference read, before the switch or by the fill, at most:
        # with the meet, the source sends the pages the fill has not
        # reached, and the migration ends without the reads left with
        # nothing to place (skipped, or cancelled in flight).
        self.assertLessEqual(d['fetched-blocks'], s['reference-pages'],
                             f'{case}: {d}')
        self.assertGreater(d['fetched-blocks'], 0, f'{case}: {d}')
        # Each reference resolved once at most: verified, asked again, or
        # sent by the source before the fill placed it (the others were
        # superseded by newer data).
        self.assertLessEqual(d['verified-pages'] + d['mismatches'] +
                             d['read-errors'] + d['postcopy-fill-faults'] +
                             d['postcopy-fill-met'], s['reference-pages'],
                             f'{case}: {s} / {d}')
        # Asked again: what did not verify, and what the guest touched
        # before the fill placed it.
        self.assertEqual(d['resend-requests'],
                         d['mismatches'] + d['read-errors'] +
                         d['postcopy-fill-faults'], f'{case}: {d}')
        self.assertEqual(s['resent-pages'], d['resend-requests'],
                         f'{case}: {s} / {d}')
        self.assertLessEqual(d['postcopy-fill-pages'], d['verified-pages'],
                             f'{case}: {d}')
        self._fm_row(case, 'a', info, dinfo,
                     f'states {" ".join(states)}; completed after '
                     f'{switch_s:.1f} s; filled after the switch '
                     f'{d["postcopy-fill-pages"]} pages, '
                     f'{d["postcopy-fill-faults"]} faults to the source')
        self._fm_shutdown(dst)
        self._fm_done()

    def _wait_status_migrate(self, vm, name, want, timeout):
        deadline = time.monotonic() + timeout
        while True:
            info = vm.cmd('query-migrate')
            if 'dedup-nas' in info:
                self.fm_live = info
            if info.get('status') == want:
                return info
            if info.get('status') in ('completed', 'failed', 'cancelled') \
               or time.monotonic() > deadline:
                self.fail(f'{name}: migration status {info.get("status")} '
                          f'({info.get("error-desc")}), not {want}')
            time.sleep(0.02)


if __name__ == '__main__':
    QemuSystemTest.main()
