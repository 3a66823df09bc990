"""Preprocessing: token counts equal SentencePiece's (+ BOS/EOS), identical output for 1 and 2
workers, empty documents counted and skipped, bad input -> one clear error and no output dir."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from array_record.python.array_record_module import ArrayRecordReader

from meditron_jax.data.preprocess import PreprocessError, load_manifest, preprocess
from meditron_jax.errors import UserError
from tests.test_data_tokenizer import small_corpus_lines, trained_tokenizer_path


def _write_jsonl(path: Path, texts, key="text"):
    path.write_text("".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def _read_docs(d: Path) -> list[np.ndarray]:
    m = load_manifest(d)
    out = []
    for s in m["shards"]:
        r = ArrayRecordReader(str(d / s["file"]))
        out += [np.frombuffer(b, dtype=m["dtype"]) for b in r.read_all()]
        r.close()
    return out


@pytest.fixture(scope="module")
def tok_path():
    return trained_tokenizer_path()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("pp")
    texts = small_corpus_lines(300)
    texts[5] = ""
    texts[17] = "   \n "
    texts[40] = "Ünïcödé ✓ 🩺 text with bytes"
    return _write_jsonl(d / "docs.jsonl", texts), texts


def test_counts_match_sentencepiece_plus_bos_eos(tmp_path, tok_path, corpus):
    path, texts = corpus
    m = preprocess([path], tok_path, tmp_path / "out", workers=1, progress=False)
    sp = spm.SentencePieceProcessor(model_file=tok_path)
    kept = [t for t in texts if t.strip()]
    expected = [[1] + sp.encode(t) + [2] for t in kept]
    assert m["documents"] == len(kept) == 298
    assert m["skipped_empty_documents"] == 2
    assert m["tokens"] == sum(len(e) for e in expected)
    assert m["dtype"] == "uint16" and m["bos_eos_added"] is True
    assert m["tokenizer"]["vocab_size"] == 512 and len(m["tokenizer"]["fingerprint"]) == 64
    docs = _read_docs(tmp_path / "out")
    assert [d.tolist() for d in docs] == expected
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp dir renamed away


def test_one_and_two_workers_give_identical_bytes(tmp_path, tok_path, corpus):
    path, _ = corpus
    kw = dict(progress=False, chunk_bytes=4096, shard_tokens=3000)  # many chunks and several shards
    m1 = preprocess([path, path], tok_path, tmp_path / "w1", workers=1, **kw)
    m2 = preprocess([path, path], tok_path, tmp_path / "w2", workers=2, **kw)
    assert m1 == m2 and len(m1["shards"]) > 2
    for s in m1["shards"]:
        assert (tmp_path / "w1" / s["file"]).read_bytes() == (tmp_path / "w2" / s["file"]).read_bytes()
    assert (tmp_path / "w1" / "manifest.json").read_bytes() == (tmp_path / "w2" / "manifest.json").read_bytes()


def test_gzip_input_and_custom_text_key(tmp_path, tok_path):
    texts = small_corpus_lines(20)
    raw = _write_jsonl(tmp_path / "a.jsonl", texts, key="body")
    gz = tmp_path / "a.jsonl.gz"
    gz.write_bytes(gzip.compress(raw.read_bytes()))
    m_raw = preprocess([raw], tok_path, tmp_path / "r", text_key="body", workers=1, progress=False)
    m_gz = preprocess([gz], tok_path, tmp_path / "g", text_key="body", workers=1, progress=False)
    assert m_raw["tokens"] == m_gz["tokens"] and m_raw["documents"] == 20
    assert [d.tolist() for d in _read_docs(tmp_path / "r")] == [d.tolist() for d in _read_docs(tmp_path / "g")]


def test_added_tokens_and_int32_dtype(tmp_path, monkeypatch):
    import meditron_jax.data.preprocess as pp

    assert pp.token_dtype(65536) == np.uint16 and pp.token_dtype(65537) == np.int32
    src = _write_jsonl(tmp_path / "x.jsonl", ["aspirin <|im_end|> dose", "plain"])
    tok = trained_tokenizer_path()
    m = preprocess([src], tok, tmp_path / "o", workers=1, progress=False, added_tokens=("<|im_end|>",))
    assert m["tokenizer"]["vocab_size"] == 513 and m["tokenizer"]["added_tokens"] == ["<|im_end|>"]
    small = _read_docs(tmp_path / "o")
    assert 512 in small[0].tolist()
    # a vocabulary above 65536 ids (none fits in a test) is stored as int32: same ids, wider records
    monkeypatch.setattr(pp, "token_dtype", lambda vocab_size: np.dtype(np.int32))
    m32 = preprocess([src], tok, tmp_path / "o32", workers=1, progress=False, added_tokens=("<|im_end|>",))
    assert m32["dtype"] == "int32"
    assert [d.tolist() for d in _read_docs(tmp_path / "o32")] == [d.tolist() for d in small]


@pytest.mark.parametrize("content, message", [
    (b'{"text": "ok"}\n{"text": "broken\n', r"bad\.jsonl:2: malformed JSON"),
    (b'{"text": "ok"}\n{"body": "no text key"}\n', r"bad\.jsonl:2: no 'text' key"),
    (b'{"text": "ok"}\n{"text": 5}\n', r"bad\.jsonl:2: 'text' is int"),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"bad\.jsonl:2: not valid UTF-8"),
    (b"", r"nothing to train on in .*bad\.jsonl"),
    (b'{"text": ""}\n{"text": "  "}\n', r"2 empty documents"),
])
def test_bad_input_is_one_clear_error_and_leaves_no_output(tmp_path, tok_path, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    with pytest.raises(PreprocessError, match=message):
        preprocess([bad], tok_path, tmp_path / "out", workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # no partial or temp dir


def test_bad_tokenizer_and_existing_output(tmp_path, tok_path, corpus):
    path, _ = corpus
    fake = tmp_path / "tok.model"
    fake.write_text("not a model")
    with pytest.raises(UserError, match="tok.model is not a SentencePiece model"):
        preprocess([path], fake, tmp_path / "out", workers=1, progress=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(PreprocessError, match="exists and is not empty"):
        preprocess([path], tok_path, tmp_path / "out", workers=1, progress=False)
    with pytest.raises(PreprocessError, match="does not exist"):
        preprocess([tmp_path / "missing.jsonl"], tok_path, tmp_path / "o2", workers=1, progress=False)


def test_worker_error_propagates_with_file_and_line(tmp_path, tok_path):
    texts = small_corpus_lines(50)
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": t}) for t in texts]
    lines[33] = "{not json"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(PreprocessError, match=r"bad\.jsonl:34: malformed JSON"):
        preprocess([bad], tok_path, tmp_path / "out", workers=2, progress=False, chunk_bytes=512)
    assert not (tmp_path / "out").exists()


def test_cli_preprocess(tmp_path, tok_path, corpus, cli):
    path, _ = corpus
    cmd = ["preprocess", "--input", str(path), "--tokenizer", tok_path,
           "--out", str(tmp_path / "cli"), "--workers", "2", "--no-progress"]
    r = cli(*cmd)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "cli" / "manifest.json").read_text())["documents"] == 298
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    cmd[cmd.index(str(path))] = str(bad)
    cmd[cmd.index(str(tmp_path / "cli"))] = str(tmp_path / "cli2")
    r = cli(*cmd)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "bad.jsonl:2: malformed JSON" in r.stderr
    assert not (tmp_path / "cli2").exists()
