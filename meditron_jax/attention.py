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


def xla_attention(q, k, v, q_segment, kv_segment, q_slots=None):
    B, T, N, H = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (H ** -0.5)
    mask = attention_mask(q_segment, kv_segment, q_slots)[:, None, None]  # [B,1,1,T,S]
    scores = jnp.where(mask, scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(B, T, N, H)


def dpa_attention(q, k, v, q_segment, kv_segment, implementation: str):
    """`jax.nn.dot_product_attention` with our masking: causal by the kernel, segments as a
    boolean mask [B,1,T,S]. implementation='cudnn' is the GPU path; 'xla' runs anywhere (tests)."""
    mask = (q_segment[:, :, None] == kv_segment[:, None, :])[:, None]  # [B,1,T,S]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=implementation)


def cudnn_attention(q, k, v, q_segment, kv_segment):
    if jax.default_backend() != "gpu":
        raise RuntimeError(
            f"attention='cudnn' needs a CUDA GPU, but JAX's backend is {jax.default_backend()!r}; "
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
