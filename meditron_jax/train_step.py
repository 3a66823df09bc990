"""The pure training and evaluation steps.

Owns: the token-weighted cross-entropy (padded vocab masked, fp32), gradient accumulation
over micro-batches inside the step (a `lax.scan`, fp32 accumulators), the optimizer update,
and the non-finite guard. `train_step(state, batch) -> (state, metrics)` does no I/O, reads
no clock and logs nothing; `train.py` jits it once with explicit shardings and donates state.
Does not own: shardings (sharding.py), the optimizer definition (optim.py), the loop (train.py).

state:  {"params": {name: fp32}, "opt_state": optax state, "step": int32, "bad_streak": int32}
batch:  {"inputs", "targets", "segment_ids", "positions": int32 [G, T], "loss_mask": f32 [G, T]}
        G = the global batch; it is split into `num_micro` micro-batches of G / num_micro rows.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from meditron_jax.config import LlamaConfig
from meditron_jax.model import forward_hidden, lm_logits, run_layers
from meditron_jax.sharding import constrain

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def cross_entropy_sum(cfg: LlamaConfig, lm_head, h, targets, mask, chunk: int | None = None):
    """Sum over tokens of -log p(target), weighted by mask; logits in fp32, padded vocab masked.

    chunk=None is the reference: full [B, T, V] fp32 logits, differentiated by autodiff.
    With `chunk`, the output projection and the loss run `chunk` positions at a time and the
    gradient is fused into the forward pass (`fused_cross_entropy_sum`): the full logits are
    never live, and no logits are recomputed for the backward pass.
    """
    T = h.shape[1]
    if not chunk or chunk >= T:
        return _reference_ce(cfg, lm_head, h, targets, mask)
    if T % chunk:
        raise ValueError(f"seq_len {T} not divisible by loss chunk {chunk}")
    return fused_cross_entropy_sum(cfg, chunk, lm_head, h, targets, mask.astype(jnp.float32))


def _reference_ce(cfg, lm_head, h, targets, mask):
    logits = lm_logits(cfg, lm_head, h, true_vocab=False)  # [B,T,V] fp32
    lse = jax.nn.logsumexp(logits, axis=-1)
    gold = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((lse - gold) * mask)


def _split_chunks(a, chunk):
    """[B, T, ...] -> [T/chunk, B, chunk, ...] (the batch axis keeps its sharding)."""
    n = a.shape[1] // chunk
    return jnp.moveaxis(a.reshape(a.shape[0], n, chunk, *a.shape[2:]), 1, 0)


def _chunk_loss(cfg, W, h, t, m):
    """One chunk: (loss sum, softmax [B,c,V] fp32, one-hot of the targets [B,c,V]).

    The softmax is exp(x - max) / sum, the same rounding as autodiff through `logsumexp`."""
    logits = lm_logits(cfg, W, h, true_vocab=False)  # [B,c,V] fp32, padded vocab at -1e9
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    e = jnp.exp(logits - top)
    s = jnp.sum(e, axis=-1, keepdims=True)
    lse = (jnp.log(s) + top)[..., 0]
    onehot = jnp.arange(logits.shape[-1], dtype=t.dtype) == t[..., None]  # elementwise: no gather/scatter
    gold = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    return jnp.sum((lse - gold) * m), e / s, onehot


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def fused_cross_entropy_sum(cfg: LlamaConfig, chunk: int, lm_head, h, targets, mask):
    """Chunked output projection + cross-entropy sum (see `cross_entropy_sum`). h [B,T,D]."""
    def body(total, xs):
        return total + _chunk_loss(cfg, lm_head, *xs)[0], None

    xs = (_split_chunks(h, chunk), _split_chunks(targets, chunk), _split_chunks(mask, chunk))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total


def _fused_ce_fwd(cfg, chunk, lm_head, h, targets, mask):
    """Loss and its gradient in one pass per chunk (the loss is a sum, so d loss / d logits =
    mask x (softmax - onehot) is known before the cotangent arrives; bwd only scales it)."""
    dt = h.dtype
    W = lm_head.astype(dt)

    def body(dW, xs):
        hc, tc, mc = xs
        loss, p, onehot = _chunk_loss(cfg, W, hc, tc, mc)
        mw = mc[..., None]
        dlogits = (p * mw - jnp.where(onehot, mw, 0.0)).astype(dt)  # [B,c,V] = m (softmax - onehot)
        dh = jnp.einsum("bcv,dv->bcd", dlogits, W, preferred_element_type=jnp.float32).astype(dt)
        dW = dW + jnp.einsum("bcd,bcv->dv", hc, dlogits, preferred_element_type=jnp.float32)
        return dW, (loss, dh)

    xs = (_split_chunks(h, chunk), _split_chunks(targets, chunk), _split_chunks(mask, chunk))
    dW, (losses, dh) = jax.lax.scan(body, jnp.zeros(lm_head.shape, jnp.float32), xs)
    dh = jnp.moveaxis(dh, 0, 1).reshape(h.shape)
    return jnp.sum(losses), (dW.astype(lm_head.dtype), dh)


def _fused_ce_bwd(cfg, chunk, res, g):
    dW, dh = res
    return g.astype(dW.dtype) * dW, g.astype(dh.dtype) * dh, None, None


fused_cross_entropy_sum.defvjp(_fused_ce_fwd, _fused_ce_bwd)


def loss_sum(cfg: LlamaConfig, params, batch, layers_fn=run_layers, loss_chunk=None):
    """(sum of token losses, number of loss tokens) for one (micro-)batch."""
    h = forward_hidden(cfg, params, batch["inputs"], batch["positions"], batch["segment_ids"], layers_fn)
    mask = batch["loss_mask"].astype(jnp.float32)
    return cross_entropy_sum(cfg, params["lm_head"], h, batch["targets"], mask, loss_chunk), jnp.sum(mask)


def split_micro(batch, num_micro: int):
    """[G, T] -> [num_micro, G/num_micro, T], micro-batch j = rows j, j+n, j+2n, ...

    Interleaving keeps every device's rows inside its own shard (no data movement).
    """
    def split(a):
        G = a.shape[0]
        a = a.reshape(G // num_micro, num_micro, *a.shape[1:]).swapaxes(0, 1)
        return constrain(a, (None, "batch", "length"))
    return {k: split(batch[k]) for k in BATCH_KEYS}


def make_train_step(cfg: LlamaConfig, tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
                    num_micro: int = 1, layers_fn: Callable = run_layers, loss_chunk: int | None = None,
                    spike_threshold: float | None = None):
    """Build `train_step(state, batch) -> (state, metrics)`.

    The loss is the token-weighted mean over the whole global batch: gradients of the summed
    loss are accumulated over micro-batches in fp32 and divided by the global token count.
    A non-finite loss or gradient norm (or, with `spike_threshold`, a loss above that) skips
    the update: params and optimizer state stay untouched, `skipped` is 1 and the state's
    `bad_streak` grows (the loop stops the run after `train.max_bad_steps`).
    """
    grad_fn = jax.value_and_grad(lambda p, b: loss_sum(cfg, p, b, layers_fn, loss_chunk), has_aux=True)

    def train_step(state, batch, poison=None):
        params = state["params"]
        micro = split_micro(batch, num_micro)

        def accumulate(carry, mb):
            g_acc, l_acc, n_acc = carry
            (l, n), g = grad_fn(params, mb)
            g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
            return (g_acc, l_acc + l, n_acc + n), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        if num_micro == 1:
            (grads, total, tokens), _ = accumulate(init, jax.tree.map(lambda a: a[0], micro))
        else:
            (grads, total, tokens), _ = jax.lax.scan(accumulate, init, micro)
        denom = jnp.maximum(tokens, 1.0)
        loss = total / denom
        grads = jax.tree.map(lambda g: g / denom, grads)
        if poison is not None:  # fault injection for tests: a NaN loss and NaN gradients
            loss = jnp.where(poison, jnp.nan, loss)
            grads = jax.tree.map(lambda g: jnp.where(poison, jnp.nan, g), grads)
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if spike_threshold is not None:
            ok = ok & (loss <= spike_threshold)
        updates, new_opt = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = {
            "params": keep(new_params, params),
            "opt_state": keep(new_opt, state["opt_state"]),
            "step": state["step"] + 1,
            "bad_streak": jnp.where(ok, 0, state["bad_streak"] + 1).astype(jnp.int32),
        }
        # the lr of this update: the schedule at optax's update count (skipped steps don't advance it)
        count = optax.tree_utils.tree_get_all_with_path(state["opt_state"], "count")[0][1]
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_schedule(count),
                   "tokens": tokens, "skipped": (~ok).astype(jnp.int32)}
        return new_state, metrics

    return train_step


def make_eval_step(cfg: LlamaConfig, layers_fn: Callable = run_layers, loss_chunk: int | None = None):
    def eval_step(params, batch):
        total, tokens = loss_sum(cfg, params, batch, layers_fn, loss_chunk)
        return {"loss_sum": total, "tokens": tokens}
    return eval_step


def init_state(params, tx: optax.GradientTransformation):
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "bad_streak": jnp.zeros((), jnp.int32)}
