"""Import / export against transformers (ground truth) and Meta's format built independently here."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from meditron_jax.storage import checkpoint as ckpt
from meditron_jax import from_pretrained
from meditron_jax.cli import main
from meditron_jax.models.config import LlamaConfig
from meditron_jax.convert import hf as hfconv
from meditron_jax.convert.io import HFWeights
from meditron_jax.models.llama import PARAM_AXES, param_shapes
from meditron_jax.distributed.sharding import DEFAULT_RULES, sharding_for
from meditron_jax.distributed.meshes import make_mesh
from tests.hf_helpers import hf_state_dict_numpy, make_hf_model

# odd vocab (padded to 640 inside), GQA: exercises the vocab trimming and kv-head split
CFG = LlamaConfig(vocab_size=517, hidden_size=48, intermediate_size=112, num_layers=2, num_heads=6,
                  num_kv_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def hf_model():
    return make_hf_model(CFG, seed=3)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, hf_model):
    d = tmp_path_factory.mktemp("hf") / "model"
    hf_model.save_pretrained(d, max_shard_size="60KB")  # sharded, with index
    assert (d / "model.safetensors.index.json").exists()
    return d


@pytest.fixture(scope="module")
def imported(tmp_path_factory, hf_dir):
    out = tmp_path_factory.mktemp("imp") / "ckpt"
    assert main(["import", "--from", "hf", str(hf_dir), "--out", str(out)]) == 0
    return out


def _tokens(seed=0):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, (2, 12)).astype(np.int32)


def _assert_same_state(sd_a, sd_b):
    assert set(sd_a) == set(sd_b)
    for k in sd_a:
        a, b = sd_a[k], sd_b[k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.bfloat16 else a,
                           b.view(torch.uint8) if b.dtype == torch.bfloat16 else b), k


def _assert_params_equal(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape and np.array_equal(a[k], b[k]), k


def test_hf_import_export_bitwise_and_logits(tmp_path, hf_model, imported):
    cfg, params = ckpt.load_params(str(imported))
    assert cfg == CFG
    _assert_params_equal(params, hfconv.from_hf(hf_state_dict_numpy(hf_model), CFG))
    assert not params["embed_tokens"][517:].any() and not params["lm_head"][:, 517:].any()

    tokens = _tokens()
    with torch.no_grad():
        ref = hf_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    ours = np.asarray(from_pretrained(str(imported))(jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, ref, atol=1e-4 * max(1.0, np.abs(ref).max()))

    out = tmp_path / "exported"
    assert main(["export", str(imported), "--to", "hf", "--out", str(out), "--dtype", "float32",
                 "--max-shard-size", "50KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 517 and config["torch_dtype"] == "float32"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    back = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    _assert_same_state(hf_model.state_dict(), back.state_dict())
    with torch.no_grad():
        np.testing.assert_array_equal(back(torch.tensor(tokens, dtype=torch.long)).logits.numpy(), ref)


def test_restore_onto_mesh_and_trainer_layout(imported):
    """The imported step restores onto any sharding (what train.init_from does)."""
    mesh = make_mesh({"data": 2, "stage": 1, "fsdp": 2, "tensor": 2})
    rules = dict(DEFAULT_RULES)
    abstract = {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sharding_for(PARAM_AXES[k], s, mesh, rules))
                for k, s in param_shapes(CFG).items()}
    restored = ckpt.restore_params(str(imported), abstract)
    _, host = ckpt.load_params(str(imported))
    for k, v in restored.items():
        assert v.sharding == abstract[k].sharding, k
        np.testing.assert_array_equal(np.asarray(v), host[k])
    assert ckpt.complete_steps(str(imported)) == [0]
    meta = ckpt.read_meta(str(imported))
    assert meta["source"]["format"] == "hf" and meta["model_config"]["vocab_size"] == 517


def test_import_is_a_standard_checkpoint(imported):
    """Pins the streaming writer's one assumption about Orbax: it saves through a public
    `PyTreeCheckpointHandler` subclass that names itself `StandardCheckpointHandler`, which is
    only right while the standard handler's format is the PyTree one. The step metadata names
    the standard handler, and a composite `StandardRestore` (the trainer's restore) reads it."""
    import orbax.checkpoint as ocp
    meta = json.loads((imported / "0" / "_CHECKPOINT_METADATA").read_text())
    assert meta["item_handlers"]["params"] == ocp.StandardCheckpointHandler.typestr()
    _, host = ckpt.load_params(str(imported))
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in host.items()}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as c:
        got = c.restore(imported / "0", args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    for k, v in host.items():
        np.testing.assert_array_equal(np.asarray(got["params"][k]), v)


def test_safetensors_reader_matches_the_library(hf_dir):
    """`HFWeights` reads (pread into a reused buffer, or the library's own copy) exactly what
    `safetensors` itself loads, for every tensor of a sharded checkpoint."""
    from safetensors.numpy import load_file
    from meditron_jax.convert.io import Scratch
    w, scratch = HFWeights(str(hf_dir)), Scratch()
    ref = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        ref.update(load_file(f))
    assert sorted(w.keys()) == sorted(ref) and len(ref) > 10
    for k, v in ref.items():
        assert w.shape(k) == v.shape
        for got in (w.read(k, scratch), w.read(k), w.get(k)):
            assert got.dtype == v.dtype and got.shape == v.shape, k
            np.testing.assert_array_equal(got, v)


def test_bf16_source_exports_bitwise_bf16(tmp_path, hf_model):
    src = tmp_path / "bf16"
    hf_bf16 = make_hf_model(CFG, seed=5).to(torch.bfloat16)
    hf_bf16.save_pretrained(src)
    assert main(["import", "--from", "hf", str(src), "--out", str(tmp_path / "ck")]) == 0
    assert main(["export", str(tmp_path / "ck"), "--to", "hf", "--out", str(tmp_path / "out")]) == 0  # bf16 default
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    a, b = HFWeights(str(src)), HFWeights(str(tmp_path / "out"))
    assert set(a.keys()) == set(b.keys())
    for k in a.keys():
        x, y = a.get(k), b.get(k)
        assert x.dtype == y.dtype == ml_dtypes.bfloat16 and np.array_equal(x.view(np.uint16), y.view(np.uint16)), k


def test_pytorch_bin_source(tmp_path, hf_model, imported):
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CFG.to_hf()))
    torch.save(hf_model.state_dict(), d / "pytorch_model.bin")
    assert main(["import", "--from", "hf", str(d), "--out", str(tmp_path / "ck")]) == 0
    _assert_params_equal(ckpt.load_params(str(tmp_path / "ck"))[1], ckpt.load_params(str(imported))[1])


