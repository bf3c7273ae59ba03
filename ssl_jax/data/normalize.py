"""ToTensor + Normalize (docs/method.md#augmentation), done on the device inside the jitted step.

Host and device augmentation both hand uint8 (or 0..255 float) HWC views to the step, so the
bytes crossing the host-device boundary are four times fewer and the arithmetic is exact.
"""

import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_network_input(images, *, normalize: bool = True, dtype=jnp.float32):
    """uint8/float 0..255 NHWC -> float in [0, 1], then ImageNet-normalised if `normalize`."""
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    if normalize:
        x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
    return x.astype(dtype)
