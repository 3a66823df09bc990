"""k-shot multiple-choice evaluation: prompts, demonstrations, scoring rules and results.

Owns: prompt assembly from the editable templates (`prompts.json`), demonstration sampling
(one permutation of the few-shot pool per seed; each question takes the first k that are not
itself, so every question of a seed sees the same demonstrations unless it *is* one of them),
context-length handling (drop demonstrations first, then left-truncate; both counted), the two
scorings, accuracy per seed / mean / std, and per-item records.
Does not own: file formats (`tasks.py`), batched log-prob queries (`scoring.py`: `Row`, `Scorer`,
imported here too), the model (`model.py`), the CLI (`cli.py`).

Scoring (both exact log-probabilities from one batched forward pass, right-padded rows whose
padding carries segment id 0 so it is never attended):
  top_token  the option label whose *first token* has the highest next-token log-probability at
             the end of the prompt ("The answer is:"). Every label is scorable, "maybe" included.
  loglik     the option whose full answer text (`loglik_answer`, e.g. "B. Aspirin") has the
             highest total log-probability after the prompt.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from importlib import resources

import numpy as np

from meditron_jax.errors import UserError
from meditron_jax.eval.scoring import Row, Scorer
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
