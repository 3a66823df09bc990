"""The multi-controller path on one machine: 2 processes x 4 CPU devices (gloo collectives)
train like 1 process x 8 devices, and their checkpoint restores in a 1-process run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import workdir_with_demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--gin_file", os.path.join(ROOT, "configs", "tiny.gin"),
        "--gin_param", "train.seq_len=64", "--gin_param", "train.global_batch_size=8",
        "--gin_param", "train.micro_batch_size=1", "--gin_param", "train.log_every=1",
        "--gin_param", "train.progress=False", "--gin_param", "train.eval_every=0",
        "--gin_param", "train.checkpoint_every=4", "--gin_param", "optimizer.decay_steps=8",
        "--gin_param", "optimizer.warmup_steps=2"]


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.fixture(scope="module")
def demo(demo_data):
    return demo_data


_workdir = workdir_with_demo


def test_two_processes_equal_one(tmp_path, demo):
    multi = _workdir(tmp_path, demo, "multi")
    single = _workdir(tmp_path, demo, "single")
    cmd = [sys.executable, "-m", "meditron_jax", "train", *ARGS, "--gin_param", "train.steps=4"]
    PORT = _free_port()
    procs = [subprocess.Popen(cmd + ["--workdir", multi, "--coordinator_address", f"localhost:{port}",
                                     "--num_processes", "2", "--process_id", str(i)],
                              env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, port in ((0, PORT), (1, PORT))]
    ref = subprocess.run(cmd + ["--workdir", single], env=_env(8), capture_output=True, text=True, timeout=600)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert ref.returncode == 0, ref.stderr[-2000:]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, "\n".join(l for l in out.splitlines() if "Gloo" not in l)[-3000:]
    a, b = _losses(multi), _losses(single)
    assert sorted(a) == [1, 2, 3, 4]
    np.testing.assert_allclose([a[s] for s in range(1, 5)], [b[s] for s in range(1, 5)], rtol=1e-5)
    # the 2-process checkpoint restores in a 1-process run, which continues to step 8
    more = subprocess.run(cmd[:-2] + ["--gin_param", "train.steps=8", "--workdir", multi], env=_env(8),
                          capture_output=True, text=True, timeout=600)
    assert more.returncode == 0, more.stderr[-2000:]
    assert sorted(_losses(multi)) == list(range(1, 9))
    assert "8" in os.listdir(os.path.join(multi, "checkpoints"))
