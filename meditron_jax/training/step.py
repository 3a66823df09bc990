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

from jax.sharding import PartitionSpec as P

from meditron_jax.training import fused_accum
from meditron_jax.distributed import sharding
from meditron_jax.models.config import LlamaConfig
from meditron_jax.models.llama import (LAYER_KEYS, PARAM_AXES, REGION_INPUT, RESIDUAL, forward_hidden, lm_logits,
                                       run_layers)
from meditron_jax.distributed.sharding import constrain

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
    # the target logit by a one-hot select, not a gather: exact (one non-zero term), and XLA's
    # partitioner aborts on a gather over the tensor-split vocab inside the data-manual
    # shard_map of the step when fsdp and tensor are both > 1 (jaxlib 0.10.2)
    onehot = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[..., None]
    gold = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    return jnp.sum((lse - gold) * mask)


def _split_chunks(a, chunk):
    """[B, T, ...] -> [T/chunk, B, chunk, ...]; chunk j holds positions j, j + n, j + 2n, ...
    (n = T/chunk). Strided, so that a sequence split over `tensor` in contiguous blocks (sequence
    parallelism) is split the same way inside every chunk and nothing moves; the loss is a sum
    over positions, so their order inside a chunk does not matter. The batch axis keeps its
    sharding."""
    n = a.shape[1] // chunk
    return jnp.moveaxis(a.reshape(a.shape[0], chunk, n, *a.shape[2:]), 2, 0)


def _merge_chunks(a):
    """Inverse of `_split_chunks`: [n, B, chunk, ...] -> [B, chunk * n, ...]."""
    n, B, c = a.shape[:3]
    return jnp.moveaxis(a, 0, 2).reshape(B, c * n, *a.shape[3:])


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
        hc = constrain(hc, REGION_INPUT)  # whole along the chunk (with sequence parallelism, a gather)
        loss, p, onehot = _chunk_loss(cfg, W, hc, tc, mc)
        mw = mc[..., None]
        dlogits = (p * mw - jnp.where(onehot, mw, 0.0)).astype(dt)  # [B,c,V] = m (softmax - onehot)
        # in dt: its sum over the vocab-split `tensor` moves dt (into the residual layout: with
        # sequence parallelism a reduce-scatter)
        dh = constrain(jnp.einsum("bcv,dv->bcd", dlogits, W), RESIDUAL)
        dW = dW + jnp.einsum("bcd,bcv->dv", hc, dlogits, preferred_element_type=jnp.float32)
        return dW, (loss, dh)

    xs = (_split_chunks(h, chunk), _split_chunks(targets, chunk), _split_chunks(mask, chunk))
    dW, (losses, dh) = jax.lax.scan(body, jnp.zeros(lm_head.shape, jnp.float32), xs)
    return jnp.sum(losses), (dW.astype(lm_head.dtype), constrain(_merge_chunks(dh), RESIDUAL))


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


def working_copy(cfg: LlamaConfig, master: dict, manual: tuple[str, ...] = (), zero1: bool = False) -> dict:
    """The compute-dtype copy of the fp32 master params that the forward/backward pass reads.

    Cast first, then laid out as the rules say (replicated over `data`, and over `manual` axes
    such as fsdp with `fsdp_grad_reduce='step'`): with ZeRO-1 the master is split over `data`,
    so this is the one all-gather of the parameters per step, in the compute dtype (bf16: half
    the bytes of gathering fp32). fp32 compute keeps an fp32 working copy.
    """
    dt = jnp.dtype(cfg.dtype)
    act = sharding.active()
    out = {}
    for k, a in master.items():
        if act is not None and k in PARAM_AXES:
            mesh, rules = act
            # pinned on both sides of the cast, so that the gather moves compute-dtype bytes
            # (left to propagation, XLA gathers the fp32 master and casts after)
            a = jax.lax.with_sharding_constraint(a, _master_sharding(k, a.shape, mesh, rules, zero1))
            w = jax.lax.with_sharding_constraint(a.astype(dt), _master_sharding(k, a.shape, mesh, rules, zero1))
            w = jax.lax.with_sharding_constraint(w, _work_sharding(k, w.shape, mesh, rules, manual))
        else:
            w = a.astype(dt)
        out[k] = w
    return out


