"""Train/test splits: the paper's split lists, the user's own lists, or a seeded per-class split.

A split list has one `<path> <label>` line per image (CRLF or LF, final newline optional), as
published with the paper, e.g. `data/UCM/Images/baseballdiamond/baseballdiamond56.tif 0`.
A line is matched to an image under the dataset root by its class folder (the second-to-last
path component) and file stem, so the lists also name the 64-px PNG copies or any other
encoding of the same images. The label column is not used: labels follow the class order of
`config.data.classes`, so a subset in another order works. Lines of classes outside the chosen
subset are skipped (that is what choosing a subset means); anything else that does not match
is an error.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import numpy as np

from ssl_jax.data.sources import DataError

SHIPPED_SPLITS = ("UCM", "AID")
SPLITS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "split_lists")
SEEDED_SPLIT_STREAM = 101  # the rng stream of the seeded per-class split


@dataclasses.dataclass(frozen=True)
class SplitEntry:
    class_folder: str
    stem: str
    line_number: int  # 1-based, for error messages
    text: str


def split_list_paths(split_lists: str) -> tuple[str, str] | None:
    """`config.data.split_lists` -> (train list, test list), or None for a seeded split."""
    if not split_lists:
        return None
    if split_lists in SHIPPED_SPLITS:
        prefix = os.path.join(SPLITS_DIR, split_lists)
    else:
        prefix = os.path.expanduser(split_lists)
    paths = (f"{prefix}_train.txt", f"{prefix}_test.txt")
    for p in paths:
        if not os.path.isfile(p):
            raise DataError(
                f"Split list {p!r} not found. config.data.split_lists is {split_lists!r}: use "
                f"one of {SHIPPED_SPLITS}, a path prefix P with P_train.txt and P_test.txt, or "
                "'' for a seeded per-class split."
            )
    return paths


def read_split_list(path: str) -> list[SplitEntry]:
    """Parses a split list; blank lines are skipped, every other line must name a file."""
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        fields = line.rsplit(maxsplit=1)
        file_path = fields[0]
        if len(fields) == 2 and not _is_int(fields[1]):
            file_path = line  # no label column; the path itself contains a space
        parts = [p for p in file_path.replace("\\", "/").split("/") if p]
        if len(parts) < 2:
            raise DataError(
                f"{path}:{number}: {line!r} does not name <class>/<file>; each line must be "
                "'<.../class/file> <label>'."
            )
        entries.append(SplitEntry(parts[-2], os.path.splitext(parts[-1])[0], number, line))
    return entries


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


def _stem_key(f: str, by_directory: bool) -> str:
    stem = os.path.splitext(f)[0]
    return stem if by_directory else os.path.basename(stem)


def stem_collisions(files: Sequence[str], *, by_directory: bool = False) -> list[list[str]]:
    """Groups of files of one class folder that share a stem (x.png and x.tif), in file order.

    `by_directory=False` compares the file name stem only (how split lists match files);
    `True` compares the path without extension, so sub/x.png and x.png do not collide.
    """
    groups: dict[str, list[str]] = {}
    for f in files:
        groups.setdefault(_stem_key(f, by_directory), []).append(f)
    return [g for g in groups.values() if len(g) > 1]


def check_stem_collisions(
    folder_files: Mapping[str, Sequence[str]], *, by_directory: bool, why: str
) -> None:
    """Raises one DataError listing every same-stem collision in every class folder."""
    collisions = [
        group
        for files in folder_files.values()
        for group in stem_collisions(files, by_directory=by_directory)
    ]
    if collisions:
        raise DataError(
            f"{len(collisions)} group(s) of images share a file stem within a class folder "
            f"({why}):\n"
            + "\n".join("  " + ", ".join(group) for group in collisions)
            + "\nKeep one file of each group (delete or rename the others)."
        )


SPLIT_LIST_COLLISIONS = (
    "a split list line names a class folder and a stem, so it cannot tell them apart"
)
SEEDED_COLLISIONS = (
    "likely one image in two formats, which a seeded split could put in train and test"
)


def stem_index(files: Sequence[str]) -> dict[str, str]:
    """{stem: root-relative file} for one class folder; shared stems are an error (all listed)."""
    check_stem_collisions({"": files}, by_directory=False, why=SPLIT_LIST_COLLISIONS)
    return {_stem_key(f, False): f for f in files}


def match_split_list(
    path: str,
    entries: Sequence[SplitEntry],
    class_names: Sequence[str],
    folder_files: Mapping[str, Sequence[str]],
    root: str,
) -> tuple[list[str], list[int]]:
    """Resolves list entries to root-relative files and labels (index in `class_names`).

    `folder_files[c]` are the images found in class folder `c`. Every unresolved line is
    reported at once.
    """
    label_of = {c: i for i, c in enumerate(class_names)}
    indices = {c: stem_index(folder_files[c]) for c in class_names}
    files, labels, missing, seen = [], [], [], {}
    for e in entries:
        if e.class_folder not in label_of:
            continue  # a class outside the chosen subset
        f = indices[e.class_folder].get(e.stem)
        if f is None:
            missing.append(f"  line {e.line_number}: {e.text}")
            continue
        if f in seen:
            raise DataError(
                f"{path}: {f!r} is listed twice (lines {seen[f]} and {e.line_number}). "
                "Remove the duplicate line."
            )
        seen[f] = e.line_number
        files.append(f)
        labels.append(label_of[e.class_folder])
    if missing:
        raise DataError(
            f"{len(missing)} line(s) of split list {path!r} name no image under {root!r} "
            "(matched by class folder and file stem):\n"
            + "\n".join(missing[:50])
            + ("\n  ..." if len(missing) > 50 else "")
            + "\nCheck config.data.root and config.data.split_lists, or restore the files."
        )
    listed = set(labels)
    empty = [c for c in class_names if label_of[c] not in listed]
    if empty:
        raise DataError(
            f"Split list {path!r} has no images of class(es) {empty}. Leave them out of "
            "config.data.classes or use split lists that cover them."
        )
    return files, labels


def check_classes_in_lists(
    paths: Sequence[str], entries: Sequence[Sequence[SplitEntry]], available: Sequence[str]
) -> None:
    """A class named by a split list but absent from the root is an error, not a skip."""
    absent = sorted({e.class_folder for es in entries for e in es} - set(available))
    if absent:
        raise DataError(
            f"Split lists {list(paths)} name class folder(s) {absent} that are not under the "
            f"dataset root (found: {list(available)}). Point config.data.root at the folder "
            "holding those classes."
        )


def seeded_split(
    labels: Sequence[int], test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded shuffle and round(n * test_fraction) to test; returns index arrays.

    Seeded by `config.seed`, so each seed has its own split (recorded in split.json).
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"config.data.test_fraction must be in (0, 1), got {test_fraction}.")
    labels = np.asarray(labels)
    train, test = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rng = np.random.default_rng([seed, SEEDED_SPLIT_STREAM, int(c)])
        members = members[rng.permutation(len(members))]
        n_test = int(round(len(members) * test_fraction))
        test.extend(members[:n_test].tolist())
        train.extend(members[n_test:].tolist())
    return np.array(sorted(train), np.int64), np.array(sorted(test), np.int64)
