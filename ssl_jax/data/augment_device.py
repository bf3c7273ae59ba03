"""The four training views and the test view as pure JAX, run inside the jitted train step.

Same pipelines, probabilities and magnitude tables as the PIL host version
(`augment_host.py`, ALGORITHMS.md §2.4-§2.5), on uint8 images gathered from a dataset cached
on the device. Images keep the aspect rule (shorter side 64, e.g. 64x66), so the cache is a
padded (N, Hmax, Wmax, 3) uint8 array plus each image's true (height, width); flips, centre
crops and random resized crops use the true frame.

Where PIL's arithmetic is integer (flips, crops, cutout, posterize, solarize, equalize, "L"
conversion, the 3x3 smoothing filter, nearest-neighbour affine warps in 16.16 fixed point,
bilinear resampling with 22-bit fixed-point weights) it is reproduced exactly. Where PIL
rounds a float or double computation (autocontrast's LUT, RGB->HSV hue) the exact rational
result is computed with integers and a small table, built once from the same arithmetic (or
PIL itself), patches the entries where PIL's rounding lands one grey level lower. The
float32 blends of the enhancers (brightness, colour, contrast, sharpness) reproduce PIL's
two roundings even where the backend fuses multiply-add (see `_blend`). So every op matches
PIL bit for bit on the images tested; only the random draws differ (JAX keys, not NumPy).
dm-pix was considered: its flips would do, but its affine warps, colour enhancers and
resizing interpolate in floating point with their own conventions, so they would not match
the PIL semantics the reference trains with; hence the ops here.

Every op works on a static-shape uint8 (H, W, 3) image and returns uint8, so the views jit,
vmap (one key per example) and choose RandAugment ops with `lax.switch` (a select under vmap).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

from ssl_jax.data import augment_host

CROP_SIZE = augment_host.CROP_SIZE
RANDAUGMENT_OPS = augment_host.RANDAUGMENT_OPS
STREAM_IDS = {"x": 0, "u_w": 1, "u_s0": 2, "u_s1": 3}  # fold-in ids: a view's key never
# depends on which other views were asked for
_PRECISION_BITS = 22  # PIL Resample.c: 32 - 8 - 2
_MAX_ROTATION = 45  # rotate() tabulates integer angles in [-45, 45]; RandAugment uses <= 27


def _u8(x):
    return jnp.clip(x, 0, 255).astype(jnp.uint8)


# ----------------------------------------------------------------------------- geometry


def hflip(image, size_hw):
    """Flip the true (h, w) frame of a padded image left-right; padding stays where it is."""
    cols = jnp.arange(image.shape[1])
    width = size_hw[1]
    return jnp.take(image, jnp.where(cols < width, width - 1 - cols, cols), axis=1)


def center_crop(image, size_hw, size: int = CROP_SIZE):
    """torchvision CenterCrop on the true frame: offsets round((h - size) / 2), half to even."""
    top = jnp.round((size_hw[0] - size) / 2).astype(jnp.int32)
    left = jnp.round((size_hw[1] - size) / 2).astype(jnp.int32)
    return jax.lax.dynamic_slice(image, (top, left, 0), (size, size, image.shape[2]))


def _resample_weights(start, length, in_frame: int, out_size: int):
    """PIL's bilinear resampling weights as (out_size, in_frame) int32, 22-bit fixed point.

    Input pixels [start, start + length) are resized to out_size. PIL evaluates a triangle of
    half-width max(1, length/out_size) at (k + 0.5 - center) in double and normalises. Over
    the common denominator 2 * max(out, length) every weight has an integer numerator, so the
    exact rational weights (which never sit on a rounding tie) quantise to PIL's integers.
    Valid while max(out, length) < 256 (numerators below 2^9, so numerator << 22 fits int32).
    """
    k = jnp.arange(in_frame)[None, :] - start
    o = jnp.arange(out_size)[:, None]
    denom = 2 * jnp.maximum(out_size, length)
    numer = jnp.maximum(0, denom - jnp.abs((2 * k + 1) * out_size - (2 * o + 1) * length))
    numer = jnp.where((k >= 0) & (k < length), numer, 0)
    total = jnp.maximum(numer.sum(axis=1, keepdims=True), 1)
    scaled = numer << _PRECISION_BITS
    quotient = scaled // total
    remainder = scaled - quotient * total
    return (quotient + (2 * remainder >= total)).astype(jnp.int32)


def _apply_fixed_point(weights, image, axis: int):
    """Sum_k weights[o, k] * image[.., k, ..] with PIL's rounding, exactly, via float matmuls.

    The 22-bit weights are split into 11-bit halves so every partial sum is an integer below
    2^24 (exact in float32 at full precision); the halves recombine in int32.
    """
    x = image.astype(jnp.float32)
    hi = (weights >> 11).astype(jnp.float32)
    lo = (weights & 2047).astype(jnp.float32)
    spec = "ok,kxc->oxc" if axis == 0 else "ok,ykc->yoc"
    hp = jax.lax.Precision.HIGHEST
    s_hi = jnp.einsum(spec, hi, x, precision=hp).astype(jnp.int32)
    s_lo = jnp.einsum(spec, lo, x, precision=hp).astype(jnp.int32)
    total = (s_hi << 11) + s_lo + (1 << (_PRECISION_BITS - 1))
    return _u8(total >> _PRECISION_BITS)


def vertical_pass_first(height, width, out_height: int, out_width: int):
    """Pillow 13's pass order for a two-pass resize (each pass rounds to uint8, so it matters).

    Found by comparing PIL with both orders over ~2,700 (box, output) shapes, no exception:
    vertical first iff the height shrinks and 2 * (width - out_w) < height - out_h.
    """
    return (height > out_height) & (2 * (width - out_width) < height - out_height)


def resized_crop(image, box, size: int = CROP_SIZE):
    """torchvision F.resized_crop on PIL: crop (top, left, h, w), PIL bilinear to size x size.

    Two separable passes, each rounding to uint8, in PIL's order; both orders are computed
    and one selected, so the shapes stay static.
    """
    top, left, height, width = box
    wx = _resample_weights(left, width, image.shape[1], size)
    wy = _resample_weights(top, height, image.shape[0], size)
    horizontal_first = _apply_fixed_point(wy, _apply_fixed_point(wx, image, axis=1), axis=0)
    vertical_first = _apply_fixed_point(wx, _apply_fixed_point(wy, image, axis=0), axis=1)
    return jnp.where(
        vertical_pass_first(height, width, size, size), vertical_first, horizontal_first
    )


def sample_resized_crop_box(
    key, height, width, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), attempts: int = 10
):
    """RandomResizedCrop.get_params with all 10 attempts drawn at once; first valid wins."""
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    height = jnp.asarray(height, jnp.int32)
    width = jnp.asarray(width, jnp.int32)
    area = (height * width).astype(jnp.float32)
    target = area * jax.random.uniform(k_area, (attempts,), minval=scale[0], maxval=scale[1])
    log_r = jax.random.uniform(
        k_ratio, (attempts,), minval=math.log(ratio[0]), maxval=math.log(ratio[1])
    )
    aspect = jnp.exp(log_r)
    ws = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)  # round half to even
    hs = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
    ok = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
    first = jnp.argmax(ok)
    # Fallback: central crop, aspect clamped to `ratio`.
    in_ratio = width.astype(jnp.float32) / height.astype(jnp.float32)
    fb_w = jnp.where(in_ratio > max(ratio), jnp.round(height * max(ratio)).astype(jnp.int32), width)
    fb_h = jnp.where(in_ratio < min(ratio), jnp.round(width / min(ratio)).astype(jnp.int32), height)
    found = ok.any()
    w = jnp.where(found, ws[first], fb_w)
    h = jnp.where(found, hs[first], fb_h)
    top = jnp.where(found, jax.random.randint(k_top, (), 0, height - h + 1), (height - h) // 2)
    left = jnp.where(found, jax.random.randint(k_left, (), 0, width - w + 1), (width - w) // 2)
    return top, left, h, w


# ----------------------------------------------------------------------------- colour


def to_gray(image):
    """PIL "L": (19595 R + 38470 G + 7471 B + 2^15) >> 16, as int32 (..., H, W)."""
    x = image.astype(jnp.int32)
    return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 32768) >> 16


def grayscale(image):
    return jnp.repeat(to_gray(image)[..., None], 3, axis=-1).astype(jnp.uint8)


def _blend(degenerate, image, factor):
    """PIL Image.blend in float32: trunc(d + fl(f * (x - d))), clipped to 0..255.

    PIL rounds the product before the add; a backend that fuses them into one FMA rounds
    once and differs by a grey level near integers. Splitting f into two 12-bit halves makes
    both partial products exact, so fl(hi*diff + lo*diff) is PIL's rounded product whether
    or not the compiler fuses (checked exhaustively over all (d, x) pairs in the tests).
    """
    d = degenerate.astype(jnp.float32)
    diff = image.astype(jnp.float32) - d
    factor = jnp.asarray(factor, jnp.float32)
    bits = jax.lax.bitcast_convert_type(factor, jnp.uint32) & jnp.uint32(0xFFFFF000)
    factor_hi = jax.lax.bitcast_convert_type(bits, jnp.float32)
    factor_lo = factor - factor_hi
    return _u8(jnp.trunc(d + (factor_hi * diff + factor_lo * diff)))


def brightness(image, factor):
    return _blend(jnp.zeros_like(image), image, factor)


def color(image, factor):
    return _blend(grayscale(image), image, factor)


def contrast(image, factor):
    """Blend with the flat image of the luma mean rounded half up (ImageStat + 0.5)."""
    gray = to_gray(image)
    count = gray.size
    mean = (2 * gray.sum() + count) // (2 * count)
    return _blend(jnp.full_like(image, mean), image, factor)


def _smooth(image):
    """ImageFilter.SMOOTH (3x3, centre 5, /13, +0.5 then truncate); the border is copied.

    The float32 kernel sum is never within 1/26 of a rounding boundary, so the integer
    formula floor((2 * sum + 13) / 26) is PIL's result.
    """
    x = image.astype(jnp.int32)
    padded = jnp.pad(x, ((1, 1), (1, 1), (0, 0)))
    h, w = image.shape[:2]
    box = sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))
    smoothed = (2 * (box + 4 * x) + 13) // 26
    rows = jnp.arange(h)[:, None, None]
    cols = jnp.arange(w)[None, :, None]
    interior = (rows > 0) & (rows < h - 1) & (cols > 0) & (cols < w - 1)
    return jnp.where(interior, smoothed, x).astype(jnp.uint8)


def sharpness(image, factor):
    return _blend(_smooth(image), image, factor)


def _hue_case_and_gaps(r, g, b, xp=jnp):
    """PIL's hue depends only on which channel is the max (r first, then g, then b) and on
    the two other channels' distances to it; returns a flat index into a (3, 256, 256) table."""
    mx = xp.maximum(r, xp.maximum(g, b))
    case = xp.where(r == mx, 0, xp.where(g == mx, 1, 2))
    gap1 = xp.where(case == 0, mx - g, mx - r)
    gap2 = xp.where(case == 2, mx - g, mx - b)
    return (case * 256 + gap1) * 256 + gap2


