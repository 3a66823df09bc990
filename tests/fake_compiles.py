"""Stand-ins for one layout's compile, for `plan.workers`' tests (spawned workers import this
module by name, so it imports nothing heavy)."""

import os
import time


def fake_compile(task):
    """("ok", x) -> x * 2; ("hang", s) sleeps s seconds (a compiler stuck in a futex);
    ("abort", _) prints an XLA-style fatal line and aborts (a failed check in the compiler);
    ("raise", _) raises."""
    kind, x = task
    if kind == "hang":
        time.sleep(x)
    if kind == "abort":  # as `plan.compile` does: the compiler's stderr filtered, its capture kept
        from meditron_jax import console
        with console.quiet_native_stderr([], also=("rematerializ",)):
            os.write(2, b"W1207 00:00:00.000000 1 noise.cc:1] a warning first\n"
                        b"F1207 00:00:00.000000 1 spmd_partitioner_util.cc:497] Check failed: fake partition\n"
                        b"*** Check failure stack trace: ***\n    @ 0x7f00 abort\n")
            os.abort()
    if kind == "raise":
        raise ValueError("bad layout")
    return x * 2
