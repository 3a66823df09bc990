"""k-shot exam evaluation: readers, prompts, demonstrations, scoring vs transformers, CLI."""

import json

import numpy as np
import pytest
import torch

from meditron_jax import from_pretrained
from meditron_jax.cli import main as cli_main
from meditron_jax.data.tokenizer import Tokenizer
from meditron_jax.eval import mcq, tasks
from meditron_jax.eval.mcq import PromptTemplate
from tests.eval_helpers import (tiny_config, train_tiny_tokenizer, write_medmcqa, write_medqa, write_mmlu,
                                write_pubmedqa)
from tests.hf_helpers import make_hf_model


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalmcq")
    tok_path = train_tiny_tokenizer(str(d), vocab_size=600)
    tok = Tokenizer(tok_path)
    cfg = tiny_config(tok.vocab_size)
    hf = make_hf_model(cfg, seed=3)
    hf.save_pretrained(d / "hf")
    return {"dir": d, "tok_path": tok_path, "tok": tok, "cfg": cfg, "hf": hf, "hf_dir": str(d / "hf"),
            "model": from_pretrained(str(d / "hf"))}


# -- readers ---------------------------------------------------------------------------------
def test_readers_parse_documented_formats(tmp_path):
    write_pubmedqa(tmp_path / "ori_pqal.json", n=6)
    (tmp_path / "gt.json").write_text(json.dumps({"1001": "no", "1002": "maybe"}))
    test, rest = tasks.read_pubmedqa(str(tmp_path / "ori_pqal.json"), str(tmp_path / "gt.json"))
    assert [it.id for it in test] == ["1001", "1002"] and [it.gold for it in test] == ["no", "maybe"]
    assert len(rest) == 4 and {"1001", "1002"}.isdisjoint(it.id for it in rest)
    assert test[0].labels == ("yes", "no", "maybe") and "\n" in test[0].context
    (tmp_path / "pmids.txt").write_text("1003\n1000\n")
    test2, _ = tasks.read_pubmedqa(str(tmp_path / "ori_pqal.json"), str(tmp_path / "pmids.txt"))
    assert [it.id for it in test2] == ["1003", "1000"]

    write_medmcqa(tmp_path / "m1.jsonl", n=4, base=1)
    write_medmcqa(tmp_path / "m0.jsonl", n=4, base=0)
    one = tasks.read_medmcqa(str(tmp_path / "m1.jsonl"), cop_base=1)
    zero = tasks.read_medmcqa(str(tmp_path / "m0.jsonl"), cop_base=0)
    assert [it.gold for it in one] == [it.gold for it in zero] == ["A", "B", "C", "D"]
    assert one[0].labels == ("A", "B", "C", "D") and one[0].id == "m0"

    write_medqa(tmp_path / "q.jsonl", n=5, n_options=5)
    q = tasks.read_medqa(str(tmp_path / "q.jsonl"))
    assert q[1].gold == "B" and q[1].labels == ("A", "B", "C", "D", "E")
    rec = json.loads((tmp_path / "q.jsonl").read_text().splitlines()[0])
    rec["options"] = [{"key": k, "value": v} for k, v in rec["options"].items()]
    (tmp_path / "q2.jsonl").write_text(json.dumps(rec) + "\n")
    assert tasks.read_medqa(str(tmp_path / "q2.jsonl"))[0].options == q[0].options

    write_mmlu(tmp_path / "anatomy_test.csv", n=4, header=True)
    m = tasks.read_mmlu(str(tmp_path / "anatomy_test.csv"))
    assert len(m) == 4 and m[0].subject == "anatomy" and [it.gold for it in m] == ["A", "B", "C", "D"]
    items, _ = tasks.load_items("mmlu_medical", [str(tmp_path)], subjects=["anatomy", "virology"])
    assert len(items) == 4


