"""Collectives, matmul FLOPs and the attention kernels of a compiled (after-optimizations) HLO module.

Owns: the collective records (kind, groups, mesh axes), their per-device byte accounting and
dot FLOPs, each weighted by how often its computation runs per step, and what the step does for
attention (`attention_report`: kernel custom calls, the largest T x S array). Does not own: reading
the HLO text and the loop trip counts (hlo_text.py, whose names are importable from here too),
compiling (compile.py), or what the parallelism should cost in theory (report.py compares).

Bytes per device, per execution (`bytes`: the buffer each device contributes; S below):
  all-reduce          wire 2 (n-1)/n S   (ring: reduce-scatter + all-gather)
  all-gather          wire (n-1) S       (S is the local piece; the result is n S)
  reduce-scatter      wire (n-1)/n S     (S is the full local input; the result is S / n)
  all-to-all          wire (n-1)/n S
  collective-permute  wire S x (share of devices that send)
  collective-broadcast wire S
n is the replica-group size. Async forms count once: `*-start` ops (their `*-done` is
skipped), and `async-start` through the computation it calls (which holds the collective).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterable

import numpy as np

from meditron_jax.plan.hlo_text import DTYPE_BYTES, Instr, Module, nbytes, parse, shapes

__all__ = ["COLLECTIVES", "DTYPE_BYTES", "Collective", "Instr", "Module", "assign_axes", "collectives",
           "dot_flops", "nbytes", "parse", "replica_groups", "shapes", "source_target_pairs", "summary"]

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute", "collective-broadcast")


def _iota(spec: str) -> np.ndarray:
    """XLA's iota tile assignment `[d0,d1]<=[r0,r1]T(p0,p1)` (or `[d0,d1]T(p)` / `[n]`)."""
    m = re.match(r"\[([\d,]+)\](?:<=\[([\d,]+)\])?(?:T\(([\d,]+)\))?", spec.strip())
    dims = [int(x) for x in m.group(1).split(",")]
    reshape = [int(x) for x in m.group(2).split(",")] if m.group(2) else list(dims)
    a = np.arange(math.prod(reshape)).reshape(reshape)
    if m.group(3):
        a = a.transpose([int(x) for x in m.group(3).split(",")])
    return a.reshape(dims)