# ---- Meta: built here from the HF weights with transformers' own permutation ---------------
def _meta_state_dict(hf_sd: dict, cfg: LlamaConfig) -> dict:
    """HF state dict -> Meta names/layout, inverting transformers' convert_llama_weights_to_hf
    `permute(w, n_heads, dim1, dim2) = w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2)`."""
    def unpermute(w, n_heads):
        dim1, dim2 = w.shape
        return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2).clone()

    sd = {"tok_embeddings.weight": hf_sd["model.embed_tokens.weight"], "norm.weight": hf_sd["model.norm.weight"],
          "output.weight": hf_sd["lm_head.weight"]}
    for i in range(cfg.num_layers):
        p, m = f"model.layers.{i}.", f"layers.{i}."
        sd[m + "attention.wq.weight"] = unpermute(hf_sd[p + "self_attn.q_proj.weight"], cfg.num_heads)
        sd[m + "attention.wk.weight"] = unpermute(hf_sd[p + "self_attn.k_proj.weight"], cfg.num_kv_heads)
        sd[m + "attention.wv.weight"] = hf_sd[p + "self_attn.v_proj.weight"]
        sd[m + "attention.wo.weight"] = hf_sd[p + "self_attn.o_proj.weight"]
        sd[m + "feed_forward.w1.weight"] = hf_sd[p + "mlp.gate_proj.weight"]
        sd[m + "feed_forward.w2.weight"] = hf_sd[p + "mlp.down_proj.weight"]
        sd[m + "feed_forward.w3.weight"] = hf_sd[p + "mlp.up_proj.weight"]
        sd[m + "attention_norm.weight"] = hf_sd[p + "input_layernorm.weight"]
        sd[m + "ffn_norm.weight"] = hf_sd[p + "post_attention_layernorm.weight"]
    return {k: v.contiguous() for k, v in sd.items()}


def _split_dim(key: str):
    if key.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight")):
        return 0
    if key.endswith(("wo.weight", "w2.weight", "tok_embeddings.weight")):
        return 1
    return None


