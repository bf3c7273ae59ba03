"""Backbones by name: ``get_model(config.model.name, num_classes, low_dim, width=...)``.

Every model is a flax linen module called as ``model.apply(variables, images, train=...)``
on NHWC float images and returning ``(logits, z)``: float32 logits (N, C) and float32
L2-normalised projections (N, low_dim), or ``z = None`` when built with ``low_dim=0``.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ssl_jax.models.resnet import ResNet18, ResNet50
from ssl_jax.models.wide_resnet import WRN28_2

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": ResNet18,
    "resnet50": ResNet50,
    "wrn28_2": WRN28_2,
}


def get_model(
    name: str,
    num_classes: int,
    low_dim: int | None = 64,
    *,
    width: float = 1.0,
    dtype: Any = jnp.float32,
    conv_impl: str = "auto",
) -> nn.Module:
    """Builds a registered backbone; ``low_dim=0``/None gives no projection head."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name](
        num_classes=num_classes,
        low_dim=low_dim or None,
        width=width,
        dtype=dtype,
        conv_impl=conv_impl,
    )


__all__ = ["MODELS", "get_model"]