@pytest.mark.parametrize("task,writer,content,match", [
    ("medmcqa", None, '{"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 1}\n'
                      '{"question": "q", "opa": "a", "opb": "b", "opd": "d", "cop": 1}\n', "line 2: missing 'opc'"),
    ("medmcqa", None, '{"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 4}\n',
     "line 1: cop 4 is out of range for --cop-base 0"),
    ("medqa", None, '{"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "C"}\n', "line 1: answer_idx 'C'"),
    ("medqa", None, 'not json\n', "line 1: not JSON"),
    ("mmlu_medical", None, "q,a,b,c,d,A\nq,a,b,c,d,F\n", "row 2: answer 'F'"),
    ("pubmedqa", None, '{"1": {"QUESTION": "q", "CONTEXTS": ["c"], "final_decision": "perhaps"}}',
     "PMID 1: final_decision 'perhaps'"),
])
def test_reader_errors_name_first_bad_record(tmp_path, task, writer, content, match):
    path = tmp_path / "bad.file"
    path.write_text(content)
    with pytest.raises(tasks.TaskDataError, match=match):
        tasks.load_items(task, [str(path)], cop_base=0)
    with pytest.raises(tasks.TaskDataError, match="unknown task"):
        tasks.check_task("usmle")


# -- prompts and demonstrations ---------------------------------------------------------------
def test_prompt_structure_and_demos(tmp_path):
    write_medqa(tmp_path / "q.jsonl", n=12, n_options=4)
    items = tasks.read_medqa(str(tmp_path / "q.jsonl"))
    t = PromptTemplate.for_task("medqa")
    order = mcq.demo_order(items, 1234)
    demos = mcq.demos_for(items[0], items, order, 2)
    p = t.prompt(items[0], demos)
    d0 = demos[0]
    expect_d0 = (f"Question: {d0.question}\n\nOptions:\n" + "\n".join(f"{k}. {v}" for k, v in d0.options)
                 + f"\nThe answer is: {d0.gold}")
    assert p.startswith(t.instruction + "\n" + expect_d0 + "\n\n")
    assert p.endswith(f"Question: {items[0].question}\n\nOptions:\n"
                      + "\n".join(f"{k}. {v}" for k, v in items[0].options) + "\nThe answer is:")
    assert p.count("The answer is:") == 3

    # deterministic per seed, identical across questions, never the test item
    for seed in (1234, 432, 32):
        order = mcq.demo_order(items, seed)
        np.testing.assert_array_equal(order, mcq.demo_order(items, seed))
        firsts = [order[0], order[1], order[2]]
        for it in items:
            ds = mcq.demos_for(it, items, order, 3)
            assert it.id not in [d.id for d in ds] and len(ds) == 3
            if it.id not in [items[i].id for i in firsts]:
                assert [d.id for d in ds] == [items[i].id for i in firsts]
    assert not np.array_equal(mcq.demo_order(items, 1234), mcq.demo_order(items, 432))
    with pytest.raises(mcq.EvalError, match="pool has only"):
        mcq.demos_for(items[0], items[:3], mcq.demo_order(items[:3], 0), 3)


# -- scoring against transformers -------------------------------------------------------------
def _hf_scores(hf, ids, label_ids=None, conts=None):
    """Reference: one unpadded sequence at a time through transformers, float32."""
    if label_ids is not None:
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].double()
        return torch.log_softmax(logits, -1)[label_ids].numpy()
    out = []
    for cont in conts:
        with torch.no_grad():
            logits = hf(torch.tensor([ids + cont])).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        out.append(sum(lp[len(ids) - 1 + j, t].item() for j, t in enumerate(cont)))
    return np.array(out)


@pytest.mark.parametrize("scoring", ["top_token", "loglik"])
def test_scores_match_transformers(env, tmp_path, scoring):
    write_medqa(tmp_path / "q.jsonl", n=7, n_options=4, seed=5)
    items = tasks.read_medqa(str(tmp_path / "q.jsonl"))
    t = PromptTemplate.for_task("medqa")
    tok, hf = env["tok"], env["hf"]
    # shared prefix (each seed's instruction + demonstrations run once into a KV cache) and plain rows
    summary, records = mcq.evaluate(env["model"], tok, items, items, t, shots=2, seeds=[1234, 32],
                                    scoring=scoring, batch_size=4, length_bucket=128)
    assert len(records) == 14
    if scoring == "top_token":
        _, plain = mcq.evaluate(env["model"], tok, items, items, t, shots=2, seeds=[1234, 32],
                                scoring=scoring, batch_size=4, length_bucket=128, share_prefix=False)
        for a, b in zip(records, plain):
            assert a["id"] == b["id"] and a["prediction"] == b["prediction"]
            np.testing.assert_allclose(list(a["scores"].values()), list(b["scores"].values()), atol=2e-5)
        records = records + plain
    assert len({r["prompt_tokens"] for r in records}) > 3  # unequal lengths in a batch
    first = mcq.label_first_tokens(tok, ["A", "B", "C", "D"])
    worst = 0.0
    for r in records:
        item = next(it for it in items if it.id == r["id"])
        demos = mcq.demos_for(item, items, mcq.demo_order(items, r["seed"]), 2)
        ids = tok.encode(t.prompt(item, demos), bos=True)
        assert r["prompt_tokens"] == len(ids)
        if scoring == "top_token":
            ref = _hf_scores(hf, ids, label_ids=[first[lab] for lab in item.labels])
        else:
            ref = _hf_scores(hf, ids, conts=[tok.encode(t.loglik_text(item, lab)) for lab in item.labels])
        ours = np.array([r["scores"][lab] for lab in item.labels])
        worst = max(worst, np.abs(ours - ref).max())
        assert r["prediction"] == item.labels[int(np.argmax(ref))]
    print(f"[{scoring}] max |logp ours - transformers| = {worst:.2e}")
    assert worst < 1e-4
    for seed in ("1234", "32"):
        c = summary["counts"][seed]
        assert c["items"] == 7 and summary["accuracy"][seed] == c["correct"] / 7
    assert abs(summary["accuracy_mean"] - np.mean(list(summary["accuracy"].values()))) < 1e-12


