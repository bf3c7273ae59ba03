"""Host (PIL) augmentation: every op against an expectation computed independently here
(numpy formulas or PIL calls written out), the magnitude table of docs/method.md#randaugment, the
crop-box sampler, the stream probabilities, cutout geometry, determinism and non-square input."""

import glob
import math

import numpy as np
import PIL.Image
import PIL.ImageEnhance
import PIL.ImageOps
import pytest

from ssl_jax.data import augment_host as ah
from ssl_jax.data import augment_spec as spec


@pytest.fixture(scope="module")
def tif(shared_data):
    return shared_data / "originals/ucm/tenniscourt/tenniscourt14.tif"  # 247x256 -> 64x66


@pytest.fixture(scope="module")
def crops(shared_data, tif):
    """Three real 60x60 crops (two UCM PNGs and the non-square original's centre)."""
    paths = sorted(glob.glob(f"{shared_data}/ucm/*/*.png"))[::700][:2]
    images = [PIL.Image.open(p).convert("RGB") for p in paths]
    images.append(ah.resize_shorter(PIL.Image.open(tif).convert("RGB")))
    return [np.asarray(ah.center_crop(im)) for im in images]


@pytest.fixture(scope="module")
def wide_image(tif):
    return np.asarray(ah.resize_shorter(PIL.Image.open(tif).convert("RGB")))


def _pil(a):
    return PIL.Image.fromarray(a, "RGB")


def _arr(im):
    return np.asarray(im).astype(np.int64)


def _luma(a):
    a = a.astype(np.int64)
    return (a[..., 0] * 19595 + a[..., 1] * 38470 + a[..., 2] * 7471 + 32768) >> 16


def _blend(d, x, f):
    d = d.astype(np.float32)
    x = x.astype(np.float32)
    return np.clip(np.trunc(d + np.float32(f) * (x - d)), 0, 255).astype(np.int64)


# ----------------------------------------------------------------------------- resize / crops


def test_resize_shorter_follows_torchvision_resize(tif):
    im = PIL.Image.open(tif).convert("RGB")
    assert im.size == (247, 256)
    out = ah.resize_shorter(im)
    assert out.size == (64, int(64 * 256 / 247)) == (64, 66)
    np.testing.assert_array_equal(_arr(out), _arr(im.resize((64, 66), PIL.Image.BILINEAR)))
    landscape = im.transpose(PIL.Image.TRANSPOSE)
    assert ah.resize_shorter(landscape).size == (66, 64)
    square = PIL.Image.new("RGB", (64, 64))
    assert ah.resize_shorter(square) is square  # already the right size: unchanged


def test_center_crop_offsets_and_hflip(wide_image):
    h, w = wide_image.shape[:2]
    assert (h, w) == (66, 64)  # PIL (64, 66) is width 64, height 66
    np.testing.assert_array_equal(ah.test_view(wide_image), wide_image[3:63, 2:62])
    assert ah.center_crop_box(64, 65) == (2, 2, 60, 60)  # (65-60)/2 = 2.5 rounds to even
    assert ah.center_crop_box(64, 67) == (2, 4, 60, 60)  # 3.5 -> 4
    np.testing.assert_array_equal(_arr(ah.hflip(_pil(wide_image))), wide_image[:, ::-1])


def test_resized_crop_is_crop_then_bilinear(wide_image):
    box = (5, 3, 40, 33)
    expected = _pil(wide_image[5:45, 3:36].copy()).resize((60, 60), PIL.Image.BILINEAR)
    np.testing.assert_array_equal(_arr(ah.resized_crop(_pil(wide_image), box)), _arr(expected))


def test_crop_box_limits_and_distribution():
    rng = np.random.default_rng(0)
    height, width = 64, 66
    boxes = np.array([ah.sample_resized_crop_box(rng, height, width) for _ in range(3000)])
    top, left, h, w = boxes.T
    assert (h > 0).all() and (w > 0).all()
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    # Rounding of w and h moves area and aspect slightly past the nominal limits.
    frac = h * w / (height * width)
    assert frac.min() > 0.2 - 0.04 and frac.max() <= 1.0
    aspect = w / h
    assert aspect.min() > 0.75 * 0.9 and aspect.max() < 4 / 3 / 0.9
    # Uniform scale in [0.2, 1] (most first attempts succeed): mean area fraction near 0.6.
    assert 0.5 < frac.mean() < 0.65
    assert top.max() > 30 and left.max() > 30  # positions spread over the frame


