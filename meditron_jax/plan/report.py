"""`meditron-jax plan`'s report: reading a compiled step (memory, FLOPs, collectives, buffers).

Owns: turning a `plan.Built` (the compiled step and what it was built from) into the plan's
JSON (`report`: per-device memory against the target's limit with the verdict, FLOPs, the
collectives beside what the parallelism needs in theory, rematerialization warnings, the
largest buffers with their source lines) and its text form (`print_report`). Does not own:
compiling (compile.py), HLO parsing (hlo_stats.py), the target table (targets/).
"""

from __future__ import annotations

import glob
import os
import re

GIB = 2 ** 30


def _data_replica_elements(tree, sizes: dict) -> int:
    """Elements of `tree` on one device as if it were not split over `data` / `fsdp`: what one
    data-parallel rank's gradients (and working copy) hold before ZeRO-1 shards the master."""
    import jax
    import numpy as np
    total = 0
    for a in jax.tree.leaves(tree):
        spec = getattr(a.sharding, "spec", ())
        split = 1
        for entry in spec:
            for ax in (entry if isinstance(entry, tuple) else (entry,)):
                split *= sizes.get(ax, 1) if ax in ("data", "fsdp") else 1
        total += int(np.prod(a.sharding.shard_shape(a.shape))) * split
    return total


def _per_device_bytes(tree) -> int:
    import jax
    import numpy as np
    total = 0
    for a in jax.tree.leaves(tree):
        total += int(np.prod(a.sharding.shard_shape(a.shape))) * np.dtype(a.dtype).itemsize
    return total


def _hbm_numbers(msg: str) -> dict:
    """'... HLO temporaries (205.16G) exceeds available HBM (95.74G) ...' -> GiB numbers."""
    out = {}
    m = re.search(r"[Uu]sed ([\d.]+)([GMK]) of ([\d.]+)([GMK]) hbm", msg)
    if m:
        out["used_gib"] = _gib(m.group(1), m.group(2))
        out["available_gib"] = _gib(m.group(3), m.group(4))
    m = re.search(r"temporaries \(([\d.]+)([GMK])\)", msg)
    if m:
        out["temporaries_gib"] = _gib(m.group(1), m.group(2))
    m = re.search(r"available HBM \(([\d.]+)([GMK])\)", msg)
    if m:
        out["available_gib"] = _gib(m.group(1), m.group(2))
    m = re.search(r"[Ee]xceeded hbm capacity by ([\d.]+)([GMK])", msg)
    if m:
        out["over_gib"] = _gib(m.group(1), m.group(2))
    return out


def _gib(x: str, unit: str) -> float:
    return float(x) * {"G": 1, "M": 2 ** -10, "K": 2 ** -20}[unit]


_BUF_RE = re.compile(r"^allocation (\d+): size (\d+)(.*)$")
_VAL_RE = re.compile(r"^\s+value: <\d+ ([^ >]+)(?: @\d+)?> \(size=(\d+),offset=(\d+)\): (.+)$")


