"""The hardware facts the step-time model (`plan.step_time`) runs on, each with its source.

Owns: per-device peak dense bf16 FLOP/s, HBM bandwidth, the links a collective can take (NVLink
through NVSwitch inside a GPU node, the node's network cards between nodes; TPU ICI ports of a
torus slice, DCN between slices), the efficiencies and latencies the model assumes for them,
and `System`: a target's devices grouped into nodes with the user's network (`--nodes`,
`--gpus_per_node`, `--node_network_gbps`, `--system meditron`). Does not own: the compile-only
devices (`plan.targets`) or the time model (`plan.step_time`).

Bandwidths are per device and per direction (what a ring collective's wire bytes move at).
Sources (vendor data sheets and product pages, read 2026-12-06):
  [A100]  NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS dense (624 with sparsity),
          A100 80GB SXM HBM2e 2,039 GB/s, NVLink 600 GB/s.
          https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
  [H100]  NVIDIA H100 Tensor Core GPU datasheet: H100 SXM BF16 1,979 TFLOPS with sparsity (989.4
          dense), HBM3 3.35 TB/s, NVLink 900 GB/s. https://www.nvidia.com/en-us/data-center/h100/
  [H200]  NVIDIA H200 product page: 141 GB HBM3e, 4.8 TB/s, NVLink 900 GB/s, same Hopper SMs as
          H100 SXM. https://www.nvidia.com/en-us/data-center/h200/
  [DGXA]  DGX A100 User Guide, hardware overview: 8 single-port ConnectX-6 (200 Gb/s HDR
          InfiniBand) for the compute fabric, one per GPU; 6 NVSwitches.
          https://docs.nvidia.com/dgx/dgxa100-user-guide/introduction-to-dgxa100.html
  [DGXH]  DGX H100 User Guide: 8 single-port ConnectX-7 (400 Gb/s NDR InfiniBand), one per GPU;
          4 NVSwitches. https://docs.nvidia.com/dgx/dgxh100-user-guide/introduction-to-dgxh100.html
  [CX6DX] ConnectX-6 Dx: "two ports of 10/25/40/50/100Gb/s or a single port of 200Gb/s" (200 Gb/s
          per card at most). https://docs.nvidia.com/networking/display/connectx6dxenocp3/interfaces
  [MED]   Meditron (Chen et al. 2023, arXiv:2311.16079, section 4 "Training setup"): nodes of
          8 x A100-SXM4-80GB linked by NVLink/NVSwitch, one ConnectX-6 Dx network card per node.
  [V5P]   Cloud TPU v5p: 459 TFLOPs bf16, HBM2e 95 GB 2,765 GB/s, ICI 1,200 GB/s bidirectional
          per chip, 3D torus (6 ports), DCN 50 Gb/s per chip. https://cloud.google.com/tpu/docs/v5p
  [V5E]   Cloud TPU v5e: 197 TFLOPs, 819 GB/s, ICI 400 GB/s bidirectional per chip, 4 ports, 2D
          torus, 8 chips and 2 x 100 Gb/s NICs per host. https://cloud.google.com/tpu/docs/v5e
  [V6E]   Cloud TPU v6e: 918 TFLOPs, 1,638 GB/s, ICI 800 GB/s bidirectional per chip, 4 ports,
          2D torus, 8 chips per host. https://cloud.google.com/tpu/docs/v6e
  [V4]    Cloud TPU v4: 275 TFLOPs per chip (2 TensorCores), HBM2 1,200 GB/s, 3D torus;
          https://cloud.google.com/tpu/docs/v4. ICI 6 links x 50 GB/s per direction per chip:
          Jouppi et al., "TPU v4", ISCA 2023 (arXiv:2304.01433), section 2.
"""

from __future__ import annotations

import dataclasses
import math