def _write_meta(d, sd: dict, cfg: LlamaConfig, mp: int):
    d.mkdir()
    (d / "params.json").write_text(json.dumps({
        "dim": cfg.hidden_size, "multiple_of": 16, "n_heads": cfg.num_heads, "n_kv_heads": cfg.num_kv_heads,
        "n_layers": cfg.num_layers, "norm_eps": cfg.rms_norm_eps, "vocab_size": -1}))
    for r in range(mp):
        part = {k: (v if _split_dim(k) is None else v.chunk(mp, dim=_split_dim(k))[r]).clone() for k, v in sd.items()}
        torch.save(part, d / f"consolidated.{r:02d}.pth")


@pytest.mark.parametrize("mp", [1, 2])
def test_meta_import_matches_hf(tmp_path, hf_model, imported, mp):
    _write_meta(tmp_path / "meta", _meta_state_dict(hf_model.state_dict(), CFG), CFG, mp)
    assert main(["import", "--from", "meta", str(tmp_path / "meta"), "--out", str(tmp_path / "ck"),
                 "--preset", "tiny"]) == 2  # tiny's shape differs: refused, one line
    assert main(["import", "--from", "meta", str(tmp_path / "meta"), "--out", str(tmp_path / "ck")]) == 0
    cfg, params = ckpt.load_params(str(tmp_path / "ck"))
    assert cfg.replace(max_position_embeddings=CFG.max_position_embeddings) == CFG  # vocab from the tensors
    _assert_params_equal(params, ckpt.load_params(str(imported))[1])


def test_meta_export_import_roundtrip(tmp_path, hf_model, imported):
    out = tmp_path / "meta_out"
    assert main(["export", str(imported), "--to", "meta", "--out", str(out), "--dtype", "float32"]) == 0
    sd = torch.load(out / "consolidated.00.pth", weights_only=True)
    expect = _meta_state_dict(hf_model.state_dict(), CFG)
    assert set(sd) == set(expect)
    for k in expect:
        assert torch.equal(sd[k], expect[k]), k
    import zipfile
    assert zipfile.ZipFile(out / "consolidated.00.pth").testzip() is None  # CRCs filled in
    params = json.loads((out / "params.json").read_text())
    assert params["n_kv_heads"] == 2 and params["vocab_size"] == 517
    assert main(["import", "--from", "meta", str(out), "--out", str(tmp_path / "ck")]) == 0
    _assert_params_equal(ckpt.load_params(str(tmp_path / "ck"))[1], ckpt.load_params(str(imported))[1])
    # bf16 meta export holds the bf16 rounding of the same tensors
    assert main(["export", str(imported), "--to", "meta", "--out", str(tmp_path / "m16")]) == 0
    sd16 = torch.load(tmp_path / "m16" / "consolidated.00.pth", weights_only=True)
    assert all(torch.equal(sd16[k], expect[k].to(torch.bfloat16)) for k in expect)


def test_checkpoints_from_sharded_meshes_export_identically(tmp_path, imported):
    """Orbax stores global arrays: a checkpoint saved from (data 2, fsdp 2, tensor 2) or from a
    stage-2 mesh, with optimizer state, exports to the same bytes as the imported one."""
    cfg, host = ckpt.load_params(str(imported))
    meta = ckpt.meta_record(cfg)
    ref = tmp_path / "ref"
    assert main(["export", str(imported), "--to", "hf", "--out", str(ref), "--dtype", "float32"]) == 0
    for sizes in ({"data": 2, "stage": 1, "fsdp": 2, "tensor": 2}, {"data": 1, "stage": 2, "fsdp": 2, "tensor": 2}):
        mesh = make_mesh(sizes)
        params = {k: jax.device_put(v, sharding_for(PARAM_AXES[k], v.shape, mesh, dict(DEFAULT_RULES)))
                  for k, v in host.items()}
        opt_state = {"mu": jax.tree.map(jnp.zeros_like, params)}
        workdir = tmp_path / f"run_{sizes['stage']}"
        manager = ckpt.make_manager(str(workdir))
        ckpt.save(manager, 7, params, opt_state=opt_state, data_state={"pos": 1}, meta=meta)
        manager.wait_until_finished()
        manager.close()
        out = tmp_path / f"out_{sizes['stage']}"
        assert main(["export", str(workdir), "--step", "7", "--to", "hf", "--out", str(out), "--dtype", "float32"]) == 0
        assert sorted(os.listdir(out)) == sorted(os.listdir(ref))
        for f in os.listdir(ref):
            if f == "meditron_jax_export.json":  # names the source checkpoint and step: differs by design
                continue
            assert (out / f).read_bytes() == (ref / f).read_bytes(), f


