"""The quickstart: the sample data shipped in the package and configs/demo.py, end to end."""

import csv
import importlib.resources
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import base, demo

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = pathlib.Path(str(importlib.resources.files("ssl_jax").joinpath("sample_data")))
FIGURES = ("confusion_matrix.png", "tsne.png", "tsne_epochs.png", "training_curves.png")


def test_sample_holds_20_real_64px_images_per_paper_class():
    root = SAMPLE / "ucm10_sample"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert classes == sorted(base.UCM10_CLASSES)
    with open(root / "manifest.csv") as f:
        manifest = {r["png"]: r for r in csv.DictReader(f)}
    for name in classes:
        files = sorted(p.name for p in (root / name).iterdir())
        assert files == [f"{name}{i:02d}.png" for i in range(20)]  # the first 20 by name
        for file in files:
            with Image.open(root / name / file) as im:
                assert im.size == (64, 64) and im.mode == "RGB"
            assert manifest[f"{name}/{file}"]["source_path"].endswith(f"{name}/{file[:-4]}.tif")
    assert len(manifest) == 200
    readme = (root / "README.md").read_text()
    for fact in ("Yang", "Newsam", "public domain", "USGS", "BILINEAR"):
        assert fact in readme


def test_sample_images_are_byte_copies_of_the_shared_data(shared_data):
    root = SAMPLE / "ucm10_sample"
    for png in sorted(root.glob("*/*.png"))[::17]:
        original = shared_data / "ucm" / png.parent.name / png.name
        assert png.read_bytes() == original.read_bytes()


def test_demo_config_points_at_the_sample():
    config = demo.get_config()
    assert pathlib.Path(config.data.root) == SAMPLE / "ucm10_sample"
    assert config.data.split_lists == "" and config.data.test_fraction == 0.5
    assert tuple(config.data.classes) == base.UCM10_CLASSES
    assert config.data.protocol == "k_per_class" and config.data.labels_per_class == 4
    assert config.algorithm.name == "comatch_triplet" and config.model.low_dim == 64
    assert -1 in config.train.save_embeddings_epochs
    smoke = demo.get_config("smoke")
    assert smoke.train.total_steps < config.train.total_steps
    assert smoke.data.root == config.data.root


@pytest.mark.heavy(40)
def test_demo_smoke_trains_evaluates_and_draws_every_figure(tmp_path):
    # The step counts of the tests' tiny runs (conftest.tiny_run_config): the demo's model,
    # batch and method are those of the tiny CoMatch+Triplet run, so the two share their
    # compiled programs through the compilation cache.
    workdir = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch.py"),
            "--config",
            "configs/demo.py:smoke",
            "--workdir",
            str(workdir),
            "--config.train.total_steps=8",
            "--config.train.steps_per_epoch=4",
            "--config.train.log_every=2",
            "--config.train.checkpoint_every=4",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == 8 and summary["eval"]["num_test"] == 100
    split = json.loads((workdir / "split.json").read_text())
    assert (len(split["train"]), len(split["test"]), len(split["labelled"])) == (100, 100, 40)
    out = workdir / "eval" / "8"
    for name in FIGURES:
        with Image.open(out / name) as im:
            assert np.asarray(im.convert("L")).std() > 5, name
    assert sorted(summary["eval"]["figures"]) == sorted(FIGURES)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["embedding_metrics"]["available"] and metrics["num_test"] == 100
    assert metrics["tsne_perplexity"] == 30.0  # (100 - 1) / 3 = 33 allows the configured 30
    assert (out / "confusion_matrix.csv").exists() and (out / "embeddings.npz").exists()
