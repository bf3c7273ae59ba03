"""ResNet-18/50 with the ImageNet stem, as the paper's toolbox builds them (docs/method.md#resnet).

Post-activation (v1) blocks, a 7x7/2 stem conv and a 3x3/2 max-pool even at 60 px input,
explicit symmetric padding, BN momentum 0.1 (PyTorch convention; flax's 0.9) and eps 1e-5.
Module names follow the weight-decay contract of docs/method.md#sgd-and-weight-decay: the BN of a
downsample shortcut is
``downsample_bn`` (its scale is decayed), every other BN is ``bn*`` / ``stem_bn``.
"""

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax.models import heads, layers

Array = jax.Array
ModuleDef = Any

# PyTorch BatchNorm2d(momentum=0.1): running <- 0.9 * running + 0.1 * batch.
RESNET_BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def scaled(channels: int, width: float) -> int:
    """A channel count times the width multiplier, at least 1."""
    return max(1, int(round(channels * width)))


class BasicBlock(nn.Module):
    """conv3x3(s) -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut, then ReLU."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef

    expansion = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        residual = x
        y = self.conv(self.features, 3, self.strides, 1, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.features, 3, 1, 1, name="conv2")(y)
        y = self.norm(name="bn2")(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            residual = self.conv(self.features, 1, self.strides, 0, name="downsample_conv")(x)
            residual = self.norm(name="downsample_bn")(residual)
        return nn.relu(y + residual)


class Bottleneck(nn.Module):
    """conv1x1 -> BN -> ReLU -> conv3x3(s) -> BN -> ReLU -> conv1x1(4x) -> BN, + shortcut, ReLU."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef

    expansion = 4

    @nn.compact
    def __call__(self, x: Array) -> Array:
        residual = x
        out_features = self.features * self.expansion
        y = self.conv(self.features, 1, 1, 0, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.features, 3, self.strides, 1, name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(out_features, 1, 1, 0, name="conv3")(y)
        y = self.norm(name="bn3")(y)
        if self.strides != 1 or x.shape[-1] != out_features:
            residual = self.conv(out_features, 1, self.strides, 0, name="downsample_conv")(x)
            residual = self.norm(name="downsample_bn")(residual)
        return nn.relu(y + residual)


class ResNet(nn.Module):
    """ImageNet-stem ResNet returning ``(logits, z)`` (z = None when ``low_dim`` is 0/None).

    Attributes:
      stage_sizes: blocks per stage ([2, 2, 2, 2] for ResNet-18, [3, 4, 6, 3] for ResNet-50).
      block: `BasicBlock` or `Bottleneck`.
      num_classes: classifier outputs C.
      low_dim: projection dimension D; 0 or None for no projection head.
      width: multiplies every channel count, the projection hidden width included.
      dtype: computation dtype; parameters and BN statistics stay float32.
      conv: builds the convolutions, called as ``conv(features, kernel, stride, padding,
        use_bias=, dtype=, param_dtype=, name=)`` (`layers.Conv`, or a partial of it that
        injects a CPU formulation: see `ssl_jax.models.conv_layers`).
      max_pool: the stem's ``max_pool(x, window, stride, padding)``.
    """

    stage_sizes: Sequence[int]
    block: ModuleDef
    num_classes: int
    low_dim: int | None = 64
    width: float = 1.0
    dtype: Any = jnp.float32
    conv: ModuleDef = layers.Conv
    max_pool: Callable[..., Array] = layers.max_pool

    @nn.compact
    def __call__(self, images: Array, train: bool) -> tuple[Array, Array | None]:
        conv = partial(self.conv, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32)
        norm = partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=RESNET_BN_MOMENTUM,
            epsilon=BN_EPSILON,
            use_fast_variance=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
        )
        x = images.astype(self.dtype)
        x = conv(scaled(64, self.width), 7, 2, 3, name="stem_conv")(x)
        x = nn.relu(norm(name="stem_bn")(x))
        x = self.max_pool(x, 3, 2, 1)
        for stage, num_blocks in enumerate(self.stage_sizes):
            features = scaled(64 * 2**stage, self.width)
            for index in range(num_blocks):
                strides = 2 if stage > 0 and index == 0 else 1
                x = self.block(
                    features, strides, conv=conv, norm=norm, name=f"layer{stage + 1}_{index}"
                )(x)
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return heads.classifier_and_projection(
            pooled,
            num_classes=self.num_classes,
            low_dim=self.low_dim,
            hidden=scaled(2048, self.width),  # 512 -> 2048 (ResNet-18), 2048 -> 2048 (ResNet-50)
            activation=nn.relu,
            linear=heads.torch_linear,
            dtype=self.dtype,
        )


ResNet18 = partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock)
ResNet50 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck)
