"""Evaluation and generation: perplexity, k-shot medical exams, KV-cache decoding.

Modules: `tasks` (exam file readers: PubMedQA, MedMCQA, MedQA, MMLU), `mcq` (prompts,
demonstrations, scoring rules, results), `scoring` (`Row`, `Scorer`: batched jitted log-prob
queries with a shared-prefix KV cache), `to_sft` (exam training splits -> SFT JSONL),
`perplexity` (token-weighted loss on preprocessed data), `generate` (prefill + jitted decode
with sampling), `loader` (model + tokenizer for the command lines), `distributed` (the
inference mesh: loading onto it, KV-cache shardings, the memory fit check), `truthfulqa`
(TruthfulQA MC1/MC2), `lm_eval_backend` (the lm-evaluation-harness model type). Templates live
in `prompts.json`. The subcommands (`eval`, `generate`, `lm-eval`) are in `cli/`; `eval plan`'s
compile is `plan/eval_plan.py`; the held-out loss during training is `training/eval_hook.py`.
"""
