"""Sequence parallelism (`sharding.sequence_parallel`, issue 30): exact, and really in effect.

With the option the residual stream, the RMSNorms and the loss input are split over `tensor`
along the sequence (logical `residual_length`), and the tensor-parallel sums become
reduce-scatters into that layout plus all-gathers out of it. The tiny model's training losses
must equal the option off on the same mesh within 1e-5 (fp32), on a (data 2, tensor 4) mesh
(the fused layer stack and the chunked loss) and inside the pipeline (data 2, stage 2,
tensor 2); and the layout must really change (the loss input is split, and compiled for a GPU
the layer loop has no activation all-reduce over `tensor` left).
"""

import math

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meditron_jax.distributed import meshes, sharding
from meditron_jax.distributed.meshes import MeshError
from meditron_jax.models.config import LlamaConfig
from meditron_jax.models.llama import forward_hidden
from meditron_jax.training.optimizer import OptimizerConfig, make_optimizer, schedule
from meditron_jax.training.pipeline import PipelineSettings
from meditron_jax.training.state import layers_fn_for, nnx_params
from meditron_jax.training.step import make_train_step
from tests.test_plan_target import needs_gpu_plugin
from tests.test_train_step import run_sharded

# fp32, GQA (8 query heads over 4 kv heads: one kv head per rank at tensor 4)
CFG = LlamaConfig(vocab_size=517, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                  num_kv_heads=4, max_position_embeddings=64)
OC = OptimizerConfig(lr=3e-3, min_lr=3e-4, warmup_steps=1, weight_decay=0.1, clip=0.5)
STEPS, G, T, NUM_MICRO = 3, 8, 16, 2
BASE = dict(data=1, stage=1, fsdp=1, tensor=1)
RULES = dict(sharding.DEFAULT_RULES)
SP_RULES = sharding.sequence_split(RULES)


