"""The bad-input table: every user-caused error the issues list, across `train`, `preprocess`,
`import` / `export` and `eval`, run through the real CLI (`meditron_jax.cli.main`).

Each case asserts: a non-zero exit (2), exactly one line on stderr naming the problem (the value
or file at fault), no traceback, that files which existed before are byte-for-byte unchanged,
and that no new output that looks complete appeared. `train` cases fail before compiling or
writing anything. The data (demo corpus, tokenizers, a tiny checkpoint, an exported Hugging Face
directory) is made here, once per module.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from meditron_jax.storage import checkpoint as ckpt
from meditron_jax.cli import main
from meditron_jax.models.config import LlamaConfig
from meditron_jax.models.llama import param_shapes

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["train.steps=2", "train.seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=1",
         "train.progress=False", "train.tensorboard=False", "train.eval_every=0"]
SMALL = LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                    num_kv_heads=1, max_position_embeddings=128)


# -- shared inputs ----------------------------------------------------------------------------------

def _save_checkpoint(root: Path, cfg: LlamaConfig, tokenizer: dict | None) -> Path:
    manager = ckpt.make_manager(str(root))
    params = {k: np.full(s, 0.01, np.float32) for k, s in param_shapes(cfg).items()}
    ckpt.save(manager, 0, params, meta=ckpt.meta_record(cfg, "", tokenizer))
    manager.wait_until_finished()
    manager.close()
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from meditron_jax.data.demo import prepare_demo
    from meditron_jax.data.tokenizer import Tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("bad_inputs")
    demo = root / "demo_data"
    paths = prepare_demo(demo)
    tok = Tokenizer(paths["tokenizer"])
    other = train_tokenizer([demo / "raw" / "replay.jsonl"], 400, root / "other", text_key="text")
    shutil.rmtree(demo / "raw")
    ck = _save_checkpoint(root / "small_ckpt", SMALL,
                          {"path": paths["tokenizer"], "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size})
    assert main(["export", str(ck), "--to", "hf", "--out", str(root / "hf"), "--dtype", "float32"]) == 0
    medqa = root / "medqa.jsonl"
    opts = {"A": "rest", "B": "fluids", "C": "surgery", "D": "aspirin"}
    medqa.write_text("".join(json.dumps({"question": f"Case {i}: what next?", "options": opts, "answer_idx": "B",
                                         "answer": "fluids"}) + "\n" for i in range(2)))
    big = root / "big_tokenizer"  # the demo tokenizer + 1 added token: one id more than the model's vocab
    big.mkdir()
    shutil.copy(paths["tokenizer"], big / "tokenizer.model")
    (big / "added_tokens.json").write_text(json.dumps({"<x>": tok.vocab_size}))
    return {"root": root, "demo": demo, "tokenizer": paths["tokenizer"], "other_tokenizer": str(other),
            "ckpt": ck, "hf": root / "hf", "medqa": medqa, "big_tokenizer": str(big)}


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def _workdir(tmp_path: Path, inputs) -> Path:
    """A workdir that already holds outputs (which a failing run must not touch) and the demo data."""
    w = tmp_path / "work"
    w.mkdir()
    shutil.copytree(inputs["demo"], w / "demo_data")
    (w / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (w / "config.gin").write_text("# earlier run\n")
    return w


# -- the table ----------------------------------------------------------------------------------------
# id -> (builder(tmp_path, inputs) -> argv, words the one error line must contain)

def _train(*params, workdir=None, args=()):
    def build(tmp_path, inputs):
        w = workdir(tmp_path, inputs) if workdir else _workdir(tmp_path, inputs)
        argv = ["train", "--gin_file", str(REPO / "configs/tiny.gin"), "--workdir", str(w), *args]
        for p in [*TRAIN, *params]:
            argv += ["--gin_param", p]
        return argv
    return build


def _workdir_with_ckpt(tmp_path, inputs):
    w = _workdir(tmp_path, inputs)
    shutil.copytree(inputs["ckpt"] / "checkpoints" / "0", w / "checkpoints" / "3")
    return w


def _gin_with_import(tmp_path):
    (tmp_path / "evil.gin").write_text(f"include '{REPO / 'configs/tiny.gin'}'\nimport os\n")
    return tmp_path / "evil.gin"


def _unwritable(tmp_path, inputs):
    (tmp_path / "a_file").write_text("not a directory")
    return tmp_path / "a_file" / "work"


def _preprocess(lines: bytes | None, tokenizer="tokenizer", out_exists=False):
    def build(tmp_path, inputs):
        src = tmp_path / "docs.jsonl"
        if lines is not None:
            src.write_bytes(lines)
        out = tmp_path / "out"
        if out_exists:
            out.mkdir()
            (out / "keep.txt").write_text("mine")
        tok = inputs[tokenizer] if tokenizer in inputs else str(tmp_path / "docs.jsonl")
        return ["preprocess", "--input", str(src), "--tokenizer", tok, "--out", str(out), "--workers", "1",
                "--no-progress"]
    return build


def _hf_variant(kind):
    def build(tmp_path, inputs):
        d = tmp_path / "src"
        shutil.copytree(inputs["hf"], d)
        shard = sorted(d.glob("*.safetensors"))[0]
        if kind == "truncated":
            shard.write_bytes(shard.read_bytes()[:-100])
        elif kind == "no_weights":
            for p in d.glob("*.safetensors*"):
                p.unlink()
        elif kind == "no_config":
            (d / "config.json").unlink()
        elif kind == "shape":
            cfg = json.loads((d / "config.json").read_text())
            cfg["intermediate_size"] = 96
            (d / "config.json").write_text(json.dumps(cfg))
        return ["import", "--from", "hf", str(d), "--out", str(tmp_path / "out")]
    return build


def _meta_pickle(tmp_path, inputs):
    import torch

    d = tmp_path / "src"
    d.mkdir()
    (d / "params.json").write_text(json.dumps({"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1,
                                               "vocab_size": 1024, "norm_eps": 1e-5}))

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    torch.save({"x": Evil()}, d / "consolidated.00.pth")
    return ["import", "--from", "meta", str(d), "--out", str(tmp_path / "out")]


def _export(step=None, out_exists=False):
    def build(tmp_path, inputs):
        out = tmp_path / "out"
        if out_exists:
            out.mkdir()
            (out / "keep.txt").write_text("mine")
        return ["export", str(inputs["ckpt"]), "--to", "hf", "--out", str(out),
                *(["--step", str(step)] if step is not None else [])]
    return build


def _mcq(task="medqa", data="medqa", shots=0, tokenizer=None):
    def build(tmp_path, inputs):
        path = inputs.get(data)
        if data == "bad_json":
            path = tmp_path / "exam.jsonl"
            path.write_text(inputs["medqa"].read_text().splitlines()[0] + "\n{not json\n")
        return ["eval", "mcq", "--checkpoint", str(inputs["ckpt"]), "--task", task, "--data", str(path),
                "--shots", str(shots), "--seeds", "1", "--out", str(tmp_path / "out.json"), "--no-progress",
                *(["--tokenizer", inputs[tokenizer]] if tokenizer else [])]
    return build


def _ppl_not_preprocessed(tmp_path, inputs):
    (tmp_path / "raw").mkdir()
    return ["eval", "ppl", "--checkpoint", str(inputs["ckpt"]), "--data", str(tmp_path / "raw"),
            "--out", str(tmp_path / "out.json")]


CASES = {
    # train: configuration (before any compile or write)
    "train_unknown_gin_name": (_train("train.stepz=3"), ["stepz"]),
    "train_unknown_preset": (_train("model.preset='llama9'"), ["llama9"]),
    "train_gin_file_imports_code": (lambda t, i: ["train", "--gin_file", str(_gin_with_import(t)), "--workdir",
                                                  str(_workdir(t, i))], ["evil.gin line 2", "import os"]),
    "train_missing_gin_file": (lambda t, i: ["train", "--gin_file", "configs/nope.gin", "--workdir",
                                             str(_workdir(t, i))], ["nope.gin"]),
    "train_mesh_vs_devices": (_train("mesh.data=3"), ["data=3", "8"]),
    "train_batch_divisibility": (_train("train.global_batch_size=12"), ["12", "micro_batch_size 1"]),
    "train_heads_vs_tensor": (_train("mesh.data=2", "mesh.tensor=4"), ["num_kv_heads 2", "mesh.tensor 4"]),
    "train_stage_vs_layers": (_train("mesh.data=1", "mesh.stage=8"), ["num_layers 4", "mesh.stage 8"]),
    "train_zero_steps": (_train("train.steps=0"), ["train.steps"]),
    "train_seq_len_vs_positions": (_train("train.seq_len=100000"), ["100000"]),
    # train: data and tokenizer
    "train_tokenizer_vs_model_vocab": (_train("model.vocab_size=512"), ["1024", "512"]),
    "train_manifest_fingerprint": (lambda t, i: _train(f"data.tokenizer='{i['other_tokenizer']}'")(t, i),
                                   ["guidelines", "other.model"]),
    "train_negative_weight": (_train("data.weights={'guidelines': -1.0, 'replay': 1.0}"), ["guidelines"]),
    "train_zero_weights": (_train("data.weights={'guidelines': 0.0, 'replay': 0.0}"), ["weight"]),
    # train: checkpoints and workdir
    "train_resume_shape_mismatch": (_train(workdir=_workdir_with_ckpt), ["shape", "checkpoints/3"]),
    "train_init_from_mismatch": (lambda t, i: _train(f"train.init_from='{i['ckpt']}'")(t, i),
                                 ["train.init_from", "hidden_size = 32"]),
    "train_unwritable_workdir": (_train(workdir=_unwritable), ["a_file/work", "not writable"]),
    "train_insufficient_disk": (_train(), ["1.0 MiB free", "one checkpoint needs"]),
    "train_coordinator_without_id": (_train(args=["--coordinator_address", "localhost:1", "--num_processes", "2"]),
                                     ["--process_id"]),
    # preprocess
    "preprocess_malformed_json": (_preprocess(b'{"text": "a"}\n{"text": \n'), ["docs.jsonl:2", "malformed JSON"]),
    "preprocess_missing_text_key": (_preprocess(b'{"body": "a"}\n'), ["docs.jsonl:1", "'text'"]),
    "preprocess_not_utf8": (_preprocess(b'{"text": "caf\xe9"}\n'), ["docs.jsonl:1", "UTF-8"]),
    "preprocess_empty_input": (_preprocess(b""), ["docs.jsonl"]),
    "preprocess_missing_input": (_preprocess(None), ["docs.jsonl", "does not exist"]),
    "preprocess_tokenizer_not_sentencepiece": (_preprocess(b'{"text": "a"}\n', tokenizer="not-a-model"),
                                               ["docs.jsonl"]),
    "preprocess_output_exists": (_preprocess(b'{"text": "a"}\n', out_exists=True), ["out", "exists"]),
    # import / export
    "import_missing_source": (lambda t, i: ["import", "--from", "hf", str(t / "nowhere"), "--out", str(t / "out")],
                              ["nowhere"]),
    "import_no_config_json": (_hf_variant("no_config"), ["config.json"]),
    "import_no_weights": (_hf_variant("no_weights"), ["src"]),
    "import_truncated_safetensors": (_hf_variant("truncated"), ["safetensors"]),
    "import_shapes_vs_config": (_hf_variant("shape"), ["shape"]),
    "import_pickle_code_refused": (_meta_pickle, ["consolidated.00.pth", "weights_only"]),
    "export_missing_step": (_export(step=5), ["step 5"]),
    "export_output_exists": (_export(out_exists=True), ["out"]),
    # eval
    "eval_unknown_task": (_mcq(task="usmle9"), ["usmle9"]),
    "eval_bad_record": (_mcq(data="bad_json"), ["exam.jsonl line 2"]),
    "eval_more_shots_than_pool": (_mcq(shots=5), ["--shots 5"]),
    "eval_tokenizer_vs_checkpoint_vocab": (_mcq(tokenizer="big_tokenizer"), ["1025", "1024"]),
    "eval_ppl_not_preprocessed": (_ppl_not_preprocessed, ["raw"]),
}


_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ [IW] ")  # meditron_jax.console's INFO/WARNING lines


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tmp_path, inputs, capfd, monkeypatch):
    build, words = CASES[case]
    argv = build(tmp_path, inputs)
    if case == "train_insufficient_disk":  # a full disk, as the OS reports it
        real = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage",
                            lambda p: real(p)._replace(free=1 << 20))
    before_tmp, before_inputs = _snapshot(tmp_path), _snapshot(inputs["root"])
    capfd.readouterr()
    rc = main(argv)
    err = capfd.readouterr().err
    # warnings may precede the error (e.g. eval: a tokenizer other than the recorded one)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("WARNING:absl", "W0", "I0"))
             and not ln.startswith("warning:") and not _LOG_LINE.match(ln)]  # console progress lines
    print(f"[{case}] rc={rc} {lines}")
    assert rc == 2, err
    assert len(lines) == 1 and ": error: " in lines[0], err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    # nothing that existed changed; nothing new looks like a finished output
    after = _snapshot(tmp_path)
    assert {k: after.get(k) for k in before_tmp} == before_tmp
    assert _snapshot(inputs["root"]) == before_inputs
    new = set(after) - set(before_tmp)
    assert not [p for p in new if p.endswith(("manifest.json", "commit_success.txt", "config.json",
                                              "metrics.jsonl", "config.gin", "out.json"))], new
    assert not (tmp_path / "pwned").exists()


def test_unreachable_coordinator_fails_in_bounded_time(tmp_path):
    """A coordinator that never answers: one line, exit 2, within --init_timeout_s (+ start-up)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "meditron_jax", "train", "--gin_file", "configs/tiny.gin",
                          "--workdir", str(tmp_path / "w"), "--coordinator_address", "localhost:1",
                          "--num_processes", "2", "--process_id", "1", "--init_timeout_s", "3"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - t0
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "cannot reach the coordinator localhost:1" in lines[0]
    assert not (tmp_path / "w").exists()
    print(f"unreachable coordinator: exit 2 after {elapsed:.1f} s (init timeout 3 s)")


