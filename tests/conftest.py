"""Test setup, and the fixtures and helpers the whole suite shares (use these before writing your own).

Environment, set here before JAX is imported and inherited by every subprocess a test starts:
- 8 simulated CPU devices (`XLA_FLAGS`), so meshes like (data 2, stage 2, tensor 2) are real; a
  subprocess that needs another count passes `subprocess_env(devices)`.
- One JAX persistent compilation cache for the session and every process it starts:
  `JAX_COMPILATION_CACHE_DIR` (default `.jax_cache` at the repository root, kept between
  sessions; set it yourself to use another). In this process only compiles of 1 s or more are
  written (the suite's thousands of small jits would cost more to write than to redo);
  subprocesses write every compile (`JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0`), since each
  of them repeats the same train step, eval step and initialisation. A hit is bit-identical
  to a fresh compile (the bitwise trajectory tests of test_reliability compare a cold-cache
  run with warm-cache restarts).

Fixtures (session-scoped ones are built once, on first use):
- `demo_data` (session): the built-in demo corpus (raw JSONL, tokenizer, two preprocessed
  sources). Read-only: link it (`workdir_with_demo`) or copy it.
- `demo_shards` (session): the same without the raw JSONL (only what training reads), for
  workdirs that are copied many times.
- `tiny_run` (session): ONE trained run to copy instead of training your own: the README's
  tiny model on the demo corpus, `TINY_RUN_PARAMS` (16 steps of 4 x 64 tokens, checkpoints at
  10, 15 and 16), trained by a real `python -m meditron_jax train` on 1 CPU device.
  `tiny_run.workdir` (never write into it: `copy_run(tiny_run.workdir, tmp_path / "w")`),
  `tiny_run.trajectory` ((step, loss, grad_norm, lr, skipped, tokens) per step: a run of the
  same params that resumes from any of its checkpoints must reproduce it bit for bit) and
  `tiny_run.stderr`.
- `cli` (function): `cli("train", "--workdir", ...)` runs `meditron_jax.cli.main` in this process
  and returns a `subprocess.CompletedProcess` (returncode, stdout, stderr: captured at the file
  descriptors, so C++ and subprocess output count too). Prefer it to `python -m meditron_jax`:
  a fresh process pays ~5 s of imports (JAX, Orbax, grain, tensorstore) and recompiles what
  this process already has. Start a real process only where the test is about processes
  (signals, kills, several processes, `os._exit` paths, exit statuses of the real entry
  point, the README's commands as written); then use `subprocess_env(devices)`.

Helpers: `workdir_with_demo(parent, demo)`, `copy_run(src, dst)`, `subprocess_env(devices)`,
`trajectory(workdir)`.

Markers: `slow` marks the inherently long tests (multi-process kills, full-disk faults on
tmpfs, the README's commands); they run by default and in CI, `-m "not slow"` leaves them out
of a quick local loop.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # subprocesses: every compile

from meditron_jax.console import import_jax_quietly  # noqa: E402

import_jax_quietly()  # the plan extra's CUDA plugin notices ("Could not find cuda drivers") filtered
import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)  # this process: the big ones

import pytest  # noqa: E402


def subprocess_env(devices: int = 1, **extra: str) -> dict:
    """The environment of a `python -m meditron_jax` subprocess: `devices` CPU devices, this
    checkout's code, the session's compilation cache, unbuffered output."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=path, PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@pytest.fixture
def cli(capfd):
    """`cli(*argv)`: `meditron-jax ARGV` in this process -> CompletedProcess(returncode, stdout, stderr)."""
    from meditron_jax.cli import main

    def run(*argv) -> subprocess.CompletedProcess:
        argv = [str(a) for a in argv]
        capfd.readouterr()
        rc = main(argv)
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(["meditron-jax", *argv], rc, out, err)
    return run


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The built-in demo corpus, built once per test session."""
    from meditron_jax.data.demo import prepare_demo
    d = tmp_path_factory.mktemp("demo") / "demo_data"
    prepare_demo(d)
    return d


def workdir_with_demo(parent, demo, name="run") -> str:
    """A fresh training workdir whose `demo_data` links to the shared demo corpus."""
    w = parent / name
    w.mkdir()
    os.symlink(demo, w / "demo_data")
    return str(w)


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """The demo corpus without its raw JSONL (only what training reads), built once per session:
    for workdirs that the multi-process and reliability tests link and copy many times."""
    from meditron_jax.data.demo import prepare_demo
    d = tmp_path_factory.mktemp("demo_shards") / "demo_data"
    prepare_demo(d)
    shutil.rmtree(d / "raw")
    return d


def copy_run(src, dst) -> Path:
    """A private copy of a run's workdir (its `demo_data` too, links kept as links)."""
    shutil.copytree(src, dst, symlinks=True)
    return Path(dst)


