"""Inference: the jitted eval forward, predictions over test batches, top-k accuracy.

Used by the trainer's per-epoch evaluation and by `ssl_jax.evaluate` (--mode eval/predict).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax.data.normalize import to_network_input


@functools.cache
def make_eval_step(model) -> Callable:
    """Jitted inference forward (memoised per model; BN uses running statistics).

    A pure function of (variables, uint8 images) -> (float32 logits, float32 embeddings or
    None), with nothing platform-specific inside (the model was built for its platform), so it
    lowers for any target: `jax.export.export(make_eval_step(model), platforms=...)`.
    """

    def eval_step(variables, images):
        logits, feats = model.apply(variables, to_network_input(images), train=False)
        return logits.astype(jnp.float32), (None if feats is None else feats.astype(jnp.float32))

    return jax.jit(eval_step)


def predict_arrays(model, variables, batches) -> dict[str, np.ndarray]:
    """Logits, embeddings and labels of every real (unpadded) example of `batches`."""
    eval_step = make_eval_step(model)
    logits, feats, labels = [], [], []
    for batch in batches:
        out_logits, out_feats = eval_step(variables, batch["image"])
        keep = np.asarray(batch["mask"], bool)
        logits.append(np.asarray(out_logits)[keep])
        labels.append(np.asarray(batch["label"])[keep])
        if out_feats is not None:
            feats.append(np.asarray(out_feats)[keep])
    out = {
        "logits": np.concatenate(logits) if logits else np.zeros((0, 0), np.float32),
        "labels": np.concatenate(labels) if labels else np.zeros((0,), np.int32),
    }
    if feats:
        out["embeddings"] = np.concatenate(feats)
    return out


def predict_probabilities(model, variables, views: list[np.ndarray], batch_size: int):
    """Softmax probabilities (N, C) of uint8 views, in fixed-shape batches (one compile)."""
    eval_step = make_eval_step(model)
    out = []
    for start in range(0, len(views), batch_size):
        chunk = np.stack(views[start : start + batch_size])
        batch = np.zeros((batch_size, *chunk.shape[1:]), np.uint8)
        batch[: len(chunk)] = chunk
        logits, _ = eval_step(variables, batch)
        out.append(np.asarray(jax.nn.softmax(logits, axis=-1))[: len(chunk)])
    return np.concatenate(out)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Percent of examples whose label is among the k largest logits (docs/method.md#evaluation)."""
    if len(labels) == 0:
        raise ValueError("Cannot compute accuracy on an empty test set.")
    k = min(k, logits.shape[1])
    topk = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    correct = int(np.sum(np.any(topk == labels[:, None], axis=1)))
    return round(100.0 * correct / len(labels), 6)  # 6 decimals: no float noise in logs


def evaluate(model, params, batch_stats, batches) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Top-1/top-5 (percent) and the test count, with the arrays they were computed from."""
    arrays = predict_arrays(model, {"params": params, "batch_stats": batch_stats}, batches)
    result = {
        "top1": topk_accuracy(arrays["logits"], arrays["labels"], 1),
        "top5": topk_accuracy(arrays["logits"], arrays["labels"], 5),
        "num_test": int(len(arrays["labels"])),
    }
    return result, arrays
