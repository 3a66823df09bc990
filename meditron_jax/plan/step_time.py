"""The step-time model: the compiled step's schedule, replayed on the target's hardware facts.

Owns: `predict` (step seconds, tokens/s per device, MFU, and the breakdown into compute,
exposed communication per mesh axis and pipeline bubble) from a compiled (scheduled,
after-optimizations) HLO module, and its text form (`print_prediction`). Does not own: FLOPs /
bytes per instruction (`plan.hlo_cost`), the collectives' groups and wire bytes
(`plan.hlo_stats`), the hardware (`plan.hardware`). docs/planning.md states the model.

The model, per computation in the compiler's schedule order (the HLO of a scheduled module is
printed in execution order):
- a compute instruction takes max(matmul FLOPs / (peak x matmul efficiency x the GEMM shape's
  tiling efficiency), HBM bytes / (HBM bandwidth x memory efficiency)) plus a kernel launch;
  attention kernels run at the flash-attention rate;
- a collective takes latency + wire bytes / the bus bandwidth of the link its device groups
  span (`hardware.link_for_group`); an asynchronous one (`*-start` ... `*-done`) runs on its own
  stream from its start and the compute stream waits for it only at its done: compute scheduled
  between the two hides it (XLA's latency-hiding scheduler put it there), what is left is
  exposed; a synchronous one is exposed whole;
- a while loop costs its trip count x its body (the body replayed twice, so that a collective
  the loop pipelines across iterations is waited for in the next one); a conditional its
  slowest branch;
- the pipeline's tick loops (trip count M x R + S - 1, a collective-permute over `stage` inside)
  run every tick on every stage, idle ones on padding: (S - 1) / (M R + S - 1) of their time is
  the bubble.
"""

from __future__ import annotations

import dataclasses
import re

from meditron_jax.plan import hardware
from meditron_jax.plan.hlo_cost import CostModel, backend_config
from meditron_jax.plan.hlo_text import Module, parse

ATTENTION_EFFICIENCY = 0.65  # flash attention's share of the dense peak (docs/planning.md)
AXES = ("data", "stage", "fsdp", "tensor")


@dataclasses.dataclass
class Tally:
    seconds: float = 0.0
    matmul: float = 0.0
    attention: float = 0.0
    memory: float = 0.0
    overhead: float = 0.0
    exposed: dict = dataclasses.field(default_factory=dict)  # mesh axes -> exposed seconds
    hidden: float = 0.0  # collective seconds that overlapped compute
    bubble: float = 0.0
    flops: float = 0.0
    hbm_bytes: float = 0.0
    stage_permute: bool = False

    def add(self, o: "Tally", k: float = 1.0):
        for f in ("seconds", "matmul", "attention", "memory", "overhead", "hidden", "bubble", "flops", "hbm_bytes"):
            setattr(self, f, getattr(self, f) + k * getattr(o, f))
        for a, v in o.exposed.items():
            self.exposed[a] = self.exposed.get(a, 0.0) + k * v
        self.stage_permute |= o.stage_permute

    def move_to_bubble(self, frac: float):
        """`frac` of every time component becomes bubble (idle pipeline ticks)."""
        moved = 0.0
        for f in ("matmul", "attention", "memory", "overhead"):
            v = getattr(self, f) * frac
            setattr(self, f, getattr(self, f) - v)
            moved += v
        for a in list(self.exposed):
            v = self.exposed[a] * frac
            self.exposed[a] -= v
            moved += v
        self.bubble += moved


