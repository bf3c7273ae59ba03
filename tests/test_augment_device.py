"""Device (pure JAX) augmentation against the PIL host version and PIL itself.

Every op is compared bit for bit with PIL on real images (UCM PNGs and a non-square resize
of an original TIFF); the colour conversions and blends exhaustively over their inputs; the
resized crop over every box shape that fits a 66x66 frame. The streams are compared with
the host streams statistically (their random draws differ by design)."""

import functools
import glob
import math

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from configs.base import get_config
from ssl_jax.data import augment_device as ad
from ssl_jax.data import augment_host as ah
from ssl_jax.data import augment_spec as spec
from ssl_jax.data import device_colour as dc
from ssl_jax.data import device_geometry as dg
from ssl_jax.data import device_randaugment as dr
from ssl_jax.data import views
from ssl_jax.data.on_device import make_augment_fn

# One xdist worker builds this module's fixtures once (they are its costly part).
pytestmark = pytest.mark.xdist_group("augment_device")

FRAME = 66  # padded cache frame


@pytest.fixture(scope="module")
def images(shared_data):
    """Four resized images: two 64x64 PNGs, the 66x64 TIFF resize and its 64x66 transpose."""
    paths = sorted(glob.glob(f"{shared_data}/ucm/*/*.png"))[::700][:2]
    out = [np.asarray(PIL.Image.open(p).convert("RGB")) for p in paths]
    tif = shared_data / "originals/ucm/tenniscourt/tenniscourt14.tif"  # 247x256 -> (66, 64)
    tall = np.asarray(ah.resize_shorter(PIL.Image.open(tif).convert("RGB")))
    assert tall.shape == (66, 64, 3)
    return out + [tall, np.ascontiguousarray(tall.transpose(1, 0, 2))]


# One jitted function and one batch length for every stream call, so each stream compiles once.
BATCH = jax.jit(ad.augment_batch, static_argnames=("stream", "params"))
BATCH_LENGTH = 800
MAGENTA = 4  # cache index of a flat (255, 0, 255) 64x64 image


@pytest.fixture(scope="module")
def cache(images):
    """The padded device cache (N, 66, 66, 3) and true sizes (N, 2) = (height, width): the
    four real images, then a flat magenta one."""
    flat = np.zeros((64, 64, 3), np.uint8)
    flat[..., 0] = flat[..., 2] = 255
    frames = [*images, flat]
    padded = np.zeros((len(frames), FRAME, FRAME, 3), np.uint8)
    for i, im in enumerate(frames):
        padded[i, : im.shape[0], : im.shape[1]] = im
    sizes = np.array([im.shape[:2] for im in frames], np.int32)
    return jnp.asarray(padded), jnp.asarray(sizes)


@pytest.fixture(scope="module")
def crops(images):
    return [ah.test_view(im) for im in images[:3]]


def _host(fn, a, *args):
    return np.asarray(fn(PIL.Image.fromarray(a, "RGB"), *args)).astype(np.int64)


def _check_equal(got, expected, what):
    got = np.asarray(got).astype(np.int64)
    diff = np.abs(got - expected)
    assert diff.max() == 0, f"{what}: max abs err {diff.max()}, mean {diff.mean():.4f}"


# ----------------------------------------------------------------------------- ops, exact


def test_both_backends_register_every_op_in_the_reference_order():
    assert tuple(dr.RANDAUGMENT_FNS) == tuple(ah.RANDAUGMENT_FNS) == spec.RANDAUGMENT_OPS
    assert dr.RANDAUGMENT_FNS["brightness"] is dc.brightness


@pytest.mark.parametrize("name", spec.RANDAUGMENT_OPS)
def test_randaugment_op_matches_pil(name, crops):
    params = {spec.op_parameter(name, v, sign) for v in range(1, 10) for sign in (1, -1)}
    op = jax.jit(dr.RANDAUGMENT_FNS[name])
    for a in crops:
        for param in params:
            expected = _host(ah.RANDAUGMENT_FNS[name], a, param)
            got = op(a) if param is None else op(a, param)
            assert got.dtype == jnp.uint8
            _check_equal(got, expected, f"{name}({param})")


