"""End to end on real UCM10 images with tiny models: train, log, checkpoint, resume, evaluate."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_run_config
from helpers import copy_test_images

from ssl_jax import checkpoint as checkpoint_lib
from ssl_jax import data as data_lib
from ssl_jax import dispatch, evaluate, metric_writers, predict, train, train_state
from ssl_jax.algorithms import get_algorithm
from ssl_jax.workdir_lock import WorkdirLock, WorkdirLockedError

REPO = pathlib.Path(__file__).resolve().parents[1]


def records(workdir, kind):
    return [r for r in metric_writers.read_metrics(str(workdir)) if r["kind"] == kind]


def test_supervised_run_logs_checkpoints_and_evaluates(supervised_run, tmp_path):
    """The tiny supervised run (conftest.supervised_run, trained once per session)."""
    run_dir, meta = supervised_run.workdir, supervised_run.meta
    # Jitted once, never retraced in the loop: one function, one compiled signature.
    assert len(supervised_run.programs) == 1 and supervised_run.compiled_signatures == [1]

    logged = records(run_dir, "train")
    assert [r["step"] for r in logged] == [2, 4, 6, 8]
    for key in ("loss", "loss_x", "lr", "grad_norm", "param_norm", "img_per_s", "eta_s"):
        assert all(np.isfinite(r[key]) for r in logged), key
    evals = records(run_dir, "eval")
    assert [r["step"] for r in evals] == [4, 8]
    assert evals[-1]["best_top1"] == max(r["top1"] for r in evals)
    assert evals[-1]["mean_top1_last"] == pytest.approx(np.mean([r["top1"] for r in evals]))
    assert all(0 <= r["top1"] <= r["top5"] <= 100 and r["num_test"] == 500 for r in evals)
    assert meta["best_top1"] == evals[-1]["best_top1"]
    assert (run_dir / "config.json").exists()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [
        4,
        8,
    ]

    # --mode eval restores only the EMA weights and reproduces the last in-training evaluation.
    copy = supervised_run.copy_to(tmp_path / "run")
    result = evaluate.evaluate_workdir(str(copy))
    assert result["step"] == 8 and result["top1"] == evals[-1]["top1"]
    assert json.loads((copy / "eval" / "8" / "metrics.json").read_text())["top1"] == result["top1"]


class _Interrupt(Exception):
    pass


def test_comatch_triplet_resume_is_bit_identical(triplet_run, tmp_path, monkeypatch):
    """An interrupted run, resumed, logs exactly the losses of an uninterrupted one (the
    session's tiny CoMatch+Triplet run, conftest.triplet_run)."""
    config = triplet_run.fresh_config()
    full, interrupted = triplet_run.workdir, tmp_path / "interrupted"

    write = metric_writers.MetricWriter.write

    def dying_write(self, kind, step, values):
        if kind == "train" and step == 6:
            raise _Interrupt  # after the step-4 checkpoint, before the step-8 one
        return write(self, kind, step, values)

    monkeypatch.setattr(metric_writers.MetricWriter, "write", dying_write)
    with pytest.raises(_Interrupt):
        train.train_and_evaluate(config, str(interrupted))
    monkeypatch.setattr(metric_writers.MetricWriter, "write", write)
    assert max(r["step"] for r in records(interrupted, "train")) == 4
    train.train_and_evaluate(config, str(interrupted))

    keys = (
        "loss",
        "loss_x",
        "loss_u",
        "loss_c",
        "loss_dml",
        "mask_prob",
        "triplet_mined",
        "grad_norm",
        "param_norm",
    )
    a, b = records(full, "train"), records(interrupted, "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [2, 4, 6, 8]
    for ra, rb in zip(a, b, strict=True):
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}
    assert [r["top1"] for r in records(full, "eval")] == [
        r["top1"] for r in records(interrupted, "eval")
    ]


def _poison_from_step(monkeypatch, first_bad_step):
    """The supervised loss turns NaN from `first_bad_step` on (tiny runs: 4 steps per epoch)."""
    supervised = get_algorithm("supervised")

    def poisoned(**kwargs):
        loss, aux = supervised.loss_from_outputs(**kwargs)
        step = kwargs["epoch"] * 4 + kwargs["iteration"]
        return loss * jnp.where(step >= first_bad_step, jnp.nan, 1.0), aux

    monkeypatch.setattr(
        train_state,
        "get_algorithm",
        lambda name: dataclasses.replace(supervised, loss_from_outputs=poisoned),
    )


@pytest.mark.heavy(25)
def test_non_finite_loss_stops_the_run_names_the_last_good_checkpoint_and_can_continue(
    tmp_path, decoded_cache, monkeypatch, less_optimized
):
    _poison_from_step(monkeypatch, 5)
    config = tiny_run_config("ucm10_supervised", decoded_cache)
    with pytest.raises(train.NonFiniteLossError, match="between steps 5 and 6") as err:
        train.train_and_evaluate(config, str(tmp_path))
    assert "last good checkpoint is step 4" in str(err.value)
    assert "--config.train.resume_changes" in str(err.value)
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), read_only=True)
    assert checkpointer.manager.all_steps() == [4]
    checkpointer.close()
    model, variables, step, _ = evaluate.restore_model(str(tmp_path), config)
    assert step == 4
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables))

    # Following the advice: the same config with a lower lr is refused unless named...
    monkeypatch.undo()
    config.optim.lr = 0.01
    with pytest.raises(checkpoint_lib.CheckpointError, match="resume_changes"):
        train.train_and_evaluate(config, str(tmp_path))
    # ...and continues from step 4 when named, recording the change.
    config.train.resume_changes = ("optim.lr",)
    train.train_and_evaluate(config, str(tmp_path))
    rows = metric_writers.read_metrics(str(tmp_path))
    changes = [r for r in rows if r["kind"] == "resume_changes"]
    assert changes and changes[0]["step"] == 4
    assert changes[0]["changes"] == [{"key": "optim.lr", "saved": 0.03, "now": 0.01}]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [2, 4, 6, 8]
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == 0.01


