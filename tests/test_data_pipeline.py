"""Pipeline: packing invariants, every token once per epoch, mixture proportions, process-count
invariance, exact resume, held-out split, gin binding and configuration errors."""

from __future__ import annotations

import json
from collections import Counter

import gin
import numpy as np
import pytest

from meditron_jax.data.demo import generate_documents
from meditron_jax.data.config import DataConfig, DataConfigError
from meditron_jax.data.loader import build_pipeline
from meditron_jax.data.preprocess import load_manifest, preprocess
from meditron_jax.data.tokenizer import Tokenizer, train_tokenizer
from meditron_jax.errors import UserError
from tests.test_data_preprocess import _read_docs, _write_jsonl
from tests.test_data_tokenizer import small_corpus_lines, trained_tokenizer_path

SEQ, GB = 64, 8
KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    tok = trained_tokenizer_path()
    med = _write_jsonl(d / "med.jsonl", generate_documents("guidelines", 150, seed=3))
    gen = _write_jsonl(d / "gen.jsonl", generate_documents("replay", 200, seed=3) + small_corpus_lines(40))
    preprocess([med], tok, d / "med", workers=1, progress=False)
    preprocess([gen], tok, d / "gen", workers=1, progress=False)
    return {"tok": tok, "med": str(d / "med"), "gen": str(d / "gen"), "root": d}


def _cfg(data, **kw) -> DataConfig:
    base = dict(sources={"med": data["med"], "gen": data["gen"]}, tokenizer=data["tok"], prefetch_batches=2,
                read_group=16)
    base.update(kw)
    return DataConfig(**base)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_equal_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in KEYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_format_and_packing_invariants(data):
    p = build_pipeline(SEQ, GB, seed=1, config=_cfg(data))
    it = p.train_iterator()
    for b in _take(it, 30):
        assert set(b) == set(KEYS)
        for k in KEYS:
            assert b[k].shape == (GB, SEQ)
        assert b["loss_mask"].dtype == np.float32 and all(b[k].dtype == np.int32 for k in KEYS[:4])
        seg, pos, inp, tgt, mask = b["segment_ids"], b["positions"], b["inputs"], b["targets"], b["loss_mask"]
        np.testing.assert_array_equal(mask, (seg > 0).astype(np.float32))  # zero exactly on padding
        for r in range(GB):
            for t in range(SEQ):
                if seg[r, t] == 0:
                    continue
                start = t == 0 or seg[r, t - 1] != seg[r, t]
                assert pos[r, t] == (0 if start else pos[r, t - 1] + 1)
                if t + 1 < SEQ and seg[r, t + 1] == seg[r, t]:
                    assert tgt[r, t] == inp[r, t + 1]  # shifted within the document
                elif t + 1 < SEQ:
                    assert tgt[r, t] == 2  # a document's last target is EOS: nothing crosses the boundary
            assert (np.diff(seg[r][seg[r] > 0]) >= 0).all()
    it.close()


def _documents_of_stream(batches):
    """Splits the concatenated (input, target) stream of all rows at BOS: whole documents."""
    inp = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in batches])
    tgt = np.concatenate([b["targets"][b["segment_ids"] > 0] for b in batches])
    starts = np.flatnonzero(inp == 1)
    docs = [tuple(np.concatenate([inp[s:e], tgt[e - 1:e]]).tolist()) for s, e in zip(starts, list(starts[1:]) + [len(inp)])]
    return docs, inp, starts


