"""Where images come from: class folders on disk, decoded once and cached at 64 px.

A dataset root holds one sub-folder per class (`root/<class>/<image>`, images may sit in
nested folders below the class folder, as torchvision's ImageFolder allows). Files ending in
.tif/.tiff/.jpg/.jpeg/.png (any case) are images; hidden files are skipped. Each image is
decoded with PIL, converted to RGB (grey-scale, palette, 16-bit and RGBA inputs included) and
Resize(64)'d once (shorter side to 64, aspect kept), so the pipeline holds small uint8 arrays.

Decoded images are cached in memory for the life of the process and, unless the cache folder
is None, in `<cache_dir>/images-<key>.npz`, where the key hashes the file list, file sizes and
modification times: changing, adding or touching a file gives a new key, so a stale cache is
never read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from ssl_jax.data import augment_host

IMAGE_EXTENSIONS = (".tif", ".tiff", ".jpg", ".jpeg", ".png")
_CACHE_FORMAT = 1  # bump when the decoding changes, so old caches are not reused

UCM_URL = "http://weegee.vision.ucmerced.edu/datasets/landuse.html"
AID_URL = "https://captain-whu.github.io/AID/"


class DataError(ValueError):
    """A problem with the input data that the user can fix; the message says how."""


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """Images with their labels; `files` are paths relative to the root (or tfds record ids).

    Labels are 0..C-1 in `class_names` order; -1 marks unlabelled images of classes outside the
    chosen subset (only with `unlabelled_whole_folder`; they count against `pseudo_acc` only).
    """

    images: list[np.ndarray]  # uint8 (H, W, 3), shorter side = image_size
    labels: np.ndarray  # int32 (N,)
    files: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.images)

    def padded(self) -> tuple[np.ndarray, np.ndarray]:
        """One uint8 (N, Hmax, Wmax, 3) array (zeros past each image) and int32 (N, 2) sizes.

        The device cache needs a single array; the sizes keep each image's true frame.
        """
        sizes = np.array([im.shape[:2] for im in self.images], np.int32).reshape(-1, 2)
        height, width = sizes.max(axis=0) if len(sizes) else (0, 0)
        out = np.zeros((len(self.images), height, width, 3), np.uint8)
        for i, im in enumerate(self.images):
            out[i, : im.shape[0], : im.shape[1]] = im
        return out, sizes

    def subset(self, indices: Sequence[int]) -> ImageSet:
        indices = list(indices)
        return ImageSet(
            images=[self.images[i] for i in indices],
            labels=np.asarray(self.labels, np.int32)[indices].astype(np.int32),
            files=tuple(self.files[i] for i in indices),
        )


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(name).startswith(".")


def missing_root_message(root: str) -> str:
    where = f"{root!r} does not exist" if root else "no data root is set"
    return (
        f"Dataset root not found: {where}. Expected a folder with one sub-folder per class, "
        "root/<class>/<image> (.tif/.jpg/.png). Download UC Merced Land Use from "
        f"{UCM_URL} or AID from {AID_URL}, then point to it with the SSL_JAX_DATA environment "
        "variable (the folder holding ucm/ and aid/) or with --config.data.root=/path/to/root."
    )


def list_class_folders(root: str) -> list[str]:
    """Sorted names of the non-hidden sub-folders of `root` (the classes when none are given)."""
    if not root or not os.path.isdir(root):
        raise DataError(missing_root_message(root))
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def scan_class_folder(root: str, class_name: str, skipped: list[str] | None = None) -> list[str]:
    """Image paths under `root/class_name`, relative to root, sorted; errors if there are none.

    Non-image files (other extensions, not hidden ones) are appended to `skipped`, so the
    summary can show them instead of dropping them silently.
    """
    folder = os.path.join(root, class_name)
    if not os.path.isdir(folder):
        available = ", ".join(list_class_folders(root)) or "(none)"
        raise DataError(
            f"Class {class_name!r} has no folder {folder!r}. Classes found under {root!r}: "
            f"{available}. Fix config.data.classes (or the split lists) to name existing folders."
        )
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            relative = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            if is_image_file(name):
                found.append(relative)
            elif skipped is not None and not name.startswith("."):
                skipped.append(relative)
    if not found:
        raise DataError(
            f"Class folder {folder!r} holds no images ({'/'.join(IMAGE_EXTENSIONS)}). Add its "
            "images, remove the folder, or leave the class out of config.data.classes."
        )
    return sorted(found)


# ---------------------------------------------------------------------------------- decoding


def decode_image(data: bytes | str, size: int = 64) -> np.ndarray:
    """File path or encoded bytes -> uint8 (H, W, 3), RGB, shorter side resized to `size`."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        im.load()  # decode fully now, so truncated files fail here and not later
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16/32-bit grey: scale to 8 bits (PIL's convert("RGB") would clip, not scale).
            arr = np.asarray(im, np.float64)
            top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
            im = Image.fromarray(np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8))
        rgb = im.convert("RGB")
    return np.asarray(augment_host.resize_shorter(rgb, size), np.uint8).copy()


