"""The convolution and max-pool every backbone uses, on every platform.

`Conv` owns the parameters (`nn.Conv`'s tree: ``kernel``, HWIO, and an optional ``bias``) and
hands the arithmetic to an injected ``convolution`` function, by default `conv_lax`
(`lax.conv_general_dilated`), much as `nn.Conv` takes ``conv_general_dilated``. The CPU
formulations (ssl_jax/models/cpu_conv.py) are such functions; `ssl_jax.models.get_model`
injects them only into models built for the CPU platform, so that a model built for a GPU
or TPU holds nothing but lax convolutions and `max_pool`, whatever machine traces it.

Padding is always explicit and symmetric (PyTorch semantics, docs/method.md#models), never "SAME".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Dtype = Any
# (x NHWC, kernel HWIO, strides (sh, sw), padding (ph, pw)) -> NHWC output.
Convolution = Callable[[Array, Array, tuple[int, int], tuple[int, int]], Array]

# He (fan-out) normal, untruncated: std sqrt(2 / (kh * kw * cout)) as PyTorch's
# kaiming_normal_(mode="fan_out"). (jax's he_normal is truncated, hence spelled out here.)
he_fan_out_normal = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    """An int or a pair of ints as a pair of ints."""
    if isinstance(value, int):
        return (value, value)
    first, second = value
    return (int(first), int(second))


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """PyTorch's output size for one spatial axis: floor((size + 2p - k) / s) + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def conv_lax(x: Array, kernel: Array, strides: tuple[int, int], padding: tuple[int, int]) -> Array:
    """The reference: `lax.conv_general_dilated`, NHWC x HWIO, symmetric explicit padding."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=strides,
        padding=[(padding[0], padding[0]), (padding[1], padding[1])],
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


class Conv(nn.Module):
    """A 2-D NHWC convolution with `nn.Conv`'s parameter tree and an injected computation.

    Attributes:
      features: output channels.
      kernel_size: (kh, kw) or an int.
      strides: (sh, sw) or an int.
      padding: symmetric explicit padding per spatial axis, (ph, pw) or an int.
      use_bias: add a ``bias`` parameter (the backbones use none).
      dtype: computation dtype (inputs and kernel are cast to it).
      param_dtype: parameter dtype (float32 even when computing in bfloat16).
      convolution: computes the convolution `conv_lax` computes (see `Convolution`); the
        parameters do not depend on it, so checkpoints move freely between choices.
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    padding: int | Sequence[int] = 0
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = he_fan_out_normal
    bias_init: Callable[..., Array] = nn.initializers.zeros
    convolution: Convolution = conv_lax

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel_size = pair(self.kernel_size)
        kernel = self.param(
            "kernel",
            self.kernel_init,
            (*kernel_size, x.shape[-1], self.features),
            self.param_dtype,
        )
        y = self.convolution(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            pair(self.strides),
            pair(self.padding),
        )
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def max_pool(x: Array, window: int = 3, stride: int = 2, padding: int = 1) -> Array:
    """PyTorch's MaxPool2d: `nn.max_pool` with symmetric padding (flax pads with -inf)."""
    return nn.max_pool(
        x,
        (window, window),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
    )
