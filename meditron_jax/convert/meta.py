"""Meta's Llama-2 release format: `params.json` + `consolidated.NN.pth`, read and written.

Owns: the Meta name table, merging Meta's model-parallel shards, the q/k RoPE row permutation
between Meta's layout and Hugging Face's (ours), `params.json` <-> `LlamaConfig`, and a
streaming writer for `consolidated.00.pth` (one tensor in memory at a time). Does not own:
our parameter layout (`hf.py` maps HF tensors to it; Meta tensors are mapped to HF tensors
here first), the checkpoint side (`stream.py`), the CLI.

Why q/k rows are permuted. RoPE rotates pairs of coordinates of each query/key head. Meta's
reference code (`apply_rotary_emb`) views a head as H/2 complex numbers, so it rotates
*adjacent* pairs (x[2j], x[2j+1]) by angle pos * theta^(-2j/H). Hugging Face's (and our)
`rotate_half` rotates the pairs (x[j], x[j + H/2]) by the same angle. The two are the same
function of the weights up to a fixed permutation of each head's H output rows of wq and wk:
HF row j comes from Meta row 2j and HF row j + H/2 from Meta row 2j + 1. Because q.k sums over
the head dimension, permuting q and k alike leaves every attention score unchanged, and v/o
are not rotated, so only wq (per query head) and wk (per kv head) are permuted. This is the
`permute` of transformers' convert_llama_weights_to_hf.py; `meta_to_hf_rows` is it and
`hf_to_meta_rows` its inverse.

Model parallelism. Meta's 13B/70B checkpoints are split over MP ranks (fairscale layers):
column-parallel wq/wk/wv/w1/w3/output are split along dim 0 (output features), row-parallel
wo/w2 along dim 1 (input features), the ParallelEmbedding tok_embeddings along dim 1 (the
embedding dimension), and norms are replicated. Merging concatenates along that dimension.
"""

from __future__ import annotations

import glob
import json
import os
import re
import struct
import zlib
from typing import Callable

import numpy as np

from meditron_jax.models.config import ConfigError, LlamaConfig
from meditron_jax.convert import hf
from meditron_jax.convert.io import ConversionError, release_pages, torch_load, torch_to_numpy, write_all

# our name -> (Meta name template, dimension split across model-parallel shards or None)
META_KEYS: dict[str, tuple[str, int | None]] = {
    "embed_tokens": ("tok_embeddings.weight", 1),
    "q_proj": ("layers.{i}.attention.wq.weight", 0),
    "k_proj": ("layers.{i}.attention.wk.weight", 0),
    "v_proj": ("layers.{i}.attention.wv.weight", 0),
    "o_proj": ("layers.{i}.attention.wo.weight", 1),
    "gate_proj": ("layers.{i}.feed_forward.w1.weight", 0),
    "down_proj": ("layers.{i}.feed_forward.w2.weight", 1),
    "up_proj": ("layers.{i}.feed_forward.w3.weight", 0),
    "input_layernorm": ("layers.{i}.attention_norm.weight", None),
    "post_attention_layernorm": ("layers.{i}.ffn_norm.weight", None),
    "norm": ("norm.weight", None),
    "lm_head": ("output.weight", 0),
}
IGNORED = ("rope.freqs",)  # Llama-1 checkpoints carry the RoPE table; it is recomputed


