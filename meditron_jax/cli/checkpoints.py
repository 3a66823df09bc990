"""`meditron-jax checkpoints WORKDIR [--json]`: what a workdir holds, one line per checkpoint.

Columns: step, commit time (UTC, from Orbax's commit timestamp), size on disk, the training loss
logged at that step (recorded in the checkpoint since this version; older checkpoints: looked up
in WORKDIR/metrics.jsonl), and a state: `ok`, `incomplete` (remains of an interrupted save or
deletion: a resume skips it) or, under `checkpoints_unreadable/`, `quarantined`. Reads only
metadata; loads no array. Local paths and gs:// URLs (`paths.py`). Pick one with `train --resume_step N` or `export --step N`.
"""

from __future__ import annotations

import datetime
import json

from meditron_jax.storage import paths
from meditron_jax.errors import UserError


def add_arguments(p):
    p.add_argument("workdir", help="a training workdir (or its checkpoints/ directory)")
    p.add_argument("--json", action="store_true", help="one JSON object per checkpoint instead of a table")


def _size(path: str) -> int:
    return paths.tree_bytes(path)


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _commit_time(step_dir: str) -> str | None:
    try:
        ns = json.loads(paths.read_text(paths.join(step_dir, "_CHECKPOINT_METADATA"))).get("commit_timestamp_nsecs")
        t = ns / 1e9
    except (OSError, ValueError, TypeError, AttributeError):
        t = paths.mtime(step_dir)
        if t is None:
            return None
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _logged_losses(workdir: str) -> dict[int, float]:
    out = {}
    try:
        for line in paths.read_text(paths.join(workdir, "metrics.jsonl")).splitlines():
            try:
                r = json.loads(line)
                if "loss" in r:
                    out[int(r["step"])] = float(r["loss"])
            except (ValueError, KeyError, TypeError):
                continue
    except (OSError, FileNotFoundError):
        pass
    return out


def list_checkpoints(workdir: str) -> list[dict]:
    from meditron_jax.storage import checkpoint as ckpt

    from meditron_jax.storage.workdir import resolve_workdir

    workdir = paths.absolute(resolve_workdir(workdir)).rstrip("/")
    if workdir.endswith("/checkpoints") and not paths.isdir(paths.join(workdir, "checkpoints")):
        workdir = workdir[:-len("/checkpoints")]
    root = ckpt.checkpoint_dir(workdir)
    if not paths.isdir(workdir):
        raise UserError(f"{workdir}: no such workdir")
    if not paths.isdir(root):
        raise UserError(f"{workdir} has no checkpoints/ directory")
    losses = _logged_losses(workdir)
    rows = []
    for where, state_ok in ((root, "ok"), (ckpt.quarantine_dir(workdir), "quarantined")):
        if not paths.isdir(where):
            continue
        for name in paths.listdir(where):
            step_s = name.split(".")[0]
            if not step_s.isdigit():
                continue
            d = paths.join(where, name)
            step = int(step_s)
            state = state_ok if (state_ok != "ok" or ckpt.is_complete(d)) else "incomplete"
            loss = None
            try:
                meta = json.loads(paths.read_text(paths.join(d, "meta", "metadata")))
                loss = meta.get("loss")
            except (OSError, ValueError):
                meta = {}
            if loss is None and state != "quarantined":
                loss = losses.get(step)
            rows.append({"step": step, "time": _commit_time(d), "bytes": _size(d), "loss": loss, "state": state,
                         "path": d, "has_opt_state": paths.isdir(paths.join(d, "opt_state")),
                         "tokenizer_stored": bool((meta.get("tokenizer") or {}).get("model_b64"))
                         if isinstance(meta.get("tokenizer"), dict) else False})
    rows.sort(key=lambda r: (r["state"] == "quarantined", r["step"]))
    return rows


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
