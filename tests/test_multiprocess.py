"""Several processes, one run (`ssl_jax.distributed`): 2 processes x 2 CPU devices on localhost
train the function of 1 process x 4 devices and of 1 process x 1 device, on both data paths;
a dead process stops the other; the same commands resume bit-identically.

Processes meet on a free localhost port; JAX carries the collectives (gloo on CPU). Every
compared run is built alike (XLA's optimisations mostly off, as in conftest's
`less_optimized_compiles`), and every run is `configs/demo.py:smoke` (the sample shipped in
the package: no real data needed), cut to 8 steps.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from ssl_jax import distributed, evaluate, metric_writers, run, train
from ssl_jax.run_config import CheckpointError

REPO = pathlib.Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "multiprocess_driver.py"

pytestmark = [
    pytest.mark.xdist_group("multiprocess"),
    pytest.mark.heavy(150),  # the whole module, first: its runs are one unit of work
]

STEPS = 8
# The semi-hard triplet miner is a discrete choice among near-tied triplets: a triplet on the
# edge of its window adds ~0 to the loss but a whole gradient, so a last-bit difference in a
# reduction (gloo across processes, XLA within one) moves later steps apart. As in
# test_seeds: a 10x smaller lr than the paper's, step 1 compared tightly, later steps at a few
# percent.
LR = 0.003
FIRST_RTOL, FIRST_GRAD_NORM_RTOL = 2e-4, 1.5e-2
ALL_VARIANTS = {
    "triplet-device": {"algorithm.name": "comatch_triplet", "augment.where": "device"},
    "fixmatch-host": {"algorithm.name": "fixmatch", "augment.where": "host"},
    "triplet-host": {"algorithm.name": "comatch_triplet", "augment.where": "host"},
    "fixmatch-device": {"algorithm.name": "fixmatch", "augment.where": "device"},
}
# Every 2-process run compiles its programs in both processes (~40 s of CPU per variant), so
# the suite runs one variant per algorithm and per data path; SSL_JAX_TEST_MULTIPROCESS=full
# runs all four combinations.
FULL = os.environ.get("SSL_JAX_TEST_MULTIPROCESS") == "full"
VARIANTS = {k: v for i, (k, v) in enumerate(ALL_VARIANTS.items()) if FULL or i < 2}
# After step 1 (compared tightly), how far apart later steps may drift (float32
# reassociation, amplified by the near-tie choices of pseudo-labels and mined triplets).
# Measured: identical to 4 decimals over 6 steps, 0.5 % apart by step 8 (loss_dml 4 %), for
# CoMatch+Triplet/device, FixMatch/host and FixMatch/device. KNOWN DEFECT: CoMatch (with or
# without the triplet term) on the host path across 2 processes gives bit-identical losses
# at step 1 but gradients 1e-4 apart (1 process x 4 devices matches 1 x 1 there), and later
# steps drift by up to ~17 %; likely (not confirmed) reassociation in gloo's cross-process
# sums amplified by BatchNorm over 2-row device batches and CoMatch's sharp losses. That
# combination (opt-in, `full`) checks step 1 and is marked xfail beyond it.
KNOWN_DRIFT = {"triplet-host"}
DEFAULT_LATER_RTOL = 2e-2
DML_RTOL = 0.15  # measured: 4 % apart at step 8 on the device path
COUNTS = ("mask_prob", "triplet_mined", "triplet_valid", "triplet_positive")
HEARTBEAT_LIMIT_S = 60  # a dead process must stop the others within this


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def overrides(name: str, cache: pathlib.Path) -> dict:
    return {
        **VARIANTS[name],
        "optim.lr": LR,
        "train.total_steps": STEPS,
        "train.steps_per_epoch": STEPS,
        "train.log_every": 1,  # step 1 alone: from identical states, only reassociation apart
        "train.checkpoint_every": 2,
        "eval.figures": False,
        "eval.after_training": False,
        "data.cache_dir": str(cache),
        "data.crop_size": 32,  # the same code at a quarter of the pixels
    }


def environment(devices: int) -> dict:
    return dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",
        PYTHONUNBUFFERED="1",
    )


def start(args, devices, log: pathlib.Path) -> subprocess.Popen:
    out = open(log, "w")  # noqa: SIM115 - the child writes it; closed with the process
    return subprocess.Popen(
        [sys.executable, *map(str, args)],
        cwd=REPO,
        env=environment(devices),
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # one process group per process: killed as a unit
    )


def distributed_flags(port: int, process_id: int) -> list[str]:
    return [
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
        f"--process_id={process_id}",
    ]


def finish(procs, timeout=300) -> list[int]:
    """Waits for every process (killing them all past `timeout`); their return codes."""
    deadline = time.time() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return [proc.returncode for proc in procs]


def records(workdir, kind):
    return [r for r in metric_writers.read_metrics(str(workdir)) if r["kind"] == kind]


# 1 process x 4 devices for FixMatch on the host path (its cheapest program;
# test_parallel_precision checks 4 devices against 1 within one process for CoMatch+Triplet).
FOUR_DEVICE_VARIANTS = ("fixmatch-host",)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{topology: {variant: workdir}} for topologies "2x2", "1x4", "1x1"; the single-process
    drivers run one after the other, beside the two processes of the multi-process one."""
    root = tmp_path_factory.mktemp("multiprocess")
    cache = root / "decoded"
    out = {
        "2x2": {n: root / "2x2" / n for n in VARIANTS},
        "1x4": {n: root / "1x4" / n for n in FOUR_DEVICE_VARIANTS},
        "1x1": {n: root / "1x1" / n for n in VARIANTS},
    }

    def spec(topology):
        return json.dumps(
            [
                {"workdir": str(w), "overrides": overrides(n, cache)}
                for n, w in out[topology].items()
            ]
        )

    port = free_port()
    procs = [
        start([DRIVER, spec("2x2"), *distributed_flags(port, i)], 2, root / f"2x2.{i}.log")
        for i in (0, 1)
    ]
    single = [
        ([DRIVER, spec("1x1")], 1, root / "1x1.log"),
        ([DRIVER, spec("1x4")], 4, root / "1x4.log"),
    ]
    codes = []
    try:
        for args, devices, log in single:
            codes += finish([start(args, devices, log)], timeout=600)
    finally:
        codes = finish(procs, timeout=600) + codes
    logs = {p.name: p.read_text()[-3000:] for p in sorted(root.glob("*.log"))}
    assert codes == [0, 0, 0, 0], logs
    out["logs"] = logs
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_processes_train_the_function_of_one(variant, runs):
    two = runs["2x2"][variant]
    (row,) = records(two, "run")  # process 0 alone writes the record
    assert (row["process_count"], row["global_device_count"]) == (2, 4)
    assert row["augment_where"] == VARIANTS[variant]["augment.where"]
    assert (
        f"[step {STEPS}/{STEPS}]" in runs["logs"]["2x2.0.log"]
    )  # process 0 prints the progress ...
    assert "[step" not in runs["logs"]["2x2.1.log"]  # ... process 1 none
    a = records(two, "train")
    assert [r["step"] for r in a] == list(range(1, STEPS + 1))
    for other in ("1x4", "1x1") if variant in FOUR_DEVICE_VARIANTS else ("1x1",):
        b = records(runs[other][variant], "train")
        assert [r["step"] for r in b] == list(range(1, STEPS + 1))
        keys = [k for k in ("loss", "loss_x", "loss_u", "loss_c", "loss_dml") if k in a[0]]
        for i, (ra, rb) in enumerate(zip(a, b, strict=True)):
            if i == 0:  # step 1, from identical states: only reassociation apart
                for key in COUNTS:
                    if key in ra:
                        assert ra[key] == rb[key], (other, key)
                np.testing.assert_allclose(
                    [ra[k] for k in keys], [rb[k] for k in keys], rtol=FIRST_RTOL, err_msg=other
                )
                np.testing.assert_allclose(
                    ra["grad_norm"], rb["grad_norm"], rtol=FIRST_GRAD_NORM_RTOL
                )
            elif variant in KNOWN_DRIFT:
                pytest.xfail("CoMatch on the host path drifts across processes after step 1")
            else:
                rtol = DEFAULT_LATER_RTOL
                np.testing.assert_allclose(
                    [ra[k] for k in keys if k != "loss_dml"],
                    [rb[k] for k in keys if k != "loss_dml"],
                    rtol=rtol,
                    err_msg=other,
                )
                if "loss_dml" in keys:  # a mean over the mined triplets, a near-tie count
                    np.testing.assert_allclose(ra["loss_dml"], rb["loss_dml"], rtol=DML_RTOL)
            np.testing.assert_allclose(ra["param_norm"], rb["param_norm"], rtol=1e-4)
        # The same evaluation, up to a few of the 100 test images.
        (ea,), (eb,) = records(two, "eval"), records(runs[other][variant], "eval")
        assert abs(ea["top1"] - eb["top1"]) <= 3.0, (other, ea["top1"], eb["top1"])


