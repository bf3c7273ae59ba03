"""Checkpoint retention (latest N plus the best by EMA top-1) and step selection for eval."""

import jax.numpy as jnp
import pytest
from ml_collections import ConfigDict

from ssl_jax import checkpoint as checkpoint_lib


def _config(keep):
    return ConfigDict({"train": {"keep_checkpoints": keep}})


def test_keeps_the_latest_and_the_best_and_selects_steps(tmp_path):
    manager = checkpoint_lib.Checkpointer(str(tmp_path), _config(keep=2))
    for step, top1 in [(1, 50.0), (2, 90.0), (3, 60.0), (4, None), (5, 70.0)]:
        state = {"w": jnp.full((3,), float(step))}
        manager.save(step, state, None, {"step": step}, ema_top1=top1)
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
    manager.save(1, {"w": jnp.ones((2,))}, None, {"step": 1}, ema_top1=10.0)
    manager.close()
    with caplog.at_level("WARNING"):
        reader = checkpoint_lib.Checkpointer(str(tmp_path), read_only=True)
        assert reader.select_step("latest") == 1
        reader.close()
    assert [record.getMessage() for record in caplog.records if record.levelname == "WARNING"] == []
    # Only that notice is dropped, and only while the manager is built.
    assert not checkpoint_lib.logging.getLogger("absl").filters
