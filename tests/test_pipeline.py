"""Pipeline parallelism: the GPipe / circular schedule over `stage` against plain `run_layers`.

The reference is `model.run_layers` on one device; every pipelined configuration must give
the same activations and the same gradients (w.r.t. the stacked layer params and the input)
within 1e-5 relative. Each configuration is compiled once (value, grads and HLO together).
"""

import re

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meditron_jax.training import pipeline
from meditron_jax.distributed import sharding
from meditron_jax.distributed import host_batch
from meditron_jax.distributed import meshes
from meditron_jax.models.config import LlamaConfig
from meditron_jax.models.llama import LAYER_KEYS, PARAM_AXES, init_model, params_dict, run_layers
from meditron_jax.distributed.meshes import MeshError

CFG = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=8,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=64)
B, T = 16, 16
RTOL = 1e-5
# LLVM -O0 for these tiny programs: ~2.5x faster compiles on CPU. It changes no HLO pass, so
# the partitioned program (collectives included) is the one a default compile produces.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _inputs():
    layers = {k: v for k, v in params_dict(init_model(CFG, seed=3)).items() if k in LAYER_KEYS}
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, T, CFG.hidden_size)).astype(np.float32))
    positions = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    segments = np.ones((B, T), np.int32)
    positions[::2, 10:] -= 10  # every other row packs two documents
    segments[::2, 10:] = 2
    weight = jnp.asarray(rng.normal(size=(B, T, CFG.hidden_size)).astype(np.float32))
    return layers, x, jnp.asarray(positions), jnp.asarray(segments), weight


LAYERS, X, POS, SEG, W = _inputs()


def _loss(y):
    return jnp.sum(jnp.sin(y) * W)


@pytest.fixture(scope="module")
def reference():
    def f(layers, x):
        y = run_layers(CFG, layers, x, POS, SEG)
        return _loss(y), y
    step = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
    (loss, y), grads = step.lower(LAYERS, X).compile(compiler_options=FAST_COMPILE)(LAYERS, X)
    return jax.device_get((loss, y, grads))


def _rule_shardings(mesh, tree):
    rules = dict(sharding.DEFAULT_RULES)
    return {k: sharding.sharding_for(PARAM_AXES[k], v.shape, mesh, rules) for k, v in tree.items()}


_RUNS: dict = {}


def _run(name, sizes, cfg=CFG, repeats=1, microbatches=None, pipeline_layout=False,
         stage_remat=False, x_dtype=jnp.float32):
    """Compile once per configuration; returns (loss, y, (grad_layers, grad_x), hlo, mesh,
    (the compiled step's weight input shardings, {name: [(device, index, gradient shard)]}))."""
    if name in _RUNS:
        return _RUNS[name]
    mesh = meshes.make_mesh(sizes)
    S = sizes["stage"]
    layers = pipeline.to_pipeline_layout(LAYERS, S, repeats) if pipeline_layout else LAYERS
    layer_sh = _rule_shardings(mesh, layers)
    x_sh = host_batch.batch_sharding(mesh, 3)
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        def f(layers, x):
            y = pipeline.pipeline_layers(cfg, layers, x, POS, SEG, mesh=mesh, repeats=repeats,
                                         microbatches=microbatches, pipeline_layout=pipeline_layout,
                                         stage_remat=stage_remat)
            return _loss(y), y
        step = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True),
                       in_shardings=(layer_sh, x_sh))
        x = X.astype(x_dtype)
        compiled = step.lower(layers, x).compile(compiler_options=FAST_COMPILE)
        (loss, y), (g_layers, g_x) = compiled(jax.device_put(layers, layer_sh), jax.device_put(x, x_sh))
    for k, g in g_layers.items():  # gradients come back sharded like the params
        assert g.sharding.is_equivalent_to(layer_sh[k], g.ndim), (name, k, g.sharding)
    # what the step did per device: the layout it compiled for its weight inputs, and each
    # device's piece of the weight gradients it returned
    per_device = (compiled.input_shardings[0][0],
                  {k: [(sh.device, sh.index, np.asarray(sh.data)) for sh in g.addressable_shards]
                   for k, g in g_layers.items()})
    if pipeline_layout:
        g_layers = pipeline.from_pipeline_layout(g_layers, S, repeats)
    out = jax.device_get((loss, y, (g_layers, g_x))) + (compiled.as_text(), mesh, per_device)
    _RUNS[name] = out
    return out