@functools.cache
def _hue_corrections() -> np.ndarray:
    """(3*256*256,) bool: where PIL's float hue is one below the exact floor(255 * hue).

    PIL's float arithmetic sees only the case and the two gaps (see _hue_case_and_gaps), so
    one colour per entry (max channel 255) and one PIL conversion of those 196k colours give
    the table (432 entries are set with Pillow 13); the tests check it against PIL on every
    colour whose exact hue is an integer (the only ones float rounding can push down).
    """
    case = np.repeat(np.arange(3), 65536)
    gap1 = np.tile(np.repeat(np.arange(256), 256), 3)
    gap2 = np.tile(np.arange(256), 768)
    full = np.full_like(case, 255)
    r = np.where(case == 0, full, full - gap1)
    g = np.where(case == 0, full - gap1, np.where(case == 1, full, full - gap2))
    b = np.where(case == 2, full, full - gap2)
    # Rows that cannot occur (e.g. case 1 with r == max) are simply never looked up.
    valid = (case == 0) | ((case == 1) & (gap1 > 0)) | ((case == 2) & (gap1 > 0) & (gap2 > 0))
    rgb = np.stack([r, g, b], -1)
    pil_hue = np.asarray(PIL.Image.fromarray(rgb.astype(np.uint8)[None], "RGB").convert("HSV"))
    hue, _, _ = _exact_hue_np(rgb)
    return valid & (pil_hue[0, :, 0].astype(np.int64) != hue)


