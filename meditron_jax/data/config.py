"""The gin configurable `data` and its value, `DataConfig` (what the training data is and how it is
read), plus `DataConfigError`, the user error for a data setup that does not hold together.

Owns: the names and defaults of `data.*` (sources, weights, tokenizer, added tokens, demo, SFT
files, held-out fraction, shuffling, read grouping and threads, prefetch) and turning gin's
values into one frozen `DataConfig`. Does not own: checking them against the manifests or
building anything (`data.loader`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Annotated

import gin

from meditron_jax.config.checks import NotAllZero, Range
from meditron_jax.errors import UserError


class DataConfigError(UserError):
    """Inconsistent data configuration (weights, sources, tokenizer vs manifests, saved state)."""


@dataclasses.dataclass(frozen=True)
class DataConfig:  # Annotated ranges: checked with the types when gin is parsed (config.checks)
    sources: Mapping[str, str] | None = None
    # token shares, each >= 0, not all 0 (the loader also checks them against data.sources' names)
    weights: Annotated[Mapping[str, float] | None, Range(min=0), NotAllZero()] = None
    tokenizer: str | None = None
    added_tokens: tuple[str, ...] = ()
    demo: bool = False
    sft_files: tuple[str, ...] = ()
    validation_fraction: Annotated[float, Range(min=0, max=0.5)] = 0.01
    max_validation_documents: Annotated[int, Range(min=0)] = 10_000
    shuffle: bool = True
    read_group: Annotated[int, Range(min=1)] = 256
    read_threads: Annotated[int, Range(min=0)] = 2  # grain ReadOptions.num_threads (0: read in the iterating thread)
    prefetch_batches: Annotated[int, Range(min=0)] = 2  # 0: no prefetch thread


@gin.configurable("data")
def data_config(
    sources: Mapping[str, str] | None = None,
    weights: Mapping[str, float] | None = None,
    tokenizer: str | None = None,
    added_tokens: Sequence[str] = (),
    demo: bool = False,
    sft_files: Sequence[str] = (),
    validation_fraction: float = 0.01,
    max_validation_documents: int = 10_000,
    shuffle: bool = True,
    read_group: int = 256,
    read_threads: int = 2,
    prefetch_batches: int = 2,
) -> DataConfig:
    """gin `data.*`: `data.sources = {'guidelines': '/data/gl', ...}`, `data.weights = {...}` (token
    shares; default token-proportional), `data.tokenizer = '.../tokenizer.model'`,
    `data.added_tokens = (...)`, `data.demo = True` (built-in demo corpus and tokenizer),
    `data.sft_files = [...]` (SFT JSONL; exclusive with sources), `data.validation_fraction` (held-out
    documents per source, at most `max_validation_documents`), `data.shuffle`."""
    if isinstance(sft_files, str):
        sft_files = (sft_files,)
    return DataConfig(
        sources=dict(sources) if sources is not None else None,
        weights=dict(weights) if weights is not None else None,
        tokenizer=str(tokenizer) if tokenizer is not None else None,
        added_tokens=tuple(added_tokens), demo=bool(demo), sft_files=tuple(str(f) for f in sft_files),
        validation_fraction=float(validation_fraction), max_validation_documents=int(max_validation_documents),
        shuffle=bool(shuffle), read_group=int(read_group), read_threads=int(read_threads),
        prefetch_batches=int(prefetch_batches))
