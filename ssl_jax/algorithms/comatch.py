"""CoMatch (docs/method.md#comatch) and its two extensions, CoMatch+CCSSL
(docs/method.md#ccssl-on-comatch) and CoMatch+Triplet (docs/method.md#triplet-loss).

The three share one step: distribution alignment, memory smoothing, the pseudo-label graph and the
graph-contrastive loss, with a memory bank and DA history carried in fixed-shape state so the
step jits once. The extensions only add a term on the strong0 embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ssl_jax import losses
from ssl_jax.algorithms import ccssl
from ssl_jax.algorithms.base import Algorithm, AlgorithmState, Metrics, split_views
from ssl_jax.data.views import UNLABELLED_VIEWS


def queue_size(cfg: ml_collections.ConfigDict, *, batch_size: int, mu: int) -> int:
    """K = queue_batch·(mu+1)·B: a multiple of the B+Bu rows written per step
    (docs/method.md#memory-bank)."""
    return cfg.queue_batch * (mu + 1) * batch_size


def init_state(
    cfg: ml_collections.ConfigDict, *, num_classes: int, low_dim: int, batch_size: int, mu: int
) -> AlgorithmState:
    """Zero bank, pointer 0, empty DA history (length 0 in a fixed (da_len, C) buffer)."""
    k = queue_size(cfg, batch_size=batch_size, mu=mu)
    return {
        "queue_feats": jnp.zeros((k, low_dim), jnp.float32),
        "queue_probs": jnp.zeros((k, num_classes), jnp.float32),
        "queue_ptr": jnp.zeros((), jnp.int32),
        "prob_hist": jnp.zeros((cfg.da_len, num_classes), jnp.float32),
        "prob_hist_len": jnp.zeros((), jnp.int32),
    }


def comatch_terms(
    *,
    logits: jax.Array,
    feats: jax.Array,
    batch: Mapping[str, jax.Array],
    state: AlgorithmState,
    epoch: jax.Array,
    iteration: jax.Array,
    cfg: ml_collections.ConfigDict,
) -> dict[str, Any]:
    """The shared CoMatch step (docs/method.md#comatch): losses, intermediates and the new state.

    Returns a dict with ``loss_x``, ``loss_u``, ``loss_c`` (scalars), ``probs_da``, ``probs``,
    ``mask``, ``guess``, ``Q``, ``pos_mask``, ``sim_probs``, ``smoothing_applied``, the strong
    embeddings ``feats_s0``/``feats_s1`` (with gradient) and ``new_state``.
    """
    logits = logits.astype(jnp.float32)
    feats = feats.astype(jnp.float32)
    labels_x = batch["y"]
    b = labels_x.shape[0]
    logits_x, logits_w, logits_s0, _ = split_views(logits, b, 3)
    feats_x, feats_w, feats_s0, feats_s1 = split_views(feats, b, 3)
    num_classes = logits.shape[1]

    loss_x = jnp.mean(losses.cross_entropy(logits=logits_x, labels=labels_x))

    # Alignment, smoothing, mask, bank and graph (docs/method.md#comatch) work on constants: no
    # gradient reaches u_w or x (docs/method.md#total-loss).
    feats_w = jax.lax.stop_gradient(feats_w)
    feats_x = jax.lax.stop_gradient(feats_x)
    probs = jax.nn.softmax(jax.lax.stop_gradient(logits_w), axis=1)
    probs_da, prob_hist, prob_hist_len = losses.distribution_alignment(
        probs=probs, history=state["prob_hist"], history_len=state["prob_hist_len"]
    )
    # docs/method.md#memory-smoothing / docs/method.md#q4-smoothing-start: `iteration` restarts
    # every epoch, so smoothing is always on after epoch 0.
    smoothing_applied = jnp.logical_or(epoch > 0, iteration > cfg.queue_batch)
    smoothed = losses.memory_smoothing(
        probs=probs_da,
        feats=feats_w,
        queue_feats=state["queue_feats"],
        queue_probs=state["queue_probs"],
        temperature=cfg.T,
        alpha=cfg.alpha,
    )
    probs = jnp.where(smoothing_applied, smoothed, probs_da)
    scores = jnp.max(probs, axis=1)
    guess = jnp.argmax(probs, axis=1).astype(jnp.int32)
    mask = (scores >= cfg.threshold).astype(jnp.float32)

    # docs/method.md#memory-bank: the bank sees this step's rows only from the next step on.
    ptr = state["queue_ptr"]
    new_feats = jnp.concatenate([feats_w, feats_x], axis=0)
    new_probs = jnp.concatenate([probs_da, jax.nn.one_hot(labels_x, num_classes)], axis=0)
    k = state["queue_feats"].shape[0]
    new_state = {
        "queue_feats": jax.lax.dynamic_update_slice(state["queue_feats"], new_feats, (ptr, 0)),
        "queue_probs": jax.lax.dynamic_update_slice(state["queue_probs"], new_probs, (ptr, 0)),
        "queue_ptr": ((ptr + new_feats.shape[0]) % k).astype(jnp.int32),
        "prob_hist": prob_hist,
        "prob_hist_len": prob_hist_len,
    }

    graph, pos_mask = losses.pseudo_label_graph(probs=probs, threshold=cfg.contrast_threshold)
    sim_probs = losses.embedding_graph(anchors=feats_s0, others=feats_s1, temperature=cfg.T)
    loss_c = jnp.mean(losses.graph_contrastive_loss(sim_probs=sim_probs, targets=graph))
    loss_u = jnp.mean(losses.soft_cross_entropy(logits=logits_s0, targets=probs) * mask)

    return {
        "loss_x": loss_x,
        "loss_u": loss_u,
        "loss_c": loss_c,
        "probs_da": probs_da,
        "probs": probs,
        "scores": scores,
        "mask": mask,
        "guess": guess,
        "Q": graph,
        "pos_mask": pos_mask,
        "sim_probs": sim_probs,
        "smoothing_applied": smoothing_applied,
        "feats_s0": feats_s0,
        "feats_s1": feats_s1,
        "new_state": new_state,
    }


def _base_metrics(terms: Mapping[str, Any], batch: Mapping[str, jax.Array]) -> Metrics:
    return {
        "loss_x": terms["loss_x"],
        "loss_u": terms["loss_u"],
        "loss_c": terms["loss_c"],
        "mask_prob": jnp.mean(terms["mask"]),
        "pseudo_acc": losses.masked_accuracy(
            predictions=terms["guess"], labels=batch["u_y"], mask=terms["mask"]
        ),
    }


def _base_loss(terms: Mapping[str, Any], cfg: ml_collections.ConfigDict) -> jax.Array:
    return terms["loss_x"] + cfg.lambda_u * terms["loss_u"] + cfg.lambda_c * terms["loss_c"]


# An extension's term on top of CoMatch: (terms, cfg, platform) -> (weighted loss, metrics).
ExtraTerm = Callable[
    [Mapping[str, Any], ml_collections.ConfigDict, str | None], tuple[jax.Array, Metrics]
]


def _ccssl_extra(terms, cfg, platform):
    """CoMatch+CCSSL (docs/method.md#ccssl-on-comatch): ``λccssl·L_ccssl`` on (zs0, zs1) with
    smoothed confidences."""
    loss_ccssl = ccssl.ccssl_term(
        view0=terms["feats_s0"],
        view1=terms["feats_s1"],
        confidence=terms["scores"],
        labels=terms["guess"],
        cfg=cfg,
    )
    return cfg.lambda_ccssl * loss_ccssl, {"loss_ccssl": loss_ccssl}


def _triplet_extra(terms, cfg, platform):
    """CoMatch+Triplet (docs/method.md#triplet-loss): ``λdml·L_dml`` on zs0 with the unmasked hard
    guesses (docs/method.md#q13-unmasked-triplet-labels).

    The miner is chosen by batch size (`losses.triplet_method`); when that is the dense one
    (small batches), its anchor blocking is chosen for the platform the step is built for.
    """
    guess = terms["guess"]
    loss_dml, stats = losses.semihard_triplet_loss(
        embeddings=terms["feats_s0"],
        labels=guess,
        margin=cfg.triplet_margin,
        anchor_block=losses.default_triplet_anchor_block(guess.shape[0], platform),
    )
    return cfg.lambda_dml * loss_dml, {
        "loss_dml": loss_dml,
        "triplet_valid": stats.valid.astype(jnp.float32),
        "triplet_mined": stats.mined.astype(jnp.float32),
        "triplet_positive": stats.positive.astype(jnp.float32),
    }


def _comatch_family_loss(extra: ExtraTerm | None, doc: str):
    """The `loss_from_outputs` of CoMatch plus an optional extension term."""

    def loss_from_outputs(*, logits, feats, batch, state, epoch, iteration, cfg, platform=None):
        terms = comatch_terms(
            logits=logits,
            feats=feats,
            batch=batch,
            state=state,
            epoch=epoch,
            iteration=iteration,
            cfg=cfg,
        )
        loss = _base_loss(terms, cfg)
        extra_metrics = {}
        if extra is not None:
            extra_loss, extra_metrics = extra(terms, cfg, platform)
            loss = loss + extra_loss
        metrics = {"loss": loss, **_base_metrics(terms, batch), **extra_metrics}
        return loss, (terms["new_state"], metrics)

    loss_from_outputs.__doc__ = doc
    return loss_from_outputs


comatch_loss = _comatch_family_loss(None, "CoMatch: ``L = L_x + λu·L_u + λc·L_c``.")
comatch_ccssl_loss = _comatch_family_loss(_ccssl_extra, "CoMatch+CCSSL: ``L + λccssl·L_ccssl``.")
comatch_triplet_loss = _comatch_family_loss(_triplet_extra, "CoMatch+Triplet: ``L + λdml·L_dml``.")


def _comatch_algorithm(name: str, loss_from_outputs) -> Algorithm:
    return Algorithm(
        name=name,
        unlabelled_views=UNLABELLED_VIEWS,
        needs_projection=True,
        init_state=init_state,
        loss_from_outputs=loss_from_outputs,
    )


COMATCH = _comatch_algorithm("comatch", comatch_loss)
COMATCH_CCSSL = _comatch_algorithm("comatch_ccssl", comatch_ccssl_loss)
COMATCH_TRIPLET = _comatch_algorithm("comatch_triplet", comatch_triplet_loss)
