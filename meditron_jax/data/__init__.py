"""Data: the tokenizer, corpus preprocessing, the grain training data loader, SFT data and the
demo corpus.

Submodules are imported on use so that `import meditron_jax.data` stays cheap: `jsonl` (the one
JSONL reader), `tokenizer`, `preprocess` (JSONL -> ArrayRecord shards + manifest), `config` (gin
`data.*`), `loader` (grain: per-source datasets, weighted mixture, packing, this host's rows,
resumable state) and its per-element steps `transforms`, `sft`, `demo`. Nothing here imports
evaluation code (`meditron_jax.eval`), the model or the training loop.
"""
