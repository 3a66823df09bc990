"""Perplexity on a preprocessed directory equals a per-document transformers computation."""

import json
import math
import random

import pytest
import torch

from meditron_jax import from_pretrained
from meditron_jax.cli import main as cli_main
from meditron_jax.data.preprocess import preprocess
from meditron_jax.data.tokenizer import Tokenizer
from meditron_jax.eval import perplexity
from tests.eval_helpers import WORDS, tiny_config, train_tiny_tokenizer
from tests.hf_helpers import make_hf_model


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppl")
    tok_path = train_tiny_tokenizer(str(d), vocab_size=600)
    tok = Tokenizer(tok_path)
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.choice([3, 8, 20, 45]))) for _ in range(14)]
    with open(d / "docs.jsonl", "w") as f:
        for t in docs:
            f.write(json.dumps({"text": t}) + "\n")
    preprocess([str(d / "docs.jsonl")], tok_path, str(d / "pre"), workers=1, progress=False)
    hf = make_hf_model(tiny_config(tok.vocab_size), seed=11)
    hf.save_pretrained(d / "hf")
    return {"d": d, "tok": tok, "tok_path": tok_path, "hf": hf, "hf_dir": str(d / "hf"), "pre": str(d / "pre"),
            "docs": [tok.encode(t, bos=True, eos=True) for t in docs]}


def _reference(hf, docs, seq_len):
    total, count = 0.0, 0
    for doc in docs:
        for s in range(0, len(doc) - 1, seq_len):
            piece = doc[s:s + seq_len + 1]
            with torch.no_grad():
                lp = torch.log_softmax(hf(torch.tensor([piece[:-1]])).logits[0].double(), -1)
            total -= sum(lp[i, t].item() for i, t in enumerate(piece[1:]))
            count += len(piece) - 1
    return total / count, count


def test_perplexity_matches_transformers(env):
    seq_len = 32
    assert max(len(d) for d in env["docs"]) > seq_len + 1  # some documents are cut into pieces
    ref_loss, ref_count = _reference(env["hf"], env["docs"], seq_len)
    model = from_pretrained(env["hf_dir"])
    out = perplexity.evaluate_dir(model, env["pre"], seq_len=seq_len, batch_size=3)
    assert out["tokens"] == ref_count == sum(len(d) - 1 for d in env["docs"])
    assert abs(out["loss"] - ref_loss) < 1e-5 * ref_loss
    assert abs(out["perplexity"] - math.exp(ref_loss)) < 1e-4 * math.exp(ref_loss)
    rows = list(perplexity.pack_rows(iter(env["docs"]), seq_len))
    assert out["batches"] == math.ceil(len(rows) / 3)

    one = perplexity.evaluate_dir(model, env["pre"], seq_len=seq_len, batch_size=3, max_batches=1)
    assert one["batches"] == 1 and one["tokens"] == sum(int((r["segment_ids"] > 0).sum()) for r in rows[:3])


def test_ppl_cli_and_vocab_mismatch(env, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    rc = cli_main(["eval", "ppl", "--checkpoint", env["hf_dir"], "--data", env["pre"], "--seq-len", "32",
                   "--batch-size", "3", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["tokens"] == sum(len(d) - 1 for d in env["docs"]) and res["perplexity"] > 1
    other = make_hf_model(tiny_config(512), seed=1)
    other.save_pretrained(tmp_path / "other")
    capsys.readouterr()
    rc = cli_main(["eval", "ppl", "--checkpoint", str(tmp_path / "other"), "--data", env["pre"]])
    err = capsys.readouterr().err
    assert rc == 2 and "data was tokenized with vocab 600" in err and "model's vocab is 512" in err
