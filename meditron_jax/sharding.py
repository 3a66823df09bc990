"""Device meshes and the one place where logical axis names become mesh axes.

Owns: the mesh (axes `data, stage, fsdp, tensor`), the logical->mesh rules (data, bound in
gin), `constrain()` for activations, parameter / optimizer-state shardings, and turning
per-host numpy batches into global `jax.Array`s. Does not own: model code (which only names
logical axes) or the pipeline schedule (`pipeline.py`).

Axis types: all mesh axes are `AxisType.Auto`. Shardings are fixed explicitly at the jit
boundary (parameters, optimizer state, batch) and at a few activation points through
`constrain`; XLA's propagation fills in the rest. That keeps the model code free of
sharding-in-types annotations while still pinning every layout that matters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Sequence

import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from meditron_jax.errors import UserError

MESH_AXES = ("data", "stage", "fsdp", "tensor")
LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers")

# Megatron-style tensor parallelism + FSDP over `embed` + data parallelism over batch.
# A mesh axis already used by an earlier dimension of the same array is skipped, so
# activations [batch, length, embed] shard batch over (data, fsdp) and keep embed whole,
# while parameters [.., embed, ..] shard embed over fsdp.
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", "stage"),
)


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
        except ValueError:  # a process's devices do not form its physical sub-mesh: plain order
            grid = np.empty(outside, dtype=object)
            for p, group in enumerate(per_process):
                grid.flat[p] = np.asarray(group, dtype=object).reshape(inside)
            dev_array = np.block(grid.tolist())
    else:
        try:
            dev_array = mesh_utils.create_device_mesh(shape, devices=devices)
        except Exception:  # e.g. CPU or unusual topologies: plain order is fine
            dev_array = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(dev_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


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


@gin.configurable("sharding")
def logical_rules(rules: Sequence = DEFAULT_RULES, zero1: bool = False, grad_reduce_dtype: str = "float32",
                  fsdp_grad_reduce: str | None = None):
    """gin: `sharding.rules` (tuple of (logical, mesh axis|tuple|None)), `sharding.zero1`,
    `sharding.grad_reduce_dtype` and `sharding.fsdp_grad_reduce` (see `GradSync`; read by
    `grad_sync()`, validated here so that a bad value fails before anything is built)."""
    table = dict((k, v) for k, v in rules)
    unknown = set(table) - set(LOGICAL_AXES)
    if unknown:
        raise MeshError(f"unknown logical axes in sharding.rules: {sorted(unknown)}")
    GradSync(grad_reduce_dtype, fsdp_grad_reduce)
    return table, zero1


GRAD_REDUCE_DTYPES = ("float32", "bfloat16")
FSDP_GRAD_REDUCE = ("micro_batch", "step")


@dataclasses.dataclass(frozen=True)
class GradSync:
    """How data-parallel gradients are reduced (train_step.py implements it).

    dtype (`sharding.grad_reduce_dtype`): the dtype on the wire of the one gradient reduction
      per step over the data axes. 'float32' (default; Megatron forces fp32 reduction for bf16
      training) or 'bfloat16' (half the bytes; Megatron's `--grad-reduce-in-bf16`).
    fsdp (`sharding.fsdp_grad_reduce`), only with mesh.fsdp > 1:
      'micro_batch' (the default there; torchtitan's FSDP2 default): parameters stay sharded
        over fsdp during compute (gathered per layer), gradients are reduce-scattered over
        fsdp after every micro-batch; per-device gradient accumulators are fsdp shards.
      'step': fsdp is treated like `data`: the working copy is gathered over fsdp once per
        step, gradients accumulate full-size on each device and are reduce-scattered once
        per step (less traffic with accumulation, more memory: ZeRO-2 instead of ZeRO-3).
    """
    dtype: str = "float32"
    fsdp: str | None = None

    def __post_init__(self):
        if self.dtype not in GRAD_REDUCE_DTYPES:
            raise MeshError(f"unknown sharding.grad_reduce_dtype {self.dtype!r}; known: "
                            f"{', '.join(GRAD_REDUCE_DTYPES)}")
        if self.fsdp is not None and self.fsdp not in FSDP_GRAD_REDUCE:
            raise MeshError(f"unknown sharding.fsdp_grad_reduce {self.fsdp!r}; known: "
                            f"{', '.join(FSDP_GRAD_REDUCE)}")

    def check_mesh(self, sizes: dict):
        """One line when the setting conflicts with the mesh."""
        if self.fsdp == "micro_batch" and sizes.get("fsdp", 1) == 1:
            raise MeshError(f"sharding.fsdp_grad_reduce='micro_batch' reduce-scatters over fsdp, but "
                            f"mesh.fsdp={sizes.get('fsdp', 1)}; use mesh.fsdp > 1 or leave it unset")

    def manual_axes(self, mesh) -> tuple[str, ...]:
        """The mesh axes gradients accumulate unreduced over (manual in the step's shard_map)."""
        axes = ["data"] if mesh.shape["data"] > 1 else []
        if mesh.shape["fsdp"] > 1 and self.fsdp == "step":
            axes.append("fsdp")
        return tuple(axes)


def grad_sync(grad_reduce_dtype: str | None = None, fsdp_grad_reduce: str | None = None) -> GradSync:
    """The gin-bound `sharding.grad_reduce_dtype` / `sharding.fsdp_grad_reduce` (arguments win)."""
    try:
        bound = gin.get_bindings("sharding")
    except (ValueError, KeyError):
        bound = {}
    return GradSync(grad_reduce_dtype or bound.get("grad_reduce_dtype", "float32"),
                    fsdp_grad_reduce or bound.get("fsdp_grad_reduce"))


def logical_to_spec(axes: Sequence[str | None], rules: dict) -> P:
    used: set[str] = set()
    out = []
    for ax in axes:
        target = rules.get(ax) if ax is not None else None
        if target is None:
            out.append(None)
            continue
        names = (target,) if isinstance(target, str) else tuple(target)
        names = tuple(n for n in names if n not in used)
        used.update(names)
        out.append(None if not names else names[0] if len(names) == 1 else names)
    return P(*out)


def _fit(spec: P, shape, mesh: Mesh) -> P:
    """Drop mesh axes from dimensions they do not divide (e.g. vocab 517, odd batch)."""
    out = []
    for i, entry in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        if entry is None:
            out.append(None)
            continue
        names = (entry,) if isinstance(entry, str) else tuple(entry)
        keep = []
        size = 1
        for n in names:
            if shape[i] % (size * mesh.shape[n]) == 0:
                keep.append(n)
                size *= mesh.shape[n]
        out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*out)


# ---- the active mesh + rules (so model code can stay mesh-free) ----------------------
_ACTIVE: list[tuple[Mesh, dict]] = []


@contextlib.contextmanager
def push_rules(mesh, rules: dict):
    """Point `constrain` at `mesh` (a Mesh or an abstract mesh) and `rules`, without entering
    jax's mesh context (the pipeline uses it inside its shard_map body)."""
    _ACTIVE.append((mesh, rules))
    try:
        yield mesh
    finally:
        _ACTIVE.pop()


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: dict | None = None):
    """Activate `mesh` and the logical rules for `constrain` (and jax's mesh context)."""
    rules = dict(DEFAULT_RULES) if rules is None else rules
    with push_rules(mesh, rules), jax.set_mesh(mesh):
        yield mesh


def active() -> tuple[Mesh, dict] | None:
    return _ACTIVE[-1] if _ACTIVE else None


def mesh_platform(mesh=None) -> str:
    """'cpu', 'gpu' or 'tpu' of `mesh`'s devices, else of the mesh being traced under (jax's
    abstract mesh carries its device kind), else of JAX's default backend. Backend-dependent
    choices ask this, so that compiling for a GPU/TPU target from a CPU host takes the
    target's branch."""
    if mesh is not None and getattr(mesh, "devices", None) is not None and mesh.devices.size:
        return mesh.devices.flat[0].platform
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return getattr(device, "platform", None) or jax.default_backend()


def without_axes(rules: dict, axes) -> dict:
    """`rules` with the mesh axes `axes` dropped (they are manual inside a shard_map)."""
    out = {}
    for k, v in rules.items():
        names = () if v is None else (v,) if isinstance(v, str) else tuple(v)
        names = tuple(n for n in names if n not in axes)
        out[k] = None if not names else names[0] if len(names) == 1 else names
    return out


@contextlib.contextmanager
def manual_rules(axes):
    """Inside a shard_map body manual over `axes`: `constrain()` targets the trace's abstract
    mesh with those axes dropped from the rules (the other axes stay pinned as outside)."""
    outer = active()
    if outer is None:
        yield
        return
    with push_rules(jax.sharding.get_abstract_mesh(), without_axes(outer[1], axes)):
        yield


def constrain(x, axes: Sequence[str | None]):
    """Pin an activation's layout by logical axis names; a no-op when no mesh is active."""
    if not _ACTIVE:
        return x
    mesh, rules = _ACTIVE[-1]
    spec = _fit(logical_to_spec(axes, rules), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def sharding_for(axes, shape, mesh: Mesh, rules: dict) -> NamedSharding:
    return NamedSharding(mesh, _fit(logical_to_spec(axes, rules), shape, mesh))


def zero1_sharding(s: NamedSharding, shape) -> NamedSharding:
    """ZeRO-1 / Megatron distributed optimizer: also split optimizer state over `data`."""
    mesh = s.mesh
    if mesh.shape["data"] == 1:
        return s
    spec = list(tuple(s.spec) + (None,) * (len(shape) - len(s.spec)))
    used = {n for e in spec if e is not None for n in ((e,) if isinstance(e, str) else e)}
    if "data" in used:
        return s
    # Prefer a dimension no other (non-trivial) mesh axis splits: the step's reduce-scatter
    # over `data` then scatters along a dimension that is whole on every device. Otherwise
    # `data` goes last (minor) in the first dimension it divides: each device's shard is then
    # a piece of its own tensor/fsdp block, which a reduce-scatter over `data` produces in place.
    for free_only in (True, False):
        for i, e in enumerate(spec):
            names = () if e is None else (e,) if isinstance(e, str) else tuple(e)
            size = math.prod(mesh.shape[n] for n in names)
            if free_only and size > 1:
                continue
            if shape[i] % (size * mesh.shape["data"]) == 0:
                spec[i] = names + ("data",) if names else "data"
                return NamedSharding(mesh, P(*spec))
    return s


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


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


def tree_shardings(abstract_tree, axes_by_name: dict, mesh: Mesh, rules: dict, zero1: bool = False):
    """Shardings for a train-state-like tree: a leaf under a dict key named like a parameter
    (e.g. params/q_proj, opt_state/.../mu/q_proj) with that parameter's rank gets the
    parameter's sharding (plus ZeRO-1 over `data` when asked, for the optimizer state and the
    fp32 master params alike: Megatron's distributed optimizer; the step gathers a working
    copy in the compute dtype); everything else (counters, scalars) is replicated."""
    def leaf(path, x):
        names = [getattr(k, "key", None) for k in path]
        name = next((n for n in reversed(names) if n in axes_by_name), None)
        shape = getattr(x, "shape", ())
        if name is None or len(shape) != len(axes_by_name[name]):
            return replicated(mesh)
        s = sharding_for(axes_by_name[name], shape, mesh, rules)
        if zero1:  # params too: the fp32 master weights live sharded with the optimizer state
            s = zero1_sharding(s, shape)
        return s
    return jax.tree_util.tree_map_with_path(leaf, abstract_tree)
