"""Loss kernels against independent NumPy reimplementations and hand-built edge cases.

The golden fixtures (test_reference_fixtures.py) pin the numbers; these tests pin the
properties the fixtures cannot show: one compilation at the paper's batch, exact zeros,
the reducer's strict ``> 0``, and the DA buffer's oldest-first bookkeeping.
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ssl_jax import losses


def unit_rows(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_triplet(sim: np.ndarray, labels: np.ndarray, margin: float = 0.2):
    """Loop-based docs/method.md#triplet-loss reference (miner, TripletMarginLoss, ThresholdReducer)
    in float32."""
    margin = np.float32(margin)
    valid = mined = ties = 0
    kept = []
    for a, p, n in itertools.product(range(len(labels)), repeat=3):
        if a == p or labels[a] != labels[p] or labels[n] == labels[a]:
            continue
        valid += 1
        s_ap, s_an = sim[a, p], sim[a, n]
        ties += int(s_ap == s_an)
        if np.float32(0) < s_ap - s_an <= margin:
            mined += 1
            loss = max(np.float32(0), (s_an - s_ap) + margin)
            if loss > 0:
                kept.append(loss)
    mean = float(np.mean(np.asarray(kept, np.float64))) if kept else 0.0
    return mean, valid, mined, len(kept), ties


# ------------------------------------------------------------------------------ triplet


def test_triplet_matches_loop_reference_on_random_batch():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=10).astype(np.int32)
    emb = unit_rows(rng.normal(size=(10, 6)).astype(np.float32) + 2.0 * labels[:, None])
    sim = np.asarray(losses.cosine_similarity(jnp.asarray(emb)))
    expected, valid, mined, positive, ties = numpy_triplet(sim, labels)
    loss, stats = jax.jit(losses.semihard_triplet_loss)(
        embeddings=jnp.asarray(emb), labels=jnp.asarray(labels)
    )
    assert mined > 0  # the case exercises the miner
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert (int(stats.valid), int(stats.mined), int(stats.positive), int(stats.ties)) == (
        valid,
        mined,
        positive,
        ties,
    )


def test_triplet_valid_count_closed_form_and_single_compile_at_paper_batch():
    """B = 224 (the paper's Bu) compiles once and serves a second batch without re-tracing."""

    @jax.jit
    @chex.assert_max_traces(n=1)
    def loss_and_grad(emb, labels):
        return jax.value_and_grad(
            lambda e: losses.semihard_triplet_loss(embeddings=e, labels=labels), has_aux=True
        )(emb)

    rng = np.random.default_rng(1)
    for seed in range(2):
        labels = np.random.default_rng(seed).integers(0, 10, size=224).astype(np.int32)
        emb = unit_rows(rng.normal(size=(224, 64)).astype(np.float32))
        (loss, stats), grad = loss_and_grad(jnp.asarray(emb), jnp.asarray(labels))
        counts = np.bincount(labels, minlength=10)
        # Each anchor pairs with (n_y - 1) positives and (B - n_y) negatives.
        assert int(stats.valid) == int(np.sum(counts * (counts - 1) * (224 - counts)))
        assert 0 < int(stats.positive) <= int(stats.mined) <= int(stats.valid)
        assert np.isfinite(float(loss)) and 0.0 < float(loss) < 0.2
        assert grad.shape == (224, 64) and np.all(np.isfinite(np.asarray(grad)))


def test_triplet_anchor_blocks_equal_one_block_and_numpy():
    """B = 100 in anchor blocks (8 plus a remainder, 7, 100) and sorted, against NumPy
    docs/method.md#triplet-loss."""
    rng = np.random.default_rng(3)
    b = 100
    assert b >= losses.TRIPLET_BLOCKED_MIN_BATCH and b % losses.TRIPLET_ANCHOR_BLOCK
    labels = rng.integers(0, 6, size=b).astype(np.int32)
    emb = unit_rows(rng.normal(size=(b, 16)).astype(np.float32) + 0.7 * labels[:, None])
    sim = np.asarray(losses.cosine_similarity(jnp.asarray(emb)))

    # NumPy: masks over [anchor, positive, negative], the loss and d loss / d S by counting.
    same = labels[:, None] == labels[None, :]
    valid = (same & ~np.eye(b, dtype=bool))[:, :, None] & ~same[:, None, :]
    s_ap, s_an = sim[:, :, None], sim[:, None, :]
    per_triplet = np.maximum(np.float32(0), (s_an - s_ap) + np.float32(0.2))
    mined = valid & (s_ap - s_an > 0) & (s_ap - s_an <= np.float32(0.2))
    keep = mined & (per_triplet > 0)
    n_kept = int(keep.sum())
    expected_loss = float(per_triplet[keep].astype(np.float64).sum() / n_kept)
    expected_grad = (keep.sum(axis=1) - keep.sum(axis=2)) / n_kept

    def run(anchor_block, method="dense"):
        loss_and_grad = jax.value_and_grad(
            lambda s: losses.semihard_triplet_loss_from_similarity(
                similarity=s, labels=jnp.asarray(labels), anchor_block=anchor_block, method=method
            ),
            has_aux=True,
        )
        return jax.jit(loss_and_grad)(jnp.asarray(sim))

    assert n_kept > 1000
    (loss, stats), grad = run(losses.TRIPLET_ANCHOR_BLOCK)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-5, atol=1e-9)
    assert [int(x) for x in stats] == [int(valid.sum()), int(mined.sum()), n_kept, 0]
    for anchor_block, method in ((7, "dense"), (b, "dense"), (None, "sorted")):
        (loss_other, stats_other), grad_other = run(anchor_block, method)
        assert [int(x) for x in stats_other] == [int(x) for x in stats]
        np.testing.assert_allclose(float(loss_other), float(loss), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(grad_other), np.asarray(grad), rtol=1e-6, atol=1e-9)
    # The default blocks on CPU only: an accelerator takes the batch in one block.
    assert losses.default_triplet_anchor_block(b, platform="cpu") == losses.TRIPLET_ANCHOR_BLOCK
    assert losses.default_triplet_anchor_block(b, platform="gpu") == b


