"""The CPU convolution plans and max-pool compute exactly what lax computes (values, gradients),
and the per-layer chooser picks only plans meant for the layer's shape."""

import functools
import importlib.metadata
import itertools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_normal, random_uniform

from ssl_jax import xla_cpu
from ssl_jax.models import cpu_conv, layers

ConvPlan = cpu_conv.ConvPlan

# (input size, kernel, stride, padding, cin, cout): odd/even sizes, 1x1 / 3x3 / 7x7, s1 / s2,
# and maps no larger than the kernel window (where "dense" is meant to run).
CASES = [
    (7, 3, 1, 1, 3, 5),
    (8, 3, 2, 1, 4, 6),
    (5, 3, 2, 1, 2, 3),
    (2, 3, 1, 1, 4, 4),
    (1, 3, 1, 1, 3, 2),
    (2, 3, 2, 1, 2, 3),
    (4, 3, 2, 1, 3, 2),
    (9, 1, 1, 0, 3, 4),
    (8, 1, 2, 0, 4, 5),
    (15, 1, 2, 0, 2, 3),
    (16, 7, 2, 3, 3, 4),
    (11, 7, 2, 3, 3, 2),
    (6, 3, 1, 0, 2, 2),
    (3, 5, 1, 4, 2, 3),  # padding wider than the map: whole rows of taps see only padding
    (4, 3, 3, 2, 2, 2),
]


def _choose(kernel, stride, size, batch, library, padding=None):
    padding = kernel // 2 if padding is None else padding
    out = layers.conv_output_size(size, kernel, stride, padding)
    return cpu_conv.choose_conv_plan(
        "auto",
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        input_hw=(size, size),
        output_shape=(batch, out, out),
        library=library,
    )


def _meant_for(plan, kernel, in_hw, out_hw):
    """Whether every part of ``plan`` runs in its formulation's domain (its docstring's).

    dense: maps no larger than the kernel window (its cost grows with the map squared);
    taps: kernels larger than 1x1 on maps of at most 8x8 (one matmul per tap, overhead per
    tap); patches: outputs of at most `IM2COL_MAX_OUTPUT_PIXELS` (the im2col matrix is kh*kw
    times the input); lax: anywhere.
    """
    taps, in_pixels, out_pixels = kernel * kernel, in_hw[0] * in_hw[1], out_hw[0] * out_hw[1]
    domains = {
        "lax": True,
        "dense": 1 < taps and in_pixels <= taps,
        "taps": 1 < taps and in_pixels <= 64,
        "patches": out_pixels <= cpu_conv.IM2COL_MAX_OUTPUT_PIXELS,
    }
    return all(domains[part] for part in plan)


# The shapes the chooser is checked on: ResNet-18/50 and WRN layers at 32-224 px, odd maps,
# tiny and large batches, both XLA:CPU convolution libraries.
CHOOSER_SHAPES = list(
    itertools.product(
        (1, 3, 5, 7),  # kernel
        (1, 2),  # stride
        (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 30, 32, 56, 60, 112),  # input size
        (1, 8, 56, 224, 256, 257, 704, 2048),  # batch
        ("ynn", "eigen"),
    )
)
CHOSEN_PLANS = sorted({_choose(*shape) for shape in CHOOSER_SHAPES})

# Every named plan, every plan the chooser picks for some shape, and two mixed plans that
# with those put every formulation in every slot of the custom VJP.
PLANS = list(
    dict.fromkeys(
        [
            *cpu_conv.NAMED_PLANS.values(),
            *CHOSEN_PLANS,
            ConvPlan("patches", "dense", "taps"),
            ConvPlan("dense", "taps", "patches"),
        ]
    )
)


def _case_shapes(size, kernel, stride, padding):
    in_hw = (size, size + 1)  # `_inputs` makes maps one column wider than tall
    return in_hw, tuple(layers.conv_output_size(n, kernel, stride, padding) for n in in_hw)


def _plans_for(size, kernel, stride, padding, cin, cout):
    return [p for p in PLANS if _meant_for(p, kernel, *_case_shapes(size, kernel, stride, padding))]


def conv_hybrid(x, kernel, strides, padding):
    """lax forward and input gradient, the kernel gradient as one im2col matmul."""
    return cpu_conv.conv(x, kernel, strides, padding, cpu_conv.NAMED_PLANS["hybrid"])


def _inputs(size, kernel, cin, cout, batch=2, seed=0):
    x = random_normal((batch, size, size + 1, cin), seed)
    w = random_normal((kernel, kernel, cin, cout), seed + 1000)
    return x, w


