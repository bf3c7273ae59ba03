"""Supervised baseline (docs/method.md#supervised-baseline): cross entropy on the labelled batch
only."""

from __future__ import annotations

import jax.numpy as jnp

from ssl_jax import losses
from ssl_jax.algorithms.base import Algorithm, stateless_init_state


def supervised_loss(*, logits, feats, batch, state, epoch, iteration, cfg, platform=None):
    """``L = L_x``; the unlabelled batches the loop draws are never forwarded."""
    del feats, epoch, iteration, cfg
    loss_x = jnp.mean(losses.cross_entropy(logits=logits.astype(jnp.float32), labels=batch["y"]))
    return loss_x, (state, {"loss": loss_x, "loss_x": loss_x})


SUPERVISED = Algorithm(
    name="supervised",
    unlabelled_views=(),
    needs_projection=False,
    init_state=stateless_init_state,
    loss_from_outputs=supervised_loss,
)
