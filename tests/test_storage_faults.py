"""Storage faults: a full filesystem under every writer (checkpoint saves async and sync, metrics,
preprocess, export, import), damaged shards, partial outputs of killed runs.

The full disk is real: a small tmpfs mounted where the writer writes (root only, as here and in
CI; the tests skip otherwise). A tmpfs rather than a loop-mounted image because it needs no
mkfs and no loop device, is sized in one flag and remounted larger in place (the "free some
space, rerun" step), and it fails real `write()` calls with ENOSPC, so the fault reaches every
writer's own code path: Python file writes, tensorstore's (Orbax's and the import's) and
Riegeli's (ArrayRecord's). Each case asserts: the documented exit status (74), exactly one error
line naming the operation and the path, no traceback, nothing that existed before changed, and
nothing half-written left that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from meditron_jax.storage import checkpoint as ckpt
from meditron_jax import errors
from meditron_jax.cli import main
from meditron_jax.models.config import LlamaConfig
from meditron_jax.models.llama import param_shapes
from tests.conftest import TINY_RUN_PARAMS, subprocess_env, trajectory

REPO = Path(__file__).resolve().parents[1]
BASE = list(TINY_RUN_PARAMS)  # the session's tiny_run: 16 steps, saves at 5, 10, 15, 16
CKPT_FS = "20m"  # one tiny-model checkpoint (about 12 MB) fits, a second does not
TIMEOUT = 400
SMALL = LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                    num_kv_heads=1, max_position_embeddings=128)


# -- helpers --------------------------------------------------------------------------------------

@contextlib.contextmanager
def small_fs(path: Path, size: str):
    """A tmpfs of `size` mounted at `path` (skips the test when mounting is not allowed)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def _env() -> dict:
    env = subprocess_env(1)
    env.pop(errors.DEBUG_ENV, None)
    return env


def train(workdir: Path, params=()) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "meditron_jax", "train", "--gin_file", "configs/tiny.gin", "--workdir", str(workdir)]
    for p in [*BASE, *params]:
        cmd += ["--gin_param", p]
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    return r.returncode, r.stderr


def records(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if "error:" in ln]


def one_storage_line(rc: int, stderr: str, *words: str) -> str:
    lines = error_lines(stderr)
    assert rc == errors.EXIT_STORAGE, stderr[-3000:]
    assert len(lines) == 1 and ": storage error: " in lines[0], stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def new_workdir(root: Path, demo: Path) -> Path:
    root.mkdir(parents=True)
    shutil.copytree(demo, root / "demo_data", ignore=shutil.ignore_patterns("raw"))
    return root


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo(demo_data) -> Path:
    return demo_data  # read-only: new_workdir copies it


