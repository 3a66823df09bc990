"""Per-host numpy batches -> global `jax.Array`s on the mesh.

Owns: which global batch rows each process supplies (`host_rows`) and assembling a process's
rows into one global array sharded over (data, fsdp) along the batch axis (`global_batch`).
Also the batch layout itself (`batch_sharding`: rows over data x fsdp). Does not own: building
the rows (`data/loader.py`) or the parameter layouts (`sharding.py`).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch axis over (data, fsdp), everything else whole."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def manual_axes_here() -> frozenset:
    """Mesh axes that are manual at this point of the trace (inside a shard_map over them)."""
    am = jax.sharding.get_abstract_mesh()
    return frozenset(getattr(am, "manual_axes", ()) or ()) if am is not None and not am.empty else frozenset()


def local_data_parallel_size(mesh: Mesh) -> int:
    """`data_parallel_size` over the axes still automatic here: inside the train step's
    shard_map manual over `data` (and `fsdp`), a value's batch is already the local rows."""
    manual = manual_axes_here()
    return math.prod(mesh.shape[a] for a in ("data", "fsdp") if a not in manual)


def rows_of(s: NamedSharding, global_batch_size: int, devices) -> np.ndarray:
    """The global batch rows (sorted) that `devices` hold under the batch sharding `s`."""
    index = s.devices_indices_map((global_batch_size,) + (1,) * (len(s.spec) - 1))
    rows: set[int] = set()
    for d in devices:
        rows.update(range(*index[d][0].indices(global_batch_size)))
    return np.asarray(sorted(rows), dtype=np.int64)


def host_rows(mesh: Mesh, global_batch_size: int, process_index: int | None = None) -> np.ndarray:
    """The global batch rows this process (or `process_index`) must supply: the union of the rows
    its devices hold under `batch_sharding`. Devices that differ only in stage, tensor (or any
    axis the batch is not split over) share rows; a process whose devices sit in several
    data-parallel groups supplies each group's rows. Not 1/process_count of the batch in general:
    with stage or tensor spanning processes, processes hold the same rows."""
    p = jax.process_index() if process_index is None else process_index
    devices = [d for d in mesh.devices.flat if d.process_index == p]
    return rows_of(batch_sharding(mesh, 2), global_batch_size, devices)


def _rows_share(mesh: Mesh) -> tuple[int, int]:
    """(this process's data-parallel groups, all groups): its rows are that share of the batch."""
    s = batch_sharding(mesh, 2)
    dp = data_parallel_size(mesh)
    mine = rows_of(s, dp, [d for d in mesh.devices.flat if d.process_index == jax.process_index()])
    return len(mine), dp


def global_batch(host_batch: dict[str, np.ndarray], mesh: Mesh,
                 global_batch_size: int | None = None) -> dict[str, jax.Array]:
    """This process's rows (numpy) -> global arrays sharded over (data, fsdp) along the batch axis.

    `host_batch` holds exactly the rows `host_rows(mesh, global_batch_size)` names, in that
    order (the data pipeline builds just those); each device gets its slice of them. The global
    size defaults to the one those rows imply."""
    out = {}
    for k, v in host_batch.items():
        gb = global_batch_size
        if gb is None:
            mine, dp = _rows_share(mesh)
            gb = v.shape[0] * dp // mine
        rows = host_rows(mesh, gb)
        if len(rows) != v.shape[0]:
            raise ValueError(f"process {jax.process_index()} passed {v.shape[0]} rows of '{k}'; its devices "
                             f"hold {len(rows)} rows of the global batch of {gb}")
        out[k] = _assemble(v, rows, batch_sharding(mesh, v.ndim), (gb,) + v.shape[1:])
    return out


def _assemble(local: np.ndarray, rows: np.ndarray, s: NamedSharding, global_shape) -> jax.Array:
    def shard(index):
        start, stop, _ = index[0].indices(global_shape[0])
        lo = int(np.searchsorted(rows, start))  # a device's rows are contiguous, and all are local
        return local[(slice(lo, lo + stop - start),) + tuple(index[1:])]
    return jax.make_array_from_callback(global_shape, s, shard)
