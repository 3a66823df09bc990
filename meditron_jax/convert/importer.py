"""`meditron-jax import --from hf|meta SRC --out CKPT_DIR [--preset NAME]`: Llama-2 weights ->
a step-0 checkpoint (`CKPT_DIR/0/{params,meta}`, fp32 parameters, no optimizer state) that
`train.init_from=CKPT_DIR`, `from_pretrained(CKPT_DIR)` and `export` read.

Owns: choosing the model config (source config, optionally checked against a preset whose
non-architecture settings are kept; the vocab size always comes from the source), validating
every source tensor before writing anything, recording the source's `tokenizer.model` (which
`export` then writes by default), and feeding the tensors block by block to
`stream.write_checkpoint`. Does not own: the formats (`io.py`, `meta.py`), the layouts
(`hf.py`), the checkpoint writer (`stream.py`).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Iterator

import numpy as np

from meditron_jax.storage import checkpoint as ckpt
from meditron_jax.models.config import LlamaConfig, preset
from meditron_jax.convert import hf
from meditron_jax.convert.io import ConversionError, HFWeights, Scratch
from meditron_jax.convert.stream import (StreamedArray, assign, block_indices, block_plan,
                                         write_checkpoint)
from meditron_jax.errors import UserError, storage_faults
from meditron_jax.models.llama import param_shapes

ARCH_FIELDS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
               "rms_norm_eps", "rope_theta")


def with_preset(src: LlamaConfig, name: str | None) -> LlamaConfig:
    if name is None:
        return src
    p = preset(name)
    diff = [f"{f}: source {getattr(src, f)}, preset {getattr(p, f)}" for f in ARCH_FIELDS
            if getattr(src, f) != getattr(p, f)]
    if diff:
        raise UserError(f"--preset {name} does not match the source model ({'; '.join(diff)})")
    return p.replace(vocab_size=src.vocab_size)


def open_source(fmt: str, src: str):
    """(config, weights) where weights has keys/shape/read in Hugging Face names and layouts."""
    if fmt == "hf":
        cfg = hf.read_hf_config(src)
        return cfg, HFWeights(src)
    from meditron_jax.convert.meta import MetaWeights
    w = MetaWeights(src)
    return w.cfg, w


def check_source(cfg: LlamaConfig, weights, src: str, config_name: str) -> None:
    """Every tensor present with the shape the config implies (before anything is written)."""
    have = set(weights.keys())
    for name in hf.KEY_TABLE:
        for key in hf.hf_names(name, cfg):
            if key not in have:
                raise ConversionError(f"{src}: tensor {key} is missing from the weights")
            shape, want = tuple(weights.shape(key)), hf.hf_shape(name, cfg)
            if shape != want:
                raise ConversionError(f"{src}: tensor {key} has shape {shape}, {config_name} implies {want}")


def _blocks(name: str, cfg: LlamaConfig, weights, src: str, scratch: Scratch) -> Iterator[tuple[tuple, np.ndarray]]:
    """Our-layout fp32 blocks of parameter `name`, reading one source tensor at a time into
    `scratch`."""
    shape = param_shapes(cfg)[name]
    stacked = name in hf.STACKED
    for layer, key in enumerate(hf.hf_names(name, cfg)):
        w = weights.read(key, scratch)  # its errors name the file
        try:
            view = hf.layout_view(name, w, cfg)
        except ConversionError as e:
            raise ConversionError(f"{src}: {e}") from None
        del w
        for idx in block_indices(name, shape, layer if stacked else None):
            sub = idx[1:] if stacked else idx
            full = shape[1:] if stacked else shape
            dst, srcs, bshape = [], [], []
            for s, n_full, n_have in zip(sub, full, view.shape):
                start, stop = s.start or 0, n_full if s.stop is None else s.stop
                have = max(0, min(stop, n_have) - start)  # rows past the true vocab are padding
                bshape.append(stop - start)
                dst.append(slice(0, have))
                srcs.append(slice(start, start + have))
            padded = tuple(bshape) != tuple(d.stop for d in dst)
            block = (np.zeros if padded else np.empty)(bshape, np.float32)
            assign(block[tuple(dst)], view[tuple(srcs)])
            yield idx, block
        del view


def streamed_params(cfg: LlamaConfig, weights, src: str) -> dict[str, StreamedArray]:
    out, scratch = {}, Scratch()
    for name, shape in param_shapes(cfg).items():
        out[name] = StreamedArray(shape=shape, dtype=np.dtype(np.float32), chunk_shape=block_plan(name, shape)[2],
                                  blocks=functools.partial(_blocks, name, cfg, weights, src, scratch))
    return out


def source_tokenizer(src: str) -> dict | None:
    """The record of `SRC/tokenizer.model` (+ `added_tokens.json` when its ids follow the base
    vocab), as `data.tokenizer.Tokenizer.info()` gives it; None when there is none."""
    path = os.path.join(src, "tokenizer.model")
    if not os.path.isfile(path):
        return None
    from meditron_jax.data.tokenizer import Tokenizer

    added: list[str] = []
    added_path = os.path.join(src, "added_tokens.json")
    try:
        base = Tokenizer(path)
        if os.path.isfile(added_path):
            with open(added_path) as f:
                ids = json.load(f)
            order = sorted(ids, key=ids.get)
            if [ids[t] for t in order] == list(range(base.base_vocab_size, base.base_vocab_size + len(order))):
                added = order
        return Tokenizer(path, added).info()
    except (UserError, OSError, ValueError, AttributeError):
        return None  # not a usable SentencePiece model: record nothing rather than fail the import


def import_weights(fmt: str, src: str, out: str, preset_name: str | None = None,
                   overwrite: bool = False) -> str:
    """Convert; returns the step directory written (`out/0`)."""
    src = os.path.abspath(src)
    src_cfg, weights = open_source(fmt, src)
    check_source(src_cfg, weights, src, "config.json" if fmt == "hf" else "params.json")
    cfg = with_preset(src_cfg, preset_name)
    meta = ckpt.meta_record(cfg, tokenizer=source_tokenizer(src), source={"format": fmt, "path": src})
    with storage_faults("import to", os.path.abspath(out), needed=4 * cfg.num_params(),
                        hint="the partial output was removed"):
        return write_checkpoint(out, streamed_params(cfg, weights, src), meta, overwrite=overwrite,
                                desc=f"import {os.path.basename(src)}")
