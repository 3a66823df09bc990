"""Held-out loss during training: the training loop's eval hook (`train.eval_every`).

Owns: `EvalHook`, which runs the jitted eval step (`train_step.make_eval_step`, token-weighted
loss sums) over `train.eval_batches` held-out batches of the data pipeline and writes
`eval_loss` and `eval_ppl` into the step's metrics record. Does not own: the eval step's math
(training/step.py), the held-out split (data/loader.py), exams and perplexity of a checkpoint
(mcq.py, perplexity.py).
"""

from __future__ import annotations

import jax
import numpy as np

from meditron_jax.distributed import sharding
from meditron_jax.distributed import host_batch


class EvalHook:
    """`eval_fn(params, batch) -> {"loss_sum", "tokens"}`; `data.eval_batches(n)` yields host
    batches; the result goes to `writer.write(step, ...)`."""

    def __init__(self, eval_fn, data, eval_batches: int, mesh, writer):
        self.eval_fn, self.data, self.n, self.mesh, self.writer = eval_fn, data, eval_batches, mesh, writer

    def __call__(self, info):
        total = tokens = 0.0
        for b in self.data.eval_batches(self.n):
            out = jax.device_get(self.eval_fn(info.state["params"], host_batch.global_batch(b, self.mesh)))
            total += float(out["loss_sum"])
            tokens += float(out["tokens"])
        if tokens:
            loss = total / tokens
            self.writer.write(info.step, {"eval_loss": loss, "eval_ppl": float(np.exp(min(loss, 50.0)))})
