"""Gradient-accumulation fusion: the backward layer scan adds into the fp32 accumulator.

Owns: `run_layers_into`, the decoder stack (same forward as `model.run_layers` under
`remat='full'`) whose backward pass adds each layer's weight gradient straight into the slice
of a stacked fp32 accumulator, and `fusable`, which says when the train step may use it.
Does not own: the decoder layer (model.py), the micro-batch loop and the reduction
(training/step.py).

Why: the train step accumulates every device's gradients unreduced in fp32 over the
micro-batches (`train_step.accumulate_gradients`). With plain autodiff, the backward pass of
`lax.scan` over the layers returns the stacked layer gradients as a new `[L, ...]` array
(compute dtype), which is then added into the accumulator: for Llama-2-7B at tensor 4 that
is a second 3.0 GiB gradient tree next to the 6.3 GiB accumulator, live at the end of every
micro-batch's backward pass. Megatron avoids it the same way (gradient-accumulation fusion:
the weight-gradient GEMM accumulates into the fp32 `main_grad` buffer).

How: a `jax.custom_vjp` whose inputs are the stacked layer weights, the accumulator, and the
stack's input. Forward: the layer scan, keeping each layer's input (what `remat='full'` keeps,
[L, B, T, D]; split over `tensor` along T, see `_saved`). Backward: a reverse scan whose carry is (d input, accumulator); per layer it
recomputes the layer (`jax.vjp`, as full remat does), and writes acc[l] + d weights back into
the carry in place. The accumulator's cotangent *is* the updated accumulator; the weights'
cotangent is zero (the caller differentiates the accumulator, not the weights).
So the cotangent of `acc` is `acc + dL/dW` (affine, not linear, in the loss cotangent): call
it only through `jax.grad`/`value_and_grad` of a scalar loss with seed 1, as the step does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from meditron_jax.distributed import sharding
from meditron_jax.models.config import LlamaConfig
from meditron_jax.models.llama import RESIDUAL, decoder_layer, run_layers


def fusable(cfg: LlamaConfig, layers_fn) -> bool:
    """The fused stack replaces `layers_fn` exactly: the plain scanned stack under full remat.

    Other remat policies save more than the layer input for the backward pass, which this
    stack does not reproduce; the pipeline (mesh.stage > 1) runs its own schedule."""
    return layers_fn is run_layers and cfg.scan_layers and cfg.remat == "full"


def _layer(cfg, p, x, positions, segment_ids):
    return decoder_layer(cfg, p, x, positions, segment_ids)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def run_layers_into(cfg: LlamaConfig, layers: dict, acc: dict, x, positions, segment_ids):
    """`model.run_layers(cfg, layers, x, ...)`; its VJP returns acc + d loss / d layers as the
    cotangent of `acc` (fp32, same keys and shapes as `layers`) and zero for `layers`."""
    del acc
    return run_layers(cfg, layers, x, positions, segment_ids)


def _saved(h):
    """A kept layer input [B, T, D], split over `tensor` along T (Megatron's sequence-parallel
    layout for what is saved, whether or not `sharding.sequence_parallel` splits the live residual
    stream too): every tensor rank holds the same activation, so keeping a 1/tensor slice each
    loses nothing; the backward pass all-gathers one layer's input before recomputing it (with
    sequence parallelism the layer takes its input split, and the recomputation gathers it)."""
    act = sharding.active()
    if act is None:
        return h
    mesh, rules = act
    return jax.lax.with_sharding_constraint(
        h, sharding.sharding_for(RESIDUAL, h.shape, mesh, sharding.sequence_split(rules)))


def _fwd(cfg, layers, acc, x, positions, segment_ids):
    def body(h, p):
        return _layer(cfg, p, h, positions, segment_ids), _saved(h)  # keep the layer's input

    y, inputs = jax.lax.scan(body, x, layers)  # inputs [L, B, T, D], compute dtype
    return y, (layers, acc, inputs, positions, segment_ids)


def _bwd(cfg, res, dy):
    layers, acc, inputs, positions, segment_ids = res
    L = inputs.shape[0]

    def body(carry, xs):
        dh, acc = carry
        p, h, l = xs
        _, vjp = jax.vjp(lambda p, h: _layer(cfg, p, h, positions, segment_ids), p, h)  # recompute
        dp, dh = vjp(dh)
        dh = sharding.constrain(dh, RESIDUAL)  # the carry's layout, as the forward's
        acc = {k: jax.lax.dynamic_update_index_in_dim(
                   a, jax.lax.dynamic_index_in_dim(a, l, keepdims=False) + dp[k].astype(a.dtype), l, 0)
               for k, a in acc.items()}
        return (dh, acc), None

    (dx, acc), _ = jax.lax.scan(body, (dy, acc), (layers, inputs, jnp.arange(L)), reverse=True)
    zeros = jax.tree.map(jnp.zeros_like, layers)
    return zeros, acc, dx, None, None


run_layers_into.defvjp(_fwd, _bwd)
