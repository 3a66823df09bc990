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
    if free:
        if n % fixed:
            raise MeshError(f"mesh {sizes} does not divide the {n} devices")
        sizes[free[0]] = n // fixed
    if math.prod(sizes.values()) != n:
        raise MeshError(f"mesh data={sizes['data']} stage={sizes['stage']} fsdp={sizes['fsdp']} "
                        f"tensor={sizes['tensor']} has {math.prod(sizes.values())} devices, "
                        f"but {n} are available")
    return sizes


def make_mesh(sizes: dict[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    sizes = sizes or mesh_shape()
    shape = tuple(sizes[a] for a in MESH_AXES)
    devices = list(devices) if devices is not None else jax.devices()
    if math.prod(shape) != len(devices):
        raise MeshError(f"mesh {sizes} needs {math.prod(shape)} devices, have {len(devices)}")
    try:
        dev_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # e.g. CPU or unusual topologies: plain order is fine
        dev_array = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(dev_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


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


def global_batch(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-host numpy rows -> global arrays sharded over (data, fsdp) along the batch axis.

    Each process passes only its own rows (global_batch / process_count of them); the
    global batch is their concatenation in process order.
    """
    out = {}
    for k, v in host_batch.items():
        s = batch_sharding(mesh, v.ndim)
        global_shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(s, v, global_shape)
    return out


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
