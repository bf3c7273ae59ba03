"""Semi-hard cosine triplet loss (docs/method.md#triplet-loss).

The miner, loss and ThresholdReducer(low=0) of the metric library the reference uses, as
mask-based JAX with fixed shapes: one compilation serves every batch. Two miners give the same
counts and gradient: a dense O(B^3) one (`_dense_triplet_terms`) and a sorted O(B^2 log B) one
(`_sorted_triplet_terms`); `triplet_method` picks by batch size. `ssl_jax.losses` re-exports
the public names. Similarity matmuls request ``Precision.HIGHEST`` (see `ssl_jax.losses`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ssl_jax import xla_cpu


class TripletMasks(NamedTuple):
    """Boolean (B, B, B) masks indexed ``[anchor, positive, negative]``."""

    valid: jax.Array  # a != p, y_a == y_p, y_n != y_a
    mined: jax.Array  # valid and 0 < S_ap - S_an <= margin (semi-hard)
    ties: jax.Array  # valid and S_ap == S_an exactly (never mined)


class TripletStats(NamedTuple):
    """int32 counts of one triplet-loss evaluation (diagnostics; no gradient).

    They wrap past 2^31 - 1 triplets (valid ones from B ~ 2,800 with 10 balanced classes);
    the loss does not depend on them.
    """

    valid: jax.Array
    mined: jax.Array
    positive: jax.Array  # mined triplets with loss > 0: the mean's denominator
    ties: jax.Array


def cosine_similarity(embeddings: jax.Array) -> jax.Array:
    """``Ê·Êᵀ`` with ``Ê = e / max(||e||, 1e-12)``, the metric library's cosine similarity."""
    norm = jnp.sqrt(jnp.sum(jnp.square(embeddings), axis=1, keepdims=True))
    unit = embeddings / jnp.maximum(norm, 1e-12)
    return jnp.matmul(unit, unit.T, precision=jax.lax.Precision.HIGHEST)