def _close(a, b, what):
    err = np.abs(np.asarray(a) - np.asarray(b)).max()
    scale = np.abs(np.asarray(b)).max()
    assert err <= RTOL * scale, f"{what}: max|diff| {err:.3e} > {RTOL} x {scale:.3e}"


def _assert_matches(run, ref, name):
    loss, y, (g_layers, g_x) = run[:3]
    r_loss, r_y, (r_layers, r_x) = ref
    _close(loss, r_loss, f"{name} loss")
    _close(y, r_y, f"{name} activations")
    _close(g_x, r_x, f"{name} d/dx")
    for k in LAYER_KEYS:
        _close(g_layers[k], r_layers[k], f"{name} d/d{k}")


MESHES = {
    "stage2_data2_tensor2": {"data": 2, "stage": 2, "fsdp": 1, "tensor": 2},
    "stage4_data2": {"data": 2, "stage": 4, "fsdp": 1, "tensor": 1},
    "stage8": {"data": 1, "stage": 8, "fsdp": 1, "tensor": 1},
}


def _mesh_run(name):
    # Remat must not change the numbers: stage 8 runs with full per-layer remat inside each
    # stage, (stage 2, data 2, tensor 2) with per-layer "dots" remat and whole-chunk remat.
    cfg = {"stage8": CFG.replace(remat="full"),
           "stage2_data2_tensor2": CFG.replace(remat="dots")}.get(name, CFG)
    return _run(name, MESHES[name], cfg=cfg, stage_remat=name == "stage2_data2_tensor2")


@pytest.mark.parametrize("name", sorted(MESHES))
def test_pipeline_matches_run_layers(reference, name):
    run = _mesh_run(name)
    _assert_matches(run, reference, name)
    hlo = run[3]
    assert "collective-permute" in hlo
    # No fsdp on these meshes: nothing may gather the stacked weights across stages (only
    # the ring permutes and all-reduces: the output broadcast, d/dx, tensor-parallel sums).
    assert "all-gather" not in hlo and "all-to-all" not in hlo


def test_each_device_holds_only_its_stage(reference):
    """What the compiled step does (the runs above, not a fresh device_put): it takes every
    layer weight split over `stage` along the layer axis, and each device's piece of the weight
    gradients it returns is exactly its own stage's layers, equal to the reference's rows."""
    for name, sizes in MESHES.items():
        *_, mesh, (in_sh, shards) = _mesh_run(name)
        S, L = sizes["stage"], CFG.num_layers
        stage_of = {d: int(np.argwhere(mesh.devices == d)[0][1]) for d in mesh.devices.flat}
        for k in LAYER_KEYS:
            assert in_sh[k].spec[0] == "stage", (name, k, in_sh[k].spec)
            assert len(shards[k]) == mesh.devices.size
            for device, index, data in shards[k]:
                s = stage_of[device]
                assert data.shape[0] == L // S and index[0] == slice(s * L // S, (s + 1) * L // S), (name, k, index)
                _close(data, reference[2][0][k][index], f"{name} d/d{k} on {device}")


def test_circular_repeats_equal_gpipe(reference):
    sizes = MESHES["stage4_data2"]
    gpipe = _run("stage4_data2", sizes)
    # Repeats 2 with the params held in the pipeline layout (what a trainer would keep in memory).
    circ = _run("stage4_data2_r2", sizes, repeats=2, pipeline_layout=True)
    for a, b, what in ((circ[0], gpipe[0], "loss"), (circ[1], gpipe[1], "activations"),
                       (circ[2][1], gpipe[2][1], "d/dx")):
        _close(a, b, f"repeats=2 vs GPipe {what}")
    for k in LAYER_KEYS:
        _close(circ[2][0][k], gpipe[2][0][k], f"repeats=2 vs GPipe d/d{k}")
    assert "collective-permute" in circ[3]
    # Canonical params in, permuted inside the step; fsdp + tensor axes alongside, M = S.
    fsdp = _run("stage2_fsdp2_tensor2_r2", {"data": 1, "stage": 2, "fsdp": 2, "tensor": 2},
                repeats=2, microbatches=2)
    _assert_matches(fsdp, reference, "stage2_fsdp2_tensor2_r2")


