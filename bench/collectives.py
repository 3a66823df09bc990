"""Collective bytes of a compiled step, weighted by loop trip counts (optimized HLO text).

Usage as a library: `collectives(hlo_text, mesh)` -> list of dicts
  {op, dtype, bytes (result, per device), groups (device-id tuples), trips (product of the
   known trip counts of the while loops around it), depth (how many loops), axes (mesh axes
   its groups span)}.
The HLO is what `jax.jit(...).lower(...).compile().as_text()` returns; async pairs are
counted once (at their `-start`), and collectives inside a called computation (fusion,
async wrapper, loop body) inherit the loops of their callers.
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np

COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}

_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_SHAPE = re.compile(r"\b(f32|bf16|f16|s32|u32|pred|s8|u8|f64|s64)\[([\d,]*)\]")


def _computations(text):
    comps, cur, entry = {}, None, None
    for line in text.splitlines():
        if cur is None:
            m = _COMP.match(line)
            if m and ("->" in line or line.startswith("ENTRY")):
                cur = m.group(1)
                comps[cur] = []
                if line.startswith("ENTRY"):
                    entry = cur
            continue
        if line.strip() == "}":
            cur = None
            continue
        comps[cur].append(line)
    return comps, entry


def _groups(line, n_devices):
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if m:
        out_shape = [int(x) for x in m.group(1).split(",")]
        dims = [int(x) for x in m.group(2).split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return [tuple(g) for g in ids.reshape(out_shape[0], -1).tolist()]
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if m:
        dims = [int(x) for x in re.findall(r"=(\d+)", m.group(1))]
        names = re.findall(r"'(\w+)'=", m.group(1))
        sel = [names.index(x) for x in re.findall(r"'(\w+)'", m.group(2))]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        rest = [i for i in range(len(dims)) if i not in sel]
        ids = ids.transpose(rest + sel)
        return [tuple(g) for g in ids.reshape(-1, int(np.prod([dims[i] for i in sel]))).tolist()]
    m = re.search(r"replica_groups=\{(\{[\d,\s]*\}(?:,\s*\{[\d,\s]*\})*)\}", line)
    if m:
        return [tuple(int(x) for x in g.split(",") if x.strip()) for g in re.findall(r"\{([\d,\s]*)\}", m.group(1))]
    m = re.search(r"source_target_pairs=\{(.*?)\}\}", line)
    if m:
        return [tuple(int(x) for x in p.split(",")) for p in re.findall(r"\{(\d+,\d+)", m.group(0))]
    return [tuple(range(n_devices))]


def _axes_of(groups, mesh):
    """Mesh axes along which the devices of one group differ."""
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    coord = {int(ids[idx]): idx for idx in np.ndindex(ids.shape)}
    axes = set()
    for g in groups:
        cs = [coord[d] for d in g if d in coord]
        for i, name in enumerate(mesh.axis_names):
            if len({c[i] for c in cs}) > 1:
                axes.add(name)
    return tuple(a for a in mesh.axis_names if a in axes)


def _result_bytes(line, last_only=False):
    """Bytes of the result shape (for an async `-start`, its last tuple element: the output)."""
    lhs = line.split("=", 1)[1] if "=" in line else line
    head = lhs.split("(", 1)[0] if not lhs.strip().startswith("(") else lhs[: lhs.index(")") + 1]
    shapes = _SHAPE.findall(head)
    if last_only and shapes:
        shapes = shapes[-1:]
    total = 0
    for dt, dims in shapes:
        n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        total += n * DTYPE_BYTES[dt]
    dts = sorted({dt for dt, _ in shapes})
    return total, ",".join(dts)


def collectives(text: str, mesh) -> list[dict]:
    comps, entry = _computations(text)
    n = mesh.devices.size
    # caller edges: computation -> [(callee, trips, is_loop)]
    calls = defaultdict(list)
    for name, lines in comps.items():
        for line in lines:
            if " while(" in line:
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
                t = int(trips.group(1)) if trips else 1
                for key in ("body", "condition"):
                    m = re.search(key + r"=%?([\w.\-]+)", line)
                    if m:
                        calls[name].append((m.group(1), t if key == "body" else 1, key == "body"))
                continue
            for m in re.finditer(r"(?:calls|to_apply|branch_computations|called_computations)=\{?%?([\w.\-]+(?:,\s*%?[\w.\-]+)*)\}?", line):
                for callee in re.split(r",\s*%?", m.group(1)):
                    calls[name].append((callee.lstrip("%"), 1, False))
    out = []

    def walk(name, trips, depth, seen):
        if name not in comps or name in seen:
            return
        seen = seen | {name}
        for line in comps[name]:
            op = re.search(r"=\s*(?:\([^()]*\)|\S+)\s+([\w\-]+)\(", line)
            if op:
                o = op.group(1)
                base = o[:-6] if o.endswith("-start") else o
                if base in COLLECTIVES and not o.endswith("-done"):
                    b, dts = _result_bytes(line, last_only=o.endswith("-start") and base != "all-reduce")
                    groups = _groups(line, n)
                    out.append(dict(op=base, dtype=dts, bytes=b, groups=groups, trips=trips, depth=depth,
                                    axes=_axes_of(groups, mesh), computation=name))
        for callee, t, is_loop in calls.get(name, ()):
            walk(callee, trips * t, depth + (1 if is_loop else 0), seen)

    walk(entry, 1, 0, frozenset())
    return out


def summarize(colls, param_bytes_min: int = 0):
    """Per (axes, op, dtype, inside-a-loop) totals of bytes x trips."""
    agg = defaultdict(lambda: [0, 0])
    for c in colls:
        key = ("+".join(c["axes"]) or "-", c["op"], c["dtype"], c["depth"])
        agg[key][0] += c["bytes"] * c["trips"]
        agg[key][1] += 1
    return dict(agg)