def _triplet_pairs(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, B) masks: (a, p) a positive pair (same label, a != p); (a, n) a negative."""
    same = labels[:, None] == labels[None, :]
    return same & ~jnp.eye(labels.shape[0], dtype=bool), ~same


def _anchor_triplets(
    sim: jax.Array, positive: jax.Array, negative: jax.Array, margin: float
) -> tuple[TripletMasks, jax.Array]:
    """One anchor's (positive, negative) grid: the docs/method.md#triplet-loss masks and
    relu((S_an - S_ap) + margin)."""
    sim_ap, sim_an = sim[:, None], sim[None, :]
    valid = positive[:, None] & negative[None, :]
    triplet_margin = sim_ap - sim_an  # similarity: the margin flips sign vs. distances
    masks = TripletMasks(
        valid=valid,
        # The reference's S_ap - S_an > 0 is S_ap > S_an in IEEE arithmetic; written as the
        # comparison because XLA:CPU flushes a subnormal difference to 0 in some kernels only.
        mined=valid & (sim_ap > sim_an) & (triplet_margin <= margin),
        ties=valid & (sim_ap == sim_an),
    )
    # Evaluated in the reference's order.
    return masks, jax.nn.relu(sim_an - sim_ap + margin)


def semihard_triplet_loss(
    *,
    embeddings: jax.Array,
    labels: jax.Array,
    margin: float = 0.2,
    anchor_block: int | None = None,
    method: str = "auto",
) -> tuple[jax.Array, TripletStats]:
    """docs/method.md#triplet-loss: semi-hard cosine triplet loss, mean over mined triplets with
    loss > 0.

    Mask-based: no Python loops or data-dependent shapes, so one compilation serves every
    batch. When nothing is kept the loss is exactly 0 and its gradient exactly zero.
    ``anchor_block`` and ``method``: see `semihard_triplet_loss_from_similarity`.
    """
    return semihard_triplet_loss_from_similarity(
        similarity=cosine_similarity(embeddings),
        labels=labels,
        margin=margin,
        anchor_block=anchor_block,
        method=method,
    )


# Anchors per block of the dense miner's (block, B, B) work: 8 x 224 x 224 floats is 1.5 MiB.
TRIPLET_ANCHOR_BLOCK = 8
# Below this batch the (B, B, B) work fits in cache anyway: one block, no loop.
TRIPLET_BLOCKED_MIN_BATCH = 64
# From this batch on, method="auto" takes the sorted O(B^2 log B) miner; below it the dense
# O(B^3) one, as fast there (<1 ms) and quicker to compile. On the 2-core development CPU the
# sorted miner is ~4x faster at B=64, ~10x at 224 (benchmarks/RESULTS.md, "Semi-hard triplet
# miner").
TRIPLET_SORTED_MIN_BATCH = 64
TRIPLET_METHODS = ("auto", "dense", "sorted")


def default_triplet_anchor_block(batch: int, platform: str | None = None) -> int:
    """The dense triplet miner's anchors per block when the caller names none.

    On CPU, `TRIPLET_ANCHOR_BLOCK` for batches of at least `TRIPLET_BLOCKED_MIN_BATCH`, so
    the intermediates stay in cache (B=224: 78 -> ~50 ms on the 2-core development CPU);
    elsewhere, and for small batches, the whole batch in one block. ``platform``: None reads
    jax's default platform.
    """
    platform = platform or xla_cpu.default_platform()
    if platform == "cpu" and batch >= TRIPLET_BLOCKED_MIN_BATCH:
        return TRIPLET_ANCHOR_BLOCK
    return batch


def triplet_method(batch: int, method: str = "auto") -> str:
    """The miner ``method`` resolves to: "sorted" from `TRIPLET_SORTED_MIN_BATCH`, else "dense"."""
    if method not in TRIPLET_METHODS:
        raise ValueError(f"method must be one of {TRIPLET_METHODS}, got {method!r}")
    if method == "auto":
        return "sorted" if batch >= TRIPLET_SORTED_MIN_BATCH else "dense"
    return method


def semihard_triplet_loss_from_similarity(
    *,
    similarity: jax.Array,
    labels: jax.Array,
    margin: float = 0.2,
    anchor_block: int | None = None,
    method: str = "auto",
) -> tuple[jax.Array, TripletStats]:
    """The docs/method.md#triplet-loss miner, loss and ThresholdReducer(low=0) on a given (B, B)
    similarity matrix.

    Gradient w.r.t. S: +1/N on each kept S_an, -1/N on each kept S_ap; the masks carry none.
    The mining happens once, without gradient, reduced to (B, B) counts and sums: per
    (anchor, positive) the kept, mined and tied negatives and the kept losses' sum, per
    (anchor, negative) the positives it is kept with. The loss value is the kept losses' sum
    over N, and the gradient comes from a (B, B) surrogate with the same derivative,
    ``sum(S * (kept_per_an - kept_per_ap)) / N``, added as ``x - stop_gradient(x)`` (zero in
    value).

    ``method`` chooses how the counts are found (both give the same counts and gradient
    exactly, and the same loss to float32 rounding):
      * "dense": every (anchor, positive, negative) candidate, O(B^3) time; anchors go through
        it ``anchor_block`` at a time (any block gives the same result; None: chosen by
        `default_triplet_anchor_block`), so memory is O(block * B^2).
      * "sorted": `_sorted_triplet_terms`, O(B^2 log B) time and O(B^2) memory
        (``anchor_block`` is not used).
      * "auto": `triplet_method` (by batch size only, the same on every platform).
    """
    fixed = jax.lax.stop_gradient(similarity)
    b = labels.shape[0]
    positive_pair, negative = _triplet_pairs(labels)
    if triplet_method(b, method) == "sorted":
        terms = _sorted_triplet_terms(fixed, positive_pair, negative, margin)
    else:
        block = default_triplet_anchor_block(b) if anchor_block is None else anchor_block
        terms = _dense_triplet_terms(fixed, positive_pair, negative, margin, block)
    kept_per_ap, loss_per_ap, mined_per_ap, ties_per_ap, kept_per_an = terms

    num_kept = jnp.sum(kept_per_ap)
    # N from per-anchor int32 sums in float: exact to 2^24, and no int32 wrap-around (the int32
    # stats wrap past 2^31 - 1 kept triplets, e.g. B = 4096 with 10 classes).
    kept_per_anchor = jnp.sum(kept_per_ap, axis=1).astype(similarity.dtype)
    denominator = jnp.maximum(jnp.sum(kept_per_anchor), 1.0)
    value = jnp.sum(loss_per_ap) / denominator
    kept_difference = (kept_per_an - kept_per_ap).astype(similarity.dtype)
    surrogate = jnp.sum(similarity * kept_difference) / denominator
    loss = value + (surrogate - jax.lax.stop_gradient(surrogate))
    # valid = positive pair (a, p) and negative (a, n): a product of per-anchor counts.
    num_valid = jnp.sum(
        jnp.sum(positive_pair, axis=1, dtype=jnp.int32) * jnp.sum(negative, axis=1, dtype=jnp.int32)
    )
    stats = TripletStats(
        valid=num_valid,
        mined=jnp.sum(mined_per_ap),
        positive=num_kept,
        ties=jnp.sum(ties_per_ap),
    )
    return loss, stats


# The (B, B) terms both miners return: int32 kept/mined/tied counts and the f32 kept-loss sum
# per (anchor, positive), and int32 kept counts per (anchor, negative).
TripletTerms = tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]


def _dense_triplet_terms(
    fixed: jax.Array, positive_pair: jax.Array, negative: jax.Array, margin: float, block: int
) -> TripletTerms:
    """The O(B^3) miner: each anchor's (positive, negative) grid, ``block`` anchors at a time."""
    b = fixed.shape[0]

    def per_anchor(row):
        """Counts and loss sums over the negatives for one anchor's (positive, negative) grid."""
        masks, per_triplet = _anchor_triplets(*row, margin)
        # The reducer keeps strictly positive losses: a mined triplet at the margin drops out.
        keep = masks.mined & (per_triplet > 0)
        return (
            jnp.sum(keep, axis=1, dtype=jnp.int32),
            jnp.sum(jnp.where(keep, per_triplet, 0.0), axis=1),
            jnp.sum(masks.mined, axis=1, dtype=jnp.int32),
            jnp.sum(masks.ties, axis=1, dtype=jnp.int32),
            jnp.sum(keep, axis=0, dtype=jnp.int32),
        )

    if block < 1:
        raise ValueError(f"anchor_block must be at least 1, got {block}")
    return jax.lax.map(per_anchor, (fixed, positive_pair, negative), batch_size=min(block, b))


