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

import contextlib
import dataclasses
import functools
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from ssl_jax import checkpoint as checkpoint_lib
from ssl_jax import (
    config_checks,
    devices,
    dispatch,
    files,
    inference,
    metric_writers,
    optim,
    train_state,
    xla_cpu,
)
from ssl_jax import data as data_lib
from ssl_jax.algorithms.base import Algorithm
from ssl_jax.data import protocols
from ssl_jax.data.normalize import to_network_input
from ssl_jax.data.protocols import write_split_json
from ssl_jax.workdir_lock import WorkdirLock


class NonFiniteLossError(FloatingPointError):
    """Raised when a logged loss (or the parameters) stop being finite."""


# ------------------------------------------------------------------------------- config


def resolve_augment_where(config: ml_collections.ConfigDict) -> str:
    """`auto` means on the device wherever there is an accelerator, on the host otherwise."""
    if config.augment.where != "auto":
        return config.augment.where
    return "host" if jax.default_backend() == "cpu" else "device"


# ------------------------------------------------------------------------------ the step


def network_inputs(
    batch: Mapping[str, jax.Array], views: tuple[str, ...], *, normalize_strong1: bool, dtype
) -> jax.Array:
    """Concatenates ``[x ; views...]`` as network input; strong1 stays in [0, 1] by default
    (docs/method.md#q3-unnormalised-strong1-view)."""
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
    platform: str | None = None,
) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
    """One optimizer step of any algorithm (docs/method.md#training-step)."""
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
            platform=platform,
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
    ema_params = optim.ema_update(state.ema_params, params, config.ema.decay)
    metrics["ema_param_norm"] = optax.tree.norm(ema_params)  # the NaN guard watches both
    new_state = state.replace(
        step=step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        ema_params=ema_params,
        ema_batch_stats=batch_stats,  # buffers are copied, not averaged
        algo_state=algo_state,
    )
    return new_state, metrics


def make_train_step(config, model, algorithm, tx, augment_fn=None, mesh: Mesh | None = None):
    """One step jitted alone, the state donated (benchmarks and tests; the loop runs K)."""
    step = functools.partial(
        train_step, model=model, algorithm=algorithm, tx=tx, config=config, augment_fn=augment_fn
    )
    if mesh is None:
        return jax.jit(step, donate_argnums=(0,))
    replicated = devices.replicated(mesh)
    return jax.jit(step, donate_argnums=(0,), out_shardings=(replicated, replicated))


# ------------------------------------------------------------------------------- the loop


class Preempted(SystemExit):
    """SIGTERM stopped the run at a dispatch boundary, after a checkpoint; rerun to resume."""


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """The resolved config beside the checkpoints, so eval needs nothing else."""
    files.atomic_write_text(
        config.to_json_best_effort(indent=2), os.path.join(workdir, checkpoint_lib.CONFIG_FILE)
    )


def _embeddings_epochs(config, num_epochs: int) -> set[int]:
    return {num_epochs if e == -1 else int(e) for e in config.train.save_embeddings_epochs}


def _param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


@dataclasses.dataclass
class Training:
    """One run's compiled pieces: what the loop dispatches and how its input is made."""

    config: ml_collections.ConfigDict
    data: Any
    setup: train_state.Setup
    where: str  # "host" or "device": where augmentation runs
    steps_per_dispatch: int
    mesh: Mesh
    program: Callable  # (state, block, device_data) -> state after K steps, state donated
    device_data: Any  # the device-resident uint8 pools (on-device augmentation) or None
    metric_names: list[str]

    def block_source(self, start_step: int) -> dispatch.BlockSource:
        """Blocks of K steps from `start_step`: index blocks, or K grain host batches."""
        views = self.setup.algorithm.unlabelled_views
        if self.where == "device":
            maker = data_lib.BatchMaker(
                self.data.labelled,
                self.data.unlabelled,
                seed=int(self.config.seed),
                batch_size=int(self.config.data.batch_size),
                mu=int(self.config.data.mu),
                views=views,
                mode="indices",
            )
            return dispatch.BlockSource(
                steps_per_dispatch=self.steps_per_dispatch, start_step=start_step, make_batch=maker
            )
        iterator = data_lib.train_iterator(
            self.data, self.config, views=views, start_step=start_step, mode="host"
        )
        return dispatch.BlockSource(
            steps_per_dispatch=self.steps_per_dispatch, start_step=start_step, iterator=iterator
        )


def make_step_fn(config, setup: train_state.Setup, augment_fn=None, *, platform=None):
    """The one generic train step bound to a run's model, algorithm, optimizer and platform."""
    return functools.partial(
        train_step,
        model=setup.model,
        algorithm=setup.algorithm,
        tx=setup.tx,
        config=config,
        augment_fn=augment_fn,
        platform=platform,
    )


