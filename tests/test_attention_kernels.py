"""The fused attention kernels (splash for TPU, Pallas flash for GPU) against the XLA path, in
Pallas interpret mode on CPU: forward and the three input gradients on packed rows (3 to 7
documents of random lengths, padding), GQA with 1, 2 and 8 kv heads, T 128 / 512 / 2048; no
query attends across a document boundary; the tiny model trains to the XLA path's losses with
each kernel (one of them inside the pipeline); 'auto' and the one-line fallbacks; and what
the GPU / TPU compilers make of them inside the pipeline (a custom call, no T x S array)."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meditron_jax.distributed import host_batch, meshes, sharding
from meditron_jax.models import attention
from meditron_jax.models import attention_kernels as kernels
from meditron_jax.models.config import LlamaConfig
from meditron_jax.models.llama import init_model, params_dict

KERNELS = ("splash", "gpu_flash")


def packed_segments(B, T, rng):
    """Each row: 3 to 7 documents (segment ids 1, 2, ...) of random lengths, then padding (0)."""
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        docs = int(rng.integers(3, 8))
        end = T - int(rng.integers(0, T // 8))  # a padded tail (some rows have none)
        cuts = np.sort(rng.choice(np.arange(1, end), size=docs - 1, replace=False))
        seg[b, :end] = 1 + np.searchsorted(cuts, np.arange(end), side="right")
    return seg


def inputs(B, T, N, K, H, seed, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, H)) * 2, dtype) for n in (N, K, K))
    w = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)  # weights of the test loss
    return q, k, v, jnp.asarray(packed_segments(B, T, rng)), w


def reference(q, k, v, seg):
    """The XLA path's values in one dense block (`q_slots` given: no causal query blocks)."""
    return attention.xla_attention(q, k, v, seg, seg, q_slots=jnp.arange(q.shape[1]))


@functools.cache
def value_and_grads(impl: str):
    """jit: (out, d/dq, d/dk, d/dv) of sum(out * w) for attention `impl` ('ref' = `reference`)."""
    fn = reference if impl == "ref" else lambda q, k, v, s: attention.attend(q, k, v, s, s, impl=impl)

    def run(q, k, v, seg, w):
        out, pull = jax.vjp(lambda q, k, v: fn(q, k, v, seg), q, k, v)
        return (out, *pull(w.astype(out.dtype)))
    return jax.jit(run)


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max())


# (B, T, N, K, H): every kv-head count and every length, T=2048 once
CASES = {"T128_mha8": (2, 128, 8, 8, 128), "T512_gqa2": (2, 512, 8, 2, 32), "T2048_mqa1": (1, 2048, 2, 1, 32)}


@pytest.fixture(scope="module")
def results():
    """Reference and kernel results for every case, computed once (interpret mode is slow)."""
    out = {}
    for name, (B, T, N, K, H) in CASES.items():
        args = inputs(B, T, N, K, H, seed=T + K)
        out[name] = {impl: value_and_grads(impl)(*args) for impl in ("ref", *KERNELS)}
    return out


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("case", CASES)
def test_fp32_values_and_gradients_equal_xla(results, case, impl):
    ref, got = results[case]["ref"], results[case][impl]
    assert rel(got[0], ref[0]) <= 1e-5, f"{impl} {case}: output rel {rel(got[0], ref[0]):.1e}"
    for name, g, r in zip(("dq", "dk", "dv"), got[1:], ref[1:]):
        assert rel(g, r) <= 1e-4, f"{impl} {case}: {name} rel {rel(g, r):.1e}"


@pytest.mark.parametrize("impl", KERNELS)
def test_bf16_values_equal_xla(impl):
    q, k, v, seg, _ = inputs(2, 128, 4, 2, 128, seed=7, dtype=jnp.bfloat16)
    ref = reference(q, k, v, seg)
    got = jax.jit(lambda q, k, v, s: attention.attend(q, k, v, s, s, impl=impl))(q, k, v, seg)
    assert got.dtype == jnp.bfloat16 and rel(got, ref) <= 2e-2


