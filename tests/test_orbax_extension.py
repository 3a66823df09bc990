"""Where the project reaches into Orbax beyond its documented calls (`storage.orbax_extension`):
each name and parameter it relies on exists in the installed Orbax, the version is the one
pyproject.toml pins, and each extension works end to end: checkpoints saved through the
watched handlers are Orbax's own format, a failed write reaches the watch at once, a streamed
import restores as a standard checkpoint and reads back by slices.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import json
import os
import re
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from meditron_jax import errors
from meditron_jax.storage import checkpoint as ckpt
from meditron_jax.storage import faults, orbax_extension, resume
from meditron_jax.storage.workdir import Workdir

REPO = Path(__file__).resolve().parents[1]


def _resolve(dotted: str):
    obj = ocp
    for part in dotted.split("."):
        obj = getattr(obj, part)  # AttributeError: a name this Orbax no longer has
    return obj


@pytest.mark.parametrize("dotted", sorted(orbax_extension.RELIES_ON))
def test_orbax_has_every_name_and_parameter_relied_on(dotted):
    obj = _resolve(dotted)
    params = inspect.signature(obj).parameters
    missing = [p for p in orbax_extension.RELIES_ON[dotted] if p not in params]
    assert not missing, f"orbax.checkpoint.{dotted} no longer takes {missing}"


def test_installed_orbax_is_the_pinned_one():
    pinned = re.search(r'"orbax-checkpoint==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert importlib.metadata.version("orbax-checkpoint") == pinned


TREE = {"w": np.arange(24, dtype=np.float32).reshape(4, 6), "b": np.ones((6,), np.float32)}


def _save(manager, step):
    ckpt.save(manager, step, TREE, {"mu": TREE}, {"it": step}, {"format": ckpt.FORMAT})
    manager.wait_until_finished()


def test_watched_handlers_write_orbax_own_checkpoints(tmp_path):
    """The same step saved by Orbax's own handlers and by the watched ones: same files, same
    handler names in the step metadata; it restores with Orbax's standard restore."""
    plain, watched = Workdir(str(tmp_path / "plain")), Workdir(str(tmp_path / "watched"))
    m = ckpt.make_manager(plain)
    _save(m, 1)
    m.close()
    watch = faults.SaveWatch()
    m = ckpt.make_manager(watched, handler=watch.handler)
    _save(m, 1)
    assert watch.error is None and len(watch._futures) >= 4  # one per item at least

    def files(wd):
        return sorted(str(p.relative_to(wd.root)) for p in Path(wd.step_dir(1)).rglob("*")
                      if p.is_file() and "/d/" not in str(p) and "ocdbt.process" not in str(p))

    assert files(plain) == files(watched)
    meta = [json.loads(Path(wd.step_dir(1), "_CHECKPOINT_METADATA").read_text())["item_handlers"]
            for wd in (plain, watched)]
    assert meta[0] == meta[1] and meta[0]["params"].endswith("StandardCheckpointHandler")
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=cpu) for k, v in TREE.items()}
    got = resume.read_step(m, 1, ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    np.testing.assert_array_equal(np.asarray(got["params"]["w"]), TREE["w"])
    m.close()


@contextlib.contextmanager
def _tiny_fs(path: Path, size: str = "256k"):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_failed_async_write_reaches_the_watch_and_stops_at_the_next_poll(tmp_path, capfd):
    """A save that cannot fit (a 256 KiB filesystem, a 1 MiB array): the watch holds the write's
    error as soon as it fails; `poll` raises one StorageFault naming the step, the temporary
    step is gone, and Orbax's threads print no traceback."""
    errors.quiet_fault_logs()  # as the CLI does
    wd = Workdir(str(tmp_path / "w"))
    with _tiny_fs(tmp_path / "w" / "checkpoints"):
        manager = faults.watched_manager(wd, state_bytes=1 << 20)
        capfd.readouterr()
        manager.save(3, args=ocp.args.Composite(params=ocp.args.StandardSave(
            {"w": np.random.default_rng(0).random((512, 512), np.float32)})))
        deadline = time.monotonic() + 30
        while manager.watch.error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert manager.watch.error is not None and errors.fault_errno(manager.watch.error) is not None
        with pytest.raises(errors.StorageFault, match="checkpoint save at step 3 to .*No space left on device"):
            manager.poll()
        assert not any(p.name.startswith("3") for p in (tmp_path / "w" / "checkpoints").iterdir())
    err = capfd.readouterr().err
    assert "Traceback" not in err, err


def test_streamed_import_restores_as_standard_and_reads_by_slices(tmp_path):
    """The streaming writer (convert/stream.py: a NumpyHandler subclass, Orbax's write spec,
    a PyTree handler named as the standard one) and the slice reader (Orbax's read spec)."""
    from meditron_jax.convert import stream
    from meditron_jax.models.config import LlamaConfig
    from meditron_jax.models.llama import param_shapes

    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                      num_kv_heads=1, max_position_embeddings=64)
    rng = np.random.default_rng(0)
    full = {k: rng.standard_normal(s).astype(np.float32) for k, s in param_shapes(cfg).items()}

    def streamed(name):
        a = full[name]
        blocks = lambda: ((i, a[i]) for i in stream.block_indices(name, a.shape))  # noqa: E731
        return stream.StreamedArray(a.shape, a.dtype, stream.block_plan(name, a.shape)[2], blocks)

    out = stream.write_checkpoint(str(tmp_path / "ck"), {k: streamed(k) for k in full}, ckpt.meta_record(cfg))
    meta = json.loads(Path(out, "_CHECKPOINT_METADATA").read_text())["item_handlers"]
    assert meta["params"] == ocp.StandardCheckpointHandler.typestr()
    _, restored = ckpt.load_params(str(tmp_path / "ck"))
    for k in full:
        np.testing.assert_array_equal(restored[k], full[k])
    reader = stream.CheckpointReader(str(tmp_path / "ck"))
    np.testing.assert_array_equal(reader.read("q_proj", (1,)), full["q_proj"][1])
    reader.close()


def test_orbax_thread_errors_after_a_reported_failed_save_are_dropped(tmp_path, caplog):
    """A writer of a failed save that ends after the failure was reported (its directory removed)
    logs from an Orbax thread with a traceback: dropped once the failure is reported (not before,
    and not with --debug), whichever logger class absl's logger was created with."""
    from meditron_jax import console

    console.setup()  # as the CLI: the `absl` logger exists before absl is imported
    faults.WatchedManager(object(), str(tmp_path), 1)  # a run starts: nothing reported yet

    async def late_write():
        raise ValueError("NOT_FOUND: Error writing 'w/0.0': the temporary directory is gone")

    def orbax_thread_fails() -> bool:
        caplog.clear()
        with pytest.raises(ValueError):
            orbax_extension.commit_future(late_write(), name="late").result()
        return any("late" in r.getMessage() and r.exc_info for r in caplog.records)

    with caplog.at_level("ERROR"):
        assert orbax_thread_fails()  # not reported yet: a real error keeps its traceback
        faults._AFTER_FAILED_SAVE.active = True  # what WatchedManager._fail sets
        try:
            assert not orbax_thread_fails()
            os.environ[errors.DEBUG_ENV] = "1"
            assert orbax_thread_fails()  # --debug shows everything
        finally:
            os.environ.pop(errors.DEBUG_ENV, None)
            faults._AFTER_FAILED_SAVE.active = False
