"""Read a compiled (after-optimizations) HLO module's text: collectives and matmul FLOPs per step.

Owns: a small parser for XLA's HLO text (`compiled.as_text()`, or the
`*after_optimizations.txt` files of `--xla_dump_to`), the call graph with while-loop trip
counts, the collective records, their per-device byte accounting, dot FLOPs, and resolving an
instruction's metadata to a source line. Does not own: compiling (plan.py) or what the
parallelism should cost in theory (plan.py compares).

How often an instruction runs per step: a computation's multiplicity is the sum over its
call sites of the caller's multiplicity, times `known_trip_count` (from the while's
backend_config) for a while body. A while without a known trip count counts once and its
records say `trip_count_known=False`.

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
import json
import math
import re
from typing import Iterable

import numpy as np

DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
    "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5, "s2": 0.25,
    "u2": 0.25, "s1": 0.125, "u1": 0.125, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1,
    "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1, "f8e3m4": 1, "f8e8m0fnu": 1, "f4e2m1fn": 0.5, "token": 0,
}
_SHAPE_RE = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True)) + r")\[([0-9,]*)\]")
_CALLED_RE = re.compile(r"\b(?:body|condition|to_apply|calls|true_computation|false_computation|"
                        r"branch_computations|called_computations|scatter|select)=(\{[^}]*\}|%?[\w.\-]+)")
_TRIP_RE = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute", "collective-broadcast")


@dataclasses.dataclass
class Instr:
    name: str
    shape: str  # the result shape text, e.g. "bf16[2,4]{1,0}" or "(f32[], f32[3])"
    opcode: str
    operands: list[str]
    attrs: str  # everything after the operand list
    root: bool = False
    args: str = ""  # the raw operand list (a constant's literal)

    def metadata(self, key: str) -> str | None:
        m = re.search(key + r'=("(?:[^"\\]|\\.)*"|[^ ,}]+)', self.attrs)
        if m is None:
            return None
        v = m.group(1)
        return re.sub(r"\\(.)", r"\1", v[1:-1]) if v.startswith('"') else v


@dataclasses.dataclass
class Module:
    name: str
    entry: str
    computations: dict[str, list[Instr]]
    num_partitions: int
    files: dict[int, str]
    functions: dict[int, str]
    locations: dict[int, tuple[int, int, int]]  # id -> (file id, function id, line)
    frames: dict[int, tuple[int, int]]  # id -> (location id, parent frame id or 0)
    _mult: dict[str, tuple[int, bool]] | None = None

    def shape_of(self, computation: str) -> dict[str, str]:
        return {i.name: i.shape for i in self.computations[computation]}

    def multiplicity(self) -> dict[str, tuple[int, bool]]:
        """computation -> (runs per call of the entry, every enclosing trip count known)."""
        if self._mult is None:
            self._mult = _multiplicity(self)
        return self._mult

    def source(self, instr: Instr, prefer=lambda path: "site-packages" not in path) -> str | None:
        """`file:line (function)` of the instruction: the innermost stack frame whose file
        `prefer` accepts (the project's code, by default), else the innermost one."""
        fid = instr.metadata("stack_frame_id")
        if fid is not None:
            chain, f = [], int(fid)
            while f and f in self.frames and len(chain) < 64:
                chain.append(self.frames[f][0])
                f = self.frames[f][1]
            hits = [loc for loc in chain if loc in self.locations]
            for loc in hits:
                file_id, func_id, line = self.locations[loc]
                if prefer(self.files.get(file_id, "")):
                    return f"{self.files.get(file_id, '?')}:{line} ({self.functions.get(func_id, '?')})"
            if hits:
                file_id, func_id, line = self.locations[hits[0]]
                return f"{self.files.get(file_id, '?')}:{line} ({self.functions.get(func_id, '?')})"
        src, line = instr.metadata("source_file"), instr.metadata("source_line")
        return f"{src}:{line}" if src else None


def _balanced(s: str, i: int) -> int:
    """Index just past the bracket group opening at s[i] ('(' or '{')."""
    open_, close = s[i], {"(": ")", "{": "}", "[": "]"}[s[i]]
    depth, j = 0, i
    while j < len(s):
        c = s[j]
        if c == '"':  # skip strings (metadata may hold brackets)
            j += 1
            while j < len(s) and s[j] != '"':
                j += 2 if s[j] == "\\" else 1
        elif c == open_:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return len(s)


_INSTR_HEAD = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*")


def _parse_instr(line: str) -> Instr | None:
    m = _INSTR_HEAD.match(line)
    if m is None:
        return None
    i = m.end()
    if i < len(line) and line[i] == "(":
        j = _balanced(line, i)
    else:
        j = line.find(" ", i)
        if j < 0:
            return None
    shape = line[i:j]
    rest = line[j:].lstrip()
    k = rest.find("(")
    if k <= 0:
        return None
    opcode = rest[:k].strip()
    end = _balanced(rest, k)
    operands = re.findall(r"%([\w.\-]+)", rest[k:end])
    return Instr(m.group(2), shape, opcode, operands, rest[end:], root=bool(m.group(1)), args=rest[k + 1:end - 1])


def parse(text: str) -> Module:
    """Parse an HLO module's text (one module)."""
    comps: dict[str, list[Instr]] = {}
    entry, cur, name = None, None, "?"
    files, functions, locations, frames = {}, {}, {}, {}
    table = None
    num_partitions = 1
    for line in text.splitlines():
        if line.startswith("HloModule "):
            name = line.split()[1].rstrip(",")
            m = re.search(r"num_partitions=(\d+)", line)
            num_partitions = int(m.group(1)) if m else 1
            continue
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            table, cur = line, None
            continue
        if table is not None and line and line[0].isdigit():
            k, _, v = line.partition(" ")
            if table == "FileNames":
                files[int(k)] = json.loads(v)
            elif table == "FunctionNames":
                functions[int(k)] = json.loads(v)
            elif table == "FileLocations":
                f = dict(re.findall(r"(\w+)=(\d+)", v))
                locations[int(k)] = (int(f.get("file_name_id", 0)), int(f.get("function_name_id", 0)),
                                     int(f.get("line", 0)))
            else:  # parent_frame_id is printed one-based (0: no parent)
                f = dict(re.findall(r"(\w+)=(\d+)", v))
                frames[int(k)] = (int(f.get("file_location_id", 0)), max(0, int(f.get("parent_frame_id", 0)) - 1))
            continue
        if line.endswith("{") and not line.startswith(" ") and ("->" in line or line.startswith("ENTRY")):
            head = line.split()
            is_entry = head[0] == "ENTRY"
            cur = (head[1] if is_entry else head[0]).lstrip("%")
            comps[cur] = []
            if is_entry:
                entry = cur
            table = None
            continue
        if line.startswith("}"):
            cur = None
            continue
        if cur is not None:
            ins = _parse_instr(line)
            if ins is not None:
                comps[cur].append(ins)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return Module(name, entry, comps, num_partitions, files, functions, locations, frames)


def _called(ins: Instr) -> list[str]:
    out = []
    for v in _CALLED_RE.findall(ins.attrs):
        out += [n.lstrip("%") for n in re.findall(r"%?([\w.\-]+)", v)]
    return out


def _constant(ins: Instr | None) -> int | None:
    if ins is None or ins.opcode != "constant":
        return None
    return int(ins.args) if re.fullmatch(r"-?\d+", ins.args.strip()) else None


def _trip_from_condition(mod: Module, loop: Instr, caller: list[Instr]) -> tuple[int, bool] | None:
    """Trip count of a while whose backend_config does not carry one (e.g. TPU): the condition
    `compare(get-tuple-element(param, k), constant(N)), direction=LT` with the loop's tuple
    operand k a constant I gives N - I. (N, False) when I is not a visible constant."""
    cm = re.search(r"\bcondition=%?([\w.\-]+)", loop.attrs)
    if cm is None or cm.group(1) not in mod.computations:
        return None
    cond = mod.computations[cm.group(1)]
    local = {i.name: i for i in cond}
    root = next((i for i in cond if i.root), cond[-1] if cond else None)
    if root is None or root.opcode != "compare" or "direction=LT" not in root.attrs or len(root.operands) != 2:
        return None
    gte, bound = local.get(root.operands[0]), _constant(local.get(root.operands[1]))
    if gte is None or gte.opcode != "get-tuple-element" or bound is None:
        return None
    k = int(re.search(r"index=(\d+)", gte.attrs).group(1))
    in_caller = {i.name: i for i in caller}
    init_tuple = in_caller.get(loop.operands[0]) if loop.operands else None
    init = None
    if init_tuple is not None and init_tuple.opcode == "tuple" and k < len(init_tuple.operands):
        init = _constant(in_caller.get(init_tuple.operands[k]))
    return (bound - init, True) if init is not None else (bound, False)


def _multiplicity(mod: Module) -> dict[str, tuple[int, bool]]:
    callers: dict[str, list[tuple[str, int, bool]]] = {}
    for cname, instrs in mod.computations.items():
        for ins in instrs:
            trip, known = 1, True
            if ins.opcode == "while":
                m = _TRIP_RE.search(ins.attrs)
                inferred = None if m else _trip_from_condition(mod, ins, instrs)
                trip, known = (int(m.group(1)), True) if m else inferred if inferred else (1, False)
            body = re.search(r"\bbody=%?([\w.\-]+)", ins.attrs) if ins.opcode == "while" else None
            for callee in _called(ins):
                is_body = body is not None and callee == body.group(1)
                callers.setdefault(callee, []).append((cname, trip if is_body else 1, known or not is_body))
    memo: dict[str, tuple[int, bool]] = {mod.entry: (1, True)}

    def visit(c, depth=0):
        if c in memo:
            return memo[c]
        memo[c] = (0, True)  # guards against cycles (none in valid HLO)
        total, ok = 0, True
        for parent, factor, known in callers.get(c, []):
            pm, pk = visit(parent, depth + 1)
            total += pm * factor
            ok = ok and pk and known
        memo[c] = (total, ok)
        return memo[c]

    import sys
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 10000))
    try:
        for c in mod.computations:
            visit(c)
    finally:
        sys.setrecursionlimit(old)
    return memo


def shapes(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """All array shapes in a (possibly tuple) shape text, as (dtype, dims)."""
    return [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _SHAPE_RE.findall(shape_text)]


def nbytes(shape_list) -> float:
    return sum(DTYPE_BYTES[d] * math.prod(dims) for d, dims in shape_list)


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
    group_size: int
    replica_groups: list[list[int]]
    result_shape: list[tuple[int, ...]]
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
    mult = mod.multiplicity()
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
            if op.endswith("-start") and kind == "collective-permute":
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
                group_size=n, replica_groups=groups, result_shape=[d for _, d in result],
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