# -- the shared trained run ------------------------------------------------------------------------

TINY_RUN_STEPS = 16
TINY_RUN_PARAMS = (f"train.steps={TINY_RUN_STEPS}", "train.seq_len=64", "train.global_batch_size=4",
                   "train.micro_batch_size=2", "train.checkpoint_every=5", "train.log_every=1",
                   "train.progress=False", "train.eval_every=0", "train.tensorboard=False")
TRAJECTORY_KEYS = ("loss", "grad_norm", "lr", "skipped", "tokens")


def trajectory(workdir) -> list[tuple]:
    """(step, loss, grad_norm, lr, skipped, tokens) of each complete metrics.jsonl line with a loss."""
    path = Path(workdir) / "metrics.jsonl"
    out = []
    for line in (path.read_text().splitlines(keepends=True) if path.exists() else []):
        try:
            r = json.loads(line) if line.endswith("\n") else {}
        except ValueError:
            continue
        if "loss" in r:
            out.append((r["step"], *(r[k] for k in TRAJECTORY_KEYS)))
    return out


class TinyRun(NamedTuple):
    workdir: Path
    trajectory: list
    stderr: str


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, demo_shards) -> TinyRun:
    """The uninterrupted reference run (see the module docstring); read-only, copy it to change it."""
    w = tmp_path_factory.mktemp("tiny_run") / "w"
    w.mkdir()
    shutil.copytree(demo_shards, w / "demo_data")
    cmd = [sys.executable, "-m", "meditron_jax", "train", "--gin_file", "configs/tiny.gin", "--workdir", str(w)]
    for p in TINY_RUN_PARAMS:
        cmd += ["--gin_param", p]
    r = subprocess.run(cmd, cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    traj = trajectory(w)
    assert [t[0] for t in traj] == list(range(1, TINY_RUN_STEPS + 1))
    assert all(t[4] == 0 and math.isfinite(t[1]) for t in traj)  # nothing skipped, no NaN
    from meditron_jax.storage import checkpoint as ckpt
    from meditron_jax.storage.workdir import Workdir
    assert ckpt.complete_steps(Workdir(str(w)).checkpoints) == [10, 15, 16]
    return TinyRun(w, traj, r.stderr)


# -- CPU seconds per test (MEDITRON_TEST_CPU=1) ------------------------------------------------------
# On a shared machine wall seconds (--durations) follow the load; CPU seconds (this process plus
# the subprocesses a test waited for) much less. MEDITRON_TEST_CPU=1 adds the 25 largest to the
# summary and their sum, per test file too.

_CPU: dict[str, float] = {}


def _cpu_seconds() -> float:
    import resource
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    t0 = _cpu_seconds()
    yield
    _CPU[item.nodeid] = _cpu_seconds() - t0


def pytest_terminal_summary(terminalreporter):
    if not os.environ.get("MEDITRON_TEST_CPU") or not _CPU:
        return
    tr = terminalreporter
    files: dict[str, float] = {}
    for nodeid, s in _CPU.items():
        files[nodeid.split("::")[0]] = files.get(nodeid.split("::")[0], 0.0) + s
    tr.write_sep("=", f"CPU seconds: {sum(_CPU.values()):.1f} in {len(_CPU)} tests")
    for nodeid, s in sorted(_CPU.items(), key=lambda kv: -kv[1])[:25]:
        tr.write_line(f"{s:8.1f}s {nodeid}")
    tr.write_sep("-", "CPU seconds per file")
    for name, s in sorted(files.items(), key=lambda kv: -kv[1]):
        tr.write_line(f"{s:8.1f}s {name}")
