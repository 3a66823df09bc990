"""Model configuration: `LlamaConfig`, its presets, the Hugging Face mapping, gin `model.*`.

Owns: architecture hyper-parameters and how they translate to/from a Hugging Face
`config.json`, and `gin_call` (a configurable's error as one line). Does not own: training,
mesh or data settings (those are gin-bound in `training/config.py`, `sharding.py` and
`data/`) or finding and parsing gin files (`config/gin_files.py`: it sits above every configurable,
so this low module imports none of them).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any

import gin

from meditron_jax.config.checks import Range
from meditron_jax.errors import UserError

DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("auto", "xla", "blocked", "cudnn", "splash", "gpu_flash")  # models/attention.py
REMAT_POLICIES = ("none", "full", "dots", "save_proj")


class ConfigError(UserError, ValueError):
    """A configuration a user wrote is invalid (reported as one line by the CLI)."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:  # Annotated ranges: gin `model.*` values are checked when gin is parsed (config.checks)
    vocab_size: Annotated[int, Range(min=1)] = 32000
    hidden_size: Annotated[int, Range(min=1)] = 4096
    intermediate_size: Annotated[int, Range(min=1)] = 11008
    num_layers: Annotated[int, Range(min=1)] = 32
    num_heads: Annotated[int, Range(min=1)] = 32
    num_kv_heads: Annotated[int, Range(min=1)] = 32
    max_position_embeddings: Annotated[int, Range(min=2)] = 4096
    rms_norm_eps: Annotated[float, Range(min=0, min_open=True)] = 1e-5
    rope_theta: Annotated[float, Range(min=0, min_open=True)] = 10000.0
    # Numerics / implementation knobs (not part of the architecture proper).
    dtype: str = "float32"  # compute dtype; parameters are always float32
    vocab_pad_multiple: Annotated[int, Range(min=1)] = 128  # embedding / lm_head padded to a multiple of this
    scan_layers: bool = True  # False: python loop over layers (debugging), same numbers
    remat: str = "none"  # none | full | dots | save_proj
    attention: str = "auto"  # the platform's fused kernel (XLA on CPU); or one of ATTENTION_IMPLS

    def __post_init__(self):
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads {self.num_heads} not divisible by num_kv_heads {self.num_kv_heads}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype {self.dtype!r} not in {DTYPES}")
        if self.attention not in ATTENTION_IMPLS:
            problems.append(f"attention {self.attention!r} not in {ATTENTION_IMPLS}")
        if self.remat not in REMAT_POLICIES:
            problems.append(f"remat {self.remat!r} not in {REMAT_POLICIES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "vocab_pad_multiple"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return int(math.ceil(self.vocab_size / m) * m)

    def replace(self, **kw) -> "LlamaConfig":
        return dataclasses.replace(self, **kw)

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count at the true vocab size (what Hugging Face would report)."""
        D, F, L, H = self.hidden_size, self.intermediate_size, self.num_layers, self.head_dim
        attn = D * self.num_heads * H * 2 + D * self.num_kv_heads * H * 2
        per_layer = attn + 3 * D * F + 2 * D
        n = L * per_layer + D + self.vocab_size * D  # + lm_head
        if include_embedding:
            n += self.vocab_size * D
        return n

    # ---- Hugging Face config.json ------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> "LlamaConfig":
        model_type = hf.get("model_type")
        archs = hf.get("architectures") or []
        if model_type != "llama" and "LlamaForCausalLM" not in archs:
            raise ConfigError(f"not a Llama config (model_type={model_type!r}, architectures={archs})")
        if hf.get("tie_word_embeddings"):
            raise ConfigError("tied word embeddings are not Llama-2; refusing tie_word_embeddings=true")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ConfigError("Llama-2 has no biases; config asks for attention_bias/mlp_bias")
        if hf.get("rope_scaling"):
            raise ConfigError(f"rope_scaling {hf['rope_scaling']} is not supported (Llama-2 uses plain RoPE)")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act {act!r} is not Llama's silu")
        heads = hf["num_attention_heads"]
        if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
            raise ConfigError(f"head_dim {hf['head_dim']} != hidden_size / heads")
        rope_theta = hf.get("rope_theta")
        if rope_theta is None:  # transformers >= 5 nests it in rope_parameters
            rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        kw = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta),
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self, torch_dtype: str = "float32") -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "initializer_range": 0.02,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": None,
            "torch_dtype": torch_dtype,
            "use_cache": True,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**d)


_LLAMA2_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                         num_heads=32, num_kv_heads=32, max_position_embeddings=4096)

PRESETS: dict[str, LlamaConfig] = {
    # Small enough to train on two CPU cores in a minute; GQA so the demo exercises it.
    "tiny": LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=352, num_layers=4,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=512),
    "llama2_7b": _LLAMA2_7B,
    "llama2_13b": _LLAMA2_7B.replace(hidden_size=5120, intermediate_size=13824, num_layers=40,
                                     num_heads=40, num_kv_heads=40),
    "llama2_70b": _LLAMA2_7B.replace(hidden_size=8192, intermediate_size=28672, num_layers=80,
                                     num_heads=64, num_kv_heads=8),
    # Meditron: Llama-2 + 17 added tokens; the 7B recipe trained at 2048 context.
    "meditron_7b": _LLAMA2_7B.replace(vocab_size=32017, max_position_embeddings=2048, dtype="bfloat16"),
    "meditron_70b": _LLAMA2_7B.replace(vocab_size=32017, hidden_size=8192, intermediate_size=28672,
                                       num_layers=80, num_heads=64, num_kv_heads=8,
                                       max_position_embeddings=4096, dtype="bfloat16"),
}


def preset(name: str) -> LlamaConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


@gin.configurable("model")
def model_config(
    preset: str = gin.REQUIRED,
    vocab_size: int | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    max_position_embeddings: int | None = None,
    rms_norm_eps: float | None = None,
    rope_theta: float | None = None,
    dtype: str | None = None,
    vocab_pad_multiple: int | None = None,
    scan_layers: bool | None = None,
    remat: str | None = None,
    attention: str | None = None,
) -> LlamaConfig:
    """gin: `model.preset = 'meditron_7b'` plus any field override (`model.remat = 'full'`)."""
    base = globals()["preset"](preset)
    overrides = {k: v for k, v in locals().items() if k not in ("preset", "base") and v is not None}
    return base.replace(**overrides)


# ---- gin configurables ---------------------------------------------------------------------

def gin_call(fn):
    """`fn()` (a gin configurable, or a function calling some) with its user errors as one line:
    gin appends "In call to configurable ..." to errors raised inside, and raises a RuntimeError
    for a required parameter that was not supplied."""
    try:
        return fn()
    except UserError as e:
        raise _one_line(e) from None
    except RuntimeError as e:
        if "Required" in str(e) or "REQUIRED" in str(e):
            raise UserError("gin: " + " ".join(str(e).split())) from None
        raise


def _one_line(e: UserError) -> UserError:
    msg = str(e).split("\n  In call to configurable")[0]
    try:
        return type(e)(msg)
    except TypeError:
        return UserError(msg)
