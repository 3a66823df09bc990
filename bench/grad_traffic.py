"""Data-parallel traffic of the compiled train step, per device per step, from the optimized HLO.

    python bench/grad_traffic.py [--zero1] [--data 4 --tensor 2 --micro 4] [--preset tiny-bf16]

Prints JSON: bytes x loop trip counts of every collective, grouped by the mesh axes it spans,
op, dtype and loop depth (0 = outside every loop), and the per-device parameter / optimizer
bytes from the state shardings. CPU-compiled (XLA:CPU widens bf16 collectives to f32 after
partitioning, so on CPU a bf16 all-gather reads as f32; GPUs and TPUs keep bf16).
"""

import argparse
import inspect
import json
import os
import sys

p = argparse.ArgumentParser()
p.add_argument("--data", type=int, default=4)
p.add_argument("--tensor", type=int, default=2)
p.add_argument("--micro", type=int, default=4)
p.add_argument("--zero1", action="store_true")
args = p.parse_args()
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.data * args.tensor}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import collectives as C  # noqa: E402
from meditron_jax import sharding  # noqa: E402
from meditron_jax.config import LlamaConfig  # noqa: E402
from meditron_jax.model import param_shapes  # noqa: E402
from meditron_jax.optim import OptimizerConfig, make_optimizer, schedule  # noqa: E402
from meditron_jax.train import TrainConfig, _abstract_batch, jit_train_step, state_shardings  # noqa: E402
from meditron_jax.train_step import init_state, make_train_step  # noqa: E402

cfg = LlamaConfig(vocab_size=517, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=64, dtype="bfloat16")
mesh = sharding.make_mesh(dict(data=args.data, stage=1, fsdp=1, tensor=args.tensor))
oc = OptimizerConfig()
tx = make_optimizer(oc, 10)
with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
    sh = state_shardings(cfg, tx, mesh, zero1=args.zero1)
    ab = jax.eval_shape(lambda q: init_state(q, tx),
                        {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in param_shapes(cfg).items()})
    st = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), ab, sh)
    kw = {"zero1": args.zero1} if "zero1" in inspect.signature(make_train_step).parameters else {}
    fn = make_train_step(cfg, tx, schedule(oc, 10), args.micro, **kw)
    tc = TrainConfig(steps=1, micro_batch_size=2, global_batch_size=2 * args.data * args.micro, seq_len=16)
    comp = jit_train_step(fn, sh, mesh).lower(st, _abstract_batch(tc, mesh),
                                              jax.ShapeDtypeStruct((), jnp.bool_)).compile()
colls = C.collectives(comp.as_text(), mesh)


def per_device(tree):
    return int(sum(np.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree)))


print(json.dumps({
    "mesh": dict(mesh.shape), "zero1": args.zero1, "micro_batches": args.micro,
    "param_bytes_fp32_total": int(sum(np.prod(s) for s in param_shapes(cfg).values()) * 4),
    "per_device_bytes": {"params": per_device(st["params"]), "opt_state": per_device(st["opt_state"])},
    "collectives": {f"{a}|{op}|{dt}|depth{d}": {"bytes_x_trips": v[0], "ops": v[1]}
                    for (a, op, dt, d), v in sorted(C.summarize(colls).items())},
    "temp_bytes": int(comp.memory_analysis().temp_size_in_bytes),
}, indent=1))
