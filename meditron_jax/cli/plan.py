"""`meditron-jax plan`: the flags and the printed verdict (exit 0 fits, 1 does not fit, 2 user
error); the compile is `plan.compile`, the report `plan.report`, the predicted step time
`plan.step_time`, the layout search (`--search`, `--candidates`) `plan.search`."""

from __future__ import annotations

import json
import os
import time

from meditron_jax.errors import UserError
from meditron_jax.plan.compile import plan
from meditron_jax.plan.report import print_report

HF_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
             "num_layers": "num_layers", "num_heads": "num_heads", "num_kv_heads": "num_kv_heads",
             "max_position_embeddings": "max_position_embeddings", "rms_norm_eps": "rms_norm_eps",
             "rope_theta": "rope_theta"}


def add_arguments(p):
    p.add_argument("--gin_file", action="append", default=[], help="gin config file (repeatable)")
    p.add_argument("--gin_param", action="append", default=[], help="gin binding (repeatable)")
    p.add_argument("--target", default="cpu",
                   help="cpu (default), a100-80gb, a100-40gb, h100-80gb, h200, or a TPU slice: "
                        "v5p-N, v5e-N, v6e-N, v4-N")
    p.add_argument("--devices", type=int, default=None,
                   help="number of devices where the target does not fix it (cpu: simulated; "
                        "GPU targets: default one host of 8, or --nodes x --gpus_per_node)")
    p.add_argument("--explain", action="store_true",
                   help="list the largest buffers of the compiled step with their source lines")
    p.add_argument("--top", type=int, default=12, help="how many buffers / collectives / ranked rows to list")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    g = p.add_argument_group("the model (beyond the gin files)")
    g.add_argument("--hf_config", default=None,
                   help="a Hugging Face Llama config.json: its shape as model.* overrides (tied embeddings are refused)")
    g = p.add_argument_group("the cluster (step-time prediction)")
    g.add_argument("--nodes", type=int, default=None, help="GPU nodes (default: devices / gpus per node)")
    g.add_argument("--gpus_per_node", type=int, default=None, help="GPUs per node (default 8)")
    g.add_argument("--node_network_gbps", type=float, default=None,
                   help="network cards of one node, Gb/s per direction (default: the reference system's, "
                        "e.g. DGX H100 8 x 400)")
    g.add_argument("--system", default="dgx", choices=("dgx", "meditron"),
                   help="dgx: one network card per GPU; meditron: the Meditron card's node (8 x A100-SXM4-80GB, "
                        "NVSwitch, one ConnectX-6 Dx for the node)")
    g.add_argument("--slices", type=int, default=1, help="TPU: the devices as this many slices joined by DCN")
    g = p.add_argument_group("layout search")
    g.add_argument("--search", action="store_true", help="compile the layouts this run can use and rank them")
    g.add_argument("--candidates", default=None,
                   help="rank the layouts of this CSV or JSON file (data, tensor, stage, fsdp, micro, zero1, remat; "
                        "optional microbatches, repeats) instead of enumerating")
    g.add_argument("--max_candidates", type=int, default=100, help="layouts to compile at most (default 100)")
    g.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="compiles in parallel (processes; 0: in this process; default 2)")
    g.add_argument("--layout_timeout_s", type=float, default=300,
                   help="stop a layout's compile after this long and rank it as failed (default %(default)g; "
                        "needs --workers >= 1)")
    g.add_argument("--out", default="plan_search.jsonl", help="search rows, one JSON line each (default %(default)s)")
    g.add_argument("--exact_compile", action="store_true",
                   help="search with the compiler's default passes (slower; see docs/planning.md)")