def test_a_multi_process_checkpoint_evaluates_in_one_process_and_refuses_another_count(
    runs, less_optimized
):
    workdir = runs["2x2"]["triplet-device"]
    result = evaluate.evaluate_workdir(str(workdir))
    (in_training,) = records(workdir, "eval")
    assert result["step"] == STEPS and result["top1"] == in_training["top1"]
    config = train.checkpoint_lib.load_saved_config(str(workdir))
    config.train.total_steps = STEPS
    with pytest.raises(CheckpointError, match=r"trained by 2 process\(es\) and this run has 1"):
        train.train_and_evaluate(config, str(workdir))


def test_launch_checks_its_distributed_flags():
    with pytest.raises(ValueError, match="missing: --process_id"):
        distributed.Launch("localhost:1234", 2).check()
    with pytest.raises(ValueError, match=r"--process_id must be in \[0, 1\]"):
        distributed.Launch("localhost:1234", 2, 2).check()
    with pytest.raises(ValueError, match="host:port"):
        distributed.Launch("localhost", 2, 0).check()
    distributed.Launch(auto=True).check()  # JAX detects the rest
    assert not distributed.Launch().wanted
    with pytest.raises(SystemExit, match="--mode eval runs in one process"):
        run.main("eval", None, "/nonexistent", launch=distributed.Launch("localhost:1", 2, 0))


