"""The one generic train step of every algorithm (docs/method.md#training-step).

`train_step` is a module-level pure function: it forwards the concatenated batch
``[x ; unlabelled views]`` through the model once, hands the outputs to the algorithm's pure
``loss_from_outputs`` (which also advances the algorithm's state: memory bank, DA history),
applies SGD and the EMA. The per-step randomness (device augmentation) is
``fold_in(state.rng, step)``, so a resumed run is bit-identical. The loop runs it K times per
dispatch (`ssl_jax.dispatch`); `make_train_step` jits one step alone for benchmarks and tests.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from ssl_jax import (
    devices,
    optim,
    train_state,
)
from ssl_jax.algorithms.base import Algorithm
from ssl_jax.data.normalize import to_network_input


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
