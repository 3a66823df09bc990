"""Tiny Hugging Face Llama models made by the tests (no downloads)."""

import numpy as np
import torch
import transformers

from meditron_jax.models.config import LlamaConfig


def hf_config(cfg: LlamaConfig):
    return transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items()
                                       if k not in ("architectures", "model_type", "torch_dtype")})


def make_hf_model(cfg: LlamaConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_config(cfg)).eval()
    with torch.no_grad():  # non-trivial norms so a mix-up of norm weights shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_state_dict_numpy(model) -> dict[str, np.ndarray]:
    from meditron_jax.convert.io import torch_to_numpy
    return {k: torch_to_numpy(v).copy() for k, v in model.state_dict().items()}  # no aliasing of torch memory
