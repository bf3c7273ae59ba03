"""TensorFlow Datasets as an image source, read by random access without TensorFlow.

Select it with `config.data.source = "tfds"` and
  tfds_name         the dataset name, e.g. "uc_merced" or "eurosat/rgb";
  tfds_data_dir     the tfds data_dir ("" = the tfds default, ~/tensorflow_datasets);
  tfds_train_split  the split to train on (any tfds split expression, e.g. "train[:80%]");
  tfds_test_split   the split to test on; "" = a seeded per-class split of the train split
                    by `test_fraction`, as for folders without split lists.

The dataset must already be prepared in the **array_record** file format, which
`tfds.data_source` reads by random access with no TensorFlow installed. Preparing the public
catalogue's datasets needs TensorFlow once, on any machine:
    tfds build uc_merced --file_format=array_record --data_dir=/path/to/tfds
then copy the data_dir. (A builder whose generator yields encoded image bytes or file paths,
like the one in tests/test_tfds_source.py, prepares without TensorFlow.)

The dataset's first `Image` feature (the one named "image" if there are several) and its first
`ClassLabel` feature ("label" preferred) are used. Encoded bytes are read undecoded and go
through the same decoding as image files (PIL, RGB, Resize(64)) and the same caches; a record
id is `<name>/<split>/<index>`. `config.data.classes` selects and orders label names;
() = every label in the dataset's order.
"""

from __future__ import annotations

import os

import numpy as np

from ssl_jax.data import splits as splits_lib
from ssl_jax.data.sources import (
    DataError,
    ImagePool,
    ImageSet,
    cache_key,
    cached_decode,
    decode_all,
)


def _pick_feature(features, kind, preferred: str) -> str:
    names = [k for k, f in features.items() if isinstance(f, kind)]
    if not names:
        raise DataError(f"The tfds dataset has no {kind.__name__} feature (features: {features}).")
    return preferred if preferred in names else names[0]


def _data_files(data_dir: str) -> list[tuple[str, int, int]]:
    out = []
    for name in sorted(os.listdir(data_dir)):
        st = os.stat(os.path.join(data_dir, name))
        out.append((name, st.st_size, st.st_mtime_ns))
    return out


def open_split(name: str, split: str, data_dir: str | None):
    """-> (random-access source yielding undecoded image bytes, builder)."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
        features = builder.info.features
        image_key = _pick_feature(features, tfds.features.Image, "image")
        source = tfds.data_source(
            name,
            split=split,
            data_dir=data_dir,
            download=False,
            decoders={image_key: tfds.decode.SkipDecoding()},
        )
    except DataError:
        raise
    except Exception as e:  # tfds raises many types for "not prepared / wrong format"
        raise DataError(
            f"Cannot open tfds dataset {name!r} split {split!r} in data_dir {data_dir or '~'}: "
            f"{type(e).__name__}: {e}\nPrepare it in array_record format first, e.g. "
            f"`tfds build {name} --file_format=array_record --data_dir=DIR`, and set "
            "config.data.tfds_data_dir=DIR."
        ) from e
    return source, builder, image_key


def read_records(source, image_key: str, label_key: str) -> tuple[list[bytes], np.ndarray]:
    images, labels = [], []
    for start in range(0, len(source), 256):
        for record in source.__getitems__(list(range(start, min(start + 256, len(source))))):
            images.append(record[image_key])
            labels.append(int(record[label_key]))
    return images, np.asarray(labels, np.int64)


def load_tfds_pool(data_cfg, *, seed: int, cache_dir: str | None, everything: bool) -> ImagePool:
    import tensorflow_datasets as tfds

    name = data_cfg.tfds_name
    if not name:
        raise DataError("config.data.source is 'tfds' but config.data.tfds_name is empty.")
    data_dir = os.path.expanduser(data_cfg.tfds_data_dir) or None
    size = int(data_cfg.image_size)

    split_names = [data_cfg.tfds_train_split] + (
        [data_cfg.tfds_test_split] if data_cfg.tfds_test_split else []
    )
    raw = []
    for split in split_names:
        source, builder, image_key = open_split(name, split, data_dir)
        label_key = _pick_feature(builder.info.features, tfds.features.ClassLabel, "label")
        raw.append((split, *read_records(source, image_key, label_key)))
    all_names = tuple(builder.info.features[label_key].names)
    class_names = tuple(data_cfg.classes) or all_names
    absent = [c for c in class_names if c not in all_names]
    if absent:
        raise DataError(
            f"Class(es) {absent} of config.data.classes are not labels of tfds dataset {name!r} "
            f"(labels: {list(all_names)}). Fix config.data.classes."
        )
    remap = np.full(len(all_names), -1, np.int32)
    for i, c in enumerate(class_names):
        remap[all_names.index(c)] = i

    # (record id, bytes, label in class_names order or -1) for every record read.
    records = {}
    per_split = {}
    for split, blobs, labels in raw:
        ids = [f"{name}/{split}/{i}" for i in range(len(blobs))]
        per_split[split] = (ids, remap[labels])
        records.update(zip(ids, blobs, strict=True))

    train_ids, train_labels = per_split[data_cfg.tfds_train_split]
    keep = train_labels >= 0
    train_ids = [i for i, k in zip(train_ids, keep, strict=True) if k]
    train_labels = train_labels[keep]
    if data_cfg.tfds_test_split:
        test_ids, test_labels = per_split[data_cfg.tfds_test_split]
        keep = test_labels >= 0
        test_ids = [i for i, k in zip(test_ids, keep, strict=True) if k]
        test_labels = test_labels[keep]
        split_desc = {"tfds_test_split": data_cfg.tfds_test_split}
    else:
        tr, te = splits_lib.seeded_split(train_labels, data_cfg.test_fraction, seed)
        test_ids, test_labels = [train_ids[i] for i in te], train_labels[te]
        train_ids, train_labels = [train_ids[i] for i in tr], train_labels[tr]
        split_desc = {"tfds_test_split": None, "test_fraction": float(data_cfg.test_fraction)}
    for c, n in zip(
        class_names, np.bincount(train_labels, minlength=len(class_names)), strict=True
    ):
        if n == 0:
            raise DataError(f"Class {c!r} has no images in the tfds train split.")

    every_ids, every_labels = [], np.zeros(0, np.int32)
    if everything:
        every_ids = [i for ids, _ in per_split.values() for i in ids]
        every_labels = np.concatenate([lab for _, lab in per_split.values()])

    needed = sorted(set(train_ids) | set(test_ids) | set(every_ids))
    fingerprint = [name, split_names, needed, _data_files(str(builder.data_dir))]
    images, cache_hit = cached_decode(
        cache_key(fingerprint, size),
        lambda: decode_all(needed, records.__getitem__, size=size, describe=f"tfds {name!r}"),
        cache_dir,
    )
    by_id = dict(zip(needed, images, strict=True))

    def image_set(ids, labels):
        return ImageSet(
            images=[by_id[i] for i in ids],
            labels=np.asarray(labels, np.int32).reshape(-1),
            files=tuple(ids),
        )

    return ImagePool(
        class_names=class_names,
        train=image_set(train_ids, train_labels),
        test=image_set(test_ids, test_labels),
        everything=image_set(every_ids, every_labels) if everything else None,
        info={
            "source": "tfds",
            "tfds_name": name,
            "tfds_data_dir": str(builder.data_dir),
            "tfds_train_split": data_cfg.tfds_train_split,
            **split_desc,
            "cache": cache_hit,
        },
    )
