"""The tensorflow-datasets source, on a tiny array_record dataset prepared here without TF."""

import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs.base import get_config
from ssl_jax.data import DataError, load_dataset, train_iterator

CLASSES = ["forest", "river", "beach"]


def encoded(arr, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def example_image(split: str, i: int) -> np.ndarray:
    """Deterministic content; sizes vary and one image per split is grey-scale."""
    rng = np.random.default_rng([len(split), i])
    shape = (80, 96) if i % 2 else (64, 64)
    if i == 0:
        return rng.integers(0, 256, shape, np.uint8)
    return rng.integers(0, 256, (*shape, 3), np.uint8)


class TinyScenes(tfds.core.GeneratorBasedBuilder):
    """Three classes, 12 train and 6 test images.

    Yielding encoded bytes (not arrays, which tfds would encode with TensorFlow) and writing
    array_record files lets tfds prepare the dataset without TensorFlow.
    """

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(names=CLASSES),
                    "key": tfds.features.Scalar(dtype=np.int64),  # records are stored shuffled
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples("train", 12),
            "test": self._generate_examples("test", 6),
        }

    def _generate_examples(self, split, n):
        for i in range(n):
            # Bytes pass through unchecked, so the grey-scale one stays an "L" PNG.
            yield i, {"image": encoded(example_image(split, i)), "label": i % 3, "key": i}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    TinyScenes(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return str(data_dir)


def record_keys(data_dir, split):
    """Generator key of each stored record (tfds stores records in a shuffled order)."""
    source = tfds.data_source("tiny_scenes", split=split, data_dir=data_dir, download=False)
    return [int(source[i]["key"]) for i in range(len(source))]


def tfds_config(data_dir, **data):
    config = get_config()
    config.data.source = "tfds"
    config.data.tfds_name = "tiny_scenes"
    config.data.tfds_data_dir = data_dir
    config.data.tfds_test_split = "test"
    config.data.classes = ()
    config.data.labels_per_class = 2
    config.data.cache_dir = "none"
    config.data.workers = 0
    config.data.batch_size = 4
    config.data.mu = 1
    config.train.total_steps = 2
    for key, value in data.items():
        config.data[key] = value
    return config


def test_tfds_splits_labels_and_pixels(tfds_dir, tmp_path):
    data = load_dataset(tfds_config(tfds_dir), workdir=str(tmp_path))
    assert data.class_names == tuple(CLASSES)
    assert (len(data.train), len(data.test), len(data.labelled), len(data.unlabelled)) == (
        12,
        6,
        6,
        12,
    )
    assert data.summary()["image_sizes"] == {"64x64": 9, "64x76": 9}  # 80x96 -> 64x76
    keys = record_keys(tfds_dir, "train")
    for f, y, image in zip(data.train.files, data.train.labels, data.train.images, strict=True):
        split, position = f.split("/")[1], int(f.split("/")[2])
        index = keys[position]
        assert split == "train" and y == index % 3
        source = example_image("train", index)
        if source.ndim == 2:
            source = np.repeat(source[..., None], 3, axis=2)
        pil = Image.fromarray(source)
        if pil.size != (64, 64):
            pil = pil.resize((76, 64), Image.BILINEAR)  # shorter side 64: int(64 * 96 / 80) = 76
        np.testing.assert_array_equal(image, np.asarray(pil))
    batch = next(train_iterator(data, tfds_config(tfds_dir), views=("u_w", "u_s0", "u_s1")))
    assert batch["x"].shape == (4, 60, 60, 3) and batch["u_s0"].shape == (4, 60, 60, 3)
    assert (tmp_path / "split.json").exists()


def test_tfds_subset_order_and_seeded_split(tfds_dir):
    config = tfds_config(tfds_dir, classes=("beach", "forest"), tfds_test_split="")
    config.data.labels_per_class = 1
    data = load_dataset(config, workdir=None)
    keys = record_keys(tfds_dir, "train")
    assert data.class_names == ("beach", "forest")
    # 8 train records of the two classes, split 50/50 per class.
    assert (len(data.train), len(data.test)) == (4, 4)
    for f, y in zip(
        data.train.files + data.test.files,
        np.concatenate([data.train.labels, data.test.labels]),
        strict=True,
    ):
        original = keys[int(f.split("/")[2])] % 3  # 0 forest, 2 beach
        assert y == {2: 0, 0: 1}[original]
    assert not set(data.train.files) & set(data.test.files)


def test_tfds_whole_source_as_unlabelled(tfds_dir):
    config = tfds_config(tfds_dir, classes=("river",), protocol="seed_code")
    config.data.unlabelled_whole_folder = True
    data = load_dataset(config, workdir=None)
    assert len(data.unlabelled) == 18
    assert (data.unlabelled.labels == 0).sum() == 6 and (data.unlabelled.labels == -1).sum() == 12


def test_tfds_errors(tfds_dir):
    with pytest.raises(DataError, match="array_record"):
        load_dataset(tfds_config(tfds_dir, tfds_name="no_such_dataset_here"), workdir=None)
    with pytest.raises(DataError, match="mountain"):
        load_dataset(tfds_config(tfds_dir, classes=("mountain",)), workdir=None)