def test_non_finite_loss_before_any_checkpoint_says_there_is_none(
    tmp_path, decoded_cache, monkeypatch, less_optimized
):
    _poison_from_step(monkeypatch, 0)
    config = tiny_run_config("ucm10_supervised", decoded_cache)
    with pytest.raises(train.NonFiniteLossError, match="between steps 1 and 2") as err:
        train.train_and_evaluate(config, str(tmp_path))
    assert "No checkpoint was written" in str(err.value)
    assert not list((tmp_path / "checkpoints").glob("[0-9]*"))


def test_eval_errors_name_the_problem(tmp_path):
    with pytest.raises(checkpoint_lib.CheckpointError, match="does not exist"):
        evaluate.evaluate_workdir(str(tmp_path / "missing"))
    with pytest.raises(checkpoint_lib.CheckpointError, match="not an ssl_jax training workdir"):
        evaluate.evaluate_workdir(str(tmp_path))


def _launch(workdir, *extra):
    return [
        sys.executable,
        str(REPO / "launch.py"),
        "--config",
        "configs/ucm10_supervised.py:smoke",
        "--workdir",
        str(workdir),
        "--config.train.total_steps=32",
        "--config.train.steps_per_epoch=16",
        "--config.train.checkpoint_every=8",
        "--config.train.log_every=8",
        "--config.eval.after_training=False",
        "--config.train.steps_per_dispatch=4",
        *extra,
    ]


def _start(workdir, cache, env, **popen):
    return subprocess.Popen(_launch(workdir, cache), cwd=REPO, env=env, **popen)


def _finish(proc, timeout=600):
    """Waits for a run started with pipes; (returncode, stderr)."""
    _, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stderr