def largest_buffers(dump_dir: str, mod=None, top: int = 12) -> list[dict]:
    """The largest temporary buffers of the step from XLA's buffer-assignment dump (parameters
    and outputs are the state, reported apart): each allocation's biggest value with its
    shape, the producing op and its source line (from the HLO
    metadata: `mod`, the parsed compiled module, or the dumped after-optimizations module when
    `mod` is None)."""
    from meditron_jax.plan import hlo_stats
    files = sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations-buffer-assignment.txt")),
                   key=os.path.getsize)
    if not files:
        return []
    path = files[-1]  # the step's module (the biggest), not small helper computations
    if mod is None:
        hlo_path = path.replace("-buffer-assignment.txt", ".txt")
        mod = hlo_stats.parse(open(hlo_path).read()) if os.path.exists(hlo_path) else None
    by_name = {}
    if mod is not None:
        for instrs in mod.computations.values():
            for ins in instrs:
                by_name[ins.name] = ins
    allocs = []
    cur = None
    with open(path) as f:
        for line in f:
            m = _BUF_RE.match(line)
            if m:
                attrs = m.group(3)
                cur = {"allocation": int(m.group(1)), "bytes": int(m.group(2)),
                       "kind": ("parameter" if "parameter" in attrs else "output" if "output" in attrs
                                else "constant" if "constant" in attrs else "temporary"),
                       "thread_local": "thread-local" in attrs, "values": []}
                allocs.append(cur)
                continue
            if line.startswith("Total bytes used") or line.startswith("Used values"):
                cur = None
                continue
            if cur is not None:
                v = _VAL_RE.match(line)
                if v:
                    cur["values"].append((v.group(1), int(v.group(2)), v.group(4)))
    allocs = [a for a in allocs if not a["thread_local"] and a["kind"] == "temporary"]
    allocs.sort(key=lambda a: -a["bytes"])
    out = []
    for a in allocs[:top]:
        name, size, shape = max(a["values"], key=lambda v: v[1]) if a["values"] else ("?", a["bytes"], "?")
        base = name.split("{")[0]
        ins = by_name.get(base)
        out.append({
            "bytes": a["bytes"], "gib": a["bytes"] / GIB, "kind": a["kind"], "values": len(a["values"]),
            "largest_value": base, "shape": shape.strip(),
            "op": ins.opcode if ins else None,
            "op_name": ins.metadata("op_name") if ins else None,
            "source": mod.source(ins) if (ins and mod) else None,
        })
    return out


