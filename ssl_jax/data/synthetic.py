"""Random uint8 images with labels: for benchmarks and tests that need shapes, not content."""

from __future__ import annotations

import numpy as np

from ssl_jax.data.protocols import SemiSupervisedData
from ssl_jax.data.sources import ImageSet


def synthetic_dataset(
    *,
    num_classes: int = 10,
    num_unlabelled: int = 256,
    num_labelled: int = 40,
    image_size: int = 64,
    seed: int = 0,
) -> SemiSupervisedData:
    """A SemiSupervisedData of noise images (augmentation cost does not depend on content)."""
    rng = np.random.default_rng(seed)

    def imageset(n: int, prefix: str) -> ImageSet:
        images = rng.integers(0, 256, size=(n, image_size, image_size, 3), dtype=np.uint8)
        labels = (np.arange(n) % num_classes).astype(np.int32)
        return ImageSet(list(images), labels, tuple(f"{prefix}/{i}" for i in range(n)))

    unlabelled = imageset(num_unlabelled, "unlabelled")
    labelled = imageset(num_labelled, "labelled")
    names = tuple(f"class{i}" for i in range(num_classes))
    return SemiSupervisedData(
        names, unlabelled, labelled, labelled, unlabelled, "synthetic", "synthetic"
    )
