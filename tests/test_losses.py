"""Loss kernels against independent NumPy reimplementations and hand-built edge cases.

The golden fixtures (test_reference_fixtures.py) pin the numbers; these tests pin the
properties the fixtures cannot show: one compilation at the paper's batch, exact zeros,
the reducer's strict ``> 0``, and the DA buffer's oldest-first bookkeeping.
"""

from __future__ import annotations

import itertools

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
    """Loop-based §6 reference (miner, TripletMarginLoss, ThresholdReducer) in float32."""
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
    """B = 100 in anchor blocks (8 plus a remainder, 7, 100) against a vectorised NumPy §6."""
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

    def run(anchor_block):
        loss_and_grad = jax.value_and_grad(
            lambda s: losses.semihard_triplet_loss_from_similarity(
                similarity=s, labels=jnp.asarray(labels), anchor_block=anchor_block
            ),
            has_aux=True,
        )
        return jax.jit(loss_and_grad)(jnp.asarray(sim))

    assert n_kept > 1000
    (loss, stats), grad = run(losses.TRIPLET_ANCHOR_BLOCK)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-5, atol=1e-9)
    assert [int(x) for x in stats] == [int(valid.sum()), int(mined.sum()), n_kept, 0]
    for anchor_block in (7, b):
        (loss_other, stats_other), grad_other = run(anchor_block)
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
