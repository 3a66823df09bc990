"""Sharded inference: eval mcq / ppl / generate on a (data 2, tensor 4) mesh equal one device
(and transformers), for a GQA model; bad meshes and too-large models are one line, exit 2."""

import json
import random

import jax
import numpy as np
import pytest
import torch

from meditron_jax import from_pretrained
from meditron_jax.distributed import sharding
from meditron_jax.distributed import meshes
from meditron_jax.cli import main as cli_main
from meditron_jax.data.preprocess import preprocess
from meditron_jax.data.tokenizer import Tokenizer
from meditron_jax.eval import distributed, perplexity
from meditron_jax.eval.generate import Generator
from tests.eval_helpers import WORDS, tiny_config, train_tiny_tokenizer, write_medqa
from tests.hf_helpers import make_hf_model

MESH = "data=2,tensor=4"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("sharded")
    tok_path = train_tiny_tokenizer(str(d), vocab_size=600)
    tok = Tokenizer(tok_path)
    # 12 heads over 4 KV heads (GQA); tensor=4 splits both, tensor=8 divides neither
    cfg = tiny_config(tok.vocab_size, hidden_size=96, intermediate_size=128, num_heads=12, num_kv_heads=4)
    hf = make_hf_model(cfg, seed=5)
    with torch.no_grad():  # peaked distributions: no near-ties in greedy argmax
        for name, p in hf.named_parameters():
            if "proj" in name or "lm_head" in name or "embed" in name:
                p.mul_(3.0)
    hf.save_pretrained(d / "hf")
    import shutil
    shutil.copy(tok_path, d / "hf" / "tokenizer.model")
    assert cli_main(["import", "--from", "hf", str(d / "hf"), "--out", str(d / "ckpt")]) == 0
    rng = random.Random(0)
    with open(d / "docs.jsonl", "w") as f:
        for _ in range(12):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.choice([5, 20, 40])))}) + "\n")
    preprocess([str(d / "docs.jsonl")], tok_path, str(d / "pre"), workers=1, progress=False)
    write_medqa(str(d / "medqa.jsonl"), n=6)
    return {"d": d, "tok": tok, "tok_path": tok_path, "hf": hf, "hf_dir": str(d / "hf"), "ckpt": str(d / "ckpt")}


def _mesh():
    return meshes.make_mesh(distributed.parse_mesh(MESH))


def test_checkpoint_restores_into_shards(env):
    mesh = _mesh()
    model = distributed.load_model_on_mesh(env["ckpt"], mesh)
    q = model.q_proj[...]
    assert q.sharding.spec[2] == "tensor" and q.addressable_shards[0].data.shape[2] == 12 // 4
    ref = from_pretrained(env["ckpt"])
    np.testing.assert_array_equal(np.asarray(q), np.asarray(ref.q_proj[...]))
    cache = distributed.Placement(mesh).init_cache(model, 4, 64)
    assert cache["k"].addressable_shards[0].data.shape == (2, 2, 64, 1, 8)  # batch / data, kv_heads / tensor


def test_mcq_sharded_equals_single_device(env, tmp_path):
    common = ["eval", "mcq", "--task", "medqa", "--data", str(env["d"] / "medqa.jsonl"), "--shots", "2",
              "--seeds", "1", "--batch-size", "3", "--tokenizer", env["tok_path"], "--no-progress"]
    outs = {}
    for name, extra in (("one", []), ("mesh", ["--mesh", MESH])):
        for scoring in ("top_token", "loglik"):  # loglik: every option's text, prefix cache + rows per option
            out = tmp_path / f"{name}_{scoring}.json"
            assert cli_main(common + ["--checkpoint", env["ckpt"], "--scoring", scoring, "--out", str(out)]
                            + extra) == 0
            outs[name, scoring] = [json.loads(line) for line in open(tmp_path / f"{name}_{scoring}.items.jsonl")]
    for scoring in ("top_token", "loglik"):
        one, mesh = outs["one", scoring], outs["mesh", scoring]
        assert len(one) == len(mesh) == 6
        for a, b in zip(one, mesh):
            assert a["prediction"] == b["prediction"] and a["id"] == b["id"]
            np.testing.assert_allclose([b["scores"][k] for k in a["scores"]], list(a["scores"].values()),
                                       atol=1e-5, rtol=1e-5)
        assert np.ptp([s for r in one for s in r["scores"].values()]) > 1.0  # scores that differ


def test_ppl_sharded_equals_single_device(env):
    model = from_pretrained(env["hf_dir"])
    one = perplexity.evaluate_dir(model, str(env["d"] / "pre"), seq_len=32, batch_size=4)
    mesh = _mesh()
    sharded = distributed.load_model_on_mesh(env["hf_dir"], mesh)  # HF dir sent out tensor by tensor
    two = perplexity.evaluate_dir(sharded, str(env["d"] / "pre"), seq_len=32, batch_size=4,
                                  placement=distributed.Placement(mesh))
    assert one["tokens"] == two["tokens"] and one["batches"] == two["batches"] > 1
    assert abs(one["loss"] - two["loss"]) < 1e-5 * one["loss"]


