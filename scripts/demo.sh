#!/usr/bin/env bash
# Set up a virtual environment with mx, make two random matrices and run the demo GEMM job on
# a local Ray (CPU), then check C against NumPy.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e .
.venv/bin/mx data random examples/data/A.zarr --shape 3000,2000 --chunks 1024,1024 --seed 1 --overwrite
.venv/bin/mx data random examples/data/B.zarr --shape 2000,2500 --chunks 1024,1024 --seed 2 --overwrite
job=$(.venv/bin/mx submit examples/gemm.yaml)
.venv/bin/mx status "$job"
.venv/bin/python - <<'PY'
import numpy as np, zarr
a, b, c = (np.asarray(zarr.open_array(f"examples/data/{n}.zarr", mode="r")[...]) for n in "ABC")
err = np.linalg.norm(c - a @ b) / np.linalg.norm(a @ b)
print(f"C = A·B: {c.shape[0]}×{c.shape[1]}, relative error vs NumPy {err:.2e}")
assert err < 1e-12
PY
