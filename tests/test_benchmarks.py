"""The benchmark scripts run end to end and report what issue 6 asks of them."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

REQUIRED_KEYS = {
    "ms_per_step_median",
    "images_per_s",
    "compile_s",
    "device",
    "batch",
    "mu",
    "model",
    "algorithm",
    "jax",
    "flax",
}

# Runs the benchmark in a fresh Python in which tensorflow_datasets cannot be imported, as on
# the GPU machine (which lacks it).
WITHOUT_TFDS = (
    "import runpy, sys; sys.modules['tensorflow_datasets'] = None; "
    "sys.argv = ['step_throughput.py', *sys.argv[1:]]; "
    "runpy.run_path('benchmarks/step_throughput.py', run_name='__main__')"
)


# These tests check that the scripts run and report, not how fast: XLA's optimisations mostly
# off builds their programs in a fraction of the time (the scripts switch the compilation cache
# off, so every run compiles).
LESS_OPTIMIZED = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


def run_json(*command: str) -> dict:
    """Runs a benchmark in a fresh Python from the repository root; its last line, parsed."""
    proc = subprocess.run(
        [sys.executable, *command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=LESS_OPTIMIZED,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.heavy(25)
def test_step_throughput_runs_without_tfds_and_reports_json(tmp_path):
    result = run_json(
        "-c",
        WITHOUT_TFDS,
        "--algorithm=comatch_triplet",
        "--model=resnet18",
        "--width=0.125",
        "--batch=4",
        "--mu=2",
        "--images=64",
        "--steps=3",
        "--warmup=1",
        "--augment=device",
    )
    assert REQUIRED_KEYS <= result.keys()
    assert (result["algorithm"], result["model"], result["batch"], result["mu"]) == (
        "comatch_triplet",
        "resnet18",
        4,
        2,
    )
    assert result["images_per_step"] == 4 + 3 * 2 * 4 == 28  # B + three views of mu * B
    assert result["ms_per_step_median"] > 0 and result["compile_s"] > 0
    assert result["ms_per_step_p10"] <= result["ms_per_step_median"] <= result["ms_per_step_p90"]
    assert abs(result["images_per_s"] - 1e3 * 28 / result["ms_per_step_median"]) < 1
    assert result["loss_finite"] is True
    assert result["device"].startswith("cpu")


def test_sweep_table_reports_failures_instead_of_dropping_them():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import sweep
    finally:
        sys.path.pop(0)
    row = sweep.run_one("no_such_algorithm", "resnet18", ["--steps=1"], "")
    assert "error" in row and row["algorithm"] == "no_such_algorithm"
    table = sweep.markdown([row])
    assert "no_such_algorithm" in table and "failed:" in table


@pytest.mark.heavy(40)
def test_step_breakdown_times_every_variant():
    # FixMatch: the smallest method with every piece (EMA, norms, optimizer, a loss beyond the
    # supervised one); the script is the same for every method.
    result = run_json(
        "benchmarks/step_breakdown.py",
        "--algorithm=fixmatch",
        "--width=0.125",
        "--batch=4",
        "--mu=1",
        "--steps=2",
        "--warmup=1",
    )
    medians = result["ms_median"]
    assert list(medians) == ["full", "no_ema", "no_norms", "plain_sgd", "network_only"]
    assert all(value > 0 for value in medians.values())
    # Each piece is named after what its two neighbouring variants differ by (the docstring's
    # order): a piece attributed to the wrong pair of variants fails here.
    neighbours = {
        "ema": ("full", "no_ema"),
        "norms": ("no_ema", "no_norms"),
        "optimizer": ("no_norms", "plain_sgd"),
        "losses": ("plain_sgd", "network_only"),
    }
    pieces = result["ms_pieces"]
    assert set(pieces) == {*neighbours, "network_and_sgd"}
    for name, (with_piece, without) in neighbours.items():
        assert pieces[name] == pytest.approx(medians[with_piece] - medians[without], abs=0.051)
    assert pieces["network_and_sgd"] == medians["network_only"]
    assert (result["algorithm"], result["batch"], result["mu"]) == ("fixmatch", 4, 1)
    # Each variant really left its piece out (and kept the ones after it).
    checks = result["checks"]
    assert checks["full"]["ema_moved"] and not checks["no_ema"]["ema_moved"]
    assert checks["no_ema"]["grad_norm"] > 0 and checks["no_norms"]["grad_norm"] == 0
    assert "loss_x" in checks["plain_sgd"]["loss_keys"]
    assert checks["network_only"]["loss_keys"] == []


LOOP_KEYS = {
    "steps_per_dispatch",
    "ms_per_step_loop",
    "ms_per_step_program",
    "host_ms_per_step",
    "device",
    "model",
    "width",
    "batch",
    "mu",
    "algorithm",
}


@pytest.mark.heavy(35)
def test_loop_throughput_times_the_real_loop_and_the_program_alone():
    # The supervised method: the loop around the step is the same for every method, and its
    # program compiles fastest.
    result = run_json(
        "benchmarks/loop_throughput.py",
        "--algorithm=supervised",
        "--width=0.0625",
        "--batch=4",
        "--mu=1",
        "--images=64",
        "--steps=8",
        "--warmup=4",
        "--rounds=2",
        "--steps-per-dispatch=4",
    )
    assert LOOP_KEYS <= result.keys()
    assert result["steps_per_dispatch"] == 4 and result["augment"] == "device"
    assert len(result["loop_ms_rounds"]) == len(result["program_ms_rounds"]) == 2
    assert len(result["host_only_ms_rounds"]) == 2
    assert result["ms_per_step_loop"] > 0 and result["ms_per_step_program"] > 0
    # The host's own work (an empty program in the same loop) is a part of the whole loop.
    assert 0 < result["host_only_ms_per_step"] < result["ms_per_step_loop"]
