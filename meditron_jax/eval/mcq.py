"""k-shot multiple-choice evaluation: prompts, demonstrations, batched scoring and results.

Owns: prompt assembly from the editable templates (`prompts.json`), demonstration sampling
(one permutation of the few-shot pool per seed; each question takes the first k that are not
itself, so every question of a seed sees the same demonstrations unless it *is* one of them),
context-length handling (drop demonstrations first, then left-truncate; both counted), the two
scorings, accuracy per seed / mean / std, and per-item records.
Does not own: file formats (`tasks.py`), the model (`model.py`), the CLI (`cli.py`).

Scoring (both exact log-probabilities from one batched forward pass, right-padded rows whose
padding carries segment id 0 so it is never attended):
  top_token  the option label whose *first token* has the highest next-token log-probability at
             the end of the prompt ("The answer is:"). Every label is scorable, "maybe" included.
  loglik     the option whose full answer text (`loglik_answer`, e.g. "B. Aspirin") has the
             highest total log-probability after the prompt.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections import Counter
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meditron_jax.errors import UserError
from meditron_jax.eval.tasks import Item, TaskDataError, check_task

SCORINGS = ("top_token", "loglik")
DEFAULT_SEEDS = (1234, 432, 32)


class EvalError(UserError, ValueError):
    """A user-caused evaluation problem (shots vs pool, tokenizer vs labels, bad template)."""


# -- templates -------------------------------------------------------------------------------
def load_prompts(path: str | None = None) -> dict:
    """The template file: the packaged `prompts.json` or a user's copy."""
    try:
        if path is None:
            text = resources.files("meditron_jax.eval").joinpath("prompts.json").read_text("utf-8")
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        data = json.loads(text)
    except OSError as e:
        raise EvalError(f"{path}: cannot read prompt file ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise EvalError(f"{path or 'prompts.json'}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        raise EvalError(f"{path or 'prompts.json'}: expected an object with a 'tasks' object")
    return data


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    instruction: str
    block: str
    option: str = "{label}. {text}"
    loglik_answer: str = "{label}. {text}"
    separator: str = "\n\n"
    answer_prefix: str = "The answer is:"
    context_joiner: str = "\n"
    subjects: tuple[str, ...] = ()

    @classmethod
    def for_task(cls, task: str, prompts: dict | None = None) -> "PromptTemplate":
        check_task(task)
        prompts = load_prompts() if prompts is None else prompts
        spec = prompts["tasks"].get(task)
        if not isinstance(spec, dict) or "block" not in spec:
            raise EvalError(f"prompt file has no template for task {task!r} (needs at least 'block')")
        kw = {f.name: spec[f.name] for f in dataclasses.fields(cls) if f.name in spec}
        kw.setdefault("instruction", "")
        for key in ("separator", "answer_prefix"):
            if key in prompts:
                kw[key] = prompts[key]
        kw["subjects"] = tuple(kw.get("subjects", ()))
        tmpl = cls(**kw)
        try:  # fail now, with the template named, rather than mid-run
            probe = Item("probe", "q", (("A", "a"),), "A", context="c")
            tmpl.block_text(probe), tmpl.loglik_text(probe, "A")
        except (KeyError, IndexError, ValueError) as e:
            raise EvalError(f"template for {task!r} uses an unknown placeholder or bad braces: {e}") from None
        return tmpl

    def block_text(self, item: Item) -> str:
        options = "\n".join(self.option.format(label=lab, text=txt) for lab, txt in item.options)
        return self.block.format(question=item.question, context=item.context or "", options=options)

    def demo_text(self, item: Item) -> str:
        return f"{self.block_text(item)}\n{self.answer_prefix} {item.gold}"

    def prompt(self, item: Item, demos: list[Item]) -> str:
        parts = [self.demo_text(d) for d in demos] + [f"{self.block_text(item)}\n{self.answer_prefix}"]
        body = self.separator.join(parts)
        return f"{self.instruction}\n{body}" if self.instruction else body

    def completion(self, item: Item) -> str:
        """The SFT completion: the gold label. The SFT encoder tokenizes it on its own, so
        SentencePiece's word-boundary marker makes "...is:" + "B" the same tokens as "...is: B"."""
        return item.gold

    def loglik_text(self, item: Item, label: str) -> str:
        return self.loglik_answer.format(label=label, text=dict(item.options)[label])


# -- demonstrations --------------------------------------------------------------------------
def _key(item: Item) -> str:
    return " ".join(item.question.lower().split())


def demo_order(pool: list[Item], seed: int) -> np.ndarray:
    """The seed's one permutation of the pool (numpy PCG64: identical on every machine)."""
    return np.random.default_rng(seed).permutation(len(pool))


def demos_for(item: Item, pool: list[Item], order: np.ndarray, k: int) -> list[Item]:
    """The first k pool items in `order` that are not `item` (same id or same question)."""
    out = []
    if k == 0:
        return out
    key = _key(item)
    for i in order:
        d = pool[i]
        if d.id == item.id or _key(d) == key:
            continue
        out.append(d)
        if len(out) == k:
            return out
    raise EvalError(f"--shots {k} but the few-shot pool has only {len(out)} items other than test item {item.id}")


# -- batched scoring -------------------------------------------------------------------------
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


def _gather_logprobs(graphdef, state, tokens, lengths, qpos, qids):
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
        self._plain = jax.jit(functools.partial(_gather_logprobs, self.graphdef))
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


# -- evaluation ------------------------------------------------------------------------------
def label_first_tokens(tokenizer, labels: list[str]) -> dict[str, int]:
    """First token of each label as it follows "The answer is:" (SentencePiece's '▁' prefix)."""
    ids = {}
    for lab in labels:
        toks = tokenizer.encode(lab)
        if not toks:
            raise EvalError(f"label {lab!r} encodes to no tokens")
        ids[lab] = toks[0]
    seen = {}
    for lab, t in ids.items():
        if t in seen:
            raise EvalError(f"labels {seen[t]!r} and {lab!r} share their first token {t}; "
                            "top_token scoring cannot tell them apart (use --scoring loglik)")
        seen[t] = lab
    return ids


@dataclasses.dataclass
class _Prompt:
    ids: list[int]
    n_demos: int
    dropped: int
    truncated: int
    demo_ids: tuple = ()  # ids of the demonstrations in the prompt, in prompt order
    dropped_ids: tuple = ()  # ids of those dropped to fit the context (the earliest ones)


def _fit_prompt(tokenizer, template, item, demos, max_len: int, reserve: int) -> _Prompt:
    """Encode the prompt; drop demonstrations (earliest first) and finally left-truncate so that
    prompt + `reserve` answer tokens fit in max_len."""
    budget = max_len - reserve
    for drop in range(len(demos) + 1):
        ids = tokenizer.encode(template.prompt(item, demos[drop:]), bos=True)
        if len(ids) <= budget:
            return _Prompt(ids, len(demos) - drop, drop, 0, tuple(d.id for d in demos[drop:]),
                           tuple(d.id for d in demos[:drop]))
    cut = len(ids) - budget
    return _Prompt([ids[0]] + ids[1 + cut:], 0, len(demos), cut, (), tuple(d.id for d in demos))


def evaluate(model, tokenizer, items: list[Item], pool: list[Item], template: PromptTemplate, *,
             shots: int, seeds=DEFAULT_SEEDS, scoring: str = "top_token", max_length: int | None = None,
             batch_size: int = 8, length_bucket: int = 64, progress: bool = False, scorer: Scorer | None = None,
             share_prefix: bool = True) -> tuple[dict, list[dict]]:
    """Score `items` for every seed. Returns (summary, per-item records). `share_prefix`: run each
    seed's common prompt prefix (instruction + demonstrations) once into a KV cache."""
    if scoring not in SCORINGS:
        raise EvalError(f"unknown scoring {scoring!r}; known: {', '.join(SCORINGS)}")
    if shots < 0:
        raise EvalError(f"--shots must be >= 0, got {shots}")
    if shots > 0 and len(pool) < shots:
        raise EvalError(f"--shots {shots} but the few-shot pool holds only {len(pool)} items")
    seeds = list(seeds) if shots > 0 else list(seeds)[:1]
    max_length = max_length or model.cfg.max_position_embeddings
    scorer = scorer or Scorer(model, batch_size=batch_size, length_bucket=length_bucket)
    labels_all = sorted({lab for it in items for lab in it.labels})
    first = label_first_tokens(tokenizer, labels_all) if scoring == "top_token" else None

    rows, meta, groups = [], [], []  # meta[i] = (seed, item index, item, prompt, option label or None)
    for seed in seeds:
        order = demo_order(pool, seed) if shots else None
        for k, item in enumerate(items):
            demos = demos_for(item, pool, order, shots) if shots else []
            group = (seed, tuple(d.id for d in demos)) if share_prefix else None
            if scoring == "top_token":
                p = _fit_prompt(tokenizer, template, item, demos, max_length, 1)
                rows.append(Row(p.ids, [len(p.ids) - 1], [[first[lab] for lab in item.labels]]))
                meta.append((seed, k, item, p, None))
                groups.append(group + (p.dropped, p.truncated) if group else None)
            else:
                conts = {lab: tokenizer.encode(template.loglik_text(item, lab)) for lab in item.labels}
                p = _fit_prompt(tokenizer, template, item, demos, max_length, max(len(c) for c in conts.values()))
                for lab, cont in conts.items():
                    n = len(p.ids)
                    rows.append(Row(p.ids + cont, list(range(n - 1, n - 1 + len(cont))), [[t] for t in cont]))
                    meta.append((seed, k, item, p, lab))
                    groups.append(group + (p.dropped, p.truncated) if group else None)
    results = scorer(rows, progress=progress, desc=f"{scoring} x{len(rows)}", groups=groups)

    per_item: dict[tuple, dict] = {}
    for (seed, k, item, p, lab), (logp, top) in zip(meta, results):
        rec = per_item.setdefault((seed, k), {
            "seed": seed, "id": item.id, "gold": item.gold, "scores": {}, "prompt_tokens": len(p.ids),
            "demos": p.n_demos, "demos_dropped": p.dropped, "truncated_tokens": p.truncated,
            "demo_ids": list(p.demo_ids), "demo_ids_dropped": list(p.dropped_ids),
            **({"subject": item.subject} if item.subject else {})})
        if lab is None:
            rec["scores"] = {l: float(s) for l, s in zip(item.labels, logp[0])}
            rec["top_token"] = int(top[0])
            rec["top_token_is_label"] = int(top[0]) in {first[l] for l in item.labels}
        else:
            rec["scores"][lab] = float(logp[:, 0].sum())
    records = list(per_item.values())
    for rec in records:
        rec["prediction"] = max(rec["scores"], key=rec["scores"].get)  # ties: first label in option order
        rec["correct"] = rec["prediction"] == rec["gold"]
    return summarize(records, seeds, shots=shots, scoring=scoring, max_length=max_length), records


def summarize(records: list[dict], seeds, **info) -> dict:
    acc, counts, subjects = {}, {}, {}
    for seed in seeds:
        recs = [r for r in records if r["seed"] == seed]
        n = len(recs)
        correct = sum(r["correct"] for r in recs)
        acc[str(seed)] = correct / n if n else float("nan")
        counts[str(seed)] = {
            "items": n, "correct": correct,
            "predicted": dict(Counter(r["prediction"] for r in recs)),
            "gold": dict(Counter(r["gold"] for r in recs)),
            "items_with_dropped_demos": sum(r["demos_dropped"] > 0 for r in recs),
            "demos_dropped": sum(r["demos_dropped"] for r in recs),
            "items_truncated": sum(r["truncated_tokens"] > 0 for r in recs),
            "top_token_not_a_label": sum(not r.get("top_token_is_label", True) for r in recs),
        }
        by_subject = {}
        for r in recs:
            if "subject" in r:
                by_subject.setdefault(r["subject"], []).append(r["correct"])
        if by_subject:
            subjects[str(seed)] = {s: sum(v) / len(v) for s, v in sorted(by_subject.items())}
    values = np.array(list(acc.values()), np.float64)
    used = sum(r["demos"] for r in records)
    dropped = sum(r["demos_dropped"] for r in records)
    demonstrations = {"used": used, "dropped": dropped,  # over every seed and item
                      "items_with_dropped_demos": sum(r["demos_dropped"] > 0 for r in records),
                      "items_truncated": sum(r["truncated_tokens"] > 0 for r in records)}
    out = {**info, "seeds": list(seeds), "accuracy": acc, "accuracy_mean": float(values.mean()),
           "accuracy_std": float(values.std()), "demonstrations": demonstrations, "counts": counts}
    if subjects:
        out["accuracy_per_subject"] = subjects
    return out


def write_results(summary: dict, records: list[dict], out: str, records_path: str | None = None) -> str:
    """results.json and the per-item JSONL, each written to a temporary name then renamed."""
    records_path = records_path or (os.path.splitext(out)[0] + ".items.jsonl")
    for path in (out, records_path):
        d = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(d):
            raise EvalError(f"{path}: directory {d} does not exist")
    tmp = records_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, records_path)
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({**summary, "records": os.path.basename(records_path)}, f, indent=2)
        f.write("\n")
    os.replace(tmp, out)
    return records_path


__all__ = ["PromptTemplate", "Scorer", "Row", "evaluate", "summarize", "write_results", "demo_order",
           "demos_for", "load_prompts", "label_first_tokens", "EvalError", "TaskDataError", "SCORINGS"]
