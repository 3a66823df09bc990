"""`meditron-jax train`: the training entry point.

Owns: gin parsing (T5X style `--gin_file` / `--gin_param`), multi-host initialisation, the
startup validation of a run (before any compile or write), building mesh + data + state
(fresh, `train.init_from`, or resumed from the workdir), the step loop, logging cadence,
checkpoint cadence and graceful preemption. Does not own: the step's math (train_step.py),
layouts (sharding.py), the data pipeline (data/) or the checkpoint format (checkpoint.py).

Exit status: 0 finished; 2 a user error (one line on stderr); 3 stopped after
`train.max_bad_steps` consecutive non-finite steps; 75 preempted by SIGTERM/SIGINT after
saving a checkpoint (rerun the same command to resume). A second signal aborts at once (130).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import signal
import sys
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np

from meditron_jax import checkpoint as ckpt
from meditron_jax import sharding
from meditron_jax.config import LlamaConfig, model_config
from meditron_jax.errors import UserError
from meditron_jax.metrics import MetricsWriter, StepTimer, device_peak_flops, flops_per_token
from meditron_jax.model import PARAM_AXES, Llama, param_shapes, run_layers
from meditron_jax.optim import make_optimizer, optimizer_config, schedule
from meditron_jax.train_step import BATCH_KEYS, init_state, make_eval_step, make_train_step

EXIT_BAD_STEPS = 3
EXIT_PREEMPTED = 75
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int
    micro_batch_size: int
    global_batch_size: int
    seq_len: int
    seed: int = 0
    checkpoint_every: int = 1000
    log_every: int = 10
    init_from: str | None = None
    eval_every: int = 0
    eval_batches: int = 4
    max_bad_steps: int = 10
    spike_threshold: float | None = None
    loss_chunk: int | None = None
    poison_steps: tuple = ()
    wandb_project: str | None = None
    progress: bool = True


@gin.configurable("train")
def train_config(steps: int = gin.REQUIRED, micro_batch_size: int = gin.REQUIRED,
                 global_batch_size: int = gin.REQUIRED, seq_len: int = gin.REQUIRED, seed: int = 0,
                 checkpoint_every: int = 1000, log_every: int = 10, init_from: str | None = None,
                 eval_every: int = 0, eval_batches: int = 4, max_bad_steps: int = 10,
                 spike_threshold: float | None = None, loss_chunk: int | None = None,
                 poison_steps=(), wandb_project: str | None = None, progress: bool = True) -> TrainConfig:
    """gin `train.*`. `poison_steps` (tests only) makes those steps' loss NaN (fault injection)."""
    return TrainConfig(steps, micro_batch_size, global_batch_size, seq_len, seed, checkpoint_every, log_every,
                       init_from, eval_every, eval_batches, max_bad_steps, spike_threshold, loss_chunk,
                       tuple(poison_steps), wandb_project, progress)


# ---------------------------------------------------------------------------------------
# gin and validation

def parse_gin(gin_files, gin_params):
    gin.clear_config()
    for path in (REPO_ROOT, os.getcwd()):
        gin.add_config_file_search_path(path)
    for f in gin_files:
        if not os.path.exists(f) and not os.path.exists(os.path.join(REPO_ROOT, f)):
            raise UserError(f"gin file not found: {f}")
    _register_configurables()
    try:
        gin.parse_config_files_and_bindings(gin_files, gin_params, skip_unknown=False)
    except (ValueError, KeyError, TypeError, SyntaxError, IOError) as e:
        msg = " ".join(str(e).split())
        raise UserError(f"gin: {msg}") from None


def _register_configurables():
    import meditron_jax.data.pipeline  # noqa: F401  (gin `data.*`)
    import meditron_jax.pipeline  # noqa: F401  (gin `pipeline.*`)


def _gin_call(fn):
    try:
        return fn()
    except RuntimeError as e:  # gin: required parameter not supplied
        if "Required" in str(e) or "REQUIRED" in str(e):
            raise UserError("gin: " + " ".join(str(e).split())) from None
        raise


