"""Sources, split lists, protocols and bad input, on the real UCM/AID copies and tiny folders."""

import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from configs.base import AID10_CLASSES, UCM10_CLASSES, get_config
from ssl_jax.data import DataError, load_dataset, load_image, sources, train_iterator
from ssl_jax.data.splits import SPLITS_DIR


def make_config(root, **data):
    config = get_config()
    config.data.root = str(root)
    config.data.cache_dir = "none"
    config.data.workers = 0
    for key, value in data.items():
        config.data[key] = value
    return config


def read_list(name):
    """(class folder, stem, label) per line of a shipped list, parsed independently."""
    with open(os.path.join(SPLITS_DIR, name), "rb") as f:
        lines = f.read().decode().split("\r\n")
    out = []
    for line in lines:
        path, label = line.split(" ")
        parts = path.split("/")
        out.append((parts[-2], os.path.splitext(parts[-1])[0], int(label)))
    return out


def stems(imageset):
    return [(f.split("/")[0], os.path.splitext(os.path.basename(f))[0]) for f in imageset.files]


@pytest.fixture(scope="module")
def ucm(shared_data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ucm_run")
    return load_dataset(make_config(shared_data / "ucm"), workdir=str(workdir)), workdir


# ------------------------------------------------------------------------------ real data


def test_ucm_k_per_class_counts_and_split_record(ucm):
    data, workdir = ucm
    summary = data.summary()
    assert (summary["train"], summary["test"], summary["labelled"], summary["unlabelled"]) == (
        500,
        500,
        40,
        500,
    )
    assert all(type(summary[k]) is int for k in ("train", "test", "labelled", "unlabelled"))
    assert summary["per_class"]["labelled"] == dict.fromkeys(UCM10_CLASSES, 4)
    assert summary["per_class"]["test"] == dict.fromkeys(UCM10_CLASSES, 50)
    assert summary["image_sizes"] == {"64x64": 1000}
    assert set(data.labelled.files) <= set(data.train.files)
    assert data.unlabelled.files == data.train.files
    assert not set(data.train.files) & set(data.test.files)
    record = json.loads((workdir / "split.json").read_text())
    assert record["split_hash"] == data.split_hash == summary["split_hash"]
    assert [f for f, _ in record["labelled"]] == list(data.labelled.files)
    json.dumps(summary)  # serialisable as the inspect line


def test_labels_follow_the_paper_lists(ucm):
    """Our labels (config class order) equal the label column of the published lists."""
    data, _ = ucm
    for imageset, name in ((data.train, "UCM_train.txt"), (data.test, "UCM_test.txt")):
        listed = read_list(name)
        assert stems(imageset) == [(c, s) for c, s, _ in listed]
        assert imageset.labels.tolist() == [y for _, _, y in listed]
    image = data.train.images[0]
    expected = np.asarray(Image.open(os.path.join(data.info["root"], data.train.files[0])))
    np.testing.assert_array_equal(image, expected)  # 64x64 PNGs pass through unchanged


def test_k_per_class_is_seeded(shared_data):
    root = shared_data / "ucm"
    a = load_dataset(make_config(root), workdir=None)
    b = load_dataset(make_config(root), workdir=None)
    config = make_config(root)
    config.seed = 1
    c = load_dataset(config, workdir=None)
    assert a.labelled.files == b.labelled.files and a.split_hash == b.split_hash
    assert set(a.labelled.files) != set(c.labelled.files) and a.split_hash != c.split_hash
    assert a.test.files == c.test.files  # split lists do not depend on the seed


def test_ucm_seed_code_protocol(shared_data):
    data = load_dataset(make_config(shared_data / "ucm", protocol="seed_code"), workdir=None)
    assert (len(data.labelled), len(data.unlabelled)) == (500, 1000)
    assert data.labelled.files == data.train.files
    assert set(data.unlabelled.files) == set(data.train.files) | set(data.test.files)
    assert (data.unlabelled.labels >= 0).all()


def test_seed_code_whole_folder_marks_other_classes(shared_data):
    config = make_config(
        shared_data / "ucm",
        protocol="seed_code",
        unlabelled_whole_folder=True,
        classes=("tenniscourt", "freeway"),
    )
    data = load_dataset(config, workdir=None)
    assert len(data.unlabelled) == 2100  # every image under the root, as the folder scan did
    labels = dict(zip(data.unlabelled.files, data.unlabelled.labels.tolist(), strict=True))
    assert labels["tenniscourt/tenniscourt14.png"] == 0
    assert labels["freeway/freeway00.png"] == 1
    assert labels["airplane/airplane00.png"] == -1
    assert (data.unlabelled.labels == -1).sum() == 1900
    assert data.summary()["per_class"]["unlabelled"]["(other classes, label -1)"] == 1900


def test_aid_counts(shared_data):
    """The one slow check: 3150 AID images with the AID lists."""
    data = load_dataset(
        make_config(shared_data / "aid", split_lists="AID", classes=AID10_CLASSES), workdir=None
    )
    counts = (len(data.train), len(data.test), len(data.labelled), len(data.unlabelled))
    assert counts == (1575, 1575, 40, 1575)
    per_class = [180, 155, 150, 140, 170, 175, 185, 130, 145, 145]  # docs/method.md#datasets
    assert np.bincount(data.train.labels).tolist() == per_class
    assert np.bincount(data.test.labels).tolist() == per_class
    assert [y for _, _, y in read_list("AID_test.txt")] == data.test.labels.tolist()


def test_class_subset_order(shared_data):
    config = make_config(shared_data / "ucm", classes=("tenniscourt", "baseballdiamond"))
    data = load_dataset(config, workdir=None)
    assert (len(data.train), len(data.test), len(data.labelled)) == (100, 100, 8)
    for f, y in zip(data.train.files, data.train.labels, strict=True):
        assert y == (0 if f.startswith("tenniscourt/") else 1)


def test_lf_and_crlf_lists_agree(shared_data, tmp_path):
    for part in ("train", "test"):
        with open(os.path.join(SPLITS_DIR, f"UCM_{part}.txt"), "rb") as handle:
            text = handle.read().decode()
        assert "\r\n" in text and not text.endswith("\n")
        (tmp_path / f"lf_{part}.txt").write_text(text.replace("\r\n", "\n") + "\n", newline="")
    crlf = load_dataset(make_config(shared_data / "ucm"), workdir=None)
    lf = load_dataset(
        make_config(shared_data / "ucm", split_lists=str(tmp_path / "lf")), workdir=None
    )
    assert lf.train.files == crlf.train.files and lf.test.files == crlf.test.files
    assert lf.split_hash == crlf.split_hash


def test_originals_decode_and_flow(shared_data, tmp_path):
    """The .tif/.jpg originals (incl. 247x256) decode as an independent PIL resize does."""
    tif = shared_data / "originals/ucm/tenniscourt/tenniscourt14.tif"
    with Image.open(tif) as im:
        w, h = im.size
        short, long = min(w, h), max(w, h)
        size = (64, int(64 * long / short)) if w < h else (int(64 * long / short), 64)
        expected = np.asarray(im.convert("RGB").resize(size, Image.BILINEAR))
    loaded = load_image(str(tif))
    assert min(loaded.shape[:2]) == 64 and max(loaded.shape[:2]) == 66
    np.testing.assert_array_equal(loaded, expected)
    with Image.open(shared_data / "originals/aid/Airport/airport_1.jpg") as im:
        expected = np.asarray(im.convert("RGB").resize((64, 64), Image.BILINEAR))
    np.testing.assert_array_equal(
        load_image(str(shared_data / "originals/aid/Airport/airport_1.jpg")), expected
    )

    config = make_config(
        shared_data / "originals/ucm", split_lists="", labels_per_class=1, batch_size=4, mu=2
    )
    config.train.total_steps = 2
    data = load_dataset(config, workdir=str(tmp_path))
    assert (len(data.train), len(data.test)) == (10, 10)
    sizes = data.summary()["image_sizes"]
    # overpass64 is 247x247 -> 64x64; tenniscourt14 is 247 wide, 256 high -> 66x64 (HxW).
    assert sizes == {"64x64": 19, "66x64": 1}
    padded, hw = data.unlabelled.padded()
    assert padded.shape[1:] == (hw[:, 0].max(), hw[:, 1].max(), 3)
    batch = next(train_iterator(data, config, views=("u_w", "u_s0", "u_s1")))
    assert batch["x"].shape == (4, 60, 60, 3) and batch["u_s1"].shape == (8, 60, 60, 3)

    aid = make_config(shared_data / "originals/aid", split_lists="", classes=(), labels_per_class=1)
    data = load_dataset(aid, workdir=None)
    assert data.class_names == AID10_CLASSES  # () = every sub-folder, sorted
    assert data.summary()["image_sizes"] == {"64x64": 20}


def test_disk_cache_is_used_and_invalidated(tmp_path):
    root = tmp_path / "root"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (64, 80, 3), np.uint8)).save(root / c / f"{i}.png")
    config = make_config(root, split_lists="", classes=(), labels_per_class=1, cache_dir="")
    workdir = str(tmp_path / "run")
    first = load_dataset(config, workdir=workdir)
    assert first.info["cache"] == "decoded" and os.listdir(os.path.join(workdir, "cache"))
    sources._MEMORY_CACHE.clear()
    second = load_dataset(config, workdir=workdir)
    assert second.info["cache"] == "disk"
    for x, y in zip(first.train.images, second.train.images, strict=True):
        np.testing.assert_array_equal(x, y)
    assert second.train.images[0].shape == (64, 80, 3)
    Image.fromarray(np.zeros((70, 64, 3), np.uint8)).save(root / "a" / "0.png")  # replaced file
    os.utime(root / "a" / "0.png", ns=(1, 1))
    third = load_dataset(config, workdir=workdir)
    assert third.info["cache"] == "decoded"
    assert {im.shape for im in third.train.images + third.test.images} >= {(70, 64, 3)}