def prepare_training(config: ml_collections.ConfigDict, data, *, platform: str | None = None):
    """Model, optimizer, initial state (with empty metric sums) and the K-step program.

    `platform` (None: jax's default) is the one platform value the model's convolutions
    and the losses are built for.
    """
    platform = platform or xla_cpu.default_platform()
    setup = train_state.setup(config, len(data.class_names), platform=platform)
    algorithm = setup.algorithm
    where = resolve_augment_where(config)
    k = dispatch.resolve_steps_per_dispatch(config.train, where)
    device_data, augment_fn = None, None
    if where == "device":
        device_data, augment_fn = data_lib.device_augment_views(
            data, config, algorithm.unlabelled_views
        )
    mesh = devices.make_mesh()
    step_fn = make_step_fn(config, setup, augment_fn, platform=platform)
    training = Training(
        config=config,
        data=data,
        setup=setup,
        where=where,
        steps_per_dispatch=k,
        mesh=mesh,
        program=dispatch.make_multi_step(step_fn, log_every=config.train.log_every, mesh=mesh),
        device_data=None if device_data is None else devices.replicate(device_data, mesh),
        metric_names=[],
    )
    training.metric_names = dispatch.metric_names(
        step_fn, setup.state, _step_spec(training), device_data
    )
    empty = dispatch.empty_metric_sums(training.metric_names)
    training.setup = setup._replace(state=setup.state.replace(metric_sums=empty))
    return training


