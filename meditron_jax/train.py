"""`meditron-jax train`: the training entry point.

Owns: gin parsing (T5X style `--gin_file` / `--gin_param`), multi-host initialisation, the
startup validation of a run (before any compile or write), building mesh + data + state
(fresh, `train.init_from`, or resumed from the workdir), the step loop, logging cadence,
checkpoint cadence and graceful preemption. Does not own: the step's math (train_step.py),
layouts (sharding.py), the data pipeline (data/) or the checkpoint format (checkpoint.py).

Exit status: 0 finished; 2 a user error (one line on stderr); 3 stopped after
`train.max_bad_steps` consecutive non-finite steps (or a non-finite state about to be saved:
it never is); 74 a storage fault (a full disk or quota, an I/O error: a failed checkpoint
save, noticed at the next logged step, or a failed metrics write; one line naming the step and
the newest complete checkpoint a rerun resumes from: `storage.WatchedManager`); 75 preempted by
SIGTERM/SIGINT after saving a checkpoint (rerun the same command to resume). A second signal
aborts at once (130). When another process of a multi-host run dies, the JAX coordination
service terminates the survivors within `--heartbeat_timeout_s` (+ a few seconds) with a
non-zero status (SIGABRT).

Resume (docs/reliability.md): the newest checkpoint that restores is used; an unreadable newer
one is named in a warning and moved to `WORKDIR/checkpoints_unreadable/`. If checkpoints exist
but none restores, the run refuses to start unless `--restart-from-scratch`. On resume,
`metrics.jsonl` records beyond the restored step (written by the interrupted run after its last
checkpoint, or a torn last line) move to `metrics.dropped.jsonl`, so `metrics.jsonl` holds
each step once and equals an uninterrupted run's record for record (timings aside); TensorBoard
hides the same re-logged steps (`metrics.MetricsWriter`'s purge step).
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
import tokenize
from typing import Annotated

import gin
import jax
import jax.numpy as jnp
import numpy as np

from meditron_jax import checkpoint as ckpt
from meditron_jax import configcheck, ginfiles
from meditron_jax import init_from as init_from_lib
from meditron_jax import profiling, tokenizer_store
from meditron_jax import workdir as workdir_mod
from meditron_jax.configcheck import Range
from meditron_jax import console
from meditron_jax import sharding, storage
from meditron_jax.config import LlamaConfig, model_config
from meditron_jax.errors import UserError
from meditron_jax.hostmem import keep_freed_memory
from meditron_jax.metrics import MetricsWriter, StepTimer, device_peak_flops, flops_per_token
from meditron_jax.model import PARAM_AXES, Llama, param_shapes, run_layers
from meditron_jax.optim import make_optimizer, optimizer_config, schedule
from meditron_jax.train_step import BATCH_KEYS, init_state, make_eval_step, make_train_step

EXIT_BAD_STEPS = 3
EXIT_PREEMPTED = 75
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class TrainConfig:  # Annotated ranges: checked with the types before anything runs (configcheck)
    steps: Annotated[int, Range(min=1)]
    micro_batch_size: Annotated[int, Range(min=1)]
    global_batch_size: Annotated[int, Range(min=1)]
    seq_len: Annotated[int, Range(min=2)]
    seed: int = 0
    checkpoint_every: Annotated[int, Range(min=1)] = 1000
    log_every: Annotated[int, Range(min=1)] = 10
    init_from: str | None = None
    eval_every: Annotated[int, Range(min=0)] = 0
    eval_batches: Annotated[int, Range(min=1)] = 4
    max_bad_steps: Annotated[int, Range(min=0)] = 10
    spike_threshold: Annotated[float | None, Range(min=0)] = None
    loss_chunk: Annotated[int | None, Range(min=1)] = None
    poison_steps: tuple = ()
    wandb_project: str | None = None
    progress: bool = True
    tensorboard: bool = True
    profile_steps: tuple = ()  # (first, last): jax.profiler trace into WORKDIR/profile (profiling.py)
    compilation_cache_dir: str | None = None  # JAX's persistent compilation cache


@gin.configurable("train")
def train_config(steps: int = gin.REQUIRED, micro_batch_size: int = gin.REQUIRED,
                 global_batch_size: int = gin.REQUIRED, seq_len: int = gin.REQUIRED, seed: int = 0,
                 checkpoint_every: int = 1000, log_every: int = 10, init_from: str | None = None,
                 eval_every: int = 0, eval_batches: int = 4, max_bad_steps: int = 10,
                 spike_threshold: float | None = None, loss_chunk: int | None = None,
                 poison_steps=(), wandb_project: str | None = None, progress: bool = True,
                 tensorboard: bool = True, profile_steps=(), compilation_cache_dir: str | None = None) -> TrainConfig:
    """gin `train.*`. `poison_steps` (tests only) makes those steps' loss NaN (fault injection)."""
    return TrainConfig(steps, micro_batch_size, global_batch_size, seq_len, seed, checkpoint_every, log_every,
                       init_from, eval_every, eval_batches, max_bad_steps, spike_threshold, loss_chunk,
                       tuple(poison_steps), wandb_project, progress, tensorboard,
                       tuple(profile_steps) if isinstance(profile_steps, (list, tuple)) else profile_steps,
                       compilation_cache_dir)


