"""`meditron-jax data ...`: data utilities: `mcq-to-sft`, `verify`.

`verify DIR...`: reads every shard of preprocessed directories in full and checks its size and
SHA-256 against the manifest (progress bar over the bytes). Exit 0: all intact; 1: one line per
damaged shard on stderr (naming it; re-run preprocess for that directory); 2: not a preprocess
output, or a manifest without checksums (an older preprocess).

`mcq-to-sft`: an exam's training split -> {"prompt", "completion"} JSONL in exactly the
evaluation's zero-shot format (`eval.to_sft`).

Owns: the `data` command line only. It sits above both layers (like every module of `cli/`)
so that the data layer never imports evaluation: the work lives in `data.preprocess`
(verify) and `eval.to_sft` (mcq-to-sft).
"""

from __future__ import annotations

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


def run(args) -> int:
    if args.action == "mcq-to-sft":
        from meditron_jax.eval.to_sft import mcq_to_sft

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
