"""The CCSSL term shared by FixMatch+CCSSL and CoMatch+CCSSL (docs/method.md#ccssl)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from ssl_jax import losses


def ccssl_term(
    *,
    view0: jax.Array,
    view1: jax.Array,
    confidence: jax.Array,
    labels: jax.Array,
    cfg: ml_collections.ConfigDict,
) -> jax.Array:
    """Mean class-aware contrastive loss over the 2·Bu anchors.

    ``cfg.t_push > 0`` is the out-of-distribution setting (docs/method.md#id-and-od-settings): only
    confident samples attract each other. T_push = 0 selects every pair, so no selection matrix is
    built.
    """
    select = None
    if cfg.t_push > 0:
        select = losses.ccssl_select_matrix(confidence=confidence, t_push=cfg.t_push)
    per_anchor = losses.class_aware_contrastive_loss(
        view0=view0,
        view1=view1,
        confidence=confidence,
        labels=labels,
        temperature=cfg.supcon_temperature,
        select=select,
        diag_weight=cfg.ccssl_diag_weight,
    )
    return jnp.mean(per_anchor)