def meta_to_hf_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta wq/wk [n*H, D] (adjacent rotary pairs) -> HF rows (rotate-half pairs)."""
    rows, d = w.shape
    h = rows // n_heads
    return np.ascontiguousarray(w.reshape(n_heads, h // 2, 2, d).transpose(0, 2, 1, 3).reshape(rows, d))


def hf_to_meta_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `meta_to_hf_rows`."""
    rows, d = w.shape
    h = rows // n_heads
    return np.ascontiguousarray(w.reshape(n_heads, 2, h // 2, d).transpose(0, 2, 1, 3).reshape(rows, d))


def rope_rows_heads(name: str, cfg: LlamaConfig) -> int | None:
    """Number of heads whose rows `meta_to_hf_rows` permutes for parameter `name`, else None."""
    return {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}.get(name)


def meta_names(name: str, cfg: LlamaConfig) -> list[str]:
    template = META_KEYS[name][0]
    if name in hf.STACKED:
        return [template.format(i=i) for i in range(cfg.num_layers)]
    return [template]


# ---- params.json ----------------------------------------------------------------------------
def _meta_ffn(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward hidden size rule."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def params_json(cfg: LlamaConfig) -> dict:
    """Meta's ModelArgs for `cfg` (vocab_size is the true one; Meta's loader also accepts it)."""
    p = {"dim": cfg.hidden_size, "n_layers": cfg.num_layers, "n_heads": cfg.num_heads}
    if cfg.num_kv_heads != cfg.num_heads:
        p["n_kv_heads"] = cfg.num_kv_heads
    for multiple_of, mult in ((256, None), (4096, 1.3), (1024, 1.3), (256, 1.3)):
        if _meta_ffn(cfg.hidden_size, multiple_of, mult) == cfg.intermediate_size:
            break
    else:  # not a Llama-2 size: pick a multiplier that reproduces it exactly
        multiple_of, mult = 1, (cfg.intermediate_size + 0.5) / int(2 * (4 * cfg.hidden_size) / 3)
    p["multiple_of"] = multiple_of
    if mult is not None:
        p["ffn_dim_multiplier"] = mult
    p["norm_eps"] = cfg.rms_norm_eps
    p["vocab_size"] = cfg.vocab_size
    if cfg.rope_theta != 10000.0:
        p["rope_theta"] = cfg.rope_theta
    return p


class MetaWeights:
    """A Meta checkpoint directory, seen as Hugging Face tensors (names, layouts) read lazily:
    `shape(hf_key)` and `read(hf_key)` give the merged, permuted tensor."""

    def __init__(self, directory: str):
        self.directory = directory
        if not os.path.isdir(directory):
            raise ConversionError(f"{directory}: no such directory")
        pj = os.path.join(directory, "params.json")
        try:
            with open(pj) as f:
                self.params = json.load(f)
        except FileNotFoundError:
            raise ConversionError(f"{directory}: no params.json (not a Meta checkpoint directory)") from None
        except (OSError, ValueError) as e:
            raise ConversionError(f"{pj}: unreadable JSON ({e})") from None
        files = sorted(glob.glob(os.path.join(directory, "consolidated.*.pth")))
        ranks = [int(m.group(1)) for f in files if (m := re.search(r"consolidated\.(\d+)\.pth$", f))]
        if not files:
            raise ConversionError(f"{directory}: no consolidated.*.pth files")
        if ranks != list(range(len(files))):
            raise ConversionError(f"{directory}: model-parallel files must be consolidated.00.."
                                  f"{len(files) - 1:02d}.pth, found {[os.path.basename(f) for f in files]}")
        self.files = files
        self.shards = [torch_load(f) for f in files]
        keys = set(self.shards[0]) - set(IGNORED)
        for f, sd in zip(files[1:], self.shards[1:]):
            if set(sd) - set(IGNORED) != keys:
                raise ConversionError(f"{f}: tensor names differ from {os.path.basename(files[0])}")
        self.cfg = self._config()
        self._where = {}
        for name in META_KEYS:
            for hkey, mkey in zip(hf.hf_names(name, self.cfg), meta_names(name, self.cfg)):
                self._where[hkey] = (name, mkey)

    def _meta_shape(self, mkey: str, split: int | None) -> tuple[int, ...]:
        if mkey not in self.shards[0]:
            raise ConversionError(f"{self.files[0]}: tensor {mkey} is missing")
        shapes = [tuple(sd[mkey].shape) for sd in self.shards]
        if split is None or len(shapes) == 1:
            return shapes[0]
        out = list(shapes[0])
        out[split] = sum(s[split] for s in shapes)
        return tuple(out)

    def _config(self) -> LlamaConfig:
        p = self.params
        try:
            dim, n_heads = int(p["dim"]), int(p["n_heads"])
            vocab, _ = self._meta_shape("tok_embeddings.weight", 1)
            ffn, _ = self._meta_shape("layers.0.feed_forward.w1.weight", 0)
            return LlamaConfig(
                vocab_size=vocab, hidden_size=dim, intermediate_size=ffn, num_layers=int(p["n_layers"]),
                num_heads=n_heads, num_kv_heads=int(p.get("n_kv_heads") or n_heads),
                max_position_embeddings=int(p.get("max_seq_len") or 4096),
                rms_norm_eps=float(p.get("norm_eps", 1e-5)), rope_theta=float(p.get("rope_theta", 10000.0)))
        except KeyError as e:
            raise ConversionError(f"{self.directory}/params.json: missing key {e}") from None
        except (ConfigError, TypeError, ValueError) as e:
            raise ConversionError(f"{self.directory}/params.json: {e}") from None

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, hkey: str) -> tuple[int, ...]:
        name, mkey = self._where[hkey]
        return self._meta_shape(mkey, META_KEYS[name][1])

    def read(self, hkey: str, scratch=None) -> np.ndarray:
        name, mkey = self._where[hkey]
        split = META_KEYS[name][1]
        tensors = [sd[mkey] for sd in self.shards]
        if split is None or len(tensors) == 1:
            w = torch_to_numpy(tensors[0]).copy()
        else:
            w = np.concatenate([torch_to_numpy(t) for t in tensors], axis=split)
        for t in tensors:
            release_pages(t)
        heads = rope_rows_heads(name, self.cfg)
        if heads is not None and w.ndim == 2 and w.shape[0] % (2 * heads) == 0:
            w = meta_to_hf_rows(w, heads)
        return w


# ---- writing consolidated.00.pth, one tensor at a time ------------------------------------
def write_consolidated(path: str, specs: list[tuple[str, tuple[int, ...], np.dtype]],
                       produce: Callable[[str], np.ndarray], on_tensor: Callable[[int], None] = lambda n: None):
    """Write a `torch.load`-able state dict {name: tensor} whose tensors come from `produce(name)`
    one at a time, in `specs` order.

    torch.save needs every tensor at once; instead the file's skeleton (pickle, zip directory,
    space for each storage) is written by torch.save under `torch.serialization.skip_data()`
    from never-touched `torch.empty` tensors (virtual memory only), then each storage's bytes
    are written in place and its CRC-32 filled into the zip's data descriptor and central
    directory. Storage keys are assigned in pickling order, i.e. dict order.
    """
    try:
        import torch
    except ImportError:
        raise ConversionError("exporting to Meta's .pth format needs torch (pip install torch)") from None
    import ml_dtypes
    import zipfile

    tdtype = {np.dtype(np.float32): torch.float32, np.dtype(ml_dtypes.bfloat16): torch.bfloat16,
              np.dtype(np.float16): torch.float16}
    sd = {name: torch.empty(shape, dtype=tdtype[np.dtype(dt)]) for name, shape, dt in specs}
    with torch.serialization.skip_data():
        torch.save(sd, path)
    del sd
    with zipfile.ZipFile(path) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        start_dir = zf.start_dir
    prefix = next(n for n in infos if n.endswith("/data.pkl"))[: -len("data.pkl")]
    central = _central_directory_offsets(path, start_dir, len(infos))
    with open(path, "r+b") as f:
        fd = f.fileno()
        for key, (name, shape, dt) in enumerate(specs):
            info = infos[f"{prefix}data/{key}"]
            arr = np.ascontiguousarray(produce(name))
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dt) or arr.nbytes != info.file_size:
                raise AssertionError(f"{path}: {name} {arr.shape} {arr.dtype} does not fit record {info.filename}")
            f.seek(info.header_offset)
            local = f.read(30)
            n, m = struct.unpack("<HH", local[26:30])
            offset = info.header_offset + 30 + n + m
            data = memoryview(arr.reshape(-1).view(np.uint8))
            write_all(fd, data, offset)
            crc = zlib.crc32(data)
            if info.flag_bits & 0x08:  # data descriptor after the data: [signature] crc32 sizes
                f.seek(offset + arr.nbytes)
                sig = f.read(4)
                os.pwrite(fd, struct.pack("<I", crc), offset + arr.nbytes + (4 if sig == b"PK\x07\x08" else 0))
            else:
                os.pwrite(fd, struct.pack("<I", crc), info.header_offset + 14)
            os.pwrite(fd, struct.pack("<I", crc), central[info.filename] + 16)
            on_tensor(arr.nbytes)
            del arr, data


def _central_directory_offsets(path: str, start: int, count: int) -> dict[str, int]:
    """File offset of each member's central directory entry."""
    out = {}
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        for _ in range(count):
            head = f.read(46)
            if head[:4] != b"PK\x01\x02":
                raise AssertionError(f"{path}: unexpected zip central directory layout")
            n, m, k = struct.unpack("<HHH", head[28:34])
            name = f.read(n).decode("utf-8")
            out[name] = pos
            f.seek(m + k, os.SEEK_CUR)
            pos += 46 + n + m + k
    return out