def replica_groups(attrs: str, num_devices: int) -> list[list[int]]:
    """The device groups of a collective (logical device ids), in all three text forms."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(([^)]*\)?)\))? \{([^}]*)\}", attrs)
    if m:  # mesh form: mesh['a'=2,'b'=4], device_ids=(iota) {'a'}
        axes = [(a, int(n)) for a, n in re.findall(r"'(\w+)'=(\d+)", m.group(1))]
        dev = _iota(m.group(2)).reshape(-1) if m.group(2) else np.arange(math.prod(n for _, n in axes))
        dev = dev.reshape([n for _, n in axes])
        grouped = [a for a in re.findall(r"'(\w+)'", m.group(3))]
        gi = [i for i, (a, _) in enumerate(axes) if a in grouped]
        rest = [i for i in range(len(axes)) if i not in gi]
        arr = dev.transpose(rest + gi).reshape(-1, math.prod(axes[i][1] for i in gi) if gi else 1)
        return arr.tolist()
    m = re.search(r"replica_groups=(\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)", attrs)
    if m:
        return _iota(m.group(1)).tolist()
    m = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", attrs)
    if m and m.group(1):
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
    return [list(range(num_devices))]  # {} : one group of every device


def source_target_pairs(attrs: str) -> list[tuple[int, int]]:
    m = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", attrs)
    return [(int(a), int(b)) for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))] if m else []


@dataclasses.dataclass
class Collective:
    kind: str  # all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute, ...
    name: str
    dtype: str  # of the largest operand
    shape: list[tuple[int, ...]]  # operand shape(s), per device
    bytes: float  # operand bytes per device, one execution
    wire_bytes: float  # bytes each device sends, one execution (see the module docstring)
    trip_count_product: int  # executions per step
    trip_count_known: bool
    loop_depth: int  # while bodies around it (0: runs outside every loop)
    group_size: int
    replica_groups: list[list[int]]
    result_shape: list[tuple[int, ...]]
    result_bytes: float  # per device, one execution (an all-gather's n S, a reduce-scatter's S / n)
    op_name: str | None
    source: str | None
    axes: tuple[str, ...] | None = None  # mesh axes the groups span (`assign_axes`)

    @property
    def bytes_per_step(self) -> float:
        return self.bytes * self.trip_count_product

    @property
    def wire_bytes_per_step(self) -> float:
        return self.wire_bytes * self.trip_count_product


def _wire(kind: str, s: float, n: int, send_share: float) -> float:
    if n <= 1 and kind != "collective-permute":
        return 0.0
    if kind == "all-reduce":
        return 2 * (n - 1) / n * s
    if kind == "all-gather":
        return (n - 1) * s
    if kind in ("reduce-scatter", "all-to-all", "ragged-all-to-all"):
        return (n - 1) / n * s
    if kind == "collective-permute":
        return s * send_share
    return s  # collective-broadcast


def collectives(hlo, prefer_source=lambda path: "site-packages" not in path) -> list[Collective]:
    """Every collective of the compiled module, weighted by how often it runs per step.

    `hlo`: the module text or a parsed `Module`. Shapes and bytes are per device (the HLO is
    already partitioned)."""
    mod = hlo if isinstance(hlo, Module) else parse(hlo)
    mult, depth = mod.multiplicity(), mod.loop_depth()
    out = []
    for cname, instrs in mod.computations.items():
        count, known = mult.get(cname, (0, True))
        if count == 0:
            continue
        local = {i.name: i.shape for i in instrs}
        for ins in instrs:
            op = ins.opcode
            kind = op[:-len("-start")] if op.endswith("-start") else op
            if kind not in COLLECTIVES:
                continue
            operand_shapes = []
            for o in ins.operands:
                if o in local:
                    operand_shapes += shapes(local[o])
            result = shapes(ins.shape)
            if not operand_shapes:  # operands not found: the result has the same size
                operand_shapes = result
            if op.endswith("-start") and kind != "all-reduce":  # (operands, results[, context])
                result = result[len(operand_shapes):len(operand_shapes) * 2] or result
            s = nbytes(operand_shapes)
            if kind == "collective-permute":
                pairs = source_target_pairs(ins.attrs)
                groups = [[a, b] for a, b in pairs]
                senders = {a for a, b in pairs if a != b}
                n, share = 2, len(senders) / max(1, mod.num_partitions)
            else:
                groups = replica_groups(ins.attrs, mod.num_partitions)
                n, share = (len(groups[0]) if groups else 1), 1.0
            largest = max(operand_shapes, key=lambda x: DTYPE_BYTES[x[0]] * math.prod(x[1]))
            out.append(Collective(
                kind=kind, name=ins.name, dtype=largest[0], shape=[d for _, d in operand_shapes], bytes=s,
                wire_bytes=_wire(kind, s, n, share), trip_count_product=count, trip_count_known=known,
                loop_depth=depth.get(cname, 0), group_size=n, replica_groups=groups,
                result_shape=[d for _, d in result], result_bytes=nbytes(result),
                op_name=ins.metadata("op_name"), source=mod.source(ins, prefer_source)))
    return out


def assign_axes(records: Iterable[Collective], mesh_axes: dict[str, int]) -> None:
    """Set each record's `axes`: the mesh axes along which its groups' members differ.

    Logical device id i is the i-th device of the mesh in row-major order (how jit numbers
    the devices of a NamedSharding's mesh)."""
    names, dims = list(mesh_axes), [mesh_axes[a] for a in mesh_axes]
    for r in records:
        spanned = set()
        for g in r.replica_groups:
            coords = np.array([np.unravel_index(i, dims) for i in g if i < math.prod(dims)])
            if len(coords) > 1:
                spanned |= {names[k] for k in range(len(dims)) if len(set(coords[:, k])) > 1}
        r.axes = tuple(a for a in names if a in spanned)


def summary(records: Iterable[Collective]) -> dict:
    """Per kind (and per kind x mesh axes when assigned): executions, bytes and wire bytes per
    device per step."""
    by_kind, by_axes = {}, {}
    for r in records:
        for key, table in ((r.kind, by_kind), ((r.kind, "+".join(r.axes) if r.axes else "-"), by_axes)):
            e = table.setdefault(key, {"ops": 0, "executions": 0, "bytes": 0.0, "wire_bytes": 0.0})
            e["ops"] += 1
            e["executions"] += r.trip_count_product
            e["bytes"] += r.bytes_per_step
            e["wire_bytes"] += r.wire_bytes_per_step
    out = {"by_kind": by_kind}
    if any(r.axes is not None for r in records):
        out["by_kind_and_axes"] = {f"{k} over {a}": v for (k, a), v in by_axes.items()}
    return out


def dot_flops(hlo) -> tuple[float, int]:
    """(FLOPs per step of every dot and cuBLAS gemm, number of those ops); 2 x M x N x K each.

    A fallback where `compiled.cost_analysis()` gives nothing (GPU/TPU compile-only targets).
    Convolutions and attention custom calls (cuDNN) are not counted."""
    mod = hlo if isinstance(hlo, Module) else parse(hlo)
    mult = mod.multiplicity()
    total, n = 0.0, 0
    for cname, instrs in mod.computations.items():
        count = mult.get(cname, (0, True))[0]
        if count == 0:
            continue
        local = {i.name: i.shape for i in instrs}
        for ins in instrs:
            if ins.opcode == "dot":
                m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
            elif ins.opcode == "custom-call" and re.search(r'custom_call_target="__cublas\$(lt\$matmul|gemm)',
                                                           ins.attrs):
                m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.attrs)
            else:
                continue
            if m is None or not ins.operands or ins.operands[0] not in local:
                continue
            lhs = shapes(local[ins.operands[0]])
            out = shapes(ins.shape)
            if not lhs or not out:
                continue
            k = math.prod(lhs[0][1][int(x.strip('" '))] for x in m.group(1).split(",") if x.strip('" '))
            total += 2.0 * math.prod(out[0][1]) * k * count
            n += 1
    return total, n