def test_blend_matches_pil_for_every_pixel_pair():
    """All 65,536 (degenerate, image) pairs for the RandAugment factors and jitter-like ones."""
    d = np.repeat(np.arange(256), 256).astype(np.uint8).reshape(256, 256, 1).repeat(3, -1)
    x = np.tile(np.arange(256), 256).astype(np.uint8).reshape(256, 256, 1).repeat(3, -1)
    blend = jax.jit(dc._blend)
    factors = [spec.op_parameter("brightness", v) for v in range(1, 10)]
    factors += list(np.random.default_rng(0).uniform(0.6, 1.4, 12))
    for f in factors:
        expected = np.asarray(PIL.Image.blend(PIL.Image.fromarray(d), PIL.Image.fromarray(x), f))
        _check_equal(blend(d, x, f), expected.astype(np.int64), f"blend({f})")


def _all_triples():
    codes = np.arange(1 << 24, dtype=np.int32)
    return np.stack([codes >> 16, (codes >> 8) & 255, codes & 255], -1).astype(np.uint8)


def test_hsv_conversions_match_pil_for_every_value():
    triples = _all_triples().reshape(4096, 4096, 3)
    to_hsv = np.asarray(PIL.Image.fromarray(triples, "RGB").convert("HSV"))
    to_rgb = np.asarray(PIL.Image.fromarray(triples, "HSV").convert("RGB"))
    rgb_to_hsv = jax.jit(dc.rgb_to_hsv)
    hsv_to_rgb = jax.jit(dc.hsv_to_rgb)
    for rows in range(0, 4096, 1024):
        chunk = triples[rows : rows + 1024]
        _check_equal(rgb_to_hsv(chunk), to_hsv[rows : rows + 1024], "rgb->hsv")
        _check_equal(hsv_to_rgb(chunk.astype(np.int32)), to_rgb[rows : rows + 1024], "hsv->rgb")


def test_autocontrast_where_double_rounding_matters():
    """Channels spanning (lo, hi) pairs whose double LUT rounds below the exact value."""
    keys = dr._autocontrast_corrections()
    assert 1000 < len(keys) < 100_000
    pairs = np.unique(keys >> 8)  # lo << 8 | hi
    rng = np.random.default_rng(0)
    chosen = rng.choice(pairs, size=60, replace=False)
    op = jax.jit(dr.auto_contrast)
    for i in range(0, 60, 3):
        a = np.zeros((60, 60, 3), np.uint8)
        for c in range(3):
            lo, hi = chosen[i + c] >> 8, chosen[i + c] & 255
            a[..., c] = np.resize(np.arange(lo, hi + 1), (60, 60))  # every level lo..hi
            a[0, 0, c], a[0, 1, c] = lo, hi
        _check_equal(op(a), _host(ah.auto_contrast, a), f"autocontrast {chosen[i : i + 3]}")


def test_grayscale_hue_and_jitter_match_host(crops):
    rng = np.random.default_rng(1)
    jitter = jax.jit(dc.color_jitter)
    hue = jax.jit(dc.adjust_hue)
    for a in crops:
        _check_equal(dc.grayscale(a), _host(ah.grayscale, a), "grayscale")
        for h in np.float32([-0.1, -0.037, 0.0, 0.021, 0.0999]):
            _check_equal(hue(a, h), _host(ah.adjust_hue, a, float(h)), f"hue({h})")
        for _ in range(6):
            order = rng.permutation(4)
            b, c, s = (float(np.float32(v)) for v in rng.uniform(0.6, 1.4, 3))
            h = float(np.float32(rng.uniform(-0.1, 0.1)))
            expected = _host(ah.color_jitter, a, order, b, c, s, h)
            _check_equal(jitter(a, jnp.asarray(order), b, c, s, h), expected, "jitter")


def test_cutout_matches_host(crops):
    cut = jax.jit(dr.cutout)
    a = crops[0]
    for cx, cy in [(30.5, 20.2), (0.0, 0.0), (2.0, 59.99), (59.9, 59.9), (8.0, 51.5), (57.3, 1.7)]:
        _check_equal(cut(a, cx, cy), _host(ah.cutout, a, cx, cy), f"cutout({cx}, {cy})")


# ----------------------------------------------------------------------------- geometry, exact


def test_flip_and_centre_crop_use_the_true_frame(images, cache):
    padded, sizes = cache
    for i, im in enumerate(images):
        h, w = im.shape[:2]
        flipped = np.asarray(dg.hflip(padded[i], sizes[i]))
        np.testing.assert_array_equal(flipped[:h, :w], im[:, ::-1])
        np.testing.assert_array_equal(dg.center_crop(padded[i], sizes[i]), ah.test_view(im))
        np.testing.assert_array_equal(ad.test_view(padded[i], sizes[i]), ah.test_view(im))


