"""Where training numbers go: metrics.jsonl (the record), TensorBoard events, a progress line.

clu's writers need TensorFlow, so TensorBoard files come from tensorboardX. On resume the
JSON-lines record is cut back to the checkpoint step (the replayed steps are logged again,
bit-identically) and TensorBoard is told to purge the same steps.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping

from ssl_jax import files

METRICS_FILE = "metrics.jsonl"


def _jsonable(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # "nan"/"inf": valid JSON, and visible as what it is
    return value


def read_metrics(workdir: str) -> list[dict]:
    """All records of `<workdir>/metrics.jsonl` (an empty list if there is none)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricWriter:
    """Writes every logged step and evaluation to metrics.jsonl and TensorBoard."""

    def __init__(self, workdir: str, *, start_step: int = 0, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, METRICS_FILE)
        self._truncate_after(start_step)
        self._file = open(self.path, "a")  # noqa: SIM115 - closed in close()
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # metrics.jsonl stays the complete record
                print(
                    "tensorboardX is not installed: no TensorBoard files, metrics.jsonl only.",
                    file=sys.stderr,
                )
            else:
                self._tb = SummaryWriter(
                    os.path.join(workdir, "tensorboard"), purge_step=start_step or None
                )

    def _truncate_after(self, step: int) -> None:
        """Drops records beyond `step` (left by an interrupted run that will be replayed)."""
        if not os.path.exists(self.path):
            return
        kept = [r for r in read_metrics(os.path.dirname(self.path)) if r["step"] <= step]
        files.atomic_write_text("".join(json.dumps(r) + "\n" for r in kept), self.path)

    def write(self, kind: str, step: int, values: Mapping[str, float]) -> dict:
        record = {"kind": kind, "step": int(step), "time": time.time()}
        record.update({k: _jsonable(v) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                value = _jsonable(value)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, int(step))
        return record

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class NullWriter:
    """What processes other than 0 of a multi-process run write: nothing (process 0 logs)."""

    def write(self, kind: str, step: int, values: Mapping[str, float]) -> dict:
        return {"kind": kind, "step": int(step), **values}

    def close(self) -> None:
        pass


class Progress:
    """A one-line progress report: step, loss, img/s and ETA (big_vision's chrono, simplified)."""

    def __init__(
        self,
        total_steps: int,
        images_per_step: int,
        start_step: int,
        stream=None,
        *,
        quiet: bool = False,
    ):
        self.quiet = quiet  # other processes of a multi-process run: process 0 prints
        self.total_steps = total_steps
        self.images_per_step = images_per_step
        self.stream = stream or sys.stdout
        self._last_step = start_step
        self._last_time = time.perf_counter()
        self.steps_per_s = float("nan")

    def restart(self) -> None:
        """Starts the next interval now (time spent since the last tick is not training)."""
        self._last_time = time.perf_counter()

    def tick(self, step: int) -> dict:
        now = time.perf_counter()
        steps = step - self._last_step
        elapsed = max(now - self._last_time, 1e-9)
        self.steps_per_s = steps / elapsed
        self._last_step, self._last_time = step, now
        eta_s = (self.total_steps - step) / self.steps_per_s if self.steps_per_s > 0 else 0.0
        return {
            "img_per_s": self.steps_per_s * self.images_per_step,
            "steps_per_s": self.steps_per_s,
            "eta_s": eta_s,
        }

    def line(
        self, step: int, values: Mapping[str, float], timing: Mapping[str, float], label: str = ""
    ) -> None:
        """One progress line; `label` (e.g. "seed 3") prefixes it."""
        if self.quiet:
            return
        eta = timing["eta_s"]
        shown = " ".join(
            f"{k}={float(values[k]):.4f}"
            for k in ("loss", "loss_x", "loss_u", "loss_c", "loss_dml", "loss_ccssl", "mask_prob")
            if k in values
        )
        prefix = f"{label} " if label else ""
        print(
            f"[{prefix}step {step}/{self.total_steps}] {shown} lr={float(values.get('lr', 0)):.5f} "
            f"{timing['img_per_s']:.0f} img/s ETA {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m"
            f"{int(eta % 60):02d}s",
            file=self.stream,
            flush=True,
        )
