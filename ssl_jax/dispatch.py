"""K training steps per dispatch: the program the accelerator runs between two visits of the host.

The host visits the device once every K steps (`config.train.steps_per_dispatch`): it hands
over one block of K steps' input (sample indices for on-device augmentation, or K augmented
host batches) and gets back nothing until a log, evaluation or checkpoint boundary. Inside
the program a `jax.lax.scan` runs the one generic train step K times, and every step adds its
logged values into `clu.metrics.Average` sums carried in the train state (`metric_sums`); a
step that starts a logging interval (`step % log_every == 0`) starts from empty sums, so the
host reads an interval's sums once, in one transfer, at its end, and a checkpoint taken
mid-interval (preemption) holds the partial sums.

How K is chosen (`resolve_steps_per_dispatch`): a K the user sets must divide
`train.log_every`, `train.steps_per_epoch`, `train.checkpoint_every` and `train.total_steps`
(logging, evaluation and checkpoints fall on dispatch boundaries); otherwise the run is
refused naming the values to change. K = 0 (the default) resolves to the largest divisor of
all four that is at most `AUTO_MAX_STEPS_PER_DISPATCH[where]`: 64 with on-device augmentation
(a block is a few kB of indices), 8 with host augmentation (a block holds K augmented
batches in host and device memory).

Several seeds in one program (`config.num_seeds` = N > 1, see `ssl_jax.train`): the train
state, the metric sums and each step's batch carry a leading seed axis, and the per-step body
(the step plus its metric sums) is `jax.vmap`-ed over it inside the one scan, so one jitted
program trains all N; a block is then (K, N, ...) and `shard_block(..., seeds=True)` splits
its batch axis (axis 2) over the mesh.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ssl_jax import devices

AUTO_MAX_STEPS_PER_DISPATCH = {"device": 64, "host": 8}
BOUNDARY_KEYS = ("log_every", "steps_per_epoch", "checkpoint_every", "total_steps")

MetricSums = dict[str, clu_metrics.Average]


def resolve_steps_per_dispatch(train_config, where: str) -> int:
    """K: the user's value, validated, or the largest K that divides every boundary (see above)."""
    boundaries = {f"train.{key}": int(train_config[key]) for key in BOUNDARY_KEYS}
    requested = int(train_config.get("steps_per_dispatch", 0))
    if requested < 0:
        raise ValueError(
            f"config.train.steps_per_dispatch must be >= 0 (0 = automatic), got {requested}."
        )
    if requested > 0:
        bad = {key: value for key, value in boundaries.items() if value % requested}
        if bad:
            listed = ", ".join(f"{key}={value}" for key, value in bad.items())
            raise ValueError(
                f"config.train.steps_per_dispatch={requested} must divide {listed}: logging, "
                "evaluation and checkpoints happen between dispatches. Change those values to "
                f"multiples of {requested}, choose a K that divides them, or set "
                "train.steps_per_dispatch=0 to choose K automatically."
            )
        return requested
    common = math.gcd(*boundaries.values())
    cap = AUTO_MAX_STEPS_PER_DISPATCH[where]
    return max(k for k in range(1, min(common, cap) + 1) if common % k == 0)


# --------------------------------------------------------------------------- metric sums


def empty_metric_sums(names: Sequence[str]) -> MetricSums:
    return {name: clu_metrics.Average.empty() for name in sorted(names)}


def add_metrics(sums: MetricSums, metrics: Mapping[str, jax.Array]) -> MetricSums:
    return {
        name: total.merge(clu_metrics.Average.from_model_output(metrics[name]))
        for name, total in sums.items()
    }


def read_metric_sums(sums: MetricSums) -> dict[str, float]:
    """The interval's means, read from the device in one transfer."""
    host = jax.device_get(sums)
    return {name: float(average.compute()) for name, average in host.items()}


def read_metric_sums_per_seed(sums: MetricSums) -> list[dict[str, float]]:
    """Each seed's interval means from sums with a leading seed axis, in one transfer."""
    host = jax.device_get(sums)
    means = {
        name: np.asarray(average.total) / np.asarray(average.count)
        for name, average in host.items()
    }
    num_seeds = len(next(iter(means.values()))) if means else 0
    return [{name: float(value[i]) for name, value in means.items()} for i in range(num_seeds)]


# ------------------------------------------------------------------------------ the program


def _as_the_step_sees_it(state):
    """The state without its metric sums (the program keeps those). `metric_names` and the
    program show the step the same arguments, so a step that memoises its trace (the CPU's
    canonical-convolution rewrite) is traced once per run, not twice."""
    return state.replace(metric_sums=None)