def _step_spec(training: Training) -> dict:
    """Shapes and dtypes of one step's batch, without augmenting anything."""
    views = training.setup.algorithm.unlabelled_views
    data_cfg = training.config.data
    maker = data_lib.BatchMaker(
        training.data.labelled,
        training.data.unlabelled,
        seed=int(training.config.seed),
        batch_size=int(data_cfg.batch_size),
        mu=int(data_cfg.mu),
        views=views,
        mode="indices",
    )
    spec = {key: jax.ShapeDtypeStruct(v.shape, v.dtype) for key, v in maker(0).items()}
    if training.where == "host":
        size = int(data_cfg.crop_size)
        for view, rows in (
            ("x", data_cfg.batch_size),
            *((v, data_cfg.mu * data_cfg.batch_size) for v in views),
        ):
            spec[view] = jax.ShapeDtypeStruct((rows, size, size, 3), np.uint8)
    return spec


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, data=None) -> dict:
    """Trains (resuming from the latest checkpoint in `workdir`), evaluating the EMA each epoch.

    One run per workdir: a second run on the same workdir fails at once (`WorkdirLock`).
    `data` (a `SemiSupervisedData`) replaces `config.data` as the source, for benchmarks.
    """
    config_checks.validate_config(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    with WorkdirLock(workdir), _stop_on_sigterm() as stop:
        return _train(config, workdir, data, stop)


def _train(config, workdir, data, stop) -> dict:
    changes = checkpoint_lib.check_config_compatible(config, workdir) or []
    config.data.name = protocols.dataset_name(config.data)
    save_config(config, workdir)
    if data is None:
        data = data_lib.load_dataset(config, workdir=workdir, write_split=False)
    training = prepare_training(config, data)
    manager = checkpoint_lib.Checkpointer(workdir, config)
    try:
        state, meta = manager.restore_or_keep(training.setup.state)
    except BaseException:
        _close_quietly(manager)
        raise
    start_step = int(state.step)
    if meta.get("split_hash", data.split_hash) != data.split_hash:
        manager.close()
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
        return meta

    state = devices.replicate(state, training.mesh)
    writer = metric_writers.MetricWriter(workdir, start_step=start_step)
    if start_step == 0:
        writer.write("run", 0, _run_record(training, state))
    else:
        print(f"Resuming from step {start_step} ({workdir}).", flush=True)
    if changes:
        writer.write("resume_changes", start_step, {"changes": changes})
        print(f"Resuming with changed settings: {changes}", flush=True)
    source = training.block_source(start_step)
    try:
        _, meta = run_loop(
            training,
            state,
            source,
            manager=manager,
            writer=writer,
            meta=meta,
            workdir=workdir,
            stop=stop,
        )
    except BaseException:
        writer.close()
        source.close()
        _close_quietly(manager)  # the error in flight is the one to report
        raise
    writer.close()
    source.close()  # stops grain worker processes and frees their shared memory
    manager.close()  # waits for the last save; raises if it failed
    return meta


def _close_quietly(manager) -> None:
    try:
        manager.close()
    except Exception as err:  # noqa: BLE001 - reported, not raised over the first error
        print(f"While stopping: {err}", file=sys.stderr, flush=True)


def _run_record(training: Training, state) -> dict:
    data = training.data
    return {
        "protocol": data.protocol,
        "split_hash": data.split_hash,
        "num_labelled": len(data.labelled.labels),
        "num_unlabelled": len(data.unlabelled.labels),
        "num_test": len(data.test.labels),
        "num_params": _param_count(state.params),
        "augment_where": training.where,
        "steps_per_dispatch": training.steps_per_dispatch,
        "device": str(jax.devices()[0]),
        "jax_version": jax.__version__,
    }


def run_loop(
    training: Training,
    state,
    source,
    *,
    manager,
    writer,
    meta,
    workdir,
    stop=None,
    evaluate=True,
    stop_step: int | None = None,
):
    """Dispatches K steps at a time from `state.step` to `stop_step` (default: the end), with
    logging, evaluation and checkpoints on the boundaries; returns (state, meta).

    The host's per-dispatch work: make the next block (while the device runs the current
    one) and, at boundaries only, read the metric sums. `benchmarks/loop_throughput.py` times
    this function itself (no `manager`: no checkpoints; `evaluate=False`: no evaluation).
    """
    config, t = training.config, training.config.train
    k = training.steps_per_dispatch
    start_step = int(state.step)
    per_step = train_state.images_per_step(config, training.setup.algorithm)
    progress = metric_writers.Progress(t.total_steps, per_step, start_step)
    num_epochs = math.ceil(t.total_steps / t.steps_per_epoch)
    interval_start = start_step - start_step % t.log_every + 1
    elapsed_before = float(meta.get("train_seconds", 0.0))
    run_start = time.perf_counter()
    evaluate_epoch = functools.partial(
        _evaluate_epoch,
        model=training.setup.model,
        data=training.data,
        config=config,
        writer=writer,
        meta=meta,
        workdir=workdir,
        embed_epochs=_embeddings_epochs(config, num_epochs),
    )
    lr_schedule = jax.jit(training.setup.lr_schedule)  # eager optax: ~20 ms on a CPU
    end = t.total_steps if stop_step is None else int(stop_step)
    block = source.next_block()
    for first in range(start_step, end, k):
        state = training.program(
            state, dispatch.shard_block(block, training.mesh), training.device_data
        )
        done = first + k
        if done < end:
            block = source.next_block()  # made on the host while the device runs
        if manager is not None:
            manager.check_saves()
        saved = False
        if done % t.log_every == 0 or done == t.total_steps:
            values = dispatch.read_metric_sums(state.metric_sums)
            _check_finite(values, interval_start, done, writer, manager)
            # The lr of the interval's last update, from the schedule inside the optimizer.
            values["lr"] = float(lr_schedule(done - 1))
            timing = progress.tick(done)
            values.update(timing)
            writer.write("train", done, values)
            progress.line(done, values, timing)
            interval_start = done + 1
        epoch_end = done % t.steps_per_epoch == 0 or done == t.total_steps
        top1 = evaluate_epoch(state, done) if epoch_end and evaluate else None
        preempted = stop is not None and stop.is_set()
        if manager is not None and (epoch_end or done % t.checkpoint_every == 0 or preempted):
            meta["train_seconds"] = elapsed_before + time.perf_counter() - run_start
            meta["step"] = done
            manager.save(done, state, meta, ema_top1=top1)
            saved = True
            progress.restart()  # img/s measures training steps, not evaluation or saving
        if preempted and done < t.total_steps:
            if manager is not None:
                manager.close()
            raise Preempted(
                f"Stopped by SIGTERM after step {done} of {t.total_steps}"
                + (f"; checkpoint {done} written to {manager.directory}" if saved else "")
                + ". Rerun the same command to resume exactly from there."
            )
    return state, meta


@contextlib.contextmanager
def _stop_on_sigterm():
    """SIGTERM (preemption) sets a flag the loop reads at the next dispatch boundary."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        print(
            "SIGTERM received: stopping at the next dispatch boundary.", file=sys.stderr, flush=True
        )
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_finite(values, first_step, last_step, writer, manager) -> None:
    """The NaN guard: stops the run before a non-finite state can be checkpointed.

    Checks the loss and the online and EMA parameters; says which checkpoint is the last
    good one (or that there is none) and how to continue from it with a lower learning rate.
    """
    watched = ("loss", "param_norm", "ema_param_norm")
    if all(math.isfinite(values[key]) for key in watched if key in values):
        return
    writer.write("train", last_step, values)
    found = ", ".join(f"{key}={values[key]}" for key in watched if key in values)
    last = None if manager is None else manager.latest_step()
    if last is None:
        advice = (
            "No checkpoint was written before this, so there is nothing to resume: lower "
            "optim.lr (or check the data) and start again in this workdir."
        )
    else:
        advice = (
            f"The last good checkpoint is step {last} in {manager.directory} (untouched). "
            "To continue from it with a lower learning rate, rerun with e.g. "
            "--config.optim.lr=<lower> --config.train.resume_changes='(\"optim.lr\",)'; "
            "the change is recorded in metrics.jsonl and config.json."
        )
    raise NonFiniteLossError(
        f"Non-finite values between steps {first_step} and {last_step} ({found}). {advice}"
    )


def _evaluate_epoch(state, done, *, model, data, config, writer, meta, workdir, embed_epochs):
    """EMA evaluation at an epoch end (docs/method.md#evaluation): logs top-1/5, best and mean of
    the last N."""
    t = config.train
    epoch = math.ceil(done / t.steps_per_epoch)
    result, arrays = inference.evaluate(
        model,
        state.ema_params,
        state.ema_batch_stats,
        data_lib.test_batches(
            data.test, config.data.eval_batch_size, crop_size=config.data.crop_size
        ),
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
