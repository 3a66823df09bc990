"""Evaluation and generation: perplexity, k-shot medical exams, KV-cache decoding.

Modules: `tasks` (exam file readers), `mcq` (prompts, demonstrations, scoring, results),
`perplexity` (token-weighted loss on preprocessed data), `generate` (prefill + jitted decode
with sampling; also the `generate` subcommand), `loader` (model + tokenizer for the CLIs),
`cli` (the `eval` subcommand). Templates live in `prompts.json`.
"""