@pytest.mark.parametrize(
    "labels",
    [
        [0, 0, 0, 0, 0],  # one class: no negatives
        [0, 1, 2, 3, 4],  # all distinct: no positives
        [3, 7],  # two samples, two classes
    ],
)
def test_triplet_without_valid_triplets_is_exactly_zero(labels):
    labels = jnp.asarray(labels, jnp.int32)
    emb = jnp.asarray(
        unit_rows(np.random.default_rng(2).normal(size=(len(labels), 8))), jnp.float32
    )

    def loss_fn(e):
        return losses.semihard_triplet_loss(embeddings=e, labels=labels)

    (loss, stats), grad = jax.value_and_grad(loss_fn, has_aux=True)(emb)
    assert int(stats.valid) == 0 and int(stats.mined) == 0
    assert float(loss) == 0.0
    assert not np.any(np.asarray(grad))


def test_triplet_gradient_is_exactly_zero_when_everything_is_easy():
    # Two tight, far-apart clusters: every valid triplet has S_ap - S_an > margin.
    base = np.eye(8, dtype=np.float32)[[0, 0, 0, 1, 1, 1]]
    emb = unit_rows(base + 1e-3 * np.random.default_rng(3).normal(size=base.shape))
    labels = jnp.asarray([0, 0, 0, 1, 1, 1], jnp.int32)
    (loss, stats), grad = jax.value_and_grad(
        lambda e: losses.semihard_triplet_loss(embeddings=e, labels=labels), has_aux=True
    )(jnp.asarray(emb, jnp.float32))
    assert int(stats.valid) == 36 and int(stats.mined) == 0
    assert float(loss) == 0.0 and not np.any(np.asarray(grad))


