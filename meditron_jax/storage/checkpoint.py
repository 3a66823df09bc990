"""Orbax checkpoints: the on-disk layout of a training run and how to save and restore it.

Owns: `WORKDIR/checkpoints/<step>/` (`Workdir.step_dir`) with the composite items
  params     PyTree {HF-style name: fp32 array} (canonical layout: stacked [L, ...] layers,
             padded vocab) — the only item export / `train.init_from` / `from_pretrained` read
  opt_state  the optax state (absent in an imported step-0 checkpoint)
  data       the data iterator state (JSON, process-count independent)
  meta       JSON: model config, operative gin config, tokenizer path + fingerprint, format
and restoring onto any mesh (Orbax reshards to the target shardings given); which steps are
complete (`complete_steps`, `is_complete`); telling a damaged checkpoint (`CheckpointUnreadable`)
from one of another model (`CheckpointMismatch`) by its metadata alone (`check_shapes`).
Paths are local or `gs://` (`paths.py`, etils epath as Orbax uses it); every read here works on both.
Also owns the training loop's save hook (`CheckpointHook`). Does not own: which step a run
resumes from (resume.py), watching saves for failures (faults.py), what the train state
contains (training/state.py), conversion (convert/).

Saves are asynchronous; Orbax writes into a temporary directory and renames it when the
save commits, so a listed step is always complete; the manager deletes leftover temporary
directories of interrupted saves when it opens (`cleanup_tmp_directories`).
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Callable

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp

from meditron_jax.storage import paths
from meditron_jax.storage.workdir import Workdir
from meditron_jax.models.config import LlamaConfig
from meditron_jax.config.checks import Range
from meditron_jax.errors import UserError

FORMAT = "meditron-jax/1"
# item -> (its save args, its restore args, the Orbax handler that writes it)
ITEMS = {
    "params": (ocp.args.StandardSave, ocp.args.StandardRestore, ocp.StandardCheckpointHandler),
    "opt_state": (ocp.args.StandardSave, ocp.args.StandardRestore, ocp.StandardCheckpointHandler),
    "data": (ocp.args.JsonSave, ocp.args.JsonRestore, ocp.JsonCheckpointHandler),
    "meta": (ocp.args.JsonSave, ocp.args.JsonRestore, ocp.JsonCheckpointHandler),
}


class CheckpointError(UserError):
    """A checkpoint the user pointed at is missing, unreadable or does not fit the model."""


class CheckpointUnreadable(CheckpointError):
    """Torn, corrupted or missing checkpoint files (a resume falls back to an older step)."""


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint whose names or shapes disagree with the model (a configuration error)."""


@gin.configurable("checkpoint")
def manager_options(keep: Annotated[int, Range(min=1)] = 3, keep_period: Annotated[int | None, Range(min=1)] = None,
                    async_save: bool = True):
    """gin: `checkpoint.keep` (last K kept), `checkpoint.keep_period` (every M-th step kept forever)."""
    return ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_period, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)


def make_manager(workdir: Workdir | str, options: ocp.CheckpointManagerOptions | None = None,
                 handler: Callable[[type], Any] | None = None) -> ocp.CheckpointManager:
    """The Orbax manager of `WORKDIR/checkpoints/`, its items registered through Orbax's public
    handler registry. `handler(cls)` makes the handler of an item whose Orbax handler class is
    `cls` (default `cls()`; faults.py passes one that watches the save's futures)."""
    make = handler or (lambda cls: cls())
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item, (save_args, restore_args, handler_cls) in ITEMS.items():
        h = make(handler_cls)
        registry.add(item, save_args, h)
        registry.add(item, restore_args, h)
    return ocp.CheckpointManager(Workdir.resolve(workdir).checkpoints, options=options or manager_options(),
                                 handler_registry=registry)


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
    if paths.isdir(Workdir(path).checkpoints):
        root = Workdir(path).checkpoints
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
    """Compares a PyTree item's names and shapes, as its metadata records them, with `abstract`
    (the run's ShapeDtypeStructs), reading no array. Names or shapes that differ: the checkpoint
    is of another model or optimizer (`CheckpointMismatch`, one line naming what differs).
    Metadata that Orbax cannot read (torn or missing files, e.g. the item's array data gone):
    the checkpoint is damaged (`CheckpointUnreadable`)."""
    try:
        with ocp.StandardCheckpointer() as ckptr:
            stored = getattr(ckptr.metadata(item_dir), "item_metadata", None)
    except Exception as e:  # noqa: BLE001 - unreadable metadata, whatever Orbax raises
        raise CheckpointUnreadable(f"{item_dir}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    if stored is None:  # Orbax logs its own failure to read the arrays' metadata and returns none
        raise CheckpointUnreadable(f"{item_dir}: unreadable checkpoint (its array metadata cannot be read: "
                                   f"array files missing or torn)")
    want, have = _shapes(abstract), _shapes(getattr(stored, "tree", stored))
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        what = [f"lacks {missing[:3]}"] if missing else []
        what += [f"has {extra[:3]}, which the run's model does not"] if extra else []
        raise CheckpointMismatch(f"{item_dir}: the checkpoint {' and '.join(what)} (a different model or "
                                 f"optimizer)")
    for k, shape in want.items():
        if shape != have[k]:
            raise CheckpointMismatch(f"{item_dir}: {k} has shape {have[k]} in the checkpoint, "
                                     f"the run's model expects {shape}")


def _shapes(tree) -> dict[str, tuple]:
    """'a/b/c' -> shape of every array leaf. Path parts are dict keys, attribute names and
    sequence indices alike: Orbax reads a saved namedtuple (an optax state) back as a dict."""
    def part(k):
        return next((str(getattr(k, a)) for a in ("key", "name", "idx") if hasattr(k, a)), str(k))
    return {"/".join(map(part, path)): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree) if hasattr(leaf, "shape")}


def load_params(path: str, step: int | None = None) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """(config, params as host numpy arrays) from a workdir / checkpoint dir / step dir."""
    from meditron_jax.models.llama import param_shapes

    cfg = model_config(path, step)
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    abstract = {k: jax.ShapeDtypeStruct(s, np.float32, sharding=cpu) for k, s in param_shapes(cfg).items()}
    params = restore_params(path, abstract, step)
    return cfg, {k: np.asarray(v) for k, v in params.items()}


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
