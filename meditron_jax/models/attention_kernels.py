"""Fused attention kernels for accelerators: Pallas splash attention on TPU (a Mosaic custom
call) and Pallas flash attention on GPU (a Triton custom call), both causal and segment-aware
without ever building a [B, *, T, S] mask, and how they are sharded.

Owns: which kernel `model.attention='auto'` means on a platform (`platform_kernel`), which
shapes a kernel serves (`cannot_serve`), the kernels' calls (`splash_attention`,
`gpu_flash_attention`) and running one per device under `shard_map` over the batch and head
axes that the logical rules split (`per_device`). Does not own: the switch, the XLA paths and
the fallback to them (`attention.py`), the logical rules (`distributed/sharding.py`).

Why these two (measured on the target compilers from this CPU host, docs/benchmarks.md,
"Attention kernels (issue 30)"):
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
from jax.sharding import PartitionSpec as P

from meditron_jax.distributed import sharding
from meditron_jax.distributed.host_batch import manual_axes_here

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
    """Pallas splash attention (TPU): causal + segment ids, GQA, per device (no mesh axes)."""
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


def _entry(spec: P, i: int):
    return tuple(spec)[i] if i < len(spec) else None


def _names(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def per_device(kernel, q, k, v, q_segment, kv_segment):
    """Run `kernel` (a function of per-device arrays) under `shard_map`, manual over every mesh
    axis not already manual here, with batch and heads split as the logical rules split
    `batch` and `heads` (lengths and head dim whole). A Pallas call cannot be partitioned by
    XLA, so it must run where every axis is manual: at the top of the step, inside the step's
    data-manual shard_map and inside the pipeline's stage/data/fsdp-manual one alike.

    GQA: k/v are split over the same axes as the query heads, so that each device holds the
    kv heads of its query heads. When the head split does not divide K, each kv head is
    repeated r times first (query head n still reads kv head n // (N/K)); when even that
    cannot work the heads stay whole."""
    ctx = sharding.active()
    if ctx is None:
        return kernel(q, k, v, q_segment, kv_segment)
    manual = manual_axes_here()
    mesh = jax.sharding.get_abstract_mesh() if manual else ctx.mesh
    free = tuple(a for a in mesh.axis_names if a not in manual)
    if not free:
        return kernel(q, k, v, q_segment, kv_segment)
    rules = sharding.without_axes(ctx.rules, manual)
    N, K = q.shape[2], k.shape[2]
    spec = sharding.fit_spec(sharding.logical_to_spec(("batch", None, "heads", None), rules), q.shape, mesh)
    batch, heads = _entry(spec, 0), _entry(spec, 2)
    split = math.prod(mesh.shape[a] for a in _names(heads))
    if K % split:
        r = split // math.gcd(K, split)
        if N % (K * r):
            heads = None  # no whole kv head per device: leave the heads whole
        else:
            k, v = jnp.repeat(k, r, axis=2), jnp.repeat(v, r, axis=2)
    return manual_call(kernel, mesh, free, P(batch, None, heads, None), P(batch, None), q, k, v, q_segment,
                       kv_segment)


def _varying(*xs) -> tuple[str, ...]:
    """The manual mesh axes the values vary over, as the enclosing shard_map types them."""
    axes: set[str] = set()
    for x in xs:
        axes |= set(getattr(getattr(jax.typeof(x), "manual_axis_type", None), "varying", ()) or ())
    return tuple(sorted(axes))


def manual_call(kernel, mesh, free, qspec: P, sspec: P, q, k, v, q_segment, kv_segment):
    """`kernel(q, k, v, q_segment, kv_segment)` under `shard_map` manual over `free`, with its own
    VJP (the kernel's, run per device).

    The Pallas kernels declare their outputs without the manual axes they vary over, so their
    shard_map must be `check_vma=False`. Nested inside a shard_map that types values by those
    axes (the pipeline's, `check_vma=True`), JAX 0.10.2 cannot differentiate through that: the
    inner body's inputs keep the outer axes in their type and the kernels' outputs and
    gradients do not ("Expected cotangent type ...{V:stage}"). So: the kernel is
    differentiated inside the shard_map on inputs stripped of those types (`untyped`: x * 1,
    which a check_vma=False body types as varying over nothing; XLA drops the multiply), its
    residuals leave as one slot per device, and what leaves is re-typed as varying over the
    outer axes (`pcast`, no op on values). Outside such a shard_map nothing is re-typed."""
    vary = set(_varying(q, k, v, q_segment, kv_segment))
    ins, per_dev = (qspec, qspec, qspec, sspec, sspec), P(free)

    def sm(fn, in_specs, out_specs):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=set(free),
                             check_vma=False)

    def untyped(*xs):
        return [x * jnp.ones((), x.dtype) for x in xs]

    def retype(x):
        missing = tuple(sorted(vary - set(_varying(x))))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    tree = {}

    def forward(q, k, v, qs, ks):
        q, k, v, qs, ks = untyped(q, k, v, qs, ks)
        out, pullback = jax.vjp(lambda q, k, v: kernel(q, k, v, qs, ks), q, k, v)
        leaves, tree["def"] = jax.tree.flatten(pullback)
        return out, [a[None] for a in leaves]

    def backward(ct, leaves):
        return jax.tree.unflatten(tree["def"], [a[0] for a in leaves])(*untyped(ct))

    @jax.custom_vjp
    def attention(q, k, v, qs, ks):
        return retype(sm(lambda *a: kernel(*untyped(*a)), ins, qspec)(q, k, v, qs, ks))

    def attention_fwd(q, k, v, qs, ks):
        out, residuals = sm(forward, ins, (qspec, per_dev))(q, k, v, qs, ks)
        return retype(out), residuals

    def attention_bwd(residuals, ct):
        grads = sm(backward, (qspec, per_dev), (qspec, qspec, qspec))(ct, residuals)
        return (*map(retype, grads), None, None)

    attention.defvjp(attention_fwd, attention_bwd)
    return attention(q, k, v, q_segment, kv_segment)


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
