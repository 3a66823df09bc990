"""Attention forward + backward at the Meditron shapes, one device: the XLA path ('xla': causal
query blocks), the XLA online-softmax path ('blocked') and the fused kernel ('auto': Pallas
splash on TPU, Pallas flash (Triton) on GPU; also 'cudnn' on GPU, dense segment mask). Prints
one JSON object.

Shapes are one device's share under each recipe (issue 30):
  7b:  micro-batch 10 rows x T 2048, 32 heads / tensor 4 = 8 query heads, 8 kv heads, head dim 128
  70b: pipeline micro-batch 2 rows x T 4096, 64 heads / tensor 8 = 8 query heads, 1 kv head, 128
Rows are packed with documents of random lengths (segment ids) and a padded tail. Each time is
the median of --steps timed calls of the jitted value-and-grad after --warmup untimed ones.
FLOPs counted: the causal forward, 2 x B x N x T^2 x H (QK^T and PV over the lower triangle),
x 3.5 for forward + backward (the backward's matmuls are 2.5 x the forward's; work a kernel
repeats, such as a recomputed forward, is not counted).

Usage (repository root, on the accelerator):  python bench/attention_kernels.py [--shapes 7b,70b]
    [--impls xla,blocked,auto,cudnn] [--steps 10] [--warmup 3] [--tiny]
--tiny: a CPU dry run of the script itself (small shapes; 'auto' is the XLA path on CPU, so
the default list adds both kernels by name, in Pallas interpret mode; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np

SHAPES = {"7b": dict(B=10, T=2048, N=8, K=8, H=128), "70b": dict(B=2, T=4096, N=8, K=1, H=128)}
TINY = {"7b": dict(B=1, T=256, N=2, K=2, H=32), "70b": dict(B=1, T=256, N=2, K=1, H=32)}


def segments(B, T, rng):
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        end = T - int(rng.integers(0, T // 16))
        cuts = np.sort(rng.choice(np.arange(1, end), size=int(rng.integers(2, 7)), replace=False))
        seg[b, :end] = 1 + np.searchsorted(cuts, np.arange(end), side="right")
    return seg


def bench_one(impl, shape, steps, warmup, dtype):
    import jax
    import jax.numpy as jnp
    from meditron_jax.models import attention
    B, T, N, K, H = (shape[k] for k in "BTNKH")
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, H)), dtype) for n in (N, K, K))
    seg = jnp.asarray(segments(B, T, rng))
    resolved = attention.resolve(impl, T, T, H)

    def loss(q, k, v):
        return jnp.sum(attention.attend(q, k, v, seg, seg, impl=impl).astype(jnp.float32) ** 2)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    t0 = time.perf_counter()
    compiled = fn.lower(q, k, v).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    flops = 3.5 * 4 * B * N * T * T * H / 2  # causal: half the score matrix
    return {"impl": impl, "runs": resolved, "compile_s": round(compile_s, 2), "fwd_bwd_ms": round(dt * 1e3, 3),
            "tflops_per_s": round(flops / dt / 1e12, 2),
            "temp_mib": round(getattr(mem, "temp_size_in_bytes", 0) / 2 ** 20, 1) if mem is not None else None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="7b,70b")
    ap.add_argument("--impls", default=None, help="default: xla,blocked,auto (+ cudnn on GPU)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp
    dev = jax.devices()[0]
    impls = args.impls.split(",") if args.impls else ["xla", "blocked", "auto"] + (
        ["cudnn"] if dev.platform == "gpu" else ["splash", "gpu_flash"] if dev.platform == "cpu" else [])
    table = TINY if args.tiny else SHAPES
    results = []
    for name in args.shapes.split(","):
        for impl in impls:
            try:
                r = bench_one(impl, table[name], args.steps, args.warmup, jnp.bfloat16)
            except Exception as e:  # e.g. out of memory: report it and go on
                r = {"impl": impl, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
            r = {"shape": name, **table[name], **r}
            print("[attention_kernels]", json.dumps(r), file=sys.stderr, flush=True)
            results.append(r)
            jax.clear_caches()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({"bench": "attention_kernels", "device": dev.device_kind, "platform": dev.platform,
                      "jax": jax.__version__, "commit": commit or "unknown", "tiny_dry_run": args.tiny,
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dtype": "bfloat16",
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
