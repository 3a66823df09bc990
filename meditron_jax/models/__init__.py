"""The model: Llama-2 in Flax NNX and its configuration.

Modules: `config` (`LlamaConfig`, the presets `tiny`, `llama2_7b/13b/70b`, `meditron_7b/70b`, the
Hugging Face `config.json` mapping, gin `model.*`), `llama` (the network: embeddings, stacked
decoder layers run by `lax.scan`, remat policies, KV cache, the loss's logits; parameters under
Hugging Face names with their logical axes), `attention` (the attention implementations behind
`model.attention`).

Owns no mesh, PartitionSpec, file or loop: the model names logical axes (`batch, length, embed,
heads, ...`) and `distributed.sharding` maps them to devices.
"""
