"""Every .gin file in configs/ parses (with all of the project's configurables registered)."""

import glob
import importlib
import os

import gin
import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
GIN_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.gin"), recursive=True))


def register_all():
    import meditron_jax.models.config  # noqa: F401
    import meditron_jax.distributed.sharding  # noqa: F401
    for mod in ("meditron_jax.training.train", "meditron_jax.training.optimizer", "meditron_jax.data.loader",
                "meditron_jax.training.pipeline", "meditron_jax.storage.checkpoint", "meditron_jax.training.metrics"):
        importlib.import_module(mod)  # every one has landed: a missing one is an error


@pytest.mark.parametrize("path", GIN_FILES, ids=[os.path.relpath(p, ROOT) for p in GIN_FILES])
def test_gin_file_parses(path):
    register_all()
    gin.clear_config()
    gin.add_config_file_search_path(ROOT)
    with gin.config_scope(None):
        gin.parse_config_files_and_bindings([path], [], skip_unknown=False, finalize_config=False)
    gin.clear_config()


def test_recipe_values_are_the_contract():
    register_all()
    gin.clear_config()
    gin.add_config_file_search_path(ROOT)
    gin.parse_config_files_and_bindings([os.path.join(ROOT, "configs", "meditron_7b.gin")], [], finalize_config=False)
    assert gin.query_parameter("optimizer.lr") == 3e-4
    assert gin.query_parameter("optimizer.min_lr") == 1e-6
    assert (gin.query_parameter("optimizer.b1"), gin.query_parameter("optimizer.b2")) == (0.9, 0.95)
    assert gin.query_parameter("optimizer.eps") == 1e-5 and gin.query_parameter("optimizer.weight_decay") == 0.1
    assert gin.query_parameter("optimizer.clip") == 1.0 and gin.query_parameter("optimizer.warmup_steps") == 2000
    assert gin.query_parameter("train.seq_len") == 2048
    assert gin.query_parameter("train.micro_batch_size") == 10
    assert gin.query_parameter("train.global_batch_size") == 1600
    assert gin.query_parameter("mesh.tensor") == 4 and gin.query_parameter("model.preset") == "meditron_7b"
    assert len(gin.query_parameter("data.sources")) == 4
    gin.clear_config()
    gin.parse_config_files_and_bindings([os.path.join(ROOT, "configs", "meditron_70b.gin")], [], finalize_config=False)
    assert gin.query_parameter("optimizer.lr") == 1.5e-4 and gin.query_parameter("train.seq_len") == 4096
    assert (gin.query_parameter("train.micro_batch_size"), gin.query_parameter("train.global_batch_size")) == (2, 512)
    assert (gin.query_parameter("mesh.tensor"), gin.query_parameter("mesh.stage")) == (8, 8)
    gin.clear_config()