def collective_report(built, hlo, top: int = 12) -> dict:
    """The compiled step's collectives by kind and mesh axes, split into parameter-shaped and
    other (activation) traffic, beside what the parallelism needs in theory; the ones theory
    does not explain are named with their source lines."""
    import numpy as np
    from meditron_jax.plan import hlo_stats
    recs = hlo_stats.collectives(hlo)  # the module text or a parsed Module
    sizes = built.mesh_sizes
    hlo_stats.assign_axes(recs, sizes)
    cfg, tc = built.cfg, built.tc
    dtype_bytes = np.dtype(cfg.dtype).itemsize if hasattr(cfg, "dtype") else 2
    S, dp, tp = sizes["stage"], sizes["data"] * sizes["fsdp"], sizes["tensor"]
    A = built.num_micro
    n_local = _data_replica_elements(built.state_in["params"], sizes)  # one data rank's parameters
    sync = built.sync
    red_b = np.dtype(sync.dtype if sync is not None else "float32").itemsize  # sharding.grad_reduce_dtype
    sp = sequence_parallel(built)

    def split(r):
        """(parameter bytes, activation bytes) of one execution. With this project's rules
        parameters and their gradients move only over data / fsdp (gradient sums, ZeRO-1 and
        FSDP gathers), activations over tensor / stage; sums under 4 KiB (loss, norms,
        counters) are neither."""
        if r.bytes < 4096 or not r.axes:
            return 0, 0
        return (r.bytes, 0) if set(r.axes) <= {"data", "fsdp"} else (0, r.bytes)

    groups: dict[str, dict] = {}
    rows = []
    for r in recs:
        pb, ob = split(r)
        ratio = r.wire_bytes / r.bytes if r.bytes else 0.0
        axes = "+".join(r.axes) if r.axes else "-"
        key = f"{r.kind} over {axes}"
        g = groups.setdefault(key, {"ops": 0, "executions": 0, "wire_gib": 0.0, "parameter_wire_gib": 0.0})
        g["ops"] += 1
        g["executions"] += r.trip_count_product
        g["wire_gib"] += r.wire_bytes_per_step / GIB
        g["parameter_wire_gib"] += pb * ratio * r.trip_count_product / GIB
        rows.append((r, pb, ob, ratio))

    # Theory, per device per step (wire bytes, ring algorithms):
    theory = {}
    if dp > 1:  # the floor: one gradient reduction per step, plus the ZeRO-1 gather of the working copy
        frac = (dp - 1) / dp
        if built.zero1:
            wire = frac * n_local * (red_b + dtype_bytes)
            formula = (f"(n-1)/n x P x ({red_b} B reduce-scatter of the gradients + {dtype_bytes} B all-gather of "
                       "the working copy)")
        else:
            wire = 2 * frac * n_local * red_b
            formula = f"2 x (n-1)/n x P x {red_b} B (one all-reduce of the gradients)"
        theory["gradient_sum_over_data"] = {
            "wire_gib": wire / GIB,
            "formula": formula + f"; P = {n_local:,} parameters per data rank, n = data x fsdp = {dp}, once per "
                       "step (gradients accumulate locally over the accumulation steps)"}
    b = tc.global_batch_size // A // dp  # rows per device per accumulation step
    act = b * tc.seq_len * cfg.hidden_size * dtype_bytes  # one [b, T, D] activation
    if S > 1:
        s = built.pipeline
        M = s.microbatches or 2 * S
        ticks = M * s.repeats + S - 1
        theory["pipeline_sends_over_stage"] = {
            "wire_gib": 2 * ticks * (act / M / (tp if sp else 1)) * A / GIB,
            "formula": f"2 (fwd, bwd) x {ticks} ticks x one micro-batch activation [b/M, T, D]"
                       + (f" split over tensor {tp} (sequence parallelism)" if sp else "") + f" x {A} accumulation steps"}
    if tp > 1:  # every stage runs its L/S layers at every tick, bubbles included
        L = cfg.num_layers // S
        runs, piece = (ticks, act / M) if S > 1 else (1, act)
        per_layer = 4 + (2 if getattr(cfg, "remat", "none") == "full" else 0)
        theory["tensor_parallel_sums"] = {
            "wire_gib": per_layer * L * runs * A * 2 * (tp - 1) / tp * piece / GIB,
            "formula": f"{per_layer} all-reduces of [b, T, D] per layer (2 fwd, 2 bwd"
                       + (", 2 recomputed under full remat" if per_layer == 6 else "") + ")"
                       + (" as reduce-scatter + all-gather pairs (sequence parallelism; the same bytes)" if sp else "")
                       + f" x {L} layers"
                       + (f" x {ticks} ticks" if S > 1 else "") + f" x {A} accumulation steps"}
        if sp and getattr(cfg, "remat", "none") in ("dots", "save_proj"):
            theory["sequence_parallel_regathers"] = {
                "wire_gib": 2 * L * runs * A * (tp - 1) / tp * piece / GIB,
                "formula": "2 all-gathers of [b, T, D] per layer in the backward pass (the attention and MLP "
                           "inputs: kept split over tensor, gathered again for the weight gradients; "
                           f"remat {cfg.remat!r} does not save them) x {L} layers"
                           + (f" x {ticks} ticks" if S > 1 else "") + f" x {A} accumulation steps"}

    measured = {
        "parameters_over_data_fsdp": sum(pb * ratio * r.trip_count_product for r, pb, ob, ratio in rows
                                      if r.axes and set(r.axes) <= {"data", "fsdp"}) / GIB,
        "over_stage": sum(r.wire_bytes_per_step for r, *_ in rows if r.axes == ("stage",)
                          and r.kind == "collective-permute") / GIB,
        "over_tensor": sum(r.wire_bytes_per_step for r, *_ in rows if r.axes == ("tensor",)) / GIB,
    }
    # Named: what theory does not explain (largest first), and parameter traffic that runs
    # more often than once per accumulation step.
    need = theory.get("gradient_sum_over_data", {}).get("wire_gib", 0.0)
    excess = dp > 1 and measured["parameters_over_data_fsdp"] > 1.1 * need  # more than one sum per step
    unexplained = []
    for r, pb, ob, ratio in sorted(rows, key=lambda x: -x[0].wire_bytes_per_step):
        axes = set(r.axes or ())
        why = None
        if r.wire_bytes_per_step < 2 ** 20 and r.wire_bytes < 4096:
            continue  # scalars and small sums (loss, norms, counters)
        if pb and "fsdp" in axes and axes <= {"data", "fsdp"}:
            continue  # FSDP gathers weights and scatters gradients per layer by design
        if pb and axes == {"data"} and r.trip_count_product > 1 and excess:
            why = (f"parameter/gradient {r.kind} over data runs {r.trip_count_product}x per step ({A} accumulation "
                   f"steps, {cfg.num_layers // S} layers per stage); all such traffic "
                   f"{measured['parameters_over_data_fsdp']:.1f} GiB vs {need:.1f} GiB for one sum per step")
        elif axes == {"stage"} and r.kind == "collective-permute":
            continue
        elif axes == {"tensor"} and r.kind in ("all-reduce", "all-gather", "reduce-scatter"):
            continue
        elif pb and axes <= {"data", "fsdp"}:
            continue  # one gradient sum per step, split per parameter or layer
        elif axes == {"stage"} and r.kind == "all-reduce":
            why = "all-reduce over stage (the pipeline's output broadcast / input gradient)"
        else:
            why = f"{r.kind} over {'+'.join(r.axes) if r.axes else 'no axis'} of non-parameter data"
        unexplained.append({"why": why, "kind": r.kind, "wire_gib_per_step": r.wire_bytes_per_step / GIB,
                            "executions": r.trip_count_product, "shape": r.shape[:4], "dtype": r.dtype,
                            "source": r.source, "op_name": (r.op_name or "")[-120:]})
    return {"by_kind_and_axes": groups, "measured_wire_gib": measured, "theory": theory,
            "not_explained": unexplained[:top],
            "total_wire_gib": sum(r.wire_bytes_per_step for r in recs) / GIB,
            "note": "per device per step; wire bytes are what each device sends under ring algorithms"}


