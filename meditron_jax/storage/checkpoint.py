"""Orbax checkpoints: the on-disk layout of a training run and how to save and restore it.

Owns: `WORKDIR/checkpoints/<step>/` with the composite items
  params     PyTree {HF-style name: fp32 array} (canonical layout: stacked [L, ...] layers,
             padded vocab) — the only item export / `train.init_from` / `from_pretrained` read
  opt_state  the optax state (absent in an imported step-0 checkpoint)
  data       the data iterator state (JSON, process-count independent)
  meta       JSON: model config, operative gin config, tokenizer path + fingerprint, format
and restoring onto any mesh (Orbax reshards to the target shardings given).
Also owns resuming safely (`newest_readable`): incomplete steps (remains of an interrupted
deletion) and unreadable ones are moved to `WORKDIR/checkpoints_unreadable/` with a warning,
never deleted, and the newest step that restores is used (docs/reliability.md); in a
multi-host run all processes take that decision together (the newest step every process reads).
Paths are local or `gs://` (`paths.py`, etils epath as Orbax uses it); every read here works on both.
Also owns the training loop's save hook (`CheckpointHook`). Does not own: what the train state
contains (training/state.py), conversion (convert/).

Saves are asynchronous; Orbax writes into a temporary directory and renames it when the
save commits, so a listed step is always complete; the manager deletes leftover temporary
directories of interrupted saves when it opens (`cleanup_tmp_directories`).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated, Any

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp

from meditron_jax.storage import paths
from meditron_jax.models.config import LlamaConfig
from meditron_jax.config.checks import Range
from meditron_jax.errors import UserError

FORMAT = "meditron-jax/1"
ITEMS = ("params", "opt_state", "data", "meta")


class CheckpointError(UserError):
    """A checkpoint the user pointed at is missing, unreadable or does not fit the model."""


class CheckpointUnreadable(CheckpointError):
    """Torn or corrupted checkpoint files (a resume falls back to an older step)."""


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint whose shapes disagree with the model config (a configuration error)."""


@gin.configurable("checkpoint")
def manager_options(keep: Annotated[int, Range(min=1)] = 3, keep_period: Annotated[int | None, Range(min=1)] = None,
                    async_save: bool = True):
    """gin: `checkpoint.keep` (last K kept), `checkpoint.keep_period` (every M-th step kept forever)."""
    return ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_period, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)


def checkpoint_dir(workdir: str) -> str:
    return paths.join(paths.absolute(workdir), "checkpoints")  # a local path or a gs:// URL (paths.py)


def make_manager(workdir: str, options: ocp.CheckpointManagerOptions | None = None) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options or manager_options(),
                                 item_names=ITEMS)


def meta_record(cfg: LlamaConfig, gin_config: str = "", tokenizer: dict | None = None, **extra) -> dict:
    return {"format": FORMAT, "model_config": cfg.to_dict(), "gin_config": gin_config,
            "tokenizer": tokenizer, **extra}


def save(manager: ocp.CheckpointManager, step: int, params, opt_state=None, data_state=None,
         meta: dict | None = None, force: bool = True) -> bool:
    items = {"params": ocp.args.StandardSave(params)}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    if data_state is not None:
        items["data"] = ocp.args.JsonSave(data_state)
    if meta is not None:
        items["meta"] = ocp.args.JsonSave(meta)
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def resolve(path: str, step: int | None = None) -> tuple[str, int]:
    """A workdir, its checkpoints/ dir, or one step dir -> (checkpoints dir, step). Local paths
    and gs:// URLs (`paths.resolve`: an unsupported scheme is one line)."""
    path = paths.absolute(paths.resolve(path, "checkpoint"))
    if not paths.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    base = path.rstrip("/").rsplit("/", 1)[-1]
    if paths.isdir(paths.join(path, "checkpoints")):
        root = paths.join(path, "checkpoints")
    elif base.isdigit() and paths.isdir(paths.join(path, "params")):
        root, step_here = path.rstrip("/")[:-len(base) - 1], int(base)
        if step is not None and step != step_here:
            raise CheckpointError(f"{path} is step {step_here}, but --step {step} was asked for")
        step = step_here
    else:
        root = path
    steps = complete_steps(root)
    if not steps:
        raise CheckpointError(f"{path}: no complete checkpoint found")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"{path}: no checkpoint at step {step} (have {steps})")
    return root, step


