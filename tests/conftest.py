"""Test setup: 8 simulated CPU devices so meshes like (data 2, stage 2, tensor 2) are real."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Compiled functions are cached on disk between test runs on the same machine.
jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The built-in demo corpus, built once per test session."""
    from meditron_jax.data.demo import prepare_demo
    d = tmp_path_factory.mktemp("demo") / "demo_data"
    prepare_demo(d)
    return d


def workdir_with_demo(parent, demo, name="run") -> str:
    """A fresh training workdir whose `demo_data` links to the shared demo corpus."""
    w = parent / name
    w.mkdir()
    os.symlink(demo, w / "demo_data")
    return str(w)


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """The demo corpus without its raw JSONL (only what training reads), built once per session:
    for workdirs that the multi-process and reliability tests link and copy many times."""
    import shutil

    from meditron_jax.data.demo import prepare_demo
    d = tmp_path_factory.mktemp("demo_shards") / "demo_data"
    prepare_demo(d)
    shutil.rmtree(d / "raw")
    return d
