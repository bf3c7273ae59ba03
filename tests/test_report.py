"""python -m ssl_jax.report: two tiny seeds of one experiment become one mean ± std row."""

import csv
import importlib
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import less_optimized_compiles, tiny_run_config

from ssl_jax import evaluate, metric_writers, report

# One xdist worker builds this module's fixtures once (they are its costly part).
pytestmark = pytest.mark.xdist_group("report")

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_supervised(cache_dir, seed):
    """The tests' tiny supervised run (conftest.tiny_run_config) with the given seed."""
    config = tiny_run_config("ucm10_supervised", cache_dir)
    config.seed = seed
    return config


@pytest.fixture(scope="module")
def two_seeds(tiny_runs, supervised_run):
    """The session's tiny supervised run (seed 0, conftest.supervised_run) and seed 1 (only
    read here, for what the report groups and prints: built with optimisations mostly off)."""
    with less_optimized_compiles():
        seed1 = tiny_runs.get("ucm10_supervised", seed=1)
    for run, seed in ((supervised_run, 0), (seed1, 1)):
        assert run.config.to_dict() == tiny_supervised(run.config.data.cache_dir, seed).to_dict()
    return [supervised_run.workdir, seed1.workdir]


def _final_top1(workdir):
    return [r for r in metric_writers.read_metrics(str(workdir)) if r["kind"] == "eval"][-1]["top1"]


def test_report_cli_prints_mean_and_std_over_seeds(two_seeds, tmp_path):
    out = tmp_path / "tables" / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "ssl_jax.report", *map(str, two_seeds), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    top1 = [_final_top1(w) for w in two_seeds]
    mean, std = np.mean(top1), np.std(top1, ddof=1)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| Supervised")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[:5] == ["Supervised", "ucm10", "2", "ResNet-18 x0.125", "4 labels/class"]
    assert cells[5] == f"{mean:.2f} ± {std:.2f} (2)"
    assert cells[-1] == "2 (0, 1)"
    assert cells[9] == "8"  # steps
    assert out.with_suffix(".md").read_text() == proc.stdout

    with open(out.with_suffix(".csv")) as f:
        (row,) = list(csv.DictReader(f))
    assert int(row["n"]) == 2 and row["seeds"] == "0;1"
    assert float(row["top1_mean"]) == pytest.approx(mean)
    assert float(row["top1_std"]) == pytest.approx(std)
    assert float(row["train_seconds_mean"]) > 0  # read from the checkpoints' meta


def test_a_run_without_projection_head_skips_the_embedding_parts(two_seeds, tmp_path):
    workdir = shutil.copytree(two_seeds[0], tmp_path / "seed0")  # the shared run stays as is
    saved = json.loads((workdir / "config.json").read_text())
    config = tiny_supervised(saved["data"]["cache_dir"], 0)
    config.eval.figures = True
    result = evaluate.evaluate_workdir(str(workdir), config)
    out = workdir / "eval" / "8"
    assert result["embedding_metrics"]["available"] is False
    assert "no projection head" in result["embedding_metrics"]["reason"]
    assert not (out / "embeddings.npz").exists() and not (out / "tsne.png").exists()
    assert sorted(result["figures"]) == ["confusion_matrix.png", "training_curves.png"]
    assert result["top1"] == pytest.approx(_final_top1(two_seeds[0]))


def _fake_run(path, *, seed, top1s, mu=7, root="/data/a", workers=-1):
    """A workdir with only config.json and metrics.jsonl (no checkpoints: no training time)."""
    config = importlib.import_module("configs.base").get_config()
    config.seed, config.data.mu, config.data.root, config.data.workers = seed, mu, root, workers
    config.train.mean_of_last = 2
    path.mkdir(parents=True)
    (path / "config.json").write_text(config.to_json())
    lines = [{"kind": "run", "step": 0, "time": 0.0}]
    lines += [
        {"kind": "eval", "step": 1024 * (i + 1), "time": 0.0, "top1": t, "epoch": i + 1}
        for i, t in enumerate(top1s)
    ]
    if seed == 2:
        lines[-1]["peak_device_memory_bytes"] = 3 * 2**30
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return path


def test_grouping_ignores_seed_and_location_but_not_mu(tmp_path):
    runs = [
        _fake_run(tmp_path / "a", seed=0, top1s=[50.0, 70.0, 60.0]),
        _fake_run(tmp_path / "b", seed=1, top1s=[40.0, 90.0, 80.0], root="/data/b", workers=2),
        _fake_run(tmp_path / "c", seed=2, top1s=[10.0, 20.0, 70.0]),
        _fake_run(tmp_path / "d", seed=0, top1s=[30.0], mu=5),
    ]
    rows, table = report.build_report([str(r) for r in runs])
    assert [r["n"] for r in rows] == [3, 1] and [r["mu"] for r in rows] == [7, 5]
    first = rows[0]
    assert first["top1_mean"] == pytest.approx(70.0)
    assert first["top1_std"] == pytest.approx(10.0)  # 60, 80, 70: sample std 10
    assert first["best_top1_mean"] == pytest.approx((70 + 90 + 70) / 3)
    assert first["mean_top1_last_mean"] == pytest.approx((65 + 85 + 45) / 3)  # last 2 each
    assert first["steps"] == [3072] and first["peak_memory_gib"] == pytest.approx(3.0)
    assert first["train_seconds_mean"] is None
    assert "70.00 ± 10.00 (3)" in table and "| 30.00 |" in table
    assert "3072 of 524288" in table and "3.00 GiB" in table


def test_report_names_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "ssl_jax.report", str(tmp_path / "empty")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "not an ssl_jax training workdir" in proc.stderr
