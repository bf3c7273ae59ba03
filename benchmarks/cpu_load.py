"""How many cores other processes kept busy while a benchmark ran (stdlib only).

Shared by conv_cpu.py (jax) and torch_reference.py (a torch-only Python): on a shared machine
the wall time of a multi-threaded program measures its neighbours as much as the program, so
both throw away timings taken beside a busy neighbour.
"""

from __future__ import annotations

import os
import resource
import time
from typing import NamedTuple

CLOCK_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")  # /proc/stat's resolution (10 ms)


def process_cpu_seconds() -> float:
    """CPU seconds this process (all its threads) has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_busy_seconds() -> float:
    """CPU seconds all processes have used (from /proc/stat; 0 where there is none)."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(v) for v in stat.readline().split()[1:]]
    except OSError:
        return 0.0
    return (sum(ticks) - ticks[3] - ticks[4]) * CLOCK_TICK_S


class Mark(NamedTuple):
    machine_busy: float
    process_cpu: float
    wall: float


def mark() -> Mark:
    return Mark(machine_busy_seconds(), process_cpu_seconds(), time.perf_counter())


def others_since(start: Mark, slack_ticks: int = 0) -> tuple[float, float]:
    """(wall seconds since ``start``, cores other processes kept busy meanwhile).

    ``slack_ticks`` of other processes' CPU time are forgiven: /proc/stat counts in ticks.
    """
    now = mark()
    wall = now.wall - start.wall
    others_s = (now.machine_busy - start.machine_busy) - (now.process_cpu - start.process_cpu)
    return wall, max(0.0, others_s - slack_ticks * CLOCK_TICK_S) / wall