from meditron_jax.errors import UserError

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Chip:
    """One device's facts. `fast_link`: per-direction bandwidth to a device of the same node
    (GPU: NVLink through NVSwitch) or, on TPU, of one ICI port; `node_network`: the network
    cards of one node (GPU) or one chip's DCN share (TPU), per direction."""
    name: str
    platform: str  # gpu | tpu
    peak_flops: float  # dense bf16 FLOP/s per device
    hbm_bandwidth: float  # bytes/s per device
    fast_link: float  # bytes/s per direction
    node_network: float  # bytes/s per direction: GPU per node, TPU per chip (DCN)
    sources: str
    sm_count: int = 0  # GPU: streaming multiprocessors (wave quantization of a GEMM)
    mxu: int = 128  # TPU: systolic array side (a GEMM dimension is padded to a multiple of it)
    torus_ports: int = 0  # TPU: ICI ports per chip (3D torus 6, 2D torus 4)
    devices_per_chip: int = 1


def _gbps(x: float) -> float:
    return x * 1e9 / 8


CHIPS = {
    "a100": Chip("A100-SXM4-80GB", "gpu", 312e12, 2039 * GB, 300 * GB, 8 * _gbps(200),
                 "[A100] [DGXA]", sm_count=108),
    "a100-40": Chip("A100-SXM4-40GB", "gpu", 312e12, 1555 * GB, 300 * GB, 8 * _gbps(200),
                    "[A100] (40GB: 1,555 GB/s) [DGXA]", sm_count=108),
    "h100": Chip("H100-SXM5-80GB", "gpu", 989.4e12, 3350 * GB, 450 * GB, 8 * _gbps(400),
                 "[H100] [DGXH]", sm_count=132),
    "h200": Chip("H200-SXM-141GB", "gpu", 989.4e12, 4800 * GB, 450 * GB, 8 * _gbps(400),
                 "[H200] [DGXH]", sm_count=132),
    "v5p": Chip("TPU v5p", "tpu", 459e12, 2765 * GB, 1200 * GB / 12, _gbps(50), "[V5P]",
                mxu=128, torus_ports=6),
    "v5e": Chip("TPU v5e", "tpu", 197e12, 819 * GB, 400 * GB / 8, 2 * _gbps(100) / 8, "[V5E]",
                mxu=128, torus_ports=4),
    "v6e": Chip("TPU v6e", "tpu", 918e12, 1638 * GB, 800 * GB / 8, 2 * _gbps(100) / 8,
                "[V6E] (DCN per chip taken as v5e's: 2 x 100 Gb/s per host of 8)", mxu=256, torus_ports=4),
    "v4": Chip("TPU v4", "tpu", 275e12 / 2, 1200 * GB / 2, 50 * GB / 2, _gbps(50) / 2,
               "[V4] (per TensorCore device: half a chip)", mxu=128, torus_ports=6, devices_per_chip=2),
}
TARGET_CHIP = {"a100-80gb": "a100", "a100-40gb": "a100-40", "h100-80gb": "h100", "h200": "h200",
               "v5p": "v5p", "v5e": "v5e", "v6e": "v6e", "v4": "v4"}


@dataclasses.dataclass(frozen=True)
class Efficiency:
    """What the model assumes the software reaches of the peaks (docs/planning.md says why).

    matmul: large bf16 GEMMs (cuBLAS / XLA's Triton GEMMs on GPU, the MXU on TPU) as a share
    of the dense peak; memory: streaming fusions as a share of HBM bandwidth; fast_link /
    network: NCCL's (or the TPU runtime's) bus bandwidth as a share of the link's rate; the
    latencies are per collective (`launch`) and per ring hop; `kernel`: the fixed cost of one
    kernel launch (GPU; a TPU program has none per op)."""
    matmul: float
    memory: float = 0.85
    fast_link: float = 0.80
    network: float = 0.90
    launch: float = 8e-6
    hop_fast: float = 0.7e-6
    hop_network: float = 5e-6
    kernel: float = 2e-6


EFFICIENCY = {"gpu": Efficiency(matmul=0.80),
              "tpu": Efficiency(matmul=0.90, memory=0.90, fast_link=0.85, network=0.85, launch=2e-6,
                                hop_fast=1e-6, hop_network=10e-6, kernel=0.0)}