def _first_true(predicate, sorted_negatives: jax.Array, sim: jax.Array, end: jax.Array):
    """Per (anchor, j): the first k in [0, end) with ``predicate(sorted[a, k], S_aj)``.

    A vectorised binary search (``end`` where none holds); ``predicate`` must be monotone
    (false, then true) along each sorted row. Every step gathers one candidate per pair.
    """
    b = sorted_negatives.shape[1]

    def step(_, bounds):
        lo, hi = bounds
        active = lo < hi
        mid = (lo + hi) // 2  # < b: in bounds even where inactive (lo == hi <= b - 1)
        candidate = jnp.take_along_axis(sorted_negatives, mid, axis=1, mode="promise_in_bounds")
        holds = predicate(candidate, sim)
        return jnp.where(active & ~holds, mid + 1, lo), jnp.where(active & holds, mid, hi)

    # The range [0, end) has at most b - 1 entries: that many halvings empty it.
    steps = max(b - 1, 0).bit_length()
    return jax.lax.fori_loop(0, steps, step, (jnp.zeros_like(end), end))[0]


def _skip_to_true(predicate, sorted_negatives, sim, end, start, next_group):
    """The first k in [start, end) with ``predicate(sorted[a, k], S_aj)`` (``end`` if none).

    For an answer known to lie a few distinct values past ``start``: it jumps over whole
    groups of equal values (``next_group[a, k]``: the first index past k's group), which a
    float expression cannot tell apart, while any entry's predicate fails, so it takes as many
    steps as the most distinct values any entry passes (0 when the predicate holds at
    ``start`` everywhere). ``predicate`` must be monotone, as for `_first_true`.
    """
    b = sorted_negatives.shape[1]

    def failing(k):
        candidate = jnp.take_along_axis(
            sorted_negatives, jnp.minimum(k, b - 1), axis=1, mode="promise_in_bounds"
        )
        return (k < end) & ~predicate(candidate, sim)

    def step(k):
        jump = jnp.take_along_axis(next_group, jnp.minimum(k, b - 1), axis=1)
        return jnp.where(failing(k), jnp.minimum(jump, end), k)

    return jax.lax.while_loop(lambda k: jnp.any(failing(k)), step, start)


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Knuth's error-free ``a + b = s + e`` in float32 (XLA does not reassociate floats)."""
    s = a + b
    b_virtual = s - a
    return s, (a - (s - b_virtual)) + (b - b_virtual)


