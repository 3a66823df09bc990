"""Data: the tokenizer, corpus preprocessing, the grain training pipeline, SFT data and the demo corpus.

Submodules are imported on use (`meditron_jax.data.jsonl` (the one JSONL reader), `.tokenizer`,
`.preprocess`, `.pipeline` and its per-element steps `.transforms`, `.sft`, `.demo`) so that
`import meditron_jax.data` stays cheap. Nothing here imports evaluation code (`meditron_jax.eval`).
"""
