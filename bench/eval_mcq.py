"""Benchmark: k-shot exam scoring throughput (items/s), ours vs transformers, in one run.

Workload: 3-shot PubMedQA-length prompts (lengths uniform in [--min-len, --max-len] tokens,
default 1600-1800: real 3-shot PubMedQA prompts are ~1,700 tokens) made of one seed's shared
prefix (instruction + 3 demonstrations, --prefix-len tokens, default 1300) and a per-item test question, top_token scoring of the three labels
yes/no/maybe at the end of each prompt, with a small Llama (random weights; vocab 32000 like
Llama-2). All runs get the same token ids, batch size and length-sorted batches:
  ours          meditron_jax.eval.scoring.Scorer as `eval mcq` runs it: the shared prefix once into a
                KV cache, then the suffixes in batches (right padding + segment ids), jitted,
                logits only at the scored position (compile time reported separately)
  ours_plain    the same without prefix sharing (every prompt run in full); long rows take the
                blocked (flash-style) attention path automatically (attention.use_blocked)
  ours_plain_dense  the same with the automatic blocked path turned off: one dense T x S fp32
                score tensor per layer, as before the blocked path existed
  transformers  LlamaForCausalLM, left padding + attention_mask, torch.inference_mode,
                logits_to_keep=1 (its best case: lm_head only on the last column)
Also reports the largest label log-prob difference and whether predictions agree.

  python bench/eval_mcq.py [--items 64 --batch-size 8 --hidden 256 --layers 4 --threads N]
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--min-len", type=int, default=1600)
    ap.add_argument("--max-len", type=int, default=1800)
    ap.add_argument("--prefix-len", type=int, default=1300, help="shared instruction + demonstrations tokens")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--length-bucket", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import numpy as np
    import torch
    import transformers

    from meditron_jax.models.config import LlamaConfig
    from meditron_jax.convert.io import torch_to_numpy
    from meditron_jax.convert.hf import from_hf
    from meditron_jax.eval.scoring import Row, Scorer
    from meditron_jax.models.llama import model_from_params

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 8 * 8,
                      num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.heads,
                      max_position_embeddings=max(2048, args.max_len))
    torch.manual_seed(args.seed)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items()
                                         if k not in ("architectures", "model_type", "torch_dtype")})
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    ours_model = model_from_params(cfg, from_hf({k: torch_to_numpy(v) for k, v in hf.state_dict().items()}, cfg))

    rng = np.random.default_rng(args.seed)
    labels = [4874, 694, 5505]  # ▁yes ▁no ▁maybe in Llama-2's vocabulary
    prefix = [1] + rng.integers(3, args.vocab, args.prefix_len - 1).tolist()
    prompts = [prefix + rng.integers(3, args.vocab, int(n) - args.prefix_len).tolist()
               for n in rng.integers(args.min_len, args.max_len + 1, args.items)]
    rows = [Row(p, [len(p) - 1], [labels]) for p in prompts]

    # ours: a first pass compiles one program per length bucket; the second pass is timed
    scorer = Scorer(ours_model, batch_size=args.batch_size, length_bucket=args.length_bucket)
    from meditron_jax.models import attention
    timings = {}
    for name, groups in (("ours", [0] * len(rows)), ("ours_plain", None), ("ours_plain_dense", None)):
        if name == "ours_plain_dense":  # the pre-blocked behaviour: dense scores for every length
            attention.BLOCKED_MIN_KEYS = 10 ** 9
            scorer = Scorer(ours_model, batch_size=args.batch_size, length_bucket=args.length_bucket)
        t0 = time.perf_counter()
        scorer(rows, groups=groups)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = scorer(rows, groups=groups)
        timings[name] = (time.perf_counter() - t0, first, res)
    ours_s, first, ours = timings["ours"]
    plain_s, plain_first, plain = timings["ours_plain"]
    dense_s, dense_first, dense = timings["ours_plain_dense"]

    # transformers: same length-sorted batches, left padded, lm_head on the last column only
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batches = [order[s:s + args.batch_size] for s in range(0, len(order), args.batch_size)]

    def hf_pass():
        out = {}
        with torch.inference_mode():
            for idx in batches:
                L = max(len(prompts[i]) for i in idx)
                ids = torch.tensor([[0] * (L - len(prompts[i])) + prompts[i] for i in idx])
                mask = torch.tensor([[0] * (L - len(prompts[i])) + [1] * len(prompts[i]) for i in idx])
                logits = hf(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1].float()
                lp = torch.log_softmax(logits, -1)[:, labels].numpy()
                for b, i in enumerate(idx):
                    out[i] = lp[b]
        return out

    with torch.inference_mode():  # one warm-up forward
        hf(input_ids=torch.tensor([prompts[order[0]]]), logits_to_keep=1)
    t0 = time.perf_counter()
    ref = hf_pass()
    hf_s = time.perf_counter() - t0

    diff = max(float(np.abs(o[i][0][0] - ref[i]).max()) for o in (ours, plain, dense) for i in range(len(prompts)))
    agree = sum(int(np.argmax(ours[i][0][0]) == np.argmax(ref[i])) for i in range(len(prompts)))
    result = {
        "bench": "eval_mcq", "date": datetime.date.today().isoformat(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "model": {"hidden": cfg.hidden_size, "layers": cfg.num_layers, "heads": cfg.num_heads,
                  "mlp": cfg.intermediate_size, "vocab": cfg.vocab_size,
                  "params_M": round(cfg.num_params() / 1e6, 1)},
        "items": args.items, "batch_size": args.batch_size,
        "prompt_tokens_mean": float(np.mean([len(p) for p in prompts])),
        "prefix_tokens": args.prefix_len,
        "ours_items_per_s": args.items / ours_s, "ours_first_pass_s_incl_compile": first,
        "ours_plain_items_per_s": args.items / plain_s, "ours_plain_first_pass_s_incl_compile": plain_first,
        "ours_plain_dense_items_per_s": args.items / dense_s,
        "ours_plain_dense_first_pass_s_incl_compile": dense_first,
        "transformers_items_per_s": args.items / hf_s,
        "speedup": hf_s / ours_s, "speedup_plain": hf_s / plain_s,
        "max_abs_logprob_diff": diff, "predictions_agree": f"{agree}/{len(prompts)}",
        "versions": {"jax": __import__("jax").__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
