"""Llama-2 in Flax NNX: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, untied lm_head.

Owns: the parameters (Hugging Face names, fp32, stacked along a leading `layers` axis, each
tagged with logical axis names) and the forward pass, with an optional KV cache for decoding.
Does not own: meshes or PartitionSpecs (only `sharding.py` maps logical axes to devices),
attention kernels (`attention.py`), the loss (`training/step.py`).

Shapes: B batch, T length (queries), S length (keys), D embed, N heads, K kv heads,
H head dim, F mlp, V (padded) vocab, L layers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from meditron_jax.models import attention as attention_lib
from meditron_jax.models.config import LlamaConfig
from meditron_jax.distributed.sharding import constrain, constrain_with_grad

# Logical axes of every parameter (the closed vocabulary of the design notes).
PARAM_AXES = {
    "embed_tokens": ("vocab", "embed"),
    "q_proj": ("layers", "embed", "heads", "head_dim"),
    "k_proj": ("layers", "embed", "kv_heads", "head_dim"),
    "v_proj": ("layers", "embed", "kv_heads", "head_dim"),
    "o_proj": ("layers", "heads", "head_dim", "embed"),
    "gate_proj": ("layers", "embed", "mlp"),
    "up_proj": ("layers", "embed", "mlp"),
    "down_proj": ("layers", "mlp", "embed"),
    "input_layernorm": ("layers", "embed"),
    "post_attention_layernorm": ("layers", "embed"),
    "norm": ("embed",),
    "lm_head": ("embed", "vocab"),
}
LAYER_KEYS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
              "input_layernorm", "post_attention_layernorm")

MASK_VALUE = -1e9  # padded-vocab logits; finite so softmax never sees NaN

# The two layouts of a [B, T, D] activation (logical axes). RESIDUAL: the residual stream and
# what runs on it between the tensor-parallel regions (the RMSNorms, the loss input).
# REGION_INPUT: a normed activation entering a tensor-parallel region (the attention or MLP
# projections, the output projection), whole along the sequence. They are the same layout unless
# `sharding.sequence_parallel` splits `residual_length` over `tensor`; then entering a region
# all-gathers the sequence and leaving it (the sum over heads / mlp) reduce-scatters it.
RESIDUAL = ("batch", "residual_length", "embed")
REGION_INPUT = ("batch", "length", "embed")


def param_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    D, F, L, N, K, H, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
                           cfg.num_kv_heads, cfg.head_dim, cfg.padded_vocab_size)
    return {
        "embed_tokens": (V, D),
        "q_proj": (L, D, N, H), "k_proj": (L, D, K, H), "v_proj": (L, D, K, H), "o_proj": (L, N, H, D),
        "gate_proj": (L, D, F), "up_proj": (L, D, F), "down_proj": (L, F, D),
        "input_layernorm": (L, D), "post_attention_layernorm": (L, D),
        "norm": (D,), "lm_head": (D, V),
    }


def enter_region(h):
    """A normed activation entering a tensor-parallel region: whole along the sequence (with
    sequence parallelism, an all-gather), its gradient leaving as a reduce-scatter."""
    return constrain_with_grad(h, REGION_INPUT, RESIDUAL)


def leave_region(y):
    """A tensor-parallel region's output (partial sums over heads / mlp), summed into the
    residual layout (an all-reduce, or with sequence parallelism a reduce-scatter); its gradient
    enters the region whole along the sequence (with sequence parallelism, an all-gather)."""
    return constrain_with_grad(y, RESIDUAL, REGION_INPUT)


def rms_norm(x, weight, eps, dtype):
    """HF LlamaRMSNorm: normalise in fp32, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(dtype) * x32.astype(dtype)


def _split_inv_freq(H: int, theta: float):
    """RoPE frequencies theta^(-2i/H) (computed in float64) as hi + lo, both fp32: hi keeps 12
    significant bits, so position x hi is exact in fp32 for positions < 4096 (12 + 12 bits)."""
    inv = 1.0 / (float(theta) ** (np.arange(0, H, 2, dtype=np.float64) / H))
    m, e = np.frexp(inv)
    hi = np.ldexp(np.floor(m * 4096.0) / 4096.0, e)
    return hi.astype(np.float32), (inv - hi).astype(np.float32)


