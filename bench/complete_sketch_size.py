"""altmin-sketch's sketch size and CG steps against exact ALS, on one GPU, in one run.

For one planted case, exact ALS and altmin-sketch with each bucket ratio (buckets per unit
of k) and step count run from the same start; printed: sweeps to the target, time per
sweep, time to the target (initialisation included) and the held-out error after each
sweep. This is the measurement behind ``lsq.SKETCH_RATIO``.

Usage: python bench/complete_sketch_size.py --n 100000 --k 64 --entries-per-row 3000 \
           --condition 100 --variants 4:3,8:3,16:3,16:2 --out $OUT/sketch-size.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import complete as bench  # noqa: E402
from mx.kernels import lsq  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="m = n")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--entries-per-row", type=float, default=3000)
    ap.add_argument("--max-entries", type=float, default=3e8)
    ap.add_argument("--condition", type=float, default=100.0)
    ap.add_argument("--variants", default="4:3,8:3,16:3",
                    help="comma-separated RATIO:STEPS for altmin-sketch (exact ALS always runs)")
    ap.add_argument("--max-iters", type=int, default=12)
    ap.add_argument("--target", type=float, default=1e-4)
    ap.add_argument("--out", default="sketch-size.json")
    args = ap.parse_args(argv)
    import cupy as cp

    n, k = args.n, args.k
    bench.warm_up(cp, [k], ["altmin-sketch", "als"])
    R, C, held = bench.planted(cp, n, n, k, int(min(args.entries_per_row * n, args.max_entries)),
                               args.condition, seed=1)
    default = lsq.SKETCH_RATIO
    bench.run_method(cp, R, C, held, (n, n), k, "als", 1, 1, 0.0)  # untimed: first allocations
    rows = []
    for variant in ["als"] + args.variants.split(","):
        if variant == "als":
            method, steps = "als", 1
        else:
            ratio, steps = variant.split(":")
            lsq.SKETCH_RATIO, method, steps = float(ratio), "altmin-sketch", int(steps)
        result = bench.run_method(cp, R, C, held, (n, n), k, method, args.max_iters, steps,
                                  args.target)
        lsq.SKETCH_RATIO = default
        result.update(variant=variant, n=n, k=k, condition=args.condition)
        rows.append(result)
    with open(args.out, "w") as f:
        json.dump({"meta": {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                            "argv": sys.argv[1:]}, "results": rows}, f, indent=1)
    print(f"n = {n}, k = {k}, κ = {args.condition:g}: time to held-out relative error {args.target:g}")
    print(f"{'variant':>8} {'sweeps':>6} {'sweep s':>8} {'to target s':>11}  errors after each sweep")
    for r in rows:
        tt = r["time_to_target_s"]
        print(f"{r['variant']:>8} {r['sweeps']:>6} {r['sweep_s']:8.3f} "
              f"{tt if tt is not None else float('nan'):11.2f}  "
              + " ".join(f"{e:.0e}" for e in r["errors"]))


if __name__ == "__main__":
    main()