def test_bfloat16_compute(reference):
    # bf16 activations: compiles on CPU (the stage reductions avoid XLA:CPU's bf16 all-reduce
    # promotion) and lands within bf16 noise of the fp32 reference: one bf16 rounding is
    # 2^-8 ~ 4e-3, and 8 layers forward + backward measure ~1-3.5% of each tensor's max for
    # run_layers in bf16 itself, so 6e-2 passes noise but no wiring error.
    run = _run("stage4_tensor2_bf16", {"data": 1, "stage": 4, "fsdp": 1, "tensor": 2},
               cfg=CFG.replace(dtype="bfloat16"), x_dtype=jnp.bfloat16)
    (g_layers, g_x), (r_layers, r_x) = run[2], reference[2]
    assert run[1].dtype == g_x.dtype == jnp.bfloat16
    pairs = [(run[1], reference[1], "activations"), (g_x, r_x, "d/dx")]
    pairs += [(g_layers[k], r_layers[k], f"d/d{k}") for k in LAYER_KEYS]
    for a, b, what in pairs:
        err = np.abs(np.asarray(a, np.float32) - b).max()
        assert err <= 6e-2 * np.abs(b).max(), f"bf16 {what}: {err:.3e}"


def test_pipeline_layout_permutation():
    S, R, C = 2, 2, 2
    L = S * R * C
    canon = {"w": jnp.arange(L * 3).reshape(L, 3)}
    perm = pipeline.to_pipeline_layout(canon, S, R)
    # index s*R*C + r*C + j holds canonical layer (r*S + s)*C + j
    expect = [(r * S + s) * C + j for s in range(S) for r in range(R) for j in range(C)]
    np.testing.assert_array_equal(np.asarray(perm["w"][:, 0]) // 3, expect)
    np.testing.assert_array_equal(pipeline.from_pipeline_layout(perm, S, R)["w"], canon["w"])
    assert pipeline.to_pipeline_layout(canon, 4, 1) is canon


def test_bubble_fraction():
    assert pipeline.bubble_fraction(1, 4, 1) == 0.0
    assert pipeline.bubble_fraction(4, 8, 1) == pytest.approx(3 / 11)
    assert pipeline.bubble_fraction(4, 8, 2) == pytest.approx(3 / 19)
    assert pipeline.bubble_fraction(8, 16, 5) < pipeline.bubble_fraction(8, 16, 1)


def test_gin_settings_and_defaults():
    gin.clear_config()
    try:
        gin.parse_config(["pipeline.microbatches = 12", "pipeline.repeats = 2"])
        assert pipeline.pipeline_settings() == pipeline.PipelineSettings(12, 2)
    finally:
        gin.clear_config()
    assert pipeline.pipeline_settings() == pipeline.PipelineSettings(None, 1)
    assert pipeline.check_pipeline(CFG, stages=4) == 8  # default 2 x stages


@pytest.mark.parametrize("kwargs, match", [
    (dict(stages=3), "does not divide num_layers 8"),
    (dict(stages=4, repeats=4), r"mesh.stage 4 x pipeline.repeats 4 = 16 does not divide"),
    (dict(stages=4, repeats=2, microbatches=2), "needs pipeline.microbatches >= mesh.stage"),
    (dict(stages=2, microbatches=3, batch_size=16), "not divisible by pipeline.microbatches 3"),
    (dict(stages=2, microbatches=8, batch_size=16, data_parallel=4), "data-parallel size 4"),
    (dict(stages=2, microbatches=0), "microbatches must be >= 1"),
])
def test_bad_pipeline_configs(kwargs, match):
    with pytest.raises(MeshError, match=match):
        pipeline.check_pipeline(CFG, **kwargs)


def test_pipeline_layers_rejects_bad_batch_before_compiling():
    mesh = meshes.make_mesh(MESHES["stage4_data2"])
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES), pytest.raises(MeshError, match="data-parallel size 2"):
        pipeline.pipeline_layers(CFG, LAYERS, X, POS, SEG, mesh=mesh, microbatches=16)