def sequence_parallel(built) -> bool:
    """Whether the planned step runs with sequence parallelism (`sharding.sequence_parallel`)."""
    from meditron_jax.distributed import sharding
    return sharding.sequence_parallel(built.rules or {})


def _remat_warnings(log: str) -> dict:
    lines = [ln.strip() for ln in log.splitlines()]
    inv = [ln for ln in lines if "involuntary full rematerialization" in ln.lower()]
    other = [ln for ln in lines if "rematerializ" in ln.lower() and ln not in inv]
    return {"involuntary_full_rematerialization": len(inv), "examples": [ln[-300:] for ln in inv[:3]],
            "rematerialization_notes": [ln[-300:] for ln in other[:5]]}


def verdict(total_gib: float, usable_bytes: int | None) -> dict:
    if usable_bytes is None:
        return {"fits": True, "text": "no memory limit on XLA:CPU (use --target for a GPU or TPU)",
                "limit_gib": None, "margin_gib": None}
    limit = usable_bytes / GIB
    margin = limit - total_gib
    text = f"fits with {margin:.1f} GiB to spare" if margin >= 0 else f"over by {-margin:.1f} GiB"
    return {"fits": margin >= 0, "text": text, "limit_gib": limit, "margin_gib": margin}


def report(built, explain: bool = False, top: int = 12) -> dict:
    """The plan of a compiled step (a `plan.Built`); `plan.plan()` = compile + this."""
    from meditron_jax.plan import hlo_stats
    from meditron_jax.training.metrics import flops_per_token
    cfg, tc, sizes, tgt = built.cfg, built.tc, built.mesh_sizes, built.target
    params_b = _per_device_bytes(built.state_in["params"])
    opt_b = _per_device_bytes(built.state_in["opt_state"])
    G, T = tc.global_batch_size, tc.seq_len
    n_params = cfg.num_params()
    shard_ways = sizes["stage"] * sizes["tensor"] * sizes["fsdp"]
    report = {
        "target": {"name": tgt.name, "platform": tgt.platform, "device_kind": tgt.device_kind,
                   "topology": tgt.topology, "usable_gib": tgt.usable_bytes / GIB if tgt.usable_bytes else None,
                   "usable_note": tgt.usable_note},
        "model": {"preset": cfg.to_dict(), "params": n_params},
        "mesh": sizes, "devices": len(tgt.devices), "zero1": built.zero1, "sequence_parallel": sequence_parallel(built),
        "batch": {"global": G, "micro": tc.micro_batch_size, "seq_len": T, "accumulation_steps": built.num_micro},
        "floor_gib_16_bytes_per_param": 16 * n_params / shard_ways / GIB,
        "model_flops_per_step": flops_per_token(cfg, T) * G * T,
        "lower_seconds": built.lower_seconds, "compile_seconds": built.compile_seconds,
        "rematerialization": _remat_warnings(built.native_log),
    }
    if sizes["stage"] > 1:
        from meditron_jax.training import pipeline
        s = built.pipeline
        m = s.microbatches or 2 * sizes["stage"]
        report["pipeline"] = {"stages": sizes["stage"], "microbatches": m, "repeats": s.repeats,
                              "bubble_fraction": pipeline.bubble_fraction(sizes["stage"], m, s.repeats)}
    mod = built.hlo()  # None when the compiler refused the step
    if built.compiled is None:  # the target's compiler refused: over its memory
        nums = _hbm_numbers(built.hbm_error)
        temp_b = int(nums.get("temporaries_gib", 0) * GIB)
        report["compile_error"] = built.hbm_error[:600]
    else:
        mem = built.compiled.memory_analysis()
        temp_b = int(getattr(mem, "temp_size_in_bytes", 0) or 0) if mem is not None else 0
        if mem is not None:
            report["memory_analysis_gib"] = {
                k: getattr(mem, f"{k}_size_in_bytes", 0) / GIB
                for k in ("argument", "output", "alias", "temp", "generated_code")}
    total_b = params_b + opt_b + temp_b
    report["per_device_gib"] = {"params": params_b / GIB, "optimizer_state": opt_b / GIB,
                                "temporaries": temp_b / GIB, "total": total_b / GIB}
    v = verdict(total_b / GIB, tgt.usable_bytes)
    if built.compiled is None:
        nums = _hbm_numbers(built.hbm_error)
        over = nums.get("over_gib")
        if over is None and "available_gib" in nums:
            over = total_b / GIB - nums["available_gib"]
        v = {"fits": False, "limit_gib": nums.get("available_gib", v["limit_gib"]),
             "margin_gib": -over if over is not None else None,
             "text": (f"over by {over:.1f} GiB" if over is not None else "over the device memory")
                     + f" (the {tgt.device_kind} compiler refused the step: out of memory)"}
    report["verdict"] = v
    if mod is not None:
        xla_flops = None
        try:
            ca = built.compiled.cost_analysis()
            if isinstance(ca, list):
                ca = ca[0] if ca else None
            xla_flops = float(ca["flops"]) * len(tgt.devices) if ca and "flops" in ca else None
        except Exception:  # noqa: BLE001 - some compile-only targets give no cost analysis
            xla_flops = None
        dot, ndots = hlo_stats.dot_flops(mod)
        report["flops"] = {
            "model_per_step": report["model_flops_per_step"],
            "xla_cost_analysis_per_step": xla_flops,
            "hlo_dots_per_step": dot * len(tgt.devices) if ndots else None, "hlo_dot_ops": ndots,
            "note": "XLA counts are per device x devices; hlo_dots counts dot/gemm ops weighted by loop trip "
                    "counts (attention custom calls and convolutions excluded)"}
        report["collectives"] = collective_report(built, mod, top)
        report["attention"] = hlo_stats.attention_report(mod, T)
    if built.dump_dir and (explain or built.compiled is None):
        report["largest_buffers"] = largest_buffers(built.dump_dir, mod, top)
    return report


