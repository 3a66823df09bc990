"""Hugging Face `LlamaForCausalLM` <-> meditron-jax parameters: a declarative key table.

Owns: the name table, per-tensor layout transforms (transposes, head splits, vocab pad/unpad,
layer stacking), pure in-memory `from_hf` / `to_hf` on numpy arrays, and `load_hf_dir`
(config.json + weights -> config, params). Does not own: file formats (`io.py`) or the
Meta layout (`meta.py`).

Our layouts (see model.py): q/k/v_proj [L, D, heads, H], o_proj [L, N, H, D],
gate/up_proj [L, D, F], down_proj [L, F, D], embed_tokens [Vp, D], lm_head [D, Vp].
Hugging Face stores nn.Linear weights as [out, in], unstacked per layer.
"""

from __future__ import annotations

import json
import os

import numpy as np

from meditron_jax.models.config import ConfigError, LlamaConfig
from meditron_jax.convert.io import ConversionError, HFWeights

# our name -> (HF name template, transform kind). `{i}` is the layer index.
KEY_TABLE: dict[str, tuple[str, str]] = {
    "embed_tokens": ("model.embed_tokens.weight", "vocab_rows"),
    "q_proj": ("model.layers.{i}.self_attn.q_proj.weight", "in_heads"),
    "k_proj": ("model.layers.{i}.self_attn.k_proj.weight", "in_kv_heads"),
    "v_proj": ("model.layers.{i}.self_attn.v_proj.weight", "in_kv_heads"),
    "o_proj": ("model.layers.{i}.self_attn.o_proj.weight", "out_heads"),
    "gate_proj": ("model.layers.{i}.mlp.gate_proj.weight", "linear"),
    "up_proj": ("model.layers.{i}.mlp.up_proj.weight", "linear"),
    "down_proj": ("model.layers.{i}.mlp.down_proj.weight", "linear"),
    "input_layernorm": ("model.layers.{i}.input_layernorm.weight", "copy"),
    "post_attention_layernorm": ("model.layers.{i}.post_attention_layernorm.weight", "copy"),
    "norm": ("model.norm.weight", "copy"),
    "lm_head": ("lm_head.weight", "vocab_cols"),
}
STACKED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "input_layernorm", "post_attention_layernorm")


def hf_names(name: str, cfg: LlamaConfig) -> list[str]:
    template = KEY_TABLE[name][0]
    if name in STACKED:
        return [template.format(i=i) for i in range(cfg.num_layers)]
    return [template]


def hf_shape(name: str, cfg: LlamaConfig) -> tuple[int, ...]:
    D, F, N, K, H, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                        cfg.head_dim, cfg.vocab_size)
    return {"embed_tokens": (V, D), "q_proj": (N * H, D), "k_proj": (K * H, D), "v_proj": (K * H, D),
            "o_proj": (D, N * H), "gate_proj": (F, D), "up_proj": (F, D), "down_proj": (D, F),
            "input_layernorm": (D,), "post_attention_layernorm": (D,), "norm": (D,),
            "lm_head": (V, D)}[name]