def test_grey_and_rgba_become_rgb(tmp_path):
    grey = np.arange(128 * 100, dtype=np.uint32).reshape(128, 100) % 256
    Image.fromarray(grey.astype(np.uint8), "L").save(tmp_path / "g.png")
    out = load_image(str(tmp_path / "g.png"))
    assert out.shape == (int(64 * 128 / 100), 64, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = load_image(str(tmp_path / "a.png"))
    assert out.shape == (64, 64, 3) and (out[..., 0] == 200).all() and (out[..., 1] == 0).all()


# ------------------------------------------------------------------------------ bad input


def tiny_folder(root, classes=("a", "b"), per_class=4, ext="png"):
    rng = np.random.default_rng(1)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, (64, 64, 3), np.uint8)
            Image.fromarray(arr).save(root / c / f"{c}{i}.{ext}")
    return root


def test_missing_root_says_where_to_get_data(tmp_path):
    for root in ("", str(tmp_path / "nope")):
        with pytest.raises(DataError) as e:
            load_dataset(make_config(root), workdir=None)
        message = str(e.value)
        assert "weegee.vision.ucmerced.edu" in message and "captain-whu.github.io/AID" in message
        assert "SSL_JAX_DATA" in message and "root/<class>/<image>" in message


def test_empty_class_folder(tmp_path):
    root = tiny_folder(tmp_path / "r")
    (root / "c").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load_dataset(make_config(root, split_lists="", classes=()), workdir=None)