def hf_params(path: str) -> list[str]:
    """model.* overrides from a Hugging Face config.json (checked as `LlamaConfig.from_hf` checks it;
    rope_scaling changes no shape or FLOP and is set aside for planning)."""
    from meditron_jax.models.config import LlamaConfig
    try:
        with open(path) as fh:
            hf = json.load(fh)
    except (OSError, ValueError) as e:
        raise UserError(f"--hf_config {path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(hf, dict):
        raise UserError(f"--hf_config {path}: not a JSON object")
    hf = {k: v for k, v in hf.items() if k != "rope_scaling"}
    try:
        cfg = LlamaConfig.from_hf(hf)
    except KeyError as e:
        raise UserError(f"--hf_config {path}: missing {e}") from None
    return [f"model.{k}={getattr(cfg, f)!r}" for k, f in HF_FIELDS.items()]


def _network(args) -> dict:
    return {"gpus_per_node": args.gpus_per_node, "node_network_gbps": args.node_network_gbps,
            "system_name": args.system, "slices": args.slices}


def _devices(args) -> int | None:
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    if not args.layout_timeout_s > 0:
        raise UserError(f"--layout_timeout_s must be > 0, got {args.layout_timeout_s:g}")
    for name in ("devices", "nodes", "gpus_per_node", "slices", "max_candidates"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name} must be >= 1, got {v}")
    if args.nodes is not None:
        n = args.nodes * (args.gpus_per_node or 8)
        if args.devices is not None and args.devices != n:
            raise UserError(f"--devices {args.devices} is not --nodes {args.nodes} x {args.gpus_per_node or 8} GPUs")
        return n
    return args.devices


def run(args) -> int:
    devices = _devices(args)
    params = list(args.gin_param)
    if args.hf_config:
        params = hf_params(args.hf_config) + params
    if args.search or args.candidates:
        return _search(args, params, devices)
    result = plan(args.gin_file, params, devices, args.target, args.explain, args.top, _network(args))
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        print_report(result, args.explain)
        if "step_time" in result:
            from meditron_jax.plan.step_time import print_prediction
            print_prediction(result["step_time"])
    return 0 if result["verdict"]["fits"] else 1


def _search(args, params, devices) -> int:
    from meditron_jax.plan import layouts, search
    if args.target.lower() == "cpu":
        raise UserError("--search predicts step time on a GPU or TPU target: give --target")
    if devices is None:
        raise UserError("--search needs --devices (or --nodes)")
    spec = search.Spec(list(args.gin_file), params, args.target, devices, args.gpus_per_node,
                       {k: v for k, v in _network(args).items() if k != "gpus_per_node"}, fast=not args.exact_compile)
    sp = search.has_gin_param("sharding.sequence_parallel")
    cands = layouts.read_candidates(args.candidates, sp) if args.candidates else None
    run_cfg = search.base_run(spec)
    t0, load0 = time.time(), search.cpu_load()
    chosen, notes = search.choose(spec, run_cfg, args.max_candidates, cands, True if sp else None)
    base = search.own_layout(run_cfg, False if sp else None)
    invalid = notes.pop("invalid", [])
    header = {"target": args.target, "devices": devices, "gin_files": args.gin_file, "gin_params": params,
              "network": spec.network, "fast_compile": spec.fast, "layout_timeout_s": args.layout_timeout_s, **notes}
    rows, completed = search.run_search(spec, chosen, args.out, args.workers, header, invalid, args.layout_timeout_s)
    order = search.ranked(rows)
    wall = time.time() - t0
    if args.json:
        print(json.dumps({"search": header, "rows": order, "completed": completed, "wall_seconds": wall}, default=str))
    else:
        search.print_table(order, spec, base, max(args.top, 25))
        for line in search.verdicts(order, spec, base):
            print(line)
        best = next((r for r in order if r.get("fits") and "step_seconds" in r), None)
        if best is not None:
            print("best layout, ready to run:\n  " + search.command(spec, best))
        print(f"{len(rows) - len(invalid)} of {len(chosen)} layouts compiled in {wall:.0f} s with {args.workers} worker(s) "
              f"({load0} at the start, {search.cpu_load()} at the end); rows in {args.out}")
    return 0 if any(r.get("fits") for r in rows) else 1
