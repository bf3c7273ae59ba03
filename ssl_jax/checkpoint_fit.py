"""Whether a checkpoint fits what is about to be restored into it, checked before restoring.

Orbax's restores keep the checkpoint's shapes or leave absent entries unfilled, so a config.json
edited to another model, a checkpoint copied from another run, or one written by another
ssl_jax would otherwise restore garbage; these checks name the mismatches instead.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from ssl_jax.run_config import CheckpointError


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


def saved_state_tree(step_dir: str) -> dict:
    """`{"params/conv/kernel": metadata with .shape and .dtype, ...}` of a checkpoint's state.

    Reads the tree metadata and every array's header: fails on a missing or damaged one.
    """
    from etils import epath

    state_dir = os.path.join(step_dir, "state")
    if not os.path.isdir(state_dir):
        raise FileNotFoundError(f"{step_dir} holds no 'state' item")
    metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir))
    return ocp.tree.to_flat_dict(metadata, sep="/")


def check_fits(saved: dict, abstract, step_dir: str) -> None:
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
