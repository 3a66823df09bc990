"""What this host and its launcher say, read before JAX starts: the accelerators present and the
cluster environment. Pure functions of the environment variables and a few device files; no
JAX import, so the CLI can decide the platform and the host malloc policy before JAX loads.

Owns: `accelerator()` (the first sign of a GPU or TPU on this host, or None), `default_platform()`
(`"cpu"` when `JAX_PLATFORMS` is unset and no accelerator is present: the CUDA / TPU plugins of
the `plan`, `test`, `cuda` or `tpu` extras are then never started, so they print nothing),
`cpu_only()` (JAX will run on the CPU) and `detect_cluster()` (how `init_distributed` joins:
flags, Open MPI, SLURM, a GKE TPU pod, a Cloud TPU VM, or no cluster at all). Does not own:
joining (`multihost.init_distributed`).

The signals are the ones JAX's own cluster detection reads (jax/_src/clusters/*.py in jax
0.10.2) and the device files its backends look for (jax/_src/hardware_utils.py): a cluster found
here is one `jax.distributed.initialize()` with no arguments can join.
"""

from __future__ import annotations

import dataclasses
import glob
import os

# Google's PCI vendor id and the device ids of TPU chips (jax 0.10.2, hardware_utils.py).
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = {"0x0027": "v3", "0x0056": "plc", "0x005e": "v4", "0x0062": "v5p", "0x0063": "v5e",
                    "0x006f": "v6e", "0x0076": "tpu7x"}
PCI_DEVICES = "/sys/bus/pci/devices"
# Device files of NVIDIA GPUs (bare metal, containers, WSL2) and AMD GPUs (ROCm's KFD driver).
GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")
# What a TPU pod's scheduler (GKE) or a forced TPU start puts in the environment.
TPU_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS", "JAX_FORCE_TPU_INIT")


def tpu_chips(pci_root: str | None = None) -> int:
    """TPU chips attached to this host through PCI (0 anywhere else)."""
    n = 0
    for vendor in glob.glob(os.path.join(pci_root or PCI_DEVICES, "*", "vendor")):
        try:
            with open(vendor) as f:
                if f.read().strip() != _GOOGLE_PCI_VENDOR:
                    continue
            with open(os.path.join(os.path.dirname(vendor), "device")) as f:
                n += f.read().strip() in _TPU_PCI_DEVICES
        except OSError:
            continue
    return n


def accelerator(environ=None) -> str | None:
    """The first sign of a GPU or TPU here (a device file, TPU chips on PCI, a TPU pod's
    environment), in words; None on a host without one."""
    env = os.environ if environ is None else environ
    for path in GPU_DEVICE_FILES:
        if os.path.exists(path):
            return path
    chips = tpu_chips()
    if chips:
        return f"{chips} TPU chips"
    for name in TPU_ENV:
        if env.get(name):
            return name
    return None


def default_platform(environ=None) -> str | None:
    """`"cpu"` when the user left `JAX_PLATFORMS` unset and this host has no accelerator, else
    None (JAX chooses, as it always did; a user's `JAX_PLATFORMS` is never overridden)."""
    env = os.environ if environ is None else environ
    if "JAX_PLATFORMS" in env or accelerator(env) is not None:
        return None
    return "cpu"


def cpu_only(environ=None) -> bool:
    """JAX will run on the CPU: `JAX_PLATFORMS` asks for the CPU first, or it is unset and this
    host has no accelerator."""
    env = os.environ if environ is None else environ
    platforms = env.get("JAX_PLATFORMS", "").strip()
    if platforms:  # empty: JAX chooses, as when unset
        return platforms.split(",")[0].strip().lower() == "cpu"
    return accelerator(env) is None


@dataclasses.dataclass(frozen=True)
class Cluster:
    """How a process joins: `how` (in words), `evidence` (the variables that said so), the
    arguments for `jax.distributed.initialize` besides the timeouts (none where JAX detects the
    cluster itself) and the process count the environment promises (None: JAX finds out)."""
    how: str
    evidence: str
    kwargs: dict
    num_processes: int | None = None


class ClusterEnvError(ValueError):
    """An environment that names a cluster JAX cannot join by itself."""


def _int(env, name: str, default: int = 1) -> int:
    try:
        return int(env.get(name, default))
    except ValueError:
        raise ClusterEnvError(f"{name}={env.get(name)!r} is not an integer") from None


def detect_cluster(environ=None, coordinator_address=None, num_processes=None, process_id=None,
                   mpi4py_installed: bool | None = None) -> Cluster | None:
    """The cluster this process belongs to, or None for a single-process run. In JAX's order:
    explicit flags, Open MPI (`mpirun`), SLURM (`srun`), a GKE TPU pod, a Cloud TPU VM."""
    env = os.environ if environ is None else environ
    if coordinator_address or num_processes is not None or process_id is not None:
        if not coordinator_address or num_processes is None or process_id is None:
            raise ClusterEnvError("--coordinator_address, --num_processes and --process_id go together")
        return Cluster("flags", f"--coordinator_address {coordinator_address}",
                       dict(coordinator_address=coordinator_address, num_processes=num_processes,
                            process_id=process_id), num_processes)
    n = _int(env, "OMPI_COMM_WORLD_SIZE")
    if n > 1:
        evidence = f"OMPI_COMM_WORLD_SIZE={n} OMPI_COMM_WORLD_RANK={env.get('OMPI_COMM_WORLD_RANK')}"
        if env.get("OMPI_MCA_orte_hnp_uri"):  # Open MPI 4's mpirun: JAX reads the launcher's address
            return Cluster("Open MPI", evidence, {}, n)
        if mpi4py_installed if mpi4py_installed is not None else _has_mpi4py():
            return Cluster("Open MPI (mpi4py)", evidence, {"cluster_detection_method": "mpi4py"}, n)
        raise ClusterEnvError(f"an Open MPI launch ({evidence}) without OMPI_MCA_orte_hnp_uri (Open MPI 5): "
                              "JAX finds the coordinator only through mpi4py (pip install mpi4py), or pass "
                              "--coordinator_address, --num_processes and --process_id")
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                              "SLURM_LOCALID")):  # a job step (srun), not the batch script itself
        n = _int(env, "SLURM_NTASKS")
        if n > 1:
            return Cluster("SLURM", f"job {env['SLURM_JOB_ID']} SLURM_NTASKS={n} SLURM_PROCID={env['SLURM_PROCID']}",
                           {}, n)
    hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES")
    if hosts:
        slices = _int(env, "MEGASCALE_NUM_SLICES")
        n = len(hosts.split(",")) * slices
        if n > 1:
            return Cluster("GKE TPU pod", f"TPU_WORKER_ID={env.get('TPU_WORKER_ID')} of "
                           f"{len(hosts.split(','))} TPU_WORKER_HOSTNAMES" + (f" x {slices} slices" if slices > 1 else ""),
                           {}, n)
        return None
    chips = tpu_chips()
    if chips and not env.get("TPU_SKIP_MDS_QUERY"):
        return Cluster("Cloud TPU VM", f"{chips} TPU chips here; the slice's hosts from the TPU metadata", {})
    return None


def _has_mpi4py() -> bool:
    import importlib.util
    return importlib.util.find_spec("mpi4py") is not None