def test_generate_sharded_equals_transformers_greedy(env):
    tok, hf = env["tok"], env["hf"]
    prompts = [tok.encode(t, bos=True) for t in ("Question: patient fever cough?", "The answer is:",
                                                 "Question: aspirin insulin heart lung kidney dose?")]
    mesh = _mesh()
    gen = Generator(distributed.load_model_on_mesh(env["ckpt"], mesh), placement=distributed.Placement(mesh))
    ours = gen.generate(prompts, 16, eos_id=None, batch_size=3)  # 3 rows -> 4 (a multiple of data=2)
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16,
                          do_sample=False, pad_token_id=0, eos_token_id=None)[:, L:].tolist()
    assert ours == ref
    assert all(len(set(o)) > 3 for o in ours)


def test_bad_mesh_and_too_large_are_one_line(env, tmp_path, capsys):
    base = ["generate", "--checkpoint", env["ckpt"], "--prompt", "Question:", "--max-new-tokens", "2"]
    assert cli_main(base + ["--mesh", "tensor=8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not divide the model's 12 attention heads" in err[0]
    assert cli_main(base + ["--mesh", "stage=2,tensor=4"]) == 2
    assert "does not pipeline" in capsys.readouterr().err
    assert cli_main(base + ["--mesh", MESH, "--device-memory", "0.0001"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GiB per device" in err[0] and "over the" in err[0]
    assert cli_main(base + ["--gin_param", "mesh.tensor=8"]) == 2  # gin mesh.* goes through the same check
    assert "attention heads" in capsys.readouterr().err
    out = tmp_path / "gen.jsonl"
    assert cli_main(base + ["--gin_param", "mesh.tensor=4", "--gin_param", "mesh.data=2", "--out", str(out)]) == 0
    assert "mesh data=2,tensor=4 on 8 devices" in capsys.readouterr().err
    assert len(json.loads(out.read_text())["tokens"]) == 2


def test_eval_plan_reports_per_device_memory(env, capsys):
    from meditron_jax.storage.checkpoint import model_config
    from meditron_jax.plan.eval_plan import plan_eval

    cfg = model_config(env["ckpt"]).replace(dtype="float32")
    rep = plan_eval(cfg, MESH, batch=4, seq_len=64)
    model = distributed.load_model_on_mesh(env["ckpt"], _mesh())
    held = distributed.mesh_summary(model, _mesh())["param_bytes_per_device"]
    assert rep["per_device_gib"]["params"] * 2 ** 30 == held  # exact: what a device really holds
    assert rep["per_device_gib"]["temporaries"] > 0 and rep["fits"] is None
    assert rep["estimate_gib"]["params"] == rep["per_device_gib"]["params"]
    base = ["eval", "plan", "--checkpoint", env["ckpt"], "--batch-size", "4", "--seq-len", "64", "--dtype", "float32"]
    assert cli_main(base + ["--mesh", MESH, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] is True
    assert cli_main(base + ["--mesh", MESH, "--device-memory", "0.0001"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert cli_main(base + ["--mesh", "tensor=8"]) == 2


@pytest.mark.slow
def test_two_processes_equal_one(env, tmp_path):
    """The multi-controller path: 2 processes x 4 CPU devices (gloo) on a (data 2, tensor 4) mesh
    score like one process; only process 0 writes the results."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    args = ["eval", "mcq", "--task", "medqa", "--data", str(env["d"] / "medqa.jsonl"), "--shots", "2",
            "--seeds", "1", "--batch-size", "3", "--tokenizer", env["tok_path"], "--no-progress",
            "--checkpoint", env["ckpt"], "--scoring", "loglik"]
    assert cli_main(args + ["--out", str(tmp_path / "one.json")]) == 0
    penv = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-m", "meditron_jax", *args, "--mesh", MESH, "--out",
                               str(tmp_path / f"multi{i}.json"), "--coordinator_address", f"localhost:{port}",
                               "--num_processes", "2", "--process_id", str(i)],
                              env=penv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, "\n".join(line for line in out.splitlines() if "Gloo" not in line)[-3000:]
    assert not (tmp_path / "multi1.json").exists()  # process 1 computed the same and wrote nothing
    one = [json.loads(line) for line in open(tmp_path / "one.items.jsonl")]
    multi = [json.loads(line) for line in open(tmp_path / "multi0.items.jsonl")]
    assert [r["prediction"] for r in one] == [r["prediction"] for r in multi]
    for a, b in zip(one, multi):
        np.testing.assert_allclose([b["scores"][k] for k in a["scores"]], list(a["scores"].values()), atol=1e-5)
