"""Running a function one device at a time: `shard_map` over every mesh axis not already manual,
with each argument split as its logical axes say, differentiable also where the call is
nested in another shard_map.

Owns: `run` (the call and its VJP) and `split_size` (how many ways the rules split a logical
axis here). Used for Pallas kernels (models/attention_kernels.py): a Pallas call is a custom
call that XLA cannot partition, so it must run where every mesh axis is manual, which is true
at the top of the step, inside the step's data-manual shard_map and inside the pipeline's
stage/data/fsdp-manual one alike. Does not own: the logical rules (sharding.py).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from meditron_jax.distributed import sharding
from meditron_jax.distributed.host_batch import manual_axes_here


def _here():
    """(mesh, axes still automatic here, rules without the manual axes), or None without a
    sharding context."""
    ctx = sharding.active()
    if ctx is None:
        return None
    manual = manual_axes_here()
    mesh = jax.sharding.get_abstract_mesh() if manual else ctx.mesh
    free = tuple(a for a in mesh.axis_names if a not in manual)
    return mesh, free, sharding.without_axes(ctx.rules, manual)


def _spec(axes, shape, mesh, rules) -> P:
    return sharding.fit_spec(sharding.logical_to_spec(axes, rules), shape, mesh)


def split_size(logical: str, size: int) -> int:
    """Into how many pieces `run` splits a dimension of `size` named `logical` here."""
    here = _here()
    if here is None:
        return 1
    mesh, free, rules = here
    entry = tuple(_spec((logical,), (size,), mesh, rules))[0]
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(mesh.shape[a] for a in names)


def _varying(*xs) -> set[str]:
    """The manual mesh axes the values vary over, as the enclosing shard_map types them."""
    axes: set[str] = set()
    for x in xs:
        axes |= set(getattr(getattr(jax.typeof(x), "manual_axis_type", None), "varying", ()) or ())
    return axes


def run(fn: Callable, args: Sequence, axes: Sequence[tuple], out_axes: tuple, num_diff: int):
    """`fn(*args)` per device: under `shard_map` manual over every mesh axis not already manual,
    argument i split as its logical `axes[i]` say (fit to its shape; None: whole), the output
    (shaped like the first argument) by `out_axes`. The first `num_diff` arguments are differentiable (the others get no
    gradient); the VJP is `fn`'s own, run per device. Without a sharding context, `fn(*args)`.

    Why not plainly `jax.shard_map(fn)`: Pallas kernels declare their outputs without the manual
    axes they vary over, so their shard_map must be `check_vma=False`, and nested inside a
    shard_map that types values by those axes (the pipeline's, `check_vma=True`) JAX 0.10.2
    cannot differentiate through that: the inner body's inputs keep the outer axes in their
    type and the kernel's outputs and gradients do not ("Expected cotangent type
    ...{V:stage}"). So `fn` is differentiated inside the shard_map on inputs stripped of those
    types (`untyped`: x * 1, which a check_vma=False body types as varying over nothing; XLA
    drops the multiply), its residuals leave as one slot per device, and what leaves is
    re-typed as varying over the outer axes (`pcast`, no op on values). Outside such a
    shard_map nothing is re-typed."""
    here = _here()
    if here is None or not here[1]:
        return fn(*args)
    mesh, free, rules = here
    ins = tuple(_spec(a, x.shape, mesh, rules) for a, x in zip(axes, args))
    out_spec = _spec(out_axes, args[0].shape[:len(out_axes)], mesh, rules)
    vary = _varying(*args)

    def sm(f, in_specs, out_specs):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=set(free),
                             check_vma=False)

    def untyped(*xs):
        return [x * jnp.ones((), x.dtype) for x in xs]

    def retype(x):
        missing = tuple(sorted(vary - _varying(x)))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    tree = {}

    def forward(*a):
        a = untyped(*a)
        out, pullback = jax.vjp(lambda *d: fn(*d, *a[num_diff:]), *a[:num_diff])
        leaves, tree["def"] = jax.tree.flatten(pullback)
        return out, [x[None] for x in leaves]

    def backward(ct, leaves):
        return jax.tree.unflatten(tree["def"], [x[0] for x in leaves])(*untyped(ct))

    @jax.custom_vjp
    def call(*a):
        return retype(sm(lambda *b: fn(*untyped(*b)), ins, out_spec)(*a))

    def call_fwd(*a):
        out, residuals = sm(forward, ins, (out_spec, P(free)))(*a)
        return retype(out), residuals

    def call_bwd(residuals, ct):
        grads = sm(backward, (out_spec, P(free)), ins[:num_diff])(ct, residuals)
        return (*map(retype, grads), *([None] * (len(args) - num_diff)))

    call.defvjp(call_fwd, call_bwd)
    return call(*args)
