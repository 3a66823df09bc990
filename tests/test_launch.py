"""The launch scripts, run here as their launchers run them, with stand-in `srun`, `scontrol`,
`gcloud` and `meditron-jax` on the PATH that record their arguments (and a few environment
variables) as JSON lines. What cannot be run here (a real Slurm, TPU VM or GKE cluster) is listed
in docs/operations.md.

- launch/slurm.sbatch: as sbatch runs it (a copy in a spool directory, working directory and
  SLURM_SUBMIT_DIR the project root), from another directory, from a copy with no gpu_env.sh in
  reach (one line, no srun); the srun command it builds; self-requeue after exit 75 only.
- launch/tpu_pod.sh: the remote command, run by a shell, gives the trainer its arguments word for
  word (quotes and spaces included).
- launch/local_multiprocess.sh: N processes with the distributed flags appended.
- launch/gke_jobset.yaml: one trainer command with no distributed flags; pods, topology and chips
  per VM agree.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"

# A stand-in command: appends {"argv": [...], "env": {...}} to $RECORD and exits $<NAME>_EXIT.
STANDIN = """#!/usr/bin/env python3
import json, os, sys
name = os.path.basename(sys.argv[0])
env = {k: os.environ.get(k) for k in ("XLA_FLAGS", "NCCL_PROTO", "PWD")}
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps({"cmd": name, "argv": sys.argv[1:], "env": env}) + "\\n")
sys.exit(int(os.environ.get(name.upper().replace("-", "_") + "_EXIT", "0")))
"""


@pytest.fixture
def bin_dir(tmp_path):
    """A PATH directory with stand-ins for srun, scontrol, gcloud and meditron-jax."""
    d = tmp_path / "bin"
    d.mkdir()
    for name in ("srun", "scontrol", "gcloud", "meditron-jax"):
        p = d / name
        p.write_text(STANDIN)
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return d


def run(script, args, bin_dir: Path, cwd: Path, env_extra=None, timeout=60):
    record = bin_dir.parent / "record.jsonl"
    record.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MEDITRON_JAX_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", RECORD=str(record), **(env_extra or {}))
    proc = subprocess.run(["bash", str(script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    calls = [json.loads(x) for x in record.read_text().splitlines()] if record.exists() else []
    return proc, calls


TRAIN_ARGS = ["configs/meditron_7b.gin", "/runs/m7b", "--gin_param", "data.tokenizer='/models/a b/tokenizer.model'"]
SRUN_ARGV = ["--gpu-bind=single:1", "--kill-on-bad-exit=1", "meditron-jax", "train", "--gin_file",
             "configs/meditron_7b.gin", "--workdir", "/runs/m7b", "--gin_param",
             "data.tokenizer='/models/a b/tokenizer.model'"]


def spool_copy(tmp_path: Path) -> Path:
    """The script as slurmd runs it: a copy named slurm_script in a spool directory."""
    spool = tmp_path / "spool" / "job00123"
    spool.mkdir(parents=True)
    shutil.copy(LAUNCH / "slurm.sbatch", spool / "slurm_script")
    return spool / "slurm_script"


def test_slurm_as_sbatch_runs_it_reaches_srun_with_the_train_command(tmp_path, bin_dir):
    proc, calls = run(spool_copy(tmp_path), TRAIN_ARGS, bin_dir, cwd=REPO,
                      env_extra={"SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": "123"})
    assert proc.returncode == 0, proc.stderr
    assert [c["cmd"] for c in calls] == ["srun"]
    assert calls[0]["argv"] == SRUN_ARGV
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in calls[0]["env"]["XLA_FLAGS"]  # gpu_env.sh sourced
    assert calls[0]["env"]["NCCL_PROTO"] == "SIMPLE,LL,LL128"


def test_slurm_from_another_directory_finds_gpu_env_beside_itself(tmp_path, bin_dir):
    proc, calls = run(LAUNCH / "slurm.sbatch", TRAIN_ARGS, bin_dir, cwd=tmp_path, env_extra={"SLURM_JOB_ID": "7"})
    assert proc.returncode == 0, proc.stderr
    assert [c["argv"] for c in calls] == [SRUN_ARGV]
    assert "latency_hiding_scheduler" in calls[0]["env"]["XLA_FLAGS"]


def test_slurm_without_gpu_env_in_reach_is_one_line_and_no_srun(tmp_path, bin_dir):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc, calls = run(spool_copy(tmp_path), TRAIN_ARGS, bin_dir, cwd=elsewhere,
                      env_extra={"SLURM_SUBMIT_DIR": str(elsewhere), "SLURM_JOB_ID": "123"})
    assert proc.returncode == 2 and calls == []
    assert len(proc.stderr.strip().splitlines()) == 1 and "gpu_env.sh not found" in proc.stderr


def test_slurm_usage(tmp_path, bin_dir):
    proc, calls = run(LAUNCH / "slurm.sbatch", ["configs/meditron_7b.gin"], bin_dir, cwd=REPO)
    assert proc.returncode != 0 and calls == []
    assert "usage: sbatch launch/slurm.sbatch GIN_FILE WORKDIR" in proc.stderr


@pytest.mark.parametrize("train_exit,requeued", [(75, True), (1, False), (0, False)])
def test_slurm_requeues_itself_after_exit_75_only(tmp_path, bin_dir, train_exit, requeued):
    proc, calls = run(spool_copy(tmp_path), TRAIN_ARGS, bin_dir, cwd=REPO,
                      env_extra={"SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": "123", "SRUN_EXIT": str(train_exit)})
    assert proc.returncode == train_exit, proc.stderr
    assert [c["cmd"] for c in calls] == ["srun"] + (["scontrol"] if requeued else [])
    if requeued:
        assert calls[1]["argv"] == ["requeue", "123"]
        assert "requeueing job 123" in proc.stderr


def test_tpu_pod_remote_command_gives_train_its_arguments_word_for_word(tmp_path, bin_dir):
    args = ["my-v5p", "us-east5-a", "configs/meditron_70b.gin", "gs://b/runs/m70b",
            "--gin_param", "train.init_from='gs://b/ckpt/llama 2'", "--gin_param", "train.steps=10"]
    checkout = tmp_path / "meditron-jax"  # the checkout on the workers (MEDITRON_JAX_DIR)
    checkout.mkdir()
    proc, calls = run(LAUNCH / "tpu_pod.sh", args, bin_dir, cwd=tmp_path, env_extra={"MEDITRON_JAX_DIR": str(checkout)})
    assert proc.returncode == 0, proc.stderr
    [gcloud] = calls
    argv = gcloud["argv"]
    assert argv[:6] == ["compute", "tpus", "tpu-vm", "ssh", "my-v5p", "--zone"] and "--worker=all" in argv
    remote = argv[argv.index("--command") + 1]
    # a worker's shell runs the command as gcloud passes it
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", RECORD=str(tmp_path / "remote.jsonl"))
    subprocess.run(["bash", "-c", remote], env=env, check=True, timeout=30)
    [train] = [json.loads(x) for x in (tmp_path / "remote.jsonl").read_text().splitlines()]
    assert train["cmd"] == "meditron-jax" and train["env"]["PWD"] == str(checkout)
    assert train["argv"] == ["train", "--gin_file", "configs/meditron_70b.gin", "--workdir", "gs://b/runs/m70b",
                             "--gin_param", "train.init_from='gs://b/ckpt/llama 2'", "--gin_param", "train.steps=10"]
    assert not any(a.startswith(("--coordinator", "--num_processes", "--process_id")) for a in train["argv"])


def test_tpu_pod_usage(tmp_path, bin_dir):
    proc, calls = run(LAUNCH / "tpu_pod.sh", ["my-v5p", "us-east5-a"], bin_dir, cwd=tmp_path)
    assert proc.returncode != 0 and calls == [] and "usage: tpu_pod.sh" in proc.stderr


def test_local_multiprocess_appends_the_distributed_flags(tmp_path, bin_dir):
    proc, calls = run(LAUNCH / "local_multiprocess.sh", ["2", "--", "meditron-jax", "train", "--workdir", "w"],
                      bin_dir, cwd=tmp_path, env_extra={"COORDINATOR_PORT": "23456"})
    assert proc.returncode == 0, proc.stderr
    assert sorted(c["argv"][-1] for c in calls) == ["0", "1"]
    for c in calls:
        assert c["argv"][:3] == ["train", "--workdir", "w"]
        assert c["argv"][3:7] == ["--coordinator_address", "localhost:23456", "--num_processes", "2"]


def test_gke_jobset_pods_topology_and_command_agree():
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((LAUNCH / "gke_jobset.yaml").read_text())
    assert doc["apiVersion"].startswith("jobset.x-k8s.io/") and doc["kind"] == "JobSet"
    [job] = doc["spec"]["replicatedJobs"]
    spec = job["template"]["spec"]
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    chips_per_vm = int(container["resources"]["limits"]["google.com/tpu"])
    topology = pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"]
    chips = math.prod(int(x) for x in topology.split("x"))
    assert spec["parallelism"] == spec["completions"] == chips // chips_per_vm  # one pod per TPU VM
    assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] >= 60
    cmd = container["command"]
    assert cmd[:2] == ["meditron-jax", "train"] and "--workdir" in cmd
    assert not any(a.startswith(("--coordinator", "--num_processes", "--process_id")) for a in cmd)
    gin_file = cmd[cmd.index("--gin_file") + 1]
    assert (REPO / gin_file).is_file()
    # the config's mesh holds the slice's devices (v5p: one JAX device per chip)
    from meditron_jax.training.config import parse_gin
    from meditron_jax.distributed import meshes
    from meditron_jax.models.config import gin_call
    import gin
    gin.clear_config()
    try:
        parse_gin([gin_file], [p for i, p in enumerate(cmd) if i and cmd[i - 1] == "--gin_param"])
        sizes = gin_call(lambda: meshes.mesh_shape(num_devices=chips))
        assert math.prod(sizes.values()) == chips
    finally:
        gin.clear_config()
