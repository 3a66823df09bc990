"""The layouts `plan --search` can try: enumeration, the divisibility and memory pruning, a
first analytical ranking, and `--candidates` files.

Owns: `Layout` (mesh data / fsdp / tensor / stage, pipeline micro-batches and repeats,
micro-batch size, ZeRO-1, remat policy, sequence parallelism where the build has it) and its
gin overrides; `enumerate_layouts` (every layout the project can run for a model, batch and
device count, with the count pruned per reason); `memory_floor` (a lower bound of a layout's
per-device bytes: what it must hold whatever the compiler does); `quick_estimate` (an
analytical step time used only to choose which layouts to compile when more survive than
`--max_candidates`); `read_candidates` (CSV or JSON rows). Does not own: compiling and
predicting (`plan.search`, `plan.step_time`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math

from meditron_jax.errors import UserError

REMATS = ("full", "save_proj", "dots", "none")
FIELDS = ("data", "fsdp", "tensor", "stage", "micro", "zero1", "remat", "microbatches", "repeats",
          "sequence_parallel", "global_batch", "accumulation")


@dataclasses.dataclass(frozen=True)
class Layout:
    data: int
    fsdp: int
    tensor: int
    stage: int
    micro: int  # train.micro_batch_size (sequences per data-parallel rank per micro-batch)
    zero1: bool
    remat: str
    microbatches: int | None = None  # pipeline.microbatches (stage > 1)
    repeats: int = 1  # pipeline.repeats (stage > 1)
    sequence_parallel: bool | None = None  # None: the build has no sharding.sequence_parallel
    global_batch: int | None = None  # train.global_batch_size of this layout (None: the gin's)

    @property
    def devices(self) -> int:
        return self.data * self.fsdp * self.tensor * self.stage

    def gin_params(self) -> list[str]:
        out = [f"mesh.data={self.data}", f"mesh.fsdp={self.fsdp}", f"mesh.tensor={self.tensor}",
               f"mesh.stage={self.stage}", f"train.micro_batch_size={self.micro}", f"sharding.zero1={self.zero1}",
               f"model.remat='{self.remat}'"]
        if self.stage > 1:
            out += [f"pipeline.microbatches={self.microbatches}", f"pipeline.repeats={self.repeats}",
                    "pipeline.stage_remat=True"]
        if self.sequence_parallel is not None:
            out.append(f"sharding.sequence_parallel={self.sequence_parallel}")
        if self.global_batch is not None:
            out.append(f"train.global_batch_size={self.global_batch}")
        return out

    def label(self) -> str:
        s = f"dp{self.data} fsdp{self.fsdp} tp{self.tensor}"
        if self.stage > 1:
            s += f" pp{self.stage}x{self.repeats} M{self.microbatches}"
        s += f" mb{self.micro} {'zero1 ' if self.zero1 else ''}{self.remat}"
        s += f" gb{self.global_batch}" if self.global_batch is not None else ""
        return s + (" sp" if self.sequence_parallel else "")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _pow2_upto(n: int) -> list[int]:
    out, v = [], 1
    while v <= n:
        out.append(v)
        v *= 2
    return out


def check(layout: Layout, cfg, global_batch: int, seq_len: int, devices: int) -> str | None:
    """Why the project cannot run `layout` (None: it can), the checks `train` makes."""
    t, s = layout.tensor, layout.stage
    global_batch = layout.global_batch or global_batch
    if layout.devices != devices:
        return f"mesh has {layout.devices} devices, not {devices}"
    if layout.remat not in REMATS:
        return f"remat {layout.remat!r} not in {REMATS}"
    for name in ("num_heads", "num_kv_heads", "intermediate_size"):
        if getattr(cfg, name) % t:
            return f"tensor {t} does not divide {name}"
    if layout.sequence_parallel and seq_len % t:
        return f"tensor {t} does not divide seq_len {seq_len}"
    dp = layout.data * layout.fsdp
    per_step = layout.micro * dp
    if s > 1:
        M, r = layout.microbatches, layout.repeats
        if not M or cfg.num_layers % (s * r):
            return f"stage {s} x repeats {r} does not divide {cfg.num_layers} layers"
        if r > 1 and M < s:
            return "circular repeats need microbatches >= stages"
        per_step *= M
    elif layout.repeats != 1 or layout.microbatches:
        return "pipeline settings without stages"
    if global_batch % per_step:
        return f"global batch {global_batch} not divisible by micro x data-parallel x microbatches ({per_step})"
    return None


def enumerate_layouts(cfg, global_batch: int, seq_len: int, devices: int, *, remats=REMATS, micros=None,
                      sequence_parallel: bool = False, max_repeats: int = 4) -> tuple[list[Layout], dict]:
    """Every layout the project can run (see `check`), and how many were dropped per reason.

    Micro-batch sizes: powers of two up to the global batch per data-parallel rank (or
    `micros`); pipeline micro-batches: stages x 1, 2, 4 ... while they divide; repeats: powers of
    two up to `max_repeats`; ZeRO-1 on and off where data > 1; sequence parallelism on and off
    where the build has it and tensor > 1."""
    out, dropped = [], {}
    for t in _divisors(devices):
        for s in _divisors(devices // t):
            rest = devices // (t * s)
            for f in _divisors(rest):
                d = rest // f
                dp = d * f
                for m in (micros or _pow2_upto(max(1, global_batch // dp))):
                    pipes = [(None, 1)]
                    if s > 1:
                        Ms = [s * k for k in _pow2_upto(max(1, global_batch // (m * dp * s)))]
                        pipes = [(M, r) for M in Ms for r in _pow2_upto(max_repeats)]
                    for M, r in pipes:
                        for z in ((False, True) if d > 1 else (False,)):
                            for rm in remats:
                                sps = (False, True) if (sequence_parallel and t > 1) else \
                                      ((False,) if sequence_parallel else (None,))
                                for sp in sps:
                                    lay = Layout(d, f, t, s, m, z, rm, M, r, sp)
                                    why = check(lay, cfg, global_batch, seq_len, devices)
                                    if why is None:
                                        out.append(lay)
                                    else:
                                        key = why.split(" (")[0] if "divisible" in why else why
                                        dropped[_reason(key)] = dropped.get(_reason(key), 0) + 1
    return out, dropped


def _reason(why: str) -> str:
    for word in ("global batch", "tensor", "stage", "repeats"):
        if word in why:
            return {"global batch": "batch not divisible", "tensor": "tensor does not divide the model",
                    "stage": "stages x repeats do not divide the layers", "repeats": "circular repeats need M >= S"}[word]
    return why


def memory_floor(layout: Layout, cfg, seq_len: int, compute_bytes: int = 2) -> float:
    """Bytes per device a layout holds at least, whatever the compiler schedules: the fp32
    parameters and Adam moments (12 B per parameter, over stage x tensor x fsdp; with ZeRO-1
    also over data), the fp32 gradient accumulators (4 B), and what the remat policy keeps for
    the backward pass of one micro-batch per layer (of every pipeline micro-batch in flight):
    full: the layer input (split over tensor); save_proj / dots: also the projection outputs;
    none: also the norms, rope and activation outputs and, with XLA attention, the causal
    half of the fp32 scores and bf16 probabilities."""
    t, s, f, d = layout.tensor, layout.stage, layout.fsdp, layout.data
    P = cfg.num_params()
    shard = t * s * f
    master = 4 * P / shard / (d if layout.zero1 else 1)
    moments = 8 * P / shard / (d if layout.zero1 else 1)
    grads = 4 * P / shard
    tokens = layout.micro * seq_len * (layout.microbatches if s > 1 else 1)
    D, F = cfg.hidden_size, cfg.intermediate_size
    kv = 2 * cfg.num_kv_heads * cfg.head_dim
    per_token = D / t * compute_bytes
    if layout.remat != "full":
        per_token += ((D + kv + 2 * F) / t + 2 * D) * compute_bytes
    if layout.remat == "none":
        per_token += ((D + kv / 2 + F) / t + 2 * D) * compute_bytes
        if cfg.attention == "xla":
            per_token += cfg.num_heads / t * seq_len * (4 + compute_bytes) / 2
    return master + moments + grads + cfg.num_layers / s * tokens * per_token


def axis_group(layout: Layout, axis: str) -> list[int]:
    """Logical device ids of the `axis` group holding device 0 (mesh order data, stage, fsdp,
    tensor, row-major: the order `plan.targets` devices are laid out in)."""
    sizes = {"data": layout.data, "stage": layout.stage, "fsdp": layout.fsdp, "tensor": layout.tensor}
    order = ("data", "stage", "fsdp", "tensor")
    stride = math.prod(sizes[a] for a in order[order.index(axis) + 1:])
    return [k * stride for k in range(sizes[axis])]


def quick_estimate(layout: Layout, cfg, global_batch: int, seq_len: int, sysm) -> float:
    """A rough step time in seconds, only to order the layouts to compile when more survive
    than `--max_candidates` (the ranking itself is `plan.step_time`'s, from the compile).
    `sysm`: a `hardware.System` whose `node_of` covers the layout's devices in mesh order."""
    from meditron_jax.plan import hardware
    t, s, f, d = layout.tensor, layout.stage, layout.fsdp, layout.data
    chip, n = sysm.chip, layout.devices
    P = cfg.num_params(include_embedding=False)
    recompute = {"full": 4 / 3, "save_proj": 1.1, "dots": 1.05, "none": 1.0}[layout.remat]
    rows = layout.micro * seq_len
    tile = min(1.0, rows / 4096) ** 0.3 * min(1.0, cfg.hidden_size / t / 1024) ** 0.3
    compute = 6 * P * global_batch * seq_len * recompute / (n * chip.peak_flops * 0.6 * tile)

    def bw(axis):
        return hardware.link_for_group(sysm, axis_group(layout, axis))[0]
    accum = global_batch // (layout.micro * d * f)
    comm = 0.0
    if t > 1:  # 4 (6 under full remat) activation all-reduces per layer per micro-batch
        act = rows * cfg.hidden_size * 2
        comm += (6 if layout.remat == "full" else 4) * cfg.num_layers / s * accum * 2 * (t - 1) / t * act / bw("tensor")
    if f > 1:  # a stage's weights (bf16) gathered (forward, recompute, backward) and their gradients
        # scattered, per micro-batch: each device moves (f - 1) / f of them, however large f is
        comm += 4 * accum * (f - 1) / f * 2 * P / (t * s) / bw("fsdp")
    if d > 1:  # one fp32 gradient reduction per step
        comm += 2 * (d - 1) / d * 4 * P / (t * s * f) / bw("data")
    bubble = 0.0
    if s > 1:
        ticks = layout.microbatches * layout.repeats + s - 1
        bubble = compute * (s - 1) / (ticks - s + 1)
    return compute + comm + bubble


def read_candidates(path: str, sequence_parallel: bool = False) -> list[Layout]:
    """Layouts from a CSV (a header row naming the columns) or JSON (a list of objects) file:
    data, tensor, stage, fsdp, micro, zero1, remat (required), microbatches, repeats,
    sequence_parallel, and the row's batch as global_batch or accumulation (gradient-accumulation
    steps: global = micro x data x fsdp x microbatches x accumulation) (optional; default: the
    gin's train.global_batch_size). One line for a bad file."""
    try:
        with open(path) as fh:
            text = fh.read()
    except OSError as e:
        raise UserError(f"--candidates {path}: {e.strerror or e}") from None
    try:
        rows = json.loads(text) if text.lstrip().startswith(("[", "{")) else list(csv.DictReader(text.splitlines()))
    except ValueError as e:
        raise UserError(f"--candidates {path}: not valid JSON: {e}") from None
    if isinstance(rows, dict):
        rows = rows.get("candidates", [rows])
    out = []
    for k, row in enumerate(rows, 1):
        out.append(_layout_from_row(row, path, k, sequence_parallel))
    if not out:
        raise UserError(f"--candidates {path}: no rows")
    return out


def _layout_from_row(row, path: str, k: int, sequence_parallel: bool) -> Layout:
    if not isinstance(row, dict):
        raise UserError(f"--candidates {path} row {k}: expected an object with {', '.join(FIELDS[:7])}")
    row = {str(a).strip().lower(): b for a, b in row.items() if a is not None}
    missing = [c for c in FIELDS[:7] if c not in row or str(row[c]).strip() == ""]
    if missing:
        raise UserError(f"--candidates {path} row {k}: missing {', '.join(missing)}")
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        raise UserError(f"--candidates {path} row {k}: unknown column(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    try:
        ints = {c: int(str(row[c]).strip()) for c in ("data", "fsdp", "tensor", "stage", "micro")}
        M, R, G, A = (_opt_int(row, c) for c in ("microbatches", "repeats", "global_batch", "accumulation"))
    except ValueError as e:
        raise UserError(f"--candidates {path} row {k}: {e}") from None
    if G is not None and A is not None:
        raise UserError(f"--candidates {path} row {k}: give global_batch or accumulation, not both")
    if min(ints.values()) < 1:
        raise UserError(f"--candidates {path} row {k}: sizes must be >= 1")
    z, sp = _bool(row["zero1"], path, k, "zero1"), None
    if sequence_parallel:
        sp = _bool(row.get("sequence_parallel", False), path, k, "sequence_parallel")
    elif _bool(row.get("sequence_parallel", False), path, k, "sequence_parallel"):
        raise UserError(f"--candidates {path} row {k}: sequence_parallel, but this build has no "
                        "sharding.sequence_parallel")
    if ints["stage"] > 1 and M is None:
        M = 2 * ints["stage"]  # pipeline.microbatches' default
    if ints["stage"] == 1:
        M, R = None, 1
    if A is not None:
        G = ints["micro"] * ints["data"] * ints["fsdp"] * (M or 1) * A
    return Layout(ints["data"], ints["fsdp"], ints["tensor"], ints["stage"], ints["micro"], z,
                  str(row["remat"]).strip().strip("'\""), M, R or 1, sp, G)


def _opt_int(row: dict, name: str) -> int | None:
    v = str(row.get(name, "")).strip()
    return None if v in ("", "None", "none") else int(v)


def _bool(v, path: str, k: int, name: str) -> bool:
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", "", "none"):
        return False
    raise UserError(f"--candidates {path} row {k}: {name} {v!r} is not true or false")