# Custom-call targets of attention kernels: Pallas on TPU (Mosaic) and GPU (Triton), cuDNN.
ATTENTION_CALLS = ("tpu_custom_call", "__gpu$xla.gpu.triton", "__cudnn$fmha")


def attention_report(hlo, seq_len: int) -> dict:
    """What the compiled step does for attention, per device: the kernels it calls (custom-call
    target and kernel name, with how many call sites), the largest array with two dimensions of
    the sequence length (a T x S score, mask or bias buffer; None when there is none) and the
    largest array produced by the attention code (models/attention*.py) or a kernel call.
    `hlo`: the module text or a parsed `Module`."""
    mod = hlo if isinstance(hlo, Module) else parse(hlo)
    calls: dict[str, int] = {}
    found: dict[str, dict | None] = {"largest_seq_by_seq_array": None, "largest_attention_value": None}

    def keep(key, ins, dt, dims, size, src):
        if found[key] is None or size > found[key]["bytes"]:
            found[key] = {"bytes": size, "shape": f"{dt}[{','.join(map(str, dims))}]", "op": ins.opcode,
                          "source": src}

    for instrs in mod.computations.values():
        for ins in instrs:
            target = ins.metadata("custom_call_target") or "" if ins.opcode == "custom-call" else ""
            if target.startswith(ATTENTION_CALLS):
                # Mosaic names the call after its kernel; a Triton call is "pallas_call.N", its kernel
                # the innermost name in the op_name path's last part ("transpose(jvp(mha_backward))")
                path = [p for p in (ins.metadata("op_name") or "").split("/") if p and p != "pallas_call"]
                kernel = (re.findall(r"\w+", path[-1])[-1] if "pallas_call" in ins.name and path
                          else ins.name.rsplit(".", 1)[0])
                key = target if target.startswith("__cudnn") else f"{target} {kernel}"
                calls[key] = calls.get(key, 0) + 1
            for dt, dims in shapes(ins.shape):
                size = nbytes([(dt, dims)])
                if sum(d == seq_len for d in dims) >= 2:
                    keep("largest_seq_by_seq_array", ins, dt, dims, size, mod.source(ins))
                best = found["largest_attention_value"]
                if size and (best is None or size > best["bytes"]) and (
                        target.startswith(ATTENTION_CALLS) or "models/attention" in (mod.source(ins) or "")):
                    keep("largest_attention_value", ins, dt, dims, size, mod.source(ins))
    return {"kernel_calls": calls, **found}
