"""Medical exam readers: the public file formats of PubMedQA, MedMCQA, MedQA and MMLU -> `Item`s.

Owns: parsing each format into one shape (`Item`: id, question, optional context, lettered or
yes/no/maybe options, gold label, optional subject), the PubMedQA official test split, the MMLU
medical subject list, and one-line errors that name the file and the first bad record.
Does not own: prompts, demonstrations or scoring (`mcq.py`), templates (`prompts.json`).

Formats:
  pubmedqa      ori_pqal.json: {PMID: {QUESTION, CONTEXTS [..], final_decision}}; the official
                500-item test split is a JSON {PMID: label} (test_ground_truth.json), a JSON list
                of PMIDs or a text file with one PMID per line.
  medmcqa       JSONL: question, opa, opb, opc, opd, cop (0- or 1-based: --cop-base), optional id.
  medqa         JSONL: question, options {A: .., B: .., ...} (or [{key, value}]), answer_idx.
  mmlu_medical  CSV without header: question, A, B, C, D, answer letter (Hendrycks' files,
                e.g. anatomy_test.csv); a header row (question,A,B,C,D,answer) is skipped.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os

from meditron_jax.data import jsonl
from meditron_jax.errors import UserError

TASKS = ("pubmedqa", "medmcqa", "medqa", "mmlu_medical")
PUBMEDQA_LABELS = ("yes", "no", "maybe")
LETTERS = "ABCDEFGHIJ"


class TaskDataError(UserError, ValueError):
    """An exam file is missing or not in the documented format (names the first bad record)."""


@dataclasses.dataclass(frozen=True)
class Item:
    id: str
    question: str
    options: tuple[tuple[str, str], ...]  # (label, text): ("A", "Aspirin") or ("maybe", "maybe")
    gold: str  # one of the option labels
    context: str | None = None  # PubMedQA abstract sections (already joined by the reader's joiner)
    subject: str | None = None  # MMLU subject (from the file name)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(label for label, _ in self.options)


def check_task(task: str) -> str:
    if task not in TASKS:
        raise TaskDataError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return task


def _open_text(path: str):
    if not os.path.isfile(path):
        raise TaskDataError(f"{path}: no such file")
    return open(path, encoding="utf-8")


def _jsonl(path: str):
    """Yields (line number, dict) for the non-empty lines of a JSONL file."""
    if not os.path.isfile(path):
        raise TaskDataError(f"{path}: no such file")
    return jsonl.read_jsonl(path, error=TaskDataError, where=jsonl.words, malformed="not JSON", objects=True)


def _need(path, where, rec, keys):
    missing = [k for k in keys if k not in rec or rec[k] is None]
    if missing:
        raise TaskDataError(f"{path} {where}: missing {', '.join(repr(k) for k in missing)}")


def _nonempty(items, path):
    if not items:
        raise TaskDataError(f"{path}: no items")
    return items


# -- PubMedQA --------------------------------------------------------------------------------
def read_pubmedqa_split(path: str) -> dict[str, str | None]:
    """{PMID: label or None} from test_ground_truth.json, a JSON list, or one PMID per line."""
    with _open_text(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(data, dict):
        split = {str(k): (v if isinstance(v, str) else (v or {}).get("final_decision")) for k, v in data.items()}
    elif isinstance(data, list):
        split = {str(k): None for k in data}
    else:
        raise TaskDataError(f"{path}: expected a JSON object {{PMID: label}}, a JSON list or one PMID per line")
    for pmid, label in split.items():
        if not pmid.isdigit():
            raise TaskDataError(f"{path}: {pmid!r} is not a PMID")
        if label is not None and label not in PUBMEDQA_LABELS:
            raise TaskDataError(f"{path}: PMID {pmid} has label {label!r}, not one of yes/no/maybe")
    return _nonempty(split, path)


def read_pubmedqa(path: str, split_file: str | None = None, context_joiner: str = "\n"
                  ) -> tuple[list[Item], list[Item]]:
    """(test items, the other items) of ori_pqal.json; without a split file every item is a test item."""
    with _open_text(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{path}: not a JSON file ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise TaskDataError(f"{path}: expected PubMedQA's {{PMID: record}} object")
    items = {}
    for pmid, rec in data.items():
        where = f"PMID {pmid}"
        if not isinstance(rec, dict):
            raise TaskDataError(f"{path} {where}: expected an object")
        _need(path, where, rec, ("QUESTION", "CONTEXTS", "final_decision"))
        if rec["final_decision"] not in PUBMEDQA_LABELS:
            raise TaskDataError(f"{path} {where}: final_decision {rec['final_decision']!r} is not yes/no/maybe")
        contexts = rec["CONTEXTS"]
        if isinstance(contexts, str):
            contexts = [contexts]
        items[str(pmid)] = Item(id=str(pmid), question=rec["QUESTION"].strip(),
                                options=tuple((lab, lab) for lab in PUBMEDQA_LABELS),
                                gold=rec["final_decision"],
                                context=context_joiner.join(c.strip() for c in contexts))
    _nonempty(items, path)
    if split_file is None:
        return list(items.values()), list(items.values())
    split = read_pubmedqa_split(split_file)
    test = []
    for pmid, label in split.items():
        if pmid not in items:
            raise TaskDataError(f"{split_file}: PMID {pmid} is not in {path}")
        if label is not None and label != items[pmid].gold:
            raise TaskDataError(f"{split_file}: PMID {pmid} is {label!r} but {path} says {items[pmid].gold!r}")
        test.append(items[pmid])
    rest = [it for pmid, it in items.items() if pmid not in split]
    return test, rest


# -- MedMCQA ---------------------------------------------------------------------------------
def read_medmcqa(path: str, cop_base: int = 1) -> list[Item]:
    if cop_base not in (0, 1):
        raise TaskDataError(f"--cop-base must be 0 or 1, got {cop_base}")
    items = []
    for n, rec in _jsonl(path):
        where = f"line {n}"
        _need(path, where, rec, ("question", "opa", "opb", "opc", "opd", "cop"))
        try:
            cop = int(rec["cop"]) - cop_base
        except (TypeError, ValueError):
            raise TaskDataError(f"{path} {where}: cop {rec['cop']!r} is not an integer") from None
        if not 0 <= cop < 4:
            raise TaskDataError(f"{path} {where}: cop {rec['cop']!r} is out of range for --cop-base {cop_base} "
                                f"(expected {cop_base}..{cop_base + 3}; is the file {1 - cop_base}-based?)")
        opts = tuple((LETTERS[i], str(rec[k]).strip()) for i, k in enumerate(("opa", "opb", "opc", "opd")))
        items.append(Item(id=str(rec.get("id") or f"line{n}"), question=str(rec["question"]).strip(),
                          options=opts, gold=LETTERS[cop], subject=rec.get("subject_name")))
    return _nonempty(items, path)


# -- MedQA -----------------------------------------------------------------------------------
def read_medqa(path: str) -> list[Item]:
    items = []
    for n, rec in _jsonl(path):
        where = f"line {n}"
        _need(path, where, rec, ("question", "options", "answer_idx"))
        raw = rec["options"]
        if isinstance(raw, list):  # bigbio style [{key, value}]
            try:
                raw = {o["key"]: o["value"] for o in raw}
            except (TypeError, KeyError):
                raise TaskDataError(f"{path} {where}: options list entries need 'key' and 'value'") from None
        if not isinstance(raw, dict) or not raw:
            raise TaskDataError(f"{path} {where}: options must be an object {{A: text, ...}}")
        labels = sorted(raw)
        if labels != list(LETTERS[:len(labels)]):
            raise TaskDataError(f"{path} {where}: option keys {labels} are not A, B, C, ...")
        gold = str(rec["answer_idx"]).strip()
        if gold not in raw:
            raise TaskDataError(f"{path} {where}: answer_idx {gold!r} is not one of the options {labels}")
        items.append(Item(id=str(rec.get("id") or f"line{n}"), question=str(rec["question"]).strip(),
                          options=tuple((k, str(raw[k]).strip()) for k in labels), gold=gold))
    return _nonempty(items, path)


# -- MMLU ------------------------------------------------------------------------------------
def mmlu_subject(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    for suffix in ("_test", "_dev", "_val", "_validation", "_train"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def read_mmlu(path: str) -> list[Item]:
    subject = mmlu_subject(path)
    items = []
    with _open_text(path) as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or not any(cell.strip() for cell in row):
                continue
            if n == 1 and [c.strip().lower() for c in row[:6]] == ["question", "a", "b", "c", "d", "answer"]:
                continue
            if len(row) != 6:
                raise TaskDataError(f"{path} row {n}: expected 6 columns (question, A, B, C, D, answer), "
                                    f"got {len(row)}")
            gold = row[5].strip().upper()
            if gold not in "ABCD" or not gold:
                raise TaskDataError(f"{path} row {n}: answer {row[5]!r} is not one of A, B, C, D")
            items.append(Item(id=f"{subject}/{n}", question=row[0].strip(),
                              options=tuple((LETTERS[i], row[1 + i].strip()) for i in range(4)),
                              gold=gold, subject=subject))
    return _nonempty(items, path)


def expand_mmlu_paths(paths: list[str], subjects: list[str], split: str) -> list[str]:
    """Files as given; a directory stands for its `<subject>_<split>.csv` files of the medical subjects."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            found = [os.path.join(p, f"{s}_{split}.csv") for s in subjects
                     if os.path.isfile(os.path.join(p, f"{s}_{split}.csv"))]
            if not found:
                raise TaskDataError(f"{p}: no <subject>_{split}.csv files for the MMLU medical subjects")
            out += found
        else:
            out.append(p)
    return out


# -- one entry point -------------------------------------------------------------------------
def load_items(task: str, paths: list[str], *, cop_base: int = 1, split_file: str | None = None,
               context_joiner: str = "\n", subjects: list[str] | None = None, split: str = "test"
               ) -> tuple[list[Item], list[Item]]:
    """(items, leftover) for a task; leftover is the rest of a PubMedQA file outside the split."""
    check_task(task)
    if split_file is not None and task != "pubmedqa":
        raise TaskDataError("--split-file is for pubmedqa (the official test PMIDs)")
    items, rest = [], []
    if task == "mmlu_medical":
        paths = expand_mmlu_paths(paths, subjects or [], split)
    for p in paths:
        if task == "pubmedqa":
            test, other = read_pubmedqa(p, split_file, context_joiner)
            items += test
            rest += other if split_file else []
        elif task == "medmcqa":
            items += read_medmcqa(p, cop_base)
        elif task == "medqa":
            items += read_medqa(p)
        else:
            items += read_mmlu(p)
    return items, rest
