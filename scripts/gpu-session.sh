#!/usr/bin/env bash
# One call on a GPU machine (device tool): GPU tests, then the GEMM benchmark.
# Usage: bash scripts/gpu-session.sh "<pytest args>" "<bench script and args>"   (writes under $OUT)
#   e.g. bash scripts/gpu-session.sh "tests/test_gpu.py" "bench/gemm.py --gpus 1,2"
set -uo pipefail
cd "$(dirname "$0")/.."
source .devbundle/activate.sh
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MX_HOME=/tmp/mx-home
# the lent machines run as root, where Open MPI's mpiexec (the image's) refuses without these
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpus.txt"
nvidia-smi topo -m >> "$OUT/gpus.txt" 2>&1
python3 -c "import ray, dask, zarr, cupy; print('ray', ray.__version__, 'dask', dask.__version__, 'zarr', zarr.__version__, 'cupy', cupy.__version__)"
if [ -n "${1:-}" ]; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider $1 2>&1 | tee "$OUT/pytest.txt" | tail -25
fi
if [ -n "${2:-}" ]; then
  timeout 420 python3 $2 --data /tmp/mx-bench --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt" | grep -v "^\s*$" | tail -40
fi