def _df_add(x: tuple[jax.Array, jax.Array], y: tuple[jax.Array, jax.Array]):
    """Double-float (hi, lo) sum, ~48-bit significand: no cancellation when windows subtract."""
    s, e = _two_sum(x[0], y[0])
    return _two_sum(s, e + (x[1] + y[1]))


def _df_count_product(count: jax.Array, x: jax.Array | float) -> tuple[jax.Array, jax.Array]:
    """``count * x`` as a double-float for integer counts below 2^24, exactly.

    Both factors are split into 12-bit halves by masking bits (no FMA-sensitive Dekker split),
    so each partial product is exact in float32.
    """
    x = jnp.broadcast_to(jnp.asarray(x, jnp.float32), count.shape)
    x_hi = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(x, jnp.int32) & jnp.int32(~0xFFF), jnp.float32
    )
    x_lo = x - x_hi  # exact: the low 12 significand bits
    c_hi = (count & ~0xFFF).astype(jnp.float32)  # a multiple of 4096 with a 12-bit quotient
    c_lo = (count & 0xFFF).astype(jnp.float32)
    total = (c_hi * x_hi, jnp.zeros_like(x))
    for term in (c_hi * x_lo, c_lo * x_hi, c_lo * x_lo):
        total = _df_add(total, (term, jnp.zeros_like(x)))
    return total