@pytest.mark.parametrize("impl", KERNELS)
def test_no_query_attends_across_a_document_boundary(results, impl):
    """Perturb the keys and values of one document: every other position's output is unchanged,
    that document's own outputs move (so the perturbation reached the kernel)."""
    B, T, N, K, H = CASES["T512_gqa2"]
    q, k, v, seg, w = inputs(B, T, N, K, H, seed=T + K)
    doc = np.asarray(seg) == 2  # the second document of every row
    noise = jnp.asarray(doc[:, :, None, None] * 5.0, jnp.float32)
    moved = value_and_grads(impl)(q, k + noise, v - noise, seg, w)[0]  # same shapes: no new compile
    before = np.asarray(results["T512_gqa2"][impl][0])
    diff = np.abs(np.asarray(moved) - before).max(axis=(2, 3))  # [B, T]
    assert diff[~doc].max() == 0.0, f"{impl}: positions outside document 2 moved by {diff[~doc].max():.2e}"
    assert diff[doc].min() > 1e-3


# -- the tiny model trained with each kernel ---------------------------------------------------
# The XLA reference trains on (data 2, tensor 4): the step's data-manual shard_map, kv heads
# (2) fewer than the tensor split (4). One kernel trains there too, the other inside the
# pipeline (data 2, stage 2, tensor 2: nested in its stage-manual shard_map). Losses do not
# depend on the mesh (tests/test_train_step.py, tests/test_pipeline.py), and the code that
# runs a kernel per device (`distributed.per_device`) is the same for both kernels; both
# compile inside the pipeline for their targets at the end of this file.
MESHES = {"data2_tensor4": dict(data=2, stage=1, fsdp=1, tensor=4),
          "data2_stage2_tensor2": dict(data=2, stage=2, fsdp=1, tensor=2)}


@functools.cache
def train_losses(impl: str, mesh_name: str, steps: int = 20):
    """Losses of `steps` train steps of a tiny GQA model (4 heads, 2 kv heads) on packed rows."""
    from meditron_jax.training.optimizer import OptimizerConfig, make_optimizer, schedule
    from meditron_jax.training.pipeline import PipelineSettings
    from meditron_jax.training.state import jit_train_step, layers_fn_for, state_shardings
    from meditron_jax.training.step import init_state, make_train_step
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=128, attention=impl)
    oc = OptimizerConfig(lr=1e-2, min_lr=1e-3, warmup_steps=2, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-5, clip=1.0)
    rng = np.random.default_rng(0)
    G, T = 4, 128
    seg = packed_segments(G, T, rng)
    toks = rng.integers(0, cfg.vocab_size, (G, T + 1)).astype(np.int32)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": (seg > 0).astype(np.float32),
             "segment_ids": seg, "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (G, T)).copy()}
    mesh = meshes.make_mesh(MESHES[mesh_name])
    tx = make_optimizer(oc, steps)
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        step = make_train_step(cfg, tx, schedule(oc, steps), 1, zero1=False, sync=sharding.GradSync(),
                               layers_fn=layers_fn_for(cfg, mesh, PipelineSettings(microbatches=2)))
        sh = state_shardings(cfg, tx, mesh, sharding.DEFAULT_RULES)
        state = jax.jit(lambda p: init_state(p, tx), out_shardings=sh)(params_dict(init_model(cfg, 0)))
        jitted, gb = jit_train_step(step, sh, mesh), host_batch.global_batch(batch, mesh)
        losses = []
        for _ in range(steps):
            state, m = jitted(state, gb)
            losses.append(float(m["loss"]))
    return np.array(losses)


@pytest.mark.parametrize("impl,mesh_name", [("gpu_flash", "data2_tensor4"), ("splash", "data2_stage2_tensor2")])
def test_training_equals_xla_losses(impl, mesh_name):
    ref = train_losses("xla", "data2_tensor4")
    got = train_losses(impl, mesh_name)
    assert ref[-1] < ref[0] - 0.5  # it learns, so the losses are a sharp comparison
    assert np.abs(got - ref).max() <= 1e-4, f"{impl}: max loss diff {np.abs(got - ref).max():.2e}"


# -- the switch -------------------------------------------------------------------------------