# The A100's cuBLAS reaches a larger share of its (lower) peak than the H100's (power-capped
# at its 700 W, H100 GEMMs run near 0.7-0.8 of 989 TFLOP/s).
CHIP_MATMUL = {"a100": 0.88, "a100-40": 0.88, "h100": 0.75, "h200": 0.78}

SYSTEMS = {"dgx": "one network card per GPU ([DGXA] / [DGXH]; the vendor's reference node)",
           "meditron": "the Meditron card's node: 8 x A100-SXM4-80GB, NVSwitch, one ConnectX-6 Dx "
                       "(200 Gb/s) for the node ([MED], [CX6DX])"}


@dataclasses.dataclass(frozen=True)
class System:
    """A target's devices as the network sees them. `node_of[i]`: the node (GPU) or slice
    (TPU) of mesh position i; `coords[i]`: a TPU chip's torus coordinates (None on GPU)."""
    chip: Chip
    eff: Efficiency
    nodes: int
    per_node: int
    node_network: float  # bytes/s per direction, per node (GPU) or per chip (TPU)
    node_of: tuple
    coords: tuple | None
    torus: tuple | None  # TPU slice shape in chips
    note: str

    def describe(self) -> dict:
        c = self.chip
        out = {"chip": c.name, "peak_bf16_tflops": c.peak_flops / 1e12, "hbm_gb_s": c.hbm_bandwidth / GB,
               "nodes": self.nodes, "devices_per_node": self.per_node, "sources": c.sources, "note": self.note,
               "efficiency": dataclasses.asdict(self.eff)}
        if c.platform == "gpu":
            out["nvlink_gb_s_per_direction"] = c.fast_link / GB
            out["node_network_gbit_s"] = self.node_network * 8 / 1e9
        else:
            out["ici_port_gb_s_per_direction"] = c.fast_link / GB
            out["torus"] = "x".join(map(str, self.torus)) if self.torus else None
            out["dcn_gbit_s_per_chip"] = self.node_network * 8 / 1e9
        return out


def chip_for(target_name: str) -> Chip:
    key = target_name.lower()
    fam = key.split("-")[0] if key.startswith("v") else key
    if fam not in TARGET_CHIP:
        raise UserError(f"no hardware facts for --target {target_name} (step time is predicted for "
                        f"{', '.join(TARGET_CHIP)})")
    return CHIPS[TARGET_CHIP[fam]]


def efficiency(chip_key: str, platform: str) -> Efficiency:
    e = EFFICIENCY[platform]
    return dataclasses.replace(e, matmul=CHIP_MATMUL[chip_key]) if chip_key in CHIP_MATMUL else e


def system(target_name: str, mesh_devices, node_network_gbps: float | None = None, system_name: str = "dgx",
           slices: int = 1) -> System:
    """The target's `System` for the mesh's devices (`mesh.devices.flat`, logical id order).

    GPU: a device's node is its compile host (`plan.targets` compiles `--gpus_per_node` devices
    per host), the node's network `node_network_gbps` (Gb/s per direction; default: the reference
    system's). TPU: one slice unless `slices` > 1 (devices split in id order), ICI inside a
    slice along the chips' torus coordinates."""
    chip = chip_for(target_name)
    key = TARGET_CHIP[target_name.lower().split("-")[0] if target_name.lower().startswith("v") else target_name.lower()]
    devs = list(mesh_devices)
    if system_name not in SYSTEMS:
        raise UserError(f"unknown --system {system_name!r}; known: {', '.join(SYSTEMS)}")
    if chip.platform == "gpu":
        if system_name == "meditron" and key != "a100":
            raise UserError("--system meditron is the card's 8 x A100-SXM4-80GB node: use --target a100-80gb")
        default_net = _gbps(200) if system_name == "meditron" else chip.node_network
        net = _gbps(node_network_gbps) if node_network_gbps else default_net
        hosts = sorted({getattr(d, "process_index", 0) for d in devs})
        node_of = tuple(hosts.index(getattr(d, "process_index", 0)) for d in devs)
        per_node = len(devs) // len(hosts)
        note = SYSTEMS[system_name] if not node_network_gbps else f"node network {node_network_gbps:g} Gb/s (--node_network_gbps)"
        return System(chip, efficiency(key, "gpu"), len(hosts), per_node, net, node_of, None, None, note)
    if slices < 1 or len(devs) % slices:
        raise UserError(f"--slices {slices} does not divide the {len(devs)} devices")
    order = sorted(range(len(devs)), key=lambda i: devs[i].id)
    per = len(devs) // slices
    node_of = [0] * len(devs)
    for rank, i in enumerate(order):
        node_of[i] = rank // per
    coords = tuple(tuple(getattr(d, "coords", (i, 0, 0))) for i, d in enumerate(devs))
    torus = tuple(max(c[k] for c in coords) + 1 for k in range(len(coords[0])))
    net = _gbps(node_network_gbps) if node_network_gbps else chip.node_network
    note = f"one slice ({'x'.join(map(str, torus))} chips)" if slices == 1 else f"{slices} slices over DCN"
    return System(chip, efficiency(key, "tpu"), slices, per, net, tuple(node_of), coords, torus, note)