def rope(x, positions, theta):
    """Rotary embedding, Hugging Face rotate-half layout. x [B,T,*,H], positions [B,T].

    The angles are accurate, not fp32 products: position x frequency rounded to fp32 is off by
    up to half an ulp of the angle (7e-5 rad at position 2047 for the fastest frequency), an error
    that grows with the position and that transformers' fp32 RoPE (also its float64 model's:
    LlamaRotaryEmbedding computes in fp32) carries. Here angle = a + b with a = position x hi
    exact and b = position x lo small, and cos/sin come from the sum formulas, so cos/sin are
    within ~1e-7 of float64 RoPE at every position below 4096 (beyond, a is rounded and the
    accuracy falls back to the plain fp32 product's). docs/eval.md gives the effect on log-probs.
    """
    H = x.shape[-1]
    hi, lo = _split_inv_freq(H, theta)  # [H/2] each
    p = positions.astype(jnp.float32)[..., None]
    a, b = p * hi, p * lo  # [B,T,H/2]
    ca, sa, cb, sb = jnp.cos(a), jnp.sin(a), jnp.cos(b), jnp.sin(b)
    c, s_ = ca * cb - sa * sb, sa * cb + ca * sb
    cos = jnp.concatenate([c, c], axis=-1)[:, :, None, :].astype(x.dtype)  # [B,T,1,H]
    sin = jnp.concatenate([s_, s_], axis=-1)[:, :, None, :].astype(x.dtype)
    x1, x2 = x[..., : H // 2], x[..., H // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


def decoder_layer(cfg: LlamaConfig, p: dict, x, positions, segment_ids, cache=None):
    """One pre-norm decoder block. p: this layer's params (no `layers` axis). x [B,T,D].

    cache: None (training) or dict(k=[B,S,K,H], v=[B,S,K,H], segment=[B,S], index=scalar):
    new keys/values are written at slots index..index+T and attention runs over the cache.
    Returns (x, new_cache_kv) where new_cache_kv is (k, v) or None.
    """
    dt = jnp.dtype(cfg.dtype)
    h = enter_region(rms_norm(x, p["input_layernorm"], cfg.rms_norm_eps, dt))
    q = checkpoint_name(jnp.einsum("btd,dnh->btnh", h, p["q_proj"].astype(dt)), "q_proj")
    k = checkpoint_name(jnp.einsum("btd,dkh->btkh", h, p["k_proj"].astype(dt)), "k_proj")
    v = checkpoint_name(jnp.einsum("btd,dkh->btkh", h, p["v_proj"].astype(dt)), "v_proj")
    q = constrain(rope(q, positions, cfg.rope_theta), ("batch", "length", "heads", "head_dim"))
    k = constrain(rope(k, positions, cfg.rope_theta), ("batch", "length", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
    new_kv = None
    if cache is None:
        attn = attention_lib.attend(q, k, v, segment_ids, segment_ids, impl=cfg.attention)
    else:
        idx = cache["index"]
        ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), idx, axis=1)
        cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), idx, axis=1)
        new_kv = (ck, cv)
        q_slots = idx + jnp.arange(q.shape[1])
        attn = attention_lib.attend(q, ck.astype(dt), cv.astype(dt), segment_ids, cache["segment"],
                                    impl=cfg.attention, q_slots=q_slots)
    attn = checkpoint_name(attn, "attention")
    o = checkpoint_name(leave_region(jnp.einsum("btnh,nhd->btd", attn, p["o_proj"].astype(dt))), "o_proj")
    x = constrain(x + o, RESIDUAL)
    h = enter_region(rms_norm(x, p["post_attention_layernorm"], cfg.rms_norm_eps, dt))
    gate = checkpoint_name(jnp.einsum("btd,df->btf", h, p["gate_proj"].astype(dt)), "gate_proj")
    up = checkpoint_name(jnp.einsum("btd,df->btf", h, p["up_proj"].astype(dt)), "up_proj")
    act = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
    down = checkpoint_name(leave_region(jnp.einsum("btf,fd->btd", act, p["down_proj"].astype(dt))), "down_proj")
    x = constrain(x + down, RESIDUAL)
    return x, new_kv