# ---------------------------------------------------------------------------------------
# gin and validation

def parse_gin(gin_files, gin_params, search_path=()):
    """Parses (and checks, `configcheck`) the gin files and bindings; files are found through
    `ginfiles` (cwd, `--gin_search_path`, the configs shipped with the package)."""
    gin.clear_config()
    resolved = []
    for f in gin_files:
        full = ginfiles.find(f, search_path)
        if full is None:
            raise UserError(f"gin file not found: {f} (searched {', '.join(ginfiles.search_paths(search_path))}; "
                            "add a directory with --gin_search_path)")
        resolved.append(full)
    _register_configurables()
    try:
        with ginfiles.plain_file_reading(search_path):
            for f in resolved:
                _refuse_gin_imports(f, search=search_path)
            gin.parse_config_files_and_bindings(resolved, gin_params, skip_unknown=False)
    except (ValueError, KeyError, TypeError, SyntaxError, IOError, tokenize.TokenError) as e:
        raise UserError(f"gin: {configcheck.explain_parse_error(str(e), gin_params)}") from None
    configcheck.check_bindings()  # types and ranges of every bound value, before anything runs


def _refuse_gin_imports(path: str, seen=None, search=()):
    """Gin files are configuration: values are literals (gin uses `ast.literal_eval`), and the
    `import` statements gin would execute (running a module's code) are refused here, in the
    file and in everything it includes."""
    from gin import config_parser

    class _Delegate(config_parser.ParserDelegate):
        def configurable_reference(self, scoped_name, evaluate):
            return None

        def macro(self, name):
            return None

    full = ginfiles.find(path, search)
    seen = set() if seen is None else seen
    if full is None or os.path.realpath(full) in seen:
        return  # gin itself reports a missing include
    seen.add(os.path.realpath(full))
    with open(full) as fh:
        for st in config_parser.ConfigParser(fh, _Delegate()):
            if isinstance(st, config_parser.ImportStatement) and not st.module.startswith("__gin__."):
                raise UserError(f"{path} line {st.location.line_num}: `{st.format()}` is not allowed: gin files "
                                "are configuration, they may not import Python code")
            if isinstance(st, config_parser.IncludeStatement):
                _refuse_gin_imports(st.filename, seen, search)
                if not os.path.isabs(st.filename):
                    _refuse_gin_imports(os.path.join(os.path.dirname(full), st.filename), seen, search)


def _register_configurables():
    import meditron_jax.data.pipeline  # noqa: F401  (gin `data.*`)
    import meditron_jax.pipeline  # noqa: F401  (gin `pipeline.*`)


def _gin_call(fn):
    try:
        return fn()
    except UserError as e:  # gin appends "\n  In call to configurable ..." to errors raised inside
        raise _one_line(e) from None
    except RuntimeError as e:  # gin: required parameter not supplied
        if "Required" in str(e) or "REQUIRED" in str(e):
            raise UserError("gin: " + " ".join(str(e).split())) from None
        raise


def _one_line(e: UserError) -> UserError:
    msg = str(e).split("\n  In call to configurable")[0]
    try:
        return type(e)(msg)
    except TypeError:
        return UserError(msg)


