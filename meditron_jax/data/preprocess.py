"""`meditron-jax preprocess`: JSONL text -> tokenized documents in ArrayRecord shards + manifest.json.

Owns: reading JSONL (plain or .gz, one document per line; `data.jsonl` names the file and line of a bad one),
tokenizing every document as BOS + text + EOS on all cores (a multiprocessing pool fed with
newline-aligned byte chunks; chunk and shard boundaries depend only on the data, so the output is
byte-identical whatever `--workers` is), writing one ArrayRecord record per document (raw uint16
when the vocabulary fits, else int32; `group_size:1` so grain can read documents at random), and
the manifest the pipeline checks before training (documents, tokens, skipped empty documents,
tokenizer fingerprint and vocab, dtype; per shard its documents, tokens, byte size and SHA-256,
which `train` checks (counts and sizes, at start) and `meditron-jax data verify` checks in full).
Output is built in a temporary directory that is renamed into place only when complete; a
partial output left by a killed earlier run for the same destination is removed at start
(`storage.staging_dir`).

Does not own: mixing, shuffling or packing (`data.loader`), SFT formats (`data.sft`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from meditron_jax.storage import staging as storage
from meditron_jax.data import jsonl
from meditron_jax.data.tokenizer import Tokenizer
from meditron_jax.errors import UserError, storage_faults

MANIFEST = "manifest.json"
FORMAT = "meditron-jax/tokenized-documents/v1"
DOCUMENT_LAYOUT = "BOS + tokens(text) + EOS per document, one ArrayRecord record of raw little-endian ids"
CHUNK_BYTES = jsonl.CHUNK_BYTES  # work unit sent to a worker (newline aligned)
SHARD_TOKENS = 1 << 27  # a new shard starts once a shard holds this many tokens
WRITER_OPTIONS = "group_size:1,uncompressed"


class PreprocessError(UserError):
    """Bad input to preprocessing: unreadable file, malformed JSON line, missing key, empty input."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


# -- workers ------------------------------------------------------------------------------------
_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer_path: str, added_tokens: tuple[str, ...]) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer(tokenizer_path, added_tokens)


