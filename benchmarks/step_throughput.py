"""Times ssl_jax's full training step (forward, every loss, SGD, EMA, and augmentation).

    python benchmarks/step_throughput.py                      # CoMatch+Triplet, paper shapes
    python benchmarks/step_throughput.py --augment device --precision bf16
    python benchmarks/step_throughput.py --model wrn28_2 --algorithm fixmatch --batch 8 --mu 2

Paper shapes by default (B 32, mu 7, 64-px images cropped to 60: 704 images per step).
Data are synthetic uint8 images (augmentation cost does not depend on content):
  --augment none    views made once and reused: the network + losses + optimizer alone;
  --augment device  images cached on the device, the four streams run inside the jitted step;
  --augment host    the grain/PIL host pipeline feeds the step (--workers processes).
Compilation is timed separately (the persistent compilation cache is off here), then
--warmup steps, then --steps timed one by one (each synchronised). The last line of output
is one JSON object. Needs no tensorflow-datasets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from configs import base  # noqa: E402
from ssl_jax import devices, train, train_state, xla_cpu  # noqa: E402
from ssl_jax.data import train_iterator  # noqa: E402
from ssl_jax.data.on_device import device_augment_views  # noqa: E402
from ssl_jax.data.synthetic import synthetic_dataset  # noqa: E402
from ssl_jax.models import cpu_conv  # noqa: E402


def build_parser(description: str = __doc__.split("\n")[0]) -> argparse.ArgumentParser:
    """The options of this benchmark (step_breakdown.py reuses them with its own defaults)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--algorithm", default="comatch_triplet")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--mu", type=int, default=7)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--precision", default="float32", choices=sorted(train_state.PRECISIONS))
    p.add_argument("--augment", default="none", choices=("none", "device", "host"))
    p.add_argument("--workers", type=int, default=-1, help="host pipeline processes (-1: cores)")
    p.add_argument("--images", type=int, default=2048, help="synthetic unlabelled pool size")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--profile",
        default="",
        help="after timing, write a jax.profiler trace of 3 more steps to this folder "
        "(open it with xprof / TensorBoard's profile plugin)",
    )
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def make_config(args):
    config = base.get_config()
    config.seed = args.seed
    config.algorithm.name = args.algorithm
    config.model.name = args.model
    config.model.width = args.width
    config.data.batch_size = args.batch
    config.data.mu = args.mu
    config.data.workers = args.workers
    config.precision = args.precision
    config.augment.where = "device" if args.augment == "device" else "host"
    config.train.total_steps = max(args.warmup + args.steps + 1, 1024)
    return config


def fixed_host_batch(data, config, views):
    """One host-made batch, reused (--augment none)."""
    config = config.copy_and_resolve_references()
    config.data.workers = 0
    return next(train_iterator(data, config, views=views, mode="host"))


def device_info() -> dict:
    device = jax.local_devices()[0]
    import flax
    import optax

    return {
        "device": f"{device.platform}:{device.device_kind}",
        "num_devices": jax.local_device_count(),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpu_conv_library": cpu_conv.xla_cpu_conv_library() if device.platform == "cpu" else None,
    }


def synthetic_data(args):
    """Random uint8 images of --classes classes: the cost of a step does not depend on content."""
    return synthetic_dataset(
        num_classes=args.classes,
        num_unlabelled=args.images,
        num_labelled=max(4 * args.classes, args.batch),
        seed=args.seed,
    )


def setup(args):
    """(config, algorithm, data, model, tx, state) for the options in `args`."""
    config = make_config(args)
    data = synthetic_data(args)
    model, algorithm, tx, _, state = train_state.setup(config, args.classes)
    return config, algorithm, data, model, tx, state


def shape_fields(args, images_per_step: int) -> dict:
    """What was timed, as every benchmark of this folder reports it."""
    return {
        "algorithm": args.algorithm,
        "model": args.model,
        "width": args.width,
        "batch": args.batch,
        "mu": args.mu,
        "images_per_step": images_per_step,
        "precision": args.precision,
        "augment": args.augment,
    }


def run(args) -> dict:
    jax.config.update("jax_compilation_cache_dir", None)  # time real compiles
    config, algorithm, data, model, tx, state = setup(args)
    mesh = devices.make_mesh()
    state = devices.replicate(state, mesh)
    views = algorithm.unlabelled_views

    device_data, augment_fn = None, None
    if args.augment == "device":
        device_data, augment_fn = device_augment_views(data, config, views)
        device_data = devices.replicate(device_data, mesh)
        batches = train_iterator(data, config, views=views, mode="indices")
    elif args.augment == "host":
        batches = train_iterator(data, config, views=views, mode="host")
    else:
        fixed = devices.shard_batch(fixed_host_batch(data, config, views), mesh)
        batches = None

    def next_batch():
        return fixed if batches is None else devices.shard_batch(next(batches), mesh)

    step_fn = train.make_train_step(config, model, algorithm, tx, augment_fn, mesh)
    batch = next_batch()
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch, device_data).compile()
    compile_s = time.perf_counter() - t0

    for _ in range(args.warmup):
        state, metrics = compiled(state, next_batch(), device_data)
    jax.block_until_ready(metrics["loss"])
    times = []
    wall0 = time.perf_counter()
    for _ in range(args.steps):
        t = time.perf_counter()
        state, metrics = compiled(state, next_batch(), device_data)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t)
    wall = time.perf_counter() - wall0
    if args.profile:
        with jax.profiler.trace(args.profile):
            for _ in range(3):
                state, metrics = compiled(state, next_batch(), device_data)
            jax.block_until_ready(metrics["loss"])
    images = train_state.images_per_step(config, algorithm)
    median = statistics.median(times)
    result = {
        **shape_fields(args, images),
        "workers": args.workers if args.augment == "host" else None,
        "compile_s": round(compile_s, 3),
        "ms_per_step_median": round(1e3 * median, 3),
        "ms_per_step_p10": round(1e3 * float(np.percentile(times, 10)), 3),
        "ms_per_step_p90": round(1e3 * float(np.percentile(times, 90)), 3),
        "ms_per_step_mean": round(1e3 * wall / args.steps, 3),
        "images_per_s": round(images / median, 1),
        "steps": args.steps,
        "loss_finite": bool(np.isfinite(float(metrics["loss"]))),
        "peak_device_memory_bytes": devices.peak_device_memory_bytes(),
        "date": time.strftime("%Y-%m-%d"),
    }
    result.update(device_info())
    return result


def main(argv=None):
    args = parse_args(argv)
    xla_cpu.prefer_eigen_convolutions()  # as launch.py does; SSL_JAX_CPU_CONVOLUTIONS=ynn: off
    result = run(args)
    print(
        f"{result['algorithm']} {result['model']} B={result['batch']} mu={result['mu']} "
        f"{result['precision']} augment={result['augment']} on {result['device']}: "
        f"compile {result['compile_s']:.1f} s, {result['ms_per_step_median']:.1f} ms/step "
        f"(p10 {result['ms_per_step_p10']:.1f}, p90 {result['ms_per_step_p90']:.1f}), "
        f"{result['images_per_s']:.0f} img/s",
        file=sys.stderr,
    )
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
