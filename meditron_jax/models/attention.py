"""Attention implementations behind one switch (`model.attention`): 'auto' (the default: the
platform's fused kernel, else 'xla'), 'xla' (reference, any backend), 'blocked' (flash-style
online softmax in XLA ops, memory-lean; 'xla' also picks it for long dense cases), 'cudnn'
(GPU, dense segment mask) and the fused Pallas kernels 'splash' (TPU) and 'gpu_flash' (GPU)
of `attention_kernels.py`.

Owns: causal + segment-masked softmax attention with grouped-query heads, the switch, and the
fallback to the XLA path (one log line) where a kernel cannot serve a shape.
Does not own: projections, RoPE or KV caches (llama.py), the Pallas kernels and their
sharding (attention_kernels.py).

q [B,T,N,H], k/v [B,S,K,H]; N is a multiple of K (GQA). Query i attends key j iff
j's slot <= i's slot and both carry the same segment id (packed documents never mix;
segment 0 marks padding, which only attends to padding and never feeds the loss).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from meditron_jax.distributed.sharding import mesh_platform
from meditron_jax.models import attention_kernels as kernels

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


# -- blocked (flash-style) attention ----------------------------------------------------------
# Auto selection: the 'xla' switch takes the blocked path where it would otherwise build one
# dense [B, N, T, S] fp32 score tensor this large or larger: long prefill / scoring rows whose
# length the causal query blocks cannot split (e.g. a 1,728-token PubMedQA prompt), and queries
# against a long KV cache. Training at T = 2048 keeps its causal query blocks (`query_block`).
BLOCKED_MIN_QUERIES = 128
BLOCKED_MIN_KEYS = 1024
BLOCK_Q = 256
BLOCK_K = 512


def use_blocked(T: int, S: int, q_slots=None) -> bool:
    """Whether `attend(impl='xla')` runs `blocked_attention` for T queries over S keys."""
    return query_block(T, S, q_slots) is None and T >= BLOCKED_MIN_QUERIES and S >= BLOCKED_MIN_KEYS


def _pad_axis(x, axis: int, multiple: int, value=0):
    n = x.shape[axis]
    pad = -n % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def blocked_attention(q, k, v, q_segment, kv_segment, q_slots=None, block_q: int = BLOCK_Q,
                      block_k: int = BLOCK_K):
    """Same masking and values as `xla_attention`, computed flash-style: queries in blocks of
    `block_q` (one at a time, `lax.map`), each running an online softmax (running max, running
    sum, running weighted values) over keys in blocks of `block_k` (`lax.scan`). Only one
    [B, K, G, block_q, block_k] fp32 score block is alive at a time, so memory is
    O(block_q x block_k) for scores plus O(T x H) for the output, never O(T x S). Key blocks that
    lie wholly after a query block's last slot (causally invisible) are skipped (`lax.cond`).

    A row that sees no key at all (padding, segment 0 against no segment-0 key) gives some
    finite average, as the reference's uniform softmax does; such rows are never used.
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    bq, bk = min(block_q, T), min(block_k, S)
    if q_slots is None:
        q_slots = jnp.arange(T, dtype=jnp.int32)
    q_slots = jnp.broadcast_to(jnp.asarray(q_slots, jnp.int32), (T,))
    big = jnp.iinfo(jnp.int32).max
    # pad queries and keys to whole blocks: padded keys match no segment and no slot
    qp = _pad_axis(q, 1, bq)
    qseg = _pad_axis(q_segment.astype(jnp.int32), 1, bq)
    qsl = _pad_axis(q_slots, 0, bq, value=0)
    kp, vp = _pad_axis(k, 1, bk), _pad_axis(v, 1, bk)
    kseg = _pad_axis(kv_segment.astype(jnp.int32), 1, bk, value=-1)
    ksl = _pad_axis(jnp.arange(S, dtype=jnp.int32), 0, bk, value=big)
    nq, nk = qp.shape[1] // bq, kp.shape[1] // bk
    scale = H ** -0.5
    # [nq, B, bq, K, G, H] and [nk, B, bk, K, H]: block index leading, for map / scan
    qb = (qp.reshape(B, nq, bq, K, G, H) * jnp.asarray(scale, q.dtype)).transpose(1, 0, 2, 3, 4, 5)
    qsegb = qseg.reshape(B, nq, bq).transpose(1, 0, 2)
    qslb = qsl.reshape(nq, bq)
    kb = kp.reshape(B, nk, bk, K, H).transpose(1, 0, 2, 3, 4)
    vb = vp.reshape(B, nk, bk, K, H).transpose(1, 0, 2, 3, 4)
    ksegb = kseg.reshape(B, nk, bk).transpose(1, 0, 2)
    kslb = ksl.reshape(nk, bk)

    def one_query_block(args):
        qi, qsegi, qsli = args  # [B,bq,K,G,H], [B,bq], [bq]
        last_slot = jnp.max(qsli)

        def visit(carry, kv):
            kj, vj, ksegj, kslj = kv

            def update(carry):
                m, l, acc = carry  # [B,K,G,bq], [B,K,G,bq], [B,K,G,bq,H] (fp32)
                s = jnp.einsum("bqkgh,bskh->bkgqs", qi, kj, preferred_element_type=jnp.float32)
                mask = (qsli[:, None] >= kslj[None, :])[None] & (qsegi[:, :, None] == ksegj[:, None, :])
                s = jnp.where(mask[:, None, None], s, _NEG)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                p = jnp.exp(s - m_new[..., None])
                corr = jnp.exp(m - m_new)
                l_new = l * corr + jnp.sum(p, axis=-1)
                pv = jnp.einsum("bkgqs,bskh->bkgqh", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
                return m_new, l_new, acc * corr[..., None] + pv

            visible = kslj[0] <= last_slot  # any key of this block at or before the last query slot
            return jax.lax.cond(visible, update, lambda c: c, carry), None

        init = (jnp.full((B, K, G, bq), _NEG, jnp.float32), jnp.zeros((B, K, G, bq), jnp.float32),
                jnp.zeros((B, K, G, bq, H), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(visit, init, (kb, vb, ksegb, kslb))
        out = acc / l[..., None]  # l >= 1: key block 0 (slot 0) is always visited
        return out.transpose(0, 3, 1, 2, 4).astype(q.dtype)  # [B,bq,K,G,H]

    out = jax.lax.map(one_query_block, (qb, qsegb, qslb))  # [nq,B,bq,K,G,H]
    return out.transpose(1, 0, 2, 3, 4, 5).reshape(B, nq * bq, N, H)[:, :T]


def dpa_attention(q, k, v, q_segment, kv_segment, implementation: str):
    """`jax.nn.dot_product_attention` with our masking: causal by the kernel, segments as a
    boolean mask [B,1,T,S]. implementation='cudnn' is the GPU path; 'xla' runs anywhere (tests)."""
    mask = (q_segment[:, :, None] == kv_segment[:, None, :])[:, None]  # [B,1,T,S]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=implementation)


def cudnn_attention(q, k, v, q_segment, kv_segment):
    """cuDNN flash attention, one device's batch rows and heads at a time (`per_device`: so that
    it also compiles inside the pipeline's partially manual shard_map, where its custom
    partitioning cannot run). Its segment mask is dense: [b,1,T,S] per device."""
    if mesh_platform() != "gpu":
        raise RuntimeError(
            f"attention='cudnn' needs a CUDA GPU, but the devices are {mesh_platform()!r}; "
            "use model.attention='xla' or 'auto'")
    return kernels.per_device(lambda *a: dpa_attention(*a, "cudnn"), q, k, v, q_segment, kv_segment)


def resolve(impl: str, T: int, S: int, H: int, q_slots=None) -> str:
    """The implementation `attend(impl=impl)` runs for T queries over S keys of head dim H, on
    the platform being traced for: 'auto' is that platform's fused kernel ('xla' on CPU); a
    kernel that cannot serve the shape gives 'xla', with one log line (per reason, per process)."""
    if impl == "auto":
        impl = kernels.platform_kernel(mesh_platform()) or "xla"
    why = None
    if impl in kernels.KERNELS:
        why = kernels.cannot_serve(impl, T, S, H, q_slots)
    elif impl == "cudnn" and q_slots is not None:
        why = "queries at a KV-cache offset (generation)"
    if why:
        kernels.note_once(f"attention {impl!r} falls back to the XLA path for {why}")
        return "xla"
    return impl


def attend(q, k, v, q_segment, kv_segment, impl: str = "auto", q_slots=None):
    impl = resolve(impl, q.shape[1], k.shape[1], q.shape[3], q_slots)
    if impl == "xla":
        if use_blocked(q.shape[1], k.shape[1], q_slots):
            return blocked_attention(q, k, v, q_segment, kv_segment, q_slots)
        return xla_attention(q, k, v, q_segment, kv_segment, q_slots)
    if impl == "blocked":
        return blocked_attention(q, k, v, q_segment, kv_segment, q_slots)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, q_segment, kv_segment)
    if impl in kernels.KERNELS:
        return kernels.fused_attention(impl, q, k, v, q_segment, kv_segment)
    raise ValueError(f"unknown attention implementation {impl!r}")