@pytest.fixture
def fresh_notes(caplog, monkeypatch):
    """Each note logged again (it is once per process) and captured once, on the package logger
    with propagation off (as the CLI's console setup leaves it)."""
    kernels.NOTED.clear()
    logger = logging.getLogger("meditron_jax")
    monkeypatch.setattr(logger, "propagate", False)
    caplog.set_level(logging.INFO, logger="meditron_jax")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)
    kernels.NOTED.clear()


def test_auto_is_xla_on_cpu_and_fallbacks_are_one_line(fresh_notes):
    assert attention.resolve("auto", 2048, 2048, 128) == "xla"
    assert not fresh_notes.records  # no kernel on CPU: nothing to say
    for _ in range(3):  # traced again and again (layers, remat, eval): one line
        assert attention.resolve("splash", 120, 120, 32) == "xla"
    assert attention.resolve("gpu_flash", 256, 256, 192) == "xla"
    assert attention.resolve("gpu_flash", 16, 512, 64, q_slots=jnp.arange(16)) == "xla"
    assert attention.resolve("splash", 256, 256, 32) == "splash"
    msgs = [r.getMessage() for r in fresh_notes.records]
    assert len(msgs) == 3, msgs
    assert "'splash' falls back to the XLA path for sequence length 120" in msgs[0]
    assert "head dim 192" in msgs[1] and "KV-cache offset" in msgs[2]


def test_kernel_on_the_wrong_accelerator_is_one_clear_error():
    with pytest.raises(RuntimeError, match="attention='splash' needs a TPU, but the devices are 'gpu'"):
        kernels.check_platform("splash", "gpu")
    kernels.check_platform("gpu_flash", "cpu")  # interpret mode
    assert kernels.platform_kernel("tpu") == "splash" and kernels.platform_kernel("gpu") == "gpu_flash"
    assert kernels.platform_kernel("cpu") is None


# -- what the GPU and TPU compilers make of it ------------------------------------------------

def _have(dist):
    import importlib.metadata
    try:
        return bool(importlib.metadata.version(dist))
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.parametrize("target,plugin,kernel", [
    ("h100-80gb", "jax-cuda12-plugin", "__gpu$xla.gpu.triton mha_backward"),
    ("v5p-16", "libtpu", "tpu_custom_call splash_mha_dkv_segmented_no_residuals")])
def test_auto_compiles_to_the_kernel_inside_the_pipeline(target, plugin, kernel):
    """The decoder stack's forward and backward through the pipeline (data 2, stage 2, tensor 2),
    compiled for the target: 'auto' is that platform's kernel, called as a custom call (fwd and
    bwd), and no array has two sequence-length dimensions."""
    if not _have(plugin):
        pytest.skip("plan extra not installed")
    from meditron_jax.models.llama import LAYER_KEYS, PARAM_AXES, param_shapes
    from meditron_jax.plan import targets
    from meditron_jax.plan.hlo_stats import attention_report
    from meditron_jax.training.pipeline import pipeline_layers
    targets.compile_on_host()
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, dtype="bfloat16", remat="full")
    B, T = 8, 256
    mesh = meshes.make_mesh(dict(data=2, stage=2, fsdp=1, tensor=2), targets.resolve(target, 8).devices[:8])
    rules = dict(sharding.DEFAULT_RULES)

    def arg(shape, axes, dtype=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.sharding_for(axes, shape, mesh, rules))

    shapes = param_shapes(cfg)
    layers = {k: arg(shapes[k], PARAM_AXES[k]) for k in LAYER_KEYS}
    x = arg((B, T, cfg.hidden_size), ("batch", "length", "embed"), jnp.bfloat16)
    ids = arg((B, T), ("batch", "length"), jnp.int32)

    def loss(layers, x, pos, seg):
        y = pipeline_layers(cfg, layers, x, pos, seg, mesh=mesh, microbatches=2)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    # the suite runs at "highest" matmul precision (conftest); Mosaic refuses a bf16 matmul at fp32
    # precision ("Bad lhs type"), so compile as training does, at the default
    with sharding.use_mesh(mesh, rules), jax.default_matmul_precision("default"):
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(layers, x, ids, ids).compile().as_text()
    report = attention_report(hlo, T)
    assert kernel in report["kernel_calls"], report["kernel_calls"]
    assert report["largest_seq_by_seq_array"] is None, report["largest_seq_by_seq_array"]
