"""What a half-sweep's row solves cost on one GPU, part by part, in one run.

On rows all of one degree (random columns): one pass over Ω (the fused operator
(Y_ΩiᵀY_Ωi) p, in float64 and float32), plain CG with 2 and 3 steps (3 and 4 passes) in
float64 and refined (float64 residual, float32 steps on Y gathered in float16, and in
float32: ``lsq.REFINE``, ``lsq.CORRECTION_STORAGE``), refined sketched CG (3 steps), the
fused exact solve in float64, float32 and refined, and the fused float64 sketch solve at
each bucket ratio with 0 steps (sketch, its Gram and inverse, the residual) and with 3.
Times are per half-sweep over every row.

Usage: python bench/rowsolve_passes.py --n 100000 --degree 3000 --ranks 16,64,128
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mx.kernels import lsq, rowsolve  # noqa: E402


def timed(cp, fn, reps):
    fn()  # compiles, allocates
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    stop.synchronize()
    return cp.cuda.get_elapsed_time(start, stop) / reps / 1e3


def _with_storage(storage, fn):
    """fn() with the refined CG correction's Y gathered as ``storage``."""
    keep, lsq.CORRECTION_STORAGE = lsq.CORRECTION_STORAGE, storage
    try:
        return fn()
    finally:
        lsq.CORRECTION_STORAGE = keep


def measure(cp, n, degree, k, ratios, seed=0):
    rng = cp.random.default_rng(seed)
    indptr = cp.arange(n + 1, dtype=cp.int64) * degree
    cols = cp.sort(rng.integers(0, n, size=(n, degree), dtype=cp.int64), axis=1).reshape(-1)
    vals = rng.standard_normal(cols.size)
    y, x = rng.standard_normal((n, k)), rng.standard_normal((n, k))
    y32, x32 = y.astype(cp.float32), x.astype(cp.float32)
    rows, out = cp.arange(n, dtype=cp.int64), cp.empty_like(x)
    row = {"n": n, "degree": degree, "k": k,
           "pass_f64_s": timed(cp, lambda: rowsolve.normal_apply(cp, x, y, indptr, cols, 0.0), 3),
           "pass_f32_s": timed(cp, lambda: rowsolve.normal_apply(cp, x32, y32, indptr, cols, 0.0), 3),
           "plain_cg3_s": timed(cp, lambda: rowsolve.cg_solve(cp, y, x, indptr, cols, vals, 0.0,
                                                              rows, 3, out), 3),
           "plain_cg2_s": timed(cp, lambda: rowsolve.cg_solve(cp, y, x, indptr, cols, vals, 0.0,
                                                              rows, 2, out), 3),
           # float64 residual, the steps on the correction in float32 (lsq.solve_cg_rows)
           "refined_cg2_s": timed(cp, lambda: lsq.solve_cg_rows(cp, x, y, indptr, cols, vals, 0.0,
                                                                rows, 2), 3),
           "refined_cg3_s": timed(cp, lambda: lsq.solve_cg_rows(cp, x, y, indptr, cols, vals, 0.0,
                                                                rows, 3), 3),
           # the same with the correction's Y gathered in float32 instead of float16
           "refined_cg2_f32_s": timed(cp, lambda: _with_storage(None, lambda: lsq.solve_cg_rows(
               cp, x, y, indptr, cols, vals, 0.0, rows, 2)), 3),
           "refined_sketch3_s": timed(cp, lambda: lsq.solve_sketch(cp, x, y, indptr, cols, vals,
                                                                  0.0, rows, 3), 3),
           "exact_f32_s": timed(cp, lambda: lsq.solve_exact(cp, y32, indptr, cols, vals, 0.0), 1),
           "exact_s": timed(cp, lambda: lsq.solve_exact(cp, y, indptr, cols, vals, 0.0), 1),
           "refined_exact_s": timed(cp, lambda: lsq.solve_exact(cp, y, indptr, cols, vals, 0.0,
                                                                x0=x), 1)}
    for ratio in ratios:
        buckets = lsq.sketch_buckets(k, ratio)
        for steps in (0, 3):
            row[f"sketch_r{ratio:g}_steps{steps}_s"] = timed(cp, lambda: rowsolve.sketch_solve(
                cp, y, x, indptr, cols, vals, 0.0, rows, steps, buckets, 0, out), 1)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="rows, and rows of Y")
    ap.add_argument("--degree", type=int, default=3000, help="entries a row")
    ap.add_argument("--ranks", default="16,64,128")
    ap.add_argument("--ratios", default="4,8,16", help="sketch buckets per unit of k")
    ap.add_argument("--out", default="rowsolve-passes.json")
    args = ap.parse_args(argv)
    import cupy as cp

    rows = []
    for k in map(int, args.ranks.split(",")):
        rows.append(measure(cp, args.n, args.degree, k, [float(r) for r in args.ratios.split(",")]))
        cp.get_default_memory_pool().free_all_blocks()
        print(" ".join(f"{key} {val * 1e3:.1f} ms" if key.endswith("_s") else f"{key} {val}"
                       for key, val in rows[-1].items()), flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
