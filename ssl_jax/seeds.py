"""Several seeds in one program: the seeds of a run, their data, stacking and slicing states.

With `config.num_seeds` = N > 1 (on-device augmentation only), seeds `config.seed ...
config.seed + N - 1` train together, every leaf of the train state carrying a leading seed
axis. Each seed is the run it would be alone: its own initialisation, labelled draw, data
order and augmentation keys, on the train/test split of `config.seed` (`seed_data`).
"""

from __future__ import annotations

import copy
import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections

from ssl_jax.data import protocols
from ssl_jax.data.sources import ImagePool


def seeds_of(config: ml_collections.ConfigDict) -> list[int]:
    """The seeds a run trains: config.seed ... config.seed + num_seeds - 1."""
    first = int(config.seed)
    return list(range(first, first + int(config.get("num_seeds", 1))))


def seed_dir(workdir: str, seed: int) -> str:
    """Where seed `seed`'s files of a several-seed run go."""
    return os.path.join(workdir, f"seed_{seed}")


def config_for_seed(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    """The config of the one-seed run that seed `seed` of `config` is."""
    config = copy.deepcopy(config)
    with config.unlocked():
        config.seed = int(seed)
        config.num_seeds = 1
    return config


def seed_data(data, config: ml_collections.ConfigDict, seed: int):
    """Seed `seed`'s data: its own labelled draw (`config.data.protocol`) on `data`'s split.

    `data` is the data of `config.seed`; the train/test split and the unlabelled pool are
    kept, so every seed of a run shares them (with seeded splits, `split_lists=""`, that is the
    split of `config.seed`). Data of another protocol (synthetic benchmark data) is shared.
    """
    if seed == int(config.seed) or data.protocol not in protocols.PROTOCOLS:
        return data
    whole = bool(config.data.get("unlabelled_whole_folder", False))
    pool = ImagePool(
        class_names=data.class_names,
        train=data.train,
        test=data.test,
        everything=data.unlabelled if whole else None,
        info={},
    )
    labelled, unlabelled = protocols.apply_protocol(pool, config.data, seed=seed)
    if tuple(unlabelled.files) != tuple(data.unlabelled.files):
        raise ValueError(
            f"Seed {seed}'s unlabelled pool differs from seed {config.seed}'s; several seeds in "
            "one program share one unlabelled pool and test set."
        )
    unlabelled = data.unlabelled  # the same images: held once
    split_hash = protocols.compute_split_hash(
        data.class_names, data.train, data.test, labelled, unlabelled
    )
    return dataclasses.replace(
        data,
        labelled=labelled,
        unlabelled=unlabelled,
        split_hash=split_hash,
        info={**data.info, "seed": int(seed)},
    )


def stack_seeds(trees):
    """One tree with a leading seed axis from one tree per seed."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def seed_slice(tree, index: int):
    """Seed number `index` (0-based) of a tree with a leading seed axis."""
    return jax.tree.map(lambda x: x[index], tree)
