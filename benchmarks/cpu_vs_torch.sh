#!/usr/bin/env bash
# ssl_jax's ResNet-18 step against the PyTorch eager reference on this CPU, interleaved so
# that load from other processes hits both alike (issue 6's CPU target).
#
#   TORCH_PYTHON=$TORCH_VENV/bin/python bash benchmarks/cpu_vs_torch.sh [ROUNDS]
#
# TORCH_PYTHON: a Python that has torch (or TORCH_VENV, a virtual environment with torch; see
# benchmarks/torch_reference.py); PYTHON: ssl_jax's Python (default: python on PATH).
#
# Prints one JSON line per timing: step_throughput.py's (CoMatch+Triplet, --augment none)
# and torch_reference.py's (forward + CE + an embedding term + SGD + EMA), at B 8 mu 2 and
# B 32 mu 7.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
torch_python="${TORCH_PYTHON:-${TORCH_VENV:+$TORCH_VENV/bin/python}}"
if [ -z "$torch_python" ]; then
    echo "Set TORCH_PYTHON to a Python that has torch (or TORCH_VENV to its venv)." >&2
    exit 2
fi
python="${PYTHON:-python}"
for shape in "8 2 20" "32 7 5"; do
    set -- $shape
    for _ in $(seq "$rounds"); do
        "$python" benchmarks/step_throughput.py --algorithm comatch_triplet --model resnet18 \
            --batch "$1" --mu "$2" --steps "$3" --warmup 3 --augment none 2>/dev/null | tail -1
        "$torch_python" benchmarks/torch_reference.py --batch "$1" --mu "$2" --steps "$3" \
            --warmup 3 | tail -1
    done
done