def complete_steps(root: str) -> list[int]:
    """The finalized steps Orbax lists (`orbax.checkpoint.utils.checkpoint_steps_paths`: committed by
    the atomic rename locally, by the commit marker on GCS) that are still whole (`is_complete`)."""
    if not paths.isdir(root):
        return []
    return sorted(int(p.name) for p in ocp.utils.checkpoint_steps_paths(root)
                  if p.name.isdigit() and is_complete(paths.join(root, p.name)))


def is_complete(step_dir: str) -> bool:
    """Orbax's own finalisation check (`orbax.checkpoint.utils.is_checkpoint_finalized`) of the step
    and of its params item, plus the remains of an interrupted deletion: locally Orbax decides
    by the name alone (no `.orbax-checkpoint-tmp` suffix), so an integer-named directory that the
    keep-last-K garbage collection left half-removed (killed mid-`rmtree`) still passes it; one
    that lacks the commit marker or the step metadata is never a candidate for restoring."""
    try:
        if not (ocp.utils.is_checkpoint_finalized(step_dir)
                and ocp.utils.is_checkpoint_finalized(paths.join(step_dir, "params"))):
            return False
    except Exception:  # noqa: BLE001 - a vanished or unreadable directory
        return False
    return all(paths.exists(paths.join(step_dir, *f)) for f in
               (("commit_success.txt",), ("_CHECKPOINT_METADATA",), ("params", "commit_success.txt")))


def read_meta(path: str, step: int | None = None) -> dict:
    root, step = resolve(path, step)
    meta_path = paths.join(root, str(step), "meta", "metadata")
    try:
        meta = json.loads(paths.read_text(meta_path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_path}: unreadable checkpoint metadata ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: unknown checkpoint format {meta.get('format')!r}")
    return meta


def model_config(path: str, step: int | None = None) -> LlamaConfig:
    return LlamaConfig.from_dict(read_meta(path, step)["model_config"])


def restore_params(path: str, abstract_params: Any, step: int | None = None):
    """Restore the params item onto the shardings of `abstract_params` (ShapeDtypeStructs)."""
    root, step = resolve(path, step)
    step_dir = paths.join(root, str(step), "params")
    check_shapes(step_dir, abstract_params)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(step_dir, abstract_params)


def check_shapes(item_dir: str, abstract: Any):
    """Compares the stored shapes of a PyTree item with `abstract`, reading only metadata."""
    try:
        with ocp.StandardCheckpointer() as ckptr:
            stored = ckptr.metadata(item_dir)
        stored = getattr(stored, "item_metadata", stored)
        stored = getattr(stored, "tree", stored)
    except Exception as e:  # unreadable metadata
        raise CheckpointUnreadable(f"{item_dir}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
    have = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(stored)
            if hasattr(v, "shape")}
    missing = sorted(set(want) - set(have))
    if missing:
        raise CheckpointMismatch(f"{item_dir}: checkpoint lacks {missing[:3]}")
    for k, shape in want.items():
        if tuple(shape) != have[k]:
            raise CheckpointMismatch(f"{item_dir}: {k} has shape {have[k]} in the checkpoint, "
                                  f"the model config expects {tuple(shape)}")


def load_params(path: str, step: int | None = None) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """(config, params as host numpy arrays) from a workdir / checkpoint dir / step dir."""
    from meditron_jax.models.llama import param_shapes

    cfg = model_config(path, step)
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    abstract = {k: jax.ShapeDtypeStruct(s, np.float32, sharding=cpu) for k, s in param_shapes(cfg).items()}
    params = restore_params(path, abstract, step)
    return cfg, {k: np.asarray(v) for k, v in params.items()}


# ---- resuming safely ------------------------------------------------------------------------
def read_step(manager: ocp.CheckpointManager, step: int, args: ocp.args.Composite):
    """Reads checkpoint `step` of `manager`'s directory on this process alone.

    Each process reads the shards its devices hold; there is no cross-process barrier inside
    (Orbax's own restore ends with one, where a process whose read failed would leave the others
    waiting). `newest_readable` makes the processes agree afterwards."""
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler(), multiprocessing_options=options) as ckptr:
        return ckptr.restore(paths.join(str(manager.directory), str(step)), args=args)


