"""Throughput of the on-device augmentation the train step runs: `on_device.make_augment_fn`.

    python benchmarks/augment_device.py [--batch 32] [--mu 7] [--iters 20] [--crop-size 60]

B labelled views plus 3 * mu * B unlabelled views (weak, strong0, strong1) per step, made by
the same `augment_fn(key, batch, cache)` the jitted train step calls, from a device cache of
synthetic uint8 images (64x64, every tenth one 64x66 as the aspect rule makes them), with
indices sampled by the host pipeline (`train_iterator(..., mode="indices")`). Compile time is
measured separately; the timed calls follow two warm-up calls. Prints one JSON line naming
the backend, device and versions.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from configs import base  # noqa: E402
from ssl_jax.data import train_iterator  # noqa: E402
from ssl_jax.data.on_device import device_augment_views  # noqa: E402
from ssl_jax.data.synthetic import synthetic_dataset  # noqa: E402
from ssl_jax.data.views import UNLABELLED_VIEWS  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--mu", type=int, default=7)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--cache-size", type=int, default=1000)
    parser.add_argument("--crop-size", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    config = base.get_config()
    config.seed = args.seed
    config.data.batch_size = args.batch
    config.data.mu = args.mu
    config.data.crop_size = args.crop_size
    config.train.total_steps = args.iters + 2
    data = synthetic_dataset(
        num_unlabelled=args.cache_size, num_labelled=args.cache_size // 10, seed=args.seed
    )
    rng = np.random.default_rng(args.seed)
    for imageset in (data.labelled, data.unlabelled):
        for i in range(0, len(imageset), 10):  # the aspect rule's non-square images
            imageset.images[i] = rng.integers(0, 256, (64, 66, 3), dtype=np.uint8)

    cache, augment_fn = device_augment_views(data, config, UNLABELLED_VIEWS)
    augment = jax.jit(augment_fn)
    batches = [
        {k: jnp.asarray(v) for k, v in batch.items()}
        for batch in train_iterator(data, config, views=UNLABELLED_VIEWS, mode="indices")
    ]
    keys = [jax.random.fold_in(jax.random.key(args.seed), step) for step in range(len(batches))]

    start = time.perf_counter()
    compiled = augment.lower(keys[0], batches[0], cache).compile()
    compile_s = time.perf_counter() - start

    for step in range(2):  # warm-up
        jax.block_until_ready(compiled(keys[step], batches[step], cache))
    times = []
    for step in range(2, len(batches)):
        start = time.perf_counter()
        jax.block_until_ready(compiled(keys[step], batches[step], cache))
        times.append(time.perf_counter() - start)

    views = args.batch + len(UNLABELLED_VIEWS) * args.batch * args.mu
    median = statistics.median(times)
    device = jax.devices()[0]
    print(
        json.dumps(
            {
                "benchmark": "on_device.make_augment_fn",
                "backend": jax.default_backend(),
                "device": getattr(device, "device_kind", str(device)),
                "device_count": jax.device_count(),
                "cpu": platform.processor() or platform.machine(),
                "jax": jax.__version__,
                "jaxlib": jaxlib.__version__,
                "numpy": np.__version__,
                "batch": args.batch,
                "mu": args.mu,
                "crop_size": args.crop_size,
                "views_per_step": views,
                "compile_s": round(compile_s, 3),
                "step_ms_median": round(1000 * median, 3),
                "step_ms_min": round(1000 * min(times), 3),
                "step_ms_mean": round(1000 * statistics.mean(times), 3),
                "views_per_s": round(views / median, 1),
                "iters": len(times),
            }
        )
    )


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing anything
    main()
