"""What a training run is configured with: gin `train.*` and the checks before anything runs.

Owns: `TrainConfig` (gin `train.*`), `read_run_config` (every configurable a run reads, read
once: train, model (or `train.init_from`'s), optimizer, mesh, logical rules, pipeline), the
startup validation (batch, mesh and model sizes agree; the workdir is writable and has room)
and `accumulation_steps`. Shared by `train`, `plan` and `config`. Does not own: parsing the gin
files (`config.gin_files.parse`), the values' types and ranges (`config.checks`), the mesh
(`sharding.py`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated

import gin

from meditron_jax.storage import paths
from meditron_jax.distributed import sharding
from meditron_jax.distributed import meshes
from meditron_jax.storage import faults as storage
from meditron_jax.storage.workdir import Workdir
from meditron_jax.models.config import LlamaConfig, gin_call
from meditron_jax.config import gin_files as gin_files_lib
from meditron_jax.config.checks import Range
from meditron_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class TrainConfig:  # Annotated ranges: checked with the types before anything runs (config.checks)
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
    wandb_project: str | None = None
    progress: bool = True
    tensorboard: bool = True
    profile_steps: tuple = ()  # (first, last): jax.profiler trace into WORKDIR/profile (profiling.py)
    compilation_cache_dir: str | None = None  # JAX's persistent compilation cache
    resume_step: Annotated[int | None, Range(min=0)] = None  # like --resume_step (workdir.check_resume_step)


@gin.configurable("train")
def train_config(steps: int = gin.REQUIRED, micro_batch_size: int = gin.REQUIRED,
                 global_batch_size: int = gin.REQUIRED, seq_len: int = gin.REQUIRED, seed: int = 0,
                 checkpoint_every: int = 1000, log_every: int = 10, init_from: str | None = None,
                 eval_every: int = 0, eval_batches: int = 4, max_bad_steps: int = 10,
                 spike_threshold: float | None = None, loss_chunk: int | None = None,
                 wandb_project: str | None = None, progress: bool = True,
                 tensorboard: bool = True, profile_steps=(), compilation_cache_dir: str | None = None,
                 resume_step: int | None = None) -> TrainConfig:
    """gin `train.*`."""
    return TrainConfig(steps, micro_batch_size, global_batch_size, seq_len, seed, checkpoint_every, log_every,
                       init_from, eval_every, eval_batches, max_bad_steps, spike_threshold, loss_chunk,
                       wandb_project, progress, tensorboard,
                       tuple(profile_steps) if isinstance(profile_steps, (list, tuple)) else profile_steps,
                       compilation_cache_dir, resume_step)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every gin value a run reads, read once (after `config.gin_files.parse`) and passed on."""
    train: TrainConfig
    model: LlamaConfig
    optimizer: object  # optim.OptimizerConfig
    mesh_sizes: dict
    rules: tuple
    zero1: bool
    pipeline: object  # pipeline.PipelineSettings
    sync: object = None  # sharding.GradSync: the gradient reduction's dtype and fsdp mode
    init_ref: LlamaConfig | None = None  # train.init_from's architecture (None: no init_from)
    init_changes: tuple = ()  # what init_from changes (vocab growth), logged at startup


def read_run_config(num_devices: int | None = None, resolve_init_from: bool = True) -> RunConfig:
    """The run's configurables, each called once; bad values are one line (UserError).
    `num_devices`: what `mesh.* = -1` fills (default: the devices JAX sees).
    `resolve_init_from=False`: the model is gin's `model.*` even with `train.init_from` (reads
    no checkpoint; `meditron-jax config`)."""
    from meditron_jax.models.config import model_config
    from meditron_jax.training.init_from import run_model_config
    from meditron_jax.training.optimizer import optimizer_config
    from meditron_jax.training.pipeline import pipeline_settings

    tc = gin_call(train_config)
    if resolve_init_from:
        cfg, init_ref, init_changes = gin_call(lambda: run_model_config(tc))
    else:
        cfg, init_ref, init_changes = gin_call(model_config), None, ()
    oc = gin_call(optimizer_config)
    sizes = gin_call(lambda: meshes.mesh_shape(num_devices=num_devices))
    rules, zero1 = gin_call(sharding.logical_rules)
    ps = gin_call(pipeline_settings)
    sync = gin_call(sharding.grad_sync)
    return RunConfig(tc, cfg, oc, sizes, rules, zero1, ps, sync, init_ref, tuple(init_changes))


def validate(run: RunConfig, workdir: Workdir):
    """Every user-caused inconsistency, before any compile or write. One line each."""
    validate_shapes(run.train, run.model, run.mesh_sizes, run.pipeline, run.sync, run.rules)
    gin_call(lambda: meshes.check_placement(run.mesh_sizes))
    check_workdir(workdir)


