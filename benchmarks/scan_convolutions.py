"""One train step jitted alone against the same step as the body of a one-step `lax.scan`,
with and without `ssl_jax.loop_convolutions.canonical_convolutions` (the CPU's K-step program).

XLA:CPU runs autodiff's gradient convolutions inside loop bodies without its Eigen library
(jax-ml/jax#12868); this measures what that costs a training step and what the rewrite gets
back. Usage (options as step_throughput.py's; a fixed host batch, no augmentation):

    python benchmarks/scan_convolutions.py --width 0.25 --batch 8 --mu 2 --steps 3

The last line is one JSON object: per variant, compile seconds and the median ms per step.
"""

import functools
import json
import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks import step_throughput  # noqa: E402
from ssl_jax import loop_convolutions, train_state, xla_cpu  # noqa: E402
from ssl_jax import step as step_lib  # noqa: E402

VARIANTS = ("step_alone", "scan_body", "scan_body_canonical")


def build_parser():
    p = step_throughput.build_parser(__doc__.split("\n")[0])
    p.set_defaults(augment="none", steps=3, warmup=1)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    return p


def make_program(variant, step):
    """state, batch -> state after one step, as `variant` builds it."""
    if variant == "step_alone":
        return jax.jit(lambda state, batch: step(state, batch, None)[0], donate_argnums=(0,))
    body = step if variant == "scan_body" else loop_convolutions.canonical_convolutions(step)

    def program(state, batch):
        block = jax.tree.map(lambda x: x[None], batch)
        return jax.lax.scan(lambda s, b: (body(s, b, None)[0], None), state, block)[0]

    return jax.jit(program, donate_argnums=(0,))


def run(args) -> dict:
    jax.config.update("jax_compilation_cache_dir", None)  # time real compiles
    config, algorithm, data, model, tx, state = step_throughput.setup(args)
    batch = jax.device_put(
        step_throughput.fixed_host_batch(data, config, algorithm.unlabelled_views)
    )
    step = functools.partial(
        step_lib.train_step, model=model, algorithm=algorithm, tx=tx, config=config
    )
    result = {}
    for variant in args.variants.split(","):
        program = make_program(variant, step)
        current = jax.tree.map(jax.numpy.copy, state)
        start = time.perf_counter()
        compiled = program.lower(current, batch).compile()
        compile_s = time.perf_counter() - start
        for _ in range(args.warmup):
            current = jax.block_until_ready(compiled(current, batch))
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            current = jax.block_until_ready(compiled(current, batch))
            times.append(1e3 * (time.perf_counter() - start))
        result[variant] = {
            "compile_s": round(compile_s, 2),
            "ms_per_step_median": round(statistics.median(times), 2),
            "ms_rounds": [round(t, 2) for t in times],
        }
    return {
        "benchmark": "scan_convolutions",
        **result,
        **step_throughput.shape_fields(args, train_state.images_per_step(config, algorithm)),
        **step_throughput.device_info(),
    }


def main(argv=None):
    args = build_parser().parse_args(argv)
    xla_cpu.prefer_eigen_convolutions()  # the CPU convolution library launch.py uses
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
