"""Convolution and max-pool layers that are fast on XLA:CPU and exact everywhere.

XLA:CPU runs convolutions on small feature maps (the 3x3 convs of ResNet-18's layer3/layer4
on 4x4 and 2x2 maps at 60 px input) below 1 GFLOP/s, and their gradients are slower still.
The same function written as im2col ("patches": explicit shifted slices of the padded input,
concatenated along channels) followed by one matrix multiply runs at matmul speed. `Conv`
keeps `nn.Conv`'s parameter tree (a ``kernel`` of shape (kh, kw, cin, cout)) and picks the
implementation per layer at trace time; see `choose_conv_impl` for the rule and
benchmarks/conv_cpu.py for the measurements behind it.

Padding is always explicit and symmetric (PyTorch semantics, ALGORITHMS.md §3), never "SAME".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Dtype = Any

CONV_IMPLS = ("auto", "lax", "patches", "hybrid")

# He (fan-out) normal, untruncated: std sqrt(2 / (kh * kw * cout)) as PyTorch's
# kaiming_normal_(mode="fan_out"). (jax's he_normal is truncated, hence spelled out here.)
he_fan_out_normal = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# XLA:CPU conv vs patches+matmul crossover, measured with benchmarks/conv_cpu.py --layers on a
# 2-core x86 CPU (forward + backward, 64 and 704 images): patches+matmul wins for every conv of
# ResNet-18/50 and WRN-28-2 with an output map up to 32x32 (1.3-40x; the largest wins are 3x3
# convs on 2x2-8x8 maps and all strided and 1x1 convs), so "auto" uses it up to this many output
# pixels per image and keeps lax above it (e.g. 224 px inputs), where im2col's memory grows 9x.
PATCHES_MAX_OUTPUT_PIXELS = 32 * 32


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
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


def extract_patches(
    x: Array, kernel_size: tuple[int, int], strides: tuple[int, int], padding: tuple[int, int]
) -> Array:
    """im2col by strided slices: (N, H, W, C) -> (N, OH, OW, kh * kw * C), (i, j, c) order.

    The (i, j, c) order is the row-major flattening of an HWIO kernel's first three axes, so
    ``patches @ kernel.reshape(-1, cout)`` is the convolution. Slices (not
    `lax.conv_general_dilated_patches`, itself a convolution) keep XLA:CPU off its slow
    convolution path, forward and backward (the transpose of a slice is a pad).
    """
    kh, kw = kernel_size
    sh, sw = strides
    ph, pw = padding
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    n, height, width, channels = x.shape
    out_h = (height - kh) // sh + 1
    out_w = (width - kw) // sw + 1
    if (kh, kw) == (1, 1):
        return lax.slice(x, (0, 0, 0, 0), (n, height, width, channels), (1, sh, sw, 1))
    columns = [
        lax.slice(
            x,
            (0, i, j, 0),
            (n, i + sh * (out_h - 1) + 1, j + sw * (out_w - 1) + 1, channels),
            (1, sh, sw, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.concatenate(columns, axis=-1)


def conv_patches(
    x: Array, kernel: Array, strides: tuple[int, int], padding: tuple[int, int]
) -> Array:
    """The same convolution as `conv_lax`, computed as im2col followed by one matmul."""
    kh, kw, cin, cout = kernel.shape
    patches = extract_patches(x, (kh, kw), strides, padding)
    return lax.dot_general(
        patches, kernel.reshape(kh * kw * cin, cout), (((3,), (0,)), ((), ()))
    )


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_hybrid(
    x: Array, kernel: Array, strides: tuple[int, int], padding: tuple[int, int]
) -> Array:
    """`conv_lax` forward and input gradient, with the kernel gradient as one matmul.

    XLA:CPU computes a convolution's kernel gradient as another convolution whose output is
    the tiny kernel (3x3) and whose contraction runs over batch x space: the small-output case
    it handles worst (about 1 s for ResNet-18 layer1 at 704 images). im2col patches
    transposed times the output gradient is the same sum at matmul speed.
    """
    return conv_lax(x, kernel, strides, padding)


def _conv_hybrid_fwd(x, kernel, strides, padding):
    return conv_lax(x, kernel, strides, padding), (x, kernel)


def _conv_hybrid_bwd(strides, padding, residuals, grad_out):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda inputs: conv_lax(inputs, kernel, strides, padding), x)
    (grad_x,) = input_vjp(grad_out)
    patches = extract_patches(x, kernel.shape[:2], strides, padding)
    grad_kernel = lax.dot_general(
        patches, grad_out.astype(patches.dtype), (((0, 1, 2), (0, 1, 2)), ((), ()))
    )
    return grad_x, grad_kernel.reshape(kernel.shape).astype(kernel.dtype)


conv_hybrid.defvjp(_conv_hybrid_fwd, _conv_hybrid_bwd)


def choose_conv_impl(
    impl: str,
    *,
    output_hw: tuple[int, int],
    backend: str | None = None,
) -> str:
    """Resolves ``impl`` ("auto", "lax" or "patches") to the implementation a layer runs.

    "auto" uses patches+matmul only on the CPU backend and only for output maps of at most
    `PATCHES_MAX_OUTPUT_PIXELS` pixels; GPU/TPU convolutions are always `lax` (cuDNN etc.).
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return "lax"
    return "patches" if output_hw[0] * output_hw[1] <= PATCHES_MAX_OUTPUT_PIXELS else "lax"


