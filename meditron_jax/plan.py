"""`meditron-jax plan`: will this configuration fit? Compile the real train step ahead of time.

Owns: lowering + compiling the configured train step (model, mesh, optimizer, accumulation,
pipeline) for N simulated devices with abstract inputs only (no weights are allocated), and
reporting per-device memory (parameters, optimizer state, temporaries from XLA's memory
analysis), FLOPs per step and compile time, beside the theoretical floor.
Does not own: the step (train_step.py) or its shardings (train.py / sharding.py).

On a CPU host the device count is simulated with
`--xla_force_host_platform_device_count`; temporaries come from the CPU compiler's buffer
assignment, which fuses differently from the GPU/TPU compilers, so treat them as an estimate
(parameters and optimizer state are exact: they follow from the shardings).
"""

from __future__ import annotations

import json
import os
import sys
import time


def add_arguments(p):
    p.add_argument("--gin_file", action="append", default=[], help="gin config file (repeatable)")
    p.add_argument("--gin_param", action="append", default=[], help="gin binding (repeatable)")
    p.add_argument("--devices", type=int, default=None,
                   help="number of devices to plan for (simulated on CPU); default: what JAX sees")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _set_device_count(n: int | None):
    if n is None:
        return
    if "jax" in sys.modules:
        import jax
        if jax.device_count() < n:
            from meditron_jax.errors import UserError
            raise UserError(f"--devices {n}: JAX is already initialised with {jax.device_count()} devices")
        return
    flags = os.environ.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count"))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def plan(gin_files, gin_params, devices: int | None = None) -> dict:
    _set_device_count(devices)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from meditron_jax import sharding
    from meditron_jax.errors import UserError
    from meditron_jax.metrics import flops_per_token
    from meditron_jax.optim import make_optimizer, optimizer_config, schedule
    from meditron_jax.train import (_gin_call, accumulation_steps, jit_train_step, layers_fn_for, parse_gin,
                                    state_shardings, train_config, validate_shapes)
    from meditron_jax.train_step import BATCH_KEYS, make_train_step

    parse_gin(list(gin_files), list(gin_params))
    tc = _gin_call(train_config)
    from meditron_jax.init_from import run_model_config
    cfg = _gin_call(lambda: run_model_config(tc))[0]
    oc = _gin_call(optimizer_config)
    n = devices or jax.device_count()
    sizes = sharding.mesh_shape(num_devices=n)
    rules, zero1 = sharding.logical_rules()
    validate_shapes(tc, cfg, sizes)
    mesh = sharding.make_mesh(sizes, jax.devices()[:n])
    dp = sharding.data_parallel_size(mesh)
    num_micro = accumulation_steps(tc, cfg, sizes)
    tx = make_optimizer(oc, tc.steps)

    with sharding.use_mesh(mesh, rules):
        state_sh = state_shardings(cfg, tx, mesh, rules, zero1)
        layers_fn = layers_fn_for(cfg, mesh)
        from meditron_jax.model import param_shapes
        from meditron_jax.train_step import init_state
        abstract_params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in param_shapes(cfg).items()}
        abstract_state = jax.eval_shape(lambda p: init_state(p, tx), abstract_params)
        state_in = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, state_sh)
        G, T = tc.global_batch_size, tc.seq_len
        bs = sharding.batch_sharding(mesh)
        batch_in = {k: jax.ShapeDtypeStruct((G, T), jnp.float32 if k == "loss_mask" else jnp.int32, sharding=bs)
                    for k in BATCH_KEYS}
        poison = jax.ShapeDtypeStruct((), jnp.bool_, sharding=sharding.replicated(mesh))
        step_fn = make_train_step(cfg, tx, schedule(oc, tc.steps), num_micro, layers_fn, tc.loss_chunk,
                                  tc.spike_threshold)
        t0 = time.perf_counter()
        lowered = jit_train_step(step_fn, state_sh, mesh).lower(state_in, batch_in, poison)
        t1 = time.perf_counter()
        try:
            compiled = lowered.compile()
        except Exception as e:  # e.g. XLA refusing a sharding; a user-facing planning failure
            raise UserError(f"compilation failed: {' '.join(str(e).split())[:400]}") from None
        t2 = time.perf_counter()

    def per_device_bytes(tree):
        total = 0
        for a in jax.tree.leaves(tree):
            shard = a.sharding.shard_shape(a.shape)
            total += int(np.prod(shard)) * np.dtype(a.dtype).itemsize
        return total

    params_b = per_device_bytes(state_in["params"])
    opt_b = per_device_bytes(state_in["opt_state"])
    mem = compiled.memory_analysis()
    temp_b = int(getattr(mem, "temp_size_in_bytes", 0) or 0) if mem is not None else 0
    model_flops = flops_per_token(cfg, T) * G * T
    n_params = cfg.num_params()
    shard_ways = sizes["stage"] * sizes["tensor"] * sizes["fsdp"]
    gib = 2 ** 30
    report = {
        "model": {"preset": cfg.to_dict(), "params": n_params},
        "mesh": sizes, "devices": n, "zero1": zero1,
        "batch": {"global": G, "micro": tc.micro_batch_size, "seq_len": T, "accumulation_steps": num_micro},
        "per_device_gib": {
            "params": params_b / gib, "optimizer_state": opt_b / gib, "temporaries": temp_b / gib,
            "total": (params_b + opt_b + temp_b) / gib,
        },
        "floor_gib_16_bytes_per_param": 16 * n_params / shard_ways / gib,
        "model_flops_per_step": model_flops,
        "lower_seconds": t1 - t0, "compile_seconds": t2 - t1,
    }
    if sizes["stage"] > 1:
        from meditron_jax import pipeline
        s = pipeline.pipeline_settings()
        m = s.microbatches or 2 * sizes["stage"]
        report["pipeline"] = {"stages": sizes["stage"], "microbatches": m, "repeats": s.repeats,
                              "bubble_fraction": pipeline.bubble_fraction(sizes["stage"], m, s.repeats)}
    return report


def run(args) -> int:
    report = plan(args.gin_file, args.gin_param, args.devices)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    g = report["per_device_gib"]
    print(f"mesh {report['mesh']} on {report['devices']} devices; batch {report['batch']}")
    print(f"per device: params {g['params']:.2f} GiB + optimizer {g['optimizer_state']:.2f} GiB + "
          f"temporaries {g['temporaries']:.2f} GiB = {g['total']:.2f} GiB "
          f"(floor 16 B/param / shards: {report['floor_gib_16_bytes_per_param']:.2f} GiB)")
    print(f"model FLOPs per step {report['model_flops_per_step']:.3e}; compile {report['compile_seconds']:.1f} s")
    if "pipeline" in report:
        print(f"pipeline: {report['pipeline']}")
    return 0
