"""The optimizer of the Meditron recipe, built from optax parts.

Owns: AdamW hyper-parameters (gin `optimizer.*`), the learning-rate schedule (linear warmup
from 0, then cosine decay to an absolute `min_lr` or `min_lr_ratio x lr`), global-norm
clipping and the weight-decay mask. Does not own: gradient accumulation or the step itself
(`training/step.py`).

Weight decay: applied to every matrix, embeddings and lm_head included, and not to the
RMSNorm weights (told apart by their logical axes, not their names: `decay_mask`). That is Megatron-LLM's rule (Meditron's trainer: only biases and norm
weights are exempt; Llama has no biases). The padded vocab rows get zero gradient, and
AdamW's update of a zero row with zero moments is zero, so they stay exactly zero.

Schedule: optax's `warmup_cosine_decay_schedule` starting at 0, like Megatron (whose first
update runs at lr 0): lr(s) = lr * s / warmup for s <= warmup, then
min + (lr - min) * (1 + cos(pi * (s - warmup) / (decay_steps - warmup))) / 2.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

import gin
import jax
import optax

from meditron_jax.config.checks import Range
from meditron_jax.errors import UserError
from meditron_jax.models.llama import PARAM_AXES


_WARMUP_TOO_LONG = "the run ends during warmup: the learning rate never reaches optimizer.lr"


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:  # Annotated ranges: checked with the types before anything runs (config.checks)
    lr: Annotated[float, Range(min=0, min_open=True)] = 3e-4
    min_lr: Annotated[float | None, Range(min=0, max="optimizer.lr")] = None
    min_lr_ratio: Annotated[float | None, Range(min=0, max=1)] = None
    warmup_steps: Annotated[int, Range(min=0), Range(max="train.steps", warn=_WARMUP_TOO_LONG)] = 2000
    decay_steps: Annotated[int | None, Range(min=1)] = None  # default: the run's total steps
    weight_decay: Annotated[float, Range(min=0)] = 0.1
    b1: Annotated[float, Range(min=0, max=1, max_open=True)] = 0.9
    b2: Annotated[float, Range(min=0, max=1, max_open=True)] = 0.95
    eps: Annotated[float, Range(min=0, min_open=True)] = 1e-5
    clip: Annotated[float | None, Range(min=0, min_open=True)] = 1.0  # global-norm clipping; None: off

    def end_lr(self) -> float:
        if self.min_lr is not None and self.min_lr_ratio is not None:
            raise UserError("set optimizer.min_lr or optimizer.min_lr_ratio, not both")
        if self.min_lr_ratio is not None:
            return self.lr * self.min_lr_ratio
        return 0.0 if self.min_lr is None else self.min_lr


@gin.configurable("optimizer")
def optimizer_config(lr: float = 3e-4, min_lr: float | None = None, min_lr_ratio: float | None = None,
                     warmup_steps: int = 2000, decay_steps: int | None = None, weight_decay: float = 0.1,
                     b1: float = 0.9, b2: float = 0.95, eps: float = 1e-5,
                     clip: float | None = 1.0) -> OptimizerConfig:
    """gin `optimizer.*`; each value's range is on `OptimizerConfig` (checked when gin is parsed)."""
    oc = OptimizerConfig(lr, min_lr, min_lr_ratio, warmup_steps, decay_steps, weight_decay, b1, b2, eps, clip)
    oc.end_lr()
    return oc


def schedule(oc: OptimizerConfig, total_steps: int) -> optax.Schedule:
    decay = oc.decay_steps if oc.decay_steps is not None else total_steps
    decay = max(decay, oc.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=oc.lr, warmup_steps=oc.warmup_steps,
        decay_steps=decay, end_value=oc.end_lr())


def decay_mask(params):
    """True where weight decay applies: the matrices, told apart by structure (nanoGPT's rule,
    from dimensions): a parameter decays when its logical axes (`model.PARAM_AXES`), the
    stacking axis `layers` aside, are two or more (embeddings, lm_head, attention and MLP
    projections); vectors (the RMSNorm weights) do not. A parameter without logical axes is
    an error, not a guess. Anything but a dict of named parameters (optax's placeholder when
    it traces the state's structure) decays throughout."""
    if not isinstance(params, dict):
        return jax.tree.map(lambda _: True, params)
    missing = sorted(k for k in params if k not in PARAM_AXES)
    if missing:
        raise ValueError(f"no logical axes (model.PARAM_AXES) for parameters {missing}: cannot tell "
                         "whether weight decay applies")
    return {k: sum(a != "layers" for a in PARAM_AXES[k]) >= 2 for k in params}


def make_optimizer(oc: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Clipping (global norm) followed by AdamW with the decoupled decay mask."""
    parts = []
    if oc.clip is not None:
        parts.append(optax.clip_by_global_norm(oc.clip))
    parts.append(optax.adamw(schedule(oc, total_steps), b1=oc.b1, b2=oc.b2, eps=oc.eps,
                             weight_decay=oc.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