def test_triplet_reducer_drops_a_mined_triplet_at_exactly_the_margin():
    """S_ap - S_an == 0.2f is mined (<= margin) but its loss is exactly 0, so it is not kept."""
    margin = np.float32(0.2)
    s_ap = np.float32(0.375)
    s_an = s_ap - margin  # exact: both values are multiples of 2**-26
    assert (s_an - s_ap) + margin == 0
    # anchors 0/1 (class 0), negative 2 (class 1); a second, ordinary semihard triplet via 3.
    sim = np.full((4, 4), -1.0, np.float32)
    np.fill_diagonal(sim, 1.0)
    sim[0, 1] = sim[1, 0] = s_ap
    sim[0, 2] = sim[2, 0] = s_an
    sim[1, 3] = sim[3, 1] = np.float32(0.25)  # S_10 - S_13 = 0.125: semihard, loss 0.075
    labels = jnp.asarray([0, 0, 1, 1], jnp.int32)
    loss, stats = losses.semihard_triplet_loss_from_similarity(
        similarity=jnp.asarray(sim), labels=labels, margin=0.2
    )
    assert int(stats.mined) == 2 and int(stats.positive) == 1
    np.testing.assert_allclose(float(loss), 0.25 - 0.375 + 0.2, rtol=1e-6)
    # Gradient w.r.t. S: -1/N on the kept S_ap, +1/N on the kept S_an, nothing else.
    grad = jax.grad(
        lambda s: losses.semihard_triplet_loss_from_similarity(similarity=s, labels=labels)[0]
    )(jnp.asarray(sim))
    expected = np.zeros((4, 4), np.float32)
    expected[1, 0], expected[1, 3] = -1.0, 1.0
    np.testing.assert_array_equal(np.asarray(grad), expected)


def test_triplet_exact_ties_are_counted_and_not_mined():
    # Rows 1 and 2 are the same direction (power-of-two scale), so S_01 == S_02 exactly.
    rng = np.random.default_rng(4)
    v = rng.normal(size=(3, 16)).astype(np.float32)
    emb = np.stack([v[0], v[1], 4.0 * v[1], v[2]])
    labels = np.asarray([0, 0, 1, 1], np.int32)
    sim = np.asarray(losses.cosine_similarity(jnp.asarray(emb)))
    assert sim[0, 1] == sim[0, 2]
    _, stats = losses.semihard_triplet_loss(embeddings=jnp.asarray(emb), labels=labels)
    _, valid, mined, _, ties = numpy_triplet(sim, labels)
    assert int(stats.ties) == ties >= 1
    assert int(stats.mined) == mined and int(stats.valid) == valid


def _tie_heavy_similarity(rng, b, levels=8):
    """A similarity matrix on a coarse grid: many exact ties, many triplets exactly at 0.25."""
    return (rng.integers(-levels, levels + 1, size=(b, b)) / levels).astype(np.float32)


def _sorted_vs_dense_cases():
    """(name, similarity, labels, margin): random, tied, degenerate; B = 48 except B = 2."""
    rng = np.random.default_rng(11)
    b = 48
    labels = rng.integers(0, 5, size=b).astype(np.int32)
    emb = unit_rows(rng.normal(size=(b, 8)).astype(np.float32) + 0.8 * labels[:, None])
    sim = np.asarray(losses.cosine_similarity(jnp.asarray(emb)))
    # Quantised 3-d embeddings with repeated rows: exact ties among real cosines.
    quantised = np.round(rng.normal(size=(b, 3)) * 2.0).astype(np.float32) + 0.5
    sim_quantised = np.asarray(losses.cosine_similarity(jnp.asarray(quantised)))
    same = labels[:, None] == labels[None, :]
    tiny = np.float32(2e-38) * (1.0 + rng.integers(0, 4, size=(b, b)) / 16).astype(np.float32)
    cases = [
        ("random m=0.2", sim, labels, 0.2),
        ("random m=0.05", sim, labels, 0.05),
        ("random m=0.7", sim, labels, 0.7),
        ("random m=0", sim, labels, 0.0),
        ("quantised embeddings", sim_quantised, labels, 0.2),
        ("grid ties, at the margin", _tie_heavy_similarity(rng, b), labels, 0.25),
        ("grid ties, two classes", _tie_heavy_similarity(rng, b, 2), labels % 2, 0.5),
        ("one class", sim, np.zeros(b, np.int32), 0.2),
        ("all classes distinct", sim, np.arange(b, dtype=np.int32), 0.2),
        ("all easy", np.where(same, 0.9, -0.5).astype(np.float32), labels, 0.2),
        ("all hard", np.where(same, -0.5, 0.9).astype(np.float32), labels, 0.2),
        # Normal similarities whose differences are subnormal (XLA:CPU flushes some to 0).
        ("subnormal differences", tiny, labels, 0.2),
    ]
    two = np.asarray([[1.0, 0.3], [0.3, 1.0]], np.float32)
    cases += [
        ("B=2, one class", two, np.asarray([4, 4], np.int32), 0.2),
        ("B=2, two classes", two, np.asarray([0, 1], np.int32), 0.2),
    ]
    return cases


