"""Every .gin file in configs/ parses (with all of the project's configurables registered)."""

import glob
import os

import gin
import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
GIN_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.gin"), recursive=True))


def register_all():
    import meditron_jax.config  # noqa: F401
    import meditron_jax.sharding  # noqa: F401
    for mod in ("meditron_jax.train", "meditron_jax.optim", "meditron_jax.data.pipeline",
                "meditron_jax.pipeline", "meditron_jax.checkpoint", "meditron_jax.metrics"):
        try:
            __import__(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


@pytest.mark.parametrize("path", GIN_FILES, ids=[os.path.relpath(p, ROOT) for p in GIN_FILES])
def test_gin_file_parses(path):
    register_all()
    gin.clear_config()
    with gin.config_scope(None):
        gin.parse_config_files_and_bindings([path], [], skip_unknown=False, finalize_config=False)
    gin.clear_config()
