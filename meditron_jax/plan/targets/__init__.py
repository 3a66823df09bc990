"""Compile targets for `meditron-jax plan --target`: GPUs and TPU slices without the hardware.

Owns: the table of targets (name -> platform, devices, usable memory per device), building
their compile-only devices (`jax.experimental.topologies`), the shipped GPU target configs
(`*.txtpb` here, from openxla/xla `xla/backends/gpu/target_config/specs/`, source named in
each file), the TPU product-name -> libtpu topology mapping, and the checks that the
compile-only plugins are installed at the versions this package was tested with.
Does not own: compiling the step or judging the result (compile.py, report.py).

GPU: the `jax-cuda12-plugin` + `jax-cuda12-pjrt` wheels at jaxlib's exact version (no CUDA
libraries, no GPU) give `get_topology_desc(platform="cuda", target_config=<spec>,
topology="1xHxD")` devices. TPU: `libtpu` gives `get_topology_desc("v5:4x4x4", "tpu")`.
Both run with JAX_PLATFORMS=cpu: the host's own backend stays the CPU.

Also owns the host side of compiling without the hardware: the simulated CPU device count
(`set_host_device_count`, JAX's `jax_num_cpu_devices`) and keeping the host's backend the CPU
(`compile_on_host`, JAX's `jax_platforms`), both through `jax.config` before the first backend
use. The plugins' native start-up notices are filtered by `console.quiet_native_stderr`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os
import re

from meditron_jax import console
from meditron_jax.errors import UserError

GIB = 2 ** 30
GPUS_PER_HOST = 8
# What the JAX family was tested with (pyproject's `plan` extra pins the same).
TESTED = {"jaxlib": "0.10.2", "jax-cuda12-plugin": "0.10.2", "jax-cuda12-pjrt": "0.10.2", "libtpu": "0.0.42.1"}
EXTRA = "pip install 'meditron-jax[plan]'"

# name -> (spec file, device kind the spec describes)
GPU_TARGETS = {
    "a100-80gb": "a100_sxm_80.txtpb",
    "a100-40gb": "a100_sxm_40.txtpb",
    "h100-80gb": "h100_sxm.txtpb",
    "h200": "h200.txtpb",
}
# JAX's GPU allocator takes this share of device memory unless XLA_PYTHON_CLIENT_MEM_FRACTION
# says otherwise (jax docs, "GPU memory allocation"); a plan compares against the same share.
DEFAULT_GPU_MEM_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class TpuFamily:
    libtpu: str  # libtpu's topology prefix
    dims: int  # 3D torus (v4, v5p) or 2D (v5e, v6e)
    cores_per_chip_in_name: int  # v4-N / v5p-N count TensorCores (2 per chip); v5e/v6e count chips
    devices_per_chip: int  # what libtpu 0.0.42.1's topology exposes (v4: one per core)
    hbm_limit_gib: float  # per device, the limit its compiler enforces (measured, libtpu 0.0.42.1)
    max_chips: int


# hbm_limit_gib measured here: a deliberately oversized compile on each topology fails with
# "exceeds available HBM (X)"; X is below the chip's nominal HBM (runtime reservations).
TPU_FAMILIES = {
    "v4": TpuFamily("v4", 3, 2, 2, 15.25, 4096),
    "v5p": TpuFamily("v5", 3, 2, 1, 95.74, 8192),
    "v5e": TpuFamily("v5e", 2, 1, 1, 15.75, 256),
    "v6e": TpuFamily("v6e", 2, 1, 1, 31.25, 256),
}


@dataclasses.dataclass
class Target:
    name: str
    platform: str  # cpu | gpu | tpu
    devices: list
    device_kind: str
    usable_bytes: int | None  # what a plan compares against (None: unknown, CPU)
    usable_note: str
    topology: str


def known_targets() -> str:
    return ("cpu, " + ", ".join(GPU_TARGETS) + ", " + ", ".join(f"{f}-N" for f in TPU_FAMILIES)
            + " (e.g. v5p-128, v5e-256, v6e-256, v4-128)")


def chip_topology(chips: int, dims: int) -> str:
    """Slice shape for a power-of-two chip count, as the TPU product table lays them out:
    3D 4 -> 2x2x1, 8 -> 2x2x2, 16 -> 2x2x4, 64 -> 4x4x4, 128 -> 4x4x8; 2D 1 -> 1x1,
    4 -> 2x2, 8 -> 2x4, 256 -> 16x16 (the smallest side doubles, the last one first)."""
    if chips < 1 or chips & (chips - 1):
        raise UserError(f"a TPU slice has a power-of-two number of chips, got {chips}")
    if chips == 1:
        return "x".join(["1"] * dims)
    if chips < 4:
        raise UserError(f"no TPU slice of {chips} chips (the smallest multi-chip slice has 4)")
    shape = [2, 2, 1] if dims == 3 else [2, 2]
    if dims == 3 and chips >= 8:
        shape = [2, 2, 2]
    while math.prod(shape) < chips:
        i = max(k for k in range(dims) if shape[k] == min(shape))
        shape[i] *= 2
    return "x".join(map(str, shape))


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _require(dists: list[str], what: str):
    jaxlib = _version("jaxlib")
    for d in dists:
        v = _version(d)
        if v is None:
            raise UserError(f"{what} needs {d} (compile-only, no accelerator needed): {EXTRA}")
        want = jaxlib if d.startswith("jax-cuda") else TESTED[d]
        if v != want:
            raise UserError(f"{what} needs {d}=={want} to match jaxlib {jaxlib}, found {v}: {EXTRA}")


def _gpu(name: str, devices: int | None, per_host: int | None = None) -> Target:
    _require(["jax-cuda12-plugin", "jax-cuda12-pjrt"], f"--target {name}")
    g = per_host or GPUS_PER_HOST
    n = g if devices is None else devices
    if g < 1 or n < 1 or (n > g and n % g):
        raise UserError(f"--devices {n}: {name} hosts have {g} GPUs each, so the device count must be "
                        f"at most {g} or a multiple of {g}")
    hosts, per_host = (1, n) if n <= g else (n // g, g)
    topology = f"1x{hosts}x{per_host}"
    path = os.path.join(os.path.dirname(__file__), GPU_TARGETS[name])
    with open(path) as f:
        spec = f.read()
    from jax.experimental import topologies
    with console.quiet_native_stderr():
        topo = topologies.get_topology_desc(platform="cuda", topology_name="", target_config=spec,
                                            topology=topology)
    devs = list(topo.devices)
    memory = int(re.search(r"device_memory_size:\s*(\d+)", spec).group(1))
    env = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    try:
        frac = float(env) if env else DEFAULT_GPU_MEM_FRACTION
    except ValueError:
        raise UserError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={env!r} is not a number") from None
    note = (f"{frac:.0%} of {memory / GIB:.1f} GiB "
            + ("(XLA_PYTHON_CLIENT_MEM_FRACTION)" if env else
               "(JAX's default GPU allocation; set XLA_PYTHON_CLIENT_MEM_FRACTION to plan for more)"))
    return Target(name, "gpu", devs, devs[0].device_kind, int(memory * frac), note, topology)


def _tpu(name: str, family: str, count: int | None, devices: int | None) -> Target:
    fam = TPU_FAMILIES[family]
    if count is None:
        if devices is None:
            raise UserError(f"--target {name} needs a size, e.g. {family}-128, or --devices N")
        chips = devices // fam.devices_per_chip
        if chips * fam.devices_per_chip != devices:
            raise UserError(f"--devices {devices}: {family} exposes {fam.devices_per_chip} devices per chip")
    else:
        if count % fam.cores_per_chip_in_name:
            raise UserError(f"--target {name}: {family}-N counts TensorCores, {fam.cores_per_chip_in_name} per chip; "
                            f"N must be a multiple of {fam.cores_per_chip_in_name}")
        chips = count // fam.cores_per_chip_in_name
    if chips > fam.max_chips:
        raise UserError(f"--target {name}: a {family} slice has at most {fam.max_chips} chips, asked for {chips}")
    topology = f"{fam.libtpu}:{chip_topology(chips, fam.dims)}"
    n = chips * fam.devices_per_chip
    if count is not None and devices is not None and devices != n:
        raise UserError(f"--devices {devices}: --target {name} is {n} devices ({topology}); leave --devices out")
    _require(["libtpu"], f"--target {name}")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no cloud metadata lookups: this is not a TPU VM
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chip to lock
    from jax.experimental import topologies
    with console.quiet_native_stderr():
        topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    devs = list(topo.devices)
    return Target(name, "tpu", devs, devs[0].device_kind, int(fam.hbm_limit_gib * GIB),
                  f"{fam.hbm_limit_gib} GiB HBM per device as its compiler enforces it", topology)


def resolve(name: str, devices: int | None, per_host: int | None = None) -> Target:
    """The target's compile-only devices (CPU: the host's simulated devices). `per_host`: GPUs
    per host (node) of a GPU target (default 8); the compile lays the mesh out on those hosts."""
    key = name.lower()
    if key == "cpu":
        import jax
        n = devices or jax.device_count()
        if jax.device_count() < n:
            raise UserError(f"--devices {n}: JAX is already initialised with {jax.device_count()} devices")
        devs = jax.devices()[:n]
        return Target("cpu", "cpu", devs, devs[0].device_kind, None, "XLA:CPU has no device memory limit", f"{n}")
    if key in GPU_TARGETS:
        return _gpu(key, devices, per_host)
    m = re.fullmatch(r"(v4|v5p|v5e|v6e)(?:-(\d+))?", key)
    if m:
        return _tpu(key, m.group(1), int(m.group(2)) if m.group(2) else None, devices)
    raise UserError(f"unknown --target {name!r}; known: {known_targets()}")


# ---- the host that compiles -------------------------------------------------------------------

def set_host_device_count(n: int | None):
    """`n` simulated CPU devices, and the CPU as the host's backend, if JAX has not started a
    backend yet; otherwise (JAX refuses the change) the live device count is checked when the
    target is resolved."""
    if n is None:
        return
    import jax
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # "should be updated before backends are initialized": too late, keep what runs
        return
    compile_on_host()


def compile_on_host():
    """The host's own backend is the CPU (it compiles for a target's devices and runs nothing);
    a no-op once a backend has started or the user chose the platforms."""
    import jax
    if not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")


def usable_bytes(name: str) -> int | None:
    """What a plan compares a device's memory against, without building the target's devices
    (`plan --search` prunes with it before compiling): as `resolve` computes it."""
    key = name.lower()
    if key in GPU_TARGETS:
        with open(os.path.join(os.path.dirname(__file__), GPU_TARGETS[key])) as f:
            memory = int(re.search(r"device_memory_size:\s*(\d+)", f.read()).group(1))
        env = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
        try:
            return int(memory * (float(env) if env else DEFAULT_GPU_MEM_FRACTION))
        except ValueError:
            raise UserError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={env!r} is not a number") from None
    m = re.fullmatch(r"(v4|v5p|v5e|v6e)(?:-\d+)?", key)
    if m:
        return int(TPU_FAMILIES[m.group(1)].hbm_limit_gib * GIB)
    return None