def test_maybe_can_win_and_long_prompts_drop_demos(env, tmp_path):
    write_pubmedqa(tmp_path / "p.json", n=9)
    items, _ = tasks.read_pubmedqa(str(tmp_path / "p.json"))
    t = PromptTemplate.for_task("pubmedqa")
    tok, model = env["tok"], env["model"]
    maybe_item = next(it for it in items if it.gold == "maybe")
    # Point the lm_head column of "maybe" along this prompt's final hidden state: "maybe" must win.
    ids = tok.encode(t.prompt(maybe_item, []), bos=True)
    h = np.asarray(model.hidden(np.array([ids], np.int32)))[0, -1]
    maybe_id = mcq.label_first_tokens(tok, ["maybe"])["maybe"]
    from meditron_jax.models.llama import model_from_params, params_dict
    params = {k: np.array(v) for k, v in params_dict(model).items()}
    params["lm_head"][:, maybe_id] = 50.0 * h / (h @ h)
    m2 = model_from_params(model.cfg, params)
    summary, records = mcq.evaluate(m2, tok, [maybe_item], items, t, shots=0, seeds=[1],
                                    batch_size=2, length_bucket=128)
    assert records[0]["prediction"] == "maybe" and records[0]["correct"] and summary["accuracy"]["1"] == 1.0
    assert set(records[0]["scores"]) == {"yes", "no", "maybe"}

    # too long for the context: demonstrations go first (counted), the test question stays
    full = len(tok.encode(t.prompt(items[0], mcq.demos_for(items[0], items, mcq.demo_order(items, 7), 3)), bos=True))
    zero = len(tok.encode(t.prompt(items[0], []), bos=True))
    limit = (full + zero) // 2
    summary, records = mcq.evaluate(model, tok, items[:1], items, t, shots=3, seeds=[7], max_length=limit,
                                    batch_size=2, length_bucket=128)
    r = records[0]
    assert 0 < r["demos_dropped"] <= 3 and r["demos"] == 3 - r["demos_dropped"] and r["prompt_tokens"] <= limit - 1
    assert summary["counts"]["7"]["items_with_dropped_demos"] == 1
    # the records name the demonstrations: seed 7's permutation of the pool, the earliest dropped
    want = [d.id for d in mcq.demos_for(items[0], items, mcq.demo_order(items, 7), 3)]
    assert r["demo_ids_dropped"] + r["demo_ids"] == want and len(r["demo_ids"]) == r["demos"]
    assert summary["demonstrations"] == {"used": r["demos"], "dropped": r["demos_dropped"],
                                         "items_with_dropped_demos": 1, "items_truncated": 0}
    summary, records = mcq.evaluate(model, tok, items[:1], items, t, shots=3, seeds=[7], max_length=zero - 5,
                                    batch_size=2, length_bucket=128)
    assert records[0]["demos"] == 0 and records[0]["truncated_tokens"] > 0
    assert summary["counts"]["7"]["items_truncated"] == 1
    assert records[0]["demo_ids"] == [] and summary["demonstrations"]["dropped"] == 3