def launch_command(workdir, cache, port, process_id) -> list[str]:
    flags = [f"--config.{k}={v}" for k, v in overrides("triplet-device", cache).items()]
    return [
        REPO / "launch.py",
        "--config=configs/demo.py:smoke",
        f"--workdir={workdir}",
        *flags,
        *distributed_flags(port, process_id),
    ]


def test_sigkill_of_one_process_stops_the_other_and_the_same_commands_resume_exactly(
    runs, tmp_path
):
    """launch.py's flags: process 1 is SIGKILLed mid-run, after a checkpoint; process 0 stops
    within a minute, saying another process died; the same two commands then resume from the
    checkpoint and log exactly what the uninterrupted run (the driver's 2x2 run) logged."""
    workdir = tmp_path / "killed"
    cache = runs["2x2"]["triplet-device"].parent.parent / "decoded"
    port = free_port()
    procs = [
        start(launch_command(workdir, cache, port, i), 2, tmp_path / f"killed.{i}.log")
        for i in (0, 1)
    ]
    try:
        # Once step 5 is logged, checkpoint 2 is complete in every process (saving 4 waited
        # for it), so the kill lands in training, not in a save's cross-process barrier.
        deadline = time.time() + 300
        while len(records(workdir, "train")) < 5 and time.time() < deadline:
            assert all(p.poll() is None for p in procs), (tmp_path / "killed.0.log").read_text()
            time.sleep(0.01)
        lock = json.loads((workdir / ".lock").read_text())
        assert lock["pid"] == procs[0].pid  # process 0 holds the workdir lock
        os.killpg(procs[1].pid, signal.SIGKILL)
        killed_at = time.time()
        codes = finish(procs[:1], timeout=HEARTBEAT_LIMIT_S + 30)
        stopped_after = time.time() - killed_at
    finally:
        finish(procs, timeout=1)
    log = (tmp_path / "killed.0.log").read_text()
    assert codes[0] != 0 and stopped_after < HEARTBEAT_LIMIT_S, (stopped_after, log[-3000:])
    # Either the next collective fails at once (the peer's connection is gone) or JAX's
    # coordination service misses its heartbeats; either way the log says a process died.
    assert "Process 0 of 2 stops" in log or "another task died" in log, log[-3000:]
    steps_before = [r["step"] for r in records(workdir, "train")]
    assert max(steps_before) < STEPS, "the run was not interrupted mid-way"

    port = free_port()
    procs = [
        start(launch_command(workdir, cache, port, i), 2, tmp_path / f"rerun.{i}.log")
        for i in (0, 1)
    ]
    assert finish(procs) == [0, 0], (tmp_path / "rerun.0.log").read_text()[-3000:]
    assert "Resuming from step" in (tmp_path / "rerun.0.log").read_text()
    a, b = records(runs["2x2"]["triplet-device"], "train"), records(workdir, "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b, strict=True):
        assert {k: v for k, v in ra.items() if "time" not in k and k not in TIMING} == {
            k: v for k, v in rb.items() if "time" not in k and k not in TIMING
        }


TIMING = ("img_per_s", "steps_per_s", "eta_s")
