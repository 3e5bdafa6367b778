"""What altmin-sketch's choice of row solvers costs a sweep, beside als-cg, on one GPU.

    python bench/complete_bookkeeping.py [--cases movielens,skewed] [--rounds 3]

On a problem where every row takes plain CG steps (MovieLens-20M-sized, κ = 1), altmin-sketch
does what als-cg does plus its bookkeeping: each half-sweep picks a regime from cond(YᵀY) of
the other factor, and its rows' solvers by degree. Four variants run the sweeps of
``mx.kernels.altmin.iterate`` from the same start, interleaved over rounds, and the median of
their sweeps after the first is compared:
- als-cg;
- altmin-sketch as it is: each form of Ω's row classes made once (``altmin.row_plan``), and the
  V half-sweep's UᵀU (which gives cond(UᵀU)) carried with the last sweep's error sums;
- with cond(YᵀY) computed in every half-sweep (a device sync and a host eigensolve);
- and with the row classes made again in every half-sweep too (three row selections, each a
  device sync): the bookkeeping before these two.
``--cases skewed`` is bench/complete.py's skewed problem, where altmin-sketch also solves some
rows exactly or by the sketch, so its sweep differs from als-cg's by more than bookkeeping.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import complete as bench  # noqa: E402

CASES = {"movielens": (138_493, 26_744, 64, 20_000_263, None),
         "skewed": (138_493, 26_744, 64, 20_000_263, (0.4, 0.5))}
VARIANTS = {"als-cg": ("als-cg", True, True),
            "altmin-sketch": ("altmin-sketch", True, True),
            "altmin-sketch, cond every half-sweep": ("altmin-sketch", True, False),
            "altmin-sketch, cond and row classes every half-sweep": ("altmin-sketch", False, False)}


def sweeps(cp, R, C, held, shape, k, method, keep_plan, keep_gram, count):
    """Seconds of each sweep after the first, with the plan and the carried Gram matrix
    dropped where asked (``_solve`` then makes them itself)."""
    def dropping(solve):
        def solving(xp, method, x, y, omega, reg, cg_iters, k, seed, plan=None, stats=None,
                    last=None, contraction=None):
            return solve(xp, method, x, y, omega, reg, cg_iters, k, seed,
                         plan if keep_plan else None, stats if keep_gram else None, last,
                         contraction)
        return solving

    with bench.solve_wrapped(dropping):
        history = bench.iterate_here(cp, R, C, held, shape, k, method, count)[1]
    return [h["sweep_seconds"] for h in history[1:]]


def main(argv=None):
    import cupy as cp

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="movielens,skewed")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sweeps", type=int, default=10)
    ap.add_argument("--out", default="complete-bookkeeping.json")
    args = ap.parse_args(argv)
    device = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    rows = []
    for case in args.cases.split(","):
        m, n, k, entries, skew = CASES[case]
        R, C, held = bench.planted(cp, m, n, k, entries, 1.0, seed=1, skew=skew)
        times = {name: [] for name in VARIANTS}
        for rnd in range(args.rounds + 1):  # the first round compiles, and is not counted
            for name, spec in VARIANTS.items():
                got = sweeps(cp, R, C, held, (m, n), k, *spec, args.sweeps)
                if rnd:
                    times[name] += got
        base = float(np.median(times["als-cg"]))
        for name in VARIANTS:
            rows.append({"case": case, "variant": name, "sweep_s": float(np.median(times[name])),
                         "to_als_cg": float(np.median(times[name])) / base,
                         "sweep_times_s": times[name]})
        del R, C, held
        cp.get_default_memory_pool().free_all_blocks()
    bench.write_results(args.out, device, rows)
    print(f"\naltmin-sketch's bookkeeping on one {device}: median sweep after the first, "
          f"{args.rounds} rounds of {args.sweeps} sweeps")
    print(f"{'case':>10} {'variant':>54} {'ms/sweep':>9} {'/ als-cg':>9}")
    for r in rows:
        print(f"{r['case']:>10} {r['variant']:>54} {1e3 * r['sweep_s']:>9.2f} {r['to_als_cg']:>8.2f}×")


if __name__ == "__main__":
    main()
