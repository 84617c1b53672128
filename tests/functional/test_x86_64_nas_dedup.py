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

import logging
import os
import re
import socket
import subprocess
import sys
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

    DEDUP_ARGS = ('-global', 'migration.x-dedup-nas=on',
                  '-global', 'migration.x-return-path=on')

    def setUp(self):
        super().setUp()
        self.strict = os.environ.get('NASDEDUP_FT_STRICT', '0') == '1'
        self.guest_dir = os.environ.get('NASDEDUP_GUEST_DIR',
                                        os.path.join(TOP, 'build', 'guest'))
        self.export_dir = os.environ.get('NASDEDUP_EXPORT_DIR',
                                         os.path.join(TOP, 'build',
                                                      'nfs-export'))
        self.nfs_url = os.environ.get('NASDEDUP_NFS_URL',
                                      'nfs://127.0.0.1/export').rstrip('/')
        self.prefix = os.environ.get('NASDEDUP_FT_PREFIX', f'ft-{os.getpid()}')
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

    def _new_guest_vm(self, name, disk, fmt, dedup, *extra):
        vm = self.get_vm(*extra, name=name)
        vm.set_console()
        vm.add_args(*self.fw_args,
                    '-accel', 'tcg', '-m', self.MEM, '-smp', '1',
                    '-nodefaults', '-no-reboot',
                    '-kernel', os.path.join(self.guest_dir, 'vmlinuz'),
                    '-initrd', os.path.join(self.guest_dir, 'initrd.gz'),
                    '-append', self._append(),
                    '-drive', f'file={self.nfs_url}/{disk},format={fmt},'
                              'if=none,id=disk0,cache.direct=on',
                    '-device', 'virtio-blk-pci,drive=disk0,id=vd0')
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

    def migrate_once(self, fmt, dedup):
        """Boot a fresh guest on a fresh disk copy, let it fill its page
        cache, migrate it, check the guest's verdicts on the destination.
        Returns timings and both sides' query-migrate."""
        tag = f'{"dedup" if dedup else "precopy"}-{fmt}'
        disk, path = self._export_disk(fmt)
        res = {'tag': tag, 'disk': disk}
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
                dst = self._new_guest_vm(f'dst-{tag}', disk, fmt, dedup,
                                         '-incoming', uri)
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
            self.assertEqual(sinfo['status'], 'completed',
                             f'{tag}: source: {sinfo.get("error-desc")}')
            dinfo = self._wait_migration(dst, f'dst-{tag}', 60)
            self.assertEqual(dinfo['status'], 'completed',
                             f'{tag}: destination: {dinfo.get("error-desc")}')
            self._wait_status(dst, f'dst-{tag}', 'running', 30)
            self.assertEqual(src.cmd('query-status')['status'], 'postmigrate')
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
                f'boot {res["boot_s"]:.1f} s, migrate {res["migrate_s"]:.1f} s, '
                f'verify {res["verify_s"]:.1f} s, all {res["total_s"]:.1f} s')
        for side, info in (('src', s), ('dst', d)):
            st = info.get('dedup-nas')
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
        source ref-pages counts pages of every REFS record sent (a page
        sent as a reference in two iterations counts twice), resent-pages
        the pages DEDUP_RESEND asked again; the destination starts one read
        per REFS record (fetched-blocks/-bytes on success) and resolves each
        page that still holds that record's ticket as verified-pages,
        mismatches or read-errors, asking the latter two again
        (resend-requests).  Pages superseded by newer data before their
        read completed are in none of the three, so
        verified + mismatches + read-errors <= ref-pages, not ==.
        """
        tag = res['tag']
        s = res['src'].get('dedup-nas')
        d = res['dst'].get('dedup-nas')
        self.assertIsNotNone(s, f'{tag}: no dedup-nas stats on the source')
        self.assertIsNotNone(d, f'{tag}: no dedup-nas stats on the '
                                'destination')
        ref = s['ref-pages']
        self.assertGreater(ref, 0, f'{tag}: nothing sent as a reference')
        self.assertEqual(s['bytes-saved'], ref * PAGE - s['ref-bytes'])
        self.assertLessEqual(ref, s['index-hits'])
        self.assertGreater(s['index-entries'], 0)
        self.assertEqual(d['read-errors'], 0, f'{tag}: {d}')
        # Every REFS record is read exactly once, and all reads are over
        # before the destination answers the final SYNC.
        self.assertEqual(d['fetched-blocks'], ref, f'{tag}: {s} / {d}')
        self.assertEqual(d['fetched-bytes'], d['fetched-blocks'] * PAGE)
        resolved = d['verified-pages'] + d['mismatches'] + d['read-errors']
        self.assertLessEqual(resolved, ref, f'{tag}: {s} / {d}')
        self.assertGreater(d['verified-pages'], 0)
        # Each unverified page is asked again, and the source saw every
        # request before the switchover handshake ended.
        self.assertEqual(d['resend-requests'],
                         d['mismatches'] + d['read-errors'])
        self.assertEqual(s['resent-pages'], d['resend-requests'],
                         f'{tag}: {s} / {d}')
        msg = (f'{tag}: ref-pages {ref} = verified {d["verified-pages"]} + '
               f'mismatches {d["mismatches"]} + read-errors '
               f'{d["read-errors"]} + superseded {ref - resolved}')
        self.log.info('%s', msg)
        print(f'# nas-dedup {msg}', file=sys.stderr, flush=True)

    # --- tests -------------------------------------------------------------

    def test_precopy_vs_dedup(self):
        pre = self.migrate_once('raw', dedup=False)
        self.assertNotIn('dedup-nas', pre['src'],
                         'dedup-nas statistics without the capability')
        ded = self.migrate_once('raw', dedup=True)
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
        res = self.migrate_once('qcow2', dedup=True)
        self.check_dedup_stats(res)


if __name__ == '__main__':
    QemuSystemTest.main()
