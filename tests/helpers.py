"""Test-only helpers shared by several test files (imported as `from helpers import ...`)."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax import triplet
from ssl_jax.algorithms.base import AlgorithmState


def random_normal(shape, seed: int = 0) -> jax.Array:
    """Standard-normal float32 test data drawn by numpy: unlike an eager `jax.random.normal`,
    it compiles nothing (each new shape would be an XLA compile of its own)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


def random_uniform(shape, low: float, high: float, seed: int = 0) -> jax.Array:
    """Uniform float32 test data in [low, high), drawn by numpy (see `random_normal`)."""
    return jnp.asarray(np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32))


def copy_test_images(run_dir, folder, count: int) -> pathlib.Path:
    """Copies the first `count` test images of a run's split (its `split.json`) into a new
    `folder`, as a user would gather images to classify with `--mode predict`."""
    split = json.loads((pathlib.Path(run_dir) / "split.json").read_text())
    folder = pathlib.Path(folder)
    folder.mkdir()
    for path, _ in split["test"][:count]:
        shutil.copy(os.path.join(split["root"], path), folder / os.path.basename(path))
    return folder


def state_from_reference(
    *, queue_feats, queue_probs, queue_ptr, prob_hist, da_len: int
) -> AlgorithmState:
    """CoMatch's state from the reference's bank and oldest-first DA history list."""
    prob_hist = np.asarray(prob_hist, np.float32)
    h, c = prob_hist.shape
    if h > da_len:
        raise ValueError(f"DA history has {h} entries, more than da_len={da_len}")
    buffer = np.zeros((da_len, c), np.float32)
    buffer[:h] = prob_hist
    return {
        "queue_feats": jnp.asarray(queue_feats, jnp.float32),
        "queue_probs": jnp.asarray(queue_probs, jnp.float32),
        "queue_ptr": jnp.asarray(queue_ptr, jnp.int32),
        "prob_hist": jnp.asarray(buffer),
        "prob_hist_len": jnp.asarray(h, jnp.int32),
    }


def da_history(state: AlgorithmState) -> np.ndarray:
    """CoMatch's DA history as the reference's oldest-first list, shape (len, C)."""
    return np.asarray(state["prob_hist"])[: int(state["prob_hist_len"])]


def semihard_triplet_masks(*, similarity, labels, margin):
    """The miner's fixed-shape (B, B, B) masks on a similarity matrix (larger = closer)."""
    positive_pair, negative = triplet._triplet_pairs(labels)
    anchor_triplets = functools.partial(triplet._anchor_triplets, margin=margin)
    return jax.vmap(anchor_triplets)(similarity, positive_pair, negative)[0]