def validate(tc: TrainConfig, cfg: LlamaConfig, sizes: dict, workdir: str):
    """Every user-caused inconsistency, before any compile or write. One line each."""
    dp = sizes["data"] * sizes["fsdp"]
    if tc.steps < 1:
        raise UserError(f"train.steps must be >= 1, got {tc.steps}")
    if tc.global_batch_size % (tc.micro_batch_size * dp):
        raise UserError(f"train.global_batch_size {tc.global_batch_size} is not divisible by "
                        f"micro_batch_size {tc.micro_batch_size} x data-parallel size {dp} "
                        f"(mesh.data {sizes['data']} x mesh.fsdp {sizes['fsdp']})")
    if tc.global_batch_size % jax.process_count():
        raise UserError(f"train.global_batch_size {tc.global_batch_size} is not divisible by the "
                        f"{jax.process_count()} processes")
    t = sizes["tensor"]
    for name, n in (("num_heads", cfg.num_heads), ("num_kv_heads", cfg.num_kv_heads),
                    ("intermediate_size", cfg.intermediate_size)):
        if n % t:
            raise UserError(f"model {name} {n} is not divisible by mesh.tensor {t}")
    if cfg.num_layers % sizes["stage"]:
        raise UserError(f"model num_layers {cfg.num_layers} is not divisible by mesh.stage {sizes['stage']}")
    if tc.seq_len > cfg.max_position_embeddings:
        raise UserError(f"train.seq_len {tc.seq_len} exceeds the model's max_position_embeddings "
                        f"{cfg.max_position_embeddings}")
    if tc.loss_chunk and tc.seq_len % tc.loss_chunk:
        raise UserError(f"train.seq_len {tc.seq_len} is not divisible by train.loss_chunk {tc.loss_chunk}")
    check_workdir(workdir)


def check_workdir(workdir: str, needed_bytes: int = 0):
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_probe_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"workdir {workdir} is not writable ({e.strerror})") from None
    free = shutil.disk_usage(workdir).free
    if needed_bytes and free < needed_bytes:
        raise UserError(f"workdir {workdir} has {free / 2**30:.1f} GiB free, one checkpoint needs "
                        f"{needed_bytes / 2**30:.1f} GiB")


# ---------------------------------------------------------------------------------------
# multi-host

def init_distributed(coordinator_address=None, num_processes=None, process_id=None, timeout_s=300):
    """jax.distributed.initialize from flags, or auto-detected (SLURM, Open MPI), or not at all."""
    if jax.default_backend() == "cpu" or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise UserError("--coordinator_address needs --num_processes and --process_id")
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                      process_id=process_id)
    elif not (int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1):
        return
    try:
        jax.distributed.initialize(initialization_timeout=timeout_s, **kwargs)
    except Exception as e:
        raise UserError(f"cannot join the JAX cluster ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
    if num_processes is not None and jax.process_count() != num_processes:
        raise UserError(f"--num_processes {num_processes} disagrees with the cluster's {jax.process_count()}")


# ---------------------------------------------------------------------------------------
# the run

class _Preemption:
    """First SIGTERM/SIGINT: finish the step, checkpoint, exit 75. Second: abort at once."""

    def __init__(self):
        self.requested = False

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.requested:
            os._exit(130)
        self.requested = True
        print(f"\nreceived {signal.Signals(signum).name}: checkpointing after this step "
              "(signal again to abort)", file=sys.stderr, flush=True)


def layers_fn_for(cfg: LlamaConfig, mesh):
    if mesh.shape["stage"] == 1:
        return run_layers
    from meditron_jax import pipeline
    return pipeline.layers_fn(mesh)


def build_state(cfg, tc, tx, mesh, rules, zero1, workdir, manager):
    """Returns (state, start_step, data_state, state_shardings)."""
    abstract_params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in param_shapes(cfg).items()}
    abstract_state = jax.eval_shape(lambda p: init_state(p, tx), abstract_params)
    state_sh = state_shardings(cfg, tx, mesh, rules, zero1)
    steps = manager.all_steps()
    if steps:
        step = max(steps)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_state, state_sh)
        state, data_state = restore_train_state(manager, step, target, workdir)
        return state, step, data_state, state_sh
    init = jax.jit(lambda p: init_state(p, tx), out_shardings=state_sh)
    if tc.init_from:
        ref = ckpt.model_config(tc.init_from)
        if param_shapes(ref) != param_shapes(cfg):
            raise UserError(f"train.init_from {tc.init_from}: its model ({ref.num_layers} layers, hidden "
                            f"{ref.hidden_size}, vocab {ref.vocab_size}) does not match the configured model "
                            f"({cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size})")
        target = {k: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=state_sh["params"][k])
                  for k, a in abstract_params.items()}
        params = ckpt.restore_params(tc.init_from, target)
    else:
        params = jax.jit(functools.partial(nnx_params, cfg), static_argnums=0,
                         out_shardings=state_sh["params"])(tc.seed)
    return init(params), 0, None, state_sh


