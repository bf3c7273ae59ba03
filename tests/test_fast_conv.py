"""The CPU-fast convolution and max-pool compute exactly what lax computes (values, gradients)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax.models import layers

# (input size, kernel, stride, padding, cin, cout): odd/even sizes, 1x1 / 3x3 / 7x7, s1 / s2.
CASES = [
    (7, 3, 1, 1, 3, 5),
    (8, 3, 2, 1, 4, 6),
    (5, 3, 2, 1, 2, 3),
    (2, 3, 1, 1, 4, 4),
    (4, 3, 2, 1, 3, 2),
    (9, 1, 1, 0, 3, 4),
    (8, 1, 2, 0, 4, 5),
    (15, 1, 2, 0, 2, 3),
    (16, 7, 2, 3, 3, 4),
    (11, 7, 2, 3, 3, 2),
    (6, 3, 1, 0, 2, 2),
]


def _inputs(size, kernel, cin, cout, batch=2, seed=0):
    key_x, key_w = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(key_x, (batch, size, size + 1, cin), jnp.float32)
    w = jax.random.normal(key_w, (kernel, kernel, cin, cout), jnp.float32)
    return x, w


@pytest.mark.parametrize("size,kernel,stride,padding,cin,cout", CASES)
def test_conv_matches_lax_values_and_gradients(size, kernel, stride, padding, cin, cout):
    x, w = _inputs(size, kernel, cin, cout)
    strides, pads = (stride, stride), (padding, padding)
    out_shape = layers.conv_lax(x, w, strides, pads).shape
    # A non-trivial cotangent: gradients of <conv(x, w), r> for a random r.
    probe = jax.random.normal(jax.random.PRNGKey(7), out_shape)

    @jax.jit
    def outputs_and_grads(x, w):
        results = {}
        for name, conv_fn in (
            ("lax", layers.conv_lax),
            ("patches", layers.conv_patches),
            ("hybrid", layers.conv_hybrid),
        ):
            results[name] = (
                conv_fn(x, w, strides, pads),
                *jax.grad(
                    lambda x, w, f=conv_fn: jnp.sum(f(x, w, strides, pads) * probe),
                    argnums=(0, 1),
                )(x, w),
            )
        return results

    results = outputs_and_grads(x, w)
    for impl in ("patches", "hybrid"):
        for got, expected in zip(results[impl], results["lax"], strict=True):
            assert got.shape == expected.shape
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4, err_msg=impl)


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
    for impl in (layers.conv_lax, layers.conv_patches, layers.conv_hybrid):
        np.testing.assert_allclose(impl(x, w, (2, 2), (1, 1)), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", ["lax", "patches", "hybrid", "auto"])
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


def test_choose_conv_impl_rules():
    def choose(impl="auto", kernel=3, stride=1, out=(64, 8, 8), backend="cpu"):
        return layers.choose_conv_impl(
            impl,
            kernel_size=(kernel, kernel),
            strides=(stride, stride),
            output_shape=out,
            backend=backend,
        )

    # Accelerators always use lax, whatever the shape.
    assert choose(out=(64, 2, 2), backend="gpu") == "lax"
    assert choose(kernel=1, backend="tpu") == "lax"
    # Forced implementations are respected.
    assert choose("lax", out=(64, 2, 2)) == "lax"
    assert choose("patches", out=(64, 30, 30)) == "patches"
    assert choose("hybrid") == "hybrid"
    # CPU: tiny output maps (the pathological case), 1x1 and strided 3x3 convs use patches.
    assert choose(out=(64, 2, 2)) == "patches"
    assert choose(out=(704, 1, 1)) == "patches"
    assert choose(kernel=1, stride=2) == "patches"
    assert choose(stride=2, out=(64, 4, 4)) == "patches"
    # The 7x7 stem stays on lax; so do stride-1 3x3 convs on small batches...
    assert choose(kernel=7, stride=2, out=(64, 30, 30)) == "lax"
    assert choose(out=(64, 15, 15)) == "lax"
    # ...and large stride-1 convs switch to the matmul kernel gradient.
    assert choose(out=(704, 15, 15)) == "hybrid"
    # Large maps stay on lax (im2col would be 9x the activations), except 1x1 convs.
    assert choose(out=(704, 32, 32)) == "lax"
    assert choose(stride=2, out=(64, 30, 30)) == "lax"
    assert choose(kernel=1, out=(64, 56, 56)) == "patches"
    with pytest.raises(ValueError):
        choose("cudnn")


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
