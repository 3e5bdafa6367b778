"""Attention alone: mx's fused kernel against PyTorch's scaled-dot-product attention, one run.

    python bench/attention.py --tokens 4096,16384 --heads 16 --dims 72,64,128

Float16 inputs, float32 accumulation in both. mx reads q, k and v through the strides of a
fused (tokens, 3, heads, d) projection, as the DiT does; torch gets (1, heads, tokens, d)
tensors holding the same values. Reported: milliseconds, TFLOP/s (4·n²·d per head), the ratio
torch / mx (above 1: mx is faster), and the relative difference of the two outputs.
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np


def timed(fn, sync, repeat):
    import time

    fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(tokens, heads, d, repeat):
    import cupy
    import torch

    from mx.kernels import attention

    qkv = cupy.random.default_rng(tokens + d).standard_normal((tokens, 3, heads, d),
                                                              dtype=np.float32).astype(np.float16)
    q, k, v = qkv.transpose(1, 2, 0, 3)
    sync = cupy.cuda.get_current_stream().synchronize
    mx_s = timed(lambda: attention.attend(cupy, q, k, v), sync, repeat)
    ours = cupy.asnumpy(attention.attend(cupy, q, k, v)).astype(np.float32)
    qt, kt, vt = (torch.as_tensor(cupy.ascontiguousarray(x), device="cuda")[None] for x in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch_s = timed(lambda: sdpa(qt, kt, vt), torch.cuda.synchronize, repeat)
    theirs = sdpa(qt, kt, vt)[0].float().cpu().numpy()
    flops = 4.0 * tokens * tokens * d * heads
    return {"tokens": tokens, "heads": heads, "d": d, "mx_ms": mx_s * 1e3, "torch_ms": torch_s * 1e3,
            "mx_tflops": flops / mx_s / 1e12, "torch_tflops": flops / torch_s / 1e12,
            "torch_over_mx": torch_s / mx_s,
            "rel_diff": float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="4096,16384")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dims", default="72,64,128")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--out", default="attention-bench.json")
    ap.add_argument("--data", default=None, help="ignored (the GPU session script passes it)")
    args = ap.parse_args(argv)
    import torch

    rows = []
    for d in map(int, args.dims.split(",")):
        for n in map(int, args.tokens.split(",")):
            row = compare(n, args.heads, d, args.repeat)
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"attention, {torch.cuda.get_device_name()}, float16, {args.heads} heads")
    print(f"{'tokens':>7} {'d':>4} {'mx ms':>8} {'torch ms':>9} {'mx TF/s':>8} {'torch TF/s':>10} "
          f"{'torch/mx':>8} {'rel diff':>9}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['d']:>4} {r['mx_ms']:8.3f} {r['torch_ms']:9.3f} "
              f"{r['mx_tflops']:8.1f} {r['torch_tflops']:10.1f} {r['torch_over_mx']:8.2f} "
              f"{r['rel_diff']:9.1e}")


if __name__ == "__main__":
    main()
