"""The training sampler and grain pipeline: pure in (seed, step), resume, workers, test batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_config
from ssl_jax.data import (
    ImageSet,
    augment_device,
    augment_host,
    device_augment_views,
    load_dataset,
    stream_indices,
    test_batches,
    train_iterator,
)
from ssl_jax.data.augment_spec import AugmentParams

VIEWS = ("u_w", "u_s0", "u_s1")


def synthetic(n, labels=None, seed=0, shape=(64, 64, 3)):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, shape, np.uint8) for _ in range(n)]
    labels = np.arange(n) % 5 if labels is None else labels
    return ImageSet(images, np.asarray(labels, np.int32), tuple(f"f{i}" for i in range(n)))


class Data:
    """Just the attributes train_iterator reads."""

    def __init__(self, labelled, unlabelled):
        self.labelled, self.unlabelled = labelled, unlabelled


def small_config(seed=0, total_steps=8, batch_size=4, mu=2, workers=0):
    config = get_config()
    config.seed = seed
    config.data.batch_size = batch_size
    config.data.mu = mu
    config.data.workers = workers
    config.train.total_steps = total_steps
    return config


@pytest.fixture(scope="module")
def data():
    # 10 labelled (2 full batches of 4 per pass, 2 dropped), 20 unlabelled (2 batches of 8).
    return Data(synthetic(10, seed=1), synthetic(20, seed=2, shape=(64, 70, 3)))


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ------------------------------------------------------------------------------ sampler


def test_stream_indices_permutation_per_pass_and_drop_last():
    n, bs = 10, 3  # 3 batches per pass, one index dropped each pass
    passes = []
    for p in range(4):
        batches = [stream_indices(n, bs, seed=0, stream=1, step=3 * p + s) for s in range(3)]
        flat = np.concatenate(batches)
        assert len(flat) == 9 and len(set(flat.tolist())) == 9  # no repeats inside a pass
        passes.append(flat)
    assert any(not np.array_equal(passes[0], p) for p in passes[1:])  # reshuffled each pass
    counts = np.bincount(
        np.concatenate([stream_indices(n, bs, seed=0, stream=1, step=s) for s in range(3 * 200)]),
        minlength=n,
    )
    assert counts.min() > 0.8 * 180 and counts.max() < 1.2 * 180  # ~uniform, nothing starved
    again = stream_indices(n, bs, seed=0, stream=1, step=7)
    np.testing.assert_array_equal(again, passes[2][3:6])  # a pure function of the step
    assert not np.array_equal(
        stream_indices(100, 10, seed=0, stream=1, step=0),
        stream_indices(100, 10, seed=1, stream=1, step=0),
    )


def test_set_smaller_than_batch_is_tiled():
    idx = stream_indices(3, 8, seed=0, stream=2, step=5)
    assert len(idx) == 8 and set(idx.tolist()) <= {0, 1, 2}
    assert np.bincount(idx, minlength=3).max() <= 3  # at most ceil(8/3) copies of each


# ----------------------------------------------------------------------------- pipeline


def test_batch_contents_are_the_documented_pure_function(data):
    config = small_config()
    batch = take(train_iterator(data, config, views=VIEWS), 3)[2]
    assert batch["x"].shape == (4, 60, 60, 3) and batch["x"].dtype == np.uint8
    for v in VIEWS:
        assert batch[v].shape == (8, 60, 60, 3) and batch[v].dtype == np.uint8
    assert batch["y"].dtype == np.int32 and batch["u_index"].dtype == np.int32
    np.testing.assert_array_equal(batch["y"], data.labelled.labels[batch["x_index"]])
    np.testing.assert_array_equal(batch["u_y"], data.unlabelled.labels[batch["u_index"]])
    np.testing.assert_array_equal(batch["x_index"], stream_indices(10, 4, seed=0, stream=1, step=2))
    # Example j of view v at step k uses default_rng([seed, view stream, k, j]).
    j, i = 5, batch["u_index"][5]
    expected = augment_host.strong1_view(
        data.unlabelled.images[i], np.random.default_rng([0, 13, 2, j])
    )
    np.testing.assert_array_equal(batch["u_s1"][j], expected)
    expected = augment_host.labelled_view(
        data.labelled.images[batch["x_index"][1]], np.random.default_rng([0, 10, 2, 1])
    )
    np.testing.assert_array_equal(batch["x"][1], expected)


def test_determinism_and_seeds(data):
    a = take(train_iterator(data, small_config(seed=3), views=VIEWS), 3)
    b = take(train_iterator(data, small_config(seed=3), views=VIEWS), 3)
    c = take(train_iterator(data, small_config(seed=4), views=VIEWS), 3)
    assert_batches_equal(a, b)
    assert not np.array_equal(a[0]["u_index"], c[0]["u_index"])
    assert not np.array_equal(a[0]["u_s0"], c[0]["u_s0"])


def test_resume_mid_epoch_from_state_and_from_start_step(data):
    config = small_config(total_steps=8)
    reference = take(train_iterator(data, config, views=VIEWS), 8)
    it = train_iterator(data, config, views=VIEWS)
    take(it, 3)  # step 3 is in the middle of a labelled pass (2 steps) and unlabelled pass
    state = it.get_state()
    resumed = train_iterator(data, config, views=VIEWS)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 5), reference[3:])
    with pytest.raises(StopIteration):
        next(resumed)  # ends at total_steps
    assert_batches_equal(
        take(train_iterator(data, config, views=VIEWS, start_step=3), 5), reference[3:]
    )


def test_indices_mode_and_no_views(data):
    config = small_config()
    host = take(train_iterator(data, config, views=VIEWS), 2)
    indices = take(train_iterator(data, config, views=VIEWS, mode="indices"), 2)
    for h, i in zip(host, indices, strict=True):
        assert set(i) == {"y", "x_index", "u_y", "u_index"}
        for k in i:
            np.testing.assert_array_equal(h[k], i[k])
    supervised = next(train_iterator(data, config, views=()))
    assert set(supervised) == {"x", "y", "x_index"}
    with pytest.raises(ValueError, match="unknown unlabelled views"):
        train_iterator(data, config, views=("u_x",))


def test_workers_match_in_process(data):
    config = small_config(total_steps=4)
    in_process = take(train_iterator(data, config, views=VIEWS), 4)
    it = train_iterator(data, small_config(total_steps=4, workers=2), views=VIEWS)
    take(it, 1)
    state = it.get_state()
    rest = take(it, 3)
    with pytest.raises(StopIteration):
        next(it)  # ends at total_steps with workers too
    it.close()
    assert_batches_equal(rest, in_process[1:])
    resumed = train_iterator(data, small_config(total_steps=4, workers=2), views=VIEWS)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 3), in_process[1:])
    resumed.close()


def test_real_ucm_batch(shared_data):
    config = small_config(total_steps=2, batch_size=8, mu=2)
    config.data.root = str(shared_data / "ucm")
    config.data.cache_dir = "none"
    data = load_dataset(config, workdir=None)
    batch = next(train_iterator(data, config, views=VIEWS))
    assert batch["x"].shape == (8, 60, 60, 3) and batch["u_w"].shape == (16, 60, 60, 3)
    assert set(batch["y"].tolist()) <= set(range(10))
    # u_w is a centre crop, possibly flipped: it must equal one of the two.
    for j, i in enumerate(batch["u_index"][:4]):
        crop = data.unlabelled.images[i][2:62, 2:62]
        assert np.array_equal(batch["u_w"][j], crop) or np.array_equal(
            batch["u_w"][j], crop[:, ::-1]
        )


# --------------------------------------------------------------------------------- test


def test_test_batches_pad_and_mask():
    imageset = synthetic(7, labels=[0, 1, 2, 3, 4, 0, 1], shape=(64, 66, 3))
    batches = list(test_batches(imageset, 3))
    assert len(batches) == 3
    for b in batches:
        assert b["image"].shape == (3, 60, 60, 3) and b["image"].dtype == np.uint8
    assert batches[-1]["mask"].tolist() == [True, False, False]
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, imageset.labels)
    # CenterCrop(60) of 64x66: top = round(2) = 2, left = round(3) = 3 (torchvision rounding).
    np.testing.assert_array_equal(batches[2]["image"][0], imageset.images[6][2:62, 3:63])
    assert not batches[-1]["image"][1:].any()


def test_crop_size_is_honoured_by_host_device_and_test_views(data):
    """--config.data.crop_size=56: every view of both paths and the test batches are 56 px."""
    config = small_config()
    config.data.crop_size = 56
    host = next(train_iterator(data, config, views=VIEWS))
    assert host["x"].shape == (4, 56, 56, 3)
    for v in VIEWS:
        assert host[v].shape == (8, 56, 56, 3)
    indices = next(train_iterator(data, config, views=VIEWS, mode="indices"))
    batch = {k: jnp.asarray(v) for k, v in indices.items()}
    cache, augment_fn = device_augment_views(data, config, VIEWS)
    shapes = jax.eval_shape(augment_fn, jax.random.key(0), batch, cache)
    assert shapes["x"].shape == (4, 56, 56, 3)
    for v in VIEWS:
        assert shapes[v].shape == (8, 56, 56, 3)
    pool = cache["unlabelled"]
    weak = jax.jit(augment_device.augment_batch, static_argnames=("stream", "params"))(
        jax.random.key(0),
        pool["images"],
        pool["sizes"],
        batch["u_index"],
        stream="u_w",
        params=AugmentParams.from_config(config),
    )
    for j, i in enumerate(indices["u_index"]):  # CenterCrop(56) of 64x70, maybe flipped
        crop = data.unlabelled.images[i][4:60, 7:63]
        assert np.array_equal(weak[j], crop) or np.array_equal(weak[j], crop[:, ::-1])
    for b in test_batches(data.labelled, 3, crop_size=56):
        assert b["image"].shape == (3, 56, 56, 3)
    first = next(test_batches(data.unlabelled, 2, crop_size=56))
    np.testing.assert_array_equal(first["image"][0], data.unlabelled.images[0][4:60, 7:63])
