"""altmin-sketch's row rules against variants of them and against als-cg, side by side on one
GPU: error a sweep, seconds a sweep, and seconds to als-cg's final error and to 1e-4.

    python bench/complete_rules.py [--cases skewed-1,uniform-5,p64-100] [--variants now,light-exact]

A case is ``uniform-κ`` or ``skewed-κ`` (MovieLens-20M-sized, 138k × 27k, 20M entries, k = 64,
planted with condition number κ; skewed: users and films drawn with popularity, as
bench/complete.py --skewed) or ``p<k>-κ`` (planted m = n = ``--n`` with ``--per-row``
entries a row at rank k). Each runs ``altmin.iterate`` in this process (one worker, no Ray)
for ``--sweeps`` sweeps from the same start, als-cg first, then altmin-sketch under each
variant of its rules:
- ``now``: the rules as they are;
- ``light-exact``: light rows (THIN_DEGREE·k to heavy_degree) solved exactly against an
  ill-conditioned factor, as before they took Gram-preconditioned steps there;
- ``heavy<s>``: heavy rows take s plain CG steps against a well-conditioned factor
  (CG_STEPS' "plain-cg");
- ``no-stop``: every CG row takes all its steps (no CG_STOP);
- ``stop-all``: light rows' steps, plain and Gram-preconditioned, stop as heavy rows' do;
- ``stop-always``: the stop's ratio is its cap from the first sweep on;
- ``f32``: CG corrections gather the factor in float32, not float16 (lsq.CORRECTION_STORAGE);
- ``f64``: float64 throughout, no float32 corrections (lsq.REFINE off);
- ``r64``: the corrections start from float64 residuals in every sweep (lsq.LOW_RESIDUAL
  None); ``r32``: from float32 residuals in every sweep (LOW_RESIDUAL 0);
- ``power<p>``: the randomized SVD's start makes p power iterations (altmin.POWER_ITERATIONS);
- ``precond``: Gram-preconditioned steps apply the k × k preconditioner each step, not
  plain steps against the whitened factor.
Times are the sweeps' own (``sweep_seconds``), without the initialisation, which every
variant shares. ``--noise s`` adds normal noise of s times the entries' root mean square to
the observed and held-out values, as real ratings have; ``--reg r`` regularises with r
times that root mean square (a factor row's squared norm, where the factors are balanced).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import complete as bench  # noqa: E402
from mx.kernels import altmin, lsq  # noqa: E402

MOVIELENS = (138_493, 26_744, 20_000_263, 64)


@contextlib.contextmanager
def variant(name: str):
    """altmin's rules changed as the variant ``name`` says, for the duration."""
    steps, plan, stop = dict(altmin.CG_STEPS), altmin._altmin_plan, dict(altmin.CG_STOP)
    contraction, storage, group = altmin._contraction, lsq.CORRECTION_STORAGE, lsq.cg_group
    refine, low, power = lsq.REFINE, lsq.LOW_RESIDUAL, altmin.POWER_ITERATIONS
    try:
        if name == "f32":
            lsq.CORRECTION_STORAGE = None
        elif name == "f64":
            lsq.REFINE = False
        elif name.startswith("power"):
            altmin.POWER_ITERATIONS = int(name[len("power"):])
        elif name in ("r64", "r32"):
            lsq.LOW_RESIDUAL = None if name == "r64" else 0.0
        elif name == "precond":
            lsq.cg_group = lambda *args, **kw: {**group(*args, **kw), "whitening": None}
        elif name == "stop-always":
            altmin._contraction = lambda history: 1.0
        elif name == "no-stop":
            altmin.CG_STOP.clear()
        elif name == "stop-all":
            heavy = altmin.CG_STOP[("altmin-sketch", "plain-cg")]
            for solver in ("plain-cg-light", "gram-cg"):
                altmin.CG_STOP[("altmin-sketch", solver)] = heavy
        elif name.startswith("heavy"):
            altmin.CG_STEPS[("altmin-sketch", "plain-cg")] = int(name[len("heavy"):])
        elif name == "light-exact":
            def light_exact(xp, degree, k, gpu):
                made = plan(xp, degree, k, gpu)
                ill = made[False]
                preconditioned = ill["gram-cg"]
                light = degree[preconditioned] >= altmin.THIN_DEGREE * k
                ill["exact"] = xp.sort(xp.concatenate([ill["exact"], preconditioned[light]]))
                ill["gram-cg"] = preconditioned[~light]
                return made
            altmin._altmin_plan = light_exact
        elif name != "now":
            raise SystemExit(f"unknown variant {name!r}: now, light-exact, heavy<steps>, "
                             "no-stop, stop-all, stop-always, f32, f64, r64, r32, power<p> "
                             "or precond")
        yield
    finally:
        altmin.CG_STEPS.clear()
        altmin.CG_STEPS.update(steps)
        altmin.CG_STOP.clear()
        altmin.CG_STOP.update(stop)
        altmin._altmin_plan = plan
        altmin._contraction = contraction
        lsq.CORRECTION_STORAGE, lsq.cg_group, lsq.REFINE = storage, group, refine
        lsq.LOW_RESIDUAL, altmin.POWER_ITERATIONS = low, power


