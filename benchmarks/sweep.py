"""Runs step_throughput.py over algorithms x models (one fresh process each) into one table.

    python benchmarks/sweep.py --batch 8 --mu 2 --out sweep.jsonl
    python benchmarks/sweep.py --algorithms comatch_triplet --models resnet18 \
        --extra "--precision bf16" --extra "--augment device"

Each row is step_throughput.py's JSON line (device, versions, ms/step, compile time); the
Markdown table is printed last. A failing combination is reported in the table, not skipped.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ALGORITHMS = (
    "supervised",
    "fixmatch",
    "fixmatch_ccssl",
    "comatch",
    "comatch_ccssl",
    "comatch_triplet",
)
MODELS = ("resnet18", "resnet50", "wrn28_2")
STEP_THROUGHPUT = Path(__file__).with_name("step_throughput.py")


def run_one(algorithm: str, model: str, common: list[str], extra: str) -> dict:
    command = [
        sys.executable,
        str(STEP_THROUGHPUT),
        "--algorithm",
        algorithm,
        "--model",
        model,
        *common,
        *shlex.split(extra),
    ]
    proc = subprocess.run(command, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"algorithm": algorithm, "model": model, "extra": extra, "error": tail[0]}
    result = json.loads(lines[-1])
    result["extra"] = extra
    return result


def markdown(rows: list[dict]) -> str:
    header = (
        "| algorithm | model | options | images/step | ms/step (median) | p10–p90 "
        "| images/s | compile s | peak memory |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for row in rows:
        if "error" in row:
            lines.append(
                f"| {row['algorithm']} | {row['model']} | {row['extra']} | | "
                f"failed: {row['error']} | | | | |"
            )
            continue
        memory = row.get("peak_device_memory_bytes")
        memory = f"{memory / 2**30:.1f} GiB" if memory else "n/a"
        lines.append(
            f"| {row['algorithm']} | {row['model']} | {row['extra'] or 'float32'} "
            f"| {row['images_per_step']} | {row['ms_per_step_median']:.1f} "
            f"| {row['ms_per_step_p10']:.1f}–{row['ms_per_step_p90']:.1f} "
            f"| {row['images_per_s']:.0f} | {row['compile_s']:.1f} | {memory} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--mu", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--augment", default="none", choices=("none", "device", "host"))
    parser.add_argument(
        "--extra", action="append", default=None, help="more step_throughput options, per run"
    )
    parser.add_argument("--out", default="", help="append every JSON row to this file")
    args = parser.parse_args(argv)
    common = [
        f"--batch={args.batch}",
        f"--mu={args.mu}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--augment={args.augment}",
    ]
    rows = []
    for model in args.models.split(","):
        for algorithm in args.algorithms.split(","):
            for extra in args.extra or [""]:
                row = run_one(algorithm, model, common, extra)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as out:
                        out.write(json.dumps(row) + "\n")
    print(markdown(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