def test_all_corrupt_files_listed_at_once(tmp_path):
    root = tiny_folder(tmp_path / "r")
    data = (root / "a" / "a0.png").read_bytes()
    (root / "a" / "a0.png").write_bytes(data[: len(data) // 2])  # truncated
    (root / "b" / "b9.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError) as e:
        load_dataset(
            make_config(root, split_lists="", classes=(), labels_per_class=1), workdir=None
        )
    assert "a/a0.png" in str(e.value) and "b/b9.jpg" in str(e.value)
    assert "2 unreadable" in str(e.value)


def test_split_list_naming_missing_files(tmp_path):
    root = tiny_folder(tmp_path / "r")
    (tmp_path / "l_train.txt").write_text("x/a/a0.tif 0\nx/a/a9.tif 0\nx/b/b0.tif 1\nx/b/b7.tif 1")
    (tmp_path / "l_test.txt").write_text("x/a/a1.tif 0\r\nx/b/b1.tif 1\r\n")
    config = make_config(root, split_lists=str(tmp_path / "l"), classes=(), labels_per_class=1)
    with pytest.raises(DataError) as e:
        load_dataset(config, workdir=None)
    assert "x/a/a9.tif" in str(e.value) and "x/b/b7.tif" in str(e.value)
    assert "2 line(s)" in str(e.value)


def test_split_list_class_absent_from_folder(tmp_path):
    root = tiny_folder(tmp_path / "r")
    (tmp_path / "l_train.txt").write_text("x/a/a0.tif 0\nx/b/b0.tif 1\nx/zebra/z0.tif 2")
    (tmp_path / "l_test.txt").write_text("x/a/a1.tif 0\nx/b/b1.tif 1")
    config = make_config(root, split_lists=str(tmp_path / "l"), classes=(), labels_per_class=1)
    with pytest.raises(DataError, match="zebra"):
        load_dataset(config, workdir=None)


def test_config_class_absent_from_folder(tmp_path):
    root = tiny_folder(tmp_path / "r")
    config = make_config(root, split_lists="", classes=("a", "zebra"))
    with pytest.raises(DataError, match=r"zebra.*no folder"):
        load_dataset(config, workdir=None)


def test_k_larger_than_a_class(tmp_path):
    root = tiny_folder(tmp_path / "r")
    config = make_config(root, split_lists="", classes=(), labels_per_class=3)  # 2 train each
    with pytest.raises(DataError, match=r"Class 'a' has 2 training image\(s\).*labels_per_class=3"):
        load_dataset(config, workdir=None)


def test_empty_split(tmp_path):
    root = tiny_folder(tmp_path / "r")
    (tmp_path / "l_train.txt").write_text("x/a/a0.tif 0\nx/b/b0.tif 1")
    (tmp_path / "l_test.txt").write_text("\r\n")
    config = make_config(root, split_lists=str(tmp_path / "l"), classes=(), labels_per_class=1)
    with pytest.raises(DataError, match="l_test.txt.*no images of class"):
        load_dataset(config, workdir=None)


def test_overlapping_lists_and_unknown_list_are_errors(tmp_path):
    root = tiny_folder(tmp_path / "r")
    (tmp_path / "l_train.txt").write_text("x/a/a0.tif 0\nx/b/b0.tif 1")
    (tmp_path / "l_test.txt").write_text("x/a/a0.png 0\nx/b/b1.tif 1")
    config = make_config(root, split_lists=str(tmp_path / "l"), classes=(), labels_per_class=1)
    with pytest.raises(DataError, match="both the train and the test"):
        load_dataset(config, workdir=None)
    config.data.split_lists = str(tmp_path / "missing")
    with pytest.raises(DataError, match="missing_train.txt"):
        load_dataset(config, workdir=None)


def test_unreadable_prediction_input(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="x.png"):
        load_image(str(tmp_path / "x.png"))


def test_nested_and_uppercase_extensions_are_found(tmp_path):
    root = tiny_folder(tmp_path / "r", ext="PNG")
    (root / "a" / "sub").mkdir()
    shutil.copy(root / "a" / "a0.PNG", root / "a" / "sub" / "extra.TIF.png")
    (root / "a" / "notes.txt").write_text("not an image")
    data = load_dataset(
        make_config(root, split_lists="", classes=(), labels_per_class=1), workdir=None
    )
    assert len(data.train) + len(data.test) == 9
    assert "a/sub/extra.TIF.png" in data.train.files + data.test.files
    assert data.summary()["non_image_files_skipped"] == 1  # reported, not silently dropped
    assert data.summary()["non_image_files_examples"] == ["a/notes.txt"]


def test_run_inspect_prints_json_last_and_draws(shared_data, tmp_path, capsys):
    from ssl_jax.data.inspect import run_inspect

    config = make_config(shared_data / "originals/ucm", split_lists="", labels_per_class=1)
    summary = run_inspect(config, str(tmp_path))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    printed = json.loads(last)
    assert printed == json.loads(json.dumps(summary))
    for key, expected in (("train", 10), ("test", 10), ("labelled", 10), ("unlabelled", 10)):
        assert type(printed[key]) is int and printed[key] == expected
    assert printed["image_sizes"] == {"64x64": 19, "66x64": 1}
    with Image.open(tmp_path / "augmentations.png") as im:
        assert im.size[0] > 300 and im.size[1] > 300
    assert json.loads((tmp_path / "split.json").read_text())["split_hash"] == printed["split_hash"]


# ------------------------------------------------------------------ images as users have them


def write_tiff(path, arr, *, deflate=False):
    """A minimal little-endian TIFF of a (H, W) or (H, W, 3) uint16/float32 array, one strip.

    Pillow cannot write multi-band 16-bit TIFFs, which GDAL writes by default.
    """
    arr = np.ascontiguousarray(arr)
    h, w = arr.shape[:2]
    bands = 1 if arr.ndim == 2 else arr.shape[2]
    data = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    if deflate:
        data = zlib.compress(data)
    per_band = struct.pack(f"<{bands}H", *[arr.dtype.itemsize * 8] * bands)
    formats = struct.pack(f"<{bands}H", *[3 if arr.dtype.kind == "f" else 1] * bands)
    data_at, bits_at = 8, 8 + len(data)
    formats_at = bits_at + len(per_band)
    ifd_at = formats_at + len(formats)
    ifd_at += ifd_at % 2

    def short(tag, value):
        return struct.pack("<HHIHH", tag, 3, 1, value, 0)

    def long(tag, value):
        return struct.pack("<HHII", tag, 4, 1, value)

    def shorts(tag, at, value):
        return struct.pack("<HHII", tag, 3, bands, at) if bands > 2 else short(tag, value)

    entries = [
        long(256, w),
        long(257, h),
        shorts(258, bits_at, arr.dtype.itemsize * 8),
        short(259, 8 if deflate else 1),
        short(262, 2 if bands == 3 else 1),
        long(273, data_at),
        short(277, bands),
        long(278, h),
        long(279, len(data)),
        short(284, 1),
        shorts(339, formats_at, 3 if arr.dtype.kind == "f" else 1),
    ]
    body = data + per_band + formats
    body += b"\0" * (ifd_at - 8 - len(body))
    ifd = struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", 0)
    path.write_bytes(b"II*\0" + struct.pack("<I", ifd_at) + body + ifd)


def test_unsupported_image_formats_are_listed_by_name_on_both_split_paths(tmp_path):
    root = tiny_folder(tmp_path / "r")
    picture = Image.fromarray(np.full((8, 8, 3), 90, np.uint8))
    picture.save(root / "a" / "scan.bmp")
    picture.save(root / "b" / "photo.webp")
    picture.save(root / "b" / "anim.GIF")
    (root / "c").mkdir()
    picture.save(root / "c" / "only.bmp")  # a class folder holding only unsupported files
    (root / "a" / "notes.txt").write_text("not an image")  # not image-like: skipped, counted
    (tmp_path / "l_train.txt").write_text("x/a/a0.tif 0\nx/b/b0.tif 1\nx/c/only.tif 2")
    (tmp_path / "l_test.txt").write_text("x/a/a1.tif 0\nx/b/b1.tif 1")
    for split_lists in ("", str(tmp_path / "l")):
        config = make_config(root, split_lists=split_lists, classes=(), labels_per_class=1)
        with pytest.raises(DataError) as e:
            load_dataset(config, workdir=None)
        message = str(e.value)
        assert message.startswith("4 file(s)")
        for name in ("a/scan.bmp", "b/photo.webp", "b/anim.GIF", "c/only.bmp"):
            assert name in message
        assert "notes.txt" not in message and "Convert them to PNG" in message
    os.remove(root / "a" / "scan.bmp")
    with pytest.raises(DataError, match=r"1 file\(s\).*\n  c/only.bmp"):  # per-folder message
        sources.scan_class_folder(str(root), "c")


def test_float_tiff_in_unit_range_is_scaled_by_255(tmp_path):
    values = np.random.default_rng(0).random((64, 64), np.float32)
    Image.fromarray(values, "F").save(tmp_path / "f.tif")
    out = load_image(str(tmp_path / "f.tif"))
    expected = np.floor(values.astype(np.float64) * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    assert out.max() > 200  # not the all-black image of a plain convert("RGB")
    Image.fromarray(values * 200, "F").save(tmp_path / "f255.tif")  # [0, 255]: used as is
    np.testing.assert_array_equal(
        load_image(str(tmp_path / "f255.tif"))[..., 1],
        np.floor(values.astype(np.float64) * 200 + 0.5).astype(np.uint8),
    )
    Image.fromarray(values - 0.5, "F").save(tmp_path / "neg.tif")
    with pytest.raises(DataError, match=r"neg.tif.*span \[-0.4.*gdal_translate"):
        load_image(str(tmp_path / "neg.tif"))


def test_12_bit_data_in_16_bit_tiffs_is_scaled_by_its_bit_depth(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 4096, (64, 64)).astype(np.uint16)
    grey[0, 0] = 4095
    Image.fromarray(grey).save(tmp_path / "g12.tif")  # Pillow writes I;16 grey
    out = load_image(str(tmp_path / "g12.tif"))
    np.testing.assert_array_equal(out[..., 0], np.floor(grey * (255 / 4095) + 0.5).astype(np.uint8))
    assert out.max() == 255 and out.mean() > 100  # not very dark (x 255/65535)
    rgb = rng.integers(0, 4096, (64, 64, 3)).astype(np.uint16)
    rgb[0, 0, 0] = 4095
    write_tiff(tmp_path / "rgb12.tif", rgb)  # Pillow alone would keep the top byte: max 15
    out = load_image(str(tmp_path / "rgb12.tif"))
    np.testing.assert_array_equal(out, np.floor(rgb * (255 / 4095) + 0.5).astype(np.uint8))
    full = rgb.astype(np.uint16) * 16
    write_tiff(tmp_path / "rgb16.tif", full)  # full 16-bit range: by 65535
    np.testing.assert_array_equal(
        load_image(str(tmp_path / "rgb16.tif")),
        np.floor(full * (255 / 65535) + 0.5).astype(np.uint8),
    )
    write_tiff(tmp_path / "rgb12z.tif", rgb, deflate=True)  # compressed: refused, with a fix
    with pytest.raises(DataError, match=r"rgb12z.tif.*top 8 bits.*COMPRESS=NONE"):
        load_image(str(tmp_path / "rgb12z.tif"))
    write_tiff(tmp_path / "rgbf.tif", rgb.astype(np.float32))  # Pillow cannot identify it
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    shutil.copy(tmp_path / "rgbf.tif", root / "a" / "x.tif")
    with pytest.raises(DataError, match=r"(?s)a/x.tif.*float TIFFs.*gdal_translate"):
        sources.load_folder_images(str(root), ["a/x.tif"], size=64, cache_dir=None)


def test_same_stem_collisions_are_all_listed_on_both_split_paths(tmp_path):
    root = tiny_folder(tmp_path / "r")
    shutil.copy(root / "a" / "a0.png", root / "a" / "a0.tif")
    shutil.copy(root / "b" / "b1.png", root / "b" / "b1.jpg")
    (tmp_path / "l_train.txt").write_text("x/a/a2.tif 0\nx/b/b2.tif 1")
    (tmp_path / "l_test.txt").write_text("x/a/a3.tif 0\nx/b/b3.tif 1")
    for split_lists in ("", str(tmp_path / "l")):
        config = make_config(root, split_lists=split_lists, classes=(), labels_per_class=1)
        with pytest.raises(DataError) as e:
            load_dataset(config, workdir=None)
        message = str(e.value)
        assert message.startswith("2 group(s)")
        assert "a/a0.png, a/a0.tif" in message and "b/b1.jpg, b/b1.png" in message


def test_same_name_in_sub_folders_is_fine_for_a_seeded_split(tmp_path):
    root = tiny_folder(tmp_path / "r")
    (root / "a" / "2020").mkdir()
    shutil.copy(root / "a" / "a0.png", root / "a" / "2020" / "a0.png")
    config = make_config(root, split_lists="", classes=(), labels_per_class=1)
    data = load_dataset(config, workdir=None)
    assert len(data.train) + len(data.test) == 9


def test_a_failed_cache_write_leaves_no_tmp_file(tmp_path, monkeypatch, capsys):
    root = tiny_folder(tmp_path / "r")
    config = make_config(root, split_lists="", classes=(), labels_per_class=1, cache_dir="")
    workdir = tmp_path / "run"

    def disk_full(f, **arrays):
        f.write(b"PK partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sources.np, "savez", disk_full)
    data = load_dataset(config, workdir=str(workdir))
    assert len(data.train) == 4 and data.info["cache"] == "decoded"
    assert os.listdir(workdir / "cache") == []
    assert "could not write the image cache" in capsys.readouterr().err


def test_runs_on_own_data_are_named_after_it(tmp_path, monkeypatch):
    from configs import base, ucm21_comatch_resnet18
    from ssl_jax.data.protocols import dataset_name

    monkeypatch.setenv("SSL_JAX_DATA", str(tmp_path / "shared"))
    assert dataset_name(base.get_config().data) == "ucm10"  # the paper's lists
    own = base.get_config()
    own.data.root, own.data.split_lists, own.data.classes = str(tmp_path / "my_scenes/"), "", ()
    assert dataset_name(own.data) == "my_scenes"
    full = ucm21_comatch_resnet18.get_config()
    assert dataset_name(full.data) == "ucm21"  # $SSL_JAX_DATA/ucm: the paper's folder
    full.data.root = str(tmp_path / "other")
    assert dataset_name(full.data) == "other"
    full.data.name = "mine"  # a name the user chose is kept
    assert dataset_name(full.data) == "mine"
    own.data.source, own.data.tfds_name = "tfds", "eurosat/rgb"
    assert dataset_name(own.data) == "eurosat/rgb"
    root = tiny_folder(tmp_path / "tiny")
    config = make_config(root, split_lists="", classes=(), labels_per_class=1)
    assert load_dataset(config, workdir=None).summary()["dataset"] == "tiny"