def test_every_token_exactly_once_per_epoch(data):
    cfg = _cfg(data, sources={"med": data["med"]}, validation_fraction=0.0)
    p = build_pipeline(SEQ, GB, seed=7, config=cfg)
    docs = [tuple(d.tolist()) for d in _read_docs(data["root"] / "med")]
    pairs = sum(len(d) - 1 for d in docs)
    rows = -(-pairs // SEQ)
    it = p.train_iterator()
    batches = _take(it, -(-rows // GB) + 1)
    it.close()
    inp = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in batches])
    assert len(inp) == len(batches) * GB * SEQ  # concat-then-split: no padding at all
    stream, _, starts = _documents_of_stream(batches)
    first_epoch = Counter(stream[:len(docs)])
    assert first_epoch == Counter(docs)
    assert starts[len(docs)] == pairs  # the first epoch's documents fill exactly the first `pairs` slots
    assert [d for d in stream[:len(docs)]] != docs  # shuffled
    # the second epoch is another order of the same documents
    assert Counter(stream[len(docs):-1]) <= Counter(docs) and len(stream) > len(docs) + 2


def test_mixture_token_proportions(data):
    by_doc = {}
    for name in ("med", "gen"):
        for d in _read_docs(data["root"] / name):
            by_doc[tuple(d.tolist())] = name
    for w in (0.8, 0.3):
        p = build_pipeline(SEQ, GB, seed=2, config=_cfg(data, weights={"med": w, "gen": 1 - w}))
        it = p.train_iterator()
        batches = _take(it, 120)
        it.close()
        stream, _, _ = _documents_of_stream(batches)
        tokens = Counter()
        for d in stream[1:-1]:
            tokens[by_doc[d]] += len(d)
        share = tokens["med"] / (tokens["med"] + tokens["gen"])
        assert abs(share - w) < 0.04, (w, share)


def test_default_weights_are_token_proportional(data):
    p = build_pipeline(SEQ, GB, seed=0, config=_cfg(data))
    tm, tg = load_manifest(data["med"])["tokens"], load_manifest(data["gen"])["tokens"]
    assert p.weights["med"] == pytest.approx(tm / (tm + tg))
    assert p.tokenizer_info == {"path": data["tok"], "fingerprint": Tokenizer(data["tok"]).fingerprint, "vocab_size": 512,
                               "added_tokens": []}  # recorded in checkpoints; export writes them


def test_two_processes_equal_one_process_and_state_moves_between_them(data):
    cfg = _cfg(data)
    one = build_pipeline(SEQ, GB, seed=5, process_index=0, process_count=1, config=cfg).train_iterator()
    p0 = build_pipeline(SEQ, GB, seed=5, process_index=0, process_count=2, config=cfg).train_iterator()
    p1 = build_pipeline(SEQ, GB, seed=5, process_index=1, process_count=2, config=cfg).train_iterator()
    for _ in range(25):
        g, a, b = next(one), next(p0), next(p1)
        assert a["inputs"].shape == (GB // 2, SEQ)
        for k in KEYS:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), g[k], err_msg=k)
    s0, s1 = p0.get_state(), p1.get_state()
    assert s0 == s1 == one.get_state()
    saved = json.loads(json.dumps(s0))
    expected = _take(one, 10)
    resumed = build_pipeline(SEQ, GB, seed=5, config=cfg).train_iterator()
    resumed.set_state(saved)
    _assert_equal_batches(_take(resumed, 10), expected)
    for it in (one, p0, p1, resumed):
        it.close()


@pytest.mark.parametrize("k", [0, 1, 7, 13])
def test_resume_is_bitwise(data, k):
    cfg = _cfg(data, weights={"med": 0.6, "gen": 0.4})
    ref = build_pipeline(SEQ, GB, seed=11, config=cfg).train_iterator()
    _take(ref, k)
    state = json.loads(json.dumps(ref.get_state()))
    expected = _take(ref, 8)
    fresh = build_pipeline(SEQ, GB, seed=11, config=cfg).train_iterator()
    fresh.set_state(state)
    _assert_equal_batches(_take(fresh, 8), expected)
    ref.close()
    fresh.close()