class Replay:
    """Replays a scheduled module's computations on a `hardware.System`."""

    def __init__(self, mod: Module, records, sysm: hardware.System, stages: int = 1, ticks: int = 0):
        self.mod, self.sys, self.stages, self.ticks = mod, sysm, stages, ticks
        self.cost = CostModel(mod)
        self.mult = mod.multiplicity()
        self.by_name = {r.name: r for r in records}
        self.comp_of_record = {}
        for cname, instrs in mod.computations.items():
            for ins in instrs:
                if ins.name in self.by_name:
                    self.comp_of_record[cname] = self.by_name[ins.name]
        self._memo: dict[str, Tally] = {}
        self._coll_s: dict[str, float] = {}

    # ---- collectives -------------------------------------------------------------------
    def collective_seconds(self, rec) -> float:
        if rec.name in self._coll_s:
            return self._coll_s[rec.name]
        e = self.sys.eff
        groups = [g for g in rec.replica_groups if len(g) > 1] or rec.replica_groups
        worst = 0.0
        seen = set()
        for g in groups[:16]:
            key = tuple(self.sys.node_of[i] for i in g) if self.sys.coords is None else tuple(g)
            if key in seen:
                continue
            seen.add(key)
            bw, fast_hops, net_hops, link = hardware.link_for_group(self.sys, g)
            if rec.kind == "collective-permute":  # one hop
                latency = e.launch + (e.hop_network if link in ("network", "dcn") else e.hop_fast)
            else:
                passes = hardware.ring_hops(rec.kind, len(g)) / max(1, len(g) - 1)
                latency = e.launch + passes * (fast_hops * e.hop_fast + net_hops * e.hop_network)
            sent = rec.bytes if rec.kind == "collective-permute" else rec.wire_bytes
            worst = max(worst, latency + sent / bw)
        self._coll_s[rec.name] = worst
        return worst

    def _record_for(self, ins):
        if ins.name in self.by_name:
            return self.by_name[ins.name]
        if ins.opcode == "async-start":
            m = re.search(r"\bcalls=%?([\w.\-]+)", ins.attrs)
            if m:
                return self.comp_of_record.get(m.group(1))
        return None

    # ---- computations ------------------------------------------------------------------
    def computation(self, cname: str) -> Tally:
        if cname not in self._memo:
            self._memo[cname] = Tally()  # guards recursion (none in valid HLO)
            residual: dict[str, float] = {}
            first = self._run(cname, residual)
            self._memo[cname] = self._run(cname, residual) if residual else first
        return self._memo[cname]

    def _run(self, cname: str, residual: dict) -> Tally:
        """One pass over the computation. `residual`: for a collective started in the previous
        iteration of this loop body (its done takes a loop-carried value), how long after the
        body's end it still ran; filled by this pass for the next."""
        instrs = self.mod.computations.get(cname, [])
        local = {i.name: i for i in instrs}
        t = Tally()
        clock, comm_free = 0.0, 0.0
        pending: dict[str, tuple[float, float, tuple]] = {}  # start -> (finish, seconds, axes)
        e, chip = self.sys.eff, self.sys.chip
        for ins in instrs:
            op = ins.opcode
            rec = self._record_for(ins) if (op.endswith("-start") or op in _SYNC) else None
            if rec is not None:
                dur = self.collective_seconds(rec)
                axes = rec.axes or ()
                t.stage_permute |= rec.kind == "collective-permute" and "stage" in axes
                sync = op in _SYNC or backend_config(ins).get("collective_backend_config", {}).get("is_sync") is True
                begin = max(clock, comm_free)
                comm_free = begin + dur
                if sync:
                    _expose(t, axes, comm_free - clock)
                    clock = comm_free
                else:
                    pending[ins.name] = (comm_free, dur, axes)
                continue
            if op.endswith("-done"):
                src = ins.operands[0] if ins.operands else None
                if src in pending:
                    finish, dur, axes = pending.pop(src)
                    wait = max(0.0, finish - clock)
                    _expose(t, axes, wait)
                    t.hidden += dur - wait
                    clock = max(clock, finish)
                else:  # a collective the loop started in its previous iteration (pipelined)
                    wait, axes = residual.get(ins.name, (0.0, ()))
                    _expose(t, axes, wait)
                    clock += wait
                continue
            if op == "while":
                body = re.search(r"\bbody=%?([\w.\-]+)", ins.attrs).group(1)
                trip = self._trip(body, cname)
                sub = Tally()
                sub.add(self.computation(body), trip)
                if self.stages > 1 and sub.stage_permute and trip == self.ticks:
                    sub.move_to_bubble((self.stages - 1) / self.ticks)
                t.add(sub)
                clock += sub.seconds
                continue
            if op == "conditional":
                branches = re.findall(r"%?([\w.\-]+)", (re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
                                                       or re.search(r"true_computation=([^,]*)", ins.attrs)).group(1))
                best = max((self.computation(b) for b in branches if b in self.mod.computations),
                           key=lambda x: x.seconds, default=Tally())
                t.add(best)
                clock += best.seconds
                continue
            if op in ("call", "async-start"):
                m = re.search(r"\b(?:to_apply|calls)=%?([\w.\-]+)", ins.attrs)
                if m and m.group(1) in self.mod.computations:
                    sub = self.computation(m.group(1))
                    t.add(sub)
                    clock += sub.seconds
                continue
            c = self.cost.cost(ins, local)
            if c.kind == "free":
                continue
            t_mem = c.bytes / (chip.hbm_bandwidth * e.memory)
            if c.kind == "matmul":
                m, n, k = c.dims if len(c.dims) == 3 else (4096, 4096, 4096)
                rate = chip.peak_flops * e.matmul * max(0.05, hardware.gemm_efficiency(chip, m, n, k))
                secs = max(c.flops / rate, t_mem)
                t.matmul += secs
            elif c.kind == "attention":
                secs = max(c.flops / (chip.peak_flops * ATTENTION_EFFICIENCY), t_mem)
                t.attention += secs
            else:
                secs = t_mem
                t.memory += secs
            t.overhead += e.kernel
            t.flops += c.flops
            t.hbm_bytes += c.bytes
            clock += secs + e.kernel
        end = clock
        for name, (finish, dur, axes) in pending.items():  # started here, waited for next iteration
            done = self._carried_done(name, cname)
            left = max(0.0, finish - end)
            t.hidden += dur - left
            if done is not None:
                residual[done] = (left, axes)
            else:
                _expose(t, axes, left)
                end = max(end, finish)
        t.seconds = end
        return t

    def _carried_done(self, start_name: str, cname: str) -> str | None:
        """The done (in this loop body, next iteration) of a start whose result the body passes
        on: the first done in `cname` that reads a loop-carried value of the same shape."""
        instrs = self.mod.computations.get(cname, [])
        shape = next((i.shape for i in instrs if i.name == start_name), None)
        local = {i.name: i for i in instrs}
        for i in instrs:
            if i.opcode.endswith("-done") and i.operands and i.operands[0] in local \
                    and local[i.operands[0]].opcode == "get-tuple-element" and local[i.operands[0]].shape == shape:
                return i.name
        return None

    def _trip(self, body: str, caller: str) -> int:
        b, c = self.mult.get(body, (0, True))[0], self.mult.get(caller, (1, True))[0]
        return max(1, round(b / c)) if c else 1


