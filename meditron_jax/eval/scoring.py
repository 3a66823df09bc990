"""Batched, jitted log-probability queries against a model: the scoring engine of `eval mcq`,
TruthfulQA and the lm-evaluation-harness backend.

Owns: `Row` (one sequence and the next-token ids asked for at some of its positions), `Scorer`
(rows sorted by length and padded to a length bucket so one compile serves every batch of a
bucket; the longest common prefix of a group of rows run once into a KV cache and only the
suffixes run against it; on a mesh, rows split over data x fsdp through `eval.distributed`), and
`gather_logprobs`, the plain program (`eval.plan_eval` compiles it ahead of time).
Padding carries segment id 0, so it is never attended; log-probabilities are exact (fp32 logits
at the true vocab size).
Does not own: prompts, demonstrations, accuracies (`mcq.py`), the model (`model.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass
class Row:
    """One sequence to score: log p(query_ids[c][j] | tokens[: query_pos[c] + 1])."""
    tokens: list[int]
    query_pos: list[int]
    query_ids: list[list[int]]


def _round_up(n: int, m: int) -> int:
    return max(m, int(math.ceil(n / m) * m))


def _select(model, h, qpos, qids):
    hq = jnp.take_along_axis(h, qpos[:, :, None], axis=1)  # [B,C,D]: only the positions asked for
    logits = model.logits(hq)  # [B,C,V] fp32, true vocab
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, qids, axis=-1), jnp.argmax(logits, axis=-1)


def gather_logprobs(graphdef, state, tokens, lengths, qpos, qids):
    """tokens [B,T], lengths [B], qpos [B,C], qids [B,C,J] -> (log-probs [B,C,J], argmax [B,C])."""
    model = nnx.merge(graphdef, state)
    T = tokens.shape[1]
    seg = (jnp.arange(T)[None, :] < lengths[:, None]).astype(jnp.int32)  # 0 = right padding
    return _select(model, model.hidden(tokens, segment_ids=seg), qpos, qids)


def _prefill_prefix(graphdef, state, tokens, length, cache_len):
    """A shared prefix [1,Pb] (real tokens: the first `length`) -> its KV cache (batch 1)."""
    model = nnx.merge(graphdef, state)
    Pb = tokens.shape[1]
    seg = (jnp.arange(Pb) < length).astype(jnp.int32)[None]  # padding slots: segment 0, never attended
    _, cache = model.decode(tokens, jnp.arange(Pb)[None], seg, model.init_cache(1, cache_len), return_hidden=True)
    return cache


def _suffix_logprobs(graphdef, state, cache, prefix_len, tokens, lengths, qpos, qids):
    """Suffixes [B,T] after a cached prefix of true length prefix_len; qpos index the suffix."""
    model = nnx.merge(graphdef, state)
    B, T = tokens.shape
    L, _, S, K, H = cache["k"].shape
    batched = {"k": jnp.broadcast_to(cache["k"], (L, B, S, K, H)), "v": jnp.broadcast_to(cache["v"], (L, B, S, K, H)),
               "segment": jnp.broadcast_to(cache["segment"], (B, S)), "index": cache["index"]}
    seg = (jnp.arange(T)[None, :] < lengths[:, None]).astype(jnp.int32)
    positions = prefix_len + jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    h, _ = model.decode(tokens, positions, seg, batched, return_hidden=True)
    return _select(model, h, qpos, qids)


def _common_prefix(seqs: list[list[int]]) -> int:
    first = np.asarray(seqs[0])
    n = len(first)
    for s in seqs[1:]:
        m = min(n, len(s))
        diff = np.nonzero(first[:m] != np.asarray(s[:m]))[0]
        n = int(diff[0]) if len(diff) else m
    return n


class Scorer:
    """Batched, jitted log-prob queries.

    Rows are sorted by length and padded to a length bucket, so one compile serves every batch
    of that bucket. Rows given the same group key (e.g. one seed's prompts, which share the
    instruction and demonstrations) have their longest common token prefix run once into a KV
    cache; only the suffixes are then run, in batches, against that cache (same numbers, a
    fraction of the work for k-shot prompts).
    """

    def __init__(self, model, batch_size: int = 8, length_bucket: int = 64, min_shared_prefix: int = 32,
                 placement=None):
        from meditron_jax.eval.distributed import Placement

        self.graphdef, self.state = nnx.split(model)
        # on a mesh: rows split over data x fsdp (batch rounded up to a multiple), weights over tensor
        self.place = placement or Placement(None)
        batch_size = self.place.round_batch(batch_size)
        self.batch_size, self.length_bucket = batch_size, length_bucket
        self.vocab_size = model.cfg.vocab_size
        self.min_shared_prefix = min_shared_prefix
        self._plain = jax.jit(functools.partial(gather_logprobs, self.graphdef))
        self._prefill = jax.jit(functools.partial(_prefill_prefix, self.graphdef), static_argnames="cache_len")
        self._suffix = jax.jit(functools.partial(_suffix_logprobs, self.graphdef))

    def __call__(self, rows: list[Row], progress: bool = False, desc: str = "scoring", groups=None
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per row: (log-probs [C, J] for its own C and J, argmax token ids [C])."""
        from tqdm import tqdm

        jobs, plain = [], []  # (shared prefix length, row indices)
        by_group: dict = {}
        for i, g in enumerate(groups if groups is not None else [None] * len(rows)):
            by_group.setdefault(g, []).append(i)
        for g, idx in by_group.items():
            P = 0
            if g is not None and len(idx) > 1:
                P = min(_common_prefix([rows[i].tokens for i in idx]), min(min(rows[i].query_pos) for i in idx))
            if P >= self.min_shared_prefix:
                jobs.append((P, idx))
            else:
                plain += idx
        if plain:
            jobs.append((0, plain))
        B = self.batch_size
        # one cache size per call (one compile per suffix bucket): bucketed prefix + bucketed
        # suffix < longest row + 2 buckets
        cache_len = _round_up(max(len(r.tokens) for r in rows), self.length_bucket) + 2 * self.length_bucket
        out: list = [None] * len(rows)
        bar = tqdm(total=sum(math.ceil(len(idx) / B) for _, idx in jobs), desc=desc, disable=not progress,
                   unit="batch")
        for P, idx in jobs:
            cache = None
            if P:
                Pb = _round_up(P, self.length_bucket)
                prefix = np.zeros((1, Pb), np.int32)
                prefix[0, :P] = rows[idx[0]].tokens[:P]
                with self.place.context():
                    cache = self._prefill(self.state, prefix, np.int32(P), cache_len=cache_len)
            order = sorted(idx, key=lambda i: -len(rows[i].tokens))
            for s in range(0, len(order), B):
                batch_idx = order[s:s + B]
                self._run_batch(rows, batch_idx, P, cache, out)
                bar.update(1)
        bar.close()
        return out

    def _run_batch(self, rows, batch_idx, P, cache, out):
        B = self.batch_size
        batch = [rows[i] for i in batch_idx]
        T = _round_up(max(len(r.tokens) - P for r in batch), self.length_bucket)
        C = _round_up(max(len(r.query_pos) for r in batch), 1 if all(len(r.query_pos) == 1 for r in batch) else 16)
        J = max(len(q) for r in batch for q in r.query_ids)
        tokens = np.zeros((B, T), np.int32)
        lengths = np.ones((B,), np.int32)
        qpos = np.zeros((B, C), np.int32)
        qids = np.zeros((B, C, J), np.int32)
        for b, r in enumerate(batch):
            tokens[b, :len(r.tokens) - P] = r.tokens[P:]
            lengths[b] = len(r.tokens) - P
            qpos[b, :len(r.query_pos)] = np.asarray(r.query_pos) - P
            for c, ids in enumerate(r.query_ids):
                qids[b, c, :len(ids)] = ids
        put = self.place.put
        with self.place.context():
            if P:
                res = self._suffix(self.state, cache, np.int32(P), put(tokens), put(lengths), put(qpos), put(qids))
            else:
                res = self._plain(self.state, put(tokens), put(lengths), put(qpos), put(qids))
        logp, top = self.place.fetch(res)
        for b, (i, r) in enumerate(zip(batch_idx, batch)):
            C_r = len(r.query_pos)
            out[i] = (np.stack([logp[b, c, :len(r.query_ids[c])] for c in range(C_r)]), top[b, :C_r])
