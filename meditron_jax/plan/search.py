"""`meditron-jax plan --search` / `--candidates`: compile layouts for a target, rank them by
predicted step time.

Owns: the search run: the base configuration read once, the layouts to compile (enumerated
and pruned by `plan.layouts`, or read from `--candidates`), the compiles in worker processes
(`plan.workers`: each the real step of `plan.compile.compile_step` with the layout's gin
overrides, predicted by `plan.step_time`, within a time limit), one JSON line per finished layout in `--out` (written as it finishes: an
interrupted search keeps its rows), the progress bar, the ranked table and the best layout's
command. Does not own: what a layout is (`plan.layouts`), compiling (`plan.compile`), the time
model (`plan.step_time`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from types import SimpleNamespace

from meditron_jax import console
from meditron_jax.errors import UserError
from meditron_jax.plan import layouts as lay

GIB = 2 ** 30
CARD_8XA100 = {"data": 2, "stage": 4, "tensor": 1, "fsdp": 1}  # the Meditron card's one-node layout


@dataclasses.dataclass
class Spec:
    gin_files: list
    gin_params: list
    target: str
    devices: int
    gpus_per_node: int | None = None
    network: dict = dataclasses.field(default_factory=dict)  # hardware.system keyword arguments
    fast: bool = True  # compile with plan.compile.FAST_COMPILE


def has_gin_param(name: str) -> bool:
    """Whether this build's configurables take `name` (e.g. `sharding.sequence_parallel`)."""
    import gin

    from meditron_jax.training.config import register_configurables
    register_configurables()
    gin.clear_config()
    try:
        gin.parse_config(f"{name} = None")
        return True
    except (ValueError, KeyError):
        return False
    finally:
        gin.clear_config()


def base_run(spec: Spec):
    """The gin configuration's RunConfig (no devices built, no weights read)."""
    from meditron_jax.plan.compile import parse_for_plan
    from meditron_jax.training.config import read_run_config
    parse_for_plan(spec.gin_files, spec.gin_params)
    return read_run_config(num_devices=spec.devices)


def own_layout(run, sp: bool | None) -> lay.Layout:
    s = run.mesh_sizes
    M = (run.pipeline.microbatches or 2 * s["stage"]) if s["stage"] > 1 else None
    return lay.Layout(s["data"], s["fsdp"], s["tensor"], s["stage"], run.train.micro_batch_size, bool(run.zero1),
                      run.model.remat, M, run.pipeline.repeats if s["stage"] > 1 else 1, sp)


