"""Attention implementations behind one switch: 'xla' (reference, any backend) and 'cudnn'.

Owns: causal + segment-masked softmax attention with grouped-query heads.
Does not own: projections, RoPE or KV caches (model.py).

q [B,T,N,H], k/v [B,S,K,H]; N is a multiple of K (GQA). Query i attends key j iff
j's slot <= i's slot and both carry the same segment id (packed documents never mix;
segment 0 marks padding, which only attends to padding and never feeds the loss).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e30  # finite: a fully masked row gives a uniform (ignored) softmax, never NaN


def attention_mask(q_segment, kv_segment, q_slots=None):
    """Boolean [B,T,S]: causal by slot and same segment."""
    T, S = q_segment.shape[1], kv_segment.shape[1]
    if q_slots is None:
        q_slots = jnp.arange(T)
    causal = q_slots[:, None] >= jnp.arange(S)[None, :]
    same = q_segment[:, :, None] == kv_segment[:, None, :]
    return causal[None] & same


MAX_QUERY_BLOCKS = 16  # the causal blocked path unrolls this many query blocks at most


def query_block(T: int, S: int, q_slots=None) -> int | None:
    """Query block length for causal skipping, or None for one dense block: training and
    prefill (no cache offset, T == S) of T >= 256 split into 128-query blocks (more for long
    sequences, so at most MAX_QUERY_BLOCKS)."""
    if q_slots is not None or T != S or T < 256:
        return None
    bq = max(128, -(-T // MAX_QUERY_BLOCKS))
    return bq if T % bq == 0 else None


def _dense_attention(q, k, v, q_segment, kv_segment, q_slots):
    B, T, N, H = q.shape
    K = k.shape[2]
    mask = attention_mask(q_segment, kv_segment, q_slots)[:, None]  # [B,1,T,S]
    if K == N:  # plain multi-head: one batch dim fewer in the dots (faster on XLA:CPU)
        scores = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
    else:  # grouped-query: query heads of one kv head are a group axis
        qg = q.reshape(B, T, K, N // K, H)
        scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
        mask = mask[:, None]  # [B,1,1,T,S]
    scores = jnp.where(mask, scores * (H ** -0.5), _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if K == N:
        return jnp.einsum("bnts,bsnh->btnh", probs, v)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(B, T, N, H)


def xla_attention(q, k, v, q_segment, kv_segment, q_slots=None):
    """Softmax attention in plain XLA ops. For causal self-attention over a whole sequence the
    queries go in blocks, block i attending only to keys [0, end of block i): the masked upper
    triangle is never computed (~40% fewer score FLOPs at 4 blocks, ~50% at 16) and the fp32
    scores live one [B, N, block, S'] piece at a time. Same values as the dense form (each
    row's softmax sees the same unmasked keys). Measured on CPU at B 8, T 512, 8 heads of 64:
    forward + backward 0.70 s dense -> 0.28 s in 128-query blocks (docs/benchmarks.md)."""
    T, S = q.shape[1], k.shape[1]
    bq = query_block(T, S, q_slots)
    if bq is None:
        return _dense_attention(q, k, v, q_segment, kv_segment, q_slots)
    outs = []
    for start in range(0, T, bq):
        end = start + bq
        outs.append(_dense_attention(q[:, start:end], k[:, :end], v[:, :end], q_segment[:, start:end],
                                     kv_segment[:, :end], jnp.arange(start, end)))
    return jnp.concatenate(outs, axis=1)


def dpa_attention(q, k, v, q_segment, kv_segment, implementation: str):
    """`jax.nn.dot_product_attention` with our masking: causal by the kernel, segments as a
    boolean mask [B,1,T,S]. implementation='cudnn' is the GPU path; 'xla' runs anywhere (tests)."""
    mask = (q_segment[:, :, None] == kv_segment[:, None, :])[:, None]  # [B,1,T,S]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=implementation)


def _platform() -> str:
    """The platform being compiled for: the traced mesh's devices (jax's abstract mesh), else
    the default backend. Not `jax.default_backend()` alone: `plan --target h100-80gb` traces
    for GPU devices on a CPU host."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return getattr(device, "platform", None) or jax.default_backend()


def cudnn_attention(q, k, v, q_segment, kv_segment):
    if _platform() != "gpu":
        raise RuntimeError(
            f"attention='cudnn' needs a CUDA GPU, but the devices are {_platform()!r}; "
            "use model.attention='xla'")
    return dpa_attention(q, k, v, q_segment, kv_segment, "cudnn")  # cuDNN flash attention


def attend(q, k, v, q_segment, kv_segment, impl: str = "xla", q_slots=None):
    if impl == "xla":
        return xla_attention(q, k, v, q_segment, kv_segment, q_slots)
    if impl == "cudnn":
        if q_slots is not None:
            raise ValueError("cudnn attention is for training/prefill without a cache offset")
        return cudnn_attention(q, k, v, q_segment, kv_segment)
    raise ValueError(f"unknown attention implementation {impl!r}")
