"""Data pipeline benchmark; prints one JSON object.

1. preprocess: `meditron-jax preprocess` tokens/s on a JSONL corpus with all cores, against raw
   SentencePiece batch encoding of the same texts (already in memory) on the same number of threads.
2. packing: packed-batch tokens/s per host and the padding fraction at seq 2048, on synthetic
   sources with GAP-Replay's token shares and mean document lengths from the Meditron paper
   (guidelines 107M tokens / 46K docs ~ 2.3K, PubMed abstracts 5.48B / 16.1M ~ 340, PubMed papers
   40.7B / 5M ~ 8.1K, replay 420M, ~1K assumed), log-normal lengths (sigma 0.8). Every host packs
   the whole global batch, so this is the per-host rate.

Usage: python bench/data_pipeline.py [--tokenizer tokenizer.model] [--input corpus.jsonl ...]
       [--docs N] [--workers N] [--global-batch 64] [--seq-len 2048] [--batches 40]
Without --tokenizer / --input it uses the built-in demo tokenizer and demo-style generated text.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from meditron_jax.data.demo import generate_documents, prepare_demo, write_jsonl
from meditron_jax.data.config import DataConfig
from meditron_jax.data.loader import build_pipeline
from meditron_jax.data.jsonl import iter_texts
from meditron_jax.data.preprocess import FORMAT, MANIFEST, _ShardWriter, preprocess, token_dtype
from meditron_jax.data.tokenizer import Tokenizer

GAP_REPLAY = {  # name: (train tokens, mean document tokens)
    "guidelines": (107e6, 2300), "pubmed_abstracts": (5.48e9, 340), "pubmed_papers": (40.7e9, 8100), "replay": (420e6, 1000),
}


def _cpu_seconds() -> float:
    """CPU time of this process, all threads."""
    return time.process_time()


def bench_preprocess(tok_path: str, inputs: list[str], workers: int, tmp: Path) -> dict:
    """Wall-clock rates, and CPU work: raw SentencePiece's CPU seconds (all its threads) against the
    1-worker preprocess run's (read + parse + encode + write, all in this process). The CPU ratio
    does not depend on how busy a shared machine is; with N idle cores both rates scale ~N-fold."""
    texts = [t for f in inputs for t in iter_texts(f)]
    tok = Tokenizer(tok_path)
    sp = tok.sp
    sp.encode(texts[:100], num_threads=workers)
    c0, t0 = _cpu_seconds(), time.perf_counter()
    ids = sp.encode(texts, num_threads=workers)
    raw_s, raw_cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    n_tokens = sum(len(x) for x in ids)
    out = {}
    for w in sorted({1, workers}):
        c0, t0 = _cpu_seconds(), time.perf_counter()
        m = preprocess(inputs, tok_path, tmp / f"pp{w}", workers=w, progress=False, overwrite=True)
        out[w] = (time.perf_counter() - t0, _cpu_seconds() - c0, m)
    pp_s, _, m = out[workers]
    pp_cpu = out[1][1]
    assert m["tokens"] == n_tokens + 2 * m["documents"]
    return {
        "tokenizer": tok_path, "vocab_size": tok.vocab_size, "documents": m["documents"],
        "text_mb": round(sum(os.path.getsize(f) for f in inputs) / 1e6, 2), "tokens": n_tokens,
        "workers": workers,
        "raw_sentencepiece_tokens_per_s": round(n_tokens / raw_s),
        "preprocess_tokens_per_s": round(n_tokens / pp_s),
        "preprocess_1_worker_tokens_per_s": round(n_tokens / out[1][0]),
        "ratio_vs_raw": round(raw_s / pp_s, 3),
        "raw_sentencepiece_cpu_s": round(raw_cpu, 2),
        "preprocess_1_worker_cpu_s": round(pp_cpu, 2),
        "cpu_ratio_vs_raw": round(raw_cpu / pp_cpu, 3),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def _synthetic_source(directory: Path, tok: Tokenizer, mean_len: int, n_tokens: int, rng) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    lengths = []
    total = 0
    while total < n_tokens:
        n = int(np.clip(rng.lognormal(np.log(mean_len) - 0.32, 0.8), 8, 64 * mean_len))
        lengths.append(n)
        total += n
    lengths = np.asarray(lengths, dtype=np.int64)
    dtype = token_dtype(tok.vocab_size)
    flat = rng.integers(3, tok.base_vocab_size, size=int(lengths.sum())).astype(dtype)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    flat[starts] = tok.bos_id
    flat[starts + lengths - 1] = tok.eos_id
    w = _ShardWriter(directory, 1 << 27)
    w.write(lengths, flat)
    w.close()
    manifest = {"format": FORMAT, "documents": len(lengths), "tokens": int(lengths.sum()), "skipped_empty_documents": 0,
                "max_document_tokens": int(lengths.max()), "dtype": dtype.name, "tokenizer": tok.info(),
                "bos_eos_added": True, "shards": w.shards, "synthetic": True}
    (directory / MANIFEST).write_text(json.dumps(manifest))


def bench_packing(tok_path: str, tmp: Path, seq_len: int, global_batch: int, batches: int, tokens_per_source: float) -> dict:
    tok = Tokenizer(tok_path)
    rng = np.random.default_rng(0)
    sources = {}
    for name, (_, mean_len) in GAP_REPLAY.items():
        _synthetic_source(tmp / name, tok, mean_len, int(tokens_per_source), rng)
        sources[name] = str(tmp / name)
    total = sum(t for t, _ in GAP_REPLAY.values())
    weights = {n: t / total for n, (t, _) in GAP_REPLAY.items()}
    cfg = DataConfig(sources=sources, weights=weights, tokenizer=tok_path)
    it = build_pipeline(seq_len, global_batch, seed=0, config=cfg).train_iterator()
    for _ in range(3):
        next(it)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    real = 0.0
    for _ in range(batches):
        b = next(it)
        real += float((b["segment_ids"] > 0).sum())
    dt, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    it.close()
    n = batches * global_batch * seq_len
    return {"seq_len": seq_len, "global_batch": global_batch, "batches": batches, "weights": weights,
            "mean_doc_tokens": {n_: m for n_, (_, m) in GAP_REPLAY.items()},
            "packed_tokens_per_s": round(n / dt), "packed_tokens_per_cpu_s": round(n / cpu),
            "padding_fraction": round(1 - real / n, 5), "load_average_1min": round(os.getloadavg()[0], 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--input", nargs="*", default=None)
    ap.add_argument("--docs", type=int, default=40000, help="generated documents when --input is not given")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--tokens-per-source", type=float, default=4e6)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mjx-bench-") as d:
        tmp = Path(d)
        tok_path = args.tokenizer or prepare_demo(tmp / "demo")["tokenizer"]
        inputs = args.input
        if not inputs:
            inputs = [str(tmp / "corpus.jsonl")]
            half = args.docs // 2
            write_jsonl(inputs[0], generate_documents("guidelines", half, seed=1) + generate_documents("replay", args.docs - half, seed=1))
        result = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "preprocess": bench_preprocess(tok_path, inputs, args.workers, tmp),
            "packing": bench_packing(tok_path, tmp / "packing", args.seq_len, args.global_batch, args.batches,
                                     args.tokens_per_source),
        }
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