class Conv(nn.Module):
    """A 2-D NHWC convolution with `nn.Conv`'s parameter tree and a choice of implementation.

    Attributes:
      features: output channels.
      kernel_size: (kh, kw) or an int.
      strides: (sh, sw) or an int.
      padding: symmetric explicit padding per spatial axis, (ph, pw) or an int.
      use_bias: add a ``bias`` parameter (the backbones use none).
      dtype: computation dtype (inputs and kernel are cast to it).
      param_dtype: parameter dtype (float32 even when computing in bfloat16).
      conv_impl: "auto" | "lax" | "patches" (see `choose_conv_impl`).
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
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel_size = _pair(self.kernel_size)
        strides = _pair(self.strides)
        padding = _pair(self.padding)
        kernel = self.param(
            "kernel",
            self.kernel_init,
            (*kernel_size, x.shape[-1], self.features),
            self.param_dtype,
        )
        output_hw = tuple(
            conv_output_size(x.shape[1 + axis], kernel_size[axis], strides[axis], padding[axis])
            for axis in range(2)
        )
        impl = choose_conv_impl(self.conv_impl, output_hw=output_hw)
        convolve = {"lax": conv_lax, "patches": conv_patches, "hybrid": conv_hybrid}[impl]
        y = convolve(x.astype(self.dtype), kernel.astype(self.dtype), strides, padding)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def max_pool_slices(
    x: Array, window: int = 3, stride: int = 2, padding: int = 1
) -> Array:
    """Max-pool as an elementwise max of strided slices of the -inf-padded input.

    Same values as `nn.max_pool` with -inf padding (PyTorch's MaxPool2d). Where several
    window elements tie for the maximum the gradient is shared between them (lax.max's rule)
    instead of going to one of them (select_and_scatter); after a ReLU such ties are at 0,
    where the ReLU's own gradient is 0, so the backbone's gradients agree.
    """
    x = jnp.pad(
        x,
        ((0, 0), (padding, padding), (padding, padding), (0, 0)),
        constant_values=-jnp.inf,
    )
    n, height, width, channels = x.shape
    out_h = (height - window) // stride + 1
    out_w = (width - window) // stride + 1
    result = None
    for i in range(window):
        for j in range(window):
            window_slice = lax.slice(
                x,
                (0, i, j, 0),
                (n, i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1, channels),
                (1, stride, stride, 1),
            )
            result = window_slice if result is None else jnp.maximum(result, window_slice)
    return result


def max_pool_lax(x: Array, window: int = 3, stride: int = 2, padding: int = 1) -> Array:
    """The reference max-pool: `nn.max_pool` with symmetric padding (flax pads with -inf)."""
    return nn.max_pool(
        x,
        (window, window),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
    )


def max_pool(
    x: Array, window: int = 3, stride: int = 2, padding: int = 1, *, impl: str = "auto"
) -> Array:
    """Max-pool with -inf symmetric padding; ``impl`` as for `Conv` ("patches" = slices)."""
    impl = choose_conv_impl(
        impl, output_hw=(conv_output_size(x.shape[1], window, stride, padding),) * 2
    )
    if impl == "patches":
        return max_pool_slices(x, window, stride, padding)
    return max_pool_lax(x, window, stride, padding)