def test_crop_box_fallback():
    # A 2x200 strip can never hold an in-ratio box of >= 20% area: the central fallback.
    rng = np.random.default_rng(0)
    assert ah.sample_resized_crop_box(rng, 2, 200) == (0, (200 - 3) // 2, 2, 3)
    assert ah.fallback_crop_box(2, 200) == (0, 98, 2, round(2 * 4 / 3))
    assert ah.fallback_crop_box(200, 2) == ((200 - 3) // 2, 0, round(2 / 0.75), 2)
    assert ah.fallback_crop_box(60, 70) == (0, 0, 60, 70)  # in range: whole image


# ----------------------------------------------------------------------------- RandAugment ops


def test_magnitude_table_matches_spec():
    v = range(1, 10)
    factors = [0.14, 0.23, 0.32, 0.41, 0.50, 0.59, 0.68, 0.77, 0.86]
    for name in ("brightness", "color", "contrast", "sharpness"):
        np.testing.assert_allclose([spec.op_parameter(name, i) for i in v], factors, atol=1e-12)
    assert [spec.op_parameter("posterize", i) for i in v] == [4, 4, 5, 5, 6, 6, 6, 7, 7]
    assert [spec.op_parameter("rotate", i) for i in v] == [3 * i for i in v]
    assert [spec.op_parameter("rotate", i, -1) for i in v] == [-3 * i for i in v]
    np.testing.assert_allclose([spec.op_parameter("shear_x", i) for i in v], [0.03 * i for i in v])
    np.testing.assert_allclose(
        [spec.op_parameter("shear_y", i, -1) for i in v], [-0.03 * i for i in v]
    )
    solarize = [231, 205, 180, 154, 128, 103, 77, 52, 26]
    assert [spec.op_parameter("solarize", i) for i in v] == solarize
    assert [spec.op_parameter("translate_x", i) for i in v] == [1, 3, 5, 7, 9, 10, 12, 14, 16]
    translations = [1, 3, 5, 7, 9, 10, 12, 14, 16]
    assert [spec.op_parameter("translate_y", i, -1) for i in v] == [-t for t in translations]
    # The reference computes 9 * 0.3 / 10 = 0.26999999999999996 in double, so int(. * 100) is
    # 26, not 27: the table keeps the reference's float arithmetic, not the decimal value.
    assert spec.op_parameter("translate_x", 9, 1, width=100) == int(9 * 0.3 / 10 * 100) == 26
    for name in ("auto_contrast", "equalize", "identity"):
        assert spec.op_parameter(name, 5) is None
    assert len(spec.RANDAUGMENT_OPS) == 14 and tuple(ah.RANDAUGMENT_FNS) == spec.RANDAUGMENT_OPS
    assert all(ah.RANDAUGMENT_FNS[name] is getattr(ah, name) for name in spec.RANDAUGMENT_OPS)


def test_colour_ops_against_numpy_formulas(crops):
    for a in crops:
        im = _pil(a)
        for f in (0.14, 0.5, 0.86, 1.3):
            np.testing.assert_array_equal(
                _arr(ah.brightness(im, f)), _blend(np.zeros_like(a), a, f)
            )
            gray = np.repeat(_luma(a)[..., None], 3, -1)
            np.testing.assert_array_equal(_arr(ah.color(im, f)), _blend(gray, a, f))
            mean = int(_luma(a).mean() + 0.5)
            np.testing.assert_array_equal(
                _arr(ah.contrast(im, f)), _blend(np.full_like(a, mean), a, f)
            )
        np.testing.assert_array_equal(_arr(ah.grayscale(im)), np.repeat(_luma(a)[..., None], 3, -1))
        np.testing.assert_array_equal(_arr(ah.identity(im)), a)


def test_sharpness_against_numpy_smoothing(crops):
    for a in crops:
        x = a.astype(np.int64)
        pad = np.pad(x, ((1, 1), (1, 1), (0, 0)))
        box = sum(pad[dy : dy + 60, dx : dx + 60] for dy in range(3) for dx in range(3))
        smooth = np.floor((box + 4 * x) / 13 + 0.5).astype(np.int64)  # SMOOTH: centre 5, /13
        smooth[0], smooth[-1], smooth[:, 0], smooth[:, -1] = x[0], x[-1], x[:, 0], x[:, -1]
        for f in (0.14, 0.86):
            np.testing.assert_array_equal(_arr(ah.sharpness(_pil(a), f)), _blend(smooth, x, f))


def test_histogram_ops_against_numpy(crops):
    for a in crops:
        im = _pil(a)
        for bits in (4, 5, 6, 7):
            mask = 256 - (1 << (8 - bits))
            np.testing.assert_array_equal(_arr(ah.posterize(im, bits)), a & mask)
        for threshold in (26, 128, 231):
            expected = np.where(a < threshold, a, 255 - a)
            np.testing.assert_array_equal(_arr(ah.solarize(im, threshold)), expected)
        lo, hi = a.min(axis=(0, 1)).astype(float), a.max(axis=(0, 1)).astype(float)
        scale = 255.0 / (hi - lo)
        expected = np.clip(np.trunc(a * scale - lo * scale), 0, 255)
        np.testing.assert_array_equal(_arr(ah.auto_contrast(im)), expected)
        np.testing.assert_array_equal(_arr(ah.equalize(im)), _arr(PIL.ImageOps.equalize(im)))
        assert len(np.unique(_arr(ah.equalize(im))[..., 0])) > 10


def test_equalize_spreads_a_skewed_histogram():
    a = np.zeros((60, 60, 3), np.uint8)
    a[:, :30] = 10
    a[:, 30:45] = 20
    a[:, 45:] = 30
    out = _arr(ah.equalize(_pil(a)))
    # Cumulative counts before each level: 0, 1800, 2700 of 3600; step = (3600-900)//256.
    step = (3600 - 900) // 256
    assert out[0, 0, 0] == (step // 2) // step == 0
    assert out[0, 40, 0] == (step // 2 + 1800) // step
    assert out[0, 50, 0] == min(255, (step // 2 + 2700) // step)


def _nearest_affine(a, map_xy):
    """Output (x, y) takes input floor(map(x + 0.5, y + 0.5)); black outside."""
    h, w = a.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w]
    sx, sy = map_xy(xs + 0.5, ys + 0.5)
    sx, sy = np.floor(sx).astype(int), np.floor(sy).astype(int)
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    out = a[np.clip(sy, 0, h - 1), np.clip(sx, 0, w - 1)]
    return np.where(inside[..., None], out, 0)


def test_geometric_ops_against_numpy_sampling(crops):
    for a in crops:
        im = _pil(a)
        for t in (1, 9, -16):
            exp_x = np.zeros_like(a)
            exp_y = np.zeros_like(a)
            if t > 0:
                exp_x[:, :-t], exp_y[:-t] = a[:, t:], a[t:]
            else:
                exp_x[:, -t:], exp_y[-t:] = a[:, :t], a[:t]
            np.testing.assert_array_equal(_arr(ah.translate_x(im, t)), exp_x)
            np.testing.assert_array_equal(_arr(ah.translate_y(im, t)), exp_y)
        # s = 0.27 and -0.15 keep every sample >= 0.005 px from a pixel edge, so PIL's 16.16
        # fixed point cannot change a pick: the comparison is exact.
        for s in (0.27, -0.15):
            np.testing.assert_array_equal(
                _arr(ah.shear_x(im, s)), _nearest_affine(a, lambda x, y, s=s: (x + s * y, y))
            )
            np.testing.assert_array_equal(
                _arr(ah.shear_y(im, s)), _nearest_affine(a, lambda x, y, s=s: (x, s * x + y))
            )
        np.testing.assert_array_equal(_arr(ah.rotate(im, 90)), np.rot90(a))  # counter-clockwise
        for degrees in (27, -12):
            th = math.radians(degrees)
            c, s_ = math.cos(th), math.sin(th)

            def inverse(x, y, c=c, s_=s_):  # rotate output coords back by -degrees
                return c * (x - 30) - s_ * (y - 30) + 30, s_ * (x - 30) + c * (y - 30) + 30

            got = _arr(ah.rotate(im, degrees))
            # Fixed point can flip a pick right at a pixel edge: allow a few such pixels.
            assert (got != _nearest_affine(a, inverse)).any(-1).mean() < 0.01
            assert (got[0, 0] == 0).all() and (got[30, 30] == a[30, 30]).all()


def test_hue_shift_against_pil_hsv(crops):
    for a in crops:
        hsv = np.asarray(_pil(a).convert("HSV")).astype(np.int64)
        for hue, shift in ((0.05, 12), (-0.1, -25), (0.0999, 25), (-0.002, 0)):
            hsv_shifted = hsv.copy()
            hsv_shifted[..., 0] = (hsv[..., 0] + shift) % 256
            expected = PIL.Image.fromarray(hsv_shifted.astype(np.uint8), "HSV").convert("RGB")
            np.testing.assert_array_equal(_arr(ah.adjust_hue(_pil(a), hue)), _arr(expected))


def test_color_jitter_applies_in_the_given_order(crops):
    im = _pil(crops[0])
    b, c, s, h = 1.3, 0.7, 1.2, 0.05
    by_op = [
        lambda x: PIL.ImageEnhance.Brightness(x).enhance(b),
        lambda x: PIL.ImageEnhance.Contrast(x).enhance(c),
        lambda x: PIL.ImageEnhance.Color(x).enhance(s),
        lambda x: ah.adjust_hue(x, h),
    ]
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]):
        expected = im
        for i in order:
            expected = by_op[i](expected)
        np.testing.assert_array_equal(_arr(ah.color_jitter(im, order, b, c, s, h)), _arr(expected))
    assert not np.array_equal(
        _arr(ah.color_jitter(im, [0, 1, 2, 3], b, c, s, h)),
        _arr(ah.color_jitter(im, [3, 2, 1, 0], b, c, s, h)),
    )


def test_sample_color_jitter_ranges():
    rng = np.random.default_rng(0)
    draws = [ah.sample_color_jitter(rng) for _ in range(500)]
    assert all(sorted(d[0].tolist()) == [0, 1, 2, 3] for d in draws)
    factors = np.array([d[1:] for d in draws])
    assert factors[:, :3].min() >= 0.6 and factors[:, :3].max() <= 1.4
    assert factors[:, 3].min() >= -0.1 and factors[:, 3].max() <= 0.1
    assert len({tuple(d[0].tolist()) for d in draws}) == 24  # all orders occur


# ----------------------------------------------------------------------------- cutout


def test_cutout_geometry():
    black = _pil(np.zeros((60, 60, 3), np.uint8))
    grey = lambda im: (_arr(im) == 127).all(-1)  # noqa: E731
    patch = grey(ah.cutout(black, 30.5, 20.2))
    ys, xs = np.nonzero(patch)
    assert patch.sum() == 17 * 17  # inclusive PIL rectangle
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (22, 38, 12, 28)
    assert grey(ah.cutout(black, 2.0, 3.0)).sum() == 17 * 17  # x0 = y0 = 0, x1 = y1 = 16
    corner = grey(ah.cutout(black, 59.0, 59.9))  # x0 = y0 = 51, x1 = y1 = 60: clipped
    assert corner.sum() == 9 * 9 and corner[51:, 51:].all()
    edge = grey(ah.cutout(black, 58.0, 30.0))  # x0 = 50 -> columns 50..59
    assert edge.sum() == 10 * 17


# ----------------------------------------------------------------------------- RandAugment draws


def test_randaugment_draw_frequencies():
    rng = np.random.default_rng(0)
    n_draws = 4000
    names, applied, params, centres = [], [], [], []
    for _ in range(n_draws):
        ops, centre = ah.sample_randaugment(rng)
        assert len(ops) == 2
        for name, param, app in ops:
            names.append(name)
            applied.append(app)
            params.append((name, param))
        centres.append(centre)
    applied = np.array(applied)
    sigma = math.sqrt(0.25 / applied.size)
    assert abs(applied.mean() - 0.5) < 4 * sigma
    counts = np.array([names.count(n) for n in spec.RANDAUGMENT_OPS])
    expected = len(names) / 14
    assert (np.abs(counts - expected) < 5 * math.sqrt(expected)).all()
    # Magnitudes cover v = 1..9 only (docs/method.md#q11-randaugment-magnitudes): the parameters are
    # exactly the table's values.
    rotations = {abs(p) for n, p in params if n == "rotate"}
    assert rotations == {3 * v for v in range(1, 10)}
    solarize = {p for n, p in params if n == "solarize"}
    assert solarize == {spec.op_parameter("solarize", v) for v in range(1, 10)}
    signs = [p > 0 for n, p in params if n == "translate_x"]
    assert 0.4 < np.mean(signs) < 0.6
    centres = np.array(centres)
    assert centres.min() >= 0 and centres.max() < 60 and abs(centres.mean() - 30) < 1.5


# ----------------------------------------------------------------------------- streams


def test_streams_shapes_and_non_square_input(wide_image):
    rng = np.random.default_rng(0)
    for name, fn in ah.STREAMS.items():
        for _ in range(5):
            out = fn(wide_image, rng)
            assert out.shape == (60, 60, 3) and out.dtype == np.uint8, name
    assert ah.test_view(wide_image).shape == (60, 60, 3)


def test_streams_and_test_view_honour_crop_size(wide_image):
    params = spec.AugmentParams(crop_size=56)
    for name in ah.STREAMS:
        out = ah.view_fn(name, params)(wide_image, np.random.default_rng(0))
        assert out.shape == (56, 56, 3) and out.dtype == np.uint8, name
    # CenterCrop(56) of 66x64: top = round(5) = 5, left = round(4) = 4.
    np.testing.assert_array_equal(ah.test_view(wide_image, crop_size=56), wide_image[5:61, 4:60])
    strong0 = ah.view_fn("u_s0", spec.AugmentParams(randaugment_n=1, cutout=4))
    assert strong0.keywords == {"crop_size": 60, "n": 1, "m": 10, "cutout": 4}


def test_streams_are_deterministic_given_the_generator(wide_image):
    for name, fn in ah.STREAMS.items():
        first = fn(wide_image, np.random.default_rng(123))
        again = fn(wide_image, np.random.default_rng(123))
        np.testing.assert_array_equal(first, again)
        others = [fn(wide_image, np.random.default_rng(s)) for s in range(1, 6)]
        assert any(not np.array_equal(first, o) for o in others), name


def test_weak_view_flip_frequency(wide_image):
    rng = np.random.default_rng(1)
    plain = ah.test_view(wide_image)
    flipped = ah.test_view(wide_image[:, ::-1].copy())
    outs = [ah.weak_view(wide_image, rng) for _ in range(2000)]
    n_plain = sum(np.array_equal(o, plain) for o in outs)
    n_flip = sum(np.array_equal(o, flipped) for o in outs)
    assert n_plain + n_flip == 2000
    assert abs(n_flip / 2000 - 0.5) < 4 * math.sqrt(0.25 / 2000)


def test_strong1_jitter_and_grayscale_frequencies():
    """On a flat colour image crops and flips change nothing, so the output tells which of
    jitter (p 0.8) and grayscale (p 0.2) ran: unchanged = neither (p 0.16), grey = gray."""
    flat = np.zeros((64, 64, 3), np.uint8)
    flat[:] = (200, 90, 40)
    rng = np.random.default_rng(2)
    n = 1500
    outs = [ah.strong1_view(flat, rng)[0, 0].astype(int) for _ in range(n)]
    grey = np.mean([o[0] == o[1] == o[2] for o in outs])
    unchanged = np.mean([tuple(o) == (200, 90, 40) for o in outs])
    assert abs(grey - 0.2) < 4 * math.sqrt(0.2 * 0.8 / n)
    # A jitter can leave the colour unchanged only if all four factors are ~identity (rare).
    assert abs(unchanged - 0.16) < 4 * math.sqrt(0.16 * 0.84 / n)


def test_strong0_always_has_a_cutout():
    flat = np.zeros((64, 64, 3), np.uint8)
    flat[:] = (255, 0, 255)  # no RandAugment op turns magenta into grey (127, 127, 127)
    rng = np.random.default_rng(3)
    for _ in range(200):
        count = (ah.strong0_view(flat, rng) == 127).all(-1).sum()
        assert 9 * 9 <= count <= 17 * 17