def newest_readable(manager: ocp.CheckpointManager, workdir: str, restore, params_target,
                    restart_from_scratch: bool = False):
    """(restore(step), step) for the newest checkpoint that restores on every process, or None for
    a fresh start. Every process of a multi-host run takes the same decision.

    Candidates are the committed, complete steps that every process sees (Orbax renames a save's
    temporary directory when it commits, and the manager removes leftovers when it opens); the
    others are moved aside. Newest first, each process restores the candidate (`restore` reads
    without cross-process barriers: `read_step`), then all exchange the outcome: if any process
    failed to read it, all skip it, and process 0 warns once for the run, naming the processes
    and reasons. Skipped steps are moved to WORKDIR/checkpoints_unreadable/ (so later saves at
    those steps don't collide) once everyone has stopped reading them. If all fail, every
    process refuses with the same line unless `restart_from_scratch`. A readable checkpoint whose
    shapes disagree with `params_target` is a configuration error, never skipped.
    """
    from meditron_jax.distributed import multihost

    root = checkpoint_dir(workdir)
    listed = sorted(manager.all_steps())
    seen = multihost.allgather_json([listed, [s for s in listed if is_complete(paths.join(root, str(s)))]])
    everywhere = set.intersection(*(set(complete) for _, complete in seen))
    remnants = sorted(set().union(*(set(lst) for lst, _ in seen)) - everywhere)
    if remnants:
        _warn(f"checkpoint steps {remnants} in {root} are incomplete (left by an interrupted save "
              f"or deletion); moved to {quarantine_dir(workdir)}")
        _quarantine(manager, workdir, remnants)
    steps = sorted(everywhere, reverse=True)
    if steps:
        _silence_failed_reads()
    skipped, reasons = [], []
    for step in steps:
        restored, outcome = None, ["ok", ""]
        try:
            check_shapes(paths.join(root, str(step), "params"), params_target)
            restored = restore(step)
        except CheckpointMismatch as e:
            outcome = ["mismatch", str(e)]
        except Exception as e:  # torn or corrupted files: try the previous checkpoint
            reason = " ".join(str(e).split(" See full TensorStore details")[0].split())[:200]
            outcome = ["unreadable", f"{type(e).__name__}: {reason}"]
        votes = multihost.allgather_json(outcome)
        mismatch = next((msg for st, msg in votes if st == "mismatch"), None)
        if mismatch is not None:
            raise CheckpointMismatch(f"cannot resume from {workdir}: {mismatch}")
        failed = [(p, msg) for p, (st, msg) in enumerate(votes) if st != "ok"]
        if failed:
            where = "; ".join((f"process {p}: " if len(votes) > 1 else "") + msg for p, msg in failed)
            reasons.append(f"checkpoint step {step} in {root} is unreadable, skipping it ({where})")
            skipped.append(step)
            del restored
            continue
        if skipped:
            _warn("; ".join(reasons) + f"; resuming from step {step}, not from the newest step {skipped[0]} "
                  f"(unreadable steps {sorted(skipped)} moved to {quarantine_dir(workdir)})")
            _quarantine(manager, workdir, skipped)
        return restored, step
    if steps and not restart_from_scratch:
        raise CheckpointError(f"{root}: none of the checkpoints {sorted(steps)} can be restored; refusing to "
                              f"start from scratch (pass --restart-from-scratch to start over; they are then "
                              f"moved to {quarantine_dir(workdir)})")
    if steps:
        _warn("; ".join(reasons) + f"; --restart-from-scratch: no readable checkpoint; starting at step 0, "
              f"unreadable steps {sorted(steps)} moved to {quarantine_dir(workdir)}")
        _quarantine(manager, workdir, steps)
    return None