def link_for_group(sysm: System, group: list[int]) -> tuple[float, int, int, str]:
    """(bus bandwidth bytes/s per direction, hops on the fast links, hops on the network, name)
    of a ring collective over `group` (logical device ids), while every other group of the same
    collective runs at the same time (SPMD).

    GPU: inside one node NVLink; across k nodes with g members each, the node's network cards
    are shared by the node's per_node / g groups, and a ring (NCCL's, one channel per card)
    sends every byte once through them: bus bandwidth min(NVLink, node network x g / per_node).
    TPU: inside a slice the ICI ports along the torus axes the group spans (both directions of
    each); across slices the chips' DCN share x g."""
    c, e = sysm.chip, sysm.eff
    g_nodes: dict[int, int] = {}
    for i in group:
        g_nodes[sysm.node_of[i]] = g_nodes.get(sysm.node_of[i], 0) + 1
    k, g = len(g_nodes), max(g_nodes.values())
    n = len(group)
    if c.platform == "gpu":
        fast = c.fast_link * e.fast_link
        if k == 1:
            return fast, n - 1, 0, "nvlink"
        net = sysm.node_network * e.network * g / sysm.per_node
        return min(fast, net), n - k, k, "network"
    dims = 0
    if sysm.coords is not None:
        pts = [sysm.coords[i] for i in group]
        dims = sum(1 for d in range(len(pts[0])) if len({p[d] for p in pts}) > 1)
    ici = max(1, dims) * 2 * c.fast_link * e.fast_link
    if n > 1 and dims == 0:  # TensorCores of one chip (v4): on-chip
        ici = c.hbm_bandwidth * e.memory
    if k == 1:
        return ici, n - 1, 0, "ici"
    return min(ici, sysm.node_network * e.network * g), n - k, k, "dcn"


def ring_hops(kind: str, n: int) -> float:
    """Ring steps of one collective over n devices (latency term)."""
    if kind == "all-reduce":
        return 2.0 * (n - 1)
    if kind in ("all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all"):
        return float(n - 1)
    return 1.0


def gemm_efficiency(chip: Chip, m: int, n: int, k: int) -> float:
    """Share of the matmul rate a GEMM of this shape can reach from its tiling alone.

    GPU: 128 x 256 output tiles spread over the SMs in waves: efficiency = tiles / (waves x
    SMs) x useful share of the padded tiles. TPU: every dimension padded to the MXU side."""
    if chip.platform == "gpu" and chip.sm_count:
        tm, tn = (128, 256) if m >= n else (256, 128)
        tiles = math.ceil(m / tm) * math.ceil(n / tn)
        waves = math.ceil(tiles / chip.sm_count)
        pad = (m * n) / (math.ceil(m / tm) * tm * math.ceil(n / tn) * tn)
        kpad = k / (math.ceil(k / 64) * 64)
        return tiles / (waves * chip.sm_count) * pad * kpad
    t = chip.mxu
    eff = 1.0
    for d in (m, n, k):
        eff *= d / (math.ceil(d / t) * t)
    return eff