def load_image(path: str, size: int = 64) -> np.ndarray:
    """Decode + RGB + Resize(size) of one file, as for training (used by prediction)."""
    try:
        return decode_image(os.fspath(path), size)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"Cannot read image {path!r}: {e}") from e


def decode_all(
    keys: Sequence[str],
    read: Callable[[str], bytes | str],
    *,
    size: int,
    describe: str,
) -> list[np.ndarray]:
    """Decodes every key; collects every unreadable image and raises once, listing them all."""
    images, bad = [], []
    for key in keys:
        try:
            images.append(decode_image(read(key), size))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            bad.append(f"  {key}: {type(e).__name__}: {e}")
    if bad:
        raise DataError(
            f"{len(bad)} unreadable or truncated image(s) in {describe}:\n"
            + "\n".join(bad)
            + "\nReplace or delete these files (and drop them from any split list)."
        )
    return images


# ------------------------------------------------------------------------------------ cache

_MEMORY_CACHE: dict[str, list[np.ndarray]] = {}


def file_fingerprint(paths: Sequence[str]) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) for each path: changes whenever a file is replaced or touched."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((os.path.abspath(p), st.st_size, st.st_mtime_ns))
    return out


def cache_key(fingerprint, size: int) -> str:
    payload = json.dumps({"format": _CACHE_FORMAT, "size": size, "files": fingerprint})
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def cached_decode(
    key: str, decode: Callable[[], list[np.ndarray]], cache_dir: str | None
) -> tuple[list[np.ndarray], str]:
    """Returns (images, where) with where in {"memory", "disk", "decoded"}."""
    if key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key], "memory"
    path = os.path.join(cache_dir, f"images-{key}.npz") if cache_dir else None
    if path and os.path.exists(path):
        try:
            with np.load(path) as z:
                flat, shapes = z["flat"], z["shapes"]
            ends = np.cumsum([int(np.prod(s)) for s in shapes])
            images = [
                flat[e - int(np.prod(s)) : e].reshape(s) for e, s in zip(ends, shapes, strict=True)
            ]
            _MEMORY_CACHE[key] = images
            return images, "disk"
        except (OSError, KeyError, ValueError):
            pass  # a damaged cache file is rebuilt below
    images = decode()
    _MEMORY_CACHE[key] = images
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        shapes = np.array([im.shape for im in images], np.int64).reshape(-1, 3)
        flat = np.concatenate([im.reshape(-1) for im in images]) if images else np.zeros(0)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, flat=flat.astype(np.uint8), shapes=shapes)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the whole new file
    return images, "decoded"


def load_folder_images(
    root: str, files: Sequence[str], *, size: int, cache_dir: str | None
) -> tuple[dict[str, np.ndarray], str]:
    """Decodes root-relative `files` (via the caches); returns {file: image} and the cache hit."""
    unique = sorted(set(files))
    full = [os.path.join(root, f) for f in unique]
    key = cache_key(file_fingerprint(full), size)
    images, where = cached_decode(
        key,
        lambda: decode_all(full, lambda p: p, size=size, describe=f"dataset root {root!r}"),
        cache_dir,
    )
    return dict(zip(unique, images, strict=True)), where


@dataclasses.dataclass
class ImagePool:
    """What a source provides before the labelled/unlabelled protocol is applied."""

    class_names: tuple[str, ...]
    train: ImageSet
    test: ImageSet
    # Every image of the source with labels (-1 outside the class subset), for
    # `unlabelled_whole_folder`; None when not requested.
    everything: ImageSet | None
    info: dict  # source, root or tfds name, cache hit, images left out by the split lists


def cache_dir_for(config_cache_dir: str, workdir: str | None) -> str | None:
    """`config.data.cache_dir` -> a folder, or None for memory only."""
    if config_cache_dir == "none":
        return None
    if config_cache_dir:
        return os.path.expanduser(config_cache_dir)
    return os.path.join(workdir, "cache") if workdir else None
