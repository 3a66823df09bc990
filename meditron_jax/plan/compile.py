"""`meditron-jax plan`: will this configuration fit? Compile the real train step ahead of time.

Owns: lowering + compiling the configured train step (model, mesh, optimizer, accumulation,
pipeline: the same `training.state.build_step` that `train` runs) for a target's devices with
abstract inputs only (no weights are allocated), and the subcommand. The report (per-device
memory from XLA's memory analysis against the target's usable memory with a verdict, FLOPs per
step, the collectives beside what the parallelism needs in theory, rematerialization warnings,
`--explain`: the largest buffers with their source lines) is `report.py`'s. Does not own:
the step (training/step.py), its shardings (training/state.py, sharding.py), the target table
(targets/), HLO parsing (hlo_stats.py).

Targets: `cpu` (default: N simulated host devices, `--xla_force_host_platform_device_count`;
XLA:CPU fuses and rematerializes differently and has no memory limit, so its temporaries are
an estimate), GPUs (`a100-80gb`, `a100-40gb`, `h100-80gb`, `h200`) and TPU slices (`v5p-128`,
`v5e-256`, ...), compiled by the real GPU / TPU compilers from this CPU host (`plan` extra).
Exit status: 0 fits, 1 does not fit, 2 user error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import tempfile
import time

from meditron_jax.plan.report import report


@dataclasses.dataclass
class Built:
    """What `compile_step` produced. `compiled` is None when the target's compiler refused the
    step for lack of memory (`hbm_error` then holds its message)."""
    compiled: object
    target: object  # targets.Target
    mesh: object
    mesh_sizes: dict
    state_in: dict
    cfg: object
    tc: object
    zero1: bool
    num_micro: int
    lower_seconds: float
    compile_seconds: float
    dump_dir: str | None
    native_log: str
    hbm_error: str | None
    pipeline: object = None  # pipeline.PipelineSettings of the run
    sync: object = None  # sharding.GradSync of the run (the gradient reduction's dtype, fsdp mode)
    rules: dict | None = None  # the run's logical rules (sharding.logical_rules; sequence parallelism among them)
    _hlo: object = dataclasses.field(default=None, repr=False)

    def hlo(self):
        """The compiled step's HLO module (`plan.hlo_text.Module`), parsed once for the report
        and the step-time prediction; None when the compiler refused the step."""
        if self._hlo is None and self.compiled is not None:
            from meditron_jax.plan import hlo_text
            self._hlo = hlo_text.parse(self.compiled.as_text())
        return self._hlo


# XLA passes a planning compile may leave out (`fast=True`): the GPU compiler's Triton softmax
# rewriter, whose tiling search (`PriorityFusion::CanFuseTriton`) took ~75% of a 7B step's
# compile CPU time here; without it the step compiles ~4x faster and its normalisations and
# softmaxes stay plain XLA fusions (the model then predicts ~4.5% slower steps: docs/planning.md).
FAST_COMPILE = {"xla_disable_hlo_passes": "triton-softmax-rewriter"}


def compile_step(gin_files, gin_params, devices: int | None = None, target: str = "cpu",
                 dump: bool = False, per_host: int | None = None, fast: bool = False) -> Built:
    """Lower and compile the configured train step for `target` (abstract inputs only).

    dump: keep XLA's dump (after-optimizations HLO and buffer assignment) in a temporary
    directory (`Built.dump_dir`; the caller removes it). per_host: GPUs per host of a GPU
    target. fast: compile with `FAST_COMPILE` (GPU targets; `plan --search`).
    `train.init_from` / `data.tokenizer` left required by the gin files are not needed
    (`parse_for_plan`)."""
    from meditron_jax import console
    from meditron_jax.plan import targets

    if target.lower() == "cpu":
        targets.set_host_device_count(devices)
    else:
        targets.compile_on_host()  # the host compiles; it runs nothing
    console.start_backends_quietly()

    from meditron_jax.distributed import sharding
    from meditron_jax.distributed import meshes
    from meditron_jax.errors import UserError
    from meditron_jax.training.config import read_run_config, validate_shapes
    from meditron_jax.training import profiling
    from meditron_jax.training.state import build_step

    parse_for_plan(gin_files, gin_params)
    tgt = targets.resolve(target, devices, per_host)
    run = read_run_config(num_devices=len(tgt.devices))
    cfg, tc, sizes = run.model, run.train, run.mesh_sizes
    validate_shapes(tc, cfg, sizes, run.pipeline, run.sync, run.rules)
    mesh = meshes.make_mesh(sizes, tgt.devices)
    dump_dir = tempfile.mkdtemp(prefix="meditron-plan-") if dump else None
    options = {"xla_dump_to": dump_dir, "xla_dump_hlo_as_text": True} if dump else {}
    if fast and tgt.platform == "gpu":
        options.update(FAST_COMPILE)
    box: list[str] = []
    hbm_error = None
    compiled = None

    with sharding.use_mesh(mesh, run.rules):
        step = build_step(run, mesh)
        t0 = time.perf_counter()
        try:
            lowered = step.jitted.lower(step.state_in, step.batch_in)
        except Exception as e:
            msg = " ".join(str(e).split())
            if "cuDNN not found" in msg:
                raise UserError(f"model.attention='cudnn' for --target {tgt.name} needs cuDNN's library at compile "
                                f"time (no GPU needed): pip install nvidia-cudnn-cu12") from None
            if re.search(r"attention='\w+' needs a", msg):  # a kernel for another accelerator
                raise UserError(f"--target {tgt.name}: {msg[:300]}") from None
            raise
        t1 = time.perf_counter()
        try:
            # a persistent-cache hit writes no dump: --explain would list no buffers
            with console.quiet_native_stderr(box, also=("rematerializ",)), \
                    (profiling.compiled_afresh() if dump else contextlib.nullcontext()):
                compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
        except Exception as e:  # e.g. XLA refusing a sharding; a user-facing planning failure
            msg = " ".join(str(e).split())
            if "RESOURCE_EXHAUSTED" in msg or "exceeds available" in msg or "Out of memory" in msg:
                hbm_error = msg
            else:
                raise UserError(f"compilation failed: {msg[:400]}") from None
        t2 = time.perf_counter()
    return Built(compiled, tgt, mesh, dict(sizes), step.state_in, cfg, tc, run.zero1, step.num_micro, t1 - t0,
                 t2 - t1, dump_dir, "".join(box), hbm_error, run.pipeline, run.sync, run.rules)


# Values a gin file may leave `%gin.REQUIRED` that a plan does not read: it plans a fresh model
# (the architecture is then gin's `model.*`) and reads no tokenizer.
NOT_READ_BY_PLAN = ("train.init_from", "data.tokenizer")


def parse_for_plan(gin_files, gin_params) -> list[str]:
    """`training.config.parse_gin`, with each of `NOT_READ_BY_PLAN` that the files leave required
    bound to None. Returns the bindings used."""
    from meditron_jax.errors import UserError
    from meditron_jax.training.config import parse_gin

    params = list(gin_params)
    for _ in range(len(NOT_READ_BY_PLAN) + 1):
        try:
            parse_gin(list(gin_files), params)
            return params
        except UserError as e:
            missing = [k for k in NOT_READ_BY_PLAN if f"{k} set to `%gin.REQUIRED`" in str(e)]
            if not missing:
                raise
            params.append(f"{missing[0]}=None")
    raise UserError("gin: required values left unset")


def plan(gin_files, gin_params, devices: int | None = None, target: str = "cpu", explain: bool = False,
         top: int = 12, network: dict | None = None) -> dict:
    """Compile + `report` + the predicted step time (`step_time.predict_built`, GPU and TPU
    targets; `network`: `hardware.system`'s keyword arguments from the command line)."""
    import shutil

    from meditron_jax.plan import step_time

    network = dict(network or {})
    tgt_is_accel = target.lower() != "cpu"
    built = compile_step(gin_files, gin_params, devices, target, dump=explain or tgt_is_accel,
                         per_host=network.get("gpus_per_node"))
    try:
        out = report(built, explain, top)
        if built.compiled is not None and tgt_is_accel:
            out["step_time"] = step_time.predict_built(built, network)
        return out
    finally:
        if built.dump_dir:
            shutil.rmtree(built.dump_dir, ignore_errors=True)
