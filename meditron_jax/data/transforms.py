"""The per-element steps of the training data pipeline (`data.loader` composes them with grain).

Owns: reading groups of documents with one batched ArrayRecord read per source (a failed read is
re-done record by record to name the damaged shard and document), turning a document into
(input, next token) pairs, the held-out split's index arithmetic, tagging documents with their
source, truncating SFT examples, and the last step: a packed global batch -> this process's rows
in the trainer's format (inputs, targets, segment_ids, positions, loss_mask).
Does not own: the order of the steps, shuffling, mixing or packing (`data.loader`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from grain.experimental import FlatMapTransform

from meditron_jax.data.preprocess import ShardError


class ReadDocuments:
    """[(source, doc index), ...] -> [{"tokens": int32 [n-1, 2] (input, next token)} per document]; one batched
    ArrayRecord read per source."""

    def __init__(self, readers: Sequence[Any], dtypes: Sequence[np.dtype], sources: Sequence[Any] = ()):
        self._readers = readers
        self._dtypes = dtypes
        self._sources = sources  # _Source per reader: a read error names the shard

    def _read(self, s: int, indices: list[int]):
        try:
            return self._readers[s].__getitems__(indices)
        except Exception as e:  # noqa: BLE001 - re-raised naming the shard
            if not self._sources:
                raise
            raise read_error(self._sources[s], self._readers[s], indices, e) from None

    def __call__(self, pairs: Sequence[tuple[int, int]]) -> list[dict[str, np.ndarray]]:
        by_source: dict[int, list[int]] = {}
        for k, (s, _) in enumerate(pairs):
            by_source.setdefault(s, []).append(k)
        out: list[Any] = [None] * len(pairs)
        for s, ks in by_source.items():
            records = self._read(s, [int(pairs[k][1]) for k in ks])
            for k, rec in zip(ks, records):
                t = np.frombuffer(rec, dtype=self._dtypes[s]).astype(np.int32)
                out[k] = {"tokens": np.stack((t[:-1], t[1:]), axis=1)}
        return out


def read_error(source, reader, indices: list[int], error: Exception) -> Exception:
    """The failed batched read, re-done record by record to find the record, named by its shard
    (a storage fault for an OS-level read error, else a damaged shard)."""
    from meditron_jax.errors import storage_fault

    bad = indices[0]
    for i in indices:
        try:
            reader[i]
        except Exception as e:  # noqa: BLE001
            bad, error = i, e
            break
    start = 0
    shard = source.manifest["shards"][-1]
    for sh in source.manifest["shards"]:
        if bad < start + sh["documents"]:
            shard = sh
            break
        start += sh["documents"]
    path = os.path.join(source.directory, shard["file"])
    reason = " ".join(str(error).split())[:200]
    hint = (f"document {bad - start} of the shard is unreadable; run `meditron-jax data verify {source.directory}`, "
            f"then re-run preprocess for source {source.name!r}")
    fault = storage_fault(error, f"data: reading source {source.name!r} shard", path, hint=hint)
    if fault is not None:
        return fault
    return ShardError(f"source {source.name!r}: cannot read shard {path} ({reason}); {hint}")


class Unbatch(FlatMapTransform):
    def __init__(self, max_fan_out: int):
        self.max_fan_out = max_fan_out

    def flat_map(self, element):
        return element


class TrainDocIndex:
    """Training index j -> document index, skipping documents stride-1, 2*stride-1, ... (n_val of them)."""

    def __init__(self, stride: int, n_val: int):
        self.stride, self.n_val = stride, n_val

    def __call__(self, j) -> int:
        j, per = int(j), self.stride - 1
        if j < per * self.n_val:
            return (j // per) * self.stride + j % per
        return j + self.n_val


def tag(source: int, index) -> tuple[int, int]:
    return source, int(index)


def truncate(example: np.ndarray, seq_len: int) -> np.ndarray:
    return example[-seq_len:] if len(example) > seq_len else example


class Finalize:
    """Packed global batch -> this process's rows in the trainer's format (pads short eval batches)."""

    def __init__(self, global_batch_size: int, rows):
        self._gb = global_batch_size
        self._rows = rows

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        tok, seg, pos = batch["tokens"], batch["tokens_segment_ids"], batch["tokens_positions"]
        if tok.shape[0] < self._gb:  # the last, partial batch of a held-out pass
            pad = self._gb - tok.shape[0]
            tok = np.concatenate([tok, np.zeros((pad, *tok.shape[1:]), tok.dtype)])
            seg = np.concatenate([seg, np.zeros((pad, *seg.shape[1:]), seg.dtype)])
            pos = np.concatenate([pos, np.zeros((pad, *pos.shape[1:]), pos.dtype)])
        tok, seg, pos = tok[self._rows], seg[self._rows], pos[self._rows]
        mask = seg > 0
        if tok.shape[-1] == 3:  # SFT: loss only on completion tokens
            mask &= tok[..., 2] > 0
        return {
            "inputs": np.ascontiguousarray(tok[..., 0], dtype=np.int32),
            "targets": np.ascontiguousarray(tok[..., 1], dtype=np.int32),
            "segment_ids": seg.astype(np.int32, copy=False),
            "positions": pos.astype(np.int32, copy=False),
            "loss_mask": mask.astype(np.float32),
        }
