"""Orbax checkpoints in `<workdir>/checkpoints`: exact resume for training, EMA-only eval restore.

Each checkpoint holds three items: `state` (the whole TrainState: params, BN statistics,
optimizer, EMA, the algorithm's memory bank and DA history, the rng), `data` (the grain
iterator position) and `meta` (evaluation history, training time). The latest
`train.keep_checkpoints` are kept, plus the best by EMA top-1. The resolved config sits
beside them in `<workdir>/config.json`.
"""

from __future__ import annotations

import json
import logging
import os

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from orbax.checkpoint import checkpoint_managers

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
# Keys whose change does not alter the training trajectory, so a resume may change them.
RESUMABLE_CHANGES = (
    "data.workers",
    "data.cache_dir",
    "data.root",
    "eval.",
    "predict.",
    "augment.where",
    "train.keep_checkpoints",
)


def _not_read_only_notice(record: logging.LogRecord) -> bool:
    """False for orbax's "Given directory is read only" warning, printed by every evaluation."""
    return not str(record.msg).startswith("Given directory is read only")


class CheckpointError(RuntimeError):
    """A workdir or checkpoint that cannot serve the request; the message says what to do."""


def flatten_config(config: dict) -> dict:
    """A config's JSON dict as ``{"optim.lr": 0.03, ...}``: comparable key by key."""
    return traverse_util.flatten_dict(config, sep=".")


def load_saved_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isdir(workdir):
        raise CheckpointError(
            f"Workdir {workdir!r} does not exist; pass the --workdir of a training run."
        )
    if not os.path.exists(path):
        raise CheckpointError(
            f"{path} not found: {workdir!r} is not an ssl_jax training "
            "workdir (train into it first with --mode train)."
        )
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def check_config_compatible(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses to resume a workdir whose run used a different config (nothing is overwritten)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path) or not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
        return
    with open(path) as f:
        saved = flatten_config(json.load(f))
    current = flatten_config(json.loads(config.to_json_best_effort()))
    differences = [
        f"{key}: saved {saved.get(key)!r} != now {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
        and not any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_CHANGES)
    ]
    if differences:
        raise CheckpointError(
            f"{workdir} holds checkpoints of a run with a different config, so resuming would "
            "mix two experiments. Use a new --workdir, or rerun with the same config. "
            "Differences: " + "; ".join(differences)
        )


class Checkpointer:
    """Saves and restores training checkpoints (thin wrapper over an Orbax CheckpointManager)."""

    def __init__(
        self,
        workdir: str,
        config: ml_collections.ConfigDict | None = None,
        *,
        read_only: bool = False,
    ):
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        keep = 3 if config is None else int(config.train.keep_checkpoints)
        policy = checkpoint_managers.AnyPreservationPolicy(
            [
                checkpoint_managers.LatestN(n=keep),
                checkpoint_managers.BestN(
                    get_metric_fn=_ema_top1, n=1, keep_checkpoints_without_metrics=False
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=None if read_only else policy,
            best_fn=_ema_top1,
            best_mode="max",
            create=not read_only,
            read_only=read_only,
            # Read-only managers save nothing; saying so up front keeps orbax from warning.
            save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=True,
        )
        absl_logger = logging.getLogger("absl")
        absl_logger.addFilter(_not_read_only_notice)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        finally:
            absl_logger.removeFilter(_not_read_only_notice)

    # ----------------------------------------------------------------------------- train

    def save(self, step: int, state, data_iterator, meta: dict, *, ema_top1: float | None):
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(
            step,
            args=ocp.args.Composite(**items),
            metrics=None if ema_top1 is None else {"ema_top1": float(ema_top1)},
            force=True,
        )

    def restore_or_keep(self, state, data_iterator):
        """Restores the latest checkpoint into (state, data_iterator); keeps both if none."""
        step = self.manager.latest_step()
        if step is None:
            return state, {}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        items = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        restored_state = restored["state"]
        if int(restored_state.step) != step:
            raise CheckpointError(
                f"Checkpoint {step} holds state.step={int(restored_state.step)}; it is corrupt."
            )
        return restored_state, dict(restored["meta"])

    # ------------------------------------------------------------------------------ eval

    def select_step(self, which) -> int:
        """`latest`, `best` (by EMA top-1) or an integer step that exists."""
        steps = self.manager.all_steps()
        if not steps:
            raise CheckpointError(f"No checkpoint in {self.directory}; train first.")
        if which in (None, "", "latest"):
            return int(self.manager.latest_step())
        if which == "best":
            return int(self.manager.best_step())
        try:
            step = int(which)
        except (TypeError, ValueError):
            raise CheckpointError(
                f"eval.step must be 'latest', 'best' or a step number, got {which!r}."
            ) from None
        if step not in steps:
            raise CheckpointError(
                f"No checkpoint at step {step} in {self.directory}; "
                f"available steps: {sorted(steps)}."
            )
        return step

    def restore_for_eval(self, step: int, abstract_variables: dict, *, online: bool = False):
        """Only what inference needs: the EMA (or online) params and BN statistics."""
        prefix = "" if online else "ema_"
        target = {
            f"{prefix}params": abstract_variables["params"],
            f"{prefix}batch_stats": abstract_variables.get("batch_stats", {}),
        }
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item=abstract,
                        restore_args=jax.tree.map(
                            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract
                        ),
                        partial_restore=True,
                    ),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except (ValueError, KeyError) as err:
            raise CheckpointError(
                f"Checkpoint {step} in {self.directory} does not match the model in its "
                f"config.json (was it written by another model or version?): {err}"
            ) from err
        state = restored["state"]
        return (
            {"params": state[f"{prefix}params"], "batch_stats": state[f"{prefix}batch_stats"]},
            dict(restored["meta"]),
        )

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _ema_top1(metrics) -> float:
    return float(metrics["ema_top1"])
