"""`meditron-jax train`: the training entry point.

The run is a short sequence: parse and check the config (`config.gin_files.parse`,
`training.config`: a bad value is refused before anything starts), join the cluster
(`multihost.init_distributed`: flags, or the one the environment names), build mesh, data and
state (`training.state`: a fresh state, `train.init_from`, or resumed from the workdir), then
run the loop (`training.loop.Loop`) with its hooks: profiling, preemption
(`training.preemption`), logging (`metrics.TrainLog`), evaluation
(`eval.during_training`), the bad-step guard and checkpointing (`checkpoint.CheckpointHook`).
Does not own: the step's math (training/step.py), layouts (sharding.py), the data pipeline
(data/) or the checkpoint format (checkpoint.py). docs/architecture.md has the module map.

Exit status: 0 finished; 2 a user error (one line on stderr); 3 stopped after
`train.max_bad_steps` consecutive non-finite steps (or a non-finite state about to be saved:
it never is); 74 a storage fault (a full disk or quota, an I/O error: a failed checkpoint
save, noticed at the next logged step, or a failed metrics write; one line naming the step and
the newest complete checkpoint a rerun resumes from: `storage.WatchedManager`); 75 preempted by
SIGTERM/SIGINT after saving a checkpoint (rerun the same command to resume). A second signal
aborts at once (130). When another process of a multi-host run dies, the JAX coordination
service terminates the survivors within `--heartbeat_timeout_s` (+ a few seconds) with a
non-zero status (SIGABRT); on CPU, gloo's transport may abort them sooner (docs/reliability.md).

Resume (docs/reliability.md): the newest checkpoint that restores is used; an unreadable newer
one is named in a warning and moved to `WORKDIR/checkpoints_unreadable/`. If checkpoints exist
but none restores, the run refuses to start unless `--restart-from-scratch`. On resume,
`metrics.jsonl` records beyond the restored step (written by the interrupted run after its last
checkpoint, or a torn last line) move to `metrics.dropped.jsonl`, so `metrics.jsonl` holds
each step once and equals an uninterrupted run's record for record (timings aside); TensorBoard
hides the same re-logged steps (`metrics.MetricsWriter`'s purge step).
"""

from __future__ import annotations

import sys
import time

import gin
import jax

from meditron_jax import console
from meditron_jax.storage import checkpoint as ckpt
from meditron_jax.training import init_from as init_from_lib
from meditron_jax.distributed import multihost
from meditron_jax.storage import paths
from meditron_jax.training import profiling
from meditron_jax.distributed import sharding
from meditron_jax.distributed import host_batch
from meditron_jax.distributed import meshes
from meditron_jax.storage import faults as storage
from meditron_jax.storage import resume
from meditron_jax.storage import tokenizer_store
from meditron_jax.storage import workdir as workdir_mod
from meditron_jax.storage.workdir import Workdir
from meditron_jax.training.config import parse_gin
from meditron_jax.errors import UserError
from meditron_jax.training.eval_hook import EvalHook
from meditron_jax.training import hostmem
from meditron_jax.training.metrics import MetricsWriter, TrainLog, flops_per_token, truncate_metrics
from meditron_jax.training.config import check_workdir, read_run_config, validate
from meditron_jax.training.loop import BadStepGuard, Loop, log0
from meditron_jax.training.preemption import EXIT_PREEMPTED, Preemption, PreemptionHook
from meditron_jax.training.state import build_state, build_step


