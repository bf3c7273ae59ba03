"""`canonical_convolutions`: the same values, every convolution in XLA:CPU's canonical order,
and the CPU training program built with it (ssl_jax/loop_convolutions.py)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_normal

from configs import base
from ssl_jax import train
from ssl_jax.data.synthetic import synthetic_dataset
from ssl_jax.loop_convolutions import canonical_convolutions

CANONICAL = "[b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]"


def conv_dims(fn, *args) -> set[str]:
    """The dimension orders of the convolutions in fn's StableHLO (nothing compiled)."""
    text = jax.jit(fn).lower(*args).as_text()
    return set(re.findall(r"convolution\(.*?dim_numbers = (\[.*?\]x\[.*?\]->\[.*?\])", text))


def _random(shape, seed):
    return random_normal(shape, seed)


@pytest.mark.parametrize(
    "dims, lhs_shape, rhs_shape, kwargs",
    [
        (("NHWC", "HWIO", "NHWC"), (2, 9, 9, 3), (3, 3, 3, 4), {"window_strides": (2, 2)}),
        (("NCHW", "OIHW", "NCHW"), (2, 3, 8, 7), (4, 3, 3, 2), {"window_strides": (1, 2)}),
        (("NHWC", "OIHW", "NCHW"), (2, 8, 8, 4), (6, 2, 3, 3), {"feature_group_count": 2}),
        (
            ("NHWC", "HWIO", "NHWC"),
            (2, 6, 6, 3),
            (3, 3, 3, 4),
            {"padding": ((1, 2), (2, 1)), "lhs_dilation": (2, 2), "rhs_dilation": (1, 2)},
        ),
        (("NWC", "WIO", "NWC"), (2, 10, 3), (3, 3, 5), {"window_strides": (2,)}),
    ],
)
def test_canonical_conv_computes_the_same_convolution(dims, lhs_shape, rhs_shape, kwargs):
    lhs, rhs = _random(lhs_shape, 0), _random(rhs_shape, 1)
    params = {
        "window_strides": (1,) * (len(lhs_shape) - 2),
        "padding": "SAME",
        **kwargs,
    }
    expected = jax.lax.conv_general_dilated(lhs, rhs, dimension_numbers=dims, **params)

    def rewritten(lhs, rhs):
        return canonical_convolutions(
            lambda a, b: jax.lax.conv_general_dilated(a, b, dimension_numbers=dims, **params)
        )(lhs, rhs)

    got = jax.jit(rewritten)(lhs, rhs)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _net_loss(kernels, x):
    """Two convolutions (one strided), a nested jitted call and a custom_jvp (relu)."""

    @jax.jit
    def block(y, k):
        return jax.lax.conv_general_dilated(
            y, k, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    h = jax.nn.relu(block(x, kernels["a"]))
    out = jax.lax.conv_general_dilated(
        h, kernels["b"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.sum(out**2)


def test_gradients_are_unchanged_and_every_convolution_is_canonical():
    kernels = {"a": _random((3, 3, 3, 8), 2) * 0.2, "b": _random((3, 3, 8, 4), 3) * 0.2}
    x = _random((4, 10, 10, 3), 4)
    grad = jax.grad(_net_loss, argnums=(0, 1))
    # Autodiff's gradient convolutions come in other orders...
    assert conv_dims(grad, kernels, x) - {CANONICAL}
    # ...and are all canonical after the rewrite, which computes the same gradients.
    rewritten = canonical_convolutions(grad)
    assert conv_dims(rewritten, kernels, x) == {CANONICAL}
    expected, got = jax.jit(grad)(kernels, x), jax.jit(rewritten)(kernels, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_cpu_training_program_runs_canonical_convolutions_in_its_scan():
    """The K-step program built for the CPU: a scan whose convolutions are all canonical."""
    config = base.get_config("smoke")
    config.model.width = 0.0625
    config.data.workers = 0
    config.augment.where = "device"
    data = synthetic_dataset(num_unlabelled=16, num_labelled=10)
    training = train.prepare_training(config, data, platform="cpu")
    source = training.block_source(0)
    block = training.shard(source.next_block())
    source.close()
    state = jax.eval_shape(lambda: training.setup.state)
    text = training.program.lower(state, block, training.device_data).as_text()
    assert "stablehlo.while" in text
    dims = set(re.findall(r"convolution\(.*?dim_numbers = (\[.*?\]x\[.*?\]->\[.*?\])", text))
    assert dims == {CANONICAL}
