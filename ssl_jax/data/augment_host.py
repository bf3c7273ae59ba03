"""The four training views and the test view on the host, with PIL (docs/method.md#augmentation,
docs/method.md#streams).

PIL is the ground truth: the reference pipelines are torchvision transforms on PIL images, and
the device implementation (`augment_device.py`) is tested against these functions. Every op
takes its parameters explicitly so a test can pin them; the random draws live in separate
`sample_*` functions that take a `numpy.random.Generator`, so a stream is a deterministic
function of (image, generator state).

The op registry and magnitude table are `augment_spec`'s, shared with the device. Images: ops
take and return RGB `PIL.Image.Image`; the stream functions take uint8 (H, W, 3) numpy arrays
and return (crop_size, crop_size, 3) ones. Nothing here normalises: ToTensor/Normalize run on
the device (`ssl_jax/data/normalize.py`).
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageEnhance
import PIL.ImageOps

from ssl_jax.data import views
from ssl_jax.data.augment_spec import (
    CROP_SIZE,
    CUTOUT_FILL,
    DEFAULT_PARAMS,
    RANDAUGMENT_OPS,
    AugmentParams,
    bind_ops,
    op_parameter,
)

# ----------------------------------------------------------------------------- geometry


def resize_shorter(img: PIL.Image.Image, size: int = 64) -> PIL.Image.Image:
    """torchvision Resize(int): shorter side to `size`, longer side truncated, PIL bilinear."""
    width, height = img.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_w, new_h) == (width, height):
        return img
    return img.resize((new_w, new_h), PIL.Image.BILINEAR)


def hflip(img: PIL.Image.Image) -> PIL.Image.Image:
    return img.transpose(PIL.Image.FLIP_LEFT_RIGHT)


def center_crop_box(height: int, width: int, size: int = CROP_SIZE) -> tuple[int, int, int, int]:
    """torchvision CenterCrop offsets (Python's round, i.e. half to even) as (top, left, h, w)."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0)), size, size


def center_crop(img: PIL.Image.Image, size: int = CROP_SIZE) -> PIL.Image.Image:
    top, left, h, w = center_crop_box(img.height, img.width, size)
    return img.crop((left, top, left + w, top + h))


def sample_resized_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """RandomResizedCrop.get_params: (top, left, h, w), 10 tries then a central fallback."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    return fallback_crop_box(height, width, ratio)


def fallback_crop_box(
    height: int, width: int, ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """The central crop RandomResizedCrop falls back to, aspect clamped to `ratio`."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(
    img: PIL.Image.Image, box: tuple[int, int, int, int], size: int = CROP_SIZE
) -> PIL.Image.Image:
    """torchvision F.resized_crop on PIL: crop the (top, left, h, w) box, then PIL bilinear."""
    top, left, h, w = box
    return img.crop((left, top, left + w, top + h)).resize((size, size), PIL.Image.BILINEAR)


# ----------------------------------------------------------------------------- colour jitter


def adjust_hue(img: PIL.Image.Image, hue: float) -> PIL.Image.Image:
    """torchvision adjust_hue on PIL: shift PIL's 8-bit H channel by trunc(hue*255) mod 256."""
    h, s, v = img.convert("HSV").split()
    shift = int(np.int8(hue * 255))  # truncation toward zero, as np.int8(float) does
    h_shifted = ((np.asarray(h, np.int32) + shift) % 256).astype(np.uint8)
    return PIL.Image.merge("HSV", (PIL.Image.fromarray(h_shifted, "L"), s, v)).convert("RGB")


def color_jitter(
    img: PIL.Image.Image,
    order,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
) -> PIL.Image.Image:
    """ColorJitter with explicit factors; `order` is a permutation of 0..3 (b, c, s, h)."""
    for op_index in order:
        op_index = int(op_index)
        if op_index == 0:
            img = PIL.ImageEnhance.Brightness(img).enhance(brightness)
        elif op_index == 1:
            img = PIL.ImageEnhance.Contrast(img).enhance(contrast)
        elif op_index == 2:
            img = PIL.ImageEnhance.Color(img).enhance(saturation)
        elif op_index == 3:
            img = adjust_hue(img, hue)
        else:
            raise ValueError(f"colour-jitter op index {op_index} not in 0..3")
    return img


