"""Host input pipeline throughput: augmented views/s per stream, and training steps/s by workers.

Run:  python benchmarks/input_pipeline.py [--root $SSL_JAX_DATA/ucm] [--workers 0,1,2]
Prints one JSON object (also written to --out when given) with the machine (CPU count,
platform, library versions), views/s of each stream in one process, and for each worker count
the steady-state rate of whole training batches (B labelled + 3 * mu * B unlabelled views),
start-up (first batch) timed separately.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.base import get_config  # noqa: E402
from ssl_jax.data import ImageSet, augment_host, load_dataset, train_iterator  # noqa: E402
from ssl_jax.data.views import UNLABELLED_VIEWS as VIEWS  # noqa: E402


class _Data:
    def __init__(self, labelled, unlabelled):
        self.labelled, self.unlabelled = labelled, unlabelled


def machine() -> dict:
    import grain
    import PIL

    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "grain": getattr(grain, "__version__", "unknown"),
    }


def load(root: str | None):
    if root and os.path.isdir(root):
        config = get_config()
        config.data.root = root
        config.data.cache_dir = "none"
        data = load_dataset(config, workdir=None)
        return data.labelled, data.unlabelled, f"folder {root}"
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), np.uint8) for _ in range(500)]
    synthetic = ImageSet(images, np.arange(500, dtype=np.int32) % 10, tuple(map(str, range(500))))
    return synthetic.subset(range(40)), synthetic, "synthetic 64x64 noise"


def stream_rates(images, count: int) -> dict:
    out = {}
    for name, fn in [*augment_host.STREAMS.items(), ("test", None)]:
        run = (lambda im, r: augment_host.test_view(im)) if fn is None else fn
        for i in range(20):  # warm-up
            run(images[i % len(images)], np.random.default_rng(i))
        start = time.perf_counter()
        for i in range(count):
            run(images[i % len(images)], np.random.default_rng([0, i]))
        out[name] = round(count / (time.perf_counter() - start), 1)
    return out


def step_rate(labelled, unlabelled, *, batch_size, mu, workers, steps) -> dict:
    config = get_config()
    config.data.batch_size = batch_size
    config.data.mu = mu
    config.data.workers = workers
    config.train.total_steps = steps + 1
    start = time.perf_counter()
    it = train_iterator(_Data(labelled, unlabelled), config, views=VIEWS)
    next(it)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    elapsed = time.perf_counter() - start
    if hasattr(it, "close"):
        it.close()
    views = batch_size + 3 * mu * batch_size
    return {
        "workers": workers,
        "first_batch_s": round(first, 2),
        "steps_per_s": round(steps / elapsed, 2),
        "views_per_s": round(steps * views / elapsed, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_root = os.path.join(os.environ.get("SSL_JAX_DATA", ""), "ucm")
    parser.add_argument("--root", default=default_root)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mu", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per worker count")
    parser.add_argument("--views", type=int, default=1000, help="images per stream timing")
    parser.add_argument("--workers", default=None, help="comma list; default 0..cpu_count")
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    labelled, unlabelled, source = load(args.root)
    workers = (
        [int(w) for w in args.workers.split(",")]
        if args.workers
        else list(range((os.cpu_count() or 1) + 1))
    )
    result = {
        "benchmark": "input_pipeline",
        "machine": machine(),
        "data": source,
        "batch_size": args.batch_size,
        "mu": args.mu,
        "views_per_step": args.batch_size + 3 * args.mu * args.batch_size,
        "stream_views_per_s_single_process": stream_rates(unlabelled.images, args.views),
        "steps": [
            step_rate(
                labelled,
                unlabelled,
                batch_size=args.batch_size,
                mu=args.mu,
                workers=w,
                steps=args.steps,
            )
            for w in workers
        ],
    }
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
