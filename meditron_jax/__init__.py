"""meditron-jax: continued pretraining of Llama-2 on medical text, in JAX/Flax.

Public entry point for Python users: `from_pretrained(path)`.
"""

from __future__ import annotations


__version__ = "0.1.0"


def from_pretrained(path: str, dtype: str | None = None, step: int | None = None):
    """Load a model from a Hugging Face directory or a meditron-jax checkpoint directory.

    Returns a `meditron_jax.models.llama.Llama` whose call on int ids [B, T] gives logits
    [B, T, vocab] at the true vocab size. `dtype` overrides the compute dtype.
    """
    from meditron_jax.convert.hf import load_hf_dir
    from meditron_jax.convert.io import ConversionError
    from meditron_jax.models.llama import model_from_params

    from meditron_jax.storage import paths  # local paths and gs:// checkpoints

    if not paths.exists(path):
        raise ConversionError(f"{path}: no such file or directory")
    if paths.exists(paths.join(path, "config.json")) or not _is_checkpoint_dir(path):
        cfg, params = load_hf_dir(path)
    else:
        from meditron_jax.storage.checkpoint import load_params
        cfg, params = load_params(path, step=step)
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    try:
        return model_from_params(cfg, params)
    except ValueError as e:
        raise ConversionError(f"{path}: {e}") from None


def _is_checkpoint_dir(path: str) -> bool:
    from meditron_jax.storage import paths
    from meditron_jax.storage.workdir import Workdir
    return paths.isdir(Workdir(path).checkpoints) or paths.exists(
        paths.join(path, "_CHECKPOINT_METADATA")) or any(
        d.isdigit() for d in (paths.listdir(path) if paths.isdir(path) else []))
