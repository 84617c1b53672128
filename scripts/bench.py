#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Benchmark dedup-nas against QEMU's own migration modes, side by side.

Every run boots the test guest from the NFS export, fills its page cache,
live-migrates it with one mode (scripts/e2e-smoke.sh does the run and the
guest's verification) and records what query-migrate reports.  For each run
the stopped source's RAM and the disk at switchover are saved and compared
to compute the floor: what a migration must send at least when every page
whose content is on the shared disk goes as a reference.

    floor = 4096 * (non-zero pages whose content is on no disk block)
          + REF_COST * (non-zero pages whose content is on the disk)

REF_COST is 16 bytes, the two keyed XXH3-64 a verifiable reference carries;
zero pages are counted as free.

Matrices (--matrix):
  smoke     one scenario, pre-copy and dedup-nas (part of the test command)
  links     1 GiB at 60 % page cache on 1 GbE, 10 GbE and uncapped, and at
            0 % on 10 GbE, every mode, each scenario without and with
            destination RAM preallocation ("dst prealloc": -mem-prealloc on
            the destination QEMU only); then the scaling series; tracking
            overhead (about 1 h 45 min, see docs/benchmark-links.md)
  postcopy  1 GiB at 60 % page cache on 1 GbE: pre-copy, postcopy,
            dedup-nas and dedup-nas+postcopy (postcopy asked for right
            after migrate): when the guest runs on the destination, when
            the last page is there; then postcopy and dedup-nas+postcopy
            with the guest reading 64 MiB of its page cache over and over:
            fault latency and the guest's own timing (about 7 min)
  scaling   the scaling series alone: 60 % page cache, idle, raw, 1 GbE,
            guests of 1, 2, 4 and 8 GiB, each with its own data disk,
            the upstream and dedup-nas modes (no xbzrle at 4 and 8 GiB);
            no floor (about 50 min)
  standard  the results page: page-cache share sweep on the 1 GbE model,
            plus a dirtying workload, qcow2, an uncapped link and 2 GiB at
            60 %; tracking overhead
  full      every combination of RAM {1G, 2G} x page cache {0, 30, 60,
            85 %} x workload {idle, busy} x format {raw, qcow2} x link
            {1 GbE, uncapped} x mode (hours)

--only REGEX keeps the scenarios whose label (as in the tables, e.g.
"2G, 60% cache, idle, raw, 1GbE, scaling") matches, --modes a subset of
the modes: e.g. --matrix scaling --only '^(1G|2G),' for a short test.

Besides the runs: after each scenario with dedup-nas runs, the storage
limit, the raw read throughput of the data disk image on the export
through QEMU's libnfs driver (qemu-img bench, 1 and FETCH_CONNECTIONS
connections), next to the destination's fetch throughput; for each run the
CPU time of both QEMUs from `migrate` to completion (e2e-smoke.sh's
src_cpu_s / dst_cpu_s), reported per GiB of guest RAM in the scaling table.