def test_resized_crop_matches_pil_for_every_box_shape():
    """Every (h, w) in 1..66 at a random offset of a 66x66 frame: both PIL pass orders and
    the downscale/upscale weights are exercised."""
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (FRAME, FRAME, 3)).astype(np.uint8)
    pil = PIL.Image.fromarray(frame)
    shapes = np.array([(h, w) for h in range(1, FRAME + 1) for w in range(1, FRAME + 1)])
    tops = rng.integers(0, FRAME - shapes[:, 0] + 1)
    lefts = rng.integers(0, FRAME - shapes[:, 1] + 1)
    boxes = np.stack([tops, lefts, shapes[:, 0], shapes[:, 1]], 1).astype(np.int32)
    crop = jax.jit(jax.vmap(lambda box: dg.resized_crop(frame, tuple(box))))
    for start in range(0, len(boxes), 1100):
        got = np.asarray(crop(boxes[start : start + 1100])).astype(np.int64)
        for box, out in zip(boxes[start : start + 1100], got, strict=True):
            expected = np.asarray(ah.resized_crop(pil, tuple(int(v) for v in box)))
            if not np.array_equal(out, expected):
                err = np.abs(out - expected)
                pytest.fail(f"box {box}: max err {err.max()}, mean {err.mean():.4f}")


def test_resized_crop_of_real_images_in_the_padded_cache(images, cache):
    padded, sizes = cache
    rng = np.random.default_rng(5)
    crop = jax.jit(dg.resized_crop)
    for i, im in enumerate(images):
        for _ in range(10):
            box = ah.sample_resized_crop_box(rng, *im.shape[:2])
            expected = _host(ah.resized_crop, im, box)
            _check_equal(crop(padded[i], tuple(jnp.int32(v) for v in box)), expected, str(box))


def test_device_crop_box_sampler():
    keys = jax.random.split(jax.random.key(0), 3000)
    sample = jax.jit(jax.vmap(lambda k: dg.sample_resized_crop_box(k, 64, 66)))
    top, left, h, w = (np.asarray(v) for v in sample(keys))
    assert (h > 0).all() and (w > 0).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 64).all() and (left + w <= 66).all()
    frac = h * w / (64 * 66)
    assert frac.min() > 0.16 and 0.5 < frac.mean() < 0.65
    assert (w / h).min() > 0.75 * 0.9 and (w / h).max() < 4 / 3 / 0.9
    fallback = dg.sample_resized_crop_box(jax.random.key(1), 2, 200)
    assert tuple(int(v) for v in fallback) == ah.fallback_crop_box(2, 200)


# ----------------------------------------------------------------------------- streams


def _count_traces(fn):
    count = {"n": 0}

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        count["n"] += 1
        return fn(*args, **kwargs)

    return wrapped, count


def test_augment_batch_jits_once_and_vmaps(images, cache):
    padded, sizes = cache
    wrapped, count = _count_traces(ad.augment_batch)
    batch = jax.jit(wrapped, static_argnames="stream")
    indices = jnp.array([0, 1, 2, 3, 2, 2], jnp.int32)
    first = batch(jax.random.key(0), padded, sizes, indices, stream="x")
    second = batch(jax.random.key(1), padded, sizes, indices[::-1], stream="x")
    assert count["n"] == 1
    assert first.shape == second.shape == (6, 60, 60, 3) and first.dtype == jnp.uint8
    # Per-example keys: the same image at three positions gets three different views.
    assert not np.array_equal(first[2], first[4]) and not np.array_equal(first[4], first[5])
    again = batch(jax.random.key(0), padded, sizes, indices, stream="x")
    np.testing.assert_array_equal(first, again)
    test = BATCH(jax.random.key(0), padded, sizes, indices, stream="test")
    for j, i in enumerate(np.asarray(indices)):
        np.testing.assert_array_equal(test[j], ah.test_view(images[i]))