@pytest.mark.heavy(50)
def test_sigkill_or_sigterm_then_rerun_matches_uninterrupted_and_a_second_run_is_refused(
    tmp_path, decoded_cache
):
    """K steps per dispatch (K = 4 here): SIGKILL, or SIGTERM (a checkpoint at the next
    dispatch boundary, with the partial metric sums), then the same command again, logs what
    an uninterrupted run logs; a second run on a workdir in use fails at once, naming it.

    The uninterrupted run goes first (it compiles; the others load its program from the
    compilation cache); then the two interrupted runs side by side, and their two reruns side
    by side (each run spends most of its time starting up, on one core)."""
    env = dict(os.environ)
    cache = f"--config.data.cache_dir={decoded_cache}"
    full, killed, termed = tmp_path / "full", tmp_path / "killed", tmp_path / "termed"
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    returncode, stderr = _finish(_start(full, cache, env, **pipes))
    assert returncode == 0, stderr[-3000:]
    # Checkpoints 8 and 24 fall between evaluations (no EMA top-1): saved without a warning.
    assert "did not provide metrics" not in stderr, stderr[-3000:]
    assert [r["steps_per_dispatch"] for r in records(full, "run")] == [4]

    procs = {
        killed: _start(killed, cache, env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        termed: _start(termed, cache, env, **pipes),
    }
    try:
        waiting, deadline = dict(procs), time.time() + 300
        while waiting and time.time() < deadline:
            for workdir, proc in list(waiting.items()):
                if (workdir / "checkpoints" / "8").is_dir() or proc.poll() is not None:
                    del waiting[workdir]  # its first checkpoint is written (or it ended)
                    if workdir == termed:  # this test's process: a second run, refused
                        with pytest.raises(WorkdirLockedError, match=f"pid {proc.pid} on host"):
                            WorkdirLock(str(termed)).acquire()
                    proc.send_signal(signal.SIGKILL if workdir == killed else signal.SIGTERM)
            time.sleep(0.02)
        procs[killed].wait(timeout=300)
        steps_before = [r["step"] for r in records(killed, "train")]
        assert (killed / "checkpoints" / "8").is_dir() and max(steps_before) < 32, (
            "the run was not interrupted mid-way"
        )
        returncode, stderr = _finish(procs[termed], timeout=300)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    assert returncode != 0 and "Stopped by SIGTERM after step" in stderr, stderr[-2000:]
    stopped_at = int(stderr.split("Stopped by SIGTERM after step ")[1].split()[0])
    assert stopped_at % 4 == 0 and (termed / "checkpoints" / str(stopped_at)).is_dir()

    reruns = {workdir: _start(workdir, cache, env, **pipes) for workdir in (killed, termed)}
    finished = {workdir: _finish(proc) for workdir, proc in reruns.items()}
    for workdir, (returncode, stderr) in finished.items():
        assert returncode == 0, stderr[-3000:]
        a, b = records(full, "train"), records(workdir, "train")
        assert [r["step"] for r in a] == [r["step"] for r in b]
        assert [(r["loss"], r["grad_norm"]) for r in a] == [(r["loss"], r["grad_norm"]) for r in b]


def test_resume_refuses_data_that_changed_since_the_checkpoint(
    supervised_run, tmp_path, monkeypatch
):
    config = supervised_run.fresh_config()  # 8 steps, finished: a copy of the session's run
    workdir = supervised_run.copy_to(tmp_path / "run")
    split_before = (workdir / "split.json").read_text()
    load = train.data_lib.load_dataset
    monkeypatch.setattr(
        train.data_lib,
        "load_dataset",
        lambda *a, **k: dataclasses.replace(load(*a, **k), split_hash="0123456789abcdef"),
    )
    config.train.total_steps = 16  # train further: a changed schedule is refused first...
    with pytest.raises(checkpoint_lib.CheckpointError, match="different config"):
        train.train_and_evaluate(config, str(workdir))
    config.train.total_steps = 8  # ...so rerun the same config: the data check must fire
    with pytest.raises(checkpoint_lib.CheckpointError, match="data changed"):
        train.train_and_evaluate(config, str(workdir))
    assert (workdir / "split.json").read_text() == split_before


def test_resume_fills_config_keys_added_since_with_their_defaults(tmp_path):
    """A config.json written before a key existed resumes at the key's base.py default."""
    from configs import base

    config = base.get_config("smoke")
    (tmp_path / "checkpoints").mkdir()
    saved = json.loads(config.to_json_best_effort())
    del saved["optim"]["nesterov"]  # as if written before optim.nesterov was added
    del saved["eval"]["after_training"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    checkpoint_lib.check_config_compatible(config, str(tmp_path))  # default: compatible
    assert checkpoint_lib.load_saved_config(str(tmp_path)).optim.nesterov is True
    config.optim.nesterov = False  # not the default the old run trained with
    with pytest.raises(checkpoint_lib.CheckpointError, match="optim.nesterov: saved True"):
        checkpoint_lib.check_config_compatible(config, str(tmp_path))
    config.optim.nesterov = True
    config.optim.momentum = 0.5  # a key the old config has is still compared as before
    with pytest.raises(checkpoint_lib.CheckpointError, match="optim.momentum"):
        checkpoint_lib.check_config_compatible(config, str(tmp_path))


@pytest.mark.heavy(15)
@pytest.mark.parametrize(
    "name", ["ucm10_fixmatch", "ucm10_fixmatch_ccssl", "ucm10_comatch", "ucm10_ccssl_od"]
)
def test_every_method_trains_on_real_ucm10(
    name, tmp_path, decoded_cache, monkeypatch, less_optimized
):
    """Each method's smoke config runs in the real loop and logs its own loss terms.

    FixMatch's run crops to 56 px (`data.crop_size`, host augmentation): it trains on 56-px
    views, evaluates and predicts at 56 px (the device path: test_dispatch)."""
    config = tiny_run_config(
        name, decoded_cache, total_steps=4, steps_per_epoch=4, checkpoint_every=4
    )
    crop = 56 if name == "ucm10_fixmatch" else 60
    config.data.crop_size = crop
    trained_on, evaluated_on, predicted_on = set(), set(), set()
    shard_block, test_batches = dispatch.shard_block, data_lib.test_batches
    monkeypatch.setattr(
        dispatch,
        "shard_block",
        lambda block, *a, **k: (
            trained_on.update(v.shape[-3:-1] for v in block.values() if np.ndim(v) == 5)
            or shard_block(block, *a, **k)
        ),
    )

    def recording_test_batches(*args, **kwargs):
        for batch in test_batches(*args, **kwargs):
            evaluated_on.add(batch["image"].shape[1:3])
            yield batch

    monkeypatch.setattr(data_lib, "test_batches", recording_test_batches)
    train.train_and_evaluate(config, str(tmp_path))
    if crop != 60:  # predict with the run's saved config, on two of its test images
        load_images = predict.load_prediction_images
        monkeypatch.setattr(
            predict,
            "load_prediction_images",
            lambda *a, **k: [predicted_on.add(v.shape[:2]) or v for v in load_images(*a, **k)],
        )
        saved = checkpoint_lib.load_saved_config(str(tmp_path))
        saved.predict.input = str(copy_test_images(tmp_path, tmp_path / "images", 2))
        assert predict.predict_workdir(str(tmp_path), saved)["num_images"] == 2
        assert predicted_on == {(crop, crop)}
    assert trained_on == evaluated_on == {(crop, crop)}
    logged = records(tmp_path, "train")
    expected = {"loss", "loss_x", "loss_u", "mask_prob", "pseudo_acc"}
    expected |= {"loss_ccssl"} if "ccssl" in name else set()
    expected |= {"loss_c"} if "comatch" in name or "ccssl_od" in name else set()
    assert expected <= set(logged[-1]), expected - set(logged[-1])
    assert all(np.isfinite(r["loss"]) for r in logged)
    assert records(tmp_path, "eval")[-1]["step"] == 4