@pytest.fixture(scope="module")
def baseline(tiny_run):
    """The uninterrupted run (the session's, tests/conftest.py): (workdir, trajectory); read-only."""
    return tiny_run.workdir, tiny_run.trajectory


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A small random checkpoint and its Hugging Face export (on the normal disk)."""
    root = tmp_path_factory.mktemp("small_model")
    manager = ckpt.make_manager(str(root / "ck"))
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in param_shapes(SMALL).items()}
    ckpt.save(manager, 0, params, meta=ckpt.meta_record(SMALL, "", None))
    manager.wait_until_finished()
    manager.close()
    assert main(["export", str(root / "ck"), "--to", "hf", "--out", str(root / "hf"), "--dtype", "float32"]) == 0
    return root


# -- the fault matrix -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["async", "sync"])
@pytest.mark.slow
def test_checkpoint_save_fails_cleanly_and_rerun_resumes_bitwise(tmp_path, demo, baseline, mode):
    """checkpoint_every=5 on a filesystem with room for one checkpoint: the save at step 10 fails.
    The run stops before the next save (async: noticed at a logged step; sync: at once), removes
    the temporary step, keeps step 5 as the newest and says a rerun resumes from it; after space
    is freed, the rerun resumes from step 5 and ends bitwise equal to the uninterrupted run."""
    w = new_workdir(tmp_path / "w", demo)
    with small_fs(w / "checkpoints", CKPT_FS):
        params = [] if mode == "async" else ["checkpoint.async_save=False"]
        rc, err = train(w, params)
        line = one_storage_line(rc, err, "checkpoint save at step 10", str(w / "checkpoints"), "No space left on device",
                                "ENOSPC", "free", "newest complete checkpoint is still step 5", "rerun resumes")
        assert sorted(os.listdir(w / "checkpoints")) == ["5"], os.listdir(w / "checkpoints")  # temporary removed
        assert ckpt.is_complete(str(w / "checkpoints" / "5"))
        last = max(r["step"] for r in records(w))
        # stopped within one logged step of the failure: before the next save (step 15) waited for it
        assert 10 <= last < 15 if mode == "async" else last == 10, (last, line)
        print(f"[{mode}] stopped at step {last}: {line}")
        remount(w / "checkpoints", "200m")
        rc, err = train(w, params)
        assert rc == 0, err[-3000:]
    assert trajectory(w) == baseline[1]


@pytest.mark.slow
def test_metrics_write_fault(tmp_path, demo, baseline):
    """metrics.jsonl on a full filesystem: the resumed run stops at its first logged step with one
    line naming the file; the checkpoint it resumed from is untouched and still the newest."""
    w = new_workdir(tmp_path / "w", demo)
    (w / "checkpoints").mkdir()
    shutil.copytree(baseline[0] / "checkpoints" / "10", w / "checkpoints" / "10")  # it keeps 10, 15, 16
    before = snapshot(w / "checkpoints")
    with small_fs(tmp_path / "full", "64k") as full:
        fd = os.open(full / "filler", os.O_WRONLY | os.O_CREAT)  # fill it up: further writes fail
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"x" * 4096)
        os.close(fd)
        (full / "metrics.jsonl").touch()
        os.symlink(full / "metrics.jsonl", w / "metrics.jsonl")
        rc, err = train(w)
        print(one_storage_line(rc, err, "writing metrics to", "metrics.jsonl", "No space left on device",
                               "a rerun resumes"))
    after = snapshot(w / "checkpoints")
    assert {k: after.get(k) for k in before} == before
    assert ckpt.complete_steps(str(w / "checkpoints")) == [10]
    assert [r["step"] for r in records(w)] == []  # nothing half-written: not even a torn line


def _assert_no_partials(d: Path, allowed: set[str]):
    left = set(os.listdir(d))
    assert left == allowed, left


@pytest.mark.parametrize("what", ["preprocess", "export", "import"])
def test_full_disk_outputs(tmp_path, demo, small_model, capfd, what):
    """preprocess / export / import into a filesystem too small for the output: one line, exit
    74, the partial output (and its lock) removed, what was on the filesystem before untouched."""
    with small_fs(tmp_path / "fs", "128k") as fs:
        (fs / "earlier.txt").write_text("an earlier output\n")
        before = snapshot(fs)
        out = fs / "out"
        if what == "preprocess":
            argv = ["preprocess", "--input", str(demo / "raw" / "guidelines.jsonl"), "--tokenizer",
                    str(demo / "tokenizer.model"), "--out", str(out), "--workers", "1", "--no-progress"]
        elif what == "export":
            argv = ["export", str(small_model / "ck"), "--to", "hf", "--out", str(out), "--dtype", "float32"]
        else:
            argv = ["import", "--from", "hf", str(small_model / "hf"), "--out", str(out)]
        capfd.readouterr()
        rc = main(argv)
        err = capfd.readouterr().err
        line = one_storage_line(rc, err, f"{what} to {out}", "No space left on device", "free",
                                "partial output was removed")
        if what != "preprocess":
            assert "needs" in line, line
        with capfd.disabled():
            print(line)
        _assert_no_partials(fs, {"earlier.txt"})
        assert snapshot(fs) == before


def test_debug_shows_the_traceback(tmp_path, small_model, capfd):
    with small_fs(tmp_path / "fs", "64k") as fs:
        capfd.readouterr()
        rc = main(["--debug", "export", str(small_model / "ck"), "--to", "hf", "--out", str(fs / "o"),
                   "--dtype", "float32"])
        err = capfd.readouterr().err
    assert rc == errors.EXIT_STORAGE and "Traceback" in err and err.rstrip().splitlines()[-1].startswith(
        "meditron-jax export: storage error: export to"), err[-2000:]


# -- recognising faults (unit) -------------------------------------------------------------------

def test_storage_fault_recognises_every_writer():
    import errno

    ts_error = ValueError('RESOURCE_EXHAUSTED: Error writing "a/0.0" in OCDBT database at local file "/c/6.orbax-'
                          'checkpoint-tmp/params/": Failed writing: "/c/6.orbax-checkpoint-tmp/params/d/ab": Failed to '
                          "write 1509089 bytes to file 11: No space left on device [os_error_code='28']")
    riegeli = RuntimeError("write() failed: Disk quota exceeded; writing /d/tokens-00000.arrayrecord; at byte 1048576")
    cases = [(OSError(errno.EIO, "Input/output error", "/x/f"), errno.EIO, "/x/f"),
             (PermissionError(errno.EACCES, "Permission denied", "/x/g"), errno.EACCES, "/x/g"),
             (OSError(errno.EROFS, "Read-only file system"), errno.EROFS, None),
             (ts_error, errno.ENOSPC, "/c/6.orbax-checkpoint-tmp/params/d/ab"),
             (riegeli, errno.EDQUOT, "/d/tokens-00000.arrayrecord")]
    for exc, code, path in cases:
        assert errors.fault_errno(exc) == (code, path), exc
        wrapped = RuntimeError("outer")
        wrapped.__cause__ = exc
        assert errors.fault_errno(wrapped)[0] == code
    for benign in (ValueError("bad shape"), OSError(errno.ENOENT, "No such file"), KeyError("x")):
        assert errors.fault_errno(benign) is None
    f = errors.storage_fault(ts_error, "checkpoint save at step 6 to", "/c", needed=3 << 20, hint="kept step 3")
    assert str(f).startswith("checkpoint save at step 6 to /c: No space left on device (ENOSPC); needs 3.0 MiB")
    assert str(f).endswith("; kept step 3") and "\n" not in str(f)


# -- damaged shards ---------------------------------------------------------------------------------

def _damaged_source(demo: Path, tmp_path: Path, how: str) -> tuple[Path, Path]:
    src = tmp_path / "guidelines"
    shutil.copytree(demo / "guidelines", src)
    shard = src / json.loads((src / "manifest.json").read_text())["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    if how == "truncated":
        data = data[: len(data) - 1000]
    else:  # one flipped byte in the middle of the records: same size
        data[len(data) // 3] ^= 0x40
    shard.write_bytes(bytes(data))
    return src, shard


def _pipeline(demo: Path, src: Path):
    from meditron_jax.data.config import DataConfig
    from meditron_jax.data.loader import build_pipeline

    cfg = DataConfig(sources={"guidelines": str(src)}, tokenizer=str(demo / "tokenizer.model"), shuffle=False,
                     read_group=64, prefetch_batches=0, validation_fraction=0.0)
    return build_pipeline(64, 4, 0, config=cfg)


def test_truncated_shard_refused_at_start(tmp_path, demo, capfd):
    from meditron_jax.data.preprocess import ShardError

    src, shard = _damaged_source(demo, tmp_path, "truncated")
    with pytest.raises(ShardError) as e:
        _pipeline(demo, src)
    msg = str(e.value)
    assert "source 'guidelines'" in msg and str(shard) in msg and "truncated" in msg and "re-run" in msg, msg
    assert "\n" not in msg
    capfd.readouterr()
    assert main(["data", "verify", str(src), "--no-progress"]) == 1
    err = capfd.readouterr().err
    assert str(shard) in err and "bytes" in err, err


def test_flipped_byte_found_by_verify_and_named_when_read(tmp_path, demo, capfd):
    from meditron_jax.data.preprocess import ShardError

    src, shard = _damaged_source(demo, tmp_path, "flipped")
    capfd.readouterr()
    assert main(["data", "verify", str(src), str(demo / "replay"), "--no-progress"]) == 1
    out = capfd.readouterr()
    lines = [ln for ln in out.err.splitlines() if "verify:" in ln]
    assert len(lines) == 1 and str(shard) in lines[0] and "damaged: SHA-256" in lines[0], out.err
    assert f"{demo / 'replay'}: " in out.out and "intact" in out.out
    # the start-up check (sizes, counts) passes; reading the damaged record names the shard
    pipe = _pipeline(demo, src)
    it = pipe.train_iterator()
    with pytest.raises(ShardError) as e:
        for _ in range(10_000):  # the whole source, several times over
            next(it)
    it.close()
    assert str(shard) in str(e.value) and "source 'guidelines'" in str(e.value) and "data verify" in str(e.value)


def test_verify_intact_and_old_manifest(tmp_path, demo, capfd):
    assert main(["data", "verify", str(demo / "guidelines"), "--no-progress"]) == 0
    old = tmp_path / "old"
    shutil.copytree(demo / "replay", old)
    m = json.loads((old / "manifest.json").read_text())
    for s in m["shards"]:
        del s["sha256"]
    (old / "manifest.json").write_text(json.dumps(m))
    capfd.readouterr()
    assert main(["data", "verify", str(old)]) == 2
    assert "no shard checksums" in capfd.readouterr().err


# -- partial outputs of killed runs --------------------------------------------------------------

def test_killed_export_partial_removed_by_next_export(tmp_path, small_model, capfd):
    """A partial export whose writer is alive is left alone; once that writer is SIGKILLed, the
    next export to the same destination removes the partial and says so in one line."""
    out = tmp_path / "exported"
    script = textwrap.dedent(f"""
        import os, sys, time
        from meditron_jax.convert.stream import staging_dir
        tmp = staging_dir({str(out)!r}, False, "export")
        with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
            f.write(os.urandom(1 << 20))  # half an export
        print(tmp, flush=True)
        time.sleep(600)
    """)
    writer = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        partial = Path(writer.stdout.readline().strip())
        assert partial.is_dir() and partial.name.startswith(".exported.partial-")
        capfd.readouterr()
        assert main(["export", str(small_model / "ck"), "--to", "hf", "--out", str(tmp_path / "other")]) == 0
        from meditron_jax.storage import staging
        assert staging.remove_stale_partials(str(out), "export") == []  # alive: kept
        assert partial.is_dir()
        writer.send_signal(signal.SIGKILL)
        writer.wait(30)
        capfd.readouterr()
        assert main(["export", str(small_model / "ck"), "--to", "hf", "--out", str(out)]) == 0
        err = capfd.readouterr().err
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    lines = [ln for ln in err.splitlines() if "partial output" in ln]
    assert len(lines) == 1 and str(out) in lines[0] and partial.name in lines[0] and "1.0 MiB" in lines[0], err
    assert not partial.exists() and not Path(str(partial) + ".lock").exists()
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def test_preprocess_removes_legacy_and_dead_partials(tmp_path, demo, capfd):
    out = tmp_path / "pre"
    legacy = tmp_path / ".pre.tmp-abc123"  # what a killed preprocess of an earlier version left
    legacy.mkdir()
    (legacy / "tokens-00000.arrayrecord").write_bytes(b"x" * 4096)
    capfd.readouterr()
    from meditron_jax.data.preprocess import preprocess
    preprocess([demo / "raw" / "replay.jsonl"], demo / "tokenizer.model", out, workers=1, progress=False)
    err = capfd.readouterr().err
    assert "removed 1 partial output(s)" in err and legacy.name in err, err
    assert sorted(os.listdir(tmp_path)) == ["pre"]
    m = json.loads((out / "manifest.json").read_text())
    for s in m["shards"]:
        assert s["bytes"] == (out / s["file"]).stat().st_size
        assert s["sha256"] == hashlib.sha256((out / s["file"]).read_bytes()).hexdigest()


def test_space_warning_before_a_save_that_will_not_fit(tmp_path, monkeypatch, capfd):
    from meditron_jax.storage import faults as storage

    class FakeManager:
        def save(self, step, *a, **k):
            return True

        def is_saving_in_progress(self):
            return True  # saves stay in flight: nothing to notice but the space

    w = tmp_path / "w"
    (w / "checkpoints").mkdir(parents=True)
    m = storage.WatchedManager(FakeManager(), str(w), state_bytes=1 << 40)  # 1 TiB state
    capfd.readouterr()
    m.save(5)
    m.save(10)
    err = capfd.readouterr().err
    assert err.count("warning:") == 1 and "step 5 will probably not fit" in err and "1024.0 GiB" in err, err
    storage.startup_space_check(str(w), 1 << 40, keep=3, saves=4, existing_steps=0)
    err = capfd.readouterr().err
    assert "4 x 1024.0 GiB" in err and "checkpoint.keep=3" in err, err


def _fill(fs: Path) -> None:
    fd = os.open(fs / "filler", os.O_WRONLY | os.O_CREAT)
    with contextlib.suppress(OSError):
        while True:
            os.write(fd, b"x" * 4096)
    os.close(fd)


def test_tensorboard_write_fault_raises_instead_of_hanging(tmp_path):
    """tensorboardX's writer thread dies on ENOSPC; without the check, add_scalar then blocks on
    its full queue forever. The writer raises one StorageFault naming the event directory, and
    close() returns."""
    import threading

    from meditron_jax.training.metrics import MetricsWriter

    w = tmp_path / "w"
    w.mkdir()
    with small_fs(w / "tensorboard", "64k") as tb:
        writer = MetricsWriter(str(w), 100, 0, enabled=True, tensorboard=True, progress=False)
        _fill(tb)
        outcome = []

        def log():
            try:
                for step in range(1, 2001):
                    writer.write(step, {"loss": 1.0, "lr": 0.1, "grad_norm": 2.0})
                    time.sleep(0.001)
                outcome.append("no error")
            except errors.StorageFault as e:
                outcome.append(e)
            writer.close()
            outcome.append("closed")

        t = threading.Thread(target=log, daemon=True)
        t.start()
        t.join(120)
        assert not t.is_alive(), "the metrics writer hung"
    assert isinstance(outcome[0], errors.StorageFault) and outcome[1] == "closed", outcome
    assert f"writing TensorBoard events to {tb}" in str(outcome[0]) and "ENOSPC" in str(outcome[0])
    assert len((w / "metrics.jsonl").read_text().splitlines()) < 2000


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_stop_together_on_a_failed_save(tmp_path, demo):
    """Two processes (4 devices each) share a checkpoint filesystem with room for one checkpoint:
    the save at step 10 fails (on one process or both). Orbax's own report would wait 10 minutes
    at its barriers; both processes stop at the same logged step with exit 74, the one whose
    write failed naming the OS error, step 5 kept as the newest."""
    w = new_workdir(tmp_path / "w", demo)
    port = _free_port()
    params = ["train.steps=30", "train.global_batch_size=8", "train.micro_batch_size=1"]
    with small_fs(w / "checkpoints", CKPT_FS):
        procs = []
        for i in range(2):
            cmd = [sys.executable, "-m", "meditron_jax", "train", "--gin_file", "configs/tiny.gin", "--workdir", str(w),
                   "--coordinator_address", f"localhost:{port}", "--num_processes", "2", "--process_id", str(i)]
            for p in [*BASE, *params]:
                cmd += ["--gin_param", p]
            env = dict(_env(), XLA_FLAGS="--xla_force_host_platform_device_count=4")
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        outs = []
        try:
            for p in procs:
                outs.append(p.communicate(timeout=TIMEOUT)[1])
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        lines = [one_storage_line(p.returncode, err, "checkpoint save at step 10", "step 5: a rerun resumes")
                 for p, err in zip(procs, outs)]
        assert any("No space left on device" in ln for ln in lines), lines
        assert sorted(os.listdir(w / "checkpoints")) == ["5"]
    assert 10 <= max(r["step"] for r in records(w)) < 15


@pytest.mark.slow
def test_sigkilled_export_command_leaves_a_partial_the_next_export_removes(tmp_path, capfd):
    """The issue's case, with the real command: `meditron-jax export` SIGKILLed while writing
    leaves `.OUT.partial-*`; the next export to OUT removes it, says so, and completes."""
    cfg = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_layers=2, num_heads=4,
                      num_kv_heads=4, max_position_embeddings=128)  # ~5.6M params: ~22 MB to write
    manager = ckpt.make_manager(str(tmp_path / "ck"))
    rng = np.random.default_rng(0)
    ckpt.save(manager, 0, {k: rng.standard_normal(s, np.float32) for k, s in param_shapes(cfg).items()},
              meta=ckpt.meta_record(cfg, "", None))
    manager.wait_until_finished()
    manager.close()
    out = tmp_path / "exported"
    proc = subprocess.Popen([sys.executable, "-m", "meditron_jax", "export", str(tmp_path / "ck"), "--to", "hf",
                             "--out", str(out), "--dtype", "float32"], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT
    partial = None
    while partial is None and proc.poll() is None and time.monotonic() < deadline:
        found = [p for p in tmp_path.glob(".exported.partial-*") if p.is_dir() and any(p.iterdir())]
        partial = found[0] if found else None
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    assert partial is not None and partial.exists() and not out.exists(), "the export finished before the kill"
    capfd.readouterr()
    assert main(["export", str(tmp_path / "ck"), "--to", "hf", "--out", str(out), "--dtype", "float32"]) == 0
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if "partial output" in ln]
    assert len(lines) == 1 and partial.name in lines[0] and str(out) in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert (out / "model.safetensors").stat().st_size > 20 << 20


def test_is_complete_is_orbax_finalisation_plus_deletion_remains(tmp_path):
    """`checkpoint.is_complete`: Orbax's own finalisation check (a `.orbax-checkpoint-tmp` name
    is never complete) plus the remains of an interrupted deletion (a step whose commit marker,
    step metadata or params marker is gone); `complete_steps` lists only the whole ones."""
    import orbax.checkpoint as ocp

    mngr = ckpt.make_manager(str(tmp_path), ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                                                         enable_async_checkpointing=False))
    for step in (1, 2, 3, 4, 5):
        ckpt.save(mngr, step, {"w": np.full((4,), step, np.float32)}, meta={"format": ckpt.FORMAT})
    mngr.close()
    root = tmp_path / "checkpoints"
    assert ckpt.complete_steps(str(root)) == [1, 2, 3, 4, 5]
    (root / "2" / "_CHECKPOINT_METADATA").unlink()
    (root / "3" / "commit_success.txt").unlink()
    (root / "4" / "params" / "commit_success.txt").unlink()
    (root / "5").rename(root / "5.orbax-checkpoint-tmp-123")
    assert [ckpt.is_complete(str(root / s)) for s in ("1", "2", "3", "4", "5.orbax-checkpoint-tmp-123")] == \
        [True, False, False, False, False]
    assert ckpt.complete_steps(str(root)) == [1]
    assert not ckpt.is_complete(str(root / "6"))  # not there
