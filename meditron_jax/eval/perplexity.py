"""Perplexity of a model on a preprocessed dataset (`meditron-jax preprocess` output).

Owns: reading every document of the directory in order, cutting documents longer than the row
into non-overlapping pieces (each piece is predicted from its own start), packing pieces into
rows with segment ids and restarting positions (so packed documents never see each other),
and the token-weighted mean negative log-likelihood over all predicted tokens:
    loss = sum_i -log p(t_{i+1} | t_{<=i}, same piece) / number of predicted tokens,
    perplexity = exp(loss).
Each document is BOS + text + EOS, so the EOS is predicted and the BOS is not.
Does not own: the manifest / shard format (`data.preprocess`), the training data pipeline
(`data.loader`: mixing, shuffling and held-out splits are training concerns).
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meditron_jax.errors import UserError


class PerplexityError(UserError, ValueError):
    """Data directory problems (missing, wrong vocabulary) or bad settings."""


def iter_documents(directory: str, read_group: int = 256):
    """Token arrays (int32) of every document, in shard order."""
    import grain

    from meditron_jax.data.preprocess import load_manifest

    manifest = load_manifest(directory)
    dtype = np.dtype(manifest["dtype"])
    paths = [os.path.join(directory, s["file"]) for s in manifest["shards"]]
    source = grain.sources.ArrayRecordDataSource(paths)
    for start in range(0, len(source), read_group):
        for rec in source.__getitems__(list(range(start, min(start + read_group, len(source))))):
            yield np.frombuffer(rec, dtype=dtype).astype(np.int32)


def pack_rows(documents, seq_len: int):
    """Yields rows dict(inputs, targets, segment_ids, positions, mask) of length seq_len, numpy.

    A document of n tokens gives n-1 (input, target) pairs, cut into pieces of <= seq_len pairs;
    pieces are placed whole, in order, into the current row or else a fresh one.
    """
    def empty():
        return {k: np.zeros(seq_len, np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}

    row, used, seg = empty(), 0, 0
    for doc in documents:
        for s in range(0, len(doc) - 1, seq_len):
            piece = doc[s:s + seq_len + 1]
            n = len(piece) - 1
            if used + n > seq_len:
                yield row
                row, used, seg = empty(), 0, 0
            seg += 1
            row["inputs"][used:used + n] = piece[:-1]
            row["targets"][used:used + n] = piece[1:]
            row["segment_ids"][used:used + n] = seg
            row["positions"][used:used + n] = np.arange(n)
            used += n
    if used:
        yield row


def _nll_sum(graphdef, state, inputs, targets, segment_ids, positions, chunk: int):
    """Summed NLL and token count of one batch; logits are formed `chunk` positions at a time."""
    model = nnx.merge(graphdef, state)
    h = model.hidden(inputs, positions=positions, segment_ids=segment_ids)  # [B,T,D]
    B, T, D = h.shape
    mask = (segment_ids > 0).astype(jnp.float32)
    n = T // chunk
    hc = h.reshape(B, n, chunk, D).swapaxes(0, 1)
    tc = targets.reshape(B, n, chunk).swapaxes(0, 1)
    mc = mask.reshape(B, n, chunk).swapaxes(0, 1)

    def body(total, xs):
        hh, tt, mm = xs
        logits = model.logits(hh)  # [B,c,V] fp32, true vocab
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, tt[..., None], axis=-1)[..., 0]
        return total + jnp.sum((lse - tgt) * mm), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hc, tc, mc))
    return total, jnp.sum(mask)


def evaluate_dir(model, directory: str, seq_len: int | None = None, batch_size: int = 4,
                 max_batches: int | None = None, progress: bool = False, expected_fingerprint: str | None = None,
                 placement=None) -> dict:
    """`placement` (eval.distributed.Placement): a mesh to run on; the batch is split over its data
    axes (--batch-size must be a multiple of data x fsdp), the weights over tensor."""
    from tqdm import tqdm

    from meditron_jax.data.preprocess import load_manifest

    cfg = model.cfg
    manifest = load_manifest(directory)
    mt = manifest.get("tokenizer", {})
    where = os.path.join(directory, "manifest.json")
    if not isinstance(mt.get("vocab_size"), int) or mt["vocab_size"] > cfg.vocab_size:  # smaller: as train
        raise PerplexityError(f"{where}: data was tokenized with vocab {mt.get('vocab_size')} ({mt.get('path')}), "
                              f"but the model's vocab is {cfg.vocab_size}")
    if expected_fingerprint and mt.get("fingerprint") and mt["fingerprint"] != expected_fingerprint:
        raise PerplexityError(f"{where}: data was tokenized with tokenizer {mt['fingerprint'][:12]} "
                              f"({mt.get('path')}), not the model's {expected_fingerprint[:12]}; re-run preprocess")
    seq_len = seq_len or cfg.max_position_embeddings
    if seq_len < 2 or batch_size < 1:
        raise PerplexityError(f"need --seq-len >= 2 and --batch-size >= 1 (got {seq_len}, {batch_size})")
    if placement is not None and batch_size % placement.data:
        raise PerplexityError(f"--batch-size {batch_size} is not a multiple of the mesh's data-parallel size "
                              f"{placement.data}")
    chunk = math.gcd(seq_len, 512)
    graphdef, state = nnx.split(model)
    fn = jax.jit(functools.partial(_nll_sum, graphdef, chunk=chunk))

    total, count, batches, rows = 0.0, 0, 0, []
    bar = tqdm(total=max_batches, desc="ppl", unit="batch", disable=not progress)

    def flush(rows):
        batch = {k: np.stack([r[k] for r in rows] + [np.zeros(seq_len, np.int32)] * (batch_size - len(rows)))
                 for k in rows[0]}
        if placement is None:
            s, c = fn(state, batch["inputs"], batch["targets"], batch["segment_ids"], batch["positions"])
            return float(s), int(c)
        put = placement.put
        with placement.context():
            res = fn(state, put(batch["inputs"]), put(batch["targets"]), put(batch["segment_ids"]),
                     put(batch["positions"]))
        s, c = placement.fetch(res)
        return float(s), int(c)

    for row in pack_rows(iter_documents(directory), seq_len):
        rows.append(row)
        if len(rows) == batch_size:
            s, c = flush(rows)
            total, count, batches, rows = total + s, count + c, batches + 1, []
            bar.update(1)
            if max_batches is not None and batches >= max_batches:
                break
    if rows and (max_batches is None or batches < max_batches):
        s, c = flush(rows)
        total, count, batches = total + s, count + c, batches + 1
        bar.update(1)
    bar.close()
    if count == 0:
        raise PerplexityError(f"{directory}: no tokens to evaluate")
    loss = total / count
    return {"data": directory, "loss": loss, "perplexity": math.exp(loss), "tokens": count, "batches": batches,
            "seq_len": seq_len, "batch_size": batch_size, "documents_in_data": manifest.get("documents")}
