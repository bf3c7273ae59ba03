"""The contract every algorithm fulfils, so one generic train step can run them all.

An algorithm is a pure function of the network outputs of one concatenated forward pass
``[x ; u_view_1 ; u_view_2 ; ...]`` (docs/method.md#forward-pass) plus its own state (memory bank,
distribution-alignment history), which lives in the train state and is threaded through
every step. The train step (ssl_jax/train.py) does the forward pass; the algorithm does the
rest. Because the algorithm never sees parameters, the golden fixtures (which give logits and
features, not images) exercise exactly the code the train step calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import ml_collections

Metrics = dict[str, jax.Array]
AlgorithmState = dict[str, Any]


class LossFromOutputs(Protocol):
    def __call__(
        self,
        *,
        logits: jax.Array,
        feats: jax.Array | None,
        batch: Mapping[str, jax.Array],
        state: AlgorithmState,
        epoch: jax.Array,
        iteration: jax.Array,
        cfg: ml_collections.ConfigDict,
        platform: str | None = None,
    ) -> tuple[jax.Array, tuple[AlgorithmState, Metrics]]:
        """Returns ``(loss, (new_state, metrics))``.

        logits: (B + V*Bu, C) float32, rows in the order ``[x ; *unlabelled_views]``.
        feats:  (B + V*Bu, D) float32, L2-normalised projections (None if not needed).
        batch:  at least ``y`` (B,) int32 and, for semi-supervised methods, ``u_y`` (Bu,)
                int32 (true labels of the unlabelled batch, only for ``pseudo_acc``).
        state:  the algorithm's own state (``{}`` for stateless methods).
        epoch, iteration: int32 scalars, ``step // steps_per_epoch`` and ``step % ...``.
        cfg:    the ``config.algorithm`` ConfigDict (read at trace time; static).
        platform: the platform the step is built for ("cpu", "cuda", ...; None: jax's
                default), for formulations that differ by platform (triplet anchor blocks).
        metrics: float32 scalars, always ``loss`` and ``loss_x``, plus every other term.
        """


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """A training method, found by its name in the registry (`ssl_jax.algorithms`)."""

    name: str
    # Batch keys of the unlabelled views forwarded after the labelled view, in order:
    # () for supervised, ("u_w", "u_s0") for FixMatch, ("u_w", "u_s0", "u_s1") for CoMatch.
    unlabelled_views: tuple[str, ...]
    # Whether the model needs the projection head (feats); the supervised model has none.
    needs_projection: bool
    # init_state(cfg, *, num_classes, low_dim, batch_size, mu) -> fixed-shape state pytree.
    init_state: Callable[..., AlgorithmState]
    loss_from_outputs: LossFromOutputs


def stateless_init_state(
    cfg: ml_collections.ConfigDict, *, num_classes: int, low_dim: int, batch_size: int, mu: int
) -> AlgorithmState:
    """`init_state` of a method without state (supervised, FixMatch): ``{}``."""
    del cfg, num_classes, low_dim, batch_size, mu
    return {}


def split_views(x: jax.Array, batch_size: int, num_views: int) -> list[jax.Array]:
    """Splits ``[x (B) ; view_1 (Bu) ; ... ; view_V (Bu)]`` along the batch axis."""
    bu = (x.shape[0] - batch_size) // num_views
    if batch_size + num_views * bu != x.shape[0]:
        raise ValueError(f"{x.shape[0]} rows do not split into B={batch_size} + {num_views}*Bu")
    return [x[:batch_size]] + [
        x[batch_size + v * bu : batch_size + (v + 1) * bu] for v in range(num_views)
    ]
