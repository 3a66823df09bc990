"""Evaluation and generation: perplexity, k-shot medical exams, KV-cache decoding.

Modules: `tasks` (exam file readers: PubMedQA, MedMCQA, MedQA, MMLU), `mcq` (prompts,
demonstrations, scoring rules, results), `scoring` (`Row`, `Scorer`: batched jitted log-prob
queries with a shared-prefix KV cache), `to_sft` (exam training splits -> SFT JSONL),
`perplexity` (token-weighted loss on preprocessed data), `generate` (prefill + jitted decode
with sampling; also the `generate` subcommand), `loader` (model + tokenizer for the CLIs),
`cli` (the `eval` subcommand), `distributed` (the inference mesh: loading onto it, KV-cache
shardings, the memory fit check), `truthfulqa` (TruthfulQA MC1/MC2), `plan_eval` (`eval plan`),
`lm_eval_backend` / `lm_eval_cli` (the lm-evaluation-harness model type). Templates live in
`prompts.json`.
"""
