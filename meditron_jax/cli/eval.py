"""`meditron-jax eval ppl|mcq ...`: the evaluation subcommand (argument parsing and output only).

Owns: flags, wiring and JSON output. Does not own: the evaluation itself (`perplexity.py`,
`mcq.py`, `tasks.py`) or model/tokenizer loading (`loader.py`).
"""

from __future__ import annotations

import json
import os
import sys

from meditron_jax.storage import paths
from meditron_jax.eval import loader


def add_arguments(parser):
    sub = parser.add_subparsers(dest="what", required=True, metavar="{ppl,mcq,plan}")
    from meditron_jax.plan import eval_plan as plan_eval
    plan_eval.add_arguments(sub.add_parser("plan", help="per-device memory of eval mcq on a mesh (AOT compile, "
                                                       "no weights); exit 1 if it does not fit"))

    ppl = sub.add_parser("ppl", help="token-weighted loss and perplexity on a preprocessed dataset")
    loader.add_model_arguments(ppl)
    ppl.add_argument("--data", required=True, help="directory written by `meditron-jax preprocess`")
    ppl.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: model context)")
    ppl.add_argument("--batch-size", type=int, default=4, help="rows per forward pass (default 4)")
    ppl.add_argument("--max-batches", type=int, default=None, help="stop after N batches")
    ppl.add_argument("--out", default=None, help="also write the JSON result here")

    mcq = sub.add_parser("mcq", help="k-shot medical multiple-choice exam accuracy")
    loader.add_model_arguments(mcq)
    mcq.add_argument("--task", required=True, help="pubmedqa | medmcqa | medqa | mmlu_medical | truthfulqa_mc")
    mcq.add_argument("--data", required=True, nargs="+",
                     help="exam file(s); for mmlu_medical also a directory of <subject>_test.csv")
    mcq.add_argument("--fewshot-data", nargs="+", default=None,
                     help="demonstration pool (default: the rest of a PubMedQA file outside --split-file, "
                          "else the test data itself, never using the question being asked)")
    mcq.add_argument("--split-file", default=None,
                     help="pubmedqa: the official test PMIDs (test_ground_truth.json or one PMID per line)")
    mcq.add_argument("--cop-base", type=int, choices=(0, 1), default=None,
                     help="medmcqa: whether `cop` counts from 0 (Hugging Face copy) or 1 (original files); required")
    mcq.add_argument("--shots", type=int, default=None,
                     help="demonstrations per prompt (default 3; truthfulqa_mc: 1 for a 7B model, 0 above 30B, "
                          "as on the Meditron card)")
    mcq.add_argument("--categories", default=None,
                     help="truthfulqa_mc: comma-separated categories, e.g. Health,Nutrition,Psychology,Science")
    mcq.add_argument("--fewshot-prompt", choices=("sampled", "qa_primer"), default="sampled",
                     help="truthfulqa_mc: demonstrations drawn from the file (default) or the release's fixed "
                          "six-pair QA primer")
    mcq.add_argument("--seeds", default="1234,432,32", help="comma-separated demonstration seeds")
    mcq.add_argument("--scoring", choices=("top_token", "loglik"), default="top_token",
                     help="top_token: the label's first token; loglik: each option's log-likelihood")
    mcq.add_argument("--limit", type=int, default=None, help="first N test items only")
    mcq.add_argument("--max-length", type=int, default=None, help="context length (default: the model's)")
    mcq.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")
    mcq.add_argument("--prompts", default=None, help="template file (default: the packaged prompts.json)")
    mcq.add_argument("--out", required=True, help="results JSON; per-item records go next to it (.items.jsonl)")
    mcq.add_argument("--records", default=None, help="per-item JSONL path (default: OUT minus .json + .items.jsonl)")
    mcq.add_argument("--no-progress", action="store_true", help="no progress bar")


def _writer() -> bool:
    """Multi-host runs: every process computes the same results; process 0 writes them."""
    import jax
    return jax.process_index() == 0


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise loader.LoadError(f"--seeds {text!r}: expected comma-separated integers") from None
    if not seeds:
        raise loader.LoadError("--seeds: need at least one seed")
    return seeds


def warn_dropped_demos(summary: dict, out: str) -> None:
    """One stderr line when a k-shot run did not show every item its k demonstrations."""
    d = summary.get("demonstrations") or {}
    if summary.get("shots") and (d.get("dropped") or d.get("items_truncated")):
        total = d["used"] + d["dropped"]
        print(f"warning: {d['dropped']} of {total} demonstrations were dropped to fit the context of "
              f"{summary.get('max_length')} tokens ({d['items_with_dropped_demos']} prompts had fewer than "
              f"{summary['shots']} shots, {d['items_truncated']} were left-truncated); per-item demo_ids "
              f"in the records next to {out}", file=sys.stderr)


