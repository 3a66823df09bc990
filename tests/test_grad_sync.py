"""Data-parallel gradient reduction once per step (issue 24): values, precision, HLO, checkpoints.

The step accumulates per-device fp32 gradients over the micro-batches inside a shard_map manual
over the data axes and reduces them once after the loop; with ZeRO-1 the fp32 master params live
sharded with the optimizer state and a compute-dtype working copy is gathered once per step.
"""

import glob
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meditron_jax.storage import checkpoint as ckpt
from meditron_jax.plan import hlo_stats
from meditron_jax.distributed import sharding
from meditron_jax.distributed import host_batch
from meditron_jax.distributed import meshes
from meditron_jax.models.config import LlamaConfig
from meditron_jax.errors import UserError
from meditron_jax.models.llama import PARAM_AXES, param_shapes
from meditron_jax.training.optimizer import OptimizerConfig, make_optimizer, schedule
from meditron_jax.training.pipeline import PipelineSettings
from meditron_jax.training.config import TrainConfig, validate_shapes
from meditron_jax.training.state import (abstract_batch, jit_train_step, layers_fn_for, nnx_params,
                                         restore_train_state, state_shardings)
from meditron_jax.training.step import accumulate_gradients, init_state, make_train_step
from tests.test_train_step import make_batches, run_sharded

CFG = LlamaConfig(vocab_size=517, hidden_size=48, intermediate_size=112, num_layers=2, num_heads=6,
                  num_kv_heads=2, max_position_embeddings=64)
OC = OptimizerConfig(lr=3e-3, min_lr=3e-4, warmup_steps=1, weight_decay=0.1, clip=0.5)
STEPS, G, NUM_MICRO = 3, 16, 4
BASE = dict(data=1, stage=1, fsdp=1, tensor=1)


def _run(params, batches, mesh_sizes=None, zero1=False, sync=None, cfg=CFG, num_micro=NUM_MICRO):
    tx = make_optimizer(OC, 10)
    if mesh_sizes is None:
        step = jax.jit(make_train_step(cfg, tx, schedule(OC, 10), num_micro, zero1=False))
        state = init_state(jax.tree.map(jnp.asarray, params), tx)
        losses = []
        for b in batches:
            state, m = step(state, b)
            losses.append(float(m["loss"]))
        return losses, jax.device_get(state)
    mesh = meshes.make_mesh(dict(BASE, **mesh_sizes))
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        losses, state, _ = run_sharded(
            lambda: make_train_step(cfg, tx, schedule(OC, 10), num_micro, layers_fn_for(cfg, mesh, PipelineSettings()),
                                    zero1=zero1, sync=sync), cfg, tx, params, batches, mesh, zero1=zero1)
    return losses, jax.device_get(state)


@pytest.fixture(scope="module")
def one_device():
    params = jax.device_get(nnx_params(CFG, 0))
    batches = make_batches(n=STEPS, G=G)
    losses, state = _run(params, batches)
    return params, batches, losses, state


