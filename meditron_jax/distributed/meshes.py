"""The device mesh: its sizes (gin `mesh.*`) and its devices laid out on processes (hosts).

Owns: `MESH_AXES`, `mesh_shape()` (gin `mesh.data/stage/fsdp/tensor`, one may be -1),
`make_mesh()` and the placement of mesh axes on processes (gin `placement.process_axes`).
Does not own: what is sharded over which axis (`sharding.py`).
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from meditron_jax.errors import UserError

log = logging.getLogger("meditron_jax")

MESH_AXES = ("data", "stage", "fsdp", "tensor")


class MeshError(UserError, ValueError):
    """User-caused mesh problem (reported as one line)."""


@gin.configurable("mesh")
def mesh_shape(data: int = -1, stage: int = 1, fsdp: int = 1, tensor: int = 1,
               num_devices: int | None = None) -> dict[str, int]:
    """Resolve the gin `mesh.*` sizes (one may be -1: it takes the remaining devices)."""
    n = jax.device_count() if num_devices is None else num_devices
    sizes = {"data": data, "stage": stage, "fsdp": fsdp, "tensor": tensor}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise MeshError(f"only one mesh axis may be -1, got {free}")
    for k, v in sizes.items():
        if v != -1 and v < 1:
            raise MeshError(f"mesh.{k} must be >= 1 or -1, got {v}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    note = _process_note() if num_devices is None else ""
    if free:
        if n % fixed:
            raise MeshError(f"mesh {sizes} does not divide the {n} devices{note}")
        sizes[free[0]] = n // fixed
    if math.prod(sizes.values()) != n:
        raise MeshError(f"mesh data={sizes['data']} stage={sizes['stage']} fsdp={sizes['fsdp']} "
                        f"tensor={sizes['tensor']} has {math.prod(sizes.values())} devices, "
                        f"but {n} are available{note}")
    return sizes


def make_mesh(sizes: dict[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """The mesh over `devices` (default: every device of every process).

    With several processes, each mesh axis is split into a part across processes and a part
    inside one process (`process_placement`, in the order of `placement.process_axes`), and
    jax's hybrid-mesh builder lays the devices out so that each process's devices form one
    block of that split (e.g. Meditron-70B on 16 hosts of 8 GPUs: tensor 8 inside a host,
    stage 8 x data 2 across hosts)."""
    sizes = sizes or mesh_shape()
    shape = tuple(sizes[a] for a in MESH_AXES)
    devices = list(devices) if devices is not None else jax.devices()
    if math.prod(shape) != len(devices):
        raise MeshError(f"mesh {sizes} needs {math.prod(shape)} devices, have {len(devices)}"
                        f"{_process_note(devices)}")
    per_process = _devices_by_process(devices)
    if len(per_process) > 1:
        across = process_placement(sizes, len(per_process), len(per_process[0]),
                                   [len(d) for d in per_process])
        inside = tuple(sizes[a] // across[a] for a in MESH_AXES)
        outside = tuple(across[a] for a in MESH_AXES)
        try:
            dev_array = mesh_utils.create_hybrid_device_mesh(inside, outside, devices=devices,
                                                             process_is_granule=True)
        except ValueError as e:  # a process's devices do not form its physical sub-mesh: plain order
            _plain_order(devices, e)
            grid = np.empty(outside, dtype=object)
            for p, group in enumerate(per_process):
                grid.flat[p] = np.asarray(group, dtype=object).reshape(inside)
            dev_array = np.block(grid.tolist())
    else:
        try:
            dev_array = mesh_utils.create_device_mesh(shape, devices=devices)
        except Exception as e:  # e.g. CPU or unusual topologies: plain order
            _plain_order(devices, e)
            dev_array = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(dev_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _plain_order(devices, why: Exception):
    """Says (once per mesh) that the devices were laid out in plain order, not by their physical
    topology: harmless on CPU, a possible slowdown of every collective on a GPU or TPU slice."""
    platform = devices[0].platform
    level = logging.INFO if platform == "cpu" else logging.WARNING
    log.log(level, "mesh: %d %s devices could not be arranged by their physical topology (%s); using plain "
            "device order%s", len(devices), platform, " ".join(str(why).split())[:200],
            "" if platform == "cpu" else ": collectives may cross slower links than they need to")


# ---- placing the mesh on processes (hosts) ----------------------------------------------
# Which axes span processes first: pipeline stages (point-to-point activations, once per
# micro-batch and stage boundary) and data parallelism (one gradient all-reduce per step) are
# the cheap ones across a slow network; fsdp (all-gather + reduce-scatter of every layer's
# weights per micro-batch) and tensor parallelism (all-reduces inside every layer) are the
# expensive ones and span processes only when an axis is larger than what one process holds.
DEFAULT_PROCESS_AXES = ("stage", "data", "fsdp", "tensor")


@gin.configurable("placement")
def process_axes(process_axes: Sequence[str] = DEFAULT_PROCESS_AXES) -> tuple[str, ...]:
    """gin `placement.process_axes`: the mesh axes that may span processes, in the order they
    take the process count's factors (an axis left out never spans processes)."""
    order = tuple(process_axes)
    bad = [a for a in order if a not in MESH_AXES]
    if bad or len(set(order)) != len(order):
        raise MeshError(f"placement.process_axes {order} must name distinct mesh axes of {MESH_AXES}")
    return order


