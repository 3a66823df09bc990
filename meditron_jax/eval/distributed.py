"""Inference on a device mesh: `eval mcq|ppl`, `generate` and the lm-eval backend with `--mesh`.

Owns: the inference mesh (the training mesh's axes; tensor parallelism over heads / MLP / vocab,
data parallelism over items on `data` x `fsdp`), its validation (heads the tensor axis does not
divide, a pipeline axis, a model too large for the devices: one line each, before any weight is
read), loading a checkpoint or HF directory straight onto that mesh (each device reads or
receives only its own shards), the KV-cache shardings (`kv_heads` over `tensor`, batch over
`data`), the per-device memory estimate behind `--device-memory`, and putting host batches
onto the mesh / fetching results, the same way on one host and on many.
Does not own: the logical->mesh rules (`sharding.py`), what is evaluated (`mcq.py`,
`perplexity.py`, `generate.py`).

Parameters are held on device in the compute dtype (`--dtype`): the model casts every weight
to that dtype before use, so bf16-held weights give the same numbers as fp32-held ones cast at
use, at half the memory (Meditron-70B in bf16 at TP8: 16.06 GiB of weights per device, from
`meditron-jax eval plan --preset meditron_70b --mesh tensor=8`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from meditron_jax.storage import paths as _paths
from meditron_jax.distributed import sharding
from meditron_jax.distributed import host_batch
from meditron_jax.distributed import meshes
from meditron_jax.models.config import LlamaConfig
from meditron_jax.errors import UserError

CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


class InferenceMeshError(UserError, ValueError):
    """A mesh that cannot run this model, or a model too large for the requested devices."""


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,tensor=4' (axes data, stage, fsdp, tensor; one may be -1; unnamed axes are 1, data
    takes the rest when not given) -> resolved sizes for the visible devices."""
    sizes = {"data": None, "stage": 1, "fsdp": 1, "tensor": 1}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in sizes or not value.strip():
            raise InferenceMeshError(f"--mesh {text!r}: expected axis=N pairs over {', '.join(meshes.MESH_AXES)}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise InferenceMeshError(f"--mesh {text!r}: {value!r} is not an integer") from None
    if sizes["data"] is None:
        sizes["data"] = -1 if -1 not in sizes.values() else 1
    try:
        return meshes.mesh_shape(**sizes)
    except meshes.MeshError as e:  # gin appends "In call to configurable ..." on a second line
        raise InferenceMeshError(f"--mesh {text!r}: {str(e).splitlines()[0]}") from None


def mesh_from_flags(mesh_text: str | None, gin_files=(), gin_params=()) -> dict[str, int] | None:
    """--mesh, else gin `mesh.*` bindings (from --gin_file / --gin_param), else None (one device)."""
    if mesh_text:
        return parse_mesh(mesh_text)
    if not gin_files and not gin_params:
        return None
    from meditron_jax.models.config import gin_call
    from meditron_jax.training.config import parse_gin
    parse_gin(list(gin_files), list(gin_params))
    return gin_call(lambda: meshes.mesh_shape())


def check_mesh(cfg: LlamaConfig, sizes: dict[str, int]):
    """Refuse meshes inference cannot use, in one line."""
    if sizes["stage"] != 1:
        raise InferenceMeshError(f"mesh stage={sizes['stage']}: inference does not pipeline; use tensor (and data) "
                                 "parallelism, e.g. --mesh tensor=8")
    t = sizes["tensor"]
    if cfg.num_heads % t:
        raise InferenceMeshError(f"mesh tensor={t} does not divide the model's {cfg.num_heads} attention heads")
    if cfg.num_kv_heads % t and t % cfg.num_kv_heads:
        raise InferenceMeshError(f"mesh tensor={t} and the model's {cfg.num_kv_heads} KV heads: one must divide "
                                 "the other (KV heads are split over tensor, or replicated when fewer)")
    if cfg.intermediate_size % t:
        raise InferenceMeshError(f"mesh tensor={t} does not divide the MLP width {cfg.intermediate_size}")


def data_size(mesh) -> int:
    return 1 if mesh is None else host_batch.data_parallel_size(mesh)


def param_abstract(cfg: LlamaConfig, mesh, dtype) -> dict:
    """{name: ShapeDtypeStruct with its mesh sharding} for the model's parameters."""
    from meditron_jax.models.llama import PARAM_AXES, param_shapes
    rules = dict(sharding.DEFAULT_RULES)
    return {k: jax.ShapeDtypeStruct(s, dtype, sharding=sharding.sharding_for(PARAM_AXES[k], s, mesh, rules))
            for k, s in param_shapes(cfg).items()}


def cache_shardings(cfg: LlamaConfig, mesh, batch: int, length: int) -> dict:
    """KV cache {k, v: [L,B,S,K,H] batch over data x fsdp, kv_heads over tensor; segment [B,S]; index}."""
    rules = dict(sharding.DEFAULT_RULES)
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    kv = sharding.sharding_for(CACHE_AXES, shape, mesh, rules)
    return {"k": kv, "v": kv, "segment": sharding.sharding_for(("batch", "length"), (batch, length), mesh, rules),
            "index": sharding.replicated(mesh)}


# -- memory plan -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    params: int  # bytes per device
    kv_cache: int
    activations: int  # estimate: one layer's live activations + the scored logits
    limit: int | None

    @property
    def total(self) -> int:
        return self.params + self.kv_cache + self.activations

    def as_gib(self) -> dict:
        g = 2 ** 30
        out = {"params": self.params / g, "kv_cache": self.kv_cache / g, "activations": self.activations / g,
               "total": self.total / g}
        if self.limit:
            out["limit"] = self.limit / g
        return out


def memory_plan(cfg: LlamaConfig, sizes: dict[str, int], dtype: str, batch: int, seq_len: int,
                cache_len: int = 0, limit: int | None = None) -> MemoryPlan:
    """Per-device bytes of an inference run: parameters exactly (from their shardings, held in
    `dtype`), the KV cache exactly, activations estimated (the widest per-layer tensors of one
    batch: MLP gate/up, q/k/v, attention scores of one block, and the final logits)."""
    from meditron_jax.models.llama import PARAM_AXES, param_shapes
    it = np.dtype(jnp.dtype(dtype)).itemsize
    t, dp = sizes["tensor"], sizes["data"] * sizes["fsdp"]
    rules = dict(sharding.DEFAULT_RULES)
    # parameter shards from the real rules (what _fit keeps), without building devices
    params = 0
    for k, shape in param_shapes(cfg).items():
        spec = sharding.logical_to_spec(PARAM_AXES[k], rules)
        n = 1
        for dim, entry in zip(shape, tuple(spec) + (None,) * len(shape)):
            names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            ways = 1
            for name in names:
                if dim % (ways * sizes[name]) == 0:
                    ways *= sizes[name]
            n *= dim // ways
        params += n * it
    b = -(-batch // dp)
    k_local = cfg.num_kv_heads // t if cfg.num_kv_heads % t == 0 else cfg.num_kv_heads
    kv = 2 * cfg.num_layers * b * cache_len * k_local * cfg.head_dim * it
    D, F, N, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim
    per_layer = b * seq_len * (3 * D + 2 * F // t + 3 * N * H // t) * it
    from meditron_jax.models import attention
    bq = min(attention.BLOCK_Q, seq_len)
    scores = b * (N // t) * bq * max(seq_len, cache_len) * 4
    logits = b * seq_len * cfg.padded_vocab_size // t * 4 * 2
    return MemoryPlan(params, kv, per_layer + scores + logits, limit)


def device_limit(override_gib: float | None = None) -> int | None:
    """Bytes one device can hold: --device-memory, else what the backend reports (GPU/TPU), else None."""
    if override_gib is not None:
        return int(override_gib * 2 ** 30)
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # CPU backends report nothing
        return None
    return stats.get("bytes_limit")


def check_fits(plan: MemoryPlan, what: str, sizes: dict[str, int]):
    if plan.limit and plan.total > plan.limit:
        g = plan.as_gib()
        raise InferenceMeshError(
            f"{what} needs {g['total']:.1f} GiB per device (params {g['params']:.1f} + KV cache {g['kv_cache']:.1f} "
            f"+ activations ~{g['activations']:.1f}) on mesh {fmt_mesh(sizes)}, over the {g['limit']:.1f} GiB "
            "a device holds; use more tensor-parallel devices, --dtype bfloat16 or a smaller --batch-size")


def fmt_mesh(sizes: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items() if v != 1 or k == "data")


# -- the runtime -----------------------------------------------------------------------------
class Placement:
    """Where inference runs: a mesh (tensor + data parallel) or, with mesh=None, one device.

    put(x): a host array [B, ...] -> a global array, batch split over data x fsdp when it divides
    (every process passes the same full array: items are listed identically on every host).
    fetch(x): a result -> numpy on every host. context(): the mesh + rules for `constrain`.
    """

    def __init__(self, mesh=None):
        self.mesh = mesh
        self.data = data_size(mesh)

    def context(self):
        return sharding.use_mesh(self.mesh, sharding.DEFAULT_RULES) if self.mesh is not None else contextlib.nullcontext()

    def round_batch(self, n: int) -> int:
        return -(-n // self.data) * self.data

    def put(self, x):
        x = np.asarray(x)
        if self.mesh is None:
            return x
        spec = host_batch.batch_sharding(self.mesh, x.ndim).spec if x.ndim else ()
        s = NamedSharding(self.mesh, sharding.fit_spec(jax.sharding.PartitionSpec(*spec), x.shape, self.mesh))
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    def fetch(self, tree):
        if self.mesh is None or jax.process_count() == 1:
            return jax.device_get(tree)
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(tree, tiled=True)

    def init_cache(self, model, batch: int, length: int, dtype=None):
        """model.init_cache, created already sharded (never whole on one device)."""
        if self.mesh is None:
            return model.init_cache(batch, length, dtype)
        out = cache_shardings(model.cfg, self.mesh, batch, length)
        with self.context():
            return jax.jit(lambda: model.init_cache(batch, length, dtype), out_shardings=out)()


# -- loading onto the mesh -------------------------------------------------------------------
def load_model_on_mesh(path: str, mesh, dtype: str | None = None, step: int | None = None,
                       device_memory_gib: float | None = None, batch: int = 8, seq_len: int | None = None,
                       cache_len: int = 0, what: str = "inference"):
    """A `Llama` whose parameters are sharded over `mesh`, held in the compute dtype.

    A meditron-jax checkpoint is restored by Orbax straight into the shardings (each device
    reads its own slices); an HF directory is read tensor by tensor on the host and each tensor
    sent out in shards. The mesh and the memory plan are checked first, so a mesh that does not
    fit the heads or a model too large for the devices fails in one line before any weight is read.
    """
    from meditron_jax.convert.io import ConversionError
    from meditron_jax.models.llama import abstract_model

    if not _paths.exists(path):  # local or gs:// (meditron_jax.storage.paths)
        raise InferenceMeshError(f"{path}: no such checkpoint or model directory")
    hf = os.path.exists(os.path.join(path, "config.json"))
    if hf:
        import json

        from meditron_jax.models.config import LlamaConfig as C
        with open(os.path.join(path, "config.json")) as f:
            cfg = C.from_hf(json.load(f))
    else:
        from meditron_jax.storage.checkpoint import model_config
        cfg = model_config(path, step)
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    sizes = {a: int(mesh.shape[a]) for a in meshes.MESH_AXES}
    check_mesh(cfg, sizes)
    cache_len = cfg.max_position_embeddings if cache_len < 0 else cache_len  # -1: the model's context
    plan = memory_plan(cfg, sizes, cfg.dtype, batch, seq_len or cfg.max_position_embeddings, cache_len,
                       device_limit(device_memory_gib))
    check_fits(plan, f"{what} of {path}", sizes)
    target = param_abstract(cfg, mesh, jnp.dtype(cfg.dtype))
    if hf:
        from meditron_jax.convert.hf import load_hf_dir
        _, host = load_hf_dir(path)
        params = {}
        for k, a in target.items():
            value = host.pop(k)
            if tuple(value.shape) != a.shape:
                raise ConversionError(f"{path}: parameter {k!r} has shape {tuple(value.shape)}, config expects {a.shape}")
            value = np.asarray(value).astype(a.dtype)
            params[k] = jax.make_array_from_callback(a.shape, a.sharding, lambda idx, v=value: v[idx])
            del value
    else:
        from meditron_jax.storage.checkpoint import restore_params
        params = restore_params(path, target, step)
    model = abstract_model(cfg)
    for k, v in params.items():
        getattr(model, k).set_value(v)
    return model


def mesh_summary(model, mesh) -> dict:
    """What each device holds (for the results JSON / logs)."""
    sizes = {a: int(mesh.shape[a]) for a in meshes.MESH_AXES}
    per_device = sum(a.addressable_shards[0].data.nbytes for a in jax.tree.leaves(model.params()))
    return {"mesh": sizes, "devices": math.prod(sizes.values()), "param_bytes_per_device": int(per_device)}
