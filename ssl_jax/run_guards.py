"""What stops a run safely: the NaN guard and SIGTERM (preemption) at a dispatch boundary."""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading


class NonFiniteLossError(FloatingPointError):
    """Raised when a logged loss (or the parameters) stop being finite."""


class Preempted(SystemExit):
    """SIGTERM stopped the run at a dispatch boundary, after a checkpoint; rerun to resume."""


@contextlib.contextmanager
def stop_on_sigterm():
    """SIGTERM (preemption) sets a flag the loop reads at the next dispatch boundary."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        print(
            "SIGTERM received: stopping at the next dispatch boundary.", file=sys.stderr, flush=True
        )
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


WATCHED = ("loss", "param_norm", "ema_param_norm")  # what the NaN guard checks


def check_finite(values, first_step, last_step, writer, manager) -> None:
    """The NaN guard: stops the run before a non-finite state can be checkpointed.

    Checks the loss and the online and EMA parameters; says which checkpoint is the last
    good one (or that there is none) and how to continue from it with a lower learning rate.
    """
    check_finite_seeds([values], None, first_step, last_step, [writer], manager)


def check_finite_seeds(all_values, seeds, first_step, last_step, writers, manager) -> None:
    """The NaN guard over every seed's values (`seeds` None: one seed); names the bad seeds."""
    bad = [
        i
        for i, values in enumerate(all_values)
        if not all(math.isfinite(values[key]) for key in WATCHED if key in values)
    ]
    if not bad:
        return
    for i in bad:
        writers[i].write("train", last_step, all_values[i])
    found = "; ".join(
        (f"seed {seeds[i]}: " if seeds else "")
        + ", ".join(f"{key}={all_values[i][key]}" for key in WATCHED if key in all_values[i])
        for i in bad
    )
    where = ""
    if seeds:
        named = ", ".join(str(seeds[i]) for i in bad)
        where = f" in seed{'s' if len(bad) > 1 else ''} {named} (of seeds {seeds[0]}-{seeds[-1]})"
    last = None if manager is None else manager.latest_step()
    if last is None:
        advice = (
            "No checkpoint was written before this, so there is nothing to resume: lower "
            "optim.lr (or check the data) and start again in this workdir."
        )
    else:
        advice = (
            f"The last good checkpoint is step {last} in {manager.directory} (untouched). "
            "To continue from it with a lower learning rate, rerun with e.g. "
            "--config.optim.lr=<lower> --config.train.resume_changes='(\"optim.lr\",)'; "
            "the change is recorded in metrics.jsonl and config.json."
        )
    raise NonFiniteLossError(
        f"Non-finite values{where} between steps {first_step} and {last_step} ({found}). {advice}"
    )
