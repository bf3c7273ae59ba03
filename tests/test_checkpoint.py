"""Checkpoints: retention and step selection, recovery from damaged checkpoints, failed saves,
resume with deliberately changed config values."""

import glob
import json
import os
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from ml_collections import ConfigDict

from configs import base
from ssl_jax import checkpoint as checkpoint_lib
from ssl_jax import config_checks


def _config(keep):
    return ConfigDict({"train": {"keep_checkpoints": keep}})


def test_keeps_the_latest_and_the_best_and_selects_steps(tmp_path):
    manager = checkpoint_lib.Checkpointer(str(tmp_path), _config(keep=2))
    for step, top1 in [(1, 50.0), (2, 90.0), (3, 60.0), (4, None), (5, 70.0)]:
        state = {"w": jnp.full((3,), float(step))}
        manager.save(step, state, {"step": step}, ema_top1=top1)
    manager.close()

    reader = checkpoint_lib.Checkpointer(str(tmp_path), read_only=True)
    assert sorted(reader.manager.all_steps()) == [2, 4, 5]  # latest two + best (90 at step 2)
    assert reader.select_step("latest") == 5
    assert reader.select_step("best") == 2
    assert reader.select_step("4") == 4
    with pytest.raises(checkpoint_lib.CheckpointError, match="available steps: \\[2, 4, 5\\]"):
        reader.select_step(3)
    with pytest.raises(checkpoint_lib.CheckpointError, match="'latest', 'best' or a step"):
        reader.select_step("last")
    reader.close()


def test_no_checkpoint_is_a_clear_error(tmp_path):
    reader = checkpoint_lib.Checkpointer(str(tmp_path), read_only=True)
    with pytest.raises(checkpoint_lib.CheckpointError, match="No checkpoint"):
        reader.select_step("latest")
    reader.close()


def test_reading_a_run_logs_no_orbax_warnings(tmp_path, caplog):
    """Evaluation and reports open runs read-only; orbax's notices about that are noise."""
    manager = checkpoint_lib.Checkpointer(str(tmp_path), _config(keep=1))
    manager.save(1, {"w": jnp.ones((2,))}, {"step": 1}, ema_top1=10.0)
    manager.close()
    with caplog.at_level("WARNING"):
        reader = checkpoint_lib.Checkpointer(str(tmp_path), read_only=True)
        assert reader.select_step("latest") == 1
        reader.close()
    assert [record.getMessage() for record in caplog.records if record.levelname == "WARNING"] == []
    # Only that notice is dropped, and only while the manager is built.
    assert not checkpoint_lib.logging.getLogger("absl").filters


# ------------------------------------------------------------- a tiny TrainState-like state


@flax.struct.dataclass
class TinyState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


@flax.struct.dataclass
class TinyStateWithSums(TinyState):
    metric_sums: Any  # a field added since (like TrainState.metric_sums)


def tiny_state(value: float, step: int = 0, width: int = 3) -> TinyState:
    params = {"dense": {"kernel": jnp.full((2, width), value), "bias": jnp.zeros((width,))}}
    return TinyState(
        step=jnp.asarray(step, jnp.int32),
        params=params,
        opt_state=optax.sgd(0.1, momentum=0.9).init(params),
        rng=jax.random.PRNGKey(0),
    )


def save_steps(workdir, steps=(1, 2, 3), make=tiny_state):
    checkpointer = checkpoint_lib.Checkpointer(str(workdir), _config(keep=5))
    for step in steps:
        checkpointer.save(step, make(float(step), step), {"step": step}, ema_top1=None)
    checkpointer.close()


def damage(step_dir, how):
    state_dir = os.path.join(step_dir, "state")
    if how == "truncated":
        for path in glob.glob(os.path.join(state_dir, "d", "*")):
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    elif how == "bit_flip":
        for path in glob.glob(os.path.join(state_dir, "d", "*")):
            data = bytearray(open(path, "rb").read())
            data[len(data) // 2] ^= 0x10
            open(path, "wb").write(bytes(data))
    elif how == "no_tree_metadata":
        os.remove(os.path.join(state_dir, "_METADATA"))
    elif how == "no_meta_file":
        os.remove(os.path.join(step_dir, "meta", "metadata"))
    else:
        raise ValueError(how)


DAMAGES = ["truncated", "bit_flip", "no_tree_metadata", "no_meta_file"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_previous_restored(
    tmp_path, capsys, monkeypatch, how
):
    save_steps(tmp_path)
    damage(str(tmp_path / "checkpoints" / "3"), how)
    capsys.readouterr()
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), _config(keep=5))
    state, meta = checkpointer.restore_or_keep(tiny_state(0.0))
    assert int(state.step) == 2 and meta == {"step": 2}
    np.testing.assert_array_equal(state.params["dense"]["kernel"], np.full((2, 3), 2.0))
    assert (tmp_path / "checkpoints_damaged" / "3" / "state").is_dir()  # moved, not deleted
    assert not (tmp_path / "checkpoints" / "3").exists()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("Checkpoint 3 is damaged (") and "checkpoints_damaged/3" in lines[0]
    time.sleep(0.3)
    assert unraisable == []  # no "Event loop is closed" tracebacks from the abandoned reads
    # The manager forgot step 3: it is saved again and the run goes on.
    assert checkpointer.latest_step() == 2
    checkpointer.save(3, tiny_state(3.0, 3), {"step": 3}, ema_top1=None)
    checkpointer.close()
    reader = checkpoint_lib.Checkpointer(str(tmp_path), read_only=True)
    assert sorted(reader.manager.all_steps()) == [1, 2, 3]
    reader.close()


