"""Starting a run from a checkpoint (`train.init_from`): its architecture, the changes a run may
make to it, and the rows a larger vocabulary adds.

Owns: the model config of a run that starts from a checkpoint (the checkpoint's recorded
architecture; `model.preset` is optional), the refusal of a gin architecture value that
disagrees with it, the two deliberate changes (vocabulary growth filled by `data.added_tokens`,
a different `max_position_embeddings`; RoPE is unchanged, so only the trained context changes),
and the initialisation of the new embedding / `lm_head` rows. Does not own: the restore itself
(`checkpoint.py`), the tokenizer (`data/tokenizer.py`) or the loop (`train.py`, `training/`).

The new-row rule is transformers' `resize_token_embeddings(..., mean_resizing=True)` (its
default since 4.46, `PreTrainedModel._init_added_embeddings_weights_with_mean`): each new row
of the input embedding, and each new column of the untied `lm_head`, is drawn from
N(mu, 1e-9 * Sigma), mu and Sigma the mean and covariance of the existing rows (plain mu when
1e-9 * Sigma is not positive definite). Why this rule: Hewitt ("Initializing new word embeddings
for pretrained language models", 2021) shows that with new output rows at the mean of the old
ones, the logit of a new token is the average logit, so the distribution over the old vocabulary
moves by at most a bounded KL, while zero or random rows can take a large share of the mass.
Megatron's checkpoint tools, the other rule in the field, pad a vocabulary by repeating the last
row, which gives all 17 new tokens the logits of whatever piece happens to be last (Llama-2's
id 31999). The old rows are copied bit for bit, so on text without added tokens the grown
model's logits over the old vocabulary equal the checkpoint's before the first update. The
sample uses numpy's `default_rng(train.seed)`; the optimizer state is fresh, as for any
`init_from`.
"""

from __future__ import annotations

import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np

from meditron_jax.storage import checkpoint as ckpt
from meditron_jax.models.config import LlamaConfig, preset as get_preset
from meditron_jax.errors import UserError

# Fields that fix the weights' meaning: a run may not change them.
ARCH_FIELDS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
               "rms_norm_eps", "rope_theta")
# Implementation / numerics knobs: free to choose per run.
COMPUTE_FIELDS = ("dtype", "vocab_pad_multiple", "scan_layers", "remat", "attention")
# Changes a run may make, each said in the log.
CHANGEABLE = ("vocab_size", "max_position_embeddings")
MODEL_PARAMS = ("preset",) + ARCH_FIELDS + COMPUTE_FIELDS + CHANGEABLE
# transformers' mean_resizing covariance scale (modeling_utils, epsilon = 1e-9)
COVARIANCE_SCALE = 1e-9


def gin_model_bindings() -> dict:
    """The `model.*` values gin binds (explicitly, in a file or a --gin_param)."""
    out = {}
    for name in MODEL_PARAMS:
        try:
            out[name] = gin.query_parameter(f"model.{name}")
        except ValueError:
            continue
    return out


def resolve_config(init_from: str) -> tuple[LlamaConfig, LlamaConfig, list[str]]:
    """(run config, checkpoint config, changes to log) for a run starting from `init_from`.

    The architecture is the checkpoint's; `model.preset` and `model.<field>` may restate it but
    not contradict it (one line naming the field and both values). `vocab_size` may grow (the
    new rows are filled later, by `grow_params`, and must be added tokens) and
    `max_position_embeddings` may change; compute settings come from gin, else the preset, else
    LlamaConfig's defaults."""
    try:
        ref = ckpt.model_config(init_from)
    except (OSError, ValueError) as e:
        raise UserError(f"train.init_from {init_from}: {' '.join(str(e).split())}") from None
    bound = gin_model_bindings()
    stated, source = {}, {}
    if "preset" in bound:
        p = get_preset(bound["preset"])
        for f in ARCH_FIELDS + COMPUTE_FIELDS + CHANGEABLE:
            stated[f], source[f] = getattr(p, f), f"model.preset {bound['preset']!r} sets {f}"
    for f, v in bound.items():
        if f != "preset" and v is not None:
            stated[f], source[f] = v, f"model.{f}"
    for f in ARCH_FIELDS:
        if f in stated and not _same(stated[f], getattr(ref, f)):
            raise UserError(f"train.init_from {init_from}: {source[f]} = {stated[f]!r} but the checkpoint "
                            f"has {f} = {getattr(ref, f)!r} (the architecture comes from the checkpoint: "
                            f"drop the setting or make it agree)")
    vocab = int(stated.get("vocab_size", ref.vocab_size))
    if vocab < ref.vocab_size:
        raise UserError(f"train.init_from {init_from}: {source['vocab_size']} = {vocab} is smaller than the "
                        f"checkpoint's vocab {ref.vocab_size}; shrinking the vocabulary is not supported")
    positions = int(stated.get("max_position_embeddings", ref.max_position_embeddings))
    defaults = LlamaConfig()
    compute = {f: stated.get(f, getattr(defaults, f)) for f in COMPUTE_FIELDS}
    cfg = ref.replace(vocab_size=vocab, max_position_embeddings=positions, **compute)
    changes = []
    if vocab != ref.vocab_size:
        changes.append(f"vocab {ref.vocab_size} -> {vocab}: {vocab - ref.vocab_size} new embedding and lm_head "
                       f"rows for the added tokens (transformers' mean_resizing rule)")
    if positions != ref.max_position_embeddings:
        changes.append(f"max_position_embeddings {ref.max_position_embeddings} -> {positions} "
                       f"(RoPE unchanged: theta {ref.rope_theta:g})")
    return cfg, ref, changes


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return float(a) == float(b)
    return a == b


