"""Collects training runs into the layout of the paper's Tables II/III (Markdown and CSV).

    python -m ssl_jax.report runs/ucm10_triplet_s0 runs/ucm10_triplet_s1 ... [--out results]

One row per experiment: runs whose configs differ only by `seed` (and by settings that do not
change training: data location, workers, eval/predict options) are one experiment, shown as
mean ± sample standard deviation (n runs). Top1 is the EMA top-1 of the last evaluation,
Best-Top1 the best EMA top-1 over all evaluations, Mean the mean of the last
`train.mean_of_last` evaluations (docs/method.md#evaluation). Prints the Markdown table; with
`--out PREFIX` also writes PREFIX.md and PREFIX.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections.abc import Sequence

import numpy as np

from ssl_jax import checkpoint as checkpoint_lib
from ssl_jax import files, metric_writers

TRAINERS = {
    "supervised": "Supervised",
    "fixmatch": "FixMatch",
    "fixmatch_ccssl": "FixMatch+CCSSL",
    "comatch": "CoMatch",
    "comatch_ccssl": "CoMatch+CCSSL",
    "comatch_triplet": "CoMatch+Triplet",
}
MODELS = {"resnet18": "ResNet-18", "resnet50": "ResNet-50", "wrn28_2": "WRN-28-2"}
# Config keys that do not make two runs different experiments.
# A several-seed run (`num_seeds` > 1) contributes one run per seed, grouped with the same
# experiment's separate runs.
NOT_EXPERIMENT_KEYS = ("seed", "num_seeds") + checkpoint_lib.RESUMABLE_CHANGES
NUMBERS = ("top1", "best_top1", "mean_top1_last", "train_seconds")


class ReportError(ValueError):
    """A workdir that cannot be reported; the message names it and says why."""


def experiment_key(config: dict) -> str:
    """The config without the keys in NOT_EXPERIMENT_KEYS, as canonical JSON."""
    flat = checkpoint_lib.flatten_config(config)
    kept = {k: v for k, v in flat.items() if not files.matches_key_prefix(k, NOT_EXPERIMENT_KEYS)}
    return json.dumps(kept, sort_keys=True)


def trainer_name(config: dict) -> str:
    algorithm = config["algorithm"]
    name = TRAINERS.get(algorithm["name"], algorithm["name"])
    if algorithm["name"].endswith("ccssl"):
        name += " (OD)" if float(algorithm["t_push"]) > 0 else " (ID)"
    return name


def model_name(config: dict) -> str:
    name = MODELS.get(config["model"]["name"], config["model"]["name"])
    width = float(config["model"]["width"])
    return name if width == 1.0 else f"{name} x{width:g}"


def protocol_name(config: dict) -> str:
    data = config["data"]
    if data["protocol"] == "k_per_class":
        return f"{data['labels_per_class']} labels/class"
    return data["protocol"]


def _train_seconds(workdir: str) -> float | None:
    """Training time from the latest checkpoint's meta (None without checkpoints)."""
    if not os.path.isdir(os.path.join(workdir, checkpoint_lib.CHECKPOINT_DIR)):
        return None
    import orbax.checkpoint as ocp

    checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
    try:
        step = checkpointer.manager.latest_step()
        if step is None:
            return None
        restored = checkpointer.manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        )
        seconds = restored["meta"].get("train_seconds")
        return None if seconds is None else float(seconds)
    finally:
        checkpointer.close()


def _load_config(workdir: str) -> dict:
    try:
        return json.loads(checkpoint_lib.load_saved_config(workdir).to_json())
    except checkpoint_lib.CheckpointError as e:
        raise ReportError(str(e)) from None


def summarize_workdir(workdir: str) -> list[dict]:
    """The runs of a workdir: one, or one per seed of a several-seed run (`summarize_run`).

    The seeds of a several-seed run share its training time (they trained together).
    """
    workdir = os.path.abspath(workdir)
    config = _load_config(workdir)
    n = int(config.get("num_seeds", 1))
    if n == 1:
        return [summarize_run(workdir)]
    return [summarize_run(workdir, seed=int(config["seed"]) + i, config=config) for i in range(n)]


def summarize_run(workdir: str, *, seed: int | None = None, config: dict | None = None) -> dict:
    """One run's table entries, from config.json, metrics.jsonl and the latest checkpoint.

    Keys an older config.json lacks read as their configs/base.py defaults. `seed`: that seed
    of a several-seed run (its metrics are in `<workdir>/seed_<seed>/`).
    """
    workdir = os.path.abspath(workdir)
    config = _load_config(workdir) if config is None else config
    metrics_dir = workdir if seed is None else os.path.join(workdir, f"seed_{seed}")
    records = metric_writers.read_metrics(metrics_dir)
    evals = [r for r in records if r.get("kind") == "eval"]
    if not evals:
        raise ReportError(
            f"{metrics_dir} has no evaluation in metrics.jsonl yet (one is written after every "
            "epoch); train longer or leave it out."
        )
    top1 = [float(r["top1"]) for r in evals]
    mean_of_last = int(config["train"]["mean_of_last"])
    peaks = [r["peak_device_memory_bytes"] for r in evals if r.get("peak_device_memory_bytes")]
    seconds = _train_seconds(workdir)
    return {
        "workdir": workdir if seed is None else metrics_dir,
        "key": experiment_key(config),
        "seed": config["seed"] if seed is None else seed,
        "trainer": trainer_name(config),
        "dataset": config["data"]["name"],
        "mu": config["data"]["mu"],
        "model": model_name(config),
        "protocol": protocol_name(config),
        "top1": top1[-1],
        "best_top1": max(top1),
        "mean_top1_last": float(np.mean(top1[-mean_of_last:])),
        "mean_of_last": mean_of_last,
        "train_seconds": seconds,
        "steps": int(evals[-1]["step"]),
        "total_steps": int(config["train"]["total_steps"]),
        "peak_memory_gib": max(peaks) / 2**30 if peaks else None,
    }


