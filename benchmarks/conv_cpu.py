"""ResNet-18 forward + backward on XLA:CPU, and the per-layer data behind `conv_impl="auto"`.

Run:
    python benchmarks/conv_cpu.py                       # 64 and 704 images, lax vs auto
    python benchmarks/conv_cpu.py --batch-sizes 56 --impls auto --repeats 10
    python benchmarks/conv_cpu.py --layers --batch-sizes 56,704   # per-layer, per-part table
    SSL_JAX_CPU_CONVOLUTIONS=ynn python benchmarks/conv_cpu.py ...
        # convolutions in YNNPACK (XLA's default) instead of Eigen (ssl_jax's, ssl_jax/xla_cpu.py)

The timed function is one jitted ``jax.grad`` of ``sum(logits) + sum(z)`` with respect to the
parameters, in train mode (batch statistics, running-statistics update), at 60x60 input and
width 1.0: the forward + backward of a CoMatch train step (B=32, mu=7 -> 704 images; B=8,
mu=2 -> 56 images) without the loss and the optimiser. Compile time is reported separately;
each configuration is warmed up once and then timed ``--repeats`` times, configurations
interleaved so that load from other processes hits all of them alike. Both wall time and the
process's CPU time (all threads) are reported. On a shared machine a round in which other
processes used more than ``--max-others`` cores (read from /proc/stat) is thrown away and
retried: a 2-thread program's wall time otherwise measures its neighbours.

`--layers` times each of the three computations of every distinct ResNet-18 convolution (at
60 px) -- forward, input gradient, kernel gradient -- for each formulation in
`cpu_conv.PART_IMPLS` (ssl_jax/models/cpu_conv.py), in isolation, and prints the plan "auto"
picks beside the fastest combination; then the stem max-pool. This is the data behind
`cpu_conv.choose_conv_plan`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import flax
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import cpu_load  # noqa: E402  (benchmarks/cpu_load.py, beside this script)

from ssl_jax import xla_cpu  # noqa: E402
from ssl_jax.models import cpu_conv, get_model, layers  # noqa: E402

# (name, input size, kernel, stride, padding, cin, cout): ResNet-18's convolutions at 60 px.
RESNET18_CONVS = [
    ("stem 7x7/2", 60, 7, 2, 3, 3, 64),
    ("layer1 3x3", 15, 3, 1, 1, 64, 64),
    ("layer2 3x3/2", 15, 3, 2, 1, 64, 128),
    ("layer2 1x1/2", 15, 1, 2, 0, 64, 128),
    ("layer2 3x3", 8, 3, 1, 1, 128, 128),
    ("layer3 3x3/2", 8, 3, 2, 1, 128, 256),
    ("layer3 1x1/2", 8, 1, 2, 0, 128, 256),
    ("layer3 3x3", 4, 3, 1, 1, 256, 256),
    ("layer4 3x3/2", 4, 3, 2, 1, 256, 512),
    ("layer4 1x1/2", 4, 1, 2, 0, 256, 512),
    ("layer4 3x3", 2, 3, 1, 1, 512, 512),
]


def environment() -> dict:
    return {
        "device": str(jax.devices()[0]),
        "backend": jax.default_backend(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def timed_call(function, args) -> tuple[float, float]:
    """(wall, own CPU) seconds of one synchronised call."""
    cpu, wall = cpu_load.process_cpu_seconds(), time.perf_counter()
    jax.block_until_ready(function(*args))
    return time.perf_counter() - wall, cpu_load.process_cpu_seconds() - cpu


def others_cores(window_s: float = 0.3) -> float:
    """Cores other processes keep busy, measured while this one sleeps for ``window_s``."""
    start = cpu_load.mark()
    time.sleep(window_s)
    return cpu_load.others_since(start)[1]


def time_interleaved(
    functions: dict, args: dict, repeats: int, max_others: float = 0.0, max_wait_s: float = 900
) -> dict:
    """Runs each compiled function ``repeats`` times, round-robin; returns wall and CPU times.

    With ``max_others`` > 0, each round waits until other processes keep fewer than that many
    cores busy (checked over 0.3 s; /proc/stat's 10 ms ticks are too coarse to judge one
    short call), and a round during which they used more (with two ticks of slack) is
    retried, for up to ``max_wait_s`` in all: on a shared machine the wall time of a
    multi-threaded program measures its neighbours as much as the program.
    """
    times = {name: {"wall": [], "cpu": [], "others": []} for name in functions}
    deadline = time.monotonic() + max_wait_s
    slack_ticks = 2 if max_others > 0 else 0
    kept = 0
    while kept < repeats:
        waiting = max_others > 0 and time.monotonic() < deadline
        if waiting and others_cores() > max_others:
            continue
        start = cpu_load.mark()
        round_times = {name: timed_call(f, args[name]) for name, f in functions.items()}
        _, others = cpu_load.others_since(start, slack_ticks)
        if waiting and others > max_others:
            continue
        kept += 1
        for name, (call_wall, call_cpu) in round_times.items():
            times[name]["wall"].append(call_wall)
            times[name]["cpu"].append(call_cpu)
            times[name]["others"].append(others)
    return times


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {
        "min_ms": round(ordered[0] * 1e3, 1),
        "median_ms": round(ordered[len(ordered) // 2] * 1e3, 1),
    }


def benchmark_model(
    batch_sizes: list[int], impls: list[str], repeats: int, image_size: int, max_others: float
):
    for batch in batch_sizes:
        images = jax.random.uniform(jax.random.PRNGKey(0), (batch, image_size, image_size, 3))
        compiled, args, compile_s = {}, {}, {}
        for impl in impls:
            model = get_model("resnet18", 10, 64, width=1.0, conv_impl=impl, platform="cpu")
            variables = jax.jit(
                lambda x, model=model: model.init(jax.random.PRNGKey(1), x, train=False)
            )(images[:1])

            def loss(params, batch_stats, x, model=model):
                (logits, z), updates = model.apply(
                    {"params": params, "batch_stats": batch_stats},
                    x,
                    train=True,
                    mutable=["batch_stats"],
                )
                return jnp.sum(logits) + jnp.sum(z), updates

            step_args = (variables["params"], variables["batch_stats"], images)
            start = time.perf_counter()
            compiled[impl] = jax.jit(jax.grad(loss, has_aux=True)).lower(*step_args).compile()
            compile_s[impl] = time.perf_counter() - start
            args[impl] = step_args
            jax.block_until_ready(compiled[impl](*step_args))  # warm-up
        times = time_interleaved(compiled, args, repeats, max_others)
        for impl in impls:
            print(
                json.dumps(
                    {
                        "benchmark": "resnet18_forward_backward",
                        "images": batch,
                        "image_size": image_size,
                        "conv_impl": impl,
                        "conv_library": cpu_conv.xla_cpu_conv_library(),
                        "compile_s": round(compile_s[impl], 2),
                        "repeats": repeats,
                        "wall": summary(times[impl]["wall"]),
                        "cpu": summary(times[impl]["cpu"]),
                        "others_cores_max": round(max(times[impl]["others"]), 2),
                        **environment(),
                    }
                ),
                flush=True,
            )


# A formulation whose first (warm-up) call takes longer than this is reported, not repeated:
# XLA:CPU's input gradient of a 2x2-output convolution can take seconds at 704 images.
SLOW_CALL_S = 1.0


def part_functions(kernel_size, strides, padding, x, kernel, grad_out) -> dict:
    """{(part, formulation): jitted function of (x, kernel, grad_out)} for one convolution."""
    x_like = jax.ShapeDtypeStruct(x.shape, x.dtype)
    kernel_like = jax.ShapeDtypeStruct(kernel.shape, kernel.dtype)
    in_pixels = x.shape[1] * x.shape[2]
    functions = {}
    for impl in cpu_conv.PART_IMPLS:
        if impl == "dense" and in_pixels > 2 * kernel_size[0] * kernel_size[1]:
            continue  # its cost grows with the map squared; never a candidate there
        if impl == "taps" and kernel_size[0] * kernel_size[1] > 9:
            continue  # the 7x7 stem: 49 matmuls over 3 channels, 10-20x slower than lax
        functions["forward", impl] = jax.jit(
            lambda x, w, g, impl=impl: cpu_conv.conv(x, w, strides, padding, impl)
        )
        functions["input_grad", impl] = jax.jit(
            lambda x, w, g, impl=impl: cpu_conv.conv_input_grad(
                impl, g, x_like, w, strides, padding
            )
        )
        functions["kernel_grad", impl] = jax.jit(
            lambda x, w, g, impl=impl: cpu_conv.conv_kernel_grad(
                impl, g, x, kernel_like, strides, padding
            )
        )
    return functions


def benchmark_layers(batch_sizes: list[int], repeats: int, max_others: float):
    library = cpu_conv.xla_cpu_conv_library()
    for batch in batch_sizes:
        for name, size, kernel, stride, padding, cin, cout in RESNET18_CONVS:
            key_x, key_w, key_g = jax.random.split(jax.random.PRNGKey(0), 3)
            out = (size + 2 * padding - kernel) // stride + 1
            x = jax.random.normal(key_x, (batch, size, size, cin))
            w = 0.05 * jax.random.normal(key_w, (kernel, kernel, cin, cout))
            g = jax.random.normal(key_g, (batch, out, out, cout))
            functions = part_functions(
                (kernel, kernel), (stride, stride), (padding, padding), x, w, g
            )
            slow = {}
            for key, function in list(functions.items()):
                start = time.perf_counter()
                jax.block_until_ready(function(x, w, g))
                jax.block_until_ready(function(x, w, g))
                if time.perf_counter() - start > 2 * SLOW_CALL_S:
                    slow[key] = (time.perf_counter() - start) / 2
                    del functions[key]
            times = time_interleaved(
                functions, {key: (x, w, g) for key in functions}, repeats, max_others
            )
            table = {part: {} for part in ("forward", "input_grad", "kernel_grad")}
            for (part, impl), recorded in times.items():
                table[part][impl] = summary(recorded["wall"])["min_ms"]
            for (part, impl), seconds in slow.items():
                table[part][impl] = round(seconds * 1e3, 1)
            best = cpu_conv.ConvPlan(*(min(table[p], key=table[p].get) for p in table))
            auto = cpu_conv.choose_conv_plan(
                "auto",
                kernel_size=(kernel, kernel),
                strides=(stride, stride),
                input_hw=(size, size),
                output_shape=(batch, out, out),
                library=library,
            )
            print(
                json.dumps(
                    {
                        "benchmark": "conv_parts_wall_ms",
                        "layer": name,
                        "images": batch,
                        "output": out,
                        "conv_library": library,
                        **table,
                        "auto_plan": list(auto),
                        "auto_ms": round(
                            sum(table[p][i] for p, i in zip(table, auto, strict=True)), 1
                        ),
                        "best_plan": list(best),
                        "best_ms": round(
                            sum(table[p][i] for p, i in zip(table, best, strict=True)), 1
                        ),
                        "others_cores_max": round(max(max(t["others"]) for t in times.values()), 2),
                        "load_average_1m": round(os.getloadavg()[0], 2),
                    }
                ),
                flush=True,
            )
        x = jax.random.normal(jax.random.PRNGKey(0), (batch, 30, 30, 64))
        pools = {"lax": layers.max_pool, "patches": cpu_conv.max_pool_argmax}
        functions = {
            impl: jax.jit(jax.grad(lambda x, pool=pool: jnp.sum(pool(x) ** 2)))
            for impl, pool in pools.items()
        }
        for function in functions.values():
            jax.block_until_ready(function(x))
        times = time_interleaved(functions, {impl: (x,) for impl in functions}, repeats, max_others)
        print(
            json.dumps(
                {
                    "benchmark": "max_pool_forward_backward",
                    "images": batch,
                    **{f"{impl}_cpu_ms": summary(times[impl]["cpu"])["min_ms"] for impl in times},
                    **{f"{impl}_wall_ms": summary(times[impl]["wall"])["min_ms"] for impl in times},
                }
            ),
            flush=True,
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="64,704")
    parser.add_argument("--impls", default="lax,auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=60)
    parser.add_argument("--layers", action="store_true", help="per-layer table instead")
    parser.add_argument(
        "--max-others",
        type=float,
        default=0.2,
        help="retry rounds in which other processes used more cores than this (0: never)",
    )
    args = parser.parse_args()
    xla_cpu.prefer_eigen_convolutions()  # as launch.py; SSL_JAX_CPU_CONVOLUTIONS=ynn: YNNPACK
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.layers:
        benchmark_layers(batch_sizes, args.repeats, args.max_others)
    else:
        benchmark_model(
            batch_sizes, args.impls.split(","), args.repeats, args.image_size, args.max_others
        )


if __name__ == "__main__":
    main()
