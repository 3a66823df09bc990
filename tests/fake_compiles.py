"""Stand-ins for one layout's compile, for `plan.workers`' tests (spawned workers import this
module by name, so it imports nothing heavy)."""

import os
import sys
import time


def fake_compile(task):
    """("ok", x) -> x * 2; ("hang", s) sleeps s seconds (a compiler stuck in a futex);
    ("abort", _) prints an XLA-style fatal line and aborts (a failed check in the compiler);
    ("raise", _) raises."""
    kind, x = task
    if kind == "hang":
        time.sleep(x)
    if kind == "abort":
        print("W1207 00:00:00.000000 1 noise.cc:1] a warning first", file=sys.stderr)
        print("F1207 00:00:00.000000 1 spmd_partitioner_util.cc:497] Check failed: fake partition", file=sys.stderr)
        print("*** Check failure stack trace: ***\n    @ 0x7f00 abort\nFatal Python error: Aborted", file=sys.stderr)
        sys.stderr.flush()
        os.abort()
    if kind == "raise":
        raise ValueError("bad layout")
    return x * 2
