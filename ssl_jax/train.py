"""One generic jitted train step for every algorithm, and the training loop.

The step (`train_step`) is a module-level pure function: it forwards the concatenated batch
``[x ; unlabelled views]`` through the model once, hands the outputs to the algorithm's pure
``loss_from_outputs`` (which also advances the algorithm's state: memory bank, DA history),
applies SGD and the EMA. It is jitted once with the state donated; the per-step randomness
(device augmentation) is ``fold_in(state.rng, step)``, so a resumed run is bit-identical.
The state and its construction are in `ssl_jax.train_state`, inference in `ssl_jax.inference`,
the mesh and sharding in `ssl_jax.devices`.

Several seeds in one program (`config.num_seeds` = N > 1, on-device augmentation only): seeds
`config.seed ... config.seed + N - 1` train together, every leaf of the train state carrying a
leading seed axis, the step vmapped over it inside the one K-step program
(`dispatch.make_multi_step(..., seed_axes=...)`). Each seed is the run it would be alone: its
own initialisation (`PRNGKey(seed)`), labelled draw, data order and augmentation keys, on the
train/test split of `config.seed` (`seed_data`). Each seed's metrics.jsonl, split.json,
embeddings and evaluations sit in `<workdir>/seed_<s>/`; one checkpoint holds the stacked state.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
import time

import jax
import ml_collections
import numpy as np

from ssl_jax import checkpoint as checkpoint_lib
from ssl_jax import (
    config_checks,
    devices,
    dispatch,
    distributed,
    files,
    inference,
    metric_writers,
    run_guards,
    train_state,
)
from ssl_jax import data as data_lib
from ssl_jax.data import protocols
from ssl_jax.data.protocols import write_split_json

# Re-exported: the step, the seeds and the program used to live here, and callers use them so.
from ssl_jax.program import (
    Training,
    make_step_fn,  # noqa: E402,F401
    prepare_training,
)
from ssl_jax.run_guards import NonFiniteLossError, Preempted  # noqa: F401 - re-exported
from ssl_jax.seeds import (  # noqa: E402,F401
    config_for_seed,
    seed_data,
    seed_dir,
    seed_slice,
    seeds_of,
    stack_seeds,
)
from ssl_jax.step import (  # noqa: E402,F401
    make_train_step,
    network_inputs,
    resolve_augment_where,
    train_step,
)
from ssl_jax.workdir_lock import WorkdirLock

# ------------------------------------------------------------------------------- config


# ------------------------------------------------------------------------------- the loop


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """The resolved config beside the checkpoints, so eval needs nothing else."""
    files.atomic_write_text(
        config.to_json_best_effort(indent=2), os.path.join(workdir, checkpoint_lib.CONFIG_FILE)
    )


def _embeddings_epochs(config, num_epochs: int) -> set[int]:
    return {num_epochs if e == -1 else int(e) for e in config.train.save_embeddings_epochs}


def _param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, data=None) -> dict:
    """Trains (resuming from the latest checkpoint in `workdir`), evaluating the EMA each epoch.

    One run per workdir: a second run on the same workdir fails at once (`WorkdirLock`).
    `data` (a `SemiSupervisedData`) replaces `config.data` as the source, for benchmarks.
    """
    config_checks.validate_config(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    with _lock(workdir), run_guards.stop_on_sigterm() as stop:
        return _train(config, workdir, data, stop)


@contextlib.contextmanager
def _lock(workdir: str):
    """The workdir lock; in a multi-process run process 0 holds it, and every process learns
    whether it was taken, so that none trains without it."""
    lock = WorkdirLock(workdir)
    if not distributed.multi_process():
        with lock:
            yield
        return
    error = None
    if distributed.is_primary():
        try:
            lock.acquire()
        except Exception as err:  # noqa: BLE001 - raised below, in every process
            error = err
    try:
        if distributed.any_process(error is not None):
            raise error or RuntimeError(f"Process 0 could not lock {workdir}; see its output.")
        yield
    finally:
        lock.release()


def _train(config, workdir, data, stop) -> dict:
    changes = checkpoint_lib.check_config_compatible(config, workdir) or []
    config.data.name = protocols.dataset_name(config.data)
    primary = distributed.is_primary()
    if primary:
        save_config(config, workdir)
    distributed.barrier("ssl_jax_config_saved")  # every process read the old config first
    if data is None:
        data = data_lib.load_dataset(config, workdir=workdir, write_split=False)
    training = prepare_training(config, data)
    several = training.num_seeds > 1
    manager = checkpoint_lib.Checkpointer(workdir, config)
    try:
        state, meta = manager.restore_or_keep(training.setup.state)
    except BaseException:
        _close_quietly(manager)
        raise
    start_step = int(state.step if not several else state.step[0])
    hashes = [d.split_hash for d in training.seed_datas] if several else None
    if meta.get("split_hash", data.split_hash) != data.split_hash or (
        several and meta.get("split_hashes", hashes) != hashes
    ):
        manager.close()
        raise checkpoint_lib.CheckpointError(
            f"The data changed since {workdir} was checkpointed: split hash "
            f"{meta.get('split_hashes', meta['split_hash'])} then, {hashes or data.split_hash} "
            "now (see split.json). Resuming would train on different images; restore the data "
            "or use a new --workdir."
        )
    processes = int(meta.get("process_count", 1))
    if start_step > 0 and processes != jax.process_count():
        manager.close()
        raise checkpoint_lib.CheckpointError(
            f"{workdir} was trained by {processes} process(es) and this run has "
            f"{jax.process_count()}: resuming with another process count is not supported "
            "(the batch would be split differently). Rerun with the same processes, or "
            "evaluate the checkpoint (--mode eval works in one process)."
        )
    meta["process_count"] = jax.process_count()
    meta["split_hash"] = data.split_hash
    if several:
        meta["split_hashes"] = hashes
    if several and primary:
        for seed, seed_data_ in zip(training.seeds, training.seed_datas, strict=True):
            os.makedirs(seed_dir(workdir, seed), exist_ok=True)
            write_split_json(seed_data_, os.path.join(seed_dir(workdir, seed), "split.json"))
    elif primary:
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
    if not primary:  # process 0 writes the run's files and prints its progress
        writers = [metric_writers.NullWriter() for _ in range(training.num_seeds)]
    elif several:
        writers = [
            metric_writers.MetricWriter(seed_dir(workdir, s), start_step=start_step)
            for s in training.seeds
        ]
    else:
        writers = [metric_writers.MetricWriter(workdir, start_step=start_step)]
    if start_step == 0:
        for i, writer in enumerate(writers):
            writer.write("run", 0, _run_record(training, state, i))
    elif primary:
        print(f"Resuming from step {start_step} ({workdir}).", flush=True)
    if changes:
        for writer in writers:
            writer.write("resume_changes", start_step, {"changes": changes})
        if primary:
            print(f"Resuming with changed settings: {changes}", flush=True)
    source = training.block_source(start_step)
    try:
        _, meta = run_loop(
            training,
            state,
            source,
            manager=manager,
            writer=writers if several else writers[0],
            meta=meta,
            workdir=workdir,
            stop=stop,
        )
    except BaseException:
        for writer in writers:
            writer.close()
        source.close()
        _close_quietly(manager)  # the error in flight is the one to report
        raise
    for writer in writers:
        writer.close()
    source.close()  # stops grain worker processes and frees their shared memory
    manager.close()  # waits for the last save; raises if it failed
    return meta


def _close_quietly(manager) -> None:
    try:
        manager.close()
    except Exception as err:  # noqa: BLE001 - reported, not raised over the first error
        print(f"While stopping: {err}", file=sys.stderr, flush=True)


def _run_record(training: Training, state, index: int = 0) -> dict:
    """The "run" row of seed number `index` (0-based) of the run."""
    several = training.num_seeds > 1
    data = training.seed_datas[index] if several else training.data
    record = {
        "protocol": data.protocol,
        "split_hash": data.split_hash,
        "num_labelled": len(data.labelled.labels),
        "num_unlabelled": len(data.unlabelled.labels),
        "num_test": len(data.test.labels),
        "num_params": _param_count(seed_slice(state.params, 0) if several else state.params),
        "augment_where": training.where,
        "steps_per_dispatch": training.steps_per_dispatch,
        "device": str(jax.devices()[0]),
        "process_count": jax.process_count(),
        "global_device_count": jax.device_count(),
        "jax_version": jax.__version__,
    }
    if several:
        record.update(seed=training.seeds[index], num_seeds=training.num_seeds)
    return record


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
    Several seeds: `writer` is one MetricWriter per seed (or one for all); each seed's
    evaluation history is `meta["seeds"][str(seed)]`, and the checkpoint's EMA top-1 is the
    mean over the seeds.
    """
    config, t = training.config, training.config.train
    k = training.steps_per_dispatch
    several = training.num_seeds > 1
    seeds = training.seeds if several else [int(config.seed)]
    writers = list(writer) if isinstance(writer, list | tuple) else [writer] * len(seeds)
    if several:
        per_seed = meta.setdefault("seeds", {})
        metas = [per_seed.setdefault(str(s), {}) for s in seeds]
        datas = training.seed_datas
        workdirs = [seed_dir(workdir, s) for s in seeds]
    else:
        metas, datas, workdirs = [meta], [training.data], [workdir]
    start_step = int(state.step[0] if several else state.step)
    per_step = train_state.images_per_step(config, training.setup.algorithm) * len(seeds)
    primary = distributed.is_primary()
    progress = metric_writers.Progress(t.total_steps, per_step, start_step, quiet=not primary)
    num_epochs = math.ceil(t.total_steps / t.steps_per_epoch)
    interval_start = start_step - start_step % t.log_every + 1
    elapsed_before = float(meta.get("train_seconds", 0.0))
    run_start = time.perf_counter()
    evaluate_epoch = functools.partial(
        _evaluate_epoch,
        model=training.setup.model,
        config=config,
        embed_epochs=_embeddings_epochs(config, num_epochs),
    )
    lr_schedule = jax.jit(training.setup.lr_schedule)  # eager optax: ~20 ms on a CPU
    end = t.total_steps if stop_step is None else int(stop_step)
    block = source.next_block()
    for first in range(start_step, end, k):
        state = training.program(state, training.shard(block), training.device_data)
        done = first + k
        if done < end:
            block = source.next_block()  # made on the host while the device runs
        if manager is not None:
            manager.check_saves()
        saved = False
        if done % t.log_every == 0 or done == t.total_steps:
            if several:
                all_values = dispatch.read_metric_sums_per_seed(state.metric_sums)
            else:
                all_values = [dispatch.read_metric_sums(state.metric_sums)]
            run_guards.check_finite_seeds(
                all_values, seeds if several else None, interval_start, done, writers, manager
            )
            # The lr of the interval's last update, from the schedule inside the optimizer.
            lr = float(lr_schedule(done - 1))
            timing = progress.tick(done)
            for i, values in enumerate(all_values):
                values["lr"] = lr
                values.update(timing)
                writers[i].write("train", done, values)
                progress.line(done, values, timing, label=f"seed {seeds[i]}" if several else "")
            interval_start = done + 1
        epoch_end = done % t.steps_per_epoch == 0 or done == t.total_steps
        top1 = None
        if epoch_end and evaluate:
            top1s = []
            # Every process evaluates its own copy (no collectives); process 0 writes.
            ema = distributed.local_copy((state.ema_params, state.ema_batch_stats))
            for i in range(len(seeds)):
                top1s.append(
                    evaluate_epoch(
                        *(seed_slice(ema, i) if several else ema),
                        done,
                        data=datas[i],
                        writer=writers[i],
                        meta=metas[i],
                        workdir=workdirs[i],
                        label=f"seed {seeds[i]} " if several else "",
                    )
                )
            top1 = float(np.mean(top1s)) if several else top1s[0]
            if several:  # the run's numbers: means over the seeds
                for key in ("best_top1", "mean_top1_last"):
                    meta[key] = float(np.mean([m[key] for m in metas]))
        # A SIGTERM that reached any process stops every process at this same boundary.
        preempted = distributed.any_process(stop is not None and stop.is_set())
        if manager is not None and (epoch_end or done % t.checkpoint_every == 0 or preempted):
            meta["train_seconds"] = elapsed_before + time.perf_counter() - run_start
            meta["step"] = done
            manager.save(done, state, meta, ema_top1=top1)
            saved = True
            progress.restart()  # img/s measures training steps, not evaluation or saving
        if preempted and done < t.total_steps:
            if manager is not None:
                manager.close()
            raise run_guards.Preempted(
                f"Stopped by SIGTERM after step {done} of {t.total_steps}"
                + (f"; checkpoint {done} written to {manager.directory}" if saved else "")
                + ". Rerun the same command to resume exactly from there."
            )
    return state, meta


def _evaluate_epoch(
    ema_params,
    ema_batch_stats,
    done,
    *,
    model,
    data,
    config,
    writer,
    meta,
    workdir,
    embed_epochs,
    label="",
):
    """EMA evaluation at an epoch end (docs/method.md#evaluation): logs top-1/5, best and mean of
    the last N."""
    t = config.train
    epoch = math.ceil(done / t.steps_per_epoch)
    result, arrays = inference.evaluate(
        model,
        ema_params,
        ema_batch_stats,
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
    if not distributed.is_primary():
        return result["top1"]
    print(
        f"[{label}epoch {epoch}] EMA top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  best "
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
