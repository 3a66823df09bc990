"""The workdir layout (issue 28): `storage.workdir.Workdir` knows every path of a run, local and
`gs://` alike, and a workdir written before it existed (the same names, checkpoints saved through
Orbax's `item_names` API as the trainer used to) is read back by today's code: listed, resumed
from, its metrics cut back, its lock honoured. No training and no compile: tiny arrays only.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from meditron_jax.errors import UserError
from meditron_jax.storage import checkpoint as ckpt
from meditron_jax.storage import resume
from meditron_jax.storage.listing import list_checkpoints
from meditron_jax.storage.workdir import RunLock, Workdir, WorkdirLocked

# The layout is a contract: these are the names on disk, spelled out (not read from Workdir).
NAMES = {"checkpoints": "checkpoints", "unreadable": "checkpoints_unreadable",
         "superseded": "checkpoints_superseded", "metrics": "metrics.jsonl",
         "metrics_dropped": "metrics.dropped.jsonl", "config_gin": "config.gin", "lock": "run.lock",
         "tensorboard": "tensorboard", "profile": "profile", "demo_data": "demo_data"}


def test_every_path_local_and_gs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = Workdir.resolve("run/")  # relative: made absolute
    assert local.root == str(tmp_path / "run") and not local.remote and str(local) == local.root
    assert Workdir.resolve(f"file://{tmp_path}/run") == local and Workdir.resolve(local) is local
    remote = Workdir("gs://bucket/runs/7")
    assert remote.remote
    for attr, name in NAMES.items():
        assert getattr(local, attr) == str(tmp_path / "run" / name), attr
        assert getattr(remote, attr) == f"gs://bucket/runs/7/{name}", attr
    assert local.step_dir(12) == str(tmp_path / "run" / "checkpoints" / "12")
    assert remote.step_dir(12) == "gs://bucket/runs/7/checkpoints/12"
    with pytest.raises(UserError, match="s3:// storage is not supported"):
        Workdir.resolve("s3://bucket/run")
    assert list(tmp_path.iterdir()) == []  # resolving creates nothing


def test_gs_url_resolves_when_its_filesystem_is_installed():
    pytest.importorskip("gcsfs")
    assert Workdir.resolve("gs://bucket/run/") == Workdir("gs://bucket/run")


TREE = {"embed": np.arange(12, dtype=np.float32).reshape(3, 4), "norm": np.ones((4,), np.float32)}


def _old_workdir(root: Path) -> Path:
    """A workdir as the trainer wrote it before `Workdir`: literal names, checkpoints through the
    (since deprecated) `item_names` manager, a quarantined and a superseded step, a torn metrics line."""
    w = root / "old"
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False, max_to_keep=None)
    manager = ocp.CheckpointManager(str(w / "checkpoints"), options=options,
                                    item_names=("params", "opt_state", "data", "meta"))
    for step in (2, 4):
        tree = {k: v * step for k, v in TREE.items()}
        manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(tree), opt_state=ocp.args.StandardSave({"mu": tree}),
            data=ocp.args.JsonSave({"it": step}), meta=ocp.args.JsonSave({"format": ckpt.FORMAT, "step": step})))
    manager.close()
    (w / "checkpoints_unreadable").mkdir()
    os.rename(w / "checkpoints" / "2", w / "checkpoints_unreadable" / "2")  # set aside by an earlier resume
    (w / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 10.0 - s}) + "\n" for s in range(1, 6))
                                     + '{"step": 6, "lo')
    (w / "config.gin").write_text("train.steps = 6\n")
    return w


def _target():
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=cpu) for k, v in TREE.items()}
    return {"params": abstract, "opt_state": {"mu": abstract}}


def test_workdir_written_before_is_read_back(tmp_path):
    from meditron_jax.training.metrics import truncate_metrics

    w = _old_workdir(tmp_path)
    wd = Workdir.resolve(str(w))
    rows = list_checkpoints(str(w / "checkpoints"))  # its checkpoints/ dir names the workdir too
    assert [(r["step"], r["state"], r["loss"]) for r in rows] == [(4, "ok", 6.0), (2, "quarantined", None)]
    assert ckpt.resolve(str(w)) == (wd.checkpoints, 4)

    target = _target()
    manager = ckpt.make_manager(wd)

    def restore(step):
        return resume.read_step(manager, step, ocp.args.Composite(
            params=ocp.args.StandardRestore(target["params"]), opt_state=ocp.args.StandardRestore(target["opt_state"]),
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))

    restored, step = resume.newest_readable(manager, wd, restore, target)
    assert step == 4 and restored["data"] == {"it": 4}
    np.testing.assert_array_equal(np.asarray(restored["params"]["embed"]), TREE["embed"] * 4)
    # a save through today's manager lands next to the old ones, in the same format
    ckpt.save(manager, 6, restored["params"], restored["opt_state"], {"it": 6}, {"format": ckpt.FORMAT})
    manager.close()
    old, new = (json.loads((w / "checkpoints" / s / "_CHECKPOINT_METADATA").read_text())["item_handlers"]
                for s in ("4", "6"))
    assert old == new
    assert sorted(p.name for p in (w / "checkpoints" / "6").iterdir()) == \
        sorted(p.name for p in (w / "checkpoints" / "4").iterdir())
    moved = resume.set_aside_newer(ckpt.make_manager(wd), wd, 4)
    assert moved == [6] and (w / "checkpoints_superseded" / "6").is_dir()

    assert truncate_metrics(wd, 4) == 2  # step 5 and the torn line
    assert [json.loads(x)["step"] for x in (w / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert (w / "metrics.dropped.jsonl").read_text().splitlines()[0] == '{"step": 5, "loss": 5.0}'

    # run.lock written by a live run on this host is honoured; one older than the heartbeat limit is taken over
    (w / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "heartbeat": time.time(),
                                            "started": "earlier", "token": "old"}))
    with pytest.raises(WorkdirLocked, match="in use by another run"):
        RunLock(str(w)).acquire()
    (w / "run.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "heartbeat": time.time() - 3600,
                                            "token": "old"}))
    lock = RunLock(wd).acquire()
    assert json.loads((w / "run.lock").read_text())["token"] == lock.token
    lock.release()
    assert not (w / "run.lock").exists()