def run_truthfulqa(args) -> int:
    from meditron_jax.eval import mcq, truthfulqa

    seeds = _parse_seeds(args.seeds)
    for path in (args.out, args.records):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise loader.LoadError(f"{path}: directory {os.path.dirname(os.path.abspath(path))} does not exist")
    cats = truthfulqa.parse_categories(args.categories)
    everything = truthfulqa.read(args.data)
    items = truthfulqa.select(everything, cats, ", ".join(args.data))
    pool = truthfulqa.read(args.fewshot_data) if args.fewshot_data else everything
    if args.limit is not None:
        items = items[: args.limit]
    model, tok, placement = loader.load_for_inference(args, batch=args.batch_size, seq_len=args.max_length,
                                                      cache_len=args.max_length or -1, what="eval mcq")
    shots = truthfulqa.default_shots(model.cfg) if args.shots is None else args.shots
    scorer = mcq.Scorer(model, batch_size=args.batch_size, placement=placement)
    summary, records = truthfulqa.evaluate(model, tok, items, shots=shots, seeds=seeds,
                                           fewshot_prompt=args.fewshot_prompt, pool=pool, scorer=scorer,
                                           progress=not args.no_progress, max_length=args.max_length)
    summary = {"checkpoint": args.checkpoint, "data": args.data, "categories": cats, **summary}
    if not _writer():
        return 0
    records_path = mcq.write_results(summary, records, args.out, args.records)
    print(json.dumps({k: summary[k] for k in ("task", "shots", "items", "mc1", "mc2")}
                     | {"per_category": {c: {"mc1": v["mc1"], "mc2": v["mc2"]} for c, v in summary["per_category"].items()}}))
    print(f"wrote {args.out} and {records_path}", file=sys.stderr)
    return 0


def run_mcq(args) -> int:
    from meditron_jax.eval import mcq, tasks

    if args.task == "truthfulqa_mc":
        return run_truthfulqa(args)
    if args.categories:
        raise tasks.TaskDataError("--categories is for --task truthfulqa_mc")
    args.shots = 3 if args.shots is None else args.shots
    task = tasks.check_task(args.task)
    if task == "medmcqa" and args.cop_base is None:
        raise tasks.TaskDataError("medmcqa needs --cop-base 0|1 (the Hugging Face copy is 0-based, "
                                  "the original files 1-based)")
    seeds = _parse_seeds(args.seeds)
    for path in (args.out, args.records):  # fail before the (long) evaluation, not after it
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise loader.LoadError(f"{path}: directory {os.path.dirname(os.path.abspath(path))} does not exist")
    prompts = mcq.load_prompts(args.prompts)
    template = mcq.PromptTemplate.for_task(task, prompts)
    kw = dict(cop_base=args.cop_base or 0, context_joiner=template.context_joiner, subjects=list(template.subjects))
    items, rest = tasks.load_items(task, args.data, split_file=args.split_file, **kw)
    if args.fewshot_data:
        pool, _ = tasks.load_items(task, args.fewshot_data, split="dev", **kw)
    else:
        pool = rest or items
    if args.limit is not None:
        items = items[: args.limit]
    model, tok, placement = loader.load_for_inference(args, batch=args.batch_size, seq_len=args.max_length,
                                                      cache_len=args.max_length or -1, what="eval mcq")
    scorer = mcq.Scorer(model, batch_size=args.batch_size, placement=placement)
    summary, records = mcq.evaluate(model, tok, items, pool, template, shots=args.shots, seeds=seeds,
                                    scoring=args.scoring, max_length=args.max_length,
                                    batch_size=args.batch_size, progress=not args.no_progress, scorer=scorer)
    summary = {"task": task, "checkpoint": args.checkpoint, "data": args.data,
               "fewshot_data": args.fewshot_data or ("rest of data outside --split-file" if rest else "data"),
               "pool_size": len(pool), **summary}
    if not _writer():
        return 0
    records_path = mcq.write_results(summary, records, args.out, args.records)
    print(json.dumps({k: summary[k] for k in ("task", "scoring", "shots", "accuracy", "accuracy_mean",
                                               "accuracy_std", "demonstrations")}))
    warn_dropped_demos(summary, args.out)
    print(f"wrote {args.out} and {records_path}", file=sys.stderr)
    return 0


def run_ppl(args) -> int:
    from meditron_jax.eval import perplexity

    if not paths.exists(args.checkpoint):  # local or gs:// (meditron_jax.storage.paths)
        raise loader.LoadError(f"{args.checkpoint}: no such checkpoint or model directory")
    tok = loader.load_tokenizer(args.tokenizer) if args.tokenizer else None
    fingerprint = tok.fingerprint if tok else loader.recorded_tokenizer(args.checkpoint, args.step).get("fingerprint")
    model, _, placement = loader.load_for_inference(args, batch=args.batch_size, seq_len=args.seq_len,
                                                    what="eval ppl", tokenizer=False)
    if tok is not None:
        loader.check_vocab(tok, model.cfg, args.tokenizer)
    result = perplexity.evaluate_dir(model, args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                                     max_batches=args.max_batches, progress=True,
                                     expected_fingerprint=fingerprint,
                                     placement=placement if placement.mesh is not None else None)
    result = {"checkpoint": args.checkpoint, **result}
    text = json.dumps(result)
    if not _writer():
        return 0
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.out)
    print(text)
    return 0


def run(args) -> int:
    if args.what == "plan":
        from meditron_jax.plan import eval_plan as plan_eval
        return plan_eval.run(args)
    return run_mcq(args) if args.what == "mcq" else run_ppl(args)
