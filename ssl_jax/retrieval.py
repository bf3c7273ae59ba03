"""Retrieval quality of the test embeddings: leave-one-out kNN, precision@1 and MAP@R (cosine).

Every test embedding is a query against all the *other* test embeddings (one set is both
queries and references, as pytorch-metric-learning's AccuracyCalculator does with
``embeddings_come_from_same_source=True``). Similarity is cosine. A query whose class has no
other member ("lone query") has nothing to retrieve and is left out of precision@1 and MAP@R,
as there.

* kNN accuracy: majority vote of the k most similar others; a tied vote goes to the lowest
  class index (scikit-learn's ``KNeighborsClassifier`` with uniform weights does the same).
* precision@1: the fraction of queries whose most similar other has the same class.
* MAP@R (Musgrave et al., "A Metric Learning Reality Check", 2020): with R the number of
  other members of the query's class, ``AP@R = (1/R) * sum_{i<=R} P(i) * rel(i)`` over the
  R most similar others, where P(i) is the precision among the first i; averaged over queries.

All numbers are percentages, like the classification accuracies beside them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KNN_KS = (1, 5)


def cosine_similarities(embeddings: np.ndarray) -> np.ndarray:
    """(N, N) cosine similarities with the diagonal set to -inf (a query never retrieves itself)."""
    x = np.asarray(embeddings, np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.maximum(norms, 1e-12)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return sims


def ranked_neighbours(sims: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k most similar others of every row, most similar first (ties: lower index)."""
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def knn_accuracy(embeddings: np.ndarray, labels: np.ndarray, ks: Sequence[int] = KNN_KS) -> dict:
    """{k: leave-one-out kNN accuracy in percent}; k is clipped to N - 1."""
    labels = np.asarray(labels, np.int64)
    n = len(labels)
    if n < 2:
        raise ValueError(f"kNN needs at least 2 embeddings, got {n}.")
    sims = cosine_similarities(embeddings)
    num_classes = int(labels.max()) + 1
    order = ranked_neighbours(sims, min(max(ks), n - 1))
    out = {}
    for k in ks:
        neighbour_labels = labels[order[:, : min(k, n - 1)]]
        votes = np.zeros((n, num_classes), np.int64)
        np.add.at(votes, (np.arange(n)[:, None], neighbour_labels), 1)
        predicted = np.argmax(votes, axis=1)  # first maximum: the lowest class index wins ties
        out[int(k)] = float(100.0 * np.mean(predicted == labels))
    return out


def precision_at_1_and_map_at_r(embeddings: np.ndarray, labels: np.ndarray) -> dict:
    """precision@1 and MAP@R in percent, and how many queries they average (lone ones excluded)."""
    labels = np.asarray(labels, np.int64)
    sims = cosine_similarities(embeddings)
    counts = np.bincount(labels)
    others = counts[labels] - 1  # R of each query
    queries = np.flatnonzero(others > 0)
    if len(queries) == 0:
        raise ValueError("No class has two test embeddings: nothing to retrieve.")
    max_r = int(others.max())
    order = ranked_neighbours(sims[queries], max_r)
    relevant = labels[order] == labels[queries][:, None]  # (Q, max_r)
    r = others[queries]
    within_r = np.arange(max_r)[None, :] < r[:, None]
    relevant = relevant & within_r
    precision_at_i = np.cumsum(relevant, axis=1) / np.arange(1, max_r + 1)[None, :]
    average_precision = np.sum(precision_at_i * relevant, axis=1) / r
    return {
        "precision_at_1": float(100.0 * np.mean(relevant[:, 0])),
        "map_at_r": float(100.0 * np.mean(average_precision)),
        "num_queries": int(len(queries)),
    }


def retrieval_metrics(embeddings: np.ndarray, labels: np.ndarray, ks=KNN_KS) -> dict:
    """Everything above in one JSON-ready dict."""
    knn = knn_accuracy(embeddings, labels, ks)
    out = {
        "similarity": "cosine",
        "knn": "leave-one-out on the test embeddings, majority vote (ties: lowest class index)",
        "knn_accuracy": {str(k): v for k, v in knn.items()},
    }
    out.update(precision_at_1_and_map_at_r(embeddings, labels))
    return out
