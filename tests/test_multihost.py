"""The multi-controller path on one machine (CPU devices, gloo collectives), on meshes whose model
axes span processes, against single-process runs of the same steps.

Runs (tiny model with 8 heads / 8 KV heads so that tensor 8 divides, 8 x 64 tokens per step):
  reference  1 process x 8 devices, mesh (data 8), steps 1-10 (in this process)
  same-mesh  1 process x 8 devices, mesh (data 2, stage 2, tensor 2), steps 1-5 (in this process)
  stage      2 processes x 4, (data 2, stage 2, tensor 2): stage spans the processes, steps 1-5
  tensor     2 processes x 4, (tensor 8), killed during a save, restarted
  four       4 processes x 2, (stage 4, tensor 2), resuming the stage run's checkpoint: steps 6-10
  corrupt    the stage run's newest checkpoint with a shard only process 1 reads broken
Every multi-process launch is bounded (`TIMEOUT`); a hang fails the test, it never blocks CI.
Plus in-process unit tests of the row assignment and placement.
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

import jax
import numpy as np
import pytest

from meditron_jax.storage import checkpoint as ckpt
from meditron_jax.distributed import host_batch
from meditron_jax.distributed import sharding
from meditron_jax.distributed import meshes
from tests.conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 480  # per launch; generous for 2 shared cores
BASE = ["model.num_heads=8", "model.num_kv_heads=8", "train.seq_len=64", "train.global_batch_size=8",
        "train.micro_batch_size=1", "train.log_every=1", "train.progress=False", "train.tensorboard=False",
        "train.checkpoint_every=3", "train.eval_every=5", "train.eval_batches=1", "optimizer.decay_steps=10",
        "optimizer.warmup_steps=2"]
STAGE_MESH = ["mesh.data=2", "mesh.stage=2", "mesh.fsdp=1", "mesh.tensor=2"]


# -- launching ------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(workdir: Path, procs: int, devices: int, params=(), args=()) -> list[tuple[subprocess.Popen, Path]]:
    """`procs` training processes of one run on `workdir` (logs WORKDIR.pN.txt)."""
    cmd = [sys.executable, "-m", "meditron_jax", "train", "--gin_file", "configs/tiny.gin", "--workdir", str(workdir)]
    for p in [*BASE, *params]:
        cmd += ["--gin_param", p]
    cmd += list(args)
    port = _free_port()
    out = []
    for i in range(procs):
        log = workdir.parent / f"{workdir.name}.p{i}.txt"
        extra = ["--coordinator_address", f"localhost:{port}", "--num_processes", str(procs),
                 "--process_id", str(i), "--heartbeat_timeout_s", "15"] if procs > 1 else []
        with open(log, "w") as f:
            out.append((subprocess.Popen(cmd + extra, cwd=REPO, env=subprocess_env(devices), stdout=f,
                                         stderr=subprocess.STDOUT), log))
    return out


def finish(run, timeout: float = TIMEOUT) -> tuple[list[int], list[str]]:
    deadline = time.monotonic() + timeout
    rcs = []
    try:
        for p, _ in run:
            rcs.append(p.wait(max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"run did not finish in {timeout}s:\n" + _tails(run)) from None
    finally:
        for p, _ in run:
            if p.poll() is None:
                p.kill()
                p.wait()
    return rcs, [log.read_text() for _, log in run]


def _tails(run) -> str:
    return "\n---\n".join("\n".join(ln for ln in log.read_text().splitlines() if "Gloo" not in ln)[-2500:]
                          for _, log in run)


def train(workdir: Path, procs: int, devices: int, params=(), args=()) -> list[str]:
    run = start(workdir, procs, devices, params, args)
    rcs, outs = finish(run)
    assert rcs == [0] * procs, f"exit {rcs}:\n" + _tails(run)
    return outs


def train_here(workdir: Path, params=()) -> None:
    """One process with this process's 8 devices: the single-process runs, in-process."""
    from meditron_jax.cli import main

    argv = ["train", "--gin_file", str(REPO / "configs" / "tiny.gin"), "--workdir", str(workdir)]
    for p in [*BASE, *params]:
        argv += ["--gin_param", p]
    assert main(argv) == 0


def records(workdir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]


def losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(workdir) if "loss" in r}


def eval_losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in records(workdir) if "eval_loss" in r}


def same(a: dict, b: dict, steps):
    np.testing.assert_allclose([a[s] for s in steps], [b[s] for s in steps], rtol=1e-5)


def new_workdir(parent: Path, demo: Path, name: str) -> Path:
    w = parent / name
    w.mkdir(parents=True)
    os.symlink(demo, w / "demo_data")
    return w


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


