"""QA fine-tuning: mcq-to-sft writes the evaluation's format; a few SFT steps through the CLI lower
the loss on the answer tokens."""

import json

import numpy as np

from meditron_jax import from_pretrained
from meditron_jax.cli import main as cli_main
from meditron_jax.data.tokenizer import Tokenizer
from meditron_jax.eval import mcq, tasks
from tests.eval_helpers import tiny_config, train_tiny_tokenizer, write_medmcqa, write_medqa, write_pubmedqa
from tests.hf_helpers import make_hf_model


def test_mcq_to_sft_matches_eval_prompts(tmp_path, capsys):
    write_medmcqa(tmp_path / "train.jsonl", n=5, base=0)
    out = tmp_path / "sft.jsonl"
    assert cli_main(["data", "mcq-to-sft", "--task", "medmcqa", "--cop-base", "0", "--input",
                     str(tmp_path / "train.jsonl"), "--out", str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    items = tasks.read_medmcqa(str(tmp_path / "train.jsonl"), 0)
    t = mcq.PromptTemplate.for_task("medmcqa")
    assert [r["prompt"] for r in recs] == [t.prompt(it, []) for it in items]
    assert [r["completion"] for r in recs] == ["A", "B", "C", "D", "A"]

    write_pubmedqa(tmp_path / "p.json", n=6)
    (tmp_path / "gt.json").write_text(json.dumps({"1000": "yes", "1004": "no"}))
    assert cli_main(["data", "mcq-to-sft", "--task", "pubmedqa", "--input", str(tmp_path / "p.json"),
                     "--split-file", str(tmp_path / "gt.json"), "--out", str(out), "--no-instruction"]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == ["1001", "1002", "1003", "1005"]  # the test PMIDs are left out
    assert recs[0]["prompt"].startswith("Context: ") and recs[0]["prompt"].endswith("The answer is:")
    capsys.readouterr()
    assert cli_main(["data", "mcq-to-sft", "--task", "medmcqa", "--input", str(tmp_path / "train.jsonl"),
                     "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "--cop-base" in capsys.readouterr().err and not (tmp_path / "x.jsonl").exists()


def _answer_nll(model, tok, recs):
    """Mean NLL of the completion's tokens after each prompt (the SFT tokenization: separate pieces)."""
    rows = []
    for r in recs:
        p = tok.encode(r["prompt"], bos=True)
        c = tok.encode(r["completion"])
        rows.append(mcq.Row(p + c, list(range(len(p) - 1, len(p) - 1 + len(c))), [[t] for t in c]))
    scores = mcq.Scorer(model, batch_size=8, length_bucket=128)(rows)
    return -float(np.mean([s[:, 0].mean() for s, _ in scores]))


def test_sft_through_cli_lowers_answer_loss(tmp_path):
    tok_path = train_tiny_tokenizer(str(tmp_path), vocab_size=600)
    tok = Tokenizer(tok_path)
    cfg = tiny_config(tok.vocab_size)
    make_hf_model(cfg, seed=5).save_pretrained(tmp_path / "hf")
    assert cli_main(["import", "--from", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0

    write_medqa(tmp_path / "train.jsonl", n=24, n_options=4, seed=1)
    sft = tmp_path / "sft.jsonl"
    assert cli_main(["data", "mcq-to-sft", "--task", "medqa", "--input", str(tmp_path / "train.jsonl"),
                     "--out", str(sft)]) == 0
    recs = [json.loads(line) for line in sft.read_text().splitlines()]
    before = _answer_nll(from_pretrained(str(tmp_path / "hf")), tok, recs)

    overrides = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                     max_position_embeddings=cfg.max_position_embeddings)
    params = [f"model.{k}={v}" for k, v in overrides.items()] + [
        f"train.init_from='{tmp_path / 'ckpt'}'", f"data.sft_files=['{sft}']", f"data.tokenizer='{tok_path}'",
        "train.micro_batch_size=1", "train.steps=24", "train.checkpoint_every=24", "optimizer.lr=1e-2"]
    argv = ["train", "--gin_file", "configs/sft_tiny.gin", "--workdir", str(tmp_path / "run")]
    for p in params:
        argv += ["--gin_param", p]
    assert cli_main(argv) == 0
    after = _answer_nll(from_pretrained(str(tmp_path / "run")), tok, recs)
    print(f"[sft] answer-token NLL before {before:.3f} after {after:.3f}")
    assert after < 0.5 * before and after < np.log(8)

    # the fine-tuned checkpoint evaluates through `eval mcq` with the recorded tokenizer
    out = tmp_path / "res.json"
    assert cli_main(["eval", "mcq", "--checkpoint", str(tmp_path / "run"), "--task", "medqa", "--data",
                     str(tmp_path / "train.jsonl"), "--shots", "0", "--no-progress", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["counts"]["1234"]["items"] == 24
