"""lm-evaluation-harness backend `meditron-jax`: on local task YAMLs over local JSON data, its
per-item log-likelihoods equal lm-eval's own `hf` backend on the HF export (1e-4), with the same
predictions; rolling log-likelihoods and greedy generations agree too. Nothing is downloaded."""

import json
import os
import random

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from meditron_jax.cli import main as cli_main  # noqa: E402
from tests.eval_helpers import WORDS, tiny_config, train_tiny_tokenizer  # noqa: E402
from tests.hf_helpers import make_hf_model  # noqa: E402

TASKS = ("tiny_mc", "tiny_rolling", "tiny_gen")


def _yaml(d, data):
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (d / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common + "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n")
    (d / "tiny_rolling.yaml").write_text(
        "task: tiny_rolling\n" + common + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n')
    (d / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + common + "output_type: generate_until\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: "{{choices[answer]}}"\n'
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 10\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmeval")
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_DATASETS_CACHE"] = str(d / "hf_datasets")
    tok_path = train_tiny_tokenizer(str(d), vocab_size=600)
    from meditron_jax.data.tokenizer import Tokenizer
    cfg = tiny_config(Tokenizer(tok_path).vocab_size, num_heads=4, num_kv_heads=2)
    make_hf_model(cfg, seed=9).save_pretrained(d / "hf_raw")
    assert cli_main(["import", "--from", "hf", str(d / "hf_raw"), "--out", str(d / "ckpt")]) == 0
    assert cli_main(["export", str(d / "ckpt"), "--to", "hf", "--out", str(d / "hf"), "--tokenizer", tok_path,
                    "--dtype", "float32"]) == 0
    rng = random.Random(1)
    docs = []
    for i in range(6):
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(3)]
        docs.append({"question": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + "?",
                     "choices": choices, "answer": i % 3,
                     "text": " ".join(rng.choice(WORDS) for _ in range((10, 40, 300)[i % 3]))})
    with open(d / "data.json", "w") as f:
        for doc in docs:
            f.write(json.dumps(doc) + "\n")
    _yaml(d, d / "data.json")
    return {"d": d, "tok_path": tok_path}


def _run(env, model, model_args, **kw):
    from lm_eval.tasks import TaskManager
    import meditron_jax.eval.lm_eval_backend  # noqa: F401  (registers meditron-jax)
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS), batch_size=4,
                                   task_manager=TaskManager(include_path=str(env["d"])), log_samples=True,
                                   bootstrap_iters=0, **kw)


def _by_doc(res, task):
    return {s["doc_id"]: s for s in res["samples"][task]}


def test_backend_equals_hf_backend(env):
    # max_length 128: the 300-word documents roll over several windows
    ours = _run(env, "meditron-jax", f"checkpoint={env['d'] / 'ckpt'},tokenizer={env['tok_path']},max_length=128,"
                                     "mesh=data=4+tensor=2")
    ref = _run(env, "hf", f"pretrained={env['d'] / 'hf'},dtype=float32,max_length=128", device="cpu")
    mc_o, mc_r = _by_doc(ours, "tiny_mc"), _by_doc(ref, "tiny_mc")
    assert len(mc_o) == 6
    for i in mc_r:
        lo = np.array([r[0][0] for r in mc_o[i]["resps"]])
        lr = np.array([r[0][0] for r in mc_r[i]["resps"]])
        np.testing.assert_allclose(lo, lr, atol=1e-4)
        assert [r[0][1] for r in mc_o[i]["resps"]] == [r[0][1] for r in mc_r[i]["resps"]]  # is_greedy
        assert mc_o[i]["acc"] == mc_r[i]["acc"] and int(np.argmax(lo)) == int(np.argmax(lr))
    assert ours["results"]["tiny_mc"]["acc,none"] == ref["results"]["tiny_mc"]["acc,none"]
    ro, rr = _by_doc(ours, "tiny_rolling"), _by_doc(ref, "tiny_rolling")
    for i in rr:
        a, b = ro[i]["resps"][0][0], rr[i]["resps"][0][0]
        assert a == pytest.approx(b, abs=1e-4 * max(1.0, abs(b) / 100)), i  # sum over up to ~600 tokens
    assert min(r["resps"][0][0] for r in rr.values()) < -1000  # 300-word documents: several 128-token windows
    go, gr = _by_doc(ours, "tiny_gen"), _by_doc(ref, "tiny_gen")
    assert [go[i]["resps"][0][0] for i in sorted(gr)] == [gr[i]["resps"][0][0] for i in sorted(gr)]
    assert any(go[i]["resps"][0][0].strip() for i in go)


def test_cli_registers_the_model_type(env, tmp_path, capsys):
    out = tmp_path / "res"
    rc = cli_main(["lm-eval", "--model", "meditron-jax", "--model_args",
                   f"checkpoint={env['d'] / 'ckpt'},tokenizer={env['tok_path']}", "--tasks", "tiny_mc",
                   "--include_path", str(env["d"]), "--batch_size", "4", "--limit", "2", "--output_path", str(out)])
    assert rc == 0
    assert "tiny_mc" in capsys.readouterr().out
    with pytest.raises(Exception, match="unknown"):
        _ = lm_eval.api.registry.get_model("meditron-jax")(checkpoint=str(env["d"] / "ckpt"), bogus=1)
