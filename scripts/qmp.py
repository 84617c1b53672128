#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""QMP and serial-console helper for shell scripts.

  qmp.py cmd SOCKET COMMAND [JSON-ARGS]
        run one QMP command, print its "return" value as JSON
        (exit 1 and print the error on an error reply)
  qmp.py wait-migration SOCKET [--timeout S] [--interval S] [--start-postcopy]
        poll query-migrate until completed/failed/cancelled, print the final
        query-migrate JSON; exit 0 only when completed.  --start-postcopy:
        send migrate-start-postcopy first, and add to the JSON
        "x-postcopy-active-ms", the milliseconds until query-migrate first
        said postcopy-active (-1: never)
  qmp.py wait-status SOCKET STATUS [--timeout S]
        poll query-status until it reports STATUS (e.g. running)
  qmp.py serial SOCKET [--send TEXT] [--expect REGEX] [--timeout S]
        connect to a `-chardev socket,server=on` serial backend, send TEXT
        (a newline is appended), then copy the console output to stdout until
        a line matches REGEX; exit 0 on a match, 1 on timeout/EOF

SOCKET is a unix socket path.  All waits are bounded.  QMP goes through
QEMU's own client library, python/qemu/qmp of the assembled tree
(build/qemu-src/python, or $NASDEDUP_QEMU_PYTHON).
"""

import argparse
import json
import os
import re
import socket
import sys
import time

sys.path.insert(0, os.environ.get(
    "NASDEDUP_QEMU_PYTHON",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "build",
                 "qemu-src", "python")))
# pylint: disable=wrong-import-position
from qemu.qmp import QMPError                         # noqa: E402
from qemu.qmp.legacy import QEMUMonitorProtocol        # noqa: E402


class QMP:
    """One QMP connection (QEMU's legacy synchronous client)."""

    def __init__(self, path, timeout=10.0):
        self.mon = QEMUMonitorProtocol(path)
        self.mon.connect(negotiate=True)
        self.mon.settimeout(timeout)

    def execute(self, command, arguments=None):
        """The command's "return" value; QMPError on an error reply."""
        return self.mon.cmd(command, **(arguments or {}))

    def close(self):
        self.mon.close()


def connect(path, timeout):
    """Connect, retrying while QEMU has not created/opened the socket yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return QMP(path, max(10.0, timeout))
        except (OSError, QMPError):
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def cmd_cmd(a):
    q = connect(a.socket, a.timeout)
    try:
        args = json.loads(a.args) if a.args else None
        print(json.dumps(q.execute(a.command, args), indent=1, sort_keys=True))
    finally:
        q.close()
    return 0


def cmd_wait_migration(a):
    q = connect(a.socket, 10)
    t0 = time.monotonic()
    deadline = t0 + a.timeout
    postcopy_ms = -1
    try:
        if a.start_postcopy:
            q.execute("migrate-start-postcopy")
        while True:
            info = q.execute("query-migrate")
            status = info.get("status", "none")
            if status == "postcopy-active" and postcopy_ms < 0:
                postcopy_ms = round((time.monotonic() - t0) * 1000)
            if a.start_postcopy:
                info["x-postcopy-active-ms"] = postcopy_ms
            if status in ("completed", "failed", "cancelled"):
                print(json.dumps(info, indent=1, sort_keys=True))
                return 0 if status == "completed" else 1
            if time.monotonic() >= deadline:
                print(json.dumps(info, indent=1, sort_keys=True))
                print("timeout after %ss, status %s" % (a.timeout, status), file=sys.stderr)
                return 1
            time.sleep(a.interval)
    finally:
        q.close()


def cmd_wait_status(a):
    q = connect(a.socket, a.timeout)
    deadline = time.monotonic() + a.timeout
    try:
        while True:
            status = q.execute("query-status").get("status")
            if status == a.status:
                print(status)
                return 0
            if time.monotonic() >= deadline:
                print("timeout: status is %s, wanted %s" % (status, a.status), file=sys.stderr)
                return 1
            time.sleep(0.1)
    finally:
        q.close()


def cmd_serial(a):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(a.socket)
    deadline = time.monotonic() + a.timeout
    pattern = re.compile(a.expect) if a.expect else None
    try:
        if a.send is not None:
            s.sendall((a.send + "\n").encode())
        if pattern is None:
            return 0
        buf = b""
        while time.monotonic() < deadline:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                data = s.recv(4096)
            except socket.timeout:
                break
            if not data:
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode("utf-8", "replace").rstrip("\r")
                print(text, flush=True)
                if pattern.search(text):
                    return 0
        print("no line matching %r within %ss" % (a.expect, a.timeout), file=sys.stderr)
        return 1
    finally:
        s.close()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="sub", required=True)
    c = sub.add_parser("cmd")
    c.add_argument("socket")
    c.add_argument("command")
    c.add_argument("args", nargs="?")
    c.add_argument("--timeout", type=float, default=10, help="connect timeout")
    c.set_defaults(func=cmd_cmd)
    w = sub.add_parser("wait-migration")
    w.add_argument("socket")
    w.add_argument("--timeout", type=float, default=600)
    w.add_argument("--interval", type=float, default=0.1)
    w.add_argument("--start-postcopy", action="store_true")
    w.set_defaults(func=cmd_wait_migration)
    st = sub.add_parser("wait-status")
    st.add_argument("socket")
    st.add_argument("status")
    st.add_argument("--timeout", type=float, default=60)
    st.set_defaults(func=cmd_wait_status)
    se = sub.add_parser("serial")
    se.add_argument("socket")
    se.add_argument("--send")
    se.add_argument("--expect")
    se.add_argument("--timeout", type=float, default=60)
    se.set_defaults(func=cmd_serial)
    a = p.parse_args()
    try:
        return a.func(a)
    except (OSError, QMPError, ValueError) as e:
        print("qmp.py: %s" % e, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