def make_multi_step(
    step_fn: Callable,
    *,
    log_every: int,
    mesh: Mesh | None = None,
    jit: bool = True,
    seed_axes=None,
) -> Callable:
    """program(state, block, device_data) -> state after len(block) steps (state donated).

    `step_fn(state, batch, device_data) -> (state, metrics)` is the one generic train step;
    `block` is a batch dict whose arrays carry a leading axis of K steps. The state must hold
    `metric_sums` (see `empty_metric_sums`) for the metrics the step returns.

    `seed_axes` (None: one seed) trains several seeds at once: the state and each step's
    batch carry a leading seed axis (a block is (K, N, ...)), and `seed_axes` is the vmap
    `in_axes` of `device_data` (0 for entries held per seed, None for shared ones).
    """

    def one_step(state, batch, device_data):
        starts_interval = state.step % log_every == 0
        sums = jax.tree.map(
            lambda empty, total: jnp.where(starts_interval, empty, total),
            empty_metric_sums(state.metric_sums),
            state.metric_sums,
        )
        new_state, metrics = step_fn(_as_the_step_sees_it(state), batch, device_data)
        return new_state.replace(metric_sums=add_metrics(sums, metrics))

    if seed_axes is not None:
        one_step = jax.vmap(one_step, in_axes=(0, 0, seed_axes))

    def program(state, block, device_data):
        def body(state, batch):
            return one_step(state, batch, device_data), None

        state, _ = jax.lax.scan(body, state, block)
        return state

    if not jit:
        return program
    if mesh is None:
        return jax.jit(program, donate_argnums=(0,))
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(program, donate_argnums=(0,), out_shardings=replicated)


def metric_names(step_fn: Callable, state, batch, device_data) -> list[str]:
    """The names of the values the step logs, from its abstract evaluation (nothing runs)."""
    _, metrics = jax.eval_shape(step_fn, _as_the_step_sees_it(state), batch, device_data)
    return sorted(metrics)


# ------------------------------------------------------------------------------- the input


def shard_block(block: Mapping[str, np.ndarray], mesh: Mesh, *, seeds: bool = False):
    """Sends a block to the devices, each step's batch split over the mesh's data axis.

    `seeds`: the block is (K, N seeds, batch, ...); the batch axis (2) is the one split.
    In a multi-process run the block holds this process's rows only (`BatchMaker(part=)`,
    one of `jax.process_count()` equal parts), and the global arrays are assembled from them.
    """
    n = mesh.devices.size
    axis = 2 if seeds else 1
    parts = jax.process_count() if mesh.is_multi_process else 1
    rows = {key: np.shape(value)[axis] * parts for key, value in block.items()}
    for key, count in rows.items():
        if count % n:
            raise ValueError(
                f"Batch entry {key!r} has {count} rows, not divisible by the {n} "
                f"devices; choose data.batch_size divisible by {n}."
            )
    spec = PartitionSpec(None, None, "data") if seeds else PartitionSpec(None, "data")
    return devices.global_arrays(block, mesh, spec, rows, axis)


def stack_steps(batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.stack([b[key] for b in batches]) for key in batches[0]}


class BlockSource:
    """Blocks of K consecutive steps' batches, starting at `start_step`.

    Wraps the per-step source: either `make_batch(step)` (a pure function of the step, as the
    index sampler of on-device augmentation is: nothing to checkpoint, the position is the
    train state's step) or a checkpointable grain iterator of per-step host batches.
    """

    def __init__(
        self,
        *,
        steps_per_dispatch: int,
        start_step: int,
        make_batch: Callable[[int], Mapping[str, np.ndarray]] | None = None,
        iterator: Iterator | None = None,
    ):
        if (make_batch is None) == (iterator is None):
            raise ValueError("give exactly one of make_batch and iterator")
        self.k = int(steps_per_dispatch)
        self.next_step = int(start_step)
        self._make_batch = make_batch
        self._iterator = iterator

    def next_block(self) -> dict[str, np.ndarray]:
        if self._make_batch is not None:
            steps = range(self.next_step, self.next_step + self.k)
            batches = [self._make_batch(step) for step in steps]
        else:
            batches = [next(self._iterator) for _ in range(self.k)]
        self.next_step += self.k
        return stack_steps(batches)

    def close(self) -> None:
        """Stops the grain iterator's worker processes (if any) and frees their memory."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()
