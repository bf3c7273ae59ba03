"""The CPU-fast convolution and max-pool compute exactly what lax computes (values, gradients)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax.models import layers

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

# Uniform plans (plain autodiff of one formulation) and four mixed ones that between them
# put every formulation in every slot of the custom VJP.
PLANS = [
    *layers.NAMED_PLANS.values(),
    layers.ConvPlan("lax", "patches", "dense"),
    layers.ConvPlan("patches", "dense", "taps"),
    layers.ConvPlan("dense", "taps", "patches"),
    layers.ConvPlan("taps", "lax", "lax"),
]


def _inputs(size, kernel, cin, cout, batch=2, seed=0):
    key_x, key_w = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(key_x, (batch, size, size + 1, cin), jnp.float32)
    w = jax.random.normal(key_w, (kernel, kernel, cin, cout), jnp.float32)
    return x, w


@pytest.mark.parametrize("size,kernel,stride,padding,cin,cout", CASES)
def test_conv_plans_match_lax_values_and_gradients(size, kernel, stride, padding, cin, cout):
    x, w = _inputs(size, kernel, cin, cout)
    strides, pads = (stride, stride), (padding, padding)
    out_shape = layers.conv_lax(x, w, strides, pads).shape
    # A non-trivial cotangent: gradients of <conv(x, w), r> for a random r.
    probe = jax.random.normal(jax.random.PRNGKey(7), out_shape)

    def outputs_and_grads(x, w, plan):
        return (
            layers.conv(x, w, strides, pads, plan),
            *jax.grad(
                lambda x, w: jnp.sum(layers.conv(x, w, strides, pads, plan) * probe),
                argnums=(0, 1),
            )(x, w),
        )

    results = jax.jit(lambda x, w: [outputs_and_grads(x, w, plan) for plan in PLANS])(x, w)
    expected = results[0]  # PLANS[0] is plain lax
    assert layers.NAMED_PLANS["lax"] == PLANS[0]
    for plan, result in zip(PLANS[1:], results[1:], strict=True):
        for got, want in zip(result, expected, strict=True):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=str(plan))
    assert layers.conv_hybrid(x, w, strides, pads).shape == out_shape


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
        layers.conv_patches,
        layers.conv_dense,
        layers.conv_taps,
        layers.conv_hybrid,
    ):
        np.testing.assert_allclose(impl(x, w, (2, 2), (1, 1)), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", [*layers.CONV_IMPLS, layers.ConvPlan("dense", "patches", "lax")])
def test_conv_module_matches_flax_conv(impl):
    x, _ = _inputs(8, 3, 3, 4)
    ours = layers.Conv(4, 3, strides=2, padding=1, conv_impl=impl)
    theirs = nn.Conv(4, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False)
    variables = ours.init(jax.random.PRNGKey(0), x)
    # Same parameter tree: one `kernel` leaf, HWIO.
    assert jax.tree.map(jnp.shape, variables) == {"params": {"kernel": (3, 3, 3, 4)}}
    np.testing.assert_allclose(
        ours.apply(variables, x), theirs.apply(variables, x), rtol=1e-5, atol=1e-5
    )


def test_conv_module_bias_and_bf16():
    x, _ = _inputs(5, 3, 2, 3)
    module = layers.Conv(3, 3, padding=1, use_bias=True, dtype=jnp.bfloat16, conv_impl="patches")
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


def test_choose_conv_plan_rules():
    plans = layers.NAMED_PLANS

    def choose(impl="auto", kernel=3, stride=1, size=16, batch=64, backend="cpu", lib="ynn"):
        out = layers.conv_output_size(size, kernel, stride, kernel // 2)
        return layers.choose_conv_plan(
            impl,
            kernel_size=(kernel, kernel),
            strides=(stride, stride),
            input_hw=(size, size),
            output_shape=(batch, out, out),
            backend=backend,
            library=lib,
        )

    # Accelerators always use lax, whatever the shape or library.
    assert choose(size=2, backend="gpu") == plans["lax"]
    assert choose(kernel=1, backend="tpu", lib="eigen") == plans["lax"]
    # Forced plans are respected, by name or as a ConvPlan.
    assert choose("lax", size=2) == plans["lax"]
    assert choose("patches", size=30) == plans["patches"]
    custom = layers.ConvPlan("dense", "patches", "lax")
    assert choose(custom) is custom
    # Maps no larger than the 3x3 window (ResNet-18's layer4 at 60 px): dense on YNNPACK;
    # on Eigen, per-tap matmuls forward and for the input gradient, dense kernel gradient.
    assert choose(size=2) == plans["dense"]
    assert choose(size=1, batch=704) == plans["dense"]
    taps_dense = layers.ConvPlan("taps", "taps", "dense")
    assert choose(size=2, lib="eigen") == taps_dense == choose(size=2, batch=704, lib="eigen")
    # ...but a 1x1 conv on a 2x2 map is no window case.
    assert choose(kernel=1, size=2) != plans["dense"]
    assert "taps" not in choose(kernel=1, size=2, lib="eigen")
    # Eigen, 3x3 convs on 4x4 inputs (ResNet-18's layer3 and layer4 strided): taps at up to
    # 256 images; at 704 only the strided conv's input gradient keeps them.
    taps_lax = layers.ConvPlan("taps", "taps", "lax")
    assert choose(size=4, batch=56, lib="eigen") == taps_lax
    assert choose(size=4, batch=704, lib="eigen") == plans["lax"]
    assert choose(stride=2, size=4, batch=224, lib="eigen") == taps_lax
    assert choose(stride=2, size=4, batch=704, lib="eigen") == layers.ConvPlan("lax", "taps", "lax")
    # Strided input gradients keep taps up to 8x8 inputs (layer3's first conv), not at 15x15.
    assert choose(stride=2, size=8, batch=704, lib="eigen").input_grad == "taps"
    assert choose(stride=2, size=15, batch=56, lib="eigen").input_grad == "patches"
    # YNNPACK: im2col for 1x1 convs, strided 3x3 convs and 2x2 outputs...
    assert choose(kernel=1) == plans["patches"]
    assert choose(stride=2, size=8) == plans["patches"]
    assert choose(stride=2, size=4) == plans["patches"]
    # ...the stem and small stride-1 convs stay on lax, large ones get the matmul kernel grad.
    assert choose(kernel=7, stride=2, size=60) == plans["lax"]
    assert choose(size=15) == plans["lax"]
    assert choose(size=15, batch=704) == plans["hybrid"]
    # Eigen: lax forward on larger maps, im2col input gradients for strided and 1x1 convs.
    assert choose(size=15, batch=704, lib="eigen") == plans["lax"]
    assert choose(stride=2, size=16, lib="eigen") == layers.ConvPlan("lax", "patches", "lax")
    assert choose(kernel=1, lib="eigen") == layers.ConvPlan("lax", "patches", "patches")
    # Large maps never build an im2col matrix (it would be 9x the activations).
    for lib in ("ynn", "eigen"):
        assert choose(size=32, batch=704, lib=lib) == plans["lax"]
        assert choose(stride=2, size=60, lib=lib) == plans["lax"]
    with pytest.raises(ValueError, match="conv_impl"):
        choose("cudnn")
    with pytest.raises(ValueError, match="ConvPlan parts"):
        layers.conv(
            jnp.zeros((1, 4, 4, 1)),
            jnp.zeros((3, 3, 1, 1)),
            (1, 1),
            (1, 1),
            layers.ConvPlan("lax", "fft", "lax"),
        )


def test_xla_cpu_conv_library_is_detected():
    assert layers.xla_cpu_conv_library() in ("ynn", "eigen")


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
    x = jax.random.normal(jax.random.PRNGKey(size), (2, size, size, 3))
    expected = layers.max_pool_lax(x)
    for impl in ("patches", "auto", "lax"):
        np.testing.assert_array_equal(layers.max_pool(x, impl=impl), expected)
    probe = jax.random.normal(jax.random.PRNGKey(1), expected.shape)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(layers.max_pool_argmax(x) * probe)))(x)
    np.testing.assert_allclose(
        grad, _torch_style_max_pool_grad(np.asarray(x), np.asarray(probe)), rtol=1e-6
    )
    grad_lax = jax.grad(lambda x: jnp.sum(layers.max_pool_lax(x) * probe))(x)
    np.testing.assert_allclose(grad, grad_lax, rtol=1e-6)  # no ties in random data


def test_max_pool_ties_go_to_first_maximum():
    # After a ReLU whole windows are 0: PyTorch routes each gradient to the first tap.
    x = np.zeros((1, 6, 6, 1), np.float32)
    x[0, 2, 3, 0] = x[0, 3, 2, 0] = 1.0  # a tie between two taps of one window
    grad_out = np.arange(1, 10, dtype=np.float32).reshape(1, 3, 3, 1)
    grad = jax.grad(lambda x: jnp.sum(layers.max_pool_argmax(x) * grad_out))(jnp.asarray(x))
    np.testing.assert_array_equal(grad, _torch_style_max_pool_grad(x, grad_out))
    assert float(jnp.sum(grad)) == pytest.approx(float(grad_out.sum()))  # nothing split


def test_max_pool_pads_with_minus_infinity():
    # All-negative input: zero padding would make border outputs 0; -inf padding does not.
    x = -1.0 - jax.random.uniform(jax.random.PRNGKey(0), (1, 4, 4, 2))
    for impl in ("lax", "patches"):
        pooled = layers.max_pool(x, impl=impl)
        assert pooled.shape == (1, 2, 2, 2)
        assert float(jnp.max(pooled)) < -1.0
        np.testing.assert_array_equal(pooled[0, 0, 0], jnp.max(x[0, :2, :2], axis=(0, 1)))
