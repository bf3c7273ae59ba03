"""Semi-hard triplet miner: jitted value-and-grad time and peak memory, dense vs sorted.

Run:
    python benchmarks/triplet_miner.py                      # B 224, 896, 1792, 4096; both
    python benchmarks/triplet_miner.py --batch-sizes 1792 --methods sorted --repeats 5
    python benchmarks/triplet_miner.py --dense-max-batch 4096   # the O(B^3) miner at 4096 too

The timed function is ``jax.jit(jax.value_and_grad(semihard_triplet_loss))`` with respect to
the (B, --dim) embeddings, labels drawn uniformly from --classes classes (CoMatch+Triplet's
hard pseudo-labels on the global unlabelled batch: 8 devices x mu*B = 224 gives B = 1,792).
``method`` is "dense" (the O(B^3) miner, in anchor blocks on CPU) or "sorted" (O(B^2 log B)
time, O(B^2) memory); ssl_jax picks one by batch size (`losses.triplet_method`).

Each (B, method) runs in a fresh subprocess, so that its peak resident memory
(``peak_rss_mib``: ``getrusage(RUSAGE_SELF).ru_maxrss`` at its end) is its own: the JAX
runtime, the inputs, the compiler and the program's buffers; ``rss_before_compile_mib`` is
its resident memory just before compiling, the baseline. On accelerators the device's
``peak_bytes_in_use`` is reported too. Compile time is timed separately from the calls; one
warm-up call, then --repeats timed calls (median and minimum). The dense miner is only run
up to --dense-max-batch (B = 4,096 would take minutes per call on the 2-core CPU). One JSON
line per case on stdout; the environment first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ssl_jax import losses  # noqa: E402

MIB = 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="224,896,1792,4096")
    p.add_argument("--methods", default="dense,sorted")
    p.add_argument("--dense-max-batch", type=int, default=1792)
    p.add_argument("--dim", type=int, default=64, help="embedding width (CoMatch's low_dim)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--margin", type=float, default=0.2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", action="store_true", help="internal: run one case, print JSON")
    p.add_argument("--batch", type=int, help="internal: the worker's batch size")
    p.add_argument("--method", help="internal: the worker's method")
    return p.parse_args(argv)


def environment() -> dict:
    device = jax.devices()[0]
    processor = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        processor = names[0] if names else processor
    except OSError:
        pass
    return {
        "device": f"{device.platform}:{device.device_kind}",
        "processor": processor,
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def rss_mib() -> float:
    """The process's current resident memory (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB
    except (OSError, ValueError):
        return 0.0


def run_case(args) -> dict:
    """One (B, method) in this process: compile, warm up, time."""
    rng = np.random.default_rng(args.seed)
    labels = jnp.asarray(rng.integers(0, args.classes, size=args.batch), jnp.int32)
    embeddings = jnp.asarray(rng.normal(size=(args.batch, args.dim)), jnp.float32)

    def loss_fn(e):
        return losses.semihard_triplet_loss(
            embeddings=e, labels=labels, margin=args.margin, method=args.method
        )

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    rss_before = rss_mib()
    start = time.perf_counter()
    compiled = step.lower(embeddings).compile()
    compile_s = time.perf_counter() - start
    (loss, stats), grad = jax.block_until_ready(compiled(embeddings))  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(embeddings))
        times.append(time.perf_counter() - start)
    row = {
        "batch": args.batch,
        "method": args.method,
        "classes": args.classes,
        "dim": args.dim,
        "compile_s": round(compile_s, 2),
        "value_and_grad_s_median": round(float(np.median(times)), 4),
        "value_and_grad_s_min": round(min(times), 4),
        "repeats": args.repeats,
        "rss_before_compile_mib": round(rss_before),
        "loss": float(loss),
        "valid": int(stats.valid),  # int32: wraps past 2^31 - 1 (B = 4096)
        "mined": int(stats.mined),
        "kept": int(stats.positive),
        "ties": int(stats.ties),
        "grad_finite": bool(np.all(np.isfinite(np.asarray(grad)))),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    memory = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in memory:
        row["device_peak_mib"] = round(memory["peak_bytes_in_use"] / MIB)
    return row


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_case(args)), flush=True)
        return
    print(json.dumps({"environment": environment()}), flush=True)
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for method in args.methods.split(","):
            if method == "dense" and batch > args.dense_max_batch:
                print(json.dumps({"batch": batch, "method": method, "skipped": "dense-max-batch"}))
                continue
            command = [sys.executable, os.path.abspath(__file__), "--worker"]
            command += [f"--batch={batch}", f"--method={method}", f"--dim={args.dim}"]
            command += [f"--classes={args.classes}", f"--margin={args.margin}"]
            command += [f"--repeats={args.repeats}", f"--seed={args.seed}"]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                error = result.stderr.strip().splitlines()[-1:] or ["?"]
                print(json.dumps({"batch": batch, "method": method, "error": error[0]}))
                continue
            row = json.loads(result.stdout.strip().splitlines()[-1])
            row["load_average_1m"] = round(os.getloadavg()[0], 2)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
