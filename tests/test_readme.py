"""The README's shell blocks run as written, at toy scale: a doc change that breaks a documented
command breaks this test.

Every ```bash block of README.md is split into commands (backslash continuations joined,
comments dropped, `&&` chains split). The commands themselves are not edited; these documented
substitutions make them run here, in a temporary directory that stands for the checkout's root
(its `configs/` is a link to the repository's):

- `meditron-jax ...` runs as `python -m meditron_jax ...` (this checkout's code);
- `pip install ...`, `python -m pytest` (the suite itself) and `sbatch ...` (needs SLURM) are
  skipped;
- the main job trains `train.steps=20` steps instead of 150 (`--gin_param` appended);
- the own-corpus recipe: `/models/Llama-2-7b-hf` is a tiny Hugging Face Llama made here with
  `transformers` (vocab 1024, the demo tokenizer's, copied in as its `tokenizer.model`: it
  stands in for Llama-2's 32000), the absolute `/models/`, `/ckpt/`, `/data/`, `/runs/` paths
  live under the temporary directory, `guidelines/*.jsonl` is 200 demo documents, the
  "... same for" comment is run for the other three GAP-Replay sources, `--workers 32` is
  `--workers 1` and `--devices 64` is `--devices 8`;
- `configs/meditron_7b.gin` is that file with the recipe's scale lines swapped for toy ones:
  mesh `single`, seq 64, micro batch 1, global batch 8, 3 steps; `model.preset` becomes
  `model.vocab_size = 1041` (1024 + Meditron's 17 added tokens, as 32000 + 17 = 32017), since
  the architecture comes from the (tiny) checkpoint; where the README plans before any download
  (`train.init_from=None`, so the preset is the architecture) `model.preset='tiny'` is appended.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 1024  # demo tokenizer
SOURCES = ("guidelines", "pubmed_abstracts", "pubmed_papers", "redpajama_replay")


def readme_commands() -> list[str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            cmds += [c.strip() for c in line.split("&&")]
    return cmds


def toy_gin(tmp) -> str:
    """configs/meditron_7b.gin with the documented toy-scale line substitutions."""
    text = open(os.path.join(ROOT, "configs", "meditron_7b.gin")).read()
    subs = [(r"include 'configs/mesh/meditron_7b.gin'", "include 'configs/mesh/single.gin'"),
            (r"(?m)^model\.preset = .*$", f"model.vocab_size = {V + 17}"),
            (r"(?m)^train\.seq_len = .*$", "train.seq_len = 64"),
            (r"(?m)^train\.micro_batch_size = .*$", "train.micro_batch_size = 1"),
            (r"(?m)^train\.global_batch_size = .*$", "train.global_batch_size = 8"),
            (r"(?m)^train\.steps = .*$", "train.steps = 3\ntrain.progress = False"),
            (r"(?m)^train\.checkpoint_every = .*$", "train.checkpoint_every = 3")]
    for pat, rep in subs:
        text, n = re.subn(pat, rep, text)
        assert n == 1, f"configs/meditron_7b.gin no longer has a line matching {pat!r}"
    gap = open(os.path.join(ROOT, "configs", "gap_replay.gin")).read().replace("'/data/", f"'{tmp}/data/")
    (tmp / "gap_replay_toy.gin").write_text(gap)
    text = text.replace("include 'configs/gap_replay.gin'", f"include '{tmp}/gap_replay_toy.gin'")
    path = tmp / "meditron_7b_toy.gin"
    path.write_text(text)
    return str(path)


def substitute(cmd: str, tmp, gin: str) -> list[str]:
    """The documented substitutions; [] for a skipped command. May expand to several commands."""
    if cmd.startswith(("pip install", "python -m pytest", "sbatch")):
        return []
    assert cmd.startswith("meditron-jax "), f"README command not covered by the test: {cmd}"
    cmd = cmd.replace("meditron-jax ", f"{shlex.quote(sys.executable)} -m meditron_jax ", 1)
    for prefix in ("/models/", "/ckpt/", "/data/", "/runs/"):
        cmd = cmd.replace(f" {prefix}", f" {tmp}{prefix}").replace(f"'{prefix}", f"'{tmp}{prefix}")
    cmd = cmd.replace("configs/meditron_7b.gin", gin).replace("--workers 32", "--workers 1")
    cmd = cmd.replace("--devices 64", "--devices 8")
    if " train " in cmd and "configs/tiny.gin" in cmd:
        cmd += " --gin_param train.steps=20"
    if " plan " in cmd and "train.init_from=None" in cmd:  # no checkpoint: the preset is the architecture
        cmd += " --gin_param \"model.preset='tiny'\""
    if " preprocess " in cmd and "guidelines" in cmd:  # "... same for pubmed_abstracts, ..."
        return [cmd.replace("guidelines", s) for s in SOURCES]
    return [cmd]


@pytest.fixture(scope="module")
def toy_llama(tmp_path_factory, demo_data):
    from meditron_jax.models.config import LlamaConfig
    from tests.hf_helpers import make_hf_model

    tmp = tmp_path_factory.mktemp("readme")
    os.symlink(os.path.join(ROOT, "configs"), tmp / "configs")  # the README runs from a checkout's root
    hf = tmp / "models" / "Llama-2-7b-hf"
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=4, max_position_embeddings=256)
    make_hf_model(cfg, seed=5).save_pretrained(hf)
    shutil.copy(demo_data / "tokenizer.model", hf / "tokenizer.model")
    corpus = tmp / "guidelines"  # the same 200 demo documents stand in for each source
    lines = open(demo_data / "raw" / "guidelines.jsonl").read().splitlines()[:200]
    for s in SOURCES:
        (tmp / s).mkdir()
        (tmp / s / "docs.jsonl").write_text("\n".join(lines) + "\n")
    assert corpus.is_dir()
    return tmp


@pytest.mark.slow
def test_readme_shell_blocks_run(toy_llama):
    tmp = toy_llama
    gin = toy_gin(tmp)
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    # a user's machine: one CPU device (the suite's 8 simulated ones are for the suite); the
    # session's compilation cache comes with the environment (tests/conftest.py)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    ran, outputs = [], {}
    for cmd in readme_commands():
        for c in substitute(cmd, tmp, gin):
            r = subprocess.run(["bash", "-c", c], cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, f"{c}\nexit {r.returncode}\n{r.stderr[-3000:]}"
            sub = c.split(" -m meditron_jax ", 1)[1].split()[0]
            ran.append(sub)
            outputs.setdefault(sub, []).append(r)
    assert {"train", "export", "generate", "eval", "import", "preprocess", "plan"} <= set(ran), ran
    # what the blocks claim: the main job's export loads in transformers, generate prints a
    # completion, eval ppl a perplexity; the recipe grew the vocab by the 17 added tokens
    ppl = json.loads(outputs["eval"][0].stdout.strip().splitlines()[-1])
    assert ppl["perplexity"] > 1 and ppl["tokens"] > 0
    assert outputs["generate"][0].stdout.startswith("Clinical guideline: atrial fibrillation.")
    assert len(outputs["generate"][0].stdout.strip()) > len("Clinical guideline: atrial fibrillation.")
    recipe_train = outputs["train"][1].stderr
    assert f"vocab {V} -> {V + 17}" in recipe_train
    import transformers
    out = tmp / "models" / "meditron-7b-jax"
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    assert auto.convert_tokens_to_ids("[/formula]") == V + 16 and auto.convert_tokens_to_ids("<CLS>") == V
    assert json.load(open(out / "config.json"))["vocab_size"] == V + 17
    transformers.AutoModelForCausalLM.from_pretrained(str(tmp / "runs" / "tiny" / "hf"))
