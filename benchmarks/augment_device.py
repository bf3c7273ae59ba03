"""Throughput of the on-device augmentation: one step's views, `make_views`, jitted.

    python benchmarks/augment_device.py [--batch 32] [--mu 7] [--iters 20]

B labelled views plus 3 * mu * B unlabelled views (weak, strong0, strong1) per step from a
padded uint8 cache like the device-cached dataset (64x64 images, every tenth one 64x66).
Compile time is measured separately; the timed calls follow two warm-up calls. Prints one
JSON line naming the backend, device and versions.
"""

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from ssl_jax.data import augment_device


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--mu", type=int, default=7)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--cache-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    cache = rng.integers(0, 256, (args.cache_size, 66, 66, 3), dtype=np.uint8)
    sizes = np.tile(np.array([64, 64], np.int32), (args.cache_size, 1))
    sizes[::10] = (64, 66)  # the aspect rule's non-square images
    cache = jax.device_put(cache)
    sizes = jax.device_put(sizes)
    unlabelled = args.batch * args.mu

    make_views = jax.jit(augment_device.make_views)

    def indices(step):
        key = jax.random.fold_in(jax.random.key(args.seed), step)
        k_x, k_u = jax.random.split(key)
        x = jax.random.randint(k_x, (args.batch,), 0, args.cache_size)
        u = jax.random.randint(k_u, (unlabelled,), 0, args.cache_size)
        return key, x, u

    start = time.perf_counter()
    compiled = make_views.lower(jax.random.key(0), cache, sizes, *indices(0)[1:]).compile()
    compile_s = time.perf_counter() - start

    for step in range(2):  # warm-up
        key, x, u = indices(step)
        jax.block_until_ready(compiled(key, cache, sizes, x, u))
    times = []
    for step in range(args.iters):
        key, x, u = indices(step + 2)
        jax.block_until_ready((key, x, u))
        start = time.perf_counter()
        jax.block_until_ready(compiled(key, cache, sizes, x, u))
        times.append(time.perf_counter() - start)

    views = args.batch + 3 * unlabelled
    median = statistics.median(times)
    device = jax.devices()[0]
    print(
        json.dumps(
            {
                "benchmark": "augment_device.make_views",
                "backend": jax.default_backend(),
                "device": getattr(device, "device_kind", str(device)),
                "device_count": jax.device_count(),
                "cpu": platform.processor() or platform.machine(),
                "jax": jax.__version__,
                "jaxlib": jaxlib.__version__,
                "numpy": np.__version__,
                "batch": args.batch,
                "mu": args.mu,
                "views_per_step": views,
                "compile_s": round(compile_s, 3),
                "step_ms_median": round(1000 * median, 3),
                "step_ms_min": round(1000 * min(times), 3),
                "step_ms_mean": round(1000 * statistics.mean(times), 3),
                "views_per_s": round(views / median, 1),
                "iters": args.iters,
            }
        )
    )


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing anything
    main()