# ---- tokenizer -----------------------------------------------------------------------------
def test_tokenizer_files_match_sentencepiece(tmp_path, imported):
    from meditron_jax.data.tokenizer import Tokenizer, train_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"The patient {i} received {i * 7} mg of aspirin for chest pain, "
                                f"hypertension and diabetes mellitus." for i in range(200))
                      + "\nÉtude médicale über Ärzte 東京 😀\n", encoding="utf-8")
    model = train_tokenizer([str(corpus)], 400, str(tmp_path / "tok"))
    added = ["<|im_start|>", "<|im_end|>", "<CLS>"]
    out = tmp_path / "out"
    assert main(["export", str(imported), "--to", "hf", "--out", str(out), "--tokenizer", model,
                 "--added-tokens", *added]) == 0
    at = transformers.AutoTokenizer.from_pretrained(out)
    ours = Tokenizer(model, added)
    samples = ["The patient received 20 mg of aspirin.", "  two leading spaces\tand a tab\nnewline",
               "Étude médicale 東京 😀 qzx", "<|im_start|>user\nchest pain?<|im_end|>\n<|im_start|>assistant",
               "a <|im_end|> b<CLS>c", " x", ""]
    for s in samples:
        assert at(s, add_special_tokens=False)["input_ids"] == ours.encode(s), s
    assert at("hi")["input_ids"] == ours.encode("hi", bos=True)
    assert [at.convert_tokens_to_ids(t) for t in added] == [400, 401, 402]
    # importing that directory records its tokenizer (with the added tokens); export reuses it
    assert main(["import", "--from", "hf", str(out), "--out", str(tmp_path / "ck")]) == 0
    assert ckpt.read_meta(str(tmp_path / "ck"))["tokenizer"]["fingerprint"] == ours.fingerprint
    assert main(["export", str(tmp_path / "ck"), "--to", "hf", "--out", str(tmp_path / "again")]) == 0
    at2 = transformers.AutoTokenizer.from_pretrained(tmp_path / "again")
    assert all(at2(s, add_special_tokens=False)["input_ids"] == ours.encode(s) for s in samples)
    # more added tokens than the model's vocab has room for
    assert main(["export", str(imported), "--to", "hf", "--out", str(tmp_path / "x"), "--tokenizer", model,
                 "--added-tokens", *[f"<t{i}>" for i in range(200)]]) == 2
    assert not (tmp_path / "x").exists()


# ---- bad input -----------------------------------------------------------------------------
def _leftovers(parent):
    return [p for p in os.listdir(parent) if ".partial-" in p]


def _bad_hf(kind, tmp_path, hf_dir):
    import shutil
    d = tmp_path / "src"
    shutil.copytree(hf_dir, d)
    shards = sorted(p for p in os.listdir(d) if p.endswith(".safetensors"))
    if kind == "missing_safetensors":
        for s in shards:
            os.remove(d / s)
        os.remove(d / "model.safetensors.index.json")
    elif kind == "truncated":
        data = (d / shards[0]).read_bytes()
        (d / shards[0]).write_bytes(data[: len(data) - 100])
    elif kind == "index_missing_shard":
        os.remove(d / shards[-1])
    elif kind == "shape_vs_config":
        cfg = json.loads((d / "config.json").read_text())
        cfg["intermediate_size"] = 96
        (d / "config.json").write_text(json.dumps(cfg))
    elif kind == "pickle_code":
        for s in shards:
            os.remove(d / s)
        os.remove(d / "model.safetensors.index.json")

        class Evil:
            def __reduce__(self):
                return (os.system, ("echo pwned",))
        torch.save({"x": Evil()}, d / "pytorch_model.bin")
    return ["import", "--from", "hf", str(d), "--out", str(tmp_path / "out")]


@pytest.mark.parametrize("kind", ["missing_safetensors", "truncated", "index_missing_shard", "shape_vs_config",
                                  "pickle_code", "missing_step", "output_exists"])