# -- shared runs ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo(demo_shards) -> Path:
    return demo_shards


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def reference(runs, demo) -> Path:
    """1 process x 8 devices, (data 8), steps 1-10."""
    w = new_workdir(runs, demo, "reference")
    train_here(w, ["train.steps=10", "mesh.data=8"])
    assert sorted(losses(w)) == list(range(1, 11)) and sorted(eval_losses(w)) == [5, 10]
    return w


@pytest.fixture(scope="module")
def stage_run(runs, demo) -> Path:
    """2 processes x 4 devices, (data 2, stage 2, tensor 2) with stage spanning the processes."""
    w = new_workdir(runs, demo, "stage")
    outs = train(w, 2, 4, ["train.steps=5", *STAGE_MESH])
    assert "pipeline: 2 stages" in outs[0]
    assert ckpt.complete_steps(str(w / "checkpoints")) == [3, 5]
    return w


# -- the runs -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_stage_spanning_two_processes_equal_one(runs, demo, reference, stage_run):
    """Stage spans the 2 processes (each holds one stage of both data-parallel groups, so both
    supply all 8 rows): losses and the eval loss equal 1 process with the same mesh and (data 8)."""
    one = new_workdir(runs, demo, "same_mesh")
    train_here(one, ["train.steps=5", *STAGE_MESH])
    same(losses(stage_run), losses(one), range(1, 6))
    same(losses(stage_run), losses(reference), range(1, 6))
    assert sorted(eval_losses(stage_run)) == [5]
    same(eval_losses(stage_run), eval_losses(one), [5])
    same(eval_losses(stage_run), eval_losses(reference), [5])
    # the 2-process checkpoint loads in this (1-process) interpreter too
    _, params = ckpt.load_params(str(stage_run), 5)
    assert all(np.isfinite(v).all() for v in params.values())


@pytest.mark.slow
def test_four_processes_resume_the_stage_spanning_checkpoint(runs, reference, stage_run):
    """4 processes x 2 devices, (stage 4, tensor 2), continue the 2-process run's step-5 checkpoint:
    steps 6-10 and the step-10 eval equal the uninterrupted 1-process run (same data order)."""
    w = copy_run(stage_run, runs / "four")
    outs = train(w, 4, 2, ["train.steps=10", "mesh.data=1", "mesh.stage=4", "mesh.tensor=2"])
    for i, out in enumerate(outs):
        assert f"resumed from step 5 ({w / 'checkpoints' / '5'}) on process {i} of 4 (host " in out, out[-2000:]
    assert sorted(losses(w)) == list(range(1, 11))
    same(losses(w), losses(reference), range(1, 11))
    same(eval_losses(w), eval_losses(reference), [5, 10])


def _corrupt_chunk(item_dir: Path, key: str) -> Path:
    """Overwrites the start (the zstd frame header) of one stored chunk of an OCDBT checkpoint
    item; returns the data file it lives in."""
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "file", "path": str(item_dir) + "/"}).result()
    root = ts.ocdbt.dump(kv).result()["versions"][-1]["root"]["location"]
    entries = ts.ocdbt.dump(kv, root).result()["entries"]
    ref = next(e["indirect_value"] for e in entries if e["key"] == key.encode())
    # 'value:ocdbt.process_1/:d/<file>:<offset>:<length>'
    prefix, rest = ref[len("value:"):].split(":", 1)
    name, offset, length = rest.rsplit(":", 2)
    path = item_dir / prefix.rstrip("/") / name
    with open(path, "r+b") as f:
        f.seek(int(offset))
        f.write(b"\0" * min(16, int(length)))
    return path


@pytest.mark.slow
def test_corrupt_shard_only_process_1_reads(runs, reference, stage_run):
    """Layer 2's q_proj chunk belongs to stage 1, which only process 1 holds: process 1 cannot read
    step 5, process 0 can. Both resume from step 3, one warning names process 1, and the run
    continues like the reference."""
    w = copy_run(stage_run, runs / "corrupt")
    path = _corrupt_chunk(w / "checkpoints" / "5" / "params", "q_proj/2.0.0.0")
    assert "ocdbt.process_1" in str(path)
    t0 = time.monotonic()
    outs = train(w, 2, 4, ["train.steps=5", "train.eval_every=0", *STAGE_MESH])
    elapsed = time.monotonic() - t0
    for i, out in enumerate(outs):
        assert f"resumed from step 3 ({w / 'checkpoints' / '3'}) on process {i} of 2 (host " in out, out[-2000:]
        assert "Traceback" not in out
    warnings = [ln for out in outs for ln in out.splitlines() if "warning:" in ln]
    assert len(warnings) == 1, warnings
    assert "checkpoint step 5 " in warnings[0] and "process 1:" in warnings[0] and "process 0:" not in warnings[0]
    assert "resuming from step 3" in warnings[0]
    assert (w / "checkpoints_unreadable" / "5").is_dir()
    same(losses(w), losses(reference), range(1, 6))
    print(f"corrupt-shard resume took {elapsed:.1f} s")


