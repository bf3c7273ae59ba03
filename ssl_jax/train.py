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
import copy
import dataclasses
import functools
import logging
import math
import os
import signal
import sys
import threading
import time
import types
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
from ssl_jax.data import on_device, protocols
from ssl_jax.data.normalize import to_network_input
from ssl_jax.data.protocols import write_split_json
from ssl_jax.data.sources import ImagePool
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


# ------------------------------------------------------------------------------ the seeds


def seeds_of(config: ml_collections.ConfigDict) -> list[int]:
    """The seeds a run trains: config.seed ... config.seed + num_seeds - 1."""
    first = int(config.seed)
    return list(range(first, first + int(config.get("num_seeds", 1))))


def seed_dir(workdir: str, seed: int) -> str:
    """Where seed `seed`'s files of a several-seed run go."""
    return os.path.join(workdir, f"seed_{seed}")


def config_for_seed(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    """The config of the one-seed run that seed `seed` of `config` is."""
    config = copy.deepcopy(config)
    with config.unlocked():
        config.seed = int(seed)
        config.num_seeds = 1
    return config


def seed_data(data, config: ml_collections.ConfigDict, seed: int):
    """Seed `seed`'s data: its own labelled draw (`config.data.protocol`) on `data`'s split.

    `data` is the data of `config.seed`; the train/test split and the unlabelled pool are
    kept, so every seed of a run shares them (with seeded splits, `split_lists=""`, that is the
    split of `config.seed`). Data of another protocol (synthetic benchmark data) is shared.
    """
    if seed == int(config.seed) or data.protocol not in protocols.PROTOCOLS:
        return data
    whole = bool(config.data.get("unlabelled_whole_folder", False))
    pool = ImagePool(
        class_names=data.class_names,
        train=data.train,
        test=data.test,
        everything=data.unlabelled if whole else None,
        info={},
    )
    labelled, unlabelled = protocols.apply_protocol(pool, config.data, seed=seed)
    if tuple(unlabelled.files) != tuple(data.unlabelled.files):
        raise ValueError(
            f"Seed {seed}'s unlabelled pool differs from seed {config.seed}'s; several seeds in "
            "one program share one unlabelled pool and test set."
        )
    unlabelled = data.unlabelled  # the same images: held once
    split_hash = protocols.compute_split_hash(
        data.class_names, data.train, data.test, labelled, unlabelled
    )
    return dataclasses.replace(
        data,
        labelled=labelled,
        unlabelled=unlabelled,
        split_hash=split_hash,
        info={**data.info, "seed": int(seed)},
    )


def stack_seeds(trees):
    """One tree with a leading seed axis from one tree per seed."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def seed_slice(tree, index: int):
    """Seed number `index` (0-based) of a tree with a leading seed axis."""
    return jax.tree.map(lambda x: x[index], tree)


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
    seeds: list[int] = dataclasses.field(default_factory=list)  # [config.seed] for one seed
    seed_datas: list = dataclasses.field(default_factory=list)  # each seed's data (seed_data)

    @property
    def num_seeds(self) -> int:
        return max(1, len(self.seeds))

    def _index_maker(self, data, seed: int):
        return data_lib.BatchMaker(
            data.labelled,
            data.unlabelled,
            seed=int(seed),
            batch_size=int(self.config.data.batch_size),
            mu=int(self.config.data.mu),
            views=self.setup.algorithm.unlabelled_views,
            mode="indices",
        )

    def shard(self, block):
        """A block on the devices (`dispatch.shard_block`, with the seed axis if there is one)."""
        if self.num_seeds > 1:
            return dispatch.shard_block(block, self.mesh, seeds=True)
        return dispatch.shard_block(block, self.mesh)

    def block_source(self, start_step: int) -> dispatch.BlockSource:
        """Blocks of K steps from `start_step`: index blocks, or K grain host batches.

        Several seeds: each step's index batches of all seeds, stacked on axis 1 of the block.
        """
        views = self.setup.algorithm.unlabelled_views
        if self.where == "device" and self.num_seeds > 1:
            pairs = zip(self.seed_datas, self.seeds, strict=True)
            makers = [self._index_maker(d, s) for d, s in pairs]

            def make_batch(step):
                return dispatch.stack_steps([maker(step) for maker in makers])

            return dispatch.BlockSource(
                steps_per_dispatch=self.steps_per_dispatch,
                start_step=start_step,
                make_batch=make_batch,
            )
        if self.where == "device":
            maker = self._index_maker(self.data, int(self.config.seed))
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
    where = resolve_augment_where(config)
    seeds = seeds_of(config)
    if len(seeds) > 1 and where != "device":
        raise ValueError(
            f"config.num_seeds={len(seeds)} trains the seeds together in one program, which "
            "needs augmentation on the device: add --config.augment.where=device (on a CPU "
            "the default 'auto' means host), or train the seeds as separate runs."
        )
    setup = train_state.setup(config, len(data.class_names), platform=platform)
    algorithm = setup.algorithm
    k = dispatch.resolve_steps_per_dispatch(config.train, where)
    seed_datas = [data] if len(seeds) == 1 else [seed_data(data, config, s) for s in seeds]
    device_data, augment_fn, seed_axes = None, None, None
    if where == "device" and len(seeds) > 1:
        augment_fn = on_device.make_augment_fn(config, algorithm.unlabelled_views)
        device_data, seed_axes = on_device.device_cache_seeds(seed_datas), on_device.SEED_AXES
        one_seed_data = {  # one seed's shapes, for the step's abstract evaluation below
            "labelled": jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), device_data["labelled"]
            ),
            "unlabelled": device_data["unlabelled"],
        }
    elif where == "device":
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
        program=dispatch.make_multi_step(
            step_fn, log_every=config.train.log_every, mesh=mesh, seed_axes=seed_axes
        ),
        device_data=None if device_data is None else devices.replicate(device_data, mesh),
        metric_names=[],
        seeds=seeds,
        seed_datas=seed_datas,
    )
    training.metric_names = dispatch.metric_names(
        step_fn,
        setup.state,
        _step_spec(training),
        device_data if len(seeds) == 1 else one_seed_data,
    )
    empty = dispatch.empty_metric_sums(training.metric_names)
    state = setup.state.replace(metric_sums=empty)
    if len(seeds) > 1:
        num_classes = len(data.class_names)
        states = [state] + [
            train_state.create_train_state(
                config_for_seed(config, s), setup.model, algorithm, setup.tx, num_classes
            ).replace(metric_sums=empty)
            for s in seeds[1:]
        ]
        state = stack_seeds(states)
    training.setup = setup._replace(state=state)
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
    meta["split_hash"] = data.split_hash
    if several:
        meta["split_hashes"] = hashes
        for seed, seed_data_ in zip(training.seeds, training.seed_datas, strict=True):
            os.makedirs(seed_dir(workdir, seed), exist_ok=True)
            write_split_json(seed_data_, os.path.join(seed_dir(workdir, seed), "split.json"))
    else:
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
    if several:
        writers = [
            metric_writers.MetricWriter(seed_dir(workdir, s), start_step=start_step)
            for s in training.seeds
        ]
    else:
        writers = [metric_writers.MetricWriter(workdir, start_step=start_step)]
    if start_step == 0:
        for i, writer in enumerate(writers):
            writer.write("run", 0, _run_record(training, state, i))
    else:
        print(f"Resuming from step {start_step} ({workdir}).", flush=True)
    if changes:
        for writer in writers:
            writer.write("resume_changes", start_step, {"changes": changes})
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
    progress = metric_writers.Progress(t.total_steps, per_step, start_step)
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
            _check_finite_seeds(
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
            for i in range(len(seeds)):
                ema = (
                    state
                    if not several
                    else types.SimpleNamespace(
                        ema_params=seed_slice(state.ema_params, i),
                        ema_batch_stats=seed_slice(state.ema_batch_stats, i),
                    )
                )
                top1s.append(
                    evaluate_epoch(
                        ema,
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


WATCHED = ("loss", "param_norm", "ema_param_norm")  # what the NaN guard checks


def _check_finite(values, first_step, last_step, writer, manager) -> None:
    """The NaN guard: stops the run before a non-finite state can be checkpointed.

    Checks the loss and the online and EMA parameters; says which checkpoint is the last
    good one (or that there is none) and how to continue from it with a lower learning rate.
    """
    _check_finite_seeds([values], None, first_step, last_step, [writer], manager)


def _check_finite_seeds(all_values, seeds, first_step, last_step, writers, manager) -> None:
    """The NaN guard over every seed's values (`seeds` None: one seed); names the bad seeds."""
    bad = [
        i
        for i, values in enumerate(all_values)
        if not all(math.isfinite(values[key]) for key in WATCHED if key in values)
    ]
    if not bad:
        return
    for i in bad:
        writers[i].write("train", last_step, all_values[i])
    found = "; ".join(
        (f"seed {seeds[i]}: " if seeds else "")
        + ", ".join(f"{key}={all_values[i][key]}" for key in WATCHED if key in all_values[i])
        for i in bad
    )
    where = ""
    if seeds:
        named = ", ".join(str(seeds[i]) for i in bad)
        where = f" in seed{'s' if len(bad) > 1 else ''} {named} (of seeds {seeds[0]}-{seeds[-1]})"
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
        f"Non-finite values{where} between steps {first_step} and {last_step} ({found}). {advice}"
    )


def _evaluate_epoch(
    state, done, *, model, data, config, writer, meta, workdir, embed_epochs, label=""
):
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
