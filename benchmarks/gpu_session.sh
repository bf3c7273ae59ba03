#!/usr/bin/env bash
# All the GPU work of a session in one call (the lent machine has no network and no shared folder).
#
#   Here:   bash benchmarks/gpu_session.sh --prepare DIR   (or SHARED=DIR)
#           (DIR holds wheels/*.whl and data/ucm/<class>/; copies the wheels and the UCM10
#           PNGs into .gpu/, which git ignores)
#   There:  run tool, command "bash benchmarks/gpu_session.sh", carry [".gpu"], timeout ~600 s
#
# It prints the device and versions, then step_throughput.py at paper shapes (CoMatch+Triplet,
# ResNet-18, B 32, mu 7: float32 and bf16, augmentation on the device and none), then a
# real-data CoMatch+Triplet run on UCM10 for RUN_SECONDS, and a table of EMA top-1 against
# steps and minutes. Results land in $OUT (bench.jsonl, metrics.jsonl, summary.txt).
# Environment knobs: RUN_SECONDS (default 300), BENCH_STEPS (50), RUN_CONFIG, EXTRA_RUN_FLAGS,
# TOTAL_SECONDS (default 540: the whole script stays inside the device tool's 600 s per call;
# each benchmark and the run get at most what is left, and a piece with under 60 s is skipped).
set -u
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    shared="${2:-${SHARED:-}}"
    if [ -z "$shared" ] || [ ! -d "$shared/data/ucm" ]; then
        echo "usage: bash benchmarks/gpu_session.sh --prepare DIR  (DIR holds wheels/ and data/ucm/)" >&2
        exit 2
    fi
    mkdir -p .gpu/wheels .gpu/data/ucm
    cp "$shared"/wheels/*.whl .gpu/wheels/
    for c in baseballdiamond buildings denseresidential freeway golfcourse mediumresidential \
             mobilehomepark overpass sparseresidential tenniscourt; do
        cp -r "$shared/data/ucm/$c" .gpu/data/ucm/
    done
    du -sh .gpu
    exit 0
fi

OUT="${OUT:-$PWD/.gpu/out}"
mkdir -p "$OUT"
started=$(date +%s)
seconds_left() { echo $(( ${TOTAL_SECONDS:-540} - ($(date +%s) - started) )); }
if ls .gpu/wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target .gpu/site \
        .gpu/wheels/*.whl 2>&1 | tail -2
fi
export PYTHONPATH="$PWD/.gpu/site:$PWD:${PYTHONPATH:-}"
export SSL_JAX_DATA="${SSL_JAX_DATA:-$PWD/.gpu/data}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/ssl_jax_xla}"

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
    python3 -c "import sys, jax, flax, optax; print('python', sys.version.split()[0], 'jax', \
jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} | tee "$OUT/summary.txt"

steps="${BENCH_STEPS:-50}"
for precision in float32 bf16; do
    for augment in device none; do
        left=$(seconds_left)
        if [ "$left" -lt 60 ]; then
            echo "skipped $precision/$augment: ${left} s left" | tee -a "$OUT/summary.txt"
            continue
        fi
        timeout $(( left < 240 ? left : 240 )) python3 benchmarks/step_throughput.py --precision "$precision" \
            --augment "$augment" --steps "$steps" --warmup 5 ${BENCH_ARGS:-} \
            2> >(grep -v "^I1\|^W1" >&2) | tail -1 | tee -a "$OUT/bench.jsonl"
    done
done

run_dir=/tmp/ssl_jax_gpu_run
rm -rf "$run_dir"
run_seconds=$(( $(seconds_left) - 30 ))  # 30 s for the summary below
max_run_seconds="${RUN_SECONDS:-300}"
if [ "$run_seconds" -gt "$max_run_seconds" ]; then run_seconds="$max_run_seconds"; fi
if [ "$run_seconds" -lt 60 ]; then
    echo "real-data run skipped: ${run_seconds} s left" | tee -a "$OUT/summary.txt"
    exit 0
fi
start=$(date +%s)
timeout --signal=TERM "$run_seconds" python3 launch.py \
    --config "${RUN_CONFIG:-configs/ucm10_triplet.py}" --workdir "$run_dir" \
    --config.eval.figures=False ${EXTRA_RUN_FLAGS:-} 2>&1 | grep -v "^I1\|^W1" | tail -40
echo "real-data run: $(( $(date +%s) - start )) s wall" | tee -a "$OUT/summary.txt"
cp "$run_dir/metrics.jsonl" "$OUT/metrics.jsonl" 2>/dev/null
python3 - "$run_dir/metrics.jsonl" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
start = rows[0]["time"]
print("step    minutes  EMA top-1  best top-1  img/s(last log)")
last_rate = None
for r in rows:
    if r["kind"] == "train":
        last_rate = r.get("img_per_s")
    if r["kind"] == "eval":
        print(f"{r['step']:<7d} {(r['time'] - start) / 60:7.2f}  {r['top1']:9.2f}  "
              f"{r['best_top1']:10.2f}  {last_rate or 0:.0f}")
EOF
