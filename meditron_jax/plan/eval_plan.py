"""`meditron-jax eval plan`: will `eval mcq` / `eval ppl` of this model fit on this mesh?

Owns: compiling the real scoring program (`scoring.gather_logprobs`, what `eval mcq` runs for a
batch of prompts) ahead of time for N simulated devices, with abstract sharded weights and
inputs only (nothing is allocated), and reporting per-device memory: weights exactly (from their
shardings, held in the compute dtype), temporaries from XLA's memory analysis, the analytical
estimate of `distributed.memory_plan` beside it, and the verdict against a device's memory.
Does not own: the training plan (`meditron_jax.plan.compile`, which compiles the train step).

On a CPU host the device count is simulated (`--xla_force_host_platform_device_count`), and
temporaries come from the CPU compiler's buffer assignment: treat them as an estimate of what a
GPU / TPU compiler assigns (weights are exact).
"""

from __future__ import annotations

import functools
import json
import time

GIB = 2 ** 30


def add_arguments(p):
    p.add_argument("--preset", default=None, help="model preset, e.g. meditron_70b (or --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="take the architecture from this checkpoint / HF dir")
    p.add_argument("--mesh", default="tensor=8", help="inference mesh (default tensor=8)")
    p.add_argument("--devices", type=int, default=None, help="devices to plan for (simulated on CPU)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="dtype the weights are held in (default bfloat16)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")
    p.add_argument("--seq-len", type=int, default=None, help="prompt length (default: the model's context)")
    p.add_argument("--device-memory", type=float, default=74.5, metavar="GIB",
                   help="memory of one device (default 74.5 GiB: an 80 GB A100 / H100)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _config(args):
    from meditron_jax.models.config import LlamaConfig, preset
    from meditron_jax.eval.distributed import InferenceMeshError
    if (args.preset is None) == (args.checkpoint is None):
        raise InferenceMeshError("eval plan: give one of --preset NAME or --checkpoint DIR")
    if args.preset:
        cfg = preset(args.preset)
    else:
        import os
        if os.path.isfile(os.path.join(args.checkpoint, "config.json")):
            with open(os.path.join(args.checkpoint, "config.json")) as f:
                cfg = LlamaConfig.from_hf(json.load(f))
        else:
            from meditron_jax.storage.checkpoint import model_config
            cfg = model_config(args.checkpoint)
    return cfg.replace(dtype=args.dtype)


def plan_eval(cfg, mesh_text: str, batch: int, seq_len: int, device_memory_gib: float | None = None) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from meditron_jax.distributed import sharding
    from meditron_jax.distributed import meshes
    from meditron_jax.eval import distributed, scoring
    from meditron_jax.models.llama import abstract_model

    sizes = distributed.parse_mesh(mesh_text)
    distributed.check_mesh(cfg, sizes)
    mesh = meshes.make_mesh(sizes)
    batch = -(-batch // distributed.data_size(mesh)) * distributed.data_size(mesh)
    target = distributed.param_abstract(cfg, mesh, jnp.dtype(cfg.dtype))
    model = abstract_model(cfg)
    for k, a in target.items():  # abstract weights that carry their mesh shardings
        getattr(model, k).set_value(a)
    graphdef, abstract_state = nnx.split(model)
    place = distributed.Placement(mesh)
    ints = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32,  # noqa: E731
                                              sharding=sharding.sharding_for(("batch",) + (None,) * (len(shape) - 1),
                                                                             shape, mesh, dict(sharding.DEFAULT_RULES)))
    fn = jax.jit(functools.partial(scoring.gather_logprobs, graphdef))
    t0 = time.perf_counter()
    with place.context():
        lowered = fn.lower(abstract_state, ints((batch, seq_len)), ints((batch,)), ints((batch, 1)), ints((batch, 1, 3)))
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    temp = int(getattr(mem, "temp_size_in_bytes", 0) or 0) if mem is not None else 0
    params = sum(int(np.prod(a.sharding.shard_shape(a.shape))) * np.dtype(a.dtype).itemsize for a in target.values())
    est = distributed.memory_plan(cfg, sizes, cfg.dtype, batch, seq_len, 0)
    limit = int(device_memory_gib * GIB) if device_memory_gib else None
    total = params + temp
    return {
        "what": "eval mcq (one batch of prompts, scored at one position each)",
        "model": {"params": cfg.num_params(), "layers": cfg.num_layers, "hidden": cfg.hidden_size,
                  "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "dtype": cfg.dtype},
        "mesh": sizes, "batch": batch, "seq_len": seq_len,
        "per_device_gib": {"params": params / GIB, "temporaries": temp / GIB, "total": total / GIB},
        "estimate_gib": est.as_gib(),
        "device_memory_gib": device_memory_gib, "fits": None if limit is None else total <= limit,
        "lower_seconds": t1 - t0, "compile_seconds": t2 - t1,
    }


def run(args) -> int:
    import math

    n = args.devices
    if n is None:  # the mesh's own size when it names every axis
        sizes = {k: 1 for k in ("data", "stage", "fsdp", "tensor")}
        for part in args.mesh.split(","):
            k, _, v = part.partition("=")
            if k.strip() in sizes and v.strip().lstrip("-").isdigit() and int(v) > 0:
                sizes[k.strip()] = int(v)
        n = math.prod(sizes.values())
    from meditron_jax.plan.targets import set_host_device_count
    set_host_device_count(n)  # simulated host devices when JAX has not started yet (as `plan` does)
    from meditron_jax import console
    console.start_backends_quietly()
    cfg = _config(args)
    report = plan_eval(cfg, args.mesh, args.batch_size, args.seq_len or cfg.max_position_embeddings,
                       args.device_memory)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        g, e = report["per_device_gib"], report["estimate_gib"]
        print(f"eval mcq of a {cfg.num_params() / 1e9:.1f}B model ({cfg.dtype}) on mesh {report['mesh']}, "
              f"batch {report['batch']} x {report['seq_len']} tokens")
        print(f"per device: weights {g['params']:.2f} GiB + temporaries {g['temporaries']:.2f} GiB = "
              f"{g['total']:.2f} GiB (analytical estimate {e['total']:.2f} GiB); compile {report['compile_seconds']:.1f} s")
        if report["fits"] is not None:
            print(f"{'fits' if report['fits'] else 'does NOT fit'} in {args.device_memory:.1f} GiB per device")
    return 0 if report["fits"] in (None, True) else 1
