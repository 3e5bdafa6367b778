"""Matrix completion on 1..G GPUs through the `complete` op (Ray actors, NCCL all-gathers of
the factor blocks): time per sweep and the speed-up over one GPU.

    python bench/complete_gpus.py --gpus 1,2 [--n 200000 --fraction 1e-3 --rank 16]

The planted problem is written once with `mx data lowrank`. A first, unmeasured run compiles
the GPU kernels. Each run is a whole job. The figure compared is the median of the sweeps after
the first (each sweep's `sweep_seconds` in the output's history: wall time, every worker's part
done, its checkpoint left out); the first sweep also pays for NCCL's connections and the
balancing of the factors. Beside it: the slowest worker's GPU time inside all the sweeps (the
step's `gang:sweep` phase) per sweep, and its parts per sweep (its row solves, factor
all-gathers, the errors' GPU time and their exchange between workers; the first sweep's
included, whose first exchanges wait on the other workers' set-up); and the job's end-to-end
seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import mx  # noqa: E402
from mx.storage import generate  # noqa: E402


PARTS = ("row-solves", "factor-allgather", "errors", "metrics-exchange")


def run(g: int, observed: str, args, sweeps: int, checkpoint: bool = True) -> dict:
    """One whole `complete` job of ``sweeps`` sweeps on ``g`` GPUs (with or without its
    checkpoints); its time per sweep inside the sweeps."""
    import zarr

    output = os.path.join(args.data, f"factors-{g}-{time.time_ns()}.zarr")
    job = {"name": f"complete-g{g}", "resources": {"workers": g, "gpus": g},
           "steps": [{"id": "f", "op": "complete", "inputs": {"observed": observed},
                      "output": output,
                      "params": {"rank": args.rank, "method": args.method, "tol": 1e-14,
                                 "max_iters": sweeps, "checkpoint": checkpoint}}]}
    rec = mx.status(mx.submit(job, base=args.data))
    step = rec["steps"][0]
    history = zarr.open_group(store=output, mode="r").attrs["history"]
    times = [h["sweep_seconds"] for h in history]
    return {"gpus": g, "checkpoint": checkpoint, "sweeps": len(history),
            "sweep_s": float(np.median(times[1:] or times)), "sweep_seconds": times,
            "gpu_sweep_s": step["phases"]["gang:sweep"] / len(history),
            # the slowest worker's seconds in each part of a sweep, per sweep
            "parts_s": {part: step["phases"].get(f"gang:{part}", 0.0) / len(history)
                        for part in PARTS},
            "job_s": rec["seconds"],
            "final_rel_error": history[-1]["holdout_rel_error"], "phases": step["phases"],
            "counters": step.get("counters", {})}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", default="1,2")
    ap.add_argument("--n", type=int, default=200_000, help="m = n")
    ap.add_argument("--fraction", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--method", default="als")
    ap.add_argument("--sweeps", type=int, default=8)
    ap.add_argument("--data", default="/tmp/mx-bench")
    ap.add_argument("--checkpoints", choices=("on", "off", "both"), default="on",
                    help="run each job with its checkpoints, without, or both ways (what "
                         "checkpointing costs a job)")
    ap.add_argument("--out", default="complete-gpus.json")
    args = ap.parse_args(argv)
    os.makedirs(args.data, exist_ok=True)
    observed = os.path.join(args.data, f"lowrank-{args.n}-{args.fraction:g}-{args.rank}.zarr")
    if not os.path.exists(observed):
        t0 = time.perf_counter()
        generate.lowrank(observed, (args.n, args.n), args.rank, args.fraction, seed=1)
        print(f"wrote {observed} in {time.perf_counter() - t0:.1f} s", flush=True)
    counts = [int(x) for x in args.gpus.split(",")]
    # compiles the GPU kernels (cached on disk after); two sweeps meet every row solver
    warm = run(counts[0], observed, args, sweeps=2)
    print(f"warm-up on {counts[0]} GPU(s): {warm['sweep_s']:.4f} s/sweep (not counted)", flush=True)
    rows = []
    ways = {"on": [True], "off": [False], "both": [True, False]}[args.checkpoints]
    for g in counts:
        for checkpoint in ways:
            rows.append(run(g, observed, args, args.sweeps, checkpoint))
            print(json.dumps(rows[-1]), flush=True)
    import cupy

    device = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    with open(args.out, "w") as f:
        json.dump({"meta": {"date": time.strftime("%Y-%m-%d"), "device": device,
                            "argv": sys.argv[1:]}, "results": rows}, f, indent=1)
    base = rows[0]["sweep_s"]
    print(f"\ncomplete ({args.method}, k = {args.rank}) on {device}: n = {args.n}, "
          f"fraction {args.fraction:g}")
    print(f"{'GPUs':>4} {'ckpt':>4} {'s/sweep':>9} {'speed-up':>9} {'first':>8} "
          f"{'GPU s/sweep':>12} {'solves':>7} {'gather':>7} {'errors':>7} {'exch':>7} "
          f"{'ckpt s':>7} {'job s':>8} {'final err':>10}")
    for r in rows:
        ckpt = sum(t for phase, t in r["phases"].items() if "checkpoint" in phase)
        print(f"{r['gpus']:>4} {'on' if r['checkpoint'] else 'off':>4} {r['sweep_s']:>9.4f} "
              f"{base / r['sweep_s']:>8.2f}× {r['sweep_seconds'][0]:>8.3f} "
              f"{r['gpu_sweep_s']:>12.4f} "
              + "".join(f"{r['parts_s'][part]:>7.4f} " for part in PARTS)
              + f"{ckpt:>7.2f} {r['job_s']:>8.1f} "
              f"{r['final_rel_error']:>10.2e}")


if __name__ == "__main__":
    main()
