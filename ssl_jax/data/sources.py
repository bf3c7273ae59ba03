"""Where images come from: class folders on disk, decoded once and cached at 64 px.

A dataset root holds one sub-folder per class (`root/<class>/<image>`, images may sit in
nested folders below the class folder, as torchvision's ImageFolder allows). Files ending in
.tif/.tiff/.jpg/.jpeg/.png (any case) are images; hidden files are skipped. Each image is
decoded with PIL, converted to RGB (grey-scale, palette, 16-bit and RGBA inputs included) and
Resize(64)'d once (shorter side to 64, aspect kept), so the pipeline holds small uint8 arrays.

Images as users have them:
  * Files with another image extension (.bmp, .webp, .gif, .jp2, .heic, ... see
    `UNSUPPORTED_IMAGE_EXTENSIONS`) in a class folder are an **error** that lists every such
    file and says how to convert them; they are never skipped silently. Other files (.txt,
    .xml, ...) are skipped and counted in split.json (`non_image_files_skipped`).
  * Pixels wider than 8 bits are scaled to 0..255 by one rule, per image (`to_uint8`):
      float (e.g. a float32 TIFF): values in [0, 1] are multiplied by 255; values in
          [0, 255] are used as they are; anything else (negative, above 255, NaN or inf) is
          refused with a message saying how to convert the file.
      integer (16-bit TIFF/PNG, 32-bit TIFF): divided by 2**b - 1, where b is the fewest bits
          (at least 8, at most 16) that hold the image's largest value, so 12-bit data stored
          in 16-bit files (max <= 4095) is scaled by 4095, 8-bit data in 16-bit files is kept
          as it is, and full 16-bit data by 65535. Because b is found per image, an image far
          darker than its dataset's bit depth is brightened by up to 2x; convert such a dataset
          to 8-bit yourself for exact control. Negative values or more than 16 bits are refused.
      Multi-band TIFFs with 16-bit samples are read at full depth when uncompressed (Pillow
          would keep only the top 8 bits, which makes 12-bit data almost black); compressed
          ones, and float multi-band TIFFs, which Pillow cannot read, are refused with the
          `gdal_translate` command that converts them.
  * Two files of one class folder with the same stem (x.png and x.tif) are an error listing
    every collision at once (splits.py), whichever split is used.

Decoded images are cached in memory for the life of the process and, unless the cache folder
is None, in `<cache_dir>/images-<key>.npz`, where the key hashes the file list, file sizes and
modification times: changing, adding or touching a file gives a new key, so a stale cache is
never read. A cache file that cannot be written (a full disk) leaves nothing behind: a warning
is printed and the run goes on with the images in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from ssl_jax.data import augment_host

IMAGE_EXTENSIONS = (".tif", ".tiff", ".jpg", ".jpeg", ".png")
# Image formats that the loader does not read: reported by name, never skipped silently.
UNSUPPORTED_IMAGE_EXTENSIONS = (
    ".bmp", ".dib", ".gif", ".webp", ".jp2", ".j2k", ".jpx", ".jpf", ".jpe", ".jfif",
    ".heic", ".heif", ".avif", ".jxl", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico",
    ".icns", ".psd", ".pcx", ".sgi", ".ras", ".xbm", ".xpm", ".dds", ".exr", ".hdr",
    ".dng", ".cr2", ".nef", ".arw", ".raw", ".svg", ".eps",
)  # fmt: skip
_CACHE_FORMAT = 2  # bump when the decoding changes, so old caches are not reused

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


def is_unsupported_image_file(name: str) -> bool:
    """An image format the loader does not read (`UNSUPPORTED_IMAGE_EXTENSIONS`)."""
    base = os.path.basename(name)
    return base.lower().endswith(UNSUPPORTED_IMAGE_EXTENSIONS) and not base.startswith(".")


def unsupported_files_message(files: Sequence[str], where: str) -> str:
    """The error for image files of a format the loader does not read, listing them all."""
    exts = sorted({os.path.splitext(f)[1].lower() for f in files})
    return (
        f"{len(files)} file(s) in {where} have an image format the loader does not read "
        f"({', '.join(exts)}; it reads {'/'.join(IMAGE_EXTENSIONS)}):\n"
        + "\n".join(f"  {f}" for f in files)
        + "\nConvert them to PNG and delete the originals (e.g. `mogrify -format png *.bmp`, "
        "or in Python `PIL.Image.open(p).convert('RGB').save(p_without_ext + '.png')`), "
        "or move them out of the class folders."
    )


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


def scan_class_folder(
    root: str,
    class_name: str,
    skipped: list[str] | None = None,
    unsupported: list[str] | None = None,
) -> list[str]:
    """Image paths under `root/class_name`, relative to root, sorted; errors if there are none
    (unless it holds unsupported files, which the caller then reports).

    Non-image files (other extensions, not hidden ones) are appended to `skipped`, so the
    summary can show them instead of dropping them silently. Files of an image format the
    loader does not read are appended to `unsupported` (the caller raises once for all
    folders), or raised here, listed, when `unsupported` is None.
    """
    folder = os.path.join(root, class_name)
    if not os.path.isdir(folder):
        available = ", ".join(list_class_folders(root)) or "(none)"
        raise DataError(
            f"Class {class_name!r} has no folder {folder!r}. Classes found under {root!r}: "
            f"{available}. Fix config.data.classes (or the split lists) to name existing folders."
        )
    found, unreadable = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            relative = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            if is_image_file(name):
                found.append(relative)
            elif is_unsupported_image_file(name):
                unreadable.append(relative)
            elif skipped is not None and not name.startswith("."):
                skipped.append(relative)
    if unreadable and unsupported is None:
        raise DataError(unsupported_files_message(unreadable, f"class folder {folder!r}"))
    if unreadable:
        unsupported.extend(unreadable)
        if not found:
            return []  # the caller raises, listing these with every other folder's
    if not found:
        raise DataError(
            f"Class folder {folder!r} holds no images ({'/'.join(IMAGE_EXTENSIONS)}). Add its "
            "images, remove the folder, or leave the class out of config.data.classes."
        )
    return sorted(found)


# ---------------------------------------------------------------------------------- decoding


class PixelFormatError(ValueError):
    """An image whose pixel values have no safe 8-bit reading; the message says how to convert."""


CONVERT_HINT = (
    "Convert it to 8-bit first, e.g. `gdal_translate -ot Byte -scale <min> <max> 0 255 in.tif "
    "out.tif` with the data's value range."
)


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Pixel values of any depth -> uint8 by the rule of the module docstring."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "f":
        values = arr.astype(np.float64)
        if not np.isfinite(values).all():
            raise PixelFormatError(f"float pixels include NaN or inf. {CONVERT_HINT}")
        low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
        if low < 0 or high > 255:
            raise PixelFormatError(
                f"float pixels span [{low:g}, {high:g}]; only [0, 1] (scaled by 255) and "
                f"[0, 255] are read. {CONVERT_HINT}"
            )
        scale = 255.0 if high <= 1.0 else 1.0
    elif arr.dtype.kind in "iu":
        low, high = int(arr.min(initial=0)), int(arr.max(initial=0))
        if low < 0:
            raise PixelFormatError(f"integer pixels are negative (min {low}). {CONVERT_HINT}")
        bits = max(8, high.bit_length())
        if bits > 16:
            raise PixelFormatError(
                f"integer pixels reach {high}, more than 16 bits. {CONVERT_HINT}"
            )
        values, scale = arr.astype(np.float64), 255.0 / (2**bits - 1)
    else:
        raise PixelFormatError(f"pixels of type {arr.dtype} are not read. {CONVERT_HINT}")
    return np.clip(values * scale + 0.5, 0, 255).astype(np.uint8)


def _tiff_deep_samples(im: Image.Image) -> np.ndarray | None:
    """A multi-band TIFF with > 8-bit samples, read at full depth (Pillow keeps the top byte).

    None when the image is not such a TIFF. Must run before `im.load()`.
    """
    if im.format != "TIFF" or len(im.getbands()) < 2:
        return None
    bits = im.tag_v2.get(258)
    bits = tuple(bits) if isinstance(bits, tuple | list) else (bits,)
    if not any(isinstance(b, int) and b > 8 for b in bits):
        return None
    if im.mode not in ("RGB", "RGBA", "RGBX"):
        raise PixelFormatError(
            f"a {im.mode} TIFF with {'/'.join(map(str, bits))}-bit samples is not read. "
            f"{CONVERT_HINT}"
        )
    bands = len(im.getbands())
    rawmodes = {f"{im.mode};16L": "<u2", f"{im.mode};16B": ">u2"}
    tiles = list(im.tile)
    if (
        set(bits) != {16}
        or not tiles
        or any(t[0] != "raw" or t[3][0] not in rawmodes or t[3][1] not in (0, None) for t in tiles)
    ):
        raise PixelFormatError(
            f"a {im.mode} TIFF with {'/'.join(map(str, bits))}-bit samples stored compressed: "
            "Pillow would keep only the top 8 bits (12-bit data would look black). Convert it "
            "to 8-bit (`gdal_translate -ot Byte -scale 0 <max> 0 255 in.tif out.tif`) or store "
            "it uncompressed (`gdal_translate -co COMPRESS=NONE in.tif out.tif`), which is read "
            "at full depth."
        )
    out = np.zeros((im.size[1], im.size[0], bands), np.uint16)
    for _, (x0, y0, x1, y1), offset, args in tiles:
        x1, y1 = min(x1, im.size[0]), min(y1, im.size[1])
        count = (x1 - x0) * (y1 - y0) * bands
        im.fp.seek(offset)
        raw = np.frombuffer(im.fp.read(count * 2), dtype=rawmodes[args[0]])
        if raw.size != count:
            raise PixelFormatError("the TIFF is truncated.")
        out[y0:y1, x0:x1] = raw.reshape(y1 - y0, x1 - x0, bands)
    return out


def decode_image(data: bytes | str, size: int = 64) -> np.ndarray:
    """File path or encoded bytes -> uint8 (H, W, 3), RGB, shorter side resized to `size`.

    Pixels wider than 8 bits follow `to_uint8` (module docstring).
    """
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        deep = _tiff_deep_samples(im)
        if deep is not None:
            rgb = Image.fromarray(np.ascontiguousarray(to_uint8(deep)[..., :3]))
        else:
            im.load()  # decode fully now, so truncated files fail here and not later
            if im.mode in ("F", "I") or im.mode.startswith("I;"):
                # float or 16/32-bit grey: PIL's convert("RGB") would clip, not scale.
                im = Image.fromarray(to_uint8(np.asarray(im)), "L")
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
    images, bad, bad_tiffs = [], [], False
    for key in keys:
        try:
            images.append(decode_image(read(key), size))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            bad.append(f"  {key}: {type(e).__name__}: {e}")
            bad_tiffs |= str(key).lower().endswith((".tif", ".tiff"))
    if bad:
        tiff_hint = ""
        if bad_tiffs:
            tiff_hint = (
                "\nTIFFs that Pillow cannot identify are often multi-band float TIFFs: "
                "convert them to 8-bit, e.g. `gdal_translate -ot Byte -scale <min> <max> 0 255 "
                "in.tif out.tif`."
            )
        raise DataError(
            f"{len(bad)} unreadable, truncated or unconvertible image(s) in {describe}:\n"
            + "\n".join(bad)
            + "\nReplace or delete these files (and drop them from any split list)."
            + tiff_hint
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
        write_cache(path, images)
    return images, "decoded"


def write_cache(path: str, images: Sequence[np.ndarray]) -> bool:
    """Writes the cache file atomically; on failure (a full disk) removes the temporary file,
    prints a warning and returns False: the images are in memory, so the run goes on."""
    shapes = np.array([im.shape for im in images], np.int64).reshape(-1, 3)
    flat = np.concatenate([im.reshape(-1) for im in images]) if images else np.zeros(0)
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, flat=flat.astype(np.uint8), shapes=shapes)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the whole new file
        return True
    except OSError as e:
        print(
            f"WARNING: could not write the image cache {path!r} ({type(e).__name__}: {e}); "
            "going on with the decoded images in memory.",
            file=sys.stderr,
            flush=True,
        )
        return False
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


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
