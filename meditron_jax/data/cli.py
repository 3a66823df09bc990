"""`meditron-jax data ...`: data utilities: `mcq-to-sft`, `verify`.

`verify DIR...`: reads every shard of preprocessed directories in full and checks its size and
SHA-256 against the manifest (progress bar over the bytes). Exit 0: all intact; 1: one line per
damaged shard on stderr (naming it; re-run preprocess for that directory); 2: not a preprocess
output, or a manifest without checksums (an older preprocess).

Owns: turning an exam's training split into {"prompt", "completion"} JSONL in exactly the
evaluation's zero-shot format (instruction, question block, "The answer is:" -> gold label), so
a model fine-tuned on it (configs/sft_*.gin, loss on the answer only) is evaluated with
`meditron-jax eval mcq --shots 0` on the prompts it was trained on.
Does not own: exam readers (`eval.tasks`), templates (`eval/prompts.json`), SFT tokenization and
loss masks (`data.sft`).
"""

from __future__ import annotations

import json
import os
import sys


def add_arguments(parser):
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    m = sub.add_parser("mcq-to-sft", help="exam training split -> prompt/completion JSONL (evaluation format)")
    m.add_argument("--task", required=True, help="pubmedqa | medmcqa | medqa | mmlu_medical")
    m.add_argument("--input", required=True, nargs="+", help="training split file(s) in the exam's format")
    m.add_argument("--out", required=True, help="output JSONL")
    m.add_argument("--cop-base", type=int, choices=(0, 1), default=None, help="medmcqa: 0- or 1-based `cop`")
    m.add_argument("--split-file", default=None,
                   help="pubmedqa: test PMIDs to leave OUT (test_ground_truth.json); the rest is written")
    m.add_argument("--prompts", default=None, help="template file (default: the packaged prompts.json)")
    m.add_argument("--no-instruction", action="store_true", help="omit the task's instruction line")
    v = sub.add_parser("verify", help="check every shard of preprocessed directories against its manifest "
                                      "(sizes and SHA-256, read in full)")
    v.add_argument("directories", nargs="+", metavar="DIR", help="`meditron-jax preprocess` output directories")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")


def mcq_to_sft(task: str, inputs: list[str], out: str, cop_base: int | None = None, split_file: str | None = None,
               prompts: str | None = None, instruction: bool = True) -> int:
    from meditron_jax.eval import mcq, tasks

    tasks.check_task(task)
    if task == "medmcqa" and cop_base is None:
        raise tasks.TaskDataError("medmcqa needs --cop-base 0|1 (the Hugging Face copy is 0-based, the "
                                  "original files 1-based)")
    template = mcq.PromptTemplate.for_task(task, mcq.load_prompts(prompts))
    if not instruction:
        import dataclasses
        template = dataclasses.replace(template, instruction="")
    items, rest = tasks.load_items(task, inputs, cop_base=cop_base or 0, split_file=split_file,
                                   context_joiner=template.context_joiner, subjects=list(template.subjects),
                                   split="train")
    if split_file is not None:
        items = rest  # the test PMIDs are left out
    d = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(d):
        raise tasks.TaskDataError(f"{out}: directory {d} does not exist")
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps({"prompt": template.prompt(it, []), "completion": template.completion(it),
                                "id": it.id}) + "\n")
    os.replace(tmp, out)
    return len(items)


def run(args) -> int:
    if args.action == "mcq-to-sft":
        n = mcq_to_sft(args.task, args.input, args.out, args.cop_base, args.split_file, args.prompts,
                       not args.no_instruction)
        print(f"wrote {n} prompt/completion pairs to {args.out}", file=sys.stderr)
        return 0
    if args.action == "verify":
        return verify(args.directories, progress=not args.no_progress)
    return 2


def verify(directories: list[str], progress: bool = True) -> int:
    from meditron_jax.data.preprocess import load_manifest
    from meditron_jax.data.preprocess import verify as verify_dir

    for d in directories:  # all refusals before the long reads
        load_manifest(d)
    bad = 0
    for d in directories:
        problems = verify_dir(d, progress=progress)
        for p in problems:
            print(f"meditron-jax data verify: {p}; re-run `meditron-jax preprocess ... --out {d} --overwrite`",
                  file=sys.stderr)
        bad += len(problems)
        if not problems:
            m = load_manifest(d)
            print(f"{d}: {len(m['shards'])} shard(s), {m['documents']} documents: intact")
    return 1 if bad else 0
