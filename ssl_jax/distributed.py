"""Several processes, one run: JAX's multi-controller start-up and what the run needs of it.

Every process runs the same `launch.py` command with its own `--process_id`; they meet at
`--coordinator_address` (process 0's host and a free port) and from then on the devices of
all processes form one global mesh (`devices.make_mesh`). JAX carries the collectives (gloo on
CPU, NCCL on GPU); ssl_jax has no communication layer of its own. What a run asks of the
processes beyond the jitted step is here: who writes files (process 0), agreeing on a stop
(SIGTERM reaching one process stops all at the same boundary), and waiting for one another.

A dead process stops the others: each sends heartbeats to the coordination service, and
`HEARTBEAT_TIMEOUT_S` after one stops, every other process is terminated by JAX with
"Terminating process because the JAX distributed service detected fatal errors ... another
task died". Rerunning the same commands resumes from the last checkpoint.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

# A process whose heartbeats stop for this long is dead, and the others are terminated: short
# enough that a lost peer ends the run within a minute, long enough for a busy host.
HEARTBEAT_TIMEOUT_S = 30
# How long a finishing process waits at exit for the others to finish too.
SHUTDOWN_TIMEOUT_S = 120
# How long processes wait for one another to start (a cluster may start them minutes apart).
INITIALIZATION_TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins a multi-process run (`launch.py`'s distributed flags)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False  # let JAX detect the cluster (Slurm, Open MPI, ...) from its environment

    @property
    def wanted(self) -> bool:
        given = (self.coordinator_address, self.num_processes, self.process_id)
        return self.auto or any(v is not None for v in given)

    def check(self) -> None:
        """Raises ValueError naming what is missing or wrong."""
        if not self.wanted or self.auto:
            return  # single process, or JAX fills in what was not given from the cluster
        given = {
            "--coordinator_address": self.coordinator_address,
            "--num_processes": self.num_processes,
            "--process_id": self.process_id,
        }
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise ValueError(
                f"A multi-process run needs --coordinator_address, --num_processes and "
                f"--process_id together (missing: {', '.join(missing)}); or pass "
                "--distributed_auto on a cluster JAX detects (Slurm, Open MPI)."
            )
        if self.num_processes < 1:
            raise ValueError(f"--num_processes must be >= 1, got {self.num_processes}.")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(
                f"--process_id must be in [0, {self.num_processes - 1}] for "
                f"--num_processes={self.num_processes}, got {self.process_id}."
            )
        if ":" not in self.coordinator_address:
            raise ValueError(
                f"--coordinator_address must be host:port (process 0's host and a free port), "
                f"got {self.coordinator_address!r}."
            )


def initialize(launch: Launch) -> bool:
    """Joins the multi-process run `launch` describes (before any device is touched).

    Returns False (and does nothing) for a single-process run.
    """
    launch.check()
    if not launch.wanted:
        return False
    jax.distributed.initialize(
        coordinator_address=launch.coordinator_address,
        num_processes=launch.num_processes,
        process_id=launch.process_id,
        initialization_timeout=INITIALIZATION_TIMEOUT_S,
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
        shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
    )
    if is_primary():
        print(
            f"Process 0 of {jax.process_count()}: {jax.device_count()} devices in all "
            f"({jax.local_device_count()} here). If a process dies, the others stop within "
            f"~{HEARTBEAT_TIMEOUT_S} s; rerun the same commands to resume.",
            flush=True,
        )
    return True


def is_primary() -> bool:
    """Process 0 writes the run's files (metrics, config, figures) and prints its progress."""
    return jax.process_index() == 0


def multi_process() -> bool:
    return jax.process_count() > 1


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (nothing to do in one process)."""
    if multi_process():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True if `flag` is true in any process (every process must call it at the same point)."""
    if not multi_process():
        return bool(flag)
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
    return bool(np.any(flags))


def local_copy(tree):
    """Each leaf as an array on this process's first device (a replicated global array's own
    copy), so that inference runs in this process alone, with no collectives."""
    device = jax.local_devices()[0]

    def local(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x.addressable_data(0)
        return jax.device_put(x, device) if isinstance(x, jax.Array) else x

    return jax.tree.map(local, tree)
