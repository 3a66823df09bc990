"""The model against Hugging Face transformers (the reference we did not write)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from meditron_jax import from_pretrained
from meditron_jax.models.config import PRESETS, LlamaConfig, preset
from meditron_jax.convert import hf as hfconv
from meditron_jax.models.llama import init_model, model_from_params, params_dict
from tests.hf_helpers import hf_state_dict_numpy, make_hf_model

BASE = dict(vocab_size=517, hidden_size=48, intermediate_size=112, num_layers=2, num_heads=6,
            num_kv_heads=6, max_position_embeddings=128)
PARITY_CONFIGS = {
    "mha": dict(BASE),
    "gqa_theta1e6": dict(BASE, num_kv_heads=2, rope_theta=1e6),
    "eps1e-6_mqa": dict(BASE, num_kv_heads=1, rms_norm_eps=1e-6, vocab_size=640),
}


def _tokens(cfg, B=2, T=24, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)


def test_logits_match_transformers_long_sequence(tmp_path):
    """At 256 tokens attention takes the causal query-block path; still equal to transformers."""
    cfg = LlamaConfig(**PARITY_CONFIGS["gqa_theta1e6"])
    hf = make_hf_model(cfg, seed=2)
    hf.save_pretrained(tmp_path)
    tokens = _tokens(cfg, T=256, seed=3)
    with torch.no_grad():
        ref = hf(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
    out = np.asarray(from_pretrained(str(tmp_path))(jnp.asarray(tokens)))
    assert np.abs(out - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    cfg = LlamaConfig(**PARITY_CONFIGS[name])
    hf = make_hf_model(cfg, seed=1)
    hf.save_pretrained(tmp_path)
    tokens = _tokens(cfg)
    with torch.no_grad():
        ref = hf(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
    model = from_pretrained(str(tmp_path))
    out = np.asarray(model(jnp.asarray(tokens)))
    assert out.shape == ref.shape == (2, 24, cfg.vocab_size)
    err = np.abs(out - ref).max()
    tol = 1e-4 * max(1.0, np.abs(ref).max())
    print(f"[parity {name}] float32 max|diff|={err:.3e} tol={tol:.3e}")
    assert err <= tol

    # bfloat16 compute: params stay fp32, activations/matmuls in bf16. bf16 has 8 mantissa bits
    # (rel. eps 2^-8 ~ 4e-3); through 2 layers the logits drift by a few eps of their scale.
    bf = from_pretrained(str(tmp_path), dtype="bfloat16")
    out_bf = np.asarray(bf(jnp.asarray(tokens)))
    err_bf = np.abs(out_bf - ref).max()
    tol_bf = 3e-2 * max(1.0, np.abs(ref).max())
    print(f"[parity {name}] bfloat16 max|diff|={err_bf:.3e} tol={tol_bf:.3e}")
    assert err_bf <= tol_bf
    assert (out_bf.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_safetensors_sharded_and_bin(tmp_path):
    cfg = LlamaConfig(**PARITY_CONFIGS["gqa_theta1e6"])
    hf = make_hf_model(cfg, seed=2)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    tokens = _tokens(cfg, seed=3)
    with torch.no_grad():
        ref = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    out = np.asarray(from_pretrained(str(tmp_path / "sharded"))(jnp.asarray(tokens)))
    np.testing.assert_allclose(out, ref, atol=1e-4 * max(1, np.abs(ref).max()))
    # pytorch_model.bin written by torch.save (transformers 5 no longer writes it itself)
    (tmp_path / "bin2").mkdir()
    (tmp_path / "bin2" / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "bin2" / "pytorch_model.bin")
    out2 = np.asarray(from_pretrained(str(tmp_path / "bin2"))(jnp.asarray(tokens)))
    np.testing.assert_allclose(out2, ref, atol=1e-4 * max(1, np.abs(ref).max()))


def test_to_hf_from_hf_bitwise():
    cfg = LlamaConfig(**PARITY_CONFIGS["gqa_theta1e6"])
    sd = hf_state_dict_numpy(make_hf_model(cfg, seed=4))
    back = hfconv.to_hf(hfconv.from_hf(sd, cfg), cfg)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and back[k].shape == sd[k].shape, k
        assert np.array_equal(back[k].view(np.uint8), sd[k].view(np.uint8)), k


def test_vocab_padding_masked():
    cfg = LlamaConfig(**PARITY_CONFIGS["mha"])
    assert cfg.padded_vocab_size == 640
    model = init_model(cfg, seed=0)
    tokens = jnp.asarray(_tokens(cfg, T=8))
    full = np.asarray(model(tokens, true_vocab=False))
    assert full.shape[-1] == 640 and (full[..., 517:] <= -1e8).all()
    np.testing.assert_array_equal(np.asarray(model(tokens)), full[..., :517])


def test_scan_equals_unrolled_and_remat():
    cfg = LlamaConfig(**dict(BASE, num_kv_heads=2, num_layers=3))
    model = init_model(cfg, seed=0)
    params = {k: np.asarray(v) for k, v in params_dict(model).items()}
    tokens = jnp.asarray(_tokens(cfg, T=16))

    def loss_and_grad(c):
        m = model_from_params(c, params)
        from flax import nnx
        gdef, state = nnx.split(m)

        def f(state):
            return jnp.mean(nnx.merge(gdef, state)(tokens) ** 2)
        return jax.jit(jax.value_and_grad(f))(state)  # one compile, not op-by-op dispatch

    ref_loss, ref_grad = loss_and_grad(cfg)
    for variant in [dict(scan_layers=False), dict(remat="full"), dict(remat="dots"), dict(remat="save_proj"),
                    dict(remat="full", scan_layers=False)]:
        loss, grad = loss_and_grad(cfg.replace(**variant))
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, err_msg=str(variant))
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=str(variant))


def test_segment_masking_equals_separate_documents():
    cfg = LlamaConfig(**dict(BASE, num_kv_heads=2))
    model = init_model(cfg, seed=1)
    rng = np.random.default_rng(0)
    lengths = [5, 9, 4]
    docs = [rng.integers(0, cfg.vocab_size, n).astype(np.int32) for n in lengths]
    packed = np.concatenate(docs + [np.zeros(2, np.int32)])[None]  # 2 padding tokens at the end
    segs = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(2)])[None].astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in lengths] + [np.arange(2)])[None].astype(np.int32)
    out = np.asarray(model(jnp.asarray(packed), positions=jnp.asarray(pos), segment_ids=jnp.asarray(segs)))
    start = 0
    for d in docs:
        alone = np.asarray(model(jnp.asarray(d[None])))
        np.testing.assert_allclose(out[0, start:start + len(d)], alone[0], atol=2e-5)
        start += len(d)


def test_kv_cache_decode_matches_full_forward():
    cfg = LlamaConfig(**dict(BASE, num_kv_heads=2))
    model = init_model(cfg, seed=2)
    tokens = jnp.asarray(_tokens(cfg, B=2, T=12, seed=5))
    full = np.asarray(model(tokens))
    cache = model.init_cache(2, 16)
    seg = jnp.ones((2, 7), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    logits, cache = model.decode(tokens[:, :7], pos, seg, cache)
    np.testing.assert_allclose(np.asarray(logits), full[:, :7], atol=2e-5)
    for t in range(7, 12):
        logits, cache = model.decode(tokens[:, t:t + 1], jnp.full((2, 1), t), jnp.ones((2, 1), jnp.int32), cache)
        np.testing.assert_allclose(np.asarray(logits[:, 0]), full[:, t], atol=2e-5)


def test_cudnn_switch_is_clear_on_cpu():
    cfg = LlamaConfig(**dict(BASE, attention="cudnn"))
    model = init_model(cfg.replace(attention="xla"), seed=0)
    m = model_from_params(cfg, {k: np.asarray(v) for k, v in params_dict(model).items()})
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        m(jnp.zeros((1, 4), jnp.int32))


def test_presets():
    assert preset("meditron_7b").vocab_size == 32017 and preset("meditron_7b").max_position_embeddings == 2048
    m70 = preset("meditron_70b")
    assert (m70.num_kv_heads, m70.max_position_embeddings, m70.vocab_size) == (8, 4096, 32017)
    assert abs(preset("llama2_7b").num_params() / 6.738e9 - 1) < 1e-3
    assert abs(preset("llama2_70b").num_params() / 68.98e9 - 1) < 1e-2
    for p in PRESETS.values():
        assert LlamaConfig.from_hf(p.to_hf()) == p.replace(dtype="float32", scan_layers=True, remat="none",
                                                            attention="auto", vocab_pad_multiple=128)
