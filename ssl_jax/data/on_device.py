"""On-device augmentation: the dataset lives on the accelerator, views are made in the step.

The host pipeline then only samples indices (`train_iterator(..., mode="indices")`); the
jitted step gathers the uint8 images from the device cache and runs the four streams of
`augment_device` per example, with keys derived from (run rng, step, view, position).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ssl_jax.data import augment_device, views
from ssl_jax.data.augment_spec import AugmentParams


def device_cache(data) -> dict:
    """Padded uint8 images and true sizes of the labelled and unlabelled pools, on device."""
    cache = {}
    for name, imageset in (("labelled", data.labelled), ("unlabelled", data.unlabelled)):
        images, sizes = imageset.padded()
        cache[name] = {"images": jnp.asarray(images), "sizes": jnp.asarray(sizes)}
    return cache


# vmap in_axes of the several-seed cache: a labelled pool per seed, one shared unlabelled pool.
SEED_AXES = {"labelled": 0, "unlabelled": None}


def device_cache_seeds(datas) -> dict:
    """The cache of several seeds' data (one per seed, sharing their unlabelled pool).

    The unlabelled pool is held once; the labelled pools (each seed's own draw, all of one
    size) are zero-padded to one frame and stacked on a leading seed axis (`SEED_AXES`).
    Views use each image's true size, so the padding changes no pixel of any view.
    """
    first = datas[0]
    counts = sorted({len(d.labelled) for d in datas})
    if len(counts) > 1:
        raise ValueError(
            f"The seeds' labelled sets differ in size ({counts}); several seeds in one program "
            "need labelled sets of one size."
        )
    for d in datas[1:]:
        if tuple(d.unlabelled.files) != tuple(first.unlabelled.files):
            raise ValueError(
                "The seeds' unlabelled pools differ; several seeds in one program hold one "
                "unlabelled pool for all of them."
            )
    padded = [d.labelled.padded() for d in datas]
    height = max(images.shape[1] for images, _ in padded)
    width = max(images.shape[2] for images, _ in padded)
    images = np.zeros((len(datas), counts[0], height, width, 3), np.uint8)
    for i, (pool, _) in enumerate(padded):
        images[i, :, : pool.shape[1], : pool.shape[2]] = pool
    sizes = np.stack([s for _, s in padded])
    unlabelled, unlabelled_sizes = first.unlabelled.padded()
    return {
        "labelled": {"images": jnp.asarray(images), "sizes": jnp.asarray(sizes)},
        "unlabelled": {"images": jnp.asarray(unlabelled), "sizes": jnp.asarray(unlabelled_sizes)},
    }


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