@pytest.mark.slow
def test_tensor_spanning_two_processes_killed_during_a_save(runs, demo, reference):
    """(tensor 8) across 2 processes; process 1 is killed while the step-4 checkpoint is being
    written (its temporary directory exists). The survivor exits non-zero within the bound with a
    line that says why. The restarted 2-process run resumes from the last complete checkpoint on
    both processes; every step's loss equals the reference's."""
    w = new_workdir(runs, demo, "tensor")
    params = ["train.steps=5", "train.checkpoint_every=2", "train.eval_every=0", "mesh.data=1", "mesh.tensor=8"]
    run = start(w, 2, 4, params)
    root = w / "checkpoints"
    deadline = time.monotonic() + TIMEOUT
    try:
        while not (root.exists() and any(e.name.startswith("4.") and "tmp" in e.name for e in root.iterdir())):
            if any(p.poll() is not None for p, _ in run) or time.monotonic() > deadline:
                raise AssertionError("no step-4 save in progress was seen:\n" + _tails(run))
            time.sleep(0.002)
        run[1][0].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        rcs, outs = finish(run, timeout=120)  # the survivor is stopped by the coordination service
        elapsed = time.monotonic() - t0
    finally:
        for p, _ in run:
            if p.poll() is None:
                p.kill()
    assert rcs[1] == -signal.SIGKILL and rcs[0] != 0, rcs
    # Two ways the survivor learns of its peer's death, both an abort (SIGABRT) with a line that
    # says so: the coordination service's missed heartbeats (usually, --heartbeat_timeout_s 15
    # plus a few seconds), or, on CPU, the gloo transport of a collective under way reading the
    # dead peer's half-sent message (CI saw it once: `gloo::EnforceNotMet ... Received data size
    # doesn't match expected size`, at once).
    reason = sorted((ln for ln in outs[0].splitlines()
                     if "another task died" in ln or "coordination service" in ln or "gloo::" in ln),
                    key=lambda ln: "another task died" not in ln)
    assert reason, outs[0][-3000:]
    print(f"survivor exited with {rcs[0]} after {elapsed:.1f} s: {reason[0][:300]}")
    complete = ckpt.complete_steps(str(root))
    assert complete and max(complete) < 5, complete
    outs = train(w, 2, 4, params)
    for i, out in enumerate(outs):
        assert f"resumed from step {max(complete)} ({w / 'checkpoints' / str(max(complete))}) on process {i} of 2 (host " in out, out[-2000:]
    assert sorted(losses(w)) == list(range(1, 6))
    same(losses(w), losses(reference), range(1, 6))
    assert not [e for e in root.iterdir() if not e.name.isdigit()], "leftover temporary directory"


@pytest.mark.slow
def test_mesh_that_cannot_be_placed_is_one_line_exit_2(runs, demo):
    """Both processes refuse before compiling: one line naming mesh, processes and devices."""
    w = new_workdir(runs, demo, "unplaceable")
    run = start(w, 2, 4, ["train.steps=5", "mesh.data=1", "mesh.stage=2", "mesh.tensor=4",
                          "placement.process_axes=('data',)"])
    rcs, outs = finish(run, timeout=240)
    assert rcs == [2, 2], outs
    for out in outs:
        errors = [ln for ln in out.splitlines() if ": error:" in ln]
        assert len(errors) == 1 and "Traceback" not in out, out[-2000:]
        assert "mesh data=1 stage=2 fsdp=1 tensor=4" in errors[0] and "2 processes x 4 devices" in errors[0]
    assert not (w / "checkpoints").exists() or not os.listdir(w / "checkpoints")


# -- in-process units ------------------------------------------------------------------------------

def _fake_processes(n):
    """Devices of `mesh` grouped as `n` processes would hold them: the hybrid layout puts process
    p's devices in block p of the axes that span processes."""
    flat = list(jax.devices())
    per = len(flat) // n
    return [flat[p * per:(p + 1) * per] for p in range(n)]


