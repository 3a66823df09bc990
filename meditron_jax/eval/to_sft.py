"""Exam training splits -> {"prompt", "completion"} JSONL in exactly the evaluation's format
(`meditron-jax data mcq-to-sft`).

Owns: turning an exam's training split into prompt/completion pairs in the zero-shot format of
`eval mcq` (instruction, question block, "The answer is:" -> gold label), so a model fine-tuned
on it (configs/sft_*.gin, loss on the answer only) is evaluated with `meditron-jax eval mcq
--shots 0` on the prompts it was trained on. The output is written under a temporary name and
renamed into place when complete.
Does not own: exam readers (`eval.tasks`), templates (`eval/prompts.json`, `eval.mcq`), SFT
tokenization and loss masks (`data.sft`), the command line (`meditron_jax.cli.data`).
"""

from __future__ import annotations

import dataclasses
import json
import os

from meditron_jax.eval import mcq, tasks


def mcq_to_sft(task: str, inputs: list[str], out: str, cop_base: int | None = None, split_file: str | None = None,
               prompts: str | None = None, instruction: bool = True) -> int:
    """Writes `out` (JSONL: prompt, completion, id per item) and returns the number of pairs."""
    tasks.check_task(task)
    if task == "medmcqa" and cop_base is None:
        raise tasks.TaskDataError("medmcqa needs --cop-base 0|1 (the Hugging Face copy is 0-based, the "
                                  "original files 1-based)")
    template = mcq.PromptTemplate.for_task(task, mcq.load_prompts(prompts))
    if not instruction:
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
