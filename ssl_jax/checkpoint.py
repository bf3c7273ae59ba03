"""Orbax checkpoints in `<workdir>/checkpoints`: exact resume for training, EMA-only eval restore.

Each checkpoint holds two items: `state` (the whole TrainState: params, BN statistics,
optimizer, EMA, the algorithm's memory bank and DA history, the rng, the partial metric sums)
and `meta` (evaluation history, training time). The batch of step k is a pure function of
(seed, k), so the data position is `state.step` and needs no item of its own (checkpoints of
older versions also hold a `data` item, the grain iterator position; it is ignored). The
latest `train.keep_checkpoints` are kept, plus the best by EMA top-1. The resolved config sits
beside them in `<workdir>/config.json`.

Damaged checkpoints (a truncated or bit-flipped file, a missing metadata file) are moved aside
to `<workdir>/checkpoints_damaged/<step>` by `restore_or_keep`, which then resumes from the
newest intact one; a readable checkpoint that does not fit the train state is an error instead.
A background save that fails stops the run at the next `check_saves()`.

Multi-process runs (`ssl_jax.distributed`) save one logical checkpoint: every process calls
`save` at the same step, Orbax writes each array once and process 0 the metadata and `meta`.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

# The config side lives in run_config; re-exported so that checkpoint_lib.<name> keeps working.
from ssl_jax.run_config import (  # noqa: F401
    CHECKPOINT_DIR,
    CONFIG_FILE,
    RESUMABLE_CHANGES,
    CheckpointError,
    check_config_compatible,
    flatten_config,
    load_saved_config,
    with_defaults,
)

DAMAGED_DIR = "checkpoints_damaged"  # damaged checkpoints are moved here, never deleted


def _not_missing_metric_notice(record: logging.LogRecord) -> bool:
    """False for orbax's "did not provide metrics" warning: a checkpoint between evaluations
    (checkpoint_every, SIGTERM) has no EMA top-1, and the best-by-top-1 policy skips it."""
    return not str(record.msg).startswith("Requested `tracked_metric`; did not provide metrics")


def _not_read_only_notice(record: logging.LogRecord) -> bool:
    """False for orbax's "Given directory is read only" warning, printed by every evaluation."""
    return not str(record.msg).startswith("Given directory is read only")


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
            # Reading (evaluation after a multi-process run, on process 0 alone) involves
            # this process only; training checkpoints are written by all processes together.
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=jax.process_index(), active_processes={jax.process_index()}
            )
            if read_only and jax.process_count() > 1
            else ocp.options.MultiprocessingOptions(),
        )
        absl_logger = logging.getLogger("absl")
        absl_logger.addFilter(_not_read_only_notice)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        finally:
            absl_logger.removeFilter(_not_read_only_notice)
        self.damaged_directory = os.path.join(os.path.abspath(workdir), DAMAGED_DIR)
        self._saving_step: int | None = None  # the latest background save, until it is done
        self._save_error: CheckpointError | None = None
        self._save_reported = False

    # ----------------------------------------------------------------------------- train

    def save(self, step: int, state, meta: dict, *, ema_top1: float | None) -> None:
        """Starts writing checkpoint `step` in the background (the device arrays are copied first).

        Raises CheckpointError when the previous background save failed, before writing more.
        """
        self._raise_save_error(wait=True)
        absl_logger = logging.getLogger("absl")
        absl_logger.addFilter(_not_missing_metric_notice)
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                metrics=None if ema_top1 is None else {"ema_top1": float(ema_top1)},
                force=True,
            )
        except Exception as err:
            self._save_reported = True
            raise CheckpointError(
                f"Could not save checkpoint {step} to {self.directory}: {_first_line(err)}"
            ) from err
        finally:
            absl_logger.removeFilter(_not_missing_metric_notice)
        self._saving_step = step

    def check_saves(self) -> None:
        """Raises CheckpointError if a background save has failed; cheap, never waits.

        Called after every dispatch, so that no steps are trained on top of a checkpoint that
        does not exist. In a multi-process run finishing a save is a step all processes take
        together, so there a failed save is reported at the next save or at the end instead.
        """
        if jax.process_count() > 1:
            return
        self._raise_save_error(wait=False)

    def latest_step(self) -> int | None:
        """The newest checkpoint that is completely written (waits for a save in flight)."""
        self._save_failure(wait=True)  # a failed save is dropped from the steps (and reported)
        step = self.manager.latest_step()
        return None if step is None else int(step)

    def _save_failure(self, *, wait: bool) -> CheckpointError | None:
        """The failure of the latest background save, if it has failed (None while in flight)."""
        if self._save_error is not None or self._saving_step is None:
            return self._save_error
        if not wait and self.manager.is_saving_in_progress():
            return None
        try:
            # Joins the finished save thread (at once) and re-raises what killed it.
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as err:
            last = self.manager.latest_step()
            self._save_error = CheckpointError(
                f"Saving checkpoint {self._saving_step} to {self.directory} failed in the "
                f"background ({_first_line(err)}), so the run stops before training on top of "
                "a checkpoint that does not exist. Fix the cause (disk full? permissions?"
                + (" another process of the run died?" if jax.process_count() > 1 else "")
                + ") and rerun the same command: it resumes from "
                + (f"checkpoint {last}." if last is not None else "scratch (no checkpoint).")
            )
            self._save_error.__cause__ = err
            return self._save_error
        self._saving_step = None  # written
        return None

    def _raise_save_error(self, *, wait: bool) -> None:
        error = self._save_failure(wait=wait)
        if error is not None:
            self._save_reported = True
            raise error

    def restore_or_keep(self, state):
        """(state, meta) of the newest intact checkpoint; `(state, {})` where there is none.

        A checkpoint that cannot be read (a truncated or bit-flipped file, a missing metadata
        file) is reported in one line and moved to `<workdir>/checkpoints_damaged/<step>`, and
        the next newest is tried. A readable checkpoint whose tree does not fit `state`
        (another model, or an older ssl_jax) raises CheckpointError and is left in place.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        moved = False
        while (step := self.manager.latest_step()) is not None:
            step_dir = os.path.join(self.directory, str(step))
            try:
                restored = self._restore_train(step, step_dir, abstract)
            except _Damaged as damage:
                self._move_damaged(step, step_dir, damage.__cause__)
                moved = True
                continue
            return restored
        if moved or self._all_moved_aside():
            raise CheckpointError(
                f"No intact checkpoint in {self.directory} to resume from: the damaged ones were "
                f"moved to {self.damaged_directory} (not deleted). Copy intact checkpoints back "
                f"from a backup, or use a new --workdir; to train this workdir from scratch, "
                f"delete {self.damaged_directory}."
            )
        return state, {}

    def _restore_train(self, step: int, step_dir: str, abstract):
        """Restores `state` and `meta` of `step`; raises _Damaged where it cannot be read."""
        # Orbax's event loop closes while tensorstore still settles the reads it abandoned on
        # an error; their "Event loop is closed" tracebacks would bury the one-line report.
        previous = sys.unraisablehook

        def drop_closed_loop_noise(unraisable):
            if "Event loop is closed" not in str(unraisable.exc_value):
                previous(unraisable)

        sys.unraisablehook = drop_closed_loop_noise
        try:
            return self._read_train(step, step_dir, abstract)
        except _Damaged:
            time.sleep(0.2)  # let the abandoned reads settle while the filter is in place
            raise
        finally:
            sys.unraisablehook = previous

    def _read_train(self, step: int, step_dir: str, abstract):
        try:
            saved = _saved_state_tree(step_dir)
        except Exception as err:
            raise _Damaged from err
        _check_fits(saved, abstract, step_dir)
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as err:
            if _is_resource_error(err):
                raise
            raise _Damaged from err
        # Several seeds trained together: state.step carries a seed axis, all equal.
        steps = np.unique(np.asarray(restored["state"].step))
        if steps.tolist() != [step]:
            raise _Damaged from ValueError(f"it holds state.step={steps.tolist()}")
        return restored["state"], dict(restored["meta"])

    def _move_damaged(self, step: int, step_dir: str, err: BaseException) -> None:
        """Moves a damaged step folder under `checkpoints_damaged/` and forgets the step."""
        destination = os.path.join(self.damaged_directory, str(step))
        if jax.process_index() == 0:
            os.makedirs(self.damaged_directory, exist_ok=True)
            suffix = 1
            while os.path.exists(destination):
                destination = os.path.join(self.damaged_directory, f"{step}.{suffix}")
                suffix += 1
            shutil.move(step_dir, destination)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"ssl_jax_damaged_checkpoint_{step}")
        print(
            f"Checkpoint {step} is damaged ({_first_line(err)}); moved it to {destination} and "
            "trying the next newest.",
            file=sys.stderr,
            flush=True,
        )
        self.manager.reload()

    def _all_moved_aside(self) -> bool:
        """True where every checkpoint of this workdir was moved aside as damaged."""
        return os.path.isdir(self.damaged_directory) and bool(os.listdir(self.damaged_directory))

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
        """Waits for the save in flight; raises CheckpointError if it failed (and not yet said)."""
        error = self._save_failure(wait=True)
        self.manager.close()
        if error is not None and not self._save_reported:
            self._save_reported = True
            raise error


def _ema_top1(metrics) -> float:
    return float(metrics["ema_top1"])


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    line = lines[0].split(" [tensorstore_spec=")[0] if lines else ""  # drop the long JSON spec
    text = f"{type(err).__name__}: {line}".rstrip(": ")
    return text if len(text) <= 400 else text[:397] + "..."


class _Damaged(Exception):
    """A checkpoint that cannot be read; the cause says why."""


def _is_resource_error(err: BaseException) -> bool:
    """Out of memory while restoring: the checkpoint may be fine, so it is not moved aside."""
    return isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in str(err)


def _saved_state_tree(step_dir: str) -> dict:
    """`{"params/conv/kernel": metadata with .shape and .dtype, ...}` of a checkpoint's state.

    Reads the tree metadata and every array's header: fails on a missing or damaged one.
    """
    from etils import epath

    state_dir = os.path.join(step_dir, "state")
    if not os.path.isdir(state_dir):
        raise FileNotFoundError(f"{step_dir} holds no 'state' item")
    metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir))
    return ocp.tree.to_flat_dict(metadata, sep="/")


def _check_fits(saved: dict, abstract, step_dir: str) -> None:
    """Raises CheckpointError where a readable checkpoint's tree is not that of `abstract`."""
    expected = ocp.tree.to_flat_dict(abstract, sep="/")
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    differ = [
        f"{key}: checkpoint {tuple(saved[key].shape)} {np.dtype(saved[key].dtype).name}, "
        f"now {tuple(expected[key].shape)} {np.dtype(expected[key].dtype).name}"
        for key in sorted(set(saved) & set(expected))
        if tuple(saved[key].shape) != tuple(expected[key].shape)
        or np.dtype(saved[key].dtype) != np.dtype(expected[key].dtype)
    ]
    if not (missing or extra or differ):
        return
    new_fields = sorted({k.split("/")[0] for k in missing} - {k.split("/")[0] for k in saved})
    if new_fields:
        raise CheckpointError(
            f"The checkpoint {step_dir} was written by an older ssl_jax: it lacks the train "
            f"state's {', '.join(new_fields)}, so this version cannot resume it exactly. Use a "
            "new --workdir (evaluation of this workdir still works), or finish the run with the "
            "ssl_jax version that started it."
        )
    problems = (
        [f"{k}: missing from the checkpoint" for k in missing]
        + [f"{k}: in the checkpoint, not in the train state" for k in extra]
        + differ
    )
    raise CheckpointError(
        f"The checkpoint {step_dir} is intact but does not fit the train state that the "
        f"current config and ssl_jax build ({len(problems)} mismatch(es), e.g. "
        + "; ".join(problems[:4])
        + "). Was config.json edited, the checkpoint copied from another run, or ssl_jax "
        "changed? Resume with the config and version that wrote it, or use a new --workdir. "
        "Nothing was moved or overwritten."
    )
