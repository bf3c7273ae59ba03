"""One generic jitted train step for every algorithm, and the training loop.

The step (`train_step`) is a module-level pure function: it forwards the concatenated batch
``[x ; unlabelled views]`` through the model once, hands the outputs to the algorithm's pure
``loss_from_outputs`` (which also advances the algorithm's state: memory bank, DA history),
applies SGD and the EMA. It is jitted once with the state donated; the per-step randomness
(device augmentation) is ``fold_in(state.rng, step)``, so a resumed run is bit-identical.
The state and its construction are in `ssl_jax.train_state`, inference in `ssl_jax.inference`,
the mesh and sharding in `ssl_jax.devices`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics
from jax.sharding import Mesh

from ssl_jax import checkpoint as checkpoint_lib
from ssl_jax import data as data_lib
from ssl_jax import devices, files, inference, metric_writers, optim, train_state
from ssl_jax.algorithms import get_algorithm
from ssl_jax.algorithms.base import Algorithm
from ssl_jax.data.normalize import to_network_input
from ssl_jax.data.protocols import write_split_json

AUGMENT_WHERE = ("host", "device", "auto")


class NonFiniteLossError(FloatingPointError):
    """Raised when a logged loss (or the parameters) stop being finite."""


# ------------------------------------------------------------------------------- config


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Fails early, naming the key, on values the loop cannot honour."""
    t = config.train
    for key in ("total_steps", "steps_per_epoch", "log_every", "checkpoint_every"):
        if int(t[key]) <= 0:
            raise ValueError(f"config.train.{key} must be positive, got {t[key]}.")
    for key in ("steps_per_epoch", "checkpoint_every"):
        if t[key] % t.log_every:
            raise ValueError(
                f"config.train.log_every ({t.log_every}) must divide config.train.{key} "
                f"({t[key]}) so that checkpoints fall on logging boundaries."
            )
    if config.precision not in train_state.PRECISIONS:
        raise ValueError(
            f"config.precision must be one of {sorted(train_state.PRECISIONS)}, "
            f"got {config.precision!r}."
        )
    if config.augment.where not in AUGMENT_WHERE:
        raise ValueError(
            f"config.augment.where must be one of {AUGMENT_WHERE}, got {config.augment.where!r}."
        )
    get_algorithm(config.algorithm.name)  # raises with the known names


def resolve_augment_where(config: ml_collections.ConfigDict) -> str:
    """`auto` means on the device wherever there is an accelerator, on the host otherwise."""
    if config.augment.where != "auto":
        return config.augment.where
    return "host" if jax.default_backend() == "cpu" else "device"


# ------------------------------------------------------------------------------ the step


def network_inputs(
    batch: Mapping[str, jax.Array], views: tuple[str, ...], *, normalize_strong1: bool, dtype
) -> jax.Array:
    """Concatenates ``[x ; views...]`` as network input; strong1 stays in [0, 1] by default (Q3)."""
    parts = [to_network_input(batch["x"], dtype=dtype)]
    for view in views:
        normalize = normalize_strong1 or view != "u_s1"
        parts.append(to_network_input(batch[view], normalize=normalize, dtype=dtype))
    return jnp.concatenate(parts, axis=0)


