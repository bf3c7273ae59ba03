"""Geometry in pure JAX that matches PIL bit for bit: flips, centre crops, resized crops.

Images are uint8 (H, W, 3) frames of a padded device cache (`on_device.device_cache`) whose
true (height, width) is `size_hw`: flips and crops use the true frame, so an image keeps the
aspect rule (shorter side 64, e.g. 64x66) without being resized again.

PIL's bilinear resampling is integer arithmetic (22-bit fixed-point weights, two separable
passes each rounding to uint8, in an order that depends on the shapes); it is reproduced
exactly. dm-pix interpolates in floating point with its own conventions, so it would not
match the PIL semantics the reference trains with.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ssl_jax.data.augment_spec import CROP_SIZE

_PRECISION_BITS = 22  # PIL Resample.c: 32 - 8 - 2


def _u8(x):
    return jnp.clip(x, 0, 255).astype(jnp.uint8)


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