def sample_color_jitter(
    rng: np.random.Generator, b: float = 0.4, c: float = 0.4, s: float = 0.4, h: float = 0.1
) -> tuple[np.ndarray, float, float, float, float]:
    """ColorJitter.get_params: (order, brightness, contrast, saturation, hue) factors."""
    order = rng.permutation(4)
    brightness = float(rng.uniform(1 - b, 1 + b))
    contrast = float(rng.uniform(1 - c, 1 + c))
    saturation = float(rng.uniform(1 - s, 1 + s))
    hue = float(rng.uniform(-h, h))
    return order, brightness, contrast, saturation, hue


def grayscale(img: PIL.Image.Image) -> PIL.Image.Image:
    """RandomGrayscale's conversion: PIL "L" (ITU-R 601-2 luma), replicated to 3 channels."""
    return img.convert("L").convert("RGB")


# ----------------------------------------------------------------------------- RandAugment ops


def auto_contrast(img: PIL.Image.Image, _param=None) -> PIL.Image.Image:
    return PIL.ImageOps.autocontrast(img)


def brightness(img: PIL.Image.Image, factor: float) -> PIL.Image.Image:
    return PIL.ImageEnhance.Brightness(img).enhance(factor)


def color(img: PIL.Image.Image, factor: float) -> PIL.Image.Image:
    return PIL.ImageEnhance.Color(img).enhance(factor)


def contrast(img: PIL.Image.Image, factor: float) -> PIL.Image.Image:
    return PIL.ImageEnhance.Contrast(img).enhance(factor)


def equalize(img: PIL.Image.Image, _param=None) -> PIL.Image.Image:
    return PIL.ImageOps.equalize(img)


def identity(img: PIL.Image.Image, _param=None) -> PIL.Image.Image:
    return img


def posterize(img: PIL.Image.Image, bits: int) -> PIL.Image.Image:
    return PIL.ImageOps.posterize(img, int(bits))


def rotate(img: PIL.Image.Image, degrees: float) -> PIL.Image.Image:
    """Counter-clockwise about the centre, same size, nearest neighbour, black fill."""
    return img.rotate(degrees)


def sharpness(img: PIL.Image.Image, factor: float) -> PIL.Image.Image:
    return PIL.ImageEnhance.Sharpness(img).enhance(factor)


def shear_x(img: PIL.Image.Image, s: float) -> PIL.Image.Image:
    """Output (x, y) samples input (x + s*y, y)."""
    return img.transform(img.size, PIL.Image.AFFINE, (1, s, 0, 0, 1, 0))


def shear_y(img: PIL.Image.Image, s: float) -> PIL.Image.Image:
    """Output (x, y) samples input (x, s*x + y)."""
    return img.transform(img.size, PIL.Image.AFFINE, (1, 0, 0, s, 1, 0))


def solarize(img: PIL.Image.Image, threshold: int) -> PIL.Image.Image:
    return PIL.ImageOps.solarize(img, int(threshold))


def translate_x(img: PIL.Image.Image, pixels: int) -> PIL.Image.Image:
    """Output (x, y) samples input (x + pixels, y)."""
    return img.transform(img.size, PIL.Image.AFFINE, (1, 0, int(pixels), 0, 1, 0))


def translate_y(img: PIL.Image.Image, pixels: int) -> PIL.Image.Image:
    """Output (x, y) samples input (x, y + pixels)."""
    return img.transform(img.size, PIL.Image.AFFINE, (1, 0, 0, 0, 1, int(pixels)))


# Looked up by name (augment_spec.RANDAUGMENT_OPS): the functions above, in the reference order.
RANDAUGMENT_FNS: dict[str, Callable[[PIL.Image.Image, object], PIL.Image.Image]] = bind_ops(
    sys.modules[__name__]
)


def cutout_box(cx: float, cy: float, width: int, height: int, size: int = 16):
    """CutoutAbs's rectangle (x0, y0, x1, y1); PIL fills it *including* x1 and y1."""
    x0 = int(max(0, cx - size / 2.0))
    y0 = int(max(0, cy - size / 2.0))
    x1 = int(min(width, x0 + size))
    y1 = int(min(height, y0 + size))
    return x0, y0, x1, y1


def cutout(img: PIL.Image.Image, cx: float, cy: float, size: int = 16) -> PIL.Image.Image:
    """Grey (127,127,127) square, normally 17x17 px (inclusive PIL rectangle), border-clipped."""
    img = img.copy()
    PIL.ImageDraw.Draw(img).rectangle(cutout_box(cx, cy, img.width, img.height, size), CUTOUT_FILL)
    return img


