"""SpGEMM benchmark: C = A·A with mx's hash kernel beside cuSPARSE and SciPy, in one run.

For each matrix (R-MAT at several scales, and look-alikes of the classic SpGEMM test set:
FEM-like banded, web graph, road network) it measures, on one GPU with A resident:
  mx        mx's two-pass hash kernel (symbolic + numeric, output on the device)
  cusparse  cupyx's csr @ csr (cuSPARSE SpGEMM, its default algorithm: the only one CuPy exposes)
  scipy     SciPy on the CPU (small and medium sizes)
GFLOP/s counts 2 × partial products / time. Peak GPU memory is tracked through CuPy's
allocator. Each result is checked: against SciPy where it ran, otherwise mx against cuSPARSE, or
on a sample of rows against SciPy when cuSPARSE fails or comes back empty.

With --e2e it also runs the spgemm op from Zarr to Zarr on 1..G GPU actors.

Usage: python bench/spgemm.py --rmat 14,15,16,17,18 --lookalikes --out $OUT/spgemm.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mx  # noqa: E402
from mx.kernels import spgemm  # noqa: E402
from mx.storage import generate, sparse  # noqa: E402


class PeakPool:
    """A CuPy memory pool that remembers its peak use."""

    def __init__(self):
        import cupy

        self.pool = cupy.cuda.MemoryPool()
        self.peak = 0

    def malloc(self, size):
        ptr = self.pool.malloc(size)
        self.peak = max(self.peak, self.pool.used_bytes())
        return ptr


MIN_SECONDS = 0.5


def timed_gpu(fn, repeat=3):
    """(median seconds, peak bytes, last result) of fn() on the GPU, after one warm-up. The timed
    runs share one warm pool (a cold pool would time cudaMalloc, which hits a kernel that
    allocates often harder than one that allocates once). The peak comes from one more run,
    untimed, through a pool that tracks it: its Python hook on every allocation would tax the
    side that allocates more often."""
    import cupy

    times, pool = [], cupy.cuda.MemoryPool()
    with cupy.cuda.using_allocator(pool.malloc):
        it = 0
        # short runs are repeated for at least MIN_SECONDS, so the median rides out clock ramps
        # and host jitter
        while it <= repeat or (sum(times) < MIN_SECONDS and it <= 100):
            cupy.cuda.runtime.deviceSynchronize()
            t0 = time.perf_counter()
            fn()
            cupy.cuda.runtime.deviceSynchronize()
            if it:
                times.append(time.perf_counter() - t0)
            it += 1
    pool.free_all_blocks()
    tracked = PeakPool()
    with cupy.cuda.using_allocator(tracked.malloc):
        result = fn()
        cupy.cuda.runtime.deviceSynchronize()
    return statistics.median(times), tracked.peak, result


def mx_kernel(a_dev):
    return spgemm._GpuProduct(a_dev, a_dev).numeric()


def cusparse(a_cupyx):
    return a_cupyx @ a_cupyx


def matrices(args, folder):
    out = []
    for scale in [int(s) for s in args.rmat.split(",") if s]:
        path = os.path.join(folder, f"rmat{scale}.zarr")
        if not os.path.exists(path):
            generate.rmat(path, scale, edge_factor=16, seed=1, dtype=args.dtype)
        out.append((f"rmat-{scale}", path))
    if args.lookalikes:
        specs = [("banded-fem", lambda p: generate.banded(p, 200_000, 40, density=0.5, seed=2, dtype=args.dtype)),
                 ("web", lambda p: generate.web(p, 500_000, avg_degree=8, seed=3, dtype=args.dtype)),
                 ("road", lambda p: generate.road(p, 1000, seed=4, dtype=args.dtype))]
        for name, make in specs:
            path = os.path.join(folder, f"{name}.zarr")
            if not os.path.exists(path):
                make(path)
            out.append((name, path))
    return out


def compare(got_ptr, got_idx, got_val, want: sp.csr_array) -> float | None:
    """Relative error of values when the patterns agree exactly, else None."""
    want = sp.csr_array(want)
    want.sort_indices()
    if len(got_idx) != want.nnz or not np.array_equal(got_ptr, want.indptr) \
            or not np.array_equal(got_idx, want.indices):
        return None
    denom = np.linalg.norm(want.data) or 1.0
    return float(np.linalg.norm(got_val.astype(np.float64) - want.data) / denom)


def run_one(name, path, args):
    import cupy
    import cupyx.scipy.sparse as csp

    a = sparse.read_csr(path)
    a.sort_indices()
    host = spgemm.Csr.from_scipy(a)
    products = int(spgemm.products_per_row(np, host, host).sum())
    flops = 2 * products
    row = {"matrix": name, "rows": a.shape[0], "nnz": int(a.nnz), "products": products}
    a_dev = spgemm.Csr(cupy.asarray(host.indptr), cupy.asarray(host.indices, dtype=np.int32),
                       cupy.asarray(host.data), host.shape)
    seconds, peak, c = timed_gpu(lambda: mx_kernel(a_dev))
    mx_out = (c.indptr.get(), c.indices.get(), c.data.get())
    row.update(mx_s=seconds, mx_gflops=flops / seconds / 1e9, mx_peak_gib=peak / 2**30,
               out_nnz=int(mx_out[0][-1]))
    del c
    if args.profile:  # one more run, each kernel launch timed on the GPU
        t0 = time.perf_counter()
        product = spgemm._GpuProduct(a_dev, a_dev, profile=True)
        product.numeric()
        cupy.cuda.runtime.deviceSynchronize()
        row["mx_profile"] = product.profile()
        row["mx_profile_wall_ms"] = (time.perf_counter() - t0) * 1e3
        del product

    cus = None
    try:
        a_cx = csp.csr_matrix((a_dev.data, a_dev.indices, a_dev.indptr.astype(np.int32)), shape=a.shape)
        seconds, peak, c = timed_gpu(lambda: cusparse(a_cx))
        c.sort_indices()
        cus = (c.indptr.get().astype(np.int64), c.indices.get(), c.data.get())
        row.update(cusparse_s=seconds, cusparse_gflops=flops / seconds / 1e9,
                   cusparse_peak_gib=peak / 2**30, cusparse_nnz=int(c.nnz))
        del c
    except Exception as exc:  # cuSPARSE out of memory or int32 overflow: recorded, not hidden
        row["cusparse_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    cupy.get_default_memory_pool().free_all_blocks()

    want = None
    if products <= args.scipy_max_products:
        t0 = time.perf_counter()
        want = a @ a
        row.update(scipy_s=time.perf_counter() - t0)
        row["scipy_gflops"] = flops / row["scipy_s"] / 1e9
    # correctness (values positive: no cancellation, so SciPy's pattern is the structural one)
    if want is not None:
        row["mx_error"] = compare(*mx_out, want)
        row["cusparse_error_vs_scipy"] = compare(*cus, want) if cus else None
    elif cus is not None and row.get("cusparse_nnz"):
        row["mx_error_vs_cusparse"] = compare(*mx_out, sp.csr_array((cus[2], cus[1], cus[0]), shape=a.shape))
    else:
        sample = np.random.default_rng(0).choice(a.shape[0], size=min(200, a.shape[0]), replace=False)
        sample.sort()
        sub = a[sample] @ a
        ptr, idx, val = mx_out
        got = sp.csr_array((val, idx, ptr), shape=a.shape)[sample]
        row["mx_error_sampled"] = compare(got.indptr, got.indices, got.data, sub)
    row["mx_correct"] = all(row.get(k) is not None and row[k] < 1e-4 for k in
                            ("mx_error", "mx_error_vs_cusparse", "mx_error_sampled") if k in row)
    if cus is not None:
        row["cusparse_correct"] = row.get("cusparse_nnz", 0) == row["out_nnz"] and (
            row.get("cusparse_error_vs_scipy") is None or row["cusparse_error_vs_scipy"] < 1e-4)
    return row


def run_e2e(name, path, gpus, folder):
    out = os.path.join(folder, f"C-{name}-{gpus}.zarr")
    job = {"name": f"spgemm-{name}", "resources": {"gpus": gpus},
           "steps": [{"id": f"c{t}", "op": "spgemm", "inputs": {"a": path, "b": path},
                      "output": f"{out}{t}", "params": {"permute": True}} for t in range(2)]}
    job_id = mx.submit(job, base=folder)
    step = mx.status(job_id)["steps"][1]
    import shutil
    for t in range(2):
        shutil.rmtree(f"{out}{t}", ignore_errors=True)
    return step["seconds"], step.get("phases")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rmat", default="14,15,16")
    ap.add_argument("--lookalikes", action="store_true")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--scipy-max-products", type=float, default=3e8)
    ap.add_argument("--e2e", default="", help="matrices to also run as an mx job, e.g. rmat-16")
    ap.add_argument("--gpus", default="1")
    ap.add_argument("--profile", action="store_true", help="also time mx's kernels one by one")
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default="spgemm-bench.json")
    args = ap.parse_args(argv)
    import cupy

    folder = args.data or tempfile.mkdtemp(prefix="mx-spgemm-")
    os.makedirs(folder, exist_ok=True)
    os.environ.setdefault("MX_HOME", os.path.join(folder, "mx-home"))
    device = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    rows = []
    mats = matrices(args, folder)
    for name, path in mats:
        try:
            row = run_one(name, path, args)
        except Exception as exc:  # recorded and shown; the other matrices still run
            print(f"{name}: FAILED {type(exc).__name__}: {exc}", flush=True)
            rows.append({"matrix": name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                          if k != "mx_profile"}), flush=True)
        if "mx_profile" in row:
            spans = row["mx_profile"]
            print(f"  {name} kernels {sum(s['ms'] for s in spans):.2f} ms of "
                  f"{row['mx_profile_wall_ms']:.2f} ms: " +
                  "; ".join(f"{s['kernel']} ({s['rows']} rows) {s['ms']:.2f}" for s in spans),
                  flush=True)
    e2e = []
    if args.e2e:
        import ray

        ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        for name, path in mats:
            if name in args.e2e.split(","):
                for g in [int(x) for x in args.gpus.split(",")]:
                    seconds, phases = run_e2e(name, path, g, folder)
                    e2e.append({"matrix": name, "gpus": g, "seconds": seconds, "phases": phases})
                    print(f"e2e {name} gpus={g}: {seconds:.2f} s {phases}", flush=True)
        ray.shutdown()
    with open(args.out, "w") as f:
        json.dump({"meta": {"date": time.strftime("%Y-%m-%d"), "device": device, "argv": sys.argv[1:]},
                   "kernel": rows, "e2e": e2e}, f, indent=1, default=str)

    print(f"\nSpGEMM A·A, {device}, {args.dtype} (GFLOP/s = 2·products/s; peak GiB on the GPU)")
    print(f"{'matrix':>12} {'nnz':>10} {'out nnz':>12} {'mx':>7} {'cuSPARSE':>9} {'×':>5} "
          f"{'scipy':>6} {'mx GiB':>7} {'cuSP GiB':>8}  correct (mx / cuSPARSE)")
    for r in rows:
        if "error" in r:
            print(f"{r['matrix']:>12} failed: {r['error'][:150]}")
            continue
        cus = r.get("cusparse_gflops")
        print(f"{r['matrix']:>12} {r['nnz']:>10} {r['out_nnz']:>12} {r['mx_gflops']:7.1f} "
              f"{cus if cus else float('nan'):9.1f} {(r['mx_gflops'] / cus) if cus else float('nan'):5.2f} "
              f"{r.get('scipy_gflops', float('nan')):6.2f} {r['mx_peak_gib']:7.2f} "
              f"{r.get('cusparse_peak_gib', float('nan')):8.2f}  {r['mx_correct']} / "
              f"{r.get('cusparse_correct', r.get('cusparse_error', '-'))}")


if __name__ == "__main__":
    main()