def print_report(report: dict, explain: bool):
    g, t, v = report["per_device_gib"], report["target"], report["verdict"]
    print(f"target {t['name']}: {report['devices']} x {t['device_kind']} ({t['topology']}); "
          f"mesh {report['mesh']}; batch {report['batch']}"
          + ("; sequence parallel (residual stream split over tensor)" if report.get("sequence_parallel") else ""))
    print(f"per device: params {g['params']:.2f} GiB + optimizer {g['optimizer_state']:.2f} GiB + "
          f"temporaries {g['temporaries']:.2f} GiB = {g['total']:.2f} GiB "
          f"(floor 16 B/param / shards: {report['floor_gib_16_bytes_per_param']:.2f} GiB)")
    if t["usable_gib"] is not None:
        print(f"usable per device: {t['usable_gib']:.1f} GiB ({t['usable_note']})")
    print(f"verdict: {v['text']}")
    if "compile_error" in report:
        print(f"compiler: {report['compile_error'][:300]}")
    fl = report.get("flops")
    if fl:
        xla, dots = fl["xla_cost_analysis_per_step"], fl["hlo_dots_per_step"]
        xla_s = "n/a on this target" if xla is None else f"{xla:.3e}"
        dots_s = "n/a (no dot ops: convolutions)" if dots is None else f"{dots:.3e}"
        print(f"FLOPs per step: model {fl['model_per_step']:.3e}; XLA cost analysis {xla_s}; HLO dots {dots_s}")
    else:
        print(f"model FLOPs per step {report['model_flops_per_step']:.3e}")
    print(f"lower {report['lower_seconds']:.1f} s, compile {report['compile_seconds']:.1f} s")
    rm = report["rematerialization"]
    if rm["involuntary_full_rematerialization"]:
        print(f"warning: {rm['involuntary_full_rematerialization']} involuntary full rematerialization(s) "
              f"(a sharding XLA could not reach without replicating a tensor), e.g. {rm['examples'][0][-200:]}")
    for note in rm["rematerialization_notes"]:
        print(f"compiler: {note[-200:]}")
    if "pipeline" in report:
        print(f"pipeline: {report['pipeline']}")
    c = report.get("collectives")
    if c:
        print(f"collectives per device per step ({c['total_wire_gib']:.3f} GiB sent):")
        for k, e in sorted(c["by_kind_and_axes"].items(), key=lambda kv: -kv[1]["wire_gib"]):
            print(f"  {k:<34} {e['executions']:>6} runs  {e['wire_gib']:9.4f} GiB"
                  f"  (parameters/gradients {e['parameter_wire_gib']:.4f})")
        for k, th in c["theory"].items():
            print(f"  theory {k}: {th['wire_gib']:.4f} GiB = {th['formula']}")
        m = c["measured_wire_gib"]
        print(f"  measured: parameters/gradients over data/fsdp {m['parameters_over_data_fsdp']:.4f} GiB, "
              f"over stage {m['over_stage']:.4f} GiB, over tensor {m['over_tensor']:.4f} GiB")
        for u in c["not_explained"]:
            print(f"  not explained: {u['why']}: {u['wire_gib_per_step']:.4f} GiB, {u['executions']} runs, "
                  f"{u['dtype']}{list(u['shape'][0]) if u['shape'] else ''} at {u['source']}")
    a = report.get("attention")
    if a:
        calls = ", ".join(f"{k} x{n}" for k, n in sorted(a["kernel_calls"].items())) or "none (XLA ops)"
        print(f"attention kernels: {calls}")
        for what, key in (("largest T x S array", "largest_seq_by_seq_array"),
                          ("largest attention value", "largest_attention_value")):
            b = a[key]
            print(f"  {what}: " + ("none" if b is None else
                                   f"{b['bytes'] / GIB:.3f} GiB {b['shape']} {b['op']} {b['source'] or ''}"))
    if "largest_buffers" in report:
        print("largest temporary buffers per device:")
        for b in report["largest_buffers"]:
            print(f"  {b['gib']:8.3f} GiB {b['kind']:<9} {b['shape']:<40} {b['op'] or ''} {b['source'] or ''}")


# ---- per-device memory of a compiled step, without the rest of the report (plan --search) ----

def per_device_memory(built) -> dict:
    """{params, optimizer_state, temporaries, total} GiB per device and the verdict, as
    `report` computes them (the compiler's temporaries; its own numbers when it refused)."""
    params_b = _per_device_bytes(built.state_in["params"])
    opt_b = _per_device_bytes(built.state_in["opt_state"])
    if built.compiled is None:
        temp_b = int(_hbm_numbers(built.hbm_error).get("temporaries_gib", 0) * GIB)
    else:
        mem = built.compiled.memory_analysis()
        temp_b = int(getattr(mem, "temp_size_in_bytes", 0) or 0) if mem is not None else 0
    total = (params_b + opt_b + temp_b) / GIB
    v = verdict(total, built.target.usable_bytes)
    if built.compiled is None:
        v = dict(v, fits=False, text="over the device memory (the compiler refused the step)")
    return {"params": params_b / GIB, "optimizer_state": opt_b / GIB, "temporaries": temp_b / GIB, "total": total,
            "verdict": v}
