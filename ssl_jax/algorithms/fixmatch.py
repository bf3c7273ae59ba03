"""FixMatch and FixMatch+CCSSL (docs/method.md#fixmatch): hard pseudo-labels from the weak view."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax import losses
from ssl_jax.algorithms import ccssl
from ssl_jax.algorithms.base import Algorithm, split_views, stateless_init_state
from ssl_jax.data.views import STRONG0, UNLABELLED_VIEWS, WEAK


def fixmatch_terms(*, logits, batch, cfg, num_views):
    """L_x, the masked hard-label L_u and the pseudo-labels; views are ``[x ; u_w ; u_s ; ...]``."""
    logits = logits.astype(jnp.float32)
    labels_x = batch["y"]
    logits_x, logits_w, logits_s, *_ = split_views(logits, labels_x.shape[0], num_views)
    loss_x = jnp.mean(losses.cross_entropy(logits=logits_x, labels=labels_x))
    probs = jax.nn.softmax(jax.lax.stop_gradient(logits_w) / cfg.fixmatch_T, axis=1)
    max_probs = jnp.max(probs, axis=1)
    pseudo_labels = jnp.argmax(probs, axis=1).astype(jnp.int32)
    mask = (max_probs >= cfg.threshold).astype(jnp.float32)
    loss_u = jnp.mean(losses.cross_entropy(logits=logits_s, labels=pseudo_labels) * mask)
    metrics = {
        "loss_x": loss_x,
        "loss_u": loss_u,
        "mask_prob": jnp.mean(mask),
        "pseudo_acc": losses.masked_accuracy(
            predictions=pseudo_labels, labels=batch["u_y"], mask=mask
        ),
    }
    aux = {"max_probs": max_probs, "pseudo_labels": pseudo_labels, "mask": mask}
    return loss_x + cfg.lambda_u * loss_u, metrics, aux


def fixmatch_loss(*, logits, feats, batch, state, epoch, iteration, cfg, platform=None):
    """FixMatch: ``L = L_x + λu·L_u`` on ``[x ; u_w ; u_s]``."""
    del feats, epoch, iteration
    loss, metrics, _ = fixmatch_terms(logits=logits, batch=batch, cfg=cfg, num_views=2)
    return loss, (state, {"loss": loss, **metrics})


def fixmatch_ccssl_loss(*, logits, feats, batch, state, epoch, iteration, cfg, platform=None):
    """FixMatch+CCSSL: adds ``λc·L_ccssl`` on (z(u_s), z(u_s1)) with FixMatch's confidences."""
    del epoch, iteration
    loss, metrics, aux = fixmatch_terms(logits=logits, batch=batch, cfg=cfg, num_views=3)
    _, _, feats_s0, feats_s1 = split_views(feats.astype(jnp.float32), batch["y"].shape[0], 3)
    loss_ccssl = ccssl.ccssl_term(
        view0=feats_s0,
        view1=feats_s1,
        confidence=aux["max_probs"],
        labels=aux["pseudo_labels"],
        cfg=cfg,
    )
    loss = loss + cfg.lambda_ccssl * loss_ccssl
    return loss, (state, {"loss": loss, **metrics, "loss_ccssl": loss_ccssl})


FIXMATCH = Algorithm(
    name="fixmatch",
    unlabelled_views=(WEAK, STRONG0),
    needs_projection=False,
    init_state=stateless_init_state,  # no distribution alignment in the paper's configs
    loss_from_outputs=fixmatch_loss,
)
FIXMATCH_CCSSL = Algorithm(
    name="fixmatch_ccssl",
    unlabelled_views=UNLABELLED_VIEWS,
    needs_projection=True,
    init_state=stateless_init_state,
    loss_from_outputs=fixmatch_ccssl_loss,
)