def test_no_code_execution_when_loading():
    """Safe loading, checked on the source: no pickle / marshal / eval / exec, torch.load only with
    weights_only=True, numpy loads without allow_pickle, yaml only with a safe loader."""
    import ast

    problems = []
    for path in sorted((REPO / "meditron_jax").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "cPickle", "dill", "marshal", "shelve") for n in names):
                    problems.append(f"{path.name}:{node.lineno} imports {names}")
            if not isinstance(node, ast.Call):
                continue
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            owner = getattr(fn.value, "id", "") if isinstance(fn, ast.Attribute) else ""
            kw = {k.arg: k.value for k in node.keywords}
            const = lambda k: isinstance(kw.get(k), ast.Constant) and kw[k].value  # noqa: E731
            if isinstance(fn, ast.Name) and name in ("eval", "exec", "compile", "__import__"):
                problems.append(f"{path.name}:{node.lineno} calls {name}()")
            if owner == "torch" and name == "load" and const("weights_only") is not True:
                problems.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
            if owner in ("np", "numpy") and name == "load" and const("allow_pickle"):
                problems.append(f"{path.name}:{node.lineno} np.load(allow_pickle=True)")
            if owner == "yaml" and name in ("load", "unsafe_load", "full_load"):
                problems.append(f"{path.name}:{node.lineno} yaml.{name}")
    assert not problems, problems
