#!/usr/bin/env bash
# One-GPU benchmarks. First the train step (issue 9): a Llama-2-7B-width model (hidden 4096, 32
# heads, MLP 11008, vocab 32000) with as many layers as fit beside full fp32 AdamW state (params
# + 2 moments + gradients = 16 bytes/parameter), bf16 compute, seq 2048 and 4096, for each
# attention in $ATTENTIONS (issue 30: 'auto' = the Pallas flash kernel on a GPU, 'xla' = the
# XLA path it replaces as the default). For each seq, attention and remat policy in $POLICIES
# it picks the depth from XLA's own memory
# analysis of the compiled step (ahead of time, abstract inputs; shrinks and recompiles if the
# estimate was too deep), then times $STEPS steps after $WARMUP and prints one JSON object:
# tokens/s/GPU and MFU (FLOPs from meditron_jax.training.metrics.flops_per_token, peak from its
# table). Then the attention kernel benchmark (bench/attention_kernels.py: forward + backward at
# the 7B and 70B per-device shapes, xla vs blocked vs the kernel vs cudnn), its own JSON object.
#
# Usage (repository root, on the GPU machine):  bash bench/gpu.sh
# Knobs (env): SEQS="2048 4096" TOKENS=16384 (tokens per step) POLICIES="full save_proj" ATTENTIONS="auto xla"
#   STEPS=8 WARMUP=2 LOSS_CHUNK=512 MAX_LAYERS=32 TINY=1 (a CPU dry run with a tiny width,
#   to check the script itself; its numbers mean nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${TINY:-0}" = 1 ] || source launch/gpu_env.sh
PY="${PYTHON:-$( [ -x /work/venv/bin/python ] && echo /work/venv/bin/python || echo python3)}"
export SEQS="${SEQS:-2048 4096}" TOKENS="${TOKENS:-16384}" POLICIES="${POLICIES:-full save_proj}" ATTENTIONS="${ATTENTIONS:-auto xla}"
export STEPS="${STEPS:-8}" WARMUP="${WARMUP:-2}" LOSS_CHUNK="${LOSS_CHUNK:-512}" MAX_LAYERS="${MAX_LAYERS:-32}"
export TINY="${TINY:-0}" BENCH_COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
"$PY" - <<'PY'
import json, math, os, statistics, sys, time

import jax
import jax.numpy as jnp
import numpy as np

from meditron_jax.models.config import LlamaConfig
from meditron_jax.models.llama import init_model, param_shapes, params_dict
from meditron_jax.training.metrics import device_peak_flops, flops_per_token
from meditron_jax.training.optimizer import OptimizerConfig, make_optimizer, schedule
from meditron_jax.training.step import BATCH_KEYS, init_state, make_train_step

E = os.environ
TINY = E["TINY"] == "1"
dev = jax.devices()[0]
if TINY:
    base = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_heads=4, num_kv_heads=4,
                       dtype="bfloat16")
    limit = 2 << 30
else:
    base = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_heads=32,
                       num_kv_heads=32, dtype="bfloat16")
    limit = (dev.memory_stats() or {}).get("bytes_limit") or int(float(E.get("MEM_BYTES", 75e9)))
peak = device_peak_flops(dev)
oc = OptimizerConfig(lr=3e-4, warmup_steps=10)
tx = make_optimizer(oc, 1000)
log = lambda *a: print("[gpu.sh]", *a, file=sys.stderr, flush=True)


def layer_params(cfg):
    s = param_shapes(cfg.replace(num_layers=1))
    return sum(math.prod(v) for k, v in s.items() if k not in ("embed_tokens", "lm_head", "norm"))


