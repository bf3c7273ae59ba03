"""A run's compiled pieces: model, optimizer, state, the K-step program and its input blocks.

`prepare_training(config, data, platform=None)` builds them once per run; `train.run_loop`
dispatches the program, and `benchmarks/loop_throughput.py` times the same objects.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from ssl_jax import data as data_lib
from ssl_jax import (
    devices,
    dispatch,
    loop_convolutions,
    train_state,
    xla_cpu,
)
from ssl_jax.data import on_device
from ssl_jax.seeds import (
    seed_data,
    seeds_of,
    stack_seeds,
)
from ssl_jax.step import resolve_augment_where, train_step


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

    @property
    def part(self) -> tuple[int, int] | None:
        """(p, P): in a P-process run this process makes only its rows of each batch."""
        if not self.mesh.is_multi_process:
            return None
        return jax.process_index(), jax.process_count()

    def _index_maker(self, data, seed: int):
        return data_lib.BatchMaker(
            data.labelled,
            data.unlabelled,
            seed=int(seed),
            batch_size=int(self.config.data.batch_size),
            mu=int(self.config.data.mu),
            views=self.setup.algorithm.unlabelled_views,
            mode="indices",
            part=self.part,
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
            self.data, self.config, views=views, start_step=start_step, mode="host", part=self.part
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
    # With several seeds their initial states are made together below (one compiled program).
    num_classes = len(data.class_names)
    setup = train_state.setup(config, num_classes, platform=platform, abstract=len(seeds) > 1)
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
    if mesh.is_multi_process:  # each process makes one equal, contiguous part of every batch
        for rows in (config.data.batch_size, config.data.batch_size * config.data.mu):
            mine = devices.process_rows(mesh, int(rows))
            part = int(rows) // jax.process_count()
            if (mine.start, mine.stop - mine.start) != (jax.process_index() * part, part):
                raise ValueError(
                    "Every process must have the same number of devices, listed in process "
                    f"order; this process holds rows {mine} of {rows}."
                )
    step_fn = make_step_fn(config, setup, augment_fn, platform=platform)
    if platform == "cpu":  # XLA:CPU's scan bodies run autodiff's convolutions slowly otherwise
        step_fn = loop_convolutions.canonical_convolutions(step_fn)
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
    if len(seeds) > 1:
        states = train_state.create_train_states(
            config, setup.model, algorithm, setup.tx, num_classes, seeds
        )
        state = stack_seeds([each.replace(metric_sums=empty) for each in states])
    else:
        state = setup.state.replace(metric_sums=empty)
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
