"""Process coordination for multi-controller runs, on public JAX APIs only.

Owns: joining the cluster (`init_distributed`: explicit flags, or the cluster the environment
names (`environment.detect_cluster`: Open MPI, SLURM, GKE TPU pods, Cloud TPU VMs), with flags
polling the coordinator's TCP port first so an absent coordinator is one line, not an abort;
`log_start`: the start-up line naming how the cluster was found, process i of N and the devices),
`barrier()` (every live process waits here; no device collective, so no peer can time out
in a collective while another is still compiling or reading), `allgather_json()` (each process
contributes one JSON value, every process gets the list in process order) and the decisions
built on them elsewhere (the collective restore in `checkpoint.newest_readable`).

With one process everything here returns at once. A process that dies is noticed by the
coordination service's heartbeat (`train --heartbeat_timeout_s`), which stops the others, so a
barrier never waits for a peer that is not coming.
"""

from __future__ import annotations

import json
import socket
import time

import jax
import numpy as np

from meditron_jax import console
from meditron_jax.distributed import environment
from meditron_jax.errors import UserError


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


def init_distributed(coordinator_address=None, num_processes=None, process_id=None, timeout_s=300,
                     heartbeat_timeout_s=60, shutdown_timeout_s=30) -> environment.Cluster | None:
    """Joins the cluster this process belongs to (`environment.detect_cluster`: explicit flags,
    else Open MPI, SLURM, a GKE TPU pod or a Cloud TPU VM, where `jax.distributed.initialize()`
    finds the coordinator, the process count and this process's index itself), or stays a
    single process; then the backends start (`console.start_backends_quietly`). Returns the
    cluster (None: a single process, JAX's distributed runtime not started) for `log_start`.

    A process that stops sending heartbeats for `heartbeat_timeout_s` is declared dead and the
    coordination service terminates every other process (instead of leaving them blocked in a
    collective forever); at exit a process waits at most `shutdown_timeout_s` for the others.
    """
    # CPU collectives across processes go through gloo (only affects the CPU backend). Must not
    # touch the backend here: jax.distributed.initialize has to come before any device query.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        cluster = environment.detect_cluster(None, coordinator_address, num_processes, process_id)
    except environment.ClusterEnvError as e:
        raise UserError(str(e)) from None
    if cluster is None:
        console.start_backends_quietly()
        return None
    if cluster.how == "flags" and process_id != 0:  # XLA aborts the process when the coordinator never answers
        wait_for_coordinator(coordinator_address, timeout_s)
    try:
        jax.distributed.initialize(initialization_timeout=timeout_s, heartbeat_timeout_seconds=heartbeat_timeout_s,
                                   shutdown_timeout_seconds=shutdown_timeout_s, **cluster.kwargs)
    except Exception as e:
        raise UserError(f"cannot join the JAX cluster found by {cluster.how} ({cluster.evidence}): "
                        f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    console.start_backends_quietly()  # after joining: the backends need the cluster's topology
    if cluster.num_processes is not None and jax.process_count() != cluster.num_processes:
        raise UserError(f"{cluster.how} ({cluster.evidence}) promises {cluster.num_processes} processes, "
                        f"the JAX cluster has {jax.process_count()}")
    return cluster


def log_start(cluster: environment.Cluster | None):
    """The start-up line of every process (after the run's checks, so that a refused start stays
    one line): how the cluster was found, process i of N, local and global devices."""
    local, devices = jax.local_devices(), jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    what = f"{len(local)} local / {len(devices)} global {devices[0].platform} devices ({', '.join(kinds)})"
    if cluster is None:
        console.log.info(f"single process (no cluster environment found): {what}")
    else:
        console.log.info(f"cluster found by {cluster.how} ({cluster.evidence}): process {jax.process_index()} "
                         f"of {jax.process_count()}, {what}")


def wait_for_coordinator(address: str, timeout_s: float):
    """Polls until the coordinator accepts TCP connections; a UserError after `timeout_s`."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--coordinator_address {address!r} is not HOST:PORT")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise UserError(f"cannot reach the coordinator {address} within --init_timeout_s {timeout_s} "
                                f"({e.strerror or e})") from None
            time.sleep(0.5)
