"""`train.init_from`: architecture from the checkpoint, vocabulary growth by the 17 added tokens,
context extension; the added tokens round-trip through preprocess, training, export and
AutoTokenizer (tiny shapes: a model imported with vocab V grows to V + 17, like Llama-2's
32000 -> Meditron's 32017)."""

import json
import os

import numpy as np
import pytest
import torch
import transformers

from meditron_jax.storage import checkpoint as ckpt
from meditron_jax import from_pretrained
from meditron_jax.cli import main
from meditron_jax.models.config import LlamaConfig
from meditron_jax.data.tokenizer import Tokenizer
from tests.hf_helpers import make_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _meditron_added_tokens() -> list[str]:
    """The list configs/gap_replay.gin gives (read from the file: the test checks the config)."""
    import gin
    gin.clear_config()
    import meditron_jax.data.loader  # noqa: F401
    gin.parse_config_files_and_bindings([os.path.join(ROOT, "configs", "gap_replay.gin")], [],
                                        finalize_config=False, skip_unknown=True)
    tokens = list(gin.query_parameter("data.added_tokens"))
    gin.clear_config()
    return tokens


ADDED = _meditron_added_tokens()
V = 1024  # the demo tokenizer's vocabulary (stands in for Llama-2's 32000)
BASE = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0)
IN_TEXT = ("[bib_ref]", "[/bib_ref]", "[fig]", "[/fig]")  # added tokens the corpus uses


def test_config_lists_meditrons_17_added_tokens():
    assert len(ADDED) == 17 and len(set(ADDED)) == 17
    assert ADDED[:5] == ["<CLS>", "<SEP>", "<EOD>", "<MASK>", "<PAD>"] and ADDED[-1] == "[/formula]"


def _corpus(path, n=40):
    rng = np.random.default_rng(0)
    words = "the patient had fever and cough after the new treatment was given daily".split()
    with open(path, "w") as f:
        for i in range(n):
            body = " ".join(rng.choice(words, 12))
            f.write(json.dumps({"text": f"{body} [bib_ref] Smith {2000 + i} [/bib_ref] {body} "
                                        f"[fig] Figure {i} [/fig] end."}) + "\n")


def _train_params(init, data_dir, tok, *extra):
    return ["mesh.data = -1", "mesh.stage = 1", "mesh.fsdp = 1", "mesh.tensor = 1",
            f"train.init_from = '{init}'", f"data.sources = {{'med': '{data_dir}'}}",
            f"data.tokenizer = '{tok}'", f"data.added_tokens = {ADDED!r}",
            "train.seq_len = 64", "train.micro_batch_size = 1", "train.global_batch_size = 8",
            "train.log_every = 1", "train.progress = False", "train.tensorboard = False",
            "optimizer.lr = 1e-2", "optimizer.min_lr = 1e-3", "optimizer.warmup_steps = 1", *extra]


def _args(params):
    out = []
    for p in params:
        out += ["--gin_param", p]
    return out


@pytest.fixture(scope="module")
def grown(tmp_path_factory, demo_data):
    """tiny HF Llama (vocab V) -> import -> preprocess with the 17 tokens -> train 2 steps as the
    V+17 model with a longer context (step 1 runs at lr 0: Megatron's warmup starts at 0, so
    checkpoint 1 holds the initial params) -> export."""
    tmp = tmp_path_factory.mktemp("grow")
    tok_path = str(demo_data / "tokenizer.model")
    assert Tokenizer(tok_path).vocab_size == V
    hf = make_hf_model(BASE, seed=3)
    hf.save_pretrained(tmp / "hf")
    assert main(["import", "--from", "hf", str(tmp / "hf"), "--out", str(tmp / "init")]) == 0
    _corpus(tmp / "docs.jsonl")
    assert main(["preprocess", "--input", str(tmp / "docs.jsonl"), "--tokenizer", tok_path,
                 "--out", str(tmp / "data"), "--added-tokens", *ADDED]) == 0
    return tmp, hf, tok_path


@pytest.fixture(scope="module")
def trained(grown):
    import contextlib
    import io
    tmp, hf, tok_path = grown
    params = _train_params(tmp / "init", tmp / "data", tok_path, f"model.vocab_size = {V + 17}",
                           "model.max_position_embeddings = 256", "train.steps = 2", "train.checkpoint_every = 1")
    err = io.StringIO()  # the log lines (meditron_jax.console writes to the current sys.stderr)
    with contextlib.redirect_stderr(err):
        rc = main(["train", "--workdir", str(tmp / "run"), *_args(params)])
    assert rc == 0, err.getvalue()[-3000:]
    assert main(["export", str(tmp / "run"), "--to", "hf", "--out", str(tmp / "hf_out"), "--dtype", "float32"]) == 0
    return tmp, hf, tok_path, err.getvalue()


def test_growth_and_context_extension_are_logged(trained):
    err = trained[3]
    assert f"vocab {V} -> {V + 17}: 17 new embedding and lm_head rows" in err
    assert "max_position_embeddings 128 -> 256 (RoPE unchanged" in err
    cfg = json.load(open(trained[0] / "hf_out" / "config.json"))
    assert cfg["vocab_size"] == V + 17 and cfg["max_position_embeddings"] == 256
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["num_hidden_layers"] == 2  # the checkpoint's, not a preset's


def _band(rows, old):
    """|row - mean| in units of sqrt(1e-9 * var) of the old rows, per element: the scale of
    transformers' mean_resizing noise. ~N(0,1) for the rule; 0 for a plain mean; huge for
    zeros, a copied row or random init."""
    old = old.astype(np.float64)
    mu, sd = old.mean(0), np.sqrt(1e-9 * old.var(0))
    return np.abs(rows.astype(np.float64) - mu) / sd