# ---- what the compiled step keeps and moves -----------------------------------------------
_COMP_HEAD = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*->.*\{\s*$")
_CALLEE = re.compile(r"\b(?:body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_CALLEES = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_COLLECTIVE = re.compile(r"\s(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)(?:-start)?\(")


def _collectives(hlo: str) -> dict:
    """Collective ops of optimized HLO text, split by whether they run inside a while loop
    (in a computation reachable from some loop's body) or outside: {"in_loop": [op, ...], ...}."""
    comps, cur = {}, None
    for line in hlo.splitlines():
        m = _COMP_HEAD.match(line)
        if m and not line.startswith(" "):
            cur = m.group(2)
            comps[cur] = []
        elif cur is not None:
            comps[cur].append(line)
    calls = {c: set() for c in comps}
    bodies = set()
    for c, lines in comps.items():
        for line in lines:
            calls[c].update(_CALLEE.findall(line))
            bodies.update(re.findall(r"\bbody=%?([\w.\-]+)", line))
            for group in _CALLEES.findall(line):
                calls[c].update(v.strip().lstrip("%") for v in group.split(","))
    in_loop, stack = set(), list(bodies)
    while stack:
        c = stack.pop()
        if c in comps and c not in in_loop:
            in_loop.add(c)
            stack.extend(calls[c])
    out = {"in_loop": [], "outside": []}
    for c, lines in comps.items():
        for line in lines:
            m = _COLLECTIVE.search(line)
            if m:
                out["in_loop" if c in in_loop else "outside"].append(m.group(1))
    assert bodies, "no while loop in the compiled step"
    return out


def test_stage_fsdp_gathers_weights_once(reference):
    # fsdp shards the stage's weights: they are gathered once per call, before the tick loop,
    # never per layer per tick inside it (forward, recomputation or backward).
    sizes = {"data": 2, "stage": 2, "fsdp": 2, "tensor": 1}
    run = _run("stage2_fsdp2_data2", sizes, microbatches=4)
    _assert_matches(run, reference, "stage2_fsdp2_data2")
    colls = _collectives(run[3])
    assert "all-gather" not in colls["in_loop"], colls
    assert colls["in_loop"].count("collective-permute") >= 2, colls  # the ring, both directions
    # ... and the weight gradients are summed over (data, fsdp) once, after the loop
    assert set(colls["in_loop"]) == {"collective-permute"}, colls
    assert "all-gather" in colls["outside"], colls


def test_circular_layout_moves_no_weights(reference):
    # Params held in the pipeline layout: outside the tick loop the step runs only all-reduces
    # (the stage output broadcast / d/dx and the data-parallel gradient sum); no permutation
    # of weights or gradients across stages (collective-permute / all-to-all / all-gather).
    # With canonical params (pipeline_layout=False) this fails: all-to-alls and permutes.
    circ = _run("stage4_data2_r2", MESHES["stage4_data2"], repeats=2, pipeline_layout=True)
    colls = _collectives(circ[3])
    assert set(colls["outside"]) == {"all-reduce"}, colls
    # Inside the loop only the ring: each device accumulates its weight gradients over the
    # ticks and they are summed over `data` once after the loop (before: one all-reduce of
    # the gradients in the loop body, i.e. per tick).
    assert set(colls["in_loop"]) == {"collective-permute"}, colls


# Memory: the tiny pipelined recipe through `plan` (the whole train step), stage 4 on 4 devices,
# a fixed batch of 16 sequences split into M micro-batches. Hidden 256 makes one stage's weights
# (2 layers, fp32) 5.6 MiB, much more than one tick's input [b, 64, 256] (fp32: 64 KiB x b).
_PLAN_BASE = ["model.preset = 'tiny'", "model.num_layers = 8", "model.hidden_size = 256",
              "model.intermediate_size = 704", "mesh.data = 1", "mesh.stage = 4", "mesh.fsdp = 1",
              "mesh.tensor = 1", "train.seq_len = 64", "train.global_batch_size = 16", "train.steps = 10"]
_PLANS: dict = {}


def _plan_temporaries(M: int, stage_remat: bool) -> int:
    from meditron_jax.plan import compile as plan
    key = (M, stage_remat)
    if key not in _PLANS:
        gin.clear_config()
        try:
            report = plan.plan([], _PLAN_BASE + [f"train.micro_batch_size = {16 // M}",
                                                 f"pipeline.microbatches = {M}",
                                                 f"pipeline.stage_remat = {stage_remat}"], devices=4)
        finally:
            gin.clear_config()
        _PLANS[key] = int(round(report["per_device_gib"]["temporaries"] * 2**30))
    return _PLANS[key]


def test_more_microbatches_add_only_tick_inputs():
    # Doubling M (same batch) adds M ticks. With stage_remat each tick saves only its chunk
    # input [b, T, D], so the step may grow by at most M x that; before the fix every tick also
    # saved its stage's weights (measured +23 MiB for 4 more ticks on this config).
    S, T, D, L = 4, 64, 256, 8
    cfg = LlamaConfig(vocab_size=2048, hidden_size=D, intermediate_size=704, num_layers=L,
                      num_heads=4, num_kv_heads=2)
    from meditron_jax.models.llama import param_shapes
    stage_weights = sum(4 * np.prod(s) for k, s in param_shapes(cfg).items() if k in LAYER_KEYS) // S
    small, big = _plan_temporaries(4, True), _plan_temporaries(8, True)
    extra_ticks = (8 + S - 1) - (4 + S - 1)
    tick_input = (16 // 8) * T * D * 4  # b = 2 rows of [T, D] fp32 at M = 8
    bound = extra_ticks * tick_input
    assert bound < stage_weights / 4  # the bound separates activations from weights
    assert big - small <= bound, (f"M 4 -> 8 adds {(big - small) / 2**20:.2f} MiB of temporaries, more than "
                                  f"{extra_ticks} tick inputs ({bound / 2**20:.2f} MiB); a stage's weights "
                                  f"are {stage_weights / 2**20:.2f} MiB")


def test_stage_remat_lowers_temporaries():
    # remat 'none' inside the stage: without stage_remat every tick keeps all its layers'
    # residuals; with it only the tick input (measured 297 -> 79 MiB at T = 128).
    with_remat, without = _plan_temporaries(4, True), _plan_temporaries(4, False)
    assert with_remat < 0.6 * without, (with_remat / 2**20, without / 2**20)


@pytest.mark.parametrize("binding, match", [
    ("pipeline.stage_remat = 'yes'", r"pipeline.stage_remat 'yes' is not one of True, False"),
    ("pipeline.repeats = 2.5", "pipeline.repeats 2.5 is not an integer"),
])
def test_bad_pipeline_settings(binding, match):
    gin.clear_config()
    try:
        gin.parse_config([binding])
        with pytest.raises(MeshError, match=match):
            pipeline.pipeline_settings()
    finally:
        gin.clear_config()


@pytest.mark.parametrize("name, mesh, accumulation", [
    ("meditron_70b.gin", {"data": 2, "stage": 8, "fsdp": 1, "tensor": 8}, 8),
    ("meditron_7b_8xa100.gin", {"data": 2, "stage": 4, "fsdp": 1, "tensor": 1}, 10),
])
def test_recipe_pipelines_have_small_bubbles(name, mesh, accumulation):
    # The shipped pipelined recipes: bubble <= 10%, and the batch splits exactly (compile-free).
    import os
    import meditron_jax.data.loader  # noqa: F401  (gin `data.*`)
    from meditron_jax.models.config import model_config
    from meditron_jax.training.config import accumulation_steps, train_config
    root = os.path.join(os.path.dirname(__file__), "..")
    gin.clear_config()
    try:
        gin.add_config_file_search_path(root)
        gin.parse_config_files_and_bindings([os.path.join(root, "configs", name)],
                                            ["train.init_from = None", "data.tokenizer = None"])
        s = pipeline.pipeline_settings()
        assert meshes.mesh_shape(num_devices=int(np.prod(list(mesh.values())))) == mesh
        assert accumulation_steps(train_config(), model_config(), mesh, s) == accumulation
        assert pipeline.bubble_fraction(mesh["stage"], s.microbatches, s.repeats) <= 0.10
        assert s.stage_remat
    finally:
        gin.clear_config()