def synthetic_system(spec: Spec):
    """A `hardware.System` over `spec.devices` in mesh order, without the target's devices
    (for the analytical pre-ranking)."""
    from meditron_jax.plan import hardware
    per = spec.gpus_per_node or 8
    devs = [SimpleNamespace(process_index=i // per, id=i, coords=(i, 0, 0)) for i in range(spec.devices)]
    net = {k: v for k, v in spec.network.items() if k in ("node_network_gbps", "system_name")}
    return hardware.system(spec.target, devs, **net) if spec.target.lower() != "cpu" else None


def choose(spec: Spec, run, max_candidates: int, candidates: list | None, sp: bool | None = None,
           log=print) -> tuple[list, dict]:
    """The layouts to compile: `candidates` (checked), else every layout that survives
    divisibility and the memory floor, ordered by `layouts.quick_estimate` and cut at
    `max_candidates`; the configuration's own layout (and on one 8-GPU A100 node, the card's
    DP2 x PP4) always included. `sp`: True where the build has `sharding.sequence_parallel`
    (None: it has not). Returns (layouts, notes)."""
    from meditron_jax.plan import targets
    cfg, tc = run.model, run.train
    usable = targets.usable_bytes(spec.target)
    notes = {"sequence_parallel_in_build": sp is not None}
    if candidates is not None:
        notes.update(source="candidates file", invalid=[])
        out = []
        for c in candidates:
            why = lay.check(c, cfg, tc.global_batch_size, tc.seq_len, spec.devices)
            if why:
                notes["invalid"].append(dict(_row_head(c), fits=False, error=f"cannot run: {why}"))
            else:
                out.append(c)
        log(f"layouts: {len(candidates)} candidates, {len(out)} to compile"
            + (f", {len(notes['invalid'])} the project cannot run" if notes["invalid"] else ""))
        return out, notes
    found, dropped = lay.enumerate_layouts(cfg, tc.global_batch_size, tc.seq_len, spec.devices,
                                           sequence_parallel=sp is not None)
    keep = [x for x in found if not usable or lay.memory_floor(x, cfg, tc.seq_len) <= usable]
    dropped["memory floor over the device"] = len(found) - len(keep)
    sysm = synthetic_system(spec)
    if sysm is not None:
        est = {x: lay.quick_estimate(x, cfg, tc.global_batch_size, tc.seq_len, sysm) for x in keep}
        keep.sort(key=est.get)
        keep = _spread(keep)
    own = own_layout(run, False if sp else None)
    why = lay.check(own, cfg, tc.global_batch_size, tc.seq_len, spec.devices)
    forced = [own] if why is None else []
    if why:
        log(f"the gin's own layout ({own.label()}) cannot run: {why}")
    if spec.devices == 8 and spec.target.startswith("a100"):
        forced += [x for x in keep if all(getattr(x, k) == v for k, v in CARD_8XA100.items())][:1]
    chosen = forced + [x for x in keep if x not in forced][:max(0, max_candidates - len(forced))]
    notes.update(enumerated=len(found) + sum(v for k, v in dropped.items() if k != "memory floor over the device"),
                 dropped=dropped, survived=len(keep), compiled=len(chosen))
    log(f"layouts: {notes['enumerated']} enumerated; dropped " + ", ".join(f"{v} {k}" for k, v in dropped.items() if v)
        + f"; {len(keep)} left, {len(chosen)} to compile" + (f" (the first {max_candidates} by a rough analytical "
                                                              "estimate)" if len(keep) > len(chosen) else ""))
    return chosen, notes


def _spread(ordered: list, per_family: int = 3) -> list:
    """`ordered` with the first `per_family` of each (tensor, stage) mesh family moved to the
    front (in order): a cut by the rough estimate keeps every family's best few."""
    seen: dict = {}
    head = []
    for x in ordered:
        k = (x.tensor, x.stage)
        if seen.get(k, 0) < per_family:
            seen[k] = seen.get(k, 0) + 1
            head.append(x)
    taken = set(head)
    return head + [x for x in ordered if x not in taken]


# ---- one layout, in a worker ---------------------------------------------------------------

def _worker_init():
    console.import_jax_quietly()
    from meditron_jax.plan import targets
    targets.compile_on_host()
    console.start_backends_quietly()


def evaluate(spec: Spec, layout: lay.Layout) -> dict:
    """Compile `layout` on the target and predict its step: one result row."""
    from meditron_jax.plan.compile import compile_step
    from meditron_jax.plan.report import per_device_memory
    from meditron_jax.plan import step_time
    row = _row_head(layout)
    t0 = time.perf_counter()
    try:
        built = compile_step(spec.gin_files, list(spec.gin_params) + layout.gin_params(), spec.devices, spec.target,
                             per_host=spec.gpus_per_node, fast=spec.fast)
    except UserError as e:
        return dict(row, error=str(e), fits=False, wall_seconds=time.perf_counter() - t0)
    mem = per_device_memory(built)
    row.update(memory_gib={k: mem[k] for k in ("params", "optimizer_state", "temporaries", "total")},
               limit_gib=mem["verdict"]["limit_gib"], fits=mem["verdict"]["fits"],
               compile_seconds=built.compile_seconds, lower_seconds=built.lower_seconds)
    if built.compiled is not None:
        p = step_time.predict_built(built, spec.network)
        row.update({k: p[k] for k in ("step_seconds", "tokens_per_s_per_device", "mfu", "dominant")},
                   breakdown_seconds=p["breakdown_seconds"])
    row["wall_seconds"] = time.perf_counter() - t0
    return row


def _row_head(layout: lay.Layout) -> dict:
    return {"layout": layout.as_dict(), "label": layout.label(), "gin_params": layout.gin_params()}


def _evaluate_star(args):
    spec, layout = args
    try:
        return evaluate(spec, layout)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - one layout's failure is a row, not the end of the search
        return dict(_row_head(layout), fits=False, error=f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")


def _in_workers(spec: Spec, chosen: list, workers: int, timeout_s: float | None):
    """The rows of `chosen` as they finish in `plan.workers`' processes; a layout whose compile
    ran past `timeout_s` or killed its process is a failed row that says so."""
    from meditron_jax.plan.workers import Failure, run_tasks
    tasks = run_tasks([(spec, c) for c in chosen], _evaluate_star, workers, timeout_s, init=_worker_init)
    try:
        for i, row in tasks:
            yield dict(_row_head(chosen[i]), fits=False, error=str(row)) if isinstance(row, Failure) else row
    finally:
        tasks.close()


def run_search(spec: Spec, chosen: list, out_path: str, workers: int = 2, header: dict | None = None,
               done: list | None = None, timeout_s: float | None = None) -> tuple[list, bool]:
    """Compile every layout of `chosen` in `workers` processes (0: in this process, no time
    limit), each within `timeout_s`; append each row to `out_path` (JSON lines, after a header
    line and the rows of `done`) as it finishes. Returns (rows, completed); Ctrl-C stops the
    workers and returns the rows done so far."""
    rows: list[dict] = list(done or [])
    bar = None
    if console.progress_enabled():
        from tqdm import tqdm
        bar = tqdm(total=len(chosen), desc="compiling layouts", unit="layout", file=sys.stderr)
    t0 = time.time()
    results = None
    restore = _interruptible()
    with open(out_path, "w") as fh:
        fh.write(json.dumps({"search": header or {}}, default=str) + "\n")
        for row in rows:
            fh.write(json.dumps(row, default=str) + "\n")
        fh.flush()
        try:
            if workers > 0:
                results = _in_workers(spec, chosen, workers, timeout_s)
            else:
                results = (_evaluate_star((spec, c)) for c in chosen)
            for row in results:
                rows.append(row)
                fh.write(json.dumps(row, default=str) + "\n")
                fh.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(_short(row))
                else:
                    print(f"[{len(rows)}/{len(chosen) + len(done or [])} {time.time() - t0:.0f} s] {row['label']}: {_short(row)}",
                          file=sys.stderr, flush=True)
            completed = True
        except KeyboardInterrupt:
            completed = False
            print(f"interrupted: {len(rows)} of {len(chosen)} layouts done, kept in {out_path}", file=sys.stderr)
        finally:
            if results is not None:
                results.close()  # stops the workers
            if bar is not None:
                bar.close()
            restore()
    return rows, completed


def _interruptible():
    """Ctrl-C (SIGINT, even where a shell started the search with it ignored) and SIGTERM stop
    the search as KeyboardInterrupt, so the rows done are kept and ranked. Returns the undo."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt
    try:
        old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave the handlers alone
        return lambda: None
    return lambda: [signal.signal(s, h) for s, h in old.items()]


def _short(row: dict) -> str:
    if "error" in row:
        return "error: " + row["error"][:80]
    if "step_seconds" not in row:
        return f"over memory ({row['memory_gib']['total']:.1f} GiB)"
    return (f"{row['step_seconds']:.2f} s/step, {row['tokens_per_s_per_device']:,.0f} tok/s/dev, "
            f"{row['memory_gib']['total']:.1f} GiB" + ("" if row["fits"] else " (over)"))


# ---- the result ----------------------------------------------------------------------------

def ranked(rows: list) -> list:
    """Fitting rows by predicted step time, then the rest (over memory, errors)."""
    ok = sorted((r for r in rows if r.get("fits") and "step_seconds" in r), key=lambda r: r["step_seconds"])
    return ok + [r for r in rows if r not in ok]


def print_table(rows: list, spec: Spec, base: lay.Layout, top: int = 25):
    print(f"{'#':>3} {'layout':<44} {'GiB/dev':>8} {'step s':>8} {'tok/s/dev':>10} {'MFU':>6}  dominated by")
    for k, r in enumerate(rows[:top], 1):
        mark = "  <- the gin's own" if r["layout"] == base.as_dict() else ""
        if "step_seconds" in r and r.get("fits"):
            print(f"{k:>3} {r['label']:<44} {r['memory_gib']['total']:>8.1f} {r['step_seconds']:>8.3f} "
                  f"{r['tokens_per_s_per_device']:>10,.0f} {100 * r['mfu']:>5.1f}%  {r['dominant']}{mark}")
        else:
            why = r.get("error") or f"does not fit ({r['memory_gib']['total']:.1f} of {r['limit_gib']:.1f} GiB)"
            print(f"{k:>3} {r['label']:<44} {'-':>8} {'-':>8} {'-':>10} {'-':>6}  {why[:90]}{mark}")
    if len(rows) > top:
        print(f"... {len(rows) - top} more in the JSON")


def verdicts(rows: list, spec: Spec, base: lay.Layout) -> list[str]:
    """Lines that say where the gin's own layout and (on one 8-GPU A100 node) the card's
    DP2 x PP4 rank."""
    fit = [r for r in rows if r.get("fits") and "step_seconds" in r]
    if not fit:
        return ["no layout fits"]
    best = fit[0]
    out = []
    refs = [("the gin's own layout", lambda r: r["layout"] == base.as_dict())]
    if spec.devices == 8 and spec.target.startswith("a100"):
        refs.append(("the Meditron card's DP2 x PP4 x TP1", lambda r: all(r["layout"][k] == v
                                                                       for k, v in CARD_8XA100.items())))
    for name, match in refs:
        hits = [r for r in fit if match(r)]
        if not hits:
            miss = [r for r in rows if match(r)]
            out.append(f"{name}: " + ("not compiled" if not miss else "does not fit / failed: "
                                      + (miss[0].get("error") or f"{miss[0]['memory_gib']['total']:.1f} GiB")))
            continue
        h = hits[0]
        k = fit.index(h) + 1
        if h is best:
            out.append(f"{name} ({h['label']}) is the best of {len(fit)} that fit")
        else:
            out.append(f"{name}: best as {h['label']}, rank {k} of {len(fit)}, {h['step_seconds'] / best['step_seconds']:.2f}x "
                       f"the best step ({h['tokens_per_s_per_device']:,.0f} vs {best['tokens_per_s_per_device']:,.0f} "
                       "tokens/s/device)")
    return out


def command(spec: Spec, row: dict) -> str:
    """The ready `train` command of a row (the user's gin files and overrides, then the layout's)."""
    parts = ["meditron-jax train"] + [f"--gin_file {f}" for f in spec.gin_files]
    parts += [f"--gin_param \"{p}\"" for p in list(spec.gin_params) + row["gin_params"]]
    return " ".join(parts) + " --workdir WORKDIR"


def cpu_load() -> str:
    try:
        return "load average " + "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "load average n/a"