@pytest.mark.parametrize("mesh_sizes,zero1,fsdp_mode,num_micro", [
    (dict(data=4, tensor=2), False, None, NUM_MICRO),
    (dict(data=4, tensor=2), True, None, NUM_MICRO),
    (dict(data=2, fsdp=2, tensor=2), True, None, NUM_MICRO),  # fsdp reduce-scatter per micro-batch (default)
    (dict(data=2, fsdp=2, tensor=2), True, "step", NUM_MICRO),  # fsdp reduced once per step as well
    # nested in the pipeline's shard_map over stage (2 accumulation steps x 4 pipeline micro-batches)
    (dict(data=2, stage=2, tensor=2), True, None, 2),
], ids=["data4_tensor2", "data4_tensor2_zero1", "fsdp2_zero1", "fsdp2_step_zero1", "stage2_zero1"])
def test_same_as_one_device(one_device, mesh_sizes, zero1, fsdp_mode, num_micro):
    params, batches, ref_losses, ref = one_device
    losses, state = _run(params, batches, mesh_sizes, zero1, sharding.GradSync(fsdp=fsdp_mode), num_micro=num_micro)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state["params"]) + jax.tree.leaves(state["opt_state"]),
                    jax.tree.leaves(ref["params"]) + jax.tree.leaves(ref["opt_state"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mesh_sizes", [dict(data=4, tensor=2), dict(data=2, fsdp=2, tensor=2)],
                         ids=["data4_tensor2", "fsdp2"])
def test_fused_accumulation_same_as_one_device(one_device, mesh_sizes):
    """remat='full' takes the fused stack (the backward layer scan adds into the fp32
    accumulator, the kept layer inputs split over tensor): same values as the plain one-device
    step (remat 'none', plain autodiff) with ZeRO-1, also with fsdp reduce-scattered per layer."""
    from meditron_jax.training import fused_accum
    from meditron_jax.models.llama import run_layers
    params, batches, ref_losses, ref = one_device
    cfg = CFG.replace(remat="full")
    assert fused_accum.fusable(cfg, run_layers) and not fused_accum.fusable(CFG, run_layers)
    losses, state = _run(params, batches, mesh_sizes, True, sharding.GradSync(), cfg=cfg)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state["params"]) + jax.tree.leaves(state["opt_state"]),
                    jax.tree.leaves(ref["params"]) + jax.tree.leaves(ref["opt_state"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_fused_accumulation_memory():
    """The fused step keeps no second stacked layer-gradient tree next to the fp32 accumulator,
    and keeps each layer's input split over tensor: its temporaries are smaller than the plain
    autodiff step's (same math, `run_layers` hidden behind a wrapper) by at least 3/4 of
    (stacked bf16 layer gradients + the (tensor-1)/tensor share of the kept layer inputs).
    Measured on XLA:CPU: 2.09 MB saved against 1.70 MB; with the kept inputs left whole, 2 kB
    (this compiler's schedule already avoids most of the second gradient tree at this size;
    the GPU target's does not: 2.85 GiB for meditron_7b, docs/benchmarks.md)."""
    import functools
    from meditron_jax.models.llama import LAYER_KEYS, run_layers
    cfg = CFG.replace(dtype="bfloat16", remat="full", hidden_size=256, intermediate_size=512, num_heads=4,
                      num_kv_heads=2, num_layers=2, max_position_embeddings=128)
    micro, rows, T, tensor = 2, 8, 128, 2
    mesh = meshes.make_mesh(dict(BASE, data=4, tensor=tensor))
    tx = make_optimizer(OC, 10)
    tc = TrainConfig(steps=1, micro_batch_size=rows, global_batch_size=rows * 4 * micro, seq_len=T)
    temps = {}
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        sh = state_shardings(cfg, tx, mesh, sharding.DEFAULT_RULES, zero1=True)
        abstract = jax.eval_shape(lambda p: init_state(p, tx),
                                  {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in param_shapes(cfg).items()})
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sh)
        for name, layers_fn in (("fused", run_layers), ("plain", functools.partial(run_layers))):
            fn = make_train_step(cfg, tx, schedule(OC, 10), micro, layers_fn, zero1=True, sync=sharding.GradSync())
            compiled = jit_train_step(fn, sh, mesh).lower(
                state, abstract_batch(tc.global_batch_size, tc.seq_len, mesh)).compile()
            temps[name] = compiled.memory_analysis().temp_size_in_bytes
    shapes = param_shapes(cfg)
    grads = sum(int(np.prod(shapes[k])) for k in LAYER_KEYS if "norm" not in k) * 2 // tensor
    kept = cfg.num_layers * rows * T * cfg.hidden_size * 2 * (tensor - 1) // tensor
    saved = temps["plain"] - temps["fused"]
    assert saved >= 0.75 * (grads + kept), (temps, grads, kept)


def _replica_sum(dtype, zero1):
    """Each of 4 data replicas contributes 1 + 3 * 2**-10 to every gradient entry: exact in fp32,
    rounded to 1.0 in bf16 (8 mantissa bits), so a bf16 reduction is 0.29% low."""
    v = 1.0 + 3 * 2.0 ** -10
    mesh = meshes.make_mesh(dict(BASE, data=4), devices=jax.devices()[:4])
    D = 64
    work = {"norm": jnp.zeros((D,), jnp.float32)}
    micro = {"loss_mask": jnp.full((1, 4, 2), v, jnp.float32)}

    def grad_fn(p, mb):  # d/d norm of sum(norm) * (this replica's one row's mask value)
        c = mb["loss_mask"][0, 0]
        return (jnp.sum(p["norm"]) * c, jnp.float32(1.0)), {"norm": jnp.ones_like(p["norm"]) * c}

    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        f = jax.jit(lambda w, m: accumulate_gradients(grad_fn, w, m, 1, zero1=zero1,
                                                      sync=sharding.GradSync(dtype))[0]["norm"])
        g = np.asarray(f(work, micro))
    return np.abs(g - 4 * v).max() / (4 * v)


@pytest.mark.parametrize("zero1", [True, False], ids=["reduce_scatter", "all_reduce"])
def test_reduction_precision(zero1):
    assert _replica_sum("float32", zero1) < 1e-6  # the default
    assert _replica_sum("bfloat16", zero1) > 1e-3


def _compiled_step(zero1, tmp_path):
    cfg = CFG.replace(dtype="bfloat16", hidden_size=64, num_heads=4)
    mesh = meshes.make_mesh(dict(BASE, data=4, tensor=2))
    tx = make_optimizer(OC, 10)
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        sh = state_shardings(cfg, tx, mesh, sharding.DEFAULT_RULES, zero1=zero1)
        abstract = jax.eval_shape(lambda p: init_state(p, tx),
                                  {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in param_shapes(cfg).items()})
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sh)
        fn = make_train_step(cfg, tx, schedule(OC, 10), NUM_MICRO, zero1=zero1, sync=sharding.GradSync())
        tc = TrainConfig(steps=1, micro_batch_size=2, global_batch_size=2 * 4 * NUM_MICRO, seq_len=16)
        lowered = jit_train_step(fn, sh, mesh).lower(state, abstract_batch(tc.global_batch_size, tc.seq_len, mesh))
        dump = str(tmp_path / "dump")
        from meditron_jax.training.profiling import compiled_afresh

        with compiled_afresh():  # a cache hit dumps nothing
            compiled = lowered.compile(compiler_options={"xla_dump_to": dump,
                                                         "xla_dump_hlo_pass_re": "spmd-partitioning"})
    final = compiled.as_text()
    # XLA:CPU widens bf16 collectives to f32 after partitioning (float-normalization-bf16; GPUs
    # and TPUs keep bf16), so the dtype on the wire is read from the partitioned module
    partitioned = open(glob.glob(os.path.join(dump, "*train_step*after_spmd-partitioning*"))[0]).read()
    return cfg, mesh, final, partitioned