def problem(cp, case: str, n: int, per_row: int, rank: int | None = None, noise: float = 0.0):
    """(R, C, held, (m, n), k, rms) of a case (see the module's doc; ``noise``: as --noise;
    rms: the entries' root mean square); ``rank``: k of the MovieLens-sized ones, if not
    64."""
    kind, condition = case.rsplit("-", 1)
    if kind.startswith("p"):
        k, m, entries, skew = int(kind[1:]), n, n * per_row, None
    elif kind in ("uniform", "skewed"):
        m, n, entries, k = MOVIELENS
        k = rank or k
        skew = (0.4, 0.5) if kind == "skewed" else None
    else:
        raise SystemExit(f"unknown case {case!r}: uniform-κ, skewed-κ or p<k>-κ")
    R, C, held = bench.planted(cp, m, n, k, entries, float(condition), seed=1, skew=skew)
    rms = float(cp.sqrt((R[2] * R[2]).mean()))
    if noise:
        rng = cp.random.default_rng(2)
        noisy = [part[2] + noise * rms * rng.standard_normal(part[2].size) for part in (R, held)]
        rows = lsq.row_ids(cp, R[0])
        R, held = (R[0], R[1], noisy[0]), (held[0], held[1], noisy[1])
        C = altmin.sorted_csr(cp, R[1], rows, R[2], n, m)
    return R, C, held, (m, n), k, rms


def sweeps(cp, R, C, held, shape, k, method, count, reg=0.0):
    ctx, history, _ = bench.iterate_here(cp, R, C, held, shape, k, method, count, reg=reg)
    cp.cuda.runtime.deviceSynchronize()
    ctx.finish()
    return {"init_s": ctx.stats.get("init", 0.0),
            "errors": [h["holdout_rel_error"] for h in history],
            "sweep_s": [h["sweep_seconds"] for h in history],
            "row_solves": {name: count for name, count in ctx.counters.items()
                           if name.startswith("row-solves-")}}


def reach(run, target):
    """Seconds of sweeps to a held-out error of at most target, and how many, or None."""
    elapsed = np.cumsum(run["sweep_s"])
    hit = next((i for i, e in enumerate(run["errors"]) if e <= target), None)
    return None if hit is None else (float(elapsed[hit]), hit + 1)


def main(argv=None):
    import cupy as cp

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="uniform-1,uniform-5,uniform-10,skewed-1,skewed-100,"
                                       "p16-1,p64-1,p64-100")
    ap.add_argument("--variants", default="now,light-exact,heavy2,heavy4")
    ap.add_argument("--n", type=int, default=100_000, help="m = n of the p<k> cases")
    ap.add_argument("--per-row", type=int, default=3000, help="entries a row of the p<k> cases")
    ap.add_argument("--sweeps", type=int, default=12)
    ap.add_argument("--noise", type=float, default=0.0)
    ap.add_argument("--reg", type=float, default=0.0)
    ap.add_argument("--out", default="complete-rules.json")
    args = ap.parse_args(argv)
    device = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    rows = []
    print(f"{'case':>11} {'method':>14} {'variant':>12} {'error':>9} {'ms/sweep':>9} "
          f"{'to als-cg error':>16} {'/ als-cg':>8} {'to 1e-4':>12} {'/ als-cg':>8}")
    for case in args.cases.split(","):
        R, C, held, shape, k, rms = problem(cp, case, args.n, args.per_row, noise=args.noise)
        reg = args.reg * rms
        for method in ("als-cg", "altmin-sketch"):  # every kernel compiled before the timing
            sweeps(cp, R, C, held, shape, k, method, 6, reg)
        runs = [("als-cg", "-")] + [("altmin-sketch", v) for v in args.variants.split(",")]
        base = None
        for method, name in runs:
            with variant("now" if method == "als-cg" else name):
                run = sweeps(cp, R, C, held, shape, k, method, args.sweeps, reg)
            base = base or run
            row = {"case": case, "k": k, "method": method, "variant": name, **run,
                   "to_als_cg_error": reach(run, base["errors"][-1]),
                   "to_1e-4": reach(run, 1e-4)}
            rows.append(row)
            cells = []
            for key in ("to_als_cg_error", "to_1e-4"):
                got, ref = row[key], reach(base, base["errors"][-1] if key != "to_1e-4" else 1e-4)
                cells.append(f"{got[0]:.3f}s@{got[1]:<3}" if got else "-")
                cells.append(f"{got[0] / ref[0]:.2f}×" if got and ref else "-")
            print(f"{case:>11} {method:>14} {name:>12} {run['errors'][-1]:>9.2e} "
                  f"{1e3 * np.median(run['sweep_s'][1:]):>9.2f} {cells[0]:>16} {cells[1]:>8} "
                  f"{cells[2]:>12} {cells[3]:>8}", flush=True)
        del R, C, held
        cp.get_default_memory_pool().free_all_blocks()
    bench.write_results(args.out, device, rows)


if __name__ == "__main__":
    main()