def layout_view(name: str, w: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
    """One HF tensor (one layer's) seen in our layout, sharing memory with `w` (no copy), at
    the true vocab size (the padded rows/columns are not part of the view). The one layout
    table: `tensor_from_hf` / `tensor_to_hf` and the streaming conversion all go through it.

    Streaming conversion slices blocks out of this view: reading `view[block]` converts a block
    from HF to ours, writing into `view[block]` of an HF-shaped buffer converts ours to HF.
    """
    kind = KEY_TABLE[name][1]
    expected = hf_shape(name, cfg)
    if tuple(w.shape) != expected:
        raise ConversionError(f"{KEY_TABLE[name][0]}: shape {tuple(w.shape)} disagrees with config {expected}")
    D, H = cfg.hidden_size, cfg.head_dim
    if kind in ("copy", "vocab_rows"):
        v = w[...]
    elif kind in ("linear", "vocab_cols"):
        v = w.T
    else:  # [N*H, D].T -> [D, N, H] (q/k/v) or [D, N*H].T -> [N, H, D] (o); copy=False raises
        shape = {"in_heads": (D, cfg.num_heads, H), "in_kv_heads": (D, cfg.num_kv_heads, H),
                 "out_heads": (cfg.num_heads, H, D)}[kind]  # instead of silently copying
        v = np.reshape(w.T, shape, copy=False)
    return v


def _unpadded(view_shape) -> tuple[slice, ...]:
    """The part of our (vocab-padded) layout that an HF tensor's `layout_view` covers."""
    return tuple(slice(0, n) for n in view_shape)


def tensor_from_hf(name: str, w: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
    """One HF tensor (one layer's, for stacked names) -> our layout (no layer axis), a
    contiguous array; the padded vocab rows/columns are zero."""
    v = layout_view(name, w, cfg)
    kind = KEY_TABLE[name][1]
    if kind not in ("vocab_rows", "vocab_cols") or cfg.padded_vocab_size == cfg.vocab_size:
        return np.ascontiguousarray(v)
    shape = (cfg.padded_vocab_size, v.shape[1]) if kind == "vocab_rows" else (v.shape[0], cfg.padded_vocab_size)
    out = np.zeros(shape, w.dtype)
    out[_unpadded(v.shape)] = v
    return out


def tensor_to_hf(name: str, a: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
    """Inverse of `tensor_from_hf` (drops the padded vocab)."""
    a = np.asarray(a)
    out = np.empty(hf_shape(name, cfg), a.dtype)
    view = layout_view(name, out, cfg)
    view[...] = a[_unpadded(view.shape)]
    return out


def _gather(cfg: LlamaConfig, get, where: str = "") -> dict[str, np.ndarray]:
    """Our params from `get(hf_key)` (None: missing), stacking the per-layer tensors."""
    params = {}
    for name in KEY_TABLE:
        parts = []
        for key in hf_names(name, cfg):
            w = get(key)
            if w is None:
                raise ConversionError(f"{where}tensor {key} is missing" + (" from the weights" if where else ""))
            try:
                parts.append(tensor_from_hf(name, w, cfg))
            except ConversionError as e:
                raise ConversionError(f"{where}{e}") from None
        params[name] = np.stack(parts) if name in STACKED else parts[0]
    return params


def from_hf(state_dict: dict[str, np.ndarray], cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """HF state dict (numpy) -> our params (numpy, source dtype kept)."""
    return _gather(cfg, state_dict.get)


def to_hf(params: dict[str, np.ndarray], cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """Our params -> HF state dict (numpy), at the true vocab size."""
    sd = {}
    for name in KEY_TABLE:
        keys = hf_names(name, cfg)
        value = np.asarray(params[name])
        if name in STACKED:
            for i, key in enumerate(keys):
                sd[key] = tensor_to_hf(name, value[i], cfg)
        else:
            sd[keys[0]] = tensor_to_hf(name, value, cfg)
    return sd


def read_hf_config(directory: str) -> LlamaConfig:
    if not os.path.exists(directory):
        raise ConversionError(f"{directory}: no such file or directory")
    if not os.path.isdir(directory):
        raise ConversionError(f"{directory}: not a directory")
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise ConversionError(f"{directory}: no config.json (not a Hugging Face model directory)")
    try:
        with open(path) as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: unreadable JSON ({e})") from None
    try:
        return LlamaConfig.from_hf(hf)
    except (ConfigError, KeyError) as e:
        raise ConversionError(f"{path}: {e if isinstance(e, ConfigError) else 'missing key ' + str(e)}") from None


def load_hf_dir(directory: str) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """config.json + weights -> (config, our params as numpy). In memory (see import for streaming)."""
    cfg = read_hf_config(directory)
    weights = HFWeights(directory)
    have = set(weights.keys())
    return cfg, _gather(cfg, lambda key: weights.get(key) if key in have else None, f"{directory}: ")