@pytest.mark.parametrize("sizes,n,expect", [
    ({"data": 2, "stage": 2, "fsdp": 1, "tensor": 2}, 2, [8, 8]),   # stage spans: both need every row
    ({"data": 8, "stage": 1, "fsdp": 1, "tensor": 1}, 2, [4, 4]),   # data spans: halves
    ({"data": 1, "stage": 4, "fsdp": 1, "tensor": 2}, 4, [8] * 4),  # one data group on every process
    ({"data": 2, "stage": 1, "fsdp": 2, "tensor": 2}, 4, [2] * 4),  # fsdp spans
])
def test_rows_follow_the_batch_sharding(sizes, n, expect):
    """Each fake process's rows are exactly the rows its devices hold, the union is the batch, and
    a global array assembled from each process's rows equals the global batch."""
    devices = jax.devices()
    across = meshes.process_placement(sizes, n, len(devices) // n)
    inside = [sizes[a] // across[a] for a in meshes.MESH_AXES]
    groups = _fake_processes(n)
    blocks = [np.asarray(g, dtype=object).reshape(inside) for g in groups]
    grid = np.empty([across[a] for a in meshes.MESH_AXES], dtype=object)
    for p, b in enumerate(blocks):
        grid.flat[p] = b
    dev_array = np.block(grid.tolist())
    mesh = jax.sharding.Mesh(dev_array, meshes.MESH_AXES)
    s = host_batch.batch_sharding(mesh)
    gb = 8
    rows = [host_batch.rows_of(s, gb, g) for g in groups]
    assert [len(r) for r in rows] == expect
    assert sorted(set(np.concatenate(rows))) == list(range(gb))
    full = np.arange(gb * 3).reshape(gb, 3)
    index = s.devices_indices_map((gb, 3))
    for g, r in zip(groups, rows):
        for d in g:
            assert set(range(*index[d][0].indices(gb))) <= set(r)
    # the assembly maps local rows to each device's slice
    arr = host_batch._assemble(full, np.arange(gb), s, (gb, 3))
    np.testing.assert_array_equal(np.asarray(arr), full)


def test_global_batch_single_process_and_wrong_rows():
    mesh = meshes.make_mesh({"data": 2, "stage": 2, "fsdp": 1, "tensor": 2})
    assert list(host_batch.host_rows(mesh, 8)) == list(range(8))
    batch = {"inputs": np.arange(16, dtype=np.int32).reshape(8, 2)}
    out = host_batch.global_batch(batch, mesh)
    np.testing.assert_array_equal(np.asarray(out["inputs"]), batch["inputs"])
    assert out["inputs"].sharding.spec == host_batch.batch_sharding(mesh).spec
    with pytest.raises(ValueError, match="passed 4 rows"):
        host_batch.global_batch({"inputs": batch["inputs"][:4]}, mesh, 8)


def test_process_placement():
    place = meshes.process_placement
    assert place({"data": 2, "stage": 2, "fsdp": 1, "tensor": 2}, 2, 4) == {"data": 1, "stage": 2, "fsdp": 1, "tensor": 1}
    assert place({"data": 1, "stage": 1, "fsdp": 1, "tensor": 8}, 2, 4) == {"data": 1, "stage": 1, "fsdp": 1, "tensor": 2}
    # Meditron-70B: TP8 inside a host, PP8 x DP2 across 16 hosts
    assert place({"data": 2, "stage": 8, "fsdp": 1, "tensor": 8}, 16, 8) == {"data": 2, "stage": 8, "fsdp": 1, "tensor": 1}
    assert place({"data": 8, "stage": 1, "fsdp": 1, "tensor": 1}, 2, 4, order=("data",))["data"] == 2
    with pytest.raises(meshes.MeshError, match=r"mesh data=1 stage=4 fsdp=1 tensor=2 cannot be placed on 2 processes x 4 devices"):
        place({"data": 1, "stage": 4, "fsdp": 1, "tensor": 2}, 2, 4, order=("data",))
    with pytest.raises(meshes.MeshError, match=r"has 8 devices, but 3 processes x 4 devices are 12"):
        place({"data": 2, "stage": 2, "fsdp": 1, "tensor": 2}, 3, 4)
    with pytest.raises(meshes.MeshError, match="different numbers of devices"):
        place({"data": 8, "stage": 1, "fsdp": 1, "tensor": 1}, 2, 4, [4, 3])


def test_pipeline_keeps_the_rows_it_is_given(demo):
    """`build_pipeline(rows=...)` yields exactly those rows of the global batch (as sharding's host
    rows name them), in the same data order as one process holding everything."""
    import gin

    from meditron_jax.data.config import data_config
    from meditron_jax.data.loader import build_pipeline

    gin.clear_config()  # bindings left by an earlier in-process test would reach data_config
    cfg = data_config(demo=True)
    kw = dict(seq_len=32, global_batch_size=8, seed=3, workdir=str(demo.parent))
    whole = build_pipeline(**kw, config=cfg).train_iterator()
    part = build_pipeline(**kw, process_index=1, process_count=2, rows=[1, 2, 5, 6], config=cfg).train_iterator()
    for _ in range(2):
        a, b = next(whole), next(part)
        for k in a:
            np.testing.assert_array_equal(a[k][[1, 2, 5, 6]], b[k])
    whole.close()
    part.close()