def _encode_chunk(job: tuple[str, int, bytes, str, str]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """-> (document lengths int64, all tokens concatenated, empty documents skipped, chunk bytes)."""
    path, first_line, chunk, text_key, dtype = job
    texts, empty = jsonl.parse_text_chunk(path, first_line, chunk, text_key, PreprocessError)
    tok = _WORKER_TOKENIZER
    assert tok is not None
    ids = tok.encode_batch(texts, bos=True, eos=True)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return lengths, flat, empty, len(chunk)


def _start_method() -> str:
    """fork is fast (no re-import of the main module) but unsafe once the process has threads
    (JAX runtime, grain prefetch); then use forkserver."""
    if os.name != "posix":
        return "spawn"
    return "fork" if threading.active_count() == 1 else "forkserver"


# -- output -------------------------------------------------------------------------------------
class _ShardWriter:
    """Writes documents into `tokens-00000.arrayrecord`, ... rolling over every `shard_tokens`."""

    def __init__(self, out_dir: Path, shard_tokens: int):
        self.out_dir = out_dir
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self._writer = None

    def _open(self):
        from array_record.python.array_record_module import ArrayRecordWriter

        name = f"tokens-{len(self.shards):05d}.arrayrecord"
        self._writer = ArrayRecordWriter(str(self.out_dir / name), WRITER_OPTIONS)
        self.shards.append({"file": name, "documents": 0, "tokens": 0})

    def write(self, lengths: np.ndarray, flat: np.ndarray) -> None:
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        buf = flat.tobytes()
        item = flat.dtype.itemsize
        for i in range(len(lengths)):
            if self._writer is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self.close()
                self._open()
            self._writer.write(buf[offsets[i] * item: offsets[i + 1] * item])
            self.shards[-1]["documents"] += 1
            self.shards[-1]["tokens"] += int(lengths[i])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def preprocess(
    inputs: Sequence[str | os.PathLike],
    tokenizer_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    text_key: str = "text",
    workers: int | None = None,
    added_tokens: Sequence[str] = (),
    *,
    overwrite: bool = False,
    progress: bool = True,
    chunk_bytes: int = CHUNK_BYTES,
    shard_tokens: int = SHARD_TOKENS,
) -> dict:
    """Tokenizes JSONL documents into ArrayRecord shards under `out_dir`; returns the manifest."""
    inputs = [str(p) for p in inputs]
    if not inputs:
        raise PreprocessError("preprocess needs at least one --input file")
    for p in inputs:
        if not os.path.isfile(p):
            raise PreprocessError(f"input file {p} does not exist")
    tok = Tokenizer(tokenizer_path, tuple(added_tokens))
    dtype = token_dtype(tok.vocab_size)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PreprocessError(f"output directory {out} exists and is not empty (remove it or pass --overwrite)")
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    if workers < 1:
        raise PreprocessError(f"--workers must be >= 1, got {workers}")

    tmp = Path(storage.staging_dir(str(out), "preprocess", legacy_prefixes=(".tmp-",)))
    try:
        with storage_faults("preprocess to", str(out.absolute()), hint="the partial output was removed"):
            manifest = _run(inputs, tok, tmp, text_key, workers, dtype, progress, chunk_bytes, shard_tokens)
            storage.commit_dir(str(tmp), str(out))
    except BaseException:
        storage.discard_dir(str(tmp))
        raise
    return manifest


HASH_BLOCK = 8 << 20


def file_sha256(path: str | os.PathLike, progress=None) -> str:
    """SHA-256 of a file, read in 8 MiB blocks; `progress(n)` after each block."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(HASH_BLOCK)
            if not block:
                break
            h.update(block)
            if progress is not None:
                progress(len(block))
    return h.hexdigest()


def _run(inputs, tok, tmp: Path, text_key, workers, dtype, progress, chunk_bytes, shard_tokens) -> dict:
    from tqdm import tqdm

    jobs = ((p, line, chunk, text_key, dtype.str)
            for path in inputs for p, line, chunk in jsonl.read_chunks(path, chunk_bytes, PreprocessError))
    # progress counts uncompressed bytes; its total is only known without .gz inputs
    total_bytes = None if any(p.endswith('.gz') for p in inputs) else sum(os.path.getsize(p) for p in inputs)
    writer = _ShardWriter(tmp, shard_tokens)
    docs = tokens = empty = max_len = 0
    start = time.perf_counter()
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", disable=not progress,
               dynamic_ncols=True)
    pool = None
    try:
        if workers == 1:
            _init_worker(tok.path, tok.added_tokens)
            results = map(_encode_chunk, jobs)
        else:
            ctx = multiprocessing.get_context(_start_method())
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tok.path, tok.added_tokens))
            results = pool.imap(_encode_chunk, jobs, chunksize=1)
        for lengths, flat, n_empty, nbytes in results:
            writer.write(lengths, flat)
            docs += len(lengths)
            tokens += int(flat.size)
            empty += n_empty
            if len(lengths):
                max_len = max(max_len, int(lengths.max()))
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.update(nbytes)
            bar.set_postfix_str(f"{docs / elapsed:,.0f} docs/s, {tokens / elapsed:,.0f} tok/s", refresh=False)
        if pool is not None:  # finished: let the workers exit on their own
            pool.close()
            pool.join()
            pool = None
    finally:
        bar.close()
        writer.close()
        if pool is not None:  # an error: stop the workers now
            pool.terminate()
            pool.join()
    if docs == 0:
        what = f"{empty} empty documents" if empty else "no documents"
        raise PreprocessError(f"nothing to train on in {', '.join(inputs)}: {what}")
    for shard in writer.shards:  # what train (sizes) and `data verify` (checksums) check
        path = tmp / shard["file"]
        shard["bytes"] = path.stat().st_size
        shard["sha256"] = file_sha256(path)
    manifest = {
        "format": FORMAT,
        "layout": DOCUMENT_LAYOUT,
        "bos_eos_added": True,
        "documents": docs,
        "tokens": tokens,
        "skipped_empty_documents": empty,
        "max_document_tokens": max_len,
        "dtype": dtype.name,
        "tokenizer": tok.info(),
        "text_key": text_key,
        "inputs": [{"path": os.path.abspath(p), "bytes": os.path.getsize(p)} for p in inputs],
        "shards": writer.shards,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_manifest(directory: str | os.PathLike) -> dict:
    """Reads and sanity-checks `DIR/manifest.json`; UserError naming the directory otherwise."""
    d = Path(directory)
    path = d / MANIFEST
    if not d.is_dir():
        raise UserError(f"preprocessed data directory {d} does not exist")
    if not path.is_file():
        raise UserError(f"{d} has no {MANIFEST}: not a finished `meditron-jax preprocess` output")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: unknown format {manifest.get('format')!r} (expected {FORMAT})")
    for s in manifest["shards"]:
        if not (d / s["file"]).is_file():
            raise UserError(f"{d}: shard {s['file']} listed in {MANIFEST} is missing")
    return manifest


# -- checking shards ------------------------------------------------------------------------------
class ShardError(UserError):
    """A shard that does not match its manifest (truncated, damaged, replaced): re-run preprocess."""


def _rerun(directory, name: str | None) -> str:
    what = f"source {name!r} ({directory})" if name else str(directory)
    return f"re-run `meditron-jax preprocess ... --out {directory} --overwrite` for {what}"


def check_shards(directory: str | os.PathLike, manifest: dict, name: str | None = None) -> None:
    """The cheap check `train` runs on every source at start: each shard's byte size (where the
    manifest records it) and record count match the manifest. One `ShardError` line naming the
    shard and its source otherwise."""
    from array_record.python.array_record_module import ArrayRecordReader

    d = Path(directory)
    src = f"source {name!r}: " if name else ""
    for shard in manifest["shards"]:
        path = d / shard["file"]
        size = path.stat().st_size
        if "bytes" in shard and size != shard["bytes"]:
            how = "truncated" if size < shard["bytes"] else "longer than written"
            raise ShardError(f"{src}shard {path} is {size} bytes, its manifest says {shard['bytes']} ({how}); "
                             f"{_rerun(d, name)}")
        try:
            reader = ArrayRecordReader(str(path), "readahead_buffer_size:0")
            try:
                count = reader.num_records()
            finally:
                reader.close()
        except (RuntimeError, OSError, ValueError) as e:
            raise ShardError(f"{src}shard {path} is unreadable ({' '.join(str(e).split())[:200]}); "
                             f"{_rerun(d, name)}") from None
        if count != shard["documents"]:
            raise ShardError(f"{src}shard {path} holds {count} documents, its manifest says {shard['documents']}; "
                             f"{_rerun(d, name)}")


def verify(directory: str | os.PathLike, progress: bool = True) -> list[str]:
    """`meditron-jax data verify DIR`: every shard's size and SHA-256 against the manifest, read
    in full (with a progress bar over the bytes). Returns one problem line per bad shard."""
    from tqdm import tqdm

    d = Path(directory)
    manifest = load_manifest(d)
    shards = manifest["shards"]
    if not all("sha256" in s and "bytes" in s for s in shards):
        raise UserError(f"{d / MANIFEST} records no shard checksums (written by an older preprocess); "
                        f"{_rerun(d, None)} to get them")
    problems = []
    total = sum(s["bytes"] for s in shards)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"verify {d.name}",
              disable=not progress, dynamic_ncols=True) as bar:
        for s in shards:
            path = d / s["file"]
            size = path.stat().st_size
            if size != s["bytes"]:
                problems.append(f"shard {path} is {size} bytes, its manifest says {s['bytes']}")
                bar.update(s["bytes"])
                continue
            digest = file_sha256(path, bar.update)
            if digest != s["sha256"]:
                problems.append(f"shard {path} is damaged: SHA-256 {digest[:16]}..., its manifest says "
                                f"{s['sha256'][:16]}...")
    return problems


# -- CLI ------------------------------------------------------------------------------------------
