#!/usr/bin/env bash
# All the GPU work of a session in one call (the lent machine has no network and no shared folder).
#
#   Here:   bash benchmarks/gpu_session.sh --prepare DIR   (or SHARED=DIR)
#           (DIR holds wheels/*.whl and data/ucm/<class>/; copies the wheels and the UCM10
#           PNGs into .gpu/, which git ignores)
#   There:  run tool, command "bash benchmarks/gpu_session.sh", carry [".gpu"], timeout ~600 s
#
# It prints the device and versions, then loop_throughput.py (the real training loop, not just
# the step) at paper shapes (CoMatch+Triplet, ResNet-18, B 32, mu 7) with the dataset on the
# device for K (steps per dispatch) in {1, 64} x {float32, bf16}, then the same loop fed by
# the grain host pipeline (PIL augmentation, one worker per core), then a real-data
# CoMatch+Triplet run on UCM10 in K-step mode for RUN_SECONDS (stopped by SIGTERM, which
# checkpoints at the next dispatch boundary), and a table of EMA top-1 against steps and
# minutes. Results land in $OUT (bench.jsonl, metrics.jsonl, summary.txt).
# Environment knobs: RUN_SECONDS (default 240), BENCH_STEPS (64), BENCH_ROUNDS (5),
# RUN_CONFIG, EXTRA_RUN_FLAGS, TOTAL_SECONDS (default 540: the whole script stays inside the
# device tool's 600 s per call; each benchmark and the run get at most what is left, and a
# piece with under 60 s is skipped).
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

steps="${BENCH_STEPS:-64}"
rounds="${BENCH_ROUNDS:-5}"
bench() {  # bench NAME ARGS...: one loop_throughput.py run inside the time left
    local name="$1"; shift
    local left
    left=$(seconds_left)
    if [ "$left" -lt 60 ]; then
        echo "skipped $name: ${left} s left" | tee -a "$OUT/summary.txt"
        return
    fi
    timeout $(( left < 200 ? left : 200 )) python3 benchmarks/loop_throughput.py \
        --steps "$steps" --warmup "$steps" --rounds "$rounds" "$@" ${BENCH_ARGS:-} \
        2> >(grep -v "^I1\|^W1" >&2) | tail -1 | tee -a "$OUT/bench.jsonl"
}
for precision in float32 bf16; do
    for k in 64 1; do
        bench "device/$precision/K=$k" --augment device --precision "$precision" \
            --steps-per-dispatch "$k"
    done
done
bench "host/float32/K=8" --augment host --workers -1 --precision float32 --steps-per-dispatch 8

run_dir=/tmp/ssl_jax_gpu_run
rm -rf "$run_dir"
run_seconds=$(( $(seconds_left) - 30 ))  # 30 s for the summary below
max_run_seconds="${RUN_SECONDS:-240}"
if [ "$run_seconds" -gt "$max_run_seconds" ]; then run_seconds="$max_run_seconds"; fi
if [ "$run_seconds" -lt 60 ]; then
    echo "real-data run skipped: ${run_seconds} s left" | tee -a "$OUT/summary.txt"
    exit 0
fi
start=$(date +%s)
timeout --signal=TERM "$run_seconds" python3 launch.py \
    --config "${RUN_CONFIG:-configs/ucm10_triplet.py}" --workdir "$run_dir" \
    --config.eval.after_training=False ${EXTRA_RUN_FLAGS:-} 2>&1 | grep -v "^I1\|^W1" | tail -40
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
