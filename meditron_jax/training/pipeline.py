"""Pipeline parallelism over the `stage` mesh axis: a GPipe schedule with circular repeats.

Owns: the schedule that runs the decoder stack split into `stage` groups over micro-batches
(`pipeline_layers`), its validation (`check_pipeline`), the gin settings (`pipeline.*`), the
layer permutation used by circular repeats (`to_pipeline_layout` / `from_pipeline_layout`) and
the bubble accounting (`bubble_fraction`). Does not own: the decoder layer itself
(`model.run_layers`), the embedding, final norm and head (they run outside the pipeline,
replicated over `stage` and sharded over the other axes like any other op), the mesh or the
logical rules (`sharding.py`), gradient accumulation or the loss (`training/step.py`).

Formulation: `jax.shard_map` manual over `stage` and the data-parallel axes
(`axis_names={'stage', 'data', 'fsdp'}`, see `MANUAL`); `tensor` stays automatic inside, so
the model's `constrain()` calls and XLA's propagation keep working for tensor parallelism.
Each device runs the schedule on its own rows of every micro-batch; the stage's weights enter
gathered over fsdp and their gradients are summed over (data, fsdp) once, after the loop. Activations move between stages with
`jax.lax.ppermute` on a ring (stage s -> s+1, last -> first), which lowers to one
collective-permute per pipeline tick.

Memory: the tick is the rematerialisation boundary. Each tick is one `jax.checkpoint`ed
function of the whole stage weight block and all micro-batches' positions / segment ids
(loop-invariant in the tick scan, so kept once) and of the tick's input; it picks its chunk
and micro-batch inside. No tick saves weights; with `stage_remat` a tick saves only its input.

Schedule (S stages, M micro-batches, R repeats; virtual stage v = r*S + s runs chunk r of
physical stage s, L/(S*R) layers). Stage s at tick t works on flat index i = t - s,
micro-batch m = i mod M, repeat r = i div M, and idles when i is outside [0, M*R). A tick
is one chunk; there are M*R + S - 1 ticks. The output of the last stage travels the ring
back to stage 0, which files it into a loop buffer slot m that it reads again M ticks later
(hence M >= S when R > 1). After the last tick stage 0's buffer holds the final activations.

    bubble_fraction = (S - 1) / (M*R + S - 1)   (idle share of each stage's ticks)

Shapes: B batch, T length, D embed, M micro-batches, b = B/M rows per micro-batch,
L layers, S stages, R repeats, C = L/(S*R) layers per chunk.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

import gin
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, PartitionSpec as P

from meditron_jax.config.checks import Range
from meditron_jax.models.config import LlamaConfig
from meditron_jax.models.llama import LAYER_KEYS, PARAM_AXES, RESIDUAL, run_layers
from meditron_jax.distributed import sharding
from meditron_jax.distributed import host_batch
from meditron_jax.distributed.sharding import constrain
from meditron_jax.distributed.meshes import MeshError


@dataclasses.dataclass(frozen=True)
class PipelineSettings:
    microbatches: int | None = None  # None: 2 x stages
    repeats: int = 1  # > 1: circular (interleaved) schedule
    stage_remat: bool = False  # keep only each tick's chunk input for the backward pass


@gin.configurable("pipeline")
def _pipeline_gin(microbatches: Annotated[int | None, Range(min=1)] = None, repeats: Annotated[int, Range(min=1)] = 1,
                  stage_remat: bool = False):
    return microbatches, repeats, stage_remat


def pipeline_settings() -> PipelineSettings:
    """gin: `pipeline.microbatches` (None = 2 x stages), `pipeline.repeats` (1 = plain GPipe),
    `pipeline.stage_remat` (recompute each chunk in the backward pass, see `pipeline_layers`).

    Validated here, outside the configurable, so that a bad value is one line (MeshError)."""
    microbatches, repeats, stage_remat = _pipeline_gin()
    if not isinstance(stage_remat, bool):
        raise MeshError(f"pipeline.stage_remat {stage_remat!r} is not one of True, False")
    for name, v in (("microbatches", microbatches), ("repeats", repeats)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise MeshError(f"pipeline.{name} {v!r} is not an integer")
    return PipelineSettings(microbatches=microbatches, repeats=repeats, stage_remat=stage_remat)


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """Share of each stage's pipeline ticks spent idle: (S-1) / (M*R + S-1).

    A tick runs one chunk of L/(S*R) layers on one micro-batch; every stage runs M*R useful
    ticks out of M*R + S - 1. Plain GPipe is R = 1; circular repeats shrink the bubble R-fold
    in ticks (Megatron's interleaved schedule has the same (S-1)/(R*M) bubble-to-work ratio).
    """
    if stages < 1 or microbatches < 1 or repeats < 1:
        raise MeshError(f"bubble_fraction needs positive sizes, got stages={stages} "
                        f"microbatches={microbatches} repeats={repeats}")
    return (stages - 1) / (microbatches * repeats + stages - 1)


def check_pipeline(cfg: LlamaConfig, stages: int, batch_size: int | None = None,
                   data_parallel: int = 1, microbatches: int | None = None,
                   repeats: int = 1) -> int:
    """Validate a pipeline configuration; returns the resolved number of micro-batches.

    Raises MeshError (one line naming the values) when stages x repeats does not divide the
    layer count, when repeats > 1 with fewer micro-batches than stages, or when the batch
    does not split into micro-batches that each divide over the data-parallel devices.
    Cheap and compile-free: the trainer can call it before building anything.
    """
    L = cfg.num_layers
    if stages < 1:
        raise MeshError(f"mesh.stage must be >= 1, got {stages}")
    if repeats < 1:
        raise MeshError(f"pipeline.repeats must be >= 1, got {repeats}")
    if L % (stages * repeats):
        raise MeshError(f"mesh.stage {stages} x pipeline.repeats {repeats} = {stages * repeats} "
                        f"does not divide num_layers {L}")
    M = 2 * stages if microbatches is None else microbatches
    if M < 1:
        raise MeshError(f"pipeline.microbatches must be >= 1, got {M}")
    if repeats > 1 and M < stages:
        raise MeshError(f"pipeline.repeats {repeats} needs pipeline.microbatches >= mesh.stage, "
                        f"got pipeline.microbatches {M} < mesh.stage {stages}")
    if batch_size is not None:
        if batch_size % M:
            raise MeshError(f"batch of {batch_size} sequences is not divisible by "
                            f"pipeline.microbatches {M}")
        if (batch_size // M) % data_parallel:
            raise MeshError(f"micro-batch of {batch_size // M} sequences (batch {batch_size} / "
                            f"pipeline.microbatches {M}) is not divisible by the data-parallel "
                            f"size {data_parallel} (mesh data x fsdp)")
    return M


# ---- layer layout for circular repeats -------------------------------------------------
# Canonical layout (checkpoints, `run_layers`): layer l at index l. Stage s owns the
# contiguous block [s*L/S, (s+1)*L/S) of the leading axis (the `layers` -> `stage` rule).
# Circular repeats need stage s to own chunks {r*S + s : r < R} instead. The pipeline layout
# puts them in that contiguous block, in order of r: index s*R*C + r*C + j holds canonical
# layer (r*S + s)*C + j. With R = 1 both layouts are the same.

def _swap_layer_blocks(layers: dict, outer: int, inner: int) -> dict:
    """Leading axis [outer, inner, C] -> [inner, outer, C] (C = L / (outer * inner))."""
    def perm(a):
        C = a.shape[0] // (outer * inner)
        a = a.reshape((outer, inner, C) + a.shape[1:])
        return jnp.swapaxes(a, 0, 1).reshape(outer * inner * C, *a.shape[3:])
    return jax.tree.map(perm, layers)


def to_pipeline_layout(layers: dict, stages: int, repeats: int) -> dict:
    """Canonical [L,...] stacked params -> pipeline layout (identity when repeats == 1)."""
    return layers if repeats == 1 else _swap_layer_blocks(layers, repeats, stages)


def from_pipeline_layout(layers: dict, stages: int, repeats: int) -> dict:
    """Inverse of `to_pipeline_layout` (for checkpoints, which stay canonical)."""
    return layers if repeats == 1 else _swap_layer_blocks(layers, stages, repeats)


def _map_layer_leaves(fn, tree, num_layers: int):
    """Apply `fn` to every leaf of `tree` that sits under a decoder-layer key (LAYER_KEYS) and
    has the leading [L, ...] axis: the stacked params, their Adam moments, their gradients."""
    def leaf(path, a):
        under_layer = any(getattr(k, "key", None) in LAYER_KEYS for k in path)
        if under_layer and getattr(a, "ndim", 0) >= 1 and a.shape[0] == num_layers:
            return fn(a)
        return a
    return jax.tree_util.tree_map_with_path(leaf, tree)


class TrainerLayout:
    """Train state held in the pipeline layout in memory; checkpoints stay canonical.

    With circular repeats (R > 1) each stage owns non-contiguous canonical layers. Keeping
    params and optimizer state permuted in memory (`to_memory`, once after init or restore)
    lets every step run `pipeline_layers(..., pipeline_layout=True)` with no weight or
    gradient movement across stages; `to_checkpoint` gives canonical copies to save, so a
    checkpoint written with stage 4 x repeats 2 restores with stage 1 and the reverse.
    Identity (no copies, no compiles) when stages or repeats is 1. The conversion keeps each
    leaf's sharding (leading axis over `stage`); saving holds one canonical copy of params and
    optimizer state per device until the save has read it.
    """

    def __init__(self, cfg: LlamaConfig, stages: int, repeats: int, state_shardings=None):
        self.stages, self.repeats, self.num_layers = stages, repeats, cfg.num_layers
        self.active = stages > 1 and repeats > 1
        self._to = self._from = None
        if self.active:
            S, R, L = stages, repeats, cfg.num_layers
            to = lambda t: _map_layer_leaves(lambda a: to_pipeline_layout({"a": a}, S, R)["a"], t, L)
            back = lambda t: _map_layer_leaves(lambda a: from_pipeline_layout({"a": a}, S, R)["a"], t, L)
            sh = state_shardings
            self._to = jax.jit(to, in_shardings=(sh,), out_shardings=sh, donate_argnums=0)
            part = None if sh is None else {k: sh[k] for k in ("params", "opt_state")}
            self._from = jax.jit(back, in_shardings=(part,), out_shardings=part)

    def to_memory(self, state: dict) -> dict:
        """Canonical train state (fresh or restored) -> pipeline layout (donates `state`)."""
        return self._to(state) if self.active else state

    def to_checkpoint(self, params, opt_state):
        """In-memory (pipeline layout) params and optimizer state -> canonical copies."""
        if not self.active:
            return params, opt_state
        out = self._from({"params": params, "opt_state": opt_state})
        return out["params"], out["opt_state"]


# ---- the schedule -------------------------------------------------------------------------

def _split_microbatches(a, M):
    """[B, ...] -> [M, B/M, ...] with micro-batch m = rows m, m+M, m+2M, ...

    Strided, so that with the batch sharded over (data, fsdp) in contiguous blocks every
    micro-batch keeps the same data-parallel split and the reshape moves no data.
    """
    B = a.shape[0]
    return jnp.swapaxes(a.reshape((B // M, M) + a.shape[1:]), 0, 1)


def _merge_microbatches(a):
    """Inverse of `_split_microbatches`: [M, b, ...] -> [M*b, ...]."""
    M, b = a.shape[:2]
    return jnp.swapaxes(a, 0, 1).reshape((M * b,) + a.shape[2:])


# Mesh axes the pipeline body is manual over. `stage` carries the schedule; the data-parallel
# axes are manual too so that each device accumulates its own weight gradients over all ticks
# and they are summed over (data, fsdp) once per call, after the tick loop. Left automatic,
# the partitioner all-reduced every layer's weight gradient over data inside the loop, per
# tick (measured on the 70B recipe: 1392 all-reduces of weight gradients per step, 278 GiB
# on the wire against 4.2 GiB for one sum).
MANUAL = ("stage", "data", "fsdp")
_DP = ("data", "fsdp")


def _constrain_layers(layers: dict) -> dict:
    return {k: constrain(a, PARAM_AXES[k]) if k in PARAM_AXES else a for k, a in layers.items()}


def _gather_over_fsdp(layers: dict, mesh: Mesh) -> dict:
    """The stage's weights all-gathered over `fsdp` once, before the tick loop.

    Left to the partitioner, weights sharded over fsdp are gathered where they are used: per
    layer, per tick, in the forward, the recomputation and the backward pass. Pinning the
    stacked block to the rule layout minus fsdp makes that one all-gather per call (and the
    transpose one reduce-scatter of the gradients). Costs a stage's weights unsharded over
    fsdp per device for the duration of the call (fp32, as the params are held).
    """
    act = sharding.active()
    if act is None or mesh.shape["fsdp"] == 1:
        return layers
    with sharding.push_rules(act[0], sharding.without_axes(act[1], ("fsdp",))):
        return _constrain_layers(layers)


def _boundary_dtype(dtype, mesh=None):
    """dtype of the two reductions over `stage` (output broadcast, d/dx).

    Both only add zeros, so any dtype gives the same numbers. XLA:CPU aborts compiling a
    bfloat16 all-reduce emitted from a partially manual shard_map (its AllReducePromotion
    pass meets a `copy` in the reducer that JAX's lowering leaves there), so on CPU they
    run in float32; accelerators keep the compute dtype (half the bytes on the wire).
    The platform is the mesh's (`mesh`, else the mesh being traced under), not the host's
    default backend: `plan --target a100-80gb` compiles GPU code on a CPU host.
    """
    return jnp.float32 if sharding.mesh_platform(mesh) == "cpu" else dtype


# Name of each tick's stage-weight slice (circular repeats): never saved for the backward pass.
_CHUNK_WEIGHTS = "pipeline_chunk_weights"


def tick_policy(stage_remat: bool):
    """What the backward pass keeps of one pipeline tick (the tick is the remat boundary).

    stage_remat: nothing but the tick's inputs (its chunk input [b,T,D], two int32 scalars and
    the loop-invariant stage weights, which scan keeps once, not per tick); the chunk runs
    again in the backward pass. Otherwise everything the chunk's layers keep under the model's
    own `remat` policy (per-layer `jax.checkpoint` inside `run_layers`), except the slice of
    the stage's weights that a circular schedule picks per tick.
    """
    cp = jax.checkpoint_policies
    return cp.nothing_saveable if stage_remat else cp.save_anything_except_these_names(_CHUNK_WEIGHTS)


def _run_tick(cfg: LlamaConfig, R: int, stage_remat: bool):
    """One tick's chunk as a rematerialised function of loop-invariant inputs.

    The stage's whole weight block and all micro-batches' positions / segment ids enter as
    they are (loop-invariant in the tick scan, so autodiff keeps one copy of each, not one per
    tick); the chunk (repeat r) and the micro-batch (m) are picked inside. Picking them outside
    made the sliced weights a per-tick value, i.e. a residual saved every tick.
    """
    def run(chunks, pos_mb, seg_mb, inp, m, r):
        if R == 1:
            chunk = jax.tree.map(lambda a: a[0], chunks)
        else:
            chunk = jax.tree.map(lambda a: checkpoint_name(
                jax.lax.dynamic_index_in_dim(a, r, keepdims=False), _CHUNK_WEIGHTS), chunks)
        pos = jax.lax.dynamic_index_in_dim(pos_mb, m, keepdims=False)
        seg = jax.lax.dynamic_index_in_dim(seg_mb, m, keepdims=False)
        return run_layers(cfg, chunk, inp, pos, seg)

    return jax.checkpoint(run, policy=tick_policy(stage_remat), prevent_cse=False)


def _stage_program(cfg: LlamaConfig, S: int, M: int, R: int, stage_remat: bool, dtype, dp=_DP):
    """The per-stage body for shard_map (manual over `stage`); activations in `dtype`."""
    ticks = M * R + S - 1
    ring = [(j, (j + 1) % S) for j in range(S)]
    run_tick = _run_tick(cfg, R, stage_remat)

    def program(layers, x_mb, pos_mb, seg_mb):
        with sharding.manual_rules(MANUAL):
            return _program(layers, x_mb, pos_mb, seg_mb)

    def _program(layers, x_mb, pos_mb, seg_mb):
        # layers: this stage's [R*C, ...] block (pipeline layout); x_mb [M,b,T,D]; pos/seg [M,b,T]
        s = jax.lax.axis_index("stage")
        # Weights enter invariant over (data, fsdp): mark them varying once, here, so the sum
        # of their gradients over the data-parallel devices is one psum after the loop (the
        # transpose of this cast), not one per use inside it.
        # (Data axes made manual by the step's own shard_map are already per-device.) The cast
        # runs on fp32, so the one gradient sum after the loop is fp32 whatever the compute
        # dtype of the weights (as `sharding.grad_reduce_dtype` defaults to; XLA:CPU also
        # aborts on a bf16 all-reduce from a partially manual shard_map, see _boundary_dtype).
        if dp:
            layers = jax.tree.map(lambda a: jax.lax.pcast(a.astype(jnp.float32), dp, to="varying").astype(a.dtype),
                                  layers)
        chunks = jax.tree.map(lambda a: a.reshape((R, a.shape[0] // R) + a.shape[1:]), layers)
        first = s == 0

        def tick(carry, t):
            state, loop = carry  # state [b,T,D]: what the previous stage sent; loop [M,b,T,D]
            i = t - s
            m = jnp.mod(i, M)
            r = jnp.clip(i // M, 0, R - 1)
            inp = jnp.where(first, loop[m], state)
            y = run_tick(chunks, pos_mb, seg_mb, inp, m, r)
            y = constrain(y, RESIDUAL)
            recv = jax.lax.ppermute(y, "stage", ring)
            # On stage 0, `recv` is the last stage's output of flat index t - (S-1): file it
            # in its micro-batch slot (read again M ticks later, or the final output).
            j = t - (S - 1)
            slot = jnp.mod(j, M)
            keep = (j >= 0) & first
            loop = loop.at[slot].set(jnp.where(keep, recv, loop[slot]))
            return (recv, loop), None

        # Both carries become stage-varying in the loop. Cast after marking x varying, so
        # that d/dx is summed over `stage` in the boundary dtype.
        x_mb = jax.lax.pcast(x_mb, ("stage",), to="varying").astype(dtype)
        carry = (jnp.zeros_like(x_mb[0]), x_mb)
        (_, loop), _ = jax.lax.scan(tick, carry, jnp.arange(ticks))
        # Only stage 0's buffer holds the result: broadcast it to every stage.
        out = jnp.where(first, loop, jnp.zeros_like(loop)).astype(_boundary_dtype(dtype))
        return jax.lax.psum(out, "stage").astype(dtype)

    return program


def pipeline_layers(cfg: LlamaConfig, layers: dict, x, positions, segment_ids, *, mesh: Mesh,
                    microbatches: int | None = None, repeats: int = 1,
                    pipeline_layout: bool = False, stage_remat: bool = False):
    """Same result as `model.run_layers(cfg, layers, x, positions, segment_ids)`, pipelined.

    layers: stacked per-layer params, leading axis L (sharded over `stage` by the `layers`
      rule). Canonical layer order unless `pipeline_layout=True` (then they are already
      `to_pipeline_layout(layers, S, repeats)`; with canonical input and repeats > 1 the
      permutation happens here, inside the step, at the cost of moving weights across stages).
    x: [B,T,D] activations after the embedding; positions, segment_ids: [B,T].
    mesh: the mesh whose `stage` axis carries the pipeline (stage 1 runs `run_layers`).
    The whole batch is split here into `microbatches` strided micro-batches (default
    2 x stages); B / microbatches must divide over data x fsdp.
    stage_remat: save only each tick's chunk input for the backward pass and recompute the
      chunk (with cfg.remat applying inside the recomputation). Activation memory per stage
      drops from M*R ticks x C layers of residuals to M*R chunk inputs plus one chunk's
      residuals, for one extra forward pass of the stage. Same numbers either way.
      Either way the tick is the remat boundary and no tick saves weights (`tick_policy`).
    With fsdp > 1 the stage's weights are all-gathered over fsdp once per call, before the
    tick loop, and their gradients reduced once after it (`_gather_over_fsdp`).
    """
    S = mesh.shape["stage"]
    B = x.shape[0]
    dp = host_batch.local_data_parallel_size(mesh)  # inside the step's shard_map over data: local rows
    M = check_pipeline(cfg, S, B, dp, microbatches, repeats)
    if S == 1:
        return run_layers(cfg, layers, x, positions, segment_ids)
    # Pin the stacked params (and so their gradients) to the rule layout: leading axis over
    # `stage`, the rest as the rules say. With canonical input and repeats > 1 the layout
    # change happens between the two pins, inside the step.
    layers = _constrain_layers(layers)
    if not pipeline_layout:
        layers = _constrain_layers(to_pipeline_layout(layers, S, repeats))
    layers = _gather_over_fsdp(layers, mesh)

    dtype = x.dtype
    x_mb = _split_microbatches(x, M).astype(_boundary_dtype(dtype, mesh))
    x_mb = constrain(x_mb, (None, *RESIDUAL))
    pos_mb = constrain(_split_microbatches(positions, M), (None, "batch", "length"))
    seg_mb = constrain(_split_microbatches(segment_ids, M), (None, "batch", "length"))
    layer_specs = jax.tree.map(lambda _: P("stage"), layers)
    # Inside the train step's shard_map over the data axes (sharding.GradSync) those axes are
    # manual already: nest on the trace's (partly manual) mesh and make manual only the rest.
    already = host_batch.manual_axes_here()
    manual = tuple(a for a in MANUAL if a not in already)
    dp_new = tuple(a for a in _DP if a in manual and mesh.shape[a] > 1)
    inner_mesh = jax.sharding.get_abstract_mesh() if already else mesh
    dspec = P(None, dp_new) if dp_new else P()
    run = jax.shard_map(_stage_program(cfg, S, M, repeats, stage_remat, dtype, dp_new), mesh=inner_mesh,
                        in_specs=(layer_specs, dspec, dspec, dspec), out_specs=dspec, axis_names=set(manual))
    out = run(layers, x_mb, pos_mb, seg_mb)
    return constrain(_merge_microbatches(out), RESIDUAL)
