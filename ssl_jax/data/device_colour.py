"""Colour ops in pure JAX that match PIL bit for bit (docs/method.md#augmentation,
docs/method.md#streams).

Grayscale ("L"), the enhancers (brightness, colour, contrast, sharpness: float32 blends with
PIL's two roundings, see `_blend`), RGB<->HSV with PIL's 8-bit hue, and ColorJitter. Where PIL
rounds a float or double computation (RGB->HSV hue) the exact rational result is computed
with integers and a small table, built once from PIL itself, patches the entries where PIL's
rounding lands one grey level lower. Ops take and return uint8 (H, W, 3) images.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image


def _u8(x):
    return jnp.clip(x, 0, 255).astype(jnp.uint8)


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
