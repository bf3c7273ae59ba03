"""On-device augmentation: the dataset lives on the accelerator, views are made in the step.

The host pipeline then only samples indices (`train_iterator(..., mode="indices")`); the
jitted step gathers the uint8 images from the device cache and runs the four streams of
`augment_device` per example, with keys derived from (run rng, step, view, position).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from ssl_jax.data import augment_device, views
from ssl_jax.data.augment_spec import AugmentParams


def device_cache(data) -> dict:
    """Padded uint8 images and true sizes of the labelled and unlabelled pools, on device."""
    cache = {}
    for name, imageset in (("labelled", data.labelled), ("unlabelled", data.unlabelled)):
        images, sizes = imageset.padded()
        cache[name] = {"images": jnp.asarray(images), "sizes": jnp.asarray(sizes)}
    return cache


def make_augment_fn(config: ml_collections.ConfigDict, unlabelled_views: tuple[str, ...]):
    """augment_fn(key, batch, cache) -> batch with the "x" and unlabelled views filled in.

    View v of the step is made with key fold_in(key, views.VIEWS[v].device_stream), at
    `config.data.crop_size` px, from the pool and batch indices `views.VIEWS[v]` names.
    """
    params = AugmentParams.from_config(config)
    unknown = [v for v in unlabelled_views if v not in views.UNLABELLED_VIEWS]
    if unknown:
        raise ValueError(f"unknown unlabelled views {unknown}; known: {views.UNLABELLED_VIEWS}")

    def augment_fn(key, batch, cache):
        out = dict(batch)
        for name in (views.LABELLED, *unlabelled_views):
            view = views.VIEWS[name]
            pool = cache[view.pool]
            out[name] = augment_device.augment_batch(
                jax.random.fold_in(key, view.device_stream),
                pool["images"],
                pool["sizes"],
                batch[views.INDEX_KEYS[view.pool]],
                name,
                params,
            )
        return out

    return augment_fn


def device_augment_views(data, config, unlabelled_views):
    """(device cache, augment_fn) for `train_step`."""
    return device_cache(data), make_augment_fn(config, unlabelled_views)
