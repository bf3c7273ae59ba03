"""Backbones by name: ``get_model(config.model.name, num_classes, low_dim, width=...)``.

Every model is a flax linen module called as ``model.apply(variables, images, train=...)``
on NHWC float images and returning ``(logits, z)``: float32 logits (N, C) and float32
L2-normalised projections (N, low_dim), or ``z = None`` when built with ``low_dim=0``.

The platform is decided here, once, when the model is built: `conv_layers` turns
``conv_impl`` and the target platform into the convolution module and max-pool the model is
given, so a model built for a GPU holds only lax convolutions whatever machine traces it.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ssl_jax import xla_cpu
from ssl_jax.models import cpu_conv, layers
from ssl_jax.models.resnet import ResNet18, ResNet50
from ssl_jax.models.wide_resnet import WRN28_2

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": ResNet18,
    "resnet50": ResNet50,
    "wrn28_2": WRN28_2,
}
# The CPU formulations `conv_impl` may name (ssl_jax/models/cpu_conv.py), lax aside.
CPU_PLANS = tuple(name for name in cpu_conv.NAMED_PLANS if name != "lax")
# "auto": the CPU plans chosen per layer on the CPU platform, lax elsewhere.
CONV_IMPLS = ("auto", "lax", *CPU_PLANS)


def conv_layers(
    conv_impl: str = "auto", platform: str | None = None
) -> tuple[Callable[..., nn.Module], Callable[..., Any]]:
    """``(conv, max_pool)`` for a model built for ``platform`` (None: jax's default one).

    ``conv`` builds `layers.Conv` modules; ``max_pool(x, window, stride, padding)`` is the
    stem max-pool. Off the CPU they are always lax's; on the CPU ``conv_impl`` picks (see
    `CONV_IMPLS`). Either way the parameters are the same, so checkpoints move freely.
    """
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
    platform = platform or xla_cpu.default_platform()
    if conv_impl in CPU_PLANS and platform != "cpu":
        raise ValueError(
            f"conv_impl={conv_impl!r} is a CPU formulation; a model for platform {platform!r} "
            'takes conv_impl="auto" or "lax".'
        )
    if conv_impl == "lax" or platform != "cpu":
        return layers.Conv, layers.max_pool
    return _cpu_conv_layers(conv_impl)


@functools.cache  # one object per plan, so that two builds of a model compare equal
def _cpu_conv_layers(conv_impl: str) -> tuple[Callable[..., nn.Module], Callable[..., Any]]:
    # "auto" reads the CPU's convolution library once, here, rather than per layer.
    library = cpu_conv.xla_cpu_conv_library() if conv_impl == "auto" else None
    convolution = functools.partial(cpu_conv.planned_conv, impl=conv_impl, library=library)
    return functools.partial(layers.Conv, convolution=convolution), cpu_conv.max_pool_argmax


def get_model(
    name: str,
    num_classes: int,
    low_dim: int | None = 64,
    *,
    width: float = 1.0,
    dtype: Any = jnp.float32,
    conv_impl: str = "auto",
    platform: str | None = None,
) -> nn.Module:
    """Builds a registered backbone; ``low_dim=0``/None gives no projection head.

    ``conv_impl`` ("auto" | "lax" | a `CPU_PLANS` name) and ``platform`` (e.g. "cpu",
    "cuda"; None: jax's default platform, read now) choose its convolutions (`conv_layers`).
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; known: {sorted(MODELS)}")
    conv, max_pool = conv_layers(conv_impl, platform)
    model_class = getattr(MODELS[name], "func", MODELS[name])  # the presets are partials
    pool = {"max_pool": max_pool} if "max_pool" in model_class.__dataclass_fields__ else {}
    return MODELS[name](
        num_classes=num_classes,
        low_dim=low_dim or None,
        width=width,
        dtype=dtype,
        conv=conv,
        **pool,
    )


__all__ = ["CONV_IMPLS", "CPU_PLANS", "MODELS", "conv_layers", "get_model"]