def validate(tc: TrainConfig, cfg: LlamaConfig, sizes: dict, workdir: str):
    """Every user-caused inconsistency, before any compile or write. One line each."""
    validate_shapes(tc, cfg, sizes)
    _gin_call(lambda: sharding.check_placement(sizes))
    check_workdir(workdir)


def validate_shapes(tc: TrainConfig, cfg: LlamaConfig, sizes: dict):
    """Batch, mesh and model sizes agree (also used by `plan`)."""
    dp = sizes["data"] * sizes["fsdp"]
    if tc.steps < 1:
        raise UserError(f"train.steps must be >= 1, got {tc.steps}")
    accumulation_steps(tc, cfg, sizes)
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
    sharding.grad_sync().check_mesh(sizes)


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
        raise UserError(f"workdir {workdir} has {_size(free)} free, one checkpoint needs {_size(needed_bytes)}")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------
# multi-host

def init_distributed(coordinator_address=None, num_processes=None, process_id=None, timeout_s=300,
                     heartbeat_timeout_s=60, shutdown_timeout_s=30):
    """jax.distributed.initialize from flags, or auto-detected (SLURM, Open MPI), or not at all.

    A process that stops sending heartbeats for `heartbeat_timeout_s` is declared dead and the
    coordination service terminates every other process (instead of leaving them blocked in a
    collective forever); at exit a process waits at most `shutdown_timeout_s` for the others.
    """
    # CPU collectives across processes go through gloo (only affects the CPU backend). Must not
    # touch the backend here: jax.distributed.initialize has to come before any device query.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise UserError("--coordinator_address needs --num_processes and --process_id")
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                      process_id=process_id)
        if process_id != 0:  # XLA aborts the process (no exception) when the coordinator never answers
            _wait_for_coordinator(coordinator_address, timeout_s)
    elif not (int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1):
        return
    try:
        jax.distributed.initialize(initialization_timeout=timeout_s, heartbeat_timeout_seconds=heartbeat_timeout_s,
                                   shutdown_timeout_seconds=shutdown_timeout_s, **kwargs)
    except Exception as e:
        raise UserError(f"cannot join the JAX cluster ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
    if num_processes is not None and jax.process_count() != num_processes:
        raise UserError(f"--num_processes {num_processes} disagrees with the cluster's {jax.process_count()}")


def _wait_for_coordinator(address: str, timeout_s: float):
    """Polls until the coordinator accepts TCP connections; a UserError after `timeout_s`."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--coordinator_address {address!r} is not HOST:PORT")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise UserError(f"cannot reach the coordinator {address} within --init_timeout_s {timeout_s} "
                                f"({e.strerror or e})") from None
            time.sleep(0.5)


# ---------------------------------------------------------------------------------------
# the run

class _Preemption:
    """First SIGTERM/SIGINT: finish the step, checkpoint, exit 75. Second: abort at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def install(self):
        import threading
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only; leave its handlers alone
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handler)

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handler(self, signum, frame):
        if self.requested:
            print(f"\nreceived {signal.Signals(signum).name} again: aborting now (the newest committed "
                  "checkpoint is kept)", file=sys.stderr, flush=True)
            os._exit(130)
        self.requested = True
        print(f"\nreceived {signal.Signals(signum).name}: checkpointing after this step "
              "(signal again to abort)", file=sys.stderr, flush=True)


def layers_fn_for(cfg: LlamaConfig, mesh):
    """The decoder stack: `run_layers`, or the pipeline schedule when mesh.stage > 1."""
    if mesh.shape["stage"] == 1:
        return run_layers
    from meditron_jax import pipeline
    s = pipeline.pipeline_settings()
    return functools.partial(pipeline.pipeline_layers, mesh=mesh, microbatches=s.microbatches,
                             repeats=s.repeats, stage_remat=s.stage_remat,
                             pipeline_layout=s.repeats > 1)  # the trainer holds that layout (TrainerLayout)