@pytest.mark.parametrize("size,kernel,stride,padding,cin,cout", CASES)
def test_conv_plans_match_lax_values_and_gradients(
    size, kernel, stride, padding, cin, cout, less_optimized
):
    """Every plan meant for the shape computes lax's output, input and kernel gradients
    (all in one program, built with XLA's optimisations mostly off: compiling dominates)."""
    plans = _plans_for(size, kernel, stride, padding, cin, cout)
    x, w = _inputs(size, kernel, cin, cout)
    strides, pads = (stride, stride), (padding, padding)
    # A non-trivial cotangent: gradients of <conv(x, w), r> for a random r.
    probe = random_normal(layers.conv_lax(x, w, strides, pads).shape, 7)

    def outputs_and_grads(x, w, conv):
        return (
            conv(x, w),
            *jax.grad(lambda x, w: jnp.sum(conv(x, w) * probe), argnums=(0, 1))(x, w),
        )

    def all_plans(x, w):
        reference = outputs_and_grads(x, w, lambda x, w: layers.conv_lax(x, w, strides, pads))
        planned = [
            outputs_and_grads(
                x, w, functools.partial(cpu_conv.conv, strides=strides, padding=pads, plan=plan)
            )
            for plan in plans
        ]
        return reference, planned

    expected, results = jax.jit(all_plans)(x, w)
    for plan, result in zip(plans, results, strict=True):
        for got, want in zip(result, expected, strict=True):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=str(plan))


