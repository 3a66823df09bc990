"""Joining the cluster with no flags (distributed/environment.py, distributed/multihost.py) and a
quiet, correct platform choice, checked with the environments each launcher sets. Nothing here
starts a real cluster: `jax.distributed.initialize` is replaced by a recorder (what reaching a
coordinator needs, real TPU metadata or several hosts, is listed in docs/operations.md; the real
multi-process join is tests/test_multihost.py's, through flags).

- detection: Open MPI 4 and 5, a SLURM step (not the batch script), a GKE TPU pod (one slice and
  several), a Cloud TPU VM (TPU chips on PCI), flags, and none; for SLURM and Open MPI JAX's own
  detection agrees on the environment and the process count;
- `train` in a TPU-slice-like environment calls `jax.distributed.initialize()` with no cluster
  arguments (the timeouts only); a single-host run never calls it, says so in its start-up line,
  and a mesh the devices cannot hold is one line naming both;
- `generate` (and `eval`, same loader) joins the same way (it used to look at SLURM_NTASKS only);
- the platform: CPU only when `JAX_PLATFORMS` is unset and no GPU / TPU is present.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import pytest

from meditron_jax.distributed import environment, multihost
from meditron_jax.errors import UserError

REPO = Path(__file__).resolve().parents[1]
CLUSTER_VARS = ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_MCA_orte_hnp_uri",
                "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID", "MEGASCALE_NUM_SLICES",
                "MEGASCALE_COORDINATOR_ADDRESS", "TPU_SKIP_MDS_QUERY", "JAX_FORCE_TPU_INIT", "JAX_COORDINATOR_ADDRESS")

SLURM_STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[001-016]", "SLURM_NTASKS": "128",
              "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}
OMPI4 = {"OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "3",
         "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911"}
GKE_TPU = {"TPU_WORKER_HOSTNAMES": "m7b-slice-0-0.m7b,m7b-slice-0-1.m7b,m7b-slice-0-2.m7b,m7b-slice-0-3.m7b",
           "TPU_WORKER_ID": "2"}


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No cluster variables and no TPU chips (an empty PCI tree) unless a test adds them."""
    for k in CLUSTER_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(environment, "PCI_DEVICES", str(tmp_path / "pci"))
    return monkeypatch


def fake_tpu_chips(root: Path, n: int, device_id: str = "0x0062"):
    for i in range(n):
        d = root / f"0000:00:{i:02x}.0"
        d.mkdir(parents=True)
        (d / "vendor").write_text("0x1ae0\n")
        (d / "device").write_text(device_id + "\n")
    other = root / "0000:00:1f.0"  # an unrelated PCI device
    other.mkdir(parents=True)
    (other / "vendor").write_text("0x8086\n")
    (other / "device").write_text("0x0062\n")


@pytest.fixture
def recorder(monkeypatch):
    """jax.distributed.initialize replaced: records its keyword arguments, then refuses (as an
    unreachable coordinator would), so nothing is started."""
    calls = []

    def initialize(*args, **kwargs):
        calls.append((args, kwargs))
        raise RuntimeError("stand-in: no coordinator here")
    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    return calls


TIMEOUT_KWARGS = {"initialization_timeout", "heartbeat_timeout_seconds", "shutdown_timeout_seconds"}


# ---- detection -------------------------------------------------------------------------------

