"""CPU train-step benchmark: our jitted step against transformers + torch AdamW; prints JSON.

In one process and one run, for configs S and M (issue 9):
  * the measured fp32 GEMM peak of this CPU (best of jnp / numpy / torch square matmuls),
  * tokens/s of our train step (`make_train_step`, state donated) in fp32 and bf16 compute,
  * tokens/s of `transformers.LlamaForCausalLM` + `torch.optim.AdamW` doing the same work
    (forward, token-weighted cross-entropy, backward, global-norm clip, AdamW), eager and under
    `torch.compile` (a failure is caught and reported, not fatal),
  * MFU of each against that measured peak, with FLOPs from `meditron_jax.training.metrics.flops_per_token`:
    `mfu_vs_gemm_peak` against the best GEMM rate seen in the whole run, `mfu_vs_gemm_same_rounds`
    against the median GEMM rate measured inside the same timing rounds (same machine load).
Each step time is the median of `--steps` timed steps after `--warmup` untimed ones; the variants
of a config are built first and then timed in interleaved rounds (one step of each per round), so
a change in the load of a shared machine hits all of them alike.

Fairness: both frameworks get every core of the machine (XLA's CPU thread pool uses all cores;
torch is set to `os.cpu_count()` intra-op threads), run one after the other, never together.
Both also run under the same host-malloc policy (`meditron_jax.training.hostmem.keep_freed_memory`, which
the CLI applies whenever JAX runs on the CPU; `--default-malloc` for glibc's defaults): it is process-wide.
The machine's 1-minute load average is recorded before and after each measurement so numbers
taken on a busy, shared machine can be judged.

Usage: python bench/train_step_cpu.py [--configs S,M] [--steps 5] [--warmup 2]
           [--variants jax_fp32,jax_bf16,torch_eager,torch_compile] [--loss-chunk 32] [--remat none]
Extra variants for the speed work: jax_fp32_nochunk (the reference loss: full fp32 logits).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

CONFIGS = {  # issue 9's two configs
    "S": dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8, seq=512, batch=8),
    "M": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=4, num_heads=16, seq=512, batch=4),
}
# XLA:CPU's YNNPACK dot fusion: measured ~1.5-2x faster GEMMs and train step on this AVX2 CPU
# than XLA's default dot emitter (docs/benchmarks.md).
CPU_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=dot"
ALL_VARIANTS = ("jax_fp32", "jax_bf16", "torch_eager", "torch_compile")


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--", "../meditron_jax", "."],
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def interleaved(steps: dict, n_warm: int, n_steps: int) -> dict:
    """steps: {name: fn} where fn() runs one synchronous step. Warm each up, then time them in
    rounds (one step of each per round), so a change in the machine's load hits every variant
    alike. Returns {name: stats} with wall and process-CPU seconds per step."""
    for fn in steps.values():
        for _ in range(n_warm):
            fn()
    wall = {k: [] for k in steps}
    cpu = {k: [] for k in steps}
    loads = []
    for _ in range(n_steps):
        loads.append(load1())
        for k, fn in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    loads.append(load1())
    return {k: {"median_s": statistics.median(wall[k]), "min_s": min(wall[k]),
                "times_s": [round(t, 4) for t in wall[k]],
                "cpu_s_per_step": round(statistics.median(cpu[k]), 3),
                "load1_during": [min(loads), max(loads)]} for k in steps}


# ---------------------------------------------------------------------------------------------
# GEMM peak

def gemm_peak(n: int = 2048, reps: int = 8) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    flops = 2.0 * n ** 3
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = {}

    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(jnp.matmul)
    mm(ja, jb).block_until_ready()
    out["jax"] = flops / min(_best(lambda: mm(ja, jb).block_until_ready(), reps))
    out["numpy"] = flops / min(_best(lambda: a @ b, reps))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    out["torch"] = flops / min(_best(lambda: ta @ tb, reps))
    return {"n": n, "flops_per_s": {k: round(v / 1e9, 2) for k, v in out.items()}, "unit": "GFLOP/s",
            "peak_flops": max(out.values()), "load1": load1()}


def gemm_probe(n: int = 2048):
    """Returns (probe, rates): probe() measures the GEMM rate once (best of numpy and jnp, 2 tries
    each) and appends it to `rates` (FLOP/s). Timed inside every round of `interleaved`, so the
    peak is also known under the same load as the steps it is compared with."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(1)
    a = rng.standard_normal((n, n), dtype=np.float32)
    ja = jnp.asarray(a)
    mm = jax.jit(jnp.matmul)
    mm(ja, ja).block_until_ready()
    rates = []

    def probe():
        t = min(_best(lambda: a @ a, 2) + _best(lambda: mm(ja, ja).block_until_ready(), 2))
        rates.append(2.0 * n ** 3 / t)

    return probe, rates


