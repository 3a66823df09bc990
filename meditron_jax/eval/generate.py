"""Text generation with a KV cache, and the `meditron-jax generate` subcommand.

Owns: batching prompts (left padding with explicit positions, so every row's last prompt token
sits in the last column), one jitted prefill per (batch, prompt bucket, cache size) and one
jitted decode step reused for every token (no per-token recompiles), sampling (greedy at
temperature 0, else temperature + top-k + top-p), stopping at EOS, and streaming text.
Does not own: the model's cache layout or attention masking (`model.py`: segment id 0 marks
padding, which is never attended), tokenization (`data/tokenizer.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meditron_jax.data import jsonl
from meditron_jax.errors import UserError


class GenerateError(UserError, ValueError):
    """Bad generation request (empty prompt, too long for the context, bad sampling values)."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    vocab_limit: int = 0  # > 0: only ids below it can be chosen (a tokenizer smaller than the model's vocab)

    def __post_init__(self):
        if self.temperature < 0:
            raise GenerateError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise GenerateError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerateError(f"--top-p must be in (0, 1], got {self.top_p}")


def sample_logits(logits, key, sampling: Sampling):
    """logits [B,V] fp32 -> token ids [B] int32."""
    if 0 < sampling.vocab_limit < logits.shape[-1]:  # ids the tokenizer cannot decode are never chosen
        logits = jnp.where(jnp.arange(logits.shape[-1]) < sampling.vocab_limit, logits, -jnp.inf)
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass ranked above each token
        keep = jnp.sum(before < sampling.top_p, axis=-1, keepdims=True)  # >= 1: the top token stays
        cutoff = jnp.take_along_axis(sorted_logits, keep - 1, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _prefill(graphdef, state, tokens, positions, segment_ids, cache, key, sampling):
    model = nnx.merge(graphdef, state)
    logits, cache = model.decode(tokens, positions, segment_ids, cache)
    last = logits[:, -1]
    return sample_logits(last, key, sampling), last, cache


def _step(graphdef, state, cache, tokens, positions, key, step, sampling):
    model = nnx.merge(graphdef, state)
    ones = jnp.ones_like(tokens)[:, None]
    logits, cache = model.decode(tokens[:, None], positions[:, None], ones, cache)
    last = logits[:, 0]
    return sample_logits(last, jax.random.fold_in(key, step), sampling), last, cache


def _round_up(n: int, m: int) -> int:
    return max(m, int(math.ceil(n / m) * m))


class Generator:
    """Compiled prefill + decode step for one model. Reuse it: compiles are cached per shape."""

    def __init__(self, model, prompt_bucket: int = 32, cache_bucket: int = 64, placement=None):
        from meditron_jax.eval.distributed import Placement

        self.place = placement or Placement(None)  # a mesh: rows over data, heads and KV cache over tensor
        self.cfg = model.cfg
        self.model = model
        graphdef, self.state = nnx.split(model)
        self.prompt_bucket, self.cache_bucket = prompt_bucket, cache_bucket
        self._prefill = jax.jit(functools.partial(_prefill, graphdef), static_argnames="sampling")
        self._step = jax.jit(functools.partial(_step, graphdef), static_argnames="sampling",
                             donate_argnums=(1,))

    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
                 seed: int = 0, eos_id: int | None = 2, batch_size: int | None = None,
                 on_tokens: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
                 collect_logits: bool = False):
        """Token ids of each completion (EOS included when reached). With `collect_logits`, also
        per row the [steps, vocab] next-token logits that chose each token.

        on_tokens(step, tokens [B], active [B]) is called after every step (for streaming).
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise GenerateError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise GenerateError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.cfg.max_position_embeddings:
            raise GenerateError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's "
                                f"context of {self.cfg.max_position_embeddings}")
        B = self.place.round_batch(batch_size or len(prompts))
        outs, logits = [], []
        for s in range(0, len(prompts), B):
            chunk = prompts[s:s + B]
            o, lg = self._generate_batch(chunk, B, max_new_tokens, sampling, seed + s, eos_id, on_tokens,
                                         collect_logits)
            outs += o
            logits += lg
        return (outs, logits) if collect_logits else outs

    def _generate_batch(self, prompts, B, max_new, sampling, seed, eos_id, on_tokens, collect_logits):
        n = len(prompts)
        lengths = np.array([len(p) for p in prompts] + [1] * (B - n), np.int32)  # dummy rows: 1 token
        P = _round_up(int(lengths.max()), self.prompt_bucket)
        S = _round_up(P + max_new, self.cache_bucket)
        tokens = np.zeros((B, P), np.int32)
        segment = np.zeros((B, P), np.int32)
        positions = np.zeros((B, P), np.int32)
        for b in range(B):
            ids = prompts[b] if b < n else [1]
            L = len(ids)
            tokens[b, P - L:] = ids  # left padding: the last prompt token is in column P-1
            segment[b, P - L:] = 1
            positions[b, P - L:] = np.arange(L)
        key = jax.random.key(seed)
        cache = self.place.init_cache(self.model, B, S)
        put, fetch = self.place.put, self.place.fetch
        with self.place.context():
            nxt, last, cache = self._prefill(self.state, put(tokens), put(positions), put(segment), cache, key,
                                             sampling=sampling)
        out = [[] for _ in range(n)]
        step_logits = [[] for _ in range(n)]
        active = np.ones(B, bool)
        active[n:] = False
        pos = lengths.copy()
        for t in range(max_new):
            ids = np.asarray(fetch(nxt))
            if collect_logits:
                lg = np.asarray(fetch(last))
            for b in range(n):
                if active[b]:
                    out[b].append(int(ids[b]))
                    if collect_logits:
                        step_logits[b].append(lg[b])
                    if eos_id is not None and ids[b] == eos_id:
                        active[b] = False
            if on_tokens is not None:
                on_tokens(t, ids[:n], active[:n])
            if not active.any() or t == max_new - 1:
                break
            with self.place.context():
                nxt, last, cache = self._step(self.state, cache, nxt, put(pos), key, t, sampling=sampling)
            pos = pos + 1
        return out, [np.stack(x) for x in step_logits] if collect_logits else []


# -- CLI ------------------------------------------------------------------------------------


def read_prompts(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise GenerateError(f"{path}: no such prompt file")
    if path.endswith(".jsonl"):
        prompts = []
        for n, rec in jsonl.read_jsonl(path, error=GenerateError, where=jsonl.words, malformed="not JSON"):
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise GenerateError(f"{path} line {n}: expected a JSON object with a 'prompt' string")
            prompts.append(rec["prompt"])
    else:
        with open(path, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise GenerateError(f"{path}: no prompts")
    return prompts


class Streamer:
    """Prints one row's completion as it grows (whole characters only)."""

    def __init__(self, tok, prompt_ids, stream):
        self.tok, self.prompt_ids, self.stream = tok, prompt_ids, stream
        self.ids, self.printed = [], 0
        self.base = len(tok.decode(prompt_ids))

    def __call__(self, step, ids, active):
        if not active[0] and (self.ids and self.ids[-1] == self.tok.eos_id):
            return
        self.ids.append(int(ids[0]))
        shown = [i for i in self.ids if i != self.tok.eos_id]
        text = self.tok.decode(self.prompt_ids + shown)[self.base:]
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return
        self.stream.write(text[self.printed:])
        self.stream.flush()
        self.printed = len(text)
