"""Matrix completion benchmark: altmin-sketch beside als-cg and exact ALS, on one GPU, in one run.

Planted rank-k matrices are made on the GPU (random orthonormal factors with singular values
from 1 down to 1/κ), with |Ω| entries observed uniformly at random and 2% held out. Each
method runs mx's sweeps (``mx.kernels.altmin.iterate``: the same code the ``complete`` op
runs, on one worker) from the same randomized-SVD start. Reported: the time to reach a
held-out relative error of 1e-4, the time per sweep, and the error reached.

Usage: python bench/complete.py --n 100000 --ranks 16,64,128 --out $OUT/complete.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mx.cluster.comm import GangContext, LocalComm, Mailroom  # noqa: E402
from mx.kernels import altmin, lsq  # noqa: E402

METHODS = ("altmin-sketch", "als-cg", "als")


def popular(cp, rng, count, size, exponent):
    """``size`` draws from ``count`` items, item i (in a random order) drawn with probability
    proportional to (i + 1)^-exponent: a few items are far more popular than the rest."""
    cdf = cp.cumsum(cp.arange(1, count + 1, dtype=np.float64) ** -exponent)
    picks = cp.searchsorted(cdf, rng.random(size) * cdf[-1])
    return cp.asarray(np.random.default_rng(int(count)).permutation(count))[cp.minimum(picks, count - 1)]


def planted(cp, m, n, k, entries, condition, seed, dtype=np.float64, skew=None):
    """Ω by rows and by columns, and the held-out entries by rows (CSR arrays on the GPU).
    Entries are uniform at random, or with ``skew`` = (a, b) rows and columns drawn apart with
    popularity exponents a and b (``popular``)."""
    rng = cp.random.default_rng(seed)
    scale = cp.asarray(np.geomspace(1.0, 1.0 / condition, k) * math.sqrt(m * n / k))
    u = cp.linalg.qr(rng.standard_normal((m, k)))[0] * cp.sqrt(scale)
    v = cp.linalg.qr(rng.standard_normal((n, k)))[0] * cp.sqrt(scale)
    if skew:
        keys = cp.unique(popular(cp, rng, m, entries, skew[0]) * n
                         + popular(cp, rng, n, entries, skew[1]))
    else:
        keys = cp.unique(rng.integers(0, m * n, size=entries, dtype=np.int64))
    rows, cols = keys // n, keys % n
    vals = cp.empty(keys.size, dtype=dtype)
    for lo in range(0, int(keys.size), 1 << 22):
        hi = lo + (1 << 22)
        vals[lo:hi] = (u[rows[lo:hi]] * v[cols[lo:hi]]).sum(axis=1)
    held = altmin.holdout_mask(cp, rows, cols, 0.02, seed)
    tr, tc, tv = rows[~held], cols[~held], vals[~held]
    R = altmin.sorted_csr(cp, tr, tc, tv, m, n)
    C = altmin.sorted_csr(cp, tc, tr, tv, n, m)
    return R, C, altmin.sorted_csr(cp, rows[held], cols[held], vals[held], m, n)


def iterate_here(cp, R, C, held, shape, k, method, max_iters, cg_iters=None, target=0.0,
                 reg=0.0):
    """``altmin.iterate`` on one worker in this process (no Ray), from the randomized-SVD
    start: (ctx, history, why it stopped)."""
    ctx = GangContext(comm_or_factory=LocalComm(Mailroom(), 0, 1), xp=cp)
    _, _, history, reason = altmin.iterate(ctx, R, C, held, shape, k, [(0, shape[0])],
                                           [(0, shape[1])], method, target, max_iters, reg,
                                           cg_iters, 0)
    return ctx, history, reason


@contextlib.contextmanager
def solve_wrapped(wrap):
    """``altmin._solve`` replaced by ``wrap(altmin._solve)`` for the duration: a bench's
    window on each half-sweep."""
    solve = altmin._solve
    altmin._solve = wrap(solve)
    try:
        yield
    finally:
        altmin._solve = solve


def write_results(path, device, results, **more):
    """A bench's JSON: when, on what, from which command line, and its results."""
    with open(path, "w") as f:
        json.dump({"meta": {"date": time.strftime("%Y-%m-%d"), "device": device,
                            "argv": sys.argv[1:]}, "results": results, **more}, f, indent=1)


def run_method(cp, R, C, held, shape, k, method, max_iters, cg_iters, target):
    sync = cp.cuda.runtime.deviceSynchronize if cp is not np else (lambda: None)
    sync()
    t0 = time.perf_counter()
    ctx, history, reason = iterate_here(cp, R, C, held, shape, k, method, max_iters, cg_iters,
                                        target)
    sync()
    total = time.perf_counter() - t0
    ctx.finish()
    init = ctx.stats.get("init", 0.0)
    reached = next((h for h in history if h["holdout_rel_error"] < target), None)
    sweeps = [b["seconds"] - a["seconds"] for a, b in zip([{"seconds": 0.0}] + history, history)]
    return {"method": method, "sweeps": len(history), "init_s": init,
            "time_to_target_s": (init + reached["seconds"]) if reached else None,
            "sweep_s": float(np.median(sweeps)) if sweeps else None,
            "final_rel_error": history[-1]["holdout_rel_error"] if history else None,
            "total_s": total, "stopped": reason,
            "errors": [h["holdout_rel_error"] for h in history],
            "sweep_times_s": sweeps,
            "row_solves": {name: n for name, n in ctx.counters.items() if name.startswith("row-solves-")}}