@pytest.mark.parametrize("zero1", [True, False], ids=["zero1", "replicated"])
def test_hlo_one_reduction_after_the_loop(zero1, tmp_path):
    cfg, mesh, final, partitioned = _compiled_step(zero1, tmp_path)
    colls = hlo_stats.collectives(final)
    hlo_stats.assign_axes(colls, dict(mesh.shape))
    assert any(c.loop_depth >= 1 for c in colls), "no collective inside the loops: the probe is blind"
    inside = [c for c in colls if c.loop_depth >= 1 and "data" in c.axes]
    assert not inside, f"data-axis collectives inside the micro-batch loop: {inside[:3]}"
    outside = [c for c in colls if c.loop_depth == 0 and c.axes == ("data",)]
    smallest = min(int(np.prod(s)) for s in param_shapes(cfg).values()) * 4 // 8  # fp32 bytes / 8 devices
    # tensor-parallel activation sums in the compute dtype: the embedding output and the head's
    # input gradient included ([micro rows, T, D] = [2, 16, 64] per device)
    act_sums = re.findall(r"= (\w+)\[2,16,64\]\S* all-reduce\(", partitioned)
    assert act_sums and set(act_sums) == {"bf16"}, act_sums
    op = "reduce-scatter" if zero1 else "all-reduce"
    reductions = [c for c in outside if c.kind == op and c.result_bytes >= smallest]
    assert 1 <= len(reductions) <= len(PARAM_AXES), [(c.kind, c.result_bytes) for c in outside]
    assert all(c.dtype == "f32" for c in reductions)
    if zero1:
        # the working copy gathered over data once per step, in the compute dtype (partitioned HLO)
        gathers = re.findall(r"= (\w+)\[[\d,]*\]\S* all-gather\(", partitioned)
        assert gathers and set(gathers) == {"bf16"}, gathers
        assert len([c for c in outside if c.kind == "all-gather"]) <= len(PARAM_AXES)
    else:
        assert not [c for c in outside if c.kind == "all-gather"]


