"""The labelled/unlabelled protocols of docs/method.md#protocols and `load_dataset`, which runs it
all.

`config.data.protocol`:
  k_per_class  (default; the paper's intent, docs/method.md#q1-labelled-set-size,
               docs/method.md#q2-unlabelled-pool) labelled = `labels_per_class` images of each class
               drawn from the train split (class by class with a generator seeded by
               `config.seed`, then shuffled); unlabelled = the whole train split, the labelled
               images included.
  seed_code    what the reference code did: labelled = the whole train split (50 %), unlabelled =
               train + test. With `unlabelled_whole_folder`, unlabelled = every image under the
               root, as the reference's folder scan did (for tfds: every record of the train and
               test splits). Images of classes outside `config.data.classes` then carry label -1:
               they have no true class, so `pseudo_acc` should count only labels >= 0.

The chosen files are written to `<workdir>/split.json` with `split_hash`, a sha256 of the class
names and the train, test, labelled and unlabelled file lists (in order), so two runs can be
checked to have used the same split.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os

import numpy as np

from ssl_jax.data import splits as splits_lib
from ssl_jax.data.sources import (
    DataError,
    ImagePool,
    ImageSet,
    cache_dir_for,
    list_class_folders,
    load_folder_images,
    scan_class_folder,
    unsupported_files_message,
)
from ssl_jax.files import atomic_write_json

PROTOCOLS = ("k_per_class", "seed_code")
SOURCES = ("folder", "tfds")
# The paper's dataset names and their root sub-folders of $SSL_JAX_DATA (configs/base.py).
PAPER_DATASETS = {"ucm10": "ucm", "aid10": "aid", "ucm21": "ucm", "aid30": "aid"}
LABELLED_DRAW_STREAM = 100  # the rng stream of the k-per-class draw


@dataclasses.dataclass
class SemiSupervisedData:
    """The four image sets a run uses; `x_index`/`u_index` of a batch index labelled/unlabelled."""

    class_names: tuple[str, ...]
    train: ImageSet
    test: ImageSet
    labelled: ImageSet
    unlabelled: ImageSet
    protocol: str
    split_hash: str
    info: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> dict:
        """Counts per set and class, image sizes and the split hash (the inspect JSON)."""
        sets = {n: getattr(self, n) for n in ("train", "test", "labelled", "unlabelled")}
        out = {n: len(s) for n, s in sets.items()}
        out["num_classes"] = len(self.class_names)
        out["classes"] = list(self.class_names)
        out["per_class"] = {n: _per_class_counts(s, self.class_names) for n, s in sets.items()}
        out["protocol"] = self.protocol
        out["split_hash"] = self.split_hash
        sizes = collections.Counter()
        seen = set()
        for s in sets.values():
            for f, im in zip(s.files, s.images, strict=True):
                if f not in seen:
                    seen.add(f)
                    sizes[f"{im.shape[0]}x{im.shape[1]}"] += 1
        out["image_sizes"] = dict(sorted(sizes.items()))
        out.update(self.info)
        return out


def dataset_name(data_cfg) -> str:
    """The name a run reports for its data: `data.name`, unless that is a paper dataset's name
    (or empty) while the data is not that dataset; then the tfds name or the root folder's name.

    "Not that dataset": a tfds source, or a folder that is neither read through the shipped
    UCM/AID split lists nor the paper dataset's default root ($SSL_JAX_DATA/ucm or /aid). So
    `--config.data.root=/data/my_scenes` on any paper config reports "my_scenes"; a name set
    with `--config.data.name=...` that is not a paper dataset's name is always kept.
    """
    name = str(data_cfg.get("name", "") or "")
    if name and name not in PAPER_DATASETS:
        return name
    if data_cfg.get("source", "folder") == "tfds":
        return str(data_cfg.get("tfds_name", "")) or name
    if data_cfg.get("split_lists", "") in splits_lib.SHIPPED_SPLITS and name:
        return name
    if not data_cfg.get("root", ""):
        return name or "data"
    root = os.path.realpath(os.path.expanduser(str(data_cfg.root)))
    base = os.environ.get("SSL_JAX_DATA", "")
    if name and base and root == os.path.realpath(os.path.join(base, PAPER_DATASETS[name])):
        return name
    return os.path.basename(root.rstrip(os.sep)) or name or "data"


def _per_class_counts(imageset: ImageSet, class_names) -> dict[str, int]:
    counts = np.bincount(
        np.asarray(imageset.labels)[imageset.labels >= 0], minlength=len(class_names)
    )
    out = {c: int(n) for c, n in zip(class_names, counts, strict=False)}
    other = int(np.sum(np.asarray(imageset.labels) < 0))
    if other:
        out["(other classes, label -1)"] = other
    return out


def load_dataset(config, *, workdir: str | None, write_split: bool = True) -> SemiSupervisedData:
    """Reads, decodes (through the caches), splits and applies the protocol of `config.data`.

    With a `workdir` the decoded images are cached under it and, if `write_split`, the split
    is recorded in `<workdir>/split.json` (training writes it only after checking that a
    resumed run still sees the split it was trained on).
    """
    data_cfg = config.data
    seed = int(config.seed)
    if data_cfg.protocol not in PROTOCOLS:
        raise DataError(f"config.data.protocol is {data_cfg.protocol!r}; use one of {PROTOCOLS}.")
    whole = bool(data_cfg.get("unlabelled_whole_folder", False))
    if whole and data_cfg.protocol != "seed_code":
        raise DataError(
            "config.data.unlabelled_whole_folder only applies to protocol 'seed_code'; set it "
            "to False or use --config.data.protocol=seed_code."
        )
    cache_dir = cache_dir_for(data_cfg.get("cache_dir", ""), workdir)
    if data_cfg.source == "folder":
        pool = load_folder_pool(data_cfg, seed=seed, cache_dir=cache_dir, everything=whole)
    elif data_cfg.source == "tfds":
        from ssl_jax.data import tfds_source  # tensorflow_datasets is imported only when used

        pool = tfds_source.load_tfds_pool(
            data_cfg, seed=seed, cache_dir=cache_dir, everything=whole
        )
    else:
        raise DataError(f"config.data.source is {data_cfg.source!r}; use one of {SOURCES}.")
    for name in ("train", "test"):
        if len(getattr(pool, name)) == 0:
            raise DataError(
                f"The {name} split is empty. Check the split lists or config.data.test_fraction."
            )
    labelled, unlabelled = apply_protocol(pool, data_cfg, seed=seed)
    split_hash = compute_split_hash(pool.class_names, pool.train, pool.test, labelled, unlabelled)
    data = SemiSupervisedData(
        class_names=pool.class_names,
        train=pool.train,
        test=pool.test,
        labelled=labelled,
        unlabelled=unlabelled,
        protocol=data_cfg.protocol,
        split_hash=split_hash,
        info={"dataset": dataset_name(data_cfg), "seed": seed, **pool.info},
    )
    if workdir and write_split:
        write_split_json(data, os.path.join(workdir, "split.json"))
    return data


def load_folder_pool(data_cfg, *, seed: int, cache_dir: str | None, everything: bool) -> ImagePool:
    """Class folders + split lists (or a seeded split) -> decoded train/test ImageSets."""
    root = os.path.expanduser(data_cfg.root)
    available = list_class_folders(root)  # raises with download help if the root is missing
    class_names = tuple(data_cfg.classes) or tuple(available)
    if not class_names:
        raise DataError(f"No class folders under {root!r}; expected root/<class>/<image>.")
    duplicated = sorted({c for c in class_names if class_names.count(c) > 1})
    if duplicated:
        raise DataError(f"config.data.classes names {duplicated} more than once.")
    absent = [c for c in class_names if c not in available]
    if absent:
        raise DataError(
            f"Class(es) {absent} of config.data.classes have no folder under {root!r} "
            f"(found: {available}). Fix config.data.classes or config.data.root."
        )
    skipped: list[str] = []
    unsupported: list[str] = []
    other_files: dict[str, list[str]] = {}
    folder_files = {c: scan_class_folder(root, c, skipped, unsupported) for c in class_names}
    if everything:  # the sweep reads the other class folders too
        for c in available:
            if c not in folder_files:
                try:
                    folder_files_other = scan_class_folder(root, c, unsupported=unsupported)
                except DataError:
                    folder_files_other = []  # an empty folder outside the subset holds nothing
                other_files[c] = folder_files_other
    if unsupported:
        raise DataError(unsupported_files_message(unsupported, f"dataset root {root!r}"))

    list_paths = splits_lib.split_list_paths(data_cfg.split_lists)
    splits_lib.check_stem_collisions(
        folder_files,
        by_directory=not list_paths,
        why=splits_lib.SPLIT_LIST_COLLISIONS if list_paths else splits_lib.SEEDED_COLLISIONS,
    )
    if list_paths:
        entries = [splits_lib.read_split_list(p) for p in list_paths]
        splits_lib.check_classes_in_lists(list_paths, entries, available)
        train_files, train_labels = splits_lib.match_split_list(
            list_paths[0], entries[0], class_names, folder_files, root
        )
        test_files, test_labels = splits_lib.match_split_list(
            list_paths[1], entries[1], class_names, folder_files, root
        )
        both = sorted(set(train_files) & set(test_files))
        if both:
            raise DataError(
                f"{len(both)} image(s) are in both the train and the test list, e.g. {both[:5]}. "
                "Train and test must be disjoint; fix the split lists."
            )
        split_desc = {"split_lists": [os.path.abspath(p) for p in list_paths]}
    else:
        all_files = [f for c in class_names for f in folder_files[c]]
        all_labels = [i for i, c in enumerate(class_names) for _ in folder_files[c]]
        train_idx, test_idx = splits_lib.seeded_split(all_labels, data_cfg.test_fraction, seed)
        train_files = [all_files[i] for i in train_idx]
        train_labels = [all_labels[i] for i in train_idx]
        test_files = [all_files[i] for i in test_idx]
        test_labels = [all_labels[i] for i in test_idx]
        split_desc = {"split_lists": None, "test_fraction": float(data_cfg.test_fraction)}

    every_files, every_labels = [], []
    if everything:
        label_of = {c: i for i, c in enumerate(class_names)}
        for c in available:
            files = folder_files[c] if c in folder_files else other_files[c]
            every_files.extend(files)
            every_labels.extend([label_of.get(c, -1)] * len(files))

    needed = train_files + test_files + every_files
    images, cache_hit = load_folder_images(
        root, needed, size=int(data_cfg.image_size), cache_dir=cache_dir
    )

    def image_set(files, labels):
        return ImageSet(
            images=[images[f] for f in files],
            labels=np.asarray(labels, np.int32).reshape(-1),
            files=tuple(files),
        )

    listed = set(train_files) | set(test_files)
    unlisted = sum(1 for c in class_names for f in folder_files[c] if f not in listed)
    return ImagePool(
        class_names=class_names,
        train=image_set(train_files, train_labels),
        test=image_set(test_files, test_labels),
        everything=image_set(every_files, every_labels) if everything else None,
        info={
            "source": "folder",
            "root": os.path.abspath(root),
            **split_desc,
            "images_in_no_split": unlisted,
            "non_image_files_skipped": len(skipped),
            **({"non_image_files_examples": skipped[:5]} if skipped else {}),
            "cache": cache_hit,
        },
    )


def apply_protocol(pool: ImagePool, data_cfg, *, seed: int) -> tuple[ImageSet, ImageSet]:
    """-> (labelled, unlabelled) ImageSets, per `data_cfg.protocol` (module docstring)."""
    if data_cfg.protocol == "k_per_class":
        chosen = draw_k_per_class(
            pool.train.labels, int(data_cfg.labels_per_class), pool.class_names, seed
        )
        return pool.train.subset(chosen), pool.train
    labelled = pool.train
    if pool.everything is not None:
        return labelled, pool.everything
    return labelled, concat(pool.train, pool.test)


def draw_k_per_class(labels, k: int, class_names, seed: int) -> np.ndarray:
    """k indices per class without replacement (class 0 first), then shuffled
    (docs/method.md#protocols)."""
    if k <= 0:
        raise DataError(f"config.data.labels_per_class must be >= 1, got {k}.")
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, LABELLED_DRAW_STREAM])
    chosen = []
    for c, name in enumerate(class_names):
        members = np.flatnonzero(labels == c)
        if len(members) < k:
            raise DataError(
                f"Class {name!r} has {len(members)} training image(s), fewer than "
                f"labels_per_class={k}. Lower config.data.labels_per_class or add images."
            )
        chosen.extend(rng.choice(members, size=k, replace=False).tolist())
    return rng.permutation(np.asarray(chosen, np.int64))


def concat(*sets: ImageSet) -> ImageSet:
    return ImageSet(
        images=[im for s in sets for im in s.images],
        labels=np.concatenate([np.asarray(s.labels, np.int32) for s in sets]),
        files=tuple(f for s in sets for f in s.files),
    )


def compute_split_hash(class_names, train, test, labelled, unlabelled) -> str:
    payload = json.dumps(
        {
            "classes": list(class_names),
            "train": list(train.files),
            "test": list(test.files),
            "labelled": list(labelled.files),
            "unlabelled": list(unlabelled.files),
        }
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def write_split_json(data: SemiSupervisedData, path: str) -> None:
    """Every chosen file with its label, so a run's split can be audited or reproduced."""

    def rows(s: ImageSet):
        return [[f, int(y)] for f, y in zip(s.files, s.labels, strict=True)]

    record = {
        "split_hash": data.split_hash,
        "protocol": data.protocol,
        "classes": list(data.class_names),
        **data.info,
        "train": rows(data.train),
        "test": rows(data.test),
        "labelled": rows(data.labelled),
        "unlabelled": rows(data.unlabelled),
    }
    atomic_write_json(record, path, indent=1)