def _sorted_triplet_terms(
    fixed: jax.Array, positive_pair: jax.Array, negative: jax.Array, margin: float
) -> TripletTerms:
    """The O(B^2 log B) miner: each anchor's negatives sorted, each pair's window searched.

    For a pair (a, p) today's per-triplet float predicates (`_anchor_triplets`) are monotone in
    S_an: ``S_ap - S_an <= margin`` and ``relu(S_an - S_ap + margin) > 0`` turn true as S_an
    grows, ``S_ap > S_an`` turns false, ``S_an >= S_ap`` and ``S_an > S_ap`` turn true. So
    the mined, kept and tied negatives are index ranges of a's sorted negatives whose edges
    `_first_true` finds by evaluating those same float expressions: the counts are exactly the
    dense miner's. Two binary searches run: the mined range's start, and the first S_an >= S_aj
    for every j (for a positive j the ties' start and the mined range's end, for a negative j
    its rank); the other edges lie at most a few distinct values past these
    (`_skip_to_true`). A kept range's loss sum, ``sum(S_an) - count * (S_ap - margin)``, comes
    from prefix sums of the sorted similarities in double-float (the difference cancels up to
    ~B-fold in float32). Per-negative kept
    counts: +1 at each kept range's start and -1 at its end in sorted order, a cumulative sum,
    then read at each negative's rank.
    """
    b = fixed.shape[0]
    columns = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32), (b, b))
    num_negatives = jnp.sum(negative, axis=1, dtype=jnp.int32)
    # Negatives first, ascending; the rest (same class, anchor itself) after them, never read.
    # Sorted as int32 keys with the floats' order (several times faster than a float sort).
    bits = jax.lax.bitcast_convert_type(jnp.where(negative, fixed, jnp.inf), jnp.int32)
    flip = jnp.int32(0x7FFFFFFF)
    keys = jnp.sort(jnp.where(bits < 0, bits ^ flip, bits), axis=1)
    keys = jnp.where(keys < 0, keys ^ flip, keys)
    sorted_negatives = jax.lax.bitcast_convert_type(keys, jnp.float32)

    # Per sorted position, the first position past its group of equal values.
    group_ends = jnp.where(sorted_negatives[:, 1:] == sorted_negatives[:, :-1], b, columns[:, 1:])
    next_group = jax.lax.cummin(jnp.concatenate([group_ends, columns[:, -1:] + 1], 1), 1, True)
    # Window searches run over [0, num_negatives[a]) for positive pairs, over nothing otherwise.
    end = jnp.where(positive_pair, num_negatives[:, None], 0)

    def gather(array, index):
        return jnp.take_along_axis(array, index, axis=1, mode="promise_in_bounds")

    def last_index(index):
        return jnp.minimum(index, b - 1)

    # The first S_an >= S_aj for every j: for a positive the ties' start, for a negative its
    # rank among a's sorted negatives.
    not_self = columns != jnp.arange(b)[:, None]
    rank = _first_true(
        lambda s_an, s_aj: s_an >= s_aj,
        sorted_negatives,
        fixed,
        jnp.where(not_self, num_negatives[:, None], 0),
    )
    ties_start = jnp.where(positive_pair, rank, 0)
    ties_end = _skip_to_true(
        lambda s_an, s_ap: s_an > s_ap, sorted_negatives, fixed, end, ties_start, next_group
    )
    mined_start = _first_true(
        lambda s_an, s_ap: (s_ap - s_an) <= margin, sorted_negatives, fixed, end
    )
    # Past a mined start only triplets with a loss of exactly 0 are dropped: a few values.
    kept_start = _skip_to_true(
        lambda s_an, s_ap: ((s_ap - s_an) <= margin) & (jax.nn.relu(s_an - s_ap + margin) > 0),
        sorted_negatives,
        fixed,
        end,
        mined_start,
        next_group,
    )

    # Mined and kept ranges end where S_an >= S_ap: at the ties' start.
    mined_per_ap = jnp.maximum(ties_start - mined_start, 0)
    kept_end = jnp.maximum(ties_start, kept_start)
    kept_per_ap = kept_end - kept_start
    ties_per_ap = ties_end - ties_start

    # Prefix sums of each anchor's sorted negatives (0 past them), double-float, by a scan.
    values = jnp.where(columns < num_negatives[:, None], sorted_negatives, 0.0)

    def accumulate(carry, column):
        carry = _df_add(carry, (column, jnp.zeros_like(column)))
        return carry, carry

    zeros = jnp.zeros((b,), jnp.float32)
    _, (prefix_hi, prefix_lo) = jax.lax.scan(accumulate, (zeros, zeros), values.T)
    # prefix[a, k] = sum of the first k sorted negatives: a zero column in front.
    prefix_hi = jnp.concatenate([zeros[:, None], prefix_hi.T], axis=1)
    prefix_lo = jnp.concatenate([zeros[:, None], prefix_lo.T], axis=1)
    window = _df_add(
        (gather(prefix_hi, kept_end), gather(prefix_lo, kept_end)),
        (-gather(prefix_hi, kept_start), -gather(prefix_lo, kept_start)),
    )
    # sum over the kept range of (S_an - S_ap + margin) = window - count * S_ap + count * margin
    count_ap = _df_count_product(kept_per_ap, fixed)
    count_margin = _df_count_product(kept_per_ap, margin)
    loss_sum = _df_add(_df_add(window, (-count_ap[0], -count_ap[1])), count_margin)
    loss_per_ap = jnp.where(kept_per_ap > 0, loss_sum[0] + loss_sum[1], 0.0)

    # Kept counts per negative: a difference array over sorted positions, summed, then read
    # at each negative's rank (tied negatives share their ranges, so any of their positions).
    anchors = jnp.broadcast_to(jnp.arange(b)[:, None], (b, b))
    steps = jnp.zeros((b, b), jnp.int32)
    steps = steps.at[anchors, kept_start].add(1, mode="promise_in_bounds")
    steps = steps.at[anchors, kept_end].add(-1, mode="promise_in_bounds")
    kept_sorted = jnp.cumsum(steps, axis=1)
    kept_per_an = jnp.where(negative, gather(kept_sorted, last_index(rank)), 0)
    return kept_per_ap, loss_per_ap, mined_per_ap, ties_per_ap, kept_per_an
