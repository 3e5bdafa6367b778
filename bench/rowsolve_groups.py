"""Tune the GPU row kernels' lane groups: one pass over Ω for each (C, U) of each operand type.

A group kernel (``rowsolve._GROUP_SOURCE``) splits a warp into groups of L lanes, each lane
holding C components of a row of Y, each group keeping U entries in flight. This times one
pass over every row, for each C and U: the float64 residual pass (``rowsolve.residual``),
and one CG step on the correction gathering Y in float32 and in float16
(``rowsolve.cg_solve``). Rows all of one degree, columns uniform. Float64 at 32 lanes an
entry (k > 64) keeps one entry in flight whatever U (``rowsolve._group_defines``).

Usage: python bench/rowsolve_groups.py [--out rowsolve-groups.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mx.kernels import rowsolve  # noqa: E402
from rowsolve_passes import timed  # noqa: E402

# (rows, degree, k, columns drawn from): the planted cases of bench/complete.py and a
# MovieLens-like one (138k rows of 144 entries over 30k columns)
CASES = [(100_000, 3000, 16, 100_000), (100_000, 3000, 64, 100_000),
         (100_000, 3000, 128, 100_000), (1_000_000, 300, 16, 1_000_000),
         (138_493, 144, 64, 30_000)]
GRID = {np.float64: ((2, 4, 8), (1, 2, 4)), np.float32: ((4, 8, 16), (1, 2, 4)),
        np.float16: ((8, 16), (2, 4, 8))}


def measure(cp, n, degree, k, span):
    rng = cp.random.default_rng(0)
    indptr = cp.arange(n + 1, dtype=cp.int64) * degree
    cols = cp.sort(rng.integers(0, span, size=(n, degree), dtype=cp.int64), axis=1).reshape(-1)
    y, x, vals = rng.standard_normal((span, k)), rng.standard_normal((n, k)), rng.standard_normal(cols.size)
    y32, r32 = y.astype(cp.float32), x.astype(cp.float32)
    rows, out = cp.arange(n, dtype=cp.int64), cp.empty_like(r32)
    passes = {
        np.float64: lambda: rowsolve.residual(cp, y, x, indptr, cols, vals, 0.0, rows),
        np.float32: lambda: rowsolve.cg_solve(cp, y32, None, indptr, cols, None, 0.0, rows, 1,
                                              out, r0=r32),
        np.float16: lambda: rowsolve.cg_solve(cp, y32, None, indptr, cols, None, 0.0, rows, 1,
                                              out, r0=r32, storage=np.float16)}
    row = {"n": n, "degree": degree, "k": k}
    for storage, (widths, unrolls) in GRID.items():
        keep = rowsolve._GROUP_WIDTH[np.dtype(storage)], rowsolve._GROUP_UNROLL[np.dtype(storage)]
        for c, u in itertools.product(widths, unrolls):
            if c * u > 32 or k > 32 * c:  # registers; a warp's lanes must hold k
                continue
            rowsolve._GROUP_WIDTH[np.dtype(storage)], rowsolve._GROUP_UNROLL[np.dtype(storage)] = c, u
            rowsolve._MODULES.clear()
            row[f"{np.dtype(storage).name}_C{c}_U{u}_ms"] = timed(cp, passes[storage], 5)
        rowsolve._GROUP_WIDTH[np.dtype(storage)], rowsolve._GROUP_UNROLL[np.dtype(storage)] = keep
        rowsolve._MODULES.clear()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="rowsolve-groups.json")
    args = ap.parse_args(argv)
    import cupy as cp

    rows = []
    for case in CASES:
        rows.append(measure(cp, *case))
        cp.get_default_memory_pool().free_all_blocks()
        for storage in GRID:
            name = np.dtype(storage).name
            mine = {key: val for key, val in rows[-1].items() if key.startswith(name + "_")}
            best = min(mine, key=mine.get)
            print(f"n {case[0]} degree {case[1]} k {case[2]} {name}: best {best} "
                  f"{mine[best]:.2f} ms", flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