@workdir_mod.releases_lock
def train(workdir: Workdir | str, gin_files=(), gin_params=(), coordinator_address=None, num_processes=None,
          process_id=None, restart_from_scratch=False, heartbeat_timeout_s=60, shutdown_timeout_s=30,
          init_timeout_s=300, resume_step=None, gin_search_path=(), wrap_step=None) -> int:
    """Run (or resume) training in `workdir` (a `Workdir` or the user's `--workdir` text);
    returns the exit status documented above.

    `wrap_step(step_fn, start_step) -> step_fn` (tests: fault injection) wraps the jitted step
    the loop calls; production runs leave it None."""
    started = time.time()  # the summary's wall time and goodput count from here
    workdir = Workdir.resolve(workdir)  # file:// URLs; other schemes refused up front
    parse_gin(list(gin_files), list(gin_params), search_path=gin_search_path)  # bad values: before joining
    cluster = multihost.init_distributed(coordinator_address, num_processes, process_id, timeout_s=init_timeout_s,
                                         heartbeat_timeout_s=heartbeat_timeout_s, shutdown_timeout_s=shutdown_timeout_s)
    hostmem.apply(cpu=jax.default_backend() == "cpu")  # the CLI did this already; here for callers of train()
    run = read_run_config()
    tc, cfg = run.train, run.model
    profiling.parse_steps(tc.profile_steps)
    validate(run, workdir)
    resume_step = resume.check_resume_step(workdir, resume_step, tc.resume_step)
    workdir_mod.acquire_for_run(workdir)  # one run per workdir (released when train returns)
    profiling.enable_compilation_cache(tc.compilation_cache_dir)

    multihost.log_start(cluster)
    mesh = meshes.make_mesh(run.mesh_sizes)
    log0("mesh " + " ".join(f"{a}={n}" for a, n in run.mesh_sizes.items()) + f" over {mesh.devices.size} devices")
    data = build_data(run, mesh, workdir)
    # one checkpoint: fp32 params + 2 Adam moments
    check_workdir(workdir, needed_bytes=12 * cfg.num_params() // max(1, jax.process_count()))
    state_bytes = 12 * cfg.num_params()  # one checkpoint: fp32 params + 2 Adam moments
    # removes temporary directories of interrupted saves; failed saves: one line, exit 74
    manager = storage.watched_manager(workdir, state_bytes)
    is_main = jax.process_index() == 0
    preempt = Preemption()
    preempt.install()
    try:
        with sharding.use_mesh(mesh, run.rules):
            step = build_step(run, mesh)
            state, start, data_state = build_state(run, step, workdir, manager, restart_from_scratch, resume_step)
            layout = pipeline_layout(run, mesh, step.state_sh)
            state = layout.to_memory(state)  # circular repeats: permuted in memory, canonical on disk
            storage.startup_space_check(workdir, state_bytes, ckpt.manager_options().max_to_keep,
                                        _saves(tc, start), len(manager.all_steps()))
            it = data.train_iterator()
            if data_state is not None:
                it.set_state(data_state)
            if is_main:
                truncate_metrics(workdir, start)
                paths.write_text(workdir.config_gin, gin.operative_config_str())
            step_fn = step.jitted
            aot = console.Timer()  # the compile when it happens here, not at the loop's first step
            if jax.process_count() > 1:
                # compile first, then start together: on CPU, gloo gives up on a peer that reaches
                # the first collective more than 30 s later (e.g. one process compiling, one cached)
                with aot:
                    step_fn = step_fn.lower(state, step.batch_in).compile()
                multihost.barrier()
            if wrap_step is not None:
                step_fn = wrap_step(step_fn, start)
            tok = data.tokenizer_info
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
                loop = Loop(step_fn, lambda: host_batch.global_batch(next(it), mesh, tc.global_batch_size), tc.steps)
                log = add_hooks(loop, run, mesh, writer, preempt, workdir, ckpt.CheckpointHook(
                    manager, it, meta, sharding.replicated(mesh), layout), EvalHook(
                    step.eval_jitted, data, tc.eval_batches, mesh, writer))
                log.totals["compile_s"] += aot.seconds
                last, exit_code = loop.run(state, start)
            finally:
                manager.wait_until_finished()
                final = manager.latest_step()
                manager.close()
                writer.close()
    finally:
        preempt.uninstall()
        profiling.stop_active()
    if is_main:  # the end-of-run line (not after an exception: that one speaks for itself)
        writer.summary(workdir.step_dir(final) if final is not None else None, exit_code, log, started)
    if exit_code == EXIT_PREEMPTED and is_main:
        print(f"preempted: checkpoint at step {last} committed; rerun the same command to resume",
              file=sys.stderr)
    return exit_code


def build_data(run, mesh, workdir: Workdir):
    """The run's data pipeline (this process's rows), its tokenizer checked against the model."""
    from meditron_jax.data.loader import build_pipeline

    tc, cfg = run.train, run.model
    log0("building data")
    data = build_pipeline(tc.seq_len, tc.global_batch_size, tc.seed, jax.process_index(),
                          jax.process_count(), workdir=workdir,
                          rows=host_batch.host_rows(mesh, tc.global_batch_size))
    tok = data.tokenizer_info
    if tok and tok.get("vocab_size") and tok["vocab_size"] > cfg.vocab_size:
        raise UserError(f"tokenizer {tok.get('path')} has {tok['vocab_size']} tokens, more than the "
                        f"model's vocab_size {cfg.vocab_size}")
    if run.init_ref is not None:
        init_from_lib.check_added_tokens(tc.init_from, run.init_ref, cfg, data.tokenizer)
        init_from_lib.log_changes(tc.init_from, list(run.init_changes))
    return data


def add_hooks(loop: Loop, run, mesh, writer, preempt, workdir: Workdir, saver, evaluator) -> TrainLog:
    """The loop's hooks, in the order they run after a step. Metrics are flushed before every
    save, so every step up to a committed checkpoint is in metrics.jsonl. Evaluation and saving
    are timed apart from the steps (`TrainLog.excluding`). Returns the logging hook (its timing
    totals go into the end-of-run summary)."""
    tc = run.train
    profiler = profiling.StepProfiler(tc.profile_steps, workdir)
    loop.before_step.append(profiler.before)
    loop.add_hook(lambda info: profiler.after(info.step, info.metrics))
    log = TrainLog(writer, tc.global_batch_size * tc.seq_len, flops_per_token(run.model, tc.seq_len),
                   pipeline_bubble(run, mesh))
    loop.add_hook(log.collect)
    loop.add_hook(PreemptionHook(preempt))
    logged = (tc.log_every, tc.checkpoint_every)  # every checkpoint is a logged step
    loop.add_hook(log.flush, every=logged, at_end=True)
    loop.add_hook(saver.poll, every=logged, at_end=True)  # a failed background save stops the run here
    if tc.eval_every:
        loop.add_hook(log.excluding("eval_s", evaluator), every=tc.eval_every)
    loop.add_hook(BadStepGuard(tc.max_bad_steps), every=logged, at_end=True)
    # remote metrics.jsonl: every record up to a checkpoint is stored before it (metrics.sync)
    loop.add_hook(log.excluding("save_s", lambda info: writer.sync()), every=tc.checkpoint_every, at_end=True)
    loop.add_hook(log.excluding("save_s", saver.save), every=tc.checkpoint_every, at_end=True)
    return log


def pipeline_layout(run, mesh, state_sh):
    from meditron_jax.training import pipeline
    return pipeline.TrainerLayout(run.model, mesh.shape["stage"], run.pipeline.repeats, state_sh)


def pipeline_bubble(run, mesh) -> float | None:
    """The pipeline's idle share (logged with every record), or None without pipelining."""
    S = mesh.shape["stage"]
    if S == 1:
        return None
    from meditron_jax.training import pipeline
    ps = run.pipeline
    bubble = pipeline.bubble_fraction(S, ps.microbatches or 2 * S, ps.repeats)
    if jax.process_index() == 0:
        print(f"pipeline: {S} stages, bubble fraction {bubble:.3f}", file=sys.stderr)
    return bubble


def _saves(tc, start: int) -> int:
    """How many checkpoints a run from `start` to `train.steps` saves."""
    e = tc.checkpoint_every
    return max(0, tc.steps // e - start // e) + (tc.steps % e != 0 and tc.steps > start)