def _inside_layout(p: dict, gather_table: bool = False) -> dict:
    """Pin params (or their gradients) to the rule layout of the active (possibly manual) mesh.

    gather_table: the embedding table whole over `fsdp` (vocab still over `tensor`). XLA's
    SPMD partitioner aborts on the embedding gather inside a shard_map manual over `data` when
    the table is split over both fsdp and tensor (a CHECK in spmd_partitioner_util, jaxlib
    0.10.2); one table, gathered once per micro-batch like every FSDP layer, avoids it.
    """
    act = sharding.active()
    if act is None:
        return p
    mesh, rules = act
    out = {}
    for k, a in p.items():
        if k not in PARAM_AXES:
            out[k] = a
            continue
        r = sharding.without_axes(rules, ("fsdp",)) if gather_table and k == "embed_tokens" else rules
        out[k] = jax.lax.with_sharding_constraint(a, sharding.sharding_for(PARAM_AXES[k], a.shape, mesh, r))
    return out


def _work_sharding(k, shape, mesh, rules, manual):
    return sharding.sharding_for(PARAM_AXES[k], shape, mesh, sharding.without_axes(rules, manual))


def _entries(spec: P, ndim: int) -> list[tuple[str, ...]]:
    spec = tuple(spec) + (None,) * (ndim - len(spec))
    return [() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in spec]


def _master_sharding(k, shape, mesh, rules, zero1):
    s = sharding.sharding_for(PARAM_AXES[k], shape, mesh, rules)
    return sharding.zero1_sharding(s, shape) if zero1 else s


def _reduce_local(g, master: list, manual: tuple, dtype):
    """Fully manual: the one reduction of a device's local fp32 gradient block over `manual`.

    g: [1, *local block] (the block of the rule layout without the manual axes). A dimension of
    the master layout split over manual axes (ZeRO-1's `data`, fsdp in 'step' mode) is
    reduce-scattered into the device's master shard; manual axes that do not split the master
    are all-reduced. On the wire in `dtype`, back to fp32.
    """
    g = g[0].astype(dtype)
    done = set()
    for i, names in enumerate(master):
        axes = tuple(n for n in names if n in manual)
        if axes:
            assert names[len(names) - len(axes):] == axes, (names, manual)  # manual axes minor
            g = jax.lax.psum_scatter(g, axes if len(axes) > 1 else axes[0], scatter_dimension=i, tiled=True)
            done.update(axes)
    rest = tuple(a for a in manual if a not in done)
    if rest:
        g = jax.lax.psum(g, rest)
    return g.astype(jnp.float32)


