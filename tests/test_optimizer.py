"""Config-declared freezing, learning-rate groups, decay masks, clipping and accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qtl_jax import rules
from qtl_jax import optimizer

PARAMS = {
    "vision": {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}},
    "connector": {"fc1": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}, "norm": {"scale": jnp.ones((2,))}},
    "llm": {"kernel": jnp.ones((2, 2))},
}
BASE = dict(lr=0.1, weight_decay=0.5, warmup_ratio=0.0, schedule="constant", no_decay=[".*/bias", ".*norm.*/scale"])


def _step(config, grads=None, steps=1):
    tx = optimizer.make_optimizer(config, 10, PARAMS)
    state = tx.init(PARAMS)
    params = PARAMS
    grads = grads or jax.tree_util.tree_map(jnp.ones_like, PARAMS)
    for _ in range(steps):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_frozen_groups_do_not_move_and_lr_multipliers_apply():
    cfg = dict(BASE, param_groups=[("vision/.*", "frozen"), ("llm/.*", 0.5), (".*", 1.0)])
    new = _step(cfg)
    np.testing.assert_array_equal(new["vision"]["dense"]["kernel"], PARAMS["vision"]["dense"]["kernel"])
    # Adam's first step moves by lr (sign of the gradient), plus decoupled decay lr*wd*param.
    np.testing.assert_allclose(new["connector"]["fc1"]["kernel"], 1 - 0.1 - 0.1 * 0.5, rtol=1e-5)
    np.testing.assert_allclose(new["llm"]["kernel"], 1 - 0.05 - 0.05 * 0.5, rtol=1e-5)


def test_no_decay_on_biases_and_norms():
    new = _step(dict(BASE, param_groups=[(".*", 1.0)]))
    np.testing.assert_allclose(new["connector"]["fc1"]["bias"], 1 - 0.1, rtol=1e-5)
    np.testing.assert_allclose(new["connector"]["norm"]["scale"], 1 - 0.1, rtol=1e-5)


def test_frozen_gradients_do_not_enter_clipping():
    cfg = dict(BASE, weight_decay=0.0, schedule="constant", lr=1.0, b1=0.0, b2=0.0, eps=0.0, grad_clip_norm=1.0,
               param_groups=[("vision/.*", "frozen"), (".*", 1.0)])
    grads = jax.tree_util.tree_map(jnp.ones_like, PARAMS)
    grads["vision"]["dense"]["kernel"] = 1e6 * grads["vision"]["dense"]["kernel"]
    tx = optimizer.make_optimizer(cfg, 10, PARAMS)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    # With b1=b2=0 Adam's update is sign(g) = -1 regardless of scale; clipping sees only the trainable part.
    np.testing.assert_allclose(updates["llm"]["kernel"], -1.0, rtol=1e-5)
    assert float(jnp.abs(updates["vision"]["dense"]["kernel"]).max()) == 0.0


def test_warmup_cosine_schedule():
    s = optimizer.learning_rate_schedule(dict(lr=1.0, warmup_ratio=0.2, schedule="cosine"), 10)
    np.testing.assert_allclose([float(s(i)) for i in (0, 1, 2, 6, 10)], [0.5, 1.0, 1.0, 0.5, 0.0], atol=1e-6)


def test_gradient_accumulation_applies_every_k_steps():
    cfg = dict(BASE, accum_steps=2, param_groups=[(".*", 1.0)])
    one = _step(cfg, steps=1)
    np.testing.assert_array_equal(one["llm"]["kernel"], PARAMS["llm"]["kernel"])
    two = _step(cfg, steps=2)
    assert float(two["llm"]["kernel"][0, 0]) < 1.0


def test_bad_rules_are_reported():
    with pytest.raises(ValueError, match="match no parameter"):
        rules.assign(PARAMS, [("visoin/.*", "frozen"), (".*", 1.0)])
    with pytest.raises(ValueError, match="frozen"):
        optimizer.make_optimizer(dict(BASE, param_groups=[(".*", "freeze")]), 10, PARAMS)
    with pytest.raises(ValueError, match="no param_groups rule covers"):
        optimizer.make_optimizer(dict(BASE, param_groups=[("llm/.*", 1.0)]), 10, PARAMS)
