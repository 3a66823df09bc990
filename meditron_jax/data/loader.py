"""The training data pipeline (grain): sources -> held-out split -> shuffled epochs -> weighted mix
-> packing -> global batches -> this process's rows, with an exactly resumable iterator state.

Owns: validating the gin configurable `data` (`data.config`: sources, weights, tokenizer, added
tokens, demo, SFT files, held-out fraction, shuffling) against the preprocessing manifests before training
(fingerprint / vocab mismatches, bad weights, missing directories are `UserError`s), and
`build_pipeline(...) -> DataPipeline`, whose `train_iterator()` yields dicts of numpy arrays
[rows this process supplies, seq_len]:
    inputs, targets (int32; targets are the inputs' next tokens *within* a document),
    segment_ids (int32, 1..n per document in the row, 0 = padding), positions (int32, restart at 0
    for each document or document piece), loss_mask (float32, 1 where the target is a real next token
    of the same document -- and, for SFT, part of a completion).

Process-count invariance: every process runs the same deterministic global pipeline (seeded
per-source shuffles, grain's `MapDataset.mix`, grain's concat-then-split / first-fit packing, grain's
batching) and keeps the rows of each global batch that its devices hold (`rows`, from the batch
sharding: processes of one data-parallel group, e.g. pipeline stages or tensor shards on different
hosts, keep the same rows; the default is rows [p*b:(p+1)*b]). The global batch at step k therefore
depends only on the seed and k, and the iterator state (grain's own, wrapped with a signature of the
configuration) is identical on every process: a run saved on 2 hosts resumes on 1 with the same data.

Mixture weights are *token* shares (Meditron's GAP-Replay weights are token proportions, the
default is each source's share of tokens); grain mixes documents, so each source's document
proportion is weight / mean document length. Documents are read in groups with one batched
ArrayRecord read per source (single-record reads cost ~0.3 ms each).

Does not own: the per-element steps it composes (`data.transforms`: batched reads, the held-out
index, the trainer's batch format), tokenization and shards (`data.preprocess`), SFT record
formats (`data.sft`), the demo corpus (`data.demo`), putting batches on devices
(`host_batch.global_batch`), or saving the iterator state in checkpoints (`checkpoint`, which
stores `get_state()` as a JSON item).
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import math
import os
import tempfile
import weakref
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from grain.experimental import (
    ConcatThenSplitIterDataset,
    FirstFitPackIterDataset,
    FlatMapIterDataset,
    ThreadPrefetchIterDataset,
)

from meditron_jax.data import transforms
from meditron_jax.data.config import DataConfig, DataConfigError, data_config
from meditron_jax.data.preprocess import check_shards, load_manifest
from meditron_jax.data.tokenizer import Tokenizer
from meditron_jax.storage.workdir import Workdir

STATE_FORMAT = "meditron-jax/data-iterator/v1"


def _json_state_fix(state: Any) -> Any:
    """JSON turns grain's (start, stop) slice tuples into lists; grain compares them with tuples."""
    if isinstance(state, dict):
        return {k: ({f: tuple(v) for f, v in val.items()} if k == "remainder_slices" else _json_state_fix(val))
                for k, val in state.items()}
    if isinstance(state, list):
        return [_json_state_fix(v) for v in state]
    return state


_LIVE_ITERATORS: "weakref.WeakSet[DataIterator]" = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
    """Stops prefetch threads before interpreter teardown (grain's finalizers are noisy then)."""
    for it in list(_LIVE_ITERATORS):
        it.close()
    gc.collect()  # free grain's iterators while their modules still exist


