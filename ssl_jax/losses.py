"""Small pure loss kernels shared by the algorithms (docs/method.md#comatch,
docs/method.md#triplet-loss, docs/method.md#ccssl).

Every kernel is keyword-only and, where a mask may apply, returns per-example values so the
caller masks and reduces. Similarity matmuls request ``Precision.HIGHEST``: on accelerators JAX
may otherwise use TF32/bf16 passes, which flips borderline triplets and pseudo-label-graph
edges relative to the float32 reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax.triplet import (  # noqa: F401  (moved to ssl_jax/triplet.py; re-exported)
    TRIPLET_ANCHOR_BLOCK,
    TRIPLET_BLOCKED_MIN_BATCH,
    TRIPLET_METHODS,
    TRIPLET_SORTED_MIN_BATCH,
    TripletMasks,
    TripletStats,
    TripletTerms,
    _sorted_triplet_terms,
    _triplet_pairs,
    cosine_similarity,
    default_triplet_anchor_block,
    semihard_triplet_loss,
    semihard_triplet_loss_from_similarity,
    triplet_method,
)

HIGHEST = jax.lax.Precision.HIGHEST


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` at full float32 precision (no TF32), as the reference computes it."""
    return jnp.matmul(a, b, precision=HIGHEST)


# ----------------------------------------------------------------------- classification


