"""Trains several tiny runs in one process, alone or as one process of a multi-process run.

    python tests/multiprocess_driver.py RUNS_JSON [--coordinator_address A --num_processes N
                                                    --process_id I]

RUNS_JSON is a list of {"workdir": ..., "overrides": {dotted config key: value}} applied to
`configs/demo.py:smoke`. One JAX start-up (and one distributed initialisation) for all of
them, which is what test_multiprocess.py needs of it; `launch.py` is tested there too.
"""

import argparse
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import demo  # noqa: E402
from ssl_jax import distributed, xla_cpu  # noqa: E402


def config_with(overrides: dict):
    config = demo.get_config("smoke")
    for key, value in overrides.items():
        *path, leaf = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[leaf] = value
    return config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs")
    parser.add_argument("--coordinator_address")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    args = parser.parse_args()
    xla_cpu.prefer_eigen_convolutions()
    distributed.initialize(
        distributed.Launch(args.coordinator_address, args.num_processes, args.process_id)
    )
    from ssl_jax import train

    for run in json.loads(args.runs):
        train.train_and_evaluate(config_with(run["overrides"]), run["workdir"])


if __name__ == "__main__":
    main()
