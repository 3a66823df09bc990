"""The train state and the jitted step: one builder, shared by `train` and `plan`.

Owns: the abstract train state (`abstract_state`) and its shardings (`state_shardings`),
the abstract batch, `build_step` (optimizer, schedule, accumulation, decoder stack, the one
`jax.jit` of the train step with explicit shardings and donated state, and the jitted eval
step), and `build_state` (a fresh state, `train.init_from`'s weights, or the newest checkpoint
that restores). Does not own: the step's math (training/step.py), layouts (sharding.py), the
checkpoint format and resume rules (checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from meditron_jax.storage import checkpoint as ckpt
from meditron_jax.storage import resume
from meditron_jax.storage.workdir import Workdir
from meditron_jax import console
from meditron_jax.distributed import sharding
from meditron_jax.distributed import host_batch
from meditron_jax.models.config import LlamaConfig
from meditron_jax.errors import UserError
from meditron_jax.models.llama import PARAM_AXES, Llama, param_shapes, run_layers
from meditron_jax.training.step import BATCH_KEYS, init_state, make_eval_step, make_train_step


def abstract_state(cfg: LlamaConfig, tx):
    """The train state's shapes and dtypes (no arrays allocated)."""
    abstract_params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in param_shapes(cfg).items()}
    return jax.eval_shape(lambda p: init_state(p, tx), abstract_params)


def state_shardings(cfg: LlamaConfig, tx, mesh, rules: dict, zero1=False):
    """The train state's shardings under `rules` (explicit: no default is assumed here)."""
    return sharding.tree_shardings(abstract_state(cfg, tx), PARAM_AXES, mesh, rules, zero1, tx=tx)


def batch_shardings(mesh):
    return {k: host_batch.batch_sharding(mesh) for k in BATCH_KEYS}


def abstract_batch(global_batch_size: int, seq_len: int, mesh):
    """The global batch's shapes, dtypes and shardings (for lowering without data)."""
    return {k: jax.ShapeDtypeStruct((global_batch_size, seq_len), jnp.float32 if k == "loss_mask" else jnp.int32,
                                    sharding=host_batch.batch_sharding(mesh, 2)) for k in BATCH_KEYS}


def jit_train_step(step_fn, state_sh, mesh):
    """The one place the train step is jitted: explicit in/out shardings, state donated."""
    return jax.jit(step_fn, in_shardings=(state_sh, batch_shardings(mesh)),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)


def layers_fn_for(cfg: LlamaConfig, mesh, ps) -> Callable:
    """The decoder stack: `run_layers`, or the pipeline schedule (`ps`, a
    `pipeline.PipelineSettings`) when mesh.stage > 1."""
    if mesh.shape["stage"] == 1:
        return run_layers
    from meditron_jax.training import pipeline
    return functools.partial(pipeline.pipeline_layers, mesh=mesh, microbatches=ps.microbatches,
                             repeats=ps.repeats, stage_remat=ps.stage_remat,
                             pipeline_layout=ps.repeats > 1)  # the trainer holds that layout (TrainerLayout)


@dataclasses.dataclass
class StepBuild:
    """What `build_step` made. `state_in` / `batch_in`: abstract inputs with their shardings."""
    tx: object
    lr_schedule: object
    num_micro: int
    layers_fn: Callable
    state_sh: dict
    state_in: dict
    batch_in: dict
    jitted: Callable  # train_step(state, batch) -> (state, metrics), jitted
    eval_jitted: Callable  # eval_step(params, batch) -> {"loss_sum", "tokens"}, jitted