def group_runs(runs: Sequence[dict]) -> list[dict]:
    """Runs of one experiment together (first-seen order), with mean/std/n of each number."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["key"], []).append(run)
    rows = []
    for members in groups.values():
        first = members[0]
        row = {k: first[k] for k in ("trainer", "dataset", "mu", "model", "protocol")}
        row["mean_of_last"] = first["mean_of_last"]
        row["n"] = len(members)
        row["seeds"] = [m["seed"] for m in members]
        row["workdirs"] = [m["workdir"] for m in members]
        for name in NUMBERS:
            values = [m[name] for m in members if m[name] is not None]
            row[f"{name}_mean"] = float(np.mean(values)) if values else None
            row[f"{name}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
            row[f"{name}_n"] = len(values)
        row["steps"] = sorted({m["steps"] for m in members})
        row["total_steps"] = sorted({m["total_steps"] for m in members})
        peaks = [m["peak_memory_gib"] for m in members if m["peak_memory_gib"] is not None]
        row["peak_memory_gib"] = max(peaks) if peaks else None
        rows.append(row)
    return rows


def _mean_std(row: dict, name: str, digits: int = 2, unit: str = "") -> str:
    mean, std, n = row[f"{name}_mean"], row[f"{name}_std"], row[f"{name}_n"]
    if mean is None:
        return "—"
    if std is None:
        return f"{mean:.{digits}f}{unit}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}{unit} ({n})"


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _duration(row: dict) -> str:
    mean, std, n = row["train_seconds_mean"], row["train_seconds_std"], row["train_seconds_n"]
    if mean is None:
        return "—"
    return _hms(mean) if std is None else f"{_hms(mean)} ± {_hms(std)} ({n})"


def _steps(row: dict) -> str:
    low, high, total = row["steps"][0], row["steps"][-1], max(row["total_steps"])
    done = str(low) if low == high else f"{low}–{high}"
    return done if low == total else f"{done} of {total}"


HEADER = (
    "Trainer",
    "Dataset",
    "μ",
    "Model",
    "Protocol",
    "Top1",
    "Best-Top1",
    "Mean top-1 (last N)",
    "Training time",
    "Steps",
    "Peak device memory",
    "Runs (seeds)",
)


def markdown_table(rows: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    for row in rows:
        cells = [
            row["trainer"],
            row["dataset"],
            str(row["mu"]),
            row["model"],
            row["protocol"],
            _mean_std(row, "top1"),
            _mean_std(row, "best_top1"),
            _mean_std(row, "mean_top1_last") + f" (N={row['mean_of_last']})",
            _duration(row),
            _steps(row),
            "—" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.2f} GiB",
            f"{row['n']} ({', '.join(str(s) for s in row['seeds'])})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Top-1 accuracies of the EMA model on the test split, in percent. Top1: last "
        "evaluation; Best-Top1: best evaluation; Mean: mean of the last N evaluations. "
        "mean ± sample standard deviation (number of runs) over runs that differ only by seed."
    )
    return "\n".join(lines) + "\n"


CSV_COLUMNS = (
    "trainer",
    "dataset",
    "mu",
    "model",
    "protocol",
    "n",
    "seeds",
    "top1_mean",
    "top1_std",
    "best_top1_mean",
    "best_top1_std",
    "mean_top1_last_mean",
    "mean_top1_last_std",
    "mean_of_last",
    "train_seconds_mean",
    "train_seconds_std",
    "steps",
    "total_steps",
    "peak_memory_gib",
    "workdirs",
)


def write_csv(rows: Sequence[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            values = []
            for column in CSV_COLUMNS:
                value = row[column]
                if isinstance(value, list):
                    value = ";".join(str(v) for v in value)
                elif value is None:
                    value = ""
                elif isinstance(value, float):
                    value = repr(value) if math.isfinite(value) else ""
                values.append(value)
            writer.writerow(values)


def build_report(workdirs: Sequence[str]) -> tuple[list[dict], str]:
    runs = [run for w in workdirs for run in summarize_workdir(w)]
    rows = group_runs(runs)
    return rows, markdown_table(rows)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m ssl_jax.report",
        description="Tables II/III-style summary of ssl_jax training workdirs.",
    )
    parser.add_argument("workdirs", nargs="+", help="training run directories (--workdir)")
    parser.add_argument("--out", default="", help="also write OUT.md and OUT.csv")
    args = parser.parse_args(argv)
    try:
        rows, table = build_report(args.workdirs)
    except ReportError as e:
        parser.exit(2, f"error: {e}\n")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".md", "w") as f:
            f.write(table)
        write_csv(rows, args.out + ".csv")
    sys.stdout.write(table)
    return table


if __name__ == "__main__":
    main()
