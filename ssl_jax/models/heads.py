"""Classifier and projection heads shared by the backbones (docs/method.md#models)."""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Initializer = Callable[..., Array]


def l2_normalize(x: jax.Array) -> jax.Array:
    """Row-wise ``x / ||x||_2`` with no epsilon, exactly the reference model's last operation."""
    return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


def uniform_symmetric(limit: float) -> Initializer:
    """U(-limit, limit), the building block of PyTorch's default Linear initialisation."""

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, minval=-limit, maxval=limit)

    return init


def torch_linear(features: int, fan_in: int, **kwargs: Any) -> nn.Dense:
    """`nn.Dense` initialised as PyTorch's nn.Linear: weight and bias U(-1/sqrt(fan_in), ..).

    The bias bound depends on fan_in, which `nn.Dense`'s bias_init never sees, so the
    initialisers are bound here (the ResNets' heads, docs/method.md#resnet).
    """
    limit = 1.0 / fan_in**0.5
    return nn.Dense(
        features, kernel_init=uniform_symmetric(limit), bias_init=uniform_symmetric(limit), **kwargs
    )


def xavier_linear(features: int, fan_in: int, **kwargs: Any) -> nn.Dense:
    """`nn.Dense` with PyTorch's xavier_normal_ weight (untruncated) and zero bias (WRN,
    docs/method.md#wrn-28-2)."""
    del fan_in  # the initialiser reads both fans from the kernel shape
    return nn.Dense(
        features,
        kernel_init=nn.initializers.variance_scaling(1.0, "fan_avg", "normal"),
        bias_init=nn.initializers.zeros,
        **kwargs,
    )


def classifier_and_projection(
    pooled: Array,
    *,
    num_classes: int,
    low_dim: int | None,
    hidden: int,
    activation: Callable[[Array], Array],
    linear: Callable[..., nn.Dense],
    dtype: Any,
) -> tuple[Array, Array | None]:
    """The heads on the pooled feature ``h``: ``(logits, z)`` in float32, z = None if no head.

    Call from inside a backbone's compact ``__call__``: the Dense layers become its direct
    children ``classifier``, ``proj_fc1`` and ``proj_fc2`` (the weight-decay mask reads these
    names). The classifier does not see the projection.
    """
    width = pooled.shape[-1]
    pooled = pooled.astype(dtype)
    logits = linear(num_classes, width, dtype=dtype, name="classifier")(pooled)
    if not low_dim:
        return logits.astype(jnp.float32), None
    hidden_units = linear(hidden, width, dtype=dtype, name="proj_fc1")(pooled)
    projection = linear(low_dim, hidden, dtype=dtype, name="proj_fc2")(activation(hidden_units))
    return logits.astype(jnp.float32), l2_normalize(projection.astype(jnp.float32))
