"""Operator experience (issue 18): console lines in log files, config checks and `config`, the
workdir lock, self-contained checkpoints, `checkpoints`, `--resume_step`, the profiler trace.

One tiny run (a subprocess whose stderr is a file, as under SLURM) is shared by most tests; it
uses the demo corpus with `model.vocab_size=1024`, the demo tokenizer's size, so that eval and
generate accept the checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from meditron_jax.storage import checkpoint as ckpt
from meditron_jax.cli import main
from tests.conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.gin")
FAST = ["model.vocab_size=1024", "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=1",
        "train.log_every=1", "train.eval_every=2", "train.eval_batches=1", "train.checkpoint_every=2",
        "train.tensorboard=False", "optimizer.warmup_steps=2", "optimizer.decay_steps=6", "mesh.data=-1"]
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ [IWE] ")


def _argv(workdir, *params, args=()):
    argv = ["train", "--gin_file", TINY, "--workdir", str(workdir), *args]
    for p in [*FAST, *params]:
        argv += ["--gin_param", p]
    return argv


def _env(devices=8):
    return subprocess_env(devices)


def _new_workdir(root: Path, demo: Path) -> Path:
    root.mkdir(parents=True)
    shutil.copytree(demo, root / "demo_data")  # a copy: tests delete its tokenizer
    return root


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip() and not LOG_LINE.match(ln)
            and not ln.startswith(("WARNING:", "W0", "I0", "E0", "warning:"))]


@pytest.fixture(scope="module")
def run(tmp_path_factory, demo_data):
    """steps 1-6, checkpoints 2, 4, 6, evals at 2, 4, 6; stderr to a file (not a terminal)."""
    w = _new_workdir(tmp_path_factory.mktemp("op") / "run", demo_data)
    log = w.parent / "stderr.txt"
    with open(log, "w") as err:
        rc = subprocess.run([sys.executable, "-m", "meditron_jax", *_argv(w, "train.steps=6",
                                                                        "train.profile_steps=(3, 4)")],
                            cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=err, timeout=600).returncode
    assert rc == 0, log.read_text()[-3000:]
    return w, log.read_bytes().decode()  # bytes: read_text would turn a bar's \r into \n


# -- console ------------------------------------------------------------------------------------------

def test_log_lines_without_a_terminal(run):
    w, err = run
    assert "\r" not in err  # no tqdm bar: stderr is a file
    lines = [ln for ln in err.splitlines() if LOG_LINE.match(ln)]
    text = "\n".join(lines)
    for s in range(1, 7):
        assert re.search(rf" I step {s}/6 loss \d+\.\d{{4}} lr \S+ gnorm \S+", text), (s, text)
    assert re.search(r"step 6/6 .* tok/s \d+ eta 0s", text), text
    for words in ("building data", "compiling the train step", "saved checkpoint 2", "saved checkpoint 6",
                  "eval step 4: loss", "profiling steps 3-4"):
        assert words in text, (words, text)
    assert re.search(r"compiled \(\d+\.\d s\)", text)
    done = [ln for ln in lines if " done: " in ln]
    assert len(done) == 1 and "step 6/6" in done[0] and "eval loss" in done[0] and "1,536 tokens" in done[0]
    assert str(w / "checkpoints" / "6") in done[0]
    # no Python-side absl / Orbax chatter (glog-style lines from .py files, or absl's own prefix);
    # C++ messages of an installed accelerator plugin (cudart_stub.cc, ...) are not ours to mute
    chatter = re.compile(r"^([IWE]\d{4} .*\.py:\d+\]|(INFO|WARNING):absl:)")
    assert not [ln for ln in err.splitlines() if chatter.match(ln) or "orbax" in ln.lower()], err


def test_progress_bar_only_on_a_terminal():
    from meditron_jax.console import progress_enabled

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert progress_enabled(True, Tty()) and not progress_enabled(False, Tty())
    assert not progress_enabled(True, io.StringIO())


def test_metrics_records_time_and_tokens(run):
    w, _ = run
    recs = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["tokens"] for r in steps] == [256 * s for s in range(1, 7)]
    assert all(r["time"].endswith("+00:00") for r in recs)
    elapsed = [r["elapsed_s"] for r in recs]
    assert elapsed == sorted(elapsed) and elapsed[0] >= 0


# -- config checks and `config` -----------------------------------------------------------------------
BAD = {  # binding -> words the one error line must hold
    "train.steps='ten'": ["train.steps", "'ten'", "integer"],
    "optimizer.lr='3e-4'": ["optimizer.lr", "'3e-4'", "number", "drop the quotes"],
    "mesh.tensor='2'": ["mesh.tensor", "'2'", "integer", "drop the quotes"],
    "train.micro_batch_size=0": ["train.micro_batch_size", "0", ">= 1"],
    "train.checkpoint_every=0": ["train.checkpoint_every", ">= 1"],
    "train.log_every=0": ["train.log_every", ">= 1"],
    "train.steps=1.5": ["train.steps", "1.5", "integer"],
    "data.tokenizer=/tmp/x.model": ["quotes", "data.tokenizer='/tmp/x.model'"],
    "trian.steps=3": ["'trian'", "did you mean 'train'"],
    "train.stpes=3": ["train.stpes", "did you mean 'train.steps'"],
    "sharding.zero1=1": ["sharding.zero1", "True or False"],
    "data.added_tokens=[1]": ["data.added_tokens", "string"],
    "train.profile_steps=(4, 2)": ["train.profile_steps", "first <= last"],
}


@pytest.mark.parametrize("binding", list(BAD))
def test_bad_value_is_one_line(binding, tmp_path, capfd):
    w = tmp_path / "w"
    capfd.readouterr()
    rc = main(_argv(w, "train.steps=2", binding))
    err = capfd.readouterr().err
    lines = _error_lines(err)
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("meditron-jax train: error: ")
    for word in BAD[binding]:
        assert word in lines[0], (word, lines[0])
    assert not w.exists()  # nothing written


def test_config_prints_defaults_without_compiling(tmp_path, capfd, monkeypatch):
    import jax

    import meditron_jax.data.loader as data_pipeline
    import meditron_jax.training.state as state_mod

    def refuse(*a, **k):
        raise AssertionError("config must not build data or compile")

    monkeypatch.setattr(data_pipeline, "build_pipeline", refuse)
    monkeypatch.setattr(state_mod, "jit_train_step", refuse)
    monkeypatch.setattr(jax.stages.Lowered, "compile", refuse)
    monkeypatch.chdir(tmp_path)  # the shipped configs are found from anywhere (and their includes)
    capfd.readouterr()
    t0 = time.perf_counter()
    assert main(["config", "--gin_file", "configs/tiny.gin", "--gin_param", "train.steps=7", "--devices", "1"]) == 0
    elapsed = time.perf_counter() - t0
    out, err = capfd.readouterr()
    for line in ("train.steps = 7", "train.log_every = 10", "checkpoint.keep = 3", "optimizer.decay_steps = None",
                 "mesh.tensor = 1", "data.demo = True", "pipeline.repeats = 1", "sharding.zero1 = False"):
        assert line in out.splitlines(), (line, out)
    assert "Path not found" not in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []
    assert elapsed < 30, elapsed
    assert main(["config", "--gin_file", "configs/tiny.gin", "--gin_param", "train.steps='ten'"]) == 2


def test_gin_search_path(tmp_path, capfd, monkeypatch):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "exp.gin").write_text("include 'configs/tiny.gin'\ntrain.steps = 3\n")
    monkeypatch.chdir(tmp_path)
    assert main(["config", "--gin_file", "exp2.gin"]) == 2
    assert "--gin_search_path" in capfd.readouterr().err
    assert main(["config", "--gin-search-path", "mine", "--gin_file", "exp.gin", "--devices", "1"]) == 0
    assert "train.steps = 3" in capfd.readouterr().out.splitlines()


# -- the workdir lock ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_second_run_refuses_and_first_is_untouched(tmp_path, demo_data, capfd):
    w = _new_workdir(tmp_path / "w", demo_data)
    log = tmp_path / "first.txt"
    with open(log, "w") as err:
        first = subprocess.Popen([sys.executable, "-m", "meditron_jax", *_argv(w, "train.steps=1000")],
                                 cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 300
        while not ckpt.complete_steps(str(w / "checkpoints")):
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        first.send_signal(signal.SIGSTOP)  # freeze it: its files must not change while the second tries
        time.sleep(0.5)
        before = {p: p.read_bytes() for p in w.rglob("*") if p.is_file()}
        capfd.readouterr()
        rc = main(_argv(w, "train.steps=1000"))
        err = capfd.readouterr().err
        lines = _error_lines(err)
        assert rc == 2 and len(lines) == 1, err
        assert "in use by another run" in lines[0] and f"pid {first.pid}" in lines[0], lines[0]
        assert {p: p.read_bytes() for p in w.rglob("*") if p.is_file()} == before
    finally:
        first.kill()
        first.wait()
    # the first run died without releasing its lock: the next run takes it over, with a warning
    rc = main(_argv(w, "train.steps=2"))
    err = capfd.readouterr().err
    assert rc == 0, err
    assert re.search(rf"W taking over the stale lock .*pid {first.pid} .* is not running", err), err
    assert not (w / "run.lock").exists()


def test_stale_and_live_locks(tmp_path):
    from meditron_jax.storage.workdir import RunLock, WorkdirLocked

    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "run.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid,
                                                   "heartbeat": time.time(), "token": "x"}))
    lock = RunLock(str(tmp_path)).acquire()  # dead pid on this host
    with pytest.raises(WorkdirLocked, match="in use by another run"):
        RunLock(str(tmp_path)).acquire()  # held, live
    lock.release()
    assert not (tmp_path / "run.lock").exists()
    other = {"host": "elsewhere", "pid": 1, "token": "y", "started": "then"}
    (tmp_path / "run.lock").write_text(json.dumps({**other, "heartbeat": time.time()}))
    with pytest.raises(WorkdirLocked, match="host elsewhere pid 1"):
        RunLock(str(tmp_path)).acquire()  # another host, fresh heartbeat
    (tmp_path / "run.lock").write_text(json.dumps({**other, "heartbeat": time.time() - 3600}))
    RunLock(str(tmp_path), stale_after_s=600).acquire().release()  # another host, no heartbeat for 1 h


def test_heartbeat_keeps_the_lock_fresh(tmp_path):
    from meditron_jax.storage.workdir import RunLock

    lock = RunLock(str(tmp_path), heartbeat_s=0.05).acquire()
    first = json.loads((tmp_path / "run.lock").read_text())["heartbeat"]
    time.sleep(0.3)
    assert json.loads((tmp_path / "run.lock").read_text())["heartbeat"] > first
    lock.release()


# -- self-contained checkpoints, listing, resuming from a step ----------------------------------------

def test_checkpoints_lists(run, capfd):
    w, _ = run
    recs = {r["step"]: r["loss"] for r in map(json.loads, (w / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}
    capfd.readouterr()
    assert main(["checkpoints", str(w)]) == 0
    rows = [ln.split() for ln in capfd.readouterr().out.splitlines()[1:]]
    assert [int(r[0]) for r in rows] == [2, 4, 6]
    for r in rows:
        assert float(r[5]) == pytest.approx(recs[int(r[0])], abs=1e-4) and r[6] == "ok"
        assert re.match(r"\d{4}-\d\d-\d\d", r[1]) and r[4] == "MiB"
    assert main(["checkpoints", str(w / "nope")]) == 2


def test_export_eval_generate_without_the_tokenizer_file(run, tmp_path, monkeypatch, capfd):
    w, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(w, copy, ignore=shutil.ignore_patterns("profile"))
    original = (w / "demo_data" / "tokenizer.model").read_bytes()
    meta = json.loads((copy / "checkpoints" / "4" / "meta" / "metadata").read_text())
    assert os.path.isabs(meta["tokenizer"]["path"]) and meta["tokenizer"]["model_b64"]
    # the recorded file is gone (the copy records the original run's path: point it at a missing one)
    for step in (2, 4, 6):
        p = copy / "checkpoints" / str(step) / "meta" / "metadata"
        m = json.loads(p.read_text())
        m["tokenizer"]["path"] = str(tmp_path / "deleted" / "tokenizer.model")
        p.write_text(json.dumps(m))
    monkeypatch.setenv("MEDITRON_JAX_CACHE", str(tmp_path / "cache"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capfd.readouterr()
    assert main(["export", str(copy), "--step", "4", "--to", "hf", "--out", "hf", "--dtype", "float32"]) == 0
    out = capfd.readouterr().out
    assert f"exported step 4 of {copy / 'checkpoints'}" in out, out
    assert (elsewhere / "hf" / "tokenizer.model").read_bytes() == original
    assert json.loads((elsewhere / "hf" / "meditron_jax_export.json").read_text())["step"] == 4
    assert main(["generate", "--checkpoint", str(copy), "--prompt", "The patient", "--max-new-tokens", "2"]) == 0
    assert main(["eval", "ppl", "--checkpoint", str(copy), "--data", str(w / "demo_data" / "replay"),
                 "--max-batches", "1", "--batch-size", "2", "--seq-len", "32"]) == 0
    # a stored tokenizer that does not match its fingerprint is refused, never used
    p = copy / "checkpoints" / "6" / "meta" / "metadata"
    m = json.loads(p.read_text())
    m["tokenizer"]["fingerprint"] = "0" * 64
    p.write_text(json.dumps(m))
    shutil.rmtree(tmp_path / "cache")
    assert main(["export", str(copy), "--to", "hf", "--out", "hf2"]) == 2
    assert "does not match its fingerprint" in capfd.readouterr().err
    assert not (elsewhere / "hf2").exists()


def test_resume_step_is_bitwise(run, tmp_path, capfd):
    w0, _ = run
    w = tmp_path / "w"
    shutil.copytree(w0, w, ignore=shutil.ignore_patterns("profile"))
    before = sorted(p.relative_to(w) for p in w.rglob("*"))
    for params, args, expected in [
            ((), ["--resume_step", "7"], "--resume_step 7: workdir "),
            (("train.resume_step=7",), [], "train.resume_step = 7: workdir "),
            (("train.resume_step=4",), ["--resume_step", "2"], "--resume_step 2 disagrees with train.resume_step = 4"),
            (("train.resume_step=-1",), [], "train.resume_step"),
            (("train.resume_step='2'",), [], "train.resume_step")]:
        assert main(_argv(w, "train.steps=6", *params, args=args)) == 2, (params, args)
        lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and expected in lines[0] and "error" in lines[0], lines
    assert sorted(p.relative_to(w) for p in w.rglob("*")) == before  # refused before anything was written
    assert main(_argv(w, "train.steps=6", "train.resume_step=2")) == 0  # the gin spelling of --resume_step 2
    err = capfd.readouterr().err
    assert f"resumed from step 2 ({w / 'checkpoints' / '2'})" in err, err
    assert err.count("resumed from step") == 1 and "resuming from" not in err, err  # one announcement
    assert sorted(os.listdir(w / "checkpoints_superseded")) == ["4", "6"]
    for step in (4, 6):
        _, again = ckpt.load_params(str(w / "checkpoints" / str(step)))
        _, first = ckpt.load_params(str(w0 / "checkpoints" / str(step)))
        for k in first:
            np.testing.assert_array_equal(again[k], first[k], err_msg=f"step {step} {k}")
    losses = lambda d: [(r["step"], r["loss"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                        if "loss" in r]
    assert losses(w) == losses(w0)


def test_profile_trace_for_the_requested_steps(run):
    w, _ = run
    import gzip

    traces = list((w / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    (trace,) = list((w / "profile").rglob("*.trace.json.gz"))
    calls = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in json.load(gzip.open(trace))["traceEvents"]
                   if e.get("name") == "PjitFunction(train_step)")
    outer, end = 0, -1.0  # top-level calls (each appears with a nested twin)
    for t0, t1 in calls:
        if t0 > end:
            outer, end = outer + 1, t1
    assert outer == 2, calls  # steps 3 and 4, nothing else


# -- the CLI -----------------------------------------------------------------------------------------

def _actions(parser, name):
    import argparse

    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub_name, sub in a.choices.items():
                yield from _actions(sub, f"{name} {sub_name}")
        elif not isinstance(a, argparse._HelpAction):
            yield name, parser, a


def test_every_flag_has_help_and_both_spellings(capfd):
    from meditron_jax.cli import SUBCOMMANDS, build_parser

    missing, spellings = [], 0
    for name in SUBCOMMANDS:
        for where, parser, action in _actions(build_parser(name), name):
            if not action.help:
                missing.append(f"{where} {action.option_strings or action.dest}")
            for opt in action.option_strings:
                if opt.startswith("--") and ("_" in opt or "-" in opt[2:]):
                    alt = "--" + (opt[2:].replace("_", "-") if "_" in opt else opt[2:].replace("-", "_"))
                    assert parser._option_string_actions.get(alt) is action, (where, opt, alt)
                    spellings += 1
    assert not missing, missing
    assert spellings > 40
    assert main(["--version"]) == 0
    import meditron_jax
    assert capfd.readouterr().out.strip() == f"meditron-jax {meditron_jax.__version__}"


def test_workdir_urls():
    from meditron_jax.errors import UserError
    from meditron_jax.storage.workdir import Workdir

    assert Workdir.resolve("/tmp/x").root == "/tmp/x" and Workdir.resolve("file:///tmp/x").root == "/tmp/x"
    assert Workdir.resolve("gs://bucket/run/").root == "gs://bucket/run"  # supported (tests/test_remote_storage.py)
    with pytest.raises(UserError, match="s3:// storage is not supported"):
        Workdir.resolve("s3://bucket/run")


def test_remote_workdir_refused_before_anything(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    assert main(_argv("s3://bucket/run", "train.steps=2")) == 2
    assert len(_error_lines(capfd.readouterr().err)) == 1
    assert list(tmp_path.iterdir()) == []  # no local s3:/bucket directory


def test_tensorboard_groups_config_tokens_and_wall_time(tmp_path):
    from meditron_jax.training.metrics import MetricsWriter
    from tests.test_reliability import _tb_events

    w = MetricsWriter(str(tmp_path), total_steps=2, enabled=True, progress=False, console=False,
                      tokens_per_step=256, config_text="train.steps = 2\n")
    w.write(1, {"loss": 3.0})
    w.write(2, {"loss": 2.0, "eval_loss": 2.5, "eval_ppl": 12.0})
    w.close()
    tags = {}
    texts = []
    for ev in _tb_events(tmp_path / "tensorboard"):
        for v in ev.summary.value:
            tags.setdefault(v.tag, {})[ev.step] = v.simple_value
            if v.metadata.plugin_data.plugin_name == "text":
                texts.append(v.tensor.string_val[0].decode())
    assert tags["train/loss"] == {1: 3.0, 2: 2.0} and tags["eval/loss"] == {2: 2.5} and tags["eval/ppl"] == {2: 12.0}
    assert tags["train/tokens"] == {1: 256.0, 2: 512.0}
    assert set(tags["train/elapsed_s"]) == {1, 2}
    assert not [t for t in tags if t.startswith("train/eval")]
    assert any("train.steps = 2" in t for t in texts), texts
