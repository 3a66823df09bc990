"""A quiet, correct start on a host without the accelerators whose plugins are installed: in this
venv (the test extras bring the `plan` extra: jax-cuda12-plugin and libtpu), on this CPU machine,
with JAX_PLATFORMS unset as a user has it, `meditron-jax train` (the tiny config, a few steps) and
`meditron-jax generate` print only the project's own lines on stderr (no plugin traceback, no
plugin notice), and a bad gin value prints exactly one line. Real processes, as a user runs them.
The train run's metrics also show the timing accounting end to end (compile_s, eval_s, save_s,
goodput)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import workdir_with_demo

REPO = Path(__file__).resolve().parents[1]
# the project's log lines, and its error lines
OURS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ [IWE] |meditron-jax [a-z-]+: error: )")
PLUGIN_WORDS = ("Traceback", "cuda", "CUDA", "libtpu", "TPU_", "absl", "plugin", "xla_bridge", "cudart")


def user_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "meditron_jax", *args], cwd=REPO, env=user_env(),
                          capture_output=True, text=True, timeout=timeout)


def assert_only_our_lines(stderr: str):
    lines = stderr.strip().splitlines()
    foreign = [ln for ln in lines if not OURS.match(ln) or any(w in ln for w in PLUGIN_WORDS)]
    assert not foreign, "\n".join(foreign)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_data):
    w = workdir_with_demo(tmp_path_factory.mktemp("quiet"), demo_data)
    proc = cli("train", "--gin_file", "configs/tiny.gin", "--workdir", w,
               "--gin_param", "train.steps=4", "--gin_param", "train.log_every=2",
               "--gin_param", "train.checkpoint_every=2", "--gin_param", "train.eval_every=2",
               "--gin_param", "train.eval_batches=1", "--gin_param", "optimizer.warmup_steps=2",
               "--gin_param", "train.tensorboard=False",
               "--gin_param", f"train.compilation_cache_dir='{REPO / '.jax_cache'}'")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(w), proc


def test_train_prints_only_the_project_lines(trained):
    _, proc = trained
    assert_only_our_lines(proc.stderr)
    assert "single process (no cluster environment found): 1 local / 1 global cpu devices" in proc.stderr
    assert re.search(r"done: step 4/4, .* goodput \d+% \(compile \d+s", proc.stderr)


def test_train_metrics_separate_compile_eval_and_save(trained):
    w, _ = trained
    recs = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in recs if "tokens_per_sec" in r]
    assert [r["step"] for r in timed] == [2, 4]
    assert timed[0]["compile_s"] > 0 and "compile_s" not in timed[1]
    assert timed[1]["eval_s"] > 0 and timed[1]["save_s"] > 0  # step 2's eval and save, left out of steps 3-4


def test_generate_prints_only_the_project_lines(trained):
    w, _ = trained
    proc = cli("generate", "--checkpoint", str(w), "--prompt", "Clinical guideline:", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("Clinical guideline:")
    assert_only_our_lines(proc.stderr)  # one process: nothing at all


def test_a_bad_gin_value_is_exactly_one_line(tmp_path):
    proc = cli("train", "--gin_file", "configs/tiny.gin", "--workdir", str(tmp_path / "w"),
               "--gin_param", "optimizer.b2=1.5", timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["meditron-jax train: error: optimizer.b2 = 1.5: expected a number in [0, 1)"]