def test_make_augment_fn_shapes_and_stream_keys(cache):
    padded, sizes = cache
    pool = {"images": padded, "sizes": sizes}
    device_cache = {"labelled": pool, "unlabelled": pool}
    batch = {
        "x_index": jnp.array([0, 1, 2, 3], jnp.int32),
        "u_index": jnp.array([3, 2, 1, 0, 0, 1, 2, 3], jnp.int32),
    }
    config = get_config()
    key = jax.random.key(3)
    shapes = jax.eval_shape(
        make_augment_fn(config, views.UNLABELLED_VIEWS), key, batch, device_cache
    )
    assert set(shapes) == {"x", "u_w", "u_s0", "u_s1", "x_index", "u_index"}
    assert shapes["x"].shape == (4, 60, 60, 3)
    for name in views.UNLABELLED_VIEWS:
        assert shapes[name].shape == (8, 60, 60, 3) and shapes[name].dtype == jnp.uint8
    # View v's key is fold_in(key, its device stream id), whichever other views were asked for.
    weak = jax.jit(make_augment_fn(config, (views.WEAK,)))(key, batch, device_cache)
    assert set(weak) == {"x", "u_w", "x_index", "u_index"}
    stream_key = jax.random.fold_in(key, views.VIEWS[views.WEAK].device_stream)
    expected = BATCH(stream_key, *cache, batch["u_index"], stream=views.WEAK)
    np.testing.assert_array_equal(weak[views.WEAK], expected)
    with pytest.raises(ValueError, match="unknown unlabelled views"):
        make_augment_fn(config, ("x",))


@pytest.fixture(scope="module")
def stream_samples(images, cache):
    """200 views per image and stream, from the device and from the host."""
    padded, sizes = cache
    indices = jnp.repeat(jnp.arange(len(images)), BATCH_LENGTH // len(images))
    rng = np.random.default_rng(0)
    out = {}
    for stream, host_fn in ah.STREAMS.items():
        dev = BATCH(jax.random.key(7), padded, sizes, indices, stream=stream)
        host = np.stack([host_fn(images[int(i)], rng) for i in np.asarray(indices)])
        out[stream] = (np.asarray(dev), host)
    return out


@pytest.mark.parametrize("stream", list(ah.STREAMS))
def test_stream_statistics_match_host(stream, stream_samples):
    """Per-channel mean and spread of the views agree within sampling noise (5 sigma)."""
    dev, host = stream_samples[stream]
    for stat in (lambda v: v.mean(axis=(1, 2)), lambda v: v.std(axis=(1, 2))):
        d, h = stat(dev.astype(np.float64)), stat(host.astype(np.float64))  # (n, 3)
        se = np.sqrt(d.var(0) / len(d) + h.var(0) / len(h))
        gap = np.abs(d.mean(0) - h.mean(0))
        assert (gap < 5 * se + 0.25).all(), f"{stream}: gap {gap}, 5 se {5 * se}"


def test_weak_view_flip_frequency_on_device(images, cache):
    padded, sizes = cache
    n = BATCH_LENGTH
    views = np.asarray(BATCH(jax.random.key(11), padded, sizes, jnp.full((n,), 2), stream="u_w"))
    plain, flipped = ah.test_view(images[2]), ah.test_view(images[2][:, ::-1].copy())
    n_plain = sum(np.array_equal(v, plain) for v in views)
    n_flip = sum(np.array_equal(v, flipped) for v in views)
    assert n_plain + n_flip == n
    assert abs(n_flip / n - 0.5) < 4 * math.sqrt(0.25 / n)


def test_strong_streams_probabilities_on_device(cache):
    """Flat magenta: crops/flips change nothing, so strong1 shows jitter (p 0.8) and gray
    (p 0.2) directly, and strong0 always shows a cutout of 81..289 grey pixels."""
    padded, sizes = cache
    n = BATCH_LENGTH
    index = jnp.full((n,), MAGENTA, jnp.int32)
    s1 = np.asarray(BATCH(jax.random.key(2), padded, sizes, index, stream="u_s1"))
    s1 = s1[:, 0, 0].astype(int)
    grey = np.mean((s1[:, 0] == s1[:, 1]) & (s1[:, 1] == s1[:, 2]))
    unchanged = np.mean((s1 == (255, 0, 255)).all(-1))
    assert abs(grey - 0.2) < 4 * math.sqrt(0.2 * 0.8 / n)
    assert abs(unchanged - 0.16) < 4 * math.sqrt(0.16 * 0.84 / n)
    s0 = np.asarray(BATCH(jax.random.key(3), padded, sizes, index, stream="u_s0"))
    counts = (s0 == 127).all(-1).sum(axis=(1, 2))
    assert counts.min() >= 81 and counts.max() <= 289
