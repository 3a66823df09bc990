"""Compile time of the Llama-2-7B train step, ahead of time on CPU, at several depths; prints JSON.

The decoder layers run under one `lax.scan` over stacked weights, so XLA compiles one layer
body whatever the depth: compile time should be flat in `num_layers`. This lowers and compiles
`make_train_step` (AdamW + clipping, bf16 compute, remat, fused chunked loss) for the
`llama2_7b` preset with abstract inputs only (`jax.ShapeDtypeStruct`): no weights are allocated.
`--unrolled` adds the same step with a Python loop over layers (scan_layers=False) at the
smallest depth, for contrast.

Usage: python bench/compile_time.py [--layers 8,32] [--seq 2048] [--batch 1] [--remat full]
           [--loss-chunk 512] [--unrolled]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def compile_step(cfg, seq: int, batch: int, loss_chunk: int | None) -> dict:
    import jax
    import jax.numpy as jnp

    from meditron_jax.models.llama import param_shapes
    from meditron_jax.training.optimizer import OptimizerConfig, make_optimizer, schedule
    from meditron_jax.training.step import BATCH_KEYS, init_state, make_train_step

    oc = OptimizerConfig()
    tx = make_optimizer(oc, 1000)
    params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in param_shapes(cfg).items()}
    state = jax.eval_shape(lambda p: init_state(p, tx), params)
    batch_in = {k: jax.ShapeDtypeStruct((batch, seq), jnp.float32 if k == "loss_mask" else jnp.int32)
                for k in BATCH_KEYS}
    step = jax.jit(make_train_step(cfg, tx, schedule(oc, 1000), loss_chunk=loss_chunk), donate_argnums=0)
    t0 = time.perf_counter()
    lowered = step.lower(state, batch_in)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    out = {"num_layers": cfg.num_layers, "scan_layers": cfg.scan_layers, "lower_s": round(t1 - t0, 2),
           "compile_s": round(t2 - t1, 2), "total_s": round(t2 - t0, 2),
           "hlo_text_chars": len(lowered.as_text())}
    if mem is not None:
        out["temp_bytes"] = int(mem.temp_size_in_bytes)
        out["argument_bytes"] = int(mem.argument_size_in_bytes)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="8,32")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--remat", default="full")
    ap.add_argument("--loss-chunk", type=int, default=512)
    ap.add_argument("--unrolled", action="store_true")
    args = ap.parse_args(argv)

    import jax

    from meditron_jax.models.config import preset

    base = preset("llama2_7b").replace(dtype="bfloat16", remat=args.remat, max_position_embeddings=args.seq)
    depths = [int(x) for x in args.layers.split(",")]
    runs = []
    for L in depths:
        runs.append(compile_step(base.replace(num_layers=L), args.seq, args.batch, args.loss_chunk or None))
        print(f"[compile] {runs[-1]}", file=sys.stderr, flush=True)
    if args.unrolled:
        runs.append(compile_step(base.replace(num_layers=min(depths), scan_layers=False), args.seq, args.batch,
                                 args.loss_chunk or None))
        print(f"[compile] {runs[-1]}", file=sys.stderr, flush=True)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_step_cpu import _cpu_name, commit, load1

    print(json.dumps({"bench": "compile_time", "preset": "llama2_7b", "dtype": "bfloat16", "remat": args.remat,
                      "seq": args.seq, "batch": args.batch, "loss_chunk": args.loss_chunk or None,
                      "backend": jax.default_backend(), "cpu": _cpu_name(), "jax": jax.__version__,
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit(),
                      "command": "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
                      "load1": load1(), "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