@functools.partial(jax.jit, static_argnames="method")
def _triplet_on_similarity(sim, labels, margin, *, method):
    """Loss, stats and d loss / d S; the margin traced, so one compile per (B, method)."""
    return jax.value_and_grad(
        lambda s: losses.semihard_triplet_loss_from_similarity(
            similarity=s, labels=labels, margin=margin, method=method
        ),
        has_aux=True,
    )(sim)


@pytest.mark.parametrize("case", _sorted_vs_dense_cases(), ids=lambda case: case[0])
def test_sorted_triplet_miner_matches_dense(case):
    """Same counts exactly, same gradient exactly, same loss to float32 summation order."""
    _, sim, labels, margin = case
    args = (jnp.asarray(sim), jnp.asarray(labels), jnp.float32(margin))
    (loss_dense, stats_dense), grad_dense = _triplet_on_similarity(*args, method="dense")
    (loss_sorted, stats_sorted), grad_sorted = _triplet_on_similarity(*args, method="sorted")
    assert [int(x) for x in stats_sorted] == [int(x) for x in stats_dense]
    np.testing.assert_allclose(float(loss_sorted), float(loss_dense), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(grad_sorted), np.asarray(grad_dense))
    if int(stats_dense.positive) == 0:
        assert float(loss_sorted) == 0.0 and not np.any(np.asarray(grad_sorted))


def test_sorted_triplet_cases_exercise_ties_margin_and_subnormals():
    """The cases above reach the sorted miner's rare branches, so their agreement means it."""
    cases = {name: (sim, labels, margin) for name, sim, labels, margin in _sorted_vs_dense_cases()}

    def stats(name):
        sim, labels, margin = cases[name]
        args = (jnp.asarray(sim), jnp.asarray(labels), jnp.float32(margin))
        return _triplet_on_similarity(*args, method="dense")[0][1]

    assert int(stats("quantised embeddings").ties) > 50
    grid = stats("grid ties, at the margin")
    assert int(grid.ties) > 500 and 0 < int(grid.positive) < int(grid.mined)  # at the margin
    assert int(stats("all easy").mined) == 0 and int(stats("all hard").mined) == 0
    # Subnormal differences: mined as in IEEE arithmetic (NumPy, PyTorch), not flushed to 0.
    sim, labels, _ = cases["subnormal differences"]
    s_ap, s_an = sim[:, :, None], sim[:, None, :]
    same = labels[:, None] == labels[None, :]
    valid = (same & ~np.eye(len(labels), dtype=bool))[:, :, None] & ~same[:, None, :]
    assert np.all(np.abs(s_ap - s_an)[valid] < np.finfo(np.float32).tiny)
    assert int(stats("subnormal differences").mined) == int(np.sum(valid & (s_ap > s_an))) > 0


TRIPLET_FIXTURES = sorted((Path(__file__).parent / "fixtures").glob("triplet_*.npz"))


