"""WideResNet-28-2, the pre-activation network of the FixMatch ports (docs/method.md#wrn-28-2).

LeakyReLU(0.1) everywhere, BN momentum 0.001 (PyTorch convention; flax's 0.999), eps 1e-5.
Reproduces quirk docs/method.md#q9-wrn-dead-batchnorm: the first block of groups 2 and 3 computes
BN1 + activation of its input and then ignores them, so those BN layers exist (parameters and
running statistics) and their running statistics are updated in training, but they receive no
gradient.
"""

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax.models import heads, layers
from ssl_jax.models.resnet import BN_EPSILON, scaled

Array = jax.Array
ModuleDef = Any

# PyTorch BatchNorm2d(momentum=0.001): running <- 0.999 * running + 0.001 * batch.
WRN_BN_MOMENTUM = 0.999
LEAKY_SLOPE = 0.1


def leaky_relu(x: Array) -> Array:
    return nn.leaky_relu(x, negative_slope=LEAKY_SLOPE)


class WideBasicBlock(nn.Module):
    """Pre-activation block; the three input cases of docs/method.md#wrn-28-2 (same width, first,
    dead BN1)."""

    features: int
    strides: int
    activate_before_residual: bool
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: Array) -> Array:
        same_width = x.shape[-1] == self.features
        activated = leaky_relu(self.norm(name="bn1")(x))
        if same_width or self.activate_before_residual:
            x = activated if not same_width else x
            conv1_input = activated
        else:
            # docs/method.md#q9-wrn-dead-batchnorm: BN1/activation computed above (running stats
            # update) but unused.
            conv1_input = x
        y = self.conv(self.features, 3, self.strides, 1, name="conv1")(conv1_input)
        y = leaky_relu(self.norm(name="bn2")(y))
        y = self.conv(self.features, 3, 1, 1, name="conv2")(y)
        if same_width:
            return x + y
        shortcut = self.conv(self.features, 1, self.strides, 0, name="shortcut_conv")(x)
        return shortcut + y


class WideResNet(nn.Module):
    """WRN-depth-widen returning ``(logits, z)`` (z = None when ``low_dim`` is 0/None).

    Attributes:
      num_classes: classifier outputs C.
      low_dim: projection dimension D; 0 or None for no projection head.
      depth: 28 gives 4 blocks per group.
      widen_factor: 2 gives channels [16, 32, 64, 128].
      width: multiplies every channel count (a test-size knob, 1.0 for the paper model).
      dtype: computation dtype; parameters and BN statistics stay float32.
      conv: builds the convolutions (`layers.Conv` or a partial of it: see
        `ssl_jax.models.conv_layers`).
    """

    num_classes: int
    low_dim: int | None = 64
    depth: int = 28
    widen_factor: int = 2
    width: float = 1.0
    dtype: Any = jnp.float32
    conv: ModuleDef = layers.Conv

    @nn.compact
    def __call__(self, images: Array, train: bool) -> tuple[Array, Array | None]:
        if (self.depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4, got {self.depth}")
        blocks_per_group = (self.depth - 4) // 6
        channels = [
            scaled(c, self.width)
            for c in (16, 16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor)
        ]
        conv = partial(self.conv, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32)
        norm = partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=WRN_BN_MOMENTUM,
            epsilon=BN_EPSILON,
            use_fast_variance=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
        )
        x = conv(channels[0], 3, 1, 1, name="stem_conv")(images.astype(self.dtype))
        for group in range(3):
            for index in range(blocks_per_group):
                x = WideBasicBlock(
                    channels[group + 1],
                    strides=2 if group > 0 and index == 0 else 1,
                    activate_before_residual=group == 0 and index == 0,
                    conv=conv,
                    norm=norm,
                    name=f"group{group + 1}_{index}",
                )(x)
        x = leaky_relu(norm(name="final_bn")(x))
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return heads.classifier_and_projection(
            pooled,
            num_classes=self.num_classes,
            low_dim=self.low_dim,
            hidden=channels[3],
            activation=leaky_relu,
            linear=heads.xavier_linear,
            dtype=self.dtype,
        )


WRN28_2 = partial(WideResNet, depth=28, widen_factor=2)
