"""Process coordination for multi-controller runs, on public JAX APIs only.

Owns: `barrier()` (every live process waits here; no device collective, so no peer can time out
in a collective while another is still compiling or reading), `allgather_json()` (each process
contributes one JSON value, every process gets the list in process order) and the decisions
built on them elsewhere (the collective restore in `checkpoint.newest_readable`).

With one process everything here returns at once. A process that dies is noticed by the
coordination service's heartbeat (`train --heartbeat_timeout_s`), which stops the others, so a
barrier never waits for a peer that is not coming.
"""

from __future__ import annotations

import json

import jax
import numpy as np


class PeerLost(RuntimeError):
    """A process of the run disappeared while the others waited for it."""


def barrier():
    """Waits until every process of the run reaches its matching call.

    `multihost_utils.live_devices` agrees on the live processes through the coordination
    service (a barrier, no device collective); a process missing from the agreed set is dead,
    and the run cannot go on without it."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    with multihost_utils.live_devices(jax.devices()) as alive:
        pass
    if len(alive) != jax.device_count():
        lost = sorted({d.process_index for d in jax.devices()} - {d.process_index for d in alive})
        raise PeerLost(f"processes {lost} of the run are gone")


def allgather_json(value) -> list:
    """[value of process 0, value of process 1, ...] on every process (after a `barrier`)."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    barrier()  # all are here before the first device collective (gloo gives up on late peers)
    data = np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([len(data)], np.int32))
    width = 1 << int(max(16, int(np.max(sizes)))).bit_length()  # few distinct shapes, few compiles
    padded = np.zeros((width,), np.uint8)
    padded[:len(data)] = data
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(gathered[p, :int(sizes[p, 0])]).decode()) for p in range(jax.process_count())]
