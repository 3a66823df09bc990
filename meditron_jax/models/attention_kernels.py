"""Fused attention kernels for accelerators: Pallas splash attention on TPU (a Mosaic custom
call) and Pallas flash attention on GPU (a Triton custom call), both causal and segment-aware
without ever building a [B, *, T, S] mask, and how they are sharded.

Owns: which kernel `model.attention='auto'` means on a platform (`platform_kernel`), which
shapes a kernel serves (`cannot_serve`), the kernels' calls (`splash_attention`,
`gpu_flash_attention`) and running one per device with batch and heads split as the logical
rules say (`per_device`, GQA included). Does not own: the switch, the XLA paths and the
fallback to them (`attention.py`), shard_map and the logical rules (`distributed/per_device.py`,
`distributed/sharding.py`).

Why these two (measured on the target compilers from this CPU host, docs/benchmarks.md,
"Attention kernels on the target compilers (issue 30)"):
- TPU: `jax.experimental.pallas.ops.tpu.splash_attention`, MaxText's and Levanter's kernel:
  a causal `MultiHeadMask` (its fully masked blocks are skipped) and `SegmentIds`, GQA natively
  (q [N,T,H] against k/v [K,S,H]).
- GPU: `jax.experimental.pallas.ops.gpu.attention.mha` (Triton, custom VJP, A100 and H100).
  It takes one segment-id row per sequence. cuDNN through public JAX
  (`jax.nn.dot_product_attention(implementation='cudnn')`) can express packed documents only
  with a dense boolean mask (its `query_seq_lengths` describe one sequence per row); that mask
  is the [B,1,T,S] buffer this module exists to remove. `mha` has no GQA: k and v are
  repeated to the query heads per device (a [b,S,N,H] copy, not a T x S one).

On CPU an explicitly named kernel runs in Pallas interpret mode (slow; the tests' reference
check); 'auto' takes the XLA path there.

q [B,T,N,H], k/v [B,S,K,H], segments [B,T] / [B,S] int; N a multiple of K.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp

from meditron_jax.distributed import per_device as per_device_lib
from meditron_jax.distributed import sharding

log = logging.getLogger("meditron_jax")

KERNEL_PLATFORM = {"splash": "tpu", "gpu_flash": "gpu"}  # kernel -> the platform it compiles for
SPLASH_BLOCKS = (512, 256, 128)  # splash: the largest that divides T (multiples of 128 lanes)
GPU_BLOCK_Q = GPU_BLOCK_K = 128  # mha forward blocks (jax's defaults)
GPU_BLOCK_BWD = 32  # mha backward blocks (jax's defaults)
# Above this the backward kernel's blocks exceed shared memory (compiled here: head dim 192
# needs 225 KiB against the A100's 163, 256 needs 320 KiB against the H100's 227). Tensor
# cores need 16. Splash compiled for v5p at every head dim tried (8 to 512).
GPU_MAX_HEAD_DIM = 128

NOTED: set[str] = set()  # messages logged once per process (`note_once`)


def note_once(msg: str, level: int = logging.WARNING):
    """Log `msg` the first time only: attention is traced once per layer scan, remat and step,
    and a choice made at trace time is one line at start, never one per trace or per step."""
    if msg not in NOTED:
        NOTED.add(msg)
        log.log(level, msg)


def platform_kernel(platform: str) -> str | None:
    """The fused kernel `model.attention='auto'` picks for `platform` (None: the XLA path)."""
    return {v: k for k, v in KERNEL_PLATFORM.items()}.get(platform)


def check_platform(impl: str, platform: str):
    """A kernel named for another accelerator is a configuration error (CPU: interpret mode)."""
    want = KERNEL_PLATFORM[impl]
    if platform not in (want, "cpu"):
        raise RuntimeError(f"attention={impl!r} needs a {want.upper()}, but the devices are {platform!r}; "
                           "use model.attention='auto'")


def splash_block(T: int) -> int | None:
    return next((b for b in SPLASH_BLOCKS if T % b == 0), None)


def cannot_serve(impl: str, T: int, S: int, H: int, q_slots=None) -> str | None:
    """Why kernel `impl` cannot run T queries over S keys of head dim H (None: it can), as the
    end of "falls back to the XLA path for ..."."""
    if q_slots is not None:
        return "queries at a KV-cache offset (generation)"
    if T != S:
        return f"{T} queries over {S} keys (the kernels run self-attention over whole rows)"
    if impl == "splash" and splash_block(T) is None:
        return f"sequence length {T}: not a multiple of {SPLASH_BLOCKS[-1]} (the kernel's smallest block)"
    if impl == "gpu_flash" and T % GPU_BLOCK_Q:
        return f"sequence length {T}: not a multiple of {GPU_BLOCK_Q} (the kernel's block)"
    if impl == "gpu_flash" and not 16 <= H <= GPU_MAX_HEAD_DIM:
        return f"head dim {H}: outside the kernel's 16..{GPU_MAX_HEAD_DIM}"
    return None


def splash_attention(q, k, v, q_segment, kv_segment, interpret: bool = False):
    """Pallas splash attention (TPU): causal + segment ids, GQA, per device (no mesh axes).
    Mosaic refuses bf16 inputs under `jax_default_matmul_precision='highest'` ("Bad lhs
    type"): train at the default precision (as every config here does)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    B, T, N, H = q.shape
    S = k.shape[1]
    b = splash_block(T)
    blocks = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                           block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = sa.MultiHeadMask([sa.CausalMask((T, S))] * N)
    kernel = sa.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
    q = (q * jnp.asarray(H ** -0.5, q.dtype)).swapaxes(1, 2)  # [B,N,T,H]: the kernel does not scale
    segs = sa.SegmentIds(q=q_segment.astype(jnp.int32), kv=kv_segment.astype(jnp.int32))
    out = jax.vmap(kernel)(q, k.swapaxes(1, 2), v.swapaxes(1, 2), segs)  # per row
    return out.swapaxes(1, 2)


def gpu_flash_attention(q, k, v, q_segment, kv_segment, interpret: bool = False):
    """Pallas flash attention (GPU, Triton): causal + segment ids, per device. GQA by repeating
    k/v to the query heads; `mha` takes one segment row for queries and keys alike (T == S)."""
    from jax.experimental.pallas.ops.gpu import attention as ga
    del kv_segment  # the same row as q_segment (self-attention, checked by `cannot_serve`)
    B, T, N, H = q.shape
    G = N // k.shape[2]
    if G > 1:
        k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    blocks = ga.BlockSizes(block_q=GPU_BLOCK_Q, block_k=GPU_BLOCK_K, block_q_dkv=GPU_BLOCK_BWD,
                           block_kv_dkv=GPU_BLOCK_BWD, block_q_dq=GPU_BLOCK_BWD, block_kv_dq=GPU_BLOCK_BWD)
    return ga.mha(q, k, v, q_segment.astype(jnp.int32), sm_scale=H ** -0.5, causal=True, block_sizes=blocks,
                  interpret=interpret)


KERNELS = {"splash": splash_attention, "gpu_flash": gpu_flash_attention}


def per_device(kernel, q, k, v, q_segment, kv_segment):
    """`kernel` (a function of one device's arrays) run per device (`distributed.per_device`),
    with batch and heads split as the logical rules split `batch` and `heads` (lengths and head
    dim whole). GQA: k/v are split like the query heads, so that each device holds the kv heads
    of its query heads. When that split does not divide K, each kv head is repeated r times
    first (query head n still reads kv head n // (N/K)); when even that cannot work the heads
    stay whole."""
    N, K = q.shape[2], k.shape[2]
    heads = "heads"
    split = per_device_lib.split_size("heads", N)
    if K % split:
        r = split // math.gcd(K, split)
        if N % (K * r):
            heads = None  # no whole kv head per device: leave the heads whole
        else:
            k, v = jnp.repeat(k, r, axis=2), jnp.repeat(v, r, axis=2)
    qa, sa = ("batch", None, heads, None), ("batch", None)
    return per_device_lib.run(kernel, (q, k, v, q_segment, kv_segment), (qa, qa, qa, sa, sa), qa, num_diff=3)


def fused_attention(impl: str, q, k, v, q_segment, kv_segment):
    """Kernel `impl` ('splash' | 'gpu_flash') on the mesh being traced under; on CPU in Pallas
    interpret mode (one log line)."""
    platform = sharding.mesh_platform()
    check_platform(impl, platform)
    interpret = platform == "cpu"
    if interpret:
        note_once(f"attention {impl!r} on CPU runs in Pallas interpret mode (slow: a reference check, "
                  "not a speed path)", logging.INFO)

    def kernel(q, k, v, qs, ks):
        return KERNELS[impl](q, k, v, qs, ks, interpret=interpret)
    return per_device(kernel, q, k, v, q_segment, kv_segment)