def test_seed_changes_order_but_not_held_out_split(data):
    a = build_pipeline(SEQ, GB, seed=0, config=_cfg(data))
    b = build_pipeline(SEQ, GB, seed=1, config=_cfg(data))
    ia, ib = a.train_iterator(), b.train_iterator()
    assert not np.array_equal(next(ia)["inputs"], next(ib)["inputs"])
    ia.close(), ib.close()
    ea, eb = a.eval_batches(50), b.eval_batches(50)
    _assert_equal_batches(ea, eb)
    assert 1 <= len(ea) < 50
    assert ea[-1]["inputs"].shape == (GB, SEQ)
    # held-out documents never appear in training: check the first epoch of one source
    val_docs = set(_documents_of_stream(ea)[0])
    train_docs = set(_documents_of_stream(_take(build_pipeline(SEQ, GB, seed=3, config=_cfg(data)).train_iterator(), 40))[0])
    assert val_docs and not (val_docs & train_docs)


def test_gin_data_configurable(data):
    gin.clear_config()
    try:
        gin.parse_config([
            f"data.sources = {{'med': '{data['med']}', 'gen': '{data['gen']}'}}",
            "data.weights = {'med': 3, 'gen': 1}",
            f"data.tokenizer = '{data['tok']}'",
            "data.validation_fraction = 0.1",
        ])
        p = build_pipeline(SEQ, GB, seed=0)
        assert p.weights == {"med": 0.75, "gen": 0.25}
        assert p.cfg.validation_fraction == 0.1
    finally:
        gin.clear_config()


def test_demo_flag_builds_demo_corpus(tmp_path):
    cfg = DataConfig(demo=True, read_group=32)
    p = build_pipeline(128, 4, seed=0, workdir=str(tmp_path), config=cfg)
    assert p.weights == {"guidelines": 0.75, "replay": 0.25}
    assert (tmp_path / "demo_data" / "demo.json").is_file()
    assert p.tokenizer_info["vocab_size"] <= 2048
    it = p.train_iterator()
    b = next(it)
    it.close()
    text = Tokenizer(p.tokenizer_info["path"]).decode(b["inputs"][0][b["segment_ids"][0] > 0].tolist())
    assert len(text) > 100
    assert p.eval_batches(2)


@pytest.mark.parametrize("kw, message", [
    (dict(weights={"med": -1.0, "gen": 1.0}), r"data.weights\['med'\] = -1.0"),
    (dict(weights={"med": 0, "gen": 0.0}), "all zero"),
    (dict(weights={"med": 1.0, "pubmed": 1.0}), "unknown: \\['pubmed'\\]"),
    (dict(sources={"med": "/nonexistent/dir"}), "/nonexistent/dir does not exist"),
    (dict(added_tokens=("<x>",)), "vocab 512 .* the run uses vocab 513"),
    (dict(sft_files=("x.jsonl",)), "mutually exclusive"),
    (dict(sources=None), "no training data"),
    (dict(tokenizer=None), "data.tokenizer"),
    (dict(validation_fraction=1.0), "validation_fraction"),
])
def test_configuration_errors(data, kw, message):
    with pytest.raises(UserError, match=message):
        build_pipeline(SEQ, GB, seed=0, config=_cfg(data, **kw))


def test_fingerprint_mismatch_and_batch_divisibility(data, tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("\n".join(small_corpus_lines(300)) + "\nzebra quokka")
    other = train_tokenizer([src], 512, tmp_path / "other")  # same vocab size, different model
    with pytest.raises(DataConfigError, match=r"med/manifest.json: source 'med' was tokenized with tokenizer"):
        build_pipeline(SEQ, GB, seed=0, config=_cfg(data, tokenizer=other))
    with pytest.raises(DataConfigError, match="multiple of the process count 3"):
        build_pipeline(SEQ, GB, seed=0, process_count=3, config=_cfg(data))


def test_state_from_a_different_setup_is_refused(data):
    it = build_pipeline(SEQ, GB, seed=0, config=_cfg(data)).train_iterator()
    next(it)
    state = it.get_state()
    it.close()
    other = build_pipeline(SEQ, GB * 2, seed=0, config=_cfg(data)).train_iterator()
    with pytest.raises(DataConfigError, match="global_batch_size: saved 8, now 16"):
        other.set_state(state)
    with pytest.raises(DataConfigError, match="not a meditron-jax/data-iterator/v1 state"):
        other.set_state({"next_index": 3})
    other.close()
