"""The randomized SVD's sparse × dense product: mx's warp-per-row kernel beside cuSPARSE's
(through CuPy), on one GPU, in one run. Ω is uniform, n × n with |Ω| entries; widths are
those of the initialisation (k + 8).

Usage: python bench/spmm_rows.py --n 100000 --entries 3e8 --widths 24,72,136
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mx.kernels import rowsolve  # noqa: E402


def timed(cp, fn, reps=3) -> float:
    fn()
    cp.cuda.runtime.deviceSynchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    cp.cuda.runtime.deviceSynchronize()
    return (time.perf_counter() - t0) / reps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--entries", type=float, default=3e8)
    ap.add_argument("--widths", default="24,72,136")
    args = ap.parse_args(argv)
    import cupy as cp
    import cupyx.scipy.sparse as csps

    n = args.n
    rng = cp.random.default_rng(0)
    keys = cp.unique(rng.integers(0, n * n, size=int(args.entries), dtype=np.int64))
    rows, cols = keys // n, keys % n
    indptr = cp.zeros(n + 1, dtype=np.int64)
    indptr[1:] = cp.cumsum(cp.bincount(rows, minlength=n))
    vals = rng.standard_normal(keys.size)
    a = csps.csr_matrix((vals, cols, indptr), shape=(n, n))
    device = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"sparse × dense on one {device}, n = {n}, |Ω| = {keys.size}, float64")
    print(f"{'width':>6} {'cuSPARSE s':>11} {'mx s':>8} {'cuSPARSE / mx':>14} {'rel diff':>9}")
    for w in [int(x) for x in args.widths.split(",")]:
        x = rng.standard_normal((n, w))
        theirs = timed(cp, lambda: a @ x)
        ours = timed(cp, lambda: rowsolve.spmm(cp, indptr, cols, vals, x))
        want = a @ x
        diff = float(cp.linalg.norm(rowsolve.spmm(cp, indptr, cols, vals, x) - want) / cp.linalg.norm(want))
        print(f"{w:>6} {theirs:11.4f} {ours:8.4f} {theirs / ours:14.2f} {diff:9.1e}")


if __name__ == "__main__":
    main()
