"""Data: image sources, train/test splits, labelled/unlabelled protocols and input pipelines.

    data = load_dataset(config, workdir=workdir)            # decoded, split, cached
    it = train_iterator(data, config, views=("u_w", "u_s0", "u_s1"))   # grain iterator
    for batch in test_batches(data.test, batch_size, crop_size=config.data.crop_size): ...

View names and random stream ids: `views.py`; what the augmentations are: `augment_spec.py`.

Every bad input raises `DataError` (a ValueError) saying what is wrong and how to fix it.
"""

from ssl_jax.data.on_device import device_augment_views
from ssl_jax.data.pipeline import BatchMaker, stream_indices, test_batches, train_iterator
from ssl_jax.data.protocols import SemiSupervisedData, load_dataset
from ssl_jax.data.sources import DataError, ImageSet, load_image

__all__ = [
    "BatchMaker",
    "DataError",
    "ImageSet",
    "device_augment_views",
    "SemiSupervisedData",
    "load_dataset",
    "load_image",
    "stream_indices",
    "test_batches",
    "train_iterator",
]
