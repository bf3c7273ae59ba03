"""Orbax checkpoints in `<workdir>/checkpoints`: exact resume for training, EMA-only eval restore.

Each checkpoint holds three items: `state` (the whole TrainState: params, BN statistics,
optimizer, EMA, the algorithm's memory bank and DA history, the rng), `data` (the grain
iterator position) and `meta` (evaluation history, training time). The latest
`train.keep_checkpoints` are kept, plus the best by EMA top-1. The resolved config sits
beside them in `<workdir>/config.json`.
"""

from __future__ import annotations

import functools
import importlib.util
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

from ssl_jax import files

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


@functools.cache
def _base_config_json() -> str:
    """configs/base.py's `get_config()` as JSON ("{}" where the repository's configs are absent)."""
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "base.py")
    if os.path.exists(path):
        spec = importlib.util.spec_from_file_location("_ssl_jax_base_config", path)
        base = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(base)
    else:  # ssl_jax installed elsewhere: the configs package must be importable
        try:
            from configs import base
        except ImportError:
            return "{}"
    return base.get_config().to_json_best_effort()


def with_defaults(saved: dict) -> dict:
    """A saved config.json dict with every key it lacks (added since) at its base.py default.

    Adding a config key therefore never locks users out of the runs they trained before it.
    """

    def fill(values: dict, defaults: dict) -> dict:
        out = dict(values)
        for key, default in defaults.items():
            if key not in out:
                out[key] = default
            elif isinstance(default, dict) and isinstance(out[key], dict):
                out[key] = fill(out[key], default)
        return out

    return fill(saved, json.loads(_base_config_json()))


def load_saved_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's config.json, keys added since it was written at their defaults."""
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
        return ml_collections.ConfigDict(with_defaults(json.load(f)))


def check_config_compatible(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses to resume a workdir whose run used a different config (nothing is overwritten).

    A key the saved config lacks (added to configs/base.py since) compares at its default.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path) or not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
        return
    with open(path) as f:
        saved = flatten_config(with_defaults(json.load(f)))
    current = flatten_config(json.loads(config.to_json_best_effort()))
    differences = [
        f"{key}: saved {saved.get(key)!r} != now {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
        and not files.matches_key_prefix(key, RESUMABLE_CHANGES)
    ]
    if differences:
        raise CheckpointError(
            f"{workdir} holds checkpoints of a run with a different config, so resuming would "
            "mix two experiments. Use a new --workdir, or rerun with the same config. "
            "Differences: " + "; ".join(differences)
        )


def _shapes_by_path(tree, prefix: str) -> dict[str, tuple]:
    return {
        prefix + "/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def check_checkpoint_matches_model(step_dir: str, abstract: dict, *, online: bool, describe: str):
    """Compares the parameter names and shapes in a checkpoint with the model's, before restoring.

    Orbax's partial restore silently keeps the checkpoint's shapes and leaves absent entries
    unfilled, so a config.json edited to another model would otherwise give garbage.
    """
    from etils import epath

    state_dir = os.path.join(step_dir, "state")
    if not os.path.isdir(state_dir):
        raise CheckpointError(f"{step_dir} holds no 'state' item: it is not an ssl_jax checkpoint.")
    saved_tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir))
    prefix = "" if online else "ema_"
    problems = []
    for name in ("params", "batch_stats"):
        expected = _shapes_by_path(abstract.get(name, {}), f"{name}/")
        stored = saved_tree[f"{prefix}{name}"] if f"{prefix}{name}" in saved_tree else {}
        saved = _shapes_by_path(stored, f"{name}/")
        problems += [
            f"{k}: missing from the checkpoint" for k in sorted(set(expected) - set(saved))
        ]
        problems += [
            f"{k}: in the checkpoint, not in the model" for k in sorted(set(saved) - set(expected))
        ]
        problems += [
            f"{k}: checkpoint shape {saved[k]}, model shape {expected[k]}"
            for k in sorted(set(saved) & set(expected))
            if saved[k] != expected[k]
        ]
    if problems:
        raise CheckpointError(
            f"The checkpoint {step_dir} was not written by the model that config.json describes "
            f"({describe}): {len(problems)} mismatch(es), e.g. " + "; ".join(problems[:4]) + ". "
            "Was config.json edited or the checkpoint copied from another run? Restore "
            "config.json from the run that wrote the checkpoint."
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

    def restore_for_eval(
        self, step: int, abstract_variables: dict, *, online: bool = False, describe: str = ""
    ):
        """Only what inference needs: the EMA (or online) params and BN statistics.

        The checkpoint's names and shapes are first checked against `abstract_variables` (the
        model of config.json, described by `describe` in the error).
        """
        check_checkpoint_matches_model(
            os.path.join(self.directory, str(step)),
            abstract_variables,
            online=online,
            describe=describe,
        )
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
