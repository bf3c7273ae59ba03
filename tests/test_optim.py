"""Optimiser pieces beyond the fixtures: the weight-decay mask rule and the EMA semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from ssl_jax import optim


def _tree():
    return {
        "conv1": {"kernel": jnp.ones((3, 3, 3, 4))},
        "bn1": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
        "block": {
            "downsample_conv": {"kernel": jnp.ones((1, 1, 4, 8))},
            "downsample_bn": {"scale": jnp.ones(8), "bias": jnp.zeros(8)},
        },
        "classifier": {"kernel": jnp.ones((8, 10)), "bias": jnp.zeros(10)},
    }


def test_decay_mask_follows_the_reference_name_rule():
    mask = optim.decay_mask(_tree())
    assert mask["conv1"]["kernel"] and mask["classifier"]["kernel"]
    assert mask["block"]["downsample_conv"]["kernel"]
    # docs/method.md#q10-decayed-downsample-bn-scale: downsample BN gamma is decayed
    assert mask["block"]["downsample_bn"]["scale"]
    assert not mask["block"]["downsample_bn"]["bias"]
    assert not mask["bn1"]["scale"] and not mask["bn1"]["bias"]
    assert not mask["classifier"]["bias"]


def test_first_sgd_step_matches_pytorch_formula():
    """p <- p - lr*(d + m*d) with d = g + wd*p on decayed leaves (zero-initialised trace)."""
    params = _tree()
    cfg = ConfigDict(
        dict(
            lr=0.1,
            momentum=0.9,
            nesterov=True,
            weight_decay=0.01,
            warmup_steps=0,
            num_cycles=7 / 16,
        )
    )
    tx, schedule = optim.make_optimizer(cfg, 100, params)
    assert float(schedule(0)) == np.float32(0.1)  # the schedule inside tx: lr of update 0
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    d_decayed = 0.5 + 0.01 * 1.0
    np.testing.assert_allclose(new["conv1"]["kernel"], 1 - 0.1 * (d_decayed * 1.9), rtol=1e-6)
    np.testing.assert_allclose(new["bn1"]["scale"], 1 - 0.1 * (0.5 * 1.9), rtol=1e-6)


def test_schedule_never_reaches_zero_and_warms_up():
    s = optim.cosine_schedule(0.03, 1000)
    assert float(s(0)) == np.float32(0.03)
    np.testing.assert_allclose(float(s(1000)), 0.03 * np.cos(7 * np.pi / 16), rtol=1e-6)
    w = optim.cosine_schedule(0.03, 1000, warmup_steps=10)
    np.testing.assert_allclose(
        [float(w(0)), float(w(5)), float(w(10))], [0, 0.015, 0.03], rtol=1e-6
    )


def test_returned_schedule_is_the_one_the_optimizer_steps_with():
    """Plain SGD (no momentum, no decay) on gradient 1 moves each parameter by -lr(k)."""
    cfg = ConfigDict(
        dict(lr=0.2, momentum=0.0, nesterov=False, weight_decay=0.0, warmup_steps=3, num_cycles=0.5)
    )
    params = {"w": jnp.zeros(())}
    tx, schedule = optim.make_optimizer(cfg, 10, params)
    state = tx.init(params)
    for k in range(10):
        updates, state = tx.update({"w": jnp.ones(())}, state, params)
        np.testing.assert_allclose(float(updates["w"]), -float(schedule(k)), rtol=1e-6)
    assert float(schedule(1)) != float(schedule(5))  # warm-up and decay: the lr does change


def test_ema_update_is_a_plain_average():
    out = optim.ema_update({"a": jnp.array([1.0])}, {"a": jnp.array([3.0])}, 0.75)
    np.testing.assert_allclose(out["a"], [1.5])