def accumulate_gradients(grad_fn, work: dict, micro: dict, num_micro: int, *, zero1: bool = False,
                         sync: sharding.GradSync | None = None, fused: bool = False):
    """(fp32 gradient sums, loss sum, token count) over the `num_micro` micro-batches.

    Data parallelism: the micro-batch loop runs inside a `shard_map` that is manual over the
    data axes (`data`, and `fsdp` with `fsdp_grad_reduce='step'`); `tensor`, `stage` (and
    `fsdp` by default) stay automatic, so the model's own sharding and the pipeline's nested
    shard_map over `stage` work unchanged inside. Each device accumulates its own gradients,
    unreduced, in fp32; after the last micro-batch they are reduced once, in
    `sync.dtype`: a reduce-scatter into the ZeRO-1 shard (`zero1`), else one all-reduce.
    Without an active mesh, or with no data axis > 1, it is the plain loop.
    fused: `grad_fn(params, micro_batch, layer_accumulators)` returns the layer entries already
    added into the accumulators (`fused_accum`), so no second stacked gradient tree exists.
    """
    sync = sync or sharding.GradSync()

    def local(work, micro):
        def step(carry, mb):
            g_acc, l_acc, n_acc = carry
            # The stacked layer weights are differentiated in the compute dtype: their gradients
            # are matmul outputs in that dtype either way (fp32 params would only widen them),
            # and the backward layer scan then stacks bf16, not fp32, per-layer gradients (half
            # the bytes). Embedding, head and norms get an fp32 view: the embedding's
            # scatter-add and the fused head's dW stay in fp32, as with fp32 params.
            p32 = {k: w if k in LAYER_KEYS and "norm" not in k else w.astype(jnp.float32)
                   for k, w in work.items()}
            if fused:  # the layer gradients come back already added into g_acc (fused_accum)
                (l, n), g = grad_fn(p32, mb, {k: g_acc[k] for k in LAYER_KEYS})
            else:
                (l, n), g = grad_fn(p32, mb)
            # gradients in the parameters' layout: with fsdp automatic (the default), this is
            # the per-micro-batch reduce-scatter over fsdp; over `data` nothing is reduced here
            g = _inside_layout(g)
            g_acc = {k: g[k] if fused and k in LAYER_KEYS else a + g[k].astype(jnp.float32)
                     for k, a in g_acc.items()}
            return (g_acc, l_acc + l, n_acc + n), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), work)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        if num_micro == 1:
            out, _ = step(init, jax.tree.map(lambda a: a[0], micro))
        else:
            out, _ = jax.lax.scan(step, init, micro)
        return out

    act = sharding.active()
    manual = sync.manual_axes(act[0]) if act is not None else ()
    if not manual:
        return local(work, micro)
    mesh, rules = act
    stacked = manual if len(manual) > 1 else manual[0]

    def body(work, micro):
        with sharding.manual_rules(manual):
            grads, total, tokens = local(work, micro)
        # each device's unreduced sums leave as one slice of a leading [data(, fsdp)] axis
        return jax.tree.map(lambda g: g[None], grads), jax.lax.psum(total, manual), jax.lax.psum(tokens, manual)

    run = jax.shard_map(body, mesh=mesh, in_specs=({k: P() for k in work}, {k: P(None, stacked) for k in micro}),
                        out_specs=({k: P(stacked) for k in work}, P(), P()),
                        axis_names=set(manual), check_vma=False)
    partial, total, tokens = run(work, micro)
    # The reduction runs in a second shard_map, manual over every axis: psum_scatter inside the
    # first (automatic over tensor) makes XLA gather each gradient over `tensor` first.
    dtype = jnp.dtype(sync.dtype)
    in_specs, out_specs, fns = {}, {}, {}
    for k, w in work.items():
        inner = _work_sharding(k, w.shape, mesh, rules, manual).spec
        master = _master_sharding(k, w.shape, mesh, rules, zero1).spec
        in_specs[k] = P(stacked, *_pad(inner, w.ndim))
        out_specs[k] = master
        fns[k] = functools.partial(_reduce_local, master=_entries(master, w.ndim), manual=manual, dtype=dtype)
    reduce = jax.shard_map(lambda t: {k: fns[k](g) for k, g in t.items()}, mesh=mesh, in_specs=(in_specs,),
                           out_specs=out_specs, check_vma=False)
    return reduce(partial), total, tokens


def _pad(spec: P, ndim: int) -> tuple:
    return tuple(spec) + (None,) * (ndim - len(spec))


def _fused_grad_fn(cfg: LlamaConfig, loss_chunk):
    """`grad_fn(params, micro_batch, layer_acc)`: the layer entries of the gradients are
    layer_acc + d loss / d layers, added inside the backward layer scan (`fused_accum`)."""
    def loss(rest, acc, layers, b):
        p = _inside_layout({**rest, **layers}, True)
        acc = _inside_layout(acc)
        stack = lambda c, lay, x, pos, seg: fused_accum.run_layers_into(c, lay, acc, x, pos, seg)
        return loss_sum(cfg, p, b, stack, loss_chunk)

    vg = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)

    def grad_fn(p, b, acc):
        rest = {k: v for k, v in p.items() if k not in LAYER_KEYS}
        out, (g_rest, g_acc) = vg(rest, acc, {k: p[k] for k in LAYER_KEYS}, b)
        return out, {**g_rest, **g_acc}
    return grad_fn


