"""The trainer end to end through the CLI: the tiny config learns, checkpoints, resumes onto
a different mesh with the same data order, and `plan` reports memory that shrinks with TP."""

import json
import os
import shutil

import numpy as np
import pytest

from meditron_jax.cli import main
from tests.conftest import copy_run, workdir_with_demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.gin")
FAST = ["train.seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=1", "train.log_every=1",
        "train.eval_every=0", "train.progress=False", "optimizer.warmup_steps=3", "optimizer.decay_steps=16"]


def _train(workdir, *params, mesh=("mesh.data=-1",)):
    args = ["train", "--gin_file", TINY, "--workdir", str(workdir)]
    for p in FAST + list(mesh) + list(params):
        args += ["--gin_param", p]
    return main(args)


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def demo_dir(demo_data):
    return demo_data


def _workdir(tmp_path, demo_dir, name):
    from pathlib import Path
    return Path(workdir_with_demo(tmp_path, demo_dir, name))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, demo_dir):
    w = _workdir(tmp_path_factory.mktemp("a"), demo_dir, "run")
    assert _train(w, "train.steps=16", "train.checkpoint_every=8") == 0
    return w


def test_tiny_learns_and_checkpoints(uninterrupted):
    losses = _losses(uninterrupted)
    assert sorted(losses) == list(range(1, 17))
    assert losses[16] < losses[1] - 0.5, losses
    assert sorted(os.listdir(uninterrupted / "checkpoints")) == ["16", "8"]
    assert (uninterrupted / "config.gin").read_text().count("train.steps = 16") == 1
    from meditron_jax import from_pretrained
    model = from_pretrained(str(uninterrupted))
    assert model(np.zeros((1, 4), np.int32)).shape == (1, 4, 2048)


def test_resume_on_another_mesh_continues_identically(tmp_path, uninterrupted):
    w = copy_run(uninterrupted, tmp_path / "run")  # cut back to what a run stopped at step 8 leaves
    shutil.rmtree(w / "checkpoints" / "16")
    metrics = (w / "metrics.jsonl").read_text().splitlines(keepends=True)
    (w / "metrics.jsonl").write_text("".join(ln for ln in metrics if json.loads(ln)["step"] <= 8))
    assert sorted(_losses(w)) == list(range(1, 9))
    # resume at step 8 on a (data 2, fsdp 2, tensor 2) mesh and finish
    assert _train(w, "train.steps=16", "train.checkpoint_every=8",
                  mesh=("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")) == 0
    ref, got = _losses(uninterrupted), _losses(w)
    assert sorted(got) == list(range(1, 17))
    a = np.array([got[s] for s in range(9, 17)])
    b = np.array([ref[s] for s in range(9, 17)])
    np.testing.assert_allclose(a, b, rtol=1e-5)  # same data order, same state, another mesh


def test_plan_memory_shrinks_with_tensor_parallelism(capsys):
    from meditron_jax.plan.compile import plan
    common = ["train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=1"]
    dp = plan([TINY], common + ["mesh.data=8"], devices=8)
    tp = plan([TINY], common + ["mesh.data=4", "mesh.tensor=2"], devices=8)
    for r in (dp, tp):
        assert r["per_device_gib"]["params"] > 0 and r["model_flops_per_step"] > 0 and r["compile_seconds"] > 0
    assert tp["per_device_gib"]["params"] < 0.6 * dp["per_device_gib"]["params"]
    assert tp["per_device_gib"]["optimizer_state"] < 0.6 * dp["per_device_gib"]["optimizer_state"]


def test_pipeline_run_matches_and_restores_without_stages(tmp_path, demo_dir, uninterrupted):
    """(data 2, stage 2, tensor 2) trains like (data 8); its checkpoint resumes with stage 1."""
    w = _workdir(tmp_path, demo_dir, "run")
    assert _train(w, "train.steps=4", "train.checkpoint_every=4",
                  mesh=("mesh.data=2", "mesh.stage=2", "mesh.tensor=2")) == 0
    with open(os.path.join(w, "metrics.jsonl")) as f:
        first = json.loads(f.readline())
    assert first["pipeline_bubble"] == pytest.approx(1 / 5)  # (S-1)/(M+S-1), S=2, M=4
    assert _train(w, "train.steps=6", "train.checkpoint_every=4") == 0
    ref, got = _losses(uninterrupted), _losses(w)
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [ref[s] for s in range(1, 7)], rtol=1e-5)


def test_circular_pipeline_keeps_canonical_checkpoints(tmp_path, demo_dir, uninterrupted):
    """stage 2 x repeats 2 holds its state permuted in memory, saves canonical checkpoints:
    it resumes with stage 1, whose checkpoint resumes with stage 2 x repeats 2 again, and all
    eight steps match the (data 8) run."""
    w = _workdir(tmp_path, demo_dir, "run")
    circular = ("mesh.data=2", "mesh.stage=2", "mesh.tensor=2", "pipeline.repeats=2")
    assert _train(w, "train.steps=4", "train.checkpoint_every=2", mesh=circular) == 0
    assert _train(w, "train.steps=6", "train.checkpoint_every=2") == 0
    assert _train(w, "train.steps=8", "train.checkpoint_every=2", mesh=circular) == 0
    ref, got = _losses(w), _losses(uninterrupted)
    assert sorted(ref) == list(range(1, 9))
    np.testing.assert_allclose([ref[s] for s in range(1, 9)], [got[s] for s in range(1, 9)], rtol=1e-5)
