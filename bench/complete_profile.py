"""Where a completion sweep's time goes, on one GPU: each part of a half-sweep timed alone.

    python bench/complete_profile.py [--k 64] [--m 138493 --n 26744 --entries 20000263]

Prints seconds per part for both halves (rows of U against V, rows of V against U): the
exact solve's gathers, Gram products and batched solves; the CG operator (a gather and a
sparse product); the sketch preconditioner; the training and held-out predictions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from complete import planted  # noqa: E402
from mx.kernels import lsq  # noqa: E402


def timed(cp, fn, repeat=3):
    fn()
    cp.cuda.runtime.deviceSynchronize()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        cp.cuda.runtime.deviceSynchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def exact_parts(cp, y, indptr, cols, values, k):
    """The exact solve split into its gathers + Gram products and its batched solves."""
    degree = cp.diff(indptr)
    width = 2 ** cp.ceil(cp.log2(cp.maximum(degree, 1))).astype(np.int64)
    eye = cp.eye(k, dtype=y.dtype)
    grams = []

    def build():
        grams.clear()
        for w in cp.unique(width).get().tolist():
            group = cp.nonzero(width == w)[0]
            per = max(1, (1 << 24) // max(1, w * k))
            for start in range(0, int(group.size), per):
                rows = group[start:start + per]
                slot = cp.arange(w)
                valid = slot[None, :] < degree[rows][:, None]
                pos = cp.where(valid, indptr[rows][:, None] + slot[None, :], 0)
                ys = y[cols[pos]] * valid[..., None]
                gram = cp.matmul(ys.transpose(0, 2, 1), ys) + eye
                b = cp.matmul(ys.transpose(0, 2, 1), (values[pos] * valid)[..., None])
                grams.append((gram, b))

    build_s = timed(cp, build, 2)
    solve_s = timed(cp, lambda: [cp.linalg.solve(g, b) for g, b in grams], 2)
    chol_s = timed(cp, lambda: [cp.linalg.cholesky(g) for g, b in grams], 2)
    return {"gather+gram": build_s, "solve (LU)": solve_s, "cholesky only": chol_s}


def half(cp, x, y, omega, k, seed):
    indptr, cols, vals = omega
    shape = (indptr.size - 1, y.shape[0])
    rows = lsq.row_ids(cp, indptr)
    out = {"rows": int(shape[0]), "entries": int(cols.size)}
    out.update(exact_parts(cp, y, indptr, cols, vals, k))
    out["solve_exact total"] = timed(cp, lambda: lsq.solve_exact(cp, y, indptr, cols, vals, 0.0), 2)
    out["predictions (gather)"] = timed(cp, lambda: lsq.predictions(cp, x, y, rows, cols))
    weights = lsq.predictions(cp, x, y, rows, cols)
    out["spmm (csr @ y)"] = timed(cp, lambda: lsq.csr(cp, indptr, cols, weights, shape) @ y)
    out["cg 4 steps"] = timed(cp, lambda: lsq.solve_cg(cp, x, y, indptr, cols, vals, 0.0, iters=4), 2)
    heavy = cp.nonzero(cp.diff(indptr) >= 4 * k)[0]
    out["heavy rows"] = int(heavy.size)
    out["sketch + 2 PCG steps (heavy rows)"] = timed(
        cp, lambda: lsq.solve_sketch(cp, x, y, indptr, cols, vals, 0.0, heavy, 2, seed), 2)
    return out


def crossover(cp, k, ratios, steps_list, entries=1 << 24, seed=0):
    """Per row degree, on rows all of that degree: the fused exact solve against the fused
    sketch-preconditioned CG (each bucket ratio and step count) and the fused plain CG (3
    steps, as altmin-sketch runs it against a well-conditioned factor; 4, as als-cg): where
    iterative solves start to pay."""
    rng = cp.random.default_rng(seed)
    n = 200_000
    y = rng.standard_normal((n, k))
    rows = []
    for degree in (256, 512, 2048, 8192, 32768):
        m = max(1, entries // degree)
        cols = cp.sort(rng.integers(0, n, size=(m, degree)), axis=1).reshape(-1)
        indptr = cp.arange(m + 1, dtype=cp.int64) * degree
        vals = rng.standard_normal(m * degree)
        x0 = cp.zeros((m, k))
        every = cp.arange(m)
        row = {"k": k, "degree": degree, "rows": m,
               "exact_s": timed(cp, lambda: lsq.solve_exact(cp, y, indptr, cols, vals, 0.0), 2),
               "plain3_s": timed(cp, lambda: lsq.solve_cg_rows(cp, x0, y, indptr, cols, vals, 0.0,
                                                                every, 3), 2),
               "plain4_s": timed(cp, lambda: lsq.solve_cg_rows(cp, x0, y, indptr, cols, vals, 0.0,
                                                                every, 4), 2)}
        for ratio in ratios:
            buckets = lsq.sketch_buckets(k, ratio)
            for steps in steps_list:
                row[f"sketch r{ratio:g} s{steps}_s"] = timed(cp, lambda: lsq.solve_sketch(
                    cp, x0, y, indptr, cols, vals, 0.0, every, steps, seed, buckets), 2)
        rows.append(row)
        print(" ".join(f"{key} {val:.4g}" if isinstance(val, float) else f"{key} {val}"
                       for key, val in row.items()), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, default=138_493)
    ap.add_argument("--n", type=int, default=26_744)
    ap.add_argument("--entries", type=int, default=20_000_263)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--out", default="complete-profile.json")
    ap.add_argument("--data", default=None)
    ap.add_argument("--crossover", action="store_true",
                    help="only: exact vs sketch+PCG per row degree")
    ap.add_argument("--ranks", default="16,64,128", help="with --crossover")
    ap.add_argument("--ratios", default="2,4,8", help="with --crossover: buckets per unit of k")
    ap.add_argument("--steps", default="1,2,3", help="with --crossover: CG steps")
    args = ap.parse_args(argv)
    import cupy as cp

    if args.crossover:
        result = [r for k in map(int, args.ranks.split(","))
                  for r in crossover(cp, k, [float(x) for x in args.ratios.split(",")],
                                     [int(x) for x in args.steps.split(",")])]
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        return

    R, C, held = planted(cp, args.m, args.n, args.k, args.entries, 1.0, seed=1)
    rng = cp.random.default_rng(2)
    u = rng.standard_normal((args.m, args.k))
    v = rng.standard_normal((args.n, args.k))
    result = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
              "shape": [args.m, args.n], "k": args.k,
              "V from U (by columns)": half(cp, v, u, C, args.k, 0),
              "U from V (by rows)": half(cp, u, v, R, args.k, 1)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{result['device']}: {args.m}×{args.n}, |Ω| {int(R[1].size)}, k {args.k}")
    for name in ("V from U (by columns)", "U from V (by rows)"):
        print(name)
        for part, value in result[name].items():
            print(f"  {part:<24} {value:.4f}" if isinstance(value, float) else f"  {part:<24} {value}")


if __name__ == "__main__":
    main()
