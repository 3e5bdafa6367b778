"""What of a completion sweep shrinks when a worker holds fewer rows: one GPU, the U half-sweep
of altmin-sketch (or another method) and the errors pass, for the first 1/g of the rows
against the whole other factor, as worker 0 of g would run them.

    python bench/complete_parts.py --n 1000000 --degree 300 --rank 16 --parts 1,2,4

Ω is made on the GPU (each row ``--degree`` distinct random columns, sorted; values from
planted rank-k factors), so no planted problem is written to disk. Each figure is the median
of ``--reps`` timed runs after one untimed, host clock around a synchronised call, so it
holds the host's syncs and launch gaps as well as the kernels; beside it the GPU time of the
same call (CUDA events). A part of the time that does not shrink as 1/g is a fixed cost per
worker, which bounds the speed-up of g GPUs however fast the rows go. Last, ``--sweeps`` whole
sweeps of ``altmin.iterate`` in this process, one worker, no Ray: their gang phases a sweep,
to set beside a job's (bench/complete_gpus.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mx.kernels import altmin, lsq  # noqa: E402


def omega(cupy, n: int, degree: int, k: int, seed: int):
    """(indptr, cols, vals) of an n × n pattern with ``degree`` distinct sorted columns a row,
    values u_i·v_j of planted Gaussian factors; and those factors."""
    rng = cupy.random.default_rng(seed)
    cols = rng.integers(0, n, size=(n, degree), dtype=np.int64)
    cols.sort(axis=1)
    # duplicates within a row are rare at degree << n; nudging them keeps rows distinct
    dup = cupy.zeros_like(cols, dtype=bool)
    dup[:, 1:] = cols[:, 1:] == cols[:, :-1]
    cols = cupy.where(dup, (cols + 1) % n, cols)
    cols.sort(axis=1)
    # float64, as the op's factors and values are (its CG steps solve a float32 correction)
    u = rng.standard_normal((n, k))
    v = rng.standard_normal((n, k))
    rows = cupy.repeat(cupy.arange(n, dtype=np.int64), degree)
    cols = cols.ravel()
    vals = lsq.predictions(cupy, u, v, rows, cols)
    indptr = cupy.arange(0, n * degree + 1, degree, dtype=np.int64)
    return (indptr, cols, vals), u, v


def first_rows(cupy, csr, count: int):
    indptr, cols, vals = csr
    end = int(indptr[count])
    return indptr[:count + 1].copy(), cols[:end], vals[:end]


def timed(cupy, fn, reps: int) -> tuple[float, float]:
    """Median host seconds and median GPU seconds of fn() over reps, after one untimed."""
    fn()
    cupy.cuda.Device().synchronize()
    host, gpu = [], []
    stream = cupy.cuda.get_current_stream()
    for _ in range(reps):
        t0 = time.perf_counter()
        start = stream.record()
        fn()
        end = stream.record()
        end.synchronize()
        host.append(time.perf_counter() - t0)
        gpu.append(cupy.cuda.get_elapsed_time(start, end) / 1000)
    return float(np.median(host)), float(np.median(gpu))


def sweep_parts(cupy, csr, n: int, k: int, method: str, sweeps: int) -> dict:
    """Seconds a sweep in each gang phase of ``altmin.iterate`` on one worker in this process
    (no Ray), over the sweeps after the first two: a job of ``sweeps`` less one of 2."""
    from mx.cluster.comm import GangContext, LocalComm, Mailroom

    indptr, cols, vals = csr
    by_columns = altmin.sorted_csr(cupy, cols, lsq.row_ids(cupy, indptr), vals, n, n)
    held = (cupy.zeros(n + 1, dtype=np.int64), cupy.empty(0, dtype=np.int64),
            cupy.empty(0, dtype=vals.dtype))

    def phases(count):
        ctx = GangContext(comm_or_factory=LocalComm(Mailroom(), 0, 1), xp=cupy)
        altmin.iterate(ctx, csr, by_columns, held, (n, n), k, [(0, n)], [(0, n)], method,
                       1e-14, count, 0.0, None, 0)
        ctx.finish()
        return ctx.stats

    short, whole = phases(2), phases(sweeps)
    return {part: (whole[part] - short.get(part, 0.0)) / (sweeps - 2) for part in whole
            if part != "init"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--degree", type=int, default=300)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--method", default="altmin-sketch")
    ap.add_argument("--parts", default="1,2,4")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--sweeps", type=int, default=6,
                    help="also run this many whole sweeps in one process (0: not)")
    ap.add_argument("--out", default="complete-parts.json")
    args = ap.parse_args(argv)
    import cupy

    k = args.rank
    full, u_true, v_true = omega(cupy, args.n, args.degree, k, seed=1)
    rng = cupy.random.default_rng(2)
    # a start near the answer, as in a late sweep
    u0 = u_true + 0.01 * rng.standard_normal(u_true.shape)
    device = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    rows = []
    for g in (int(x) for x in args.parts.split(",")):
        count = args.n // g
        part = first_rows(cupy, full, count)
        x0 = u0[:count].copy()
        plan = altmin.row_plan(cupy, part[0], k, args.method) if args.method != "als" else None

        def solve():
            altmin._solve(cupy, args.method, x0, v_true, part, 0.0, None, k, 0, plan)

        def errors():
            float(lsq.squared_error(cupy, x0, v_true, *part))

        row = {"g": g, "rows": count}
        row["solve_s"], row["solve_gpu_s"] = timed(cupy, solve, args.reps)
        row["errors_s"], row["errors_gpu_s"] = timed(cupy, errors, args.reps)
        rows.append(row)
        print(json.dumps(row), flush=True)
    swept = sweep_parts(cupy, full, args.n, k, args.method, args.sweeps) if args.sweeps else {}
    with open(args.out, "w") as f:
        json.dump({"meta": {"date": time.strftime("%Y-%m-%d"), "device": device,
                            "argv": sys.argv[1:]}, "results": rows, "sweep_parts": swept},
                  f, indent=1)
    base = rows[0]
    print(f"\nU half-sweep ({args.method}, k = {k}) on {device}: n = {args.n}, "
          f"degree {args.degree}; worker 0 of g")
    print(f"{'g':>3} {'rows':>9} {'solve s':>9} {'GPU s':>9} {'× 1/g':>7} "
          f"{'errors s':>9} {'GPU s':>9} {'× 1/g':>7}")
    for r in rows:
        print(f"{r['g']:>3} {r['rows']:>9} {r['solve_s']:>9.5f} {r['solve_gpu_s']:>9.5f} "
              f"{r['solve_s'] * r['g'] / base['solve_s']:>7.2f} {r['errors_s']:>9.5f} "
              f"{r['errors_gpu_s']:>9.5f} {r['errors_s'] * r['g'] / base['errors_s']:>7.2f}")
    print("(× 1/g: the time over 1/g of one worker's; 1.00 is perfect scaling)")
    if swept:
        print("\nwhole sweeps in one process (altmin.iterate, one worker), s a sweep after "
              "the first two: " + ", ".join(f"{part} {t:.5f}" for part, t in swept.items()))


if __name__ == "__main__":
    main()
