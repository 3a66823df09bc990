"""Weight conversion between meditron-jax checkpoints and the Hugging Face / Meta formats,
streamed tensor by tensor.

Modules: `importer` (HF or Meta weights -> a step-0 checkpoint), `exporter` (a checkpoint -> HF
safetensors or Meta consolidated.pth, with tokenizer files), `hf` (the one HF key/layout table,
loading an HF directory), `meta` (params.json, the q/k RoPE row permutation), `io` (safetensors
and .bin readers), `stream` (block-wise reading and writing through Orbax's public API),
`tokenizer_files` (HF tokenizer files from a SentencePiece model).
"""
