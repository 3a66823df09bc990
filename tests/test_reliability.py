"""Fault injection on real training subprocesses: SIGKILL at seeded random points, SIGTERM /
SIGINT preemption, a second signal, corrupted and unreadable checkpoints, NaN injection, and a
two-process run where one process is stopped by SIGTERM (a process SIGKILLed out of a two-process
run: tests/test_multihost.py, killed during a save). Every interrupted run is compared bitwise with one
uninterrupted run, the session's `tiny_run` (tests/conftest.py; metrics.jsonl: loss, grad_norm,
lr, skipped, tokens per step).

The runs are the README's tiny model on the built-in demo corpus, cut to 16 steps of 4 x 64
tokens on one CPU device (the `tiny_run` params, checkpoints every 3 steps here); the demo corpus
is built once and copied into each workdir, and the subprocesses share the session's persistent
compilation cache (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from meditron_jax.storage import checkpoint as ckpt
from tests.conftest import TINY_RUN_PARAMS, TINY_RUN_STEPS, subprocess_env, trajectory

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = TINY_RUN_STEPS, 3
BASE = [*TINY_RUN_PARAMS, f"train.checkpoint_every={EVERY}"]  # the shared run's, saving more often
KILL_SEED = 8
TIMEOUT = 400  # generous: CI machines are shared


# -- helpers --------------------------------------------------------------------------------------

def launch(workdir: Path, log: Path, params=(), args=(), devices: int = 1,
           entry=("-m", "meditron_jax")) -> subprocess.Popen:
    cmd = [sys.executable, *entry, "train", "--gin_file", "configs/tiny.gin",
           "--workdir", str(workdir), *args]
    for p in [*BASE, *params]:
        cmd += ["--gin_param", p]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(devices), stdout=f, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float = TIMEOUT) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"run did not finish in {timeout}s:\n{log.read_text()[-3000:]}") from None
    return rc, log.read_text()


def records(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines(keepends=True):
        if line.endswith("\n"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def max_step(workdir: Path) -> int:
    return max((r["step"] for r in records(workdir)), default=0)


def wait_for_step(proc, workdir: Path, log: Path, step: int, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while max_step(workdir) < step:
        if proc.poll() is not None:
            raise AssertionError(f"run exited ({proc.returncode}) before step {step}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no step {step} after {timeout}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.01)


def new_workdir(root: Path, demo: Path) -> Path:
    root.mkdir(parents=True)
    shutil.copytree(demo, root / "demo_data")
    return root


def check_checkpoint_dir(workdir: Path) -> int:
    """Every step directory that counts as complete restores; returns how many leftovers lie there
    (temporary directories of interrupted saves, remains of interrupted deletions)."""
    root = workdir / "checkpoints"
    partial = 0
    for entry in (root.iterdir() if root.exists() else []):
        if "orbax-checkpoint-tmp" in entry.name or (entry.name.isdigit() and not ckpt.is_complete(str(entry))):
            partial += 1
            continue
        assert entry.name.isdigit(), f"unexpected entry {entry}"
        for item in ("params", "opt_state", "data", "meta"):
            assert (entry / item / "commit_success.txt").exists(), f"{entry}/{item} is not committed"
        _, params = ckpt.load_params(str(workdir), int(entry.name))
        assert all(np.isfinite(v).all() for v in params.values())
        json.loads((entry / "data" / "metadata").read_text())
    return partial


def error_lines(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if ": error:" in ln]


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo(demo_shards) -> Path:
    return demo_shards


@pytest.fixture(scope="module")
def baseline(tiny_run):
    """The uninterrupted run: (workdir, trajectory); read-only."""
    return tiny_run.workdir, tiny_run.trajectory


# -- tests ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_at_random_points_resumes_bitwise(tmp_path, demo, baseline):
    """>= 5 seeded SIGKILLs (some land mid-step, some mid-async-save), then a clean finish:
    the loss trajectory equals the uninterrupted run's bit for bit, every step logged once."""
    rng = np.random.default_rng(KILL_SEED)
    targets = sorted(int(t) for t in rng.choice(np.arange(1, 12), size=5, replace=False))
    delays = rng.uniform(0.0, 0.3, size=5)
    w = new_workdir(tmp_path / "w", demo)
    kills, mid_save = [], 0
    for i, (target, delay) in enumerate(zip(targets, delays)):
        target = max(target, max_step(w) + 1)  # each restart must make progress
        log = tmp_path / f"log{i}.txt"
        proc = launch(w, log)
        wait_for_step(proc, w, log, target)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(60) == -signal.SIGKILL, log.read_text()[-2000:]
        mid_save += check_checkpoint_dir(w) > 0
        committed = max(ckpt.complete_steps(str(w / "checkpoints")), default=0)
        kills.append((target, round(float(delay), 3), max_step(w), max_step(w) - committed))
        assert max_step(w) - committed <= 2 * EVERY  # work lost: < 2 x checkpoint_every
    rc, out = finish(launch(w, tmp_path / "final.txt"), tmp_path / "final.txt")
    assert rc == 0, out[-3000:]
    assert check_checkpoint_dir(w) == 0, "leftovers of interrupted saves were not cleaned up"
    assert trajectory(w) == baseline[1]
    print(f"kill points (target step, delay s, last logged step, steps lost): {kills}; "
          f"{mid_save} left an uncommitted save or deletion behind")


