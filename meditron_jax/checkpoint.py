"""Orbax checkpoints: the on-disk layout of a training run and how to save and restore it.

Owns: `WORKDIR/checkpoints/<step>/` with the composite items
  params     PyTree {HF-style name: fp32 array} (canonical layout: stacked [L, ...] layers,
             padded vocab) — the only item export / `train.init_from` / `from_pretrained` read
  opt_state  the optax state (absent in an imported step-0 checkpoint)
  data       the data iterator state (JSON, process-count independent)
  meta       JSON: model config, operative gin config, tokenizer path + fingerprint, format
and restoring onto any mesh (Orbax reshards to the target shardings given).
Does not own: what the train state contains (train.py), conversion (convert/).

Saves are asynchronous; Orbax writes into a temporary directory and renames it when the
save commits, so a listed step is always complete; the manager deletes leftover temporary
directories of interrupted saves when it opens (`cleanup_tmp_directories`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp

from meditron_jax.config import LlamaConfig
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
def manager_options(keep: int = 3, keep_period: int | None = None, async_save: bool = True):
    """gin: `checkpoint.keep` (last K kept), `checkpoint.keep_period` (every M-th step kept forever)."""
    return ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_period, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


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
    """A workdir, its checkpoints/ dir, or one step dir -> (checkpoints dir, step)."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        root = os.path.join(path, "checkpoints")
    elif os.path.isdir(os.path.join(path, "params")) and os.path.basename(path).isdigit():
        root, step_here = os.path.dirname(path), int(os.path.basename(path))
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
    """Committed steps: integer-named dirs (Orbax renames temporaries only when a save commits)
    that are still whole (see `is_complete`)."""
    if not os.path.isdir(root):
        return []
    return sorted(int(d) for d in os.listdir(root) if d.isdigit() and is_complete(os.path.join(root, d)))


def is_complete(step_dir: str) -> bool:
    """A committed step carries Orbax's commit marker, its metadata and a committed params item.
    An integer-named directory without them is what an interrupted deletion (the keep-last-K
    garbage collection, killed mid-`rmtree`) leaves behind: never a candidate for restoring."""
    return all(os.path.exists(os.path.join(step_dir, *f)) for f in
               (("commit_success.txt",), ("_CHECKPOINT_METADATA",), ("params", "commit_success.txt")))


def read_meta(path: str, step: int | None = None) -> dict:
    root, step = resolve(path, step)
    meta_path = os.path.join(root, str(step), "meta", "metadata")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
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
    step_dir = os.path.join(root, str(step), "params")
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
    from meditron_jax.model import param_shapes

    cfg = model_config(path, step)
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    abstract = {k: jax.ShapeDtypeStruct(s, np.float32, sharding=cpu) for k, s in param_shapes(cfg).items()}
    params = restore_params(path, abstract, step)
    return cfg, {k: np.asarray(v) for k, v in params.items()}