def _batch_shardings(mesh):
    return {k: sharding.batch_sharding(mesh) for k in BATCH_KEYS}


def state_shardings(cfg: LlamaConfig, tx, mesh, rules=None, zero1=False):
    abstract_params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in param_shapes(cfg).items()}
    abstract_state = jax.eval_shape(lambda p: init_state(p, tx), abstract_params)
    return sharding.tree_shardings(abstract_state, PARAM_AXES, mesh, rules or dict(sharding.DEFAULT_RULES), zero1)


def jit_train_step(step_fn, state_sh, mesh):
    """The one place the train step is jitted: explicit in/out shardings, state donated."""
    rep = sharding.replicated(mesh)
    return jax.jit(step_fn, in_shardings=(state_sh, _batch_shardings(mesh), rep),
                   out_shardings=(state_sh, rep), donate_argnums=0)


def nnx_params(cfg: LlamaConfig, seed):
    from flax import nnx
    return Llama(cfg, rngs=nnx.Rngs(params=jax.random.key(seed))).params()


def restore_train_state(manager, step, target, workdir):
    import orbax.checkpoint as ocp
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target["params"]),
            opt_state=ocp.args.StandardRestore(target["opt_state"]),
            data=ocp.args.JsonRestore()))
    except Exception as e:
        raise UserError(f"{workdir}: cannot restore checkpoint step {step} "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
    state = {"params": restored["params"], "opt_state": restored["opt_state"],
             "step": jnp.asarray(step, jnp.int32), "bad_streak": jnp.zeros((), jnp.int32)}
    return state, restored["data"]


def train(workdir: str, gin_files=(), gin_params=(), coordinator_address=None, num_processes=None,
          process_id=None) -> int:
    """Run (or resume) training in `workdir`; returns the exit status documented above."""
    init_distributed(coordinator_address, num_processes, process_id)
    parse_gin(list(gin_files), list(gin_params))
    tc = _gin_call(train_config)
    cfg = _gin_call(model_config)
    oc = _gin_call(optimizer_config)
    sizes = sharding.mesh_shape()
    rules, zero1 = sharding.logical_rules()
    validate(tc, cfg, sizes, workdir)

    from meditron_jax.data.pipeline import build_pipeline
    data = build_pipeline(tc.seq_len, tc.global_batch_size, tc.seed, jax.process_index(),
                          jax.process_count(), workdir=workdir)
    tok = data.tokenizer_info
    if tok and tok.get("vocab_size") and tok["vocab_size"] > cfg.vocab_size:
        raise UserError(f"tokenizer {tok.get('path')} has {tok['vocab_size']} tokens, more than the "
                        f"model's vocab_size {cfg.vocab_size}")
    # one checkpoint: fp32 params + 2 Adam moments
    check_workdir(workdir, needed_bytes=12 * cfg.num_params() // max(1, jax.process_count()))

    mesh = sharding.make_mesh(sizes)
    dp = sharding.data_parallel_size(mesh)
    num_micro = tc.global_batch_size // (tc.micro_batch_size * dp)
    tx = make_optimizer(oc, tc.steps)
    lr_schedule = schedule(oc, tc.steps)
    manager = ckpt.make_manager(workdir)
    is_main = jax.process_index() == 0

    with sharding.use_mesh(mesh, rules):
        layers_fn = layers_fn_for(cfg, mesh)
        state, start, data_state, state_sh = build_state(cfg, tc, tx, mesh, rules, zero1, workdir, manager)
        it = data.train_iterator()
        if data_state is not None:
            it.set_state(data_state)
        if is_main:
            with open(os.path.join(workdir, "config.gin"), "w") as f:
                f.write(gin.operative_config_str())
        step_fn = make_train_step(cfg, tx, lr_schedule, num_micro, layers_fn, tc.loss_chunk, tc.spike_threshold)
        jitted = jit_train_step(step_fn, state_sh, mesh)
        eval_fn = jax.jit(make_eval_step(cfg, layers_fn, tc.loss_chunk),
                          in_shardings=(state_sh["params"], _batch_shardings(mesh)),
                          out_shardings=sharding.replicated(mesh))
        meta = ckpt.meta_record(cfg, gin.operative_config_str(), tok, train={"seq_len": tc.seq_len})
        peak = device_peak_flops()
        fpt = flops_per_token(cfg, tc.seq_len)
        writer = MetricsWriter(workdir, tc.steps, start, tensorboard=True, wandb_project=tc.wandb_project,
                               progress=tc.progress and is_main, config={"model": cfg.to_dict()})
        preempt = _Preemption()
        preempt.install()
        if start >= tc.steps:
            print(f"workdir {workdir} already at step {start} >= train.steps {tc.steps}; nothing to do",
                  file=sys.stderr)
        timer = StepTimer()
        tokens_since, steps_since = 0.0, 0
        step = start
        exit_code = 0
        pending = []
        while step < tc.steps:
            batch = sharding.global_batch(next(it), mesh)
            poison = jnp.asarray(step + 1 in tc.poison_steps)
            state, metrics = jitted(state, batch, poison)
            step += 1
            steps_since += 1
            pending.append(metrics)
            writer.advance()
            log_now = step % tc.log_every == 0 or step == tc.steps
            ckpt_now = step % tc.checkpoint_every == 0 or step == tc.steps
            stop = _agree(preempt.requested)
            if log_now or ckpt_now or stop or tc.max_bad_steps:
                # one host sync per logged step; per step only the tiny bad-streak counter
                bad_streak = int(state["bad_streak"])
            if log_now:
                fetched = jax.device_get(pending)
                dt = timer.lap()
                tokens = float(sum(m["tokens"] for m in fetched))
                for i, m in enumerate(fetched):
                    record = {k: float(v) for k, v in m.items()}
                    if i == len(fetched) - 1:
                        record["step_time"] = dt / len(fetched)
                        record["tokens_per_sec"] = tc.global_batch_size * tc.seq_len * len(fetched) / dt
                        if peak:
                            record["mfu"] = record["tokens_per_sec"] * fpt / (peak * jax.device_count())
                    writer.write(step - len(fetched) + i + 1, record)
                pending = []
            if tc.eval_every and step % tc.eval_every == 0:
                _evaluate(eval_fn, state["params"], data, tc, mesh, writer, step)
            if bad_streak >= tc.max_bad_steps > 0:
                writer.close()
                manager.wait_until_finished()
                print(f"meditron-jax train: error: {bad_streak} consecutive steps with a non-finite loss or "
                      f"gradient norm (train.max_bad_steps={tc.max_bad_steps}); stopped at step {step}, "
                      f"last good checkpoint kept", file=sys.stderr)
                return EXIT_BAD_STEPS
            if ckpt_now or stop:
                ckpt.save(manager, step, state["params"], state["opt_state"], it.get_state(), meta)
            if stop:
                exit_code = EXIT_PREEMPTED
                break
        manager.wait_until_finished()
        manager.close()
        writer.close()
    if exit_code == EXIT_PREEMPTED and is_main:
        print(f"preempted: checkpoint at step {step} committed; rerun the same command to resume",
              file=sys.stderr)
    return exit_code


def _agree(flag: bool) -> bool:
    """All processes stop together: any process's signal stops everyone."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _evaluate(eval_fn, params, data, tc, mesh, writer, step):
    total = tokens = 0.0
    for b in data.eval_batches(tc.eval_batches):
        out = jax.device_get(eval_fn(params, sharding.global_batch(b, mesh)))
        total += float(out["loss_sum"])
        tokens += float(out["tokens"])
    if tokens:
        loss = total / tokens
        writer.write(step, {"eval_loss": loss, "eval_ppl": float(np.exp(min(loss, 50.0)))})


# ---------------------------------------------------------------------------------------
# CLI

def add_arguments(p):
    p.add_argument("--gin_file", action="append", default=[], help="gin config file (repeatable)")
    p.add_argument("--gin_param", action="append", default=[], help="gin binding, e.g. 'train.steps=100'")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, config.gin go here")
    p.add_argument("--coordinator_address", default=None, help="host:port of process 0 (multi-host)")
    p.add_argument("--num_processes", type=int, default=None)
    p.add_argument("--process_id", type=int, default=None)


def run(args) -> int:
    logging.getLogger("absl").setLevel(logging.ERROR)
    return train(args.workdir, args.gin_file, args.gin_param, args.coordinator_address, args.num_processes,
                 args.process_id)