def compile_for(cfg, B, T):
    params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in param_shapes(cfg).items()}
    state = jax.eval_shape(lambda p: init_state(p, tx), params)
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.float32 if k == "loss_mask" else jnp.int32) for k in BATCH_KEYS}
    chunk = int(E["LOSS_CHUNK"]) if int(E["LOSS_CHUNK"]) < T else None
    fn = jax.jit(make_train_step(cfg, tx, schedule(oc, 1000), loss_chunk=chunk), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    m = compiled.memory_analysis()
    need = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    return compiled, int(need), time.perf_counter() - t0


def fit(cfg, B, T, policy):
    """Deepest model (<= MAX_LAYERS) whose compiled step fits in `limit` bytes."""
    per_layer = 16 * layer_params(cfg)  # fp32 params, grads, Adam m and v
    act = B * T * cfg.hidden_size * 2 * (1 if policy == "full" else 1 + (4 * cfg.hidden_size + 3 * cfg.intermediate_size) / cfg.hidden_size)
    fixed = 16 * 2 * cfg.padded_vocab_size * cfg.hidden_size
    L = max(1, min(int(E["MAX_LAYERS"]), int((0.85 * limit - fixed) / (per_layer + act))))
    for _ in range(6):
        c = cfg.replace(num_layers=L, remat=policy)
        compiled, need, cs = compile_for(c, B, T)
        log(f"seq {T} remat {policy}: {L} layers need {need / 2**30:.1f} GiB of {limit / 2**30:.1f} (compile {cs:.0f}s)")
        if need <= 0.97 * limit or L == 1:
            return c, compiled, need, cs
        L = max(1, L - max(1, math.ceil((need - 0.97 * limit) / per_layer)))
    raise RuntimeError("no depth fits")


def run(cfg, compiled, B, T):
    state = init_state(params_dict(init_model(cfg, seed=0)), tx)
    rng = np.random.default_rng(0)
    toks = rng.integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": np.ones((B, T), np.float32),
             "segment_ids": np.ones((B, T), np.int32), "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    times, losses = [], []
    for i in range(int(E["WARMUP"]) + int(E["STEPS"])):
        t0 = time.perf_counter()
        state, m = compiled(state, batch)
        losses.append(float(m["loss"]))  # waits for the step
        if i >= int(E["WARMUP"]):
            times.append(time.perf_counter() - t0)
    del state
    return statistics.median(times), losses


results = []
for T, policy, attn in [(int(s), p, a) for s in E["SEQS"].split() for p in E["POLICIES"].split()
                        for a in E["ATTENTIONS"].split()]:
    B = max(1, int(E["TOKENS"]) // T)
    try:
        cfg, compiled, need, cs = fit(base.replace(max_position_embeddings=T, attention=attn), B, T, policy)
        dt, losses = run(cfg, compiled, B, T)
        tps = B * T / dt
        r = {"seq": T, "batch": B, "remat": policy, "attention": attn, "num_layers": cfg.num_layers,
             "params": cfg.num_params(), "mem_need_gib": round(need / 2**30, 2), "compile_s": round(cs, 1),
             "step_s": round(dt, 4), "tokens_per_s_per_gpu": round(tps, 1),
             "mfu": round(tps * flops_per_token(cfg, T) / peak, 4) if peak else None,
             "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)]}
    except Exception as e:  # e.g. out of memory: report and go on with the next point
        r = {"seq": T, "batch": B, "remat": policy, "attention": attn, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
    log(json.dumps(r))
    results.append(r)
    jax.clear_caches()

best = {}  # per (seq, attention): the remat policy with the best MFU
for r in results:
    key = f"{r['seq']} {r['attention']}"
    if r.get("mfu") is not None and r["mfu"] > best.get(key, {}).get("mfu", -1):
        best[key] = r
print(json.dumps({"bench": "gpu_train_step", "device": dev.device_kind, "peak_bf16_flops": peak,
                  "mem_limit_gib": round(limit / 2**30, 1), "jax": jax.__version__, "commit": E["BENCH_COMMIT"],
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tiny_dry_run": TINY,
                  "xla_flags": E.get("XLA_FLAGS", ""), "loss_chunk": int(E["LOSS_CHUNK"]),
                  "results": results, "best_by_seq_and_attention": {k: {"remat": v["remat"], "attention": v["attention"],
                  "num_layers": v["num_layers"],
                  "tokens_per_s_per_gpu": v["tokens_per_s_per_gpu"], "mfu": v["mfu"]} for k, v in best.items()}}, indent=1))
PY
"$PY" bench/attention_kernels.py $( [ "$TINY" = 1 ] && echo "--tiny --steps 2 --warmup 1" )