def _best(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


# ---------------------------------------------------------------------------------------------
# batches

def make_batch(spec: dict, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    B, T = spec["batch"], spec["seq"]
    toks = rng.integers(0, spec["vocab_size"], (B, T + 1)).astype(np.int32)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": np.ones((B, T), np.float32),
            "segment_ids": np.ones((B, T), np.int32),
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()}


def llama_config(spec: dict, **kw):
    from meditron_jax.models.config import LlamaConfig
    arch = {k: v for k, v in spec.items() if k not in ("seq", "batch")}
    return LlamaConfig(num_kv_heads=spec["num_heads"], max_position_embeddings=spec["seq"], **arch, **kw)


OPT = dict(lr=3e-4, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1, clip=1.0)


# ---------------------------------------------------------------------------------------------
# ours

def build_jax(spec: dict, dtype: str, loss_chunk: int | None, remat: str):
    """Returns (step, info): step() runs one jitted train step (state donated) and waits for it."""
    import jax
    import jax.numpy as jnp

    from meditron_jax.models.llama import init_model, params_dict
    from meditron_jax.training.optimizer import OptimizerConfig, make_optimizer, schedule
    from meditron_jax.training.step import init_state, make_train_step

    cfg = llama_config(spec, dtype=dtype, remat=remat)
    oc = OptimizerConfig(lr=OPT["lr"], warmup_steps=10, weight_decay=OPT["weight_decay"], b1=OPT["b1"],
                         b2=OPT["b2"], eps=OPT["eps"], clip=OPT["clip"])
    tx = make_optimizer(oc, 1000)
    step_fn = jax.jit(make_train_step(cfg, tx, schedule(oc, 1000), loss_chunk=loss_chunk), donate_argnums=0)
    state = init_state(params_dict(init_model(cfg, seed=0)), tx)
    batch = {k: jnp.asarray(v) for k, v in make_batch(spec).items()}
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    info = {"compile_s": round(time.perf_counter() - t0, 2), "dtype": dtype, "loss_chunk": loss_chunk,
            "remat": remat, "losses": []}
    holder = {"state": state}

    def step():
        holder["state"], m = compiled(holder["state"], batch)
        info["losses"].append(float(m["loss"]))  # blocks until the step (and its update) is done

    return step, info


# ---------------------------------------------------------------------------------------------
# transformers + torch

def build_torch(spec: dict, compile_: bool):
    """Returns (step, info); the first step (which pays torch.compile's compilation) is run here."""
    import torch
    import transformers

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=spec["vocab_size"], hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"], num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"], num_key_value_heads=spec["num_heads"],
        max_position_embeddings=spec["seq"], rms_norm_eps=1e-5, tie_word_embeddings=False,
        attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf_cfg).float().train()
    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if "norm" in n]
    groups = [{"params": decay, "weight_decay": OPT["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=OPT["lr"], betas=(OPT["b1"], OPT["b2"]), eps=OPT["eps"])
    try:
        opt, opt_kind = torch.optim.AdamW(groups, fused=True, **kw), "fused"
    except (RuntimeError, TypeError):
        opt, opt_kind = torch.optim.AdamW(groups, foreach=True, **kw), "foreach"
    b = make_batch(spec)
    inputs = torch.tensor(b["inputs"], dtype=torch.long)
    targets = torch.tensor(b["targets"], dtype=torch.long).reshape(-1)
    mask = torch.tensor(b["loss_mask"]).reshape(-1)

    def loss_fn(inputs, targets, mask):
        logits = model(inputs).logits
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets,
                                               reduction="none")
        return (ce * mask).sum() / mask.sum()

    fn = torch.compile(loss_fn) if compile_ else loss_fn
    info = {"optimizer": opt_kind, "threads": torch.get_num_threads(), "attn": "sdpa", "losses": []}

    def step():
        loss = fn(inputs, targets, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPT["clip"], foreach=True)
        opt.step()
        info["losses"].append(float(loss))

    t0 = time.perf_counter()
    step()
    info["first_step_s"] = round(time.perf_counter() - t0, 2)
    return step, info


# ---------------------------------------------------------------------------------------------

BUILDERS = {
    "jax_fp32": lambda spec, a: build_jax(spec, "float32", a.loss_chunk or None, a.remat),
    "jax_bf16": lambda spec, a: build_jax(spec, "bfloat16", a.loss_chunk or None, a.remat),
    "jax_fp32_nochunk": lambda spec, a: build_jax(spec, "float32", None, a.remat),
    "jax_bf16_nochunk": lambda spec, a: build_jax(spec, "bfloat16", None, a.remat),
    "torch_eager": lambda spec, a: build_torch(spec, False),
    "torch_compile": lambda spec, a: build_torch(spec, True),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="S,M")
    ap.add_argument("--variants", default=",".join(ALL_VARIANTS), help=f"some of {sorted(BUILDERS)}")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--loss-chunk", type=int, default=32,
                    help="our cross-entropy chunk (0: full logits); 32 measured fastest on CPU at V 32000")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--no-gemm", action="store_true")
    ap.add_argument("--xla-flags", default=CPU_XLA_FLAGS,
                    help="XLA_FLAGS for this process (set before JAX starts); '' for XLA's defaults")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc malloc's defaults (on the CPU backend the CLI and trainer apply "
                         "meditron_jax.training.hostmem)")
    args = ap.parse_args(argv)
    from meditron_jax.training.hostmem import keep_freed_memory
    if not args.default_malloc:  # process-wide: torch gets the same malloc policy as JAX
        keep_freed_memory()
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()

    import jax
    import torch

    from meditron_jax.training.metrics import flops_per_token

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    report = {"machine": {"cpu": _cpu_name(), "cores": threads, "python": platform.python_version(),
                          "jax": jax.__version__, "torch": torch.__version__,
                          "transformers": __import__("transformers").__version__,
                          "xla_flags": os.environ.get("XLA_FLAGS", ""),
                          "malloc": "glibc defaults" if args.default_malloc else "hostmem.keep_freed_memory"},
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit(),
              "command": "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
              "steps": args.steps, "warmup": args.warmup, "load1_start": load1()}
    peak = None
    if not args.no_gemm:
        report["gemm"] = gemm_peak()
        peak = report["gemm"]["peak_flops"]
        _log(f"GEMM peak {peak / 1e9:.1f} GFLOP/s {report['gemm']['flops_per_s']}")
    results = {}
    for name in args.configs.split(","):
        spec = CONFIGS[name]
        fpt = flops_per_token(llama_config(spec), spec["seq"])
        tokens = spec["batch"] * spec["seq"]
        runs, steps = {}, {}
        for v in args.variants.split(","):
            try:
                steps[v], runs[v] = BUILDERS[v](spec, args)
                _log(f"{name} {v}: built")
            except Exception as e:  # a failing variant (typically torch.compile) is reported, not fatal
                runs[v] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"}
                _log(f"{name} {v}: {runs[v]['error']}")
        probe, rates = gemm_probe()
        timings = interleaved(dict(steps, _gemm=probe), args.warmup, args.steps)
        timings.pop("_gemm")
        same_load = statistics.median(rates[args.warmup:]) if peak else None
        if peak:  # the peak is the best GEMM rate seen in this run (start or any round)
            peak = max(peak, max(rates))
            report["gemm"]["peak_flops"] = peak
        for v, stats in timings.items():
            r = runs[v]
            r.update(stats)
            r["tokens_per_s"] = round(tokens / r["median_s"], 1)
            if peak:
                r["mfu_vs_gemm_peak"] = round(r["tokens_per_s"] * fpt / peak, 4)
                r["mfu_vs_gemm_same_rounds"] = round(r["tokens_per_s"] * fpt / same_load, 4)
            losses = r.pop("losses")
            r["first_loss"], r["last_loss"] = round(losses[0], 4), round(losses[-1], 4)
            _log(f"{name} {v}: {r['tokens_per_s']} tok/s, mfu {r.get('mfu_vs_gemm_peak')}, load {r['load1_during']}")
        del steps
        ratios = {}
        for ours in [k for k in runs if k.startswith("jax") and "tokens_per_s" in runs[k]]:
            for ref in ("torch_eager", "torch_compile"):
                if "tokens_per_s" in runs.get(ref, {}):
                    ratios[f"{ours}/{ref}"] = round(runs[ours]["tokens_per_s"] / runs[ref]["tokens_per_s"], 3)
        results[name] = {"spec": spec, "tokens_per_step": tokens, "model_flops_per_token": fpt,
                         "gemm_gflops_per_round": [round(x / 1e9, 1) for x in rates],
                         "runs": runs, "speedup": ratios}
    report["configs"] = results
    report["load1_end"] = load1()
    print(json.dumps(report, indent=1))
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