def test_checkpoint_from_old_layout_and_stage4_restores_zero1_stage1(tmp_path, one_device):
    """A checkpoint written the way the trainer wrote them before master weights were split
    (params replicated over data, here on a stage-4 mesh) restores into the ZeRO-1 stage-1
    layout with the same values, and training continues exactly as on one device."""
    cfg = CFG.replace(num_layers=4)
    tx = make_optimizer(OC, 10)
    params = jax.device_get(nnx_params(cfg, 1))
    state = jax.device_get(init_state(jax.tree.map(jnp.asarray, params), tx))
    old = meshes.make_mesh(dict(BASE, data=2, stage=4))
    with sharding.use_mesh(old, sharding.DEFAULT_RULES):
        sh = state_shardings(cfg, tx, old, sharding.DEFAULT_RULES, zero1=False)
        placed = jax.device_put({"params": state["params"], "opt_state": state["opt_state"]},
                                {"params": sh["params"], "opt_state": sh["opt_state"]})
        assert placed["params"]["q_proj"].sharding.spec[0] == "stage"
        manager = ckpt.make_manager(str(tmp_path))
        ckpt.save(manager, 5, placed["params"], placed["opt_state"], {"it": 1}, {"step": 5})
        manager.wait_until_finished()
    new = meshes.make_mesh(dict(BASE, data=8))
    with sharding.use_mesh(new, sharding.DEFAULT_RULES):
        sh = state_shardings(cfg, tx, new, sharding.DEFAULT_RULES, zero1=True)
        abstract = jax.eval_shape(lambda p: init_state(p, tx),
                                  {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in param_shapes(cfg).items()})
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sh)
        restored, data_state = restore_train_state(ckpt.make_manager(str(tmp_path)), 5, target)
        assert "data" in str(restored["params"]["q_proj"].sharding.spec)  # master split over data
        for a, b in zip(jax.tree.leaves(restored["params"]) + jax.tree.leaves(restored["opt_state"]),
                        jax.tree.leaves(state["params"]) + jax.tree.leaves(state["opt_state"])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        b = make_batches(n=1, G=G, cfg=cfg)[0]
        step = jit_train_step(make_train_step(cfg, tx, schedule(OC, 10), 2, zero1=True, sync=sharding.GradSync()),
                              sh, new)
        out, m = step(restored, host_batch.global_batch(b, new))
    ref, m1 = jax.jit(make_train_step(cfg, tx, schedule(OC, 10), 2, zero1=False))(
        jax.tree.map(jnp.asarray, {**state, "step": jnp.int32(5)}), b)
    np.testing.assert_allclose(float(m["loss"]), float(m1["loss"]), rtol=1e-5)
    for a, c in zip(jax.tree.leaves(out["params"]), jax.tree.leaves(ref["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5, rtol=1e-5)


def test_bad_settings_one_line():
    with pytest.raises(UserError, match=r"unknown sharding.grad_reduce_dtype 'fp8'; known: float32, bfloat16"):
        sharding.GradSync("fp8")
    with pytest.raises(UserError, match=r"unknown sharding.fsdp_grad_reduce 'layer'; known: micro_batch, step"):
        sharding.GradSync(fsdp="layer")
    tc = TrainConfig(steps=1, micro_batch_size=1, global_batch_size=8, seq_len=16)
    with pytest.raises(UserError, match=r"fsdp_grad_reduce='micro_batch'.*mesh.fsdp=1") as e:
        sharding.GradSync(fsdp="micro_batch").check_mesh(dict(BASE, data=8))
    assert "\n" not in str(e.value)
    validate_shapes(tc, CFG, dict(BASE, data=8), PipelineSettings())  # the default is fine


def test_eval_step_micro_batched_equals_whole_batch(one_device):
    from meditron_jax.training.step import make_eval_step
    params, batches, _, _ = one_device
    b = batches[0]
    whole = jax.jit(make_eval_step(CFG, num_micro=1, zero1=False, sync=sharding.GradSync()))(params, b)
    mesh = meshes.make_mesh(dict(BASE, data=4, tensor=2))
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        tx = make_optimizer(OC, 10)
        sh = state_shardings(CFG, tx, mesh, sharding.DEFAULT_RULES, zero1=True)
        fn = jax.jit(make_eval_step(CFG, num_micro=NUM_MICRO, zero1=True, sync=sharding.GradSync()),
                     in_shardings=(sh["params"], {k: host_batch.batch_sharding(mesh) for k in b}))
        jaxpr = str(jax.make_jaxpr(fn)(jax.device_put(params, sh["params"]), host_batch.global_batch(b, mesh)))
        out = fn(jax.device_put(params, sh["params"]), host_batch.global_batch(b, mesh))
    assert "scan" in jaxpr and "length=4" in jaxpr.replace(" ", "")
    np.testing.assert_allclose(float(out["loss_sum"]), float(whole["loss_sum"]), rtol=1e-5)
    assert float(out["tokens"]) == float(whole["tokens"])
