"""Convolution and max-pool layers that are fast on XLA:CPU and exact everywhere.

XLA:CPU runs convolutions with tiny output maps at a few GFLOP/s: forward + backward of
ResNet-18's layer4 3x3 conv (2x2 output at 60 px input) takes 1.07 s for 64 images and 11.6 s
for 704, against 21 ms and 240 ms as im2col ("patches": explicit strided slices of the padded
input, concatenated along channels) followed by one matmul. Its kernel gradients (another
convolution whose output is the 3x3 kernel) and `reduce_window`'s max-pool gradient are slow
too. `Conv` keeps `nn.Conv`'s parameter tree (one ``kernel``, HWIO) and picks, per layer at
trace time, `conv_lax`, `conv_patches` or `conv_hybrid` (`choose_conv_impl`); `max_pool`
picks `max_pool_argmax` on CPU. All compute the same function as lax; tests/test_fast_conv.py
checks values and gradients. Numbers: benchmarks/conv_cpu.py (2-core Zen 4, jax 0.10.2).

The custom-gradient paths (`conv_hybrid`, `max_pool_argmax`) support reverse-mode autodiff
(grad, vjp) but not forward-mode (jvp); use conv_impl="lax" for forward-mode.

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

# Crossovers of choose_conv_impl, from forward + backward timings (process CPU time and wall)
# of every ResNet-18 conv at 64 and 704 images (benchmarks/conv_cpu.py --layers), checked on
# the whole network: patches win by 10-50x at 2x2 outputs and by 0-30% on strided 3x3/1x1
# convs; lax wins for the 7x7 stem and for stride-1 3x3 convs at 64 images; at 704 images
# the layer1 convs are 20-50% faster with the hybrid's matmul kernel gradient.
PATCHES_MAX_OUTPUT_PIXELS = 2 * 2
HYBRID_MIN_OUTPUT_ROWS = 65_536
# Beyond this output map (e.g. WRN's 32x32 or 224 px inputs) "auto" stays on lax: untested
# there, and the im2col matrix would grow to gigabytes at 704 images.
IM2COL_MAX_OUTPUT_PIXELS = 16 * 16


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
    return lax.dot_general(patches, kernel.reshape(kh * kw * cin, cout), (((3,), (0,)), ((), ())))


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
    kernel_size: tuple[int, int],
    strides: tuple[int, int],
    output_shape: tuple[int, int, int],
    backend: str | None = None,
) -> str:
    """Resolves ``impl`` ("auto", "lax", "patches", "hybrid") to what one layer runs.

    ``output_shape`` is (batch, out_h, out_w). "auto" keeps `lax` on GPU/TPU. On the CPU
    backend it follows the forward + backward measurements of benchmarks/conv_cpu.py:
    patches+matmul for output maps of at most `PATCHES_MAX_OUTPUT_PIXELS` pixels (where
    XLA:CPU's convolutions crawl) and for 1x1 convs; for maps up to
    `IM2COL_MAX_OUTPUT_PIXELS`, patches+matmul for strided 3x3 convs and the hybrid (lax
    forward and input gradient, matmul kernel gradient) for stride-1 convs with at least
    `HYBRID_MIN_OUTPUT_ROWS` output rows (batch x pixels), where XLA's kernel-gradient
    convolution falls out of cache; lax otherwise (the 7x7 stem included).
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return "lax"
    batch, out_h, out_w = output_shape
    pixels = out_h * out_w
    if pixels <= PATCHES_MAX_OUTPUT_PIXELS or kernel_size == (1, 1):
        return "patches"
    if pixels > IM2COL_MAX_OUTPUT_PIXELS:  # bounds the im2col matrix (9x the input at 3x3)
        return "lax"
    if strides != (1, 1) and max(kernel_size) <= 3:
        return "patches"
    if strides == (1, 1) and batch * pixels >= HYBRID_MIN_OUTPUT_ROWS:
        return "hybrid"
    return "lax"


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
        impl = choose_conv_impl(
            self.conv_impl,
            kernel_size=kernel_size,
            strides=strides,
            output_shape=(x.shape[0], *output_hw),
        )
        convolve = {"lax": conv_lax, "patches": conv_patches, "hybrid": conv_hybrid}[impl]
        y = convolve(x.astype(self.dtype), kernel.astype(self.dtype), strides, padding)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def _pool_taps(x_padded: Array, window: int, stride: int, out_hw: tuple[int, int]) -> list[Array]:
    n, _, _, channels = x_padded.shape
    out_h, out_w = out_hw
    return [
        lax.slice(
            x_padded,
            (0, i, j, 0),
            (n, i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1, channels),
            (1, stride, stride, 1),
        )
        for i in range(window)
        for j in range(window)
    ]


def _max_pool_with_argmax(x: Array, window: int, stride: int, padding: int) -> tuple[Array, Array]:
    x_padded = jnp.pad(
        x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf
    )
    out_hw = tuple(conv_output_size(x.shape[1 + a], window, stride, padding) for a in range(2))
    taps = _pool_taps(x_padded, window, stride, out_hw)
    pooled, argmax = taps[0], jnp.zeros(taps[0].shape, jnp.int8)
    for index, tap in enumerate(taps[1:], start=1):
        larger = tap > pooled  # strict: ties keep the first tap in row-major window order
        pooled = jnp.where(larger, tap, pooled)
        argmax = jnp.where(larger, jnp.int8(index), argmax)
    return pooled, argmax


def max_pool_argmax(x: Array, window: int = 3, stride: int = 2, padding: int = 1) -> Array:
    """Max-pool (-inf symmetric padding) from strided slices, with PyTorch's gradient.

    The forward pass also records which window tap was the (first) maximum, as PyTorch's
    MaxPool2d does, and the backward pass routes each output gradient to that tap: ties go
    to the first tap in row-major window order, like PyTorch on CPU. On XLA:CPU this is
    5-10x faster than `lax.reduce_window`'s select-and-scatter gradient or autodiff of a
    chain of maxima.
    """
    n, height, width, channels = x.shape  # static; the backward pass closes over them
    padded_h, padded_w = height + 2 * padding, width + 2 * padding

    @jax.custom_vjp
    def pool(inputs):
        return _max_pool_with_argmax(inputs, window, stride, padding)[0]

    def pool_fwd(inputs):
        pooled, argmax = _max_pool_with_argmax(inputs, window, stride, padding)
        return pooled, argmax

    def pool_bwd(argmax, grad_out):
        out_h, out_w = grad_out.shape[1:3]
        zero = jnp.zeros((), grad_out.dtype)
        grad_padded = jnp.zeros((n, padded_h, padded_w, channels), grad_out.dtype)
        for index in range(window * window):
            i, j = divmod(index, window)
            routed = jnp.where(argmax == index, grad_out, zero)
            # The transpose of tap (i, j)'s strided slice: edge plus interior padding.
            grad_padded = grad_padded + lax.pad(
                routed,
                zero,
                (
                    (0, 0, 0),
                    (i, padded_h - i - stride * (out_h - 1) - 1, stride - 1),
                    (j, padded_w - j - stride * (out_w - 1) - 1, stride - 1),
                    (0, 0, 0),
                ),
            )
        return (grad_padded[:, padding : padding + height, padding : padding + width, :],)

    pool.defvjp(pool_fwd, pool_bwd)
    return pool(x)


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
    """Max-pool with -inf symmetric padding (PyTorch's MaxPool2d).

    ``impl``: "lax" = `lax.reduce_window`; "patches" = `max_pool_argmax`; "auto" = the
    latter on the CPU backend (always faster there), the former on GPU/TPU.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "patches" if jax.default_backend() == "cpu" else "lax"
    if impl == "lax":
        return max_pool_lax(x, window, stride, padding)
    return max_pool_argmax(x, window, stride, padding)
