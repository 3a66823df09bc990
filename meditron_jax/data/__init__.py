"""Data: the tokenizer, corpus preprocessing, the grain training pipeline, SFT data and the demo corpus.

Submodules are imported on use (`meditron_jax.data.tokenizer`, `.preprocess`, `.pipeline`, `.sft`,
`.demo`) so that `import meditron_jax.data` stays cheap.
"""
