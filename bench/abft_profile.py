"""ABFT's cost on one GPU, part by part: the plain block product against the checked one.

Times with CUDA events, interleaved, median of --repeat: cuBLAS alone (beta = 1), the two
passes over the inputs, the check of a product written straight into C (the first product of
a block) and the fused check-and-add through a scratch block (every later product).

    python bench/abft_profile.py --sizes 16384,32768 --precisions fp32,bf16 --rect
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np


def timed(fn, repeat):
    import cupy

    times = []
    for _ in range(repeat):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return statistics.median(times)


def profile(m, k, n, precision, repeat):
    import cupy

    from mx.kernels import abft, gemm, precision as prec

    rng = cupy.random.default_rng(0)
    a = prec.to_device(cupy, rng.standard_normal((m, k), dtype=np.float32), precision)
    b = prec.to_device(cupy, rng.standard_normal((k, n), dtype=np.float32), precision)
    c = cupy.zeros((m, n), dtype=prec.output_dtype(precision))
    counters = {}
    parts = {
        "gemm": lambda: gemm.accumulate(cupy, c, a, b, precision),
        "gemm-beta0": lambda: gemm.accumulate(cupy, c, a, b, precision, beta=0.0),
        "checks-b": lambda: abft.row_checks(cupy, b, None, precision),
        "checked-fresh": lambda: abft.checked_accumulate(cupy, c, a, b, precision, counters, "p",
                                                         fresh=True),
        "checked-add": lambda: abft.checked_accumulate(cupy, c, a, b, precision, counters, "p"),
    }
    bv, _ = abft.row_checks(cupy, b, None, precision)
    parts["checks-a"] = lambda: abft.row_checks(cupy, a, bv, precision)
    expect = cupy.zeros((m, 2), dtype=c.dtype)
    parts["check-only"] = lambda: abft._check_add_cupy(c, None, expect, 1.0)
    for fn in parts.values():  # compile and warm up
        fn()
    times = {name: [] for name in parts}
    for _ in range(repeat):  # interleaved, so clock drift hits every part alike
        for name, fn in parts.items():
            times[name].append(timed(fn, 1))
    row = {name: statistics.median(t) for name, t in times.items()}
    flops = 2.0 * m * k * n
    row.update(shape=f"{m}x{k}x{n}", precision=precision, tflops=flops / row["gemm"] / 1e12,
               fresh_overhead=row["checked-fresh"] / row["gemm"] - 1,
               add_overhead=row["checked-add"] / row["gemm"] - 1,
               check_gbs=c.nbytes / row["check-only"] / 1e9)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="16384,32768")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--rect", action="store_true", help="also 65536×8192 · 8192×65536")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", default="abft-profile.json")
    ap.add_argument("--data", default=None, help="ignored (the GPU session script passes it)")
    args = ap.parse_args(argv)
    import cupy

    shapes = [(s, s, s) for s in map(int, args.sizes.split(",")) if s]
    if args.rect:
        shapes.append((65536, 8192, 65536))
    rows = []
    for m, k, n in shapes:
        for p in args.precisions.split(","):
            row = profile(m, k, n, p, args.repeat)
            cupy.get_default_memory_pool().free_all_blocks()
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print("ABFT cost per block product (seconds; overhead against cuBLAS alone, beta = 1)")
    print(f"{'shape':>18} {'prec':>5} {'TFLOP/s':>8} {'gemm':>8} {'beta0':>8} {'checks-b':>8} {'checks-a':>8} "
          f"{'check':>8} {'GB/s':>6} {'fresh':>7} {'add':>7}")
    for r in rows:
        print(f"{r['shape']:>18} {r['precision']:>5} {r['tflops']:8.1f} {r['gemm']:8.4f} "
              f"{r['gemm-beta0']:8.4f} {r['checks-b']:8.4f} {r['checks-a']:8.4f} {r['check-only']:8.4f} "
              f"{r['check_gbs']:6.0f} {r['fresh_overhead']:+7.1%} {r['add_overhead']:+7.1%}")


if __name__ == "__main__":
    main()
