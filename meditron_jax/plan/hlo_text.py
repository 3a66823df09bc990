"""Parse a compiled (after-optimizations) HLO module's text, and how often each computation runs.

Owns: a small parser for XLA's HLO text (`compiled.as_text()`, or the
`*after_optimizations.txt` files of `--xla_dump_to`): computations, instructions, shapes and
their byte sizes, the source-location tables, and the call graph with while-loop trip counts.
What the instructions cost (collectives, FLOPs) is `hlo_stats.py`.

How often an instruction runs per step: a computation's multiplicity is the sum over its
call sites of the caller's multiplicity, times `known_trip_count` (from the while's
backend_config, or read off the loop condition where there is none, as on TPU) for a while
body. A while without a known trip count counts once and is reported as not known. Its loop
depth is the most while bodies around it on any call path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys

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
    _mult: dict[str, tuple[int, bool, int]] | None = None

    def shape_of(self, computation: str) -> dict[str, str]:
        return {i.name: i.shape for i in self.computations[computation]}

    def multiplicity(self) -> dict[str, tuple[int, bool]]:
        """computation -> (runs per call of the entry, every enclosing trip count known)."""
        if self._mult is None:
            self._mult = _multiplicity(self)
        return {c: (n, known) for c, (n, known, _) in self._mult.items()}

    def loop_depth(self) -> dict[str, int]:
        """computation -> how many while bodies enclose it (the most over its call paths;
        0: outside every loop)."""
        if self._mult is None:
            self._mult = _multiplicity(self)
        return {c: d for c, (_, _, d) in self._mult.items()}

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
        if line.rstrip() == "}":  # not "}}, metadata=...": the rest of a multi-line instruction
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


def _multiplicity(mod: Module) -> dict[str, tuple[int, bool, int]]:
    """computation -> (runs per call of the entry, all trip counts known, loop depth)."""
    callers: dict[str, list[tuple[str, int, bool, bool]]] = {}
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
                callers.setdefault(callee, []).append((cname, trip if is_body else 1, known or not is_body, is_body))
    memo: dict[str, tuple[int, bool, int]] = {mod.entry: (1, True, 0)}

    def visit(c):
        if c in memo:
            return memo[c]
        memo[c] = (0, True, 0)  # guards against cycles (none in valid HLO)
        total, ok, depth = 0, True, 0
        for parent, factor, known, is_body in callers.get(c, []):
            pm, pk, pd = visit(parent)
            total += pm * factor
            ok = ok and pk and known
            depth = max(depth, pd + is_body)
        memo[c] = (total, ok, depth)
        return memo[c]

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