Writes CSV, Markdown and a PNG plot to --out (build/bench/); with --doc,
also the results page docs/benchmark.md (+ .csv, .png).  Prints a line per
run while it goes.
"""
import argparse
import csv
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E2E = os.path.join(TOP, "scripts", "e2e-smoke.sh")
PAGE = 4096
REF_COST = 16
LINK_1GBE = 125000000           # bytes/s: 1 Gbit/s
LINK_10GBE = 1250000000         # bytes/s: 10 Gbit/s
MULTIFD = "-global migration.x-multifd=on -global migration.multifd-channels=2"
DEDUP = "-global migration.x-dedup-nas=on -global migration.x-return-path=on"
POSTCOPY = "-global migration.x-postcopy-ram=on"

MODES = {
    # name: (caps on both sides, source params, destination params, QEMU args)
    "pre-copy": ("", {}, {}, ""),
    "xbzrle": ("xbzrle", {}, {}, ""),
    # multifd must be on before the destination's -incoming starts.
    "multifd": ("", {}, {}, MULTIFD),
    "multifd+zstd": ("", {}, {}, MULTIFD + " -global migration.multifd-compression=zstd"),
    "dedup-nas": ("", {}, {}, DEDUP),
    "dedup-nas+multifd": ("", {}, {}, DEDUP + " " + MULTIFD),
    "dedup-nas+multifd+zstd": ("", {}, {},
                               DEDUP + " " + MULTIFD + " -global migration.multifd-compression=zstd"),
    # migrate-start-postcopy right after migrate (e2e-smoke.sh NASDEDUP_POSTCOPY).
    "postcopy": ("", {}, {}, POSTCOPY),
    "dedup-nas+postcopy": ("", {}, {}, DEDUP + " " + POSTCOPY),
}
POSTCOPY_MODES = ("postcopy", "dedup-nas+postcopy")
UPSTREAM_MODES = ("pre-copy", "xbzrle", "multifd", "multifd+zstd")
DEDUP_ARGS = MODES["dedup-nas"][3]
WORKLOADS = {
    # name: (write_mb, dirty_mb, churn_mb)
    "idle": (0, 0, 0),
    "busy": (16, 64, 8),
}
LINKS = {"1GbE": LINK_1GBE, "10GbE": LINK_10GBE, "uncapped": 0}
# Destination RAM preallocation ("on": the destination QEMU only gets
# these arguments, so its RAM is allocated before the migration starts).
PREALLOC_ARGS = "-mem-prealloc"
# The connections the dedup-nas destination reads the shared storage
# through (migration parameter dedup-nas-fetch-connections, set by the
# runs; its default is 1); the storage limit is measured with as many
# parallel libnfs connections, and with one.
FETCH_CONNECTIONS = 4
# How much of the data disk image the storage-limit measurement reads
# (at most), in 1 MiB requests, 8 in flight per connection.
LIMIT_MAX_MIB = 2048
LIMIT_TRIES = 2                 # the best of
# The scaling series: 60 % page cache, idle, raw, 1 GbE, guests of these
# sizes; xbzrle is left out of the largest (time: it is never the
# fastest upstream mode at 1 GbE on this machine, see docs/benchmark-links.md).
SCALING_SIZES = ("1G", "2G", "4G", "8G")
# The guest's touch rounds in the postcopy matrix: 64 MiB of page cache,
# then 512 (most of it: faults on pages still to fill).
TOUCH_MBS = (64, 512)
SCALING_NO_XBZRLE = ("4G", "8G")


def scenario(mem, cache, work="idle", fmt="raw", link="1GbE", prealloc="off", series="", touch=0):
    # touch: MiB of its page cache the guest reads over and over, timing
    # each round (NASDEDUP_TOUCH_MB), for what the guest sees of postcopy.
    return {"mem": mem, "cache": cache, "work": work, "fmt": fmt, "link": link,
            "prealloc": prealloc, "series": series, "touch": touch}


def scaling_runs():
    return [(scenario(mem, 60, series="scaling"),
             [m for m in MODES if m not in POSTCOPY_MODES and
              not (m == "xbzrle" and mem in SCALING_NO_XBZRLE)])
            for mem in SCALING_SIZES]


def matrix(name):
    # The postcopy modes have a matrix of their own.
    all_modes = [m for m in MODES if m not in POSTCOPY_MODES]
    runs = []
    if name == "smoke":
        runs.append((scenario("512M", 60), ["pre-copy", "dedup-nas"]))
    elif name == "postcopy":
        # The targets on the idle guest; then what a busy guest sees (its
        # vCPU takes a core of the two under TCG, which slows the rest).
        runs.append((scenario("1G", 60), ["pre-copy", "postcopy", "dedup-nas", "dedup-nas+postcopy"]))
        for touch in TOUCH_MBS:
            runs.append((scenario("1G", 60, touch=touch), ["postcopy", "dedup-nas+postcopy"]))
    elif name == "links":
        # One guest on every link model, every mode, with and without
        # destination RAM preallocation; then the scaling series.
        for link in LINKS:
            for pre in ("off", "on"):
                runs.append((scenario("1G", 60, link=link, prealloc=pre), all_modes))
        for pre in ("off", "on"):
            runs.append((scenario("1G", 0, link="10GbE", prealloc=pre), all_modes))
        runs += scaling_runs()
    elif name == "scaling":
        runs += scaling_runs()
    elif name == "standard":
        for cache in (0, 30, 60, 85):
            runs.append((scenario("1G", cache), all_modes))
        runs.append((scenario("1G", 60, work="busy"), all_modes))
        runs.append((scenario("1G", 60, fmt="qcow2"), all_modes))
        runs.append((scenario("1G", 60, link="uncapped"), all_modes))
        runs.append((scenario("2G", 60), ["pre-copy", "dedup-nas"]))
    elif name == "full":
        for mem in ("1G", "2G"):
            for cache in (0, 30, 60, 85):
                for work in WORKLOADS:
                    for fmt in ("raw", "qcow2"):
                        for link in LINKS:
                            runs.append((scenario(mem, cache, work, fmt, link), all_modes))
    else:
        raise SystemExit("unknown matrix %r" % name)
    return runs


def mem_mib(mem):
    m = re.fullmatch(r"(\d+)([MG])", mem)
    return int(m.group(1)) * (1024 if m.group(2) == "G" else 1)


def read_mb(sc):
    return mem_mib(sc["mem"]) * sc["cache"] // 100


def timeouts(sc, run_timeout):
    """Seconds for the run, and for e2e-smoke.sh's boot (the guest reads
    its page cache with md5sum under TCG), migration and verification
    (md5sum again), growing with the guest's size."""
    # Measured at 2 GiB: ready after 32 s, 11 s of pre-copy at 1 GbE,
    # verify 15 s; at 8 GiB about 4x that.  Five times that and more here.
    gib = max(1, mem_mib(sc["mem"]) // 1024)
    # (At least e2e-smoke.sh's defaults.)
    boot, mig, verify = max(300, 120 + 60 * gib), max(600, 300 + 60 * gib), max(300, 120 + 40 * gib)
    run = run_timeout if mem_mib(sc["mem"]) <= 1024 else max(run_timeout, boot + mig + verify + 300)
    return run, boot, mig, verify


def say(msg):
    print("[bench] %s" % msg, file=sys.stderr, flush=True)


def parse_kv(line, prefix):
    out = {}
    for kv in line[len(prefix):].split():
        if "=" in kv:
            k, v = kv.split("=", 1)
            out[k] = v
    return out


class Stop(Exception):
    pass


def _stop(signum, frame):
    raise Stop("signal %d" % signum)


def run_e2e(env_extra, log_path, timeout):
    """Run scripts/e2e-smoke.sh in a process group of its own.  On timeout
    or when we are told to stop, the whole group gets SIGTERM: the helper
    the script waits on ends, and its trap stops the QEMUs it started."""
    env = dict(os.environ)
    env.update(env_extra)
    with open(log_path, "w") as log:
        p = subprocess.Popen([E2E], env=env, stdout=subprocess.PIPE, stderr=log,
                             text=True, cwd=TOP, start_new_session=True)
        try:
            out, _ = p.communicate(timeout=timeout)
        except (subprocess.TimeoutExpired, Stop, KeyboardInterrupt) as e:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            out, _ = p.communicate(timeout=120)
            if not isinstance(e, subprocess.TimeoutExpired):
                raise
            out += "\nTIMEOUT\n"
        # Its results (E2E-RESULT, IOBENCH) too: the log is all a run leaves
        # if the benchmark ends before its report.
        log.write("--- stdout ---\n" + out)
    return p.returncode, out


def pages_of(path):
    """The 4 KiB blocks of a file, in order (a short tail is left out)."""
    with open(path, "rb") as f:
        while True:
            buf = f.read(PAGE * 256)
            if not buf:
                return
            for i in range(0, len(buf) - PAGE + 1, PAGE):
                yield buf[i:i + PAGE]


def floor_of(snap):
    """Pages of the source's RAM at switchover: zero, on disk, other."""
    zero = bytes(PAGE)
    digest = lambda b: hashlib.blake2b(b, digest_size=16).digest()
    on_disk = {digest(b) for b in pages_of(os.path.join(snap, "disk.raw")) if b != zero}
    n_zero = n_disk = n_other = 0
    for b in pages_of(os.path.join(snap, "ram.bin")):
        if b == zero:
            n_zero += 1
        elif digest(b) in on_disk:
            n_disk += 1
        else:
            n_other += 1
    return {"ram_zero_pages": n_zero, "ram_disk_pages": n_disk,
            "ram_other_pages": n_other,
            "floor_bytes": PAGE * n_other + REF_COST * n_disk}


def num(r, k, default=0.0):
    try:
        return float(r.get(k, default))
    except (TypeError, ValueError):
        return default


def one_run(args, sc, mode, idx, total):
    caps, sparams, dparams, qargs = MODES[mode]
    if mode.startswith("dedup-nas"):
        dparams = dict(dparams, **{"dedup-nas-fetch-connections": FETCH_CONNECTIONS})
    wmb, dmb, cmb = WORKLOADS[sc["work"]]
    # The link model holds in postcopy too (its own limit is unlimited by default).
    sparams = dict(sparams, **{"max-bandwidth": LINKS[sc["link"]],
                               "max-postcopy-bandwidth": LINKS[sc["link"]]})
    # The scaling series has no floor: saving and hashing up to 8 GiB of
    # RAM and a 5 GiB disk per run would cost more than the run.
    # Nor do the postcopy modes: the snapshot starts the destination with
    # -S, and its guest would not run while postcopy fills.
    snap = os.path.join(args.out, "snapshot") \
        if sc["series"] != "scaling" and mode not in POSTCOPY_MODES else ""
    run_timeout, boot_t, mig_t, verify_t = timeouts(sc, args.run_timeout)
    env = {
        "NASDEDUP_MEM": sc["mem"], "NASDEDUP_READ_MB": str(read_mb(sc)),
        "NASDEDUP_DATA_MB": str(sc["data_mb"]),
        "NASDEDUP_WRITE_MB": str(wmb), "NASDEDUP_DIRTY_MB": str(dmb),
        "NASDEDUP_CHURN_MB": str(cmb), "NASDEDUP_DISK_FORMAT": sc["fmt"],
        "NASDEDUP_MIGRATE_CAPS": caps,
        "NASDEDUP_MIGRATE_PARAMS": json.dumps(sparams),
        "NASDEDUP_MIGRATE_DST_PARAMS": json.dumps(dparams) if dparams else "",
        "NASDEDUP_QEMU_ARGS": qargs, "NASDEDUP_VERIFY_DISK": "0",
        "NASDEDUP_DST_QEMU_ARGS": PREALLOC_ARGS if sc["prealloc"] == "on" else "",
        "NASDEDUP_SNAPSHOT_DIR": snap, "NASDEDUP_KEEP_NFS": "1",
        "NASDEDUP_BOOT_TIMEOUT": str(boot_t), "NASDEDUP_MIGRATE_TIMEOUT": str(mig_t),
        "NASDEDUP_VERIFY_TIMEOUT": str(verify_t),
        "NASDEDUP_POSTCOPY": "1" if mode in POSTCOPY_MODES else "0",
        "NASDEDUP_TOUCH_MB": str(sc.get("touch", 0)),
    }
    say("run %d/%d: %s, %s" % (idx, total, scen_label(sc), mode))
    log = os.path.join(args.out, "logs", "run%03d-%s.log" % (idx, mode.replace("+", "-")))
    t0 = time.monotonic()
    rc, out = run_e2e(env, log, run_timeout)
    row = dict(sc, mode=mode, read_mb=read_mb(sc), verdict="FAIL", log=os.path.relpath(log, TOP))
    res = [line for line in out.splitlines() if line.startswith("E2E-RESULT ")]
    if res:
        row.update(parse_kv(res[-1], "E2E-RESULT "))
    if rc != 0:
        row["verdict"] = "FAIL"
    if snap and rc == 0 and os.path.exists(os.path.join(snap, "ram.bin")):
        row.update(floor_of(snap))
    if snap:
        shutil.rmtree(snap, ignore_errors=True)
    r = row
    r["run_s"] = "%.0f" % (time.monotonic() - t0)
    say("    %s: %.1f MB on the wire, %.1f MB from NFS, %.2f s, downtime %d ms, "
        "%d ref pages, floor %.1f MB, CPU src %.1f s dst %.1f s (%s s incl. boot)" % (
            r["verdict"], num(r, "ram_transferred_bytes") / 1e6,
            num(r, "dst_dedup_fetched_bytes") / 1e6, num(r, "total_ms") / 1e3,
            num(r, "downtime_ms"), num(r, "src_dedup_reference_pages"),
            num(r, "floor_bytes") / 1e6, num(r, "src_cpu_s"), num(r, "dst_cpu_s"), r["run_s"]))
    return row


def ensure_assets(data_mb):
    """Build the guest's data disk for data_mb before the runs that use it
    (scripts/guest-assets.sh; a no-op when it is up to date), so that its
    generation does not count against a run's timeout."""
    env = dict(os.environ, NASDEDUP_DATA_MB=str(data_mb))
    say("guest assets with a data disk of %d MiB of files" % data_mb)
    p = subprocess.Popen([os.path.join(TOP, "scripts", "guest-assets.sh")], env=env, cwd=TOP,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        _, err = p.communicate(timeout=1800)
    except (subprocess.TimeoutExpired, Stop, KeyboardInterrupt):
        os.killpg(p.pid, signal.SIGTERM)
        p.communicate(timeout=120)
        raise
    if p.returncode != 0:
        raise SystemExit("scripts/guest-assets.sh failed:\n" + err[-2000:])


def storage_limit(args, tag):
    """Raw read throughput of the data disk image on the NFS export through
    QEMU's libnfs driver: N `qemu-img bench` processes at once (one libnfs
    connection each) reading disjoint parts of the image, for N = 1 and N =
    FETCH_CONNECTIONS; bytes over the wall time of all N together (process
    start included), the best of LIMIT_TRIES.  The image is a hard link to the template (a copy if
    the export is on another file system) under a name of its own, removed
    again.  Returns {N: bytes/s}; {} if it failed."""
    guest = os.environ.get("NASDEDUP_GUEST_DIR", os.path.join(TOP, "build", "guest"))
    export = os.environ.get("NASDEDUP_EXPORT_DIR", os.path.join(TOP, "build", "nfs-export"))
    img = os.environ.get("NASDEDUP_QEMU_IMG", os.path.join(TOP, "build", "qemu", "qemu-img"))
    nfs = os.path.join(TOP, "scripts", "nfs-export.sh")
    src = os.path.join(guest, "data.raw")
    name = "limit-%d-%s.raw" % (os.getpid(), tag)
    path = os.path.join(export, name)
    res, procs = {}, []
    try:
        try:
            os.link(src, path)
        except OSError:
            shutil.copyfile(src, path)
        mib = min(os.path.getsize(src) >> 20, LIMIT_MAX_MIB)
        for n in [c for c in sorted({1, FETCH_CONNECTIONS}) for _ in range(LIMIT_TRIES)]:
            per = mib // n
            t0 = time.monotonic()
            procs = [subprocess.Popen(
                [nfs, "exec", img, "bench", "-f", "raw", "-t", "none", "-s", "1M", "-d", "8",
                 "-c", str(per), "-o", str((i * per) << 20), "nfs://127.0.0.1/export/" + name],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
                for i in range(n)]
            outs = [p.communicate(timeout=300)[0] for p in procs]
            dt = time.monotonic() - t0
            bad = [o for p, o in zip(procs, outs) if p.returncode != 0 or "Run completed" not in o]
            procs = []
            if bad:
                say("storage limit, %d connection(s): qemu-img bench failed: %s" % (n, bad[0].strip()[-300:]))
                return {}
            res[n] = max(res.get(n, 0), (per * n << 20) / dt)
            say("storage limit: %d connection(s) read %d MiB in %.2f s: %.0f MB/s"
                % (n, per * n, dt, (per * n << 20) / dt / 1e6))
    except (OSError, subprocess.SubprocessError) as e:
        say("storage limit failed: %s" % e)
        return {}
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        try:
            os.unlink(path)
        except OSError:
            pass
    return res


# The full-index variant: an index of 1 MiB (~30k entries) is full after
# the first round's reads, and each round rewrites 128 MiB of files whose
# blocks the file system reuses, so most tracked writes overwrite indexed
# blocks of a full index (the case that used to scan the CLOCK ring).
FULL_INDEX_BYTES = 1 << 20
FULL_INDEX_WRITE_MB = 128


def iobench(args, full_index=False):
    """Guest disk workload with dedup-nas tracking off and on."""
    read_mb = min(args.iobench_read_mb, 64) if full_index else args.iobench_read_mb
    write_mb = FULL_INDEX_WRITE_MB if full_index else 32
    # Tracking follows the capability, which the rounds turn off and on
    # (it runs from boot by default).
    qargs = DEDUP_ARGS + " -global migration.x-dedup-nas-track=off"
    if full_index:
        qargs += " -global migration.dedup-nas-index-size=%d" % FULL_INDEX_BYTES
    env = {
        "NASDEDUP_MEM": "1G", "NASDEDUP_READ_MB": "0",
        "NASDEDUP_DATA_MB": str(args.data_mb),
        "NASDEDUP_WRITE_MB": "0", "NASDEDUP_DIRTY_MB": "0", "NASDEDUP_CHURN_MB": "0",
        "NASDEDUP_QEMU_ARGS": qargs, "NASDEDUP_KEEP_NFS": "1",
        "NASDEDUP_IOBENCH_ROUNDS": str(args.iobench_rounds),
        "NASDEDUP_IOBENCH_READ_MB": str(read_mb),
        "NASDEDUP_IOBENCH_WRITE_MB": str(write_mb),
    }
    say("tracking overhead%s: %d rounds of the guest's iobench (read %d MiB, write %d MiB), off and on"
        % (" (full 1 MiB index, overwrite-heavy)" if full_index else "",
           args.iobench_rounds, read_mb, write_mb))
    log = os.path.join(args.out, "logs", "iobench-full.log" if full_index else "iobench.log")
    rc, out = run_e2e(env, log, args.run_timeout * 2)
    res = iobench_result(out) if rc == 0 else None
    if not res:
        say("    iobench failed (log: %s)" % log)
        return None
    say("    total centiseconds off %s, on %s: overhead %+.1f %% (medians)"
        % (res["off_cs"], res["on_cs"], 100 * res["overhead"]))
    return res


def iobench_result(out):
    """The rounds of e2e-smoke.sh's IOBENCH lines in @out, off and on."""
    rounds = [parse_kv(l, "IOBENCH ") for l in out.splitlines() if l.startswith("IOBENCH ")]
    if not rounds:
        return None
    res = {"rounds": rounds}
    for state in ("off", "on"):
        rs = [r for r in rounds if r["tracking"] == state]
        res[state + "_cs"] = sorted(int(r["read_cs"]) + int(r["write_cs"]) for r in rs)
        res[state + "_read_cs"] = sorted(int(r["read_cs"]) for r in rs)
        res[state + "_write_cs"] = sorted(int(r["write_cs"]) for r in rs)
    res["read_bytes"] = int(rounds[0]["read_bytes"])
    res["write_bytes"] = int(rounds[0]["write_bytes"])
    med = lambda v: v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
    res["off_med"], res["on_med"] = med(res["off_cs"]), med(res["on_cs"])
    res["overhead"] = res["on_med"] / res["off_med"] - 1 if res["off_med"] else float("nan")
    return res


def core_bench():
    """CPU cost of tracking and lookup, from the standalone core built
    without sanitizers (tests/unit/bench-nas-dedup-index.c)."""
    bdir = os.path.join(TOP, "build", "core-release")
    try:
        if not os.path.exists(os.path.join(bdir, "build.ninja")):
            subprocess.run(["meson", "setup", bdir, "-Db_sanitize=none", "-Dbuildtype=release"],
                           cwd=TOP, check=True, capture_output=True, timeout=300)
        subprocess.run(["meson", "compile", "-C", bdir, "bench-nas-dedup-index"],
                       cwd=TOP, check=True, capture_output=True, timeout=300)
        out = subprocess.run([os.path.join(bdir, "bench-nas-dedup-index"), "256", "128"],
                             check=True, capture_output=True, text=True, timeout=300).stdout
    except (OSError, subprocess.SubprocessError) as e:
        say("core microbenchmark failed: %s" % e)
        return None
    line = next((l for l in out.splitlines() if l.startswith("BENCH-INDEX ")), None)
    if not line:
        return None
    res = parse_kv(line, "BENCH-INDEX ")
    say("core: hash %s ns, tracking a read %s ns, lookup %s ns per 4 KiB block"
        % (res.get("hash_ns_per_block"), res.get("note_read_ns_per_block"),
           res.get("lookup_ns_per_page")))
    return res


FIELDS = ["mem", "cache", "read_mb", "work", "fmt", "link", "prealloc", "series", "mode", "verdict",
          "ram_transferred_bytes", "dst_dedup_fetched_bytes", "total_ms", "downtime_ms",
          "setup_ms", "src_dedup_reference_pages", "src_dedup_reference_bytes", "src_dedup_resent_pages",
          "dst_dedup_mismatches", "dst_dedup_fetch_time", "src_dedup_index_size",
          "src_dedup_index_entries", "src_dedup_index_capacity", "ram_zero_pages",
          "ram_disk_pages", "ram_other_pages", "floor_bytes", "bytes_over_floor",
          "bytes_vs_precopy", "time_vs_precopy", "dirty_sync_count", "normal_pages",
          "zero_pages", "src_dedup_reference_share", "src_dedup_fetch_rate",
          "est_total_pages", "est_zero_pages", "est_reference_pages", "est_unique_pages",
          "est_precopy_bytes", "est_dedup_nas_bytes", "est_storage_bytes", "est_ms",
          "src_cpu_s", "dst_cpu_s", "dst_rss_mib", "dst_dedup_fetch_connections",
          "storage_limit_1_bps", "storage_limit_n_bps", "storage_limit_n", "postcopy_ms",
          "postcopy_requests", "dst_dedup_postcopy_fill_pages", "dst_dedup_postcopy_fill_faults",
          "fault_n", "fault_lat_med_us", "fault_lat_p99_us", "fault_lat_max_us",
          "dst_dedup_postcopy_fill_fault_reads", "fault_read_n", "fault_read_lat_med_us",
          "fault_read_lat_p99_us", "fault_read_lat_max_us", "fault_read_timeout_n", "touch",
          "touch_base_n", "touch_base_cs", "touch_fill_n", "touch_fill_cs_med",
          "touch_fill_cs_max",
          "data_mb", "run_s", "log"]


def scen_key(r):
    """What makes a scenario: the runs with the same key are compared."""
    return (r["mem"], r["cache"], r["work"], r["fmt"], r["link"], r["prealloc"], r["series"],
            int(r.get("touch", 0)))


def derive(rows):
    """Ratios against the floor and against pre-copy of the same scenario."""
    base = {scen_key(r): r for r in rows if r["mode"] == "pre-copy" and r["verdict"] == "OK"}
    for r in rows:
        if r["verdict"] != "OK":
            continue
        wire = num(r, "ram_transferred_bytes")
        if num(r, "floor_bytes"):
            r["bytes_over_floor"] = "%.3f" % (wire / num(r, "floor_bytes"))
        b = base.get(scen_key(r))
        if b and num(b, "ram_transferred_bytes") and num(b, "total_ms"):
            r["bytes_vs_precopy"] = "%.3f" % (wire / num(b, "ram_transferred_bytes"))
            r["time_vs_precopy"] = "%.3f" % (num(r, "total_ms") / num(b, "total_ms"))


def scen_label(r):
    return "%s, %s%% cache, %s, %s, %s%s%s" % (
        r["mem"], r["cache"], r["work"], r["fmt"], r["link"],
        ", dst prealloc" if r["prealloc"] == "on" else "",
        ", scaling" if r["series"] == "scaling" else "") + (
        ", touch %s MiB" % r["touch"] if int(r.get("touch", 0)) else "")


def markdown(rows):
    out = ["| scenario | mode | RAM on wire | from NFS | floor | wire/floor | wire vs pre-copy "
           "| total time | time vs pre-copy | downtime | ref pages | refs / on disk | resent | verdict |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        f = lambda k, fmt="%s", scale=1.0: (fmt % (num(r, k) / scale)) if r.get(k) not in (None, "") else "–"
        dd = r["mode"].startswith("dedup-nas")
        share = ("%.0f %%" % (100 * num(r, "src_dedup_reference_pages") / num(r, "ram_disk_pages"))
                 if dd and num(r, "ram_disk_pages") else "–")
        out.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            scen_label(r), r["mode"], f("ram_transferred_bytes", "%.1f MB", 1e6),
            f("dst_dedup_fetched_bytes", "%.1f MB", 1e6) if r["mode"].startswith("dedup-nas") else "–",
            f("floor_bytes", "%.1f MB", 1e6), f("bytes_over_floor", "%.2f×"),
            f("bytes_vs_precopy", "%.2f×"), f("total_ms", "%.2f s", 1e3),
            f("time_vs_precopy", "%.2f×"), f("downtime_ms", "%d ms"),
            f("src_dedup_reference_pages", "%d") if dd else "–", share,
            f("src_dedup_resent_pages", "%d") if dd else "–",
            r["verdict"]))
    return "\n".join(out)


def io_table(io, what):
    return ["", "Tracking overhead%s (guest iobench: drop caches, read %.0f MB of files, write %.0f MB "
            "and sync; centiseconds as the guest measured them, %d rounds each, alternating order):"
            % (what, io["read_bytes"] / 1e6, io["write_bytes"] / 1e6, len(io["on_cs"])), "",
            "| tracking | read (cs) | write (cs) | total (cs) | median total |",
            "|---|---|---|---|---:|",
            "| off | %s | %s | %s | %s |" % (io["off_read_cs"], io["off_write_cs"], io["off_cs"], io["off_med"]),
            "| on | %s | %s | %s | %s |" % (io["on_read_cs"], io["on_write_cs"], io["on_cs"], io["on_med"]),
            "", "Overhead of tracking (median on / median off − 1): **%+.1f %%**."
            % (100 * io["overhead"])]


def extras(rows, io, core=None, io_full=None):
    """Index memory, fetch throughput, tracking overhead."""
    out = []
    dd = [r for r in rows if r["mode"].startswith("dedup-nas") and r["verdict"] == "OK"]
    if dd:
        out += ["| scenario | guest RAM | index memory | index/RAM | entries | fetched | fetch busy "
                "| fetch throughput | vs link | conn | storage limit (1 conn) "
                "| storage limit (%d conn) | fetch / limit |" % FETCH_CONNECTIONS,
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in dd:
            ram = mem_mib(r["mem"]) << 20
            ft = num(r, "dst_dedup_fetch_time")
            thr = num(r, "dst_dedup_fetched_bytes") / (ft / 1e3) if ft else 0
            link = LINKS[r["link"]]
            lim1, limn = num(r, "storage_limit_1_bps"), num(r, "storage_limit_n_bps")
            out.append("| %s | %d MiB | %.1f MiB | %.2f %% | %d | %.1f MB | %d ms | %.0f MB/s | %s "
                       "| %s | %s | %s | %s |" % (
                           scen_label(r) + ", " + r["mode"], ram >> 20,
                           num(r, "src_dedup_index_size") / 2**20,
                           100 * num(r, "src_dedup_index_size") / ram, num(r, "src_dedup_index_entries"),
                           num(r, "dst_dedup_fetched_bytes") / 1e6, ft, thr / 1e6,
                           ("%.2f×" % (thr / link)) if link and thr else "uncapped",
                           r.get("dst_dedup_fetch_connections") or "–",
                           ("%.0f MB/s" % (lim1 / 1e6)) if lim1 else "–",
                           ("%.0f MB/s" % (limn / 1e6)) if limn else "–",
                           ("%.2f" % (thr / limn)) if limn and thr else "–"))
        out += ["", "*fetch throughput* is what the destination fetched over the time its fetch was "
                "busy; *conn* the connections it read through per drive, as query-migrate reports "
                "them (– when the build does not report them). The *storage limit* is measured once per "
                "scenario, after its runs, on the same export: the raw read throughput of the data disk "
                "image (up to its first %d MiB) through QEMU's own libnfs driver, `qemu-img bench -f raw "
                "-t none -s 1M -d 8` in N processes at once (one NFS connection each, disjoint parts of "
                "the image), bytes over the wall time of all N including their start, the best of %d; "
                "N = 1 and N = %d, "
                "the destination's `dedup-nas-fetch-connections` (set by the runs; its default is 1). "
                "*fetch / limit* sets the fetch throughput against the %d-connection limit. The image "
                "is in the host's page cache, as the run's copy of it is: this is ganesha and libnfs on "
                "this machine's 2 CPUs, not a disk." % (LIMIT_MAX_MIB, LIMIT_TRIES, FETCH_CONNECTIONS,
                                                       FETCH_CONNECTIONS)]
    if io:
        out += io_table(io, "")
    if io_full:
        out += io_table(io_full, ", full index (%d KiB) and overwrite-heavy" % (FULL_INDEX_BYTES >> 10))
    if core:
        nsb = num(core, "note_read_ns_per_block")
        out += ["", "CPU cost of tracking, from the core alone (`tests/unit/bench-nas-dedup-index.c`, "
                "%s MiB of %s KiB reads, built without sanitizers): keyed XXH3-64 of a 4 KiB block (the index half) %s ns; "
                "hashing and indexing a block read %s ns (%s MB/s of guest reads per host core); "
                "hashing and looking up a page on the source %s ns." % (
                    core.get("io_mib"), core.get("request_kib"), core.get("hash_ns_per_block"),
                    core.get("note_read_ns_per_block"), core.get("note_read_mb_s"),
                    core.get("lookup_ns_per_page"))]
        if core.get("same_insert_ns"):
            out.append("The cases a guest could make slow, per operation under the index lock: "
                       "indexing one of 60k identical blocks %s ns; overwriting an indexed block in a "
                       "full index of %s entries %s ns; a 2 GiB discard on a drive with no entries "
                       "%s ns." % (core.get("same_insert_ns"), core.get("full_entries", "~1M"),
                                   core.get("overwrite_ns"), core.get("discard2g_empty_ns")))
        if io and nsb and sum(io["off_read_cs"]):
            rd_s = sum(io["off_read_cs"]) / len(io["off_read_cs"]) / 100
            mbs = io["read_bytes"] / rd_s / 1e6
            out.append("At the guest's mean read rate with tracking off (%.0f MB/s), tracking costs "
                       "%.1f %% of one host core." % (mbs, 100 * mbs * 1e6 / PAGE * nsb / 1e9))
    return "\n".join(out)


def est_model(r, link, storage):
    """
    The estimate's model (migration/nas-dedup-estimate.c): bytes on the
    wire and ms, for pre-copy, or for dedup-nas at the share of references
    where link and storage end together (all of them if the storage is the
    faster).  Without a link rate, dedup-nas's bytes with every reference.
    """
    if r["mode"] == "pre-copy":
        b = num(r, "est_precopy_bytes")
        return b, (b * 1e3 / link if link else None)
    refs, page = num(r, "est_reference_pages"), 8 + PAGE
    full = num(r, "est_precopy_bytes") - refs * page
    ded, sto = num(r, "est_dedup_nas_bytes"), num(r, "est_storage_bytes")
    if not link:
        return ded, None
    if not refs or not storage or sto / storage <= ded / link:
        return ded, ded * 1e3 / link
    w = (ded - full) / refs
    s = (full + refs * page) / link / (sto / storage + refs * (page - w) / link)
    return full + refs * ((1 - s) * page + s * w), s * sto / storage * 1e3


def estimate_table(rows):
    """query-dedup-nas-estimate (just before each migration) against the migration."""
    out = ["| scenario | mode | estimate took | refs predicted | on disk at switchover | refs sent "
           "| bytes predicted | bytes sent | error | time predicted | time | error |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    n = 0
    for r in rows:
        if r["verdict"] != "OK" or r["mode"] not in ("pre-copy", "dedup-nas") \
                or r.get("est_precopy_bytes") in (None, ""):
            continue
        dd = r["mode"] == "dedup-nas"
        sent = num(r, "ram_transferred_bytes")
        link = LINKS.get(r["link"])
        ft = num(r, "dst_dedup_fetch_time")
        storage = num(r, "dst_dedup_fetched_bytes") / (ft / 1e3) if ft else 0
        pred, tp = est_model(r, link, storage)
        t = num(r, "total_ms")
        out.append("| %s | %s | %d ms | %d | %s | %s | %.1f MB | %.1f MB | %+.1f %% | %s | %.2f s | %s |" % (
            scen_label(r), r["mode"], num(r, "est_ms"), num(r, "est_reference_pages"),
            ("%d" % num(r, "ram_disk_pages")) if r.get("ram_disk_pages") not in (None, "") else "–",
            ("%d" % num(r, "src_dedup_reference_pages")) if dd else "–",
            pred / 1e6, sent / 1e6, 100 * (pred / sent - 1) if sent else 0,
            ("%.2f s" % (tp / 1e3)) if tp else "–", t / 1e3,
            ("%+.1f %%" % (100 * (tp / t - 1))) if tp and t else "–"))
        n += 1
    if not n:
        return ""
    return "\n".join(out + ["", "Bytes and times are the estimate's model with the run's link rate "
                            "(`max-bandwidth`) and, for dedup-nas, the fetch rate the run measured "
                            "as the storage rate: the references shared between link and storage as "
                            "the split would (uncapped: every page on disk a reference, no time).  "
                            "Not in the model: the guest's dirtying during the migration, setup and "
                            "switchover, and a link slower than `max-bandwidth` (at 10 GbE this "
                            "machine's migration thread, not the cap, sets the rate)."])


def versus_upstream(rows):
    """Per scenario: the fastest dedup-nas mode against the fastest upstream one of the same run."""
    out = ["| scenario | fastest upstream | time | downtime | fastest dedup-nas | time | downtime "
           "| shorter by | target | downtime target | met | wire + NFS bytes |",
           "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|---:|"]
    n = 0
    for k in sorted({scen_key(r) for r in rows}):
        ok = [r for r in rows if scen_key(r) == k and r["verdict"] == "OK" and num(r, "total_ms")]
        up = [r for r in ok if r["mode"] in UPSTREAM_MODES]
        dd = [r for r in ok if r["mode"].startswith("dedup-nas")]
        if not up or not dd:
            continue
        u = min(up, key=lambda r: num(r, "total_ms"))
        d = min(dd, key=lambda r: num(r, "total_ms"))
        # Issue #11's targets: with page cache, >= 3x at 1 GbE and >= 1.5x on faster
        # links; with none, within 5 %; downtime within the upstream mode's + 10 ms.
        ratio = num(u, "total_ms") / num(d, "total_ms")
        want = (3.0 if u["link"] == "1GbE" else 1.5) if int(num(u, "cache")) else 0.95
        dt_max = num(u, "downtime_ms") + 10
        met = ratio >= want and num(d, "downtime_ms") <= dt_max
        out.append("| %s | %s | %.2f s | %d ms | %s | %.2f s | %d ms | %.2f× | ≥ %.2f× | ≤ %d ms "
                   "| %s | %.1f MB |" % (
                       scen_label(u), u["mode"], num(u, "total_ms") / 1e3, num(u, "downtime_ms"),
                       d["mode"], num(d, "total_ms") / 1e3, num(d, "downtime_ms"), ratio, want,
                       dt_max, "yes" if met else "**no**",
                       (num(d, "ram_transferred_bytes") + num(d, "dst_dedup_fetched_bytes")) / 1e6))
        n += 1
    return "\n".join(out) if n else ""


def postcopy_table(rows):
    """Per scenario with postcopy runs: when the guest runs on the destination
    (postcopy: when the source said postcopy-active; otherwise at completion)
    and when the last page is there, against pre-copy and dedup-nas of the
    same run (issue #12's targets)."""
    out = ["| scenario | mode | guest on destination | last page in place | downtime | RAM on wire "
           "| from NFS | filled from NFS after the switch | pages requested by the destination "
           "| of which references faulted on | verdict |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    tgt = []
    for k in sorted({scen_key(r) for r in rows if r["mode"] in POSTCOPY_MODES}):
        runs = [r for r in rows if scen_key(r) == k]
        on_dst = {}
        for r in runs:
            pc = r["mode"] in POSTCOPY_MODES and num(r, "postcopy_ms", -1) >= 0
            on_dst[r["mode"]] = num(r, "postcopy_ms") if pc else num(r, "total_ms")
            dn = r["mode"].startswith("dedup-nas")
            out.append("| %s | %s | %.2f s%s | %.2f s | %d ms | %.1f MB | %.1f MB | %s | %s | %s | %s |" % (
                scen_label(r), r["mode"], on_dst[r["mode"]] / 1e3, "" if pc or r["mode"] not in
                POSTCOPY_MODES else " (completed as pre-copy)", num(r, "total_ms") / 1e3,
                num(r, "downtime_ms"), num(r, "ram_transferred_bytes") / 1e6,
                num(r, "dst_dedup_fetched_bytes") / 1e6,
                "%.1f MB" % (num(r, "dst_dedup_postcopy_fill_pages") * 4096 / 1e6) if dn else "–",
                r.get("postcopy_requests", "–") if r["mode"] in POSTCOPY_MODES else "–",
                "%d" % num(r, "dst_dedup_postcopy_fill_faults") if dn else "–", r["verdict"]))
        ok = {r["mode"]: r for r in runs if r["verdict"] == "OK"}
        if "dedup-nas+postcopy" in ok and "pre-copy" in ok and on_dst["dedup-nas+postcopy"]:
            ratio = on_dst["pre-copy"] / on_dst["dedup-nas+postcopy"]
            tgt.append("| %s: guest on the destination ≥ 5× sooner than with pre-copy | %.2f× "
                       "(%.2f s vs %.2f s) | %s |" % (
                           scen_label(ok["pre-copy"]), ratio, on_dst["dedup-nas+postcopy"] / 1e3,
                           on_dst["pre-copy"] / 1e3, "yes" if ratio >= 5 else "**no**"))
        if "dedup-nas+postcopy" in ok and "dedup-nas" in ok:
            a, b = num(ok["dedup-nas+postcopy"], "total_ms"), num(ok["dedup-nas"], "total_ms")
            tgt.append("| %s: last page in place no later than dedup-nas pre-copy completes | "
                       "%.2f s vs %.2f s | %s |" % (scen_label(ok["dedup-nas"]), a / 1e3, b / 1e3,
                                                    "yes" if a <= b else "**no**"))
    if len(out) == 2:
        return ""
    if tgt:
        out += ["", "| target | measured | met |", "|---|---|---|"] + tgt
    return "\n".join(out)


def guest_table(rows):
    """What the guest on the destination sees while postcopy fills: the
    latency of postcopy's page requests (fault to page placed, from the
    destination's trace) and the guest's own timing of its touch rounds
    (reading the first MiB of its page cache given in the scenario), on the source before the
    migration and on the destination until the migration completed."""
    out = ["| scenario | mode | page requests | fault latency median | p99 | max "
           "| faults read from storage | their latency median | p99 | waits run out "
           "| touch round before | during the fill: median | max | slowdown (median, max) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["mode"] not in POSTCOPY_MODES or r["verdict"] != "OK":
            continue
        base, med, mx = (num(r, k, -1) for k in ("touch_base_cs", "touch_fill_cs_med",
                                                  "touch_fill_cs_max"))
        lat = num(r, "fault_n", -1) > 0
        rlat = num(r, "fault_read_n", -1) > 0
        dn = r["mode"].startswith("dedup-nas")
        out.append("| %s | %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            scen_label(r), r["mode"], num(r, "fault_n"),
            "%.2f ms" % (num(r, "fault_lat_med_us") / 1e3) if lat else "–",
            "%.2f ms" % (num(r, "fault_lat_p99_us") / 1e3) if lat else "–",
            "%.2f ms" % (num(r, "fault_lat_max_us") / 1e3) if lat else "–",
            "%d" % num(r, "fault_read_n") if dn else "–",
            "%.2f ms" % (num(r, "fault_read_lat_med_us") / 1e3) if rlat else "–",
            "%.2f ms" % (num(r, "fault_read_lat_p99_us") / 1e3) if rlat else "–",
            "%d" % num(r, "fault_read_timeout_n") if dn else "–",
            "%d ms (%d rounds)" % (base * 10, num(r, "touch_base_n")) if base >= 0 else "–",
            "%d ms (%d rounds)" % (med * 10, num(r, "touch_fill_n")) if med >= 0 else "–",
            "%d ms" % (mx * 10) if mx >= 0 else "–",
            "%.1f×, %.1f×" % (med / base, mx / base) if base > 0 and med >= 0 else "–"))
    return "\n".join(out) if len(out) > 2 else ""


def scaling_table(rows):
    """The scaling series: per guest size, the fastest upstream mode against
    the fastest dedup-nas mode, with bytes, index memory and CPU."""
    sc = [r for r in rows if r["series"] == "scaling"]
    out = ["| guest RAM | page cache | fastest upstream | time | fastest dedup-nas | time | shorter by "
           "| wire, upstream | wire, dedup-nas | from NFS | index memory "
           "| src CPU s/GiB, upstream / dedup-nas | dst CPU s/GiB, upstream / dedup-nas |",
           "|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    n, skipped = 0, []
    for mem in sorted({r["mem"] for r in sc}, key=mem_mib):
        ok = [r for r in sc if r["mem"] == mem and r["verdict"] == "OK" and num(r, "total_ms")]
        up = [r for r in ok if r["mode"] in UPSTREAM_MODES]
        dd = [r for r in ok if r["mode"].startswith("dedup-nas")]
        if mem in SCALING_NO_XBZRLE:
            skipped.append(mem)
        if not up or not dd:
            continue
        u = min(up, key=lambda r: num(r, "total_ms"))
        d = min(dd, key=lambda r: num(r, "total_ms"))
        gib = mem_mib(mem) / 1024
        cpu = lambda r, k: ("%.2f" % (num(r, k) / gib)) if r.get(k) not in (None, "") else "–"
        out.append("| %s | %d MiB | %s | %.2f s | %s | %.2f s | %.2f× | %.1f MB | %.1f MB | %.1f MB "
                   "| %.1f MiB | %s / %s | %s / %s |" % (
                       mem, read_mb(u), u["mode"], num(u, "total_ms") / 1e3, d["mode"],
                       num(d, "total_ms") / 1e3, num(u, "total_ms") / num(d, "total_ms"),
                       num(u, "ram_transferred_bytes") / 1e6, num(d, "ram_transferred_bytes") / 1e6,
                       num(d, "dst_dedup_fetched_bytes") / 1e6, num(d, "src_dedup_index_size") / 2**20,
                       cpu(u, "src_cpu_s"), cpu(d, "src_cpu_s"), cpu(u, "dst_cpu_s"), cpu(d, "dst_cpu_s")))
        n += 1
    if not n:
        return ""
    note = ("Each guest: 60 % of its RAM read into the page cache, idle, raw, 1 GbE, on a data disk "
            "sized for it; upstream modes pre-copy, xbzrle, multifd and multifd+zstd, dedup-nas modes "
            "dedup-nas, dedup-nas+multifd and dedup-nas+multifd+zstd (every run is in the tables "
            "below, scenario \"…, scaling\"; no floor is computed for these runs).")
    if skipped:
        note += (" xbzrle is left out at %s to bound the run time (at 1 GbE it is never the fastest "
                 "upstream mode here)." % ", ".join(skipped))
    note += (" *index memory* is the source's index (query-migrate's dedup-nas `index-size`). CPU "
             "seconds per GiB of guest RAM: utime + stime of each QEMU process, all its threads, from "
             "`migrate` until the migration completed on that side (the destination: until it left "
             "`inmigrate`), for the fastest upstream / fastest dedup-nas run. Under TCG the source's "
             "figure includes the guest's vCPU thread, which keeps running (emulated) during the "
             "migration, so it is not the migration's cost alone; the destination's vCPU does not "
             "run until the migration ends.")
    return "\n".join(out + ["", note])


def targets(rows, io, io_full=None):
    """The issue's targets for the 60 % page-cache idle 1 GiB guest on 1 GbE."""
    sel = {r["mode"]: r for r in rows if r["mem"] == "1G" and r["cache"] == 60 and r["work"] == "idle"
           and r["fmt"] == "raw" and r["link"] == "1GbE" and r["prealloc"] == "off"
           and not r["series"] and r["verdict"] == "OK"}
    if "pre-copy" not in sel or "dedup-nas" not in sel:
        return ""
    p, d = sel["pre-copy"], sel["dedup-nas"]
    speed = num(p, "total_ms") / num(d, "total_ms")
    of = num(d, "bytes_over_floor", float("nan"))
    lines = ["| target (1 GiB, 60 % page cache, idle, raw, 1 GbE) | measured | met |", "|---|---|---|",
             "| total time ≥ 2.5× shorter than pre-copy | %.2f× (%.2f s vs %.2f s) | %s |" % (
                 speed, num(d, "total_ms") / 1e3, num(p, "total_ms") / 1e3, "yes" if speed >= 2.5 else "no"),
             "| bytes within 1.1× of the floor | %.2f× | %s |" % (of, "yes" if of <= 1.1 else "no"),
             "| downtime not above pre-copy's | %d ms vs %d ms | %s |" % (
                 num(d, "downtime_ms"), num(p, "downtime_ms"),
                 "yes" if num(d, "downtime_ms") <= num(p, "downtime_ms") else "no")]
    if io:
        lines.append("| tracking overhead ≤ 2 %% | %+.1f %% | %s |" % (
            100 * io["overhead"], "yes" if io["overhead"] <= 0.02 else "no"))
    if io_full:
        lines.append("| tracking overhead ≤ 2 %%, full index, overwrite-heavy | %+.1f %% | %s |" % (
            100 * io_full["overhead"], "yes" if io_full["overhead"] <= 0.02 else "no"))
    return "\n".join(lines)


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("python3-matplotlib missing: no plot")
        return False
    scens = []
    for r in rows:
        if scen_label(r) not in scens:
            scens.append(scen_label(r))
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    panels = (("ram_transferred_bytes", 1e6, "RAM bytes on the wire (MB)"),
              ("total_ms", 1e3, "total migration time (s)"),
              ("downtime_ms", 1, "downtime (ms)"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 1.7 * len(scens)), 11), sharex=True)
    w = 0.8 / max(1, len(modes))
    floor_x, floor_y = [], []
    for j, m in enumerate(modes):
        xs, vals = [], [[] for _ in panels]
        for i, s in enumerate(scens):
            r = next((r for r in rows if scen_label(r) == s and r["mode"] == m and r["verdict"] == "OK"), None)
            if not r:
                continue
            x = i + (j - (len(modes) - 1) / 2) * w
            xs.append(x)
            for k, (key, scale, _) in enumerate(panels):
                vals[k].append(num(r, key) / scale)
            if r.get("floor_bytes"):
                floor_x.append(x)
                floor_y.append(num(r, "floor_bytes") / 1e6)
        for k in range(len(panels)):
            axes[k].bar(xs, vals[k], w, label=m)
    if floor_x:
        axes[0].scatter(floor_x, floor_y, marker="_", s=300, color="black", zorder=3,
                        label="floor of the run")
    for k, (_, _, label) in enumerate(panels):
        axes[k].set_ylabel(label)
    axes[0].legend(fontsize=8)
    axes[0].set_title("qemu-nas-dedup: live migration of a Linux guest on NFS (TCG, loopback)")
    axes[-1].set_xticks(range(len(scens)))
    axes[-1].set_xticklabels([s.replace(", ", "\n") for s in scens], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def machine():
    def sh(cmd):
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"
    cpu = sh("lscpu | sed -n 's/^Model name: *//p' | head -1")
    qemu = sh("'%s' --version | head -1" % os.path.join(TOP, "build", "qemu", "qemu-system-x86_64"))
    return ("%s; %s CPUs (%s); %s GiB RAM; %s; %s; accelerator TCG (no KVM); NFS: nfs-ganesha (VFS) "
            "on loopback in a network namespace, both QEMUs through libnfs" % (
                platform.platform(), os.cpu_count(), cpu,
                round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30), qemu,
                sh("git -C '%s' log -1 --format='commit %%h'" % TOP)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matrix", default="standard",
                    choices=("smoke", "links", "postcopy", "scaling", "standard", "full"))
    ap.add_argument("--modes", help="comma-separated subset of: " + ", ".join(MODES))
    ap.add_argument("--only", metavar="REGEX",
                    help="only the scenarios whose label matches REGEX (re.search), e.g. "
                    "'^(1G|2G),' or 'dst prealloc'; labels as in the tables")
    ap.add_argument("--out", default=os.path.join(TOP, "build", "bench"))
    ap.add_argument("--doc", action="store_true", help="write docs/benchmark.{md,csv,png}")
    ap.add_argument("--iobench-rounds", type=int, default=None,
                    help="tracking-overhead rounds (standard/links/full: 5, smoke/scaling: 0)")
    ap.add_argument("--iobench-read-mb", type=int, default=400)
    ap.add_argument("--run-timeout", type=int, default=900,
                    help="seconds per run, at least (more for guests above 1 GiB)")
    ap.add_argument("--resume", action="store_true",
                    help="reuse what --out's state.json holds from an earlier invocation of the "
                    "same matrix (runs with verdict OK, whole scenarios with their storage limit, "
                    "the tracking overhead) and run the rest; state.json is written as the "
                    "runs go")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 unless every run's guest verdict is OK (smoke test)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _stop)
    runs = matrix(args.matrix)
    if args.modes:
        keep = args.modes.split(",")
        bad = [m for m in keep if m not in MODES]
        if bad:
            ap.error("unknown mode(s) %s" % bad)
        runs = [(sc, [m for m in ms if m in keep]) for sc, ms in runs]
    if args.only:
        runs = [(sc, ms) for sc, ms in runs if re.search(args.only, scen_label(sc))]
    runs = [(sc, ms) for sc, ms in runs if ms]
    if not runs:
        ap.error("no run left")
    if args.iobench_rounds is None:
        args.iobench_rounds = 0 if args.matrix in ("smoke", "scaling") else 5
    # One data disk for the scenarios of the matrix; the scaling series
    # gives each guest size one of its own (a 8 GiB guest's page cache
    # needs 5 GiB of files, which every run copies into the export).
    args.data_mb = max([400, args.iobench_read_mb if args.iobench_rounds else 0] +
                       [read_mb(sc) for sc, _ in runs if not sc["series"]])
    for sc, _ in runs:
        sc["data_mb"] = max(400, read_mb(sc)) if sc["series"] else args.data_mb
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    total = sum(len(ms) for _, ms in runs)
    say("matrix %s: %d runs in %d scenarios; data disk %s MiB; output in %s" % (
        args.matrix, total, len(runs), "/".join(str(m) for m in sorted({sc["data_mb"] for sc, _ in runs})),
        args.out))
    started = datetime.datetime.now(datetime.timezone.utc)
    # At the start: the commit and QEMU the runs use, not those of the end.
    machine_line = machine()
    rows, i, disk_mb = [], 0, None
    io = io_full = core = None
    state_path = os.path.join(args.out, "state.json")
    prior = {"rows": []}
    if args.resume and os.path.exists(state_path):
        with open(state_path) as f:
            prior = json.load(f)
        say("resuming: %d runs in %s" % (len(prior["rows"]), state_path))
    if prior.get("matrix", args.matrix) != args.matrix:
        raise SystemExit("%s is of matrix %s, not %s" % (state_path, prior["matrix"], args.matrix))
    if args.resume and prior.get("io") is not None:
        io, io_full, core = prior["io"], prior.get("io_full"), prior.get("core")
    reused = 0

    def save_state():
        tmp = state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"matrix": args.matrix, "rows": rows, "io": io, "io_full": io_full,
                       "core": core}, f)
        os.replace(tmp, state_path)

    def earlier(sc, mode):
        for r in prior["rows"]:
            if r["mode"] == mode and r["verdict"] == "OK" and scen_key(r) == scen_key(sc):
                return r
        return None

    def overhead():
        nonlocal io, io_full, core
        if args.iobench_rounds and io is None:
            if disk_mb != args.data_mb:
                ensure_assets(args.data_mb)
            io = iobench(args) or {}
            io_full = iobench(args, full_index=True)
            core = core_bench()
            save_state()

    for k, (sc, ms) in enumerate(runs):
        if sc["series"]:
            # The tracking overhead before the series, on the matrix's disk.
            overhead()
        old = [earlier(sc, m) for m in ms]
        if all(old):
            # A scenario done before, storage limit included.
            rows += old
            i += len(ms)
            reused += len(ms)
            say("%s: %d runs from %s" % (scen_label(sc), len(ms), state_path))
            continue
        if sc["data_mb"] != disk_mb:
            ensure_assets(sc["data_mb"])
            disk_mb = sc["data_mb"]
        first = len(rows)
        for m, o in zip(ms, old):
            i += 1
            if o:
                reused += 1
                rows.append(o)
            else:
                rows.append(one_run(args, sc, m, i, total))
        if any(m.startswith("dedup-nas") for m in ms):
            lim = storage_limit(args, str(k))
            for r in rows[first:]:
                r["storage_limit_1_bps"] = "%.0f" % lim[1] if 1 in lim else ""
                r["storage_limit_n_bps"] = "%.0f" % lim[FETCH_CONNECTIONS] if FETCH_CONNECTIONS in lim else ""
                r["storage_limit_n"] = FETCH_CONNECTIONS
        save_state()
    overhead()
    io = io or None
    derive(rows)

    csv_path = os.path.join(args.out, "bench.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    png = os.path.join(args.out, "bench.png")
    have_png = plot(rows, png)
    elapsed = datetime.datetime.now(datetime.timezone.utc) - started
    md = ["# qemu-nas-dedup benchmark results", "",
          "Generated by `scripts/bench.sh --matrix %s%s%s` on %s in %d min%s. Do not edit: run the "
          "command again."
          % (args.matrix, " --doc" if args.doc else "", " --resume" if args.resume else "",
             started.strftime("%Y-%m-%d %H:%M UTC"), elapsed.total_seconds() // 60,
             "; %d of the %d runs (and the tracking overhead, if it was measured then) are an "
             "earlier invocation's, from state.json" % (reused, len(rows)) if reused else ""), "",
          "Machine: " + machine_line + ".", "",
          "Every run boots the same Linux guest (Debian's kernel, busybox initramfs) with its data disk "
          "on the NFS export, reads the given share of its RAM worth of files into the page cache, "
          "then live-migrates it over loopback TCP with one mode; the destination guest checks every "
          "file it read and wrote and all the memory it dirtied (verdict). 1GbE = `max-bandwidth` "
          "125 MB/s; 10GbE = 1250 MB/s; uncapped = `max-bandwidth` 0. *RAM on wire* is query-migrate's "
          "`ram.transferred`; *from NFS* is what the dedup-nas destination read from shared storage. "
          "The *floor* is computed from the stopped source's RAM and the disk at switchover: 4096 B per "
          "non-zero page whose content is on no disk block + %d B per page whose content is. "
          "xbzrle and the multifd modes run with QEMU's defaults otherwise (64 MiB xbzrle cache; 2 "
          "channels, zstd level 1). dedup-nas+multifd sends the pages that are not references on "
          "the multifd channels; dedup-nas is refused with xbzrle (see docs/devel/nas-dedup.rst). "
          "The postcopy modes ask for postcopy right after `migrate`; in dedup-nas+postcopy the "
          "first pass sends only references, postcopy starts after it, and the destination reads "
          "the referenced blocks while the guest runs there (*filled from NFS after the switch*; "
          "*references faulted on*: pages the guest touched before their read, asked from the "
          "source). The dedup-nas modes run with the automatic link/NAS "
          "split (`dedup-nas-ref-share` 0, the default): *refs / on disk* is the share of the pages "
          "whose content is on disk that went as references, the others in full. Scenarios marked "
          "*dst prealloc* start the destination QEMU (only it) with `%s`: its RAM is allocated and "
          "touched before the migration starts, so the incoming pages land in memory that is already "
          "there; they are compared with the upstream modes under the same condition. Scenarios "
          "marked *scaling* are the scaling series (below)." % (REF_COST, PREALLOC_ARGS), ""]
    t = targets(rows, io, io_full)
    if t:
        md += ["## Targets", "", t, ""]
    v = versus_upstream(rows)
    if v:
        md += ["## dedup-nas against the fastest upstream mode", "", v, ""]
    pt = postcopy_table(rows)
    if pt:
        md += ["## Postcopy", "", pt, ""]
    gt = guest_table(rows)
    if gt:
        md += ["### What the guest sees while postcopy fills", "",
               "Page requests: postcopy's own (a vCPU, or QEMU, touched a page not there yet), "
               "from the request to the page placed, in the destination's trace "
               "(`postcopy_page_req_add` / `_del`). Faults read from storage: dedup-nas's faults on "
               "pages still to fill that its storage read (or the fill's) placed, from the fault to "
               "the page placed (`nas_dedup_load_fill_urgent_done`); waits run out: those asked from "
               "the source after `x-dedup-nas-fault-read-ms`. Touch rounds: the guest reads the first "
               "MiB of the files in its page cache that the scenario gives (touch), timed by its own "
               "clock; \"before\" is on the source before the migration, \"during the fill\" the "
               "rounds that ended on the destination and began before the migration completed.",
               "", gt, ""]
    sc = scaling_table(rows)
    if sc:
        md += ["## Scaling", "", sc, ""]
    md += ["## Runs", "", markdown(rows), ""]
    e = estimate_table(rows)
    if e:
        md += ["## The estimate against the migration", "", e, ""]
    ex = extras(rows, io, core, io_full)
    if ex:
        md += ["## Index memory, fetch throughput, tracking overhead", "", ex, ""]
    if have_png:
        md += ["## Plot", "", "![bytes and time per scenario and mode](%s)" %
               ("benchmark.png" if args.doc else "bench.png"), ""]
    md_text = "\n".join(md)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(md_text)
    if args.doc:
        docs = os.path.join(TOP, "docs")
        with open(os.path.join(docs, "benchmark.md"), "w") as f:
            f.write(md_text)
        shutil.copy(csv_path, os.path.join(docs, "benchmark.csv"))
        if have_png:
            shutil.copy(png, os.path.join(docs, "benchmark.png"))
        say("results page: docs/benchmark.md")
    print(md_text)
    failed = [r for r in rows if r["verdict"] != "OK"]
    say("%d runs, %d failed; CSV %s" % (len(rows), len(failed), csv_path))
    if args.check and (failed or (args.iobench_rounds and not (io and io_full))):
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (Stop, KeyboardInterrupt):
        say("stopped")
        sys.exit(130)