def _exact_hue_np(rgb):
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    mx = np.maximum(r, np.maximum(g, b))
    chroma = mx - np.minimum(r, np.minimum(g, b))
    num = np.where(r == mx, g - b, np.where(g == mx, 2 * chroma + b - r, 4 * chroma + r - g))
    den = np.maximum(6 * chroma, 1)
    num = (num + den) % den
    return np.where(chroma == 0, 0, 255 * num // den), (255 * num) % den == 0, chroma


def _in_sorted(table, keys):
    table = jnp.asarray(table)
    idx = jnp.clip(jnp.searchsorted(table, keys), 0, table.shape[0] - 1)
    return table[idx] == keys


def _floordiv(a, b):
    """Exact floor(a / b) for int32 0 <= a < 2^26, b > 0: a float32 quotient, then a +-1 fix.

    Integer division does not vectorise on CPUs and is slow on GPUs; this is a multiply-free
    float divide plus two integer compares.
    """
    q = jnp.floor(a.astype(jnp.float32) / b.astype(jnp.float32)).astype(jnp.int32)
    return q - (q * b > a).astype(jnp.int32) + ((q + 1) * b <= a).astype(jnp.int32)


def _rgb_to_hsv_planes(image):
    x = image.astype(jnp.int32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    mx = jnp.maximum(r, jnp.maximum(g, b))
    chroma = mx - jnp.minimum(r, jnp.minimum(g, b))
    # Hue as a fraction num / (6 * chroma) of the circle, num in [0, 6 * chroma).
    red_num = jnp.where(g >= b, g - b, g - b + 6 * chroma)
    num = jnp.where(r == mx, red_num, jnp.where(g == mx, 2 * chroma + b - r, 4 * chroma + r - g))
    den = jnp.maximum(6 * chroma, 1)
    hue = _floordiv(255 * num, den)
    low = jnp.asarray(_hue_corrections())[_hue_case_and_gaps(r, g, b)]
    hue = jnp.where(chroma == 0, 0, hue - low.astype(jnp.int32))
    sat = jnp.where(chroma == 0, 0, _floordiv(255 * chroma, jnp.maximum(mx, 1)))
    return hue, sat, mx


def rgb_to_hsv(image):
    """PIL RGB -> HSV (8-bit H, S, V) as int32 (H, W, 3); exact, including PIL's rounding."""
    return jnp.stack(_rgb_to_hsv_planes(image), axis=-1)


def _hsv_planes_to_rgb(h, s, v):
    sector = _floordiv(6 * h, jnp.full_like(h, 255))
    frac = 6 * h - 255 * sector  # f * 255

    def rnd(n, d):  # n / d rounded half up, n >= 0
        return _floordiv(2 * n + d, jnp.full_like(n, 2 * d))

    p = rnd(v * (255 - s), 255)
    q = rnd(v * (65025 - s * frac), 65025)
    t = rnd(v * (65025 - s * (255 - frac)), 65025)
    sector = sector % 6

    def pick(c0, c1, c2, c3, c4, c5):
        first = jnp.where(sector == 0, c0, jnp.where(sector == 1, c1, c2))
        last = jnp.where(sector == 3, c3, jnp.where(sector == 4, c4, c5))
        return jnp.where(sector < 3, first, last)

    rgb = jnp.stack([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)], -1)
    return _u8(jnp.where((s == 0)[..., None], v[..., None], rgb))


def hsv_to_rgb(hsv):
    """PIL HSV -> RGB; PIL's float/double rounding equals exact half-up rounding here."""
    return _hsv_planes_to_rgb(hsv[..., 0], hsv[..., 1], hsv[..., 2])


def adjust_hue(image, hue):
    """torchvision adjust_hue on PIL: H channel += trunc(hue * 255), modulo 256."""
    h, s, v = _rgb_to_hsv_planes(image)
    shift = jnp.trunc(jnp.asarray(hue, jnp.float32) * 255).astype(jnp.int32)
    return _hsv_planes_to_rgb((h + shift) & 255, s, v)


def color_jitter(image, order, brightness_factor, contrast_factor, saturation_factor, hue):
    """ColorJitter with explicit factors; `order` is a permutation of 0..3 (b, c, s, h)."""
    branches = (
        lambda img: brightness(img, brightness_factor),
        lambda img: contrast(img, contrast_factor),
        lambda img: color(img, saturation_factor),
        lambda img: adjust_hue(img, hue),
    )
    # A loop, not four unrolled switches: under vmap each switch becomes a select over all
    # branches, and unrolled stages let XLA fuse (and recompute) one stage inside the next.
    return jax.lax.fori_loop(
        0, 4, lambda stage, img: jax.lax.switch(order[stage], branches, img), image
    )


def sample_color_jitter(key, b=0.4, c=0.4, s=0.4, h=0.1):
    k_order, k_b, k_c, k_s, k_h = jax.random.split(key, 5)
    order = jax.random.permutation(k_order, 4)
    return (
        order,
        jax.random.uniform(k_b, minval=1 - b, maxval=1 + b),
        jax.random.uniform(k_c, minval=1 - c, maxval=1 + c),
        jax.random.uniform(k_s, minval=1 - s, maxval=1 + s),
        jax.random.uniform(k_h, minval=-h, maxval=h),
    )


# ----------------------------------------------------------------------------- RandAugment ops


@functools.cache
def _autocontrast_corrections() -> np.ndarray:
    """Sorted keys lo<<16|hi<<8|i where PIL's double LUT, int(i*scale + offset), is one below
    the exact floor((i - lo) * 255 / (hi - lo)) (values whose exact result is an integer)."""
    ix = np.arange(256, dtype=np.float64)[None, :]
    hi = np.arange(256)[:, None]
    keys = []
    for lo in range(255):
        his = hi[lo + 1 :]
        scale = 255.0 / (his - lo).astype(np.float64)
        offset = -lo * scale
        pil = np.clip(np.trunc(ix * scale + offset), 0, 255).astype(np.int64)
        num = (np.arange(256)[None, :] - lo) * 255
        exact = np.clip(np.where(num >= 0, num // (his - lo), 0), 0, 255)
        rows, cols = np.nonzero(pil != exact)
        keys.append((lo << 16) | (his[rows, 0] << 8) | cols)
    return np.sort(np.concatenate(keys)).astype(np.int32)


def auto_contrast(image, _param=None):
    """ImageOps.autocontrast (cutoff 0): stretch each channel's [min, max] to [0, 255]."""
    x = image.astype(jnp.int32)
    lo = x.min(axis=(0, 1))  # (3,)
    hi = x.max(axis=(0, 1))
    ix = jnp.arange(256)[:, None]  # (256, 1) x (3,) channels
    num = (ix - lo) * 255
    lut = jnp.clip(jnp.where(num >= 0, num // jnp.maximum(hi - lo, 1), 0), 0, 255)
    low = _in_sorted(_autocontrast_corrections(), (lo << 16) | (hi << 8) | ix)
    lut = jnp.where(hi > lo, lut - low.astype(jnp.int32), ix)
    return jnp.take_along_axis(lut, x.reshape(-1, 3), axis=0).reshape(x.shape).astype(jnp.uint8)


def equalize(image, _param=None):
    """ImageOps.equalize per channel (integer arithmetic, as PIL)."""

    def channel(values):
        hist = jnp.zeros(256, jnp.int32).at[values].add(1)
        nonzero = hist > 0
        last = 255 - jnp.argmax(nonzero[::-1])
        step = (values.size - hist[last]) // 256
        below = jnp.cumsum(hist) - hist
        lut = jnp.minimum((step // 2 + below) // jnp.maximum(step, 1), 255)
        keep = (nonzero.sum() <= 1) | (step == 0)
        return jnp.where(keep, jnp.arange(256), lut)[values]

    flat = image.reshape(-1, 3).astype(jnp.int32)
    out = jax.vmap(channel, in_axes=1, out_axes=1)(flat)
    return out.reshape(image.shape).astype(jnp.uint8)


def identity(image, _param=None):
    return image


def posterize(image, bits):
    shift = 8 - jnp.asarray(bits, jnp.int32)
    return ((image.astype(jnp.int32) >> shift) << shift).astype(jnp.uint8)


def solarize(image, threshold):
    x = image.astype(jnp.int32)
    return jnp.where(x < threshold, x, 255 - x).astype(jnp.uint8)


def _affine_nearest(image, fixed):
    """PIL affine_fixed: 16.16 fixed-point coefficients (a0..a5), nearest, black outside."""
    a0, a1, a2, a3, a4, a5 = (fixed[i] for i in range(6))
    h, w = image.shape[:2]
    y = jnp.arange(h)[:, None]
    x = jnp.arange(w)[None, :]
    xin = (a2 + y * a1 + x * a0) >> 16
    yin = (a5 + y * a4 + x * a3) >> 16
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    out = image[jnp.clip(yin, 0, h - 1), jnp.clip(xin, 0, w - 1)]
    return jnp.where(inside[..., None], out, 0).astype(image.dtype)


def _fix(v):
    return jnp.floor(v * 65536.0 + 0.5).astype(jnp.int32)


@functools.lru_cache(maxsize=8)
def _rotation_table(height: int, width: int) -> np.ndarray:
    """(2*45+1, 6) int32: PIL Image.rotate's fixed-point matrix for integer angles -45..45,
    computed with PIL's own double arithmetic (so the integers are PIL's)."""
    rows = []
    for degrees in range(-_MAX_ROTATION, _MAX_ROTATION + 1):
        angle = -math.radians(degrees % 360.0)
        m = [
            round(math.cos(angle), 15),
            round(math.sin(angle), 15),
            0.0,
            round(-math.sin(angle), 15),
            round(math.cos(angle), 15),
            0.0,
        ]
        cx, cy = width / 2, height / 2
        m[2] = m[0] * -cx + m[1] * -cy + m[2] + cx
        m[5] = m[3] * -cx + m[4] * -cy + m[5] + cy
        fix = lambda v: math.floor(v * 65536.0 + 0.5)
        rows.append(
            [
                fix(m[0]),
                fix(m[1]),
                fix(m[2] + m[0] * 0.5 + m[1] * 0.5),
                fix(m[3]),
                fix(m[4]),
                fix(m[5] + m[3] * 0.5 + m[4] * 0.5),
            ]
        )
    return np.asarray(rows, np.int32)


def rotate(image, degrees):
    """Image.rotate(degrees): integer degrees in [-45, 45], counter-clockwise, same size."""
    table = jnp.asarray(_rotation_table(*image.shape[:2]))
    index = jnp.clip(jnp.asarray(degrees, jnp.int32) + _MAX_ROTATION, 0, 2 * _MAX_ROTATION)
    return _affine_nearest(image, table[index])


def shear_x(image, s):
    """Output (x, y) samples input (x + s*y, y), PIL fixed point."""
    s = jnp.asarray(s, jnp.float32)
    one = jnp.int32(65536)
    zero = jnp.int32(0)
    fixed = jnp.stack([one, _fix(s), _fix(0.5 + s * 0.5), zero, one, jnp.int32(32768)])
    return _affine_nearest(image, fixed)


def shear_y(image, s):
    """Output (x, y) samples input (x, s*x + y), PIL fixed point."""
    s = jnp.asarray(s, jnp.float32)
    one = jnp.int32(65536)
    zero = jnp.int32(0)
    fixed = jnp.stack([one, zero, jnp.int32(32768), _fix(s), one, _fix(s * 0.5 + 0.5)])
    return _affine_nearest(image, fixed)


def translate_x(image, pixels):
    """Output (x, y) samples input (x + pixels, y); black where that is outside."""
    w = image.shape[1]
    src = jnp.arange(w) + jnp.asarray(pixels, jnp.int32)
    out = jnp.take(image, jnp.clip(src, 0, w - 1), axis=1)
    return jnp.where(((src >= 0) & (src < w))[None, :, None], out, 0).astype(image.dtype)


def translate_y(image, pixels):
    """Output (x, y) samples input (x, y + pixels); black where that is outside."""
    h = image.shape[0]
    src = jnp.arange(h) + jnp.asarray(pixels, jnp.int32)
    out = jnp.take(image, jnp.clip(src, 0, h - 1), axis=0)
    return jnp.where(((src >= 0) & (src < h))[:, None, None], out, 0).astype(image.dtype)


def cutout(image, cx, cy, size: int = 16):
    """Grey (127,127,127) square [x0, x1] x [y0, y1] inclusive (PIL rectangle), border-clipped."""
    h, w = image.shape[:2]
    x0 = jnp.floor(jnp.maximum(0.0, cx - size / 2.0)).astype(jnp.int32)
    y0 = jnp.floor(jnp.maximum(0.0, cy - size / 2.0)).astype(jnp.int32)
    x1 = jnp.minimum(w, x0 + size)
    y1 = jnp.minimum(h, y0 + size)
    ys = jnp.arange(h)[:, None]
    xs = jnp.arange(w)[None, :]
    inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    return jnp.where(inside[..., None], jnp.uint8(127), image)


_OPS = {
    "auto_contrast": auto_contrast,
    "brightness": brightness,
    "color": color,
    "contrast": contrast,
    "equalize": equalize,
    "identity": identity,
    "posterize": posterize,
    "rotate": rotate,
    "sharpness": sharpness,
    "shear_x": shear_x,
    "shear_y": shear_y,
    "solarize": solarize,
    "translate_x": translate_x,
    "translate_y": translate_y,
}
_IDENTITY_INDEX = RANDAUGMENT_OPS.index("identity")


@functools.lru_cache(maxsize=8)
def _magnitude_tables(m: int, height: int, width: int) -> dict[str, np.ndarray]:
    """Each op's parameter for v = 0..m-1 and sign +1, from the host's op_parameter (one
    source of truth; float factors become float32 exactly as PIL's C blend receives them)."""
    tables = {}
    for name in RANDAUGMENT_OPS:
        values = [augment_host.op_parameter(name, v, 1, width, height) for v in range(m)]
        if values[0] is None:
            continue
        dtype = np.float32 if isinstance(values[1], float) else np.int32
        tables[name] = np.asarray(values, dtype)
    return tables


def _randaugment_branches(m: int, height: int, width: int):
    tables = _magnitude_tables(m, height, width)

    def branch(name):
        fn = _OPS[name]
        if name not in tables:
            return lambda img, v, sign: fn(img)
        table = jnp.asarray(tables[name])
        if name in augment_host.SIGNED_OPS:
            return lambda img, v, sign: fn(img, sign * table[v])
        return lambda img, v, sign: fn(img, table[v])

    return [branch(name) for name in RANDAUGMENT_OPS]


def randaugment(key, image, n: int = 2, m: int = 10, cutout_size: int = 16):
    """RandAugmentMC(n, m): n ops with replacement, v ~ U{1..m-1}, each applied with p 0.5,
    then always a cutout at a uniform centre."""
    h, w = image.shape[:2]
    branches = _randaugment_branches(m, h, w)
    k_op, k_v, k_apply, k_sign, k_x, k_y = jax.random.split(key, 6)
    ops = jax.random.randint(k_op, (n,), 0, len(RANDAUGMENT_OPS))
    magnitudes = jax.random.randint(k_v, (n,), 1, m)
    applied = jax.random.uniform(k_apply, (n,)) < 0.5
    signs = jnp.where(jax.random.uniform(k_sign, (n,)) < 0.5, -1, 1)
    chosen = jnp.where(applied, ops, _IDENTITY_INDEX)

    def step(i, img):  # a loop for the same reason as in color_jitter
        return jax.lax.switch(chosen[i], branches, img, magnitudes[i], signs[i])

    image = jax.lax.fori_loop(0, n, step, image)
    cx = jax.random.uniform(k_x, minval=0.0, maxval=w)
    cy = jax.random.uniform(k_y, minval=0.0, maxval=h)
    return cutout(image, cx, cy, cutout_size)


# ----------------------------------------------------------------------------- streams


def _flip_if(key, image, size_hw):
    return jnp.where(jax.random.uniform(key) < 0.5, hflip(image, size_hw), image)


def _random_resized_crop(key, image, size_hw):
    box = sample_resized_crop_box(key, size_hw[0], size_hw[1])
    return resized_crop(image, box)


def labelled_view(key, image, size_hw):
    """x: HFlip(0.5) -> RandomResizedCrop(60, scale 0.2-1). uint8 (60, 60, 3)."""
    k_flip, k_crop = jax.random.split(key)
    return _random_resized_crop(k_crop, _flip_if(k_flip, image, size_hw), size_hw)


def weak_view(key, image, size_hw):
    """u_w: HFlip(0.5) -> CenterCrop(60)."""
    return center_crop(_flip_if(key, image, size_hw), size_hw)


def strong0_view(key, image, size_hw, n: int = 2, m: int = 10, cutout: int = 16):
    """u_s0: HFlip(0.5) -> RandomResizedCrop(60) -> RandAugmentMC(n, m) incl. cutout."""
    k_flip, k_crop, k_ra = jax.random.split(key, 3)
    crop = _random_resized_crop(k_crop, _flip_if(k_flip, image, size_hw), size_hw)
    return randaugment(k_ra, crop, n, m, cutout)


def strong1_view(key, image, size_hw):
    """u_s1: RandomResizedCrop(60) -> HFlip(0.5) -> p0.8 ColorJitter(.4,.4,.4,.1) -> p0.2 gray."""
    k_crop, k_flip, k_apply, k_jitter, k_gray = jax.random.split(key, 5)
    crop = _random_resized_crop(k_crop, image, size_hw)
    crop = jnp.where(jax.random.uniform(k_flip) < 0.5, crop[:, ::-1], crop)
    jittered = color_jitter(crop, *sample_color_jitter(k_jitter))
    crop = jnp.where(jax.random.uniform(k_apply) < 0.8, jittered, crop)
    return jnp.where(jax.random.uniform(k_gray) < 0.2, grayscale(crop), crop)


def test_view(image, size_hw):
    """Evaluation: CenterCrop(60)."""
    return center_crop(image, size_hw)


test_view.__test__ = False  # a pipeline stage, not a pytest test, when imported into tests

STREAMS = {"x": labelled_view, "u_w": weak_view, "u_s0": strong0_view, "u_s1": strong1_view}


def augment_batch(
    key, images_cache, sizes, indices, stream: str, n: int = 2, m: int = 10, cutout: int = 16
):
    """One view for a batch gathered from the device cache: (b, 60, 60, 3) uint8.

    Example i gets key fold_in(key, i). `stream` in STREAMS or "test" (no randomness).
    """
    images = jnp.take(images_cache, indices, axis=0)
    size_hw = jnp.take(sizes, indices, axis=0).astype(jnp.int32)
    if stream == "test":
        return jax.vmap(test_view)(images, size_hw)
    if stream == "u_s0":
        fn = functools.partial(strong0_view, n=n, m=m, cutout=cutout)
    else:
        fn = STREAMS[stream]
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(indices.shape[0]))
    return jax.vmap(fn)(keys, images, size_hw)


def make_views(
    key,
    cache,
    sizes,
    x_index,
    u_index,
    views=("x", "u_w", "u_s0", "u_s1"),
    n: int = 2,
    m: int = 10,
    cutout: int = 16,
):
    """The step's views: "x" from x_index, the unlabelled ones from u_index (same images)."""
    out = {}
    for view in views:
        indices = x_index if view == "x" else u_index
        view_key = jax.random.fold_in(key, STREAM_IDS[view])
        out[view] = augment_batch(view_key, cache, sizes, indices, view, n, m, cutout)
    return out