def validate_shapes(tc: TrainConfig, cfg: LlamaConfig, sizes: dict, ps, sync=None, rules=None):
    """Batch, mesh and model sizes agree (also used by `plan` and `config`). `sync`, `rules`: the
    run's `sharding.GradSync` and logical rules (None: gin's, for callers without a RunConfig)."""
    if tc.steps < 1:
        raise UserError(f"train.steps must be >= 1, got {tc.steps}")
    accumulation_steps(tc, cfg, sizes, ps)
    t = sizes["tensor"]
    for name, n in (("num_heads", cfg.num_heads), ("num_kv_heads", cfg.num_kv_heads),
                    ("intermediate_size", cfg.intermediate_size)):
        if n % t:
            raise UserError(f"model {name} {n} is not divisible by mesh.tensor {t}")
    if cfg.num_layers % sizes["stage"]:
        raise UserError(f"model num_layers {cfg.num_layers} is not divisible by mesh.stage {sizes['stage']}")
    if tc.seq_len > cfg.max_position_embeddings:  # the model's context: its preset, checkpoint or gin value
        raise UserError(f"train.seq_len = {tc.seq_len}: expected at most the model's context, max_position_embeddings "
                        f"{cfg.max_position_embeddings} (to train past it, state the change: model.max_position_embeddings = "
                        f"{tc.seq_len}; RoPE theta stays {cfg.rope_theta:g})")
    if tc.loss_chunk and tc.seq_len % tc.loss_chunk:
        raise UserError(f"train.seq_len {tc.seq_len} is not divisible by train.loss_chunk {tc.loss_chunk}")
    (sync or gin_call(sharding.grad_sync)).check_mesh(sizes)
    sharding.check_sequence_parallel(rules or gin_call(sharding.logical_rules)[0], sizes, tc.seq_len, tc.loss_chunk)


def accumulation_steps(tc: TrainConfig, cfg: LlamaConfig, sizes: dict, ps) -> int:
    """Gradient-accumulation steps per global batch (validated; one line on error).

    Megatron semantics: `train.micro_batch_size` sequences per data-parallel rank form one
    micro-batch. Without pipelining each accumulation step runs one micro-batch; with
    mesh.stage > 1 each accumulation step feeds `pipeline.microbatches` (`ps`, a
    `pipeline.PipelineSettings`) micro-batches through the pipeline, so
    global = micro x (data x fsdp) x pipeline.microbatches x accumulation.
    """
    dp = sizes["data"] * sizes["fsdp"]
    per_step = tc.micro_batch_size * dp
    if sizes["stage"] > 1:
        from meditron_jax.training import pipeline
        M = pipeline.check_pipeline(cfg, sizes["stage"], None, dp, ps.microbatches, ps.repeats)
        per_step *= M
    if tc.global_batch_size % per_step:
        what = f" x pipeline.microbatches {per_step // (tc.micro_batch_size * dp)}" if sizes["stage"] > 1 else ""
        raise UserError(f"train.global_batch_size {tc.global_batch_size} is not divisible by "
                        f"micro_batch_size {tc.micro_batch_size} x data-parallel size {dp} "
                        f"(mesh.data {sizes['data']} x mesh.fsdp {sizes['fsdp']}){what}")
    return tc.global_batch_size // per_step


def check_workdir(workdir: Workdir, needed_bytes: int = 0):
    """The workdir is writable and (with `needed_bytes`) has room for one checkpoint."""
    paths.check_writable(workdir.root)  # local or remote (paths.py): one line when it cannot be written
    free = storage.free_space(workdir.root)  # None for remote storage (no free-space check there)
    if needed_bytes and free is not None and free < needed_bytes:
        raise UserError(f"workdir {workdir} has {_size(free)} free, one checkpoint needs {_size(needed_bytes)}")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def register_configurables():
    """Imports every module that defines a gin configurable of a run (`train`, `model`,
    `optimizer`, `mesh`, `placement`, `sharding`, `pipeline`, `data`, `checkpoint`)."""
    import meditron_jax.data.config  # noqa: F401  (gin `data.*`)
    import meditron_jax.distributed.meshes  # noqa: F401  (gin `mesh.*`, `placement.*`)
    import meditron_jax.training.pipeline  # noqa: F401  (gin `pipeline.*`)
    import meditron_jax.distributed.sharding  # noqa: F401  (gin `sharding.*`)
    import meditron_jax.models.config  # noqa: F401  (gin `model.*`)
    import meditron_jax.storage.checkpoint  # noqa: F401  (gin `checkpoint.*`)
    import meditron_jax.training.optimizer  # noqa: F401  (gin `optimizer.*`)


def parse_gin(gin_files, gin_params, search_path=()):
    """A run's gin files and bindings parsed and checked (`config.gin_files.parse`), with every
    configurable of the package registered first, so any run's gin file parses anywhere."""
    register_configurables()
    gin_files_lib.parse(gin_files, gin_params, search_path)


def operative_config(gin_files, gin_params, search_path=(), devices: int | None = None) -> str:
    """What `train` would run with (`meditron-jax config`, WORKDIR/config.gin): gin's operative
    config with every default, checked as `train` checks it, plus the resolved preset and mesh."""
    import gin

    from meditron_jax.data.config import data_config
    from meditron_jax.storage import checkpoint

    parse_gin(list(gin_files), list(gin_params), search_path=search_path)
    run = read_run_config(num_devices=devices, resolve_init_from=False)
    tc, cfg, sizes = run.train, run.model, run.mesh_sizes
    gin_call(data_config)
    gin_call(checkpoint.manager_options)
    validate_shapes(tc, cfg, sizes, run.pipeline, run.sync, run.rules)

    resolved = ["", "# Resolved (what the presets and -1s above become):",
                "#   model: " + ", ".join(f"{k}={v!r}" for k, v in cfg.to_dict().items()),
                f"#   model parameters: {cfg.num_params():,}",
                "#   mesh: " + " ".join(f"{k}={v}" for k, v in sizes.items()) + f" ({math.prod(sizes.values())} devices)",
                f"#   gradient accumulation steps per global batch: {accumulation_steps(tc, cfg, sizes, run.pipeline)}",
                f"#   tokens per step: {tc.global_batch_size * tc.seq_len:,}", ""]
    return gin.operative_config_str() + "\n".join(resolved)
