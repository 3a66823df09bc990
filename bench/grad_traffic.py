"""Data-parallel traffic of the compiled train step, per device per step, from the optimized HLO.

    python bench/grad_traffic.py [--zero1] [--data 4 --fsdp 1 --tensor 2 --micro 4] [--remat full]
                                 [--fsdp_grad_reduce micro_batch|step]

Prints JSON: bytes x loop trip counts of every collective, grouped by the mesh axes it spans,
op, dtype and loop depth (0 = outside every loop), and the per-device parameter / optimizer
bytes from the state shardings. CPU-compiled (XLA:CPU widens bf16 collectives to f32 after
partitioning, so on CPU a bf16 all-gather reads as f32; GPUs and TPUs keep bf16).
"""

import argparse
import inspect
import json
import os

p = argparse.ArgumentParser()
p.add_argument("--data", type=int, default=4)
p.add_argument("--tensor", type=int, default=2)
p.add_argument("--micro", type=int, default=4)
p.add_argument("--fsdp", type=int, default=1)
p.add_argument("--zero1", action="store_true")
p.add_argument("--remat", default="none", help="model.remat; 'full' takes the fused accumulation (training/fused_accum.py)")
p.add_argument("--fsdp_grad_reduce", default=None, choices=[None, "micro_batch", "step"])
args = p.parse_args()
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.data * args.fsdp * args.tensor}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from meditron_jax.plan import hlo_stats  # noqa: E402
from meditron_jax.distributed import sharding
from meditron_jax.distributed import meshes
from meditron_jax.models.config import LlamaConfig  # noqa: E402
from meditron_jax.models.llama import param_shapes  # noqa: E402
from meditron_jax.training.optimizer import OptimizerConfig, make_optimizer, schedule  # noqa: E402
from meditron_jax.training.state import abstract_batch, jit_train_step, state_shardings  # noqa: E402
from meditron_jax.training.step import init_state, make_train_step  # noqa: E402

cfg = LlamaConfig(vocab_size=517, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=64, dtype="bfloat16", remat=args.remat)
mesh = meshes.make_mesh(dict(data=args.data, stage=1, fsdp=args.fsdp, tensor=args.tensor))
oc = OptimizerConfig()
tx = make_optimizer(oc, 10)
with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
    sh = state_shardings(cfg, tx, mesh, sharding.DEFAULT_RULES, zero1=args.zero1)
    ab = jax.eval_shape(lambda q: init_state(q, tx),
                        {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in param_shapes(cfg).items()})
    st = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), ab, sh)
    kw = {"zero1": args.zero1} if "zero1" in inspect.signature(make_train_step).parameters else {}
    if "sync" in inspect.signature(make_train_step).parameters:
        kw["sync"] = sharding.GradSync(fsdp=args.fsdp_grad_reduce)
    fn = make_train_step(cfg, tx, schedule(oc, 10), args.micro, **kw)
    comp = jit_train_step(fn, sh, mesh).lower(st, abstract_batch(2 * args.data * args.fsdp * args.micro, 16, mesh)).compile()
colls = hlo_stats.collectives(comp.as_text())
hlo_stats.assign_axes(colls, dict(mesh.shape))
by_key = {}  # (axes, op, dtype, loop depth) -> [result bytes x trips, ops]
for c in colls:
    e = by_key.setdefault(("+".join(c.axes) or "-", c.kind, c.dtype, c.loop_depth), [0, 0])
    e[0], e[1] = e[0] + int(c.result_bytes) * c.trip_count_product, e[1] + 1


def per_device(tree):
    return int(sum(np.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree)))


print(json.dumps({
    "mesh": dict(mesh.shape), "zero1": args.zero1, "micro_batches": args.micro, "remat": args.remat,
    "fsdp_grad_reduce": args.fsdp_grad_reduce,
    "param_bytes_fp32_total": int(sum(np.prod(s) for s in param_shapes(cfg).values()) * 4),
    "per_device_bytes": {"params": per_device(st["params"]), "opt_state": per_device(st["opt_state"])},
    "collectives": {f"{a}|{op}|{dt}|depth{d}": {"bytes_x_trips": v[0], "ops": v[1]}
                    for (a, op, dt, d), v in sorted(by_key.items())},
    "temp_bytes": int(comp.memory_analysis().temp_size_in_bytes),
}, indent=1))
