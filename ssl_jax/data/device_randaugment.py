"""RandAugmentMC (docs/method.md#augmentation) in pure JAX: its 14 ops, matching PIL bit for bit.

The op names, their order and magnitude table are `augment_spec`'s (shared with the host);
this module implements every op under its name (the enhancers come from `device_colour`).
Integer PIL arithmetic (posterize, solarize, equalize, cutout, nearest-neighbour affine warps
in 16.16 fixed point) is reproduced exactly; autocontrast's double LUT is computed exactly
with integers and patched from a table where PIL's rounding lands one level lower. The ops
are chosen with `lax.switch`, so under vmap every op runs and one is selected.
"""

from __future__ import annotations

import functools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax.data.augment_spec import RANDAUGMENT_OPS, SIGNED_OPS, bind_ops, op_parameter
from ssl_jax.data.device_colour import (  # noqa: F401 (ops bound by name: bind_ops)
    brightness,
    color,
    contrast,
    sharpness,
)

_MAX_ROTATION = 45  # rotate() tabulates integer angles in [-45, 45]; RandAugment uses <= 27


def _in_sorted(table, keys):
    table = jnp.asarray(table)
    idx = jnp.clip(jnp.searchsorted(table, keys), 0, table.shape[0] - 1)
    return table[idx] == keys


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


# Looked up by name (augment_spec.RANDAUGMENT_OPS): the functions above and the enhancers.
RANDAUGMENT_FNS = bind_ops(sys.modules[__name__])
_IDENTITY_INDEX = RANDAUGMENT_OPS.index("identity")


@functools.lru_cache(maxsize=8)
def _magnitude_tables(m: int, height: int, width: int) -> dict[str, np.ndarray]:
    """Each op's parameter for v = 0..m-1 and sign +1, from augment_spec.op_parameter (one
    source of truth; float factors become float32 exactly as PIL's C blend receives them)."""
    tables = {}
    for name in RANDAUGMENT_OPS:
        values = [op_parameter(name, v, 1, width, height) for v in range(m)]
        if values[0] is None:
            continue
        dtype = np.float32 if isinstance(values[1], float) else np.int32
        tables[name] = np.asarray(values, dtype)
    return tables


def _randaugment_branches(m: int, height: int, width: int):
    tables = _magnitude_tables(m, height, width)

    def branch(name):
        fn = RANDAUGMENT_FNS[name]
        if name not in tables:
            return lambda img, v, sign: fn(img)
        table = jnp.asarray(tables[name])
        if name in SIGNED_OPS:
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

    def step(i, img):  # a loop: see device_colour.color_jitter
        return jax.lax.switch(chosen[i], branches, img, magnitudes[i], signs[i])

    image = jax.lax.fori_loop(0, n, step, image)
    cx = jax.random.uniform(k_x, minval=0.0, maxval=w)
    cy = jax.random.uniform(k_y, minval=0.0, maxval=h)
    return cutout(image, cx, cy, cutout_size)
