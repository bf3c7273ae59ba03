"""K steps per dispatch: how K is chosen, the blocks of input, and the same training as K = 1."""

import ml_collections
import numpy as np
import pytest
from conftest import tiny_run_config

from configs import base
from ssl_jax import data as data_lib
from ssl_jax import dispatch, metric_writers, train
from ssl_jax.data import BatchMaker, train_iterator
from ssl_jax.data.synthetic import synthetic_dataset


def _train_config(**values):
    t = ml_collections.ConfigDict(
        {"log_every": 8, "steps_per_epoch": 16, "checkpoint_every": 32, "total_steps": 64}
    )
    t.steps_per_dispatch = 0
    t.update(values)
    return t


def test_auto_k_is_the_largest_divisor_of_every_boundary_under_the_cap():
    assert dispatch.resolve_steps_per_dispatch(_train_config(), "device") == 8
    assert (
        dispatch.resolve_steps_per_dispatch(
            _train_config(
                log_every=128, steps_per_epoch=1024, checkpoint_every=1024, total_steps=524_288
            ),
            "device",
        )
        == 64
    )
    assert dispatch.resolve_steps_per_dispatch(_train_config(log_every=128), "host") == 8
    # tiny test runs: boundaries of 2 and 4 steps
    assert (
        dispatch.resolve_steps_per_dispatch(
            _train_config(log_every=2, steps_per_epoch=4, checkpoint_every=4, total_steps=8),
            "device",
        )
        == 2
    )
    assert dispatch.resolve_steps_per_dispatch(_train_config(total_steps=60), "device") == 4


def test_a_k_the_user_sets_must_divide_every_boundary_and_the_error_says_which():
    assert dispatch.resolve_steps_per_dispatch(_train_config(steps_per_dispatch=4), "host") == 4
    with pytest.raises(ValueError, match=r"train.log_every=8.*multiples of 16") as err:
        dispatch.resolve_steps_per_dispatch(_train_config(steps_per_dispatch=16), "device")
    assert "train.steps_per_epoch" not in str(err.value)  # 16 divides it: not listed
    with pytest.raises(ValueError, match=">= 0"):
        dispatch.resolve_steps_per_dispatch(_train_config(steps_per_dispatch=-1), "device")


@pytest.mark.parametrize("mode", ["indices", "host"])
def test_blocks_hold_exactly_the_per_step_batches(mode):
    """A block of K steps is the K batches a K = 1 loop would take, in order (host views too)."""
    data = synthetic_dataset(num_classes=3, num_unlabelled=40, num_labelled=12, seed=0)
    config = base.get_config()
    config.data.batch_size, config.data.mu, config.data.workers = 4, 2, 0
    config.train.total_steps = 64
    views = ("u_w", "u_s0", "u_s1")
    maker = BatchMaker(
        data.labelled, data.unlabelled, seed=0, batch_size=4, mu=2, views=views, mode=mode
    )
    if mode == "indices":
        source = dispatch.BlockSource(steps_per_dispatch=3, start_step=5, make_batch=maker)
    else:
        iterator = train_iterator(data, config, views=views, start_step=5, mode="host")
        source = dispatch.BlockSource(steps_per_dispatch=3, start_step=5, iterator=iterator)
    blocks = [source.next_block() for _ in range(3)]
    source.close()
    for b, block in enumerate(blocks):
        for i in range(3):
            expected = maker(5 + 3 * b + i)
            for key, value in expected.items():
                np.testing.assert_array_equal(block[key][i], value, err_msg=f"{key} step {i}")


TRIPLET_KEYS = ("loss_u", "loss_c", "loss_dml", "mask_prob", "triplet_mined")


def _train_rows(workdir, k):
    rows = metric_writers.read_metrics(str(workdir))
    assert [r["steps_per_dispatch"] for r in rows if r["kind"] == "run"] == [k]
    return rows


def _assert_same_training(runs, keys, logged_steps):
    train_rows = {k: [r for r in rows if r["kind"] == "train"] for k, rows in runs.items()}
    assert all([r["step"] for r in rows] == logged_steps for rows in train_rows.values())
    keys = ("loss", "loss_x", "grad_norm", "param_norm", "ema_param_norm", "lr", *keys)
    one, many = train_rows.values()
    for a, b in zip(one, many, strict=True):
        # The same scan body runs in both programs; XLA may fuse a 1-trip loop differently,
        # so equality is asked up to float32 reassociation.
        np.testing.assert_allclose([a[k] for k in keys], [b[k] for k in keys], rtol=2e-5)
    evals = [[r["top1"] for r in rows if r["kind"] == "eval"] for rows in runs.values()]
    assert evals[0] == evals[1]


def test_k_step_training_matches_one_step_per_dispatch_host(triplet_run, tmp_path):
    """K = 2 logs what K = 1 logs, host augmentation: same data order, same augmentation, same
    losses. CoMatch+Triplet carries a memory bank and a DA history. K = 2 is the session's
    tiny run (conftest.triplet_run: K chosen automatically), K = 1 the same config."""
    config = triplet_run.fresh_config()
    config.augment.where = "host"
    config.train.steps_per_dispatch = 1
    train.train_and_evaluate(config, str(tmp_path / "k1"))
    runs = {1: _train_rows(tmp_path / "k1", 1), 2: _train_rows(triplet_run.workdir, 2)}
    _assert_same_training(runs, TRIPLET_KEYS, [2, 4, 6, 8])


@pytest.mark.heavy(30)
def test_k_step_training_matches_one_step_per_dispatch_device(
    tmp_path, decoded_cache, monkeypatch, less_optimized
):
    """K = 4 logs what K = 1 logs, on-device augmentation: index blocks, per-step keys
    fold_in(rng, step) in the scan. Both programs are built with the same (reduced) XLA
    optimisation, so only the K-step structure differs between them. The runs crop to 56 px
    (`data.crop_size`): the views made on the device are 56 px (the host path: test_train)."""
    runs, view_shapes = {}, set()
    augment_views = data_lib.device_augment_views

    def recording_augment_views(*args, **kwargs):
        device_data, augment_fn = augment_views(*args, **kwargs)

        def recording_augment_fn(*a, **k):
            views = augment_fn(*a, **k)
            view_shapes.update(v.shape[-3:] for v in views.values() if v.ndim == 4)
            return views

        return device_data, recording_augment_fn

    monkeypatch.setattr(data_lib, "device_augment_views", recording_augment_views)
    for k in (1, 4):
        config = tiny_run_config("ucm10_supervised", decoded_cache, log_every=4)
        config.augment.where = "device"
        config.data.crop_size = 56
        config.train.steps_per_dispatch = k
        train.train_and_evaluate(config, str(tmp_path / f"k{k}"))
        runs[k] = _train_rows(tmp_path / f"k{k}", k)
    assert view_shapes == {(56, 56, 3)}
    _assert_same_training(runs, (), [4, 8])