def _mesh_str(sizes: dict[str, int]) -> str:
    return " ".join(f"{a}={sizes[a]}" for a in MESH_AXES)


def process_placement(sizes: dict[str, int], num_processes: int, devices_per_process: int,
                      local_counts: Sequence[int] | None = None,
                      order: Sequence[str] | None = None) -> dict[str, int]:
    """How many processes each mesh axis spans ({axis: n}, product = num_processes).

    Greedy over `order` (gin `placement.process_axes`): each axis takes the largest factor of
    the processes still to place that divides it; the rest of the axis lies inside a process.
    A MeshError (one line naming the mesh, the process count and the devices per process) when
    the mesh cannot be laid out so."""
    where = f"{num_processes} processes x {devices_per_process} devices"
    if local_counts is not None and len(set(local_counts)) > 1:
        raise MeshError(f"mesh {_mesh_str(sizes)} cannot be placed on {num_processes} processes: they hold "
                        f"different numbers of devices {sorted(set(local_counts))}")
    if math.prod(sizes.values()) != num_processes * devices_per_process:
        raise MeshError(f"mesh {_mesh_str(sizes)} has {math.prod(sizes.values())} devices, but {where} "
                        f"are {num_processes * devices_per_process}")
    order = process_axes() if order is None else tuple(order)
    across = {a: 1 for a in MESH_AXES}
    left = num_processes
    for a in order:
        across[a] = math.gcd(left, sizes[a])
        left //= across[a]
    if left != 1:
        raise MeshError(f"mesh {_mesh_str(sizes)} cannot be placed on {where}: only the axes {order} "
                        f"(placement.process_axes) may span processes, and their sizes do not split over "
                        f"{num_processes} processes")
    return across


def _devices_by_process(devices) -> list[list]:
    groups: dict[int, list] = {}
    for d in devices:
        groups.setdefault(d.process_index, []).append(d)
    return [groups[k] for k in sorted(groups)]


def _process_note(devices=None) -> str:
    groups = _devices_by_process(jax.devices() if devices is None else devices)
    if len(groups) <= 1:
        return ""
    counts = sorted({len(g) for g in groups})
    return f" ({len(groups)} processes x {'/'.join(map(str, counts))} devices)"


def check_placement(sizes: dict[str, int]):
    """Startup validation: the mesh can be laid out on this run's processes (before any compile)."""
    groups = _devices_by_process(jax.devices())
    if len(groups) > 1:
        process_placement(sizes, len(groups), len(groups[0]), [len(g) for g in groups])