_SYNC = {"all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute", "collective-broadcast",
         "ragged-all-to-all"}


def _expose(t: Tally, axes, seconds: float):
    if seconds <= 0:
        return
    key = "+".join(axes) if axes else "other"
    t.exposed[key] = t.exposed.get(key, 0.0) + seconds


def predict(hlo, records, sysm: hardware.System, *, model_flops: float, tokens: int, devices: int,
            stages: int = 1, ticks: int = 0) -> dict:
    """The predicted step of a compiled module (`hlo`: text or parsed), `records` its
    collectives with mesh axes (`hlo_stats.collectives` + `assign_axes`)."""
    mod = hlo if isinstance(hlo, Module) else parse(hlo)
    rp = Replay(mod, records, sysm, stages, ticks)
    t = rp.computation(mod.entry)
    step = t.seconds
    exposed = sum(t.exposed.values())
    compute = t.matmul + t.attention + t.memory + t.overhead
    parts = {"compute": compute, "exposed_communication": exposed, "bubble": t.bubble}
    dominant = max(parts, key=parts.get)
    if dominant == "exposed_communication" and t.exposed:
        dominant = f"communication over {max(t.exposed, key=t.exposed.get)}"
    peak = sysm.chip.peak_flops
    return {
        "step_seconds": step,
        "tokens_per_s_per_device": tokens / step / devices if step else 0.0,
        "mfu": model_flops / (step * devices * peak) if step else 0.0,
        "breakdown_seconds": {
            "compute": compute, "matmul": t.matmul, "attention_kernels": t.attention, "memory_bound": t.memory,
            "kernel_launches": t.overhead, "exposed_communication": exposed,
            "exposed_by_axes": dict(sorted(t.exposed.items(), key=lambda kv: -kv[1])),
            "hidden_communication": t.hidden, "bubble": t.bubble},
        "dominant": dominant,
        "hlo_matmul_flops_per_device": t.flops, "hbm_bytes_per_device": t.hbm_bytes,
        "model_flops_per_step": model_flops, "tokens_per_step": tokens, "devices": devices,
        "hardware": sysm.describe(),
    }