def train_step(
    state: train_state.TrainState,
    batch: Mapping[str, jax.Array],
    device_data: Any,
    *,
    model,
    algorithm: Algorithm,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    augment_fn: Callable | None = None,
) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
    """One optimizer step of any algorithm (ALGORITHMS.md §8)."""
    step = state.step
    step_rng = jax.random.fold_in(state.rng, step)
    if augment_fn is not None:  # on-device augmentation from the device-resident cache
        batch = augment_fn(jax.random.fold_in(step_rng, 0), batch, device_data)
    dtype = train_state.PRECISIONS[config.precision]
    images = network_inputs(
        batch,
        algorithm.unlabelled_views,
        normalize_strong1=config.augment.normalize_strong1,
        dtype=dtype,
    )
    steps_per_epoch = config.train.steps_per_epoch

    def loss_fn(params):
        (logits, feats), mutated = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        loss, (algo_state, metrics) = algorithm.loss_from_outputs(
            logits=logits.astype(jnp.float32),
            feats=None if feats is None else feats.astype(jnp.float32),
            batch=batch,
            state=state.algo_state,
            epoch=step // steps_per_epoch,
            iteration=step % steps_per_epoch,
            cfg=config.algorithm,
        )
        return loss, (mutated["batch_stats"], algo_state, metrics)

    (_, (batch_stats, algo_state, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["param_norm"] = optax.tree.norm(params)
    new_state = state.replace(
        step=step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        ema_params=optim.ema_update(state.ema_params, params, config.ema.decay),
        ema_batch_stats=batch_stats,  # buffers are copied, not averaged
        algo_state=algo_state,
    )
    return new_state, metrics


def make_train_step(config, model, algorithm, tx, augment_fn=None, mesh: Mesh | None = None):
    """The step jitted once, with the state donated (and kept replicated over `mesh`)."""
    step = functools.partial(
        train_step,
        model=model,
        algorithm=algorithm,
        tx=tx,
        config=config,
        augment_fn=augment_fn,
    )
    if mesh is None:
        return jax.jit(step, donate_argnums=(0,))
    replicated = devices.replicated(mesh)
    return jax.jit(step, donate_argnums=(0,), out_shardings=(replicated, replicated))


# ------------------------------------------------------------------------------- the loop


def _metric_collection(names):
    return clu_metrics.Collection.create(
        **{name: clu_metrics.Average.from_output(name) for name in names}
    )


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """The resolved config beside the checkpoints, so eval needs nothing else."""
    files.atomic_write_text(
        config.to_json_best_effort(indent=2), os.path.join(workdir, checkpoint_lib.CONFIG_FILE)
    )


def _embeddings_epochs(config, num_epochs: int) -> set[int]:
    return {num_epochs if e == -1 else int(e) for e in config.train.save_embeddings_epochs}


def _param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming from the latest checkpoint in `workdir`), evaluating the EMA each epoch."""
    validate_config(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    checkpoint_lib.check_config_compatible(config, workdir)
    save_config(config, workdir)

    data = data_lib.load_dataset(config, workdir=workdir, write_split=False)
    model, algorithm, tx, lr_schedule, state = train_state.setup(config, len(data.class_names))

    where = resolve_augment_where(config)
    data_iter = data_lib.train_iterator(
        data,
        config,
        views=algorithm.unlabelled_views,
        mode="host" if where == "host" else "indices",
    )
    device_data, augment_fn = None, None
    if where == "device":
        from ssl_jax.data import device_augment_views

        device_data, augment_fn = device_augment_views(data, config, algorithm.unlabelled_views)

    manager = checkpoint_lib.Checkpointer(workdir, config)
    state, meta = manager.restore_or_keep(state, data_iter)
    start_step = int(state.step)
    if meta.get("split_hash", data.split_hash) != data.split_hash:
        manager.close()
        data_iter.close()
        raise checkpoint_lib.CheckpointError(
            f"The data changed since {workdir} was checkpointed: split hash "
            f"{meta['split_hash']} then, {data.split_hash} now (see split.json). Resuming would "
            "train on different images; restore the data or use a new --workdir."
        )
    meta["split_hash"] = data.split_hash
    write_split_json(data, os.path.join(workdir, "split.json"))
    if start_step >= config.train.total_steps:
        logging.info(
            "Nothing to do: the checkpoint is at step %d of %d.",
            start_step,
            config.train.total_steps,
        )
        manager.close()
        data_iter.close()
        return meta

    mesh = devices.make_mesh()
    state = devices.replicate(state, mesh)
    if device_data is not None:
        device_data = devices.replicate(device_data, mesh)
    step_fn = make_train_step(config, model, algorithm, tx, augment_fn, mesh)
    writer = metric_writers.MetricWriter(workdir, start_step=start_step)
    if start_step == 0:
        writer.write(
            "run",
            0,
            {
                "protocol": data.protocol,
                "split_hash": data.split_hash,
                "num_labelled": len(data.labelled.labels),
                "num_unlabelled": len(data.unlabelled.labels),
                "num_test": len(data.test.labels),
                "num_params": _param_count(state.params),
                "augment_where": where,
                "device": str(jax.devices()[0]),
                "jax_version": jax.__version__,
            },
        )
    else:
        print(f"Resuming from step {start_step} ({workdir}).", flush=True)
    per_step = train_state.images_per_step(config, algorithm)
    progress = metric_writers.Progress(config.train.total_steps, per_step, start_step)
    t = config.train
    num_epochs = math.ceil(t.total_steps / t.steps_per_epoch)
    collection, accumulated, interval_start = None, None, start_step + 1
    elapsed_before = float(meta.get("train_seconds", 0.0))
    run_start = time.perf_counter()
    evaluate_epoch = functools.partial(
        _evaluate_epoch,
        model=model,
        data=data,
        config=config,
        writer=writer,
        meta=meta,
        workdir=workdir,
        embed_epochs=_embeddings_epochs(config, num_epochs),
    )

    try:
        for step in range(start_step, t.total_steps):
            batch = devices.shard_batch(next(data_iter), mesh)
            state, metrics = step_fn(state, batch, device_data)
            if collection is None:
                collection = _metric_collection(sorted(metrics))
            update = collection.single_from_model_output(**metrics)
            accumulated = update if accumulated is None else accumulated.merge(update)
            done = step + 1
            if done % t.log_every == 0 or done == t.total_steps:
                values = {k: float(v) for k, v in accumulated.compute().items()}
                _check_finite(values, interval_start, done, writer, manager.directory)
                # The lr of the interval's last update, from the schedule inside the optimizer.
                values["lr"] = float(lr_schedule(step))
                timing = progress.tick(done)
                values.update(timing)
                writer.write("train", done, values)
                progress.line(done, values, timing)
                accumulated, interval_start = None, done + 1
            epoch_end = done % t.steps_per_epoch == 0 or done == t.total_steps
            top1 = evaluate_epoch(state, done) if epoch_end else None
            if epoch_end or done % t.checkpoint_every == 0:
                meta["train_seconds"] = elapsed_before + time.perf_counter() - run_start
                meta["step"] = done
                manager.save(done, state, data_iter, meta, ema_top1=top1)
                progress.restart()  # img/s measures training steps, not evaluation or saving
    finally:
        manager.close()
        writer.close()
        data_iter.close()  # stops grain worker processes and frees their shared memory
    return meta


def _check_finite(values, first_step, last_step, writer, checkpoint_dir) -> None:
    """The NaN guard: stops the run before a non-finite state can be checkpointed."""
    if math.isfinite(values["loss"]) and math.isfinite(values["param_norm"]):
        return
    writer.write("train", last_step, values)
    raise NonFiniteLossError(
        f"Non-finite loss or parameters between steps {first_step} and {last_step} "
        f"(loss={values['loss']}, param_norm={values['param_norm']}). The last good checkpoint "
        f"in {checkpoint_dir} is untouched; lower the learning rate or check the data before "
        "resuming."
    )


def _evaluate_epoch(state, done, *, model, data, config, writer, meta, workdir, embed_epochs):
    """EMA evaluation at an epoch end (§4.4): logs top-1/5, best and mean of the last N."""
    t = config.train
    epoch = math.ceil(done / t.steps_per_epoch)
    result, arrays = inference.evaluate(
        model,
        state.ema_params,
        state.ema_batch_stats,
        data_lib.test_batches(data.test, config.data.eval_batch_size),
    )
    history = meta.setdefault("eval_top1_history", [])
    history.append(result["top1"])
    meta["best_top1"] = max(history)
    meta["mean_top1_last"] = float(np.mean(history[-t.mean_of_last :]))
    record = dict(
        result, epoch=epoch, best_top1=meta["best_top1"], mean_top1_last=meta["mean_top1_last"]
    )
    peak = devices.peak_device_memory_bytes()
    if peak is not None:
        record["peak_device_memory_bytes"] = peak
    writer.write("eval", done, record)
    print(
        f"[epoch {epoch}] EMA top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  best "
        f"{meta['best_top1']:.2f}  mean(last {t.mean_of_last}) {meta['mean_top1_last']:.2f}",
        flush=True,
    )
    if epoch in embed_epochs and "embeddings" in arrays:
        _save_epoch_embeddings(workdir, epoch, done, arrays, data)
    return result["top1"]


def _save_epoch_embeddings(workdir, epoch, step, arrays, data) -> None:
    out = os.path.join(workdir, "embeddings")
    os.makedirs(out, exist_ok=True)
    np.savez_compressed(
        os.path.join(out, f"epoch_{epoch:04d}.npz"),
        embeddings=arrays["embeddings"],
        labels=arrays["labels"],
        predictions=np.argmax(arrays["logits"], axis=1).astype(np.int32),
        class_names=np.asarray(data.class_names),
        epoch=np.int32(epoch),
        step=np.int32(step),
    )
