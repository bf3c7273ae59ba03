"""The saved config of a run (`<workdir>/config.json`) and what a resume may change.

A saved config is read with every key added to configs/base.py since at its default, so adding
a config key never locks users out of the runs they trained before it. `check_config_compatible`
refuses to resume a workdir with a config that would change the training trajectory.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os

import ml_collections
from flax import traverse_util

from ssl_jax import files

CHECKPOINT_DIR = "checkpoints"  # <workdir>/checkpoints, written by ssl_jax.checkpoint
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
    "train.resume_changes",
)


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


def check_config_compatible(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Refuses to resume a workdir whose run used a different config (nothing is overwritten).

    A key the saved config lacks (added to configs/base.py since) compares at its default.
    Keys listed in `config.train.resume_changes` may differ on purpose (e.g. a lower
    `optim.lr` after the NaN guard): those changes are returned, as
    `[{"key": "optim.lr", "saved": 0.03, "now": 0.01}, ...]`, for the run to record. Keys that
    do not alter the training trajectory (`RESUMABLE_CHANGES`) may always differ.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path) or not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
        return []
    with open(path) as f:
        saved = flatten_config(with_defaults(json.load(f)))
    current = flatten_config(json.loads(config.to_json_best_effort()))
    deliberate = tuple(config.train.get("resume_changes", ()))
    changed = [
        key
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
        and not files.matches_key_prefix(key, RESUMABLE_CHANGES)
    ]
    refused = [key for key in changed if key not in deliberate]
    if refused:
        differences = "; ".join(
            f"{key}: saved {saved.get(key)!r} != now {current.get(key)!r}" for key in refused
        )
        keys = ", ".join(f'"{key}"' for key in refused)
        raise CheckpointError(
            f"{workdir} holds checkpoints of a run with a different config, so resuming would "
            "mix two experiments. Use a new --workdir, or rerun with the same config; to "
            "continue this run from its last checkpoint with changed values on purpose, list "
            f"the keys in train.resume_changes (--config.train.resume_changes='({keys},)'), and "
            "the change is recorded in metrics.jsonl and config.json. "
            f"Differences: {differences}"
        )
    return [{"key": key, "saved": saved.get(key), "now": current.get(key)} for key in changed]
