"""Demo corpus: deterministic, idempotent, small vocabulary, two sources, own licence note."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from meditron_jax.data.demo import SOURCES, generate_documents, prepare_demo
from meditron_jax.data.tokenizer import Tokenizer


def test_prepare_demo_is_deterministic_and_idempotent(tmp_path):
    small = (300, 200)
    a = prepare_demo(tmp_path / "a", documents=small)
    b = prepare_demo(tmp_path / "b", documents=small)
    assert set(a["sources"]) == set(SOURCES) == {"guidelines", "replay"}
    assert Path(a["tokenizer"]).read_bytes() == Path(b["tokenizer"]).read_bytes()
    assert Tokenizer(a["tokenizer"]).vocab_size <= 2048
    for s in SOURCES:
        ma = json.loads((Path(a["sources"][s]) / "manifest.json").read_text())
        assert ma["tokenizer"]["path"] == a["tokenizer"]  # points at the final location
        assert ma["documents"] == small[SOURCES.index(s)]
        shard = ma["shards"][0]["file"]
        assert (Path(a["sources"][s]) / shard).read_bytes() == (Path(b["sources"][s]) / shard).read_bytes()
    stamp = (tmp_path / "a" / "demo.json").stat().st_mtime_ns
    assert prepare_demo(tmp_path / "a", documents=small) == a and a["weights"] == {"guidelines": 0.75, "replay": 0.25}
    assert (tmp_path / "a" / "demo.json").stat().st_mtime_ns == stamp  # not rebuilt
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_generated_text_is_varied_and_licensed():
    docs = generate_documents("guidelines", 200)
    assert docs == generate_documents("guidelines", 200)
    assert len(set(docs)) > 185
    assert any(d.startswith("Clinical guideline:") for d in docs) and any(d.startswith("Case report.") for d in docs)
    assert len(set(generate_documents("replay", 200))) > 150
    note = resources.files("meditron_jax").joinpath("demo/LICENSE.md").read_text()
    assert "written for" in note and "Apache-2.0" in note


def test_concurrent_builders_agree(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    small = (120, 80)
    with ThreadPoolExecutor(3) as ex:
        results = list(ex.map(lambda _: prepare_demo(tmp_path / "shared", documents=small), range(3)))
    assert results[0] == results[1] == results[2]
    assert Tokenizer(results[0]["tokenizer"]).vocab_size <= 2048
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"]