def remat_policy(name: str):
    """Named rematerialisation policies (what is *saved* for the backward pass)."""
    cp = jax.checkpoint_policies
    if name == "full":
        return cp.nothing_saveable
    if name == "dots":  # every matmul output without a batch dim (weights x activations)
        return cp.dots_with_no_batch_dims_saveable
    if name == "save_proj":  # the named projection outputs; recompute norms, rope, softmax, silu
        return cp.save_only_these_names("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                        "up_proj", "down_proj")
    raise ValueError(f"unknown remat policy {name!r}")


def run_layers(cfg: LlamaConfig, layers: dict, x, positions, segment_ids):
    """All decoder layers over stacked params `layers` (each with a leading L axis). No cache.

    Used by the model and by the pipeline schedule (which passes a slice of the stack).
    """
    def body(carry, p):
        y, _ = decoder_layer(cfg, p, carry, positions, segment_ids)
        return y, None

    if cfg.remat != "none":
        body = jax.checkpoint(body, policy=remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
        x, _ = jax.lax.scan(body, x, layers)
    else:
        n = jax.tree.leaves(layers)[0].shape[0]
        for i in range(n):
            x, _ = body(x, jax.tree.map(lambda a: a[i], layers))
    return x


def default_positions(tokens):
    B, T = tokens.shape
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


def embed(cfg: LlamaConfig, table, tokens):
    """tokens [B,T] -> [B,T,D] in the compute dtype."""
    x = _lookup(jnp.dtype(cfg.dtype), table, tokens)
    return constrain(x, RESIDUAL)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lookup(dtype, table, tokens):
    """table[tokens] in `dtype`, gathered from the table cast to `dtype` first: with the vocab split
    over `tensor` the gather's partial rows are summed across ranks, and that all-reduce then runs
    in the compute dtype (exact: one non-zero term per entry). The gradient (a scatter-add of
    every token's row gradient) stays in the table's dtype (fp32 for the fp32 view the step
    differentiates), as `jnp.take(table).astype(dtype)` would give."""
    return jnp.take(table.astype(dtype), tokens, axis=0)


def _lookup_fwd(dtype, table, tokens):
    return _lookup(dtype, table, tokens), (jnp.zeros((0, *table.shape), table.dtype), tokens)


def _lookup_bwd(dtype, res, g):
    like, tokens = res  # like: an empty [0, V, D] array that carries the table's shape and dtype
    return jnp.zeros(like.shape[1:], like.dtype).at[tokens].add(g.astype(like.dtype)), None


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


@jax.custom_vjp
def _project(h, w):
    """h [B,T,D] @ w [D,V] -> fp32 logits, both inputs in the compute dtype.

    Backward: d logits (fp32) is rounded to the compute dtype once (Megatron's output layer is a
    compute-dtype GEMM too), so the input gradient d h = d logits @ w^T leaves the matmul in the
    compute dtype and its all-reduce over the vocab-split `tensor` axis moves bf16, not fp32;
    d w accumulates in fp32 inside the matmul (preferred element type) and is rounded to w's dtype."""
    return jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)


def _project_fwd(h, w):
    return _project(h, w), (h, w)


def _project_bwd(res, g):
    h, w = res
    g = g.astype(h.dtype)
    dh = jnp.einsum("btv,dv->btd", g, w)
    dw = jnp.einsum("btd,btv->dv", h, g, preferred_element_type=jnp.float32).astype(w.dtype)
    return dh, dw


_project.defvjp(_project_fwd, _project_bwd)


def lm_logits(cfg: LlamaConfig, lm_head, h, true_vocab: bool = True):
    """h [B,T,D] -> fp32 logits. true_vocab: sliced to cfg.vocab_size; else padded entries masked."""
    out = _project(enter_region(h), lm_head.astype(jnp.dtype(cfg.dtype)))
    out = constrain(out, ("batch", "length", "vocab"))
    if true_vocab:
        return out[..., : cfg.vocab_size]
    valid = jnp.arange(out.shape[-1]) < cfg.vocab_size
    return jnp.where(valid, out, MASK_VALUE)


def forward_hidden(cfg: LlamaConfig, params: dict, tokens, positions=None, segment_ids=None,
                   layers_fn=run_layers):
    """Pure forward pass to the final-normed hidden states [B,T,D].

    params: {name: array} in our layout (see PARAM_AXES). `layers_fn` runs the decoder stack;
    the pipeline-parallel schedule substitutes its own.
    """
    if positions is None:
        positions = default_positions(tokens)
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens, dtype=jnp.int32)
    x = embed(cfg, params["embed_tokens"], tokens)
    x = layers_fn(cfg, {k: params[k] for k in LAYER_KEYS}, x, positions, segment_ids)
    return constrain(rms_norm(x, params["norm"], cfg.rms_norm_eps, jnp.dtype(cfg.dtype)), RESIDUAL)


