"""Checkpoints that carry their tokenizer: the SentencePiece model file inside the checkpoint.

Owns: `record(tokenizer)`, the `tokenizer` entry of a checkpoint's meta item -- the absolute
path it was loaded from, its fingerprint (sha256 of the model bytes and the added tokens), the
vocab size, the added tokens, and the model file itself (`model_b64`, base64; Llama-2's
tokenizer.model is 500 kB, so about 670 kB per checkpoint) -- and `recorded_file(rec)`,
which gives a file that commands can open: the recorded path when it still holds the
recorded tokenizer, else the stored bytes written once to a cache file named by the
fingerprint (`$MEDITRON_JAX_CACHE` or `~/.cache/meditron-jax/tokenizers/`). The stored bytes
are checked against the fingerprint before use, so export / eval / generate work from any
directory and after the original file is deleted, and a wrong file is never used silently.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile

from meditron_jax.errors import UserError


def fingerprint(model_bytes: bytes, added_tokens=()) -> str:
    """The same hash `data.tokenizer.Tokenizer.fingerprint` computes."""
    h = hashlib.sha256(model_bytes)
    for t in added_tokens:
        h.update(b"\0" + str(t).encode("utf-8"))
    return h.hexdigest()


def record(tokenizer) -> dict:
    """The meta entry for a loaded `data.tokenizer.Tokenizer`."""
    with open(tokenizer.path, "rb") as f:
        model = f.read()
    return {"path": os.path.abspath(tokenizer.path), "fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size, "added_tokens": list(tokenizer.added_tokens),
            "model_b64": base64.b64encode(model).decode("ascii")}


def cache_dir() -> str:
    root = os.environ.get("MEDITRON_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "meditron-jax")
    return os.path.join(root, "tokenizers")


def _matches(path: str, rec: dict) -> bool:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return False
    want = rec.get("fingerprint")
    return not want or fingerprint(data, rec.get("added_tokens") or ()) == want


def recorded_file(rec: dict | None) -> str | None:
    """A path holding the checkpoint's tokenizer model, or None when there is none to be had
    (no record, or an old checkpoint whose recorded file is gone and which stores no bytes)."""
    if not rec or not isinstance(rec, dict):
        return None
    path = rec.get("path")
    if path and os.path.isfile(path) and _matches(path, rec):
        return path
    if not rec.get("model_b64"):
        return path if path and os.path.isfile(path) else None  # old record: keep the fingerprint warning
    data = base64.b64decode(rec["model_b64"])
    fp = fingerprint(data, rec.get("added_tokens") or ())
    if rec.get("fingerprint") and fp != rec["fingerprint"]:
        raise UserError(f"the tokenizer stored in the checkpoint does not match its fingerprint "
                        f"({fp[:12]} != {rec['fingerprint'][:12]}): the checkpoint metadata is damaged")
    d = cache_dir()
    out = os.path.join(d, f"{fp}.model")
    if os.path.isfile(out) and _matches(out, {**rec, "fingerprint": fp}):
        return out
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    except OSError:  # no writable cache: a private temporary directory
        d = tempfile.mkdtemp(prefix="meditron-jax-tokenizer-")
        out = os.path.join(d, "tokenizer.model")
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, out)
    return out
