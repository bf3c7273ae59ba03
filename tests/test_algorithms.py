"""The algorithm registry and CoMatch's state handling under jit (docs/method.md#comatch)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import da_history

import configs.base
from ssl_jax.algorithms import ALGORITHMS, comatch, get_algorithm
from ssl_jax.models.heads import l2_normalize

B, MU, C, D = 2, 2, 3, 4
BU = B * MU

EXPECTED = {
    "supervised": ((), False, {"loss", "loss_x"}),
    "fixmatch": (("u_w", "u_s0"), False, {"loss", "loss_x", "loss_u", "mask_prob", "pseudo_acc"}),
    "fixmatch_ccssl": (
        ("u_w", "u_s0", "u_s1"),
        True,
        {"loss", "loss_x", "loss_u", "mask_prob", "pseudo_acc", "loss_ccssl"},
    ),
    "comatch": (
        ("u_w", "u_s0", "u_s1"),
        True,
        {"loss", "loss_x", "loss_u", "loss_c", "mask_prob", "pseudo_acc"},
    ),
    "comatch_ccssl": (
        ("u_w", "u_s0", "u_s1"),
        True,
        {"loss", "loss_x", "loss_u", "loss_c", "mask_prob", "pseudo_acc", "loss_ccssl"},
    ),
    "comatch_triplet": (
        ("u_w", "u_s0", "u_s1"),
        True,
        {
            "loss",
            "loss_x",
            "loss_u",
            "loss_c",
            "mask_prob",
            "pseudo_acc",
            "loss_dml",
            "triplet_valid",
            "triplet_mined",
            "triplet_positive",
        },
    ),
}


def small_cfg(**overrides) -> ml_collections.ConfigDict:
    cfg = configs.base.get_config().algorithm
    cfg.queue_batch = 2
    cfg.da_len = 3
    cfg.update(overrides)
    return cfg


def random_outputs(seed: int, num_views: int):
    rng = np.random.default_rng(seed)
    n = B + num_views * BU
    logits = jnp.asarray(3.0 * rng.normal(size=(n, C)), jnp.float32)
    feats = l2_normalize(jnp.asarray(rng.normal(size=(n, D)), jnp.float32))
    batch = {
        "y": jnp.asarray(rng.integers(0, C, size=B), jnp.int32),
        "u_y": jnp.asarray(rng.integers(0, C, size=BU), jnp.int32),
    }
    return logits, feats, batch


def test_registry_has_exactly_the_six_methods():
    assert set(ALGORITHMS) == set(EXPECTED)
    for name, (views, needs_projection, _) in EXPECTED.items():
        algorithm = get_algorithm(name)
        assert algorithm.name == name
        assert algorithm.unlabelled_views == views
        assert algorithm.needs_projection is needs_projection
    with pytest.raises(ValueError, match="comatch_triplet"):
        get_algorithm("comatch_tripplet")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loss_from_outputs_jits_with_documented_metrics(name):
    algorithm = get_algorithm(name)
    views, needs_projection, metric_keys = EXPECTED[name]
    cfg = small_cfg()
    state = algorithm.init_state(cfg, num_classes=C, low_dim=D, batch_size=B, mu=MU)
    logits, feats, batch = random_outputs(0, len(views))

    @jax.jit
    def step(logits, feats, state, epoch, iteration):
        return algorithm.loss_from_outputs(
            logits=logits,
            feats=feats if needs_projection else None,
            batch=batch,
            state=state,
            epoch=epoch,
            iteration=iteration,
            cfg=cfg,
        )

    loss, (new_state, metrics) = step(logits, feats, state, jnp.int32(1), jnp.int32(0))
    assert set(metrics) == metric_keys
    for key, value in metrics.items():
        assert value.shape == () and value.dtype == jnp.float32, key
        assert np.isfinite(float(value)), key
    assert float(metrics["loss"]) == float(loss) and float(loss) > 0
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)


def test_comatch_state_shapes():
    cfg = configs.base.get_config().algorithm  # the paper: K = 5·8·32 = 1280
    state = comatch.init_state(cfg, num_classes=10, low_dim=64, batch_size=32, mu=7)
    assert state["queue_feats"].shape == (1280, 64)
    assert state["queue_probs"].shape == (1280, 10)
    assert state["prob_hist"].shape == (32, 10)
    assert state["queue_ptr"].dtype == jnp.int32 and state["prob_hist_len"].dtype == jnp.int32


def test_comatch_state_survives_orbax_round_trip(tmp_path):
    cfg = small_cfg()
    state = comatch.init_state(cfg, num_classes=C, low_dim=D, batch_size=B, mu=MU)
    logits, feats, batch = random_outputs(1, 3)
    for it in range(3):  # a non-trivial state: filled rows, pointer and a full DA history
        _, (state, _) = comatch.comatch_loss(
            logits=logits,
            feats=feats,
            batch=batch,
            state=state,
            epoch=jnp.int32(0),
            iteration=jnp.int32(it),
            cfg=cfg,
        )
    assert int(state["queue_ptr"]) == B + BU and int(state["prob_hist_len"]) == 3
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "state", jax.tree.map(jnp.zeros_like, state))
    chex.assert_trees_all_equal(restored, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(restored, state)
    np.testing.assert_array_equal(da_history(restored), da_history(state))


def test_smoothing_switches_on_after_queue_batch_under_one_compile():
    """docs/method.md#q4-smoothing-start: off at iteration == queue_batch of epoch 0, on at +1 and
    whenever epoch > 0."""
    cfg = small_cfg(queue_batch=5)
    logits, feats, batch = random_outputs(2, 3)
    rng = np.random.default_rng(3)
    state = comatch.init_state(cfg, num_classes=C, low_dim=D, batch_size=B, mu=MU)
    state["queue_feats"] = l2_normalize(jnp.asarray(rng.normal(size=state["queue_feats"].shape)))
    state["queue_probs"] = jnp.asarray(
        rng.dirichlet(np.ones(C), size=state["queue_probs"].shape[0]), jnp.float32
    )

    @jax.jit
    @chex.assert_max_traces(n=1)
    def terms(epoch, iteration):
        out = comatch.comatch_terms(
            logits=logits,
            feats=feats,
            batch=batch,
            state=state,
            epoch=epoch,
            iteration=iteration,
            cfg=cfg,
        )
        return out["smoothing_applied"], out["probs"], out["probs_da"]

    for epoch, iteration, expected in [(0, 5, False), (0, 6, True), (1, 0, True), (0, 0, False)]:
        applied, probs, probs_da = terms(jnp.int32(epoch), jnp.int32(iteration))
        assert bool(applied) is expected, (epoch, iteration)
        assert (not np.allclose(probs, probs_da)) is expected, (epoch, iteration)


def test_pointer_wraps_and_rows_are_written_in_order():
    cfg = small_cfg(queue_batch=2)
    state = comatch.init_state(cfg, num_classes=C, low_dim=D, batch_size=B, mu=MU)
    k = state["queue_feats"].shape[0]
    n = B + BU
    assert k == 2 * n

    step = jax.jit(
        lambda logits, feats, batch, state, it: comatch.comatch_loss(
            logits=logits,
            feats=feats,
            batch=batch,
            state=state,
            epoch=jnp.int32(0),
            iteration=it,
            cfg=cfg,
        )[1][0]
    )
    pointers = []
    for it in range(3):
        logits, feats, batch = random_outputs(10 + it, 3)
        state = step(logits, feats, batch, state, jnp.int32(it))
        pointers.append(int(state["queue_ptr"]))
        start = (it * n) % k
        # Rows: [z(u_w) ; z(x)] features and [p_da(u_w) ; one-hot(y)] probabilities.
        written = np.asarray(state["queue_feats"])[start : start + n]
        np.testing.assert_array_equal(written[:BU], feats[B : B + BU])
        np.testing.assert_array_equal(written[BU:], feats[:B])
        np.testing.assert_array_equal(
            np.asarray(state["queue_probs"])[start + BU : start + n], jax.nn.one_hot(batch["y"], C)
        )
    assert pointers == [n, 0, n]
    assert int(state["prob_hist_len"]) == 3