def quarantine_dir(workdir: str) -> str:
    return paths.join(paths.absolute(workdir), "checkpoints_unreadable")


def _warn(msg: str):
    if jax.process_index() == 0:
        print(f"meditron-jax train: warning: {msg}", file=sys.stderr, flush=True)


def _quarantine(manager: ocp.CheckpointManager, workdir: str, steps):
    """Moves step directories aside (never deletes what this run did not write). Called by every
    process at the same point: process 0 moves them once all have arrived (none still reads
    them), and nobody goes on before the move is done."""
    from meditron_jax.distributed import multihost

    multihost.barrier()
    if jax.process_index() == 0:
        dest_root = quarantine_dir(workdir)
        paths.makedirs(dest_root)
        for step in steps:
            dest = paths.join(dest_root, str(step))
            n = 1
            while paths.exists(dest):
                dest, n = paths.join(dest_root, f"{step}.{n}"), n + 1
            paths.rename(paths.join(checkpoint_dir(workdir), str(step)), dest)
    multihost.barrier()
    manager.reload()


def _silence_failed_reads():
    """A failed Orbax read leaves its sibling reads running and un-awaited: when they finish
    after their event loop closed, or are garbage-collected (often at exit), Python prints
    'Event loop is closed' / 'Exception ignored in <coroutine _read_array_index_...>' and asyncio
    logs '_GatheringFuture exception was never retrieved', with tracebacks. The warning naming
    the step already said it all: drop just those reports."""
    previous = sys.unraisablehook
    if getattr(previous, "_meditron_quiet", False):
        return

    def hook(unraisable):  # reads finishing after their event loop closed report here too
        late = isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)
        if not late and "_read_array_index" not in repr(getattr(unraisable, "object", "")):
            previous(unraisable)
    hook._meditron_quiet = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(
        lambda record: "error while reading array index" not in record.getMessage())


def all_finite(tree):
    """True (a device scalar) when every leaf of `tree` is finite."""
    import jax.numpy as jnp
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class CheckpointHook:
    """The training loop's saving hooks. `poll` (at logged steps): a failed asynchronous save
    stops the run there (`storage.WatchedManager`). `save` (every `train.checkpoint_every`
    steps, after the last step, and when the loop stops for preemption): a train state that is
    not finite is never saved (exit 3, the last good checkpoint kept); otherwise params and
    optimizer state in the canonical layout (`layout.to_checkpoint`), the data iterator state
    and `meta` with the step, the bad-step streak and the last logged loss are saved in the
    background.

    `replicated`: the sharding of the finiteness verdict (every process reads it)."""

    def __init__(self, manager, data_iterator, meta: dict, replicated, layout=None):
        self.manager, self.it, self.meta, self.layout = manager, data_iterator, meta, layout
        self.finite = jax.jit(all_finite, out_shardings=replicated)

    def poll(self, info):
        self.manager.poll()

    def save(self, info):
        from meditron_jax import console
        from meditron_jax.errors import EXIT_BAD_STEPS

        state = info.state
        if not bool(self.finite({"params": state["params"], "opt_state": state["opt_state"]})):
            print(f"meditron-jax train: error: the train state at step {info.step} is not finite; not saving "
                  "it, last good checkpoint kept", file=sys.stderr)
            return EXIT_BAD_STEPS
        params, opt_state = (state["params"], state["opt_state"]) if self.layout is None else \
            self.layout.to_checkpoint(state["params"], state["opt_state"])
        save(self.manager, info.step, params, opt_state, self.it.get_state(),
             {**self.meta, "step": info.step, "bad_streak": info.notes.get("bad_streak", 0),
              "loss": info.notes.get("loss")})
        if jax.process_index() == 0:
            console.log.info(f"saved checkpoint {info.step} (committing in the background)")
        return None