class Llama(nnx.Module):
    """Llama-2 decoder-only LM. Parameters are fp32 `nnx.Param`s with `logical_axes` metadata."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, init_std: float = 0.02):
        self.cfg = cfg
        shapes = param_shapes(cfg)
        key = rngs.params()
        keys = dict(zip(shapes, jax.random.split(key, len(shapes))))

        def make(name):
            shape = shapes[name]
            if "norm" in name:
                value = jnp.ones(shape, jnp.float32)
            else:
                value = init_std * jax.random.normal(keys[name], shape, jnp.float32)
            if name in ("embed_tokens", "lm_head"):  # padded vocab rows/cols start (and stay) zero
                vocab_axis = PARAM_AXES[name].index("vocab")
                keep = jnp.arange(shape[vocab_axis]) < cfg.vocab_size
                keep = keep.reshape([-1 if a == vocab_axis else 1 for a in range(len(shape))])
                value = jnp.where(keep, value, 0.0)
            return nnx.Param(value, logical_axes=PARAM_AXES[name])

        for name in shapes:
            setattr(self, name, make(name))

    def params(self) -> dict:
        return {k: getattr(self, k)[...] for k in PARAM_AXES}

    def hidden(self, tokens, positions=None, segment_ids=None):
        """tokens [B,T] -> final-normed hidden states [B,T,D] (compute dtype)."""
        return forward_hidden(self.cfg, self.params(), tokens, positions, segment_ids)

    def logits(self, h, true_vocab: bool = True):
        return lm_logits(self.cfg, self.lm_head[...], h, true_vocab)

    def __call__(self, tokens, positions=None, segment_ids=None, true_vocab: bool = True):
        """tokens [B,T] int -> logits [B,T,vocab] (fp32). `segment_ids` > 0 mark documents."""
        return self.logits(self.hidden(tokens, positions, segment_ids), true_vocab=true_vocab)

    # -- decoding with a KV cache ---------------------------------------------------
    def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
        cfg = self.cfg
        dtype = dtype or jnp.dtype(cfg.dtype)
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
                "segment": jnp.zeros((batch, max_len), jnp.int32),
                "index": jnp.zeros((), jnp.int32)}

    def decode(self, tokens, positions, segment_ids, cache, return_hidden: bool = False):
        """Run T new tokens against the cache. segment_ids: 1 for real tokens, 0 for padding.

        Returns (logits [B,T,vocab] fp32, new cache); with `return_hidden`, the final-normed
        hidden states [B,T,D] instead of logits (callers that need only a few positions).
        Slots index..index+T are written.
        """
        cfg = self.cfg
        idx = cache["index"]
        seg = jax.lax.dynamic_update_slice_in_dim(cache["segment"], segment_ids.astype(jnp.int32), idx, axis=1)
        x = embed(cfg, self.embed_tokens[...], tokens)

        def body(carry, inp):
            p, ck, cv = inp
            y, (nk, nv) = decoder_layer(cfg, p, carry, positions, segment_ids,
                                        cache={"k": ck, "v": cv, "segment": seg, "index": idx})
            return y, (nk, nv)

        layers = {k: getattr(self, k)[...] for k in LAYER_KEYS}
        x, (ks, vs) = jax.lax.scan(body, x, (layers, cache["k"], cache["v"]))
        x = rms_norm(x, self.norm[...], cfg.rms_norm_eps, jnp.dtype(cfg.dtype))
        new_cache = {"k": ks, "v": vs, "segment": seg, "index": idx + tokens.shape[1]}
        return (x if return_hidden else self.logits(x)), new_cache


def abstract_model(cfg: LlamaConfig) -> Llama:
    """A model whose parameters are `jax.ShapeDtypeStruct`s (no memory allocated)."""
    return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))


@functools.partial(jax.jit, static_argnums=(0,))
def _init_state(cfg, seed):
    return nnx.split(Llama(cfg, rngs=nnx.Rngs(params=jax.random.key(seed))))[1]


def init_model(cfg: LlamaConfig, seed: int = 0) -> Llama:
    """Random initialisation (std 0.02 normal, ones for norms, zero padded vocab)."""
    graphdef = nnx.graphdef(abstract_model(cfg))
    return nnx.merge(graphdef, _init_state(cfg, seed))


def params_dict(model: Llama) -> dict:
    """{name: array} of the model's parameters (HF names, our layout)."""
    return model.params()


def model_from_params(cfg: LlamaConfig, params: dict) -> Llama:
    """Build a model around given arrays (numpy or jax) in our layout; shapes are checked."""
    model = abstract_model(cfg)
    shapes = param_shapes(cfg)
    for name, shape in shapes.items():
        if name not in params:
            raise ValueError(f"missing parameter {name!r}")
        value = params[name]
        if tuple(value.shape) != shape:
            raise ValueError(f"parameter {name!r} has shape {tuple(value.shape)}, config expects {shape}")
        getattr(model, name).set_value(jnp.asarray(value, jnp.float32))
    return model