@pytest.mark.parametrize("env,how,n,kwargs", [
    (SLURM_STEP, "SLURM", 128, {}),
    (OMPI4, "Open MPI", 16, {}),
    (GKE_TPU, "GKE TPU pod", 4, {}),
    ({**GKE_TPU, "MEGASCALE_NUM_SLICES": "2", "MEGASCALE_COORDINATOR_ADDRESS": "m7b-slice-0-0.m7b"}, "GKE TPU pod", 8, {}),
    ({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476", "TPU_WORKER_ID": "0"}, "GKE TPU pod", 2, {}),
])
def test_detects_each_cluster_environment(clean_env, env, how, n, kwargs):
    for k, v in env.items():
        clean_env.setenv(k, v)
    c = environment.detect_cluster()
    assert (c.how, c.num_processes, c.kwargs) == (how, n, kwargs)


@pytest.mark.parametrize("env", [
    {},
    {**SLURM_STEP, "SLURM_NTASKS": "1"},  # one task: a single process
    {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NODELIST"},  # the batch script itself, not srun
    {**OMPI4, "OMPI_COMM_WORLD_SIZE": "1"},
    {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"},  # a single-host TPU pod
])
def test_single_process_environments_stay_uninitialised(clean_env, env):
    for k, v in env.items():
        clean_env.setenv(k, v)
    assert environment.detect_cluster() is None


def test_slurm_and_open_mpi_agree_with_jax_own_detection(clean_env):
    from jax._src.clusters import OmpiCluster, SlurmCluster  # tests may read JAX's internals; the package may not

    for env, cls in ((SLURM_STEP, SlurmCluster), (OMPI4, OmpiCluster)):
        for k in CLUSTER_VARS:
            clean_env.delenv(k, raising=False)
        for k, v in env.items():
            clean_env.setenv(k, v)
        ours = environment.detect_cluster()
        assert cls.is_env_present() and ours is not None
        assert cls.get_process_count() == ours.num_processes
        assert str(cls.get_process_id()) in ours.evidence


def test_open_mpi_5_needs_mpi4py(clean_env):
    env = {k: v for k, v in OMPI4.items() if k != "OMPI_MCA_orte_hnp_uri"}  # Open MPI 5 (PRRTE) sets no orte URI
    for k, v in env.items():
        clean_env.setenv(k, v)
    c = environment.detect_cluster(mpi4py_installed=True)
    assert c.kwargs == {"cluster_detection_method": "mpi4py"} and c.num_processes == 16
    with pytest.raises(environment.ClusterEnvError, match="mpi4py"):
        environment.detect_cluster(mpi4py_installed=False)


def test_cloud_tpu_vm_is_found_by_its_chips(clean_env, tmp_path):
    fake_tpu_chips(tmp_path / "pci", 4)
    assert environment.tpu_chips() == 4
    c = environment.detect_cluster()
    assert c.how == "Cloud TPU VM" and c.kwargs == {} and c.num_processes is None and "4 TPU chips" in c.evidence
    clean_env.setenv("TPU_SKIP_MDS_QUERY", "1")  # no metadata server: JAX cannot find the slice
    assert environment.detect_cluster() is None


def test_flags_override_the_environment_and_go_together(clean_env):
    for k, v in SLURM_STEP.items():
        clean_env.setenv(k, v)
    c = environment.detect_cluster(None, "h0:1234", 2, 1)
    assert c.how == "flags" and c.kwargs == dict(coordinator_address="h0:1234", num_processes=2, process_id=1)
    with pytest.raises(environment.ClusterEnvError, match="go together"):
        environment.detect_cluster(None, None, 2, 1)


# ---- joining ---------------------------------------------------------------------------------

def test_train_in_a_tpu_slice_environment_calls_initialize_with_no_arguments(clean_env, recorder, tmp_path):
    from meditron_jax.training.train import train

    for k, v in GKE_TPU.items():
        clean_env.setenv(k, v)
    with pytest.raises(UserError) as e:
        train(str(tmp_path / "w"), [str(REPO / "configs/tiny.gin")])
    [(args, kwargs)] = recorder
    assert args == () and set(kwargs) == TIMEOUT_KWARGS  # no coordinator, process count or id: JAX finds them
    assert "GKE TPU pod" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "w").exists()  # nothing written before the cluster is joined


def test_single_host_train_does_not_initialize_and_says_how_it_started(clean_env, recorder, tmp_path):
    from meditron_jax import console
    from meditron_jax.training.train import train

    with pytest.raises(UserError) as e:  # mesh data=16 on the 8 test devices
        train(str(tmp_path / "w"), [str(REPO / "configs/tiny.gin")], ["mesh.data=16"])
    assert recorder == []
    msg = str(e.value)  # one line naming the mesh asked for and the devices found
    assert "\n" not in msg and "data=16" in msg and "16 devices" in msg and "8 are available" in msg

    lines = []  # the start-up line train logs once its checks pass
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    console.log.addHandler(handler)
    old_level = console.log.level
    console.log.setLevel(logging.INFO)
    try:
        multihost.log_start(None)
    finally:
        console.log.removeHandler(handler)
        console.log.setLevel(old_level)
    assert lines == ["single process (no cluster environment found): 8 local / 8 global cpu devices (cpu)"]


def test_generate_joins_the_cluster_the_environment_names(clean_env, recorder, tmp_path, capsys):
    """(`eval` and `lm-eval` load through the same `eval.loader.load_for_inference`.)"""
    from meditron_jax.cli import main

    for k, v in GKE_TPU.items():
        clean_env.setenv(k, v)
    rc = main(["generate", "--prompt", "x", "--checkpoint", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cannot join the JAX cluster found by GKE TPU pod (TPU_WORKER_ID=2" in err[0], err
    [(args, kwargs)] = recorder
    assert args == () and set(kwargs) == TIMEOUT_KWARGS


# ---- the platform ----------------------------------------------------------------------------

def test_cpu_only_when_no_accelerator_and_jax_platforms_unset(clean_env, tmp_path):
    clean_env.delenv("JAX_PLATFORMS", raising=False)
    clean_env.setattr(environment, "GPU_DEVICE_FILES", (str(tmp_path / "nvidia0"),))
    assert environment.default_platform() == "cpu" and environment.cpu_only()
    (tmp_path / "nvidia0").touch()  # a GPU's device file: JAX chooses, as before
    assert environment.accelerator() == str(tmp_path / "nvidia0")
    assert environment.default_platform() is None and not environment.cpu_only()
    (tmp_path / "nvidia0").unlink()
    fake_tpu_chips(tmp_path / "pci", 1, "0x0063")  # a TPU v5e chip
    assert environment.default_platform() is None and not environment.cpu_only()
    clean_env.setenv("JAX_PLATFORMS", "")  # the user's choice is never overridden, even empty
    assert environment.default_platform() is None and not environment.cpu_only()  # JAX takes the TPU
    clean_env.setenv("JAX_PLATFORMS", "cpu")
    assert environment.default_platform() is None and environment.cpu_only()


def test_tpu_pod_environment_counts_as_an_accelerator(clean_env, tmp_path):
    clean_env.delenv("JAX_PLATFORMS", raising=False)
    clean_env.setattr(environment, "GPU_DEVICE_FILES", ())
    for k, v in GKE_TPU.items():
        clean_env.setenv(k, v)
    assert environment.accelerator() == "TPU_WORKER_HOSTNAMES" and environment.default_platform() is None



def test_host_malloc_policy_follows_the_platform():
    from meditron_jax.training import hostmem

    assert hostmem.policy(cpu=True, environ={}) == "keep"
    assert hostmem.policy(cpu=False, environ={}) == "default"  # a GPU / TPU host: glibc's defaults
    assert hostmem.policy(cpu=False, environ={hostmem.ENV: "keep"}) == "keep"
    assert hostmem.policy(cpu=True, environ={hostmem.ENV: "default"}) == "default"
    with pytest.raises(UserError, match="MEDITRON_JAX_HOST_MALLOC='sometimes': expected 'keep' or 'default'"):
        hostmem.policy(cpu=True, environ={hostmem.ENV: "sometimes"})