def accumulation_steps(tc: TrainConfig, cfg: LlamaConfig, sizes: dict) -> int:
    """Gradient-accumulation steps per global batch (validated; one line on error).

    Megatron semantics: `train.micro_batch_size` sequences per data-parallel rank form one
    micro-batch. Without pipelining each accumulation step runs one micro-batch; with
    mesh.stage > 1 each accumulation step feeds `pipeline.microbatches` micro-batches through
    the pipeline, so global = micro x (data x fsdp) x pipeline.microbatches x accumulation.
    """
    dp = sizes["data"] * sizes["fsdp"]
    per_step = tc.micro_batch_size * dp
    if sizes["stage"] > 1:
        from meditron_jax import pipeline
        s = pipeline.pipeline_settings()
        M = pipeline.check_pipeline(cfg, sizes["stage"], None, dp, s.microbatches, s.repeats)
        per_step *= M
    if tc.global_batch_size % per_step:
        what = f" x pipeline.microbatches {per_step // (tc.micro_batch_size * dp)}" if sizes["stage"] > 1 else ""
        raise UserError(f"train.global_batch_size {tc.global_batch_size} is not divisible by "
                        f"micro_batch_size {tc.micro_batch_size} x data-parallel size {dp} "
                        f"(mesh.data {sizes['data']} x mesh.fsdp {sizes['fsdp']}){what}")
    return tc.global_batch_size // per_step


def build_state(cfg, tc, tx, mesh, rules, zero1, workdir, manager, restart_from_scratch=False, resume_step=None):
    """Returns (state, start_step, data_state, state_shardings). `resume_step`: exactly that
    checkpoint (newer ones are set aside first, `workdir.set_aside_newer`)."""
    abstract_params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in param_shapes(cfg).items()}
    abstract_state = jax.eval_shape(lambda p: init_state(p, tx), abstract_params)
    state_sh = state_shardings(cfg, tx, mesh, rules, zero1)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, state_sh)
    if resume_step is not None:
        workdir_mod.set_aside_newer(manager, workdir, resume_step)
    resumed = restore_newest_readable(manager, target, workdir, restart_from_scratch)
    if resume_step is not None and (resumed is None or resumed[1] != resume_step):
        raise UserError(f"--resume_step {resume_step}: that checkpoint does not restore (see the warning above)")
    if resumed is not None:
        state, step, data_state = resumed
        who = f" (process {jax.process_index()} of {jax.process_count()})" if jax.process_count() > 1 else ""
        print(f"resuming from checkpoint step {step}{who}", file=sys.stderr, flush=True)
        return state, step, data_state, state_sh
    init = jax.jit(lambda p: init_state(p, tx), out_shardings=state_sh)
    if tc.init_from:  # architecture checked by init_from.resolve_config; new vocab rows filled there
        params = init_from_lib.load_initial_params(tc.init_from, ckpt.model_config(tc.init_from), cfg, tc.seed,
                                                   state_sh["params"])
    else:
        params = jax.jit(functools.partial(nnx_params, cfg), static_argnums=0,
                         out_shardings=state_sh["params"])(tc.seed)
    return init(params), 0, None, state_sh


def _batch_shardings(mesh):
    return {k: sharding.batch_sharding(mesh) for k in BATCH_KEYS}


def state_shardings(cfg: LlamaConfig, tx, mesh, rules=None, zero1=False):
    abstract_params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in param_shapes(cfg).items()}
    abstract_state = jax.eval_shape(lambda p: init_state(p, tx), abstract_params)
    return sharding.tree_shardings(abstract_state, PARAM_AXES, mesh, rules or dict(sharding.DEFAULT_RULES), zero1, tx=tx)


def jit_train_step(step_fn, state_sh, mesh):
    """The one place the train step is jitted: explicit in/out shardings, state donated."""
    rep = sharding.replicated(mesh)
    return jax.jit(step_fn, in_shardings=(state_sh, _batch_shardings(mesh), rep),
                   out_shardings=(state_sh, rep), donate_argnums=0)


def nnx_params(cfg: LlamaConfig, seed):
    from flax import nnx
    return Llama(cfg, rngs=nnx.Rngs(params=jax.random.key(seed))).params()