def _check_rule(rows, old):
    z = _band(rows, old)
    assert 0.5 < np.sqrt(np.mean(z ** 2)) < 2.0, np.sqrt(np.mean(z ** 2))
    assert z.max() < 8.0


def test_new_rows_follow_transformers_mean_resizing(trained):
    tmp = trained[0]
    _, init = ckpt.load_params(str(tmp / "init"))
    cfg, p1 = ckpt.load_params(str(tmp / "run"), step=1)
    assert cfg.vocab_size == V + 17 and p1["embed_tokens"].shape[0] == cfg.padded_vocab_size
    # old rows bit for bit; padded rows zero
    assert np.array_equal(p1["embed_tokens"][:V], init["embed_tokens"][:V])
    assert np.array_equal(p1["lm_head"][:, :V], init["lm_head"][:, :V])
    assert not p1["embed_tokens"][V + 17:].any() and not p1["lm_head"][:, V + 17:].any()
    _check_rule(p1["embed_tokens"][V:V + 17], init["embed_tokens"][:V])
    _check_rule(p1["lm_head"][:, V:V + 17].T, init["lm_head"][:, :V].T)
    # the band is transformers' own: its resize_token_embeddings passes the same check
    ref = make_hf_model(BASE, seed=3)
    ref.resize_token_embeddings(V + 17)
    w = ref.get_input_embeddings().weight.detach().numpy()
    _check_rule(w[V:], w[:V])
    _check_rule(ref.lm_head.weight.detach().numpy()[V:], ref.lm_head.weight.detach().numpy()[:V])


def test_logits_without_added_tokens_equal_the_checkpoints_before_the_first_update(trained):
    tmp, hf = trained[0], trained[1]
    tokens = np.random.default_rng(1).integers(3, V, (2, 40)).astype(np.int32)
    grown = np.asarray(from_pretrained(str(tmp / "run"), step=1)(tokens))
    assert grown.shape[-1] == V + 17
    with torch.no_grad():
        want = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(grown[..., :V], want, atol=2e-5, rtol=1e-4)
    base = np.asarray(from_pretrained(str(tmp / "init"))(tokens))
    np.testing.assert_allclose(grown[..., :V], base, atol=1e-6, rtol=1e-6)


def test_added_tokens_reach_training_and_the_export(trained):
    tmp, _, tok_path = trained[0], trained[1], trained[2]
    _, p1 = ckpt.load_params(str(tmp / "run"), step=1)
    _, p2 = ckpt.load_params(str(tmp / "run"), step=2)
    delta = np.abs(p2["embed_tokens"] - p1["embed_tokens"]).max(axis=1)
    used = [V + ADDED.index(t) for t in IN_TEXT]
    unused = [V + ADDED.index(t) for t in ("<MASK>", "[table]", "[formula]")]
    # rows of tokens in the batches get Adam steps (~lr); the others only weight decay
    assert delta[used].min() > 10 * delta[unused].max() > 0
    ours = Tokenizer(tok_path, ADDED)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp / "hf_out"))
    text = "fever [bib_ref] Smith 2001 [/bib_ref] and [formula] x [/formula] <PAD> end"
    ids = auto(text)["input_ids"]
    assert ids == ours.encode(text, bos=True)
    for t in ADDED:
        assert auto.convert_tokens_to_ids(t) == V + ADDED.index(t) == ours.piece_to_id(t)
    model = transformers.LlamaForCausalLM.from_pretrained(str(tmp / "hf_out"))
    assert model.get_input_embeddings().weight.shape[0] == V + 17


# ---- refusals: one line on stderr, exit 2, nothing in the workdir ---------------------------
@pytest.mark.parametrize("setting,field,want,have", [
    ("model.rms_norm_eps = 1e-5", "rms_norm_eps", "1e-05", "1e-06"),
    ("model.rope_theta = 500000.0", "rope_theta", "500000.0", "10000.0"),
    ("model.num_heads = 8", "num_heads", "8", "4"),
    ("model.num_layers = 4", "num_layers", "4", "2"),
    ("model.preset = 'tiny'", "hidden_size", "128", "64"),  # a preset that restates another architecture
    ("model.vocab_size = 1000", "vocab_size", "1000", "1024"),  # shrinking
])
def test_architecture_mismatch_refused(grown, capfd, tmp_path, setting, field, want, have):
    tmp, _, tok = grown
    capfd.readouterr()
    rc = main(["train", "--workdir", str(tmp_path / "w"), *_args(_train_params(tmp / "init", tmp / "data", tok,
                                                                                 setting, "train.steps = 1"))])
    err = capfd.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err
    line = err.splitlines()[-1]
    assert field in line and want in line and have in line and "train.init_from" in line, line
    assert not (tmp_path / "w" / "checkpoints").exists() and not (tmp_path / "w" / "config.gin").exists()


def test_growth_without_added_tokens_refused(grown, capfd, tmp_path, demo_data):
    tmp, _, tok = grown
    params = [p for p in _train_params(tmp / "init", tmp / "data", tok, f"model.vocab_size = {V + 17}",
                                       "train.steps = 1") if not p.startswith("data.added_tokens")]
    params = [p if not p.startswith("data.sources") else
              f"data.sources = {{'g': '{demo_data / 'guidelines'}'}}" for p in params]
    capfd.readouterr()
    rc = main(["train", "--workdir", str(tmp_path / "w"), *_args(params)])
    line = capfd.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "17 rows" in line and "data.added_tokens" in line, line
    assert not (tmp_path / "w" / "checkpoints").exists()
