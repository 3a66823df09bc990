"""What each instruction of a compiled HLO module costs the device: matmul FLOPs and HBM bytes.

Owns: per-instruction FLOPs (dots, convolutions, cuBLAS GEMM calls, and attention kernels
that run as custom calls: cuDNN fused attention, Pallas / Triton on GPU, Mosaic on TPU) and
the bytes a fusion reads and writes (a parameter read only through a slice counts the slice; an
in-place dynamic-update-slice counts the update), for the step-time model (`plan.step_time`).
Does not own: parsing (`plan.hlo_text`), collectives (`plan.hlo_stats`), or turning FLOPs and
bytes into seconds (`plan.step_time`, with `plan.hardware`).

A custom call carries no dot for its attention: its FLOPs come from the kernel's own cost
estimate where it gives one in its backend_config (`"flops"`, as Mosaic kernels with a
`pl.CostEstimate` do), else from its operands' shapes: q [B, T, N, H] (or [B, N, T, H]), k with S
keys; a forward kernel runs 2 matmuls of 2 B N T S H FLOPs, a backward one 2 more per gradient it
returns (dq: 3 in all, dk + dv: 4, all three: 5), times 1/2 for the causal mask that flash
kernels skip block by block (the project's attention is always causal in training).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np

from meditron_jax.plan.hlo_text import Instr, Module, nbytes, shapes

ATTENTION_TARGETS = ("__cudnn$fmha", "__gpu$xla.gpu.triton", "tpu_custom_call", "mosaic", "__cudnn$flash")
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id", "replica-id",
        "opt-barrier", "add-dependency", "iota", "all-reduce-done", "all-gather-done", "reduce-scatter-done",
        "collective-permute-done", "async-done", "copy-done", "send-done", "recv-done", "domain",
        "get-dimension-size", "set-dimension-size", "optimization-barrier"}
CAUSAL = 0.5


@dataclasses.dataclass
class Cost:
    flops: float = 0.0  # matmul FLOPs (dots, convolutions, GEMM and attention calls)
    bytes: float = 0.0  # HBM bytes read + written
    kind: str = "memory"  # matmul | attention | memory | free
    dims: tuple = ()  # (M, N, K) of the largest GEMM (tiling efficiency)


def _local(instrs: list[Instr]) -> dict[str, Instr]:
    return {i.name: i for i in instrs}


def _called(ins: Instr) -> str | None:
    m = re.search(r"\bcalls=%?([\w.\-]+)", ins.attrs)
    return m.group(1) if m else None


def _dot(ins: Instr, local: dict[str, Instr]) -> tuple[float, tuple]:
    """(FLOPs, (M, N, K)) of a dot or a cuBLAS GEMM call; 2 x output elements x contraction."""
    if ins.opcode == "dot":
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
        b = re.search(r"lhs_batch_dims=\{([\d,]*)\}", ins.attrs)
    else:
        m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.attrs)
        b = re.search(r'"lhs_batch_dimensions":\[([^\]]*)\]', ins.attrs)
    if m is None or not ins.operands or ins.operands[0] not in local:
        return 0.0, ()
    lhs, out = shapes(local[ins.operands[0]].shape), shapes(ins.shape)
    if not lhs or not out:
        return 0.0, ()
    cdims = [int(x.strip('" ')) for x in m.group(1).split(",") if x.strip('" ')]
    bdims = [int(x.strip('" ')) for x in b.group(1).split(",") if x.strip('" ')] if b else []
    k = math.prod(lhs[0][1][d] for d in cdims)
    out_el = math.prod(out[0][1])
    batch = math.prod(lhs[0][1][d] for d in bdims) if bdims else 1
    mm = math.prod(lhs[0][1]) // max(1, k * batch)
    nn = out_el // max(1, mm * batch)
    return 2.0 * out_el * k, (mm * batch, nn, k)


def _conv(ins: Instr, local: dict[str, Instr]) -> tuple[float, tuple]:
    """A convolution (TPU writes its matmuls as convolutions): 2 x batch x output features x
    input features x the window taps that land on the input. The TPU compiler writes a dot's
    batch dimension (heads, say) as a spatial dimension whose window spans it over padding
    (`window={size=1x64 pad=0_0x63_63 rhs_reversal=0x1}` on an input of spatial size 1): each
    output position then meets one real input position, not 64; counting the whole window
    overcounted a 70B step's matmul FLOPs 6-7x."""
    m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
    if m is None or len(ins.operands) < 2 or ins.operands[0] not in local or ins.operands[1] not in local:
        return 0.0, ()
    lhs, rhs, out = (shapes(local[ins.operands[0]].shape), shapes(local[ins.operands[1]].shape), shapes(ins.shape))
    if not lhs or not rhs or not out:
        return 0.0, ()
    (ll, rl, ol), (ld, rd, od) = m.groups(), (lhs[0][1], rhs[0][1], out[0][1])
    if not (len(ll) == len(ld) and len(rl) == len(rd) and len(ol) == len(od)) or "i" not in rl or "o" not in rl:
        return 0.0, ()
    win = _window(ins.attrs)
    taps, spatial_out = 1, 1
    for d in sorted(c for c in rl if c.isdigit()):
        k = int(d)
        taps *= _valid_taps(ld[ll.index(d)], rd[rl.index(d)], od[ol.index(d)], k, win)
        spatial_out *= od[ol.index(d)]
    out_el = math.prod(od)
    per_out = rd[rl.index("i")] * taps / max(1, spatial_out)
    nn = rd[rl.index("o")]
    return 2.0 * out_el * per_out, (out_el // max(1, nn), nn, int(per_out))


def _window(attrs: str) -> dict:
    """`window={size=AxB pad=l_hxl_h stride=.. lhs_dilate=.. rhs_dilate=..}` as lists per
    spatial dimension."""
    m = re.search(r"window=\{([^}]*)\}", attrs)
    out = {}
    for part in (m.group(1).split() if m else []):
        key, _, val = part.partition("=")
        if key == "pad":
            out[key] = [tuple(int(x) for x in v.split("_")) for v in val.split("x")]
        elif key in ("size", "stride", "lhs_dilate", "rhs_dilate"):
            out[key] = [int(v) for v in val.split("x")]
    return out


def _valid_taps(n: int, w: int, o: int, k: int, win: dict) -> int:
    """Window taps, summed over the `o` output positions of spatial dimension `k`, that read one
    of the `n` real input positions (not padding, not a hole of lhs dilation)."""
    lo = win["pad"][k][0] if "pad" in win else 0
    s = win["stride"][k] if "stride" in win else 1
    ldil = win["lhs_dilate"][k] if "lhs_dilate" in win else 1
    rdil = win["rhs_dilate"][k] if "rhs_dilate" in win else 1
    if o * w > 1 << 24:  # too large to enumerate (not seen in a step): every tap, at most n
        return o * min(w, n)
    p = np.arange(o)[:, None] * s + np.arange(w)[None, :] * rdil - lo  # input position of each tap
    return int(np.count_nonzero((p >= 0) & (p % ldil == 0) & (p // ldil < n)))


def attention_flops(ins: Instr, local: dict[str, Instr]) -> float:
    """FLOPs of one attention custom call (see the module docstring); 0 if not attention-shaped."""
    est = re.search(r'\\?"flops\\?"\s*:\s*\\?"?(\d+)', ins.attrs)
    if est:
        return float(est.group(1))
    ops = [shapes(local[o].shape)[0][1] for o in ins.operands if o in local and shapes(local[o].shape)]
    four = [d for d in ops if len(d) == 4]
    if len(four) < 3:
        return 0.0
    q, k = four[0], four[1]
    H = q[-1]
    if k[-1] != H:
        return 0.0
    S = max(k[1], k[2])  # the keys' length: the larger of the two middle dims (T >> heads)
    per_matmul = 2.0 * math.prod(q) * S
    qkv_like = [d for d in four if d[-1] == H]
    outs = [d for _, d in shapes(ins.shape) if len(d) == 4 and d[-1] == H]
    backward = len(qkv_like) > 3 or "backward" in ins.attrs.lower() or "bwd" in ins.attrs.lower()
    matmuls = 2 + (len(outs) if backward else 0)
    return matmuls * per_matmul * CAUSAL


def _is_attention_call(ins: Instr) -> bool:
    m = re.search(r'custom_call_target="([^"]*)"', ins.attrs)
    return bool(m) and any(m.group(1).startswith(t) for t in ATTENTION_TARGETS)


class CostModel:
    """Per-instruction `Cost` over a parsed module, with each computation's matmul FLOPs cached."""

    def __init__(self, mod: Module):
        self.mod = mod
        self._flops: dict[str, tuple[float, tuple]] = {}

    def computation_flops(self, cname: str) -> tuple[float, tuple]:
        """Matmul FLOPs inside a fused computation (nested fusions included) and the largest
        GEMM's (M, N, K)."""
        if cname in self._flops:
            return self._flops[cname]
        self._flops[cname] = (0.0, ())
        instrs = self.mod.computations.get(cname, [])
        local = _local(instrs)
        total, dims, best = 0.0, (), 0.0
        for ins in instrs:
            f, d = self._op_flops(ins, local)
            total += f
            if f > best:
                best, dims = f, d
        self._flops[cname] = (total, dims)
        return self._flops[cname]

    def _op_flops(self, ins: Instr, local: dict[str, Instr]) -> tuple[float, tuple]:
        if ins.opcode == "dot":
            return _dot(ins, local)
        if ins.opcode == "convolution":
            return _conv(ins, local)
        if ins.opcode == "custom-call":
            if re.search(r'custom_call_target="__cublas\$(lt\$matmul|gemm)', ins.attrs):
                return _dot(ins, local)
            if _is_attention_call(ins):
                return attention_flops(ins, local), ()
        if ins.opcode == "fusion":
            sub = _called(ins)
            return self.computation_flops(sub) if sub else (0.0, ())
        return 0.0, ()

    def cost(self, ins: Instr, local: dict[str, Instr]) -> Cost:
        """The cost of one instruction of a scheduled (non-fused) computation."""
        op = ins.opcode
        if op in FREE or op.endswith("-done"):
            return Cost(kind="free")
        out_b = nbytes(shapes(ins.shape))
        in_b = sum(nbytes(shapes(local[o].shape)) for o in ins.operands if o in local)
        if op == "fusion":
            return self._fusion(ins, local)
        if op == "dynamic-update-slice":
            upd = nbytes(shapes(local[ins.operands[1]].shape)) if len(ins.operands) > 1 and ins.operands[1] in local else 0
            return Cost(bytes=2 * upd)
        if op in ("dynamic-slice", "slice", "gather"):
            return Cost(bytes=2 * out_b)
        if op in ("dot", "convolution") or (op == "custom-call" and not _is_attention_call(ins)):
            f, d = self._op_flops(ins, local)
            return Cost(flops=f, bytes=in_b + out_b, kind="matmul" if f else "memory", dims=d)
        if op == "custom-call":
            return Cost(flops=attention_flops(ins, local), bytes=in_b + out_b, kind="attention")
        if op == "copy-start":
            return Cost(bytes=2 * in_b)
        return Cost(bytes=in_b + out_b)

    def _fusion(self, ins: Instr, local: dict[str, Instr]) -> Cost:
        sub = _called(ins)
        body = self.mod.computations.get(sub, []) if sub else []
        f, dims = self.computation_flops(sub) if sub else (0.0, ())
        blocal = _local(body)
        users: dict[str, list[Instr]] = {}
        params: dict[int, Instr] = {}
        for b in body:
            for o in b.operands:
                users.setdefault(o, []).append(b)
            if b.opcode == "parameter":
                params[int(b.args.strip() or 0)] = b
        root = next((b for b in body if b.root), body[-1] if body else None)
        in_place = set()  # parameters a root dynamic-update-slice writes into (not read)
        out_b = 0.0
        roots = [blocal[o] for o in root.operands if o in blocal] if root is not None and root.opcode == "tuple" else [root]
        for r in roots:
            r = _skip_bitcasts_down(r, blocal)
            if r is None:
                continue
            if r.opcode == "dynamic-update-slice" and len(r.operands) > 1 and r.operands[1] in blocal:
                out_b += nbytes(shapes(blocal[r.operands[1]].shape))
                buf = _skip_bitcasts_down(blocal.get(r.operands[0]), blocal)
                if buf is not None:
                    in_place.add(buf.name)
            else:
                out_b += nbytes(shapes(r.shape))
        in_b = 0.0
        for j, o in enumerate(ins.operands):
            p = params.get(j)
            full = nbytes(shapes(local[o].shape)) if o in local else 0.0
            if p is None:
                in_b += full
                continue
            if p.name in in_place:
                continue
            reads = _sliced_reads(p.name, users)
            in_b += full if reads is None else min(full, reads)
        kind = "matmul" if f else "memory"
        return Cost(flops=f, bytes=in_b + out_b, kind=kind, dims=dims)


def _skip_bitcasts_down(ins: Instr | None, local: dict[str, Instr]) -> Instr | None:
    """Follow bitcasts from `ins` to the instruction whose value they rename."""
    while ins is not None and ins.opcode == "bitcast" and ins.operands and ins.operands[0] in local:
        ins = local[ins.operands[0]]
    return ins


def _sliced_reads(name: str, users: dict[str, list[Instr]]) -> float | None:
    """Bytes read of value `name` when every use (through bitcasts) slices it; None when some use
    reads it whole."""
    total = 0.0
    for u in users.get(name, []):
        if u.opcode == "bitcast":
            sub = _sliced_reads(u.name, users)
            if sub is None:
                return None
            total += sub
        elif u.opcode in ("dynamic-slice", "slice", "gather") and u.operands and u.operands[0] == name:
            total += nbytes(shapes(u.shape))
        else:
            return None
    return total if users.get(name) else None


def backend_config(ins: Instr) -> dict:
    """The instruction's backend_config JSON ({} when absent or unreadable)."""
    i = ins.attrs.find("backend_config=")
    if i < 0:
        return {}
    s = ins.attrs[i + len("backend_config="):]
    if not s.startswith("{"):
        return {}
    depth = 0
    for j, c in enumerate(s):
        depth += (c == "{") - (c == "}")
        if depth == 0:
            try:
                return json.loads(s[:j + 1])
            except ValueError:
                return {}
    return {}
