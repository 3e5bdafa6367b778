"""Is mx's DiT forward bound by the host? For DiT-XL/2 shapes at each image size, the time
Python takes to issue one forward's kernels (no synchronisation) against the forward's wall
time, for the whole token grid and for half of its rows (one band of two GPUs). Where the two
are equal the GPU waits for the host, and splitting the image over GPUs cannot help much.

    python bench/dit_host.py --sizes 1024,2048
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from mx.kernels import dit  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1024,2048")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args(argv)
    import cupy

    from diffuse import xl_latent  # bench/diffuse.py

    net = dit.load("builtin:dit-xl", cupy, np.float16, seed=0)
    for size in [int(s) for s in args.sizes.split(",") if s]:
        cfg, grid, x = xl_latent(size)
        x = cupy.asarray(x)
        for rows in (grid[0], grid[0] // 2):
            band = x[:, :rows * cfg.patch]

            def forward():
                c = dit.condition(net, cupy, 500, 3)
                return dit.forward_band(net, cupy, band, (0, rows), grid, c, dit.own_kv)

            forward()
            cupy.cuda.runtime.deviceSynchronize()
            issue, total = [], []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                forward()
                t1 = time.perf_counter()
                cupy.cuda.runtime.deviceSynchronize()
                issue.append(t1 - t0)
                total.append(time.perf_counter() - t0)
            print(f"{size}² band of {rows}/{grid[0]} token rows: host issue "
                  f"{np.median(issue) * 1e3:6.1f} ms, forward {np.median(total) * 1e3:6.1f} ms")


if __name__ == "__main__":
    main()
