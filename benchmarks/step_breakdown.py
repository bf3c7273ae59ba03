"""Where a training step's time goes: the full step against steps with one piece less each.

    python benchmarks/step_breakdown.py --batch 8 --mu 2          # ResNet-18 CoMatch+Triplet
    python benchmarks/step_breakdown.py --batch 32 --mu 7 --steps 5

Each variant is the real jitted train step (`train.make_train_step`) compiled with one more
piece taken out than the one before: ``full``; ``no_ema`` (the EMA update skipped);
``no_norms`` (also the logged gradient and parameter norms); ``plain_sgd`` (also momentum,
Nesterov and weight decay: SGD with a constant step); ``network_only`` (also the algorithm's
losses, memory bank and distribution alignment: the loss is ``sum(logits) + sum(feats)``).
The difference between neighbours is that piece's cost. Variants are timed interleaved,
one step each per round, on one fixed synthetic batch (`--augment none` of
step_throughput.py, whose other options it takes). The last line of output is one JSON
object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
from unittest import mock

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import step_throughput  # noqa: E402  (benchmarks/step_throughput.py, beside this script)

from ssl_jax import optim, train, xla_cpu  # noqa: E402

VARIANTS = ("full", "no_ema", "no_norms", "plain_sgd", "network_only")


def network_only_loss(*, logits, feats, state, **_):
    loss = jnp.sum(logits) + (0.0 if feats is None else jnp.sum(feats))
    return loss, (state, {})


def compile_variant(variant, config, model, algorithm, tx, state, batch):
    """The train step without the pieces `variant` and the variants before it drop."""
    level = VARIANTS.index(variant)
    patches = contextlib.ExitStack()
    with patches:
        if level >= 1:
            patches.enter_context(mock.patch.object(optim, "ema_update", lambda e, p, d: e))
        if level >= 2:
            patches.enter_context(mock.patch.object(optax.tree, "norm", lambda tree: jnp.zeros(())))
        if level >= 3:
            tx = optax.sgd(0.01)
            state = state.replace(opt_state=tx.init(state.params))
        if level >= 4:
            algorithm = dataclasses.replace(algorithm, loss_from_outputs=network_only_loss)
        step = train.make_train_step(config, model, algorithm, tx)
        return step.lower(state, batch, None).compile(), state


def main(argv=None):
    parser = step_throughput.build_parser(__doc__.split("\n")[0])
    parser.set_defaults(batch=8, mu=2, steps=15, warmup=2)
    args = parser.parse_args(argv)
    if args.augment != "none" or args.profile:
        parser.error("step_breakdown.py times one fixed batch: no --augment, no --profile")
    xla_cpu.prefer_eigen_convolutions()
    config, algorithm, data, model, tx, state0 = step_throughput.setup(args)
    batch = jax.device_put(
        dict(step_throughput.fixed_host_batch(data, config, algorithm.unlabelled_views))
    )
    steps, states, checks = {}, {}, {}
    for variant in VARIANTS:
        fresh = jax.tree.map(jnp.copy, state0)
        steps[variant], states[variant] = compile_variant(
            variant, config, model, algorithm, tx, fresh, batch
        )
        for _ in range(max(1, args.warmup)):
            states[variant], metrics = steps[variant](states[variant], batch, None)
        jax.block_until_ready(states[variant].params)
        # What each variant really dropped, read off its state and metrics after warm-up.
        checks[variant] = {
            "ema_moved": not all(
                bool(jnp.array_equal(a, b))
                for a, b in zip(
                    jax.tree.leaves(states[variant].ema_params),
                    jax.tree.leaves(state0.ema_params),
                    strict=True,
                )
            ),
            "grad_norm": float(metrics["grad_norm"]),
            "loss_keys": sorted(k for k in metrics if k.startswith("loss")),
        }
    times = {variant: [] for variant in VARIANTS}
    for _ in range(args.steps):
        for variant in VARIANTS:
            start = time.perf_counter()
            states[variant], _ = steps[variant](states[variant], batch, None)
            jax.block_until_ready(states[variant].params)
            times[variant].append(1e3 * (time.perf_counter() - start))
    medians = {variant: round(statistics.median(times[variant]), 1) for variant in VARIANTS}
    pieces = {
        "ema": medians["full"] - medians["no_ema"],
        "norms": medians["no_ema"] - medians["no_norms"],
        "optimizer": medians["no_norms"] - medians["plain_sgd"],
        "losses": medians["plain_sgd"] - medians["network_only"],
        "network_and_sgd": medians["network_only"],
    }
    for variant in VARIANTS:
        print(f"{variant:>13}: {medians[variant]:8.1f} ms/step (median of {args.steps})")
    result = {
        "benchmark": "step_breakdown",
        "algorithm": args.algorithm,
        "model": args.model,
        "width": args.width,
        "batch": args.batch,
        "mu": args.mu,
        "precision": args.precision,
        "steps": args.steps,
        "ms_median": medians,
        "ms_pieces": {name: round(value, 1) for name, value in pieces.items()},
        "checks": checks,
        "date": time.strftime("%Y-%m-%d"),
        **step_throughput.device_info(),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
