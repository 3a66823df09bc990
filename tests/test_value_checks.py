"""Values that make training meaningless are refused when gin is parsed, before the cluster is
joined or anything is built, in one line naming the value and its valid range (config/checks.py:
`Range` and `NotAllZero` annotations on the configurables; a bound may name another value).
A warmup longer than the run is a warning (a short smoke run of a real config is legitimate).
"""

from __future__ import annotations

import logging
from pathlib import Path

import gin
import jax
import pytest

from meditron_jax.config.checks import ConfigError
from meditron_jax.errors import UserError
from meditron_jax.training.config import parse_gin

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/tiny.gin")


@pytest.fixture(autouse=True)
def _clear_gin():
    gin.clear_config()
    yield
    gin.clear_config()


REFUSED = [  # binding -> the one line (tiny.gin: lr 3e-3, steps 150)
    ("optimizer.b2=1.5", "optimizer.b2 = 1.5: expected a number in [0, 1)"),
    ("optimizer.b2=1.0", "optimizer.b2 = 1.0: expected a number in [0, 1)"),
    ("optimizer.b1=-0.1", "optimizer.b1 = -0.1: expected a number in [0, 1)"),
    ("optimizer.eps=0", "optimizer.eps = 0: expected a number > 0"),
    ("optimizer.lr=-3e-4", "optimizer.lr = -0.0003: expected a number > 0"),
    ("optimizer.clip=0", "optimizer.clip = 0: expected a number > 0"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay = -0.1: expected a number >= 0"),
    ("optimizer.min_lr=0.01", "optimizer.min_lr = 0.01: expected a number in [0, optimizer.lr (0.003)]"),
    ("optimizer.min_lr_ratio=1.5", "optimizer.min_lr_ratio = 1.5: expected a number in [0, 1]"),
    ("optimizer.decay_steps=0", "optimizer.decay_steps = 0: expected an integer >= 1"),
    ("data.weights={'a': 3, 'b': -1}", "data.weights = {'a': 3, 'b': -1}: expected a dict (a quoted string -> a "
                                       "number) with every value >= 0"),
    ("data.weights={'a': 0, 'b': 0.0}", "with at least one value above 0"),
    ("data.validation_fraction=0.9", "data.validation_fraction = 0.9: expected a number in [0, 0.5]"),
    ("model.num_kv_heads=0", "model.num_kv_heads = 0: expected an integer >= 1"),
    ("model.rms_norm_eps=0.0", "model.rms_norm_eps = 0.0: expected a number > 0"),
    ("model.rope_theta=-1.0", "model.rope_theta = -1.0: expected a number > 0"),
    ("pipeline.microbatches=0", "pipeline.microbatches = 0: expected an integer >= 1"),
    ("checkpoint.keep=0", "checkpoint.keep = 0: expected an integer >= 1"),
    ("train.eval_batches=0", "train.eval_batches = 0: expected an integer >= 1"),
]


@pytest.mark.parametrize("binding,line", REFUSED, ids=[b for b, _ in REFUSED])
def test_meaningless_values_are_one_line(binding, line):
    with pytest.raises(ConfigError) as e:
        parse_gin([TINY], [binding])
    assert line in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("binding", ["optimizer.clip=None", "optimizer.min_lr=0.003", "optimizer.b2=0.999",
                                     "optimizer.weight_decay=0.0", "data.weights={'a': 0, 'b': 1}",
                                     "optimizer.min_lr_ratio=0.1"])
def test_edges_that_make_sense_are_accepted(binding):
    if binding.startswith("optimizer.min_lr_ratio"):
        gin.parse_config("optimizer.min_lr = None")
    parse_gin([TINY], [binding])


def test_a_bound_that_names_another_value_follows_it():
    parse_gin([TINY], ["optimizer.lr=0.02", "optimizer.min_lr=0.01"])  # min_lr <= the lr bound here
    gin.clear_config()
    with pytest.raises(ConfigError, match=r"optimizer.min_lr = 0.01: expected a number in \[0, optimizer.lr \(0.005\)\]"):
        parse_gin([TINY], ["optimizer.lr=0.005", "optimizer.min_lr=0.01"])


def test_warmup_longer_than_the_run_is_a_warning():
    from meditron_jax import console

    lines = []
    handler = logging.Handler()
    handler.emit = lambda r: lines.append((r.levelname, r.getMessage()))
    console.log.addHandler(handler)
    try:
        parse_gin([TINY], ["train.steps=10"])  # tiny.gin: warmup 20
        gin.clear_config()
        parse_gin([TINY], ["train.steps=100"])
    finally:
        console.log.removeHandler(handler)
    assert lines == [("WARNING", "optimizer.warmup_steps = 20: expected an integer <= train.steps (10): the run "
                                 "ends during warmup: the learning rate never reaches optimizer.lr")]


def test_the_default_of_an_unbound_value_is_checked_against_a_bound_one(tmp_path):
    from meditron_jax import console

    cfg = tmp_path / "c.gin"  # no optimizer.* at all: warmup_steps is its default 2000
    cfg.write_text("model.preset = 'tiny'\ndata.demo = True\ntrain.steps = 30\ntrain.seq_len = 64\n"
                   "train.micro_batch_size = 1\ntrain.global_batch_size = 8\n")
    lines = []
    handler = logging.Handler()
    handler.emit = lambda r: lines.append(r.getMessage())
    console.log.addHandler(handler)
    try:
        parse_gin([str(cfg)], [])
    finally:
        console.log.removeHandler(handler)
    assert lines == ["optimizer.warmup_steps = 2000: expected an integer <= train.steps (30): the run ends during "
                     "warmup: the learning rate never reaches optimizer.lr"]


def test_seq_len_past_the_model_context_needs_a_stated_change():
    from meditron_jax.models.config import gin_call
    from meditron_jax.training.config import read_run_config, validate_shapes

    parse_gin([TINY], ["train.seq_len=1024"])  # tiny: context 512
    run = read_run_config(num_devices=1)
    with pytest.raises(UserError) as e:
        validate_shapes(run.train, run.model, run.mesh_sizes, run.pipeline, run.sync)
    assert str(e.value).startswith("train.seq_len = 1024: expected at most the model's context, "
                                   "max_position_embeddings 512 (to train past it, state the change: "
                                   "model.max_position_embeddings = 1024; RoPE theta stays 10000)")
    gin.clear_config()
    parse_gin([TINY], ["train.seq_len=1024", "model.max_position_embeddings=1024"])
    run = read_run_config(num_devices=1)
    validate_shapes(run.train, run.model, run.mesh_sizes, run.pipeline, run.sync)
    assert gin_call(lambda: run.model.max_position_embeddings) == 1024


def test_train_refuses_before_joining_or_writing(tmp_path, monkeypatch, capsys):
    """`optimizer.b2=1.5` from the command line: exit 2, one line, no cluster joined, no workdir."""
    from meditron_jax.cli import main

    called = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: called.append(k))
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "h0,h1")  # a slice: the join would come next
    monkeypatch.setenv("TPU_WORKER_ID", "0")
    w = tmp_path / "w"
    rc = main(["train", "--gin_file", TINY, "--workdir", str(w), "--gin_param", "optimizer.b2=1.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["meditron-jax train: error: optimizer.b2 = 1.5: expected a number in [0, 1)"]
    assert called == [] and not w.exists()
