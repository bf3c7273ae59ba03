"""The train state and how it is built: model, optimizer and initial state from a config.

`setup(config, num_classes)` is the one way to get them; the trainer, the benchmarks and the
tests all call it, so they train the same thing.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ssl_jax import optim
from ssl_jax.algorithms import get_algorithm
from ssl_jax.algorithms.base import Algorithm
from ssl_jax.models import get_model

PRECISIONS = {"float32": jnp.float32, "bf16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; saved whole in every checkpoint."""

    step: jax.Array  # int32 scalar: number of optimizer updates done
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any
    ema_batch_stats: Any  # copied from the online model after every step (docs/method.md#ema)
    algo_state: Any  # memory bank, DA history, ... ({} for stateless methods)
    rng: jax.Array  # raw uint32[2] key; per-step keys are fold_in(rng, step)
    # The logged values summed since the current logging interval began, inside the program
    # (`ssl_jax.dispatch`): {name: clu.metrics.Average}; None until the loop knows the names.
    metric_sums: Any = None


class Setup(NamedTuple):
    """What a training run is made of, before any data."""

    model: Any  # a flax Module
    algorithm: Algorithm
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule  # the schedule inside `tx`: lr of the k-th update (0-based)
    state: TrainState


def build_model(
    config: ml_collections.ConfigDict,
    num_classes: int,
    algorithm: Algorithm,
    *,
    platform: str | None = None,
):
    """The network of `config.model`, with a projection head when the algorithm needs one.

    `platform` ("cpu", "cuda", ...; None: jax's default) picks the convolution formulations
    (`config.model.conv_impl`) once, here, so the model holds only what that platform runs.
    """
    return get_model(
        config.model.name,
        num_classes,
        config.model.low_dim if algorithm.needs_projection else 0,
        width=config.model.width,
        dtype=PRECISIONS[config.precision],
        conv_impl=config.model.conv_impl,
        platform=platform,
    )


def abstract_variables(model, config: ml_collections.ConfigDict) -> dict:
    """Shapes and dtypes of the model's variables (params, batch_stats), computing nothing."""
    size = config.data.crop_size
    return jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.PRNGKey(0),
        jnp.zeros((1, size, size, 3), jnp.float32),
    )


def images_per_step(config: ml_collections.ConfigDict, algorithm: Algorithm) -> int:
    b = config.data.batch_size
    return b + len(algorithm.unlabelled_views) * config.data.mu * b


# The initial state is computed once per run, so it is compiled with XLA's optimisations
# off: on a CPU that compiles ResNet-18's initializers in ~2 s instead of ~10 s (the tests'
# tiny runs spent more time compiling their initial state than their training program), and
# costs nothing measurable when it runs. Some initial weights then differ from an optimised
# build's in the last bit (the rounding of the initializers' erf_inv and scaling).
RUN_ONCE_COMPILER_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}


def initial_state(
    config: ml_collections.ConfigDict,
    model,
    algorithm: Algorithm,
    tx: optax.GradientTransformation,
    num_classes: int,
    seed_key: jax.Array,
) -> TrainState:
    """The state before the first step from `seed_key = jax.random.PRNGKey(seed)` (pure;
    `create_train_states` runs it compiled). The EMA model starts as a copy of the initial
    model (docs/method.md#ema).
    """
    init_rng, train_rng = jax.random.split(seed_key)
    size = config.data.crop_size
    variables = model.init(init_rng, jnp.zeros((1, size, size, 3), jnp.float32), train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    algo_state = algorithm.init_state(
        config.algorithm,
        num_classes=num_classes,
        low_dim=config.model.low_dim,
        batch_size=config.data.batch_size,
        mu=config.data.mu,
    )
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params),
        ema_batch_stats=jax.tree.map(jnp.copy, batch_stats),
        algo_state=algo_state,
        rng=train_rng,
    )


def create_train_states(
    config: ml_collections.ConfigDict,
    model,
    algorithm: Algorithm,
    tx: optax.GradientTransformation,
    num_classes: int,
    seeds: list[int],
) -> list[TrainState]:
    """The initial state of each seed in `seeds`, from one program compiled once with
    `RUN_ONCE_COMPILER_OPTIONS` (the seed's key is its argument). Run eagerly, the same work
    would compile dozens of one-op programs."""
    create = functools.partial(initial_state, config, model, algorithm, tx, num_classes)
    keys = [jax.random.PRNGKey(seed) for seed in seeds]
    compiled = jax.jit(create).lower(keys[0]).compile(RUN_ONCE_COMPILER_OPTIONS)
    return [compiled(key) for key in keys]


def create_train_state(
    config: ml_collections.ConfigDict,
    model,
    algorithm: Algorithm,
    tx: optax.GradientTransformation,
    num_classes: int,
) -> TrainState:
    """The initial state of seed `config.seed`."""
    return create_train_states(config, model, algorithm, tx, num_classes, [config.seed])[0]


def setup(
    config: ml_collections.ConfigDict,
    num_classes: int,
    *,
    platform: str | None = None,
    abstract: bool = False,
) -> Setup:
    """Model, algorithm, optimizer (with its lr schedule) and initial state of `config`.

    `abstract=True` gives the state's shapes and dtypes only (nothing computed), e.g. to
    lower the training program for another platform.
    """
    algorithm = get_algorithm(config.algorithm.name)
    model = build_model(config, num_classes, algorithm, platform=platform)
    tx, lr_schedule = optim.make_optimizer(
        config.optim, config.train.total_steps, abstract_variables(model, config)["params"]
    )
    if abstract:
        create = functools.partial(initial_state, config, model, algorithm, tx, num_classes)
        state = jax.eval_shape(create, jax.random.PRNGKey(0))
    else:
        state = create_train_state(config, model, algorithm, tx, num_classes)
    return Setup(model=model, algorithm=algorithm, tx=tx, lr_schedule=lr_schedule, state=state)
