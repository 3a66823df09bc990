"""Long prompts: log-probs at positions up to 2048 against a float64 torch reference.

The reference is transformers' Llama in float64 with its rotary embedding computed in float64
too: transformers' own float64 model is not a float64 reference for positions, because
`LlamaRotaryEmbedding.forward` computes the angles and cos/sin in float32 (autocast off, then
cast), so its cos/sin are off by up to 3.4e-5 at position 2047 and it drifts with position
exactly like float32 torch. The model is tiny in width, but its weights are scaled up (x16) so
attention is peaked, the regime where a small angle error moves a log-prob."""

import numpy as np
import torch

from meditron_jax.models.config import LlamaConfig
from meditron_jax.convert import hf as hfconv
from meditron_jax.models.llama import model_from_params
from tests.hf_helpers import hf_state_dict_numpy, make_hf_model

T = 2048
CFG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=T)
BUCKETS = ((0, 64), (64, 512), (512, 1024), (1024, 1536), (1536, T - 1))


def _model():
    m = make_hf_model(CFG, seed=0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "proj" in name or "embed" in name or "lm_head" in name:
                p.mul_(16.0)
    return m


def _float64_rope(model):
    H, theta = CFG.head_dim, CFG.rope_theta
    inv = 1.0 / (theta ** (torch.arange(0, H, 2, dtype=torch.float64) / H))

    def forward(x, position_ids):
        ang = position_ids[..., None].to(torch.float64) * inv
        emb = torch.cat([ang, ang], dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    model.model.rotary_emb.forward = forward
    return model


def _logprobs(logits):
    logits = np.asarray(logits, np.float64)
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def _rel_err(lp, ref, tokens):
    t = tokens[0, 1:]
    a, r = lp[np.arange(T - 1), t], ref[np.arange(T - 1), t]
    rel = np.abs(a - r) / np.abs(r)
    return [float(rel[s:e].max()) for s, e in BUCKETS]


def test_long_prompt_logprobs_match_float64_at_every_position():
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (1, T))
    hf = _model()
    with torch.no_grad():
        ref = _logprobs(_float64_rope(_model().to(torch.float64))(torch.tensor(tokens)).logits.numpy()[0])
        torch32 = _logprobs(hf(torch.tensor(tokens)).logits.numpy()[0])
    ours = model_from_params(CFG, hfconv.from_hf(hf_state_dict_numpy(hf), CFG))
    lp = _logprobs(np.asarray(ours(tokens.astype(np.int32)))[0])
    err, err_torch = _rel_err(lp, ref, tokens), _rel_err(torch32, ref, tokens)
    print("relative error by position bucket, ours:", [f"{e:.1e}" for e in err],
          "torch fp32:", [f"{e:.1e}" for e in err_torch])
    assert max(err) < 1e-4, err
    assert err[-1] < 3 * err[0] + 1e-5, err  # no growth with position
    assert err[-1] <= err_torch[-1], (err, err_torch)  # at the far end at least as close as torch fp32