def check_added_tokens(init_from: str, ref: LlamaConfig, cfg: LlamaConfig, tok) -> None:
    """A grown vocabulary must be filled by added tokens: ids ref.vocab_size..cfg.vocab_size-1
    are exactly the tokenizer's added tokens past the checkpoint's vocabulary."""
    if cfg.vocab_size == ref.vocab_size:
        return
    if tok is None:
        raise UserError(f"train.init_from {init_from}: growing the vocab {ref.vocab_size} -> {cfg.vocab_size} "
                        "needs a tokenizer with the added tokens (data.tokenizer + data.added_tokens)")
    n_new = cfg.vocab_size - ref.vocab_size
    added = len(getattr(tok, "added_tokens", ()))
    if tok.vocab_size != cfg.vocab_size or tok.base_vocab_size > ref.vocab_size:
        raise UserError(f"train.init_from {init_from}: model vocab_size {cfg.vocab_size} adds {n_new} rows to the "
                        f"checkpoint's {ref.vocab_size}, but tokenizer {tok.path} has {tok.base_vocab_size} pieces + "
                        f"{added} data.added_tokens = {tok.vocab_size}; each new row needs an added token "
                        f"(set data.added_tokens to the {n_new} tokens, or model.vocab_size = {tok.vocab_size})")


def _mean_resizing_rows(old: np.ndarray, n_new: int, rng: np.random.Generator) -> np.ndarray:
    """n_new rows for `old` [V_old, D] (fp32) by transformers' mean_resizing rule, in float64."""
    old = old.astype(np.float64)
    mu = old.mean(axis=0)
    centred = old - mu
    cov = COVARIANCE_SCALE * (centred.T @ centred) / old.shape[0]
    try:
        chol = np.linalg.cholesky(cov)  # fails unless positive definite (torch's check)
    except np.linalg.LinAlgError:
        return np.broadcast_to(mu, (n_new, old.shape[1])).astype(np.float32)
    z = rng.standard_normal((n_new, old.shape[1]))
    return (mu + z @ chol.T).astype(np.float32)


def grow_params(params: dict, ref: LlamaConfig, cfg: LlamaConfig, seed: int, shardings: dict) -> dict:
    """Params restored at the checkpoint's shapes -> params at `cfg`'s (padded) vocab.

    Old rows are copied exactly; rows ref.vocab_size..cfg.vocab_size-1 follow the mean_resizing
    rule (embedding rows and lm_head columns drawn independently, as transformers does); padded
    rows are zero. Other params pass through untouched."""
    if ref.vocab_size == cfg.vocab_size and ref.padded_vocab_size == cfg.padded_vocab_size:
        return params
    n_new, V_old, V = cfg.vocab_size - ref.vocab_size, ref.vocab_size, cfg.padded_vocab_size
    rng = np.random.default_rng(seed)
    out = dict(params)
    for name, vocab_axis in (("embed_tokens", 0), ("lm_head", 1)):
        table = params[name]
        old = _host(table)
        old = old if vocab_axis == 0 else old.T  # rows = tokens
        rows = _mean_resizing_rows(old[:V_old], n_new, rng) if n_new else np.zeros((0, old.shape[1]), np.float32)
        new = np.zeros((V, old.shape[1]), np.float32)
        new[:V_old] = old[:V_old]
        new[V_old:cfg.vocab_size] = rows
        new = new if vocab_axis == 0 else new.T
        out[name] = jax.make_array_from_callback(new.shape, shardings[name], lambda idx, a=new: a[idx])
    return out


def _host(a) -> np.ndarray:
    """The whole array on this host (every process of a multi-host run gets the same copy)."""
    if getattr(a, "is_fully_addressable", True):
        return np.asarray(jax.device_get(a))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def load_initial_params(init_from: str, ref: LlamaConfig, cfg: LlamaConfig, seed: int, shardings: dict) -> dict:
    """The run's step-0 params from `init_from`: restored onto `shardings` (the run's), the
    vocab tables at the checkpoint's own shape first, then grown to `cfg`'s."""
    from meditron_jax.models.llama import param_shapes

    want = param_shapes(ref)
    target = {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=shardings[k]) for k, s in want.items()}
    try:
        params = ckpt.restore_params(init_from, target)
    except ckpt.CheckpointMismatch as e:
        raise UserError(f"train.init_from {init_from}: {e}") from None
    return grow_params(params, ref, cfg, seed, shardings)


def log_changes(init_from: str, changes: list[str]) -> None:
    if jax.process_index() == 0:
        for c in changes:
            print(f"train.init_from {init_from}: {c}", file=sys.stderr, flush=True)


def run_model_config(tc) -> tuple[LlamaConfig, LlamaConfig | None, list[str]]:
    """The model config of a run (train and plan): with `train.init_from`, `resolve_config`'s;
    without, gin's `model.*` (a preset is then required)."""
    from meditron_jax.models.config import model_config

    if tc.init_from:
        return resolve_config(tc.init_from)
    return model_config(), None, []
