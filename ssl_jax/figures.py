"""The paper's figures as PNGs (matplotlib, Agg backend: no display needed).

* `confusion_matrix.png`: counts and row-normalised (paper Fig. 5);
* `tsne.png`: t-SNE of the 64-d test embeddings coloured by class (Fig. 6);
* `tsne_epochs.png`: the same, side by side for the epochs saved during training;
* `training_curves.png`: EMA accuracy per epoch and the loss terms over steps (Fig. 4).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

LOSS_TERMS = ("loss", "loss_x", "loss_u", "loss_c", "loss_dml", "loss_ccssl")
MIN_TSNE_POINTS = 5
DPI = 120


def _class_colours(num_classes: int):
    cmap = plt.get_cmap("tab10" if num_classes <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(num_classes)]


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- confusion matrix


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: str, title=""):
    """Counts (left) and rows normalised to sum 1 (right), rows = true class."""
    cm = np.asarray(cm)
    n = len(class_names)
    rows = cm.sum(axis=1, keepdims=True)
    normalised = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0)
    side = max(5.0, 0.45 * n + 2.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 2, side), layout="constrained")
    for ax, values, label, fmt in (
        (axes[0], cm, "count", "d"),
        (axes[1], normalised, "fraction of the true class", ".2f"),
    ):
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=max(values.max(), 1e-9))
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=label)
        ax.set_xticks(range(n), class_names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), class_names, fontsize=8)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        if n <= 30:
            threshold = values.max() / 2.0
            for i in range(n):
                for j in range(n):
                    ax.text(
                        j,
                        i,
                        format(values[i, j], fmt),
                        ha="center",
                        va="center",
                        fontsize=6 if n > 12 else 7,
                        color="white" if values[i, j] > threshold else "black",
                    )
    axes[0].set_title("Confusion matrix (counts)")
    axes[1].set_title("Confusion matrix (row-normalised)")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def write_confusion_csv(cm: np.ndarray, class_names: Sequence[str], path: str) -> str:
    """Rows = true class, columns = predicted class, first row/column = class names."""
    lines = ["true \\ predicted," + ",".join(class_names)]
    for name, row in zip(class_names, np.asarray(cm), strict=True):
        lines.append(name + "," + ",".join(str(int(v)) for v in row))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------- t-SNE


def tsne_perplexity(requested: float, num_points: int) -> float:
    """sklearn needs perplexity < N; the usual rule of thumb keeps 3 * perplexity < N - 1."""
    return float(max(1.0, min(float(requested), (num_points - 1) / 3.0)))


def tsne_2d(embeddings: np.ndarray, perplexity: float, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of the rows of `embeddings` (cosine-normalised first, as they are compared)."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = np.asarray(embeddings, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    tsne = TSNE(
        n_components=2,
        perplexity=tsne_perplexity(perplexity, len(x)),
        init="pca",
        learning_rate="auto",
        random_state=seed,
    )
    # One OpenMP thread: on a loaded small CPU, contended OpenMP threads make it 5-10x slower.
    with threadpool_limits(limits=1, user_api="openmp"):
        return tsne.fit_transform(x)


def _scatter(ax, points, labels, class_names, colours):
    for c, name in enumerate(class_names):
        mask = labels == c
        if np.any(mask):
            ax.scatter(points[mask, 0], points[mask, 1], s=9, color=colours[c], label=name)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_tsne(
    embeddings: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    path: str,
    *,
    perplexity: float,
    seed: int = 0,
    title: str = "",
) -> str | None:
    """t-SNE scatter coloured by the true class; None (no file) for fewer than 5 points."""
    labels = np.asarray(labels)
    if len(labels) < MIN_TSNE_POINTS:
        return None
    points = tsne_2d(embeddings, perplexity, seed)
    fig, ax = plt.subplots(figsize=(7.5, 6))
    _scatter(ax, points, labels, class_names, _class_colours(len(class_names)))
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=1.5)
    ax.set_title(
        title
        or f"t-SNE of the test embeddings (perplexity {tsne_perplexity(perplexity, len(labels)):g})"
    )
    return _save(fig, path)


def plot_tsne_epochs(panels: Sequence[dict], class_names, path: str, *, perplexity, seed=0):
    """One t-SNE per saved epoch, side by side; `panels` hold embeddings, labels and epoch."""
    panels = [p for p in panels if len(p["labels"]) >= MIN_TSNE_POINTS]
    if not panels:
        return None
    colours = _class_colours(len(class_names))
    cols = min(len(panels), 4)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels, strict=False):
        points = tsne_2d(panel["embeddings"], perplexity, seed)
        _scatter(ax, points, np.asarray(panel["labels"]), class_names, colours)
        ax.set_title(f"epoch {int(panel['epoch'])}")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle("t-SNE of the test embeddings during training")
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------------- training curves


def plot_training_curves(records: Sequence[dict], path: str, *, mean_of_last: int = 20):
    """EMA top-1/top-5/best per epoch (left) and every logged loss term over steps (right)."""
    evals = [r for r in records if r.get("kind") == "eval"]
    trains = [r for r in records if r.get("kind") == "train"]
    if not evals and not trains:
        return None
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(13, 4.5))
    if evals:
        epochs = [r.get("epoch", i + 1) for i, r in enumerate(evals)]
        top1 = np.array([r["top1"] for r in evals], float)
        acc_ax.plot(epochs, top1, marker="o", ms=3, label="EMA top-1")
        acc_ax.plot(epochs, np.maximum.accumulate(top1), ls="--", label="best top-1 so far")
        if all("top5" in r for r in evals):
            acc_ax.plot(epochs, [r["top5"] for r in evals], alpha=0.6, label="EMA top-5")
        means = [np.mean(top1[max(0, i + 1 - mean_of_last) : i + 1]) for i in range(len(top1))]
        acc_ax.plot(epochs, means, ls=":", label=f"mean of last {mean_of_last}")
        acc_ax.legend(fontsize=8)
    acc_ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("test accuracy (%)")
    acc_ax.set_title("Accuracy per epoch")
    acc_ax.grid(alpha=0.3)
    if trains:
        steps = [r["step"] for r in trains]
        for term in LOSS_TERMS:
            values = [r.get(term) for r in trains]
            if all(isinstance(v, int | float) for v in values):
                loss_ax.plot(steps, values, label=term, lw=1.8 if term == "loss" else 1.0)
        loss_ax.legend(fontsize=8)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss (mean over the logging interval)")
    loss_ax.set_title("Loss terms")
    loss_ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
