"""ResNet-18 forward + backward on XLA:CPU with conv_impl "lax" vs "auto" (ssl_jax.models.layers).

Run:
    python benchmarks/conv_cpu.py                       # 64 and 704 images, lax vs auto
    python benchmarks/conv_cpu.py --batch-sizes 56 --impls auto --repeats 10
    python benchmarks/conv_cpu.py --layers --batch-sizes 64,704   # per-layer crossover table

The timed function is one jitted ``jax.grad`` of ``sum(logits) + sum(z)`` with respect to the
parameters, in train mode (batch statistics, running-statistics update), at 60x60 input and
width 1.0: the forward + backward of a CoMatch train step (B=32, mu=7 -> 704 images; B=8,
mu=2 -> 56 images) without the loss and the optimiser. Compile time is reported separately;
each configuration is warmed up once and then timed ``--repeats`` times, configurations
interleaved so that load from other processes hits all of them alike. Both wall time and the
process's CPU time (all threads) are reported: on a shared machine the CPU time is the
steadier comparison, the wall time what a run would see. One JSON line per configuration.

`--layers` times forward + backward of every distinct ResNet-18 convolution (at 60 px) and of
the stem max-pool, for each implementation, in isolation: the data behind the "auto" rule
in `layers.choose_conv_impl`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import flax
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ssl_jax.models import get_model, layers  # noqa: E402

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


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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


def time_interleaved(functions: dict, args: dict, repeats: int) -> dict:
    """Runs each compiled function ``repeats`` times, round-robin; returns wall and CPU times."""
    times = {name: {"wall": [], "cpu": []} for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            wall, cpu = time.perf_counter(), cpu_seconds()
            jax.block_until_ready(function(*args[name]))
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(cpu_seconds() - cpu)
    return times


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {
        "min_ms": round(ordered[0] * 1e3, 1),
        "median_ms": round(ordered[len(ordered) // 2] * 1e3, 1),
    }


def benchmark_model(batch_sizes: list[int], impls: list[str], repeats: int, image_size: int):
    for batch in batch_sizes:
        images = jax.random.uniform(jax.random.PRNGKey(0), (batch, image_size, image_size, 3))
        compiled, args, compile_s = {}, {}, {}
        for impl in impls:
            model = get_model("resnet18", 10, 64, width=1.0, conv_impl=impl)
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
        times = time_interleaved(compiled, args, repeats)
        for impl in impls:
            print(
                json.dumps(
                    {
                        "benchmark": "resnet18_forward_backward",
                        "images": batch,
                        "image_size": image_size,
                        "conv_impl": impl,
                        "compile_s": round(compile_s[impl], 2),
                        "repeats": repeats,
                        "wall": summary(times[impl]["wall"]),
                        "cpu": summary(times[impl]["cpu"]),
                        **environment(),
                    }
                ),
                flush=True,
            )


def benchmark_layers(batch_sizes: list[int], repeats: int):
    convolutions = {
        "lax": layers.conv_lax,
        "patches": layers.conv_patches,
        "hybrid": layers.conv_hybrid,
    }
    for batch in batch_sizes:
        for name, size, kernel, stride, padding, cin, cout in RESNET18_CONVS:
            key_x, key_w = jax.random.split(jax.random.PRNGKey(0))
            x = jax.random.normal(key_x, (batch, size, size, cin))
            w = 0.05 * jax.random.normal(key_w, (kernel, kernel, cin, cout))
            functions, args = {}, {}
            for impl, conv in convolutions.items():

                def forward_backward(x, w, conv=conv, strides=(stride,) * 2, pads=(padding,) * 2):
                    return jax.grad(
                        lambda x, w: jnp.sum(conv(x, w, strides, pads) ** 2), argnums=(0, 1)
                    )(x, w)

                functions[impl] = jax.jit(forward_backward)
                args[impl] = (x, w)
                jax.block_until_ready(functions[impl](x, w))
            times = time_interleaved(functions, args, repeats)
            out = (size + 2 * padding - kernel) // stride + 1
            auto = layers.choose_conv_impl(
                "auto",
                kernel_size=(kernel, kernel),
                strides=(stride, stride),
                output_shape=(batch, out, out),
                backend="cpu",
            )
            print(
                json.dumps(
                    {
                        "benchmark": "conv_forward_backward",
                        "layer": name,
                        "images": batch,
                        "output": out,
                        "auto_picks": auto,
                        **{
                            f"{impl}_cpu_ms": summary(times[impl]["cpu"])["min_ms"]
                            for impl in times
                        },
                        **{
                            f"{impl}_wall_ms": summary(times[impl]["wall"])["min_ms"]
                            for impl in times
                        },
                        "load_average_1m": round(os.getloadavg()[0], 2),
                    }
                ),
                flush=True,
            )
        x = jax.random.normal(jax.random.PRNGKey(0), (batch, 30, 30, 64))
        functions = {
            impl: jax.jit(
                jax.grad(lambda x, impl=impl: jnp.sum(layers.max_pool(x, impl=impl) ** 2))
            )
            for impl in ("lax", "patches")
        }
        for function in functions.values():
            jax.block_until_ready(function(x))
        times = time_interleaved(functions, {impl: (x,) for impl in functions}, repeats)
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
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.layers:
        benchmark_layers(batch_sizes, args.repeats)
    else:
        benchmark_model(batch_sizes, args.impls.split(","), args.repeats, args.image_size)


if __name__ == "__main__":
    main()
