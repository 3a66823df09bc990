"""Pipeline parallelism over the `stage` mesh axis: a GPipe schedule with circular repeats.

Owns: the schedule that runs the decoder stack split into `stage` groups over micro-batches
(`pipeline_layers`), its validation (`check_pipeline`), the gin settings (`pipeline.*`), the
layer permutation used by circular repeats (`to_pipeline_layout` / `from_pipeline_layout`) and
the bubble accounting (`bubble_fraction`). Does not own: the decoder layer itself
(`model.run_layers`), the embedding, final norm and head (they run outside the pipeline,
replicated over `stage` and sharded over the other axes like any other op), the mesh or the
logical rules (`sharding.py`), gradient accumulation or the loss (`train_step.py`).

Formulation: `jax.shard_map` manual over `stage` only (`axis_names={'stage'}`); the other
mesh axes (data, fsdp, tensor) stay automatic inside, so the model's `constrain()` calls and
XLA's propagation keep working for them. Activations move between stages with
`jax.lax.ppermute` on a ring (stage s -> s+1, last -> first), which lowers to one
collective-permute per pipeline tick.

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

import contextlib
import dataclasses

import gin
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from meditron_jax.config import LlamaConfig
from meditron_jax.model import PARAM_AXES, run_layers
from meditron_jax import sharding
from meditron_jax.sharding import MeshError, constrain


@dataclasses.dataclass(frozen=True)
class PipelineSettings:
    microbatches: int | None = None  # None: 2 x stages
    repeats: int = 1  # > 1: circular (interleaved) schedule
    stage_remat: bool = False  # keep only each tick's chunk input for the backward pass


@gin.configurable("pipeline")
def pipeline_settings(microbatches: int | None = None, repeats: int = 1,
                      stage_remat: bool = False) -> PipelineSettings:
    """gin: `pipeline.microbatches` (None = 2 x stages), `pipeline.repeats` (1 = plain GPipe),
    `pipeline.stage_remat` (recompute each chunk in the backward pass, see `pipeline_layers`)."""
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


@contextlib.contextmanager
def _manual_stage_rules():
    """Inside the shard_map body, point `constrain()` at the body's mesh (stage Manual).

    A NamedSharding on the outer (all-Auto) mesh is rejected for values that vary over the
    manual `stage` axis, so the model's activation constraints are re-targeted at the
    abstract mesh of the trace; their specs never name `stage`, so they keep pinning the
    data / fsdp / tensor layout exactly as outside the pipeline.
    """
    outer = sharding.active()
    if outer is None:  # no active mesh: `constrain` stays a no-op inside as well
        yield
        return
    rules = {}
    for k, v in outer[1].items():
        names = () if v is None else (v,) if isinstance(v, str) else tuple(v)
        names = tuple(n for n in names if n != "stage")  # manual here: not constrainable
        rules[k] = names or None
    with sharding.push_rules(jax.sharding.get_abstract_mesh(), rules):
        yield


def _constrain_layers(layers: dict) -> dict:
    return {k: constrain(a, PARAM_AXES[k]) if k in PARAM_AXES else a for k, a in layers.items()}


def _boundary_dtype(dtype):
    """dtype of the two reductions over `stage` (output broadcast, d/dx).

    Both only add zeros, so any dtype gives the same numbers. XLA:CPU aborts compiling a
    bfloat16 all-reduce emitted from a partially manual shard_map (its AllReducePromotion
    pass meets a `copy` in the reducer that JAX's lowering leaves there), so on CPU they
    run in float32; accelerators keep the compute dtype (half the bytes on the wire).
    """
    return jnp.float32 if jax.default_backend() == "cpu" else dtype


def _stage_program(cfg: LlamaConfig, S: int, M: int, R: int, stage_remat: bool, dtype):
    """The per-stage body for shard_map (manual over `stage`); activations in `dtype`."""
    ticks = M * R + S - 1
    ring = [(j, (j + 1) % S) for j in range(S)]

    def run_chunk(chunk, inp, pos, seg):
        return run_layers(cfg, chunk, inp, pos, seg)

    if stage_remat:
        run_chunk = jax.checkpoint(run_chunk, policy=jax.checkpoint_policies.nothing_saveable)

    def program(layers, x_mb, pos_mb, seg_mb):
        with _manual_stage_rules():
            return _program(layers, x_mb, pos_mb, seg_mb)

    def _program(layers, x_mb, pos_mb, seg_mb):
        # layers: this stage's [R*C, ...] block (pipeline layout); x_mb [M,b,T,D]; pos/seg [M,b,T]
        s = jax.lax.axis_index("stage")
        chunks = jax.tree.map(lambda a: a.reshape((R, a.shape[0] // R) + a.shape[1:]), layers)
        first = s == 0

        def tick(carry, t):
            state, loop = carry  # state [b,T,D]: what the previous stage sent; loop [M,b,T,D]
            i = t - s
            m = jnp.mod(i, M)
            r = jnp.clip(i // M, 0, R - 1)
            inp = jnp.where(first, loop[m], state)
            chunk = jax.tree.map(lambda a: a[r], chunks)
            y = run_chunk(chunk, inp, pos_mb[m], seg_mb[m])
            y = constrain(y, ("batch", "length", "embed"))
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
    """
    S = mesh.shape["stage"]
    B = x.shape[0]
    dp = sharding.local_data_parallel_size(mesh)  # inside the step's shard_map over data: local rows
    M = check_pipeline(cfg, S, B, dp, microbatches, repeats)
    if S == 1:
        return run_layers(cfg, layers, x, positions, segment_ids)
    # Pin the stacked params (and so their gradients) to the rule layout: leading axis over
    # `stage`, the rest as the rules say. With canonical input and repeats > 1 the layout
    # change happens between the two pins, inside the step.
    layers = _constrain_layers(layers)
    if not pipeline_layout:
        layers = _constrain_layers(to_pipeline_layout(layers, S, repeats))

    dtype = x.dtype
    x_mb = _split_microbatches(x, M).astype(_boundary_dtype(dtype))
    x_mb = constrain(x_mb, (None, "batch", "length", "embed"))
    pos_mb = constrain(_split_microbatches(positions, M), (None, "batch", "length"))
    seg_mb = constrain(_split_microbatches(segment_ids, M), (None, "batch", "length"))
    layer_specs = jax.tree.map(lambda _: P("stage"), layers)
    # nested in the train step's shard_map over data: the context's (partly manual) mesh
    inner_mesh = jax.sharding.get_abstract_mesh() if sharding.manual_axes_here() else mesh
    run = jax.shard_map(_stage_program(cfg, S, M, repeats, stage_remat, dtype), mesh=inner_mesh,
                        in_specs=(layer_specs, P(), P(), P()), out_specs=P(),
                        axis_names={"stage"})
    out = run(layers, x_mb, pos_mb, seg_mb)
    return constrain(_merge_microbatches(out), ("batch", "length", "embed"))
