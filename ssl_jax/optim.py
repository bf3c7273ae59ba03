"""SGD with Nesterov momentum, name-based weight decay, the 7/16 cosine schedule and the EMA model.

docs/method.md#optimisation. PyTorch's SGD (dampening 0, decay added to the gradient) equals
``add_decayed_weights`` followed by ``optax.sgd(nesterov=True)`` with a zero-initialised trace.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax


def cosine_schedule(
    base_lr: float,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    num_cycles: float = 7.0 / 16.0,
) -> optax.Schedule:
    """Learning rate of the k-th update (0-based): linear warm-up, then cos(pi*num_cycles*progress).

    With num_cycles = 7/16 the schedule never reaches zero; the last lr is cos(7*pi/16)*base.
    """

    def schedule(step):
        k = jnp.asarray(step, jnp.float32)
        warm = base_lr * k / max(1, warmup_steps)
        progress = (k - warmup_steps) / max(1, total_steps - warmup_steps)
        cosine = base_lr * jnp.maximum(0.0, jnp.cos(math.pi * num_cycles * progress))
        return jnp.where(k < warmup_steps, warm, cosine).astype(jnp.float32)

    return schedule


def decay_mask(params) -> dict:
    """True where weight decay applies: every kernel, and the γ of ResNet downsample BatchNorms.

    The reference decays every parameter whose *name* lacks "bias" and "bn"; restated on Flax
    trees (docs/method.md#sgd-and-weight-decay): convolution and Dense kernels, plus the BN scale
    inside each downsample shortcut (docs/method.md#q10-decayed-downsample-bn-scale), whose PyTorch
    name ("downsample.1.weight") has neither substring.
    """
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    mask = {
        path: path[-1] == "kernel"
        or (path[-1] == "scale" and len(path) >= 2 and path[-2].startswith("downsample_bn"))
        for path in flat
    }
    return flax.traverse_util.unflatten_dict(mask)


class Optimizer(NamedTuple):
    """The optimizer and the learning-rate schedule inside it (for logging the lr it uses)."""

    tx: optax.GradientTransformation
    schedule: optax.Schedule


def make_optimizer(optim_cfg: ml_collections.ConfigDict, total_steps: int, params) -> Optimizer:
    """SGD + Nesterov with the masked weight decay and the cosine schedule of `optim_cfg`.

    `params` may be abstract (only the tree's names are read); unpack as ``tx, schedule = ...``.
    """
    schedule = cosine_schedule(
        optim_cfg.lr,
        total_steps,
        warmup_steps=optim_cfg.warmup_steps,
        num_cycles=optim_cfg.num_cycles,
    )
    tx = optax.chain(
        optax.add_decayed_weights(optim_cfg.weight_decay, mask=decay_mask(params)),
        optax.sgd(schedule, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov),
    )
    return Optimizer(tx, schedule)


def ema_update(ema_tree, new_tree, decay: float):
    """``e <- decay*e + (1-decay)*p`` for every parameter (no bias correction, no warm-up)."""
    return jax.tree.map(lambda e, p: e * decay + (1.0 - decay) * p, ema_tree, new_tree)