def test_conv_matches_numpy_direct_sum():
    """An independent oracle for lax itself: the convolution sum written out in numpy."""
    x, w = _inputs(6, 3, 2, 3)
    stride, pad = 2, 1
    xp = np.pad(np.asarray(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out_h = (6 + 2 * pad - 3) // stride + 1
    out_w = (7 + 2 * pad - 3) // stride + 1
    expected = np.zeros((2, out_h, out_w, 3), np.float64)
    for i in range(out_h):
        for j in range(out_w):
            window = xp[:, i * stride : i * stride + 3, j * stride : j * stride + 3, :]
            expected[:, i, j, :] = np.einsum("nhwc,hwco->no", window, np.asarray(w))
    for impl in (
        layers.conv_lax,
        cpu_conv.conv_patches,
        cpu_conv.conv_dense,
        cpu_conv.conv_taps,
        conv_hybrid,
    ):
        np.testing.assert_allclose(impl(x, w, (2, 2), (1, 1)), expected, rtol=1e-5, atol=1e-4)


def test_chooser_picks_only_plans_meant_for_the_shape():
    """ "auto" keeps every formulation in its domain (`_meant_for`) for every shape."""
    assert len(CHOOSER_SHAPES) > 1000
    for kernel, stride, size, batch, library in CHOOSER_SHAPES:
        plan = _choose(kernel, stride, size, batch, library)
        out = layers.conv_output_size(size, kernel, stride, kernel // 2)
        where = f"{plan} for {kernel}x{kernel}/{stride} on {size}x{size} x{batch} ({library})"
        assert isinstance(plan, ConvPlan), where
        assert _meant_for(plan, kernel, (size, size), (out, out)), where
    # Each formulation is chosen somewhere, and the equivalence test runs each plan on
    # several shapes of its domain.
    assert set().union(*CHOSEN_PLANS) == set(cpu_conv.PART_IMPLS)
    for plan in PLANS:
        assert sum(plan in _plans_for(*case) for case in CASES) >= 3, plan


def test_named_and_invalid_plans():
    x, w = _inputs(4, 3, 2, 2)
    for name, plan in cpu_conv.NAMED_PLANS.items():
        chosen = cpu_conv.choose_conv_plan(
            name, kernel_size=(3, 3), strides=(1, 1), input_hw=(4, 4), output_shape=(2, 4, 4)
        )
        assert chosen == plan
    with pytest.raises(ValueError, match="conv_impl"):
        cpu_conv.planned_conv(x, w, (1, 1), (1, 1), impl="cudnn")
    with pytest.raises(ValueError, match="ConvPlan parts"):
        cpu_conv.conv(x, w, (1, 1), (1, 1), ConvPlan("lax", "fft", "lax"))


def _planned(impl):
    return functools.partial(cpu_conv.planned_conv, impl=impl)


@pytest.mark.parametrize(
    "convolution",
    [
        layers.conv_lax,
        *map(_planned, cpu_conv.PLAN_NAMES),
        _planned(ConvPlan("dense", "patches", "lax")),
    ],
)
def test_conv_module_matches_flax_conv(convolution):
    x, _ = _inputs(8, 3, 3, 4)
    ours = layers.Conv(4, 3, strides=2, padding=1, convolution=convolution)
    theirs = nn.Conv(4, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False)
    variables = ours.init(jax.random.PRNGKey(0), x)
    # Same parameter tree: one `kernel` leaf, HWIO.
    assert jax.tree.map(jnp.shape, variables) == {"params": {"kernel": (3, 3, 3, 4)}}
    np.testing.assert_allclose(
        ours.apply(variables, x), theirs.apply(variables, x), rtol=1e-5, atol=1e-5
    )


def test_conv_module_bias_and_bf16():
    x, _ = _inputs(5, 3, 2, 3)
    module = layers.Conv(
        3, 3, padding=1, use_bias=True, dtype=jnp.bfloat16, convolution=_planned("patches")
    )
    variables = module.init(jax.random.PRNGKey(0), x)
    assert variables["params"]["kernel"].dtype == jnp.float32
    assert variables["params"]["bias"].dtype == jnp.float32
    out = module.apply(variables, x)
    assert out.dtype == jnp.bfloat16
    reference = layers.conv_lax(x, variables["params"]["kernel"], (1, 1), (1, 1))
    np.testing.assert_allclose(out.astype(jnp.float32), reference, rtol=5e-2, atol=5e-2)


def test_he_fan_out_init_std():
    kernel = layers.he_fan_out_normal(jax.random.PRNGKey(0), (3, 3, 64, 256), jnp.float32)
    expected_std = np.sqrt(2.0 / (3 * 3 * 256))
    assert abs(float(jnp.std(kernel)) / expected_std - 1) < 0.02
    # Untruncated normal: some values beyond 2 std exist (truncated_normal would have none).
    assert float(jnp.max(jnp.abs(kernel))) > 2.5 * expected_std


def test_xla_cpu_conv_library_follows_the_flag():
    """The probe sees the library XLA_FLAGS selects (conftest adds the Eigen flag where known)."""
    if not importlib.metadata.version("jaxlib").startswith("0.10."):
        pytest.skip("the YNNPACK/Eigen switch was measured on jaxlib 0.10 only")
    flag_set = xla_cpu.EIGEN_CONVOLUTIONS_FLAG in os.environ.get("XLA_FLAGS", "")
    assert cpu_conv.xla_cpu_conv_library() == ("eigen" if flag_set else "ynn")


def _torch_style_max_pool_grad(x, grad_out, window=3, stride=2, padding=1):
    """numpy oracle: each output gradient goes to the first maximum of its window."""
    n, height, width, channels = x.shape
    xp = np.pad(x, ((0, 0), (padding,) * 2, (padding,) * 2, (0, 0)), constant_values=-np.inf)
    grad = np.zeros_like(xp)
    for b in range(n):
        for c in range(channels):
            for i in range(grad_out.shape[1]):
                for j in range(grad_out.shape[2]):
                    patch = xp[
                        b, i * stride : i * stride + window, j * stride : j * stride + window, c
                    ]
                    di, dj = np.unravel_index(np.argmax(patch), patch.shape)  # first max
                    grad[b, i * stride + di, j * stride + dj, c] += grad_out[b, i, j, c]
    return grad[:, padding : padding + height, padding : padding + width, :]


@pytest.mark.parametrize("size", [6, 7, 30])
def test_max_pool_values_and_gradient(size):
    x = random_normal((2, size, size, 3), size)
    expected = layers.max_pool(x)
    np.testing.assert_array_equal(cpu_conv.max_pool_argmax(x), expected)
    probe = random_normal(expected.shape, 1)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(cpu_conv.max_pool_argmax(x) * probe)))(x)
    # A pixel in two overlapping windows sums two contributions: float32 order, near-cancelling.
    np.testing.assert_allclose(
        grad, _torch_style_max_pool_grad(np.asarray(x), np.asarray(probe)), rtol=1e-6, atol=1e-7
    )
    grad_lax = jax.grad(lambda x: jnp.sum(layers.max_pool(x) * probe))(x)
    np.testing.assert_allclose(grad, grad_lax, rtol=1e-6, atol=1e-7)  # no ties in random data


def test_max_pool_ties_go_to_first_maximum():
    # After a ReLU whole windows are 0: PyTorch routes each gradient to the first tap.
    x = np.zeros((1, 6, 6, 1), np.float32)
    x[0, 2, 3, 0] = x[0, 3, 2, 0] = 1.0  # a tie between two taps of one window
    grad_out = np.arange(1, 10, dtype=np.float32).reshape(1, 3, 3, 1)
    grad = jax.grad(lambda x: jnp.sum(cpu_conv.max_pool_argmax(x) * grad_out))(jnp.asarray(x))
    np.testing.assert_array_equal(grad, _torch_style_max_pool_grad(x, grad_out))
    assert float(jnp.sum(grad)) == pytest.approx(float(grad_out.sum()))  # nothing split


def test_max_pool_pads_with_minus_infinity():
    # All-negative input: zero padding would make border outputs 0; -inf padding does not.
    x = -1.0 - random_uniform((1, 4, 4, 2), 0.0, 1.0)
    for pool in (layers.max_pool, cpu_conv.max_pool_argmax):
        pooled = pool(x)
        assert pooled.shape == (1, 2, 2, 2)
        assert float(jnp.max(pooled)) < -1.0
        np.testing.assert_array_equal(pooled[0, 0, 0], jnp.max(x[0, :2, :2], axis=(0, 1)))
