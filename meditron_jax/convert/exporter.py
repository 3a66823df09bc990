"""`meditron-jax export CKPT_DIR [--step N] --to hf|meta --out DIR [--dtype ...] [--tokenizer F]`.

Owns: turning the `params` of any checkpoint (imported, or written by the trainer from any
mesh, with or without optimizer state: only `params` and `meta` are read) into
- `--to hf`: `config.json` (LlamaForCausalLM, true vocab size), `generation_config.json`,
  safetensors shards of at most `--max-shard-size` (`model.safetensors` when one suffices,
  else `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`) and, with a
  tokenizer, the tokenizer files of `tokenizer_files.py`;
- `--to meta`: `params.json` + `consolidated.00.pth`.
Every output tensor is assembled from checkpoint blocks read one at a time, so memory stays
at about one tensor whatever the model size. The output is built under a temporary name and
renamed at the end.

Default dtype: bfloat16 (what Llama-2 / Meditron are published in; half the bytes). Use
`--dtype float32` for an exact copy of the fp32 training weights.
Does not own: the checkpoint reader (`stream.py`), layouts (`hf.py`, `meta.py`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait

import ml_dtypes
import numpy as np

from meditron_jax.models.config import LlamaConfig
from meditron_jax.convert import hf
from meditron_jax.convert.io import SafetensorsWriter
from meditron_jax.convert.stream import (CheckpointReader, assign, block_indices, commit_dir,
                                         progress, staging_dir)
from meditron_jax.convert.tokenizer_files import write_tokenizer_files
from meditron_jax.storage import staging as storage
from meditron_jax.errors import UserError, storage_faults
from meditron_jax.models.llama import param_shapes

SOURCE_FILE = "meditron_jax_export.json"  # which checkpoint and step an export came from
DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32),
          "float16": np.dtype(np.float16)}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m:
        raise UserError(f"--max-shard-size {text!r}: expected a size like 5GB or 500MB")
    unit = m.group(2).rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    n = int(float(m.group(1)) * scale)
    if n <= 0:
        raise UserError(f"--max-shard-size {text!r} must be positive")
    return n


# ---- one output tensor, assembled from checkpoint blocks -----------------------------------
def hf_tensor(reader: CheckpointReader, name: str, layer: int | None, dtype: np.dtype) -> np.ndarray:
    """The Hugging Face tensor of parameter `name` (layer `layer`) in `dtype`."""
    cfg = reader.cfg
    shape = param_shapes(cfg)[name]
    out = np.empty(hf.hf_shape(name, cfg), dtype)
    view = hf.layout_view(name, out, cfg)  # our layout, writes land in `out`
    stacked = layer is not None
    indices = iter(block_indices(name, shape, layer))
    pending: deque = deque()

    def submit():
        idx = next(indices, None)
        if idx is not None:
            pending.append((idx, reader.read_async(name, idx)))

    submit()
    while pending:
        idx, fut = pending.popleft()
        submit()  # the next read runs while this block is converted
        try:
            block = np.asarray(fut.result())
        except Exception as e:
            raise UserError(f"{reader.item}: cannot read {name} ({str(e).splitlines()[0]})") from None
        sub = idx[1:] if stacked else idx
        dst, src = [], []
        for d, (s, n_have) in enumerate(zip(sub, view.shape)):
            start = s.start or 0
            stop = min(start + block.shape[d], n_have)  # the padded vocab is dropped
            dst.append(slice(start, stop))
            src.append(slice(0, max(0, stop - start)))
        assign(view[tuple(dst)], block[tuple(src)])
    return out


def hf_order(cfg: LlamaConfig) -> list[tuple[str, str, int | None]]:
    """(HF key, our name, layer) in the order transformers writes them."""
    order = [(hf.hf_names("embed_tokens", cfg)[0], "embed_tokens", None)]
    for i in range(cfg.num_layers):
        order += [(hf.hf_names(name, cfg)[i], name, i) for name in hf.STACKED]
    order += [(hf.hf_names(n, cfg)[0], n, None) for n in ("norm", "lm_head")]
    return order


def export_hf(reader: CheckpointReader, out: str, dtype: np.dtype, max_shard: int) -> None:
    cfg = reader.cfg
    order = hf_order(cfg)
    size = {key: int(np.prod(hf.hf_shape(name, cfg))) * dtype.itemsize for key, name, _ in order}
    shards: list[list] = [[]]
    used = 0
    for item in order:
        if shards[-1] and used + size[item[0]] > max_shard:
            shards.append([])
            used = 0
        shards[-1].append(item)
        used += size[item[0]]
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    bar = progress(sum(size.values()), f"export {os.path.basename(out.rstrip('/'))}")
    weight_map = {}
    # One writer thread: tensor i goes to disk while tensor i+1 is read and converted (at
    # most two tensors in memory).
    with ThreadPoolExecutor(1, thread_name_prefix="export_write") as pool:
        pending = w = None
        try:
            for fname, shard in zip(names, shards):
                specs = [(key, hf.hf_shape(name, cfg), dtype) for key, name, _ in shard]
                w = SafetensorsWriter(os.path.join(out, fname), specs, metadata={"format": "pt"})
                for key, name, layer in shard:
                    tensor = hf_tensor(reader, name, layer, dtype)
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(w.write, key, tensor)
                    weight_map[key] = fname
                    bar.update(size[key])
                pending.result()
                pending = None
                w.close()
        finally:
            if pending is not None:
                pending.cancel()
                wait([pending])
            if w is not None:
                w.abort()  # no-op after close(); after a failure it releases the file's space
            bar.close()
    if len(shards) > 1:
        _write_json(os.path.join(out, "model.safetensors.index.json"),
                    {"metadata": {"total_size": sum(size.values())}, "weight_map": weight_map})
    torch_dtype = {"bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}[dtype.name]
    _write_json(os.path.join(out, "config.json"), cfg.to_hf(torch_dtype=torch_dtype))
    _write_json(os.path.join(out, "generation_config.json"),
                {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "max_length": cfg.max_position_embeddings})


def export_meta(reader: CheckpointReader, out: str, dtype: np.dtype) -> None:
    from meditron_jax.convert import meta

    cfg = reader.cfg
    specs, source = [], {}
    order = [("embed_tokens", None)] + [(n, i) for i in range(cfg.num_layers) for n in hf.STACKED] + \
            [("norm", None), ("lm_head", None)]
    for name, layer in order:
        key = meta.meta_names(name, cfg)[layer or 0]
        specs.append((key, hf.hf_shape(name, cfg), dtype))
        source[key] = (name, layer)

    def produce(key):
        name, layer = source[key]
        w = hf_tensor(reader, name, layer, dtype)
        heads = meta.rope_rows_heads(name, cfg)
        return meta.hf_to_meta_rows(w, heads) if heads is not None else w

    total = sum(int(np.prod(s)) * dtype.itemsize for _, s, _ in specs)
    bar = progress(total, f"export {os.path.basename(out.rstrip('/'))}")
    try:
        meta.write_consolidated(os.path.join(out, "consolidated.00.pth"), specs, produce, bar.update)
    finally:
        bar.close()
    _write_json(os.path.join(out, "params.json"), meta.params_json(cfg))


# ---- tokenizer files -----------------------------------------------------------------------
def _added_tokens(values: list[str] | None) -> list[str]:
    if not values:
        return []
    if len(values) == 1 and values[0].endswith(".json") and os.path.isfile(values[0]):
        try:
            with open(values[0]) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"--added-tokens {values[0]}: unreadable JSON ({e})") from None
        if isinstance(data, dict):  # HF added_tokens.json: {token: id}
            data = [t for t, _ in sorted(data.items(), key=lambda kv: kv[1])]
        if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
            raise UserError(f"--added-tokens {values[0]}: expected a list of strings or {{token: id}}")
        return data
    return list(values)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def export(checkpoint: str, target: str, out: str, step: int | None = None, dtype: str = "bfloat16",
           max_shard_size: str = "5GB", tokenizer: str | None = None, added_tokens: list[str] | None = None,
           overwrite: bool = False, use_recorded_tokenizer: bool = True) -> str:
    reader = CheckpointReader(checkpoint, step)
    dt = DTYPES[dtype]
    max_shard = parse_size(max_shard_size)
    added = _added_tokens(added_tokens)
    recorded = reader.meta.get("tokenizer") or {}
    recorded = {"path": recorded} if isinstance(recorded, str) else recorded
    from_record = use_recorded_tokenizer and tokenizer is None and bool(recorded)
    if from_record:
        from meditron_jax.storage.tokenizer_store import recorded_file
        tokenizer = recorded_file(recorded)  # the recorded file, or the copy stored in the checkpoint
        if tokenizer is not None:
            added = added or list(recorded.get("added_tokens") or [])
        elif recorded.get("path"):
            from meditron_jax import console
            console.log.warning(f"the checkpoint records tokenizer {recorded['path']}, which does not exist here "
                                "and is not stored in the checkpoint: no tokenizer files written (pass --tokenizer)")
    if tokenizer is not None and not os.path.isfile(tokenizer):
        raise UserError(f"--tokenizer {tokenizer}: no such file")
    if added and tokenizer is None:
        raise UserError("--added-tokens needs --tokenizer")
    tmp = staging_dir(out, overwrite, "export")
    needed = reader.cfg.num_params() * dt.itemsize  # the tensors; the JSON and tokenizer files are small
    try:
        with storage_faults("export to", os.path.abspath(out), needed=needed, hint="the partial output was removed"):
            if target == "hf":
                if tokenizer is not None:  # first: a bad tokenizer fails before the long part
                    write_tokenizer_files(tokenizer, added, reader.cfg.vocab_size,
                                          reader.cfg.max_position_embeddings, tmp)
                export_hf(reader, tmp, dt, max_shard)
            else:
                export_meta(reader, tmp, dt)
                if tokenizer is not None:
                    shutil.copyfile(tokenizer, os.path.join(tmp, "tokenizer.model"))
            _write_json(os.path.join(tmp, SOURCE_FILE),
                        {"checkpoint": reader.root, "step": reader.step, "format": target, "dtype": dtype,
                         "tokenizer": (recorded.get("path") if from_record else tokenizer) if tokenizer else None,
                         "tokenizer_fingerprint": recorded.get("fingerprint") if tokenizer and from_record else None})
            commit_dir(tmp, out)
    except BaseException:
        storage.discard_dir(tmp)
        raise
    return os.path.abspath(out)
