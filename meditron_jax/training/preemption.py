"""Graceful preemption: signals, the stop vote across processes, and the loop hook.

Owns: the SIGTERM/SIGINT handlers (`Preemption`: first signal = checkpoint after this step and
exit 75, second = abort at once with 130), `StopVote` (every process stops at the same step)
and `PreemptionHook` (runs every step; asks the loop to stop, which forces the checkpoint
hooks). Does not own: saving (checkpoint.CheckpointHook) or the exit status table (train.py).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np

EXIT_PREEMPTED = 75


class Preemption:
    """First SIGTERM/SIGINT: finish the step, checkpoint, exit 75. Second: abort at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only; leave its handlers alone
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handler)

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handler(self, signum, frame):
        if self.requested:
            print(f"\nreceived {signal.Signals(signum).name} again: aborting now (the newest committed "
                  "checkpoint is kept)", file=sys.stderr, flush=True)
            os._exit(130)
        self.requested = True
        print(f"\nreceived {signal.Signals(signum).name}: checkpointing after this step "
              "(signal again to abort)", file=sys.stderr, flush=True)


class StopVote:
    """All processes stop at the same step: any process's signal stops everyone.

    With several processes the vote is a max-reduction on the devices, dispatched after step s
    and read after step s+1 has been dispatched: it completes behind step s, so the host never
    waits for the devices to agree and the step pipeline keeps running (a blocking all-gather
    here would be a host sync every step). The price: a signal stops a multi-process run one
    step later than a single process. Every process votes at every step, so all read the same
    result at the same step."""

    def __init__(self):
        self.multi = jax.process_count() > 1
        self.pending = None
        if self.multi:
            from jax.sharding import Mesh, NamedSharding, PartitionSpec

            mesh = Mesh(np.array(jax.devices()), ("all",))
            self.mesh = mesh  # its own device order, not the training mesh's (which may interleave processes)
            self.votes = NamedSharding(mesh, PartitionSpec("all"))
            self.reduce = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def __call__(self, flag: bool) -> bool:
        if not self.multi:
            return flag
        local = np.full((jax.local_device_count(),), int(flag), np.int32)
        with jax.set_mesh(self.mesh):
            vote = self.reduce(jax.make_array_from_process_local_data(self.votes, local))
        previous, self.pending = self.pending, vote
        return previous is not None and bool(previous)


class PreemptionHook:
    """Loop hook (every step, first): a signal on any process stops the run after this step's
    hooks, the forced checkpoint included (exit 75)."""

    def __init__(self, preemption: Preemption):
        self.preemption = preemption
        self.vote = StopVote()

    def __call__(self, info):
        if self.vote(self.preemption.requested):
            info.request_stop(EXIT_PREEMPTED)
