"""The two hand-written pieces of the CPU train step against their plain references; prints JSON.

1. Cross-entropy (forward + backward w.r.t. lm_head and the hidden states): the reference path
   (`training.step.cross_entropy_sum` with `chunk=None`: full [B, T, V] fp32 logits, autodiff)
   against the fused chunked loss (`fused_cross_entropy_sum`: `chunk` positions at a time in a
   `lax.scan`, d loss / d logits formed in the same pass) at several chunk sizes.
2. Attention of one layer (forward + backward w.r.t. q, k, v, packed documents): dense XLA
   attention with a [B, 1, T, S] mask (`models.attention.dpa_attention(..., 'xla')`), the causal
   query blocks `models.attention.xla_attention` uses from T >= 256, and the flash-style
   `blocked_attention` (`model.attention='blocked'`).

Shapes default to bench/train_step_cpu.py's config S (B 8, T 512, D 512, V 32000, 8 heads of 64).
Every variant is compiled first, then timed in interleaved rounds (one call of each per round),
so load changes hit all of them alike; the medians and the ratios to the reference are printed.

Usage: python bench/loss_attention_cpu.py [--rounds 5] [--chunks 8,16,32,64,128,256]
           [--batch 8] [--seq 512] [--hidden 512] [--vocab 32000] [--heads 8]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time


def build(args):
    import jax
    import jax.numpy as jnp

    from meditron_jax.models import attention
    from meditron_jax.models.config import LlamaConfig
    from meditron_jax.training.step import cross_entropy_sum

    B, T, D, V, N = args.batch, args.seq, args.hidden, args.vocab, args.heads
    H = D // N
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=4 * D, num_layers=1, num_heads=N,
                      num_kv_heads=N, max_position_embeddings=T, dtype="float32")
    key = jax.random.PRNGKey(0)
    k1, k2, k3, k4, k5, k6 = jax.random.split(key, 6)
    lm_head = jax.random.normal(k1, (D, cfg.padded_vocab_size), jnp.float32) * 0.02
    h = jax.random.normal(k2, (B, T, D), jnp.float32)
    targets = jax.random.randint(k3, (B, T), 0, V)
    mask = jnp.ones((B, T), jnp.float32)

    def ce(chunk):
        def f(w, x):
            return cross_entropy_sum(cfg, w, x, targets, mask, chunk=chunk)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

    q = jax.random.normal(k4, (B, T, N, H), jnp.float32)
    k = jax.random.normal(k5, (B, T, N, H), jnp.float32)
    v = jax.random.normal(k6, (B, T, N, H), jnp.float32)
    seg = jnp.asarray((jnp.arange(T) >= T // 3).astype(jnp.int32) + (jnp.arange(T) >= 2 * T // 3) + 1)
    seg = jnp.broadcast_to(seg, (B, T))  # three packed documents per row

    def att(fn):
        def f(q, k, v):
            return jnp.sum(fn(q, k, v, seg, seg) ** 2)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    variants = {"ce_reference": (ce(None), (lm_head, h))}
    for c in args.chunks:
        variants[f"ce_fused_chunk_{c}"] = (ce(c), (lm_head, h))
    variants["attention_dense_mask"] = (att(lambda *a: attention.dpa_attention(*a, "xla")), (q, k, v))
    variants["attention_causal_query_blocks"] = (att(attention.xla_attention), (q, k, v))
    variants["attention_blocked"] = (att(attention.blocked_attention), (q, k, v))
    return variants


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--chunks", default="8,16,32,64,128,256")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=8)
    args = p.parse_args()
    args.chunks = [int(c) for c in args.chunks.split(",") if c]

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    variants = build(args)
    compile_s = {}
    for name, (fn, inputs) in variants.items():  # compile + one warm-up call each
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        compile_s[name] = round(time.perf_counter() - t0, 2)
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (fn, inputs) in variants.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*inputs))
            times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    out = {
        "bench": "loss_attention_cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "load_average_1m": round(os.getloadavg()[0], 2),
        "jax": jax.__version__,
        "shapes": {"batch": args.batch, "seq": args.seq, "hidden": args.hidden, "vocab": args.vocab,
                   "heads": args.heads},
        "rounds": args.rounds,
        "median_s": {n: round(t, 4) for n, t in med.items()},
        "vs_reference": {n: round(med["ce_reference"] / t, 2) for n, t in med.items() if n.startswith("ce_")},
        "vs_dense": {n: round(med["attention_dense_mask"] / t, 2) for n, t in med.items()
                     if n.startswith("attention_")},
        "first_call_s": compile_s,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