def sample_randaugment(
    rng: np.random.Generator, n: int = 2, m: int = 10, width: int = 60, height: int = 60
) -> tuple[list[tuple[str, object, bool]], tuple[float, float]]:
    """RandAugmentMC(n, m) draws: n ops with replacement, v in 1..m-1, apply p=0.5, cutout centre.

    The sign of signed ops is drawn for every op (also unsigned ones) so the number of draws
    does not depend on which ops were chosen.
    """
    chosen = rng.integers(0, len(RANDAUGMENT_OPS), size=n)
    ops = []
    for op_index in chosen:
        name = RANDAUGMENT_OPS[int(op_index)]
        v = int(rng.integers(1, m))
        applied = bool(rng.random() < 0.5)
        sign = -1 if rng.random() < 0.5 else 1
        ops.append((name, op_parameter(name, v, sign, width, height), applied))
    cx = float(rng.uniform(0, width))
    cy = float(rng.uniform(0, height))
    return ops, (cx, cy)


def randaugment(img: PIL.Image.Image, ops, cutout_center, cutout_size: int = 16):
    """Apply drawn RandAugmentMC ops (those with applied=True), then always the cutout."""
    for name, param, applied in ops:
        if applied:
            img = RANDAUGMENT_FNS[name](img, param)
    return cutout(img, *cutout_center, size=cutout_size)


# ----------------------------------------------------------------------------- streams


def _to_pil(img: np.ndarray) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.asarray(img, np.uint8), "RGB")


def _to_array(img: PIL.Image.Image) -> np.ndarray:
    return np.asarray(img, np.uint8)


def _maybe_flip(img: PIL.Image.Image, rng: np.random.Generator) -> PIL.Image.Image:
    return hflip(img) if rng.random() < 0.5 else img


def labelled_view(
    img: np.ndarray, rng: np.random.Generator, *, crop_size: int = CROP_SIZE
) -> np.ndarray:
    """x: HFlip(0.5) -> RandomResizedCrop(crop_size, scale 0.2-1)."""
    pil = _maybe_flip(_to_pil(img), rng)
    box = sample_resized_crop_box(rng, pil.height, pil.width)
    return _to_array(resized_crop(pil, box, crop_size))


def weak_view(
    img: np.ndarray, rng: np.random.Generator, *, crop_size: int = CROP_SIZE
) -> np.ndarray:
    """u_w: HFlip(0.5) -> CenterCrop(crop_size)."""
    return _to_array(center_crop(_maybe_flip(_to_pil(img), rng), crop_size))


def strong0_view(
    img: np.ndarray,
    rng: np.random.Generator,
    n: int = 2,
    m: int = 10,
    cutout: int = 16,
    *,
    crop_size: int = CROP_SIZE,
) -> np.ndarray:
    """u_s0: HFlip(0.5) -> RandomResizedCrop(crop_size) -> RandAugmentMC(n, m) incl. cutout."""
    pil = _maybe_flip(_to_pil(img), rng)
    pil = resized_crop(pil, sample_resized_crop_box(rng, pil.height, pil.width), crop_size)
    ops, center = sample_randaugment(rng, n, m, pil.width, pil.height)
    return _to_array(randaugment(pil, ops, center, cutout))


def strong1_view(
    img: np.ndarray, rng: np.random.Generator, *, crop_size: int = CROP_SIZE
) -> np.ndarray:
    """u_s1: RandomResizedCrop(crop_size) -> HFlip(0.5) -> p0.8 ColorJitter(.4,.4,.4,.1) ->
    p0.2 gray."""
    pil = _to_pil(img)
    pil = resized_crop(pil, sample_resized_crop_box(rng, pil.height, pil.width), crop_size)
    pil = _maybe_flip(pil, rng)
    if rng.random() < 0.8:
        pil = color_jitter(pil, *sample_color_jitter(rng))
    if rng.random() < 0.2:
        pil = grayscale(pil)
    return _to_array(pil)


def test_view(img: np.ndarray, *, crop_size: int = CROP_SIZE) -> np.ndarray:
    """Evaluation: CenterCrop(crop_size)."""
    return _to_array(center_crop(_to_pil(img), crop_size))


test_view.__test__ = False  # a pipeline stage, not a pytest test, when imported into tests

STREAMS: dict[str, Callable[..., np.ndarray]] = {
    views.LABELLED: labelled_view,
    views.WEAK: weak_view,
    views.STRONG0: strong0_view,
    views.STRONG1: strong1_view,
}


def view_fn(view: str, params: AugmentParams = DEFAULT_PARAMS):
    """(uint8 image, numpy Generator) -> the view `view` under `params`; picklable."""
    return functools.partial(STREAMS[view], **params.view_kwargs(view))
