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
A background save that fails stops the run at the next `check_saves()`. Whether a checkpoint
fits the state or model it is restored into is checked first (`ssl_jax.checkpoint_fit`).

Multi-process runs (`ssl_jax.distributed`) save one logical checkpoint: every process calls
`save` at the same step, Orbax writes each array once and process 0 the metadata and `meta`.
"""

from __future__ import annotations

import contextlib
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

from ssl_jax.checkpoint_fit import (  # noqa: E402,F401 - re-exported
    check_checkpoint_matches_model,
    check_fits,
    saved_state_tree,
)

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


# Orbax notices that say nothing to a user here: every evaluation opens the checkpoints
# read-only, and a checkpoint between evaluations (checkpoint_every, SIGTERM) has no EMA top-1,
# which the best-by-top-1 policy skips by design.
READ_ONLY_NOTICE = "Given directory is read only"
NO_METRIC_NOTICE = "Requested `tracked_metric`; did not provide metrics"


@contextlib.contextmanager
def _without_absl_notice(prefix: str):
    """Drops absl log records (orbax logs through absl) that start with `prefix`."""
    logger = logging.getLogger("absl")

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(prefix)

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


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
        with _without_absl_notice(READ_ONLY_NOTICE):
            self.manager = ocp.CheckpointManager(self.directory, options=options)
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
        try:
            with _without_absl_notice(NO_METRIC_NOTICE):
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
            saved = saved_state_tree(step_dir)
        except Exception as err:
            raise _Damaged from err
        check_fits(saved, abstract, step_dir)
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
