"""ABFT's cost on one GPU, part by part: the plain block product against the checked one.

Times with CUDA events, interleaved, median of --repeat: cuBLAS alone (beta = 1, what mx runs
without ABFT), the two passes over the inputs that add a product's share to C's running
checksums, a whole checked product (both passes and cuBLAS), and the check of C, which runs
once per C block after its last product. The overhead of a block made of P products (Cannon
rounds, SUMMA panels, streamed slabs) is (P · checked + check) / (P · cuBLAS) − 1; the table
gives it for P = 1 and P = 4. A product whose blocks arrive from the host (a Cannon worker's
first round, every streamed slab) takes its checksums as the blocks are converted
(``abft.to_device``): **from host** times that whole block, conversion, product and check,
against the block without ABFT (conversion and product). Both convert from fp32 blocks already
on the device, so the host copy, the same either way, is left out; **conv** and **conv+chk**
are the two conversions alone.

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
    a32 = rng.standard_normal((m, k), dtype=np.float32)
    b32 = rng.standard_normal((k, n), dtype=np.float32)
    a, b = prec.to_device(cupy, a32, precision), prec.to_device(cupy, b32, precision)
    c = cupy.zeros((m, n), dtype=prec.output_dtype(precision))
    checked_c = cupy.zeros_like(c)
    checks = abft.start(cupy, checked_c, precision)
    bv, b_abs = abft.row_checks(cupy, b, None, precision)
    expect = cupy.zeros((m, 3), dtype=c.dtype)
    counters = {}
    parts = {
        "gemm": lambda: gemm.accumulate(cupy, c, a, b, precision),
        "checks-b": lambda: abft.row_checks(cupy, b, None, precision),
        "checks-a": lambda: abft.add_checks(cupy, a, bv, b_abs, expect, precision),
        "checked": lambda: abft.accumulate(cupy, checked_c, a, b, precision, checks, counters),
        "check": lambda: abft.verify(cupy, checked_c, checks, precision, counters, "profile"),
        "converted": lambda: (prec.to_device(cupy, a32, precision),
                              prec.to_device(cupy, b32, precision)),
        "converted-checked": lambda: abft.to_device(cupy, a32, b32, precision,
                                                    abft.start(cupy, c, precision)),
        "from-host": lambda: plain_from_host(cupy, a32, b32, c, precision),
        "from-host-checked": lambda: checked_from_host(cupy, a32, b32, c, precision),
    }
    for fn in parts.values():  # compile and warm up
        fn()
    times = {name: [] for name in parts}
    for _ in range(repeat):  # interleaved, so clock drift hits every part alike
        for name, fn in parts.items():
            times[name].append(timed(fn, 1))
    row = {name: statistics.median(t) for name, t in times.items()}
    flops = 2.0 * m * k * n
    row.update(shape=f"{m}x{k}x{n}", precision=precision, tflops=flops / row["gemm"] / 1e12,
               product_overhead=row["checked"] / row["gemm"] - 1,
               block1_overhead=block_overhead(row, 1), block4_overhead=block_overhead(row, 4),
               from_host_overhead=row["from-host-checked"] / row["from-host"] - 1,
               check_gbs=c.nbytes / row["check"] / 1e9)
    return row


def plain_from_host(cupy, a32, b32, c, precision):
    """A one-product C block as mx makes it without ABFT: convert both blocks, multiply."""
    from mx.kernels import gemm, precision as prec

    a, b = prec.to_device(cupy, a32, precision), prec.to_device(cupy, b32, precision)
    gemm.accumulate(cupy, c, a, b, precision, beta=0.0)


def checked_from_host(cupy, a32, b32, c, precision):
    """The same block with ABFT: checksums taken as the blocks are converted, then the check."""
    from mx.kernels import abft, gemm

    checks = abft.start(cupy, c, precision)
    a, b = abft.to_device(cupy, a32, b32, precision, checks)
    gemm.accumulate(cupy, c, a, b, precision, beta=0.0)
    abft.verify(cupy, c, checks, precision, {}, "profile")


def block_overhead(row, products):
    return (products * row["checked"] + row["check"]) / (products * row["gemm"]) - 1


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
    print("ABFT cost (seconds; overheads against cuBLAS alone, beta = 1)")
    print(f"{'shape':>18} {'prec':>5} {'TFLOP/s':>8} {'gemm':>8} {'checks-b':>8} {'checks-a':>8} "
          f"{'check':>8} {'GB/s':>6} {'product':>8} {'block P=1':>9} {'block P=4':>9} "
          f"{'conv':>7} {'conv+chk':>8} {'from host':>9}")
    for r in rows:
        print(f"{r['shape']:>18} {r['precision']:>5} {r['tflops']:8.1f} {r['gemm']:8.4f} "
              f"{r['checks-b']:8.4f} {r['checks-a']:8.4f} {r['check']:8.4f} {r['check_gbs']:6.0f} "
              f"{r['product_overhead']:+8.1%} {r['block1_overhead']:+9.1%} {r['block4_overhead']:+9.1%} "
              f"{r['converted']:7.4f} {r['converted-checked']:8.4f} {r['from_host_overhead']:+9.1%}")


if __name__ == "__main__":
    main()
