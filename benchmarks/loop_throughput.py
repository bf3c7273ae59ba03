"""Times the training loop itself (`train.run_loop`, what launch.py runs), not just the step.

    python benchmarks/loop_throughput.py --steps-per-dispatch 64        # CoMatch+Triplet, B32 mu7
    python benchmarks/loop_throughput.py --width 0.0625 --batch 8 --mu 2 --steps-per-dispatch 64
    python benchmarks/loop_throughput.py --augment host --workers -1    # grain feeds the loop
    python benchmarks/loop_throughput.py --seeds 4 --width 0.0625 --batch 8 --mu 2  # 4 seeds

Synthetic uint8 images. With `--augment device` (the default) they sit on the device and the
loop hands the K-step program one block of sample indices per dispatch; with `--augment host`
the grain/PIL pipeline makes the views and each dispatch takes a block of K host batches.
Each round times, one after the other in alternating order:
  loop:    `train.run_loop` over --steps steps (one logging interval: the metric sums are read
           once at its end; no evaluation, no checkpoints), synchronised at the end;
  program: the same compiled K-step program called --steps/K times on one fixed block.
Medians over --rounds rounds, after --warmup steps (compilation excluded). The last line is
one JSON object: ms_per_step_loop, ms_per_step_program and host_ms_per_step (their
difference: what the loop adds per step on the host), with the device and versions, and
host_only_ms_per_step: the same `run_loop` timed around a program that only advances the step
counter (no device work), so the host's own work per step is measured directly; the
difference of two ~100 ms medians cannot resolve a fraction of a millisecond.

`--seeds N` (N > 1, device augmentation) trains N seeds in one program (`config.num_seeds`)
and also times the one-seed loop of the same shapes: `img_per_s_loop` counts the images of all
seeds, and `speedup_vs_sequential` = N x (one-seed ms/step) / (N-seed ms/step), above 1 where
one program beats running the seeds one after another.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks import step_throughput  # noqa: E402
from ssl_jax import devices, metric_writers, train, xla_cpu  # noqa: E402

HOST_ONLY_WINDOWS = 16  # logging intervals per host-only round


def build_parser():
    p = step_throughput.build_parser(__doc__.split("\n")[0])
    p.set_defaults(augment="device", steps=64, warmup=64)
    p.add_argument("--steps-per-dispatch", type=int, default=64, help="K (must divide --steps)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seeds", type=int, default=1, help="seeds trained in one program")
    return p


def make_config(args):
    config = step_throughput.make_config(args)
    if args.augment == "none":
        raise SystemExit("--augment none has no loop to time; use device or host.")
    k = args.steps_per_dispatch
    if args.steps % k or args.warmup % k:
        raise SystemExit(
            f"--steps ({args.steps}) and --warmup ({args.warmup}) must be multiples "
            f"of --steps-per-dispatch ({k})."
        )
    # Every step the loop takes (compile call, warm-up, timed and host-only windows, and the
    # block each call of the loop makes ahead): the host pipeline's iterator is as long as
    # the run, the device sampler endless.
    calls = 3 + 2 * args.rounds
    total = args.warmup + k + args.rounds * (1 + HOST_ONLY_WINDOWS) * args.steps + calls * k
    config.train.steps_per_dispatch = k
    config.train.log_every = args.steps  # one read of the metric sums per timed window
    config.train.steps_per_epoch = config.train.checkpoint_every = args.steps * max(
        1, -(-total // args.steps)
    )
    config.train.total_steps = config.train.steps_per_epoch
    if args.seeds > 1 and args.augment != "device":
        raise SystemExit("--seeds > 1 trains in one program with --augment device only.")
    config.num_seeds = args.seeds
    return config


def _step_of(state) -> int:
    return int(np.asarray(state.step).reshape(-1)[0])  # one step for every seed


def run(args) -> dict:
    config = make_config(args)
    data = step_throughput.synthetic_data(args)
    training = train.prepare_training(config, data)
    state = devices.replicate(training.setup.state, training.mesh)
    k = training.steps_per_dispatch
    workdir = tempfile.mkdtemp(prefix="loop_throughput_")
    writer = metric_writers.MetricWriter(workdir, tensorboard=False)
    source = training.block_source(0)
    quiet = open(os.devnull, "w")  # noqa: SIM115 - the loop's progress lines are not the output

    def loop(state, steps, run=training):
        stdout, sys.stdout = sys.stdout, quiet
        try:
            state, _ = train.run_loop(
                run,
                state,
                source,
                manager=None,
                writer=writer,
                meta={},
                workdir=workdir,
                evaluate=False,
                stop_step=_step_of(state) + steps,
            )
        finally:
            sys.stdout = stdout
        return jax.block_until_ready(state)

    compile_start = time.perf_counter()
    state = loop(state, k)  # compiles the program
    compile_s = time.perf_counter() - compile_start
    if args.warmup > k:
        state = loop(state, args.warmup - k)
    fixed = training.shard(source.next_block())

    def program(state, steps):
        for _ in range(steps // k):
            state = training.program(state, fixed, training.device_data)
        return jax.block_until_ready(state)

    # The same loop around a program that does nothing but count the steps: what is left is
    # the host's own work per step (block making, transfers, dispatch, metric reads), timed
    # directly instead of as a small difference of two large, noisy times.
    def count_steps(state, block, device_data):
        del device_data
        return state.replace(step=state.step + jax.tree.leaves(block)[0].shape[0])

    empty_training = dataclasses.replace(
        training,
        program=jax.jit(  # hands back the state with its own shardings, as the loop expects
            count_steps,
            donate_argnums=(0,),
            out_shardings=jax.tree.map(lambda x: x.sharding, state),
        ),
    )

    def host_only(state, steps):
        return loop(state, steps, run=empty_training)

    state = host_only(state, k)  # compiles the empty program
    loop_ms, program_ms, host_ms = [], [], []
    for r in range(args.rounds):
        order = ((loop, loop_ms), (program, program_ms))
        for fn, times in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            state = fn(state, args.steps)
            times.append(1e3 * (time.perf_counter() - start) / args.steps)
        start = time.perf_counter()  # cheap, so a longer window: less timer and OS noise
        state = host_only(state, HOST_ONLY_WINDOWS * args.steps)
        host_ms.append(1e3 * (time.perf_counter() - start) / (HOST_ONLY_WINDOWS * args.steps))
    writer.close()
    source.close()
    loop_med, program_med = statistics.median(loop_ms), statistics.median(program_ms)
    images = train.train_state.images_per_step(config, training.setup.algorithm) * args.seeds
    return {
        "benchmark": "loop_throughput",
        "seeds": args.seeds,
        "steps_per_dispatch": k,
        "ms_per_step_loop": round(loop_med, 4),
        "ms_per_step_program": round(program_med, 4),
        "host_ms_per_step": round(loop_med - program_med, 4),
        "host_only_ms_per_step": round(statistics.median(host_ms), 4),
        "host_only_ms_rounds": [round(x, 4) for x in host_ms],
        "loop_ms_rounds": [round(x, 4) for x in loop_ms],
        "program_ms_rounds": [round(x, 4) for x in program_ms],
        "img_per_s_loop": round(1e3 * images / loop_med, 1),
        "compile_s": round(compile_s, 2),
        **step_throughput.shape_fields(args, images),
        "steps": args.steps,
        "rounds": args.rounds,
        **step_throughput.device_info(),
    }


def main(argv=None):
    args = build_parser().parse_args(argv)
    xla_cpu.prefer_eigen_convolutions()  # the CPU convolution library launch.py uses
    result = run(args)
    if args.seeds > 1:
        single = run(argparse.Namespace(**{**vars(args), "seeds": 1}))
        result["ms_per_step_loop_one_seed"] = single["ms_per_step_loop"]
        result["img_per_s_loop_one_seed"] = single["img_per_s_loop"]
        result["speedup_vs_sequential"] = round(
            args.seeds * single["ms_per_step_loop"] / result["ms_per_step_loop"], 3
        )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