@pytest.mark.slow
def test_sigterm_sigint_and_second_signal(tmp_path, demo, baseline):
    w = new_workdir(tmp_path / "w", demo)
    # SIGTERM: finish the step, checkpoint it, exit 75
    proc = launch(w, tmp_path / "a.txt")
    wait_for_step(proc, w, tmp_path / "a.txt", 4)
    proc.send_signal(signal.SIGTERM)
    rc, out = finish(proc, tmp_path / "a.txt")
    k1 = max_step(w)
    assert rc == 75, out[-3000:]
    assert f"checkpoint at step {k1} committed" in out
    assert max(ckpt.complete_steps(str(w / "checkpoints"))) == k1
    # SIGINT on the resumed run: it continued at k1 + 1
    proc = launch(w, tmp_path / "b.txt")
    wait_for_step(proc, w, tmp_path / "b.txt", k1 + 2)
    proc.send_signal(signal.SIGINT)
    rc, out = finish(proc, tmp_path / "b.txt")
    k2 = max_step(w)
    assert rc == 75, out[-3000:]
    assert max(ckpt.complete_steps(str(w / "checkpoints"))) == k2
    assert trajectory(w) == baseline[1][:k2]
    # a second signal aborts at once (130), losing at most the steps since the last checkpoint;
    # it must arrive after the first one's handler ran (else Python sees one), and before that
    # run's own exit, hence a retry if the first signal's checkpoint-and-exit won the race
    for attempt in range(3):
        log = tmp_path / f"c{attempt}.txt"
        proc = launch(w, log)
        wait_for_step(proc, w, log, max_step(w) + 2)
        proc.send_signal(signal.SIGTERM)
        while "received SIGTERM" not in log.read_text() and proc.poll() is None:
            time.sleep(0.002)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        rc, out = finish(proc, log, timeout=60)
        check_checkpoint_dir(w)
        if rc != 75:
            break
    assert rc == 130 and "aborting now" in out and time.monotonic() - t0 < 30, out[-3000:]
    rc, out = finish(launch(w, tmp_path / "d.txt"), tmp_path / "d.txt")
    assert rc == 0, out[-3000:]
    assert trajectory(w) == baseline[1]


