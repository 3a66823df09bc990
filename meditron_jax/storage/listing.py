"""What a workdir holds: one record per checkpoint step, from metadata alone (no array is read).

Owns `list_checkpoints(workdir)` (`meditron-jax checkpoints WORKDIR`): for each step under
`checkpoints/` and `checkpoints_unreadable/`, its commit time (UTC, from Orbax's commit
timestamp), size on disk, the training loss logged at that step (recorded in the checkpoint's
`meta` since it carries one; older checkpoints: looked up in metrics.jsonl) and a state: `ok`,
`incomplete` (remains of an interrupted save or deletion: a resume skips it) or `quarantined`
(set aside by a resume). Local paths and gs:// URLs (`paths.py`).
Does not own: how the listing is printed (cli/checkpoints.py).
"""

from __future__ import annotations

import datetime
import json

from meditron_jax.errors import UserError
from meditron_jax.storage import checkpoint as ckpt
from meditron_jax.storage import paths
from meditron_jax.storage.workdir import Workdir


def list_checkpoints(workdir: Workdir | str) -> list[dict]:
    """Rows {step, time, bytes, loss, state, path, has_opt_state, tokenizer_stored}: the run's
    checkpoints by step, then the quarantined ones. `workdir` may also be its checkpoints/ dir."""
    wd = Workdir.resolve(workdir)
    if wd.root.endswith("/" + Workdir.CHECKPOINTS) and not paths.isdir(wd.checkpoints):
        wd = Workdir(wd.root[:-len(Workdir.CHECKPOINTS) - 1])
    if not paths.isdir(wd.root):
        raise UserError(f"{wd}: no such workdir")
    if not paths.isdir(wd.checkpoints):
        raise UserError(f"{wd} has no {Workdir.CHECKPOINTS}/ directory")
    losses = _logged_losses(wd)
    rows = []
    for where, state_ok in ((wd.checkpoints, "ok"), (wd.unreadable, "quarantined")):
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
            rows.append({"step": step, "time": _commit_time(d), "bytes": paths.tree_bytes(d), "loss": loss,
                         "state": state, "path": d, "has_opt_state": paths.isdir(paths.join(d, "opt_state")),
                         "tokenizer_stored": bool((meta.get("tokenizer") or {}).get("model_b64"))
                         if isinstance(meta.get("tokenizer"), dict) else False})
    rows.sort(key=lambda r: (r["state"] == "quarantined", r["step"]))
    return rows


def _commit_time(step_dir: str) -> str | None:
    try:
        ns = json.loads(paths.read_text(paths.join(step_dir, "_CHECKPOINT_METADATA"))).get("commit_timestamp_nsecs")
        t = ns / 1e9
    except (OSError, ValueError, TypeError, AttributeError):
        t = paths.mtime(step_dir)
        if t is None:
            return None
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _logged_losses(workdir: Workdir) -> dict[int, float]:
    out = {}
    try:
        for line in paths.read_text(workdir.metrics).splitlines():
            try:
                r = json.loads(line)
                if "loss" in r:
                    out[int(r["step"])] = float(r["loss"])
            except (ValueError, KeyError, TypeError):
                continue
    except (OSError, FileNotFoundError):
        pass
    return out