def make_train_step(cfg: LlamaConfig, tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
                    num_micro: int = 1, layers_fn: Callable = run_layers, loss_chunk: int | None = None,
                    spike_threshold: float | None = None, *, zero1: bool | None = None,
                    sync: sharding.GradSync | None = None):
    """Build `train_step(state, batch) -> (state, metrics)`.

    The loss is the token-weighted mean over the whole global batch: gradients of the summed
    loss are accumulated over micro-batches in fp32 and divided by the global token count.
    A non-finite loss or gradient norm (or, with `spike_threshold`, a loss above that) skips
    the update: params and optimizer state stay untouched, `skipped` is 1 and the state's
    `bad_streak` grows (the loop stops the run after `train.max_bad_steps`).

    state["params"] are the fp32 master weights (with `zero1`, split over `data` like the
    optimizer state, see `sharding.tree_shardings`). Each step gathers a working copy in the
    compute dtype (`working_copy`), accumulates gradients per device and reduces them once
    (`accumulate_gradients`), and updates the master shard. `zero1` / `sync` default to the
    gin settings (`sharding.zero1`, `sharding.grad_reduce_dtype`, `sharding.fsdp_grad_reduce`);
    they must agree with the state shardings the step is jitted with.
    """
    fused = fused_accum.fusable(cfg, layers_fn)
    grad_fn = _fused_grad_fn(cfg, loss_chunk) if fused else jax.value_and_grad(
        lambda p, b: loss_sum(cfg, _inside_layout(p, True), b, layers_fn, loss_chunk), has_aux=True)
    if zero1 is None:
        zero1 = sharding.logical_rules()[1]
    sync = sync or sharding.grad_sync()

    def train_step(state, batch):
        params = state["params"]
        micro = split_micro(batch, num_micro)
        act = sharding.active()
        manual = sync.manual_axes(act[0]) if act is not None else ()
        work = working_copy(cfg, params, manual, zero1)
        grads, total, tokens = accumulate_gradients(grad_fn, work, micro, num_micro, zero1=zero1, sync=sync,
                                                    fused=fused)
        denom = jnp.maximum(tokens, 1.0)
        loss = total / denom
        grads = jax.tree.map(lambda g: g / denom, grads)
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


def make_eval_step(cfg: LlamaConfig, layers_fn: Callable = run_layers, loss_chunk: int | None = None,
                   num_micro: int = 1, *, zero1: bool | None = None, sync: sharding.GradSync | None = None):
    """`eval_step(params, batch) -> {"loss_sum", "tokens"}`, micro-batched like the train step.

    params: the fp32 master params (any layout the train state uses); the working copy is
    gathered once, then the global batch runs `num_micro` micro-batches at a time (a scan),
    never one forward pass over the whole global batch, so the eval step's activation memory is
    the train step's forward. Inside the same shard_map over the data axes as training; the
    two sums are reduced once at the end.
    """
    sync = sync or sharding.grad_sync()
    if zero1 is None:
        zero1 = sharding.logical_rules()[1]

    def eval_step(params, batch):
        micro = split_micro(batch, num_micro)
        act = sharding.active()
        manual = sync.manual_axes(act[0]) if act is not None else ()
        work = working_copy(cfg, params, manual, zero1)

        def local(work, micro):
            def step(carry, mb):
                total, tokens = loss_sum(cfg, _inside_layout(work, True), mb, layers_fn, loss_chunk)
                return (carry[0] + total, carry[1] + tokens), None
            init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
            return jax.lax.scan(step, init, micro)[0]

        if not manual:
            total, tokens = local(work, micro)
        else:
            mesh = act[0]

            def body(work, micro):
                with sharding.manual_rules(manual):
                    total, tokens = local(work, micro)
                return jax.lax.psum(total, manual), jax.lax.psum(tokens, manual)

            batch_axes = manual if len(manual) > 1 else manual[0]
            total, tokens = jax.shard_map(body, mesh=mesh, in_specs=({k: P() for k in work},
                                                                     {k: P(None, batch_axes) for k in micro}),
                                          out_specs=(P(), P()), axis_names=set(manual), check_vma=False)(work, micro)
        return {"loss_sum": total, "tokens": tokens}
    return eval_step


def init_state(params, tx: optax.GradientTransformation):
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "bad_streak": jnp.zeros((), jnp.int32)}
