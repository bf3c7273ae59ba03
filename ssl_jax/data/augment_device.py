"""The four training views and the test view as pure JAX, run inside the jitted train step.

Same pipelines, probabilities and magnitude tables as the PIL host version
(`augment_host.py`, docs/method.md#augmentation), on uint8 images gathered from a dataset cached
on the device. Images keep the aspect rule (shorter side 64, e.g. 64x66), so the cache is a
padded (N, Hmax, Wmax, 3) uint8 array plus each image's true (height, width); flips, centre
crops and random resized crops use the true frame.

The ops live by concern, each matching PIL bit for bit on the images tested: resampling and
crops in `device_geometry`, colour in `device_colour`, RandAugment in `device_randaugment`.
Only the random draws differ from the host (JAX keys, not NumPy). Every op works on a
static-shape uint8 (H, W, 3) image and returns uint8, so the views jit and vmap (one key per
example). The training step calls them through `on_device.make_augment_fn`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ssl_jax.data import views
from ssl_jax.data.augment_spec import CROP_SIZE, DEFAULT_PARAMS, AugmentParams
from ssl_jax.data.device_colour import color_jitter, grayscale, sample_color_jitter
from ssl_jax.data.device_geometry import (
    center_crop,
    hflip,
    resized_crop,
    sample_resized_crop_box,
)
from ssl_jax.data.device_randaugment import randaugment


def _flip_if(key, image, size_hw):
    return jnp.where(jax.random.uniform(key) < 0.5, hflip(image, size_hw), image)


def _random_resized_crop(key, image, size_hw, crop_size: int):
    box = sample_resized_crop_box(key, size_hw[0], size_hw[1])
    return resized_crop(image, box, crop_size)


def labelled_view(key, image, size_hw, *, crop_size: int = CROP_SIZE):
    """x: HFlip(0.5) -> RandomResizedCrop(crop_size, scale 0.2-1). uint8 (crop, crop, 3)."""
    k_flip, k_crop = jax.random.split(key)
    return _random_resized_crop(k_crop, _flip_if(k_flip, image, size_hw), size_hw, crop_size)


def weak_view(key, image, size_hw, *, crop_size: int = CROP_SIZE):
    """u_w: HFlip(0.5) -> CenterCrop(crop_size)."""
    return center_crop(_flip_if(key, image, size_hw), size_hw, crop_size)


def strong0_view(
    key, image, size_hw, n: int = 2, m: int = 10, cutout: int = 16, *, crop_size: int = CROP_SIZE
):
    """u_s0: HFlip(0.5) -> RandomResizedCrop(crop_size) -> RandAugmentMC(n, m) incl. cutout."""
    k_flip, k_crop, k_ra = jax.random.split(key, 3)
    crop = _random_resized_crop(k_crop, _flip_if(k_flip, image, size_hw), size_hw, crop_size)
    return randaugment(k_ra, crop, n, m, cutout)


def strong1_view(key, image, size_hw, *, crop_size: int = CROP_SIZE):
    """u_s1: RandomResizedCrop(crop_size) -> HFlip(0.5) -> p0.8 ColorJitter(.4,.4,.4,.1) ->
    p0.2 gray."""
    k_crop, k_flip, k_apply, k_jitter, k_gray = jax.random.split(key, 5)
    crop = _random_resized_crop(k_crop, image, size_hw, crop_size)
    crop = jnp.where(jax.random.uniform(k_flip) < 0.5, crop[:, ::-1], crop)
    jittered = color_jitter(crop, *sample_color_jitter(k_jitter))
    crop = jnp.where(jax.random.uniform(k_apply) < 0.8, jittered, crop)
    return jnp.where(jax.random.uniform(k_gray) < 0.2, grayscale(crop), crop)


def test_view(image, size_hw, *, crop_size: int = CROP_SIZE):
    """Evaluation: CenterCrop(crop_size)."""
    return center_crop(image, size_hw, crop_size)


test_view.__test__ = False  # a pipeline stage, not a pytest test, when imported into tests

STREAMS = {
    views.LABELLED: labelled_view,
    views.WEAK: weak_view,
    views.STRONG0: strong0_view,
    views.STRONG1: strong1_view,
}


def view_fn(view: str, params: AugmentParams = DEFAULT_PARAMS):
    """(key, image, size_hw) -> the view `view` (a STREAMS name) under `params`."""
    return functools.partial(STREAMS[view], **params.view_kwargs(view))


def augment_batch(
    key, images_cache, sizes, indices, stream: str, params: AugmentParams = DEFAULT_PARAMS
):
    """One view for a batch gathered from the device cache: (b, crop, crop, 3) uint8.

    Example i gets key fold_in(key, i). `stream` in STREAMS or "test" (no randomness).
    `stream` and `params` are static under jit.
    """
    images = jnp.take(images_cache, indices, axis=0)
    size_hw = jnp.take(sizes, indices, axis=0).astype(jnp.int32)
    if stream == "test":
        return jax.vmap(functools.partial(test_view, crop_size=params.crop_size))(images, size_hw)
    fn = view_fn(stream, params)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(indices.shape[0]))
    return jax.vmap(fn)(keys, images, size_hw)
