"""The Llama-2 SentencePiece tokenizer, Meditron's added tokens, and `meditron-jax tokenizer train`.

Owns: loading a SentencePiece `tokenizer.model` with Llama-2 conventions (BOS 1, EOS 2, UNK 0,
byte fallback), appending extra special tokens after the base vocabulary (Meditron adds 17 to
Llama-2's 32000, giving 32017) so that each encodes as one id, a stable fingerprint of the
tokenizer (sha256 of the model bytes and the added tokens) that manifests and checkpoints record,
and training a small BPE model for the built-in demo and the tests.

Does not own: turning corpora into shards (`data.preprocess`), chat/prompt formats (`data.sft`),
or exporting tokenizer files next to Hugging Face weights (`convert`).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from meditron_jax.data import jsonl
from meditron_jax.errors import UserError


class TokenizerError(UserError):
    """A tokenizer file that is missing, unreadable, or not a SentencePiece model."""


class Tokenizer:
    """A SentencePiece model plus optional added tokens appended after the base vocab.

    Added token `added_tokens[i]` has id `base_vocab_size + i`. Text is split on the added
    tokens (longest match first) before SentencePiece sees it, so they never break into pieces.
    """

    def __init__(self, path: str | os.PathLike, added_tokens: Sequence[str] = ()):
        self.path = str(path)
        p = Path(self.path)
        if not p.is_file():
            raise TokenizerError(f"tokenizer file {self.path} does not exist")
        model_bytes = p.read_bytes()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_bytes)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ text
            raise TokenizerError(f"{self.path} is not a SentencePiece model ({e.__class__.__name__})") from None
        if self._sp.vocab_size() <= 0:
            raise TokenizerError(f"{self.path} is not a SentencePiece model (empty vocabulary)")
        self.added_tokens: tuple[str, ...] = tuple(str(t) for t in added_tokens)
        if len(set(self.added_tokens)) != len(self.added_tokens) or any(not t for t in self.added_tokens):
            raise UserError(f"added tokens must be distinct non-empty strings, got {list(self.added_tokens)}")
        self.base_vocab_size: int = self._sp.vocab_size()
        self._added_to_id = {t: self.base_vocab_size + i for i, t in enumerate(self.added_tokens)}
        if self.added_tokens:
            alternatives = sorted(self.added_tokens, key=len, reverse=True)
            self._split_re = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")
        else:
            self._split_re = None
        h = hashlib.sha256(model_bytes)
        for t in self.added_tokens:
            h.update(b"\0" + t.encode("utf-8"))
        self.fingerprint: str = h.hexdigest()

    # -- ids ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + len(self.added_tokens)

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def pad_id(self) -> int:
        """Llama-2 has no pad piece (SentencePiece says -1); padding uses id 0 and is always masked."""
        pid = self._sp.pad_id()
        return pid if pid >= 0 else 0

    @property
    def sp(self) -> spm.SentencePieceProcessor:
        """The underlying SentencePiece processor (base vocabulary only)."""
        return self._sp

    def id_to_piece(self, i: int) -> str:
        if i >= self.base_vocab_size:
            return self.added_tokens[i - self.base_vocab_size]
        return self._sp.id_to_piece(i)

    def piece_to_id(self, piece: str) -> int:
        if piece in self._added_to_id:
            return self._added_to_id[piece]
        return self._sp.piece_to_id(piece)

    # -- text <-> ids ------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids: list[int] = [self.bos_id] if bos else []
        if self._split_re is None:
            ids.extend(self._sp.encode(text))
        else:
            for part in self._split_re.split(text):
                if not part:
                    continue
                tid = self._added_to_id.get(part)
                if tid is not None:
                    ids.append(tid)
                else:
                    ids.extend(self._sp.encode(part))
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False,
                     num_threads: int = 1) -> list[list[int]]:
        """Like `encode` on each text; uses SentencePiece's batch call when nothing is added."""
        if self._split_re is not None:
            return [self.encode(t, bos=bos, eos=eos) for t in texts]
        return self._sp.encode(list(texts), add_bos=bos, add_eos=eos, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i >= self.base_vocab_size:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                out.append(self.added_tokens[i - self.base_vocab_size])
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def info(self) -> dict:
        return {"path": self.path, "fingerprint": self.fingerprint, "vocab_size": self.vocab_size,
                "added_tokens": list(self.added_tokens)}

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, added={len(self.added_tokens)})"


def train_tokenizer(
    input_files: Sequence[str | os.PathLike],
    vocab_size: int,
    out_prefix: str | os.PathLike,
    *,
    text_key: str | None = None,
    character_coverage: float = 0.9995,
    max_sentence_length: int = 16384,
) -> str:
    """Trains a Llama-2-like BPE SentencePiece model and writes `{out_prefix}.model`.

    Llama-2 settings: BPE, byte fallback, split digits, identity normalisation, whitespace kept,
    UNK 0 / BOS 1 / EOS 2, no pad piece. Deterministic for a given input (one thread, no input
    shuffling). Input files are plain text (one sentence per line) or, when `text_key` is given
    or the name ends in .jsonl/.jsonl.gz, JSONL whose `text_key` (default 'text') is used.
    Returns the path of the written model; it is written under a temporary name and renamed.
    """
    if vocab_size < 260:
        raise UserError(f"--vocab-size {vocab_size} is too small: byte fallback alone needs 259 ids")
    if not input_files:
        raise UserError("tokenizer train needs at least one --input file")
    sentences: list[str] = []
    for f in input_files:
        f = str(f)
        if not os.path.isfile(f):
            raise UserError(f"input file {f} does not exist")
        if text_key is not None or f.endswith((".jsonl", ".jsonl.gz", ".json")):
            for text in jsonl.iter_texts(f, text_key or "text"):
                sentences.extend(line for line in text.split("\n") if line.strip())
        else:
            try:
                with open(f, encoding="utf-8") as fh:
                    sentences.extend(line.rstrip("\n") for line in fh if line.strip())
            except UnicodeDecodeError as e:
                raise UserError(f"{f}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not sentences:
        raise UserError(f"no text found in {', '.join(map(str, input_files))}")

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            character_coverage=character_coverage,
            max_sentence_length=max_sentence_length,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=1,
            shuffle_input_sentence=False,
            input_sentence_size=0,
            minloglevel=2,
        )
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        raise UserError(f"tokenizer training failed: {msg}") from None
    out = Path(str(out_prefix) + ".model")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    from meditron_jax.errors import storage_faults
    try:
        with storage_faults("writing", str(out.absolute()), needed=len(model.getvalue()),
                            hint="nothing was written"):
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(model.getvalue())
            os.replace(tmp, out)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    return str(out)


# -- CLI: `meditron-jax tokenizer train ...` -------------------------------------------------
