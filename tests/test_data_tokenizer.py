"""Tokenizer: training, round trip, added tokens as single ids, fingerprint, bad files.

`small_corpus_lines` / `trained_tokenizer_path` are shared by the other tests/test_data_*.py files
(one tokenizer trained per session, cached on disk in a temp directory)."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import pytest
import sentencepiece as spm

from meditron_jax.data.tokenizer import Tokenizer, TokenizerError, train_tokenizer
from meditron_jax.errors import UserError

_DRUGS = ["aspirin", "metformin", "heparin", "amoxicillin", "insulin", "warfarin", "lisinopril", "atorvastatin"]
_CONDITIONS = ["hypertension", "type 2 diabetes", "pneumonia", "atrial fibrillation", "sepsis", "asthma"]


def small_corpus_lines(n: int = 400) -> list[str]:
    """Deterministic medical-flavoured sentences of varying length (no external data)."""
    lines = []
    for i in range(n):
        d = _DRUGS[i % len(_DRUGS)]
        c = _CONDITIONS[(i * 7) % len(_CONDITIONS)]
        dose = 5 * (1 + (i * 13) % 40)
        extra = " ".join(f"Follow-up visit {k}: {d} {dose + k} mg, no adverse events." for k in range(i % 9))
        lines.append(f"Patients with {c} received {d} {dose} mg daily (case {i}). {extra}".strip())
    return lines


@functools.lru_cache(maxsize=None)
def trained_tokenizer_path(vocab_size: int = 512) -> str:
    d = Path(tempfile.mkdtemp(prefix="mjx-tok-"))
    src = d / "corpus.txt"
    src.write_text("\n".join(small_corpus_lines()) + "\nÜber café naïve ✓ 🩺\n")
    return train_tokenizer([src], vocab_size, d / "tok")


@pytest.fixture(scope="module")
def tok_path() -> str:
    return trained_tokenizer_path()


def test_trained_model_has_llama2_conventions(tok_path):
    sp = spm.SentencePieceProcessor(model_file=tok_path)
    assert sp.vocab_size() == 512
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    t = Tokenizer(tok_path)
    assert (t.bos_id, t.eos_id, t.vocab_size) == (1, 2, 512)
    # byte fallback: a character never seen in training still round-trips through byte pieces
    assert t.decode(t.encode("ẞ")) == "ẞ"
    assert t.unk_id not in t.encode("ẞ 漢字")


def test_training_is_deterministic(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("\n".join(small_corpus_lines(120)))
    a = train_tokenizer([src], 300, tmp_path / "a")
    b = train_tokenizer([src], 300, tmp_path / "b")
    assert Path(a).read_bytes() == Path(b).read_bytes()


def test_round_trip_and_bos_eos(tok_path):
    t = Tokenizer(tok_path)
    for text in small_corpus_lines(30)[::7] + ["  two  spaces\nnewline\ttab", "Über café 🩺 12345"]:
        ids = t.encode(text, bos=True, eos=True)
        assert ids[0] == 1 and ids[-1] == 2
        assert t.decode(ids[1:-1]) == text
        assert ids[1:-1] == spm.SentencePieceProcessor(model_file=tok_path).encode(text)


def test_added_tokens_are_single_ids(tok_path):
    added = ("<|im_start|>", "<|im_end|>", "[bib_ref]")
    t = Tokenizer(tok_path, added_tokens=added)
    assert t.vocab_size == 512 + 3
    ids = t.encode("<|im_start|>user aspirin<|im_end|>[bib_ref]")
    assert ids[0] == 512 and 513 in ids and ids[-1] == 514
    assert ids.count(512) == 1 and ids.count(513) == 1
    assert all(i < 512 for i in ids if i not in (512, 513, 514))
    assert t.decode(ids) == "<|im_start|>user aspirin<|im_end|>[bib_ref]"
    assert t.piece_to_id("<|im_end|>") == 513 and t.id_to_piece(514) == "[bib_ref]"


def test_fingerprint_changes_with_model_and_added_tokens(tok_path, tmp_path):
    base = Tokenizer(tok_path)
    assert base.fingerprint == Tokenizer(tok_path).fingerprint
    assert len(base.fingerprint) == 64
    assert Tokenizer(tok_path, ("<x>",)).fingerprint != base.fingerprint
    src = tmp_path / "c.txt"
    src.write_text("\n".join(small_corpus_lines(200)))
    other = train_tokenizer([src], 400, tmp_path / "other")
    assert Tokenizer(other).fingerprint != base.fingerprint


def test_not_a_sentencepiece_file_is_a_user_error(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(TokenizerError, match=str(bad)):
        Tokenizer(bad)
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer(tmp_path / "missing.model")
    assert issubclass(TokenizerError, UserError)


def test_cli_tokenizer_train(tmp_path, cli):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": s}) + "\n" for s in small_corpus_lines(150)))
    r = cli("tokenizer", "train", "--input", src, "--vocab-size", "320", "--out", tmp_path / "cli")
    assert r.returncode == 0, r.stderr
    assert Tokenizer(tmp_path / "cli.model").vocab_size == 320
    bad = cli("tokenizer", "train", "--input", tmp_path / "nope.txt", "--vocab-size", "320", "--out", tmp_path / "x")
    assert bad.returncode == 2 and "nope.txt" in bad.stderr and "Traceback" not in bad.stderr