class DataIterator:
    """`next(it)` -> this process's batch; `get_state()` / `set_state()` for exact resume."""

    def __init__(self, dataset: grain.IterDataset, signature: dict):
        self._it = iter(dataset)
        self._signature = signature
        _LIVE_ITERATORS.add(self)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            raise RuntimeError("this data iterator was closed")
        return next(self._it)

    def get_state(self) -> dict:
        return {"format": STATE_FORMAT, "signature": self._signature, "grain": self._it.get_state()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise DataConfigError(f"data iterator state is not a {STATE_FORMAT} state")
        saved = state["signature"]
        diff = sorted(k for k in set(saved) | set(self._signature) if saved.get(k) != self._signature.get(k))
        if diff:
            details = "; ".join(f"{k}: saved {saved.get(k)!r}, now {self._signature.get(k)!r}" for k in diff)
            raise DataConfigError(f"the checkpoint's data iterator was saved with a different data setup ({details})")
        self._it.set_state(_json_state_fix(state["grain"]))

    def close(self) -> None:
        """Stops the prefetch thread; the iterator cannot be used afterwards."""
        it, self._it = self._it, None
        close = getattr(it, "close", None)
        if close is not None:
            close()


# -- the pipeline -------------------------------------------------------------------------------
@dataclasses.dataclass
class _Source:
    name: str
    directory: str
    manifest: dict
    reader: Any

    @property
    def documents(self) -> int:
        return int(self.manifest["documents"])

    @property
    def mean_length(self) -> float:
        return self.manifest["tokens"] / max(1, self.manifest["documents"])


def _source_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**32


class DataPipeline:
    """Builds grain datasets for training (infinite, mixed, packed) and the held-out split."""

    def __init__(self, cfg: DataConfig, tok: Tokenizer, seq_len: int, global_batch_size: int, seed: int,
                 process_index: int, process_count: int, sources: list[_Source] | None = None,
                 weights: dict[str, float] | None = None, sft_examples: list[np.ndarray] | None = None,
                 rows: Sequence[int] | None = None):
        self.cfg, self.tokenizer = cfg, tok
        self.seq_len, self.global_batch_size, self.seed = seq_len, global_batch_size, seed
        self.process_index, self.process_count = process_index, process_count
        self.sources, self.weights, self.sft_examples = sources or [], weights or {}, sft_examples
        self.rows = _host_rows(global_batch_size, process_index, process_count, rows)
        self._finalize = transforms.Finalize(global_batch_size, self.rows)

    @property
    def mode(self) -> str:
        return "sft" if self.sft_examples is not None else "pretrain"

    @property
    def tokenizer_info(self) -> dict:
        return {"path": self.tokenizer.path, "fingerprint": self.tokenizer.fingerprint,
                "vocab_size": self.tokenizer.vocab_size, "added_tokens": list(self.tokenizer.added_tokens)}

    def signature(self) -> dict:
        sig = {"mode": self.mode, "seq_len": self.seq_len, "global_batch_size": self.global_batch_size,
               "seed": self.seed, "tokenizer": self.tokenizer.fingerprint, "shuffle": self.cfg.shuffle,
               "validation_fraction": self.cfg.validation_fraction}
        if self.mode == "sft":
            sig["sft_examples"] = len(self.sft_examples)
        else:
            sig["sources"] = {s.name: [s.documents, int(s.manifest["tokens"])] for s in self.sources}
            sig["weights"] = dict(self.weights)
            sig["read_group"] = self.cfg.read_group
        return sig

    def _split(self, n: int) -> tuple[grain.MapDataset, grain.MapDataset]:
        """(train document indices, held-out document indices) of n documents.

        Every `stride`-th document is held out (spread over the whole file, whatever its order),
        n_val of them; the split ignores the seed, so validation never moves between runs."""
        n_val = 0
        if self.cfg.validation_fraction > 0 and n >= 2:
            n_val = min(n // 2, self.cfg.max_validation_documents, max(1, round(n * self.cfg.validation_fraction)))
        if n_val == 0:
            return grain.MapDataset.range(n), grain.MapDataset.range(0)
        stride = n // n_val
        return (grain.MapDataset.range(n - n_val).map(transforms.TrainDocIndex(stride, n_val)),
                grain.MapDataset.range(stride - 1, stride * n_val, stride))

    # pretraining ---------------------------------------------------------------------------
    def _documents(self, index_ds: grain.MapDataset, threads: int) -> grain.IterDataset:
        reader = transforms.ReadDocuments([s.reader for s in self.sources], [np.dtype(s.manifest["dtype"]) for s in self.sources],
                                self.sources)
        grouped = index_ds.batch(self.cfg.read_group, batch_fn=list).map(reader)
        opts = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
        return FlatMapIterDataset(grouped.to_iter_dataset(opts), transforms.Unbatch(self.cfg.read_group))

    def _pack(self, docs: grain.IterDataset) -> grain.IterDataset:
        return ConcatThenSplitIterDataset(docs, length_struct={"tokens": self.seq_len})

    def _train_dataset(self) -> grain.IterDataset:
        if self.mode == "sft":
            return self._sft_dataset()
        parts, props = [], []
        for i, s in enumerate(self.sources):
            w = self.weights[s.name]
            if w <= 0:
                continue
            train_idx, _ = self._split(s.documents)
            if self.cfg.shuffle:
                train_idx = train_idx.shuffle(seed=_source_seed(self.seed, s.name))
            parts.append(train_idx.repeat(None).map(lambda j, i=i: transforms.tag(i, j)))
            props.append(w / s.mean_length)  # token share -> document share
        mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, props)
        packed = self._pack(self._documents(mixed, self.cfg.read_threads))
        return self._batch(packed)

    def _batch(self, packed: grain.IterDataset) -> grain.IterDataset:
        ds = packed.batch(self.global_batch_size, drop_remainder=True).map(self._finalize)
        if self.cfg.prefetch_batches > 0:
            ds = ThreadPrefetchIterDataset(ds, prefetch_buffer_size=self.cfg.prefetch_batches)
        return ds

    # SFT -------------------------------------------------------------------------------------
    def _sft_examples_ds(self, indices: grain.MapDataset) -> grain.MapDataset:
        examples = self.sft_examples
        seq_len = self.seq_len
        return indices.map(lambda j: {"tokens": transforms.truncate(examples[int(j)], seq_len)})

    def _sft_pack(self, ds: grain.MapDataset) -> grain.IterDataset:
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        bins = min(max(self.global_batch_size, 8), 512)
        return FirstFitPackIterDataset(it, length_struct={"tokens": self.seq_len}, num_packing_bins=bins,
                                       shuffle_bins=False)

    def _sft_dataset(self) -> grain.IterDataset:
        train_idx, _ = self._split(len(self.sft_examples))
        if self.cfg.shuffle:
            train_idx = train_idx.shuffle(seed=_source_seed(self.seed, "sft"))
        return self._batch(self._sft_pack(self._sft_examples_ds(train_idx.repeat(None))))

    # public ----------------------------------------------------------------------------------
    def train_iterator(self) -> DataIterator:
        return DataIterator(self._train_dataset(), self.signature())

    def eval_batches(self, num_batches: int) -> list[dict[str, np.ndarray]]:
        """Up to `num_batches` batches (this process's rows) from one in-order pass over the held-out
        documents of every source; the last batch is padded with empty rows (loss_mask 0)."""
        if num_batches <= 0:
            return []
        if self.mode == "sft":
            _, val = self._split(len(self.sft_examples))
            if len(val) == 0:
                return []
            packed = self._sft_pack(self._sft_examples_ds(val))
        else:
            vals = [self._split(s.documents)[1].map(lambda j, i=i: transforms.tag(i, j)) for i, s in enumerate(self.sources)]
            vals = [v for v in vals if len(v) > 0]
            if not vals:
                return []
            packed = self._pack(self._documents(grain.MapDataset.concatenate(vals), 0))
        ds = packed.batch(self.global_batch_size, drop_remainder=False).map(self._finalize)
        out = []
        for batch in ds:
            out.append(batch)
            if len(out) == num_batches:
                break
        return out

    def describe(self) -> dict:
        """A JSON-able summary for logs: mode, sources, documents, tokens and weights."""
        d = {"mode": self.mode, "tokenizer": self.tokenizer_info, "seq_len": self.seq_len}
        if self.mode == "sft":
            d["examples"] = len(self.sft_examples)
        else:
            d["sources"] = {s.name: {"dir": s.directory, "documents": s.documents, "tokens": s.manifest["tokens"],
                                     "weight": self.weights[s.name]} for s in self.sources}
        return d


# -- construction and validation ----------------------------------------------------------------
def _check_weights(names: Sequence[str], weights: Mapping[str, float] | None, tokens: Mapping[str, int]) -> dict[str, float]:
    if weights is None:
        total = sum(tokens.values())
        return {n: tokens[n] / total for n in names}
    unknown = sorted(set(weights) - set(names))
    missing = sorted(set(names) - set(weights))
    if unknown or missing:
        raise DataConfigError(f"data.weights names {sorted(weights)} must match data.sources names {sorted(names)}"
                              + (f" (unknown: {unknown})" if unknown else "") + (f" (missing: {missing})" if missing else ""))
    out = {}
    for n in names:
        try:
            w = float(weights[n])
        except (TypeError, ValueError):
            raise DataConfigError(f"data.weights[{n!r}] = {weights[n]!r} is not a number") from None
        if not math.isfinite(w) or w < 0:
            raise DataConfigError(f"data.weights[{n!r}] = {weights[n]!r}: weights must be finite and >= 0")
        out[n] = w
    total = sum(out.values())
    if total <= 0:
        raise DataConfigError(f"data.weights {dict(weights)} are all zero: nothing to train on")
    return {n: w / total for n, w in out.items()}


def _open_source(name: str, directory: str, tok: Tokenizer) -> _Source:
    manifest = load_manifest(directory)
    mt = manifest["tokenizer"]
    where = os.path.join(directory, "manifest.json")
    if mt["vocab_size"] != tok.vocab_size:
        raise DataConfigError(f"{where}: source {name!r} was tokenized with vocab {mt['vocab_size']} "
                              f"({mt['path']}), but the run uses vocab {tok.vocab_size} ({tok.path})")
    if mt["fingerprint"] != tok.fingerprint:
        raise DataConfigError(f"{where}: source {name!r} was tokenized with tokenizer {mt['fingerprint'][:12]} "
                              f"({mt['path']}), but the run uses {tok.fingerprint[:12]} ({tok.path}); re-run preprocess")
    check_shards(directory, manifest, name)  # sizes and counts: a truncated shard is refused here
    paths = [os.path.join(directory, s["file"]) for s in manifest["shards"]]
    reader = grain.sources.ArrayRecordDataSource(paths)
    if len(reader) != manifest["documents"]:
        raise DataConfigError(f"{directory}: shards hold {len(reader)} documents, manifest says {manifest['documents']}")
    return _Source(name, directory, manifest, reader)


def _host_rows(global_batch_size: int, process_index: int, process_count: int, rows) -> slice | np.ndarray:
    """The rows of each global batch this process keeps: `rows` (from the batch sharding,
    `host_batch.host_rows`) or, without it, the contiguous 1/process_count block."""
    if rows is None:
        b = global_batch_size // process_count
        return slice(process_index * b, (process_index + 1) * b)
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1 or len(rows) == 0 or np.any(np.diff(rows) <= 0) or rows[0] < 0 or rows[-1] >= global_batch_size:
        raise DataConfigError(f"host rows must be increasing indices into the global batch of {global_batch_size}")
    if len(rows) == rows[-1] - rows[0] + 1:  # contiguous: a view, not a copy
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows


def build_pipeline(seq_len: int, global_batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1, workdir: Workdir | str | None = None, config: DataConfig | None = None,
                   rows: Sequence[int] | None = None) -> DataPipeline:
    """Reads gin `data.*` (or `config`), validates everything against the manifests, and returns the
    pipeline. All checks happen here, before any training step.

    `rows`: the global batch rows this process supplies (`host_batch.host_rows(mesh, ...)`); the
    default is the contiguous block [p*b, (p+1)*b) with b = global_batch_size / process_count."""
    cfg = config if config is not None else data_config()
    if seq_len < 2:
        raise DataConfigError(f"seq_len must be >= 2, got {seq_len}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataConfigError(f"process_index {process_index} out of range for {process_count} processes")
    if global_batch_size <= 0 or (rows is None and global_batch_size % process_count):
        raise DataConfigError(f"global batch size {global_batch_size} must be a positive multiple of the "
                              f"process count {process_count}")
    if not 0 <= cfg.validation_fraction <= 0.5:
        raise DataConfigError(f"data.validation_fraction must be in [0, 0.5], got {cfg.validation_fraction}")
    if cfg.read_group < 1:
        raise DataConfigError(f"data.read_group must be >= 1, got {cfg.read_group}")
    sources, tokenizer, weights = cfg.sources, cfg.tokenizer, cfg.weights
    if cfg.demo:
        if sources or cfg.sft_files:
            raise DataConfigError("data.demo = True builds its own sources; do not also set data.sources/sft_files")
        from meditron_jax.data.demo import prepare_demo

        workdir = Workdir.resolve(workdir) if workdir is not None else None
        local = workdir is not None and not workdir.remote  # else the demo is built in a local temp dir
        root = workdir.demo_data if local else os.path.join(tempfile.gettempdir(), "meditron-jax-demo")
        import jax  # in a real multi-process run, process 0 builds the demo and the others wait

        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            if jax.process_index() == 0:
                prepare_demo(root)
            multihost_utils.sync_global_devices("meditron_jax.data.demo")
        demo = prepare_demo(root)
        sources, tokenizer = demo["sources"], tokenizer or demo["tokenizer"]
        weights = weights if weights is not None else demo["weights"]
    if sources and cfg.sft_files:
        raise DataConfigError("data.sources and data.sft_files are mutually exclusive (pretraining vs SFT)")
    if not sources and not cfg.sft_files:
        raise DataConfigError("no training data: set data.sources (preprocessed dirs), data.sft_files or data.demo = True")
    if not tokenizer:
        raise DataConfigError("data.tokenizer (a SentencePiece tokenizer.model) is required")
    tok = Tokenizer(tokenizer, cfg.added_tokens)
    common = dict(cfg=cfg, tok=tok, seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
                  process_index=process_index, process_count=process_count, rows=rows)
    if cfg.sft_files:
        from meditron_jax.data.sft import load_sft_files

        return DataPipeline(**common, sft_examples=load_sft_files(cfg.sft_files, tok))
    if not isinstance(sources, Mapping):
        raise DataConfigError(f"data.sources must be a dict name -> directory, got {sources!r}")
    opened = [_open_source(str(n), str(d), tok) for n, d in sources.items()]
    weights = _check_weights([s.name for s in opened], weights, {s.name: s.manifest["tokens"] for s in opened})
    return DataPipeline(**common, sources=opened, weights=weights)