def _batches():
    """Packed rows: two documents each (segment ids 1 and 2, positions restarting), some padding."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(STEPS):
        toks = rng.integers(0, CFG.vocab_size, (G, T + 1)).astype(np.int32)
        cut = rng.integers(3, T - 3, G)
        pos = np.tile(np.arange(T, dtype=np.int32), (G, 1))
        seg = np.ones((G, T), np.int32)
        for r, c in enumerate(cut):
            pos[r, c:] -= c
            seg[r, c:] = 2
        seg[0, -2:] = 0  # padding
        mask = ((rng.random((G, T)) > 0.1) & (seg > 0)).astype(np.float32)
        out.append({"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": mask, "segment_ids": seg,
                    "positions": pos})
    return out


BATCHES = _batches()


@pytest.fixture(scope="module")
def params():
    return jax.device_get(nnx_params(CFG, 0))


@pytest.fixture(scope="module")
def one_device(params):
    """The reference: one device, plain autodiff, the unchunked loss."""
    return _losses(params, {}, RULES)


def _losses(params, mesh_sizes, rules, cfg=CFG, loss_chunk=None, ps=PipelineSettings()):
    tx = make_optimizer(OC, 10)
    sizes = dict(BASE, **mesh_sizes)
    mesh = meshes.make_mesh(sizes, jax.devices()[:math.prod(sizes.values())])
    with sharding.use_mesh(mesh, rules):
        losses, _, _ = run_sharded(
            lambda: make_train_step(cfg, tx, schedule(OC, 10), NUM_MICRO, layers_fn_for(cfg, mesh, ps), loss_chunk,
                                    zero1=True, sync=sharding.GradSync()),
            cfg, tx, params, BATCHES, mesh, zero1=True)
    return np.array(losses)


def _same(on, off, ref, what):
    rel, rel_ref = np.abs(on - off) / np.abs(off), np.abs(on - ref) / np.abs(ref)
    print(f"[sequence parallel, {what}] losses {np.round(on, 5).tolist()}; max rel diff vs off {rel.max():.1e}, "
          f"vs one device {rel_ref.max():.1e}")
    assert rel.max() < 1e-5, (on, off)
    assert rel_ref.max() < 1e-5, (on, ref)


def test_exact_on_data2_tensor4_fused_stack_and_chunked_loss(params, one_device):
    # remat='full' takes the fused accumulation stack (fused_accum.py); loss_chunk the fused loss
    cfg = CFG.replace(remat="full")
    mesh = dict(data=2, tensor=4)
    _same(_losses(params, mesh, SP_RULES, cfg, loss_chunk=8), _losses(params, mesh, RULES, cfg, loss_chunk=8),
          one_device, "data 2 x tensor 4, fused stack, loss chunks of 8")


def test_exact_inside_the_pipeline(params, one_device):
    mesh = dict(data=2, stage=2, tensor=2)
    ps = PipelineSettings(microbatches=2)
    _same(_losses(params, mesh, SP_RULES, ps=ps), _losses(params, mesh, RULES, ps=ps), one_device,
          "data 2 x stage 2 x tensor 2, pipeline")


def test_loss_input_is_split_over_tensor(params):
    """The final norm's output (what the loss reads) leaves the forward pass split along the
    sequence over `tensor` with the option, whole without it."""
    mesh = meshes.make_mesh(dict(BASE, data=2, tensor=4))
    b = BATCHES[0]
    for rules, want in ((SP_RULES, "tensor"), (RULES, None)):
        with sharding.use_mesh(mesh, rules):
            h = jax.jit(lambda p, t: forward_hidden(CFG, p, t))(jax.tree.map(jnp.asarray, params), b["inputs"])
        assert (tuple(h.sharding.spec) + (None,) * 3)[1] == want, h.sharding.spec
        assert h.sharding.shard_shape(h.shape)[1] == (T // 4 if want else T)


def test_gin_value_and_refusals():
    gin.clear_config()
    try:
        gin.parse_config(["sharding.sequence_parallel = True"])
        rules, _ = sharding.logical_rules()
        assert rules["residual_length"] == "tensor" and sharding.sequence_parallel(rules)
        gin.parse_config(["sharding.sequence_parallel = 1"])
        with pytest.raises(MeshError, match="sharding.sequence_parallel 1 is not one of True, False"):
            sharding.logical_rules()
    finally:
        gin.clear_config()
    assert not sharding.sequence_parallel(sharding.logical_rules()[0])
    sizes = dict(BASE, data=2, tensor=4)
    sharding.check_sequence_parallel(SP_RULES, sizes, 16, 8)
    sharding.check_sequence_parallel(RULES, sizes, 10, 5)  # off: nothing to divide
    with pytest.raises(MeshError, match="train.seq_len 18 is not divisible by 4"):
        sharding.check_sequence_parallel(SP_RULES, sizes, 18)
    with pytest.raises(MeshError, match="train.loss_chunk 6 is not divisible by 4"):
        sharding.check_sequence_parallel(SP_RULES, sizes, 24, 6)


@needs_gpu_plugin
def test_gpu_target_tensor_sums_become_reduce_scatter_and_all_gather():
    """Compiled for H100s (data 2 x tensor 4, bf16, full remat): no activation-sized all-reduce
    over `tensor` is left, and the reduce-scatters land in the split layout [b, T/4, D]."""
    import os
    from meditron_jax.plan import hlo_stats
    from meditron_jax.plan.compile import compile_step
    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.gin")
    built = compile_step([tiny], ["train.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2",
                                  "mesh.data=2", "mesh.tensor=4", "model.num_layers=2", "model.num_kv_heads=4",
                                  "model.dtype='bfloat16'", "model.remat='full'", "sharding.sequence_parallel=True"],
                         target="h100-80gb")
    recs = hlo_stats.collectives(built.compiled.as_text())
    hlo_stats.assign_axes(recs, built.mesh_sizes)
    tensor = [r for r in recs if r.axes == ("tensor",)]
    piece = 2 * (32 // 4) * built.cfg.hidden_size * 2  # one [b=2, T/4, D] bf16 activation
    sums = [(r.shape, r.source) for r in tensor if r.kind == "all-reduce" and r.bytes >= piece]
    assert not sums, sums
    scatters = [r for r in tensor if r.kind == "reduce-scatter"]
    gathers = [r for r in tensor if r.kind == "all-gather"]
    # per layer: the two sums of the forward pass, the attention one again in the recomputation
    # (full remat) and the two input gradients; the gathers mirror them (two in, two out of the
    # regions, the attention and mlp inputs again in the recomputation)
    L = built.cfg.num_layers
    assert sum(r.trip_count_product for r in scatters) >= 5 * L
    assert sum(r.trip_count_product for r in gathers) >= 6 * L
    assert all(tuple(r.result_shape[0]) == (2, 32 // 4, built.cfg.hidden_size) for r in scatters), \
        [r.result_shape for r in scatters]
