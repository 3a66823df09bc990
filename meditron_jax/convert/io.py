"""Reading and writing checkpoint files tensor by tensor (bounded memory).

Owns: reading safetensors files (the `safetensors` library parses and validates them; bf16
works without torch through ml_dtypes), a streaming safetensors writer, `pytorch_model*.bin` / `.pth` loading through
`torch.load(weights_only=True)` (never pickle code execution), and Hugging Face directory
discovery (single file, sharded with index). Does not own: name/layout mapping (`hf.py`,
`meta.py`).
"""

from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from meditron_jax.errors import UserError


class ConversionError(UserError, ValueError):
    """A user-caused problem with weight files (one clear line, naming the file)."""


SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
DTYPE_NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}


class SafetensorsFile:
    """One safetensors file: opened, validated and described by the `safetensors` library
    (`safe_open`: header, dtypes, shapes, the file covering every tensor); `get` is its copy of
    one tensor; `read` preads one tensor's bytes into a reusable buffer (below: why)."""

    def __init__(self, path: str):
        self.path = path
        try:
            with safe_open(path, framework="numpy") as f:
                described = [(k, f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape()))
                             for k in f.offset_keys()]
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
        except (OSError, SafetensorError, struct.error) as e:
            raise ConversionError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
        # safetensors refuses files whose tensors are not contiguous in offset order from the
        # end of the header to the end of the file, so the offsets follow from the sizes.
        self.header, offset = {}, 0
        for name, dtype, shape in described:
            if dtype not in SAFETENSORS_DTYPES:
                raise ConversionError(f"{path}: unsupported dtype {dtype} for {name}")
            nbytes = math.prod(shape) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
            self.header[name] = {"dtype": dtype, "shape": shape, "data_offsets": (offset, offset + nbytes)}
            offset += nbytes
        self.base = 8 + n
        if self.base + offset != size:
            raise ConversionError(f"{path}: truncated (header needs {self.base + offset} bytes, file has {size})")

    def keys(self):
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.header[name]["shape"]

    def get(self, name: str) -> np.ndarray:
        with safe_open(self.path, framework="numpy") as f:
            return f.get_tensor(name)

    def read(self, name: str, scratch: "Scratch | None" = None) -> np.ndarray:
        """Like `get`, but read with pread into `scratch`'s buffer when given (valid until the
        scratch is used again): nothing stays mapped and no fresh memory is faulted in per
        tensor, which a streaming conversion pays for every tensor (bench/convert.py)."""
        info = self.header[name]
        a, b = info["data_offsets"]
        out = np.empty(b - a, np.uint8) if scratch is None else scratch.get(b - a)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.base + a)
            view, done = memoryview(out), 0
            while done < out.size:
                n = f.readinto(view[done:])
                if not n:
                    raise ConversionError(f"{self.path}: truncated while reading {name}")
                done += n
        return out.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# Bytes per write system call. On the VMs we measured, one big write (64-256 MB) cost 2-4 s of
# kernel time per GB while the same bytes in 1 MB writes cost 0.3-0.45 s (bench/convert.py).
WRITE_PIECE = 1 << 20


def write_all(fd: int, data: memoryview, offset: int | None = None) -> None:
    """Write all of `data` to `fd` (at `offset`, or the current position) in WRITE_PIECE pieces."""
    data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    done = 0
    while done < len(data):
        piece = data[done:done + WRITE_PIECE]
        done += os.write(fd, piece) if offset is None else os.pwrite(fd, piece, offset + done)


class Scratch:
    """One reusable buffer for reading tensors one after another.

    Reading every tensor into a fresh array costs a page fault per 4 KiB page (big arrays are
    fresh memory maps; on a VM a fault is ~10 us, i.e. ~2.5 s per GB), so a conversion reads
    into this buffer instead; it grows to the largest tensor. (Transparent huge pages for it
    were slower here: 2.6 s vs 1.3 s to read the 8-layer bench's 3.8 GB.)
    """

    def __init__(self):
        self._buf = np.empty(0, np.uint8)

    def get(self, nbytes: int) -> np.ndarray:
        if nbytes > self._buf.size:
            self._buf = np.empty(nbytes, np.uint8)
        return self._buf[:nbytes]


class SafetensorsWriter:
    """Streaming safetensors writer: the header (names, shapes, dtypes) is fixed up front, then
    tensors are written one at a time in that order, so only one is in memory at once."""

    def __init__(self, path: str, specs: list[tuple[str, tuple[int, ...], np.dtype]], metadata=None):
        header, offset = {}, 0
        for name, shape, dtype in specs:
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if metadata:
            header["__metadata__"] = metadata
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.path, self._order, self._specs, self._next = path, [s[0] for s in specs], header, 0
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(blob)))
        self._f.write(blob)

    def write(self, name: str, arr: np.ndarray):
        want = self._order[self._next] if self._next < len(self._order) else None
        spec = self._specs.get(name)
        if name != want or list(arr.shape) != spec["shape"] or DTYPE_NAMES[np.dtype(arr.dtype)] != spec["dtype"]:
            raise AssertionError(f"{self.path}: got {name} {arr.shape} {arr.dtype}, expected {want} {spec}")
        self._f.flush()
        write_all(self._f.fileno(), memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))
        self._next += 1

    def abort(self):
        """Closes the file after a failure (its space is freed once the partial is deleted)."""
        self._f.close()

    def close(self):
        self._f.close()
        if self._next != len(self._order):
            raise AssertionError(f"{self.path}: only {self._next} of {len(self._order)} tensors written")


def torch_load(path: str) -> dict:
    """Load a PyTorch state dict without executing pickle code (weights_only=True)."""
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{path}: reading .bin/.pth files needs torch (pip install 'meditron-jax[torch]')") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle refusing code, truncated zip, ...
        raise ConversionError(f"{path}: cannot load safely with torch.load(weights_only=True): "
                              f"{_first_line(e)}") from None


def torch_to_numpy(t) -> np.ndarray:
    import torch
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.contiguous().numpy()


def release_pages(t) -> None:
    """Drop the resident pages of a tensor loaded with `torch.load(mmap=True)` (a private,
    read-only file mapping: the kernel re-reads them from the file if touched again). Keeps the
    resident set of a streaming conversion at one tensor instead of the whole file."""
    import ctypes
    import mmap

    storage = t.untyped_storage()
    start, size = storage.data_ptr(), storage.nbytes()
    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, (start + size) // page * page  # whole pages inside only
    if hi > lo and hasattr(mmap, "MADV_DONTNEED"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), mmap.MADV_DONTNEED)


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

    def read(self, name, scratch: Scratch | None = None) -> np.ndarray:
        """A copy of one tensor, leaving nothing mapped (bounded resident memory); in
        `scratch`'s buffer when given and the format allows."""
        if name not in self._where:
            raise ConversionError(f"{self.directory}: tensor {name} is missing")
        return self._where[name].read(name, scratch)


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

    def read(self, name, scratch=None):
        """An owned copy; the mapped pages of the source tensor are released afterwards."""
        t = self.sd[name]
        out = torch_to_numpy(t).copy()
        release_pages(t)
        return out