def test_label_first_token_collision_is_clear(env):
    with pytest.raises(mcq.EvalError, match="share their first token"):
        mcq.label_first_tokens(env["tok"], ["A", "AB"])


# -- CLI -------------------------------------------------------------------------------------
def test_cli_mcq_end_to_end_and_bad_input(env, tmp_path, capsys):
    write_medmcqa(tmp_path / "dev.jsonl", n=6, base=1)
    write_medmcqa(tmp_path / "train.jsonl", n=5, base=1, seed=9)
    out = tmp_path / "res.json"
    base = ["eval", "mcq", "--checkpoint", env["hf_dir"], "--tokenizer", env["tok_path"], "--task", "medmcqa",
            "--data", str(tmp_path / "dev.jsonl"), "--cop-base", "1", "--no-progress", "--batch-size", "4"]
    rc = cli_main(base + ["--fewshot-data", str(tmp_path / "train.jsonl"), "--shots", "2", "--seeds", "1,2",
                          "--limit", "5", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["task"] == "medmcqa" and res["shots"] == 2 and set(res["accuracy"]) == {"1", "2"}
    assert res["counts"]["1"]["items"] == 5 and res["pool_size"] == 5
    recs = [json.loads(line) for line in (tmp_path / "res.items.jsonl").read_text().splitlines()]
    assert len(recs) == 10 and {"id", "gold", "prediction", "scores", "prompt_tokens", "seed"} <= set(recs[0])
    assert set(recs[0]["scores"]) == {"A", "B", "C", "D"}
    printed = capsys.readouterr()
    line = json.loads(printed.out.strip().splitlines()[-1])
    assert line["demonstrations"] == {"used": 20, "dropped": 0, "items_with_dropped_demos": 0, "items_truncated": 0}
    assert "warning" not in printed.err
    # a context too short for 2 shots: the printed line and a stderr warning say so
    zero_shot = max(r["prompt_tokens"] for r in recs if r["demos"] == 2) // 2
    rc = cli_main(base + ["--fewshot-data", str(tmp_path / "train.jsonl"), "--shots", "2", "--seeds", "1",
                          "--limit", "2", "--max-length", str(zero_shot), "--out", str(tmp_path / "short.json")])
    printed = capsys.readouterr()
    assert rc == 0 and json.loads(printed.out.strip().splitlines()[-1])["demonstrations"]["dropped"] > 0
    assert "warning:" in printed.err and "demonstrations were dropped" in printed.err

    capsys.readouterr()
    bad = [
        (["--fewshot-data", str(tmp_path / "train.jsonl"), "--shots", "9"], "pool holds only 5"),
        (["--shots", "0", "--tokenizer", _other_vocab_tokenizer(tmp_path)], "tokens but the checkpoint's vocab is 600"),
    ]
    for extra, msg in bad:
        rc = cli_main(base + extra + ["--out", str(tmp_path / "bad.json")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and msg in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "bad.json").exists()
    rc = cli_main(base[:7] + ["usmle"] + base[8:] + ["--out", str(tmp_path / "bad.json")])
    assert rc == 2 and "unknown task 'usmle'" in capsys.readouterr().err
    rc = cli_main([a if a != "1" else "0" for a in base] + ["--shots", "0", "--out", str(tmp_path / "bad.json")])
    assert rc == 2 and "line 4: cop 4 is out of range" in capsys.readouterr().err


def _other_vocab_tokenizer(tmp_path):
    d = tmp_path / "tok2"
    d.mkdir(exist_ok=True)
    return train_tiny_tokenizer(str(d), vocab_size=620)  # larger than the model (600): refused


def test_hf_tokenizer_dir_brings_added_tokens(env, tmp_path):
    from meditron_jax.eval import loader
    import shutil
    shutil.copy(env["tok_path"], tmp_path / "tokenizer.model")
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|im_end|>": 601, "<|im_start|>": 600}))
    tok = loader.load_tokenizer(str(tmp_path))
    assert tok.vocab_size == 602 and tok.encode("<|im_start|>x")[0] == 600
    assert loader.load_tokenizer(str(tmp_path / "tokenizer.model")).vocab_size == 602
    with pytest.raises(loader.LoadError, match="602 tokens but the checkpoint's vocab is 600"):
        loader.check_vocab(tok, env["cfg"], "tok")
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<x>": 605}))
    with pytest.raises(loader.LoadError, match="do not follow the base vocab 600"):
        loader.load_tokenizer(str(tmp_path))
