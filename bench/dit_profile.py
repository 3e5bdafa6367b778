"""Where one DiT forward's GPU time goes, mx against PyTorch, side by side in one run.

    python bench/dit_profile.py --sizes 1024,2048

DiT-XL/2 shapes, float16, the same weights in both (``scripts/dit_torch.py``). Each forward
runs under torch.profiler, whose CUPTI trace records every kernel on the device, CuPy's
included; kernel time is summed by kind (matrix products, attention, norms, the rest) and
printed with each side's kernel count, so the gap between the two is visible part by part.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "scripts"))

from mx.kernels import dit  # noqa: E402

KINDS = (("attention", ("attention", "fmha", "flash", "cudnn")),
         ("matmul", ("gemm", "cutlass", "xmma", "cublas", "s16816", "sm90", "nvjet")),
         ("norm", ("adaln", "layer_norm", "layernorm")))


def kind(name: str) -> str:
    low = name.lower()
    for label, marks in KINDS:
        if any(m in low for m in marks):
            return label
    return "elementwise/other"


def kernel_times(fn, sync) -> tuple[dict, dict, list]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()  # compiled and allocated before the trace
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    ms, count, by_name = defaultdict(float), defaultdict(int), defaultdict(float)
    for e in prof.events():
        if e.device_type.name == "CUDA":
            ms[kind(e.name)] += e.device_time / 1e3  # microseconds in the trace
            count[kind(e.name)] += 1
            by_name[e.name[:90]] += e.device_time / 1e3
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return dict(ms), dict(count), top


def profile_size(size: int) -> dict:
    import cupy
    import torch

    from diffuse import torch_forward, xl_setup  # bench/diffuse.py

    cfg, weights, grid, x = xl_setup(size)
    net = dit.load("builtin:dit-xl", cupy, np.float16, seed=0)
    xd = cupy.asarray(x)
    c = dit.condition(net, cupy, 500, 3)
    mx_ms, mx_n, mx_top = kernel_times(lambda: dit.forward_band(net, cupy, xd, (0, grid[0]), grid, c,
                                                        dit.own_kv),
                               cupy.cuda.get_current_stream().synchronize)
    net = None
    cupy.get_default_memory_pool().free_all_blocks()
    forward = torch_forward(cfg, weights, x)
    torch_ms, torch_n, torch_top = kernel_times(forward, torch.cuda.synchronize)
    forward = None
    torch.cuda.empty_cache()
    return {"size": size, "tokens": grid[0] * grid[1], "mx_ms": mx_ms, "mx_kernels": mx_n,
            "torch_ms": torch_ms, "torch_kernels": torch_n, "mx_top": mx_top,
            "torch_top": torch_top}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1024,2048")
    ap.add_argument("--out", default="dit-profile.json")
    ap.add_argument("--data", default=None, help="ignored (the GPU session script passes it)")
    args = ap.parse_args(argv)
    rows = [profile_size(int(s)) for s in args.sizes.split(",")]
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    for r in rows:  # the kernels behind the sums, largest first
        for side in ("mx", "torch"):
            print(f"{r['size']} {side}: " + "; ".join(f"{n} {t:.2f}" for n, t in r[f"{side}_top"][:8]))
    print(f"{'size':>5} {'kind':>18} {'mx ms':>8} {'torch ms':>9} {'mx/torch':>9} {'kernels':>11}")
    for r in rows:
        kinds = sorted(set(r["mx_ms"]) | set(r["torch_ms"]))
        for k in kinds + ["total"]:
            if k == "total":
                a, b = sum(r["mx_ms"].values()), sum(r["torch_ms"].values())
                n = f"{sum(r['mx_kernels'].values())}/{sum(r['torch_kernels'].values())}"
            else:
                a, b = r["mx_ms"].get(k, 0.0), r["torch_ms"].get(k, 0.0)
                n = f"{r['mx_kernels'].get(k, 0)}/{r['torch_kernels'].get(k, 0)}"
            ratio = f"{a / b:.2f}" if b else "-"
            print(f"{r['size']:>5} {k:>18} {a:8.2f} {b:9.2f} {ratio:>9} {n:>11}")


if __name__ == "__main__":
    main()