def _dur(x: float) -> str:
    return f"{x * 1e3:.2f} ms" if abs(x) < 1 else f"{x:.3f} s"


def print_prediction(p: dict):
    b = p["breakdown_seconds"]
    s = p["step_seconds"]

    def pct(x):
        return f"{_dur(x)} ({100 * x / s:.0f}%)" if s else _dur(x)
    print(f"predicted step: {_dur(s)}, {p['tokens_per_s_per_device']:,.0f} tokens/s per device, "
          f"MFU {100 * p['mfu']:.1f}% (dominated by {p['dominant']})")
    print(f"  compute {pct(b['compute'])}: matmul {_dur(b['matmul'])}, attention kernels "
          f"{_dur(b['attention_kernels'])}, memory-bound {_dur(b['memory_bound'])}, launches {_dur(b['kernel_launches'])}")
    axes = ", ".join(f"{a} {_dur(v)}" for a, v in b["exposed_by_axes"].items() if v > 0) or "none"
    print(f"  exposed communication {pct(b['exposed_communication'])} ({axes}); hidden behind compute "
          f"{_dur(b['hidden_communication'])}")
    print(f"  pipeline bubble {pct(b['bubble'])}")
    h = p["hardware"]
    print(f"  hardware: {h['chip']} {h['peak_bf16_tflops']:.0f} TFLOP/s bf16, HBM {h['hbm_gb_s']:.0f} GB/s; "
          f"{h['nodes']} node(s) x {h['devices_per_node']}; {h['note']} (sources: docs/planning.md)")


def predict_built(built, network: dict | None = None) -> dict:
    """`predict` for a `plan.compile.Built` (its parsed HLO, mesh, batch, model and pipeline
    settings). `network`: `hardware.system` keyword arguments (gpus_per_node is the compile's)."""
    from meditron_jax.plan import hlo_stats
    from meditron_jax.training.metrics import flops_per_token

    net = {k: v for k, v in (network or {}).items() if k in ("node_network_gbps", "system_name", "slices")
           and v is not None}
    mod = built.hlo()
    records = hlo_stats.collectives(mod)
    hlo_stats.assign_axes(records, built.mesh_sizes)
    sysm = hardware.system(built.target.name, list(built.mesh.devices.flat), **net)
    tc, cfg, S = built.tc, built.cfg, built.mesh_sizes["stage"]
    ticks = 0
    if S > 1:
        M = built.pipeline.microbatches or 2 * S
        ticks = M * built.pipeline.repeats + S - 1
    tokens = tc.global_batch_size * tc.seq_len
    return predict(mod, records, sysm, model_flops=flops_per_token(cfg, tc.seq_len) * tokens, tokens=tokens,
                   devices=len(built.target.devices), stages=S, ticks=ticks)
