"""Damaged and mismatched checkpoints told apart (issue 29, part 6; docs/reliability.md).

A newest checkpoint whose array data is gone (its metadata intact) is damage: one warning names
it, it is moved to `checkpoints_unreadable/`, and the run resumes from the one before, exactly
where that one left off. A checkpoint of another model is the user's configuration: one line
naming what differs, exit 2, nothing moved. The trainer runs in-process on the tiny model (one
short training shared by the module, then one resume per case).
"""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from meditron_jax.cli import main
from meditron_jax.storage import checkpoint as ckpt
from tests.conftest import workdir_with_demo

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.gin")
PARAMS = ["model.num_layers=2", "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=1",
          "train.checkpoint_every=2", "train.log_every=1", "train.eval_every=0", "train.progress=False",
          "train.tensorboard=False"]


def train(workdir: Path, *params: str) -> int:
    argv = ["train", "--gin_file", TINY, "--workdir", str(workdir)]
    for p in [*PARAMS, *params]:
        argv += ["--gin_param", p]
    return main(argv)


def losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_shards) -> Path:
    """Four steps with checkpoints at 2 and 4."""
    w = Path(workdir_with_demo(tmp_path_factory.mktemp("damage"), demo_shards))
    assert train(w, "train.steps=4") == 0
    assert ckpt.complete_steps(str(w / "checkpoints")) == [2, 4]
    return w


def copy_of(trained: Path, tmp_path: Path) -> Path:
    w = tmp_path / "w"
    shutil.copytree(trained, w, symlinks=True)
    return w


@pytest.mark.parametrize("item", ["params", "opt_state"])
def test_newest_without_its_array_data_is_set_aside_and_the_run_resumes(trained, tmp_path, capfd, item):
    w = copy_of(trained, tmp_path)
    data = w / "checkpoints" / "4" / item / "d"  # the item's OCDBT data files; its metadata stays
    assert data.is_dir() and (w / "checkpoints" / "4" / item / "_METADATA").is_file()
    shutil.rmtree(data)
    capfd.readouterr()
    assert train(w, "train.steps=6") == 0
    err = capfd.readouterr().err
    warnings = [ln for ln in err.splitlines() if "warning:" in ln]
    assert len(warnings) == 1, err
    assert "checkpoint step 4 " in warnings[0] and "unreadable" in warnings[0], warnings[0]
    assert "resuming from step 2, not from the newest step 4" in warnings[0], warnings[0]
    assert "error:" not in err and "Traceback" not in err, err
    assert (w / "checkpoints_unreadable" / "4" / item / "_METADATA").is_file()  # set aside, not deleted
    assert ckpt.complete_steps(str(w / "checkpoints")) == [2, 4, 6]
    got, base = losses(w), losses(trained)
    assert sorted(got) == list(range(1, 7))
    assert [got[s] for s in (3, 4)] == [base[s] for s in (3, 4)]  # resumed exactly where step 2 left off


def test_changed_model_refuses_in_one_line(trained, tmp_path, capfd):
    w = copy_of(trained, tmp_path)
    before = sorted(p.relative_to(w) for p in w.rglob("*") if "demo_data" not in p.parts)
    metrics = (w / "metrics.jsonl").read_bytes()
    capfd.readouterr()
    assert train(w, "train.steps=6", "model.intermediate_size=384") == 2
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    errors = [ln for ln in err if "error:" in ln]
    assert len(errors) == 1 and not any("warning:" in ln or "Traceback" in ln for ln in err), err
    assert "cannot resume from" in errors[0] and "checkpoints/4/params" in errors[0], errors[0]
    assert "down_proj has shape (2, 352, 128) in the checkpoint, the run's model expects (2, 384, 128)" in errors[0]
    assert sorted(p.relative_to(w) for p in w.rglob("*") if "demo_data" not in p.parts) == before  # nothing moved
    assert (w / "metrics.jsonl").read_bytes() == metrics


AdamLike = collections.namedtuple("AdamLike", ["count", "mu"])


def test_check_shapes_names_what_differs_and_calls_missing_data_damage(tmp_path):
    """The verdict on one item, from its metadata: names that differ (either way) and shapes that
    differ are a mismatch naming them; a namedtuple state (read back by Orbax as a dict) matches
    itself; array data gone is damage."""
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])

    def abstract(tree):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype, sharding=cpu), tree)

    saved = {"a": np.zeros((2,), np.float32), "b": np.ones((3,), np.float32),
             "opt": AdamLike(np.zeros((), np.int32), {"a": np.zeros((2,), np.float32)})}
    item = tmp_path / "item"
    with ocp.StandardCheckpointer() as c:
        c.save(item, saved)
    ckpt.check_shapes(str(item), abstract(saved))  # itself: fine, namedtuple included
    other = {"a": saved["a"], "c": saved["b"], "opt": saved["opt"]}
    with pytest.raises(ckpt.CheckpointMismatch, match=r"lacks \['c'\] and has \['b'\], which the run's model does not"):
        ckpt.check_shapes(str(item), abstract(other))
    wider = {**saved, "a": np.zeros((4,), np.float32)}
    with pytest.raises(ckpt.CheckpointMismatch, match=r"a has shape \(2,\) in the checkpoint, .* expects \(4,\)"):
        ckpt.check_shapes(str(item), abstract(wider))
    shutil.rmtree(item / "d")
    with pytest.raises(ckpt.CheckpointUnreadable, match="array metadata cannot be read"):
        ckpt.check_shapes(str(item), abstract(saved))