def parse(spec: str, cg_iters=0):
    """"METHOD[:STEPS][@f64]" → (method, CG steps, refine). Steps as the spec or ``cg_iters``
    asks, else None: the method's defaults, as in the complete op (altmin.CG_STEPS). ``@f64``
    runs the method in float64 throughout (lsq.REFINE off)."""
    name, _, precision = spec.partition("@")
    method, _, iters = name.partition(":")
    return method, int(iters or cg_iters or 0) or None, precision != "f64"


def run_spec(cp, R, C, held, shape, k, spec, max_iters, cg_iters, target):
    method, iters, refine = parse(spec, cg_iters)
    lsq.REFINE = refine
    try:
        return run_method(cp, R, C, held, shape, k, method, max_iters, iters, target)
    finally:
        lsq.REFINE = True


def warm_up(cp, ranks, specs):
    """Compile every kernel the timed runs use (each rank's, both for the sketch and for the
    plain CG that altmin-sketch picks against a well-conditioned factor), untimed: a kernel's
    first compilation takes seconds and would count against whichever method ran first."""
    for k in ranks:
        n = 8192  # rows of about 2500 entries: heavy up to k = 128
        for cond in (1.0, 100.0):
            R, C, held = planted(cp, n, n, k, 24 * k * n, cond, seed=2)
            for spec in specs:
                run_spec(cp, R, C, held, (n, n), k, spec, 2, 0, 0.0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="m = n")
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--entries-per-row", type=float, default=0.0,
                    help="|Ω|/n; default 10·k·ln n, capped by --max-entries")
    ap.add_argument("--max-entries", type=float, default=1.5e8)
    ap.add_argument("--conditions", default="1,100")
    ap.add_argument("--movielens", action="store_true", help="also 138k×27k, 20M entries, k=64")
    ap.add_argument("--skewed", action="store_true",
                    help="also 138k×27k, 20M entries, k=64, with MovieLens-like skew: the most "
                         "popular user and film have about 10k and 60k entries")
    ap.add_argument("--max-iters", type=int, default=30)
    ap.add_argument("--cg-iters", type=int, default=0,
                    help="CG steps per half-sweep; default each method's own (altmin.CG_STEPS)")
    ap.add_argument("--target", type=float, default=1e-4)
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated; METHOD:N runs it with N CG steps per half-sweep, "
                         "METHOD@f64 in float64 throughout (no float32 corrections)")
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default="complete-bench.json")
    args = ap.parse_args(argv)
    import cupy as cp

    device = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    cases = []
    for k in [int(x) for x in args.ranks.split(",") if x]:  # --ranks "": no planted square case
        for cond in [float(x) for x in args.conditions.split(",")]:
            per_row = args.entries_per_row or 10 * k * math.log(args.n)
            entries = int(min(per_row * args.n, args.max_entries))
            cases.append((f"planted n={args.n} k={k} κ={cond:g}", args.n, args.n, k, entries, cond,
                          None))
    if args.movielens:
        cases.append(("MovieLens-20M-sized", 138_493, 26_744, 64, 20_000_263, 1.0, None))
    if args.skewed:
        cases.append(("MovieLens-20M-sized, skewed", 138_493, 26_744, 64, 20_000_263, 1.0,
                      (0.4, 0.5)))
    warm_up(cp, sorted({c[3] for c in cases}), args.methods.split(","))
    rows = []
    for name, m, n, k, entries, cond, skew in cases:
        R, C, held = planted(cp, m, n, k, entries, cond, seed=1, skew=skew)
        # one untimed sweep first: the first method timed on a fresh case was seen to pay
        # for the case's first allocations (a third more on its first sweep)
        run_spec(cp, R, C, held, (m, n), k, args.methods.split(",")[0], 1, args.cg_iters, 0.0)
        for spec in args.methods.split(","):
            result = run_spec(cp, R, C, held, (m, n), k, spec, args.max_iters, args.cg_iters,
                              args.target)
            result["method"] = spec
            result.update(case=name, m=m, n=n, k=k, entries=int(R[1].size + held[1].size), condition=cond)
            rows.append(result)
            print(json.dumps(result), flush=True)
        del R, C, held
        cp.get_default_memory_pool().free_all_blocks()
    with open(args.out, "w") as f:
        json.dump({"meta": {"date": time.strftime("%Y-%m-%d"), "device": device, "argv": sys.argv[1:]},
                   "results": rows}, f, indent=1)
    print(f"\nMatrix completion on one {device}: time to held-out relative error {args.target:g}")
    print(f"{'case':>30} {'|Ω|':>11} {'method':>14} {'sweep s':>8} {'to target s':>11} {'sweeps':>6} {'final err':>9}")
    for r in rows:
        tt = r["time_to_target_s"]
        print(f"{r['case']:>30} {r['entries']:>11} {r['method']:>14} {r['sweep_s'] or float('nan'):8.4f} "
              f"{tt if tt is not None else float('nan'):11.2f} {r['sweeps']:>6} {r['final_rel_error']:9.2e}")


if __name__ == "__main__":
    main()