def test_bad_input_one_line_exit_2(tmp_path, capsys, hf_dir, imported, kind):
    if kind == "missing_step":
        argv = ["export", str(imported), "--step", "5", "--to", "hf", "--out", str(tmp_path / "out")]
    elif kind == "output_exists":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
        argv = ["export", str(imported), "--to", "hf", "--out", str(tmp_path / "out")]
    else:
        argv = _bad_hf(kind, tmp_path, hf_dir)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [e for e in err if not e.startswith(("WARNING:absl", "W0", "I0"))]
    assert len(err) == 1 and "error:" in err[0] and "Traceback" not in err[0], err
    print(f"[{kind}] {err[0]}")
    if kind == "output_exists":
        assert os.listdir(tmp_path / "out") == ["keep.txt"]
    else:
        assert not (tmp_path / "out").exists()
    assert not _leftovers(tmp_path)


def test_error_mid_stream_leaves_nothing(tmp_path, capfd, hf_dir, monkeypatch):
    """A read failing after validation (e.g. a disk error) mid-import: one line, exit 2, and the
    partial checkpoint (writes still in flight included) is removed."""
    from meditron_jax.convert import io as cio
    read = cio.HFWeights.read

    def failing(self, name, scratch=None):
        if "layers.1.mlp" in name:
            raise cio.ConversionError(f"{self.directory}: simulated read failure of {name}")
        return read(self, name, scratch)

    monkeypatch.setattr(cio.HFWeights, "read", failing)
    capfd.readouterr()
    assert main(["import", "--from", "hf", str(hf_dir), "--out", str(tmp_path / "out")]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and "simulated read failure" in err.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_cli_import_prints_the_step(tmp_path, hf_dir, cli):
    r = cli("import", "--from", "hf", hf_dir, "--out", tmp_path / "ck")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"wrote {tmp_path / 'ck' / '0'}"
    assert ckpt.complete_steps(str(tmp_path / "ck")) == [0]


# ---- checkpoints written by the trainer ------------------------------------------------------
def _train(workdir, init_from, mesh: dict) -> int:
    from meditron_jax.training import train as train_mod
    params = ["model.preset = 'tiny'", "model.num_layers = 2", "data.demo = True",
              "train.steps = 2", "train.seq_len = 32", "train.micro_batch_size = 2",
              "train.global_batch_size = 8", "train.checkpoint_every = 2", "train.log_every = 1",
              "train.progress = False", f"train.init_from = '{init_from}'",
              "optimizer.lr = 1e-4", "optimizer.warmup_steps = 1"]
    params += [f"mesh.{k} = {v}" for k, v in mesh.items()]
    if mesh["stage"] > 1:  # micro-batch 2 x data-parallel 2 x 2 pipeline micro-batches = 8
        params.append("pipeline.microbatches = 2")
    return train_mod.train(str(workdir), gin_params=params)


TRAIN_CFG = LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=352, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=512)


def _train_and_export(tmp, init, tag, mesh):
    """Train from `init` on `mesh`, export the trainer's checkpoint, check the files hold exactly
    the checkpoint's params and that transformers loads them; returns the HF state dict."""
    workdir = tmp / tag
    assert _train(workdir, init, mesh) == 0
    assert ckpt.complete_steps(str(workdir / "checkpoints")) == [2]
    out = tmp / f"out_{tag}"
    assert main(["export", str(workdir), "--to", "hf", "--out", str(out), "--dtype", "float32"]) == 0
    tcfg, params = ckpt.load_params(str(workdir))
    want = hfconv.to_hf(params, tcfg)
    got = HFWeights(str(out))
    assert set(got.keys()) == set(want)
    for k in want:
        assert np.array_equal(got.get(k), want[k]), k
    transformers.LlamaForCausalLM.from_pretrained(out)
    return want


@pytest.fixture(scope="module")
def trained_dp(tmp_path_factory):
    """HF -> import -> train.init_from on (data 2, fsdp 2, tensor 2) -> checkpoint -> export."""
    tmp = tmp_path_factory.mktemp("train")
    make_hf_model(TRAIN_CFG, seed=7).save_pretrained(tmp / "hf")
    assert main(["import", "--from", "hf", str(tmp / "hf"), "--out", str(tmp / "init")]) == 0
    exported = _train_and_export(tmp, tmp / "init", "dp_fsdp_tp", {"data": 2, "stage": 1, "fsdp": 2, "tensor": 2})
    return tmp, exported