def build_step(run, mesh) -> StepBuild:
    """The train and eval steps of `run` (a `training.config.RunConfig`) on `mesh`, jitted, plus
    the abstract state and batch they take. Call inside `sharding.use_mesh(mesh, run.rules)`."""
    from meditron_jax.training.optimizer import make_optimizer, schedule
    from meditron_jax.training.config import accumulation_steps

    tc, cfg = run.train, run.model
    num_micro = accumulation_steps(tc, cfg, run.mesh_sizes, run.pipeline)
    tx = make_optimizer(run.optimizer, tc.steps)
    lr_schedule = schedule(run.optimizer, tc.steps)
    layers_fn = layers_fn_for(cfg, mesh, run.pipeline)
    state_sh = state_shardings(cfg, tx, mesh, run.rules, run.zero1)
    state_in = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract_state(cfg, tx), state_sh)
    step_fn = make_train_step(cfg, tx, lr_schedule, num_micro, layers_fn, tc.loss_chunk, tc.spike_threshold,
                              zero1=run.zero1, sync=run.sync)
    eval_fn = jax.jit(make_eval_step(cfg, layers_fn, tc.loss_chunk, num_micro, zero1=run.zero1, sync=run.sync),
                      in_shardings=(state_sh["params"], batch_shardings(mesh)),
                      out_shardings=sharding.replicated(mesh))
    return StepBuild(tx, lr_schedule, num_micro, layers_fn, state_sh, state_in,
                     abstract_batch(tc.global_batch_size, tc.seq_len, mesh),
                     jit_train_step(step_fn, state_sh, mesh), eval_fn)


# ---- the concrete state: fresh, init_from, or restored ---------------------------------------

def nnx_params(cfg: LlamaConfig, seed):
    from flax import nnx
    return Llama(cfg, rngs=nnx.Rngs(params=jax.random.key(seed))).params()


def build_state(run, step: StepBuild, workdir: Workdir, manager, restart_from_scratch=False, resume_step=None):
    """Returns (state, start_step, data_state). `resume_step`: exactly that checkpoint (newer
    ones are set aside first, `resume.set_aside_newer`)."""
    from meditron_jax.training import init_from as init_from_lib

    tc, cfg = run.train, run.model
    if resume_step is not None:
        resume.set_aside_newer(manager, workdir, resume_step)
    resumed = restore_newest_readable(manager, step.state_in, workdir, restart_from_scratch)
    if resume_step is not None and (resumed is None or resumed[1] != resume_step):
        raise UserError(f"--resume_step {resume_step}: that checkpoint does not restore (see the warning above)")
    if resumed is not None:
        state, start, data_state = resumed
        console.resumed(start, workdir.step_dir(start))  # every process
        return state, start, data_state
    tx, state_sh = step.tx, step.state_sh
    init = jax.jit(lambda p: init_state(p, tx), out_shardings=state_sh)
    if tc.init_from:  # architecture checked by init_from.resolve_config; new vocab rows filled there
        params = init_from_lib.load_initial_params(tc.init_from, ckpt.model_config(tc.init_from), cfg, tc.seed,
                                                   state_sh["params"])
    else:
        params = jax.jit(functools.partial(nnx_params, cfg), static_argnums=0,
                         out_shardings=state_sh["params"])(tc.seed)
    return init(params), 0, None


def restore_train_state(manager, step, target):
    """(state, data iterator state) of checkpoint `step`; raises whatever Orbax raises."""
    import orbax.checkpoint as ocp
    restored = resume.read_step(manager, step, ocp.args.Composite(
        params=ocp.args.StandardRestore(target["params"]),
        opt_state=ocp.args.StandardRestore(target["opt_state"]),
        data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    if restored["data"] is None:
        raise ValueError("the data iterator state is missing")
    bad_streak = int((restored["meta"] or {}).get("bad_streak", 0))
    state = {"params": restored["params"], "opt_state": restored["opt_state"],
             "step": jnp.asarray(step, jnp.int32), "bad_streak": jnp.asarray(bad_streak, jnp.int32)}
    return state, restored["data"]


def restore_newest_readable(manager, target, workdir: Workdir, restart_from_scratch=False):
    """(state, step, data state) of the newest checkpoint that restores, or None for a fresh
    start; the fallback rules are `resume.newest_readable`'s."""
    found = resume.newest_readable(manager, workdir, lambda step: restore_train_state(manager, step, target),
                                   {"params": target["params"], "opt_state": target["opt_state"]},
                                   restart_from_scratch)
    if found is None:
        return None
    (state, data_state), step = found
    return state, step, data_state