def test_with_every_checkpoint_damaged_the_error_names_both_folders(tmp_path, capsys):
    save_steps(tmp_path, steps=(1, 2))
    for step in (1, 2):
        damage(str(tmp_path / "checkpoints" / str(step)), "no_tree_metadata")
    (tmp_path / "checkpoints_damaged" / "1").mkdir(parents=True)  # from an earlier recovery
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), _config(keep=5))
    with pytest.raises(checkpoint_lib.CheckpointError) as e:
        checkpointer.restore_or_keep(tiny_state(0.0))
    checkpointer.close()
    assert str(tmp_path / "checkpoints") in str(e.value)
    assert str(tmp_path / "checkpoints_damaged") in str(e.value)
    assert sorted(os.listdir(tmp_path / "checkpoints_damaged")) == ["1", "1.1", "2"]
    assert len([ln for ln in capsys.readouterr().err.splitlines() if "is damaged" in ln]) == 2
    # A rerun does not silently train the workdir from scratch.
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), _config(keep=5))
    with pytest.raises(checkpoint_lib.CheckpointError, match="No intact checkpoint"):
        checkpointer.restore_or_keep(tiny_state(0.0))
    checkpointer.close()


def test_no_checkpoint_keeps_the_initial_state(tmp_path):
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), _config(keep=5))
    initial = tiny_state(7.0)
    state, meta = checkpointer.restore_or_keep(initial)
    assert state is initial and meta == {}
    assert checkpointer.latest_step() is None
    checkpointer.close()


def test_an_intact_checkpoint_of_another_model_is_an_error_and_stays(tmp_path):
    save_steps(tmp_path, steps=(1,))
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), _config(keep=5))
    with pytest.raises(checkpoint_lib.CheckpointError, match="does not fit") as e:
        checkpointer.restore_or_keep(tiny_state(0.0, width=4))
    checkpointer.close()
    assert "params/dense/kernel: checkpoint (2, 3) float32, now (2, 4) float32" in str(e.value)
    assert (tmp_path / "checkpoints" / "1" / "state").is_dir()
    assert not (tmp_path / "checkpoints_damaged").exists()


def test_a_checkpoint_without_metric_sums_is_from_an_older_ssl_jax(tmp_path):
    save_steps(tmp_path, steps=(1,))

    def with_sums(value):
        from clu import metrics as clu_metrics

        state = tiny_state(value)
        sums = {"loss": clu_metrics.Average(total=jnp.zeros(()), count=jnp.zeros((), jnp.int32))}
        return TinyStateWithSums(**vars(state), metric_sums=sums)

    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), _config(keep=5))
    with pytest.raises(checkpoint_lib.CheckpointError, match="older ssl_jax") as e:
        checkpointer.restore_or_keep(with_sums(0.0))
    checkpointer.close()
    assert "metric_sums" in str(e.value) and "new --workdir" in str(e.value)
    assert (tmp_path / "checkpoints" / "1").is_dir()


def test_an_old_checkpoint_with_a_data_item_restores(tmp_path):
    """Checkpoints of older versions also hold the grain iterator position ("data")."""
    import grain

    iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
    next(iterator)
    manager = ocp.CheckpointManager(str(tmp_path / "checkpoints"))
    manager.save(
        4,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(tiny_state(4.0, 4)),
            data=grain.checkpoint.CheckpointSave(iterator),
            meta=ocp.args.JsonSave({"step": 4}),
        ),
    )
    manager.wait_until_finished()
    manager.close()
    assert (tmp_path / "checkpoints" / "4" / "data").is_dir()

    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), _config(keep=5))
    state, meta = checkpointer.restore_or_keep(tiny_state(0.0))
    checkpointer.close()
    assert int(state.step) == 4 and meta == {"step": 4}
    np.testing.assert_array_equal(state.params["dense"]["kernel"], np.full((2, 3), 4.0))


