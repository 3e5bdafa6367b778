"""Where a completion sweep's time goes on one GPU: the device's kernels, and the gaps where
it waits for the host, per method, from a kernel trace.

    python bench/complete_trace.py [--cases uniform-1,skewed-1] [--methods altmin-sketch,als-cg]

The cases are bench/complete_rules.py's (MovieLens-20M-sized ones at ``--rank``). Each
method runs ``altmin.iterate`` in this process (one worker, no Ray) from the same
start: ``--warm`` sweeps untraced, then ``--sweeps`` traced by PyTorch's profiler, which
records every CUDA kernel and copy of the process through CUPTI, CuPy's included. Of the
traced sweeps after the first, per sweep: the host's seconds (``sweep_seconds``), the
device's busy seconds, and its idle time, split into the gaps between consecutive device
operations; the largest kinds of gap are named by the operations on either side of them.
A gap after a device-to-host copy is the host deciding something after a sync; a gap
before a kernel is the host's time to launch it. ``--traces`` keeps the Chrome traces
(``--stacks``: with Python stacks, which slow the host). The JSON also holds each traced
half-sweep's cond(YᵀY) and whether it solved its rows twice (``twice``: a wrong guess of
the factor's regime). Needs PyTorch beside CuPy.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import complete as bench  # noqa: E402
from complete_rules import problem  # noqa: E402

DEVICE_OPS = ("kernel", "gpu_memcpy", "gpu_memset")
GAP = 20e-6  # gaps shorter than this are launch spacing, not counted by kind


def sweeps(cp, R, C, held, shape, k, method, count):
    """Each sweep's host seconds, and each half-sweep's cond(YᵀY) and whether it solved its
    rows twice (a wrong guess of the regime: ``altmin._solve``)."""
    halves = []

    def recording(solve):
        def solving(*args, **kwargs):
            out, used, cond = solve(*args, **kwargs)
            halves.append({"cond": cond, "again": "again" in used})
            return out, used, cond
        return solving

    with bench.solve_wrapped(recording):
        history = bench.iterate_here(cp, R, C, held, shape, k, method, count)[1]
    cp.cuda.runtime.deviceSynchronize()
    return [h["sweep_seconds"] for h in history], halves


def device_ops(trace_path):
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    ops = [e for e in events if e.get("cat") in DEVICE_OPS]
    ops.sort(key=lambda e: e["ts"])
    return ops


def summarise(ops, sweep_count):
    """Busy and idle seconds a sweep, and the kinds of gap, over the sweeps after the first
    traced one (each sweep ends with its held-out errors pass, ``row_sq_error``; the last
    has one more after it, its training error's: ``altmin._settle_training_error``)."""
    ends = [i for i, e in enumerate(ops) if e["name"] == "row_sq_error"][:sweep_count]
    if len(ends) < 2:
        raise RuntimeError("the trace has fewer than two sweeps' errors passes")
    first, last = ends[0], ends[-1]
    per = len(ends) - 1
    window = ops[first + 1:last + 1]
    busy = sum(e["dur"] for e in window) * 1e-6
    span = (ops[last]["ts"] + ops[last]["dur"] - ops[first]["ts"] - ops[first]["dur"]) * 1e-6
    kinds = collections.defaultdict(lambda: [0, 0.0])
    for before, after in zip(ops[first:last], ops[first + 1:last + 1]):
        gap = (after["ts"] - before["ts"] - before["dur"]) * 1e-6
        if gap > GAP:
            kind = kinds[f"{before['name'][:40]} -> {after['name'][:40]}"]
            kind[0] += 1
            kind[1] += gap
    kernels = collections.defaultdict(float)
    for e in window:
        kernels[e["name"][:60]] += e["dur"] * 1e-6
    top = sorted(kinds.items(), key=lambda item: -item[1][1])
    return {"device_busy_s": busy / per, "device_idle_s": (span - busy) / per,
            "gaps": [{"between": name, "per_sweep": count / per, "s": total / per}
                     for name, (count, total) in top[:8]],
            "kernels_s": {name: t / per for name, t in
                          sorted(kernels.items(), key=lambda item: -item[1])[:12]}}


def main(argv=None):
    import cupy as cp
    from torch.profiler import ProfilerActivity, profile

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="uniform-1,skewed-1")
    ap.add_argument("--methods", default="altmin-sketch,als-cg")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--sweeps", type=int, default=6)
    ap.add_argument("--traces", action="store_true", help="keep the Chrome traces")
    ap.add_argument("--stacks", action="store_true", help="record Python stacks in them")
    ap.add_argument("--out", default="complete-trace.json")
    args = ap.parse_args(argv)
    device = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    methods = args.methods.split(",")
    rows = []
    for case in args.cases.split(","):
        R, C, held, (m, n), k, _ = problem(cp, case, 100_000, 3000, args.rank)
        for method in methods:  # compiles every kernel first
            sweeps(cp, R, C, held, (m, n), k, method, args.warm)
        for method in methods:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                         with_stack=args.stacks) as prof:
                host, halves = sweeps(cp, R, C, held, (m, n), k, method, args.sweeps)
            path = f"trace-{case}-k{k}-{method}.json"
            prof.export_chrome_trace(path)
            row = {"case": case, "k": k, "method": method,
                   "sweep_s": float(np.median(host[1:])), "sweep_times_s": host,
                   "half_sweeps": halves,
                   **summarise(device_ops(path), args.sweeps)}
            if not args.traces:
                os.remove(path)
            rows.append(row)
            print(json.dumps({key: row[key] for key in ("case", "method", "sweep_s",
                                                       "device_busy_s", "device_idle_s")}),
                  flush=True)
        del R, C, held
        cp.get_default_memory_pool().free_all_blocks()
    bench.write_results(args.out, device, rows)
    print(f"\nA sweep on one {device}, traced (median host time of sweeps after the first; "
          f"device time over the same sweeps)")
    print(f"{'case':>10} {'k':>4} {'method':>14} {'ms/sweep':>9} {'busy ms':>8} {'idle ms':>8}"
          f" {'twice':>5}  largest gaps (ms a sweep)")
    for r in rows:
        gaps = "; ".join(f"{g['between']} {1e3 * g['s']:.2f}" for g in r["gaps"][:3])
        twice = sum(h["again"] for h in r["half_sweeps"])
        print(f"{r['case']:>10} {r['k']:>4} {r['method']:>14} {1e3 * r['sweep_s']:>9.2f} "
              f"{1e3 * r['device_busy_s']:>8.2f} {1e3 * r['device_idle_s']:>8.2f} {twice:>5}  "
              f"{gaps}")


if __name__ == "__main__":
    main()
