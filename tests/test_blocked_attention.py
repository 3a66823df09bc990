"""Blocked (flash-style) attention equals the reference path: values 1e-5, log-probs 1e-4, T = 2048."""

import jax
import jax.numpy as jnp
import numpy as np

from meditron_jax.models import attention
from meditron_jax.models.config import LlamaConfig
from meditron_jax.models.llama import init_model


def _segments(B, T, rng):
    """Packed documents per row (segment ids 1, 2, ...) and a right-padded tail (segment 0)."""
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(64, T - 200), size=3, replace=False))
        end = T - int(rng.integers(1, 150))
        seg[b, :end] = 1 + np.searchsorted(cuts, np.arange(end), side="right")
    return seg


def test_blocked_equals_reference_T2048_gqa_segments():
    rng = np.random.default_rng(0)
    B, T, N, K, H = 2, 2048, 4, 2, 8  # GQA: 2 query heads per kv head
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, H)), jnp.float32) * 2 for n in (N, K, K))
    seg = jnp.asarray(_segments(B, T, rng))
    ref = attention._dense_attention(q, k, v, seg, seg, None)  # one dense T x S softmax
    out = jax.jit(attention.blocked_attention, static_argnames=("block_q", "block_k"))(
        q, k, v, seg, seg, block_q=256, block_k=384)  # 2048 % 384 != 0: a padded last key block
    valid = np.asarray(seg) > 0
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], atol=1e-5, rtol=1e-5)
    # the switch picks it for long dense cases only
    assert attention.use_blocked(1728, 1728) and not attention.use_blocked(2048, 2048)
    assert attention.use_blocked(200, 1800, q_slots=jnp.arange(200)) and not attention.use_blocked(1, 2048, 0)


def test_blocked_with_cache_offset_matches_reference():
    """Queries after a cached prefix (q_slots offset), as the prefix-shared scorer runs them."""
    rng = np.random.default_rng(1)
    B, T, S, N, K, H = 2, 200, 1280, 4, 1, 8
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.float32) for _ in range(2))
    kv_seg = np.zeros((B, S), np.int32)
    kv_seg[:, :1000 + T] = 1
    q_seg = np.ones((B, T), np.int32)
    q_seg[1, 150:] = 0
    slots = 1000 + jnp.arange(T)
    ref = attention._dense_attention(q, k, v, jnp.asarray(q_seg), jnp.asarray(kv_seg), slots)
    out = attention.blocked_attention(q, k, v, jnp.asarray(q_seg), jnp.asarray(kv_seg), slots, block_q=64,
                                      block_k=256)
    np.testing.assert_allclose(np.asarray(out)[q_seg > 0], np.asarray(ref)[q_seg > 0], atol=1e-5, rtol=1e-5)


def test_model_logprobs_blocked_vs_reference():
    """Whole model (tiny width, GQA) at T = 2048: next-token log-probs within 1e-4."""
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=2048)
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, 300, (1, 2048)), jnp.int32)
    seg = jnp.asarray(_segments(1, 2048, rng))
    s0 = np.asarray(seg[0])
    starts = np.maximum.accumulate(np.where(np.diff(s0, prepend=-1) != 0, np.arange(2048), 0))
    pos = jnp.asarray(np.arange(2048) - starts)[None]  # positions restart in every document

    def logp(impl):
        m = init_model(cfg.replace(attention=impl), seed=3)
        return jax.jit(lambda t: jax.nn.log_softmax(m(t, pos, seg), -1))(tokens)

    ref, out = logp("xla"), logp("blocked")
    valid = np.asarray(seg) > 0
    assert float(jnp.max(jnp.abs(ref))) > 1.0
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], atol=1e-4)


def test_blocked_gradients_equal_reference():
    """model.attention='blocked' is also a training switch: its gradients equal the reference."""
    rng = np.random.default_rng(4)
    B, T, N, K, H = 1, 160, 4, 2, 8
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, H)), jnp.float32) for n in (N, K, K))
    seg = jnp.asarray(np.r_[np.ones(90), np.full(60, 2), np.zeros(10)].astype(np.int32)[None])
    w = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32) * (seg[..., None, None] > 0)

    def loss(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)

    ref = loss(lambda q, k, v: attention._dense_attention(q, k, v, seg, seg, None))
    out = loss(lambda q, k, v: attention.blocked_attention(q, k, v, seg, seg, block_q=64, block_k=48))
    for a, b in zip(out, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
