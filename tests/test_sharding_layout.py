"""The sharding context, the optimizer-state layouts derived from structure, the startup log
of dropped mesh axes / skipped ZeRO-1 splits, and the weight-decay mask from logical axes.
All abstract (eval_shape): nothing is compiled."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from meditron_jax.distributed import sharding
from meditron_jax.distributed import meshes
from meditron_jax.models.config import LlamaConfig
from meditron_jax.models.llama import PARAM_AXES, param_shapes
from meditron_jax.training.optimizer import OptimizerConfig, decay_mask, make_optimizer
from meditron_jax.training.step import init_state

CFG = LlamaConfig(vocab_size=517, hidden_size=48, intermediate_size=112, num_layers=2, num_heads=6,
                  num_kv_heads=2, max_position_embeddings=64)
SIZES = dict(data=2, stage=1, fsdp=2, tensor=2)


def _abstract_state(tx, cfg=CFG):
    params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in param_shapes(cfg).items()}
    return jax.eval_shape(lambda p: init_state(p, tx), params)


def _by_key_name(tree, mesh, rules, zero1):
    """The layout rule before structure: a leaf under a key named like a parameter, of its rank."""
    def leaf(path, x):
        names = [getattr(k, "key", None) for k in path]
        name = next((n for n in reversed(names) if n in PARAM_AXES), None)
        if name is None or len(x.shape) != len(PARAM_AXES[name]):
            return sharding.replicated(mesh)
        s = sharding.sharding_for(PARAM_AXES[name], x.shape, mesh, rules)
        return sharding.zero1_sharding(s, x.shape) if zero1 else s
    return jax.tree_util.tree_map_with_path(leaf, tree)


def _specs(tree):
    return jax.tree.leaves(jax.tree.map(lambda s: s.spec, tree, is_leaf=lambda s: hasattr(s, "spec")))


@pytest.mark.parametrize("zero1", [False, True])
def test_state_layout_from_structure_matches_the_recipe_state(zero1):
    mesh = meshes.make_mesh(SIZES)
    rules = dict(sharding.DEFAULT_RULES)
    tx = make_optimizer(OptimizerConfig(), 100)
    state = _abstract_state(tx)
    got = sharding.tree_shardings(state, PARAM_AXES, mesh, rules, zero1, tx=tx)
    assert jax.tree.structure(got) == jax.tree.structure(state)
    assert _specs(got) == _specs(_by_key_name(state, mesh, rules, zero1))
    mu = got["opt_state"][1][0].mu  # chain(clip, adamw(...)): adam's first moment
    assert mu == got["params"] and got["opt_state"][1][0].nu == got["params"]
    assert got["params"]["q_proj"].spec != P()  # something is sharded at all


def _kept_by_name():
    """An optimizer whose state holds a dict keyed by parameter names that is not a copy of the
    parameters (same ranks, other shapes): a key-name rule lays it out like the params."""
    def init(p):
        if not isinstance(p, dict):  # optax's placeholder while it traces the state's structure
            return {"seen": jnp.zeros(())}
        return {"seen": {k: jnp.zeros((4,) * len(PARAM_AXES[k])) for k in p}}
    return optax.GradientTransformation(init, lambda g, s, p=None: (g, s))


def _row_stats():
    """A parameter-structured state of other shapes (per-row statistics, as factored optimizers
    keep): each leaf's shape differs from its parameter's, so it must not take its layout."""
    def init(p):
        if not isinstance(p, dict):
            return {"rows": p}
        return {"rows": {k: jnp.zeros(v.shape[:-1] + (1,)) for k, v in p.items()}}
    return optax.GradientTransformation(init, lambda g, s, p=None: (g, s))


def test_state_layout_ignores_names_and_follows_the_chain():
    mesh = meshes.make_mesh(SIZES)
    tx = optax.chain(_kept_by_name(), _row_stats(),
                     optax.inject_hyperparams(optax.adam)(learning_rate=1e-3))
    state = _abstract_state(tx)
    got = sharding.tree_shardings(state, PARAM_AXES, mesh, dict(sharding.DEFAULT_RULES), tx=tx)
    assert all(s.spec == P() for s in jax.tree.leaves(got["opt_state"][0]))  # not params: replicated
    assert _by_key_name(state, mesh, dict(sharding.DEFAULT_RULES), False)["opt_state"][0]["seen"]["q_proj"].spec != P()
    assert all(s.spec == P() for s in jax.tree.leaves(got["opt_state"][1]))
    adam = got["opt_state"][2]
    assert adam.inner_state[0].mu == got["params"] == adam.inner_state[0].nu
    assert all(s.spec == P() for s in jax.tree.leaves(adam.hyperparams))


def test_unknown_parameter_is_an_error_not_a_replicate():
    mesh = meshes.make_mesh(SIZES)
    with pytest.raises(ValueError, match="q_proj_renamed"):
        sharding.param_shardings({"q_proj_renamed": jax.ShapeDtypeStruct((2, 48, 6, 8), jnp.float32)},
                                 PARAM_AXES, mesh, sharding.DEFAULT_RULES)


def test_dropped_axes_and_skipped_zero1_logged_once_per_parameter(caplog, monkeypatch):
    odd = LlamaConfig(vocab_size=517, hidden_size=50, intermediate_size=110, num_layers=3, num_heads=5,
                      num_kv_heads=5, max_position_embeddings=64)
    mesh = meshes.make_mesh(dict(data=4, stage=1, fsdp=1, tensor=2))
    tx = make_optimizer(OptimizerConfig(), 100)
    # caplog's handler on the package logger itself, propagation off (as the CLI's console
    # setup leaves it): each record is captured exactly once whatever ran before
    logger = logging.getLogger("meditron_jax")
    monkeypatch.setattr(logger, "propagate", False)
    caplog.set_level(logging.INFO, logger="meditron_jax")
    logger.addHandler(caplog.handler)
    try:
        got = sharding.tree_shardings(_abstract_state(tx, odd), PARAM_AXES, mesh, sharding.DEFAULT_RULES, True,
                                      tx=tx)
    finally:
        logger.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records if r.name == "meditron_jax"]
    dropped = [m.split()[1] for m in lines if "is not split over mesh axis tensor=2" in m]
    skipped = [m.split()[1] for m in lines if "no ZeRO-1 split over data=4" in m]
    shapes, rules = param_shapes(odd), dict(sharding.DEFAULT_RULES)
    expect = sorted(k for k, axes in PARAM_AXES.items() for i, a in enumerate(axes)
                    if rules.get(a) == "tensor" and shapes[k][i] % 2)
    assert expect == ["k_proj", "o_proj", "q_proj", "v_proj"]  # 5 heads over tensor 2
    assert sorted(dropped) == expect  # once per parameter, not once per optimizer-state copy
    assert "norm" in skipped and "input_layernorm" in skipped  # 50 and (3, 50): nothing divides by 4
    assert len(set(skipped)) == len(skipped) and "embed_tokens" not in skipped  # 640 rows split
    assert "data" not in str(got["params"]["norm"].spec)
    assert "data" in str(got["params"]["embed_tokens"].spec)


def test_context_is_explicit():
    mesh = meshes.make_mesh(SIZES)
    with pytest.raises(TypeError):
        sharding.use_mesh(mesh).__enter__()  # no silent default rules
    with pytest.raises(ValueError, match="required"):
        with sharding.push_rules(mesh, None):
            pass
    with pytest.raises(ValueError, match="unknown axes"):
        with sharding.push_rules(mesh, {"batch": "model"}):
            pass
    x = jnp.ones((8, 4))
    assert sharding.active() is None and sharding.constrain(x, ("batch", None)) is x
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES) as m:
        ctx = sharding.active()
        assert m is mesh and ctx.mesh is mesh and ctx.rules == dict(sharding.DEFAULT_RULES)
        with sharding.push_rules(mesh, {"batch": "tensor"}):
            assert sharding.active().rules == {"batch": "tensor"}
            y = jax.jit(lambda a: sharding.constrain(a, ("batch", None)))(x)
            assert y.sharding.spec == P("tensor")
        assert sharding.active() == ctx
    assert sharding.active() is None


def test_decay_mask_from_logical_axes(monkeypatch):
    params = {k: np.zeros(s, np.float32) for k, s in param_shapes(CFG).items()}
    by_name = {k: "norm" not in k for k in params}  # the rule this replaced
    assert decay_mask(params) == by_name
    assert sorted(k for k, v in decay_mask(params).items() if not v) == [
        "input_layernorm", "norm", "post_attention_layernorm"]
    monkeypatch.setitem(PARAM_AXES, "final_scale", ("embed",))  # a norm under a new name
    assert decay_mask({"final_scale": np.zeros(48), "lm_head": np.zeros((48, 640))}) == {
        "final_scale": False, "lm_head": True}
    with pytest.raises(ValueError, match="mystery"):
        decay_mask({"mystery": np.zeros(3)})