def test_trainer_checkpoint_exports(trained_dp):
    tmp, exported = trained_dp
    init = hfconv.to_hf(ckpt.load_params(str(tmp / "init"))[1], TRAIN_CFG)
    assert max(np.abs(exported[k] - init[k]).max() for k in init) > 1e-5  # training moved the weights


@pytest.mark.slow  # compiles the pipeline schedule (~1 min on 2 cores)
def test_trainer_pipeline_checkpoint_exports_like_dp(trained_dp):
    tmp, exported = trained_dp
    pp = _train_and_export(tmp, tmp / "init", "pp", {"data": 1, "stage": 2, "fsdp": 2, "tensor": 2})
    # Compare what training changed, not the weights: the updates are ~1e-4 (lr 1e-4, 2 Adam
    # steps) on weights ~2e-2, so an absolute tolerance on the weights passes with zero or
    # sign-flipped gradients. Zero gradients leave only weight decay (~1e-7), flipped ones
    # the negated update: both miss the data-parallel update by ~100% of its size.
    init = hfconv.to_hf(ckpt.load_params(str(tmp / "init"))[1], TRAIN_CFG)
    for k in exported:
        want, got = exported[k] - init[k], pp[k] - init[k]
        scale = np.abs(want).max()
        assert scale > 1e-5, k  # training moved this tensor
        err = np.abs(got - want).max()
        assert err <= 1e-3 * scale, f"{k}: pipeline update differs by {err:.2e}, update size {scale:.2e}"


def test_export_without_recorded_tokenizer(tmp_path, imported):
    """--no-tokenizer: weights only; --added-tokens without a tokenizer is refused."""
    assert main(["export", str(imported), "--to", "hf", "--out", str(tmp_path / "o"), "--no-tokenizer"]) == 0
    assert not (tmp_path / "o" / "tokenizer.json").exists()
    assert main(["export", str(imported), "--to", "hf", "--out", str(tmp_path / "p"), "--added-tokens", "<x>"]) == 2
    assert main(["export", str(imported), "--to", "hf", "--out", str(tmp_path / "q"), "--max-shard-size", "lots"]) == 2
    assert not (tmp_path / "p").exists() and not (tmp_path / "q").exists()


def test_assign_layout_copies_equal_numpy():
    """The strip-wise transposing copy of conversion equals numpy's assignment bit for bit:
    both directions, head reshapes, padded destinations, bf16 <-> fp32 / fp16 / same dtype."""
    import ml_dtypes

    from meditron_jax.convert.stream import STRIP, assign

    rng = np.random.default_rng(0)
    w = rng.standard_normal((6 * STRIP + 3, 40)).astype(ml_dtypes.bfloat16)  # HF [out, in]
    cases = [(w.T, np.float32), (w.T, ml_dtypes.bfloat16), (w.astype(np.float32).T, np.float32),
             (np.reshape(w.T, (40, 17, 3), copy=False)[:, 2:9], np.float32)]
    for src, dt in cases:
        out = np.zeros(src.shape, dt)
        assign(out, src)
        assert np.array_equal(out.view(np.uint8), np.ascontiguousarray(src, dtype=dt).view(np.uint8)), (src.shape, dt)
    padded = np.zeros((40, 60), np.float32)  # vocab-padded block: only the first columns come from w
    assign(padded[:, :51], w.T)
    assert np.array_equal(padded[:, :51], w.T.astype(np.float32)) and not padded[:, 51:].any()
    block = rng.standard_normal((40, 51)).astype(np.float32)  # export: our block -> HF rows
    for dt in (ml_dtypes.bfloat16, np.float16, np.float32):
        hf_out = np.zeros((51, 40), dt)
        assign(hf_out.T, block)
        assert np.array_equal(hf_out.view(np.uint8), np.ascontiguousarray(block.T, dtype=dt).view(np.uint8)), dt
    special = np.array([[np.nan, np.inf], [-np.inf, 1e-40]], np.float32).astype(ml_dtypes.bfloat16)
    out = np.empty((2, 2), np.float32)
    assign(out, special.T)
    assert np.array_equal(out.view(np.uint32), np.ascontiguousarray(special.T, dtype=np.float32).view(np.uint32))