def cross_entropy(*, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross entropy with integer labels, shape (N,)."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def soft_cross_entropy(*, logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example ``-sum_c targets_c * log_softmax(logits)_c``, shape (N,) (CoMatch's L_u)."""
    return -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def masked_accuracy(*, predictions: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """``sum(mask * [pred == label]) / max(sum(mask), 1)``: the logged pseudo-label accuracy.

    Examples with an unknown label (``-1``: images outside the class subset, swept in by the
    seed_code whole-folder option) are left out rather than counted as wrong.
    """
    mask = mask * (labels >= 0).astype(jnp.float32)
    correct = (predictions == labels).astype(jnp.float32) * mask
    return jnp.sum(correct) / jnp.maximum(jnp.sum(mask), 1.0)


# ---------------------------------------------------------- CoMatch pieces (docs/method.md#comatch)


def distribution_alignment(
    *, probs: jax.Array, history: jax.Array, history_len: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """docs/method.md#distribution-alignment: append the batch-mean prediction to the history,
    divide by the history mean.

    ``history`` is a fixed (da_len, C) buffer holding ``history_len`` valid rows, oldest first
    (rows past ``history_len`` are zero). When full, the oldest row is dropped. Returns
    ``(aligned_probs, new_history, new_history_len)``; everything is meant to be under
    stop-gradient.
    """
    da_len = history.shape[0]
    full = history_len >= da_len
    # Oldest-first buffer: when full, shift everything up one row and write at the end.
    shifted = jnp.where(full, jnp.roll(history, -1, axis=0), history)
    write_at = jnp.minimum(history_len, da_len - 1)
    batch_mean = jnp.mean(probs, axis=0)
    new_history = jax.lax.dynamic_update_slice(shifted, batch_mean[None, :], (write_at, 0))
    new_len = jnp.minimum(history_len + 1, da_len).astype(jnp.int32)
    valid = (jnp.arange(da_len) < new_len)[:, None]
    history_mean = jnp.sum(jnp.where(valid, new_history, 0.0), axis=0) / new_len
    aligned = probs / history_mean
    aligned = aligned / jnp.sum(aligned, axis=1, keepdims=True)
    return aligned, new_history, new_len


def memory_smoothing(
    *,
    probs: jax.Array,
    feats: jax.Array,
    queue_feats: jax.Array,
    queue_probs: jax.Array,
    temperature: float,
    alpha: float,
) -> jax.Array:
    """docs/method.md#memory-smoothing: ``alpha*p + (1-alpha) * softmax_rows(feats·QFᵀ/T) · QP`` (no
    max-subtraction, docs/method.md#q14-unshifted-exponentials)."""
    affinity = jnp.exp(matmul(feats, queue_feats.T) / temperature)
    affinity = affinity / jnp.sum(affinity, axis=1, keepdims=True)
    return alpha * probs + (1.0 - alpha) * matmul(affinity, queue_probs)


def pseudo_label_graph(*, probs: jax.Array, threshold: float) -> tuple[jax.Array, jax.Array]:
    """docs/method.md#pseudo-label-graph: thresholded, row-normalised ``p·pᵀ`` with self-loops.
    Returns ``(Q, pos_mask)``."""
    graph = matmul(probs, probs.T)
    eye = jnp.eye(graph.shape[0], dtype=bool)
    graph = jnp.where(eye, 1.0, graph)  # self-loop set before thresholding
    pos_mask = (graph >= threshold).astype(graph.dtype)
    graph = graph * pos_mask
    return graph / jnp.sum(graph, axis=1, keepdims=True), pos_mask


def embedding_graph(*, anchors: jax.Array, others: jax.Array, temperature: float) -> jax.Array:
    """docs/method.md#graph-contrastive-loss: row-normalised ``exp(anchors·othersᵀ / T)`` (not
    symmetrised)."""
    sim = jnp.exp(matmul(anchors, others.T) / temperature)
    return sim / jnp.sum(sim, axis=1, keepdims=True)


def graph_contrastive_loss(*, sim_probs: jax.Array, targets: jax.Array) -> jax.Array:
    """docs/method.md#graph-contrastive-loss per anchor: ``-sum_j Q_ij log(P_ij + 1e-7)``, shape
    (Bu,)."""
    return -jnp.sum(jnp.log(sim_probs + 1e-7) * targets, axis=1)


# --------------------------------------------------------------------- CCSSL (docs/method.md#ccssl)


def ccssl_select_matrix(*, confidence: jax.Array, t_push: float) -> jax.Array:
    """docs/method.md#id-and-od-settings OD selection:
    ``Sel_ij = [i == j] or ([c_i >= T_push] and [c_j >= T_push])``."""
    confident = confidence >= t_push
    both = confident[:, None] & confident[None, :]
    eye = jnp.eye(confidence.shape[0], dtype=bool)
    return (both | eye).astype(jnp.float32)


def class_aware_contrastive_loss(
    *,
    view0: jax.Array,
    view1: jax.Array,
    confidence: jax.Array,
    labels: jax.Array,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    select: jax.Array | None = None,
    diag_weight: str = "one",
) -> jax.Array:
    """docs/method.md#ccssl-loss soft SupCon with confidence re-weighting. Per-anchor losses, shape
    (2, n).

    Row 0 holds the view-0 anchors, row 1 the view-1 anchors; the loss is their mean.
    ``diag_weight`` is "one" (latest reference) or "confidence_squared" (older revisions,
    docs/method.md#q5-ccssl-diagonal-weight). Confidences, labels and selection are constants: no
    gradient flows into them.
    """
    n = view0.shape[0]
    confidence = jax.lax.stop_gradient(confidence)
    same_label = (labels[:, None] == labels[None, :]).astype(jnp.float32)
    weights = confidence[:, None] * confidence[None, :]
    if diag_weight == "one":
        weights = jnp.where(jnp.eye(n, dtype=bool), 1.0, weights)
    elif diag_weight != "confidence_squared":
        raise ValueError(f"diag_weight must be 'one' or 'confidence_squared', got {diag_weight!r}")
    weights = same_label * weights
    if select is not None:
        weights = weights * jax.lax.stop_gradient(select)

    feats = jnp.concatenate([view0, view1], axis=0)  # row v*n + i
    logits = matmul(feats, feats.T) / temperature
    logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=1, keepdims=True))
    not_self = 1.0 - jnp.eye(2 * n, dtype=jnp.float32)
    pos_weights = jnp.tile(weights, (2, 2)) * not_self
    exp_logits = jnp.exp(logits) * not_self
    log_prob = logits - jnp.log(jnp.sum(exp_logits, axis=1, keepdims=True))
    mean_log_prob_pos = jnp.sum(pos_weights * log_prob, axis=1) / jnp.sum(pos_weights, axis=1)
    per_anchor = -(temperature / base_temperature) * mean_log_prob_pos
    return per_anchor.reshape(2, n)