@pytest.mark.parametrize("path", TRIPLET_FIXTURES, ids=lambda path: path.stem)
def test_triplet_fixtures_with_the_miner_auto_does_not_pick(path):
    """test_reference_fixtures.py runs "auto"; here the other miner meets the same fixture."""
    with np.load(path) as fx:
        fx = dict(fx)
    emb, labels = jnp.asarray(fx["emb"]), jnp.asarray(fx["labels"])
    other = {"dense": "sorted", "sorted": "dense"}[losses.triplet_method(len(labels))]
    (loss, stats), grad = jax.jit(
        jax.value_and_grad(
            lambda e: losses.semihard_triplet_loss(
                embeddings=e, labels=labels, margin=0.2, method=other
            ),
            has_aux=True,
        )
    )(emb)
    assert [int(x) for x in stats] == [
        int(fx[key]) for key in ("n_triplets_all", "n_mined", "n_positive_loss", "n_exact_ties")
    ]
    np.testing.assert_allclose(float(loss), float(fx["loss"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), fx["grad_emb"], rtol=1e-4, atol=1e-6)


def test_sorted_triplet_loss_is_free_of_prefix_sum_cancellation():
    """Per (anchor, positive) kept-loss sums against float64 sums of the float32 terms.

    Tight clusters (similarities ~0.99) make sum(S_an) - count * S_ap cancel ~100-fold; with
    plain float32 prefix sums the worst pair is off by ~3e-6 (relative), with the double-float
    ones by ~6e-8, below the dense miner's own float32 summation (~1.4e-7).
    """
    rng = np.random.default_rng(12)
    b = 300
    labels = rng.integers(0, 10, size=b).astype(np.int32)
    emb = rng.normal(size=(b, 32)).astype(np.float32) * 0.3 + 3.0 + 0.1 * labels[:, None]
    sim = np.asarray(losses.cosine_similarity(jnp.asarray(unit_rows(emb))))
    positive_pair, negative = losses._triplet_pairs(jnp.asarray(labels))
    kept, loss_sum, *_ = jax.jit(losses._sorted_triplet_terms, static_argnums=3)(
        jnp.asarray(sim), positive_pair, negative, 0.2
    )
    expected_kept = np.zeros((b, b), np.int64)
    expected_sum = np.zeros((b, b))
    margin = np.float32(0.2)
    for a in range(b):  # docs/method.md#triplet-loss in float32 per triplet, summed in float64
        s_an = sim[a, labels != labels[a]]
        for p in np.flatnonzero((labels == labels[a]) & (np.arange(b) != a)):
            per_triplet = (s_an - sim[a, p]) + margin
            keep = (sim[a, p] - s_an > 0) & (sim[a, p] - s_an <= margin) & (per_triplet > 0)
            expected_kept[a, p] = keep.sum()
            expected_sum[a, p] = np.sum(per_triplet[keep], dtype=np.float64)
    assert np.mean(sim) > 0.95 and expected_kept.sum() > 10**5
    np.testing.assert_array_equal(np.asarray(kept), expected_kept)
    np.testing.assert_allclose(np.asarray(loss_sum, np.float64), expected_sum, rtol=3e-7)


def test_triplet_method_selection():
    small, large = losses.TRIPLET_SORTED_MIN_BATCH - 1, losses.TRIPLET_SORTED_MIN_BATCH
    assert losses.triplet_method(small) == "dense"
    assert losses.triplet_method(large) == "sorted"
    assert losses.triplet_method(large, "dense") == "dense"
    with pytest.raises(ValueError, match="method must be one of"):
        losses.triplet_method(large, "fast")


# -------------------------------------------------------------------- classification


def test_cross_entropy_matches_optax_and_soft_ce_with_one_hot():
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    labels = jnp.asarray([0, 3, 1, 1, 2, 0], jnp.int32)
    ce = losses.cross_entropy(logits=logits, labels=labels)
    np.testing.assert_allclose(
        ce, optax.softmax_cross_entropy_with_integer_labels(logits, labels), rtol=1e-6
    )
    soft = losses.soft_cross_entropy(logits=logits, targets=jax.nn.one_hot(labels, 4))
    np.testing.assert_allclose(soft, ce, rtol=1e-6)


def test_masked_accuracy_denominator_is_at_least_one():
    preds = jnp.asarray([1, 2, 3])
    labels = jnp.asarray([1, 0, 3])
    assert float(losses.masked_accuracy(predictions=preds, labels=labels, mask=jnp.zeros(3))) == 0
    mask = jnp.asarray([1.0, 1.0, 0.0])
    assert float(losses.masked_accuracy(predictions=preds, labels=labels, mask=mask)) == 0.5


# ----------------------------------------------------------------------- CoMatch pieces


def test_distribution_alignment_buffer_matches_a_python_list():
    """The fixed (da_len, C) buffer stays the reference's oldest-first list, dropping the oldest."""
    da_len, num_classes = 3, 4
    rng = np.random.default_rng(6)
    history = jnp.zeros((da_len, num_classes), jnp.float32)
    length = jnp.zeros((), jnp.int32)
    reference: list[np.ndarray] = []
    align = jax.jit(losses.distribution_alignment)
    for _ in range(5):
        probs = rng.dirichlet(np.ones(num_classes), size=6).astype(np.float32)
        aligned, history, length = align(probs=probs, history=history, history_len=length)
        reference.append(probs.mean(0))
        reference = reference[-da_len:]
        expected = probs / np.mean(reference, axis=0)
        expected /= expected.sum(1, keepdims=True)
        assert int(length) == len(reference)
        np.testing.assert_allclose(np.asarray(history)[: int(length)], reference, atol=1e-7)
        np.testing.assert_allclose(aligned, expected, atol=1e-6)


def test_pseudo_label_graph_keeps_self_loops_and_normalises_rows():
    probs = jnp.asarray(
        [[1.0, 0.0], [0.95, 0.05], [0.0, 1.0], [0.5, 0.5]], jnp.float32
    )  # row 3 is unsure: p·p = 0.5 < 0.8 with itself, yet its self-loop survives
    graph, pos_mask = losses.pseudo_label_graph(probs=probs, threshold=0.8)
    np.testing.assert_array_equal(np.diag(np.asarray(pos_mask)), 1.0)
    np.testing.assert_allclose(np.asarray(graph).sum(1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(graph)[3], [0.0, 0.0, 0.0, 1.0])
    assert float(graph[0, 1]) > 0 and float(graph[0, 2]) == 0


def test_memory_smoothing_with_alpha_one_is_identity():
    rng = np.random.default_rng(7)
    probs = jnp.asarray(rng.dirichlet(np.ones(3), size=4), jnp.float32)
    out = losses.memory_smoothing(
        probs=probs,
        feats=jnp.asarray(unit_rows(rng.normal(size=(4, 5))), jnp.float32),
        queue_feats=jnp.zeros((8, 5)),
        queue_probs=jnp.zeros((8, 3)),
        temperature=0.2,
        alpha=1.0,
    )
    np.testing.assert_array_equal(out, probs)


# --------------------------------------------------------------------------------- CCSSL


def test_ccssl_select_matrix_and_t_push_zero_equals_no_selection():
    confidence = jnp.asarray([0.95, 0.5, 0.91, 0.2], jnp.float32)
    select = losses.ccssl_select_matrix(confidence=confidence, t_push=0.9)
    expected = np.eye(4, dtype=np.float32)
    expected[np.ix_([0, 2], [0, 2])] = 1.0
    np.testing.assert_array_equal(select, expected)

    rng = np.random.default_rng(8)
    kwargs = dict(
        view0=jnp.asarray(unit_rows(rng.normal(size=(4, 6))), jnp.float32),
        view1=jnp.asarray(unit_rows(rng.normal(size=(4, 6))), jnp.float32),
        confidence=confidence,
        labels=jnp.asarray([0, 1, 0, 1], jnp.int32),
    )
    none = losses.class_aware_contrastive_loss(**kwargs)
    everything = losses.class_aware_contrastive_loss(
        **kwargs, select=losses.ccssl_select_matrix(confidence=confidence, t_push=0.0)
    )
    np.testing.assert_array_equal(none, everything)
    assert none.shape == (2, 4)


def test_ccssl_with_distinct_labels_is_instance_discrimination():
    """Only the other view is a positive: ℓ_a = -log softmax over the other 2n-1 rows."""
    rng = np.random.default_rng(9)
    v0 = unit_rows(rng.normal(size=(3, 5))).astype(np.float32)
    v1 = unit_rows(rng.normal(size=(3, 5))).astype(np.float32)
    per_anchor = losses.class_aware_contrastive_loss(
        view0=jnp.asarray(v0),
        view1=jnp.asarray(v1),
        confidence=jnp.asarray([0.3, 0.6, 0.9], jnp.float32),
        labels=jnp.asarray([0, 1, 2], jnp.int32),
    )
    f = np.concatenate([v0, v1]).astype(np.float64)
    logits = f @ f.T / 0.07
    expected = np.empty(6)
    for a in range(6):
        others = [b for b in range(6) if b != a]
        partner = (a + 3) % 6
        expected[a] = -(logits[a, partner] - np.log(np.sum(np.exp(logits[a, others]))))
    np.testing.assert_allclose(np.asarray(per_anchor).ravel(), expected, rtol=1e-5)
