"""The speed paths give the reference path's numbers (issue 9). Correctness only, no timing.

Already covered elsewhere (not repeated here): fused chunked loss vs full logits for one fp32
batch (test_train_step.test_chunked_loss_equals_full), remat policies and scan vs unrolled for
the model (test_model.test_scan_equals_unrolled_and_remat), the cuDNN switch failing clearly on
CPU for the forward pass (test_model.test_cudnn_switch_is_clear_on_cpu).
Here: the fused loss with padding, padded vocab and bf16, on a sharded mesh, and without
gradients; whole optimised train steps against the reference step; the cuDNN path's masking
(run through `jax.nn.dot_product_attention`'s XLA implementation) against our reference
attention; the cuDNN switch failing clearly inside a train step; the host-memory policy
(hostmem) reusing freed buffers.
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meditron_jax.models import attention
from meditron_jax.distributed import sharding
from meditron_jax.distributed import meshes
from meditron_jax.models.config import LlamaConfig
from meditron_jax.models.llama import init_model, params_dict
from meditron_jax.training.optimizer import OptimizerConfig, make_optimizer, schedule
from meditron_jax.training.step import cross_entropy_sum, init_state, make_train_step

CFG = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=32)  # padded vocab 384: 84 padded columns
OC = OptimizerConfig(lr=1e-2, warmup_steps=1, weight_decay=0.1, clip=1.0)


def _loss_inputs(B=4, T=16, D=32, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    W = jnp.asarray(0.3 * rng.standard_normal((D, CFG.padded_vocab_size)), jnp.float32)
    W = W.at[:, CFG.vocab_size:].set(0.0)  # padded columns start at zero, as in the model
    h = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32).astype(dtype)
    t = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, T)), jnp.int32)
    m = jnp.asarray(rng.random((B, T)) > 0.3, jnp.float32).at[0, -5:].set(0.0)  # padding tail
    return W, h, t, m


def _ce_grad(cfg, chunk, W, h, t, m, scale=1.0):
    return jax.jit(jax.value_and_grad(lambda W, h: scale * cross_entropy_sum(cfg, W, h, t, m, chunk),
                                      argnums=(0, 1)))(W, h)


def test_fused_loss_scaled_cotangent_padding_and_no_grad_path():
    W, h, t, m = _loss_inputs()
    # a cotangent other than 1 (the loss is divided by the token count in the step)
    (l_ref, (gw_ref, gh_ref)) = _ce_grad(CFG, None, W, h, t, m, scale=0.37)
    for chunk in (4, 8):
        (l, (gw, gh)) = _ce_grad(CFG, chunk, W, h, t, m, scale=0.37)
        np.testing.assert_allclose(l, l_ref, rtol=1e-6)
        # |grad| is O(1): fp32 sums in another order differ by a few ulps of the largest term
        np.testing.assert_allclose(gw, gw_ref, rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(gh, gh_ref, rtol=1e-5, atol=2e-6)
        assert not np.asarray(gw[:, CFG.vocab_size:]).any()  # padded vocab gets exactly zero gradient
        assert not np.asarray(gh[0, -5:]).any()  # masked tokens get exactly zero gradient
    # without differentiation (eval) the fused path only computes the loss
    no_grad = jax.jit(lambda W, h: cross_entropy_sum(CFG, W, h, t, m, 4))(W, h)
    np.testing.assert_allclose(no_grad, l_ref / 0.37, rtol=1e-6)
    with pytest.raises(ValueError, match="not divisible"):
        cross_entropy_sum(CFG, W, h, t, m, 5)


def test_fused_loss_bf16_close_to_fp32():
    """bf16 compute: h and the projection in bf16 (8-bit mantissa, relative rounding 2^-9 ~ 2e-3),
    logits accumulated and the softmax taken in fp32. The loss sums ~45 terms of ~6 with
    independent rounding, so its relative error stays well under 1e-2; gradients (one bf16
    rounding of d logits, then fp32-accumulated matmuls) agree in direction to cos > 0.999."""
    cfg = CFG.replace(dtype="bfloat16")
    W, h, t, m = _loss_inputs()
    l32, (gw32, gh32) = _ce_grad(CFG, None, W, h, t, m)
    l16, (gw16, gh16) = _ce_grad(cfg, 4, W, h.astype(jnp.bfloat16), t, m)
    assert gw16.dtype == jnp.float32 and gh16.dtype == jnp.bfloat16
    assert abs(float(l16) / float(l32) - 1) < 1e-2
    for a, b in ((gw16, gw32), (gh16, gh32)):
        a, b = np.asarray(a, np.float32).ravel(), np.asarray(b, np.float32).ravel()
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.999


def test_fused_loss_on_sharded_mesh():
    """Batch over (data, fsdp), vocab over tensor: the custom-gradient scan partitions correctly."""
    W, h, t, m = _loss_inputs(B=4)
    ref = _ce_grad(CFG, None, W, h, t, m)
    mesh = meshes.make_mesh(dict(data=2, stage=1, fsdp=2, tensor=2))
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        spec = jax.sharding.PartitionSpec
        put = lambda a, s: jax.device_put(a, jax.sharding.NamedSharding(mesh, s))
        Ws = put(W, spec(None, "tensor"))
        hs, ts, ms = (put(a, spec(("data", "fsdp"))) for a in (h, t, m))
        got = _ce_grad(CFG, 4, Ws, hs, ts, ms)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
    for a, b in zip(got[1], ref[1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-6)


@pytest.fixture(scope="module")
def step_setup():
    params = {k: np.asarray(v) for k, v in params_dict(init_model(CFG, seed=3)).items()}
    rng = np.random.default_rng(1)
    G, T = 4, 16
    toks = rng.integers(0, CFG.vocab_size, (G, T + 1)).astype(np.int32)
    seg = np.ones((G, T), np.int32)
    seg[1, 9:] = 2  # two documents packed in row 1
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (G, T)).copy()
    pos[1, 9:] = np.arange(T - 9)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": seg, "positions": pos,
             "loss_mask": (rng.random((G, T)) > 0.1).astype(np.float32)}
    return params, batch


def _steps(cfg, params, batch, loss_chunk=None, n=2):
    """n steps; the first runs at lr 0 (warmup starts from 0, as in Megatron), the next ones move."""
    tx = make_optimizer(OC, 10)
    step = jax.jit(make_train_step(cfg, tx, schedule(OC, 10), loss_chunk=loss_chunk))
    state = init_state(jax.tree.map(jnp.asarray, params), tx)
    losses = []
    for _ in range(n):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return np.array(losses), state["params"], float(metrics["grad_norm"])


def test_optimised_train_step_equals_reference(step_setup):
    params, batch = step_setup
    ref_losses, ref_params, ref_gn = _steps(CFG, params, batch)
    for variant in (dict(remat="full"),):  # save_proj runs in test_bf16_train_step_close_to_fp32
        losses, new_params, gn = _steps(CFG.replace(**variant), params, batch, loss_chunk=4)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-6, err_msg=str(variant))
        np.testing.assert_allclose(gn, ref_gn, rtol=1e-5, err_msg=str(variant))
        for k in ref_params:  # AdamW moves each weight by <= lr = 1e-2; fp32 reordering ~1e-7
            np.testing.assert_allclose(np.asarray(new_params[k]), np.asarray(ref_params[k]), atol=1e-6,
                                       err_msg=f"{variant} {k}")


def test_bf16_train_step_close_to_fp32(step_setup):
    """bf16 compute (fp32 params, optimizer and loss): the first loss agrees to bf16 rounding
    (< 1e-2 relative, see test_fused_loss_bf16_close_to_fp32) and the run still learns."""
    params, batch = step_setup
    l32, _, _ = _steps(CFG, params, batch, n=1)
    l16, p16, _ = _steps(CFG.replace(dtype="bfloat16", remat="save_proj"), params, batch, loss_chunk=4, n=3)
    assert abs(l16[0] / l32[0] - 1) < 1e-2
    assert l16[2] < l16[0]
    assert all(v.dtype == jnp.float32 for v in p16.values())  # master weights stay fp32


def test_cudnn_path_masking_matches_reference():
    """The cuDNN path's arguments (kernel-side causal mask + segment mask, GQA heads), run through
    the XLA implementation of jax.nn.dot_product_attention, equal our reference attention."""
    rng = np.random.default_rng(0)
    B, T, N, K, H = 2, 12, 4, 2, 8
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32)
    seg = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12], jnp.int32)
    ref = attention.xla_attention(q, k, v, seg, seg)
    got = attention.dpa_attention(q, k, v, seg, seg, "xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-6)


def test_cudnn_switch_clear_in_train_step(step_setup):
    params, batch = step_setup
    cfg = CFG.replace(attention="cudnn", dtype="bfloat16")
    tx = make_optimizer(OC, 10)
    step = make_train_step(cfg, tx, schedule(OC, 10), loss_chunk=4)
    state = init_state(jax.tree.map(jnp.asarray, params), tx)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*model.attention='xla'"):
        jax.jit(step)(state, batch)


@pytest.mark.parametrize("K", [4, 2])
def test_causal_query_blocks_equal_dense_attention(K):
    """Training-length attention runs in causal query blocks (the upper triangle skipped); values
    and gradients equal the dense form, with packed segments and padding, MHA and GQA."""
    rng = np.random.default_rng(1)
    B, T, N, H = 2, 512, 4, 8
    assert attention.query_block(T, T) == 128 and attention.query_block(T, T, jnp.arange(T)) is None
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32)
    seg = jnp.asarray([[1] * 200 + [2] * 250 + [0] * 62, [3] * 512], jnp.int32)
    w = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v, seg, seg) * w)

    dense = lambda q, k, v, a, b: attention._dense_attention(q, k, v, a, b, None)
    # jitted: one compile each (op-by-op dispatch of the blocked gradient took 15 s)
    np.testing.assert_allclose(np.asarray(jax.jit(attention.xla_attention)(q, k, v, seg, seg)),
                               np.asarray(jax.jit(dense)(q, k, v, seg, seg)), atol=2e-6)
    g_blocked = jax.jit(jax.grad(loss(attention.xla_attention), argnums=(0, 1, 2)))(q, k, v)
    g_dense = jax.jit(jax.grad(loss(dense), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_blocked, g_dense):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


_REUSE_SNIPPET = """
import sys
import numpy as np
if sys.argv[1] == "policy":
    from meditron_jax.training.hostmem import keep_freed_memory
    assert keep_freed_memory()
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
n = 48 << 20  # over glibc's largest mmap threshold (32 MB)
r0 = rss(); a = np.ones(n, np.uint8); r1 = rss(); del a
r2 = rss(); b = np.ones(n, np.uint8); r3 = rss()
print(r1 - r0, r1 - r2, r3 - r2)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc policy")
def test_host_memory_policy_reuses_freed_buffers():
    """hostmem.keep_freed_memory: a freed large buffer stays in the process and the next one
    reuses its pages (nothing to fault in afresh), where glibc's defaults give it back to the
    kernel and map fresh memory for the next."""
    def run(mode):
        out = subprocess.run([sys.executable, "-c", _REUSE_SNIPPET, mode], capture_output=True, text=True,
                             check=True)
        return [int(x) for x in out.stdout.split()]

    mb = 1 << 20
    grown, given_back, regrown = run("defaults")
    assert grown > 40 * mb and given_back > 40 * mb and regrown > 40 * mb  # the control
    grown, given_back, regrown = run("policy")
    assert grown > 40 * mb and given_back < 4 * mb and regrown < 4 * mb
