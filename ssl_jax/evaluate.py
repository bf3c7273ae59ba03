"""Evaluation of a training workdir from its Orbax checkpoints (EMA weights, no optimizer)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ssl_jax import checkpoint as checkpoint_lib
from ssl_jax import data as data_lib
from ssl_jax import train
from ssl_jax.algorithms import get_algorithm

# Sections of a command-line config that apply to evaluating an existing run.
EVAL_OVERRIDES = ("eval", "predict")
DATA_OVERRIDES = ("root", "workers", "cache_dir", "eval_batch_size")


def resolve_config(workdir: str, cli_config: ml_collections.ConfigDict | None):
    """The run's saved config, with eval/predict options (and data location) from the CLI."""
    config = checkpoint_lib.load_saved_config(workdir)
    if cli_config is not None:
        for section in EVAL_OVERRIDES:
            config[section] = ml_collections.ConfigDict(cli_config[section].to_dict())
        for key in DATA_OVERRIDES:
            if key == "root" and os.path.isdir(config.data.root or ""):
                continue  # the saved root still exists: keep what the run trained on
            config.data[key] = cli_config.data[key]
    return config


def restore_model(
    workdir: str, config: ml_collections.ConfigDict, *, which=None, online: bool = False
):
    """(model, variables, step, meta) for the chosen checkpoint of `workdir`."""
    algorithm = get_algorithm(config.algorithm.name)
    num_classes = len(config.data.classes) if config.data.classes else None
    if num_classes is None:
        num_classes = int(_saved_num_classes(workdir))
    model = train.build_model(config, num_classes, algorithm)
    size = config.data.crop_size
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False)
    )
    checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
    try:
        step = checkpointer.select_step(config.eval.step if which is None else which)
        variables, meta = checkpointer.restore_for_eval(step, abstract, online=online)
    finally:
        checkpointer.close()
    return model, variables, step, meta


def _saved_num_classes(workdir: str) -> int:
    with open(os.path.join(workdir, "split.json")) as f:
        return len(json.load(f)["class_names"])


def evaluate_workdir(workdir: str, cli_config: ml_collections.ConfigDict | None = None) -> dict:
    """Evaluates the chosen checkpoint on the test split; writes eval/<step>/metrics.json."""
    workdir = os.path.abspath(workdir)
    config = resolve_config(workdir, cli_config)
    data = data_lib.load_dataset(config, workdir=workdir)
    model, variables, step, meta = restore_model(workdir, config)
    result, arrays = train.evaluate(
        model,
        variables["params"],
        variables["batch_stats"],
        data_lib.test_batches(data.test, config.data.eval_batch_size),
    )
    result.update(step=int(step), protocol=data.protocol, split_hash=data.split_hash)
    out_dir = os.path.join(workdir, "eval", str(step))
    os.makedirs(out_dir, exist_ok=True)
    train.dump_json(result, os.path.join(out_dir, "metrics.json"))
    np.savez_compressed(
        os.path.join(out_dir, "predictions.npz"),
        logits=arrays["logits"],
        labels=arrays["labels"],
    )
    return result


def predict_workdir(workdir: str, cli_config: ml_collections.ConfigDict | None = None) -> dict:
    raise NotImplementedError("--mode predict is not implemented yet.")
