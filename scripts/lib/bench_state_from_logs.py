#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Rebuild a benchmark's state.json from its logs, for scripts/bench.py --resume.

A bench.py invocation that ended before its report (an aborted asset
build, a machine cut off) leaves its runs' logs in OUT/logs/ and what it
printed on its console.  This reads them back into OUT/state.json, the
file `scripts/bench.sh --matrix M --out OUT --resume` takes the runs from:

  - each run's results, from the "migration:" and "estimate:" lines of
    its log (OUT/logs/runNNN-MODE.log, e2e-smoke.sh's stderr), its
    scenario and mode from the console's "run N/T: <label>, <mode>"
    lines, which follow the matrix's order;
  - the floor, as the console printed it ("floor X MB", to 0.1 MB): the
    page counts behind it (zero, on disk, other) are not in the logs, so
    the results page shows "–" for "refs / on disk" of those runs;
  - each scenario's storage limit (the best of the console's lines for 1
    and for FETCH_CONNECTIONS connections, to 1 MB/s);
  - the tracking overhead, from OUT/logs/iobench*.log, if they hold the
    IOBENCH lines (logs written before bench.py kept stdout in them do
    not: --resume then measures it again).

Usage: bench_state_from_logs.py --matrix links --out build/bench-links3 \\
           --console /path/to/console.log
"""
import argparse
import importlib.util
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", os.path.join(HERE, "..", "bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matrix", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--console", required=True, help="what bench.sh printed")
    args = ap.parse_args()
    b = load_bench()
    runs = b.matrix(args.matrix)
    console = open(args.console, errors="replace").read().splitlines()

    # The runs in the order of the matrix: (scenario, mode), numbered from 1.
    plan = [(sc, m) for sc, ms in runs for m in ms]
    started = {}                # run number -> index of its console line
    for n, line in enumerate(console):
        m = re.match(r"\[bench\] run (\d+)/(\d+): (.*), ([^,]+)$", line)
        if m:
            if int(m.group(2)) != len(plan):
                raise SystemExit("the console is of %s runs, the matrix has %d" % (m.group(2), len(plan)))
            started[int(m.group(1))] = n
    rows, by_scen = [], {}
    for idx, (sc, mode) in enumerate(plan, 1):
        if idx not in started:
            continue
        line = console[started[idx]]
        if not line.endswith("%s, %s" % (b.scen_label(sc), mode)):
            raise SystemExit("run %d: console says %r, the matrix %s, %s" % (
                idx, line, b.scen_label(sc), mode))
        log = os.path.join(args.out, "logs", "run%03d-%s.log" % (idx, mode.replace("+", "-")))
        try:
            out = open(log, errors="replace").read()
        except OSError:
            continue
        # The run's log is e2e-smoke.sh's stderr (E2E-RESULT went to
        # stdout): its "migration:" and "estimate:" lines hold the same
        # values, and it ends with "OK" when the guest's verdict was.
        kv, lines = {}, out.splitlines()
        for l in lines:
            m = re.match(r"\[e2e-smoke\] (migration|estimate): (.*?)(?: \(wall (\d+) ms.*)?$", l)
            if m and "=" in m.group(2):
                kv.update(b.parse_kv(m.group(2), ""))
                if m.group(3):
                    kv["migrate_wall_ms"] = m.group(3)
        if "total_ms" not in kv:
            continue
        row = dict(sc, mode=mode, read_mb=b.read_mb(sc), verdict="FAIL",
                   log=os.path.relpath(log, b.TOP))
        row.update(kv)
        row["verdict"] = "OK" if lines and lines[-1] == "[e2e-smoke] OK" else "FAIL"
        nxt = console[started[idx] + 1] if started[idx] + 1 < len(console) else ""
        m = re.search(r"floor ([0-9.]+) MB.*\((\d+) s incl\. boot\)", nxt)
        if "OK:" not in nxt:
            row["verdict"] = "FAIL"
        if m:
            if float(m.group(1)):
                row["floor_bytes"] = "%.0f" % (float(m.group(1)) * 1e6)
            row["run_s"] = m.group(2)
        rows.append(row)
        by_scen.setdefault(b.scen_key(sc), []).append((idx, row))

    # Storage limits: printed after the last run of a scenario.
    for key, lst in by_scen.items():
        last = started[lst[-1][0]]
        lim = {}
        for line in console[last + 2:]:
            m = re.match(r"\[bench\] storage limit: (\d+) connection\(s\) read \d+ MiB in [0-9.]+ s: (\d+) MB/s",
                         line)
            if not m:
                break
            n, bps = int(m.group(1)), int(m.group(2)) * 1e6
            lim[n] = max(lim.get(n, 0), bps)
        for _, r in lst:
            if 1 in lim:
                r["storage_limit_1_bps"] = "%.0f" % lim[1]
            if b.FETCH_CONNECTIONS in lim:
                r["storage_limit_n_bps"] = "%.0f" % lim[b.FETCH_CONNECTIONS]
            r["storage_limit_n"] = b.FETCH_CONNECTIONS

    state = {"matrix": args.matrix, "rows": rows, "io": None, "io_full": None, "core": None}
    io = {}
    for name, full in (("iobench.log", False), ("iobench-full.log", True)):
        try:
            out = open(os.path.join(args.out, "logs", name), errors="replace").read()
        except OSError:
            break
        res = b.iobench_result(out)
        if not res:
            break
        io[full] = res
    if len(io) == 2:
        state["io"], state["io_full"] = io[False], io[True]
        state["core"] = b.core_bench()
    with open(os.path.join(args.out, "state.json"), "w") as f:
        json.dump(state, f)
    print("%d runs, tracking overhead %s: %s" % (len(rows), "yes" if state["io"] else "no",
                                                  os.path.join(args.out, "state.json")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
