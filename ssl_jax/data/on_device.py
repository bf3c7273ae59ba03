"""On-device augmentation: the dataset lives on the accelerator, views are made in the step.

The host pipeline then only samples indices (`train_iterator(..., mode="indices")`); the
jitted step gathers the uint8 images from the device cache and runs the four streams of
`augment_device` per example, with keys derived from (run rng, step, view, position).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from ssl_jax.data import augment_device


def device_cache(data) -> dict:
    """Padded uint8 images and true sizes of the labelled and unlabelled pools, on device."""
    cache = {}
    for name, imageset in (("labelled", data.labelled), ("unlabelled", data.unlabelled)):
        images, sizes = imageset.padded()
        cache[name] = {"images": jnp.asarray(images), "sizes": jnp.asarray(sizes)}
    return cache


def make_augment_fn(config: ml_collections.ConfigDict, views: tuple[str, ...]):
    """augment_fn(key, batch, cache) -> batch with the "x" and unlabelled views filled in."""
    aug = config.augment
    if config.data.crop_size != augment_device.CROP_SIZE:
        raise ValueError(
            f"Device augmentation produces {augment_device.CROP_SIZE}-px crops; "
            f"config.data.crop_size={config.data.crop_size} needs "
            "config.augment.where='host'."
        )

    def augment_fn(key, batch, cache):
        out = dict(batch)
        for view in ("x", *views):
            pool = cache["labelled" if view == "x" else "unlabelled"]
            indices = batch["x_index" if view == "x" else "u_index"]
            out[view] = augment_device.augment_batch(
                jax.random.fold_in(key, augment_device.STREAM_IDS[view]),
                pool["images"],
                pool["sizes"],
                indices,
                view,
                aug.randaugment_n,
                aug.randaugment_m,
                aug.cutout,
            )
        return out

    return augment_fn


def device_augment_views(data, config, views):
    """(device cache, augment_fn) for `train_step`."""
    return device_cache(data), make_augment_fn(config, views)