def restore_train_state(manager, step, target):
    """(state, data iterator state) of checkpoint `step`; raises whatever Orbax raises."""
    import orbax.checkpoint as ocp
    restored = ckpt.read_step(manager, step, ocp.args.Composite(
        params=ocp.args.StandardRestore(target["params"]),
        opt_state=ocp.args.StandardRestore(target["opt_state"]),
        data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    if restored["data"] is None:
        raise ValueError("the data iterator state is missing")
    bad_streak = int((restored["meta"] or {}).get("bad_streak", 0))
    state = {"params": restored["params"], "opt_state": restored["opt_state"],
             "step": jnp.asarray(step, jnp.int32), "bad_streak": jnp.asarray(bad_streak, jnp.int32)}
    return state, restored["data"]


def restore_newest_readable(manager, target, workdir, restart_from_scratch=False):
    """(state, step, data state) of the newest checkpoint that restores, or None for a fresh
    start; the fallback rules are `checkpoint.newest_readable`'s."""
    found = ckpt.newest_readable(manager, workdir, lambda step: restore_train_state(manager, step, target),
                                 target["params"], restart_from_scratch)
    if found is None:
        return None
    (state, data_state), step = found
    return state, step, data_state


def truncate_metrics(workdir: str, step: int) -> int:
    """Keeps metrics.jsonl records with step <= `step` (the restored step); later ones (written
    after the last checkpoint of an interrupted run, re-logged by this run) and a torn last line
    are appended to metrics.dropped.jsonl. Returns the number of records moved."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    keep, drop = [], []
    with open(path) as f:
        for line in f:
            try:
                ok = line.endswith("\n") and int(json.loads(line)["step"]) <= step
            except (ValueError, KeyError, TypeError):
                ok = False
            (keep if ok else drop).append(line)
    if drop:
        with open(os.path.join(workdir, "metrics.dropped.jsonl"), "a") as f:
            f.writelines(x if x.endswith("\n") else x + "\n" for x in drop)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return len(drop)


def _all_finite(tree):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


@workdir_mod.releases_lock
def train(workdir: str, gin_files=(), gin_params=(), coordinator_address=None, num_processes=None,
          process_id=None, restart_from_scratch=False, heartbeat_timeout_s=60, shutdown_timeout_s=30,
          init_timeout_s=300, resume_step=None, gin_search_path=()) -> int:
    """Run (or resume) training in `workdir`; returns the exit status documented above."""
    keep_freed_memory()  # the CLI did this already; here for callers of this function
    workdir = workdir_mod.resolve_workdir(workdir)  # file:// URLs; other schemes refused up front
    init_distributed(coordinator_address, num_processes, process_id, timeout_s=init_timeout_s,
                     heartbeat_timeout_s=heartbeat_timeout_s, shutdown_timeout_s=shutdown_timeout_s)
    parse_gin(list(gin_files), list(gin_params), search_path=gin_search_path)
    tc = _gin_call(train_config)
    cfg, init_ref, init_changes = _gin_call(lambda: init_from_lib.run_model_config(tc))
    oc = _gin_call(optimizer_config)
    sizes = _gin_call(sharding.mesh_shape)
    rules, zero1 = _gin_call(sharding.logical_rules)
    profiling.parse_steps(tc.profile_steps)
    validate(tc, cfg, sizes, workdir)
    workdir_mod.check_resume_step(workdir, resume_step)
    workdir_mod.acquire_for_run(workdir)  # one run per workdir (released when train returns)
    profiling.enable_compilation_cache(tc.compilation_cache_dir)

    from meditron_jax.data.pipeline import build_pipeline
    mesh = sharding.make_mesh(sizes)
    log0("building data")
    data = build_pipeline(tc.seq_len, tc.global_batch_size, tc.seed, jax.process_index(),
                          jax.process_count(), workdir=workdir,
                          rows=sharding.host_rows(mesh, tc.global_batch_size))
    tok = data.tokenizer_info
    if tok and tok.get("vocab_size") and tok["vocab_size"] > cfg.vocab_size:
        raise UserError(f"tokenizer {tok.get('path')} has {tok['vocab_size']} tokens, more than the "
                        f"model's vocab_size {cfg.vocab_size}")
    if init_ref is not None:
        init_from_lib.check_added_tokens(tc.init_from, init_ref, cfg, data.tokenizer)
        init_from_lib.log_changes(tc.init_from, init_changes)
    # one checkpoint: fp32 params + 2 Adam moments
    check_workdir(workdir, needed_bytes=12 * cfg.num_params() // max(1, jax.process_count()))

    dp = sharding.data_parallel_size(mesh)
    num_micro = accumulation_steps(tc, cfg, sizes)
    tx = make_optimizer(oc, tc.steps)
    lr_schedule = schedule(oc, tc.steps)
    manager = ckpt.make_manager(workdir)  # removes temporary directories of interrupted saves
    state_bytes = 12 * cfg.num_params()  # one checkpoint: fp32 params + 2 Adam moments
    manager = storage.WatchedManager(manager, workdir, state_bytes)  # failed saves: one line, exit 74
    is_main = jax.process_index() == 0
    preempt = _Preemption()
    preempt.install()
    try:
        with sharding.use_mesh(mesh, rules):
            layers_fn = layers_fn_for(cfg, mesh)
            state, start, data_state, state_sh = build_state(cfg, tc, tx, mesh, rules, zero1, workdir, manager,
                                                             restart_from_scratch, resume_step)
            layout = _pipeline_layout(cfg, mesh, state_sh)
            state = layout.to_memory(state)  # circular repeats: permuted in memory, canonical on disk
            storage.startup_space_check(workdir, state_bytes, ckpt.manager_options().max_to_keep,
                                        _saves(tc, start), len(manager.all_steps()))
            it = data.train_iterator()
            if data_state is not None:
                it.set_state(data_state)
            if start:
                log0(f"resumed from step {start} ({os.path.join(ckpt.checkpoint_dir(workdir), str(start))})")
            if is_main:
                truncate_metrics(workdir, start)
                with open(os.path.join(workdir, "config.gin"), "w") as f:
                    f.write(gin.operative_config_str())
            step_fn = make_train_step(cfg, tx, lr_schedule, num_micro, layers_fn, tc.loss_chunk,
                                      tc.spike_threshold)
            jitted = jit_train_step(step_fn, state_sh, mesh)
            if jax.process_count() > 1:
                # compile first, then start together: on CPU, gloo gives up on a peer that reaches
                # the first collective more than 30 s later (e.g. one process compiling, one cached)
                jitted = jitted.lower(state, _abstract_batch(tc, mesh), jnp.asarray(False)).compile()
                _barrier("compiled")
            eval_fn = jax.jit(make_eval_step(cfg, layers_fn, tc.loss_chunk, num_micro),
                              in_shardings=(state_sh["params"], _batch_shardings(mesh)),
                              out_shardings=sharding.replicated(mesh))
            finite_fn = jax.jit(_all_finite, out_shardings=sharding.replicated(mesh))
            tok_rec = tokenizer_store.record(data.tokenizer) if getattr(data, "tokenizer", None) else tok
            meta = ckpt.meta_record(cfg, gin.operative_config_str(), tok_rec, train={"seq_len": tc.seq_len})
            writer = MetricsWriter(workdir, tc.steps, start, tensorboard=tc.tensorboard,
                                   wandb_project=tc.wandb_project, progress=tc.progress and is_main,
                                   config={"model": cfg.to_dict()},
                                   tokens_per_step=tc.global_batch_size * tc.seq_len,
                                   config_text=gin.operative_config_str())
            if start >= tc.steps:
                print(f"workdir {workdir} already at step {start} >= train.steps {tc.steps}; nothing to do",
                      file=sys.stderr)
            try:
                step, exit_code = _loop(tc, cfg, state, start, it, data, mesh, jitted, eval_fn, finite_fn,
                                        manager, meta, writer, preempt, layout)
            finally:
                manager.wait_until_finished()
                final = manager.latest_step()
                manager.close()
                writer.close()
    finally:
        preempt.uninstall()
        profiling.stop_active()
    if is_main:  # the end-of-run line (not after an exception: that one speaks for itself)
        writer.summary(os.path.join(ckpt.checkpoint_dir(workdir), str(final)) if final is not None else None,
                       exit_code)
    if exit_code == EXIT_PREEMPTED and is_main:
        print(f"preempted: checkpoint at step {step} committed; rerun the same command to resume",
              file=sys.stderr)
    return exit_code


def _pipeline_layout(cfg, mesh, state_sh):
    from meditron_jax import pipeline
    return pipeline.TrainerLayout(cfg, mesh.shape["stage"], pipeline.pipeline_settings().repeats, state_sh)


def _loop(tc, cfg, state, start, it, data, mesh, jitted, eval_fn, finite_fn, manager, meta, writer, preempt,
          layout=None):
    """The step loop; returns (last step, exit status). Metrics are flushed before every save, so
    every step up to a committed checkpoint is in metrics.jsonl."""
    peak = device_peak_flops()
    fpt = flops_per_token(cfg, tc.seq_len)
    bubble = None
    if mesh.shape["stage"] > 1:  # pipeline idle share, logged with every record
        from meditron_jax import pipeline
        ps = pipeline.pipeline_settings()
        bubble = pipeline.bubble_fraction(mesh.shape["stage"], ps.microbatches or 2 * mesh.shape["stage"],
                                          ps.repeats)
        if jax.process_index() == 0:
            print(f"pipeline: {mesh.shape['stage']} stages, bubble fraction {bubble:.3f}", file=sys.stderr)
    timer = StepTimer()
    vote = _StopVote()
    clean, poisoned = jnp.asarray(False), jnp.asarray(True)  # made once, not a transfer per step
    step = start
    pending = []
    profiler = profiling.StepProfiler(tc.profile_steps, os.path.dirname(writer.path))
    last_loss = None  # recorded in each checkpoint's meta (`meditron-jax checkpoints`)
    while step < tc.steps:
        batch = sharding.global_batch(next(it), mesh, tc.global_batch_size)
        poison = poisoned if step + 1 in tc.poison_steps else clean
        profiler.before(step + 1)
        if step == start:  # the first call compiles (dispatch returns once the executable exists)
            log0("compiling the train step")
            with console.Timer() as t:
                state, metrics = jitted(state, batch, poison)
            log0(f"compiled ({t.seconds:.1f} s)")
        else:
            state, metrics = jitted(state, batch, poison)
        step += 1
        profiler.after(step, metrics)
        pending.append(metrics)
        writer.advance()
        stop = vote(preempt.requested)
        ckpt_now = step % tc.checkpoint_every == 0 or step == tc.steps or stop
        log_now = step % tc.log_every == 0 or ckpt_now
        # The host waits for the device only at logged steps (and checkpoints, which are logged):
        # the bad-step streak is read there, so max_bad_steps is enforced at the next logged step
        # (skipped steps leave params and optimizer state untouched, so waiting costs nothing).
        bad_streak = int(state["bad_streak"]) if log_now else 0
        if log_now:
            fetched = jax.device_get(pending)
            last_loss = float(fetched[-1]["loss"]) if "loss" in fetched[-1] else None
            last_loss = last_loss if last_loss is not None and np.isfinite(last_loss) else None
            dt = timer.lap()
            for i, m in enumerate(fetched):
                record = {k: float(v) for k, v in m.items()}
                if i == len(fetched) - 1:
                    record["step_time"] = dt / len(fetched)
                    record["tokens_per_sec"] = tc.global_batch_size * tc.seq_len * len(fetched) / dt
                    if peak:
                        record["mfu"] = record["tokens_per_sec"] * fpt / (peak * jax.device_count())
                    if bubble is not None:
                        record["pipeline_bubble"] = bubble
                writer.write(step - len(fetched) + i + 1, record)
            pending = []
            manager.poll()  # a failed async save stops the run here (storage.WatchedManager)
        if tc.eval_every and step % tc.eval_every == 0:
            _evaluate(eval_fn, state["params"], data, tc, mesh, writer, step)
        if bad_streak >= tc.max_bad_steps > 0:
            print(f"meditron-jax train: error: {bad_streak} consecutive steps with a non-finite loss or "
                  f"gradient norm (train.max_bad_steps={tc.max_bad_steps}); stopped at step {step}, "
                  f"last good checkpoint kept", file=sys.stderr)
            return step, EXIT_BAD_STEPS
        if ckpt_now:
            if not bool(finite_fn({"params": state["params"], "opt_state": state["opt_state"]})):
                print(f"meditron-jax train: error: the train state at step {step} is not finite; not saving "
                      "it, last good checkpoint kept", file=sys.stderr)
                return step, EXIT_BAD_STEPS
            params, opt_state = (state["params"], state["opt_state"]) if layout is None else \
                layout.to_checkpoint(state["params"], state["opt_state"])
            ckpt.save(manager, step, params, opt_state, it.get_state(),
                      {**meta, "step": step, "bad_streak": bad_streak, "loss": last_loss})
            log0(f"saved checkpoint {step} (committing in the background)")
        if stop:
            return step, EXIT_PREEMPTED
    return step, 0


def _saves(tc, start: int) -> int:
    """How many checkpoints a run from `start` to `train.steps` saves."""
    e = tc.checkpoint_every
    return max(0, tc.steps // e - start // e) + (tc.steps % e != 0 and tc.steps > start)


def log0(msg: str):
    """An INFO console line, from process 0 only."""
    if jax.process_index() == 0:
        console.log.info(msg)


def _abstract_batch(tc, mesh):
    return {k: jax.ShapeDtypeStruct((tc.global_batch_size, tc.seq_len), jnp.float32 if k == "loss_mask" else jnp.int32,
                                    sharding=sharding.batch_sharding(mesh, 2)) for k in BATCH_KEYS}


def _barrier(name: str):
    """Every process waits here (coordination-service barrier, no device collective); `name`
    says where, for readers."""
    from meditron_jax import multihost
    multihost.barrier()


class _StopVote:
    """All processes stop at the same step: any process's signal stops everyone.

    With several processes the vote is a max-reduction on the devices, dispatched after step s
    and read after step s+1 has been dispatched: it completes behind step s, so the host never
    waits for the devices to agree and the step pipeline keeps running (a blocking all-gather
    here would be a host sync every step). The price: a signal stops a multi-process run one
    step later than a single process. Every process votes at every step, so all read the same
    result at the same step."""

    def __init__(self):
        self.multi = jax.process_count() > 1
        self.pending = None
        if self.multi:
            from jax.sharding import Mesh, NamedSharding, PartitionSpec

            mesh = Mesh(np.array(jax.devices()), ("all",))
            self.mesh = mesh  # its own device order, not the training mesh's (which may interleave processes)
            self.votes = NamedSharding(mesh, PartitionSpec("all"))
            self.reduce = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def __call__(self, flag: bool) -> bool:
        if not self.multi:
            return flag
        local = np.full((jax.local_device_count(),), int(flag), np.int32)
        with jax.set_mesh(self.mesh):
            vote = self.reduce(jax.make_array_from_process_local_data(self.votes, local))
        previous, self.pending = self.pending, vote
        return previous is not None and bool(previous)


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
    from meditron_jax.config_cli import add_gin_arguments

    add_gin_arguments(p)
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, config.gin go here")
    p.add_argument("--resume_step", type=int, default=None,
                   help="resume from this checkpoint step (default: the newest that restores); newer ones "
                        "are moved to WORKDIR/checkpoints_superseded/")
    p.add_argument("--coordinator_address", default=None, help="host:port of process 0 (multi-host)")
    p.add_argument("--num_processes", type=int, default=None, help="multi-host: number of processes")
    p.add_argument("--process_id", type=int, default=None, help="multi-host: this process's index (0 = coordinator)")
    p.add_argument("--init_timeout_s", type=int, default=300,
                   help="multi-host: how long to wait for every process to join before giving up")
    p.add_argument("--heartbeat_timeout_s", type=int, default=60,
                   help="multi-host: a process silent this long is declared dead and the others stop")
    p.add_argument("--shutdown_timeout_s", type=int, default=30,
                   help="multi-host: how long a finishing process waits for the others at exit")
    p.add_argument("--restart_from_scratch", "--restart-from-scratch", dest="restart_from_scratch", action="store_true",
                   help="start at step 0 when the workdir has checkpoints but none can be restored "
                        "(they are moved to WORKDIR/checkpoints_unreadable/)")


def run(args) -> int:
    console.setup()
    return train(args.workdir, args.gin_file, args.gin_param, args.coordinator_address, args.num_processes,
                 args.process_id, args.restart_from_scratch, args.heartbeat_timeout_s, args.shutdown_timeout_s,
                 args.init_timeout_s, resume_step=args.resume_step, gin_search_path=args.gin_search_path)
