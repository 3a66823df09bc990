"""The one place where logical axis names become mesh axes.

Owns: the logical->mesh rules (data, bound in gin), the sharding context (`ShardingContext`,
entered with `use_mesh` / `push_rules`) that `constrain()` pins activations against, and the
parameter / optimizer-state shardings. Does not own: building the mesh (`meshes.py`), turning
per-host numpy batches into global arrays (`host_batch.py`), model code
(which only names logical axes) or the pipeline schedule (`pipeline.py`).

Axis types: all mesh axes are `AxisType.Auto`. Shardings are fixed explicitly at the jit
boundary (parameters, optimizer state, batch) and at a few activation points through
`constrain`; XLA's propagation fills in the rest. That keeps the model code free of
sharding-in-types annotations while still pinning every layout that matters.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import math
from typing import NamedTuple, Sequence

import gin
import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from meditron_jax.distributed.meshes import MESH_AXES, MeshError

log = logging.getLogger("meditron_jax")

LOGICAL_AXES = ("batch", "length", "residual_length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab",
                "layers")

# Megatron-style tensor parallelism + FSDP over `embed` + data parallelism over batch.
# A mesh axis already used by an earlier dimension of the same array is skipped, so
# activations [batch, length, embed] shard batch over (data, fsdp) and keep embed whole,
# while parameters [.., embed, ..] shard embed over fsdp.
# `residual_length` is the sequence dimension of the activations between the tensor-parallel
# regions (the residual stream, the RMSNorms, the loss input); `length` is the sequence inside
# them. Both are whole by default; `sharding.sequence_parallel` splits `residual_length` over
# `tensor` (Megatron's sequence parallelism, see `logical_rules`).
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("residual_length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", "stage"),
)


@gin.configurable("sharding")
def logical_rules(rules: Sequence = DEFAULT_RULES, zero1: bool = False, grad_reduce_dtype: str = "float32",
                  fsdp_grad_reduce: str | None = None, sequence_parallel: bool = False):
    """gin: `sharding.rules` (tuple of (logical, mesh axis|tuple|None)), `sharding.zero1`,
    `sharding.grad_reduce_dtype` and `sharding.fsdp_grad_reduce` (see `GradSync`; read by
    `grad_sync()`, validated here so that a bad value fails before anything is built), and
    `sharding.sequence_parallel`.

    sequence_parallel: Megatron's sequence parallelism. The activations between the
      tensor-parallel regions (logical `residual_length`: the residual stream, the RMSNorms, the
      final norm's output that the loss reads) are split over `tensor` along the sequence, so
      each tensor rank holds and normalises 1/tensor of them. The tensor-parallel all-reduces
      become a reduce-scatter into that layout plus an all-gather back into the next region:
      the same bytes on the wire. The returned rules carry it (`residual_length` -> `tensor`);
      `check_sequence_parallel` refuses a sequence the tensor axis does not divide."""
    table = dict((k, v) for k, v in rules)
    unknown = set(table) - set(LOGICAL_AXES)
    if unknown:
        raise MeshError(f"unknown logical axes in sharding.rules: {sorted(unknown)}")
    GradSync(grad_reduce_dtype, fsdp_grad_reduce)
    if not isinstance(sequence_parallel, bool):
        raise MeshError(f"sharding.sequence_parallel {sequence_parallel!r} is not one of True, False")
    if sequence_parallel:
        table = sequence_split(table)
    return table, zero1


def sequence_split(rules: dict) -> dict:
    """`rules` with the activations between tensor-parallel regions split over `tensor` along
    the sequence (what `sharding.sequence_parallel` adds)."""
    return {**rules, "residual_length": "tensor"}


def sequence_parallel(rules: dict) -> bool:
    """Whether `rules` split the residual stream along the sequence (over any mesh axis)."""
    return rules.get("residual_length") is not None


def check_sequence_parallel(rules: dict, sizes: dict, seq_len: int, loss_chunk: int | None = None):
    """One line (MeshError) when sequence parallelism is on and the split cannot be made: the
    sequence (and each loss chunk, which is split the same way) must divide over the mesh axes
    `residual_length` maps to."""
    if not sequence_parallel(rules):
        return
    target = rules["residual_length"]
    ways = math.prod(sizes.get(n, 1) for n in ((target,) if isinstance(target, str) else target))
    for what, n in (("train.seq_len", seq_len), ("train.loss_chunk", loss_chunk)):
        if n and n % ways:
            raise MeshError(f"sharding.sequence_parallel splits the sequence over {target}={ways}, but {what} "
                            f"{n} is not divisible by {ways}")


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


def fit_spec(spec: P, shape, mesh: Mesh, dropped: list | None = None) -> P:
    """Drop mesh axes from dimensions they do not divide (e.g. vocab 517, odd batch); each
    drop is appended to `dropped` as (dim, mesh axis) when given (`tree_shardings` logs them)."""
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
            elif dropped is not None:
                dropped.append((i, n))
        out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*out)


# ---- the sharding context: which mesh and rules `constrain` targets -------------------
class ShardingContext(NamedTuple):
    """The mesh (a `Mesh`, or a trace's abstract mesh inside a shard_map) and the logical ->
    mesh rules that `constrain()` and the step's layout pins use. Immutable; entered with
    `use_mesh` (also jax's mesh context) or `push_rules` (rules only), and read back with
    `active()`. There is no default: outside both, `active()` is None and `constrain` is a
    no-op, so model code runs unsharded on one device."""
    mesh: object
    rules: dict


_CURRENT: contextvars.ContextVar = contextvars.ContextVar("meditron_jax_sharding", default=None)


def checked_rules(rules) -> dict:
    """`rules` as a dict ({logical: mesh axis | tuple | None}; DEFAULT_RULES' pairs work too),
    refusing logical or mesh axes outside the closed vocabularies."""
    if rules is None:
        raise ValueError("sharding rules are required (pass sharding.DEFAULT_RULES explicitly)")
    table = dict(rules.items() if isinstance(rules, dict) else rules)
    bad = [k for k in table if k not in LOGICAL_AXES]
    bad += [n for v in table.values() for n in (() if v is None else (v,) if isinstance(v, str) else v)
            if n not in MESH_AXES]
    if bad:
        raise ValueError(f"sharding rules name unknown axes {bad}; logical: {LOGICAL_AXES}, mesh: {MESH_AXES}")
    return table


@contextlib.contextmanager
def push_rules(mesh, rules):
    """Enter `ShardingContext(mesh, rules)` without jax's mesh context (the pipeline and the
    step use it inside shard_map bodies, with the trace's abstract mesh)."""
    token = _CURRENT.set(ShardingContext(mesh, checked_rules(rules)))
    try:
        yield mesh
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules):
    """Enter `ShardingContext(mesh, rules)` and jax's mesh context. `rules` is required: the
    gin-bound `logical_rules()[0]`, or `DEFAULT_RULES` named at the call site."""
    with push_rules(mesh, rules), jax.set_mesh(mesh):
        yield mesh


def active() -> ShardingContext | None:
    """The innermost entered context (unpacks as `mesh, rules`), or None."""
    return _CURRENT.get()


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
    """Pin an activation's layout by logical axis names; a no-op when no context is active."""
    ctx = active()
    if ctx is None:
        return x
    mesh, rules = ctx
    spec = fit_spec(logical_to_spec(axes, rules), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def constrain_with_grad(x, axes: Sequence[str | None], grad_axes: Sequence[str | None]):
    """`constrain(x, axes)`, and its cotangent pinned to `grad_axes` instead of `axes`.

    For a layout change whose transpose must not mirror it: the input of a tensor-parallel
    region is gathered along the sequence (`axes` whole), and its gradient, a partial sum over
    the region's heads / mlp, leaves as a reduce-scatter into the split layout (`grad_axes`)
    rather than an all-reduce into the gathered one. A no-op without an active context. Both
    layouts are resolved here, at the call: the backward pass may be traced outside the
    context (a shard_map's transpose), as `with_sharding_constraint`'s own transpose is."""
    ctx = active()
    if ctx is None:
        return x
    mesh, rules = ctx
    return _pin(x, *(NamedSharding(mesh, fit_spec(logical_to_spec(a, rules), x.shape, mesh)) for a in (axes, grad_axes)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _pin(x, fwd: NamedSharding, bwd: NamedSharding):
    return jax.lax.with_sharding_constraint(x, fwd)


def _pin_fwd(x, fwd, bwd):
    return _pin(x, fwd, bwd), None


def _pin_bwd(fwd, bwd, _, g):
    return (jax.lax.with_sharding_constraint(g, bwd),)


_pin.defvjp(_pin_fwd, _pin_bwd)


def sharding_for(axes, shape, mesh: Mesh, rules: dict) -> NamedSharding:
    return NamedSharding(mesh, fit_spec(logical_to_spec(axes, rules), shape, mesh))


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


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_shardings(abstract_params: dict, axes_by_name: dict, mesh: Mesh, rules, zero1: bool = False) -> dict:
    """Each parameter's sharding from its logical axes (plus ZeRO-1 over `data` when asked:
    the fp32 master weights live split like the optimizer state, Megatron's distributed
    optimizer; the step gathers a working copy in the compute dtype). A parameter without
    logical axes of its rank is an error, never a silent replicate. Logs (logger
    "meditron_jax", once per parameter and call) each mesh axis left out because it does not
    divide a dimension, and each ZeRO-1 split that no dimension allows."""
    rules = checked_rules(rules)
    out = {}
    for name, x in abstract_params.items():
        axes = axes_by_name.get(name)
        if axes is None or len(axes) != len(x.shape):
            raise ValueError(f"parameter {name} {tuple(x.shape)} has no logical axes of its rank ({axes})")
        dropped: list = []
        s = NamedSharding(mesh, fit_spec(logical_to_spec(axes, rules), x.shape, mesh, dropped))
        for i, n in dropped:
            log.info("sharding: %s %s: dim %d (%s) is not split over mesh axis %s=%d (does not divide)",
                     name, tuple(x.shape), i, axes[i], n, mesh.shape[n])
        if zero1:
            z = zero1_sharding(s, x.shape)
            if z is s and mesh.shape["data"] > 1 and "data" not in str(s.spec):
                log.info("sharding: %s %s: no ZeRO-1 split over data=%d (no dimension divides); its "
                         "optimizer state is replicated over data", name, tuple(x.shape), mesh.shape["data"])
            s = z
        out[name] = s
    return out


def tree_shardings(abstract_state: dict, axes_by_name: dict, mesh: Mesh, rules, zero1: bool = False, *, tx):
    """Shardings for a train state `{"params": P, "opt_state": tx.init(P), ...scalars}`.

    The optimizer state's layout comes from its structure, not from key names:
    `optax.tree_utils.tree_map_params` finds every copy of the parameter tree inside `tx`'s
    state (Adam's mu and nu, ...) and gives each leaf its parameter's sharding when the shapes
    agree; anything else (counts, hyper-parameters, factored statistics) is replicated, as are
    the state's other entries (step counters)."""
    rep = replicated(mesh)
    params = param_shardings(abstract_state["params"], axes_by_name, mesh, rules, zero1)

    def like_param(x, p, s):
        return s if tuple(getattr(x, "shape", ())) == tuple(p.shape) else rep

    out = {k: jax.tree.map(lambda _: rep, v) for k, v in abstract_state.items()}
    out["params"] = params
    out["opt_state"] = optax.tree_utils.tree_map_params(
        _traced_init(tx), like_param, abstract_state["opt_state"], abstract_state["params"], params,
        transform_non_params=lambda v: jax.tree.map(lambda _: rep, v))
    return out


def _traced_init(tx):
    """`tx.init` for `tree_map_params`' parameter placeholder, traced instead of run: `plan`
    lays out a step for devices this host cannot execute on (a GPU/TPU target under
    `use_mesh`), where an eager `jnp.zeros` in the init fails. Only the state's structure is
    used, so its array leaves come back as 0."""
    def init(placeholder):
        box = {}

        def structure():
            box["state"] = jax.tree.map(lambda v: 0 if isinstance(v, jax.Array) else v, tx.init(placeholder))
            return 0
        jax.eval_shape(structure)
        return box["state"]
    return init
