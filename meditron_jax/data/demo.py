"""The built-in demo corpus: so that the default run (`data.demo = True`) needs no download.

Owns: generating two small, deterministic JSONL sources from the project's own seed facts
(`meditron_jax/demo/facts.json`, written for this project, licence in `meditron_jax/demo/LICENSE.md`):
  guidelines  clinical-guideline-style recommendations, drug monographs and case vignettes
  replay      general-domain text (geography, calendar, arithmetic, short stories), standing in for
              GAP-Replay's RedPajama replay
then training a small BPE tokenizer on them and preprocessing both into ArrayRecord sources, so the
whole path demo text -> tokenizer -> preprocess -> pipeline runs in a few seconds. The text is
templated and repetitive on purpose: a tiny model's loss falls visibly within a minute on a CPU.

`prepare_demo(out_dir)` is idempotent (a finished build is recognised by `demo.json`) and safe when
several processes call it at once (each builds in a temporary directory; the first rename wins).

Does not own: tokenizer training or preprocessing themselves (`data.tokenizer`, `data.preprocess`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np

DEMO_VERSION = 1
DEMO_VOCAB_SIZE = 1024  # <= the `tiny` preset's 2048
SOURCES = ("guidelines", "replay")
WEIGHTS = {"guidelines": 0.75, "replay": 0.25}  # token shares, like GAP-Replay's medical-heavy mix


def _facts() -> dict:
    return json.loads(resources.files("meditron_jax").joinpath("demo/facts.json").read_text(encoding="utf-8"))


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiouAEIOU" else "a ") + noun


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


# -- guidelines ---------------------------------------------------------------------------------
def _guideline(rng, f, drugs) -> str:
    c = _pick(rng, f["conditions"])
    d = drugs[c["drug"]]
    recs = [
        f"Confirm the diagnosis with {c['test']}.",
        f"Offer {d['name']} {d['dose']} {d['route']} {d['frequency']} as first-line treatment.",
        f"While on {d['name']}, monitor {d['monitor']}.",
        f"Advise the patient to {c['advice']}.",
        f"Warn that {d['name']} can cause {' or '.join(d['effects'])}.",
    ]
    order = rng.permutation(len(recs))
    lines = [f"Clinical guideline: {c['name']}.", f"{c['name'].capitalize()} is {c['is']}."]
    lines += [f"Recommendation {k + 1}: {recs[i]}" for k, i in enumerate(order[: 3 + int(rng.integers(3))])]
    lines.append(f"Refer urgently if {c['red_flag']}.")
    return "\n".join(lines)


def _monograph(rng, f, drugs) -> str:
    d = _pick(rng, f["drugs"])
    effects = [d["effects"][i] for i in sorted(rng.choice(len(d["effects"]), size=int(rng.integers(1, len(d["effects"]) + 1)), replace=False))]
    body = [
        f"It is used for {d['use']}.",
        f"The usual adult dose is {d['dose']} {d['route']} {d['frequency']}.",
        f"Common side effects include {', '.join(effects[:-1]) + ' and ' if len(effects) > 1 else ''}{effects[-1]}.",
        f"Monitor {d['monitor']} during treatment.",
        f"Tell patients taking {d['name']} to report {_pick(rng, d['effects'])} early.",
    ]
    order = rng.permutation(len(body))[: 3 + int(rng.integers(3))]
    return " ".join([f"Drug monograph: {d['name']}.", f"{d['name'].capitalize()} is {_a(d['class'])}."]
                    + [body[i] for i in order])


def _vignette(rng, f, drugs) -> str:
    c = _pick(rng, f["conditions"])
    d = drugs[c["drug"]]
    age = int(rng.integers(18, 90))
    sex = _pick(rng, ["man", "woman"])
    pron = "He" if sex == "man" else "She"
    weeks = int(rng.integers(2, 13))
    outcome = _pick(rng, ["symptoms had improved", "symptoms were unchanged", f"{pron.lower()} reported {_pick(rng, d['effects'])}"])
    return (f"Case report. A {age}-year-old {sex} was assessed in clinic. {pron} was diagnosed with {c['name']} "
            f"after {c['test']}. {pron} was started on {d['name']} {d['dose']} {d['route']} {d['frequency']}. "
            f"At review after {weeks} weeks, {outcome}. The team continued to monitor {d['monitor']}.")


# -- replay -------------------------------------------------------------------------------------
def _geography(rng, f) -> str:
    rows = [f["places"][i] for i in rng.choice(len(f["places"]), size=3, replace=False)]
    return " ".join(f"The capital of {c} is {cap}. Many people in {c} speak {lang}." for c, cap, lang in rows)


def _calendar(rng, f) -> str:
    days, months = f["days"], f["months"]
    i, j = int(rng.integers(7)), int(rng.integers(12))
    return (f"The day after {days[i]} is {days[(i + 1) % 7]}. The day before {days[i]} is {days[(i - 1) % 7]}. "
            f"The month after {months[j]} is {months[(j + 1) % 12]}. The month before {months[j]} is {months[(j - 1) % 12]}.")


def _arithmetic(rng, f) -> str:
    lines = []
    for _ in range(4):
        a, b = int(rng.integers(0, 50)), int(rng.integers(0, 50))
        if rng.random() < 0.5:
            lines.append(f"{a} plus {b} equals {a + b}.")
        else:
            lines.append(f"{max(a, b)} minus {min(a, b)} equals {max(a, b) - min(a, b)}.")
    return " ".join(lines)


def _story(rng, f) -> str:
    name = _pick(rng, f["names"])
    friend = _pick(rng, [n for n in f["names"] if n != name])
    colour, obj, day = _pick(rng, f["colours"]), _pick(rng, f["objects"]), _pick(rng, f["days"])
    animal, young, sound = _pick(rng, f["animals"])
    return (f"On {day}, {name} bought a {colour} {obj}. {name} showed the {obj} to {friend}. "
            f"On the way home they saw a {animal} with its {young}. The {animal} {sound}. "
            f"{friend} said that the {colour} {obj} was beautiful.")


def generate_documents(source: str, n: int, seed: int = 0) -> list[str]:
    """`n` deterministic documents of the demo source `source` ('guidelines' or 'replay')."""
    f = _facts()
    drugs = {d["name"]: d for d in f["drugs"]}
    rng = np.random.default_rng([seed, SOURCES.index(source)])
    if source == "guidelines":
        makers = [lambda: _guideline(rng, f, drugs), lambda: _monograph(rng, f, drugs), lambda: _vignette(rng, f, drugs)]
    else:
        makers = [lambda: _geography(rng, f), lambda: _calendar(rng, f), lambda: _arithmetic(rng, f), lambda: _story(rng, f)]
    return [makers[int(rng.integers(len(makers)))]() for _ in range(n)]


def write_jsonl(path: str | os.PathLike, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}) + "\n")


def prepare_demo(out_dir: str | os.PathLike, documents: tuple[int, int] = (3000, 1500)) -> dict:
    """Builds (once) the demo corpus, tokenizer and preprocessed sources under `out_dir`.

    Returns {"tokenizer": path, "sources": {"guidelines": dir, "replay": dir}, "weights": {...}} (the
    default mixture weights, 3:1 in tokens)."""
    from meditron_jax.data.preprocess import preprocess
    from meditron_jax.data.tokenizer import train_tokenizer

    out = Path(out_dir)
    if _finished(out, documents):
        return _paths(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        raw = tmp / "raw"
        raw.mkdir()
        files = {}
        for src, n in zip(SOURCES, documents):
            files[src] = raw / f"{src}.jsonl"
            write_jsonl(files[src], generate_documents(src, n))
        tok = train_tokenizer(list(files.values()), DEMO_VOCAB_SIZE, tmp / "tokenizer")
        for src, path in files.items():
            preprocess([path], tok, tmp / src, workers=1, progress=False)
        # the manifests must point at the final location of the tokenizer
        for src in SOURCES:
            m = json.loads((tmp / src / "manifest.json").read_text())
            m["tokenizer"]["path"] = str(out / "tokenizer.model")
            m["inputs"] = [{"path": str(out / "raw" / f"{src}.jsonl"), "bytes": m["inputs"][0]["bytes"]}]
            (tmp / src / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
        (tmp / "demo.json").write_text(json.dumps({"version": DEMO_VERSION, "documents": list(documents),
                                                   "licence": "see meditron_jax/demo/LICENSE.md"}) + "\n")
        if _finished(out, documents):  # another process finished first: use its build
            return _paths(out)
        if out.exists():  # an outdated build
            shutil.rmtree(out, ignore_errors=True)
        try:
            os.rename(tmp, out)
        except OSError:  # another process renamed its build in between: use it
            if not _finished(out, documents):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _paths(out)


def _finished(out: Path, documents) -> bool:
    try:
        info = json.loads((out / "demo.json").read_text())
    except (OSError, ValueError):
        return False
    return info.get("version") == DEMO_VERSION and info.get("documents") == list(documents)


def _paths(out: Path) -> dict:
    return {"tokenizer": str(out / "tokenizer.model"), "sources": {s: str(out / s) for s in SOURCES},
            "weights": dict(WEIGHTS)}
