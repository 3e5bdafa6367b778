"""Light rows (fewer than 16k observations): exact solves against plain CG steps, sweep for
sweep, on the NumPy path (the GPU's reference), beside als-cg and ALS.

    python bench/complete_light_rows.py --shape movielens --rank 64 [--skew]
    python bench/complete_light_rows.py --shape 20000 --rank 16 --per-row 160 --condition 2.5

altmin-sketch runs from the same start with: every light row solved exactly (the rule before
thin rows were iterated); thin rows (below altmin.THIN_DEGREE·k) taking plain CG steps
against any factor, the other light rows exact (the CPU's rule before thin rows were
preconditioned); thin rows iterated as now, plain or preconditioned by the other factor's
Gram matrix (``altmin.GRAM_CG_DEGREE``: the CPU's rule); and as now, every light row
iterated where the other factor is well conditioned (the GPU's rule,
``altmin.light_rows_iterative``). ``--variants`` picks some. The figure is the held-out
relative error after each sweep; times are NumPy's and say nothing of a GPU.
``--shape movielens`` is MovieLens-20M's shape at a tenth of each side (13 849 × 2 674, about
145 and 750 observations a row); ``--skew`` draws its 2·10⁶ entries with MovieLens-like
popularity instead (bench/complete.py's ``popular``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import complete as bench  # noqa: E402
from mx.kernels import altmin  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="movielens", help="movielens, or N for N × N")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--per-row", type=float, default=145.0, help="observations per row of M")
    ap.add_argument("--condition", type=float, default=1.0)
    ap.add_argument("--sweeps", type=int, default=12)
    ap.add_argument("--skew", action="store_true", help="with --shape movielens: skewed")
    ap.add_argument("--variants", default="", help="comma-separated labels' first words: "
                    "light-exact, thin-plain, now-cpu, now-gpu, als-cg, als (default all)")
    ap.add_argument("--out", default="complete-light-rows.json")
    args = ap.parse_args(argv)
    m, n = (13849, 2674) if args.shape == "movielens" else (int(args.shape), int(args.shape))
    k = args.rank
    if args.skew:
        R, C, held = bench.planted(np, m, n, k, 2_000_000, args.condition, seed=1,
                                   skew=(0.4, 0.5))
    else:
        R, C, held = bench.planted(np, m, n, k, int(args.per_row * m), args.condition, seed=3)
    print(f"{m} × {n}, k = {k}, κ = {args.condition:g}: {np.diff(R[0]).mean():.0f} observations "
          f"a row, {np.diff(C[0]).mean():.0f} a column")
    rows = []
    iterative, thin, gram = altmin.light_rows_iterative, altmin.THIN_DEGREE, altmin.GRAM_CG_DEGREE
    chosen = [v for v in args.variants.split(",") if v]
    for name, label, method, thin_degree, gram_degree, light_cg in (
            ("light-exact", "altmin-sketch, light rows exact", "altmin-sketch", 0, gram, False),
            ("thin-plain", "altmin-sketch, thin rows plain CG", "altmin-sketch", thin, np.inf,
             False),
            ("now-cpu", "altmin-sketch, thin rows CG (CPU)", "altmin-sketch", thin, gram, False),
            ("now-gpu", "altmin-sketch, light rows CG (GPU)", "altmin-sketch", thin, gram, True),
            ("als-cg", "als-cg", "als-cg", thin, gram, False),
            ("als", "als", "als", thin, gram, False)):
        if chosen and name not in chosen:
            continue
        altmin.light_rows_iterative = (lambda gpu, k, well=True: True) if light_cg else iterative
        altmin.THIN_DEGREE, altmin.GRAM_CG_DEGREE = thin_degree, gram_degree
        t0 = time.perf_counter()
        try:
            r = bench.run_method(np, R, C, held, (m, n), k, method, args.sweeps, None, 0.0)
        finally:
            altmin.light_rows_iterative, altmin.THIN_DEGREE = iterative, thin
            altmin.GRAM_CG_DEGREE = gram
        r.update(label=label, seconds=time.perf_counter() - t0)
        rows.append(r)
        print(f"{label:36s} {r['seconds']:6.1f} s  " +
              " ".join(f"{e:.2e}" for e in r["errors"]) + f"  {r['row_solves']}", flush=True)
    with open(args.out, "w") as f:
        json.dump({"meta": {"date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:]},
                   "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
