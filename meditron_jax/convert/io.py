"""Reading and writing checkpoint files tensor by tensor (bounded memory).

Owns: the safetensors file format (read via memory map, so bf16 works without torch and only
the tensor asked for is paged in), `pytorch_model*.bin` / `.pth` loading through
`torch.load(weights_only=True)` (never pickle code execution), and Hugging Face directory
discovery (single file, sharded with index). Does not own: name/layout mapping (`hf.py`,
`meta.py`).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

from meditron_jax.errors import UserError


class ConversionError(UserError, ValueError):
    """A user-caused problem with weight files (one clear line, naming the file)."""


SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
DTYPE_NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}


class SafetensorsFile:
    """Lazy reader: header parsed once, each tensor a view of a read-only memory map."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise ConversionError(f"{path}: truncated safetensors header")
                header = json.loads(f.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.header = header
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if self.base + end > size:
            raise ConversionError(f"{path}: truncated (header needs {self.base + end} bytes, file has {size})")
        self._mm = np.memmap(path, dtype=np.uint8, mode="r") if size else None

    def keys(self):
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ConversionError(f"{self.path}: unsupported dtype {info['dtype']} for {name}")
        a, b = info["data_offsets"]
        raw = self._mm[self.base + a: self.base + b]
        return raw.view(dtype).reshape(info["shape"])


def write_safetensors(path: str, tensors: Iterator[tuple[str, np.ndarray]] | dict, metadata=None):
    """Write tensors to `path`. Accepts a dict or an iterable of (name, array) whose shapes
    and dtypes must be known up front: pass a dict of arrays (kept only as long as needed)."""
    items = list(tensors.items()) if isinstance(tensors, dict) else list(tensors)
    header, offset = {}, 0
    for name, arr in items:
        nbytes = int(np.prod(arr.shape)) * np.dtype(arr.dtype).itemsize
        header[name] = {"dtype": DTYPE_NAMES[np.dtype(arr.dtype)], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr in items:
            f.write(np.ascontiguousarray(arr).tobytes())


def torch_load(path: str) -> dict:
    """Load a PyTorch state dict without executing pickle code (weights_only=True)."""
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{path}: reading .bin/.pth files needs torch (pip install 'meditron-jax[torch]')") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle refusing code, truncated zip, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{path}: cannot load safely with torch.load(weights_only=True): {msg}") from None


def torch_to_numpy(t) -> np.ndarray:
    import torch
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.contiguous().numpy()


class HFWeights:
    """All tensors of a Hugging Face model directory, read lazily by name."""

    def __init__(self, directory: str):
        self.directory = directory
        self._where: dict[str, object] = {}
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        bin_index = os.path.join(directory, "pytorch_model.bin.index.json")
        single_bin = os.path.join(directory, "pytorch_model.bin")
        if os.path.exists(index):
            self._from_index(index, lambda p: SafetensorsFile(p))
        elif os.path.exists(single):
            f = SafetensorsFile(single)
            self._where = {k: f for k in f.keys()}
        elif os.path.exists(bin_index):
            self._from_index(bin_index, _TorchFile)
        elif os.path.exists(single_bin):
            f = _TorchFile(single_bin)
            self._where = {k: f for k in f.keys()}
        else:
            raise ConversionError(f"{directory}: no model.safetensors, sharded index or pytorch_model.bin found")

    def _from_index(self, index_path, opener):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ConversionError(f"{index_path}: unreadable index ({e})") from None
        files = {}
        for name, fname in weight_map.items():
            path = os.path.join(self.directory, fname)
            if fname not in files:
                if not os.path.exists(path):
                    raise ConversionError(f"{index_path}: names shard {fname} which does not exist")
                files[fname] = opener(path)
            self._where[name] = files[fname]

    def keys(self):
        return list(self._where)

    def shape(self, name) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def get(self, name) -> np.ndarray:
        if name not in self._where:
            raise ConversionError(f"{self.directory}: tensor {name} is missing")
        return self._where[name].get(name)


class _TorchFile:
    def __init__(self, path):
        self.path = path
        self.sd = torch_load(path)

    def keys(self):
        return list(self.sd)

    def shape(self, name):
        return tuple(self.sd[name].shape)

    def get(self, name):
        return torch_to_numpy(self.sd[name])
