"""KV-cache generation: greedy equals transformers, cache equals recomputation, sampling, CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from meditron_jax import from_pretrained
from meditron_jax.cli import main as cli_main
from meditron_jax.data.tokenizer import Tokenizer
from meditron_jax.eval.generate import Generator, Sampling, sample_logits
from tests.eval_helpers import tiny_config, train_tiny_tokenizer
from tests.hf_helpers import make_hf_model

NEW = 24


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    tok_path = train_tiny_tokenizer(str(d), vocab_size=600)
    tok = Tokenizer(tok_path)
    cfg = tiny_config(tok.vocab_size, num_kv_heads=2, rope_theta=1e4)
    hf = make_hf_model(cfg, seed=7)
    with torch.no_grad():  # larger weights: peaked next-token distributions, no near-ties in argmax
        for name, p in hf.named_parameters():
            if "proj" in name or "lm_head" in name or "embed" in name:
                p.mul_(4.0)
    hf.save_pretrained(d / "hf")
    model = from_pretrained(str(d / "hf"))
    prompts = [tok.encode(t, bos=True) for t in (
        "Question: patient fever cough?", "The answer is: maybe",
        "Question: aspirin insulin heart lung kidney liver blood pressure dose drug therapy trial?")]
    return {"tok": tok, "tok_path": tok_path, "hf": hf, "hf_dir": str(d / "hf"), "model": model,
            "gen": Generator(model), "prompts": prompts}


def _hf_greedy(hf, prompts, new):
    """transformers generate(do_sample=False) on a left-padded batch; EOS never stops it."""
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=0, eos_token_id=None, suppress_tokens=None)
    return out[:, L:].tolist()


def test_greedy_matches_transformers_single_and_batch(env):
    gen, hf, prompts = env["gen"], env["hf"], env["prompts"]
    for p in prompts:  # one prompt at a time
        ours = gen.generate([p], NEW, eos_id=None)[0]
        assert ours == _hf_greedy(hf, [p], NEW)[0]
        assert len(ours) == NEW and len(set(ours)) > 3  # not a degenerate repetition
    assert len({len(p) for p in prompts}) == 3
    batch = gen.generate(prompts, NEW, eos_id=None)  # unequal lengths, left padded
    assert batch == _hf_greedy(hf, prompts, NEW)
    assert batch == [gen.generate([p], NEW, eos_id=None)[0] for p in prompts]
    assert gen.generate(prompts, NEW, eos_id=None, batch_size=2) == batch  # chunks + a padding row


def test_kv_cache_equals_recomputation(env):
    gen, model, prompts = env["gen"], env["model"], env["prompts"]
    outs, logits = gen.generate(prompts, 20, eos_id=None, collect_logits=True)
    T = 64
    graphdef, state = nnx.split(model)

    @jax.jit
    def last_logits(state, tokens, n):  # no cache: the whole (right-padded) sequence again
        seg = (jnp.arange(T) < n).astype(jnp.int32)[None]
        return nnx.merge(graphdef, state)(tokens, segment_ids=seg)[0, n - 1]

    for p, o, lg in zip(prompts, outs, logits):
        seq = list(p)
        for t in range(20):
            full = np.asarray(last_logits(state, jnp.asarray([seq + [0] * (T - len(seq))], jnp.int32), len(seq)))
            np.testing.assert_allclose(lg[t], full, atol=1e-4, rtol=1e-4)
            assert o[t] == int(full.argmax())
            seq.append(o[t])


def test_eos_stops_rows_independently(env):
    gen, prompts = env["gen"], env["prompts"]
    free = gen.generate(prompts, 12, eos_id=None)
    eos = free[0][4]  # pretend this token of row 0 is EOS
    outs = gen.generate(prompts, 12, eos_id=eos)
    for f, o in zip(free, outs):
        cut = f.index(eos) + 1 if eos in f else len(f)
        assert o == f[:cut]
    assert len(outs[0]) <= 5 and outs[0][-1] == eos
    assert any(len(o) == 12 for o in outs), "another row keeps going after row 0 stopped"


def test_sampling_filters_and_determinism():
    logits = jnp.asarray(np.log(np.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]], np.float32)))
    keys = jax.random.split(jax.random.key(0), 200)
    for s, allowed in [(Sampling(1.0, top_k=2), [{0, 1}, {2, 3}]), (Sampling(1.0, top_p=0.7), [{0, 1}, {2, 3}]),
                       (Sampling(1.0, top_p=0.4), [{0}, {3}]), (Sampling(0.0), [{0}, {3}])]:
        draws = np.asarray(jax.jit(jax.vmap(lambda k: sample_logits(logits, k, s)))(keys))  # [200, 2]
        seen = [set(draws[:, 0].tolist()), set(draws[:, 1].tolist())]
        assert seen == allowed, (s, seen)
    a = np.asarray(sample_logits(logits, keys[3], Sampling(0.8)))
    assert (a == np.asarray(sample_logits(logits, keys[3], Sampling(0.8)))).all()
    with pytest.raises(Exception, match="top-p"):
        Sampling(1.0, top_p=0.0)


def test_sampled_generation_is_seeded(env):
    gen, prompts = env["gen"], env["prompts"]
    s = Sampling(1.0, top_k=20, top_p=0.95)
    a = gen.generate(prompts, 8, s, seed=3, eos_id=None)
    assert a == gen.generate(prompts, 8, s, seed=3, eos_id=None)
    assert a != gen.generate(prompts, 8, s, seed=4, eos_id=None)


def test_generate_cli_streams_and_writes(env, tmp_path, capsys):
    tok = env["tok"]
    base = ["generate", "--checkpoint", env["hf_dir"], "--tokenizer", env["tok_path"], "--max-new-tokens", "10"]
    assert cli_main(base + ["--prompt", "Question: fever?", "--no-eos-stop"]) == 0
    out = capsys.readouterr().out
    ids = tok.encode("Question: fever?", bos=True)
    ref = env["gen"].generate([ids], 10, eos_id=None)[0]
    assert out == "Question: fever?" + tok.decode(ids + ref)[len(tok.decode(ids)):] + "\n"

    pf = tmp_path / "p.jsonl"
    pf.write_text(json.dumps({"prompt": "Question: fever?"}) + "\n" + json.dumps({"prompt": "The answer"}) + "\n")
    assert cli_main(base + ["--prompt-file", str(pf), "--out", str(tmp_path / "o.jsonl"), "--no-eos-stop"]) == 0
    recs = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert recs[0]["tokens"] == ref and len(recs) == 2
    capsys.readouterr()
    assert cli_main(base + ["--prompt", "x" * 3000]) == 2
    assert "exceeds the model's context of 512" in capsys.readouterr().err