def _failing_json_save(monkeypatch):
    async def no_space(self, item, directory):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", no_space)


def test_a_failed_background_save_is_reported_by_check_saves(tmp_path, monkeypatch):
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), _config(keep=5))
    checkpointer.save(1, tiny_state(1.0, 1), {"step": 1}, ema_top1=None)
    checkpointer.check_saves()  # a good save: nothing to report
    _failing_json_save(monkeypatch)
    checkpointer.save(2, tiny_state(2.0, 2), {"step": 2}, ema_top1=None)
    deadline = time.monotonic() + 20
    with pytest.raises(checkpoint_lib.CheckpointError) as e:
        while time.monotonic() < deadline:  # the loop calls it after every dispatch
            checkpointer.check_saves()
            time.sleep(0.01)
    message = str(e.value)
    assert "Saving checkpoint 2" in message and "No space left on device" in message
    assert "resumes from checkpoint 1" in message
    with pytest.raises(checkpoint_lib.CheckpointError, match="checkpoint 2"):
        checkpointer.save(3, tiny_state(3.0, 3), {"step": 3}, ema_top1=None)  # still refused
    checkpointer.close()  # already reported: no second error
    monkeypatch.undo()
    reader = checkpoint_lib.Checkpointer(str(tmp_path), read_only=True)
    assert reader.select_step("latest") == 1
    reader.close()


def test_the_next_save_surfaces_a_failed_previous_save(tmp_path, monkeypatch):
    _failing_json_save(monkeypatch)
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), _config(keep=5))
    checkpointer.save(1, tiny_state(1.0, 1), {"step": 1}, ema_top1=None)
    with pytest.raises(checkpoint_lib.CheckpointError, match="Saving checkpoint 1 .*failed"):
        checkpointer.save(2, tiny_state(2.0, 2), {"step": 2}, ema_top1=None)
    assert checkpointer.latest_step() is None
    checkpointer.close()


def test_close_reports_a_failed_last_save(tmp_path, monkeypatch):
    _failing_json_save(monkeypatch)
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), _config(keep=5))
    checkpointer.save(1, tiny_state(1.0, 1), {"step": 1}, ema_top1=None)
    with pytest.raises(checkpoint_lib.CheckpointError, match="Saving checkpoint 1"):
        checkpointer.close()


# ------------------------------------------------------------------ train.resume_changes


def _trained_workdir(tmp_path, config):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.json").write_text(config.to_json_best_effort())


def test_resume_changes_are_accepted_and_returned_others_refused(tmp_path):
    config = base.get_config("smoke")
    _trained_workdir(tmp_path, config)
    assert checkpoint_lib.check_config_compatible(config, str(tmp_path)) == []
    saved_lr = config.optim.lr
    config.optim.lr = saved_lr / 10
    with pytest.raises(checkpoint_lib.CheckpointError, match="optim.lr: saved") as e:
        checkpoint_lib.check_config_compatible(config, str(tmp_path))
    assert "--config.train.resume_changes='(\"optim.lr\",)'" in str(e.value)

    config.train.resume_changes = ("optim.lr",)
    changes = checkpoint_lib.check_config_compatible(config, str(tmp_path))
    assert changes == [{"key": "optim.lr", "saved": saved_lr, "now": saved_lr / 10}]

    config.optim.momentum = 0.5  # not listed: still refused, and only it is named
    with pytest.raises(checkpoint_lib.CheckpointError, match="resume_changes") as e:
        checkpoint_lib.check_config_compatible(config, str(tmp_path))
    assert "optim.momentum: saved" in str(e.value) and "optim.lr: saved" not in str(e.value)


def test_resume_changes_of_a_saved_config_are_not_a_difference(tmp_path):
    """The resumed run's config.json lists the keys; a later run may drop them again."""
    config = base.get_config("smoke")
    config.train.resume_changes = ("optim.lr",)
    _trained_workdir(tmp_path, config)
    config.train.resume_changes = ()
    assert checkpoint_lib.check_config_compatible(config, str(tmp_path)) == []
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["train"]["resume_changes"]  # a config.json written before the key existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert checkpoint_lib.check_config_compatible(config, str(tmp_path)) == []


@pytest.mark.parametrize(
    "value, problem",
    [
        (("optim.lr", "optim.learning_rate"), "unknown: ['optim.learning_rate']"),
        ("optim.lr", "tuple"),
    ],
)
def test_resume_changes_must_name_config_keys(value, problem):
    config = base.get_config()
    config.train.resume_changes = ("optim.lr",)
    config_checks.validate_config(config)
    with config.train.ignore_type():
        config.train.resume_changes = value
    with pytest.raises(config_checks.ConfigError, match="train.resume_changes") as e:
        config_checks.validate_config(config)
    assert problem in str(e.value)