@pytest.mark.slow
def test_corrupt_and_unreadable_checkpoints(tmp_path, baseline):
    w = tmp_path / "w"
    shutil.copytree(baseline[0], w)
    root = w / "checkpoints"
    steps = ckpt.complete_steps(str(root))
    newest, previous = steps[-1], steps[-2]

    def truncate_biggest(step: int):
        f = max((p for p in (root / str(step) / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 3)

    truncate_biggest(newest)
    rc, out = finish(launch(w, tmp_path / "a.txt"), tmp_path / "a.txt")
    assert rc == 0, out[-3000:]
    assert f"warning: checkpoint step {newest} " in out and f"resuming from step {previous}" in out
    assert "Traceback" not in out and "Exception ignored" not in out, out[-3000:]
    assert (w / "checkpoints_unreadable" / str(newest)).is_dir()
    assert trajectory(w) == baseline[1]
    assert check_checkpoint_dir(w) == 0

    # none readable: refuse (one line, exit 2, nothing touched) ...
    for s in ckpt.complete_steps(str(root)):
        truncate_biggest(s)
    before = {p: p.read_bytes() for p in [w / "metrics.jsonl", w / "config.gin"]}
    listing = sorted(os.listdir(root))
    rc, out = finish(launch(w, tmp_path / "b.txt"), tmp_path / "b.txt")
    assert rc == 2, out[-3000:]
    errs = error_lines(out)
    assert len(errs) == 1 and "none of the checkpoints" in errs[0] and "--restart-from-scratch" in errs[0], out
    assert "Traceback" not in out
    assert {p: p.read_bytes() for p in before} == before and sorted(os.listdir(root)) == listing
    # ... unless told to start over: the unreadable steps are kept aside, the run equals the baseline
    rc, out = finish(launch(w, tmp_path / "c.txt", args=["--restart-from-scratch"]), tmp_path / "c.txt")
    assert rc == 0, out[-3000:]
    assert trajectory(w) == baseline[1]
    assert len(os.listdir(w / "checkpoints_unreadable")) == 1 + len(listing)


@pytest.mark.slow
def test_nan_injection_skips_and_stops(tmp_path, demo, baseline):
    """A poisoned step (a NaN loss mask in its batch: tests/nan_steps.py) is skipped (counted,
    schedule not advanced); K poisoned steps in a row stop the run with exit 3 and the last good
    checkpoint intact."""
    w = new_workdir(tmp_path / "w", demo)
    rc, out = finish(launch(w, tmp_path / "log.txt", params=["train.max_bad_steps=2"],
                            entry=(str(REPO / "tests" / "nan_steps.py"), "4,7,8")), tmp_path / "log.txt")
    assert rc == 3, out[-3000:]
    assert "2 consecutive steps with a non-finite loss" in out and "last good checkpoint kept" in out
    traj = {t[0]: t for t in trajectory(w)}
    base = {t[0]: t for t in baseline[1]}
    assert sorted(traj) == list(range(1, 9))
    assert [s for s, t in traj.items() if t[4] == 1] == [4, 7, 8]
    assert all(np.isnan(traj[s][1]) for s in (4, 7, 8))
    assert [traj[s] for s in (1, 2, 3)] == [base[s] for s in (1, 2, 3)]
    assert traj[5][3] == base[4][3]  # the skipped update did not advance the lr schedule
    assert traj[5][1] != base[5][1] and np.isfinite(traj[6][1])
    assert ckpt.complete_steps(str(w / "checkpoints")) == [3, 6]
    assert check_checkpoint_dir(w) == 0
    meta = json.loads((w / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert meta["bad_streak"] == 0 and meta["step"] == 6


def test_all_finite_guard():
    import jax.numpy as jnp

    from meditron_jax.storage.checkpoint import all_finite

    good = {"a": jnp.ones((2, 3)), "b": {"count": jnp.asarray(3, jnp.int32), "mu": jnp.zeros(4)}}
    assert bool(all_finite(good))
    bad = {**good, "b": {**good["b"], "mu": jnp.asarray([0.0, jnp.inf, 0.0, 0.0])}}
    assert not bool(all_finite(bad))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch_two_processes(w: Path, tmp_path: Path) -> tuple[list, list]:
    """Two 4-device processes of one long run on `w` (logs p0.txt, p1.txt)."""
    port = _free_port()
    procs, logs = [], []
    for i in range(2):
        logs.append(tmp_path / f"p{i}.txt")
        procs.append(launch(w, logs[i], devices=4,
                            params=["train.steps=1000", "train.global_batch_size=8", "train.micro_batch_size=1",
                                    "train.checkpoint_every=1000"],
                            args=["--coordinator_address", f"localhost:{port}", "--num_processes", "2",
                                  "--process_id", str(i)]))
    return procs, logs


def kill_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.slow
def test_two_process_sigterm_to_one_stops_both(tmp_path, demo):
    """SIGTERM to one of two processes: the devices' stop vote stops both at the same step, the
    checkpoint of that step is committed and both exit 75."""
    w = new_workdir(tmp_path / "w", demo)
    procs, logs = launch_two_processes(w, tmp_path)
    try:
        wait_for_step(procs[0], w, logs[0], 2)
        procs[1].send_signal(signal.SIGTERM)
        rcs = [finish(p, log)[0] for p, log in zip(procs, logs)]
    finally:
        kill_all(procs)
    outs = [log.read_text() for log in logs]
    assert rcs == [75, 75], "\n---\n".join(o[-2000:] for o in outs)
    k = max(ckpt.complete_steps(str(w / "checkpoints")))
    assert 2 <= k < 1000 and max_step(w) == k
    assert f"checkpoint at step {k} committed" in outs[0]


def test_truncate_metrics_keeps_each_step_once(tmp_path):
    """Records past the restored step and a torn last line move to metrics.dropped.jsonl."""
    from meditron_jax.training.metrics import truncate_metrics

    lines = [json.dumps({"step": s, "loss": float(s)}) + "\n" for s in (1, 2, 3, 4)]
    lines.insert(3, json.dumps({"step": 3, "eval_loss": 0.5}) + "\n")
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 5, "lo')
    assert truncate_metrics(str(tmp_path), 3) == 2
    kept = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in kept] == [1, 2, 3, 3]
    dropped = (tmp_path / "metrics.dropped.jsonl").read_text().splitlines()
    assert json.loads(dropped[0])["step"] == 4 and dropped[1] == '{"step": 5, "lo'
    assert truncate_metrics(str(tmp_path), 3) == 0


def _tb_events(logdir: Path) -> list:
    """Every event of every file in `logdir`, files in writing order (TFRecord framing: length,
    its CRC, payload, payload CRC)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    events = []  # file names: events.out.tfevents.<unix time>.<host>
    for path in sorted(logdir.iterdir(), key=lambda p: (int(p.name.split(".")[3]), p.name)):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack_from("<Q", data, pos)
            events.append(Event.FromString(data[pos + 12: pos + 12 + n]))
            pos += 12 + n + 4
    return events


def test_tensorboard_resume_hides_relogged_steps(tmp_path):
    """A run resumed from step 2 after logging steps 1-4 re-logs 3 and 4: its event file starts
    with a SessionLog START at step 3, so TensorBoard (which hides, at such an event, what
    earlier files logged at steps >= its step: tensorboardX's `purge_step`) shows each step once,
    with the resumed run's values."""
    from meditron_jax.training.metrics import MetricsWriter

    for start, steps, scale in ((0, (1, 2, 3, 4), 1.0), (2, (3, 4), 10.0)):
        if start:
            time.sleep(1.1)  # event file names carry the second they were opened in
        w = MetricsWriter(str(tmp_path), total_steps=4, start_step=start, enabled=True, progress=False)
        for s in steps:
            w.write(s, {"loss": s * scale})
        w.close()
    shown = {}
    for ev in _tb_events(tmp_path / "tensorboard"):
        if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
            shown = {s: v for s, v in shown.items() if s < ev.step}
        for value in ev.summary.value:
            if value.tag == "train/loss":
                assert ev.step not in shown, f"step {ev.step} shown twice"
                shown[ev.step] = value.simple_value
    assert shown == {1: 1.0, 2: 2.0, 3: 30.0, 4: 40.0}
