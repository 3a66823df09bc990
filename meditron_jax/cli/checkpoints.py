"""`meditron-jax checkpoints WORKDIR [--json]`: what a workdir holds, one line per checkpoint.

Columns: step, commit time (UTC), size on disk, the training loss logged at that step, and a
state: `ok`, `incomplete` (a resume skips it) or `quarantined` (`storage.listing`, which reads
only metadata). Pick one with `train --resume_step N` or `export --step N`.
"""

from __future__ import annotations

import json

from meditron_jax.storage.listing import list_checkpoints


def add_arguments(p):
    p.add_argument("workdir", help="a training workdir (or its checkpoints/ directory)")
    p.add_argument("--json", action="store_true", help="one JSON object per checkpoint instead of a table")


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def run(args) -> int:
    rows = list_checkpoints(args.workdir)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    if not rows:
        print(f"{args.workdir}: no checkpoints")
        return 0
    print(f"{'step':>8}  {'time (UTC)':<20}  {'size':>10}  {'loss':>8}  state")
    for r in rows:
        loss = f"{r['loss']:.4f}" if isinstance(r["loss"], (int, float)) else "-"
        print(f"{r['step']:>8}  {r['time'] or '-':<20}  {human_size(r['bytes']):>10}  {loss:>8}  {r['state']}")
    return 0
